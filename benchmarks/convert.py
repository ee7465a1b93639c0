"""Benchmark `convert mmc4` against a baseline doing what OpenFlamingo's reference converter does.

The baseline runs in one process: PIL decode and JPEG re-encode at quality 75, base64, uuid4
keys, one tar. Both run on the same generated corpus in this run; the script prints the ratio
and our image MB/s beside `cat | base64` of the same image bytes.

    python benchmarks/convert.py [--docs 4000] [--workers N] [--dir /tmp/flamingo-bench]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

from flamingo_cli.convert.images import ImageOptions
from flamingo_cli.convert.mmc4 import Mmc4Options, convert_mmc4
from flamingo_cli.convert.runner import RunOptions, default_workers
from flamingo_cli.shards.spec import expand_spec
from flamingo_cli.synthetic import write_raw_mmc4

DOCS_PER_SHARD = 100


def baseline(docs_spec: str, image_dir: Path, out: Path) -> tuple[int, int]:
    """Single process: decode, re-encode JPEG q75, base64, uuid keys (OpenFlamingo's recipe)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    docs = image_bytes = 0
    with tarfile.open(out / "baseline-000000.tar", "w") as tar:
        for index, url in enumerate(expand_spec(docs_spec)):
            with zipfile.ZipFile(url) as archive:
                (name,) = archive.namelist()
                text = archive.read(name).decode()
            for line in text.splitlines():
                doc = json.loads(line)
                for image in doc["image_info"]:
                    path = image_dir / str(index) / image["image_name"]
                    if not path.is_file():
                        continue
                    raw = path.read_bytes()
                    image_bytes += len(raw)
                    try:
                        pil = Image.open(io.BytesIO(raw)).convert("RGB")
                    except OSError:
                        continue
                    buffer = io.BytesIO()
                    pil.save(buffer, format="JPEG", quality=75)
                    image["image_base64"] = base64.b64encode(buffer.getvalue()).decode()
                data = json.dumps(doc).encode()
                info = tarfile.TarInfo(f"{uuid.uuid4()}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                docs += 1
    return docs, image_bytes


def evict(root: Path) -> None:
    """Flush pending writes and drop `root`'s files from the page cache: every run starts cold.

    A real MMC4 conversion reads terabytes that were never cached; cold reads also make the
    three timings comparable on a machine whose cache comes and goes.
    """
    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cat_base64(image_dir: Path) -> float:
    """Seconds for `cat <every image> | base64 > /dev/null`."""
    start = time.perf_counter()
    subprocess.run(
        f"find {image_dir} -type f -print0 | xargs -0 cat | base64 > /dev/null",
        shell=True,
        check=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000, help="documents (3 images each)")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--dir", type=Path, default=None, help="work directory (kept)")
    parser.add_argument("--skip-baseline", action="store_true", help="time ours and cat only")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="flamingo-bench-"))
    corpus = root / "corpus"
    shards = max(1, args.docs // DOCS_PER_SHARD)
    start = time.perf_counter()
    if not (corpus / "done").exists():
        shutil.rmtree(corpus, ignore_errors=True)
        raw = write_raw_mmc4(
            corpus,
            shards=shards,
            docs_per_shard=DOCS_PER_SHARD,
            images_per_doc=3,
            image_sizes=(320, 900),
            quality=85,
            noise=14,
            missing_image_rate=0.1,
            truncated_rate=0.01,
        )
        (corpus / "done").write_text(raw.docs_spec)
    docs_spec = (corpus / "done").read_text()
    image_dir = corpus / "images"
    sizes = [p.stat().st_size for p in image_dir.rglob("*.jpg")]
    total_mb = sum(sizes) / 1e6
    print(
        f"corpus: {shards * DOCS_PER_SHARD} docs, {len(sizes)} images, {total_mb:.0f} MB "
        f"(images {min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB), "
        f"built in {time.perf_counter() - start:.0f} s"
    )

    evict(corpus)
    t_cat = cat_base64(image_dir)

    evict(corpus)
    start = time.perf_counter()
    report = convert_mmc4(
        docs_spec,
        root / "ours",
        Mmc4Options(str(image_dir), image=ImageOptions()),
        RunOptions(workers=args.workers, overwrite=True),
    )
    t_ours = time.perf_counter() - start
    ours_mb = report.totals["image_bytes"] / 1e6

    print(f"ours      ({args.workers} workers): {t_ours:7.2f} s  {ours_mb / t_ours:8.1f} MB/s")
    print(f"cat | base64:                {t_cat:7.2f} s  {total_mb / t_cat:8.1f} MB/s")
    print(f"ours vs cat | base64:   {t_ours / t_cat:.2f}x the time (aim <= 3x)")
    if args.skip_baseline:
        return
    evict(corpus)
    start = time.perf_counter()
    docs, baseline_bytes = baseline(docs_spec, image_dir, root / "baseline")
    t_base = time.perf_counter() - start
    assert docs == report.totals["docs_out"], (docs, report.totals["docs_out"])
    print(
        f"baseline  (1 process, q75):  {t_base:7.2f} s  {baseline_bytes / 1e6 / t_base:8.1f} MB/s"
    )
    print(f"speed-up over baseline: {t_base / t_ours:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
