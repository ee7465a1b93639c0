"""The text the tokenizer receives (docs/formats.md §5.2-§5.4, §5.9), without torch: shared by the
training preprocessing and by `inspect-shards`, which shows it."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from flamingo_cli.model.tokenizer import ENDOFCHUNK, IMAGE, PAD

CONTROL_TOKENS = (ENDOFCHUNK, IMAGE, PAD)
GPT_PLACEHOLDER = re.compile(r"_!_IMAGE(\d+)_!_")


def strip_control_tokens(text: str, control: Sequence[str] = CONTROL_TOKENS) -> str:
    """Remove literal special-token strings from web text (docs/formats.md §5.9), until none is left."""
    while any(c in text for c in control):
        for c in control:
            text = text.replace(c, "")
    return text


def tidy_spaces(text: str) -> str:
    """OpenFlamingo's whitespace clean-up around the control tokens."""
    return (
        text.replace(" " + ENDOFCHUNK, ENDOFCHUNK)
        .replace(IMAGE + " ", IMAGE)
        .replace(" " + IMAGE, IMAGE)
    )


def caption_text(caption: str, eos: str) -> str:
    """A LAION pair's text: `<image>{caption}<|endofchunk|>{eos}` (caption already cleaned)."""
    return f"{IMAGE}{caption.strip()}{ENDOFCHUNK}{eos}"


def interleave_text(sentences: Sequence[str], image_sentences: Sequence[int], eos: str) -> str:
    """OpenFlamingo's MMC4 text: each assigned sentence prefixed once per image, then cleaned."""
    per_sentence = Counter(image_sentences)
    text = " ".join((ENDOFCHUNK + IMAGE) * per_sentence[i] + s for i, s in enumerate(sentences))
    text = tidy_spaces(text.replace(ENDOFCHUNK, "", 1))
    return f"{text}{ENDOFCHUNK}{eos}"


def gpt_text(example: str, keep: Sequence[bool], max_num_images: int, eos: str) -> str:
    """OpenFlamingo's ChatGPT-document text; placeholders with `keep[j]` false are removed."""
    slots = iter(keep)
    text = GPT_PLACEHOLDER.sub(lambda _: ENDOFCHUNK + IMAGE if next(slots) else "", example)
    text = tidy_spaces(text.replace(ENDOFCHUNK, "", 1))
    starts = [m.start() for m in re.finditer(re.escape(IMAGE), text)]
    if len(starts) > max_num_images:
        text = text[: starts[max_num_images - 1]]
    return f"{text}{ENDOFCHUNK}{eos}"
