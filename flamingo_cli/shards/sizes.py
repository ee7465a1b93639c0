"""`sizes.json` beside shards: {shard file name: sample count} (open_clip convention)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence

from flamingo_cli.errors import OpenerError
from flamingo_cli.shards.opener import open_url
from flamingo_cli.shards.spec import local_path, url_kind

SIZES_FILE = "sizes.json"


def read_sizes(directory: str, *, allow_pipe: bool = False) -> dict[str, int] | None:
    """The sizes.json of a shard directory (local path or URL), or None when there is none."""
    if directory.startswith("pipe:"):
        return None
    url = posixpath.join(directory, SIZES_FILE) if directory else SIZES_FILE
    if url_kind(url) == "local" and not local_path(url).is_file():
        return None
    try:
        with open_url(url, allow_pipe=allow_pipe) as handle:
            data = json.load(handle)
    except (OpenerError, FileNotFoundError):
        return None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise OpenerError(
            f"{url} is not valid JSON: {exc}", fix="rewrite it with `inspect-shards --write-sizes`"
        ) from exc
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise OpenerError(
            f"{url} must map shard file names to sample counts",
            fix="rewrite it with `inspect-shards --write-sizes`",
        )
    return {str(k): int(v) for k, v in data.items()}


def known_counts(urls: Sequence[str], *, allow_pipe: bool = False) -> dict[str, int]:
    """Sample counts of the shards in `urls` that a sizes.json beside them lists."""
    by_dir: dict[str, dict[str, int] | None] = {}
    counts: dict[str, int] = {}
    for url in urls:
        directory, name = posixpath.split(url)
        if directory not in by_dir:
            by_dir[directory] = read_sizes(directory, allow_pipe=allow_pipe)
        sizes = by_dir[directory]
        if sizes is not None and name in sizes:
            counts[url] = sizes[name]
    return counts
