"""The `xmodal` console script.

    xmodal pretrain [--preset tiny] [--max_steps 300] [--output_dir outputs/xmodal-tiny] ...
    xmodal pretrain config.yaml            # the same options from a YAML or JSON file
    xmodal evaluate --model outputs/xmodal-tiny [--linear_probe] [--linear_probe_label_column COLUMN]
    xmodal finetune --task image-classification --model outputs/xmodal-tiny [--output_dir ...]
    xmodal finetune --task vqa --model outputs/xmodal-tiny [--max_steps 500] ...
    xmodal zero-shot IMAGE [IMAGE ...] --labels cat,dog,car --model outputs/xmodal-tiny [--top_k 5]
    xmodal retrieve --model outputs/xmodal-tiny --images FOLDER --query "a red circle" [--top_k 10]
    xmodal retrieve --model outputs/xmodal-tiny --image photo.png --texts "a red circle,a blue square"
    xmodal push --folder outputs/xmodal-tiny --repo_id user/xmodal-tiny [--private]

`xmodal <command> --help` lists every option with its help text; every command also reads its options from a
single YAML or JSON file.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from transformers import HfArgumentParser

from xmodal.training.data.pipeline import DataArguments
from xmodal.training.data.webdataset import is_webdataset_source

if TYPE_CHECKING:
    from xmodal import XModalModel, XModalProcessor


@dataclass
class EvaluateArguments(DataArguments):
    """Options of `xmodal evaluate`: every metric the model supports (retrieval; zero-shot when a label column is
    known; VQA and captioning when the model was pretrained with them) on the evaluation split of --dataset."""

    model: str | None = field(default=None, metadata={"help": "Folder of a saved xmodal model and processor."})
    batch_size: int = field(default=250, metadata={"help": "Batch size for embedding."})
    max_length: int | None = field(
        default=None, metadata={"help": "Longest caption in tokens (default: the tokenizer's model_max_length)."}
    )
    output_file: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    linear_probe: bool = field(
        default=False,
        metadata={
            "help": "Also fit a logistic-regression probe on the frozen image features of training-split rows (L2 "
            "picked on a held-out fifth of them) and report its accuracy on the evaluation split "
            "(linear_probe_accuracy, linear_probe_l2, linear_probe_val_accuracy)."
        },
    )
    linear_probe_label_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of class labels for the linear probe (default: --zero_shot_label_column, else 'label' "
            "on the synthetic data)."
        },
    )
    linear_probe_max_train_rows: int = field(
        default=5000, metadata={"help": "Training-split rows the linear probe is fitted on (the first ones)."}
    )
    linear_probe_pooled: bool = field(
        default=False,
        metadata={
            "help": "Probe the image tower's pooled output before the projection (CLIP's protocol) instead of the "
            "projected, L2-normalised embedding."
        },
    )
    linear_probe_method: str = field(
        default="lbfgs", metadata={"help": "Optimiser of the probe: lbfgs (full batch) or adamw."}
    )
    linear_probe_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache the extracted features here (safetensors), so a second run only fits the probe."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model or not os.path.isdir(self.model):
            raise ValueError(f"--model must be the folder of a saved xmodal model, got {self.model!r}.")
        if self.linear_probe:
            from xmodal.training.transfer.linear_probe import PROBE_METHODS

            _check_positive("linear_probe_max_train_rows", self.linear_probe_max_train_rows)
            if self.linear_probe_method not in PROBE_METHODS:
                raise ValueError(
                    f"--linear_probe_method must be one of {', '.join(PROBE_METHODS)}, got {self.linear_probe_method!r}."
                )
            if self.probe_label_column() is None:
                raise ValueError(
                    f"--linear_probe needs class labels: name their column of {self.dataset} with "
                    "--linear_probe_label_column COLUMN."
                )
            if is_webdataset_source(self.dataset):
                raise ValueError(
                    f"--linear_probe reads training rows by index, which streamed WebDataset shards ({self.dataset}) "
                    "do not offer; probe on a map-style source (an imagefolder, a caption table, a datasets name)."
                )

    def probe_label_column(self) -> str | None:
        """The linear probe's label column: --linear_probe_label_column, else --zero_shot_label_column, else `label`
        on the synthetic data (None when none is known)."""
        synthetic_default = "label" if self.dataset == "synthetic" else None
        return self.linear_probe_label_column or self.zero_shot_label_column or synthetic_default


def _split_list(value: str, separator: str) -> list[str]:
    """The non-blank, stripped items of a `separator`-separated option value."""
    return [item.strip() for item in value.split(separator) if item.strip()]


def _read_lines(path: str, option: str) -> list[str]:
    """The non-blank, stripped lines of a text file given to `option`."""
    if not os.path.isfile(path):
        raise ValueError(f"{option} {path!r} is not a file.")
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name} must be at least 1, got {value}.")


@dataclass
class ZeroShotArguments:
    """Options of `xmodal zero-shot`: classify images among labels given at run time (CLIP-style zero-shot, each
    label embedded with an ensemble of prompt templates) and print each image's top labels with their
    probabilities. The images come first, as positional arguments (`xmodal zero-shot a.png b.jpg --labels
    cat,dog --model DIR`), or with --images."""

    model: str = field(metadata={"help": "Folder (or Hub id) of a saved xmodal model and processor."})
    images: list[str] = field(
        default_factory=list,
        metadata={"help": "Image files to classify (or give them as positional arguments before the options)."},
    )
    labels: str | None = field(default=None, metadata={"help": "Comma-separated candidate labels, e.g. cat,dog,car."})
    labels_file: str | None = field(
        default=None, metadata={"help": "A text file with one label per line (instead of --labels)."}
    )
    templates: str | None = field(
        default=None,
        metadata={
            "help": "'|'-separated prompt templates, each with {} for the label, e.g. 'a photo of {}.|a drawing of {}.' "
            "(one template is fine; default: a generic ensemble of 7)."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Learned prompts (CoOp): a prompts .safetensors file, or a folder holding xmodal_prompts.safetensors; "
            "--labels then defaults to their classes. Not with --templates."
        },
    )
    top_k: int = field(default=5, metadata={"help": "Labels to print per image."})
    batch_size: int = field(default=32, metadata={"help": "Images (and prompts) per forward pass."})

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("No image given: pass image files before the options or with --images.")
        missing = [image for image in self.images if not os.path.isfile(image)]
        if missing:
            raise ValueError(f"Image files not found: {', '.join(missing)}.")
        if self.prompts is not None and self.templates is not None:
            raise ValueError("Give either --prompts (learned prompts) or --templates, not both.")
        if self.prompts is None or self.labels is not None or self.labels_file is not None:
            self.label_list()
        self.template_list()
        _check_positive("top_k", self.top_k)
        _check_positive("batch_size", self.batch_size)

    def label_list(self) -> list[str]:
        """The candidate labels, from --labels or --labels_file."""
        if (self.labels is None) == (self.labels_file is None):
            raise ValueError("Give the candidate labels with exactly one of --labels a,b,c or --labels_file FILE.")
        labels = (
            _split_list(self.labels, ",")
            if self.labels is not None
            else _read_lines(self.labels_file, "--labels_file")
        )
        if not labels:
            raise ValueError("No labels given: --labels (or --labels_file) holds no label.")
        return labels

    def template_list(self) -> tuple[str, ...]:
        """The prompt templates: --templates, checked, or the default ensemble."""
        from xmodal.training.inference.zero_shot import DEFAULT_TEMPLATES, check_templates

        return DEFAULT_TEMPLATES if self.templates is None else check_templates(self.templates.split("|"))


@dataclass
class RetrieveArguments:
    """Options of `xmodal retrieve`: text -> image search over a folder of images (--images FOLDER --query TEXT), or
    image -> text ranking of candidate texts (--image FILE --texts a,b,c or --texts_file FILE). Folder embeddings are
    cached (safetensors, keyed by file path, size, modification time and model), so a second search only embeds new or
    changed images."""

    model: str = field(metadata={"help": "Folder (or Hub id) of a saved xmodal model and processor."})
    images: str | None = field(default=None, metadata={"help": "Folder of images to search (recursively)."})
    query: str | None = field(default=None, metadata={"help": "Text to search the --images folder for."})
    image: str | None = field(default=None, metadata={"help": "Image file whose best-matching texts to rank."})
    texts: str | None = field(default=None, metadata={"help": "Comma-separated candidate texts for --image."})
    texts_file: str | None = field(
        default=None, metadata={"help": "A text file with one candidate text per line (instead of --texts)."}
    )
    top_k: int = field(default=10, metadata={"help": "Results to print."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to cache the folder's embeddings (default: a hidden file inside the folder)."},
    )
    no_cache: bool = field(default=False, metadata={"help": "Embed every image again and write no cache."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    search_backend: str = field(
        default="auto",
        metadata={
            "help": "Exact top-k search: auto (faiss when faiss-cpu is installed, else torch), faiss or torch "
            "(chunked, bounded memory)."
        },
    )

    def __post_init__(self) -> None:
        if (self.query is None) == (self.image is None):
            raise ValueError(
                "Give exactly one of --query TEXT (with --images FOLDER) or --image FILE (with --texts or --texts_file)."
            )
        if self.query is not None:
            if not self.query.strip():
                raise ValueError("--query is empty.")
            if self.images is None:
                raise ValueError("--query searches a folder of images: give it with --images FOLDER.")
            if not os.path.isdir(self.images):
                raise ValueError(f"--images {self.images!r} is not a folder.")
        else:
            if not os.path.isfile(self.image):
                raise ValueError(f"--image {self.image!r} is not a file.")
            self.text_list()
        _check_positive("top_k", self.top_k)
        _check_positive("batch_size", self.batch_size)
        from xmodal.training.inference.search import SEARCH_BACKENDS, faiss_available

        if self.search_backend not in SEARCH_BACKENDS:
            raise ValueError(
                f"--search_backend must be one of {', '.join(SEARCH_BACKENDS)}, got {self.search_backend!r}."
            )
        if self.search_backend == "faiss" and not faiss_available():
            raise ValueError('--search_backend faiss needs faiss-cpu: pip install "xmodal[faiss]".')

    def text_list(self) -> list[str]:
        """The candidate texts, from --texts or --texts_file."""
        if (self.texts is None) == (self.texts_file is None):
            raise ValueError("--image ranks candidate texts: give exactly one of --texts a,b,c or --texts_file FILE.")
        texts = (
            _split_list(self.texts, ",") if self.texts is not None else _read_lines(self.texts_file, "--texts_file")
        )
        if not texts:
            raise ValueError("No candidate texts given: --texts (or --texts_file) holds no text.")
        return texts


@dataclass
class PushArguments:
    """Options of `xmodal push`: upload a saved folder (from pretrain or finetune) to the Hugging Face Hub. The token
    comes from the HF_TOKEN environment variable or `hf auth login`."""

    folder: str = field(metadata={"help": "The saved folder to upload (weights, processor, remote code, card)."})
    repo_id: str = field(metadata={"help": "Hub repository, e.g. your-name/xmodal-tiny (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (default: main)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message (default: push_to_hub's)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing directly."})

    def __post_init__(self) -> None:
        if not os.path.isdir(self.folder):
            raise ValueError(f"--folder {self.folder!r} is not a folder.")


def _parse(dataclass_type: type, argv: list[str], prog: str, usage: str | None = None) -> object:
    """The options dataclass from command-line flags, or from a single YAML/JSON file. Invalid values (the dataclass's
    ValueError) and unused flags exit with the parser's usage and exit code 2."""
    parser = HfArgumentParser(dataclass_type, prog=prog, usage=usage, description=dataclass_type.__doc__)
    try:
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(argv[0])[0]
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(argv[0])[0]
        return parser.parse_args_into_dataclasses(args=argv)[0]
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A plain-text table: a header and rows of cells, each column padded to its widest cell, `align[i]` being `<`
    (left) or `>` (right) for column i."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(f"{cell:{side}{width}}" for cell, side, width in zip(line, align, widths)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines)


def _load_model(path: str) -> tuple[XModalModel, XModalProcessor]:
    """The `XModalModel` (on the GPU when there is one) and `XModalProcessor` saved in `path`."""
    import torch

    from xmodal import XModalModel, XModalProcessor

    model = XModalModel.from_pretrained(path).to("cuda" if torch.cuda.is_available() else "cpu")
    return model, XModalProcessor.from_pretrained(path)


def _pretrain(argv: list[str]) -> int:
    from xmodal.training.pretraining.arguments import PretrainArguments
    from xmodal.training.pretraining.loop import pretrain
    from xmodal.training.publishing.run_report import format_retrieval_table

    args = _parse(PretrainArguments, argv, "xmodal pretrain")
    metrics = pretrain(args)
    if "test_text_to_image_R@1" in metrics:
        print(
            f"\nEvaluation on the held-out test split ({int(round(1 / metrics['test_chance_R@1']))} pairs, recall in %):"
        )
        print(format_retrieval_table(metrics))
    print(f"\nloss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f} in {metrics['train_seconds']} s")
    if metrics.get("bad_rows") or metrics.get("nonfinite_steps"):
        print(f"skipped: {metrics['bad_rows']} undecodable rows, {metrics['nonfinite_steps']} non-finite steps")
    print(f"Hub-ready model saved to {args.output_dir}")
    return 0


def _evaluate(argv: list[str]) -> int:
    from xmodal import XModalForPreTraining, XModalProcessor
    from xmodal.training.data import ANSWER_VOCAB
    from xmodal.training.data.pipeline import load_pretraining_data
    from xmodal.training.evaluation.evaluator import evaluate_model, evaluation_task

    args = _parse(EvaluateArguments, argv, "xmodal evaluate")
    model = XModalForPreTraining.from_pretrained(args.model)
    processor = XModalProcessor.from_pretrained(args.model)
    config = model.config
    max_length = args.max_length or processor.tokenizer.model_max_length
    # the procedural test scenes do not depend on the training split's size: generate only the training scenes the
    # linear probe uses (one without it)
    num_train = args.linear_probe_max_train_rows if args.linear_probe else 1
    data_args = replace(args, num_train_examples=num_train) if args.dataset == "synthetic" else args
    if args.linear_probe:
        data_args = replace(data_args, streaming=False)  # the probe reads training rows by index
    data = load_pretraining_data(data_args, config.vision_config.image_size)
    task = evaluation_task(
        args,
        data.evaluation,
        answer_vocab=ANSWER_VOCAB if config.vqa_loss_weight > 0 and args.dataset == "synthetic" else None,
        captioning=config.captioning_loss_weight > 0,
        max_new_tokens=max_length - 1,
    )
    metrics = evaluate_model(
        model, processor, data.evaluation, task, batch_size=args.batch_size, max_length=max_length
    )
    if args.linear_probe:
        from xmodal.training.data.pipeline import _decodable
        from xmodal.training.transfer.linear_probe import linear_probe_evaluation

        train = _decodable(data.train.with_format(None), args.linear_probe_max_train_rows)
        metrics.update(
            linear_probe_evaluation(
                model,
                processor,
                train,
                data.evaluation,
                args.probe_label_column(),
                pooled=args.linear_probe_pooled,
                batch_size=args.batch_size,
                cache_dir=args.linear_probe_cache_dir,
                method=args.linear_probe_method,
                seed=args.seed,
            )
        )
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


def _finetune(argv: list[str]) -> int:
    from xmodal.training.transfer.finetune import finetune, summarize_metrics
    from xmodal.training.transfer.finetune_arguments import FinetuneArguments

    args = _parse(FinetuneArguments, argv, "xmodal finetune")
    metrics = finetune(args)
    print("\n" + summarize_metrics(args.task, metrics))
    print(f"Hub-ready model saved to {args.output_dir}")
    return 0


def _push(argv: list[str]) -> int:
    args = _parse(PushArguments, argv, "xmodal push")
    from xmodal.training.publishing.push import push_to_hub

    options = {"private": args.private, "revision": args.revision, "create_pr": args.create_pr}
    if args.commit_message is not None:
        options["commit_message"] = args.commit_message
    try:
        commit = push_to_hub(args.folder, args.repo_id, **options)  # a huggingface_hub CommitInfo: the commit URL
    except ValueError as err:  # no token, an incomplete folder, conflicting options
        print(f"xmodal push: {err}", file=sys.stderr)
        return 2
    print(f"Pushed {args.folder} to {args.repo_id}: {commit}")
    pr_url = getattr(commit, "pr_url", None)
    if pr_url:
        print(f"Pull request: {pr_url}")
    return 0


def _leading_positionals(argv: list[str]) -> list[str]:
    """The arguments before the first option (`-...`)."""
    positional = []
    for argument in argv:
        if argument.startswith("-"):
            break
        positional.append(argument)
    return positional


def _zero_shot(argv: list[str]) -> int:
    usage = "xmodal zero-shot IMAGE [IMAGE ...] (--labels a,b,c | --labels_file FILE) --model DIR [options]"
    is_config_file = len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json"))
    positional = [] if is_config_file else _leading_positionals(argv)
    if positional and "--images" in argv:
        HfArgumentParser(ZeroShotArguments, prog="xmodal zero-shot", usage=usage).error(
            "give the images either as positional arguments or with --images, not both."
        )
    if positional:
        argv = ["--images", *positional, *argv[len(positional) :]]
    args = _parse(ZeroShotArguments, argv, "xmodal zero-shot", usage=usage)

    from xmodal.training.inference.zero_shot import ZeroShotClassifier

    model, processor = _load_model(args.model)
    if args.prompts is not None:
        from xmodal.training.transfer.prompt_learning import load_prompts

        learner = load_prompts(args.prompts, model)
        given = args.labels is not None or args.labels_file is not None
        labels = args.label_list() if given else learner.class_names
        classifier = ZeroShotClassifier(model, processor, labels, prompts=learner, batch_size=args.batch_size)
    else:
        classifier = ZeroShotClassifier(
            model, processor, args.label_list(), args.template_list(), batch_size=args.batch_size
        )
    for index, (image, ranked) in enumerate(zip(args.images, classifier.classify(args.images, top_k=args.top_k))):
        rows = [(str(rank), label, f"{probability:.4f}") for rank, (label, probability) in enumerate(ranked, 1)]
        print(("\n" if index else "") + image)
        print(format_table(("rank", "label", "probability"), rows, "><>"))
    return 0


def _retrieve(argv: list[str]) -> int:
    args = _parse(RetrieveArguments, argv, "xmodal retrieve")

    from xmodal.training.inference.index import index_image_folder, rank_images, rank_texts

    model, processor = _load_model(args.model)
    if args.query is not None:
        index = index_image_folder(
            model,
            processor,
            args.images,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            batch_size=args.batch_size,
        )
        print(
            f"{len(index.paths)} images ({index.num_embedded} embedded, {len(index.paths) - index.num_embedded} cached)"
        )
        ranked = rank_images(model, processor, args.query, index, top_k=args.top_k, backend=args.search_backend)
        header = ("rank", "image", "score")
    else:
        ranked = rank_texts(
            model, processor, args.image, args.text_list(), top_k=args.top_k, backend=args.search_backend
        )
        header = ("rank", "text", "score")
    rows = [(str(rank), item, f"{score:.4f}") for rank, (item, score) in enumerate(ranked, 1)]
    print(format_table(header, rows, "><>"))
    return 0


HANDLERS = {
    "pretrain": _pretrain,
    "evaluate": _evaluate,
    "finetune": _finetune,
    "push": _push,
    "zero-shot": _zero_shot,
    "retrieve": _retrieve,
}
COMMANDS = tuple(HANDLERS)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xmodal` console script: `xmodal <command> [options]` (see the module docstring).

    Returns the exit code: 0, or 2 for an unknown command (argument errors exit with code 2 through argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in HANDLERS:
        print(f"xmodal: unknown command {argv[0]!r}; available: {', '.join(COMMANDS)}.", file=sys.stderr)
        print(__doc__)
        return 2
    return HANDLERS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "COMMANDS",
    "EvaluateArguments",
    "PushArguments",
    "RetrieveArguments",
    "ZeroShotArguments",
    "format_table",
    "main",
]
