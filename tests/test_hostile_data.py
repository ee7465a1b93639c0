"""Hostile shards in the training and eval loaders and in inspect-shards (issue 15, items 6, 9,
10 and 11): a corrupt tar header mid-shard, decompression bombs and oversized images, member
names that are not UTF-8, empty and unreadable shards, and a sizes.json that cannot be written.

Each is counted and named, and the rest of the data is still read; nothing ends in a traceback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from open_clip.transform import image_transform
from PIL import ImageFile
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.data.eval_loader import EvalLoader, make_eval_loader
from flamingo_cli.data.image_limits import ImageTooLarge
from flamingo_cli.data.loader import TrainLoader, make_loader
from flamingo_cli.data.pipeline import pass_urls
from flamingo_cli.data.preprocess import DROP_REASONS, decode_image
from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.tokenizer import TINY_TOKENIZER, SpecialTokens, load_tokenizer
from flamingo_cli.recipe.schema import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DatasetConfig,
    InterleavedConfig,
    PairsConfig,
)
from flamingo_cli.shards.write import write_tar
from flamingo_cli.synthetic import laion_samples, mmc4_samples

runner = CliRunner()
TRANSFORM = image_transform(32, is_train=False)
BAD_NAME = b"\xff\xfe".decode("utf-8", "surrogateescape")  # a key that is not UTF-8


@pytest.fixture(scope="module")
def tok() -> tuple[Any, SpecialTokens]:
    return load_tokenizer(TINY_TOKENIZER)


# Hostile inputs, made here


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30000, height: int = 30000, pad: int = 0) -> bytes:
    """A PNG of a few dozen bytes declaring `width` x `height` RGB pixels (PIL refuses
    30000x30000 on open); `pad` bytes of text chunk make it pass MMC4's 11,000-byte filter."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    text = _chunk(b"tEXt", b"pad\0" + b"x" * pad) if pad else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + text
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


def huge_png(side: int = 12000) -> bytes:
    """A valid one-colour 1-bit `side` x `side` PNG: about 20 KB on disk, 144 million pixels
    (under PIL's own bomb limit, over the default cap)."""
    row = b"\0" * (1 + (side + 7) // 8)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(row * side, 9))
        + _chunk(b"IEND", b"")
    )


def member_offsets(path: Path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def corrupt_header(path: Path, member: str) -> int:
    """Scramble the header of `member` (a wrong checksum); returns its offset."""
    offset = member_offsets(path)[member]
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\x01garbage"
    path.write_bytes(bytes(data))
    return offset


def write_bad_name_tar(path: Path, count: int, bad: int) -> None:
    """LAION pairs whose sample `bad` has members named b"\\xff\\xfe.png" and b"\\xff\\xfe.txt"."""
    with tarfile.open(
        path, "w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for index, sample in enumerate(laion_samples(7, count, seed=0)):
            key = BAD_NAME if index == bad else str(sample["__key__"])
            for ext in ("png", "txt"):
                data = bytes(sample[ext])
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def laion_config(shards: str | list[str], **kw: Any) -> PairsConfig:
    base: dict[str, Any] = {
        "shards": shards,
        "batch_size": 4,
        "train_num_samples": 40,
        "shuffle_buffer": 1,
        "shuffle_initial": 1,
        "workers": 0,
    }
    return PairsConfig(**(base | kw))


def train_loader(config: DatasetConfig, tok: tuple[Any, SpecialTokens], **kw: Any) -> TrainLoader:
    return make_loader(config, tok[0], tok[1], TRANSFORM, seed=3, **kw)


def eval_loader(
    config: DatasetConfig, shards: list[str], tok: tuple[Any, SpecialTokens], **kw: Any
) -> EvalLoader:
    name = "laion" if isinstance(config, PairsConfig) else "mmc4"
    return make_eval_loader(name, config, shards, tok[0], tok[1], TRANSFORM, **kw)


def keys_of(batches: Iterator[Any]) -> list[str]:
    return [key for batch in batches for key in batch.keys]


def inspect_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["inspect-shards", "--json", "--workers", "1", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, json.loads(result.stdout)


# 1. A corrupt tar header in the middle of a training shard


@pytest.fixture
def damaged_pair(tmp_path: Path) -> tuple[Path, Path, int]:
    """bad.tar: 16 pairs, the header of sample 4 scrambled (4 readable); good.tar: 16 pairs."""
    bad, good = tmp_path / "bad.tar", tmp_path / "good.tar"
    write_tar(bad, laion_samples(0, 16, seed=0))
    write_tar(good, laion_samples(1, 16, seed=0))
    return bad, good, corrupt_header(bad, "000000004.png")


def test_corrupt_header_mid_shard_is_a_damaged_shard_named_once(
    damaged_pair: tuple[Path, Path, int], tok: tuple[Any, SpecialTokens]
) -> None:
    bad, _, offset = damaged_pair
    loader = train_loader(laion_config(f"{bad.parent}/{{bad,good}}.tar"), tok)
    keys = keys_of(iter(loader))
    # two passes of 4 + 16 samples; the damaged shard is one tar_error each time it is read
    readable = [f"00000{i:04d}" for i in range(4)] + [f"00001{i:04d}" for i in range(16)]
    assert sorted(keys) == sorted(readable * 2)
    assert loader.dropped == {"tar_error": 2}
    message = f"tar shard {bad} has a corrupt header at byte offset {offset}"
    assert loader.damaged_shards == {str(bad): message}
    (notice,) = loader.damage_notices()
    assert notice.startswith(f"data.laion: {message}; ")
    assert "dropped/laion/tar_error" in notice and f"flamingo inspect-shards {bad}" in notice
    assert loader.damage_notices() == []  # named once


def test_damaged_shard_names_cross_from_loader_workers(
    damaged_pair: tuple[Path, Path, int], tok: tuple[Any, SpecialTokens]
) -> None:
    bad, _, offset = damaged_pair
    loader = train_loader(laion_config(f"{bad.parent}/{{bad,good}}.tar", workers=2), tok)
    assert len(keys_of(iter(loader))) == 40
    assert loader.dropped["tar_error"] >= 1 and set(loader.dropped) == {"tar_error"}
    assert list(loader.damaged_shards) == [str(bad)]
    assert f"corrupt header at byte offset {offset}" in loader.damaged_shards[str(bad)]


def test_eval_loader_counts_and_names_a_damaged_shard(
    damaged_pair: tuple[Path, Path, int], tok: tuple[Any, SpecialTokens]
) -> None:
    bad, good, offset = damaged_pair
    loader = eval_loader(laion_config("unused.tar"), [str(bad), str(good)], tok)
    assert len(keys_of(iter(loader))) == 20
    assert loader.dropped == {"tar_error": 1}
    note = loader.damage_note()
    assert note is not None
    assert f"tar shard {bad} has a corrupt header at byte offset {offset}" in note
    assert f"flamingo inspect-shards {bad}" in note


# 2. Decompression bombs and images over the pixel cap


def test_decode_refuses_bombs_and_oversized_images_before_decoding() -> None:
    # PIL's process-wide limit or our cap fires first, depending on what set PIL's (the
    # OpenFlamingo baseline raises it on import): the words are the same either way
    with pytest.raises(ImageTooLarge, match="900,000,000 pixels is over the cap of 40,000,000"):
        decode_image(bomb_png(), None)
    with pytest.raises(ImageTooLarge, match="12000x12000 = 144,000,000 pixels is over the cap"):
        decode_image(huge_png(), None)
    with pytest.raises(ImageTooLarge, match="over the cap of 1,000"):
        decode_image(base64.b64decode(_small_png_b64()), None, 1000)


def _small_png_b64() -> str:
    doc = json.loads(next(mmc4_samples(0, 1, seed=0))["json"])
    return str(doc["image_info"][0]["image_base64"])  # a 64x64 PNG


@pytest.fixture
def hostile_images(tmp_path: Path) -> Path:
    """pairs.tar: 8 LAION pairs, sample 2 a bomb and sample 5 a 12000x12000 image;
    docs.tar: 4 MMC4 documents of 3 images, the first image of two of them a padded bomb."""
    pairs: list[dict[str, Any]] = list(laion_samples(0, 8, seed=0))
    pairs[2]["png"], pairs[5]["png"] = bomb_png(), huge_png()
    write_tar(tmp_path / "pairs.tar", pairs)
    docs = []
    for index, sample in enumerate(mmc4_samples(0, 4, seed=0, images_per_doc=3)):
        doc = json.loads(sample["json"])
        if index in (1, 3):
            doc["image_info"][0]["image_base64"] = base64.b64encode(bomb_png(pad=12000)).decode()
        docs.append({"__key__": sample["__key__"], "json": json.dumps(doc).encode()})
    write_tar(tmp_path / "docs.tar", docs)
    return tmp_path


@pytest.fixture
def decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every image PIL decodes (loaders run in this process: workers = 0)."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def recording(self: ImageFile.ImageFile) -> Any:
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording)
    return sizes


def test_loaders_skip_bombs_and_oversized_images_without_decoding(
    hostile_images: Path, tok: tuple[Any, SpecialTokens], decoded_sizes: list[tuple[int, int]]
) -> None:
    pairs = str(hostile_images / "pairs.tar")
    loader = train_loader(laion_config(pairs, train_num_samples=12), tok)
    keys = keys_of(iter(loader))
    assert len(keys) == 12 and {"000000002", "000000005"}.isdisjoint(keys)
    assert loader.dropped == {"corrupt_image": 4}  # two per pass over the shard
    assert (12000, 12000) not in decoded_sizes and (30000, 30000) not in decoded_sizes
    evaluated = eval_loader(laion_config("unused.tar"), [pairs], tok)
    assert len(keys_of(iter(evaluated))) == 6
    assert evaluated.dropped == {"corrupt_image": 2}
    docs = InterleavedConfig(shards="unused.tar", batch_size=2, max_tokens=64, max_num_images=3)
    documents = eval_loader(docs, [str(hostile_images / "docs.tar")], tok)
    assert len(keys_of(iter(documents))) == 4  # each bomb drops one image, not its document
    assert documents.dropped == {"images_corrupt": 2}


def test_the_pixel_cap_reaches_the_loaders(
    hostile_images: Path, tok: tuple[Any, SpecialTokens]
) -> None:
    """make_loader / make_eval_loader take data.max_image_pixels: a cap under 32x32 drops
    every LAION image here, and the loader stops naming what it dropped."""
    pairs = str(hostile_images / "pairs.tar")
    evaluated = eval_loader(laion_config("unused.tar"), [pairs], tok, max_image_pixels=1023)
    assert keys_of(iter(evaluated)) == []
    assert evaluated.dropped == {"corrupt_image": 8}
    loader = train_loader(laion_config(pairs), tok, max_image_pixels=1023)
    with pytest.raises(FlamingoError, match=r"gave no usable sample \(dropped: corrupt_image 24\)"):
        list(loader)
    assert len(keys_of(iter(train_loader(laion_config(pairs), tok, max_image_pixels=1024)))) == 40


def test_inspect_deep_reports_bombs_and_oversized_images_and_goes_on(hostile_images: Path) -> None:
    shards = [str(hostile_images / "pairs.tar"), str(hostile_images / "docs.tar")]
    code, data = inspect_json("--deep", *shards)
    assert code == 1
    found = [(Path(f["shard"]).name, f["key"], f["check"]) for f in data["findings"]]
    assert found == [
        ("pairs.tar", "000000002", "image"),
        ("pairs.tar", "000000005", "image"),
        ("docs.tar", "mmc4-00000-0001", "image"),
        ("docs.tar", "mmc4-00000-0003", "image"),
    ]
    reasons = [f["reason"] for f in data["findings"]]
    assert ".png not decoded: " in reasons[0]
    assert "900,000,000 pixels is over the cap of 40,000,000" in reasons[0]
    assert reasons[1].startswith(
        ".png not decoded: 12000x12000 = 144,000,000 pixels is over the cap of 40,000,000"
    )
    assert reasons[2].startswith("image_info[0]: not decoded: ")
    assert "--max-image-pixels" in reasons[1]
    assert [g["totals"]["samples"] for g in data["groups"]] == [8, 4]
    # the cap is an option: raised, the 12000x12000 image decodes; lowered, every image fails
    _, raised = inspect_json("--deep", "--max-image-pixels", "150000000", shards[0])
    assert [f["key"] for f in raised["findings"]] == ["000000002"]
    _, lowered = inspect_json("--deep", "--max-image-pixels", "100", shards[0])
    assert len(lowered["findings"]) == 8


def test_preview_shows_a_box_for_a_bomb(hostile_images: Path, tmp_path: Path) -> None:
    page = tmp_path / "preview.html"
    args = ["inspect-shards", "--workers", "1", str(hostile_images / "pairs.tar")]
    result = runner.invoke(app, [*args, "--preview", str(page), "--samples", "8"])
    assert result.exit_code == 0, result.output  # fast mode: the shard itself is sound
    html = page.read_text(encoding="utf-8")
    assert html.count("<img ") == 6 and html.count(">too large</div>") == 2


def test_inspect_recipe_uses_its_max_image_pixels(hostile_images: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[data]\nmax_image_pixels = 1000\n[data.laion]\nshards = "{hostile_images}/pairs.tar"\n'
        "batch_size = 4\n",
        encoding="utf-8",
    )
    code, data = inspect_json("--deep", "--recipe", str(recipe))
    assert code == 1
    assert len(data["findings"]) == 8
    assert all(
        "over the cap of 1,000" in f["reason"] or "exceeds" in f["reason"] for f in data["findings"]
    )


def test_the_cli_default_cap_is_the_recipe_default() -> None:
    from flamingo_cli.cli.inspect import MAX_IMAGE_PIXELS_HELP

    assert f"{DEFAULT_MAX_IMAGE_PIXELS:,}" == MAX_IMAGE_PIXELS_HELP


# 3. Member names that are not UTF-8


def test_inspect_reports_member_names_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "names.tar"
    write_bad_name_tar(path, 4, bad=1)
    at = member_offsets(path)
    for deep in ([], ["--deep"]):
        code, data = inspect_json(*deep, str(path))
        assert code == 1
        assert [(f["check"], f["key"], f["offset"]) for f in data["findings"]] == [
            ("bad-name", "\\xff\\xfe", at[f"{BAD_NAME}.png"]),
            ("bad-name", "\\xff\\xfe", at[f"{BAD_NAME}.txt"]),
        ]
        assert data["findings"][0]["reason"].startswith(
            "member name \\xff\\xfe.png is not valid UTF-8: training and eval-loss skip the member"
        )
    tables = runner.invoke(app, ["inspect-shards", "--deep", "--workers", "1", str(path)])
    assert tables.exit_code == 1 and "bad-name" in tables.output, tables.output


def test_loaders_skip_and_count_member_names_that_are_not_utf8(
    tmp_path: Path, tok: tuple[Any, SpecialTokens]
) -> None:
    assert "bad_name" in DROP_REASONS
    path = tmp_path / "names.tar"
    write_bad_name_tar(path, 4, bad=1)
    loader = train_loader(laion_config(str(path), train_num_samples=6, batch_size=3), tok)
    keys = keys_of(iter(loader))
    assert sorted(set(keys)) == ["000070000", "000070002", "000070003"]
    assert loader.dropped == {"bad_name": 2}  # once per pass
    evaluated = eval_loader(laion_config("unused.tar"), [str(path)], tok)
    assert len(keys_of(iter(evaluated))) == 3
    assert evaluated.dropped == {"bad_name": 1}


# 4. Empty and unreadable shards


@pytest.fixture
def unreadable(tmp_path: Path) -> dict[str, Path]:
    """An empty file, a directory in place of a file, a file of garbage (and, when not root,
    a file nobody may read)."""
    shards = {
        "empty": tmp_path / "empty.tar",
        "folder": tmp_path / "folder.tar",
        "garbage": tmp_path / "garbage.tar",
    }
    shards["empty"].write_bytes(b"")
    shards["folder"].mkdir()
    shards["garbage"].write_bytes(bytes(range(256)) * 12)
    if os.geteuid() != 0:
        shards["locked"] = tmp_path / "locked.tar"
        write_tar(shards["locked"], laion_samples(5, 2, seed=0))
        shards["locked"].chmod(0)
    return shards


def test_unreadable_shards_are_counted_and_named(
    unreadable: dict[str, Path], tmp_path: Path, tok: tuple[Any, SpecialTokens]
) -> None:
    good = tmp_path / "good.tar"
    write_tar(good, laion_samples(1, 8, seed=0))
    urls = [str(good), *map(str, unreadable.values())]
    loader = train_loader(laion_config(urls, train_num_samples=16), tok)
    spec = loader.stream().spec
    second = pass_urls(spec, spec.sources[0], 0, 1)
    assert len(keys_of(iter(loader))) == 16
    # every shard once in the first pass; in the second, those read before the last sample
    assert loader.dropped == {"tar_error": len(unreadable) + second.index(str(good))}
    damaged = loader.damaged_shards
    assert set(damaged) == set(urls[1:])
    assert damaged[str(unreadable["empty"])] == f"tar shard {unreadable['empty']} is empty"
    assert (
        damaged[str(unreadable["folder"])] == f"cannot open {unreadable['folder']}: Is a directory"
    )
    assert "corrupt header at byte offset 0" in damaged[str(unreadable["garbage"])]
    if "locked" in unreadable:
        assert "Permission denied" in damaged[str(unreadable["locked"])]
    # eval shard specs take folders as "the shards in it": the folder.tar folder names none
    files = [u for u in urls if u != str(unreadable["folder"])]
    evaluated = eval_loader(laion_config("unused.tar"), files, tok)
    assert len(keys_of(iter(evaluated))) == 8
    assert evaluated.dropped == {"tar_error": len(files) - 1}
    assert set(evaluated.damaged_shards) == set(files[1:])


@pytest.mark.parametrize(("workers", "resampled"), [(0, False), (0, True), (2, False), (2, True)])
def test_a_dataset_of_unreadable_shards_stops_with_the_shards_and_the_fix(
    unreadable: dict[str, Path], tok: tuple[Any, SpecialTokens], workers: int, resampled: bool
) -> None:
    urls = [str(p) for p in unreadable.values()]
    loader = train_loader(laion_config(urls, workers=workers, resampled=resampled), tok)
    with pytest.raises(FlamingoError) as raised:
        list(loader)
    error = raised.value
    assert "Traceback" not in error.message
    assert error.message.startswith("data.laion: ")
    assert "gave no usable sample; unreadable or damaged: " in error.message
    assert f"tar shard {unreadable['empty']} is empty" in error.message
    assert error.fix is not None and error.fix.startswith("run `flamingo inspect-shards ")
    assert any(str(path) in error.fix for path in unreadable.values())


def test_inspect_reports_a_directory_in_place_of_a_shard(unreadable: dict[str, Path]) -> None:
    code, data = inspect_json(str(unreadable["folder"].parent / "*.tar"))
    assert code == 1
    checks = {Path(f["shard"]).name: (f["check"], f["reason"]) for f in data["findings"]}
    assert checks["folder.tar"] == (
        "unreadable",
        f"cannot open {unreadable['folder']}: Is a directory",
    )
    assert checks["empty.tar"] == ("truncated", "the tar is empty")


# 5. A sizes.json that cannot be written


def test_write_sizes_blocked_by_a_directory(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", laion_samples(0, 3, seed=0))
    (tmp_path / "sizes.json").mkdir()
    result = runner.invoke(app, ["inspect-shards", "--write-sizes", str(tmp_path / "00000.tar")])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"cannot write {tmp_path / 'sizes.json'}" in result.output
    assert f"remove or rename the folder {tmp_path / 'sizes.json'}" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_write_sizes_into_a_read_only_directory(tmp_path: Path) -> None:
    shards = tmp_path / "ro"
    shards.mkdir()
    write_tar(shards / "00000.tar", laion_samples(0, 3, seed=0))
    shards.chmod(0o555)
    try:
        result = runner.invoke(app, ["inspect-shards", "--write-sizes", str(shards / "00000.tar")])
    finally:
        shards.chmod(0o755)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"cannot write {shards / 'sizes.json'}" in result.output
    assert f"make {shards} writable" in result.output


# The training run: damaged shards are named once in its messages, and counted in its metrics


class Messages:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.metrics: list[dict[str, Any]] = []

    def started(self, total_steps: int, start_step: int) -> None:
        return None

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics)

    def message(self, text: str) -> None:
        self.texts.append(text)


@pytest.mark.parametrize("log_every", [1, 100])
def test_training_names_a_damaged_shard_once_and_counts_it(tmp_path: Path, log_every: int) -> None:
    """Named at the logged step after it is met, or at the stop when no row comes before."""
    from flamingo_cli.recipe.load import load_recipe, parse_override
    from flamingo_cli.train.run import train_rank

    from .conftest import RECIPES

    tiny = RECIPES / "tiny-data" / "laion"
    shards = tmp_path / "laion"
    shards.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (shards / name).write_bytes((tiny / name).read_bytes())
    (shards / "00002.tar").write_bytes(b"")
    overrides = [
        f"run.output_dir={tmp_path / 'runs'}",
        f"data.laion.shards={shards}/{{00000..00002}}.tar",
        "data.laion.workers=0",
        "data.mmc4.workers=0",
        f"run.log_every={log_every}",
    ]
    events = Messages()
    train_rank(
        load_recipe(RECIPES / "tiny-cpu.toml", list(map(parse_override, overrides))),
        events,
        max_steps=3,
    )
    notices = [t for t in events.texts if "00002.tar" in t]
    assert notices == [
        f"data.laion: tar shard {shards / '00002.tar'} is empty; what cannot be read is skipped "
        "(counted as dropped/laion/tar_error). Fix: run `flamingo inspect-shards "
        f"{shards / '00002.tar'}`, then rewrite or re-download the shard"
    ]
    if log_every == 1:
        assert events.metrics[-1]["dropped/laion/tar_error"] >= 1
    else:  # 3 steps of 4 in the epoch: no row at all
        assert events.metrics == []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_name_each_ranks_damaged_shard_and_count_both(tmp_path: Path) -> None:
    """Each rank meets one empty shard (shards split by index or in halves alike): rank 1's is
    named as rank 0's is, and the logged drop counter is the ranks' sum."""
    import subprocess
    import sys

    from .conftest import RECIPES, REPO

    tiny = RECIPES / "tiny-data" / "laion"
    shards = tmp_path / "laion"
    shards.mkdir()
    good = [(tiny / name).read_bytes() for name in ("00000.tar", "00001.tar")]
    for index, data in enumerate([good[0], good[1], b"", b"", good[0], good[1]]):
        (shards / f"{index:05d}.tar").write_bytes(data)
    overrides = [
        f"run.output_dir={tmp_path / 'runs'}",
        f"data.laion.shards={shards}/{{00000..00005}}.tar",
        "data.laion.workers=0",
        "data.mmc4.workers=0",
        "run.log_every=1",
        "data.laion.resampled=false",
        "distributed.strategy=ddp",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = ["train", str(RECIPES / "tiny-cpu.toml"), "--nproc-per-node", "2"]
    command += [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(
        [sys.executable, "-m", "flamingo_cli", *command],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    for empty in ("00002.tar", "00003.tar"):
        assert shown.count(f"tar shard {shards / empty} is empty") == 1, shown[-3000:]
    rows = (tmp_path / "runs" / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    assert last["dropped/laion/tar_error"] >= 2
    assert last["memory/peak_rank"] in (0, 1) and last["memory/peak_gib"] > 0  # the ranks' top


def test_training_on_unreadable_shards_stops_with_a_message_and_the_fix(tmp_path: Path) -> None:
    from .conftest import RECIPES

    for name in ("0.tar", "1.tar"):
        (tmp_path / name).write_bytes(b"")
    overrides = [
        f"run.output_dir={tmp_path / 'runs'}",
        f"data.laion.shards={tmp_path}/{{0,1}}.tar",
    ]
    args = ["train", str(RECIPES / "tiny-cpu.toml")]
    result = runner.invoke(app, [*args, *(x for o in overrides for x in ("--set", o))])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    output = " ".join(result.output.split())
    assert (
        "data.laion: 3 passes over the shards of loader worker 0 (rank 0) gave no usable" in output
    )
    assert f"tar shard {tmp_path / '0.tar'} is empty" in output
    fix = output[output.index("fix: run `flamingo inspect-shards ") :]
    named = fix.split("`")[1].split()[2:]  # in the order the resampled draws met them
    assert sorted(named) == [str(tmp_path / "0.tar"), str(tmp_path / "1.tar")]
    assert fix.endswith(
        "then rewrite or re-download these shards, or leave them out of data.laion.shards"
    )


@pytest.mark.parametrize("pil_limit", [None, 1e9, 89_478_485])
def test_the_cap_words_do_not_depend_on_pils_own_limit(
    monkeypatch: pytest.MonkeyPatch, pil_limit: float | None
) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(ImageTooLarge, match="900,000,000 pixels is over the cap of 40,000,000"):
        decode_image(bomb_png(), None)
