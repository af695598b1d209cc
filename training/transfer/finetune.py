"""Fine-tuning a pretrained xmodal model with transformers' `Trainer`, one recipe per task:

- `image-classification`: `XModalForImageClassification`, a new linear head on the image tower;
- `vqa`: `XModalForVisualQuestionAnswering`, classification over an answer vocabulary;
- `retrieval`: contrastive fine-tuning of the dual encoder (`XModalModel`) on image-caption pairs, with InfoNCE over the
  global batch when several processes train (`ContrastiveTrainer`), scored by Recall@K both ways;
- `captioning`: `XModalForConditionalGeneration`, next-token loss on the captions, scored by BLEU-4 and CIDEr-D of
  greedy captions.

`finetune(FinetuneArguments(...))` reads like the recipe: data -> processor and collator -> the task model (with LoRA
adapters on the attention projections when `lora_r > 0`, through `peft`) -> `Trainer` -> held-out metrics -> a
Hub-ready folder (weights, processor, remote code, metrics.json; with LoRA also the adapter alone in `adapter/`).
By default it trains on the embedded procedural data: `label` (the shape of the largest object) for classification,
every `questions`/`answers` pair for VQA (answers in `xmodal.training.data.ANSWER_VOCAB`), the `captions` of each scene
(one drawn per row and step) for retrieval and captioning.

```bash
xmodal finetune --task image-classification --model outputs/xmodal-tiny --output_dir outputs/classifier
xmodal finetune --task vqa --model outputs/xmodal-tiny --output_dir outputs/vqa
xmodal finetune --task retrieval --model outputs/xmodal-tiny --output_dir outputs/retrieval
xmodal finetune --task captioning --model outputs/xmodal-tiny --output_dir outputs/captioner
xmodal finetune --task retrieval --dataset my_pairs --caption_column caption --model outputs/xmodal-tiny
xmodal finetune --task image-classification --lora_r 8 --learning_rate 1e-3 --model outputs/xmodal-tiny
accelerate launch --multi_gpu --num_processes 2 -m xmodal.training.cli finetune --task retrieval --model ...
```

"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from torch import nn
from transformers import EvalPrediction, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed

from xmodal import XModalConfig, XModalForConditionalGeneration, XModalProcessor
from xmodal.training.evaluation.evaluator import evaluate_model
from xmodal.training.evaluation.metrics import load_metric
from xmodal.training.inference.embeddings import load_image
from xmodal.training.losses import ContrastiveLoss
from xmodal.training.publishing.trackers import parse_report_to

if TYPE_CHECKING:
    from peft import PeftModel
from xmodal.training.transfer.finetune_arguments import (
    ADAPTER_FOLDER,
    CAPTION_TASKS,
    TASK_HEADS,
    TASK_MODELS,
    FinetuneArguments,
)
from xmodal.training.transfer.finetune_data import (
    ATTENTION_PROJECTIONS,
    CaptioningCollator,
    ImageClassificationCollator,
    RetrievalCollator,
    VQACollator,
    load_finetune_data,
)

logger = logging.getLogger(__name__)


def lora_target_modules(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Full names of the attention projections (`ATTENTION_PROJECTIONS`) of `model`, in module order, leaving out those
    inside the modules named in `exclude` (e.g. `"cross_model"`): `peft.LoraConfig(target_modules=...)`.

    For an `XModalForImageClassification` with one layer: `["vision_model.encoder.layers.0.self_attn.qkv_proj",
    "vision_model.encoder.layers.0.self_attn.out_proj"]`.
    """
    excluded = tuple(f"{name}." for name in exclude)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
        and not f"{name}.".startswith(excluded)
    ]


def apply_lora(
    model: PreTrainedModel,
    r: int,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> PeftModel:
    """Wraps `model` with `peft` LoRA adapters of rank `r` on its attention projections (`lora_target_modules`) and
    freezes every other weight, except the modules named in `modules_to_save` (e.g. a new `classifier`), which train
    in full and are saved with the adapter. Modules in `exclude` (and in `modules_to_save`) get no adapter.

    `model.save_pretrained(folder)` then writes the adapter alone (`adapter_config.json`,
    `adapter_model.safetensors`); `peft.PeftModel.from_pretrained(base, folder)` puts it back on a freshly loaded base
    and `merge_and_unload()` folds it into the weights.

    Raises:
        ImportError: peft is not installed.
        ValueError: `r` < 1, or no attention projection is left to adapt.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'xmodal[peft]' (or pip install peft).") from err
    if r < 1:
        raise ValueError(f"The LoRA rank r must be at least 1, got {r}.")
    targets = lora_target_modules(model, exclude=[*exclude, *modules_to_save])
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no attention projection ({', '.join(ATTENTION_PROJECTIONS)}) outside "
            f"{[*exclude, *modules_to_save]} to put LoRA adapters on."
        )
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        modules_to_save=list(modules_to_save) or None,
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------------------
# Model, Trainer, recipe
# ----------------------------------------------------------------------------------------------------------------


def _new_modules(loading_info: Mapping[str, Any]) -> set[str]:
    """The top-level modules with weights the checkpoint did not provide (missing, or of another shape)."""
    keys = [*loading_info["missing_keys"], *loading_info["mismatched_keys"]]
    return {(key if isinstance(key, str) else key[0]).split(".")[0] for key in keys}


def build_model(args: FinetuneArguments, labels: Sequence[str]) -> PreTrainedModel | PeftModel:
    """The task model (`TASK_MODELS`) from the pretrained folder: the parts the checkpoint holds load their weights; a
    classification or VQA head over `labels` is new (or reused when the checkpoint has one of the same shape), as is
    the captioning decoder of a checkpoint pretrained without one. Retrieval freezes the fusion module, which the
    contrastive loss does not use.

    With `args.lora_r > 0`, `apply_lora` wraps the model: adapters on the attention projections of the pretrained
    parts; the task head (`TASK_HEADS`) and the modules the checkpoint lacks train in full.

    Raises:
        ValueError: LoRA on a checkpoint without the captioning decoder (new and tied to the output layer, it cannot
            train in full beside the adapters: fine-tune it with `lora_r=0` first).
    """
    options: dict[str, Any] = {}
    if args.task in ("image-classification", "vqa"):
        id2label = dict(enumerate(labels))
        options = {
            "id2label": id2label,
            "label2id": {label: index for index, label in id2label.items()},
            "ignore_mismatched_sizes": True,
        }
    model, loading_info = TASK_MODELS[args.task].from_pretrained(args.model, output_loading_info=True, **options)
    if args.task == "retrieval" and model.cross_model is not None:
        model.cross_model.requires_grad_(False)
    if args.lora_r == 0:
        return model
    new_modules = _new_modules(loading_info)
    tied = {name.split(".")[0] for pair in (model._tied_weights_keys or {}).items() for name in pair}
    if tied & new_modules:
        raise ValueError(
            f"--lora_r: {args.model} has no pretrained {', '.join(sorted(tied & new_modules))} for {args.task}; "
            "fine-tune it in full first (--lora_r 0), then train LoRA adapters on that folder."
        )
    return apply_lora(
        model,
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        modules_to_save=sorted(new_modules | set(TASK_HEADS[args.task])),
        exclude=("cross_model",) if args.task == "retrieval" else (),
    )


class ClampLogitScale(TrainerCallback):
    """Clamps the logit scale parameter into [0, log(max_logit_scale)] after every optimizer step, as CLIP's training
    does: the forward pass clamps too, but a parameter left past the bound would get no gradient and stay stuck."""

    def on_step_end(
        self, args: TrainingArguments, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        model = getattr(model, "module", model)
        logit_scale = getattr(model, "logit_scale", None)
        if isinstance(logit_scale, torch.Tensor):
            with torch.no_grad():
                logit_scale.clamp_(0, math.log(model.config.max_logit_scale))


class ContrastiveTrainer(Trainer):
    """`Trainer` for contrastive fine-tuning of the dual encoder (`XModalModel`, batches from `RetrievalCollator`).

    On one process the loss is the model's own: InfoNCE over the batch (or SigLIP, as configured). On several
    processes (DDP), InfoNCE runs over the global batch: `xmodal.training.losses.ContrastiveLoss` gathers every
    process's embeddings with their gradients, so N processes with B pairs each learn like one process with N x B
    pairs (open_clip). The SigLIP loss stays per process. Gradient accumulation does not enlarge the contrastive
    batch: each micro-batch holds its own negatives.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(ClampLogitScale())
        config = self.model.config
        self.global_loss: ContrastiveLoss | None = None
        if self.args.world_size > 1:
            if config.contrastive_loss_type == "nt_xent":
                self.global_loss = ContrastiveLoss(config.label_smoothing)
            else:
                logger.warning(
                    f"The {config.contrastive_loss_type} loss is computed within each process's batch of "
                    f"{self.args.per_device_train_batch_size} pairs; only InfoNCE (nt_xent) gathers the global batch."
                )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's loss, or with several processes, InfoNCE of this process's pairs against the global batch."""
        if self.global_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{**inputs, "return_loss": False})
        logit_scale = self.accelerator.unwrap_model(model).clamped_logit_scale()
        loss = self.global_loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        return (loss, outputs) if return_outputs else loss


def compute_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy of the argmax of `predictions` `(N, C)`: against `label_ids` `(N,)`, or, for soft VQA targets
    `(N, C)`, the target score of the predicted answer (the VQA accuracy)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.asarray(logits).argmax(axis=-1)
    targets = np.asarray(prediction.label_ids)
    if targets.ndim == 1:
        return {"accuracy": float((predicted == targets).mean())}
    return {"accuracy": float(targets[np.arange(len(predicted)), predicted].mean())}


@torch.no_grad()
def generate_captions(
    model: XModalForConditionalGeneration,
    processor: XModalProcessor,
    dataset: Dataset,
    image_column: str = "image",
    batch_size: int = 64,
    max_new_tokens: int = 24,
    accelerator: Accelerator | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """A caption for every image of `dataset`, in row order, decoded without special tokens: greedy, unless
    `generate_kwargs` (`num_beams`, `do_sample`, ...) say otherwise. With an `Accelerator` of several processes, each
    captions a contiguous share of the rows and every process returns all the captions."""
    state = accelerator if accelerator is not None else PartialState()
    was_training = model.training
    model.eval()
    captions: list[str] = []
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        for start in range(0, len(indices), batch_size):
            images = [load_image(image) for image in dataset[indices[start : start + batch_size]][image_column]]
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
            tokens = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, **generate_kwargs)
            captions.extend(processor.batch_decode(tokens, skip_special_tokens=True))
    model.train(was_training)
    return gather_object(captions)


def captioning_metrics(captions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (the local `bleu` and `cider` metric modules) of `captions` against each one's
    reference caption or captions: `{"bleu4": ..., "cider": ...}`."""
    if len(captions) != len(references):
        raise ValueError(f"Got {len(captions)} captions for {len(references)} sets of references.")
    refs = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
    inputs = {"predictions": list(captions), "references": refs}
    return {
        "bleu4": float(load_metric("bleu", keep_in_memory=True).compute(**inputs)["bleu"]),
        "cider": float(load_metric("cider", keep_in_memory=True).compute(**inputs)["cider"]),
    }


def training_arguments(args: FinetuneArguments) -> TrainingArguments:
    """transformers `TrainingArguments` of the run: raw-column collators (remove_unused_columns=False), no reporting,
    no intermediate checkpoints (the folder is saved at the end), the CPU when there is no accelerator. Retrieval
    batches have no `labels`: they ask for the contrastive loss with `return_loss`; every trainable weight of
    retrieval is used (the fusion module is frozen), so DDP skips its search for unused ones."""
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        optim=args.optim,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to=parse_report_to(args.report_to) or "none",
        remove_unused_columns=False,
        label_names=[] if args.task == "retrieval" else ["labels"],
        ddp_find_unused_parameters=False if args.task == "retrieval" else None,
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
    )


def caption_length(args: FinetuneArguments, processor: XModalProcessor, config: XModalConfig) -> int:
    """The longest captioning sequence in tokens (BOS and EOS included): --max_length, else the tokenizer's
    `model_max_length`, at most the decoder's `max_position_embeddings`."""
    positions = config.decoder_config.max_position_embeddings
    if args.max_length is not None and args.max_length > positions:
        raise ValueError(
            f"--max_length {args.max_length} exceeds the captioning decoder's max_position_embeddings ({positions})."
        )
    return args.max_length or min(processor.tokenizer.model_max_length, positions)


def build_collator(
    args: FinetuneArguments, processor: XModalProcessor, config: XModalConfig, labels: Sequence[str]
) -> ImageClassificationCollator | VQACollator | RetrievalCollator | CaptioningCollator:
    """The collator of `args.task` (retrieval and captioning read the `image`/`text` rows of `load_finetune_data`)."""
    if args.task == "image-classification":
        return ImageClassificationCollator(
            processor,
            label2id={label: index for index, label in enumerate(labels)},
            image_column=args.image_column,
            label_column=args.label_column,
        )
    if args.task == "vqa":
        return VQACollator(
            processor,
            labels,
            max_length=args.max_length,
            image_column=args.image_column,
            question_column=args.question_column,
            answers_column=args.answers_column,
        )
    if args.task == "retrieval":
        return RetrievalCollator(processor, max_length=args.max_length)
    return CaptioningCollator(
        processor,
        max_length=caption_length(args, processor, config),
        bos_token_id=config.decoder_config.bos_token_id,
    )


def build_trainer(args: FinetuneArguments) -> Trainer:
    """The `Trainer` of the run (`ContrastiveTrainer` for retrieval), with the data, the collator, the model (new
    modules initialised from `args.seed`) and the processor as `processing_class`."""
    config = XModalConfig.from_pretrained(args.model)
    processor = XModalProcessor.from_pretrained(args.model)
    train, eval_dataset, labels = load_finetune_data(args, config.vision_config.image_size)
    collator = build_collator(args, processor, config, labels)
    set_seed(args.seed)
    model = build_model(args, labels)
    trainer_class = ContrastiveTrainer if args.task == "retrieval" else Trainer
    return trainer_class(
        model=model,
        args=training_arguments(args),
        data_collator=collator,
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=processor,
        compute_metrics=compute_accuracy if args.task in ("image-classification", "vqa") else None,
    )


def _held_out_metrics(args: FinetuneArguments, trainer: Trainer, model: PreTrainedModel) -> dict[str, Any]:
    """Retrieval: Recall@K both ways and the ranks (`evaluate_model`, first caption of each row); captioning: BLEU-4,
    CIDEr-D and three (generated, reference) examples of greedy captions; keys prefixed with `eval_`."""
    processor, rows = trainer.processing_class, trainer.eval_dataset
    if args.task == "retrieval":
        metrics = evaluate_model(
            model,
            processor,
            rows,
            accelerator=trainer.accelerator,
            batch_size=args.eval_batch_size,
            max_length=args.max_length,
            show_progress=False,
        )
        return {f"eval_{key}": value for key, value in metrics.items()}
    max_new_tokens = args.max_new_tokens or caption_length(args, processor, model.config) - 1
    captions = generate_captions(
        model,
        processor,
        rows,
        batch_size=args.eval_batch_size,
        max_new_tokens=max_new_tokens,
        accelerator=trainer.accelerator,
    )
    references = list(rows.with_format(None)["text"])
    scores = captioning_metrics(captions, references)
    first = [reference if isinstance(reference, str) else reference[0] for reference in references[:3]]
    return {
        "eval_bleu4": scores["bleu4"],
        "eval_cider": scores["cider"],
        "eval_examples": [list(pair) for pair in zip(captions[:3], first)],
    }


def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Fine-tunes, evaluates on the held-out split and saves a Hub-ready folder in `args.output_dir` (with LoRA: the
    adapters merged into the weights, and the adapter alone in `output_dir/adapter`). Under several processes, each
    process returns the metrics and the first one writes the folder.

    Returns:
        The metrics also written to `output_dir/metrics.json` (with the arguments): `task`, `train_rows`,
        `eval_rows`, `train_steps`, `train_loss` (mean), `losses` (logged curve), `train_seconds`, `eval_loss`, and
        by task: `num_labels` and `eval_accuracy` (image classification, VQA: the VQA accuracy with soft targets);
        `eval_text_to_image_R@1`, ..., `eval_image_to_text_R@10`, the mean and median ranks (retrieval);
        `eval_bleu4`, `eval_cider`, `eval_examples` (captioning); `trainable_parameters` with LoRA.
    """
    trainer = build_trainer(args)
    train_output = trainer.train()
    eval_metrics = trainer.evaluate()
    model, processor = trainer.model, trainer.processing_class
    is_main = trainer.is_world_process_zero()
    metrics: dict[str, Any] = {
        "task": args.task,
        "train_rows": len(trainer.train_dataset),
        "eval_rows": len(trainer.eval_dataset),
        "train_steps": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "train_seconds": round(train_output.metrics["train_runtime"], 1),
        "eval_loss": eval_metrics["eval_loss"],
    }
    if args.lora_r:
        metrics["trainable_parameters"] = sum(param.numel() for param in model.parameters() if param.requires_grad)
        if is_main:
            model.save_pretrained(os.path.join(args.output_dir, ADAPTER_FOLDER))
        model = model.merge_and_unload()
    if args.task in CAPTION_TASKS:
        metrics.update(_held_out_metrics(args, trainer, model))
    else:
        metrics["num_labels"] = model.config.num_labels
        metrics["eval_accuracy"] = eval_metrics["eval_accuracy"]
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump({"arguments": asdict(args), **metrics}, handle, indent=2)
    trainer.accelerator.wait_for_everyone()
    return metrics


def summarize_metrics(task: str, metrics: Mapping[str, Any]) -> str:
    """What `xmodal finetune` prints: the held-out result of `task` (one of `TASKS`) and the mean training loss."""
    rows = metrics["eval_rows"]
    if task == "retrieval":
        directions = []
        for direction, name in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
            prefix = f"eval_{direction}_R@"
            recalls = [
                f"R@{key[len(prefix) :]} {100 * value:.1f}%"
                for key, value in metrics.items()
                if key.startswith(prefix)
            ]
            directions.append(f"{name} {', '.join(recalls)}")
        headline = f"Held-out retrieval ({rows} pairs): {'; '.join(directions)}"
    elif task == "captioning":
        headline = (
            f"Held-out captioning ({rows} images, greedy): BLEU-4 {metrics['eval_bleu4']:.3f}, "
            f"CIDEr-D {metrics['eval_cider']:.3f}"
        )
    else:
        headline = f"Held-out accuracy ({task}, {rows} rows): {100 * metrics['eval_accuracy']:.1f}%"
    return f"{headline}\nMean training loss {metrics['train_loss']:.3f} over {metrics['train_steps']} steps"


__all__ = [
    "ContrastiveTrainer",
    "apply_lora",
    "build_collator",
    "build_model",
    "build_trainer",
    "caption_length",
    "captioning_metrics",
    "compute_accuracy",
    "finetune",
    "generate_captions",
    "lora_target_modules",
    "summarize_metrics",
    "training_arguments",
]
