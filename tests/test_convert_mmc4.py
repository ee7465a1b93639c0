"""`convert mmc4`: every document, image byte and count; determinism across workers and crashes."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.convert.images import ImageOptions
from flamingo_cli.convert.mmc4 import Mmc4Options, convert_mmc4, input_stem, shard_number
from flamingo_cli.convert.runner import RunOptions
from flamingo_cli.synthetic import RawMmc4, write_raw_mmc4

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> RawMmc4:
    """3 zips (number 1 missing), missing and truncated images, a bad JSON line per zip."""
    return write_raw_mmc4(
        tmp_path_factory.mktemp("raw"),
        shards=3,
        docs_per_shard=6,
        missing_shards=(1,),
        missing_image_rate=0.2,
        truncated_rate=0.15,
        bad_lines_per_shard=1,
        duplicate_rate=0.3,
    )


def expected_output(raw: RawMmc4) -> tuple[dict[str, dict[str, Any]], Counter[str]]:
    """What the conversion must give, computed straight from the zips and the image folder."""
    docs: dict[str, dict[str, Any]] = {}
    counts: Counter[str] = Counter()
    for index in range(3):
        path = Path(raw.docs_spec.replace("{0..2}", str(index)))
        if not path.exists():
            continue
        with zipfile.ZipFile(path) as archive:
            lines = archive.read(archive.namelist()[0]).decode().splitlines()
        for number, line in enumerate(lines, start=1):
            counts["docs_in"] += 1
            try:
                doc = json.loads(line)
            except ValueError:
                counts["bad_lines"] += 1
                continue
            for image in doc["image_info"]:
                file = raw.image_dir / str(index) / image["image_name"]
                if not file.exists():
                    counts["images_missing"] += 1
                    continue
                data = file.read_bytes()
                counts["image_bytes"] += len(data)
                if not data.endswith(b"\xff\xd9"):
                    counts["images_corrupt"] += 1
                    continue
                counts["images_found"] += 1
                image["image_base64"] = base64.b64encode(data).decode()
            counts["docs_out"] += 1
            docs[f"docs_shard_{index}_v2-{number:06d}"] = doc
    return docs, counts


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_names_and_shard_numbers() -> None:
    assert input_stem("s3://b/docs_shard_7_v2.jsonl.zip") == "docs_shard_7_v2"
    assert input_stem("/x/my.docs.jsonl") == "my_docs"
    assert [shard_number(u) for u in ("a/shard_12.zip", "docs_no_face_shard_3_v3.jsonl.zip")] == [
        12,
        3,
    ]
    assert shard_number("/d/0042.jsonl") == 42


def test_round_trip_every_document_image_and_count(raw: RawMmc4, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert_mmc4(
        raw.docs_spec, out, Mmc4Options(str(raw.image_dir)), RunOptions(workers=1)
    )
    docs, counts = expected_output(raw)
    assert raw.bad_lines == 2 and raw.images_truncated > 0 and raw.images_missing > 0

    written: dict[str, dict[str, Any]] = {}
    for name in ("docs_shard_0_v2.tar", "docs_shard_2_v2.tar"):
        members = read_tar(out / name)
        assert all(m.endswith(".json") and "." not in m[: -len(".json")] for m in members)
        written.update({m.removesuffix(".json"): json.loads(v) for m, v in members.items()})
    assert written == docs  # every field, every base64 byte, in key order per shard
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "docs_shard_0_v2.tar",
        "docs_shard_2_v2.tar",
    ]

    totals = report.totals
    for key in ("docs_in", "docs_out", "bad_lines", "images_found", "images_missing"):
        assert totals[key] == counts[key], key
    assert totals["images_corrupt"] == counts["images_corrupt"] == raw.images_truncated
    assert totals["image_bytes"] == counts["image_bytes"]
    assert (totals["inputs"], totals["inputs_missing"], totals["shards"]) == (3, 1, 2)
    assert report.skipped == 1 + 2 + raw.images_truncated

    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {
        "docs_shard_0_v2.tar": sum(k.startswith("docs_shard_0") for k in docs),
        "docs_shard_2_v2.tar": sum(k.startswith("docs_shard_2") for k in docs),
    }
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["shards"]["docs_shard_0_v2.tar"]
    assert shard["samples"] == sizes["docs_shard_0_v2.tar"]
    assert shard["bytes"] == (out / "docs_shard_0_v2.tar").stat().st_size
    assert shard["docs_in"] == 7 and shard["bad_lines"] == 1

    problems = [(p.file, p.line, p.severity) for p in report.problems]
    missing_zip = raw.docs_spec.replace("{0..2}", "1")
    assert (missing_zip, None, "warning") in problems
    assert (str(raw.zips[0]), 3, "warning") in problems  # the bad line, with file and line
    assert (str(raw.zips[1]), 3, "warning") in problems


@pytest.mark.multiprocess
def test_output_is_byte_identical_for_1_and_3_workers(raw: RawMmc4, tmp_path: Path) -> None:
    options = Mmc4Options(str(raw.image_dir), docs_per_shard=4)
    convert_mmc4(raw.docs_spec, tmp_path / "one", options, RunOptions(workers=1))
    convert_mmc4(raw.docs_spec, tmp_path / "three", options, RunOptions(workers=3))
    one, three = tree(tmp_path / "one"), tree(tmp_path / "three")
    assert one == three
    assert "docs_shard_0_v2-1.tar" in one and "docs_shard_2_v2-1.tar" in one


def test_crash_leftovers_are_redone_byte_identically(raw: RawMmc4, tmp_path: Path) -> None:
    options = Mmc4Options(str(raw.image_dir))
    convert_mmc4(raw.docs_spec, tmp_path / "clean", options, RunOptions(workers=1))
    out = tmp_path / "crashed"
    convert_mmc4(raw.docs_spec, out, options, RunOptions(workers=1))
    # A crash mid-shard leaves a temporary file; a crash before the record leaves a shard and
    # no record; a damaged shard no longer has its recorded size.
    (out / ".docs_shard_2_v2.tar.tmp-12345").write_bytes(b"partial")
    (out / "manifest.d" / "docs_shard_2_v2.json").unlink()
    # ... and a crash while writing that record leaves its temporary file (seen in CI)
    (out / "manifest.d" / ".docs_shard_2_v2.json.tmp-vm-27274").write_bytes(b"")
    with (out / "docs_shard_0_v2.tar").open("r+b") as handle:
        handle.truncate(1024)
    report = convert_mmc4(raw.docs_spec, out, options, RunOptions(workers=1))
    assert tree(out) == tree(tmp_path / "clean")
    assert report.reused == []
    again = convert_mmc4(raw.docs_spec, out, options, RunOptions(workers=1))
    assert again.reused == ["docs_shard_0_v2", "docs_shard_2_v2"]
    assert again.totals["docs_out"] == report.totals["docs_out"]
    assert tree(out) == tree(tmp_path / "clean")


def test_changed_options_need_overwrite(raw: RawMmc4, tmp_path: Path) -> None:
    from flamingo_cli.errors import ConvertError

    convert_mmc4(raw.docs_spec, tmp_path, Mmc4Options(str(raw.image_dir)), RunOptions(workers=1))
    with pytest.raises(ConvertError, match="other options"):
        convert_mmc4(raw.docs_spec, tmp_path, Mmc4Options(str(raw.image_dir), min_images=1))
    report = convert_mmc4(
        raw.docs_spec,
        tmp_path,
        Mmc4Options(str(raw.image_dir), min_images=1),
        RunOptions(overwrite=True),
    )
    assert report.totals["dropped_min_images"] > 0


def test_filters_and_splitting(raw: RawMmc4, tmp_path: Path) -> None:
    docs, _ = expected_output(raw)
    options = Mmc4Options(
        str(raw.image_dir), min_images=2, drop_url_duplicates=True, max_shard_bytes=40_000
    )
    report = convert_mmc4(raw.docs_spec, tmp_path, options, RunOptions(workers=1))
    duplicates = [k for k, d in docs.items() if d["could_have_url_duplicate"] == 1]
    few = [
        k
        for k, d in docs.items()
        if d["could_have_url_duplicate"] == 0
        and sum("image_base64" in i for i in d["image_info"]) < 2
    ]
    assert report.totals["dropped_url_duplicate"] == len(duplicates) > 0
    assert report.totals["dropped_min_images"] == len(few) > 0
    keys = []
    shards = sorted(
        tmp_path.glob("*.tar"), key=lambda p: (p.name.split("-")[0], int(p.stem.split("-")[1]))
    )
    for path in shards:
        assert path.stat().st_size <= 40_000 or len(read_tar(path)) == 1
        keys += [m.removesuffix(".json") for m in read_tar(path)]
    assert keys == sorted(set(docs) - set(duplicates) - set(few))
    assert len(shards) > 2


def test_reencode_jpeg_max_side(raw: RawMmc4, tmp_path: Path) -> None:
    from PIL import Image

    options = Mmc4Options(
        str(raw.image_dir), image=ImageOptions(reencode="jpeg", quality=80, max_side=48)
    )
    convert_mmc4(raw.zips[0].as_posix(), tmp_path, options, RunOptions(workers=1))
    images = [
        Image.open(io.BytesIO(base64.b64decode(i["image_base64"])))
        for v in read_tar(tmp_path / "docs_shard_0_v2.tar").values()
        for i in json.loads(v)["image_info"]
        if "image_base64" in i
    ]
    assert images and {(im.format, max(im.size)) for im in images} == {("JPEG", 48)}


def test_plain_jsonl_and_flat_layout(tmp_path: Path, raw: RawMmc4) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in (raw.image_dir / "0").iterdir():
        (flat / image.name).write_bytes(image.read_bytes())
    with zipfile.ZipFile(raw.zips[0]) as archive:
        (tmp_path / "part.jsonl").write_bytes(archive.read(archive.namelist()[0]))
    a = convert_mmc4(
        str(raw.zips[0]), tmp_path / "a", Mmc4Options(str(raw.image_dir)), RunOptions(workers=1)
    )
    b = convert_mmc4(
        str(tmp_path / "part.jsonl"),
        tmp_path / "b",
        Mmc4Options(str(flat), image_layout="flat"),
        RunOptions(workers=1),
    )
    assert a.totals == b.totals
    renamed = {
        k.replace("docs_shard_0_v2", "part"): v
        for k, v in read_tar(tmp_path / "a" / "docs_shard_0_v2.tar").items()
    }
    assert read_tar(tmp_path / "b" / "part.tar") == renamed


def test_webdataset_and_openflamingo_read_our_shards(raw: RawMmc4, tmp_path: Path) -> None:
    import torch
    import torchvision.transforms as T
    import webdataset as wds

    from flamingo_cli.model.tokenizer import TINY_TOKENIZER, load_tokenizer

    convert_mmc4(raw.docs_spec, tmp_path, Mmc4Options(str(raw.image_dir)), RunOptions(workers=1))
    docs, _ = expected_output(raw)
    urls = [str(tmp_path / "docs_shard_0_v2.tar"), str(tmp_path / "docs_shard_2_v2.tar")]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    samples = {s["__key__"]: s["json"] for s in dataset}
    assert {k: json.loads(v) for k, v in samples.items()} == docs

    import open_flamingo.train as of_train

    sys.path.insert(0, str(Path(of_train.__file__).parent))  # its data.py imports `data_utils`
    try:
        from open_flamingo.train.data import preprocess_interleaved
    finally:
        sys.path.pop(0)
    tokenizer, special = load_tokenizer(TINY_TOKENIZER)
    object.__setattr__(tokenizer, "additional_special_tokens", ["<|endofchunk|>", "<image>"])
    object.__setattr__(
        tokenizer, "additional_special_tokens_ids", [special.endofchunk, special.image]
    )
    processor = T.Compose([T.Resize((32, 32)), T.ToTensor()])
    checked = 0
    for key, data in samples.items():
        found = [i for i in docs[key]["image_info"] if "image_base64" in i]
        if len(found) != 2:
            continue
        images, (input_ids, _) = preprocess_interleaved(
            (data,), tokenizer, processor, 0.24, 1, max_num_images=3
        )
        assert images.shape == (3, 3, 32, 32)
        assert [bool(images[i].any()) for i in range(3)] == [True, True, False]
        assert int((input_ids == special.image).sum()) == 2
        checked += 1
    assert checked > 0
    assert torch.is_tensor(images)


def test_cli_exit_codes_and_json(raw: RawMmc4, tmp_path: Path) -> None:
    args = ["convert", "mmc4", raw.docs_spec, "--image-dir", str(raw.image_dir), "-w", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["totals"]["bad_lines"] == 2 and data["totals"]["inputs_missing"] == 1
    assert [i["status"] for i in data["inputs"]] == ["converted", "missing", "converted"]

    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--strict"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"{raw.zips[0]}:3: not a JSON document" in " ".join(result.stderr.split())
    assert "inputs already complete (skipped)" in result.stdout

    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--max-side", "64"])
    assert result.exit_code == 2 and "--max-side needs --reencode jpeg" in result.stderr

    result = runner.invoke(
        app, ["convert", "mmc4", raw.docs_spec, "--image-dir", str(tmp_path / "nope"), "-o", "x"]
    )
    assert result.exit_code == 1 and "is not a directory" in result.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_run_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    raw = write_raw_mmc4(tmp_path / "raw", shards=6, docs_per_shard=40, images_per_doc=3)
    options = Mmc4Options(str(raw.image_dir), docs_per_shard=15)
    convert_mmc4(raw.docs_spec, tmp_path / "clean", options, RunOptions(workers=1))
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "flamingo_cli",
        "-q",
        "convert",
        "mmc4",
        raw.docs_spec,
        "--image-dir",
        str(raw.image_dir),
        "--out",
        str(out),
        "--docs-per-shard",
        "15",
        "-w",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "manifest.d").glob("*.json")))
    assert finished < 6, "the run finished before it was killed; make the corpus larger"
    rerun = subprocess.run([*cmd, "--json"], env=env, capture_output=True, check=False)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert json.loads(rerun.stdout)["totals"]["inputs_reused"] == finished
    assert not list(out.glob(".*tmp-*"))
    assert tree(out) == tree(tmp_path / "clean")


def test_shard_number_layout(raw: RawMmc4, tmp_path: Path) -> None:
    # zips[1] is shard 2 but position 0 of this spec: only `shard-number` finds its images.
    spec = str(raw.zips[1])
    by_index = convert_mmc4(
        spec, tmp_path / "i", Mmc4Options(str(raw.image_dir)), RunOptions(workers=1)
    )
    by_number = convert_mmc4(
        spec, tmp_path / "n", Mmc4Options(str(raw.image_dir), image_layout="shard-number")
    )
    assert by_index.totals["images_found"] == 0
    assert by_number.totals["images_found"] > 0
    assert (
        by_number.totals["images_missing"]
        + by_number.totals["images_found"]
        + by_number.totals["images_corrupt"]
        == by_index.totals["images_missing"]
    )


def test_unreadable_inputs_fail_alone(raw: RawMmc4, tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.jsonl", "{}\n")
        archive.writestr("b.jsonl", "{}\n")
    spec = f"{tmp_path}/{{broken,two}}.zip::{raw.zips[0]}"
    result = runner.invoke(
        app,
        ["convert", "mmc4", spec, "--image-dir", str(raw.image_dir), "-o", str(tmp_path / "o")],
    )
    assert result.exit_code == 1
    err = " ".join(result.stderr.split())
    assert f"{tmp_path}/broken.zip is not a valid zip file" in err
    assert "holds 2 .jsonl files (a.jsonl, b.jsonl); an MMC4 zip holds exactly one" in err
    assert json.loads((tmp_path / "o" / "sizes.json").read_text()) == {"docs_shard_0_v2.tar": 6}


def test_image_checks() -> None:
    from flamingo_cli.convert.images import CorruptImage, check_image
    from flamingo_cli.synthetic import encode, shape_image

    image = shape_image("red", "circle", 40, random.Random(0))
    jpeg, png, webp = (encode(image, f) for f in ("JPEG", "PNG", "WEBP"))
    assert (check_image(jpeg).extension, check_image(jpeg).width) == ("jpg", 40)
    assert check_image(jpeg + b"\n\0").height == 40  # bytes after the end marker are tolerated
    assert check_image(png).extension == "png" and check_image(webp).extension == "webp"
    for bad, reason in [
        (jpeg[: len(jpeg) // 2], "end marker"),
        (png[:-20], "IEND"),
        (b"\xff\xd8" + b"\x00" * 50 + b"\xff\xd9", "marker"),
        (b"GIF89a-not-really", "cannot parse"),
        (b"", "empty"),
    ]:
        with pytest.raises(CorruptImage, match=reason):
            check_image(bad)
