"""The tokenizer committed for `make demo` (WordPiece training is not deterministic, so the demo loads this one)."""

from __future__ import annotations

import re
from pathlib import Path

from xmodal.processing import load_tokenizer
from xmodal.training import PretrainArguments
from xmodal.training.data import caption_corpus, make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "training" / "assets" / "demo-tokenizer"


def test_make_demo_loads_the_committed_tokenizer() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    demo = re.search(r"^demo:.*?(?=^\S)", makefile, flags=re.S | re.M)
    recipe = re.search(r"^DEMO_RECIPE =.*?(?=^\S)", makefile, flags=re.S | re.M)
    assert demo is not None and "$(DEMO_RECIPE)" in demo.group(0)
    assert recipe is not None and "--tokenizer training/assets/demo-tokenizer" in recipe.group(0)


def test_the_demo_tokenizer_covers_the_embedded_data() -> None:
    """Every caption, question and answer of the embedded data (all splits) tokenizes without [UNK], within the
    default vocabulary size and max length."""
    args = PretrainArguments()
    tokenizer = load_tokenizer(str(DEMO_TOKENIZER))
    assert len(tokenizer) <= args.vocab_size and tokenizer.model_max_length == args.max_length
    data = make_synthetic_dataset(num_train=200, num_validation=50, num_test=50, seed=1, image_size=16)
    texts = list(caption_corpus(data))
    assert len(texts) > 500
    ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    unknown = [text for text, row in zip(texts, ids, strict=True) if tokenizer.unk_token_id in row]
    assert not unknown, unknown[:5]
