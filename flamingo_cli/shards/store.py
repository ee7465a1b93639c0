"""An output location for shards: a local directory (fast path) or any fsspec URL.

Every file is published whole or not at all: locally a temporary name renamed into place; on
object stores (s3, gs, azure) an upload only becomes an object once complete, so we write the
final key directly; on other fsspec filesystems a temporary key is moved into place.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from flamingo_cli.errors import ConvertError, OutputError
from flamingo_cli.shards.spec import local_path, url_kind
from flamingo_cli.shards.write import (
    LocalSink,
    Sink,
    TarWriter,
    json_bytes,
    output_error,
    tmp_suffix,
)

PROBE_NAME = ".write-probe"

# Object stores whose uploads become visible only when complete (a multipart upload included).
UPLOAD_COMMITS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
_PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs"}


def join_url(url: str, name: str) -> str:
    """The full path or URL of `name` inside the output location `url`."""
    return posixpath.join(url, name) if "://" in url else str(Path(url, name))


class OutputDir(ABC):
    """Files of one output location, addressed by names relative to it (`a.tar`, `d/x.json`)."""

    url: str

    def join(self, name: str) -> str:
        """The full path or URL of `name`, for messages and reports."""
        return join_url(self.url, name)

    @abstractmethod
    def open_sink(self, name: str) -> Sink:
        """A sink that publishes `name` whole when committed."""

    @abstractmethod
    def entries(self, folder: str = "") -> dict[str, int | None]:
        """{name: bytes} of everything directly in `folder` (temporaries included); None for
        what is not a plain file (a folder)."""

    def file_sizes(self, folder: str = "") -> dict[str, int]:
        """{file name: bytes} of the files directly in `folder` (temporaries included)."""
        return {name: size for name, size in self.entries(folder).items() if size is not None}

    @abstractmethod
    def read(self, names: Sequence[str]) -> dict[str, bytes]:
        """The bytes of each of `names` that exists."""

    @abstractmethod
    def remove(self, names: Sequence[str]) -> None:
        """Delete `names`; absent ones are ignored."""

    @abstractmethod
    def make_folder(self, folder: str) -> None:
        """Create `folder` (and the location itself) where the filesystem has folders."""

    def check_writable(self) -> None:
        """Write and remove a small file, so that a location we cannot write to (read-only, no
        permission) stops a run before any work; raises `OutputError`."""
        name = f"{PROBE_NAME}{tmp_suffix()}"
        try:
            self.write_bytes(name, b"")
            self.remove([name])
        except OutputError as exc:
            cause = exc.__cause__
            reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else exc.message
            raise OutputError(f"cannot write to {self.url}: {reason}", fix=exc.fix) from cause

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish `data` as `name` in one piece."""
        sink = self.open_sink(name)
        try:
            sink.file.write(data)
        except OSError as exc:
            sink.abort()
            raise output_error(sink.url, exc) from exc
        except BaseException:
            sink.abort()
            raise
        sink.commit()

    def write_json(self, name: str, data: object) -> None:
        self.write_bytes(name, json_bytes(data))

    def read_one(self, name: str) -> bytes | None:
        return self.read([name]).get(name)

    def tar_writer(self, name: str) -> TarWriter:
        return TarWriter(self.open_sink(name))


class LocalDir(OutputDir):
    """A local directory: temporary file, then rename (the fast path)."""

    def __init__(self, path: str | Path) -> None:
        self.path = local_path(str(path))
        self.url = str(self.path)
        try:
            is_file = self.path.exists() and not self.path.is_dir()
        except OSError as exc:
            raise output_error(self.path, exc, "open") from exc
        if is_file:
            raise ConvertError(
                f"--out {self.path} is a file, not a folder",
                fix="give a folder for the shards (a new one is made), or move the file away",
            )

    def open_sink(self, name: str) -> Sink:
        return LocalSink(self.path / name)

    def check_writable(self) -> None:
        """An unnamed temporary file (O_TMPFILE on Linux): nothing is left even when killed."""
        try:
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            raise output_error(self.path, exc, "write to") from exc

    def entries(self, folder: str = "") -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        try:
            with os.scandir(self.path / folder) as listing:
                for entry in listing:
                    try:
                        found[entry.name] = entry.stat().st_size if entry.is_file() else None
                    except FileNotFoundError:  # renamed or removed by another process meanwhile
                        continue
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            raise output_error(self.path / folder, exc, "list") from exc
        return found

    def read(self, names: Sequence[str]) -> dict[str, bytes]:
        found = {}
        for name in names:
            try:
                found[name] = (self.path / name).read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                continue
            except OSError as exc:
                raise output_error(self.path / name, exc, "read") from exc
        return found

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError as exc:
                raise output_error(self.path / name, exc, "remove") from exc

    def make_folder(self, folder: str) -> None:
        try:
            (self.path / folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(self.path / folder, exc, "create the folder") from exc


class FsspecSink:
    """A file on an fsspec filesystem: written to its final key when an upload is atomic, else
    to a temporary key moved into place on `commit`."""

    def __init__(self, fs: Any, path: str, *, direct: bool) -> None:
        self._fs = fs
        self._path = path
        folder, name = posixpath.split(path)
        self._target = path if direct else posixpath.join(folder, f".{name}{tmp_suffix()}")
        self._direct = direct
        try:
            self._file: IO[bytes] = fs.open(self._target, "wb")
        except OSError as exc:
            raise output_error(self.url, exc) from exc

    @property
    def name(self) -> str:
        return posixpath.basename(self._path)

    @property
    def url(self) -> str:
        return str(self._fs.unstrip_protocol(self._path))

    @property
    def file(self) -> IO[bytes]:
        return self._file

    def commit(self) -> int:
        try:
            size = self._file.tell()
            self._file.close()
            if not self._direct:
                self._fs.mv(self._target, self._path)
        except OSError as exc:
            self.abort()
            raise output_error(self.url, exc) from exc
        return int(size)

    def abort(self) -> None:
        from fsspec.spec import AbstractBufferedFile

        if self._direct and isinstance(self._file, AbstractBufferedFile):
            # Object store uploads (s3fs, gcsfs, adlfs): cancel the multipart/resumable upload
            # and mark the file closed, so that neither `close` nor garbage collection
            # finishes the upload and publishes a partial object.
            self._file.discard()
            self._file.closed = True
            return
        with contextlib.suppress(OSError):  # best effort: another error is being handled
            self._file.close()
            if self._fs.exists(self._target):
                self._fs.rm(self._target)


class FsspecDir(OutputDir):
    """A location on any filesystem fsspec can write (`s3://`, `gs://`, `memory://`, ...)."""

    def __init__(self, url: str, *, direct: bool | None = None) -> None:
        import fsspec  # deferred: fsspec loads its registry of filesystems

        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0]
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            package = _PROTOCOL_PACKAGES.get(protocol)
            raise ConvertError(
                f"cannot write to {url}: {exc}",
                fix=f"pip install {package}" if package else "check the URL scheme",
            ) from exc
        self.root = str(self.root).rstrip("/")
        self.direct = protocol in UPLOAD_COMMITS if direct is None else direct

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def open_sink(self, name: str) -> Sink:
        return FsspecSink(self.fs, self._key(name), direct=self.direct)

    def entries(self, folder: str = "") -> dict[str, int | None]:
        prefix = self._key(folder).rstrip("/")
        try:
            try:
                listing = self.fs.ls(prefix, detail=True, refresh=True)
            except TypeError:  # filesystems without a `refresh` argument
                listing = self.fs.ls(prefix, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            raise output_error(self.fs.unstrip_protocol(prefix), exc, "list") from exc
        return {
            posixpath.basename(str(e["name"]).rstrip("/")): (
                int(e.get("size") or 0) if e.get("type") == "file" else None
            )
            for e in listing
        }

    def read(self, names: Sequence[str]) -> dict[str, bytes]:
        if not names:
            return {}
        keys = {self._key(n): n for n in names}
        # One call: async filesystems (s3, gs, http) fetch the objects concurrently.
        data = self.fs.cat(list(keys), on_error="omit")
        return {keys[str(k)]: bytes(v) for k, v in data.items() if str(k) in keys}

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            key = self._key(name)
            try:
                if self.fs.exists(key):
                    self.fs.rm(key)
            except OSError as exc:
                raise output_error(self.join(name), exc, "remove") from exc

    def make_folder(self, folder: str) -> None:
        try:
            self.fs.makedirs(self._key(folder), exist_ok=True)
        except OSError as exc:
            raise output_error(self.join(folder), exc, "create the folder") from exc


def open_output(location: str | Path | OutputDir) -> OutputDir:
    """The output location of `--out`: a local directory or an fsspec URL."""
    if isinstance(location, OutputDir):
        return location
    text = str(location)
    if url_kind(text) == "pipe":
        raise ConvertError(f"--out {text} is a shell command", fix="give a directory or a URL")
    if url_kind(text) == "local":
        return LocalDir(text)
    return FsspecDir(text)
