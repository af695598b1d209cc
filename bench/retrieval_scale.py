"""Retrieval at scale: exact top-k search of text queries over large image-embedding galleries in bounded memory
(`xmodal.training.inference.search.chunked_topk`), showing that time grows linearly with the gallery and memory does
not, for both backends: torch (matmul + topk per chunk) and faiss (`faiss.knn`, exact inner product; `faiss-cpu`).

For each gallery size N (default 10k, 100k, 1M) a fresh child process builds N random gallery embeddings (`--dim`
256, L2-normalised, fp32; the gallery is resident, as an in-memory index would be) and, for each query count of
`--queries` (1: one `xmodal retrieve` query; 1,000: a batch, e.g. an evaluation), that many random queries, then:

- time: `chunked_topk(queries, gallery, k=--k, chunk_size=--chunk_size, backend=...)` for each backend, median of
  `--repeats` runs after `--warmup`, the backends alternating, with the median per-round ratio faiss / torch; for
  N <= `--compare_full_up_to` also the naive full search (`(queries @ gallery.T).topk(k)`), and the results compared;
- memory: the peak RSS above the resting RSS (queries and gallery allocated) during one search, the high-water mark
  reset before it (glibc `MALLOC_MMAP_THRESHOLD_`, see `common.MALLOC_ENV`, so that freed chunks leave the resident
  set); the chunked search needs O(Q * chunk_size + Q * k), the full one O(Q * N).

    python bench/retrieval_scale.py [--sizes 10000 100000 1000000] [--queries 1000] [--chunk_size 16384]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MALLOC_ENV,
    child_result,
    current_rss_bytes,
    machine,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    peak_rss_bytes,
    publish,
    ratio_cell,
    reset_peak_rss,
    run_child,
    time_alternating,
)

from xmodal.training.inference.search import chunked_topk, faiss_available  # noqa: E402

MIB = 2**20


def normalised_rows(rows: int, dim: int, seed: int, block: int = 65536) -> torch.Tensor:
    """`(rows, dim)` random unit vectors, filled block by block (no full-size temporary)."""
    out = torch.empty(rows, dim)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, rows, block):
        part = out[start : start + block]
        part.normal_(generator=generator)
        part.div_(part.norm(dim=1, keepdim=True))
    return out


def size_child(args: argparse.Namespace) -> dict[str, Any]:
    """One gallery size, in this (fresh) process: every query count, every backend."""
    size = args.sizes[0]
    gallery = normalised_rows(size, args.dim, seed=1)
    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    result: dict[str, Any] = {}
    for count in args.queries:
        queries = normalised_rows(count, args.dim, seed=0)
        searches = {
            backend: lambda backend=backend, queries=queries: chunked_topk(
                queries, gallery, args.k, chunk_size=args.chunk_size, backend=backend
            )
            for backend in backends
        }
        if size <= args.compare_full_up_to:
            searches["full"] = lambda queries=queries: (queries @ gallery.t()).topk(args.k, dim=1)
        row: dict[str, Any] = {"memory": {}}
        for name, search in searches.items():
            search()  # first calls set up thread pools and kernels
            gc.collect()
            resting = current_rss_bytes()
            reset_peak_rss()
            search()
            row["memory"][name] = peak_rss_bytes() - resting
        reference = searches["full"]() if "full" in searches else searches["torch"]()
        for backend in backends:
            scores, indices = searches[backend]()
            # exact searches: equal indices except where two scores are within float rounding (a swapped near-tie)
            row[f"{backend}_rows_matching"] = float((indices == reference[1]).all(dim=1).float().mean())
            row[f"{backend}_max_score_difference"] = float((scores - reference[0]).abs().max())
        times = time_alternating(searches, repeats=args.repeats, warmup=args.warmup)
        row["times"] = {name: [round(t, 5) for t in values] for name, values in times.items()}
        result[str(count)] = row
    return result


def markdown(results: dict[str, Any], command: str) -> str:
    rows = []
    for size, per_count in results["sizes"].items():
        n = int(size)
        for count, row in per_count.items():
            times, memory = row["times"], row["memory"]
            torch_time = median(times["torch"])
            faiss_cells = ["not installed"] * 3
            if "faiss" in times:
                faiss_cells = [
                    f"{median(times['faiss']):.4f} s",
                    ratio_cell(paired_ratio(times["torch"], times["faiss"]), bold=False),
                    f"{memory['faiss'] / MIB:,.0f}",
                ]
            rows.append(
                [
                    f"{n:,}",
                    f"{int(count):,}",
                    f"{torch_time:.4f} s",
                    f"{torch_time / n * 1e6:.3f}",
                    faiss_cells[0],
                    faiss_cells[1],
                    f"{median(times['full']):.4f} s" if "full" in times else "not run",
                    f"{memory['torch'] / MIB:,.0f}",
                    faiss_cells[2],
                    f"{memory['full'] / MIB:,.0f}" if "full" in memory else "not run",
                ]
            )
    table = markdown_table(
        [
            "gallery",
            "queries",
            "torch chunked",
            "µs per gallery row",
            "faiss chunked",
            "faiss speed vs torch",
            "full matmul + topk",
            "torch peak extra (MiB)",
            "faiss peak extra (MiB)",
            "full peak extra (MiB)",
        ],
        rows,
    )
    chunk_matrix = max(int(count) for count in results["queries"]) * results["chunk_size"] * 4 / MIB
    return (
        "## Retrieval at scale: chunked exact top-k, torch and faiss (`bench/retrieval_scale.py`)\n\n"
        f"`{command}`\n\n{machine_line(results['machine'])} Top-{results['k']} over random L2-normalised fp32 "
        f"embeddings (dim {results['dim']}), `chunked_topk` with chunks of {results['chunk_size']:,} rows (one "
        f"chunk's scores for the largest query batch: {chunk_matrix:,.0f} MiB), per backend. Median of "
        f"{results['repeats']} runs after {results['warmup']} warm-up, the searches alternating; the speed ratio is "
        "the median per-round ratio (range in brackets, > 1: faiss faster); each size in a fresh process, peak RSS "
        "above the resting RSS (gallery and queries allocated).\n\n" + table
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 1000], help="Query batch sizes.")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk_size", type=int, default=16384)
    parser.add_argument("--compare_full_up_to", type=int, default=100_000, help="Largest N also searched in full.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny sizes and 1 repeat (checks it runs); writes nothing."
    )
    parser.add_argument("--no_write", action="store_true", help="Print only; do not write bench/results/.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = size_child(args)
        print(json.dumps(result))
        return result
    command = "python bench/retrieval_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.sizes, args.queries, args.dim, args.chunk_size = [2000], [1, 8], 16, 256  # one child: imports are slow
        args.repeats, args.warmup = 1, 0
    options = ["--queries", *map(str, args.queries), "--dim", str(args.dim), "--k", str(args.k)]
    options += ["--chunk_size", str(args.chunk_size), "--compare_full_up_to", str(args.compare_full_up_to)]
    options += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--child"]
    results: dict[str, Any] = {
        "machine": machine(),
        "queries": args.queries,
        "dim": args.dim,
        "k": args.k,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "sizes": {},
    }
    for size in sorted(args.sizes):
        per_count = child_result(run_child(Path(__file__).resolve(), ["--sizes", str(size), *options], MALLOC_ENV))
        results["sizes"][str(size)] = per_count
        for count, row in per_count.items():
            faiss_time = f", faiss {median(row['times']['faiss']):.4f} s" if "faiss" in row["times"] else ""
            print(f"N={size:,}, {count} queries: torch {median(row['times']['torch']):.4f} s{faiss_time}", flush=True)
    publish("retrieval_scale", results, markdown(results, command.strip()), write=not (args.smoke or args.no_write))
    return results


if __name__ == "__main__":
    main()
