"""An output location for shards: a local directory (fast path) or any fsspec URL.

Every file is published whole or not at all: locally a temporary name renamed into place; on
object stores (s3, gs, azure) an upload only becomes an object once complete, so we write the
final key directly; on other fsspec filesystems a temporary key is moved into place.
"""

from __future__ import annotations

import os
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from flamingo_cli.errors import ConvertError
from flamingo_cli.shards.spec import local_path, url_kind
from flamingo_cli.shards.write import LocalSink, Sink, TarWriter, json_bytes, tmp_suffix

# Object stores whose uploads become visible only when complete (a multipart upload included).
UPLOAD_COMMITS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
_PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs"}


class OutputDir(ABC):
    """Files of one output location, addressed by names relative to it (`a.tar`, `d/x.json`)."""

    url: str

    def join(self, name: str) -> str:
        """The full path or URL of `name`, for messages and reports."""
        return posixpath.join(self.url, name) if "://" in self.url else str(Path(self.url, name))

    @abstractmethod
    def open_sink(self, name: str) -> Sink:
        """A sink that publishes `name` whole when committed."""

    @abstractmethod
    def file_sizes(self, folder: str = "") -> dict[str, int]:
        """{file name: bytes} of the files directly in `folder` (temporaries included)."""

    @abstractmethod
    def read(self, names: Sequence[str]) -> dict[str, bytes]:
        """The bytes of each of `names` that exists."""

    @abstractmethod
    def remove(self, names: Sequence[str]) -> None:
        """Delete `names`; absent ones are ignored."""

    @abstractmethod
    def make_folder(self, folder: str) -> None:
        """Create `folder` (and the location itself) where the filesystem has folders."""

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish `data` as `name` in one piece."""
        sink = self.open_sink(name)
        try:
            sink.file.write(data)
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
        if self.path.exists() and not self.path.is_dir():
            raise ConvertError(f"--out {self.path} is a file", fix="give a directory")

    def open_sink(self, name: str) -> Sink:
        return LocalSink(self.path / name)

    def file_sizes(self, folder: str = "") -> dict[str, int]:
        sizes = {}
        try:
            with os.scandir(self.path / folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_file():
                            sizes[entry.name] = entry.stat().st_size
                    except FileNotFoundError:  # renamed or removed by another process meanwhile
                        continue
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return sizes

    def read(self, names: Sequence[str]) -> dict[str, bytes]:
        found = {}
        for name in names:
            try:
                found[name] = (self.path / name).read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                continue
        return found

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def make_folder(self, folder: str) -> None:
        (self.path / folder).mkdir(parents=True, exist_ok=True)


class FsspecSink:
    """A file on an fsspec filesystem: written to its final key when an upload is atomic, else
    to a temporary key moved into place on `commit`."""

    def __init__(self, fs: Any, path: str, *, direct: bool) -> None:
        self._fs = fs
        self._path = path
        folder, name = posixpath.split(path)
        self._target = path if direct else posixpath.join(folder, f".{name}{tmp_suffix()}")
        self._direct = direct
        self._file: IO[bytes] = fs.open(self._target, "wb")

    @property
    def name(self) -> str:
        return posixpath.basename(self._path)

    @property
    def file(self) -> IO[bytes]:
        return self._file

    def commit(self) -> int:
        size = self._file.tell()
        self._file.close()
        if not self._direct:
            self._fs.mv(self._target, self._path)
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

    def file_sizes(self, folder: str = "") -> dict[str, int]:
        prefix = self._key(folder).rstrip("/")
        try:
            entries = self.fs.ls(prefix, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except TypeError:  # filesystems without a `refresh` argument
            entries = self.fs.ls(prefix, detail=True)
        return {
            posixpath.basename(str(e["name"]).rstrip("/")): int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
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
            if self.fs.exists(key):
                self.fs.rm(key)

    def make_folder(self, folder: str) -> None:
        self.fs.makedirs(self._key(folder), exist_ok=True)


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
