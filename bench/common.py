"""Shared helpers of the benchmarks: machine description, timing (median of repeated runs after warm-up) and result
files."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
EMOJI = Path(__file__).resolve().parents[2] / "shared" / "data" / "emoji-google"
"""The shared emoji imagefolder (`metadata.jsonl` and the PNGs), beside the repository."""


def emoji_available(path: Path, what: str = "the emoji dataset") -> bool:
    """Whether the emoji set at `path` is there; its absence skips `what` with a message, and is an error under
    CI=true (where the shared data must be present)."""
    if (path / "metadata.jsonl").is_file():
        return True
    if os.environ.get("CI") == "true":
        raise FileNotFoundError(f"CI=true but the emoji set is missing: {path} has no metadata.jsonl.")
    print(f"Skipping {what}: {path} has no metadata.jsonl (the shared data is not present).")
    return False


def machine() -> dict[str, Any]:
    """CPU model, core count, torch version, thread count and, where CUDA is available, the GPU model."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def time_alternating(
    functions: dict[str, Callable[[], None]], repeats: int = 5, warmup: int = 2, min_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternation (A, B, A, B, ...) after `warmup` calls each, so
    slow drifts of the machine affect every variant alike. At least `repeats` rounds, more when the slowest call
    (timed at its last warm-up) would leave a variant under `min_seconds` of timed calls: short calls need more
    rounds for a stable median on a noisy machine."""
    slowest = 0.0  # the longest last warm-up call
    for function in functions.values():
        for index in range(warmup):
            start = time.perf_counter()
            function()
            if index == warmup - 1:
                slowest = max(slowest, time.perf_counter() - start)
    rounds = max(repeats, math.ceil(min_seconds / slowest)) if slowest > 0 else repeats
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(baseline: list[float], candidate: list[float]) -> dict[str, float]:
    """Speed-up of `candidate` over `baseline` from runs timed in alternation: the ratio of each round
    (`baseline[i] / candidate[i]`, two calls moments apart), so a drift of the machine's speed between rounds
    cancels; returns the median, lowest and highest of the per-round ratios."""
    ratios = [before / after for before, after in zip(baseline, candidate, strict=True)]
    return {"median": median(ratios), "low": min(ratios), "high": max(ratios)}


def ratio_cell(ratio: dict[str, float], bold: bool = True) -> str:
    """`**1.17x** (1.08-1.25)`: the median per-round ratio (in bold unless `bold=False`), its range over the rounds
    after it."""
    median_cell = f"{ratio['median']:.2f}x"
    return f"{f'**{median_cell}**' if bold else median_cell} ({ratio['low']:.2f}-{ratio['high']:.2f})"


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Writes `bench/results/<name>.json` and returns its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Helpers of the inference, memory, data-pipeline, retrieval and scaling benchmarks (and of the CLIP comparisons)
# ---------------------------------------------------------------------------------------------------------------------

CLS_TOKEN_ID, SEP_TOKEN_ID, PAD_TOKEN_ID, FIRST_WORD_ID = 2, 3, 0, 5
"""The special ids of the xmodal WordPiece tokenizers ([CLS], [SEP], [PAD]); ids from FIRST_WORD_ID on are words."""


def clip_config_like(config: Any, sequence_length: int | None = None) -> Any:
    """A `transformers.CLIPConfig` of the same size as an xmodal config with the built-in towers: equal widths, depths,
    heads, MLP sizes, activation, LayerNorm epsilon, attention dropout, image size, patch size, vocabulary and
    projection dimension. CLIP's text `max_position_embeddings` is `sequence_length` (default: the xmodal text tower's).
    Its [BOS]/[EOS]/[PAD] ids are xmodal's [CLS]/[SEP]/[PAD] (2/3/0), so CLIP pools at the [SEP] of xmodal-style
    inputs (see `random_image_text_batch`).

    What stays different is architectural: CLIP has no residual dropout (xmodal's `hidden_dropout_prob`, 0.1 in the
    `small`/`base` text towers, acts in training only), a causal text mask, an extra pre-LayerNorm in the image tower
    and [EOS]/[CLS] pooling where the presets mean-pool.
    """
    from transformers import CLIPConfig

    from xmodal.configuration import XModalTextConfig, XModalVisionConfig

    vision, text = config.vision_config, config.text_config
    if not isinstance(vision, XModalVisionConfig) or not isinstance(text, XModalTextConfig):
        raise TypeError(
            "clip_config_like needs the built-in xmodal towers (XModalVisionConfig, XModalTextConfig), got "
            f"{type(vision).__name__} and {type(text).__name__}."
        )

    def tower(sub: Any) -> dict[str, Any]:
        return {
            "hidden_size": sub.hidden_size,
            "intermediate_size": sub.intermediate_size,
            "num_hidden_layers": sub.num_hidden_layers,
            "num_attention_heads": sub.num_attention_heads,
            "hidden_act": sub.hidden_act,
            "layer_norm_eps": sub.layer_norm_eps,
            "attention_dropout": sub.attention_dropout,
            "projection_dim": config.projection_dim,
        }

    return CLIPConfig(
        vision_config={
            **tower(vision),
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": vision.num_channels,
        },
        text_config={
            **tower(text),
            "vocab_size": text.vocab_size,
            "max_position_embeddings": sequence_length or text.max_position_embeddings,
            "bos_token_id": CLS_TOKEN_ID,
            "eos_token_id": SEP_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID,
        },
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )


def random_image_text_batch(
    batch_size: int, image_size: int, text_length: int, vocab_size: int, seed: int = 0, min_length: int = 8
) -> dict[str, torch.Tensor]:
    """Random model inputs shaped like a tokenized batch: `pixel_values` `(B, 3, S, S)` (standard normal),
    `input_ids`/`attention_mask` `(B, text_length)`: captions of uniform lengths in [min_length, text_length], each
    `[CLS] words... [SEP]`, right-padded with [PAD] to `text_length`. The same dict feeds xmodal and CLIPModel."""
    if text_length < 2 or vocab_size <= FIRST_WORD_ID:
        raise ValueError(f"Need text_length >= 2 and vocab_size > {FIRST_WORD_ID}, got {text_length}, {vocab_size}.")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(min_length, text_length), text_length + 1, (batch_size,), generator=generator)
    input_ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch_size, text_length), generator=generator)
    positions = torch.arange(text_length)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    input_ids[:, 0] = CLS_TOKEN_ID
    input_ids[positions == (lengths[:, None] - 1)] = SEP_TOKEN_ID
    input_ids[attention_mask == 0] = PAD_TOKEN_ID
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def fused_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The benchmarks' optimizer: AdamW (lr 1e-4, weight decay 0.01) with torch's fused kernel, over the trainable
    parameters (a frozen part, such as FLAVA's image codebook, is left out)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01, fused=True)


def contrastive_train_step(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
) -> Callable[[], None]:
    """One contrastive training step as a closure: `model(**inputs, return_loss=True).loss` (XModalModel or
    CLIPModel), backward, an AdamW update (lr 1e-4 unless `optimizer` is given) and `zero_grad(set_to_none=True)`."""
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """The resident set size of this process now (Linux `/proc/self/status` VmRSS)."""
    value = _proc_status_kib("VmRSS")
    if value is None:
        raise RuntimeError("current_rss_bytes needs Linux's /proc/self/status.")
    return value * 1024


def peak_rss_bytes() -> int:
    """The resident high-water mark of this process (VmHWM, since start or the last `reset_peak_rss`); where
    /proc is missing, `ru_maxrss` (since start)."""
    value = _proc_status_kib("VmHWM")
    if value is not None:
        return value * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Resets the resident high-water mark to the current RSS (Linux: writing 5 to /proc/self/clear_refs), so that
    `peak_rss_bytes` measures what follows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
    except OSError as err:
        raise RuntimeError(f"Cannot reset the resident high-water mark (/proc/self/clear_refs): {err}") from err


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc settings for memory measurements in a child process: every block of 64 KiB or more is its own mapping,
returned to the OS when freed, so that RSS follows the live tensors (glibc's default raises the threshold after
frees and keeps freed heap resident)."""


def run_child(script: str | Path, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `python <script> <argv...>` in a fresh process (stdout and stderr piped) with `env` added to this
    process's environment; collect it with `child_result`."""
    return subprocess.Popen(
        [sys.executable, str(script), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def child_result(process: subprocess.Popen) -> dict[str, Any]:
    """Waits for a child of `run_child` and returns the JSON object on the last line of its stdout; a failed child
    raises with its stderr."""
    stdout, stderr = process.communicate()
    lines = stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"Child {process.args} failed (exit {process.returncode}):\n{stderr[-4000:]}")
    return json.loads(lines[-1])


def machine_line(info: dict[str, Any]) -> str:
    """`machine()` as one line for a results section."""
    gpu = f"GPU: {info['gpu']} (CUDA {info['cuda']}), " if "gpu" in info else ""
    return (
        f"Machine: {gpu}{info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
        f"Python {info['python']}."
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(name: str, payload: dict[str, Any], markdown: str, write: bool = True) -> None:
    """Prints the ready-to-paste markdown section and, with `write`, writes `bench/results/<name>.json` (the payload)
    and `bench/results/<name>.md` (the section)."""
    print(markdown)
    if write:
        json_path = write_result(name, payload)
        md_path = RESULTS_DIR / f"{name}.md"
        md_path.write_text(markdown + "\n", encoding="utf-8")
        print(f"wrote {json_path} and {md_path}")


SMOKE_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def smoke_overrides(image_size: int = 16) -> dict[str, Any]:
    """`XModalConfig` fields that shrink a preset to 1-layer, 32-wide towers on `image_size` px images with patch 8
    (for the tests that check each benchmark runs)."""
    return {
        "vision_config": {**SMOKE_TOWER, "image_size": image_size, "patch_size": 8},
        "text_config": {**SMOKE_TOWER, "vocab_size": 64},
        "cross_config": SMOKE_TOWER,
        "projection_dim": 16,
    }


def preset_config(preset: str, smoke: bool = False, image_size: int | None = None) -> Any:
    """The preset's `XModalConfig` (at `image_size` px when given); with `smoke`, shrunk by `smoke_overrides`."""
    from xmodal import XModalConfig

    if smoke:
        return XModalConfig.from_preset(preset, **smoke_overrides(image_size or 16))
    return XModalConfig.from_preset(preset, vision_config={} if image_size is None else {"image_size": image_size})


def on_device(step: Callable[[], None], device: torch.device, dtype: torch.dtype | None = None) -> Callable[[], None]:
    """`step` under autocast to `dtype` (None: no autocast) on `device`, followed on CUDA by a synchronisation, so
    that timing a call measures the work rather than the kernel launches."""

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`--precision` choices of the training benchmarks: fp32, or autocast to bf16/fp16 (fp32 weights and AdamW)."""
