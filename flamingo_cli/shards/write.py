"""Deterministic, crash-safe shard writing: fixed tar metadata, temporary name then rename.

Bytes go to a `Sink`, which publishes a file only once it is complete. `LocalSink` (a
temporary file renamed on commit) is the fast path; `shards.store` adds sinks for any
filesystem fsspec can write, so one `TarWriter` serves both.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, TypeVar

from flamingo_cli.errors import FlamingoError, OutputError
from flamingo_cli.shards.sizes import SIZES_FILE

FIXED_MTIME = 0  # byte-identical reruns: no wall-clock time in the archive
TMP_MARKER = ".tmp-"


def tmp_suffix() -> str:
    """`.tmp-<host>-<pid>`: unique per process even when machines share one output location."""
    host = socket.gethostname().replace("/", "_") or "host"
    return f"{TMP_MARKER}{host}-{os.getpid()}"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{tmp_suffix()}")


_FIXES = {
    errno.EROFS: "the filesystem is mounted read-only: choose an output folder on a writable one",
    errno.EACCES: "you may not write there: choose another output folder, or get write access "
    "to it (`ls -ld` shows its owner and mode)",
    errno.ENOTDIR: "a file is where a folder of the path should be: choose another output "
    "folder, or move that file away",
    errno.EISDIR: "a folder is in the way of a file the run writes: remove or rename the "
    "folder, or choose another output folder",
    errno.EEXIST: "a file is in the way of a folder the run makes: remove or rename the file, "
    "or choose another output folder",
    errno.ENOSPC: "the disk is full: free some space or choose another output folder, then "
    "rerun (finished files are kept)",
    errno.EDQUOT: "your disk quota is used up: free some space or choose another output "
    "folder, then rerun (finished files are kept)",
}
_FIXES[errno.EPERM] = _FIXES[errno.EACCES]
# Filesystems that raise an OSError subclass without an errno (fsspec backends often do).
_ERRNO_OF_TYPE: dict[type[OSError], int] = {
    PermissionError: errno.EACCES,
    NotADirectoryError: errno.ENOTDIR,
    IsADirectoryError: errno.EISDIR,
    FileExistsError: errno.EEXIST,
}


def _file_in_the_way(path: Path) -> Path | None:
    """The first ancestor of `path` that exists and is not a folder."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def output_error(where: str | Path, exc: OSError, action: str = "write") -> OutputError:
    """`OutputError` for an OS error met while writing (or listing, removing) `where`: the path,
    the reason and a fix chosen by the errno."""
    code = exc.errno or _ERRNO_OF_TYPE.get(type(exc), 0)
    reason = exc.strerror or str(exc) or type(exc).__name__
    if code == errno.ENOTDIR and isinstance(where, Path):
        blocking = _file_in_the_way(where)
        if blocking is not None:
            reason = f"{blocking} is a file, not a folder"
    return OutputError(
        f"cannot {action} {where}: {reason}",
        fix=_FIXES.get(code, "check the output location and rerun"),
    )


class Sink(Protocol):
    """A file being written: bytes go to `file`; `commit` publishes it whole, `abort` drops it."""

    @property
    def name(self) -> str: ...  # the final file name (no folder)

    @property
    def url(self) -> str: ...  # the final path or URL (for messages)

    @property
    def file(self) -> IO[bytes]: ...

    def commit(self) -> int: ...  # returns the size in bytes

    def abort(self) -> None: ...


class LocalSink:
    """A local file written under a temporary name and renamed into place on `commit`.

    An OS error opening or publishing it is an `OutputError` naming the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tmp = _tmp_name(self.path)
        try:
            self._file = self._tmp.open("wb")  # closed by commit/abort
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def url(self) -> str:
        return str(self.path)

    @property
    def file(self) -> IO[bytes]:
        return self._file

    def commit(self) -> int:
        try:
            size = self._file.tell()
            self._file.close()
            self._tmp.replace(self.path)
        except OSError as exc:
            self.abort()
            raise output_error(self.path, exc) from exc
        return size

    def abort(self) -> None:
        """Drop the temporary file (best effort: this runs while another error is handled)."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


def json_bytes(data: object) -> bytes:
    """The one JSON layout of every file we write: sorted keys, indent 2, trailing newline."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


Sample = Mapping[str, str | bytes]


def member_bytes(size: int) -> int:
    """Bytes one tar member of `size` data bytes takes: a header block plus padded data."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class MemberNameError(FlamingoError):
    """A member name that a ustar header cannot hold."""


def fits_ustar(name: str) -> bool:
    """Whether `name` fits a ustar header: at most 100 bytes, or 255 split at a `/` (155 + 100)."""
    try:
        member_info(name, 0).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    except ValueError:
        return False
    return True


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """The header of one member: fixed mtime, owner and mode, so that reruns give equal bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sample_bytes(sample: Sample) -> int:
    """Bytes a sample adds to a tar written by `TarWriter`."""
    return sum(
        member_bytes(len(data))
        for ext, data in sample.items()
        if not ext.startswith("__") and isinstance(data, bytes)
    )


class _Published(ABC):
    """A writer used as a context manager: closed (published) when the block ends, aborted
    (nothing published) when it raises."""

    @abstractmethod
    def close(self) -> object: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_W = TypeVar("_W", bound=_Published)


class TarWriter(_Published):
    """A tar shard written one sample at a time to a sink (a local path: temporary file).

    Members get fixed mtime, owner and mode, so the same samples give the same bytes. `close`
    publishes the shard; leaving the `with` block through an exception drops it.
    """

    def __init__(self, target: str | Path | Sink) -> None:
        self._sink: Sink = LocalSink(target) if isinstance(target, str | Path) else target
        self.name = self._sink.name
        self.samples = 0
        self.size = 0  # file bytes, known once closed
        self._raw = self._sink.file
        # The writer owns the sink: `close`/`abort` (or the `with` block) finishes it.
        self._tar = tarfile.open(fileobj=self._raw, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    @property
    def bytes_written(self) -> int:
        """Bytes of the tar so far (its end-of-archive padding not included)."""
        return self._tar.offset

    def write(self, sample: Sample) -> int:
        """Append one sample ({"__key__": key, ext: bytes, ...}); return the bytes it added."""
        key = sample["__key__"]
        key_text = key.decode() if isinstance(key, bytes) else str(key)
        before = self._tar.offset
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            if not isinstance(data, bytes):
                raise TypeError(f"member {key_text}.{ext} must be bytes")
            try:
                self._add(member_info(f"{key_text}.{ext}", len(data)), data)
            except OSError as exc:
                raise output_error(self._sink.url, exc) from exc
        self.samples += 1
        return self._tar.offset - before

    def _add(self, info: tarfile.TarInfo, data: bytes) -> None:
        """What `TarFile.addfile` does (same bytes), without copying `data` in small chunks."""
        tar = self._tar
        try:
            header = info.tobuf(tar.format, tar.encoding, tar.errors)
        except ValueError as exc:  # a name too long for ustar
            raise MemberNameError(
                f"cannot write member {info.name!r} to {self._sink.url}: {exc} (a ustar shard "
                "holds names of up to 100 bytes, or 255 split at a '/')",
                fix="shorten the input file name (shard keys start with it)",
            ) from exc
        padding = -len(data) % tarfile.BLOCKSIZE
        self._raw.write(header)
        self._raw.write(data)
        self._raw.write(b"\0" * padding)
        tar.offset += len(header) + len(data) + padding

    def close(self) -> int:
        """Finish the archive and publish it under its final name; return its size in bytes."""
        try:
            self._tar.close()
        except OSError as exc:
            self._sink.abort()
            raise output_error(self._sink.url, exc) from exc
        self.size = self._sink.commit()
        return self.size

    def abort(self) -> None:
        """Drop the unfinished archive."""
        with contextlib.suppress(OSError):
            self._tar.close()
        self._sink.abort()


class SplitTarWriter(_Published):
    """Samples spread over numbered shards, a new one started when a size limit would be passed.

    `name(k)` gives the path (or sink) of part k. A part holds at most `max_samples` samples and
    at most `max_bytes` bytes unless a single sample is larger. Each part is a `TarWriter`;
    `parts` lists (file name, samples, file bytes) of the finished ones.
    """

    def __init__(
        self,
        name: Callable[[int], str | Path | Sink],
        *,
        max_samples: int | None = None,
        max_bytes: int | None = None,
        on_new_part: Callable[[int], None] | None = None,
    ) -> None:
        self._name = name
        self._max_samples = max_samples
        self._max_bytes = max_bytes
        self._on_new_part = on_new_part
        self._current: TarWriter | None = None
        self.parts: list[tuple[str, int, int]] = []

    @property
    def part(self) -> int:
        """Index of the part the next sample goes to when it fits."""
        return len(self.parts)

    def fits(self, sample: Sample) -> bool:
        """Whether `sample` goes into the open part (False when a new part must start)."""
        current = self._current
        if current is None or current.samples == 0:
            return current is not None
        if self._max_samples is not None and current.samples >= self._max_samples:
            return False
        # 2 end blocks; tarfile pads the archive to a multiple of its record size on close.
        end = (
            -(
                -(current.bytes_written + sample_bytes(sample) + 2 * tarfile.BLOCKSIZE)
                // tarfile.RECORDSIZE
            )
            * tarfile.RECORDSIZE
        )
        return self._max_bytes is None or end <= self._max_bytes

    def write(self, sample: Sample) -> int:
        """Write `sample`, starting a new part first when it does not fit."""
        if not self.fits(sample):
            self._finish()
            self._current = TarWriter(self._name(len(self.parts)))
            if self._on_new_part is not None:
                self._on_new_part(len(self.parts))
        assert self._current is not None
        return self._current.write(sample)

    def _finish(self) -> None:
        if self._current is not None:
            size = self._current.close()
            self.parts.append((self._current.name, self._current.samples, size))
            self._current = None

    def close(self) -> list[tuple[str, int, int]]:
        """Finish the open part; return every part written."""
        self._finish()
        return self.parts

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None


def write_tar(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples (each {"__key__": key, ext: bytes, ...}) to a tar; return the sample count.

    Members are written in the sample's key order with fixed mtime, owner and mode; the file
    appears under its name only once complete.
    """
    with TarWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.samples


def write_json_atomic(path: str | Path, data: object) -> None:
    """Write JSON (sorted keys, trailing newline) under a temporary name, then rename."""
    sink = LocalSink(path)
    try:
        sink.file.write(json_bytes(data))
    except OSError as exc:
        sink.abort()
        raise output_error(sink.url, exc) from exc
    except BaseException:
        sink.abort()
        raise
    sink.commit()


def write_sizes(directory: str | Path, counts: Mapping[str, int]) -> Path:
    """Write `sizes.json` ({shard file name: samples}) in `directory` atomically."""
    path = Path(directory) / SIZES_FILE
    write_json_atomic(path, dict(counts))
    return path
