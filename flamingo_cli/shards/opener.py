"""The one opener for shard and file URLs: local paths, fsspec URLs with retries, `pipe:`."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Callable
from typing import IO, Any

from flamingo_cli.errors import OpenerError
from flamingo_cli.shards.spec import local_path, url_kind

# Errors worth another try on a remote stream; "not found" and permission errors are final.
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_BUFFER = 1 << 20
_SIGPIPE_STATUSES = (-13, 141)  # the producer was cut off because we stopped reading early
_PROTOCOL_PACKAGES = {
    "http": "aiohttp",
    "https": "aiohttp",
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
}


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError | TimeoutError | ConnectionError) and not isinstance(exc, _FINAL)


def open_url(
    url: str,
    *,
    allow_pipe: bool = False,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> IO[bytes]:
    """Open `url` for binary reading.

    Local paths and `file://` open directly; `pipe:CMD` runs CMD in a shell and reads its
    stdout (refused unless `allow_pipe`); every other URL streams through fsspec, reopening
    at the current offset after transient errors, up to `retries` times.
    """
    kind = url_kind(url)
    if kind == "local":
        try:
            return local_path(url).open("rb")
        except OSError as exc:
            raise OpenerError(f"cannot open {url}: {exc.strerror or exc}") from exc
    if kind == "pipe":
        if not allow_pipe:
            raise OpenerError(
                f"refusing to run the shell command of {url!r}",
                fix="set data.allow_pipe = true in the recipe or pass --allow-pipe "
                "if you trust this command",
            )
        return io.BufferedReader(_PipeReader(url.removeprefix("pipe:")), _BUFFER)
    reader = RetryingReader(lambda: _fsspec_open(url), url, retries=retries, backoff_s=backoff_s)
    return io.BufferedReader(reader, _BUFFER)


def _fsspec_open(url: str) -> IO[bytes]:
    import fsspec  # deferred: fsspec pulls in its registry of filesystems

    try:
        handle: IO[bytes] = fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as exc:
        protocol = url.split("://", 1)[0]
        package = _PROTOCOL_PACKAGES.get(protocol)
        fix = f"pip install {package}" if package else "check the URL scheme"
        raise OpenerError(f"cannot open {url}: {exc}", fix=fix) from exc
    return handle


class RetryingReader(io.RawIOBase):
    """A read-only stream that reopens its source at the current offset after transient errors."""

    def __init__(
        self,
        factory: Callable[[], IO[bytes]],
        url: str,
        *,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        super().__init__()
        self._factory = factory
        self._url = url
        self._retries = retries
        self._backoff_s = backoff_s
        self._pos = 0
        self._handle: IO[bytes] | None = None
        self._handle = self._with_retries(self._reopen)

    def _reopen(self) -> IO[bytes]:
        if self._handle is not None:
            self._close_handle()
        handle = self._factory()
        if self._pos:
            handle.seek(self._pos)
        return handle

    def _close_handle(self) -> None:
        try:
            if self._handle is not None:
                self._handle.close()
        except OSError:
            pass
        self._handle = None

    def _with_retries(self, action: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return action()
            except OpenerError:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise OpenerError(f"cannot read {self._url}: {exc}") from exc
                attempt += 1
                if attempt > self._retries:
                    raise OpenerError(
                        f"cannot read {self._url} after {self._retries} retries: {exc}",
                        fix="check the network or the object store, then rerun",
                    ) from exc
                time.sleep(self._backoff_s * 2 ** (attempt - 1))
                self._handle = self._reopen()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        def attempt() -> int:
            assert self._handle is not None
            data = self._handle.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)

        n: int = self._with_retries(attempt)
        self._pos += n
        return n

    def close(self) -> None:
        self._close_handle()
        super().close()


class _PipeReader(io.RawIOBase):
    """stdout of a shell command; closing waits for it and reports a failed exit status."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self._command = command
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(len(buffer))
        buffer[: len(data)] = data
        self._eof = self._eof or not data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        status = self._proc.wait()
        super().close()
        if status != 0 and not (status in _SIGPIPE_STATUSES and not self._eof):
            raise OpenerError(f"command {self._command!r} exited with status {status}")
