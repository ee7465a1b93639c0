"""Prompts as OpenFlamingo's evaluation writes them, tokenized and batched for generation
(docs/formats.md §16).

A prompt is text with one `<image>` per image; the k-th `<image>` of a row uses that row's
k-th image. In-context examples come first, each a complete prompt ending in
`<|endofchunk|>`, then the query, which ends where the model should continue.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.tokenizer import ENDOFCHUNK, IMAGE

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from flamingo_cli.model.factory import ImageTransform

CAPTION_OUTPUT = "Output:"
VQA_QUESTION = "Question:"
VQA_ANSWER = " Short answer:"
# OpenFlamingo's eval tokenizes with max_length=2000 and truncation (cuts the end of a prompt)
MAX_PROMPT_TOKENS = 2000


def caption_prompt(caption: str | None = None) -> str:
    """`<image>Output:{caption}<|endofchunk|>`; without a caption, `<image>Output:` (the
    query, for the model to continue)."""
    if caption is None:
        return f"{IMAGE}{CAPTION_OUTPUT}"
    return f"{IMAGE}{CAPTION_OUTPUT}{caption}{ENDOFCHUNK}"


def vqa_prompt(question: str, answer: str | None = None) -> str:
    """`<image>Question:{question} Short answer:{answer}<|endofchunk|>`; without an answer it
    ends at `Short answer:`."""
    head = f"{IMAGE}{VQA_QUESTION}{question}{VQA_ANSWER}"
    return head if answer is None else f"{head}{answer}{ENDOFCHUNK}"


def with_demonstrations(demonstrations: Sequence[str], query: str) -> str:
    """The in-context examples, each followed by a newline, then the query: the text
    OpenFlamingo's eval gives the model (`"".join(demo + "\\n" ...) + query`)."""
    return "".join(f"{demo}\n" for demo in demonstrations) + query


def image_count(text: str) -> int:
    """How many images a prompt refers to (its `<image>` markers)."""
    return text.count(IMAGE)


def encode_prompts(
    tokenizer: Any, texts: Sequence[str], max_tokens: int = MAX_PROMPT_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, (B, T) int64, LEFT-padded to the longest prompt, as
    OpenFlamingo's eval tokenizes: the tokenizer's own special tokens added (the BOS of Llama-
    style tokenizers, exactly as training tokenizes its text), the end cut past `max_tokens`."""
    if not texts:
        raise ValueError("encode_prompts needs at least one prompt")
    encoded = tokenizer(
        list(texts),
        padding="longest",
        padding_side="left",
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


def image_batch(
    images: Sequence[Sequence[Image.Image]],
    transform: ImageTransform,
    image_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Row b's images transformed and stacked as `FlamingoModel` takes them: (B, N, C, H, W)
    for the most images N of any row, rows with fewer zero-padded at the end. With no image
    in any row the tensor is (B, 0, C, H, W) for `image_shape` (default (3, 1, 1))."""
    import torch

    rows = [[transform(image) for image in row] for row in images]
    count = max((len(row) for row in rows), default=0)
    if count == 0:
        return torch.zeros(len(rows), 0, *(image_shape or (3, 1, 1)))
    first = next(row[0] for row in rows if row)
    out = first.new_zeros(len(rows), count, *first.shape)
    for b, row in enumerate(rows):
        for k, tensor in enumerate(row):
            out[b, k] = tensor
    return out


def read_image(path: Path, max_pixels: int) -> Image.Image:
    """An RGB image read from `path` through the pixel cap (`data/image_limits.open_image`);
    a missing, unreadable, undecodable or too large file is a FlamingoError naming it."""
    from PIL import UnidentifiedImageError

    from flamingo_cli.data.image_limits import ImageTooLarge, open_image

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FlamingoError(
            f"image {path} does not exist", fix="check the path (relative to where you run)"
        ) from None
    except OSError as exc:
        raise FlamingoError(
            f"cannot read image {path}: {exc.strerror or exc}",
            fix="give a readable image file",
        ) from None
    try:
        image = open_image(data, max_pixels)
        image.load()
    except ImageTooLarge as exc:
        raise FlamingoError(
            f"image {path}: {exc}",
            fix="resize the image, or raise data.max_image_pixels in the recipe",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow names the in-memory buffer, not the file: say what is wrong in our words
        problem = (
            "not an image Pillow can identify" if isinstance(exc, UnidentifiedImageError) else exc
        )
        raise FlamingoError(
            f"cannot decode image {path}: " + ("the file is empty" if not data else str(problem)),
            fix="give a JPEG, PNG, WebP or another format Pillow reads",
        ) from None
    rgb: Image.Image = image if image.mode == "RGB" else image.convert("RGB")
    return rgb


def context_length(model: Any) -> int | None:
    """The positions the model's language model was built for (`max_position_embeddings` and
    its other names), None when its config does not say."""
    config = getattr(getattr(model, "lm", None), "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
