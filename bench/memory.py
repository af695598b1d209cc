"""Memory: peak resident memory of a contrastive training step with and without gradient checkpointing, and the
memory of the contrastive loss as the global batch grows.

1. Training step (issue target: checkpointing lowers the peak by >= 40%). `XModalModel` at `--preset` (default
   `small`) takes forward + backward + AdamW steps on `--batch_size` (128) random pairs (captions padded to
   `--text_length` tokens), once plain and once after `model.activation_checkpointing_enable()` (transformers'
   non-deprecated name of `gradient_checkpointing_enable`; every encoder layer is a `GradientCheckpointingLayer`).
   Each variant runs in its own fresh process: one warm-up step (it allocates AdamW's state), then the resident
   high-water mark is reset (Linux `/proc/self/clear_refs`) and one more step is measured. Reported: the process's
   peak RSS during that step (the target's figure), its resting RSS before it (weights, AdamW state, libraries) and
   the step's extra memory above that (activations and gradients).
2. Contrastive loss, forward + backward, on `(B, --dim)` normalised embeddings for B in `--loss_batches`
   (1k .. 16k), for the two implementations: `xmodal.training.losses.ContrastiveLoss` (the global-batch loss of
   multi-process runs) and the model's own path (`XModalModel.logits` + `contrastive_objective`). Each B is
   measured in a fresh child process: the peak extra RSS over the resting RSS (embeddings allocated), in units of one
   `B x B` fp32 logits matrix (4 B^2 bytes). An in-process allocation tracker (a `TorchDispatchMode` that follows the
   life of every tensor storage an op creates) lists which ops create `B x B` tensors and how many are alive at the
   peak: if RSS counts more matrices than the tracker, a kernel made an internal copy.

The children run with glibc's `MALLOC_MMAP_THRESHOLD_=65536` (see `common.MALLOC_ENV`) so that freed tensors leave
the resident set. The step children run concurrently (each peak is its own process's); the loss sizes run one after
another.

    python bench/memory.py [--preset small] [--batch_size 128] [--loss_batches 1024 2048 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MALLOC_ENV,
    child_result,
    contrastive_train_step,
    current_rss_bytes,
    machine,
    machine_line,
    markdown_table,
    peak_rss_bytes,
    preset_config,
    publish,
    random_image_text_batch,
    reset_peak_rss,
    run_child,
)

from xmodal import XModalConfig, XModalModel  # noqa: E402

MIB = 2**20


# ---------------------------------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------------------------------


def step_child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant of part 1, in this (fresh) process."""
    start = current_rss_bytes()
    torch.manual_seed(0)
    config = preset_config(args.preset, args.smoke)
    model = XModalModel(config)
    if args.checkpointing:
        model.activation_checkpointing_enable()
    checkpointed = sum(bool(getattr(module, "gradient_checkpointing", False)) for module in model.modules())
    inputs = random_image_text_batch(
        args.batch_size, config.vision_config.image_size, args.text_length, config.text_config.vocab_size
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = contrastive_train_step(model, inputs, optimizer)
    step()
    gc.collect()
    resting = current_rss_bytes()
    reset_peak_rss()
    step()
    peak = peak_rss_bytes()
    trained = [p for p in model.parameters() if p in optimizer.state]
    return {
        "checkpointing": args.checkpointing,
        "checkpointed_layers": checkpointed,
        "rss_after_imports": start,
        "resting_rss": resting,
        "peak_rss": peak,
        "step_extra": peak - resting,
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "trained_weights": sum(p.numel() * p.element_size() for p in trained),
        "adamw_state": sum(
            value.numel() * value.element_size()
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        ),
    }


def loss_functions(dim: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The two contrastive-loss implementations, as functions of the normalised `(B, D)` image and text embeddings."""
    # imported here: xmodal.training pulls in the whole training stack, which the step children need not load
    from xmodal.training.losses import ContrastiveLoss

    tower = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
    config = XModalConfig(
        vision_config={**tower, "image_size": 8, "patch_size": 8},
        text_config={**tower, "vocab_size": 8},
        cross_config=tower,
        projection_dim=dim,
    )
    model = XModalModel(config)
    global_loss = ContrastiveLoss()
    return {
        "ContrastiveLoss": lambda image, text: global_loss(image, text, model.clamped_logit_scale()),
        "XModalModel": lambda image, text: model.contrastive_objective(model.logits(image, text)),
    }


def embeddings(batch_size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random L2-normalised image and text embeddings `(B, dim)`, leaves that require grad."""
    generator = torch.Generator().manual_seed(batch_size)
    image = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1).requires_grad_()
    return image, text


def loss_child(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Part 2 in this (fresh) process: for each B (ascending) and loss, the peak extra RSS of forward + backward over
    the resting RSS, the high-water mark reset before each (freed tensors leave the resident set, see MALLOC_ENV)."""
    functions = loss_functions(args.dim)
    for function in functions.values():  # first calls set up thread pools and kernels: not the loss's memory
        function(*embeddings(8, args.dim)).backward()
    results: dict[str, dict[str, int]] = {}
    for batch_size in sorted(args.loss_batches):
        results[str(batch_size)] = {}
        for name, function in functions.items():
            image, text = embeddings(batch_size, args.dim)
            gc.collect()
            resting = current_rss_bytes()
            reset_peak_rss()
            function(image, text).backward()
            results[str(batch_size)][name] = peak_rss_bytes() - resting
            del image, text
    return results


# ---------------------------------------------------------------------------------------------------------------------
# the allocation tracker
# ---------------------------------------------------------------------------------------------------------------------


class AllocationTracker(TorchDispatchMode):
    """Follows every tensor storage that an op creates (not views or in-place results of its inputs) until it is
    freed: `peak` is the most bytes alive at once, `events` lists `(op, shape, bytes)` of each creation."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.events: list[tuple[str, tuple[int, ...], int]] = []
        self.live_at_peak: list[tuple[str, tuple[int, ...], int]] = []
        self._alive: dict[int, tuple[str, tuple[int, ...], int]] = {}

    def _freed(self, key: int) -> None:
        _, _, size = self._alive.pop(key)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._alive:
                continue
            entry = (str(func.overloadpacket.__name__), tuple(tensor.shape), size)
            self._alive[key] = entry
            self.events.append(entry)
            self.live += size
            weakref.finalize(storage, self._freed, key)
            if self.live > self.peak:
                self.peak = self.live
                self.live_at_peak = list(self._alive.values())
        return out


def square_allocations(batch_size: int, dim: int) -> dict[str, Any]:
    """For each loss: the ops that create `B x B` tensors in forward + backward, and how many are alive at the
    tracker's peak (also the peak in units of 4 B^2, everything included)."""
    unit = 4 * batch_size * batch_size
    results = {}
    for name, function in loss_functions(dim).items():
        image, text = embeddings(batch_size, dim)
        with AllocationTracker() as tracker:
            function(image, text).backward()
        square = [op for op, shape, _ in tracker.events if shape == (batch_size, batch_size)]
        results[name] = {
            "square_ops": square,
            "square_alive_at_peak": sorted(op for op, shape, _ in tracker.live_at_peak if shape == (batch_size,) * 2),
            "peak_matrices": round(tracker.peak / unit, 3),
        }
    return results


# ---------------------------------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------------------------------


def child_argv(args: argparse.Namespace, child: str, extra: list[str]) -> list[str]:
    common = ["--child", child, "--preset", args.preset, "--batch_size", str(args.batch_size)]
    common += ["--text_length", str(args.text_length), "--dim", str(args.dim)]
    return common + (["--smoke"] if args.smoke else []) + extra


def markdown(results: dict[str, Any], command: str) -> str:
    steps = results["step"]
    plain, checkpointed = steps["plain"], steps["checkpointing"]
    step_rows = [
        [
            name,
            f"{row['peak_rss'] / MIB:,.0f}",
            f"{row['resting_rss'] / MIB:,.0f}",
            f"{row['step_extra'] / MIB:,.0f}",
        ]
        for name, row in (("plain", plain), ("checkpointing", checkpointed))
    ]
    step_rows.append(["reduction", f"**{steps['peak_reduction']:.0%}**", "", f"{steps['step_extra_reduction']:.0%}"])
    loss = results["loss"]
    loss_rows = []
    previous = None
    for batch, row in loss["sizes"].items():
        size = int(batch)
        unit = 4 * size * size
        loss_rows.append(
            [
                f"{size:,}",
                f"{unit / MIB:,.0f}",
                *(f"{row[name] / MIB:,.0f} ({row[name] / unit:.2f})" for name in loss["implementations"]),
                f"{row['XModalModel'] / previous:.2f}x" if previous else "",
            ]
        )
        previous = row["XModalModel"]
    tracked = loss["tracked"]
    ops = "; ".join(
        f"{name}: {', '.join(info['square_ops'])} (alive at the peak: {', '.join(info['square_alive_at_peak'])})"
        for name, info in tracked["ops"].items()
    )
    return (
        "## Memory (`bench/memory.py`)\n\n"
        f"`{command}`\n\n{machine_line(results['machine'])} Each figure from a fresh process (glibc "
        "`MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors leave the resident set).\n\n"
        f"### Training step at `{results['preset']}`, batch {results['batch_size']}, fp32, AdamW\n\n"
        f"The process holds {plain['rss_after_imports'] / MIB:,.0f} MiB after its imports (torch, transformers, "
        f"xmodal); weights {plain['weights'] / MIB:,.0f} MiB, AdamW state {plain['adamw_state'] / MIB:,.0f} MiB; "
        f"{checkpointed['checkpointed_layers']} checkpointed layers. Target: checkpointing lowers the peak by >= 40%.\n\n"
        + markdown_table(["", "peak RSS (MiB)", "resting RSS (MiB)", "step's extra (MiB)"], step_rows)
        + f"\n\n### Contrastive loss forward + backward, dim {results['dim']}\n\n"
        "Peak extra RSS in MiB (and in `B x B` fp32 matrices); the last column is the growth from the previous B "
        "(4x per doubling = proportional to B^2).\n\n"
        + markdown_table(
            ["B", "one B x B matrix (MiB)", *loss["implementations"], "growth"],
            loss_rows,
        )
        + f"\n\nAllocation tracker at B = {tracked['batch_size']:,} (ops creating B x B tensors): {ops}."
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--loss_batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--track_batch", type=int, default=4096, help="B of the allocation tracker's op listing.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes (checks it runs); writes nothing.")
    parser.add_argument("--no_write", action="store_true", help="Print only; do not write bench/results/.")
    parser.add_argument("--child", choices=["step", "loss"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = step_child(args) if args.child == "step" else loss_child(args)
        print(json.dumps(result))
        return result
    command = "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.preset, args.batch_size, args.text_length = "tiny", 4, 8
        args.loss_batches, args.dim, args.track_batch = [64, 128], 16, 64
    script = Path(__file__).resolve()
    steps = {
        name: run_child(script, child_argv(args, "step", extra), MALLOC_ENV)
        for name, extra in (("plain", []), ("checkpointing", ["--checkpointing"]))
    }
    batches = ["--loss_batches", *map(str, args.loss_batches)]
    sizes = child_result(run_child(script, child_argv(args, "loss", batches), MALLOC_ENV))
    step = {name: child_result(process) for name, process in steps.items()}
    plain, checkpointed = step["plain"], step["checkpointing"]
    step["peak_reduction"] = round(1 - checkpointed["peak_rss"] / plain["peak_rss"], 4)
    step["step_extra_reduction"] = round(1 - checkpointed["step_extra"] / max(plain["step_extra"], 1), 4)
    results = {
        "machine": machine(),
        "preset": args.preset,
        "batch_size": args.batch_size,
        "text_length": args.text_length,
        "dim": args.dim,
        "step": step,
        "loss": {
            "implementations": ["ContrastiveLoss", "XModalModel"],
            "sizes": sizes,
            "tracked": {"batch_size": args.track_batch, "ops": square_allocations(args.track_batch, args.dim)},
        },
    }
    publish("memory", results, markdown(results, command.strip()), write=not (args.smoke or args.no_write))
    return results


if __name__ == "__main__":
    main()
