"""Shard specs, the opener, deterministic tar writing and sample counting."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from flamingo_cli.errors import OpenerError
from flamingo_cli.shards.opener import RetryingReader, open_url
from flamingo_cli.shards.sizes import known_counts, read_sizes
from flamingo_cli.shards.spec import expand_spec, missing_local, url_kind
from flamingo_cli.shards.tar import TarReader, count_samples, split_member
from flamingo_cli.shards.write import write_sizes, write_tar


def test_expand_braces_and_double_colon() -> None:
    assert expand_spec("a/{0..2}.tar::b/{00..01}.tar") == [
        "a/0.tar",
        "a/1.tar",
        "a/2.tar",
        "b/00.tar",
        "b/01.tar",
    ]
    assert expand_spec(["x.tar", "y{1,2}.tar"]) == ["x.tar", "y1.tar", "y2.tar"]


def test_expand_globs_and_directories(tmp_path: Path) -> None:
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_spec(str(tmp_path), globs=True) == [
        str(tmp_path / "a.tar"),
        str(tmp_path / "b.tar"),
    ]
    assert expand_spec(f"{tmp_path}/*.tar", globs=True) == [
        str(tmp_path / "a.tar"),
        str(tmp_path / "b.tar"),
    ]


def test_url_kinds_and_missing(tmp_path: Path) -> None:
    (tmp_path / "here.tar").write_bytes(b"")
    assert [
        url_kind(u) for u in ("x.tar", "file:///x.tar", "s3://b/x", "pipe:cat x", "https://h/x")
    ] == [
        "local",
        "local",
        "remote",
        "pipe",
        "remote",
    ]
    urls = [str(tmp_path / "here.tar"), str(tmp_path / "gone.tar"), "s3://b/x.tar"]
    assert missing_local(urls) == [str(tmp_path / "gone.tar")]


def test_webdataset_key_rule() -> None:
    assert split_member("a/b.c/x.y.jpg") == ("a/b.c/x", "y.jpg")
    assert split_member("000001.json") == ("000001", "json")
    assert split_member("README") == ("README", "")


def samples() -> Iterator[dict[str, bytes]]:
    for i in range(3):
        yield {"__key__": f"k{i}", "txt": f"caption {i}".encode(), "json": b"{}"}


def test_tar_writing_is_deterministic_and_atomic(tmp_path: Path) -> None:
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    assert write_tar(first, samples()) == 3
    write_tar(second, samples())
    assert (
        hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # no temporaries left
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "k0.txt",
        "k0.json",
        "k1.txt",
        "k1.json",
        "k2.txt",
        "k2.json",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
    assert count_samples(str(first)) == 3


def test_count_samples_reports_a_corrupt_tar(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    write_tar(path, samples())
    data = bytearray(path.read_bytes())
    data[1100:1200] = b"\xff" * 100  # inside the second header (bytes 1024-1535)
    path.write_bytes(bytes(data))
    with pytest.raises(OpenerError, match=r"bad\.tar has a corrupt header at byte offset 1024"):
        count_samples(str(path))


def test_sizes_json_round_trip(tmp_path: Path) -> None:
    write_sizes(tmp_path, {"00000.tar": 5, "00001.tar": 7})
    assert read_sizes(str(tmp_path)) == {"00000.tar": 5, "00001.tar": 7}
    urls = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar"), str(tmp_path / "00002.tar")]
    assert known_counts(urls) == {urls[0]: 5, urls[1]: 7}
    assert read_sizes(str(tmp_path / "elsewhere")) is None
    (tmp_path / "sizes.json").write_text('{"00000.tar": "five"}')
    with pytest.raises(OpenerError, match="sample counts"):
        read_sizes(str(tmp_path))


def test_open_local_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    with open_url(str(path)) as f:
        assert f.read() == b"hello"
    with open_url(f"file://{path}") as f:
        assert f.read() == b"hello"
    with pytest.raises(OpenerError, match="cannot open"):
        open_url(str(tmp_path / "missing.bin"))


def test_pipe_is_refused_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"piped bytes")
    with pytest.raises(OpenerError) as info:
        open_url(f"pipe:cat {path}")
    assert info.value.fix is not None and "--allow-pipe" in info.value.fix
    with open_url(f"pipe:cat {path}", allow_pipe=True) as f:
        assert f.read() == b"piped bytes"


def test_failing_pipe_reports_its_status() -> None:
    handle = open_url("pipe:exit 3", allow_pipe=True)
    assert handle.read() == b""
    with pytest.raises(OpenerError, match="exited with status 3"):
        handle.close()


def test_pipe_closed_early_is_not_an_error() -> None:
    handle = open_url("pipe:yes", allow_pipe=True)
    assert handle.read(4) == b"y\ny\n"
    handle.close()


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[str]:
    handler = type(
        "Quiet",
        (http.server.SimpleHTTPRequestHandler,),
        {"log_message": lambda *a: None},
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_streams_through_fsspec(http_dir: str, tmp_path: Path) -> None:
    write_tar(tmp_path / "s.tar", samples())
    with open_url(f"{http_dir}/s.tar") as f:
        assert f.read() == (tmp_path / "s.tar").read_bytes()
    assert count_samples(f"{http_dir}/s.tar") == 3
    with pytest.raises(OpenerError):
        open_url(f"{http_dir}/missing.tar").read()


class Flaky:
    """A source that fails with a transient error after `fail_after` bytes, `failures` times."""

    def __init__(self, data: bytes, fail_after: int, failures: int) -> None:
        self.data, self.fail_after, self.failures, self.opens = data, fail_after, failures, 0

    def __call__(self) -> IO[bytes]:
        self.opens += 1
        source = self

        class Stream(io.BytesIO):
            def read(self, n: int | None = -1) -> bytes:
                if source.failures and self.tell() >= source.fail_after:
                    source.failures -= 1
                    raise ConnectionResetError("connection reset by peer")
                return super().read(min(n or 1 << 30, 7) if n and n > 0 else 7)

        return Stream(self.data)


def test_retrying_reader_resumes_at_the_offset() -> None:
    data = bytes(range(256)) * 4
    source = Flaky(data, fail_after=100, failures=2)
    reader = io.BufferedReader(RetryingReader(source, "mem://x", retries=3, backoff_s=0))
    assert reader.read() == data
    assert source.opens == 3


def test_retrying_reader_gives_up() -> None:
    source = Flaky(b"x" * 50, fail_after=10, failures=10)
    reader = io.BufferedReader(RetryingReader(source, "mem://x", retries=2, backoff_s=0))
    with pytest.raises(OpenerError, match="after 2 retries"):
        reader.read()


def test_unknown_protocol_names_the_package() -> None:
    with pytest.raises(OpenerError) as info:
        open_url("s3://bucket/shard.tar", retries=0)
    assert info.value.fix == "pip install s3fs"


def test_count_samples_reports_a_truncated_tar(tmp_path: Path) -> None:
    path = tmp_path / "cut.tar"
    write_tar(path, samples())
    path.write_bytes(path.read_bytes()[:1600])  # inside the second member's data
    with pytest.raises(OpenerError, match=r"cut\.tar"):
        count_samples(str(path))


def _tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.timeout(20)
def test_a_negative_size_field_is_a_corrupt_header_not_a_loop(tmp_path: Path) -> None:
    data = bytearray(_tar_of([(tarfile.TarInfo("a.txt"), b"x" * 2000)] * 2))
    header = 2048 + 512  # the second member's header
    data[header + 124 : header + 136] = b"-0000004000\0"
    data[header + 148 : header + 156] = b" " * 8
    checksum = sum(data[header : header + 512])
    data[header + 148 : header + 156] = b"%06o\0 " % checksum
    path = tmp_path / "negative.tar"
    path.write_bytes(bytes(data))
    with TarReader(str(path)) as reader:
        listed = reader.members()
    assert [m.name for m in listed] == ["a.txt"]
    assert reader.damage is not None and reader.damage.kind == "corrupt"
    assert reader.damage.offset == header
