"""`convert laion`: image-caption pairs to img2dataset-layout tar shards.

Sources: img2dataset output (tar + `_stats.json` per shard), a folder of images with
same-stem `.txt` captions, or a CSV/Parquet/JSONL table of (image path, caption).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from flamingo_cli.convert.images import (
    IMAGE_EXTENSIONS,
    CheckedImage,
    CorruptImage,
    ImageOptions,
    prepare_image,
    too_large_fix,
)
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
from flamingo_cli.shards.tar import split_member
from flamingo_cli.shards.write import SplitTarWriter, fits_ustar

STRICT_KEYS = (
    "dropped_no_image",
    "dropped_no_caption",
    "bad_caption",
    "bad_names",
    "images_corrupt",
    "images_too_large",
    "count_mismatch",
    "stats_missing",
)
DEFAULT_SAMPLES_PER_SHARD = 10_000
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "filepath", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "alt", "TEXT")


@dataclass(frozen=True)
class LaionOptions:
    """What decides the output bytes besides the inputs."""

    image: ImageOptions = field(default_factory=ImageOptions)
    samples_per_shard: int | None = None
    image_column: str | None = None
    caption_column: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {**self.image.to_dict(), "samples_per_shard": self.samples_per_shard}


def _stem(url: str) -> str:
    return posixpath.basename(url).removesuffix(".tar").replace(".", "_")


def _read_optional(url: str) -> bytes | None:
    try:
        with open_url(url) as handle:
            return handle.read()
    except OpenerError as exc:
        if open_error_is_missing(exc):
            return None
        raise


_CAPTION_FIX = "save the caption as UTF-8 text (e.g. iconv -f latin1 -t utf-8)"


def _is_utf8(text: str | bytes) -> bool:
    """Whether bytes decode as UTF-8, or a string holds no undecodable bytes (surrogates that
    `surrogateescape` decoding left for them)."""
    try:
        text.decode("utf-8") if isinstance(text, bytes) else text.encode("utf-8")
    except UnicodeError:
        return False
    return True


def escape_name(name: str) -> str:
    """A name with its undecodable bytes shown as `\\xNN` escapes (printable in a message)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _image_member(sample: dict[str, bytes]) -> str | None:
    return next((ext for ext in sample if ext.lower() in IMAGE_EXTENSIONS), None)


@dataclass(frozen=True)
class Img2DatasetTask:
    """One img2dataset tar: checked against its `_stats.json`, cleaned, optionally split."""

    url: str
    options: LaionOptions
    weight: int = 0

    @property
    def name(self) -> str:
        return _stem(self.url)

    @property
    def input(self) -> str:
        return self.url

    def fingerprint(self) -> dict[str, object]:
        return {"input": self.url, **self.options.to_dict()}

    def output_names(self) -> list[str]:
        return [f"{self.name}-[0-9]*.tar" if self.options.samples_per_shard else f"{self.name}.tar"]

    def _shard_name(self, part: int) -> str:
        suffix = f"-{part}" if self.options.samples_per_shard else ""
        return f"{self.name}{suffix}.tar"

    def run(self, dest: OutputDir, progress: ProgressSink) -> TaskRecord:
        record = TaskRecord(self.name, self.url, self.fingerprint(), "converted")
        if url_kind(self.url) == "local" and not local_path(self.url).is_file():
            record.status = "missing"
            record.problem(Problem("shard not found; skipped", file=self.url, severity="warning"))
            return record
        stats_url = self.url.removesuffix(".tar") + "_stats.json"
        raw_stats = _read_optional(stats_url)
        expected: int | None = None
        if raw_stats is None:
            record.counts["stats_missing"] += 1
            record.problem(
                Problem(
                    f"no {posixpath.basename(stats_url)} beside the shard: img2dataset may not "
                    "have finished it; its samples are converted anyway",
                    file=self.url,
                    severity="warning",
                    fix="rerun img2dataset for this shard if it was interrupted",
                )
            )
        else:
            try:
                expected = int(json.loads(raw_stats)["successes"])
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise ConvertError(f"{stats_url} has no readable `successes` count: {exc}") from exc
        track = self.weight > 0
        counts_by_part: dict[int, Counter[str]] = {}
        with SplitTarWriter(
            lambda k: dest.open_sink(self._shard_name(k)),
            max_samples=self.options.samples_per_shard,
        ) as writer:
            bad_name = partial(self._bad_name, record=record)
            for sample, size in _tar_samples(self.url, bad_name):
                counts: Counter[str] = Counter()
                out = self._convert(sample, counts, record)
                if out is not None:
                    writer.write(out)
                counts_by_part.setdefault(writer.part, Counter()).update(counts)
                record.counts.update(counts)
                progress(size if track else 0, 1 if out else 0, counts["image_bytes"])
        samples_in = record.counts["samples_in"]
        if expected is not None and samples_in != expected:
            record.counts["count_mismatch"] += 1
            record.problem(
                Problem(
                    f"the tar holds {samples_in} samples but _stats.json says successes = "
                    f"{expected}",
                    file=self.url,
                    severity="warning",
                    fix="the shard may be truncated or was rewritten; re-download it to be sure",
                )
            )
        for k, (name, samples, size) in enumerate(writer.parts):
            stats = dict(sorted(counts_by_part.get(k, Counter()).items()))
            record.shards.append(ShardRecord(name, samples, size, stats))
        return record

    def _bad_name(self, name: str, why: str, record: TaskRecord) -> None:
        """A member whose name cannot be written to a shard: left out, counted and named."""
        record.counts["bad_names"] += 1
        record.problem(
            Problem(
                f"member name '{escape_name(name)}' {why}; member skipped",
                file=self.url,
                severity="warning",
                fix="rewrite the shard with short UTF-8 member names (img2dataset's keys)",
            )
        )

    def _convert(
        self, sample: dict[str, bytes], counts: Counter[str], record: TaskRecord
    ) -> dict[str, bytes] | None:
        counts["samples_in"] += 1
        key = sample["__key__"].decode()

        def skip(counter: str, message: str, fix: str) -> None:
            counts[counter] += 1
            record.problem(
                Problem(f"sample {key}: {message}", file=self.url, severity="warning", fix=fix)
            )

        image_ext = _image_member(sample)
        if image_ext is None:
            counts["dropped_no_image"] += 1
            return None
        if not sample.get("txt", b"").strip():
            counts["dropped_no_caption"] += 1
            return None
        if not _is_utf8(sample["txt"]):
            skip("bad_caption", f"{key}.txt is not UTF-8 text; sample skipped", _CAPTION_FIX)
            return None
        data = sample[image_ext]
        counts["image_bytes"] += len(data)
        try:
            checked = prepare_image(data, self.options.image)
        except ImageTooLarge as exc:
            skip(
                "images_too_large",
                f"{key}.{image_ext} is too large ({str(exc).rstrip('.')}); sample skipped",
                too_large_fix(self.options.image.max_pixels),
            )
            return None
        except CorruptImage:
            counts["images_corrupt"] += 1
            return None
        out: dict[str, bytes] = {}
        for ext, value in sample.items():
            if ext == image_ext:
                out["jpg" if self.options.image.reencode == "jpeg" else ext] = checked.data
            else:
                out[ext] = value
        counts["samples_out"] += 1
        return {"__key__": sample["__key__"], **out}


def _tar_samples(
    url: str, on_bad_name: Callable[[str, str], None]
) -> Iterator[tuple[dict[str, bytes], int]]:
    """Samples of a tar stream ({"__key__": key, ext: bytes}) and the bytes each took; members
    whose name is not UTF-8 or too long for a ustar shard go to `on_bad_name(name, why)`."""
    current: dict[str, bytes] | None = None
    size = 0
    try:
        with (
            open_url(url) as handle,
            tarfile.open(fileobj=handle, mode="r|") as archive,
        ):
            for member in archive:
                if not member.isfile():
                    continue
                if not _is_utf8(member.name):
                    on_bad_name(member.name, "is not UTF-8")
                    continue
                if not fits_ustar(member.name):
                    on_bad_name(member.name, "is too long for a ustar shard (100 bytes)")
                    continue
                key, ext = split_member(member.name)
                reader = archive.extractfile(member)
                assert reader is not None
                data = reader.read()
                if current is None or current["__key__"] != key.encode() or ext in current:
                    if current is not None:
                        yield current, size
                    current, size = {"__key__": key.encode()}, 0
                current[ext] = data
                size += 512 + len(data)
    except tarfile.TarError as exc:
        raise ConvertError(
            f"cannot read tar shard {url}: {exc}", fix="re-download or rewrite the shard"
        ) from exc
    if current is not None:
        yield current, size


@dataclass(frozen=True)
class PairItem:
    """One image and its caption (given, or in a caption file), with where it came from."""

    image: str
    caption: str | None
    caption_file: str | None
    origin: str
    line: int | None = None


@dataclass(frozen=True)
class PairChunkTask:
    """A fixed slice of a folder or table listing written as one img2dataset-style shard."""

    source: str
    chunk: int
    items: tuple[PairItem, ...]
    options: LaionOptions
    key_digits: int

    @property
    def name(self) -> str:
        return f"{self.chunk:05d}"

    @property
    def input(self) -> str:
        return f"{self.source} [{self.name}]"

    @property
    def weight(self) -> int:
        return len(self.items)

    def fingerprint(self) -> dict[str, object]:
        listing = json.dumps([list(vars(i).values()) for i in self.items]).encode()
        return {
            "input": self.source,
            "chunk": self.chunk,
            "items_sha256": hashlib.sha256(listing).hexdigest(),
            **self.options.to_dict(),
        }

    def output_names(self) -> list[str]:
        return [f"{self.name}.tar", f"{self.name}_stats.json"]

    def run(self, dest: OutputDir, progress: ProgressSink) -> TaskRecord:
        record = TaskRecord(self.name, self.input, self.fingerprint(), "converted")
        with dest.tar_writer(f"{self.name}.tar") as writer:
            for index, item in enumerate(self.items):
                counts: Counter[str] = Counter()
                key = f"{self.name}{index:0{self.key_digits}d}"
                sample = self._convert(key, item, counts, record)
                if sample is not None:
                    writer.write(sample)
                record.counts.update(counts)
                progress(1, 1 if sample else 0, counts["image_bytes"])
        if writer.samples:
            stats = dict(sorted(record.counts.items()))
            record.shards.append(ShardRecord(writer.name, writer.samples, writer.size, stats))
            dest.write_json(
                f"{self.name}_stats.json",
                {
                    "count": len(self.items),
                    "successes": writer.samples,
                    "failed_to_download": record.counts["dropped_no_image"],
                    "failed_to_resize": record.counts["images_corrupt"],
                    "status_dict": {"success": writer.samples},
                },
            )
        else:
            dest.remove([writer.name])
        return record

    def _convert(
        self, key: str, item: PairItem, counts: Counter[str], record: TaskRecord
    ) -> dict[str, str | bytes] | None:
        counts["samples_in"] += 1

        def skip(counter: str, message: str, fix: str | None = None) -> None:
            counts[counter] += 1
            origin = escape_name(item.origin)
            record.problem(
                Problem(message, file=origin, line=item.line, severity="warning", fix=fix)
            )

        if not _is_utf8(item.image):
            skip(
                "bad_names",
                f"image path '{escape_name(item.image)}' is not UTF-8; sample skipped",
                fix="rename the file (or fix the table cell) to a UTF-8 name",
            )
            return None
        data = _read_optional(item.image)
        if data is None:
            skip("dropped_no_image", f"image {item.image} not found; sample skipped")
            return None
        counts["image_bytes"] += len(data)
        caption = item.caption
        if caption is None and item.caption_file is not None:
            raw = _read_optional(item.caption_file)
            caption = raw.decode("utf-8", "surrogateescape") if raw is not None else None
        if caption is not None and not _is_utf8(caption):
            where = item.caption_file or "the caption cell"
            skip("bad_caption", f"{where} is not UTF-8 text; sample skipped", fix=_CAPTION_FIX)
            return None
        if caption is None or not caption.strip():
            skip(
                "dropped_no_caption",
                f"no caption for {item.image}; sample skipped",
                fix="add the caption (a same-stem .txt file or the table's caption cell)",
            )
            return None
        try:
            checked = prepare_image(data, self.options.image)
        except ImageTooLarge as exc:
            skip(
                "images_too_large",
                f"image {item.image} is too large ({str(exc).rstrip('.')}); sample skipped",
                fix=too_large_fix(self.options.image.max_pixels),
            )
            return None
        except CorruptImage as exc:
            skip("images_corrupt", f"image {item.image} is damaged ({exc}); sample skipped")
            return None
        counts["samples_out"] += 1
        return _pair_sample(key, item.image, caption, checked)


def _pair_sample(key: str, url: str, caption: str, image: CheckedImage) -> dict[str, str | bytes]:
    """An img2dataset-layout sample: the image, its caption and img2dataset's metadata."""
    meta = {
        "key": key,
        "url": url,
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": image.width,
        "height": image.height,
        "original_width": image.width,
        "original_height": image.height,
        "exif": None,
        "sha256": hashlib.sha256(image.data).hexdigest(),
    }
    return {
        "__key__": key,
        image.extension: image.data,
        "txt": caption.encode(),
        "json": json.dumps(meta).encode(),
    }


def _join(base: str, path: str) -> str:
    if url_kind(path) != "local" or path.startswith("/") or path.startswith("file://"):
        return path
    return posixpath.join(base, path) if base else path


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ConvertError(
                f"the table has no column {wanted!r} (columns: {', '.join(columns)})",
                fix=f"pass --{what}-column with one of those names",
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ConvertError(
        f"cannot tell which column holds the {what} (columns: {', '.join(columns)})",
        fix=f"pass --{what}-column NAME",
    )


def _table_text(url: str, raw: bytes) -> str:
    """A CSV/TSV/JSONL table as text (a UTF-8 BOM dropped); not UTF-8 is an error that names
    the line, since guessing the encoding would change captions silently."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConvertError(
            f"{url}:{line}: the table is not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r} "
            f"at offset {exc.start})",
            fix="convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT` for Latin-1",
        ) from None


def _jsonl_rows(url: str, text: str) -> list[tuple[int, dict[str, object]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ConvertError(
                f"{url}:{number}: not a JSON object ({exc})", fix="repair the line"
            ) from exc
        if not isinstance(row, dict):
            raise ConvertError(f"{url}:{number}: not a JSON object", fix="repair the line")
        rows.append((number, row))
    return rows


def _read_table(url: str, raw: bytes) -> tuple[list[str], list[tuple[int, dict[str, object]]]]:
    """(column names, (line or row number, row)) of a table file."""
    if url.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowException, OSError) as exc:
            raise ConvertError(
                f"{url} is not a readable Parquet table: {exc}",
                fix="rewrite or re-download the file",
            ) from exc
        return list(table.column_names), [(i + 1, r) for i, r in enumerate(table.to_pylist())]
    text = _table_text(url, raw)
    if url.endswith(".jsonl"):
        rows = _jsonl_rows(url, text)
        return sorted({k for _, r in rows for k in r}), rows
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if url.endswith(".tsv") else ",")
    try:
        return list(reader.fieldnames or []), [(reader.line_num, dict(r)) for r in reader]
    except csv.Error as exc:
        raise ConvertError(f"{url}:{reader.line_num}: {exc}", fix="repair the line") from exc


def _cell(value: object) -> str:
    """A table cell as text; bytes (Parquet binary columns) decoded as UTF-8, undecodable bytes
    kept as surrogates so the sample is skipped as not UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def table_rows(url: str, options: LaionOptions) -> list[PairItem]:
    """(image, caption) rows of a CSV/TSV/Parquet/JSONL table; relative paths from its folder."""
    base = posixpath.dirname(url)
    with open_url(url) as handle:
        raw = handle.read()
    columns, rows = _read_table(url, raw)
    image_col = _pick(columns, options.image_column, IMAGE_COLUMNS, "image")
    caption_col = _pick(columns, options.caption_column, CAPTION_COLUMNS, "caption")
    items = []
    for number, row in rows:
        image, caption = row.get(image_col), row.get(caption_col)
        items.append(
            PairItem(
                _join(base, _cell(image)) if image else "",
                None if caption is None else _cell(caption),
                None,
                url,
                number,
            )
        )
    return items


def folder_items(directory: Path) -> list[PairItem]:
    """Images under `directory` (sorted by relative path) with their same-stem `.txt` captions."""
    items = []
    for path in sorted(directory.rglob("*"), key=lambda p: p.relative_to(directory).as_posix()):
        if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
            items.append(PairItem(str(path), None, str(path.with_suffix(".txt")), str(path)))
    return items


def plan_laion(
    src: str, options: LaionOptions, partition: Partition | None = None
) -> list[Img2DatasetTask] | list[PairChunkTask]:
    """Tasks for `src`: one per img2dataset tar, or one per fixed slice of a folder or table.

    Only the tars of this node's `partition` are looked at (size for the progress bar)."""
    is_local = url_kind(src) == "local"
    if is_local and not any(c in src for c in "{*?[") and not local_path(src).exists():
        raise ConvertError(f"SRC {src} does not exist", fix="check the path")
    if src.endswith(TABLE_SUFFIXES):
        return _chunks(src, table_rows(src, options), options)
    if options.image_column or options.caption_column:
        raise ConvertError("--image-column/--caption-column only apply to a table source")
    if is_local and local_path(src).is_dir():
        directory = local_path(src)
        tars = sorted(directory.glob("*.tar"))
        if not tars:
            items = folder_items(directory)
            if not items:
                raise ConvertError(
                    f"{src} holds no .tar shards and no images",
                    fix="give img2dataset output, a folder of images with .txt captions, or a table",
                )
            return _chunks(src, items, options)
        urls = [str(t) for t in tars]
    else:
        inputs = expand_inputs(src)
        urls = inputs.urls
        if urls or inputs.globs:
            check_found(inputs, "SRC", "shards/{00000..00099}.tar")
    bad = [u for u in urls if not u.endswith(".tar")]
    if bad or not urls:
        raise ConvertError(
            f"SRC {src!r} is neither img2dataset .tar shards, a folder nor a table"
            + (f" (not a .tar: {', '.join(bad[:3])})" if bad else ""),
            fix="give shards/{00000..00099}.tar, a directory, or a .csv/.parquet/.jsonl table",
        )
    mine = set((partition or Partition()).select(range(len(urls))))
    return [
        Img2DatasetTask(
            u,
            options,
            local_path(u).stat().st_size
            if i in mine and url_kind(u) == "local" and local_path(u).is_file()
            else 0,
        )
        for i, u in enumerate(urls)
    ]


def _chunks(source: str, items: list[PairItem], options: LaionOptions) -> list[PairChunkTask]:
    per = options.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
    digits = max(4, len(str(per - 1)))
    return [
        PairChunkTask(source, k, tuple(items[start : start + per]), options, digits)
        for k, start in enumerate(range(0, len(items), per))
    ]


def convert_laion(
    src: str,
    out_dir: str | Path | OutputDir,
    options: LaionOptions,
    run: RunOptions | None = None,
) -> ConvertReport:
    """Convert image-caption pairs into img2dataset-layout shards, sizes.json and manifest.json.

    With `run.partition` only this node's inputs are converted (see `run_tasks`)."""
    run = run or RunOptions()
    tasks = plan_laion(src, options, run.partition)
    return run_tasks(tasks, out_dir, kind="laion", run=run, strict_keys=STRICT_KEYS)
