"""`convert mmc4`: raw MMC4 documents (zip/jsonl + image directory) to interleaved tar shards.

Each output sample is one `<stem>-<line>.json` member: the document with `image_base64` added
to every image found. Shard names and keys depend only on the input file and the line.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import re
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from flamingo_cli.convert.images import CorruptImage, ImageOptions, prepare_image, too_large_fix
from flamingo_cli.convert.runner import (
    ConvertReport,
    ProgressSink,
    RunOptions,
    ShardRecord,
    TaskRecord,
    check_found,
    expand_inputs,
    open_error_is_missing,
    run_tasks,
)
from flamingo_cli.data.image_limits import ImageTooLarge
from flamingo_cli.errors import ConvertError, OpenerError, Problem
from flamingo_cli.shards.cluster import Partition
from flamingo_cli.shards.opener import open_url
from flamingo_cli.shards.spec import local_path, url_kind
from flamingo_cli.shards.store import OutputDir
from flamingo_cli.shards.write import SplitTarWriter

ImageLayout = Literal["index", "shard-number", "flat"]
IMAGE_LAYOUTS: tuple[ImageLayout, ...] = ("index", "shard-number", "flat")

# Counts that mean something was left out because of a problem (`--strict` fails on them).
STRICT_KEYS = ("bad_lines", "images_corrupt", "images_too_large")
_SHARD_NUMBER = re.compile(r"shard_(\d+)")


@dataclass(frozen=True)
class Mmc4Options:
    """Everything besides the input list that decides the output bytes."""

    image_dir: str
    image_layout: ImageLayout = "index"
    image: ImageOptions = field(default_factory=ImageOptions)
    min_images: int = 0
    drop_url_duplicates: bool = False
    docs_per_shard: int | None = None
    max_shard_bytes: int | None = None

    @property
    def split(self) -> bool:
        return self.docs_per_shard is not None or self.max_shard_bytes is not None

    def to_dict(self) -> dict[str, object]:
        return {
            "image_dir": self.image_dir,
            "image_layout": self.image_layout,
            **self.image.to_dict(),
            "min_images": self.min_images,
            "drop_url_duplicates": self.drop_url_duplicates,
            "docs_per_shard": self.docs_per_shard,
            "max_shard_bytes": self.max_shard_bytes,
        }


def input_stem(url: str) -> str:
    """`docs_shard_7_v2.jsonl.zip` -> `docs_shard_7_v2`; dots become `_` (keys split at dots)."""
    name = posixpath.basename(url.rstrip("/"))
    for suffix in (".zip", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name.replace(".", "_") or "input"


def shard_number(url: str) -> int:
    """The MMC4 shard number in a file name (`docs_shard_N_...`, `shard_N.zip`, `N.zip`)."""
    stem = input_stem(url)
    match = _SHARD_NUMBER.search(stem)
    if match:
        return int(match.group(1))
    if stem.isdigit():
        return int(stem)
    raise ConvertError(
        f"cannot find a shard number in the file name {url}",
        fix="use --image-layout index (image folders numbered by input position) or flat",
    )


@dataclass(frozen=True)
class Mmc4Task:
    """One input file (zip or jsonl) to its own shard(s)."""

    url: str
    index: int
    options: Mmc4Options
    weight: int = 0
    exists: bool = True

    @property
    def name(self) -> str:
        return input_stem(self.url)

    @property
    def input(self) -> str:
        return self.url

    def fingerprint(self) -> dict[str, object]:
        return {"input": self.url, "index": self.index, **self.options.to_dict()}

    def output_names(self) -> list[str]:
        return [f"{self.name}-[0-9]*.tar" if self.options.split else f"{self.name}.tar"]

    def shard_name(self, part: int) -> str:
        suffix = f"-{part}" if self.options.split else ""
        return f"{self.name}{suffix}.tar"

    def image_prefix(self) -> str:
        layout = self.options.image_layout
        root = self.options.image_dir.rstrip("/")
        if layout == "flat":
            return root
        number = self.index if layout == "index" else shard_number(self.url)
        return f"{root}/{number}"

    def run(self, dest: OutputDir, progress: ProgressSink) -> TaskRecord:
        record = TaskRecord(self.name, self.url, self.fingerprint(), "converted")
        if not self.exists:
            return _missing(record)
        try:
            lines = _open_lines(self.url)
        except OpenerError as exc:
            if open_error_is_missing(exc):
                return _missing(record)
            raise
        counts_by_part: dict[int, Counter[str]] = {}
        track = self.weight > 0
        with SplitTarWriter(
            lambda k: dest.open_sink(self.shard_name(k)),
            max_samples=self.options.docs_per_shard,
            max_bytes=self.options.max_shard_bytes,
        ) as writer:
            for number, size, doc, counts, images in self._read_ahead(lines, record):
                sample = None
                if doc is not None and images is not None:
                    sample = self._sample(number, doc, images.result(), counts, record)
                if sample is not None:
                    writer.write(sample)
                counts_by_part.setdefault(writer.part, Counter()).update(counts)
                record.counts.update(counts)
                progress(size if track else 0, 1 if sample else 0, counts["image_bytes"])
        for k, (name, samples, size) in enumerate(writer.parts):
            stats = dict(sorted(counts_by_part.get(k, Counter()).items()))
            record.shards.append(ShardRecord(name, samples, size, stats))
        return record

    def _read_ahead(
        self, lines: Iterator[tuple[int, bytes]], record: TaskRecord
    ) -> Iterator[
        tuple[int, int, dict[str, Any] | None, Counter[str], Future[list[_Image]] | None]
    ]:
        """Documents in line order, their images read and checked by threads a few docs ahead.

        Reading (and re-encoding) releases the GIL, so a worker keeps the disk or the object
        store busy while it encodes the previous documents.
        """
        prefix = self.image_prefix()
        window: deque[
            tuple[int, int, dict[str, Any] | None, Counter[str], Future[list[_Image]] | None]
        ] = deque()
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for number, line in lines:
                counts: Counter[str] = Counter(docs_in=1)
                doc = self._parse(number, line, counts, record)
                images = None
                if doc is not None:
                    images = pool.submit(
                        _load_images, prefix, doc["image_info"], self.options.image
                    )
                window.append((number, len(line), doc, counts, images))
                if len(window) > READ_AHEAD:
                    yield window.popleft()
            while window:
                yield window.popleft()

    def _parse(
        self, number: int, line: bytes, counts: Counter[str], record: TaskRecord
    ) -> dict[str, Any] | None:
        """The document of a line, or None (counted, and reported when the line is bad)."""
        try:
            doc = json.loads(line.rstrip(b"\r\n"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            counts["bad_lines"] += 1
            record.problem(
                Problem(
                    f"not a JSON document ({exc}); line skipped",
                    file=self.url,
                    line=number,
                    severity="warning",
                    fix="repair or delete the line and rerun with --overwrite to include it",
                )
            )
            return None
        images = doc.get("image_info") if isinstance(doc, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
            counts["bad_lines"] += 1
            record.problem(
                Problem(
                    "not an MMC4 document (needs an object with an `image_info` list); "
                    "line skipped",
                    file=self.url,
                    line=number,
                    severity="warning",
                )
            )
            return None
        if self.options.drop_url_duplicates and doc.get("could_have_url_duplicate") == 1:
            counts["dropped_url_duplicate"] += 1
            return None
        assert isinstance(doc, dict)
        return doc

    def _sample(
        self,
        number: int,
        doc: dict[str, Any],
        images: list[_Image],
        counts: Counter[str],
        record: TaskRecord,
    ) -> dict[str, str | bytes] | None:
        """The output sample of a document whose images were loaded, or None when dropped."""
        encoded: list[bytes] = []
        for info, (status, raw_size, data, why) in zip(doc["image_info"], images, strict=True):
            counts["image_bytes"] += raw_size
            counts[status] += 1
            if status == "images_too_large":
                record.problem(
                    Problem(
                        f"image {why}; left out of the document",
                        file=self.url,
                        line=number,
                        severity="warning",
                        fix=too_large_fix(self.options.image.max_pixels),
                    )
                )
            if data is not None:
                info["image_base64"] = _placeholder(len(encoded))
                encoded.append(base64.b64encode(data))
        if len(encoded) < self.options.min_images:
            counts["dropped_min_images"] += 1
            return None
        counts["docs_out"] += 1
        return {"__key__": f"{self.name}-{number:06d}", "json": _dump(doc, encoded)}


# (count to increment, bytes read, bytes to store or None, what was wrong or None)
_Image = tuple[str, int, bytes | None, str | None]
READ_THREADS = 4
READ_AHEAD = 16  # documents


def _load_images(
    prefix: str, image_info: list[dict[str, Any]], options: ImageOptions
) -> list[_Image]:
    """Read and check every image of a document (runs in a reader thread)."""
    loaded: list[_Image] = []
    for info in image_info:
        name = info.get("image_name")
        raw = _read_image(prefix, name)
        if raw is None:
            loaded.append(("images_missing", 0, None, None))
            continue
        try:
            data = prepare_image(raw, options).data
        except ImageTooLarge as exc:
            loaded.append(
                (
                    "images_too_large",
                    len(raw),
                    None,
                    f"{prefix}/{name} is too large ({str(exc).rstrip('.')})",
                )
            )
            continue
        except CorruptImage:
            loaded.append(("images_corrupt", len(raw), None, None))
            continue
        loaded.append(("images_found", len(raw), data, None))
    return loaded


def _placeholder(index: int) -> str:
    return f"\0{index}\0"


def _dump(doc: dict[str, object], encoded: list[bytes]) -> bytes:
    """`json.dumps(doc)` with the base64 strings spliced in as bytes.

    Base64 needs no JSON escaping, so splicing gives exactly the bytes `json.dumps` would, without
    running megabytes of image data through the encoder. Placeholders hold NUL characters, which
    `json.dumps` escapes in any document text, so they cannot collide with it.
    """
    text = json.dumps(doc)
    pieces: list[bytes] = []
    for index, data in enumerate(encoded):
        before, text = text.split(json.dumps(_placeholder(index)), 1)
        pieces += (before.encode(), b'"', data, b'"')
    pieces.append(text.encode())
    return b"".join(pieces)


def _missing(record: TaskRecord) -> TaskRecord:
    record.status = "missing"
    record.problem(
        Problem(
            "input file not found; skipped (MMC4 has missing shard numbers)",
            file=record.input,
            severity="warning",
        )
    )
    return record


def _read_image(prefix: str, name: object) -> bytes | None:
    """The bytes of an image file, or None when it was never downloaded."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name == "..":
        return None
    try:
        with open_url(f"{prefix}/{name}") as handle:
            return handle.read()
    except OpenerError as exc:
        if open_error_is_missing(exc):
            return None
        raise


def _seekable(handle: IO[bytes]) -> IO[bytes]:
    if handle.seekable():
        return handle
    with handle:
        return io.BytesIO(handle.read())


def _jsonl_member(archive: zipfile.ZipFile, url: str) -> str:
    names = [
        n
        for n in archive.namelist()
        if n.endswith(".jsonl") and not n.endswith("/") and not n.startswith("__MACOSX")
    ]
    if len(names) != 1:
        raise ConvertError(
            f"{url} holds {len(names)} .jsonl files ({', '.join(names) or 'none'}); "
            "an MMC4 zip holds exactly one",
            fix="unzip it and pass the .jsonl files instead",
        )
    return names[0]


def _open_lines(url: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) of a .jsonl or of the one .jsonl inside a .zip; blank lines skipped.

    Opening happens now (so a missing file raises here); lines are read lazily.
    """
    handle = open_url(url)
    if url.endswith(".zip"):
        try:
            archive = zipfile.ZipFile(_seekable(handle))
        except zipfile.BadZipFile as exc:
            handle.close()
            raise ConvertError(f"{url} is not a valid zip file: {exc}") from exc
        try:
            stream: IO[bytes] = archive.open(_jsonl_member(archive, url))
        except ConvertError:
            archive.close()
            raise
    else:
        stream = handle

    def lines() -> Iterator[tuple[int, bytes]]:
        number = 0
        try:
            with stream:
                for number, line in enumerate(stream, start=1):
                    if line.strip():
                        yield number, line
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # damaged compressed data
            where = f" after line {number}" if number else ""
            raise ConvertError(
                f"{url} is damaged{where}: {exc}",
                fix="re-download the file and rerun (inputs already converted are kept)",
            ) from exc
        finally:
            handle.close()

    return lines()


def _jsonl_size(url: str) -> int:
    """Uncompressed bytes of a local input (progress units); 0 when unknown or unreadable."""
    if url_kind(url) != "local":
        return 0
    path = local_path(url)
    try:
        if url.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                return sum(i.file_size for i in archive.infolist() if i.filename.endswith(".jsonl"))
        return path.stat().st_size
    except (OSError, zipfile.BadZipFile):
        return 0


def plan_mmc4(
    docs_spec: str, options: Mmc4Options, partition: Partition | None = None
) -> list[Mmc4Task]:
    """One task per file of the expanded spec; `index` is the position the image layout uses.

    A multi-machine run picks a subset of these tasks; names and indexes stay the same. Only
    the files of this node's `partition` are looked at (existence, size for the progress bar).
    """
    inputs = expand_inputs(docs_spec)
    urls = inputs.urls
    if not urls and not inputs.globs:
        raise ConvertError(f"DOCS_SPEC {docs_spec!r} names no files")
    check_found(inputs, "DOCS_SPEC", "docs_shard_{0..23098}_v2.jsonl.zip")
    if inputs.globs and options.image_layout == "index":
        raise ConvertError(
            f"DOCS_SPEC {docs_spec!r} is a glob ({', '.join(inputs.globs[:3])}): the index image "
            "layout finds each file's images by its position in DOCS_SPEC, which a glob does "
            "not keep (missing shard numbers would shift every later file)",
            fix="write the range in brace syntax (docs_shard_{0..23098}_v2.jsonl.zip), or pass "
            "--image-layout shard-number (images by the number in each file name) or flat",
        )
    if options.image_layout == "shard-number":
        for url in urls:
            shard_number(url)
    mine = set((partition or Partition()).select(range(len(urls))))
    tasks = []
    for index, url in enumerate(urls):
        if index not in mine:  # another node's: it runs there, with its own checks
            tasks.append(Mmc4Task(url, index, options))
            continue
        local = url_kind(url) == "local"
        exists = not local or local_path(url).is_file()
        tasks.append(Mmc4Task(url, index, options, _jsonl_size(url) if exists else 0, exists))
    return tasks


def convert_mmc4(
    docs_spec: str,
    out_dir: str | Path | OutputDir,
    options: Mmc4Options,
    run: RunOptions | None = None,
) -> ConvertReport:
    """Convert raw MMC4 documents into interleaved shards, sizes.json and manifest.json.

    With `run.partition` only this node's inputs are converted (see `run_tasks`)."""
    if url_kind(options.image_dir) == "local" and not local_path(options.image_dir).is_dir():
        raise ConvertError(
            f"--image-dir {options.image_dir} is not a directory",
            fix="give the folder the MMC4 image download wrote (<image_dir>/<idx>/<name>.jpg)",
        )
    run = run or RunOptions()
    tasks = plan_mmc4(docs_spec, options, run.partition)
    return run_tasks(tasks, out_dir, kind="mmc4", run=run, strict_keys=STRICT_KEYS)
