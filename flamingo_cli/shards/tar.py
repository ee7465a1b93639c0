"""Reading tar shards: webdataset's key rule and sample counting from member headers."""

from __future__ import annotations

import tarfile

from flamingo_cli.errors import OpenerError
from flamingo_cli.shards.opener import open_url
from flamingo_cli.shards.spec import local_path, url_kind


def split_member(name: str) -> tuple[str, str]:
    """Split a member name into (sample key, extension) at the first dot of its file name.

    This is webdataset's rule, so `a/b.c/x.y.jpg` gives key `a/b.c/x` and extension `y.jpg`.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def count_samples(url: str, *, allow_pipe: bool = False) -> int:
    """Number of samples in a tar shard: runs of consecutive members sharing a key.

    Local files are read by seeking from header to header; other URLs are streamed.
    """
    count = 0
    previous: str | None = None
    local = url_kind(url) == "local"
    try:
        with (
            tarfile.open(local_path(url), mode="r:")
            if local
            else tarfile.open(fileobj=open_url(url, allow_pipe=allow_pipe), mode="r|")
        ) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _ = split_member(member.name)
                if key != previous:
                    count += 1
                    previous = key
            end = archive.offset
    except (tarfile.TarError, OSError) as exc:
        raise OpenerError(f"cannot read tar shard {url}: {exc}") from exc
    if local:
        _check_end(url, end)
    return count


def _check_end(url: str, offset: int) -> None:
    """tarfile stops quietly at a bad header or a cut-off file; tell those from a real end."""
    path = local_path(url)
    size = path.stat().st_size
    if offset > size:
        raise OpenerError(
            f"tar shard {url} is truncated: its last member ends at byte {offset}, "
            f"the file has {size}",
            fix="rewrite or re-download the shard",
        )
    with path.open("rb") as handle:
        handle.seek(offset)
        block = handle.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0"):
        raise OpenerError(
            f"tar shard {url} has a corrupt header at byte offset {offset}",
            fix="rewrite or re-download the shard",
        )
