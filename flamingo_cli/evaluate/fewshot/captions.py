"""Captioning datasets as they ship: the Karpathy split files of COCO and Flickr30k.

`dataset_coco.json` / `dataset_flickr30k.json` hold `{"images": [...]}`, one entry per image
with `split` (train, val, test, restval), `filename`, `sentences` (each with `raw`) and, for
COCO, `filepath` (train2014 or val2014) and `cocoid`. A COCO image is `DIR/<filepath>/<filename>`;
a Flickr30k image is `DIR/flickr30k-images/<filename>` (or `DIR/images/`, or `DIR/`).
As OpenFlamingo: demonstrations come from `train` (not `restval`), the test split is `test`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flamingo_cli.evaluate.fewshot.samples import (
    DatasetLayoutError,
    FewshotSample,
    TaskData,
    field_of,
    first_dir_holding,
    layout_error,
    read_json,
)

KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
_KARPATHY = (
    'the Karpathy split layout: {"images": [{"split": "train"|"test"|..., "filename": ..., '
    '"sentences": [{"raw": ...}, ...]%s}, ...]}'
)
_COCO_CAPTIONS = 'COCO captions: {"annotations": [{"image_id": ..., "caption": ...}, ...]}'


def karpathy_file(task: str, data: Path) -> Path:
    """The task's Karpathy file under `data` (or `data/annotations/`, `data/karpathy/`)."""
    name = KARPATHY_FILES[task]
    candidates = [data / name, data / "annotations" / name, data / "karpathy" / name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DatasetLayoutError(
            f"--data {data}: no {name} (looked for {', '.join(str(c) for c in candidates)})",
            fix=f"give the folder holding the Karpathy split file {name} and the images",
        )
    return found


def load_captions(task: str, data: Path, annotations: Path | None = None) -> TaskData:
    """The train and test splits of `coco` or `flickr30k` from their Karpathy file; with
    `annotations` (a COCO-format captions file), the test references come from it."""
    path = karpathy_file(task, data)
    expected = _KARPATHY % (', "filepath": ..., "cocoid": ...' if task == "coco" else "")
    content = read_json(path, expected)
    entries = content.get("images") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise layout_error(path, 'no "images" list at the top level', expected)
    splits: dict[str, list[FewshotSample]] = {"train": [], "test": []}
    image_dir: Path | None = None if task == "coco" else _flickr_dir(data, entries, path)
    for n, entry in enumerate(entries):
        split = field_of(entry, "split", str, path, f"images[{n}]", expected)
        if split in splits:
            splits[split].append(_sample(task, data, image_dir, entry, path, n, expected))
    files = (path,) if annotations is None else (path, annotations)
    references = {} if annotations is None else coco_references(annotations)
    missing = [s.id for s in splits["test"] if references and s.id not in references]
    if missing:
        raise DatasetLayoutError(
            f"{annotations}: no caption for test image {missing[0]} of {path.name} "
            f"({len(missing)} test images have none)",
            fix="give the COCO captions file of the split the Karpathy test images come from",
        )
    layout = f"Karpathy {KARPATHY_FILES[task]}" + (
        f" + COCO captions {annotations.name}" if annotations else ""
    )
    return TaskData(task, "caption", layout, files, splits["train"], splits["test"], references)


def _sample(
    task: str, data: Path, image_dir: Path | None, entry: Any, path: Path, n: int, expected: str
) -> FewshotSample:
    where = f"images[{n}]"
    filename = field_of(entry, "filename", str, path, where, expected)
    sentences = field_of(entry, "sentences", list, path, where, expected)
    raws = tuple(
        str(field_of(s, "raw", str, path, f"{where}.sentences[{k}]", expected))
        for k, s in enumerate(sentences)
    )
    if not raws:
        raise layout_error(path, f"{where} ({filename}) has no sentences", expected)
    if task == "coco":
        folder = field_of(entry, "filepath", str, path, where, expected)
        sample_id = str(field_of(entry, "cocoid", int, path, where, expected))
        image = data / folder / filename
    else:
        assert image_dir is not None
        sample_id, image = Path(filename).stem, image_dir / filename
    return FewshotSample(sample_id, image, raws[0].strip(), raws)


def _flickr_dir(data: Path, entries: list[Any], path: Path) -> Path:
    """Where the Flickr30k images are: the folder holding the first entry's file."""
    if not entries:
        raise layout_error(path, '"images" is empty', _KARPATHY % "")
    first = field_of(entries[0], "filename", str, path, "images[0]", _KARPATHY % "")
    candidates = [data / "flickr30k-images", data / "images", data]
    return first_dir_holding(candidates, first, f"{path.name} images[0]")


def coco_references(path: Path) -> dict[str, tuple[str, ...]]:
    """Image id -> reference captions from a COCO-format captions file (as OpenFlamingo's
    `--coco_annotations_json_path`, e.g. `captions_val2014.json`)."""
    content = read_json(path, _COCO_CAPTIONS)
    annotations = content.get("annotations") if isinstance(content, dict) else None
    if not isinstance(annotations, list):
        raise layout_error(path, 'no "annotations" list at the top level', _COCO_CAPTIONS)
    found: dict[str, list[str]] = {}
    for n, entry in enumerate(annotations):
        where = f"annotations[{n}]"
        image_id = field_of(entry, "image_id", (int, str), path, where, _COCO_CAPTIONS)
        caption = field_of(entry, "caption", str, path, where, _COCO_CAPTIONS)
        found.setdefault(str(image_id), []).append(caption)
    return {k: tuple(v) for k, v in found.items()}
