"""Each benchmark of issue 6 runs end to end on tiny sizes (`--smoke --no_write`): it returns its figures, prints its
markdown section and writes nothing. Benchmarks are never timed here.

bench/memory.py and bench/retrieval_scale.py measure in child processes, each of which imports torch and xmodal (a
few seconds): the default suite runs their children in-process (the same `main`, child mode), and the `slow` tests run
them as real processes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`bench/<name>.py` as a module (the bench folder on sys.path, for its `common` import)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_smoke(monkeypatch, capsys, tmp_path):
    """Runs `main(["--smoke", "--no_write"])` of a benchmark; returns its results and printed section, and checks
    that it wrote no result file (the results folder is redirected to an empty temporary one)."""

    def run(name: str, children_in_process: bool = False) -> tuple[dict, str]:
        module = load(name, monkeypatch)
        results_dir = tmp_path / "results"
        monkeypatch.setattr(sys.modules["common"], "RESULTS_DIR", results_dir)
        if children_in_process:
            monkeypatch.setattr(module, "run_child", lambda script, argv, env=None: list(argv))
            monkeypatch.setattr(module, "child_result", lambda argv: module.main(argv))
        results = module.main(["--smoke", "--no_write"])
        printed = capsys.readouterr().out
        assert not results_dir.exists()
        assert f"`python bench/{name}.py --smoke --no_write`" in printed
        assert "Machine: " in printed and "|---|" in printed
        assert results["machine"]["threads"] >= 1
        return results, printed

    return run


def test_inference(run_smoke):
    results, printed = run_smoke("inference")
    assert [(row["preset"], row["batch_size"]) for row in results["runs"]] == [("tiny", 1), ("tiny", 4)]
    row = results["runs"][1]
    for name in ("xmodal-image", "clip-image", "xmodal-text", "xmodal-text-padded", "clip-text"):
        assert row[name]["per_s"] > 0 and len(row[name]["runs_s"]) == 1
    for name in ("xmodal-image", "clip-image", "xmodal-text", "clip-text"):
        assert row["parameters"][name] > 0
    for modality in ("image", "text", "text-padded"):
        ratio = row[f"{modality}_ratio"]
        assert 0 < ratio["low"] <= ratio["median"] <= ratio["high"]
        # one round: the ratio is that round's, xmodal's embeddings/s over CLIP's
        tower = modality.removesuffix("-padded")
        expected = row[f"clip-{tower}"]["runs_s"][0] / row[f"xmodal-{modality}"]["runs_s"][0]
        assert ratio["median"] == pytest.approx(expected, rel=0.01)
    for batch_size in (1, 4):
        assert f"| tiny | {batch_size} | image |" in printed and f"| tiny | {batch_size} | text |" in printed
        assert f"| tiny | {batch_size} | text (padding computed) |" in printed


def test_paired_ratio_cancels_a_drift_between_rounds(monkeypatch):
    """Per-round ratios: a machine slowing down 3x over the rounds leaves a constant 1.25x intact, while the
    ratio of the medians would not be (the variants' medians fall on different rounds)."""
    common = load("common", monkeypatch)
    drift = [1.0, 1.5, 3.0, 2.0, 1.2]
    baseline = [1.25 * d for d in drift]
    candidate = [d * (1.0 if i % 2 else 0.98) for i, d in enumerate(drift)]
    ratio = common.paired_ratio(baseline, candidate)
    assert ratio["low"] == pytest.approx(1.25) and ratio["high"] == pytest.approx(1.25 / 0.98)
    assert ratio["low"] <= ratio["median"] <= ratio["high"]
    assert common.ratio_cell(ratio) == f"**{ratio['median']:.2f}x** (1.25-{1.25 / 0.98:.2f})"
    assert common.ratio_cell(ratio, bold=False) == f"{ratio['median']:.2f}x (1.25-{1.25 / 0.98:.2f})"
    with pytest.raises(ValueError):
        common.paired_ratio([1.0, 2.0], [1.0])


def test_time_alternating_adds_rounds_for_short_calls(monkeypatch):
    common = load("common", monkeypatch)
    calls = {"short": 0, "long": 0}
    clock = {"now": 0.0}

    def ticking(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            clock["now"] += seconds

        return run

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["now"])
    functions = {"short": ticking("short", 0.1), "long": ticking("long", 0.5)}
    times = common.time_alternating(functions, repeats=3, warmup=2, min_seconds=4.0)
    # the slowest call takes 0.5 s: 8 rounds give it 4 s; both variants get the same rounds
    assert [len(times["short"]), len(times["long"])] == [8, 8] and calls == {"short": 10, "long": 10}
    assert times["long"] == pytest.approx([0.5] * 8)
    assert len(common.time_alternating(functions, repeats=3, warmup=2)["short"]) == 3
    assert len(common.time_alternating(functions, repeats=3, warmup=0, min_seconds=4.0)["short"]) == 3


def test_clip_config_like_matches_the_xmodal_sizes(monkeypatch):
    common = load("common", monkeypatch)
    config = common.preset_config("small")
    clip = common.clip_config_like(config, sequence_length=32)
    for xmodal_tower, clip_tower in (
        (config.vision_config, clip.vision_config),
        (config.text_config, clip.text_config),
    ):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act"):
            assert getattr(clip_tower, field) == getattr(xmodal_tower, field)
    assert (clip.vision_config.image_size, clip.vision_config.patch_size) == (128, 16)
    assert clip.text_config.vocab_size == config.text_config.vocab_size
    assert clip.text_config.max_position_embeddings == 32
    assert clip.projection_dim == config.projection_dim == 256
    with pytest.raises(TypeError, match="needs the built-in xmodal towers"):
        common.clip_config_like(type(config)(text_config={"model_type": "bert", "hidden_size": 32}))


def check_memory(results: dict, printed: str) -> None:
    plain, checkpointed = results["step"]["plain"], results["step"]["checkpointing"]
    assert plain["checkpointed_layers"] == 0 and checkpointed["checkpointed_layers"] > 0
    for row in (plain, checkpointed):
        assert row["peak_rss"] >= row["resting_rss"] > 0 and row["adamw_state"] > 0
    assert set(results["loss"]["sizes"]) == {"64", "128"}
    for info in results["loss"]["tracked"]["ops"].values():
        # the fused loss: the logits (mm), then its own row-chunk temporaries and the gradient; no log-softmax
        assert info["square_ops"][0] == "mm" and "_log_softmax" not in info["square_ops"]
        assert info["peak_matrices"] >= 2
    assert "checkpointing" in printed and "Allocation tracker at B = 64" in printed


def test_fused_contrastive_loss_keeps_the_logits_and_their_gradient(monkeypatch):
    """The allocation tracker of bench/memory.py on both contrastive losses at B = 512, with row chunks of 32 rows:
    at the peak only two B x B matrices are alive (the logits and their gradient) plus chunk temporaries."""
    from xmodal import losses as model_losses

    memory = load("memory", monkeypatch)
    monkeypatch.setattr(model_losses, "_LOSS_CHUNK_ELEMENTS", 32 * 512)
    tracked = memory.square_allocations(512, 16)
    assert set(tracked) == {"ContrastiveLoss", "XModalModel"}
    for info in tracked.values():
        assert len(info["square_alive_at_peak"]) == 2
        assert 2 <= info["peak_matrices"] < 2.3


def test_memory(run_smoke):
    check_memory(*run_smoke("memory", children_in_process=True))


@pytest.mark.slow
def test_memory_in_child_processes(run_smoke):
    check_memory(*run_smoke("memory"))


def test_data_pipeline(run_smoke):
    results, printed = run_smoke("data_pipeline")
    assert "synthetic" in results["datasets"]
    for data in results["datasets"].values():
        assert set(data["workers"]) == {"0", "1"}
        assert data["shapes"]["pixel_values"] == [4, 3, 16, 16]
        for row in data["workers"].values():
            assert row["loader_examples_per_s"] > 0 and row["loop_pairs_per_s"] > 0 and row["step_pairs_per_s"] > 0
    assert "| synthetic | 1 |" in printed
    if "emoji" in results["datasets"]:  # the shared data is there: the same rows streamed from WebDataset shards too
        assert results["datasets"]["emoji-tar"]["train_rows"] == "streamed" and "| emoji-tar | 1 |" in printed


def check_retrieval_scale(results: dict, printed: str) -> None:
    for count in ("1", "8"):
        row = results["sizes"]["2000"][count]
        assert set(row["times"]) == set(row["memory"]) == {"torch", "faiss", "full"}
        for backend in ("torch", "faiss"):
            assert row[f"{backend}_rows_matching"] == 1.0 and row[f"{backend}_max_score_difference"] < 1e-5
    assert "| 2,000 | 1 |" in printed and "| 2,000 | 8 |" in printed


def test_retrieval_scale(run_smoke):
    check_retrieval_scale(*run_smoke("retrieval_scale", children_in_process=True))


@pytest.mark.slow
def test_retrieval_scale_in_child_processes(run_smoke):
    check_retrieval_scale(*run_smoke("retrieval_scale"))


def test_scaling(run_smoke):
    results, printed = run_smoke("scaling")
    assert [row["batch_size"] for row in results["batch_sizes"]] == [2, 4]
    assert [(row["image_size"], row["image_tokens"]) for row in results["image_sizes"]] == [(16, 5), (32, 17)]
    assert all(row["pairs_per_s"] > 0 for row in results["batch_sizes"] + results["image_sizes"])
    assert "Image size (batch 2" in printed


def test_train_step(run_smoke):
    results, printed = run_smoke("train_step")
    (result,) = results["results"]
    assert set(result["variants"]) == {"xmodal", "xmodal-padded", "clip"}
    xmodal, clip = result["variants"]["xmodal"], result["variants"]["clip"]
    padded = result["variants"]["xmodal-padded"]
    # equal sizes: computing the padding, xmodal does the same counted work per step as CLIPModel; skipping it, less
    assert padded["gflop_per_step"] == pytest.approx(clip["gflop_per_step"], rel=0.02) and padded["gflop_per_step"] > 0
    assert 0 < xmodal["gflop_per_step"] < padded["gflop_per_step"]
    assert padded["speedup_vs_clip"]["median"] == pytest.approx(clip["seconds"][0] / padded["seconds"][0])
    assert 0 < xmodal["mfu"] and len(xmodal["seconds"]) == 1
    assert xmodal["speedup_vs_clip"]["median"] == pytest.approx(clip["seconds"][0] / xmodal["seconds"][0])
    assert results["peak_gflops"] > 0
    assert "| tiny | xmodal |" in printed and "| tiny | clip |" in printed


def test_train_step_compiled_copy_matches_eager(monkeypatch):
    """The compile check of bench/train_step.py passes on a correct compiled copy and catches a wrong one."""
    module = load("train_step", monkeypatch)
    import torch

    from xmodal import XModalModel

    config = module.preset_config("tiny", smoke=True)
    model = XModalModel(config)
    inputs = module.random_image_text_batch(2, 16, 8, config.text_config.vocab_size)
    monkeypatch.setattr(module.torch, "compile", lambda m: m)  # eager stands in for inductor: same numbers
    compiled, seconds = module.check_compiled(model, inputs)
    assert seconds > 0 and compiled is not model

    def perturbed(m):
        with torch.no_grad():
            m.logit_scale.add_(0.5)
        return m

    monkeypatch.setattr(module.torch, "compile", perturbed)
    with pytest.raises(AssertionError):
        module.check_compiled(model, inputs)


def test_peers(monkeypatch, capsys, tmp_path):
    """bench/peers.py at the smallest real setting (tiny preset, 2 pairs, one round, the synthetic captions): every
    variant trains with a finite loss, xmodal pads less than run_clip's and open_clip's fixed lengths, and FLAVA's
    step and xmodal's multi-task steps are timed."""
    module = load("peers", monkeypatch)
    monkeypatch.setattr(sys.modules["common"], "RESULTS_DIR", tmp_path / "results")
    argv = ["--presets", "tiny", "--batch_sizes", "2", "--repeats", "1", "--warmup", "0", "--num_batches", "1"]
    results = module.main([*argv, "--corpora", "synthetic", "--no_write"])
    printed = capsys.readouterr().out
    assert not (tmp_path / "results").exists()
    assert "Machine: " in printed and "|---|" in printed
    (padding,) = results["padding"]
    variants = padding["variants"]
    has_open_clip = importlib.util.find_spec("open_clip") is not None  # the `bench` extra
    assert set(variants) == {"xmodal", "clip-run_clip", *(["open_clip"] if has_open_clip else [])}
    assert variants["clip-run_clip"]["padded_length_mean"] == padding["run_clip_length"]
    if has_open_clip:
        assert variants["open_clip"]["padded_length_mean"] == 77
    assert variants["xmodal"]["padded_length_mean"] == variants["xmodal"]["real_tokens_max"]
    (flava,) = results["flava"]
    steps = {**variants, **flava["variants"]}
    assert {"xmodal-4-objectives", "xmodal-all-objectives", "flava", "flava-mim-labels"} <= set(steps)
    assert all(math.isfinite(step["loss"]) and step["median_seconds"] > 0 for step in steps.values())


def test_multitask_cost_times_models_that_train_the_objectives_they_are_named_after(monkeypatch, tmp_path):
    """bench/multitask_cost.py --smoke --each: every variant is timed, and each is built with the objectives it is named
    after (it once built contrastive-only models for every variant, timing no multi-task step at all)."""
    module = load("multitask_cost", monkeypatch)
    monkeypatch.setattr(sys.modules["common"], "RESULTS_DIR", tmp_path / "results")
    from xmodal.training.pretraining.arguments import OBJECTIVES

    built: list[tuple[str, ...]] = []
    build = module.build

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        built.append(model.pretraining_objectives)
        return model

    monkeypatch.setattr(module, "build", recording_build)
    results = module.main(["--smoke", "--each"])
    assert not (tmp_path / "results").exists()
    row = results["presets"]["tiny"]
    each = [f"contrastive+{name}" for name in OBJECTIVES[1:]]
    for name in ["contrastive", "multitask", "multitask-itm-all", "multitask+queue+views", *each]:
        assert row[name]["median_s"] > 0, name
    assert built == [("contrastive",), OBJECTIVES, OBJECTIVES, OBJECTIVES] + [
        ("contrastive", o) for o in OBJECTIVES[1:]
    ]
