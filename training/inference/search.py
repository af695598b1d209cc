"""Exact top-k search of a large gallery of embeddings in bounded memory.

:func:`chunked_topk` walks the gallery chunk by chunk and keeps a running top-k per query, so searching Q queries over
N gallery rows needs O(Q * chunk_size + Q * k) extra memory instead of the O(Q * N) of one full similarity matrix,
and its time grows linearly with N. Each chunk is scored by faiss's exact inner-product kernel (`faiss.knn` with
`METRIC_INNER_PRODUCT`, the search of an `IndexFlatIP` without copying the gallery into an index) when `faiss-cpu` is
installed (`pip install "xmodal[faiss]"`) and the queries are fp32 on the CPU, else by a torch matmul and `topk`;
both are exact. The gallery may be a tensor (also a memory-mapped one, e.g. from
`torch.from_file` or `torch.from_numpy(numpy.memmap(...))`: only one chunk at a time is read), an iterable of chunks,
or a function returning such an iterable (e.g. one reading shards from disk).

Example::

    image_embeds = F.normalize(model.get_image_features(pixel_values=...).pooler_output, dim=-1)  # (N, D)
    text_embeds = F.normalize(model.get_text_features(input_ids=...).pooler_output, dim=-1)  # (Q, D)
    scores, indices = chunked_topk(text_embeds, image_embeds, k=10)  # (Q, 10) each, best first
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator

import torch

Gallery = torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]
"""A gallery of shape `(N, D)`: a tensor, an iterable of `(n_i, D)` chunks, or a function returning such an iterable."""


SEARCH_BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")
"""`backend` values of `chunked_topk`: auto (faiss when installed and usable, else torch), faiss, torch."""


def faiss_available() -> bool:
    """Whether `faiss` (the `faiss-cpu` package) can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _resolve_backend(backend: str, queries: torch.Tensor) -> str:
    """`auto` -> faiss for fp32 CPU queries when faiss is installed, else torch; an explicit faiss is checked."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"chunked_topk: backend must be one of {', '.join(SEARCH_BACKENDS)}, got {backend!r}.")
    usable = queries.device.type == "cpu" and queries.dtype == torch.float32
    if backend == "auto":
        return "faiss" if usable and faiss_available() else "torch"
    if backend == "faiss":
        if not faiss_available():
            raise ValueError('chunked_topk: backend="faiss" needs faiss-cpu (pip install "xmodal[faiss]").')
        if not usable:
            raise ValueError(
                f'chunked_topk: backend="faiss" searches fp32 CPU queries, got {queries.dtype} on {queries.device}; '
                'use backend="torch" (or "auto").'
            )
    return backend


def _faiss_topk(queries: torch.Tensor, chunk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss's exact inner-product top-k of `queries @ chunk.T`: values and columns `(Q, k)`, best first."""
    import faiss

    values, columns = faiss.knn(
        queries.contiguous().numpy(), chunk.contiguous().numpy(), k, metric=faiss.METRIC_INNER_PRODUCT
    )
    return torch.from_numpy(values), torch.from_numpy(columns)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"chunked_topk: {name} must be a positive integer, got {value!r}.")
    return value


def _chunks(gallery: Gallery, chunk_size: int) -> Iterator[torch.Tensor]:
    if isinstance(gallery, torch.Tensor):
        if gallery.ndim != 2:
            raise ValueError(f"chunked_topk: gallery must have shape (N, D), got {tuple(gallery.shape)}.")
        for start in range(0, gallery.shape[0], chunk_size):
            yield gallery[start : start + chunk_size]
        return
    if callable(gallery):
        gallery = gallery()
    if not isinstance(gallery, Iterable):
        raise TypeError(
            "chunked_topk: gallery must be a tensor (N, D), an iterable of (n, D) tensors or a function returning "
            f"one, got {type(gallery).__name__}."
        )
    for number, chunk in enumerate(gallery):
        if not isinstance(chunk, torch.Tensor) or chunk.ndim != 2:
            shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise ValueError(f"chunked_topk: gallery chunk {number} must be a tensor of shape (n, D), got {shape}.")
        yield chunk


def _chunk_topk(queries: torch.Tensor, chunk: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best columns of each row of `queries @ chunk.T` `(Q, n)`, ties going to the lower column, returned in
    column order (not score order): values and columns `(Q, k)`."""
    take = min(k + 1, chunk.shape[0])
    if backend == "faiss":
        scores = None
        values, columns = _faiss_topk(queries, chunk, take)
    else:
        scores = queries @ chunk.t()  # (Q, n)
        values, columns = scores.topk(take, dim=1)
    columns = columns[:, :k]
    if take > k:
        # topk picks arbitrarily among values equal to the k-th: where the (k+1)-th ties with the k-th, the row is
        # redone with a stable sort, which keeps the lowest columns
        tied = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        if tied.numel():
            tied_scores = scores[tied] if scores is not None else queries[tied] @ chunk.t()
            columns[tied] = tied_scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    columns = columns.sort(dim=1).values
    if scores is not None:
        return scores.gather(1, columns), columns
    return torch.einsum("qd,qkd->qk", queries, chunk[columns]), columns


def chunked_topk(
    queries: torch.Tensor, gallery: Gallery, k: int, chunk_size: int = 16384, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` gallery rows of highest dot product with each query, computed chunk by chunk in bounded memory.

    For L2-normalised embeddings the dot product is the cosine similarity (normalise both sides first). The result
    equals a full search, `(queries @ gallery.T)` sorted in descending order with ties going to the lower gallery
    index (`torch.sort(..., descending=True, stable=True)`), without ever holding the `(Q, N)` matrix: extra memory is
    O(Q * chunk_size + Q * k).

    Args:
        queries (`torch.Tensor` of shape `(Q, D)`): floating-point query embeddings; the search runs in their dtype
            and on their device (each gallery chunk is moved and cast to them).
        gallery: `(N, D)` embeddings: a tensor (memory-mapped is fine: it is read one chunk at a time), an iterable
            of `(n_i, D)` chunks in gallery order (rows are numbered across chunks), or a function returning such an
            iterable.
        k (`int`): results per query, 1 <= k <= N.
        chunk_size (`int`): gallery rows scored at once when `gallery` is a tensor (chunks of an iterable are taken
            as given).
        backend (`str`): how a chunk is scored: `"faiss"` (faiss's exact inner-product kernel; fp32 CPU queries),
            `"torch"` (a matmul and `topk`, any device and dtype) or `"auto"` (faiss when installed and usable). The
            scores agree to float rounding; where several rows tie at the k-th place, faiss may keep another of them.

    Returns:
        `(scores, indices)`, both `(Q, k)`: the dot products, best first, and the gallery rows (int64) they belong to.

    Raises:
        ValueError: `queries` is not a 2-D floating-point tensor, a chunk is not `(n, D)` with the queries' D, `k` or
            `chunk_size` is not a positive integer, `k` exceeds the gallery's size, or `backend` is unknown (or faiss,
            when it is not installed or the queries are not fp32 on the CPU).
        TypeError: `gallery` is none of the accepted kinds.
    """
    if not isinstance(queries, torch.Tensor) or queries.ndim != 2:
        shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
        raise ValueError(f"chunked_topk: queries must be a tensor of shape (Q, D), got {shape}.")
    if not queries.is_floating_point():
        raise ValueError(f"chunked_topk: queries must be floating point, got {queries.dtype}.")
    k = _check_positive_int("k", k)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    backend = _resolve_backend(backend, queries)
    num_queries, dim = queries.shape
    best_scores = queries.new_empty(num_queries, 0)
    best_indices = torch.empty(num_queries, 0, dtype=torch.long, device=queries.device)
    offset = 0
    for number, chunk in enumerate(_chunks(gallery, chunk_size)):
        if chunk.shape[1] != dim:
            raise ValueError(
                f"chunked_topk: gallery chunk {number} has dimension {chunk.shape[1]}, the queries {dim}."
            )
        if chunk.shape[0] == 0:
            continue
        if not chunk.is_floating_point():
            raise ValueError(f"chunked_topk: gallery chunk {number} must be floating point, got {chunk.dtype}.")
        chunk = chunk.to(device=queries.device, dtype=queries.dtype)
        values, columns = _chunk_topk(queries, chunk, min(k, chunk.shape[0]), backend)
        # candidates in gallery order (the kept ones, all earlier, sorted best first with ties by index; then this
        # chunk's in index order): a stable descending sort ranks ties by gallery index
        candidates = torch.cat([best_scores, values], dim=1)
        candidate_indices = torch.cat([best_indices, columns + offset], dim=1)
        order = candidates.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_indices = candidates.gather(1, order), candidate_indices.gather(1, order)
        offset += chunk.shape[0]
    if offset < k:
        raise ValueError(f"chunked_topk: k={k} exceeds the gallery's {offset} rows.")
    return best_scores, best_indices


__all__ = ["SEARCH_BACKENDS", "Gallery", "chunked_topk", "faiss_available"]
