"""`convert laion`: img2dataset output (with _stats.json checks), folders and tables of pairs."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.convert.images import ImageOptions
from flamingo_cli.convert.laion import LaionOptions, convert_laion
from flamingo_cli.convert.runner import RunOptions
from flamingo_cli.errors import ConvertError
from flamingo_cli.shards.write import write_tar
from flamingo_cli.synthetic import encode, laion_samples, shape_image

runner = CliRunner()


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def img2dataset(tmp_path: Path) -> Path:
    """Three shards of 8: shard 1's _stats.json claims 9 successes, shard 2 has no _stats.json,
    shard 0 has one sample without caption, one without image and one truncated PNG."""
    src = tmp_path / "img2dataset"
    src.mkdir()
    for shard in range(3):
        samples = list(laion_samples(shard, 8, seed=1))
        if shard == 0:
            del samples[1]["txt"]
            del samples[2]["png"]
            samples[3]["png"] = samples[3]["png"][:40]
        write_tar(src / f"{shard:05d}.tar", samples)
        if shard != 2:
            stats = {"count": 10, "successes": 9 if shard == 1 else 8, "failed_to_download": 2}
            (src / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return src


def test_img2dataset_counts_checks_and_drops(img2dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert_laion(str(img2dataset), out, LaionOptions(), RunOptions(workers=1))
    totals = report.totals
    assert (totals["samples_in"], totals["samples_out"]) == (24, 21)
    assert (totals["dropped_no_caption"], totals["dropped_no_image"]) == (1, 1)
    assert totals["images_corrupt"] == 1
    assert (totals["count_mismatch"], totals["stats_missing"]) == (1, 1)
    assert report.skipped == 5
    messages = {(p.file, p.message.split(" ")[0]) for p in report.problems}
    assert (str(img2dataset / "00001.tar"), "the") in messages  # "the tar holds 8 samples ..."
    assert any("successes = 9" in p.message for p in report.problems)

    assert json.loads((out / "sizes.json").read_text()) == {
        "00000.tar": 5,
        "00001.tar": 8,
        "00002.tar": 8,
    }
    source = read_tar(img2dataset / "00001.tar")
    assert read_tar(out / "00001.tar") == source  # clean shards pass through byte for byte
    kept = read_tar(out / "00000.tar")
    assert sorted({m.split(".")[0] for m in kept}) == [f"0000000{i:02d}" for i in (0, 4, 5, 6, 7)]


def test_img2dataset_resharding_and_reencode(img2dataset: Path, tmp_path: Path) -> None:
    from PIL import Image

    options = LaionOptions(image=ImageOptions(reencode="jpeg", quality=90), samples_per_shard=3)
    convert_laion(str(img2dataset / "{00001..00002}.tar"), tmp_path, options, RunOptions(workers=1))
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {
        "00001-0.tar": 3,
        "00001-1.tar": 3,
        "00001-2.tar": 2,
        "00002-0.tar": 3,
        "00002-1.tar": 3,
        "00002-2.tar": 2,
    }
    members = read_tar(tmp_path / "00001-0.tar")
    assert sorted(members) == sorted(
        f"00001{i:04d}.{e}" for i in range(3) for e in ("jpg", "txt", "json")
    )
    assert Image.open(io.BytesIO(members["000010000.jpg"])).format == "JPEG"


def make_pairs(directory: Path, n: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(3)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        fmt = "png" if i % 2 else "jpeg"
        name = f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        (directory / name).write_bytes(encode(shape_image("red", "square", 24, rng), fmt.upper()))
        pairs.append((name, f"caption {i}"))
    return pairs


def test_folder_of_images_with_captions(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    pairs = make_pairs(folder / "sub", 7)
    for name, caption in pairs[:-1]:  # the last image has no caption file
        (folder / "sub" / name).with_suffix(".txt").write_text(caption)
    out = tmp_path / "out"
    report = convert_laion(
        str(folder), out, LaionOptions(samples_per_shard=4), RunOptions(workers=1)
    )
    assert (report.totals["samples_out"], report.totals["dropped_no_caption"]) == (6, 1)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 2}
    first = read_tar(out / "00000.tar")
    assert sorted(first)[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert first["000000001.png"] == (folder / "sub" / "img01.png").read_bytes()
    meta = json.loads(first["000000001.json"])
    assert (meta["caption"], meta["width"], meta["key"]) == ("caption 1", 24, "000000001")
    assert meta["sha256"] == hashlib.sha256(first["000000001.png"]).hexdigest()
    stats = json.loads((out / "00001_stats.json").read_text())
    assert (stats["count"], stats["successes"]) == (3, 2)
    # our output is itself img2dataset output: converting it again changes nothing
    again = convert_laion(str(out), tmp_path / "again", LaionOptions(), RunOptions(workers=1))
    assert again.skipped == 0
    assert read_tar(tmp_path / "again" / "00000.tar") == first


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_table_of_paths_and_captions(tmp_path: Path, kind: str) -> None:
    pairs = make_pairs(tmp_path / "images", 5)
    rows = [{"path": f"images/{n}", "text": c} for n, c in pairs]
    rows.append({"path": "images/gone.jpg", "text": "missing"})
    table = tmp_path / f"pairs.{kind}"
    if kind == "csv":
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "text"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    report = convert_laion(str(table), tmp_path / "out", LaionOptions(), RunOptions(workers=1))
    assert (report.totals["samples_out"], report.totals["dropped_no_image"]) == (5, 1)
    (problem,) = report.problems
    assert (problem.file, problem.line) == (str(table), 7 if kind == "csv" else 6)
    members = read_tar(tmp_path / "out" / "00000.tar")
    assert members["000000003.txt"] == b"caption 3"
    assert members["000000003.png"] == (tmp_path / "images" / "img03.png").read_bytes()


def test_table_columns_must_be_known(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b\nx.jpg,hello\n")
    with pytest.raises(ConvertError, match="cannot tell which column holds the image"):
        convert_laion(str(tmp_path / "t.csv"), tmp_path / "out", LaionOptions())
    report = convert_laion(
        str(tmp_path / "t.csv"),
        tmp_path / "out",
        LaionOptions(image_column="a", caption_column="b"),
        RunOptions(workers=1),
    )
    assert report.totals["dropped_no_image"] == 1


@pytest.mark.multiprocess
def test_workers_and_resume_give_the_same_bytes(img2dataset: Path, tmp_path: Path) -> None:
    options = LaionOptions(samples_per_shard=5)
    convert_laion(str(img2dataset), tmp_path / "one", options, RunOptions(workers=1))
    convert_laion(str(img2dataset), tmp_path / "three", options, RunOptions(workers=3))
    assert tree(tmp_path / "one") == tree(tmp_path / "three")
    (tmp_path / "three" / "00001-1.tar").unlink()
    report = convert_laion(str(img2dataset), tmp_path / "three", options, RunOptions(workers=3))
    assert report.reused == ["00000", "00002"]
    assert tree(tmp_path / "one") == tree(tmp_path / "three")


def test_cli_laion_json_and_strict(img2dataset: Path, tmp_path: Path) -> None:
    args = ["convert", "laion", str(img2dataset), "--out", str(tmp_path / "o"), "-w", "1"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["samples_out"] == 21
    result = runner.invoke(app, [*args, "--strict"])
    assert result.exit_code == 1
    assert "_stats.json says successes = 9" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["convert", "laion", str(tmp_path / "empty.txt"), "-o", "x"])
    assert result.exit_code == 1 and "Traceback" not in result.output
