"""`convert mmc4|laion` on hostile or mistaken input (issue 15): no input found, decompression
bombs and images over the pixel cap, names and captions that are not UTF-8, outputs that
cannot be written. Each case runs through the CLI and checks the exit code and the message."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from flamingo_cli.cli.app import app
from flamingo_cli.convert.images import CorruptImage, check_image
from flamingo_cli.data.image_limits import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge
from flamingo_cli.errors import OutputError
from flamingo_cli.shards.write import write_tar
from flamingo_cli.synthetic import RawMmc4, encode, laion_samples, shape_image, write_raw_mmc4

runner = CliRunner()


def run(*args: str) -> Result:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def stderr(result: Result) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A ~100-byte PNG declaring `width` x `height` RGB pixels (its data cut short)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def flat_png(side: int = 12_000) -> bytes:
    """A complete one-colour `side` x `side` PNG (1-bit grey: a few kB on disk)."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = (b"\0" + b"\0" * -(-side // 8)) * side
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows, 9))
        + _chunk(b"IEND", b"")
    )


def big_jpeg(width: int = 20_000, height: int = 20_000) -> bytes:
    """A small real JPEG whose frame header claims `width` x `height`."""
    data = bytearray(encode(shape_image("red", "circle", 16, random.Random(0)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_image_checks_cap_pixels_from_the_header() -> None:
    for data in (bomb_png(), flat_png(), big_jpeg()):
        with pytest.raises(ImageTooLarge):
            check_image(data)
    assert check_image(flat_png(), max_pixels=150_000_000).width == 12_000
    assert check_image(big_jpeg(), max_pixels=400_000_000).height == 20_000
    with pytest.raises(CorruptImage):
        check_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 30 + b"IEND\xaeB`\x82")


# ---------------------------------------------------------------- no input found


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> RawMmc4:
    return write_raw_mmc4(tmp_path_factory.mktemp("raw"), shards=2, docs_per_shard=3)


def mmc4(raw: RawMmc4, spec: str, out: Path, *extra: str) -> Result:
    return run(
        "convert",
        "mmc4",
        spec,
        "--image-dir",
        str(raw.image_dir),
        "-o",
        str(out),
        "-w",
        "1",
        *extra,
    )


def test_mmc4_without_any_input_found_is_an_error(raw: RawMmc4, tmp_path: Path) -> None:
    docs = raw.zips[0].parent
    typo = f"{docs}s/docs_shard_{{0..1}}_v2.jsonl.zip"
    result = mmc4(raw, typo, tmp_path / "out")
    assert result.exit_code == 1
    err = stderr(result)
    assert f"no input found: DOCS_SPEC '{typo}': none of the 2 file(s) it names exists" in err
    assert f"(looked for {docs}s/docs_shard_0_v2.jsonl.zip, {docs}s/docs_shard_1" in err
    assert "fix: check the path; a range of numbered files is written in brace syntax" in err
    assert not (tmp_path / "out").exists()  # refused before anything was made

    glob = f"{docs}/shard_[0-9].zip"  # a glob where a brace spec was meant, matching nothing
    result = mmc4(raw, glob, tmp_path / "out")
    assert result.exit_code == 1
    assert f"no input found: DOCS_SPEC '{glob}': no file matches {glob}" in stderr(result)

    # Some missing among found ones stay warnings (MMC4 has missing shard numbers).
    result = mmc4(raw, f"{docs}/docs_shard_{{0..2}}_v2.jsonl.zip", tmp_path / "some", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["totals"]["inputs_missing"] == 1


def test_mmc4_globs_expand_sorted_where_the_layout_allows(raw: RawMmc4, tmp_path: Path) -> None:
    docs = raw.zips[0].parent
    result = mmc4(raw, f"{docs}/*.zip", tmp_path / "index")
    assert result.exit_code == 1
    err = stderr(result)
    assert "the index image layout finds each file's images by its position in DOCS_SPEC" in err
    assert "--image-layout shard-number" in err and "brace syntax" in err

    layout = ("--image-layout", "shard-number")
    assert mmc4(raw, f"{docs}/*_v2.jsonl.zip", tmp_path / "glob", *layout).exit_code == 0
    brace = f"{docs}/docs_shard_{{0..1}}_v2.jsonl.zip"
    assert mmc4(raw, brace, tmp_path / "brace", *layout).exit_code == 0
    assert tree(tmp_path / "glob") == tree(tmp_path / "brace")
    assert json.loads((tmp_path / "glob" / "sizes.json").read_text()) == {
        "docs_shard_0_v2.tar": 3,
        "docs_shard_1_v2.tar": 3,
    }


def test_laion_without_any_input_found_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for shard in range(2):
        write_tar(src / f"{shard:05d}.tar", laion_samples(shard, 3, seed=1))
    spec = f"{src}/{{00005..00009}}.tar"
    result = run("convert", "laion", spec, "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    err = stderr(result)
    assert f"no input found: SRC '{spec}': none of the 5 file(s) it names exists" in err
    assert f"(looked for {src}/00005.tar, {src}/00006.tar, {src}/00007.tar, ...)" in err
    assert "fix: check the path" in err
    assert not (tmp_path / "out").exists()

    result = run("convert", "laion", f"{src}/shard_*.tar", "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert f"no file matches {src}/shard_*.tar" in stderr(result)

    # A glob that matches: the same shards as the folder (sorted, deterministic).
    assert run("convert", "laion", f"{src}/*.tar", "-o", str(tmp_path / "g")).exit_code == 0
    assert run("convert", "laion", str(src), "-o", str(tmp_path / "d")).exit_code == 0
    assert tree(tmp_path / "g") == tree(tmp_path / "d")


def test_remote_inputs_that_all_are_absent_are_an_error(raw: RawMmc4, tmp_path: Path) -> None:
    result = mmc4(raw, "memory://hostile-none/docs_{0..2}.zip", tmp_path / "out")
    assert result.exit_code == 1
    assert "none of the 3 input(s) exists; nothing was converted" in stderr(result)


# ---------------------------------------------------------------- images over the cap


@pytest.fixture
def hostile_raw(tmp_path: Path) -> tuple[RawMmc4, list[Path]]:
    """Raw MMC4 whose first three images (of shard 0) are a bomb, a 12000x12000 PNG and a
    JPEG header claiming 20000x20000."""
    raw = write_raw_mmc4(tmp_path / "raw", shards=2, docs_per_shard=3)
    images = sorted((raw.image_dir / "0").iterdir())[:3]
    for path, data in zip(images, (bomb_png(), flat_png(), big_jpeg()), strict=True):
        path.write_bytes(data)
    return raw, images


def test_mmc4_skips_images_over_the_cap_and_names_them(
    hostile_raw: tuple[RawMmc4, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, images = hostile_raw
    from PIL import ImageFile

    load = ImageFile.ImageFile.load

    def guarded_load(self: Any) -> Any:  # an image over the cap is never decoded
        assert self.width * self.height <= DEFAULT_MAX_IMAGE_PIXELS, self.size
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    result = mmc4(raw, raw.docs_spec, tmp_path / "a", "--reencode", "jpeg")
    assert result.exit_code == 0, result.output
    assert "images too large (over --max-image-pixels)" in result.stdout
    err = stderr(result)
    for path in images:
        assert f"image {path} is too large (" in err
    assert "12000x12000 = 144,000,000 pixels is over the cap of 40,000,000" in err
    assert "fix: images of more than 40,000,000 pixels are skipped undecoded" in err

    rerun = mmc4(raw, raw.docs_spec, tmp_path / "a", "--reencode", "jpeg", "--json")
    assert rerun.exit_code == 0
    totals = json.loads(rerun.stdout)["totals"]
    assert (totals["inputs_reused"], totals["images_too_large"]) == (2, 3)
    strict = mmc4(raw, raw.docs_spec, tmp_path / "a", "--reencode", "jpeg", "--strict")
    assert strict.exit_code == 1
    assert mmc4(raw, raw.docs_spec, tmp_path / "b", "--reencode", "jpeg").exit_code == 0
    assert tree(tmp_path / "a") == tree(tmp_path / "b")  # byte-identical


def test_max_image_pixels_option(hostile_raw: tuple[RawMmc4, list[Path]], tmp_path: Path) -> None:
    raw, _ = hostile_raw
    result = mmc4(raw, raw.docs_spec, tmp_path / "a", "--max-image-pixels", "150000000", "--json")
    assert result.exit_code == 0
    totals = json.loads(result.stdout)["totals"]
    assert totals["images_too_large"] == 2  # the 12000x12000 PNG is kept
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["inputs"]["docs_shard_0_v2"]["fingerprint"]["max_image_pixels"] == 150_000_000
    # The default cap is left out of the fingerprint: older conversions resume unchanged.
    assert mmc4(raw, raw.docs_spec, tmp_path / "b").exit_code == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "max_image_pixels" not in manifest["inputs"]["docs_shard_0_v2"]["fingerprint"]
    assert run("convert", "mmc4", "--max-image-pixels", "0").exit_code == 2
    for command in ("mmc4", "laion"):
        help_text = " ".join(run("convert", command, "--help").stdout.replace("│", " ").split())
        assert f"as too large (default {DEFAULT_MAX_IMAGE_PIXELS:,})" in help_text


def write_source_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """An img2dataset-like tar written by tarfile (GNU format: long and non-UTF-8 names)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def members_of(samples: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    return [
        (f"{s['__key__']}.{ext}", data)
        for s in samples
        for ext, data in s.items()
        if ext != "__key__"
    ]


def test_laion_tar_bombs_bad_names_and_captions_are_skipped_and_named(tmp_path: Path) -> None:
    samples = list(laion_samples(0, 6, seed=1))
    samples[0]["png"] = bomb_png()
    samples[1]["txt"] = "café au lait".encode("latin-1")
    members = members_of(samples)
    bad_name = os.fsdecode(b"00000\xff0002")  # the key of sample 2, one byte not UTF-8
    long_name = "k" * 120
    members = [
        (m.replace("000000002", bad_name).replace("000000003", long_name), d) for m, d in members
    ]
    src = tmp_path / "src"
    src.mkdir()
    write_source_tar(src / "00000.tar", members)
    (src / "00000_stats.json").write_text(json.dumps({"successes": 6}))
    out = tmp_path / "out"
    result = run("convert", "laion", str(src), "-o", str(out), "-w", "1")
    assert result.exit_code == 0, result.output
    err = stderr(result)
    tar = src / "00000.tar"
    assert f"{tar}: sample 000000000: 000000000.png is too large (" in err
    assert f"{tar}: sample 000000001: 000000001.txt is not UTF-8 text; sample skipped" in err
    assert "fix: save the caption as UTF-8 text" in err
    assert f"{tar}: member name '00000\\xff0002.png' is not UTF-8; member skipped" in err
    assert f"member name '{long_name}.png' is too long for a ustar shard" in err
    report = json.loads(run("convert", "laion", str(src), "-o", str(out), "--json").stdout)
    counts = report["inputs"][0]["counts"]
    assert (counts["images_too_large"], counts["bad_caption"], counts["bad_names"]) == (1, 1, 6)
    assert (counts["samples_in"], counts["samples_out"]) == (4, 2)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2}
    assert run("convert", "laion", str(src), "-o", str(out), "--strict").exit_code == 1


def test_laion_folder_and_table_captions_that_are_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    samples = list(laion_samples(0, 5, seed=2))
    for i, sample in enumerate(samples):
        (folder / f"img{i}.png").write_bytes(sample["png"])
        (folder / f"img{i}.txt").write_bytes(sample["txt"])
    (folder / "img1.txt").write_bytes("crème brûlée".encode("latin-1"))
    (folder / "img2.png").write_bytes(flat_png())
    (folder / "img3.png").rename(Path(os.fsdecode(os.fsencode(folder) + b"/im\xe93.png")))
    out = tmp_path / "out"
    result = run("convert", "laion", str(folder), "-o", str(out), "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    totals = report["totals"]
    assert (totals["bad_caption"], totals["images_too_large"], totals["bad_names"]) == (1, 1, 1)
    assert totals["samples_out"] == 2
    messages = {(p["file"], p["message"]) for p in report["problems"]}
    assert (
        f"{folder}/img1.png",
        f"{folder}/img1.txt is not UTF-8 text; sample skipped",
    ) in messages
    assert (
        f"{folder}/im\\xe93.png",
        f"image path '{folder}/im\\xe93.png' is not UTF-8; sample skipped",
    ) in messages
    with tarfile.open(out / "00000.tar") as tar:
        captions = [tar.extractfile(m).read() for m in tar if m.name.endswith(".txt")]  # type: ignore[union-attr]
    assert captions == [samples[0]["txt"], samples[4]["txt"]]  # no U+FFFD anywhere

    for name, text in [
        ("pairs.csv", "image,caption\nimg0.png,ok\nimg4.png,café\n"),
        (
            "pairs.jsonl",
            '{"image": "img0.png", "caption": "ok"}\n{"image": "img4.png", "caption": "café"}\n',
        ),
    ]:
        table = folder / name
        table.write_bytes(text.encode("latin-1"))
        result = run("convert", "laion", str(table), "-o", str(tmp_path / name))
        assert result.exit_code == 1
        err = stderr(result)
        line = 3 if name.endswith(".csv") else 2
        assert f"{table}:{line}: the table is not UTF-8 text (byte b'\\xe9'" in err
        assert "fix: convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`" in err
    (folder / "bad.parquet").write_bytes(b"not parquet")
    result = run("convert", "laion", str(folder / "bad.parquet"), "-o", str(tmp_path / "p"))
    assert result.exit_code == 1
    assert f"{folder}/bad.parquet is not a readable Parquet table" in stderr(result)


# ---------------------------------------------------------------- outputs that cannot be written


def test_out_below_a_file_or_a_file(raw: RawMmc4, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = mmc4(raw, raw.docs_spec, tmp_path / "afile" / "sub")
    assert result.exit_code == 1
    err = stderr(result)
    assert (
        f"cannot create the folder {tmp_path}/afile/sub/manifest.d: {tmp_path}/afile is a file"
        in err
    )
    assert "fix: a file is where a folder of the path should be" in err
    result = mmc4(raw, raw.docs_spec, tmp_path / "afile")
    assert result.exit_code == 1
    assert f"--out {tmp_path}/afile is a file, not a folder" in stderr(result)


@pytest.mark.parametrize(
    "name", ["docs_shard_0_v2.tar", "sizes.json", "manifest.json", "plan.json"]
)
def test_a_folder_where_the_run_writes_a_file(raw: RawMmc4, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    result = mmc4(raw, raw.docs_spec, out)
    assert result.exit_code == 1
    err = stderr(result)
    assert f"{out}/{name} is a folder (or another non-file): the conversion writes a file" in err
    assert "fix: remove or rename it, or choose another --out folder" in err
    assert sorted(p.name for p in out.iterdir()) == [name]  # stopped before any work


def test_laion_record_blocked_and_merge_blocked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "00000.tar", laion_samples(0, 3, seed=1))
    out = tmp_path / "out"
    (out / "manifest.d" / "00000.json").mkdir(parents=True)
    result = run("convert", "laion", str(src), "-o", str(out))
    assert result.exit_code == 1
    assert f"{out}/manifest.d/00000.json is a folder" in stderr(result)
    (out / "manifest.d" / "00000.json").rmdir()
    assert run("convert", "laion", str(src), "-o", str(out)).exit_code == 0
    (out / "manifest.json").unlink()
    (out / "manifest.json").mkdir()
    result = run("convert", "merge", str(out))
    assert result.exit_code == 1
    assert f"cannot write {out}/manifest.json: Is a directory" in stderr(result)
    assert "fix: a folder is in the way of a file the run writes" in stderr(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_folder(raw: RawMmc4, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = mmc4(raw, raw.docs_spec, out / "sub")
        assert result.exit_code == 1
        assert f"cannot create the folder {out}/sub/manifest.d: Permission denied" in stderr(result)
        assert "fix: you may not write there" in stderr(result)
    finally:
        out.chmod(0o755)


def test_read_only_filesystem(
    raw: RawMmc4, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.d").mkdir()
    real_open, real_os_open = Path.open, os.open

    def read_only_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.is_relative_to(out) and mode.startswith("w"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_open(self, mode, *args, **kwargs)

    def read_only_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(os.fsdecode(path)).is_relative_to(out) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only_open)
    monkeypatch.setattr(os, "open", read_only_os_open)
    result = mmc4(raw, raw.docs_spec, out)
    assert result.exit_code == 1
    err = stderr(result)
    assert f"cannot write to {out}: Read-only file system" in err
    assert "fix: the filesystem is mounted read-only" in err


def test_disk_full_during_a_shard_stops_the_run(
    raw: RawMmc4, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flamingo_cli.shards.write import TarWriter

    def full(self: TarWriter, info: tarfile.TarInfo, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(TarWriter, "_add", full)
    out = tmp_path / "out"
    result = mmc4(raw, raw.docs_spec, out)
    assert result.exit_code == 1
    err = stderr(result)
    assert f"cannot write {out}/docs_shard_0_v2.tar: No space left on device" in err
    assert "fix: the disk is full" in err
    assert not list(out.glob(".*tmp-*"))  # the unfinished shard was dropped
    assert not list((out / "manifest.d").iterdir())  # stopped at the first input


def test_fsspec_output_without_permission(
    raw: RawMmc4, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    def denied(self: Any, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        raise PermissionError("Access Denied")

    monkeypatch.setattr(MemoryFileSystem, "_open", denied)
    result = mmc4(raw, raw.docs_spec, tmp_path / "unused")
    assert result.exit_code == 0  # local output: unaffected
    result = run(
        "convert",
        "mmc4",
        raw.docs_spec,
        "--image-dir",
        str(raw.image_dir),
        "-o",
        "memory://hostile-denied/out",
    )
    assert result.exit_code == 1
    err = stderr(result)
    assert "cannot write to memory://hostile-denied/out: Access Denied" in err
    assert "fix: you may not write there" in err


def test_output_errors_cross_process_boundaries_whole() -> None:
    error = pickle.loads(pickle.dumps(OutputError("cannot write x", fix="free space")))
    assert (type(error), error.message, error.fix) == (OutputError, "cannot write x", "free space")


def test_mmc4_input_whose_keys_are_too_long_fails_alone(raw: RawMmc4, tmp_path: Path) -> None:
    long = tmp_path / f"{'d' * 95}.jsonl"
    with zipfile.ZipFile(raw.zips[0]) as archive:
        long.write_bytes(archive.read(archive.namelist()[0]))
    result = mmc4(raw, f"{long}::{raw.zips[1]}", tmp_path / "out", "--image-layout", "flat")
    assert result.exit_code == 1
    err = stderr(result)
    assert f"cannot write member '{'d' * 95}-000001.json'" in err
    assert "fix: shorten the input file name" in err
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"docs_shard_1_v2.tar": 3}


def test_mmc4_zip_damaged_mid_stream_fails_alone(raw: RawMmc4, tmp_path: Path) -> None:
    data = bytearray(raw.zips[0].read_bytes())
    middle = len(data) // 3
    data[middle : middle + 40] = bytes(b ^ 0x55 for b in data[middle : middle + 40])
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = mmc4(raw, f"{damaged}::{raw.zips[1]}", out, "--image-layout", "flat")
    assert result.exit_code == 1
    err = stderr(result)
    assert f"{damaged} is damaged" in err  # zlib's or zipfile's reason follows
    assert "fix: re-download the file and rerun" in err
    assert json.loads((out / "sizes.json").read_text()) == {"docs_shard_1_v2.tar": 3}
    assert sorted(p.name for p in out.glob("*.tar")) == ["docs_shard_1_v2.tar"]
