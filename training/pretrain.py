"""Contrastive pretraining of an xmodal model with Accelerate, on the embedded procedural data by default.

`pretrain(PretrainArguments(...))` reads like the recipe: data -> tokenizer and processor -> model -> AdamW with a
cosine schedule -> the training loop -> retrieval evaluation -> a Hub-ready folder (weights, processor, remote code,
model card, metrics).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from xmodal import XModalConfig, XModalImageProcessor, XModalModel, XModalProcessor
from xmodal.processing import train_tokenizer
from xmodal.training.cards import write_model_card
from xmodal.training.data import caption_corpus, make_synthetic_dataset
from xmodal.training.evaluation import evaluate_retrieval


@dataclass
class PretrainArguments:
    """Options of `xmodal pretrain` (each is also a command-line flag)."""

    output_dir: str = field(default="outputs/xmodal-tiny", metadata={"help": "Folder for the Hub-ready model."})
    preset: str = field(default="tiny", metadata={"help": "Model size preset: tiny, small or base."})
    num_train_examples: int = field(default=8000, metadata={"help": "Procedural training scenes."})
    num_eval_examples: int = field(default=1000, metadata={"help": "Procedural validation and test scenes each."})
    vocab_size: int = field(default=2048, metadata={"help": "WordPiece vocabulary trained on the captions."})
    max_length: int = field(default=32, metadata={"help": "Longest caption in tokens (special tokens included)."})
    max_steps: int = field(default=240, metadata={"help": "Optimizer steps to train."})
    batch_size: int = field(default=64, metadata={"help": "Image-text pairs per step and process (the negatives)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings)."})
    warmup_steps: int = field(default=25, metadata={"help": "Linear warmup steps before the cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    mixed_precision: str = field(default="no", metadata={"help": "Accelerate mixed precision: no, fp16 or bf16."})
    seed: int = field(default=0, metadata={"help": "Seed of the data, the initialisation and the data order."})
    eval_batch_size: int = field(default=250, metadata={"help": "Batch size for embedding the evaluation split."})

    def __post_init__(self) -> None:
        for name in ("num_train_examples", "num_eval_examples", "vocab_size", "max_length", "max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval_batch_size must be at least 1, got {self.eval_batch_size}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ValueError(f"--weight_decay must be non-negative, got {self.weight_decay}.")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"--warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}.")
        if self.batch_size > self.num_train_examples:
            raise ValueError(
                f"--batch_size ({self.batch_size}) exceeds --num_train_examples ({self.num_train_examples}): "
                "an epoch would hold no full batch."
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")


class ImageTextCollator:
    """Turns rows `{"image": PIL.Image, "text": str, ...}` into model inputs with the processor (runs in DataLoader
    workers): `pixel_values` `(B, 3, H, W)`, `input_ids`/`attention_mask` `(B, L)`."""

    def __init__(
        self, processor: XModalProcessor, max_length: int, image_column: str = "image", text_column: str = "text"
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.image_column = image_column
        self.text_column = text_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(
            self.processor(
                images=[row[self.image_column] for row in rows],
                text=[row[self.text_column] for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )


def build_processor(
    tokenizer: PreTrainedTokenizerBase, config: XModalConfig
) -> XModalProcessor:
    """A processor whose image size matches the model's image tower."""
    size = config.vision_config.image_size
    image_processor = XModalImageProcessor(size={"height": size, "width": size})
    return XModalProcessor(image_processor=image_processor, tokenizer=tokenizer)


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only; none on norms, biases, embeddings and the logit scale."""
    no_decay_modules = (torch.nn.LayerNorm, torch.nn.Embedding)
    no_decay = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, no_decay_modules) or param.ndim < 2 or "embedding" in name:
                no_decay.add(f"{module_name}.{name}" if module_name else name)
    decay_params = [p for n, p in model.named_parameters() if p.requires_grad and n not in no_decay]
    other_params = [p for n, p in model.named_parameters() if p.requires_grad and n in no_decay]
    return [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": other_params, "weight_decay": 0.0},
    ]


def _train_loader(dataset: Dataset, collator: ImageTextCollator, args: PretrainArguments) -> DataLoader:
    generator = torch.Generator().manual_seed(args.seed)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collator,
        num_workers=args.num_workers,
        generator=generator,
        persistent_workers=args.num_workers > 0,
    )


def pretrain(args: PretrainArguments) -> dict[str, Any]:
    """Pretrains contrastively, evaluates retrieval on the held-out test split and saves a Hub-ready folder.

    Returns:
        The metrics written to `output_dir/metrics.json`: retrieval Recall@1/5/10 both ways, the loss curve and
        timing.
    """
    # The fusion module takes no part in the contrastive loss: DDP must tolerate its unused parameters.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    preset = XModalConfig.from_preset(args.preset)
    data = make_synthetic_dataset(
        num_train=args.num_train_examples,
        num_validation=args.num_eval_examples,
        num_test=args.num_eval_examples,
        seed=args.seed,
        image_size=preset.vision_config.image_size,
    )
    tokenizer = train_tokenizer(
        caption_corpus(data["train"]), vocab_size=args.vocab_size, model_max_length=args.max_length
    )
    config = XModalConfig.from_preset(
        args.preset,
        text_config={
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "max_position_embeddings": max(args.max_length, preset.text_config.max_position_embeddings),
        },
    )
    processor = build_processor(tokenizer, config)
    model = XModalModel(config)

    loader = _train_loader(data["train"], ImageTextCollator(processor, args.max_length), args)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, args.weight_decay), lr=args.learning_rate)
    # stepped once per optimizer step by us (a prepared scheduler would step once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    logit_scale = accelerator.unwrap_model(model).logit_scale
    max_log_scale = math.log(config.max_logit_scale)

    losses: list[float] = []
    model.train()
    progress = tqdm(total=args.max_steps, desc="pretraining", disable=not accelerator.is_local_main_process)
    start = time.perf_counter()
    step = 0
    while step < args.max_steps:
        for batch in loader:
            loss = model(**batch, return_loss=True).loss
            accelerator.backward(loss)
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                # clamp the parameter itself (open_clip) so it keeps receiving gradient at the bound
                logit_scale.clamp_(0, max_log_scale)
            step += 1
            losses.append(loss.item())
            elapsed = time.perf_counter() - start
            progress.set_postfix(
                loss=f"{losses[-1]:.3f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
                pairs_per_s=f"{step * args.batch_size * accelerator.num_processes / elapsed:.0f}",
            )
            progress.update(1)
            if step >= args.max_steps:
                break
    progress.close()
    train_seconds = time.perf_counter() - start

    model = accelerator.unwrap_model(model)
    metrics: dict[str, Any] = {
        "train_steps": step,
        "train_pairs": step * args.batch_size * accelerator.num_processes,
        "train_seconds": round(train_seconds, 1),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "losses": losses,
    }
    if accelerator.is_main_process:
        test_metrics = evaluate_retrieval(
            model, processor, data["test"], batch_size=args.eval_batch_size, max_length=args.max_length
        )
        metrics.update({f"test_{key}": value for key, value in test_metrics.items()})
        metrics["test_chance_R@1"] = 1.0 / len(data["test"])
        save_pretrained_folder(model, processor, args, metrics)
    accelerator.wait_for_everyone()
    return metrics


def save_pretrained_folder(
    model: XModalModel, processor: XModalProcessor, args: PretrainArguments, metrics: dict[str, Any]
) -> None:
    """Writes the Hub-ready folder: safetensors weights, config and processor files, the remote-code bundle, the
    model card and metrics.json."""
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({"arguments": asdict(args), **metrics}, handle, indent=2)
    write_model_card(
        args.output_dir,
        model.config,
        metrics,
        training_arguments=asdict(args),
        num_parameters=model.num_parameters(),
    )


def format_retrieval_table(metrics: dict[str, Any]) -> str:
    """A Markdown table of the test Recall@K figures in `metrics`."""
    lines = ["| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    for direction in ("text_to_image", "image_to_text"):
        cells = [f"{100 * metrics[f'test_{direction}_R@{k}']:.1f}" for k in (1, 5, 10)]
        lines.append(f"| {direction.replace('_', ' ')} | " + " | ".join(cells) + " |")
    chance = metrics["test_chance_R@1"]
    lines.append(f"\nChance level: R@1 = {100 * chance:.1f}%, R@10 = {100 * min(1.0, 10 * chance):.1f}%.")
    return "\n".join(lines)


__all__ = [
    "ImageTextCollator",
    "PretrainArguments",
    "build_processor",
    "format_retrieval_table",
    "optimizer_param_groups",
    "pretrain",
    "save_pretrained_folder",
]

