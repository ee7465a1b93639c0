"""Cheap image validity checks and optional JPEG re-encoding for the converters.

Every image's declared size is checked against the pixel cap (`data/image_limits.py`) before
anything is decoded: an image over it (a decompression bomb among them) is `ImageTooLarge`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

from flamingo_cli.data.image_limits import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLarge,
    check_pixels,
    open_image,
)

Reencode = Literal["none", "jpeg"]

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"
# Bytes after a JPEG's end marker that some encoders and downloads leave (padding, a newline).
_JPEG_TAIL = 64

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class ImageOptions:
    """What to do with image bytes: keep them (default) or re-encode to JPEG; images of more
    than `max_pixels` pixels are skipped as too large."""

    reencode: Reencode = "none"
    quality: int = 95
    max_side: int | None = None
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def to_dict(self) -> dict[str, object]:
        options: dict[str, object] = {
            "reencode": self.reencode,
            "quality": self.quality,
            "max_side": self.max_side,
        }
        # Only a cap other than the default is part of the fingerprint, so that conversions
        # begun before the cap existed resume without --overwrite.
        if self.max_pixels != DEFAULT_MAX_IMAGE_PIXELS:
            options["max_image_pixels"] = self.max_pixels
        return options


@dataclass(frozen=True)
class CheckedImage:
    """Bytes ready to store, with their format and size in pixels."""

    data: bytes
    extension: str
    width: int
    height: int


def too_large_fix(max_pixels: int) -> str:
    """The fix line of an image skipped as over the pixel cap."""
    return (
        f"images of more than {max_pixels:,} pixels are skipped undecoded; pass "
        "--max-image-pixels N to change the cap"
    )


class CorruptImage(ValueError):
    """Image bytes that are cut off or cannot be parsed."""


def _structure_problem(data: bytes) -> str | None:
    if data.startswith(JPEG_SOI):
        if JPEG_EOI not in data[-_JPEG_TAIL:]:
            return "JPEG without its end marker (truncated download)"
    elif data.startswith(PNG_SIGNATURE) and not data.rstrip(b"\0").endswith(PNG_IEND):
        return "PNG without its IEND chunk (truncated download)"
    return None


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first frame header, walking the marker segments after SOI."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise CorruptImage(f"bad JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            raise CorruptImage(f"bad JPEG segment length at byte {pos}")
        if marker in _SOF:
            if pos + 9 > end:
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            if not width or not height:
                raise CorruptImage("JPEG frame header with zero size")
            return width, height
        if marker == 0xDA:
            break
        pos += 2 + length
    raise CorruptImage("JPEG without a frame header")


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> CheckedImage:
    """Parse the header and check the file end, without decoding pixels.

    Catches the common damage of web downloads: empty or truncated files (a JPEG without its end
    marker, a PNG without IEND) and bytes that are not an image PIL can parse (`CorruptImage`);
    an image declaring more than `max_pixels` pixels raises `ImageTooLarge`.
    """
    from PIL import UnidentifiedImageError

    if not data:
        raise CorruptImage("empty file")
    problem = _structure_problem(data)
    if problem is not None:
        raise CorruptImage(problem)
    if data.startswith(JPEG_SOI):  # most images: a header walk is much cheaper than PIL
        width, height = _jpeg_size(data)
        check_pixels(width, height, max_pixels)
        return CheckedImage(data, "jpg", width, height)
    try:
        with open_image(data, max_pixels) as image:
            fmt = (image.format or "").lower()
            width, height = image.size
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"cannot parse the image header: {exc}") from exc
    extension = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(fmt, fmt)
    return CheckedImage(data, extension, width, height)


def reencode_jpeg(
    data: bytes,
    *,
    quality: int,
    max_side: int | None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> CheckedImage:
    """Decode `data` and write it as an RGB JPEG, shrunk so its longer side is at most `max_side`.

    Raises `ImageTooLarge` before decoding an image over `max_pixels`."""
    from PIL import Image

    try:
        with open_image(data, max_pixels) as image:
            if max_side is not None and max(image.size) > max_side:
                image.draft("RGB", (max_side, max_side))
                image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            rgb = image.convert("RGB")
    except ImageTooLarge:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImage(f"cannot decode the image: {exc}") from exc
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return CheckedImage(out.getvalue(), "jpg", rgb.width, rgb.height)


def prepare_image(data: bytes, options: ImageOptions) -> CheckedImage:
    """Check `data` and, when asked, re-encode it; raises `CorruptImage` for damaged bytes and
    `ImageTooLarge` for an image over `options.max_pixels`."""
    checked = check_image(data, options.max_pixels)
    if options.reencode == "jpeg":
        return reencode_jpeg(
            data, quality=options.quality, max_side=options.max_side, max_pixels=options.max_pixels
        )
    return checked
