"""Cost of a full multi-task pretraining step relative to a contrastive-only step (issue target: <= 2.5x).

A step is forward + backward + AdamW update of `XModalForPreTraining` on random inputs of the preset's sizes.
Variants, timed alternately in one process (median of --repeats runs after warm-up):

- contrastive: only the contrastive objective (the same compute as `XModalModel(..., return_loss=True)`);
- multitask: contrastive + ITM (3B fused pairs) + MLM (a masked text pass) + MIM (a masked image pass) +
  captioning (the decoder) + VQA (a question pass);
- multitask+queue+views: also the momentum encoders with a 4096-entry queue and a second augmented view of each
  pair (both optional features, off in the plain multi-task step).

    python bench/multitask_cost.py [--presets tiny small] [--batch_size 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, time_alternating, write_result  # noqa: E402

from xmodal import XModalConfig, XModalForPreTraining  # noqa: E402

OBJECTIVES = ("contrastive", "itm", "mlm", "mim", "captioning", "vqa")
NUM_ANSWERS = 31


def build(preset: str, objectives: tuple[str, ...], queue_size: int = 0) -> XModalForPreTraining:
    weights = {f"{name}_loss_weight": float(name in objectives) for name in OBJECTIVES}
    config = XModalConfig.from_preset(preset, num_labels=NUM_ANSWERS, queue_size=queue_size, **weights)
    return XModalForPreTraining(config).train()


def make_inputs(config: XModalConfig, batch_size: int, views: bool, seq_length: int = 24) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size, vocab = config.vision_config.image_size, config.text_config.vocab_size
    input_ids = torch.randint(5, vocab, (batch_size, seq_length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "question_input_ids": torch.randint(5, vocab, (batch_size, 12), generator=generator),
        "vqa_labels": torch.randint(NUM_ANSWERS, (batch_size,), generator=generator),
    }
    if views:
        inputs["second_view_pixel_values"] = torch.randn(batch_size, 3, size, size, generator=generator)
        inputs["second_view_input_ids"] = input_ids.flip(1)
    return inputs


def step_function(model: XModalForPreTraining, inputs: dict[str, torch.Tensor]):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": machine(), "batch_size": args.batch_size, "repeats": args.repeats, "presets": {}}
    for preset in args.presets:
        models = {
            "contrastive": build(preset, ("contrastive",)),
            "multitask": build(preset, OBJECTIVES),
            "multitask+queue+views": build(preset, OBJECTIVES, queue_size=4096),
        }
        config = models["contrastive"].config
        steps = {
            name: step_function(model, make_inputs(config, args.batch_size, views=name.endswith("views")))
            for name, model in models.items()
        }
        times = time_alternating(steps, repeats=args.repeats)
        base = median(times["contrastive"])
        row = {
            name: {
                "median_s": round(median(values), 4),
                "runs_s": [round(v, 4) for v in values],
                "ratio": round(median(values) / base, 2),
            }
            for name, values in times.items()
        }
        results["presets"][preset] = row
        print(
            f"{preset}: " + ", ".join(f"{name} {r['median_s']:.3f} s ({r['ratio']:.2f}x)" for name, r in row.items())
        )
    path = write_result("multitask_cost", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
