"""The `xmodal` console script.

    xmodal pretrain [--preset tiny] [--max_steps 300] [--output_dir outputs/xmodal-tiny] ...
    xmodal pretrain config.yaml            # the same options from a YAML or JSON file
    xmodal evaluate --model outputs/xmodal-tiny

`xmodal <command> --help` lists every option with its help text.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

COMMANDS = ("pretrain", "evaluate")


@dataclass
class EvaluateArguments:
    """Options of `xmodal evaluate`."""

    model: str = field(metadata={"help": "Folder (or Hub id) of a saved xmodal model and processor."})
    num_eval_examples: int = field(default=1000, metadata={"help": "Procedural test scenes to retrieve among."})
    seed: int = field(default=0, metadata={"help": "Seed of the procedural data."})
    batch_size: int = field(default=250, metadata={"help": "Batch size for embedding."})
    max_length: int | None = field(
        default=None, metadata={"help": "Longest caption in tokens (default: the tokenizer's model_max_length)."}
    )


def _parse(dataclass_type: type, argv: list[str], prog: str) -> object:
    parser = HfArgumentParser(dataclass_type, prog=prog, description=dataclass_type.__doc__)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])[0]
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])[0]
    return parser.parse_args_into_dataclasses(args=argv)[0]


def _pretrain(argv: list[str]) -> int:
    from xmodal.training.pretrain import PretrainArguments, format_retrieval_table, pretrain

    args = _parse(PretrainArguments, argv, "xmodal pretrain")
    metrics = pretrain(args)
    if "test_text_to_image_R@1" in metrics:
        print(f"\nRetrieval on the held-out test split ({int(round(1 / metrics['test_chance_R@1']))} pairs, %):")
        print(format_retrieval_table(metrics))
    print(f"\nloss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f} in {metrics['train_seconds']} s")
    print(f"Hub-ready model saved to {args.output_dir}")
    return 0


def _evaluate(argv: list[str]) -> int:
    from xmodal import XModalModel, XModalProcessor
    from xmodal.training.data import make_synthetic_dataset
    from xmodal.training.evaluation import evaluate_retrieval

    args = _parse(EvaluateArguments, argv, "xmodal evaluate")
    model = XModalModel.from_pretrained(args.model)
    processor = XModalProcessor.from_pretrained(args.model)
    size = model.config.vision_config.image_size
    test = make_synthetic_dataset(
        num_train=0, num_validation=0, num_test=args.num_eval_examples, seed=args.seed, image_size=size
    )["test"]
    max_length = args.max_length or processor.tokenizer.model_max_length
    metrics = evaluate_retrieval(model, processor, test, batch_size=args.batch_size, max_length=max_length)
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xmodal` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"xmodal: unknown command {argv[0]!r}; available: {', '.join(COMMANDS)}.", file=sys.stderr)
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    handler = {"pretrain": _pretrain, "evaluate": _evaluate}[argv[0]]
    return handler(argv[1:])


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EvaluateArguments", "main"]
