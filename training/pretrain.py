"""Pretraining of an xmodal model with Accelerate, on the embedded procedural data by default: contrastive only, or
multi-task with any of the objectives of `XModalForPreTraining` (`--objectives all`).

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

from xmodal import XModalConfig, XModalForPreTraining, XModalImageProcessor, XModalModel, XModalProcessor
from xmodal.processing import train_tokenizer
from xmodal.training.augmentations import ImageAugmentation, TextAugmentation
from xmodal.training.cards import write_model_card
from xmodal.training.data import ANSWER_VOCAB, caption_corpus, make_synthetic_dataset
from xmodal.training.evaluation import evaluate_retrieval
from xmodal.training.losses import ContrastiveLoss

OBJECTIVES = ("contrastive", "itm", "mlm", "mim", "captioning", "vqa")


def parse_objectives(value: str) -> tuple[str, ...]:
    """`"all"` or a comma-separated subset of OBJECTIVES -> the objectives, in canonical order."""
    names = OBJECTIVES if value.strip() == "all" else tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = sorted(set(names) - set(OBJECTIVES))
    if unknown or not names:
        raise ValueError(
            f"--objectives {value!r} is not valid: unknown {unknown}; accepted: 'all' or a comma-separated subset of "
            f"{', '.join(OBJECTIVES)}."
        )
    return tuple(name for name in OBJECTIVES if name in names)


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
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings)."}
    )
    warmup_steps: int = field(default=25, metadata={"help": "Linear warmup steps before the cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    mixed_precision: str = field(default="no", metadata={"help": "Accelerate mixed precision: no, fp16 or bf16."})
    seed: int = field(default=0, metadata={"help": "Seed of the data, the initialisation and the data order."})
    eval_batch_size: int = field(default=250, metadata={"help": "Batch size for embedding the evaluation split."})
    objectives: str = field(
        default="contrastive",
        metadata={"help": f"'all' or a comma-separated subset of {', '.join(OBJECTIVES)} (each weighted 1)."},
    )
    contrastive_loss_type: str = field(default="nt_xent", metadata={"help": "nt_xent (InfoNCE) or siglip."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the InfoNCE loss."})
    queue_size: int = field(default=0, metadata={"help": "Momentum-queue negatives per positive (0: none)."})
    multiview: bool = field(
        default=False, metadata={"help": "Add a second, augmented view of each pair (multi-view contrastive)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": 'JSON of XModalConfig fields over the preset, e.g. \'{"text_config": {"num_hidden_layers": 2}}\'.'
        },
    )

    def __post_init__(self) -> None:
        parse_objectives(self.objectives)
        if self.config_overrides is not None:
            try:
                overrides = json.loads(self.config_overrides)
            except json.JSONDecodeError as err:
                raise ValueError(f"--config_overrides is not valid JSON: {err}") from err
            if not isinstance(overrides, dict):
                raise ValueError(f"--config_overrides must be a JSON object, got {self.config_overrides!r}.")
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
    workers): `pixel_values` `(B, 3, H, W)`, `input_ids`/`attention_mask` `(B, L)`.

    With `answer_vocab`, one of each row's `questions` is drawn (its answer from `answers`) and tokenized as
    `question_input_ids`/`question_attention_mask` `(B, Lq)`, with `vqa_labels` `(B,)` indexing `answer_vocab`.
    With augmentations, a second view of each pair is added as `second_view_*` (the first view is the original, so
    the other objectives see unaltered pairs).
    """

    def __init__(
        self,
        processor: XModalProcessor,
        max_length: int,
        image_column: str = "image",
        text_column: str = "text",
        answer_vocab: list[str] | None = None,
        image_augmentation: ImageAugmentation | None = None,
        text_augmentation: TextAugmentation | None = None,
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.image_column = image_column
        self.text_column = text_column
        self.answer_index = {answer: index for index, answer in enumerate(answer_vocab)} if answer_vocab else None
        self.image_augmentation = image_augmentation
        self.text_augmentation = text_augmentation

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.processor.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(
            self.processor(
                images=[row[self.image_column] for row in rows],
                text=[row[self.text_column] for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        if self.answer_index is not None:
            questions, labels = [], []
            for row in rows:
                # torch's RNG: seeded per DataLoader worker, so workers draw different questions
                pick = int(torch.randint(len(row["questions"]), ()))
                answer = row["answers"][pick]
                if answer not in self.answer_index:
                    raise ValueError(
                        f"Answer {answer!r} (to {row['questions'][pick]!r}) is not in the answer vocabulary."
                    )
                questions.append(row["questions"][pick])
                labels.append(self.answer_index[answer])
            question = self._tokenize(questions)
            batch["question_input_ids"] = question["input_ids"]
            batch["question_attention_mask"] = question["attention_mask"]
            batch["vqa_labels"] = torch.tensor(labels)
        if self.image_augmentation is not None:
            batch["second_view_pixel_values"] = self.image_augmentation(batch["pixel_values"])
        if self.text_augmentation is not None:
            ids, mask = self.text_augmentation(batch["input_ids"], batch["attention_mask"])
            batch["second_view_input_ids"], batch["second_view_attention_mask"] = ids, mask
        return batch


def build_config(
    args: PretrainArguments, tokenizer: PreTrainedTokenizerBase, objectives: tuple[str, ...]
) -> XModalConfig:
    """The preset (with `--config_overrides`) sized to the tokenizer, with the objectives' weights and special ids."""
    overrides: dict[str, Any] = json.loads(args.config_overrides) if args.config_overrides else {}
    preset = XModalConfig.from_preset(args.preset, **overrides)
    text_overrides = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": max(args.max_length, preset.text_config.max_position_embeddings),
    }
    special_ids = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id]
    values: dict[str, Any] = {
        **overrides,
        "text_config": {**overrides.get("text_config", {}), **text_overrides},
        # the decoder's vocabulary and sizes follow the text tower and the fusion module (XModalConfig's default)
        "decoder_config": {
            **overrides.get("decoder_config", {}),
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        **{f"{name}_loss_weight": float(name in objectives) for name in OBJECTIVES},
        "contrastive_loss_type": args.contrastive_loss_type,
        "label_smoothing": args.label_smoothing,
        "queue_size": args.queue_size,
        "mask_token_id": tokenizer.mask_token_id,
        "special_token_ids": sorted(set(special_ids)),
    }
    if "vqa" in objectives:
        values["id2label"] = dict(enumerate(ANSWER_VOCAB))
    return XModalConfig.from_preset(args.preset, **values)


def _image_augmentation(processor: XModalProcessor, config: XModalConfig) -> ImageAugmentation:
    """Mild augmentations: the captions name positions, so crops keep most of the image."""
    image_processor = processor.image_processor
    return ImageAugmentation(
        crop_scale=(0.8, 1.0),
        patch_size=config.vision_config.patch_size,
        image_mean=tuple(image_processor.image_mean),
        image_std=tuple(image_processor.image_std),
    )


def _text_augmentation(tokenizer: PreTrainedTokenizerBase) -> TextAugmentation:
    special = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)
    return TextAugmentation(
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id, special_token_ids=special
    )


def build_processor(tokenizer: PreTrainedTokenizerBase, config: XModalConfig) -> XModalProcessor:
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
    """Pretrains (contrastive, or multi-task with `args.objectives`), evaluates retrieval on the held-out test split
    and saves a Hub-ready folder.

    Returns:
        The metrics written to `output_dir/metrics.json`: retrieval Recall@1/5/10 both ways, the loss curves (total
        and per objective) and timing.
    """
    objectives = parse_objectives(args.objectives)
    # Without the fused objectives the fusion module is unused: DDP must tolerate unused parameters.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # without an accelerator device, Accelerate only forms a multi-process (gloo) group when told to use the CPU
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
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
    config = build_config(args, tokenizer, objectives)
    processor = build_processor(tokenizer, config)
    model = XModalForPreTraining(config)

    collator = ImageTextCollator(
        processor,
        args.max_length,
        answer_vocab=ANSWER_VOCAB if "vqa" in objectives else None,
        image_augmentation=_image_augmentation(processor, config) if args.multiview else None,
        text_augmentation=_text_augmentation(tokenizer) if args.multiview else None,
    )
    loader = _train_loader(data["train"], collator, args)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, args.weight_decay), lr=args.learning_rate)
    # stepped once per optimizer step by us (a prepared scheduler would step once per process)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # several processes: the InfoNCE negatives come from the global batch (gathered with gradients)
    global_contrastive = (
        accelerator.num_processes > 1
        and config.contrastive_loss_type == "nt_xent"
        and not args.queue_size
        and not args.multiview
    )
    extra_inputs = {"contrastive_loss_fn": ContrastiveLoss(args.label_smoothing)} if global_contrastive else {}
    logit_scale = accelerator.unwrap_model(model).logit_scale
    max_log_scale = math.log(config.max_logit_scale)

    losses: list[float] = []
    objective_losses: dict[str, list[float]] = {name: [] for name in objectives}
    model.train()
    progress = tqdm(total=args.max_steps, desc="pretraining", disable=not accelerator.is_local_main_process)
    start = time.perf_counter()
    step = 0
    while step < args.max_steps:
        for batch in loader:
            outputs = model(**batch, return_loss=True, **extra_inputs)
            loss = outputs.loss
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
            for name in objectives:
                objective_losses[name].append(outputs[f"{name}_loss"].item())
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
        "objectives": list(objectives),
        "objective_losses": objective_losses,
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
    "OBJECTIVES",
    "ImageTextCollator",
    "build_config",
    "PretrainArguments",
    "build_processor",
    "format_retrieval_table",
    "optimizer_param_groups",
    "parse_objectives",
    "pretrain",
    "save_pretrained_folder",
]
