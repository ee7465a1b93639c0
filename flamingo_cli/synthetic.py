"""Small synthetic LAION pairs and MMC4 documents whose text names what the image shows.

Used by the tests and to build the bundled tiny data; deterministic for a given seed.
"""

from __future__ import annotations

import base64
import io
import json
import random
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flamingo_cli.shards.write import write_sizes, write_tar

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "stripe")


def shape_image(
    color: str, shape: str, size: int, rng: random.Random, noise: int = 0
) -> Image.Image:
    """An image of one coloured shape on a grey background, with optional pixel noise."""
    gen = np.random.default_rng(rng.getrandbits(32))
    pixels = np.full((size, size, 3), 128, dtype=np.int16)
    lo, hi = size // 4, 3 * size // 4
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "square":
        mask = (yy >= lo) & (yy < hi) & (xx >= lo) & (xx < hi)
    elif shape == "circle":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    else:
        mask = (yy // max(size // 8, 1)) % 2 == 0
    pixels[mask] = COLORS[color]
    if noise:
        pixels += gen.integers(-noise, noise + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def laion_samples(
    shard: int, count: int, seed: int, size: int = 32
) -> Iterator[dict[str, str | bytes]]:
    """img2dataset-style samples: jpg/png, txt caption naming colour and shape, json."""
    rng = random.Random(f"laion-{seed}-{shard}")
    for i in range(count):
        key = f"{shard:05d}{i:04d}"
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        caption = f"a {color} {shape}"
        image = encode(shape_image(color, shape, size, rng), "PNG")
        meta = {"key": key, "caption": caption, "status": "success", "width": size, "height": size}
        yield {
            "__key__": key,
            "png": image,
            "txt": caption.encode(),
            "json": json.dumps(meta).encode(),
        }


def mmc4_samples(
    shard: int, count: int, seed: int, size: int = 64, images_per_doc: int = 2
) -> Iterator[dict[str, str | bytes]]:
    """Interleaved documents as in converted MMC4 shards: one .json with base64 images.

    Images are noisy enough (about 12 KB as PNG) to pass OpenFlamingo's 11,000-byte filter;
    each image's matched sentence names its colour and shape with similarity 0.3.
    """
    rng = random.Random(f"mmc4-{seed}-{shard}")
    for i in range(count):
        key = f"mmc4-{shard:05d}-{i:04d}"
        texts = ["This page shows some shapes."]
        image_info = []
        for j in range(images_per_doc):
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            texts.append(f"Here is a {color} {shape}.")
            data = encode(shape_image(color, shape, size, rng, noise=60), "PNG")
            image_info.append(
                {
                    "image_name": f"{rng.getrandbits(48):012x}.jpg",
                    "raw_url": f"https://example.invalid/{key}/{j}.png",
                    "matched_text_index": j + 1,
                    "matched_sim": 0.3,
                    "face_detections": None,
                    "image_base64": base64.b64encode(data).decode(),
                }
            )
        sims = [
            [0.3 if t == j + 1 else 0.12 for t in range(len(texts))] for j in range(images_per_doc)
        ]
        yield _document_sample(key, texts, image_info, sims)


def _document_sample(
    key: str, texts: list[str], image_info: list[dict[str, Any]], sims: list[list[float]]
) -> dict[str, str | bytes]:
    """An MMC4 document sample: its `.json` with the fields the data loaders read."""
    doc = {
        "url": f"https://example.invalid/{key}",
        "text_list": texts,
        "image_info": image_info,
        "similarity_matrix": sims,
        "could_have_url_duplicate": 0,
    }
    return {"__key__": key, "json": json.dumps(doc).encode()}


def gpt_samples(
    shard: int, count: int, seed: int, size: int = 64, images_per_doc: int = 2
) -> Iterator[dict[str, str | bytes]]:
    """ChatGPT-generated documents: `is_gpt`, an `example` with `_!_IMAGE<k>_!_` placeholders
    and `image_map` (docs/formats.md §2.4); placeholders appear in reverse order of their numbers.
    """
    rng = random.Random(f"gpt-{seed}-{shard}")
    for i in range(count):
        key = f"gpt-{shard:05d}-{i:04d}"
        parts, image_map = ["A story in pictures."], {}
        for k in range(images_per_doc, 0, -1):
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            name = f"_!_IMAGE{k}_!_"
            parts.append(f"{name} Then came a {color} {shape}.")
            data = encode(shape_image(color, shape, size, rng, noise=60), "PNG")
            image_map[name] = {"base64_image": base64.b64encode(data).decode()}
        doc = {"is_gpt": True, "example": " ".join(parts), "image_map": image_map}
        yield {"__key__": key, "json": json.dumps(doc).encode()}


def web_samples(
    shard: int,
    count: int,
    seed: int,
    images_per_doc: tuple[int, int] = (3, 7),
    sides: tuple[int, int] = (256, 512),
    noise: int = 10,
) -> Iterator[dict[str, str | bytes]]:
    """MMC4-like documents of realistic weight for benchmarks: 5-15 sentences (about 400 tokens
    with the tiny tokenizer, near MMC4's average), 3-7 JPEG images with sides in `sides` px
    (quality 90; noise 10 gives about 1.7 bits per pixel, like web photos), similarities spread
    around the 0.24 threshold.
    """
    rng = random.Random(f"web-{seed}-{shard}")
    words = ("the", "a", "shape", "colour", "picture", "page", "shows", "with", "and", "of")
    for i in range(count):
        key = f"web-{shard:05d}-{i:04d}"
        texts = [
            " ".join(rng.choice(words) for _ in range(rng.randint(8, 25))).capitalize() + "."
            for _ in range(rng.randint(5, 15))
        ]
        image_info, sims = [], []
        for j in range(rng.randint(*images_per_doc)):
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            width, height = rng.randint(*sides), rng.randint(*sides)
            image = shape_image(color, shape, max(width, height), rng, noise=noise)
            buffer = io.BytesIO()
            image.crop((0, 0, width, height)).save(buffer, format="JPEG", quality=90)
            image_info.append(
                {
                    "image_name": f"{rng.getrandbits(48):012x}.jpg",
                    "raw_url": f"https://example.invalid/{key}/{j}.jpg",
                    "matched_text_index": 0,
                    "matched_sim": 0.0,
                    "face_detections": None,
                    "image_base64": base64.b64encode(buffer.getvalue()).decode(),
                }
            )
            sims.append([round(rng.uniform(0.1, 0.34), 4) for _ in texts])
        yield _document_sample(key, texts, image_info, sims)


SampleMaker = Callable[[int, int, int], Iterator[dict[str, str | bytes]]]
SAMPLE_KINDS: dict[str, SampleMaker] = {
    "laion": laion_samples,
    "mmc4": mmc4_samples,
    "gpt": gpt_samples,
    "web": web_samples,
}


def write_dataset(
    kind: str, directory: Path, shards: int, per_shard: int, seed: int = 0
) -> list[Path]:
    """Write `shards` tar files of `kind` (a key of SAMPLE_KINDS) and their sizes.json."""
    directory.mkdir(parents=True, exist_ok=True)
    make = SAMPLE_KINDS[kind]
    paths, counts = [], {}
    for shard in range(shards):
        path = directory / f"{shard:05d}.tar"
        counts[path.name] = write_tar(path, make(shard, per_shard, seed))
        paths.append(path)
    write_sizes(directory, counts)
    return paths


@dataclass(frozen=True)
class RawMmc4:
    """A generated raw MMC4 download: zipped jsonl shards and the image folder beside them."""

    docs_spec: str
    image_dir: Path
    zips: list[Path]
    images_written: int
    images_missing: int
    images_truncated: int
    bad_lines: int


def raw_mmc4_document(
    rng: random.Random, doc_url: str, images: int, duplicate: bool
) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """One raw MMC4 document (no image bytes) and the (image name, "colour shape") it shows."""
    texts = ["This page shows some shapes."]
    image_info: list[dict[str, object]] = []
    shown = []
    for j in range(images):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        texts.append(f"Here is a {color} {shape}.")
        name = f"{rng.getrandbits(48):012x}.jpg"
        shown.append((name, f"{color} {shape}"))
        image_info.append(
            {
                "image_name": name,
                "raw_url": f"{doc_url}/{j}.jpg",
                "matched_text_index": j + 1,
                "matched_sim": 0.3,
                "face_detections": None,
            }
        )
    sims = [[0.3 if t == j + 1 else 0.12 for t in range(len(texts))] for j in range(images)]
    doc = {
        "text_list": texts,
        "url": doc_url,
        "could_have_url_duplicate": int(duplicate),
        "image_info": image_info,
        "similarity_matrix": sims,
    }
    return doc, shown


def write_raw_mmc4(
    root: Path,
    *,
    shards: int = 3,
    docs_per_shard: int = 6,
    images_per_doc: int = 2,
    seed: int = 0,
    image_size: int = 128,
    image_sizes: tuple[int, int] | None = None,
    quality: int = 90,
    noise: int = 60,
    missing_shards: tuple[int, ...] = (),
    missing_image_rate: float = 0.0,
    truncated_rate: float = 0.0,
    bad_lines_per_shard: int = 0,
    duplicate_rate: float = 0.0,
) -> RawMmc4:
    """Write raw MMC4 as downloaded: `docs/docs_shard_{i}_v2.jsonl.zip`, `images/{i}/<name>.jpg`.

    Damage for tests: `missing_shards` zips are not written (their position still counts in the
    image layout), some images are never downloaded or cut off mid-file, and bad JSON lines sit
    among the documents. `image_sizes` draws each image's side in that range (benchmarks).
    """
    rng = random.Random(f"raw-mmc4-{seed}")
    docs_dir, image_dir = root / "docs", root / "images"
    docs_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    images = _RawImages(image_size, image_sizes, quality, noise, missing_image_rate, truncated_rate)
    zips: list[Path] = []
    bad = 0
    for shard in range(shards):
        lines: list[str] = []
        for i in range(docs_per_shard):
            doc_url = f"https://example.invalid/{shard}/{i}"
            duplicate = rng.random() < duplicate_rate
            doc, shown = raw_mmc4_document(rng, doc_url, images_per_doc, duplicate)
            lines.append(json.dumps(doc))
            for name, what in shown:
                roll = rng.random()  # drawn for a missing shard too: the others stay the same
                if shard not in missing_shards:
                    images.write(rng, roll, image_dir / str(shard) / name, what)
        if shard in missing_shards:
            continue
        for b in range(bad_lines_per_shard):
            lines.insert(min(2 + 3 * b, len(lines)), '{"text_list": ["cut off"')
            bad += 1
        zips.append(_write_docs_zip(docs_dir, shard, lines))
    spec = str(docs_dir / f"docs_shard_{{0..{shards - 1}}}_v2.jsonl.zip")
    return RawMmc4(spec, image_dir, zips, images.written, images.missing, images.truncated, bad)


@dataclass
class _RawImages:
    """How write_raw_mmc4 draws its images and their damage, and how many of each it wrote."""

    image_size: int
    image_sizes: tuple[int, int] | None
    quality: int
    noise: int
    missing_rate: float
    truncated_rate: float
    written: int = 0
    missing: int = 0
    truncated: int = 0

    def write(self, rng: random.Random, roll: float, path: Path, what: str) -> None:
        """Write the image `what` ("color shape") to `path`, unless `roll` says it was never
        downloaded; cut it off mid-file when `roll` says so."""
        if roll < self.missing_rate:
            self.missing += 1
            return
        color, shape = what.split()
        side = rng.randint(*self.image_sizes) if self.image_sizes else self.image_size
        image = shape_image(color, shape, side, rng, noise=self.noise)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        data = buffer.getvalue()
        if roll < self.missing_rate + self.truncated_rate:
            data = data[: len(data) // 2]
            self.truncated += 1
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        self.written += 1


def _write_docs_zip(docs_dir: Path, shard: int, lines: list[str]) -> Path:
    """`docs_shard_{shard}_v2.jsonl.zip` holding the lines (a fixed date: the same bytes)."""
    path = docs_dir / f"docs_shard_{shard}_v2.jsonl.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo(f"docs_shard_{shard}_v2.jsonl", date_time=(2023, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, "".join(line + "\n" for line in lines))
    return path


# -- few-shot benchmark sets in the layouts the real datasets ship (eval-fewshot) -----------

VQA_QUESTIONS = ("What colour is the shape?", "What shape is it?")


@dataclass(frozen=True)
class FewshotSet:
    """A generated few-shot set: its folder, the annotation files, and samples per split."""

    root: Path
    files: list[Path]
    train: int
    test: int


def _shape_jpeg(rng: random.Random, size: int, noise: int) -> tuple[str, str, bytes]:
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    image = shape_image(color, shape, size, rng, noise=noise)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return color, shape, buffer.getvalue()


def write_coco_karpathy(
    root: Path, *, train: int, test: int, seed: int = 0, size: int = 32, noise: int = 12
) -> FewshotSet:
    """A COCO captioning set in the Karpathy layout: `dataset_coco.json` and the images as
    `train2014/COCO_train2014_<id:012d>.jpg` (train split) and `val2014/...` (test split);
    each image has two reference captions naming its colour and shape ("a red circle")."""
    rng = random.Random(f"coco-karpathy-{seed}")
    entries: list[dict[str, Any]] = []
    for n in range(train + test):
        split, folder = ("train", "train2014") if n < train else ("test", "val2014")
        cocoid = 100000 + n
        color, shape, data = _shape_jpeg(rng, size, noise)
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / filename).write_bytes(data)
        raws = [f"a {color} {shape}", f"a {color} {shape} on a grey background"]
        sentences = [
            {"raw": raw, "tokens": raw.split(), "imgid": n, "sentid": 2 * n + k}
            for k, raw in enumerate(raws)
        ]
        entries.append(
            {
                "filepath": folder,
                "filename": filename,
                "imgid": n,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
                "sentids": [2 * n, 2 * n + 1],
            }
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}), encoding="utf-8")
    return FewshotSet(root, [path], train, test)


def write_vqav2(
    root: Path, *, train: int, test: int, seed: int = 0, size: int = 32, noise: int = 12
) -> FewshotSet:
    """A VQAv2-layout set: `v2_OpenEnded_mscoco_{train,val}2014_questions.json`, their
    `v2_mscoco_*_annotations.json` and COCO-named images in `train2014/` and `val2014/`;
    each image is asked both of VQA_QUESTIONS (its colour, its shape), ten answers each."""
    rng = random.Random(f"vqav2-{seed}")
    files: list[Path] = []
    for split, count, offset in (("train2014", train, 0), ("val2014", test, train)):
        questions: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        (root / split).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            image_id = 200000 + offset + n
            color, shape, data = _shape_jpeg(rng, size, noise)
            (root / split / f"COCO_{split}_{image_id:012d}.jpg").write_bytes(data)
            for k, (question, answer) in enumerate(zip(VQA_QUESTIONS, (color, shape), strict=True)):
                qid = image_id * 10 + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append(_vqa_annotation(image_id, qid, answer))
        q_path = root / f"v2_OpenEnded_mscoco_{split}_questions.json"
        a_path = root / f"v2_mscoco_{split}_annotations.json"
        head = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split}
        q_path.write_text(json.dumps({**head, "questions": questions}), encoding="utf-8")
        a_path.write_text(json.dumps({**head, "annotations": annotations}), encoding="utf-8")
        files += [q_path, a_path]
    return FewshotSet(root, files, 2 * train, 2 * test)


def _vqa_annotation(image_id: int, question_id: int, answer: str) -> dict[str, Any]:
    answers = [
        {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)
    ]
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question_type": "what",
        "answer_type": "other",
        "multiple_choice_answer": answer,
        "answers": answers,
    }
