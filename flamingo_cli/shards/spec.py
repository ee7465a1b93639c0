"""Shard specs: `::`-joined brace patterns, URL kinds, and local existence checks."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from braceexpand import braceexpand

UrlKind = Literal["local", "pipe", "remote"]

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://", "hf://", "az://", "abfs://")


def url_kind(url: str) -> UrlKind:
    """Classify a shard URL: a `pipe:` shell command, a remote fsspec URL, or a local path."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith(REMOTE_SCHEMES) or ("://" in url and not url.startswith("file://")):
        return "remote"
    return "local"


def local_path(url: str) -> Path:
    """The filesystem path of a local URL (plain path or `file://`)."""
    return Path(url.removeprefix("file://"))


def split_spec(spec: str | Sequence[str]) -> list[str]:
    """Split one spec or a list of specs at `::` into brace patterns (empty parts dropped)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    return [p.strip() for part in parts for p in part.split("::") if p.strip()]


def expand_spec(spec: str | Sequence[str], *, globs: bool = False) -> list[str]:
    """Expand brace patterns (and, when asked, local globs and directories) into shard URLs.

    `pipe:` patterns are expanded like any other: `pipe:aws s3 cp s3://b/{0..2}.tar -` gives three.
    """
    urls: list[str] = []
    for pattern in split_spec(spec):
        for url in braceexpand(pattern):
            if globs and url_kind(url) == "local":
                urls.extend(_expand_local(url))
            else:
                urls.append(url)
    return urls


def _expand_local(url: str) -> list[str]:
    path = local_path(url)
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.suffix == ".tar")
    if any(c in url for c in "*?["):
        return sorted(glob.glob(str(path))) or [url]
    return [url]


def missing_local(urls: Sequence[str]) -> list[str]:
    """The local URLs among `urls` that do not name an existing file."""
    return [u for u in urls if url_kind(u) == "local" and not local_path(u).is_file()]
