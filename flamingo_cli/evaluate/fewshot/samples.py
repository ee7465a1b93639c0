"""What every few-shot dataset reader returns: samples with an image path, and the files read.

Readers check the layout of what they read and raise a FlamingoError naming the file and what
was expected; images are only looked up (a missing one is named), never decoded here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flamingo_cli.errors import FlamingoError

TaskKind = Literal["caption", "vqa"]


class DatasetLayoutError(FlamingoError):
    """A few-shot dataset's files are missing or not in the layout its task reads."""


@dataclass(frozen=True)
class FewshotSample:
    """One sample: `id` (COCO image id, Flickr file stem or VQA question id, as a string),
    its image, `text` (a caption task's first reference, a VQA task's question) and `answers`
    (every reference caption, or the human answers in annotation order). A VQA sample also
    keeps its answer entries as the file holds them (`entries`): the `openflamingo` metric
    compares whole entries when it leaves one out."""

    id: str
    image: Path
    text: str
    answers: tuple[str, ...]
    entries: tuple[Any, ...] = ()


@dataclass(frozen=True)
class TaskData:
    """A task's train split (demonstrations come from it) and test split, and where from."""

    task: str
    kind: TaskKind
    layout: str
    files: tuple[Path, ...]
    train: list[FewshotSample]
    test: list[FewshotSample]
    references: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def references_of(self, sample: FewshotSample) -> tuple[str, ...]:
        """A test sample's references: from a separate annotations file when one was given."""
        return self.references.get(sample.id, sample.answers)


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content; a missing, unreadable or malformed file is a layout error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetLayoutError(
            f"{path} does not exist ({what})", fix="check --data and the file names"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"cannot read {path}: {exc}", fix=f"give {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg})", fix=f"give {what}"
        ) from None
    except RecursionError:  # arrays or objects nested thousands deep: no dataset file is
        raise DatasetLayoutError(
            f"{path}: JSON nested too deep to read", fix=f"give {what}"
        ) from None


def layout_error(path: Path, problem: str, expected: str) -> DatasetLayoutError:
    """`path` holds JSON, but not in the layout expected."""
    return DatasetLayoutError(f"{path}: {problem}", fix=f"expected {expected}")


def field_of(
    entry: Any, key: str, kinds: type | tuple[type, ...], path: Path, where: str, expected: str
) -> Any:
    """`entry[key]` when `entry` is an object holding it with a value of `kinds`."""
    if not isinstance(entry, dict) or key not in entry:
        raise layout_error(path, f"{where} has no {key!r}", expected)
    value = entry[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise layout_error(path, f"{where}: {key!r} is {type(value).__name__}", expected)
    return value


def first_dir_holding(candidates: Sequence[Path], name: str, what: str) -> Path:
    """The first of `candidates` that holds the file `name`; a missing image is named with
    every place looked in."""
    for folder in candidates:
        if (folder / name).is_file():
            return folder
    tried = ", ".join(str(c / name) for c in candidates)
    raise DatasetLayoutError(
        f"image {name} ({what}) not found: looked for {tried}",
        fix="give --data the folder that holds the annotation files and the image folders, "
        "as the dataset ships them",
    )


def check_images(
    samples: Sequence[FewshotSample], what: str, max_pixels: int | None = None
) -> None:
    """Every sample's image exists (the first missing one is named); with `max_pixels`, its
    header is also read and its declared size checked against the cap, so that a bomb or a
    file that is no image stops the run before the model loads, not after hours of decoding."""
    headers_read: set[Path] = set()  # VQA asks several questions of one image
    for sample in samples:
        if not sample.image.is_file():
            raise DatasetLayoutError(
                f"image {sample.image} of {what} sample {sample.id} does not exist",
                fix="complete the image download, or remove the sample from the annotations",
            )
        if max_pixels is not None and sample.image not in headers_read:
            _check_header(sample, what, max_pixels)
            headers_read.add(sample.image)


def _check_header(sample: FewshotSample, what: str, max_pixels: int) -> None:
    from PIL import UnidentifiedImageError

    from flamingo_cli.data.image_limits import ImageTooLarge, open_image

    try:
        open_image(sample.image.read_bytes(), max_pixels).close()
    except ImageTooLarge as exc:
        raise DatasetLayoutError(
            f"image {sample.image} of {what} sample {sample.id}: {exc}",
            fix="resize the image, or raise data.max_image_pixels in the recipe",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        problem = "is empty" if sample.image.stat().st_size == 0 else "is not an image Pillow reads"
        if not isinstance(exc, UnidentifiedImageError):
            problem = f"cannot be read ({exc})"
        raise DatasetLayoutError(
            f"image {sample.image} of {what} sample {sample.id} {problem}",
            fix="download the image again, or remove the sample from the annotations",
        ) from None
