"""Train and load the WordPiece caption tokenizer (not part of the Hub bundle: a saved tokenizer is plain files)."""

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 1,
    model_max_length: int = 64,
    lowercase: bool = True,
) -> BertTokenizer:
    """
    Train a BERT-style WordPiece tokenizer on `texts` and wrap it as a transformers `BertTokenizer`.

    The pipeline is BERT's: `BertNormalizer` (lowercasing and accent stripping when `lowercase`), `BertPreTokenizer`,
    WordPiece with `##` continuation prefix, and `[CLS] $A [SEP]` (pairs: `[CLS] $A [SEP] $B [SEP]`) templates. The
    special tokens get the first ids: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4.

    The result saves with `save_pretrained` and reloads with `AutoTokenizer.from_pretrained` (or `load_tokenizer`).

    Args:
        texts: The training corpus (captions); read once.
        vocab_size: Maximum vocabulary size, special tokens included. A small corpus yields fewer tokens.
        min_frequency: Minimum count for a merge to enter the vocabulary.
        model_max_length: Maximum sequence length, used by `truncation=True` and `padding="max_length"`.
        lowercase: Lowercase (and strip accents from) the text before tokenizing.

    Returns:
        The trained `BertTokenizer` (backed by the `tokenizers` library).

    Raises:
        ValueError: if an argument is not positive, `vocab_size` cannot hold the special tokens, or `texts` holds no
            non-blank string.
    """
    if isinstance(texts, str):
        raise ValueError("`texts` must be an iterable of strings, not a single string.")
    for name, value in (("vocab_size", vocab_size), ("min_frequency", min_frequency)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"`vocab_size` must exceed the {len(SPECIAL_TOKENS)} special tokens; got {vocab_size}.")
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 3:
        raise ValueError(
            f"`model_max_length` must be an integer >= 3 ([CLS], a token, [SEP]); got {model_max_length!r}."
        )
    corpus = list(texts)
    bad = next((text for text in corpus if not isinstance(text, str)), None)
    if bad is not None:
        raise ValueError(f"`texts` must contain only strings; got a {type(bad).__name__}: {bad!r}.")
    if not any(text.strip() for text in corpus):
        raise ValueError("`texts` is empty (or only blank strings): a tokenizer needs training text.")

    tokenizer = Tokenizer(WordPiece(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id(CLS_TOKEN), tokenizer.token_to_id(SEP_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, cls_id), (SEP_TOKEN, sep_id)],
    )
    # `vocab=` (not `vocab_file=`, which transformers 5 silently ignores, leaving a 5-token vocabulary).
    return BertTokenizer(
        vocab=tokenizer.get_vocab(),
        tokenizer_object=tokenizer,
        do_lower_case=lowercase,
        model_max_length=model_max_length,
    )


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """
    Load a tokenizer saved with `save_pretrained` from a local folder, offline.

    Raises:
        ValueError: if the loaded vocabulary holds only special tokens (the transformers 5 `vocab_file=` trap, in
            which every word maps to `[UNK]`).
    """
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise ValueError(
            f"The tokenizer in {os.fspath(path)!r} has only {len(tokenizer)} tokens, all special: every word would "
            "map to the unknown token. Save it with `save_pretrained` from a tokenizer built with `vocab=`."
        )
    return tokenizer


__all__ = ["load_tokenizer", "train_tokenizer"]
