"""Retrieval at scale: exact top-k search of text queries over large image-embedding galleries in bounded memory
(`xmodal.training.inference.search.chunked_topk`), showing that time grows linearly with the gallery and memory does not.

For each gallery size N (default 10k, 100k, 1M) a fresh child process builds `--queries` (1,000) random queries and N
random gallery embeddings (`--dim` 256, L2-normalised, fp32; the gallery is resident, as an in-memory index would
be), then:

- time: `chunked_topk(queries, gallery, k=--k, chunk_size=--chunk_size)`, median of `--repeats` runs after
  `--warmup`; for N <= `--compare_full_up_to` also the naive full search (`(queries @ gallery.T).topk(k)`), timed in
  alternation with it, and the two results compared;
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
    peak_rss_bytes,
    publish,
    reset_peak_rss,
    run_child,
    time_alternating,
)

from xmodal.training.inference.search import chunked_topk  # noqa: E402

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
    """One gallery size, in this (fresh) process."""
    size = args.sizes[0]
    queries = normalised_rows(args.queries, args.dim, seed=0)
    gallery = normalised_rows(size, args.dim, seed=1)
    searches = {"chunked": lambda: chunked_topk(queries, gallery, args.k, chunk_size=args.chunk_size)}
    if size <= args.compare_full_up_to:
        searches["full"] = lambda: (queries @ gallery.t()).topk(args.k, dim=1)
    result: dict[str, Any] = {"memory": {}}
    for name, search in searches.items():
        search()  # first calls set up thread pools and kernels
        gc.collect()
        resting = current_rss_bytes()
        reset_peak_rss()
        search()
        result["memory"][name] = peak_rss_bytes() - resting
    if "full" in searches:
        chunked, full = searches["chunked"](), searches["full"]()
        result["matches_full"] = bool(torch.equal(chunked[1], full[1]))
        result["max_score_difference"] = float((chunked[0] - full[0]).abs().max())
    times = time_alternating(searches, repeats=args.repeats, warmup=args.warmup)
    result["times"] = {name: [round(t, 5) for t in values] for name, values in times.items()}
    return result


def markdown(results: dict[str, Any], command: str) -> str:
    rows = []
    queries = results["queries"]
    for size, row in results["sizes"].items():
        n = int(size)
        chunked = median(row["times"]["chunked"])
        full = f"{median(row['times']['full']):.3f} s" if "full" in row["times"] else "not run"
        full_memory = f"{row['memory']['full'] / MIB:,.0f}" if "full" in row["memory"] else "not run"
        rows.append(
            [
                f"{n:,}",
                f"{chunked:.3f} s",
                f"{chunked / n * 1e6:.2f}",
                full,
                f"{row['memory']['chunked'] / MIB:,.0f}",
                full_memory,
                f"{queries * n * 4 / MIB:,.0f}",
            ]
        )
    table = markdown_table(
        [
            "gallery",
            "chunked top-k time",
            "µs per gallery row",
            "full matmul + topk time",
            "chunked peak extra (MiB)",
            "full peak extra (MiB)",
            "full Q x N matrix (MiB)",
        ],
        rows,
    )
    chunk_matrix = queries * results["chunk_size"] * 4 / MIB
    return (
        "## Retrieval at scale: chunked exact top-k (`bench/retrieval_scale.py`)\n\n"
        f"`{command}`\n\n{machine_line(results['machine'])} Top-{results['k']} of {queries:,} queries over "
        f"random L2-normalised fp32 embeddings (dim {results['dim']}), `chunked_topk` with chunks of "
        f"{results['chunk_size']:,} rows (one chunk's scores: {chunk_matrix:,.0f} MiB). Median of "
        f"{results['repeats']} runs after {results['warmup']} warm-up, the two searches alternating; each size in a "
        "fresh process, peak RSS above the resting RSS (gallery and queries allocated). Time per gallery row "
        "constant = linear growth; the chunked search's memory stays flat while the full similarity matrix grows "
        "with N.\n\n" + table
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
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
        args.sizes, args.queries, args.dim, args.chunk_size = [2000], 8, 16, 256  # one child: imports are slow
        args.repeats, args.warmup = 1, 0
    options = ["--queries", str(args.queries), "--dim", str(args.dim), "--k", str(args.k)]
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
        row = child_result(run_child(Path(__file__).resolve(), ["--sizes", str(size), *options], MALLOC_ENV))
        if row.get("matches_full") is False:
            raise RuntimeError(f"chunked_topk and the full search disagree at N={size}: {row}")
        results["sizes"][str(size)] = row
        print(
            f"N={size:,}: chunked {median(row['times']['chunked']):.3f} s, peak extra "
            f"{row['memory']['chunked'] / MIB:.1f} MiB",
            flush=True,
        )
    publish("retrieval_scale", results, markdown(results, command.strip()), write=not (args.smoke or args.no_write))
    return results


if __name__ == "__main__":
    main()
