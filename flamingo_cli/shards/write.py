"""Deterministic, crash-safe shard writing: fixed tar metadata, temporary name then rename."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from flamingo_cli.shards.sizes import SIZES_FILE

FIXED_MTIME = 0  # byte-identical reruns: no wall-clock time in the archive


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


Sample = Mapping[str, str | bytes]


def write_tar(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples (each {"__key__": key, ext: bytes, ...}) to a tar; return the sample count.

    Members are written in the sample's key order with fixed mtime, owner and mode; the file
    appears under its name only once complete.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    count = 0
    with (
        tmp.open("wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for sample in samples:
            key = sample["__key__"]
            key_text = key.decode() if isinstance(key, bytes) else str(key)
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                if not isinstance(data, bytes):
                    raise TypeError(f"member {key_text}.{ext} must be bytes")
                info = tarfile.TarInfo(f"{key_text}.{ext}")
                info.size = len(data)
                info.mtime = FIXED_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            count += 1
    tmp.replace(path)
    return count


def write_json_atomic(path: str | Path, data: object) -> None:
    """Write JSON (sorted keys, trailing newline) under a temporary name, then rename."""
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_sizes(directory: str | Path, counts: Mapping[str, int]) -> Path:
    """Write `sizes.json` ({shard file name: samples}) in `directory` atomically."""
    path = Path(directory) / SIZES_FILE
    write_json_atomic(path, dict(counts))
    return path
