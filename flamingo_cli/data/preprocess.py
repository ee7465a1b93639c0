"""Per-sample preprocessing of LAION pairs, MMC4 documents and ChatGPT-generated documents.

OpenFlamingo's rules (docs/formats.md §5.2-§5.4) with our deliberate differences (§5.9). Each function is a
pure function of (sample, context, config, rng): it returns a `Sample` or raises `Dropped`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from PIL import Image

from flamingo_cli.data.assign import assign_images, large_enough
from flamingo_cli.data.fast_image import TensorTransform, tensor_transform
from flamingo_cli.data.image_limits import DEFAULT_MAX_IMAGE_PIXELS, open_image
from flamingo_cli.data.text import (
    GPT_PLACEHOLDER,
    caption_text,
    gpt_text,
    interleave_text,
    strip_control_tokens,
)
from flamingo_cli.model.tokenizer import ENDOFCHUNK, IMAGE, PAD, SpecialTokens
from flamingo_cli.recipe.schema import InterleavedConfig, PairsConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.model.factory import ImageTransform

K = TypeVar("K")  # the key of an image in its document (an index, a placeholder)

# Image members OpenFlamingo accepts for a pair, in the order it looks for them.
PAIR_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg")
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# Why a sample was dropped; `images_corrupt` counts single images dropped from kept documents
# (corrupt, or declaring more pixels than `data.max_image_pixels`). `tar_error` counts a shard
# that could not be opened or read to its end, once per pass; `bad_name` a sample key whose tar
# member names are not UTF-8 (its members are skipped).
DROP_REASONS = (
    "tar_error",
    "bad_name",
    "missing_member",
    "bad_caption",
    "bad_json",
    "no_images",
    "too_small",
    "below_threshold",
    "corrupt_image",
    "too_few_images",
    "single_image",
    "image_at_end",
)
CORRUPT_IMAGES = "images_corrupt"


class Dropped(Exception):
    """A sample that preprocessing rejects; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, corrupt_images: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.corrupt_images = corrupt_images


@dataclass(frozen=True)
class Sample:
    """One preprocessed sample: its images `(n, 3, H, W)` in `<image>` token order, and token ids
    (LAION: unpadded; MMC4: padded to max_tokens). Batching zero-pads the images.
    """

    key: str
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    corrupt_images: int = 0


@dataclass(frozen=True)
class Context:
    """What every sample of a dataset is preprocessed with (no per-sample state).

    `deterministic` (evaluation) turns off every random choice: no flips and no random drop of
    single-image documents; the generator is then never drawn from. An image declaring more
    than `max_image_pixels` pixels is not decoded: it counts as corrupt.
    """

    tokenizer: PreTrainedTokenizerBase
    tokens: SpecialTokens
    image_transform: ImageTransform
    image_shape: tuple[int, int, int]
    draft_size: int | None
    fast_transform: TensorTransform | None
    control_strings: tuple[str, ...]
    deterministic: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def create(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        tokens: SpecialTokens,
        image_transform: ImageTransform,
        *,
        fast_images: bool = True,
        deterministic: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> Context:
        """Probe the transform once for its output shape (zero padding, draft-mode target).
        `fast_images`: JPEG draft decoding, and torch's resize when the transform is CLIP's."""
        probe = image_transform(Image.new("RGB", (16, 16)))
        if probe.ndim != 3:
            raise ValueError(f"image transform must return (C, H, W), got {tuple(probe.shape)}")
        shape = (int(probe.shape[0]), int(probe.shape[1]), int(probe.shape[2]))
        specials = {IMAGE, ENDOFCHUNK, PAD, *tokenizer.all_special_tokens}
        return cls(
            tokenizer=tokenizer,
            tokens=tokens,
            image_transform=image_transform,
            image_shape=shape,
            draft_size=max(shape[1], shape[2]) if fast_images else None,
            fast_transform=tensor_transform(image_transform) if fast_images else None,
            control_strings=tuple(sorted((s for s in specials if s), key=len, reverse=True)),
            deterministic=deterministic,
            max_image_pixels=max_image_pixels,
        )

    @property
    def eos_token(self) -> str:
        eos = self.tokenizer.eos_token
        assert isinstance(eos, str)
        return eos


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator of one sample's random choices, seeded by (seed, epoch, sample key)."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def decode_image(
    raw: bytes, draft_size: int | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode image bytes to RGB; JPEGs at the smallest DCT scale no smaller than `draft_size`.

    Raises `ImageTooLarge` (a ValueError) before decoding an image over `max_pixels`."""
    with open_image(raw, max_pixels) as image:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        # convert() would copy an image that is RGB already
        return image if image.mode == "RGB" else image.convert("RGB")


def _try_decode(raw: bytes, ctx: Context, flip: bool) -> torch.Tensor | None:
    """The transformed image, mirrored left-right when `flip`; None when it cannot decode."""
    try:
        image = decode_image(raw, ctx.draft_size, ctx.max_image_pixels)
    except _IMAGE_ERRORS:
        return None
    if ctx.fast_transform is not None:
        return ctx.fast_transform(image, flip)
    tensor = ctx.image_transform(image)
    return tensor.flip(-1) if flip else tensor


def _tokenize(ctx: Context, text: str, max_tokens: int, pad: bool) -> tuple[list[int], list[int]]:
    encoded = ctx.tokenizer(
        text,
        max_length=max_tokens,
        truncation=True,
        padding="max_length" if pad else False,
        padding_side="right",
    )
    return list(encoded["input_ids"]), list(encoded["attention_mask"])


def _stack(images: Sequence[torch.Tensor], ctx: Context) -> torch.Tensor:
    """Stack `images` `(n, C, H, W)` (batching zero-pads them)."""
    if not images:
        return torch.zeros((0, *ctx.image_shape), dtype=torch.float32)
    return torch.stack(list(images))


def _tensors(ids: list[int], mask: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def preprocess_pair(
    sample: Mapping[str, Any], ctx: Context, config: PairsConfig, rng: random.Random
) -> Sample:
    """A LAION pair: `<image>{caption}<|endofchunk|>{eos}` (at most `max_tokens`), one image."""
    key = str(sample["__key__"])
    ext = next((e for e in PAIR_IMAGE_EXTENSIONS if e in sample), None)
    if "txt" not in sample or ext is None:
        raise Dropped("missing_member")
    try:
        caption = bytes(sample["txt"]).decode("utf-8")
    except UnicodeDecodeError:
        raise Dropped("bad_caption") from None
    flip = not ctx.deterministic and rng.random() < 0.5
    caption = strip_control_tokens(caption, ctx.control_strings).strip()
    ids, mask = _tokenize(ctx, caption_text(caption, ctx.eos_token), config.max_tokens, False)
    image = _try_decode(bytes(sample[ext]), ctx, flip)
    if image is None:
        raise Dropped("corrupt_image")
    input_ids, attention_mask = _tensors(ids, mask)
    return Sample(key, _stack([image], ctx), input_ids, attention_mask)


def preprocess_document(
    sample: Mapping[str, Any], ctx: Context, config: InterleavedConfig, rng: random.Random
) -> Sample:
    """An interleaved sample: its `.json` is an MMC4 document or a ChatGPT-generated one."""
    key = str(sample["__key__"])
    if "json" not in sample:
        raise Dropped("missing_member")
    try:
        info = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise Dropped("bad_json") from None
    if not isinstance(info, dict):
        raise Dropped("bad_json")
    try:
        if "is_gpt" in info:
            return _gpt_document(key, info, ctx, config, rng)
        return _mmc4_document(key, info, ctx, config, rng)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        # a field of the wrong type or shape: the document is malformed
        raise Dropped("bad_json") from exc


def _b64(data: Any) -> bytes | None:
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError, TypeError):
        return None


def b64_size(data: Any) -> int | None:
    """Length of the bytes a base64 string decodes to, without decoding a clean string.

    Lets the size filter run on every image while only the images used get decoded.
    """
    if not isinstance(data, str):
        raw = _b64(data)
        return None if raw is None else len(raw)
    n = len(data)
    if n % 4 or any(c in data for c in "\n\r\t "):
        raw = _b64(data)  # whitespace is skipped by the decoder: count what it gives
        return None if raw is None else len(raw)
    return n // 4 * 3 - (2 if data.endswith("==") else 1 if data.endswith("=") else 0)


def _mmc4_document(
    key: str, info: dict[str, Any], ctx: Context, config: InterleavedConfig, rng: random.Random
) -> Sample:
    # evaluation: never dropped at random (1.0 > 0.5), never flipped
    drop_draw = 1.0 if ctx.deterministic else rng.random()
    flip = not ctx.deterministic and rng.random() < 0.5
    sentences = [strip_control_tokens(str(s), ctx.control_strings) for s in info["text_list"]]
    similarity = info["similarity_matrix"]
    if not isinstance(similarity, list) or any(
        not isinstance(row, list) or len(row) != len(sentences) for row in similarity
    ):
        raise Dropped("bad_json")
    # OpenFlamingo zips image_info with the similarity rows: images without a row are ignored
    entries = list(info["image_info"])[: len(similarity)]
    data = [e.get("image_base64") for e in entries]
    if all(d is None for d in data):
        raise Dropped("no_images")
    sized = [d is not None and large_enough(b64_size(d) or 0) for d in data]
    if not any(sized):
        raise Dropped("too_small")
    choice = _Mmc4Choice(sentences, similarity, sized, ctx, config, drop_draw)
    corrupt: set[int] = set()
    decoded: dict[int, torch.Tensor] = {}
    while True:  # a corrupt image among those used: choose again without it
        used, ids, mask = choice.make(corrupt)
        if not _decode_new(used, data.__getitem__, decoded, corrupt, ctx, flip):
            break
    if len(used) == 1 and ids[-1] == ctx.tokens.image:
        raise Dropped("image_at_end", len(corrupt))
    images = _stack([decoded[i] for i in used], ctx)
    input_ids, attention_mask = _tensors(ids, mask)
    return Sample(key, images, input_ids, attention_mask, len(corrupt))


@dataclass(frozen=True)
class _Mmc4Choice:
    """What decides which images of an MMC4 document are used, and where."""

    sentences: list[str]
    similarity: list[Any]
    sized: list[bool]
    ctx: Context
    config: InterleavedConfig
    drop_draw: float

    def make(self, corrupt: set[int]) -> tuple[list[int], list[int], list[int]]:
        """The images used (in token order) and the tokens, leaving the `corrupt` images out."""
        config, ctx = self.config, self.ctx
        eligible = [ok and i not in corrupt for i, ok in enumerate(self.sized)]
        if not any(eligible):
            raise Dropped("corrupt_image", len(corrupt))
        pairs = assign_images(
            self.similarity, eligible, config.textsim_threshold, config.assignment
        )
        if not pairs:
            raise Dropped("below_threshold", len(corrupt))
        # docs/formats.md §5.9: images follow their <image> tokens (sentence order, then image index)
        ordered = sorted(pairs, key=lambda p: (p[1], p[0]))[: config.max_num_images]
        text = interleave_text(self.sentences, [s for _, s in ordered], ctx.eos_token)
        ids, mask = _tokenize(ctx, text, config.max_tokens, True)
        used = [i for i, _ in ordered[: ids.count(ctx.tokens.image)]]
        # decided before decoding: dropping a corrupt image can only lower the count
        if len(used) < config.min_num_images:
            raise Dropped("too_few_images", len(corrupt))
        if len(used) == 1 and self.drop_draw <= 0.5:
            raise Dropped("single_image", len(corrupt))
        return used, ids, mask


def _decode_new(
    used: Sequence[K],
    encoded: Callable[[K], Any],
    decoded: dict[K, torch.Tensor],
    corrupt: set[K],
    ctx: Context,
    flip: bool,
) -> bool:
    """Decode the images of `used` not decoded yet (base64 `encoded(key)`) into `decoded`;
    True when one turned out corrupt (added to `corrupt`: the caller chooses again)."""
    fresh = False
    for key in used:
        if key not in decoded:
            raw = _b64(encoded(key))
            tensor = None if raw is None else _try_decode(raw, ctx, flip)
            if tensor is None:
                corrupt.add(key)
                fresh = True
            else:
                decoded[key] = tensor
    return fresh


def _gpt_document(
    key: str, info: dict[str, Any], ctx: Context, config: InterleavedConfig, rng: random.Random
) -> Sample:
    flip = not ctx.deterministic and rng.random() < 0.5
    example = strip_control_tokens(str(info["example"]), ctx.control_strings)
    image_map = info["image_map"]
    # docs/formats.md §5.9: the j-th placeholder in the text names the image of the j-th <image> token
    names = [m.group(0) for m in GPT_PLACEHOLDER.finditer(example)]
    if any(name not in image_map for name in names):
        raise Dropped("bad_json")

    def encoded(name: str) -> Any:
        return image_map[name]["base64_image"]

    corrupt: set[str] = set()
    decoded: dict[str, torch.Tensor] = {}
    while True:  # a corrupt image among those used: leave its placeholder out
        keep = [name not in corrupt for name in names]
        text = gpt_text(example, keep, config.max_num_images, ctx.eos_token)
        ids, mask = _tokenize(ctx, text, config.max_tokens, True)
        used = [name for name, k in zip(names, keep, strict=True) if k][
            : ids.count(ctx.tokens.image)
        ]
        if not _decode_new(used, encoded, decoded, corrupt, ctx, flip):
            break
    if len(used) < config.min_num_images:
        raise Dropped("too_few_images", len(corrupt))
    images = _stack([decoded[n] for n in used], ctx)
    input_ids, attention_mask = _tensors(ids, mask)
    return Sample(key, images, input_ids, attention_mask, len(corrupt))
