"""The cap on decoded pixels that every image decode honours (docs/formats.md, images).

A 200-byte PNG can declare 30000x30000 pixels, and a real 12000x12000 photo decodes to 430 MB
of RGB: every reader opens the header first, checks the declared size against the cap, and
only then decodes. An image over the cap counts as damaged, like a corrupt one.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from flamingo_cli.recipe.schema import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageTooLarge", "check_pixels", "open_image"]


# PIL's own refusal, which fires first when its process-wide limit is below the image (other
# code may have changed that limit: OpenFlamingo's data module sets it to 1e9 on import)
_PIL_BOMB = re.compile(r"Image size \((\d+) pixels\)")


class ImageTooLarge(ValueError):
    """An image that would decode to more pixels than the cap allows."""


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise `ImageTooLarge` when `width` x `height` is over `max_pixels`."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels is over the cap of "
            f"{max_pixels:,} (max_image_pixels)"
        )


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read, refused when its declared size is over the cap.

    The declared size is what counts, even where a JPEG is then decoded at a reduced scale:
    one rule for convert, inspect and the loaders, so they agree on which images are skipped.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over PIL's limit (2 x MAX_IMAGE_PIXELS)
        # the same words as our cap's, so that what a report says does not depend on it
        found = _PIL_BOMB.search(str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "the declared size"
        raise ImageTooLarge(
            f"{size} is over the cap of {max_pixels:,} (max_image_pixels)"
        ) from None
    try:
        check_pixels(image.width, image.height, max_pixels)
    except ImageTooLarge:
        image.close()
        raise
    return image
