"""Cost of a full multi-task pretraining step relative to a contrastive-only step (issue target: <= 2.5x).

A step is forward + backward + AdamW update of `XModalForPreTraining` on one real batch of the embedded procedural
data, built exactly as `xmodal pretrain` builds it (the demo's 2,048-token WordPiece tokenizer, the collator with a
question per image). Variants, timed alternately in one process (median of --repeats runs after warm-up; a ratio
is the median over the rounds of the step's time over the contrastive step's in the same round):

- contrastive: only the contrastive objective (the same compute as `XModalModel(..., return_loss=True)`);
- multitask: contrastive + ITM (B fused pairs, half of them hard negatives: the default `itm_sampling="half"`) +
  MLM (a masked text pass) + MIM (the visible quarter of the patches through the image tower, a light decoder) +
  captioning (the decoder) + VQA (a question pass);
- multitask-itm-all: the same with ALBEF's 3B ITM pairs (`itm_sampling="all"`);
- multitask+queue+views: also the momentum encoders with a 4,096-entry queue and a second augmented view of each
  pair (two optional features, off in the plain multi-task step);
- with `--each`, also contrastive+X for each other objective X: what each objective adds to the step.

    python bench/multitask_cost.py [--presets tiny small] [--batch_size 32] [--repeats 5] [--each] [--device cuda]
        [--precision bf16]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRECISIONS, machine, median, on_device, paired_ratio, time_alternating, write_result  # noqa: E402

from xmodal import XModalForPreTraining  # noqa: E402
from xmodal.processing import train_tokenizer  # noqa: E402
from xmodal.training import ImageTextCollator, PretrainArguments, build_config, build_processor  # noqa: E402
from xmodal.training.data import ANSWER_VOCAB, caption_corpus, make_synthetic_dataset  # noqa: E402
from xmodal.training.data.augmentations import ImageAugmentation, TextAugmentation  # noqa: E402
from xmodal.training.pretraining.arguments import OBJECTIVES


def real_batch(preset: str, batch_size: int) -> tuple[dict[str, torch.Tensor], object]:
    """A training batch of the embedded data for `preset`, with the demo's tokenizer; and that tokenizer."""
    args = PretrainArguments(preset=preset, batch_size=batch_size, num_train_examples=max(batch_size, 512))
    probe = build_config(args, train_tokenizer(["a red circle"], vocab_size=64, model_max_length=32), OBJECTIVES)
    data = make_synthetic_dataset(
        num_train=args.num_train_examples,
        num_validation=0,
        num_test=0,
        seed=0,
        image_size=probe.vision_config.image_size,
    )["train"]
    tokenizer = train_tokenizer(caption_corpus(data), vocab_size=args.vocab_size, model_max_length=args.max_length)
    config = build_config(args, tokenizer, OBJECTIVES)
    processor = build_processor(tokenizer, config)
    collator = ImageTextCollator(
        processor,
        args.max_length,
        answer_vocab=ANSWER_VOCAB,
        image_augmentation=ImageAugmentation(crop_scale=(0.8, 1.0), patch_size=config.vision_config.patch_size),
        text_augmentation=TextAugmentation(),
    )
    torch.manual_seed(0)
    return collator([data[i] for i in range(batch_size)]), tokenizer


def build(
    preset: str, tokenizer: object, objectives: tuple[str, ...], **config_fields: object
) -> XModalForPreTraining:
    config = build_config(PretrainArguments(preset=preset, objectives=",".join(objectives)), tokenizer, objectives)
    for name, value in config_fields.items():
        setattr(config, name, value)
    return XModalForPreTraining(config).train()


def step_function(
    model: XModalForPreTraining, inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None
) -> Callable[[], None]:
    """One training step of `model` on `inputs` (moved to `device`), under autocast to `dtype` when given."""
    model.to(device)
    inputs = {key: value.to(device) for key, value in inputs.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        torch.manual_seed(0)
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return on_device(step, device, dtype)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU script (bench/gpu.sh).")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="fp32, or bf16/fp16 autocast.")
    parser.add_argument("--each", action="store_true", help="Also time contrastive + each other objective alone.")
    parser.add_argument("--smoke", action="store_true", help="tiny at batch 4, one run, nothing written (for tests).")
    parser.add_argument("--no_write", action="store_true", help="Do not write bench/results.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.batch_size, args.repeats, args.warmup = ["tiny"], 4, 1, 0
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    results = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "presets": {},
    }
    for preset in args.presets:
        batch, tokenizer = real_batch(preset, args.batch_size)
        plain = {key: value for key, value in batch.items() if not key.startswith("second_view_")}
        no_vqa = {
            key: value
            for key, value in plain.items()
            if key not in ("question_input_ids", "question_attention_mask", "vqa_labels")
        }
        torch.manual_seed(0)
        variants = {
            "contrastive": (build(preset, tokenizer, ("contrastive",)), no_vqa),
            "multitask": (build(preset, tokenizer, OBJECTIVES), plain),
            "multitask-itm-all": (build(preset, tokenizer, OBJECTIVES, itm_sampling="all"), plain),
            "multitask+queue+views": (build(preset, tokenizer, OBJECTIVES, queue_size=4096), batch),
        }
        if args.each:
            for objective in OBJECTIVES[1:]:
                model = build(preset, tokenizer, ("contrastive", objective))
                variants[f"contrastive+{objective}"] = (model, plain if objective == "vqa" else no_vqa)
        steps = {name: step_function(model, inputs, device, dtype) for name, (model, inputs) in variants.items()}
        times = time_alternating(steps, repeats=args.repeats, warmup=args.warmup)
        # the step's time over the contrastive step's, round by round (`paired_ratio` of the two time series)
        ratios = {name: paired_ratio(values, times["contrastive"]) for name, values in times.items()}
        row = {
            name: {
                "median_s": round(median(values), 4),
                "runs_s": [round(value, 4) for value in values],
                "ratio": round(ratios[name]["median"], 2),
                "ratio_range": [round(ratios[name]["low"], 2), round(ratios[name]["high"], 2)],
            }
            for name, values in times.items()
        }
        row["shapes"] = {key: list(value.shape) for key, value in batch.items()}
        row["vocab_size"] = len(tokenizer)
        results["presets"][preset] = row
        print(
            f"{preset}: "
            + ", ".join(
                f"{name} {row[name]['median_s']:.3f} s ({row[name]['ratio']:.2f}x, rounds "
                f"{row[name]['ratio_range'][0]:.2f}-{row[name]['ratio_range'][1]:.2f})"
                for name in steps
            )
        )
    if not (args.smoke or args.no_write):
        name = "multitask_cost" if device.type == "cpu" else f"multitask_cost_{device.type}_{args.precision}"
        print(f"wrote {write_result(name, results)}")
    return results


if __name__ == "__main__":
    main()
