"""One sample as the model will see it: decoding, checks, filters and image placement.

Shared by `--deep` (every sample) and `--preview` (a few). Interleaved documents follow
docs/formats.md §5.3 with our ordering of §5.9: images survive the size filter, are assigned to
sentences, corrupt ones are dropped one by one, and the kept ones are ordered by sentence.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from flamingo_cli.data.text import (
    CONTROL_TOKENS,
    caption_text,
    interleave_text,
    strip_control_tokens,
)
from flamingo_cli.errors import Severity
from flamingo_cli.inspect.report import Kind

if TYPE_CHECKING:
    from flamingo_cli.data.assign import Assignment

PAIR_IMAGE_EXTS = ("jpg", "jpeg", "png")  # what OpenFlamingo's LAION loader reads
IMAGE_EXTS = (*PAIR_IMAGE_EXTS, "webp")


@dataclass(frozen=True)
class Filters:
    """OpenFlamingo's MMC4 filters and limits (defaults of its published command), and the cap
    on decoded pixels (None: `DEFAULT_MAX_IMAGE_PIXELS`, the recipe default)."""

    threshold: float = 0.24
    assignment: Assignment = "hungarian"
    max_num_images: int = 6
    min_num_images: int = 1
    max_image_pixels: int | None = None


@dataclass(frozen=True)
class Issue:
    """A problem inside one sample, before it is tied to a shard."""

    check: str
    reason: str
    severity: Severity = "error"


@dataclass
class ImageView:
    """One image of a sample and what the filters did with it."""

    index: int
    data: bytes | None = None
    size: tuple[int, int] | None = None  # width, height once decoded
    sentence: int | None = None  # the sentence it is placed before, when kept
    similarity: float | None = None  # to its sentence, or its best one when dropped
    dropped: str | None = None  # why it does not reach the model


@dataclass
class SampleView:
    """A decoded sample: texts, images with their fate, the text the tokenizer receives."""

    key: str
    kind: Kind
    texts: list[str] = field(default_factory=list)
    images: list[ImageView] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    is_gpt: bool = False

    @property
    def kept(self) -> list[ImageView]:
        """Images that reach the model, in the order of their `<image>` tokens."""
        return sorted(
            (i for i in self.images if i.dropped is None and i.sentence is not None),
            key=lambda i: (i.sentence, i.index),
        )

    @property
    def failed(self) -> bool:
        return any(i.severity == "error" for i in self.issues)

    def model_text(self, eos: str = "") -> str:
        """The text before tokenization (docs/formats.md §5.2, §5.3; special strings removed)."""
        if self.kind == "pairs":
            return caption_text(strip_control_tokens(self.texts[0] if self.texts else ""), eos)
        sentences = [strip_control_tokens(text) for text in self.texts]
        return interleave_text(
            sentences, [i.sentence for i in self.kept if i.sentence is not None], eos
        )


def sample_kind(extensions: set[str] | frozenset[str]) -> Kind | None:
    """Image-text pair when there is an image or a caption, interleaved when only JSON."""
    if extensions & set(IMAGE_EXTS) or "txt" in extensions:
        return "pairs"
    if "json" in extensions:
        return "interleaved"
    return None


def decode_image(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """Decode image bytes fully (JPEG at reduced scale); raises ValueError when corrupt, and
    `ImageTooLarge` (a ValueError), without decoding, when it declares more than
    `max_pixels` pixels (default: the recipe default)."""
    from PIL import Image, UnidentifiedImageError

    from flamingo_cli.data.image_limits import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, open_image

    try:
        with open_image(data, max_pixels or DEFAULT_MAX_IMAGE_PIXELS) as image:
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
            size = image.size
            image.load()
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, met while decoding
        raise ImageTooLarge(str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    return size


def _undecodable(view: SampleView, image: ImageView, where: str, exc: ValueError) -> None:
    """Record why an image does not decode: over the pixel cap, or corrupt."""
    from flamingo_cli.data.image_limits import ImageTooLarge  # loaded by decode_image

    if isinstance(exc, ImageTooLarge):
        image.dropped = "too large"
        reason = (
            f"{where} not decoded: {exc}; the loaders skip it like a corrupt image "
            "(raise the cap with --max-image-pixels / data.max_image_pixels if it is wanted)"
        )
    else:
        image.dropped = "corrupt"
        reason = f"{where} cannot be decoded: {exc}"
    view.issues.append(Issue("image", reason))


def _check_text(issues: list[Issue], where: str, text: str) -> None:
    if not text.strip():
        issues.append(Issue("empty-text", f"{where} is empty", "warning"))
    for token in CONTROL_TOKENS:
        if token in text:
            issues.append(
                Issue(
                    "special-token",
                    f"{where} contains the literal string {token!r} (removed before tokenizing)",
                    "warning",
                )
            )


def _b64(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def view_sample(
    key: str,
    members: Mapping[str, bytes],
    filters: Filters,
    *,
    decode_all: bool = True,
) -> SampleView:
    """Decode one sample (pair or interleaved, by its members) and apply the filters.

    With `decode_all`, every image is decoded (the `--deep` check); otherwise only images
    that could reach the model are.
    """
    kind = sample_kind(frozenset(members)) or "interleaved"
    if kind == "pairs":
        return _view_pair(key, members, filters)
    view = SampleView(key, "interleaved")
    raw = members.get("json")
    if raw is None:
        view.issues.append(Issue("missing-member", "no .json member"))
        return view
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        view.issues.append(Issue("json", f"invalid JSON: {exc}"))
        return view
    if not isinstance(doc, dict):
        view.issues.append(Issue("document", "the JSON is not an object"))
        return view
    if "is_gpt" in doc:
        _view_gpt(view, doc, filters)
    else:
        _view_mmc4(view, doc, filters, decode_all)
    return view


def _view_pair(key: str, members: Mapping[str, bytes], filters: Filters) -> SampleView:
    view = SampleView(key, "pairs")
    raw_caption = members.get("txt")
    if raw_caption is None:
        view.issues.append(Issue("missing-member", "no .txt caption"))
    else:
        try:
            caption = raw_caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            view.issues.append(Issue("caption", f"the caption is not UTF-8: {exc}"))
        else:
            view.texts.append(caption)
            _check_text(view.issues, "the caption", caption)
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        view.issues.append(Issue("missing-member", "no image member"))
    else:
        image = ImageView(0, members[ext], sentence=0)
        try:
            image.size = decode_image(members[ext], filters.max_image_pixels)
        except ValueError as exc:
            _undecodable(view, image, f".{ext}", exc)
        if ext not in PAIR_IMAGE_EXTS and image.dropped is None:
            image.dropped = f".{ext} is not read by OpenFlamingo"
        view.images.append(image)
    if "json" in members:
        try:
            json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            view.issues.append(Issue("json", f".json is not valid JSON: {exc}"))
    return view


def _view_mmc4(view: SampleView, doc: dict[str, Any], filters: Filters, decode_all: bool) -> None:
    texts, infos, matrix = doc.get("text_list"), doc.get("image_info"), doc.get("similarity_matrix")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        view.issues.append(Issue("document", "text_list is not a list of strings"))
        return
    if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
        view.issues.append(Issue("document", "image_info is not a list of objects"))
        return
    view.texts = texts
    for j, text in enumerate(texts):
        _check_text(view.issues, f"text_list[{j}]", text)
    shape_ok = _similarity_shape_ok(view, matrix, len(infos), len(texts))
    eligible = [
        _view_mmc4_image(view, i, info, len(texts), filters, decode_all)
        for i, info in enumerate(infos)
    ]
    if not shape_ok:
        for image in view.images:
            image.dropped = image.dropped or "no usable similarity row"
        return
    _assign_mmc4_images(view, cast("list[list[Any]]", matrix), eligible, filters)


def _similarity_shape_ok(view: SampleView, matrix: Any, images: int, sentences: int) -> bool:
    """Whether the similarity matrix is images x sentences; an issue when it is not."""
    rows = matrix if isinstance(matrix, list) else []
    if (
        isinstance(matrix, list)
        and len(matrix) == images
        and all(isinstance(r, list) and len(r) == sentences for r in matrix)
    ):
        return True
    got = (
        f"{len(rows)}x{'/'.join(sorted({str(len(r)) if isinstance(r, list) else '?' for r in rows})) or 0}"
        if isinstance(matrix, list)
        else type(matrix).__name__
    )
    view.issues.append(
        Issue(
            "similarity-shape",
            f"similarity_matrix is {got}, expected {images}x{sentences} (images x sentences)",
        )
    )
    return False


def _view_mmc4_image(
    view: SampleView,
    i: int,
    info: dict[str, Any],
    sentences: int,
    filters: Filters,
    decode_all: bool,
) -> bool:
    """Add image `i` of the document to the view; True when it may be assigned a sentence."""
    from flamingo_cli.data.assign import large_enough  # scipy: deep mode only

    image = ImageView(i)
    view.images.append(image)
    matched = info.get("matched_text_index")
    if not isinstance(matched, int) or not 0 <= matched < sentences:
        view.issues.append(
            Issue(
                "matched-index",
                f"image_info[{i}].matched_text_index {matched!r} is outside 0..{sentences - 1}",
            )
        )
    if "image_base64" not in info:
        image.dropped = "not downloaded"
        return False
    try:
        image.data = _b64(info["image_base64"])
    except ValueError as exc:
        image.dropped = "bad base64"
        view.issues.append(Issue("base64", f"image_info[{i}].image_base64: {exc}"))
        return False
    if not large_enough(len(image.data)):
        image.dropped = "under 11,000 bytes"
    if decode_all:
        _decode_into(view, image, f"image_info[{i}]", filters)
    return image.dropped is None


def _assign_mmc4_images(
    view: SampleView, rows: list[list[Any]], eligible: list[bool], filters: Filters
) -> None:
    """Give each eligible image its sentence as training would, decode the kept ones, and
    mark the rest dropped with the reason."""
    from flamingo_cli.data.assign import assign_images  # scipy: deep mode only

    assigned = dict(assign_images(rows, eligible, filters.threshold, filters.assignment))
    for image, ok in zip(view.images, eligible, strict=True):
        if not ok:
            continue
        row = rows[image.index]
        if image.index in assigned:
            image.sentence = assigned[image.index]
            image.similarity = float(row[image.sentence])
        else:
            image.similarity = float(max(row)) if row else None
            image.dropped = f"not assigned (similarity under {filters.threshold:g})"
    for image in view.images:
        if image.sentence is not None and image.size is None and image.dropped is None:
            _decode_into(view, image, f"image_info[{image.index}]", filters)
        if image.dropped is not None:
            image.sentence = None
    for image in view.kept[filters.max_num_images :]:
        image.dropped = f"over max_num_images ({filters.max_num_images})"
        image.sentence = None


def _decode_into(view: SampleView, image: ImageView, where: str, filters: Filters) -> None:
    assert image.data is not None
    try:
        image.size = decode_image(image.data, filters.max_image_pixels)
    except ValueError as exc:
        _undecodable(view, image, f"{where}:", exc)


def _view_gpt(view: SampleView, doc: dict[str, Any], filters: Filters) -> None:
    """ChatGPT-generated documents (docs/formats.md §5.4): `_!_IMAGE<k>_!_` placeholders."""
    example, image_map = doc.get("example"), doc.get("image_map")
    if not isinstance(example, str) or not isinstance(image_map, dict):
        view.issues.append(Issue("document", "is_gpt document without example text and image_map"))
        return
    view.is_gpt = True
    placeholders = [f"_!_IMAGE{k}_!_" for k in range(1, len(image_map) + 1)]
    text = example
    for k, placeholder in enumerate(placeholders):
        head, found, text = text.partition(placeholder)
        if not found:
            view.issues.append(Issue("document", f"example has no {placeholder}"))
            text = head
            break
        view.texts.append(head)
        entry = image_map.get(placeholder)
        image = ImageView(k, sentence=k + 1)
        view.images.append(image)
        if not isinstance(entry, dict):
            image.dropped = "missing from image_map"
            view.issues.append(Issue("document", f"image_map has no {placeholder}"))
            continue
        try:
            image.data = _b64(entry.get("base64_image"))
        except ValueError as exc:
            image.dropped = "bad base64"
            view.issues.append(Issue("base64", f"image_map[{placeholder!r}]: {exc}"))
            continue
        _decode_into(view, image, f"image_map[{placeholder!r}]", filters)
    view.texts.append(text)
    for j, part in enumerate(view.texts):
        if part.strip():
            _check_text(view.issues, f"example part {j}", part)
    for image in view.kept[filters.max_num_images - 1 :]:
        image.dropped = f"over max_num_images - 1 ({filters.max_num_images - 1})"
        image.sentence = None
