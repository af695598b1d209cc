"""Hard negative captions by word swaps (NegCLIP, Yuksekgonul et al. 2023, "When and why vision-language models behave
like bags-of-words"): a caption with one attribute word exchanged for another of its kind ("a red circle" -> "a red
star", "a blue circle"), an extra text that no image of the batch matches, so that the contrastive loss can only
tell it from the true caption by the swapped attribute (`xmodal pretrain --hard_negative_captions`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch


class WordSwapNegatives:
    """Makes a hard negative of a caption by exchanging one of its words for another word of the same group.

    The word swapped is drawn uniformly among the caption's occurrences of group words; its replacement uniformly
    among the words of its group that the caption does not contain, so the negative never names the same set of
    attributes as the caption (with distinct shapes per scene, the synthetic scenes' negatives describe no scene of the
    batch's pair). Matching is on whole words, case-insensitive; the first letter keeps its case. Draws use torch's
    global RNG, which `SeededCollate` seeds from the batch's rows, so a resumed run draws the same negatives.

    Args:
        groups: groups of interchangeable words (for example the shapes and the colours), each of 2 or more distinct
            words; a word may be in one group only.
    """

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self.groups = [tuple(word.lower() for word in group) for group in groups]
        if not self.groups:
            raise ValueError("WordSwapNegatives needs at least one group of words, got none.")
        self.group_of: dict[str, int] = {}
        for index, group in enumerate(self.groups):
            if len(set(group)) < 2 or not all(re.fullmatch(r"[\w-]+", word) for word in group):
                raise ValueError(
                    f"Each group of swappable words needs 2 or more distinct single words, got {list(group)!r}."
                )
            for word in group:
                if word in self.group_of:
                    raise ValueError(f"The word {word!r} is in two groups of swappable words; each may be in one.")
                self.group_of[word] = index
        alternatives = "|".join(sorted(map(re.escape, self.group_of), key=len, reverse=True))
        self.pattern = re.compile(rf"\b({alternatives})\b", re.IGNORECASE)

    @classmethod
    def parse(cls, spec: str) -> WordSwapNegatives:
        """From `"circle,square,star|red,green,blue"`: groups separated by `|`, words by `,` (the CLI's form)."""
        groups = [[word.strip() for word in group.split(",") if word.strip()] for group in spec.split("|")]
        return cls([group for group in groups if group])

    def negative(self, text: str) -> str | None:
        """`text` with one group word swapped, or None when it contains no word of any group that can be swapped."""
        matches = list(self.pattern.finditer(text))
        present = {match.group(1).lower() for match in matches}
        choices = []
        for match in matches:
            group = self.groups[self.group_of[match.group(1).lower()]]
            replacements = [word for word in group if word not in present]
            if replacements:
                choices.append((match, replacements))
        if not choices:
            return None
        match, replacements = choices[int(torch.randint(len(choices), ()))]
        word = replacements[int(torch.randint(len(replacements), ()))]
        if match.group(1)[0].isupper():
            word = word.capitalize()
        return text[: match.start()] + word + text[match.end() :]

    def __call__(self, texts: Sequence[str], count: int) -> list[str]:
        """Hard negatives of the first `count` texts that have one (fewer when some have none)."""
        negatives = []
        for text in texts:
            if len(negatives) == count:
                break
            negative = self.negative(text)
            if negative is not None:
                negatives.append(negative)
        return negatives


__all__ = ["WordSwapNegatives"]
