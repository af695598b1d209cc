"""Contrastive training step: xmodal vs transformers' CLIPModel at equal size, pairs/s and MFU (issue 6, benchmark 1).

For each preset, `XModalModel` and a `CLIPModel` built by `clip_config_like` (same widths, depths, heads, MLP size,
activation, image and patch size, vocabulary, projection dimension; CLIP's text positions = the text length) train on
the same random batch: `model(**inputs, return_loss=True).loss`, backward, and the same optimizer (torch's fused
AdamW, the default of transformers' Trainer), fp32. The steps are timed in alternation in one process (median of
`--repeats` runs after `--warmup`).

MFU = model FLOPs per second / peak FLOP/s, where the model FLOPs of forward + backward are counted by
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; the optimizer update is not
counted) and the peak is measured on the spot, before and after the steps, as the best median throughput of square
GEMMs of half, once and twice `--gemm_size` (the higher of the two measurements is used: the rate of this shared
machine's GEMMs varies by up to 30% over minutes).

`--compile` also times `torch.compile`d copies of both models (inductor) after checking that a compiled step gives
the eager loss and gradients to tolerance; `--profile` saves torch.profiler's top-ops table of one xmodal and one
CLIP step next to the results.

    python bench/train_step.py [--presets tiny small] [--batch_size 64] [--text_length 32] [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PRECISIONS,
    RESULTS_DIR,
    clip_config_like,
    contrastive_train_step,
    fused_adamw,
    machine,
    machine_line,
    markdown_table,
    median,
    on_device,
    paired_ratio,
    preset_config,
    publish,
    random_image_text_batch,
    ratio_cell,
    time_alternating,
)
from transformers import CLIPModel  # noqa: E402

from xmodal import XModalModel  # noqa: E402


def gemm_flops(
    size: int = 2048, repeats: int = 7, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> float:
    """The matmul throughput of `device` in FLOP/s for `dtype`: median over `repeats` timed `size x size` GEMMs after
    two warm-up calls."""
    device = device or torch.device("cpu")
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    gemm = on_device(lambda: torch.mm(a, b, out=out), device)
    for _ in range(2):
        gemm()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gemm()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def gemm_peak_flops(size: int = 2048, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> float:
    """The best of `gemm_flops` at `size // 2`, `size` and `2 * size`."""
    return max(gemm_flops(each, device=device, dtype=dtype) for each in (size // 2, size, 2 * size))


def step_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """FLOPs of one forward + backward of `model(**inputs, return_loss=True).loss`, as counted by FlopCounterMode."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        on_device(lambda: model(**inputs, return_loss=True).loss.backward(), device, dtype)()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def check_compiled(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, float]:
    """A `torch.compile`d copy of `model` (same weights) whose loss and gradients match the eager model's on
    `inputs` under autocast to `dtype` (fp32: rtol 1e-4 on the loss and each gradient's largest difference within
    1e-3 of its largest entry; 16-bit: 1e-2 and 1.5e-1), in eval mode so that dropout is off; returns it and the
    compile time of that first forward + backward in seconds (the training mode compiles again in the warm-up)."""
    device = next(model.parameters()).device
    compiled = torch.compile(copy.deepcopy(model))
    losses = {}

    def forward_backward(name: str, module: torch.nn.Module) -> None:
        losses[name] = module(**inputs, return_loss=True).loss
        losses[name].backward()

    # dropout off for the comparison: inductor draws its own random numbers (the timed steps train with dropout)
    model.eval()
    compiled.eval()
    start = time.perf_counter()
    on_device(lambda: forward_backward("compiled", compiled), device, dtype)()
    seconds = time.perf_counter() - start
    on_device(lambda: forward_backward("eager", model), device, dtype)()
    model.train()
    compiled.train()
    # 16-bit: the fused kernels round differently; e.g. CLIPModel's token-embedding gradient (sparse rows summed
    # from bf16 products) differed by 7.7e-2 of its largest entry on an H200
    loss_tolerance, gradient_tolerance = (1e-4, 1e-3) if dtype is None else (1e-2, 1.5e-1)
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=loss_tolerance, atol=loss_tolerance / 10)
    compiled_parameters = {name.removeprefix("_orig_mod."): p for name, p in compiled.named_parameters()}
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    # gradients that are zero in exact arithmetic (e.g. a key bias: softmax ignores a shift) are compared to the
    # largest gradient of the model instead of to themselves
    floor = gradient_tolerance * max(float(grad.abs().max()) for grad in gradients.values())
    for name, grad in gradients.items():
        other = compiled_parameters[name].grad
        difference = float((other - grad).abs().max()) / max(float(grad.abs().max()), floor)
        if difference > gradient_tolerance:
            raise AssertionError(f"Compiled gradient of {name} differs from eager by {difference:.2e} (relative).")
    model.zero_grad(set_to_none=True)
    compiled.zero_grad(set_to_none=True)
    return compiled, seconds


def profile_table(step: Callable[[], None], rows: int = 25) -> str:
    """torch.profiler's table of the `rows` ops with the most self CPU time in one call of `step`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def bench_preset(
    preset: str,
    batch_size: int,
    text_length: int,
    repeats: int,
    warmup: int,
    compile: bool,
    profile: bool,
    smoke: bool,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Times the training steps of one preset; returns seconds per step (all runs), pairs/s and FLOPs."""
    torch.manual_seed(0)
    config = preset_config(preset, smoke)
    models: dict[str, torch.nn.Module] = {
        "xmodal": XModalModel(config).to(device),
        "clip": CLIPModel(clip_config_like(config, sequence_length=text_length)).to(device),
    }
    # the same model computing the padding positions, as CLIPModel does: the gain of skipping padding, and the
    # ratio at equal FLOPs
    models["xmodal-padded"] = copy.deepcopy(models["xmodal"])
    models["xmodal-padded"].text_model.skip_padding = False
    inputs = random_image_text_batch(
        batch_size, config.vision_config.image_size, text_length, config.text_config.vocab_size
    )
    inputs = {key: value.to(device) for key, value in inputs.items()}
    flops = {name: step_flops(model, inputs, dtype) for name, model in models.items()}

    def train_step(model: torch.nn.Module) -> Callable[[], None]:
        return on_device(contrastive_train_step(model, inputs, fused_adamw(model)), device, dtype)

    steps = {name: train_step(model) for name, model in models.items()}
    compile_seconds: dict[str, float] = {}
    if compile:
        for name in ("xmodal", "clip"):
            compiled, compile_seconds[name] = check_compiled(models[name], inputs, dtype)
            steps[f"{name}-compiled"] = train_step(compiled)
            # compiled, xmodal's text tower keeps the padding (no data-dependent shapes): the padded FLOPs
            flops[f"{name}-compiled"] = flops["xmodal-padded" if name == "xmodal" else name]
    result: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "text_length": text_length}
    if profile:
        for name in ("xmodal", "clip"):
            steps[name]()  # warm
            table = profile_table(steps[name])
            if not smoke:
                (RESULTS_DIR / f"train_step_profile_{preset}_{name}.txt").write_text(table + "\n", encoding="utf-8")
            result[f"profile_{name}"] = table
    times = time_alternating(steps, repeats=repeats, warmup=warmup)
    result["variants"] = {
        name: {
            "seconds": times[name],
            "median_seconds": median(times[name]),
            "pairs_per_second": batch_size / median(times[name]),
            "gflop_per_step": flops[name] / 1e9,
            "gflop_per_second": flops[name] / median(times[name]) / 1e9,
        }
        for name in steps
    }
    for name in ("xmodal", "xmodal-padded", "xmodal-compiled"):
        if name in times:
            baseline = "clip-compiled" if name == "xmodal-compiled" else "clip"
            result["variants"][name]["speedup_vs_clip"] = paired_ratio(times[baseline], times[name])
            result["variants"][name]["speedup_vs_clip_eager"] = paired_ratio(times["clip"], times[name])
    result["compile_seconds"] = compile_seconds
    return result


PADDING_NOTE = {
    True: "xmodal's text tower skips the padding (projections, MLPs and LayerNorms on real tokens only); "
    "`xmodal-padded` is the same model computing the padding as CLIPModel does (equal FLOPs). MFU counts each "
    "model's own FLOPs.",
    False: "On a GPU xmodal keeps the padded layout by default (`skip_padding=None`), so `xmodal` and "
    "`xmodal-padded` run the same code: their difference is run-to-run noise.",
}
"""The markdown's note on the padding, for CPU (True) and GPU (False) runs."""


def markdown(payload: dict[str, Any]) -> str:
    rows = []
    for result in payload["results"]:
        for name, variant in result["variants"].items():
            speedup, speedup_eager = variant.get("speedup_vs_clip"), variant.get("speedup_vs_clip_eager")
            rows.append(
                [
                    result["preset"],
                    name,
                    f"{variant['median_seconds']:.3f}",
                    f"{variant['pairs_per_second']:.1f}",
                    f"{variant['gflop_per_step']:.1f}",
                    f"{variant['mfu']:.2f}",
                    ratio_cell(speedup) if speedup else "",
                    ratio_cell(speedup_eager, bold=False) if speedup_eager else "",
                ]
            )
    header = ["preset", "model", "s/step", "pairs/s", "GFLOP/step", "MFU", "vs CLIP, same mode", "vs CLIP eager"]
    first = payload["results"][0]
    return "\n".join(
        [
            "## Contrastive training step vs CLIPModel (`bench/train_step.py`)",
            "",
            machine_line(payload["machine"]) + f" Device: {payload['device']}. Measured GEMM peak: "
            f"{payload['peak_gflops']:.1f} GFLOP/s ({payload['precision']}, the best median of 7 square GEMMs of "
            f"{payload['gemm_size'] // 2}, {payload['gemm_size']} and {2 * payload['gemm_size']}, the higher of "
            f"{payload['peak_gflops_before']:.1f} before and {payload['peak_gflops_after']:.1f} after the steps).",
            f"Batch {first['batch_size']} pairs, captions of 8 to {first['text_length']} tokens padded to "
            f"{first['text_length']}, {payload['precision']}, fused AdamW for "
            f"both, median of {payload['repeats']} steps after {payload['warmup']} warm-up steps, models alternating; a "
            "ratio is the median of the per-round ratios (one step of each model per round), with their range. "
            + PADDING_NOTE[payload["device"] == "cpu"],
            "",
            markdown_table(header, rows),
            "",
            f"`{payload['command']}`",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gemm_size", type=int, default=2048)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU script (bench/gpu.sh).")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="fp32, or bf16/fp16 autocast.")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile'd copies (inductor).")
    parser.add_argument("--profile", action="store_true", help="Save torch.profiler top-ops tables.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, one repeat, nothing written (for tests).")
    parser.add_argument("--no_write", action="store_true", help="Do not write bench/results.")
    parser.add_argument(
        "--results_name", help="File name (no suffix) under bench/results; default train_step[_<device>_<precision>]."
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.batch_size, args.text_length = ["tiny"], 4, 16  # lengths 8-16: some padding
        args.repeats, args.warmup, args.gemm_size = 1, 0, 256
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    peak = gemm_peak_flops(args.gemm_size, device=device, dtype=dtype or torch.float32)
    results = [
        bench_preset(
            preset,
            args.batch_size,
            args.text_length,
            args.repeats,
            args.warmup,
            args.compile,
            args.profile,
            args.smoke,
            device,
            dtype,
        )
        for preset in args.presets
    ]
    payload = {
        "machine": machine(),
        "command": ("python bench/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "gemm_size": args.gemm_size,
        "peak_gflops_before": peak / 1e9,
        "peak_gflops_after": gemm_peak_flops(args.gemm_size, device=device, dtype=dtype or torch.float32) / 1e9,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": results,
    }
    payload["peak_gflops"] = max(payload["peak_gflops_before"], payload["peak_gflops_after"])
    for result in results:
        for variant in result["variants"].values():
            variant["mfu"] = variant["gflop_per_second"] / payload["peak_gflops"]
    name = args.results_name or (
        "train_step" if device.type == "cpu" else f"train_step_{device.type}_{args.precision}"
    )
    publish(name, payload, markdown(payload), write=not (args.smoke or args.no_write))
    return payload


if __name__ == "__main__":
    main()
