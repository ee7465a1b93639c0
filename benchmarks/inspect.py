"""Benchmark `inspect-shards` fast mode against `tar -tf` and webdataset, and `--deep` per core.

Writes LAION-like shards (JPEG ~30 KB, caption, JSON) and MMC4-like shards to a scratch
directory once, warms the page cache, then times each reader over the same shards (median
of --repeats runs) using all cores for every contender. Prints GB/s and the ratios.

    python benchmarks/inspect.py --gb 1.5
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the standard library's `inspect`: keep its folder off the path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from multiprocessing import get_context

import numpy as np
from PIL import Image

from flamingo_cli.inspect.run import InspectOptions, groups_from_specs, inspect_shards
from flamingo_cli.shards.write import write_sizes, write_tar
from flamingo_cli.synthetic import mmc4_samples

SAMPLES_PER_SHARD = 4000


def jpegs(count: int, seed: int) -> list[bytes]:
    """Distinct noisy JPEGs of about 30 KB (256x256, quality 85), like resized web images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((256, 256), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-25, 26, (256, 256, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=85
        )
        out.append(buffer.getvalue())
    return out


def laion_like(shard: int, images: list[bytes]) -> Iterator[dict[str, str | bytes]]:
    rng = random.Random(shard)
    for i in range(SAMPLES_PER_SHARD):
        key = f"{shard:05d}{i:04d}"
        caption = " ".join(rng.choice(("a", "red", "photo", "of", "the", "dog")) for _ in range(12))
        meta = {"key": key, "caption": caption, "status": "success", "width": 256, "height": 256}
        yield {
            "__key__": key,
            "jpg": images[(shard * 7 + i) % len(images)],
            "txt": caption.encode(),
            "json": json.dumps(meta).encode(),
        }


def write_with_webdataset(path: Path, samples: Iterator[dict[str, str | bytes]]) -> int:
    """The shard as webdataset's TarWriter (and so img2dataset) writes it: a pax header with
    the float mtime before every member."""
    import webdataset as wds

    count = 0
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count


def make_laion(directory: Path, gigabytes: float, writer: str) -> list[Path]:
    images = jpegs(64, seed=0)
    per_shard = SAMPLES_PER_SHARD * (sum(map(len, images)) / len(images) + 3 * 512 + 600)
    shards = max(2, round(gigabytes * 1e9 / per_shard))
    directory = directory / writer
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{i:05d}.tar" for i in range(shards)]
    if all(p.exists() for p in paths) and (directory / "sizes.json").exists():
        return paths
    write = write_tar if writer == "flamingo" else write_with_webdataset
    counts = {}
    for i, path in enumerate(paths):
        counts[path.name] = write(path, laion_like(i, images))
    write_sizes(directory, counts)
    return paths


def make_mmc4(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "00000.tar"
    if not path.exists():
        write_tar(path, mmc4_samples(0, 400, seed=0, size=96, images_per_doc=3))
    return [path]


def _cpu() -> float:
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def warm(paths: list[Path]) -> None:
    """Read every shard once, so that the next contender starts from a warm page cache."""
    for path in paths:
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def timed(
    contenders: dict[str, Callable[[], object]], repeats: int, paths: list[Path]
) -> dict[str, tuple[float, float]]:
    """Median wall seconds and median CPU seconds (this process and its children) of each
    contender, taking turns, each run right after the shards were read once (some virtual
    machines keep little in their page cache, which would favour whoever runs first)."""
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    cpus: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            warm(paths)
            start, cpu = time.perf_counter(), _cpu()
            fn()
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(_cpu() - cpu)
    return {
        name: (statistics.median(walls[name]), statistics.median(cpus[name])) for name in contenders
    }


def run_tar(paths: list[Path], workers: int) -> None:
    command = f"xargs -P{workers} -n1 tar -tf > /dev/null"
    subprocess.run(command, shell=True, input="\n".join(map(str, paths)), text=True, check=True)


def _wds_count(urls: list[str]) -> int:
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return sum(1 for _ in dataset)


def run_webdataset(paths: list[Path], workers: int) -> int:
    urls = [str(p) for p in paths]
    parts = [urls[i::workers] for i in range(workers)]
    with get_context("fork").Pool(workers) as pool:
        return sum(pool.map(_wds_count, parts))


def run_ours(paths: list[Path], workers: int, deep: bool = False) -> int:
    options = InspectOptions(workers=workers, deep=deep)
    report = inspect_shards(groups_from_specs([str(p) for p in paths], options), options)
    assert report.ok, report.findings()[:3]
    return sum(s.samples for s in report.unique_shards())


def run_cli(paths: list[Path], workers: int) -> None:
    """The command as a user runs it. Python caches compiled modules unless
    PYTHONDONTWRITEBYTECODE is set (some sandboxes set it): unset, as on users' machines."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "flamingo_cli",
            "-q",
            "inspect-shards",
            str(paths[0].parent),
            "--workers",
            str(workers),
            "--json",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )


TYPER_FLOOR = """
import typer

app = typer.Typer()


@app.command()
def main(path: str, workers: int = 1) -> None:
    pass


app()
"""


def run_typer_floor() -> None:
    """The start-up and argument parsing every Typer command pays, for scale."""
    subprocess.run([sys.executable, "-c", TYPER_FLOOR, "x", "--workers", "2"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.5, help="size of the LAION-like shards")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flamingo-bench-inspect"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", action="store_true", help="keep the generated shards")
    parser.add_argument(
        "--writer",
        choices=("flamingo", "webdataset"),
        default="flamingo",
        help="write the shards as `flamingo convert` does (ustar headers) or as webdataset's "
        "TarWriter and img2dataset do (a pax header before every member)",
    )
    args = parser.parse_args()

    laion = make_laion(args.dir / "laion", args.gb, args.writer)
    mmc4 = make_mmc4(args.dir / "mmc4")
    total = sum(p.stat().st_size for p in laion)
    warm(laion)
    samples = run_ours(laion, args.workers)
    assert run_webdataset(laion, args.workers) == samples
    w = args.workers
    print(
        f"{len(laion)} shards written by {args.writer}, {total / 1e9:.2f} GB, {samples:,} "
        f"samples, {w} worker(s), "
        f"median of {args.repeats}, warm cache"
    )
    results = timed(
        {
            "inspect-shards (library)": lambda: run_ours(laion, w),
            "inspect-shards (CLI process)": lambda: run_cli(laion, w),
            "tar -tf (one process)": lambda: run_tar(laion, 1),
            f"tar -tf (xargs -P{w})": lambda: run_tar(laion, w),
            f"webdataset ({w} processes)": lambda: run_webdataset(laion, w),
            "a one-option Typer program": run_typer_floor,
        },
        args.repeats,
        laion,
    )
    print(f"  {'':32s} {'wall':>8s} {'GB/s':>7s} {'CPU s':>7s}")
    floor = results.pop("a one-option Typer program")[0]
    for name, (wall, cpu) in results.items():
        print(f"  {name:32s} {wall:7.3f}s {total / wall / 1e9:7.2f} {cpu:7.3f}")
    ours = results["inspect-shards (library)"]
    cli = results["inspect-shards (CLI process)"]
    tar = results[f"tar -tf (xargs -P{w})"]
    wds = results[f"webdataset ({w} processes)"]
    tar1 = results["tar -tf (one process)"]
    for label, base in (
        ("tar -tf, one process", tar1),
        (f"tar -tf -P{w}", tar),
        ("webdataset", wds),
    ):
        print(
            f"  vs {label}: wall {base[0] / ours[0]:.2f}x (library), {base[0] / cli[0]:.2f}x "
            f"(CLI); CPU {base[1] / ours[1]:.2f}x (library), {base[1] / cli[1]:.2f}x (CLI)"
        )

    fixed = cli[0] - ours[0]
    print(
        f"  the CLI's fixed cost: {fixed:.3f}s over the library call, of which "
        f"{floor:.3f}s is what any Typer program takes to start and parse here"
    )
    for label, base in (("tar -tf, one process", tar1), (f"tar -tf -P{w}", tar)):
        gap = base[0] - ours[0]  # seconds the library saves on these shards
        if fixed <= 0 or gap <= 0:
            where = "at any size" if gap > 0 and cli[0] < base[0] else "not on these shards"
        else:
            where = f"from about {fixed / gap * total / 1e9:.1f} GB"
        print(f"  the CLI overtakes {label} {where} (fixed cost over the time saved per GB)")
    deep_laion = laion[:1]
    _, cpu = timed({"deep": lambda: run_ours(deep_laion, 1, deep=True)}, 1, deep_laion)["deep"]
    print(
        f"  --deep, pairs (JPEG 256x256): {SAMPLES_PER_SHARD / cpu:,.0f} samples/s per CPU second"
    )
    _, cpu = timed({"deep": lambda: run_ours(mmc4, 1, deep=True)}, 1, mmc4)["deep"]
    print(f"  --deep, interleaved (3 PNG images/doc): {400 / cpu:,.0f} samples/s per CPU second")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
