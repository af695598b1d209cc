"""chunked_topk: equal to a full search (ties to the lower gallery index), whatever the chunking, the gallery's form
and the backend (faiss's exact inner-product kernel or torch), with clear errors for bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xmodal.training.inference.search as search
from xmodal.training.inference.search import chunked_topk

# faiss-cpu is a dev dependency, so make test runs both backends
BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not search.faiss_available(), reason="no faiss"))]


def full_search(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the whole similarity matrix, sorted best first with ties to the lower index."""
    ranked = (queries @ gallery.t()).sort(dim=1, descending=True, stable=True)
    return ranked.values[:, :k], ranked.indices[:, :k]


def integer_embeddings(rows: int, seed: int, dim: int = 6) -> torch.Tensor:
    """Small-integer vectors: their dot products are exact in any summation order and full of ties."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (rows, dim), generator=generator).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 17, 100, 1000])
@pytest.mark.parametrize("k", [1, 4, 16, 100])
def test_equals_full_search_with_ties(chunk_size, k, backend):
    queries, gallery = integer_embeddings(20, seed=0), integer_embeddings(100, seed=1)
    scores, indices = chunked_topk(queries, gallery, k, chunk_size=chunk_size, backend=backend)
    expected_scores, expected_indices = full_search(queries, gallery, k)
    assert indices.dtype == torch.long and scores.shape == indices.shape == (20, k)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(scores, expected_scores)


def test_ties_go_to_the_lower_index_across_chunks():
    # every gallery row scores the same: the answer is rows 0..k-1, wherever the chunk boundaries fall
    gallery = torch.ones(50, 4)
    scores, indices = chunked_topk(torch.ones(3, 4), gallery, k=7, chunk_size=4)
    assert torch.equal(indices, torch.arange(7).expand(3, 7))
    assert torch.equal(scores, torch.full((3, 7), 4.0))
    # a later duplicate of the best row never displaces the earlier one
    gallery = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    gallery[25] = gallery[2]
    _, indices = chunked_topk(gallery[2:3], gallery, k=2, chunk_size=5)
    assert indices.tolist() == [[2, 25]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_topk_on_normalised_embeddings(backend):
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(37, 64, generator=generator), dim=-1)
    gallery = F.normalize(torch.randn(5000, 64, generator=generator), dim=-1)
    scores, indices = chunked_topk(queries, gallery, k=10, chunk_size=777, backend=backend)
    expected = (queries @ gallery.t()).topk(10, dim=1)
    # random unit vectors: no two scores of a row within float rounding of each other here
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_auto_takes_faiss_for_fp32_cpu_queries_when_installed(monkeypatch):
    calls = []
    monkeypatch.setattr(search, "_faiss_topk", lambda *args: calls.append(args) or search_torch_topk(*args))
    queries, gallery = integer_embeddings(3, seed=8), integer_embeddings(40, seed=9)
    expected = full_search(queries, gallery, 4)
    monkeypatch.setattr(search, "faiss_available", lambda: True)
    assert torch.equal(chunked_topk(queries, gallery, 4, chunk_size=16)[1], expected[1]) and len(calls) == 3
    assert torch.equal(chunked_topk(queries.double(), gallery, 4)[1], expected[1]) and len(calls) == 3  # fp64: torch
    monkeypatch.setattr(search, "faiss_available", lambda: False)
    assert torch.equal(chunked_topk(queries, gallery, 4)[1], expected[1]) and len(calls) == 3
    with pytest.raises(ValueError, match=r'backend="faiss" needs faiss-cpu \(pip install "xmodal\[faiss\]"\)'):
        chunked_topk(queries, gallery, 4, backend="faiss")


def search_torch_topk(queries: torch.Tensor, chunk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for faiss's kernel: the best `k` of `queries @ chunk.T`, best first."""
    return (queries @ chunk.t()).topk(k, dim=1)


def test_chunk_boundaries_and_k_equal_to_gallery():
    queries, gallery = integer_embeddings(5, seed=2), integer_embeddings(12, seed=3)
    # the best rows straddle chunks of 5 (0-4, 5-9, 10-11); k = N returns the whole gallery ranked
    for k in (5, 6, 11, 12):
        assert torch.equal(chunked_topk(queries, gallery, k, chunk_size=5)[1], full_search(queries, gallery, k)[1])
    # a chunk smaller than k, and one larger than the gallery
    assert torch.equal(chunked_topk(queries, gallery, 9, chunk_size=2)[1], full_search(queries, gallery, 9)[1])
    assert torch.equal(chunked_topk(queries, gallery, 3, chunk_size=10**6)[1], full_search(queries, gallery, 3)[1])


def test_iterable_callable_and_memory_mapped_galleries(tmp_path):
    queries, gallery = integer_embeddings(8, seed=4), integer_embeddings(60, seed=5)
    expected = full_search(queries, gallery, 6)
    uneven = [gallery[:7], gallery[7:7], gallery[7:31], gallery[31:]]  # an empty chunk too
    for form in (uneven, iter(uneven), lambda: (gallery[i : i + 9] for i in range(0, 60, 9))):
        scores, indices = chunked_topk(queries, form, k=6)
        assert torch.equal(indices, expected[1]) and torch.equal(scores, expected[0])
    path = tmp_path / "gallery.f32"
    gallery.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=60 * 6, dtype=torch.float32).view(60, 6)
    assert torch.equal(chunked_topk(queries, mapped, k=6, chunk_size=11)[1], expected[1])


def test_dtypes():
    queries, gallery = integer_embeddings(4, seed=6), integer_embeddings(40, seed=7)
    expected = full_search(queries, gallery, 5)
    # the search runs in the queries' dtype: a half-precision gallery is cast chunk by chunk
    scores, indices = chunked_topk(queries, gallery.half(), k=5, chunk_size=8)
    assert scores.dtype == torch.float32 and torch.equal(indices, expected[1])
    scores, indices = chunked_topk(queries.double(), gallery, k=5, chunk_size=8)
    assert scores.dtype == torch.float64 and torch.equal(indices, expected[1])
    assert torch.equal(scores, expected[0].double())


def test_errors():
    queries, gallery = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="k=11 exceeds the gallery's 10 rows"):
        chunked_topk(queries, gallery, k=11)
    with pytest.raises(ValueError, match="k=11 exceeds the gallery's 10 rows"):
        chunked_topk(queries, [gallery[:4], gallery[4:]], k=11)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            chunked_topk(queries, gallery, k=k)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunked_topk(queries, gallery, k=1, chunk_size=0)
    with pytest.raises(ValueError, match=r"queries must be a tensor of shape \(Q, D\), got \(4,\)"):
        chunked_topk(torch.randn(4), gallery, k=1)
    with pytest.raises(ValueError, match="queries must be floating point"):
        chunked_topk(torch.ones(3, 4, dtype=torch.long), gallery, k=1)
    with pytest.raises(ValueError, match=r"gallery must have shape \(N, D\), got \(10, 4, 1\)"):
        chunked_topk(queries, gallery[..., None], k=1)
    with pytest.raises(ValueError, match=r"backend must be one of auto, faiss, torch, got 'annoy'"):
        chunked_topk(queries, gallery, k=1, backend="annoy")
    if search.faiss_available():
        with pytest.raises(ValueError, match=r'backend="faiss" searches fp32 CPU queries, got torch.float64'):
            chunked_topk(queries.double(), gallery, k=1, backend="faiss")
    with pytest.raises(ValueError, match="gallery chunk 1 has dimension 5, the queries 4"):
        chunked_topk(queries, [gallery, torch.randn(2, 5)], k=1)
    with pytest.raises(ValueError, match="gallery chunk 0 must be a tensor of shape"):
        chunked_topk(queries, [torch.randn(4)], k=1)
    with pytest.raises(ValueError, match="gallery chunk 0 must be floating point"):
        chunked_topk(queries, [torch.ones(2, 4, dtype=torch.long)], k=1)
    with pytest.raises(TypeError, match="gallery must be a tensor"):
        chunked_topk(queries, 42, k=1)
