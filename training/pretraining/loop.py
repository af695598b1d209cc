"""Pretraining of an xmodal model with Accelerate, on the embedded procedural data by default: contrastive only, or
multi-task with any of the objectives of `XModalForPreTraining` (`--objectives all`).

`pretrain(PretrainArguments(...))` reads like the recipe: data -> tokenizer and processor -> model -> AdamW with a
cosine schedule -> the training loop -> retrieval evaluation -> a Hub-ready folder (weights, processor, remote code,
model card, metrics).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xmodal import XModalConfig, XModalModel
from xmodal.processing import load_tokenizer
from xmodal.training.data import ANSWER_VOCAB, BAD_ROWS_KEY, BadRowCounter, BadRows, SkipBadRows
from xmodal.training.data.collate import (
    ImageTextCollator,
    second_view_image_augmentation,
    second_view_text_augmentation,
)
from xmodal.training.data.pipeline import load_pretraining_data
from xmodal.training.data.seeding import row_seed
from xmodal.training.evaluation.evaluator import EvaluationTask, evaluate_model, evaluation_task
from xmodal.training.losses import ContrastiveLoss, GlobalBatch, LossBalancer
from xmodal.training.pretraining.arguments import PretrainArguments, parse_objectives
from xmodal.training.pretraining.builders import (
    _check_output_dir,
    _run_tokenizer,
    _train_loader,
    build_accelerator,
    build_config,
    build_model,
    build_processor,
    hard_negatives,
    lock_towers,
    optimizer_param_groups,
    prepare_per_process_loader,
    resolve_text_tower,
    tower_image_size,
    train_augmentation,
)
from xmodal.training.pretraining.checkpointing import (
    latest_checkpoint,
    load_best_model,
    load_checkpoint,
    remove_incomplete_checkpoints,
    save_best_model,
    save_checkpoint,
)
from xmodal.training.pretraining.schedule import BudgetedSchedule
from xmodal.training.pretraining.selection import ModelSelection
from xmodal.training.publishing.run_report import write_run_report
from xmodal.training.publishing.trackers import tracker_config


def process_seed(seed: int, process_index: int) -> int:
    """The seed of a process's in-step draws (masking, ITM negatives, dropout) once the model is built: distinct per
    process, and distinct from `seed`, whose stream initialised the weights. Re-seeding with `seed` itself would
    replay the numbers the weights were drawn from as the masks and negatives of the first steps; measured on
    `make demo` with one tokenizer: text->image R@10 9.0% with that replay, 25.9% without."""
    return row_seed(seed, -1, process_index) % 2**32  # -1: no data row's (epoch >= 0); numpy takes 32-bit seeds


def _trim(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """The first `size` rows of a collated batch (every value has one row per pair)."""
    return {key: value[:size] for key, value in batch.items()}


def _batches(
    loader: DataLoader, accelerator: Accelerator, state: dict[str, Any], bad_rows: BadRowCounter
) -> Iterator[dict[str, Any]]:
    """Endless micro-batches; `state["epoch"]` and `state["batch"]` (micro-batches of that epoch already consumed)
    track the position, so a resumed run skips exactly the batches it has seen.

    Undecodable rows were dropped by the collator; they are counted here over all processes (every process sees the
    same totals, so the --max_bad_row_fraction stop is taken everywhere at once). The global-batch losses gather
    equal shapes, so every process keeps as many rows as the smallest slice; a slice left empty skips the batch.
    An epoch ends on every process when one process's loader is exhausted (processes reading shards of their own
    hold different numbers of rows), so all stay at the same position."""
    while True:
        loader.set_epoch(state["epoch"])
        source = accelerator.skip_first_batches(loader, state["batch"]) if state["batch"] else loader
        from_start, produced = state["batch"] == 0, False
        for batch in itertools.chain(source, [None]):
            report = batch.pop(BAD_ROWS_KEY) if batch is not None else BadRows(0, ())
            local = [len(batch["input_ids"]) if batch else 0, report.num_rows, report.num_bad, int(batch is None)]
            counts = accelerator.gather(torch.tensor([local], device=accelerator.device))
            if counts[:, 3].any():
                break
            state["batch"] += 1
            bad_rows.update(int(counts[:, 1].sum()), int(counts[:, 2].sum()), report.descriptions)
            size = int(counts[:, 0].min())
            if size == 0:
                continue
            produced = True
            yield _trim(batch, size)
        if from_start and not produced:
            raise ValueError(
                f"An epoch of the training data produced no usable batch ({bad_rows.summary()}): fewer decodable rows "
                "than --batch_size x processes?"
            )
        state["epoch"] += 1
        state["batch"] = 0


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` holds on any process (all processes then take the same branch)."""
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _shared_clock(accelerator: Accelerator, seconds: float, step_seconds: float) -> tuple[float, float]:
    """The main process's training time and last step time on every process: the time budget's stop and learning
    rate must be decided alike everywhere (each process's own clock differs by milliseconds)."""
    if accelerator.num_processes == 1:
        return seconds, step_seconds
    values = broadcast(torch.tensor([seconds, step_seconds], dtype=torch.float64, device=accelerator.device))
    return float(values[0]), float(values[1])


def pretrain(args: PretrainArguments) -> dict[str, Any]:
    """Pretrains (contrastive, or multi-task with `args.objectives`) within a budget of steps and/or wall-clock time,
    evaluates the validation split during training (`eval_steps`), keeps the best model (`metric_for_best_model`,
    `load_best_model_at_end`), evaluates the held-out test split and saves a Hub-ready folder. With `save_steps`,
    checkpoints are written atomically and `resume` continues the newest one exactly (with a step budget: the same
    weights as an uninterrupted run).

    Returns:
        The metrics written to `output_dir/metrics.json`: the test metrics (`test_*`: retrieval Recall@1/5/10 both
        ways, and zero-shot, ITM, VQA and captioning where they apply), the validation evaluations
        (`eval_history`, `best_model`), the loss curves (total and per objective), counters of skipped steps and
        timing.
    """
    objectives = parse_objectives(args.objectives)
    _check_output_dir(args)
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    image_size = (
        tower_image_size(args.vision_tower)
        if args.vision_tower
        else XModalConfig.from_preset(args.preset, **overrides).vision_config.image_size
    )
    data = load_pretraining_data(
        args,
        image_size,
        validation=bool(args.eval_steps),
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    if "vqa" in objectives and not {"questions", "answers"} <= set(data.columns):
        raise ValueError(f"The vqa objective needs 'questions' and 'answers' columns, which {args.dataset} lacks.")
    if args.text_tower:
        tokenizer = load_tokenizer(resolve_text_tower(args.text_tower))
    else:
        tokenizer = _run_tokenizer(args, accelerator, data.corpus)
    model = build_model(args, build_config(args, tokenizer, objectives))
    config = model.config
    processor = build_processor(tokenizer, config, args.vision_tower)
    lock_towers(model, args.lock_image_tower, args.lock_text_tower, args.unlocked_text_layers)
    # the model starts identical everywhere; masking, ITM draws and dropout now differ from process to process
    set_seed(process_seed(args.seed, accelerator.process_index))
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()

    collator = ImageTextCollator(
        processor,
        args.max_length,
        answer_vocab=ANSWER_VOCAB if "vqa" in objectives else None,
        augmentation=train_augmentation(args, processor),
        image_augmentation=second_view_image_augmentation(processor, config) if args.multiview else None,
        text_augmentation=second_view_text_augmentation(tokenizer) if args.multiview else None,
        hard_negatives=hard_negatives(args),
        num_hard_negatives=args.hard_negative_captions,
    )
    # a process reading shards of its own batches them alone; otherwise Accelerate splits the global batch
    loader = _train_loader(
        data.train, SkipBadRows(collator), args, 1 if data.per_process else accelerator.num_processes
    )
    # the objectives the model computes (a weight of 0 removes one) and how their losses are combined
    weights = {name: getattr(config, f"{name}_loss_weight") for name in objectives}
    weights = {name: weight for name, weight in weights.items() if weight > 0}
    balancer = LossBalancer(weights, args.loss_balancing).to(accelerator.device)
    groups = optimizer_param_groups(model, args.weight_decay)
    if args.loss_balancing == "uncertainty":
        groups.append({"params": list(balancer.parameters()), "weight_decay": 0.0})
    # torch's fused AdamW kernel (one pass over each parameter instead of a dozen elementwise ops; transformers'
    # Trainer default) where the device has one
    fused = accelerator.device.type in ("cpu", "cuda", "mps") or None
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=fused)
    # stepped once per optimizer step by us (a prepared scheduler would step once per process)
    scheduler = BudgetedSchedule(optimizer, args.warmup_steps, args.max_steps, args.max_seconds)
    if data.per_process:
        model, optimizer = accelerator.prepare(model, optimizer)
        loader = prepare_per_process_loader(accelerator, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(balancer)
    # several processes: the negatives of InfoNCE, ITM and the momentum queue come from the global batch (gathered,
    # with gradients where they flow)
    extra_inputs: dict[str, Any] = {}
    if accelerator.num_processes > 1:
        extra_inputs["global_batch"] = GlobalBatch()
        if config.contrastive_loss_type == "siglip" or args.multiview:
            accelerator.print(
                "Note: with SigLIP or second views, the contrastive negatives come from each process's own batch."
            )
        if config.contrastive_loss_type == "nt_xent" and not args.queue_size and not args.multiview:
            extra_inputs["contrastive_loss_fn"] = ContrastiveLoss(args.label_smoothing)
    logit_scale = accelerator.unwrap_model(model).logit_scale
    max_log_scale = math.log(config.max_logit_scale)

    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "losses": [],
        "objective_losses": {name: [] for name in weights},
        "nonfinite_steps": 0,
        "train_seconds": 0.0,
        "eval_history": [],
        **ModelSelection.initial_state(),
        # what fixes the data order and the RNG files: a resumed run must use the same
        "run_options": {
            **{name: getattr(args, name) for name in _RESUME_OPTIONS},
            "num_processes": accelerator.num_processes,
        },
    }
    task = evaluation_task(
        args,
        data.evaluation,
        answer_vocab=ANSWER_VOCAB if "vqa" in weights else None,
        captioning="captioning" in weights,
        max_new_tokens=args.max_length - 1,
        itm="itm" in weights,
    )
    selection = ModelSelection(args.eval_steps, args.metric_for_best_model, bool(args.greater_is_better))
    # validation (during training, inside the budget) computes retrieval and zero-shot, plus ITM, VQA or captioning
    # (generation, the slowest) only when that is what selects the model
    selecting = (args.metric_for_best_model or "").removeprefix("eval_")
    validation_task = replace(
        task,
        captioning=task.captioning and selecting.startswith("captioning"),
        itm=task.itm and selecting.startswith("itm"),
        answer_vocab=task.answer_vocab if selecting.startswith("vqa") else None,
    )

    def evaluate(model: XModalModel, dataset: Dataset, task: EvaluationTask) -> dict[str, Any]:
        return evaluate_model(
            model,
            processor,
            dataset,
            task,
            accelerator=accelerator,
            batch_size=args.eval_batch_size,
            max_length=args.max_length,
            show_progress=accelerator.is_local_main_process,
        )

    def validate(step: int) -> None:
        """Evaluates the validation split; an improvement of the selection metric saves the best model."""
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        results = evaluate(unwrapped, data.validation, validation_task)
        state["eval_history"].append({"step": step, **results})
        accelerator.log(
            {f"eval_{key}": value for key, value in results.items() if isinstance(value, float)}, step=step
        )
        if selection.improves(results, state):
            state["best"] = selection.record(step, results)
            save_best_model(accelerator, unwrapped, args.output_dir, state["best"])

    bad_rows = BadRowCounter(args.max_bad_row_fraction)
    remove_incomplete_checkpoints(args.output_dir)
    resumed_from = latest_checkpoint(args.output_dir) if args.resume else None
    if resumed_from:
        saved = load_checkpoint(accelerator, resumed_from)
        changed = {
            name: (value, state["run_options"][name])
            for name, value in saved.get("run_options", {}).items()
            if state["run_options"].get(name) != value
        }
        if changed:
            raise ValueError(
                f"--resume from {resumed_from}: these options differ from the checkpoint's (saved, now): {changed}; "
                "the data order would not continue. Resume with the same options, or start afresh."
            )
        state.update(saved)
        bad_rows.update(state["rows_seen"], state["bad_rows"], state["bad_row_examples"])
        accelerator.print(f"Resuming from {resumed_from} (step {state['step']}).")
    accelerator.init_trackers("xmodal-pretrain", config=tracker_config(asdict(args)))

    model.train()
    progress = tqdm(
        total=args.max_steps, initial=state["step"], desc="pretraining", disable=not accelerator.is_local_main_process
    )
    # time and pairs/s of this session; train_seconds adds the sessions before a resume
    session_start, start_step, seconds_before = time.perf_counter(), state["step"], state["train_seconds"]
    pairs_per_step = args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    consecutive_nonfinite = 0
    batches = _batches(loader, accelerator, state, bad_rows)
    accumulation = args.gradient_accumulation_steps
    seconds, step_seconds = seconds_before, 0.0

    def budget_spent() -> bool:
        # a time budget ends the run before the next step would pass it (by the last step's duration)
        if args.max_steps is not None and state["step"] >= args.max_steps:
            return True
        return args.max_seconds is not None and seconds + step_seconds > args.max_seconds

    while not budget_spent():
        step_start = time.perf_counter()
        micro_losses: list[torch.Tensor] = []
        nonfinite = False
        # task sampling: the auxiliary objectives from `auxiliary_start` of the budget on, on the first step of every
        # `auxiliary_every`
        auxiliary_step = state["step"] % args.auxiliary_every == 0 and (
            not args.auxiliary_start or scheduler.progress(state["step"], seconds) >= args.auxiliary_start
        )
        step_objectives = list(weights) if auxiliary_step else ["contrastive"]
        for micro in range(accumulation):
            batch = next(batches)
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                outputs = model(**batch, return_loss=True, objectives=step_objectives, **extra_inputs)
                losses = {name: outputs[f"{name}_loss"] for name in step_objectives}
                loss = balancer(losses)
                nonfinite = _any_process(accelerator, not torch.isfinite(loss).item())
                # a non-finite loss still runs backward (scaled by 0) so that DDP's collectives stay in step
                accelerator.backward(loss * (0.0 if nonfinite else 1.0 / accumulation))
            if nonfinite:
                break
            # the objectives this step skipped count as NaN (None in the curves)
            skipped = torch.tensor(float("nan"), device=outputs.loss.device)
            micro_losses.append(
                torch.stack(
                    [outputs.loss.detach()]
                    + [losses[name].detach() if name in losses else skipped for name in weights]
                )
            )
        if not nonfinite and args.max_grad_norm > 0:
            # a finite loss can still give non-finite gradients (overflow in the backward pass)
            nonfinite = not math.isfinite(float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)))
        if not nonfinite:
            optimizer.step()
            # fp16: the gradient scaler skips steps whose gradients overflowed
            nonfinite = accelerator.optimizer_step_was_skipped
        optimizer.zero_grad(set_to_none=True)
        seconds, step_seconds = _shared_clock(
            accelerator, seconds_before + time.perf_counter() - session_start, time.perf_counter() - step_start
        )
        if nonfinite:
            state["nonfinite_steps"] += 1
            consecutive_nonfinite += 1
            accelerator.print(f"Step {state['step'] + 1}: non-finite loss or gradients, step skipped.")
            if consecutive_nonfinite >= args.max_nonfinite_steps:
                raise RuntimeError(
                    f"The loss was non-finite in {consecutive_nonfinite} consecutive steps (last at step "
                    f"{state['step'] + 1}); stopping. Last good checkpoint: "
                    f"{latest_checkpoint(args.output_dir) or 'none (set --save_steps)'}."
                )
            continue
        consecutive_nonfinite = 0
        with torch.no_grad():
            # clamp the parameter itself (open_clip) so it keeps receiving gradient at the bound
            logit_scale.clamp_(0, max_log_scale)
        state["step"] += 1
        scheduler.step(state["step"], seconds)
        step_losses = accelerator.reduce(torch.stack(micro_losses).mean(dim=0), reduction="mean").tolist()
        state["losses"].append(step_losses[0])
        for name, value in zip(weights, step_losses[1:]):
            state["objective_losses"][name].append(value if math.isfinite(value) else None)
        pairs_per_s = (state["step"] - start_step) * pairs_per_step / (time.perf_counter() - session_start)
        progress.set_postfix(
            loss=f"{step_losses[0]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", pairs_per_s=f"{pairs_per_s:.0f}"
        )
        progress.update(1)
        if args.logging_steps and state["step"] % args.logging_steps == 0:
            balance = balancer.effective_weights().tolist()
            accelerator.log(
                {
                    "loss": step_losses[0],
                    "lr": scheduler.get_last_lr()[0],
                    "pairs_per_s": pairs_per_s,
                    **{f"{n}_loss": v for n, v in zip(weights, step_losses[1:]) if math.isfinite(v)},
                    **({f"{n}_weight": v for n, v in zip(weights, balance)} if args.loss_balancing != "none" else {}),
                },
                step=state["step"],
            )
        if not budget_spent() and selection.due(state["step"], scheduler.progress(state["step"], seconds), state):
            validate(state["step"])
        if args.save_steps and state["step"] % args.save_steps == 0:
            state["train_seconds"] = seconds_before + time.perf_counter() - session_start
            save_checkpoint(
                accelerator, args.output_dir, state["step"], _json_state(state, bad_rows), args.save_total_limit
            )
    progress.close()
    if bad_rows.num_bad:
        accelerator.print(bad_rows.summary())
    state["train_seconds"] = seconds_before + time.perf_counter() - session_start
    if args.eval_steps and (not state["eval_history"] or state["eval_history"][-1]["step"] != state["step"]):
        validate(state["step"])  # the last model is a candidate too
    # a time-budgeted run always ends with a checkpoint (its last step is not known in advance)
    if (args.save_steps and state["step"] % args.save_steps) or (args.max_seconds is not None and not args.save_steps):
        save_checkpoint(
            accelerator, args.output_dir, state["step"], _json_state(state, bad_rows), args.save_total_limit
        )

    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    if args.load_best_model_at_end and state["best"] is not None and state["best"]["step"] != state["step"]:
        load_best_model(model, args.output_dir)
        accelerator.print(
            f"Loaded the best model: step {state['best']['step']}, {state['best']['metric']} = {state['best']['value']:.4f}."
        )
    if accelerator.is_main_process:
        # the weights first: nothing trained is lost if evaluation fails
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
    losses = state["losses"]
    metrics: dict[str, Any] = {
        "train_steps": state["step"],
        "train_pairs": state["step"] * pairs_per_step,
        "train_seconds": round(state["train_seconds"], 1),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "losses": losses,
        "objectives": list(weights),
        "objective_losses": state["objective_losses"],
        "nonfinite_steps": state["nonfinite_steps"],
        "rows_seen": bad_rows.num_rows,
        "bad_rows": bad_rows.num_bad,
        "bad_row_examples": list(bad_rows.examples),
        "resumed_from": resumed_from,
        "best_model": state["best"],
        "saved_model_step": state["best"]["step"] if args.load_best_model_at_end and state["best"] else state["step"],
    }
    metrics.update({f"test_{key}": value for key, value in evaluate(model, data.evaluation, task).items()})
    metrics["test_chance_R@1"] = 1.0 / len(data.evaluation)
    metrics["eval_history"] = state["eval_history"]
    if accelerator.is_main_process:
        write_run_report(model, processor, args, metrics, data.evaluation)
    accelerator.wait_for_everyone()
    # last: it also ends the process group
    accelerator.end_training()
    return metrics


_RESUME_OPTIONS = (
    "dataset",
    "text_column",
    "train_split",
    "split_column",
    "num_train_examples",
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "objectives",
)


def _json_state(state: dict[str, Any], bad_rows: BadRowCounter) -> dict[str, Any]:
    counts = {
        "rows_seen": bad_rows.num_rows,
        "bad_rows": bad_rows.num_bad,
        "bad_row_examples": list(bad_rows.examples),
    }
    return {**{key: value for key, value in state.items() if key != "step"}, **counts}


__all__ = [
    "pretrain",
]
