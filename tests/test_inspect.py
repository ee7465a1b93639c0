"""inspect-shards: every kind of damage is reported with shard, key and reason; clean is clean."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.inspect.report import Finding, InspectReport
from flamingo_cli.inspect.run import (
    InspectOptions,
    groups_from_recipe,
    groups_from_specs,
    inspect_shards,
)
from flamingo_cli.shards import tar as tar_module
from flamingo_cli.shards.sizes import read_sizes
from flamingo_cli.shards.tar import TarReader, count_samples
from flamingo_cli.shards.write import write_sizes, write_tar
from flamingo_cli.synthetic import laion_samples, mmc4_samples

from .conftest import RECIPES, cli_in_fresh_interpreter
from .test_shards_io import http_dir  # noqa: F401  (fixture: a local HTTP server)

runner = CliRunner()
Sample = dict[str, Any]


def run(*specs: str, **options: Any) -> InspectReport:
    opts = InspectOptions(workers=1, **options)
    return inspect_shards(groups_from_specs(list(specs), opts), opts)


def findings(report: InspectReport) -> list[tuple[str, str | None, str]]:
    return [(Path(f.shard).name, f.key, f.check) for f in report.findings()]


def only(report: InspectReport, check: str) -> Finding:
    found = [f for f in report.findings() if f.check == check]
    assert len(found) == 1, report.findings()
    return found[0]


def offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (header offset, data offset), from the standard library's reader."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def laion(path: Path, count: int = 4, edit: Any = None) -> Path:
    samples: Iterator[Sample] = laion_samples(0, count, seed=0)  # type: ignore[assignment]
    write_tar(path, (edit(s) if edit else s for s in samples))
    return path


def mmc4(path: Path, count: int = 3, edit: Any = None) -> Path:
    def edited() -> Iterator[Sample]:
        for sample in mmc4_samples(0, count, seed=0):
            if edit is None:
                yield sample
                continue
            doc = json.loads(sample["json"])
            edit(sample["__key__"], doc)
            yield {"__key__": sample["__key__"], "json": json.dumps(doc).encode()}

    write_tar(path, edited())
    return path


# Clean shards


def test_clean_shards_report_exact_counts(shard_root: Path) -> None:
    report = run(str(shard_root / "laion"), f"{shard_root}/mmc4/{{00000..00003}}.tar")
    assert report.ok and report.errors == 0 and report.warnings == 0
    pairs, docs = report.groups
    assert (pairs.kind, pairs.total("samples"), pairs.total("members")) == ("pairs", 32, 96)
    assert pairs.extensions == {"json": 32, "png": 32, "txt": 32}
    assert (docs.kind, docs.total("samples"), docs.total("members")) == ("interleaved", 16, 16)
    assert [s.sizes_json for s in docs.shards] == [4, 4, 4, 4]
    total = sum((shard_root / "laion" / f"{i:05d}.tar").stat().st_size for i in range(4))
    assert pairs.total("bytes") == total


def test_clean_shards_deep_histograms(shard_root: Path) -> None:
    report = run(f"{shard_root}/mmc4", f"{shard_root}/laion/00000.tar", deep=True)
    assert report.ok, report.findings()
    docs, pairs = report.groups
    deep = docs.deep
    assert deep is not None
    assert (deep.samples, deep.failed) == (16, 0)
    assert deep.images_per_sample == {2: 16}
    assert deep.kept_per_sample == {2: 16}
    assert pairs.deep is not None and (pairs.deep.samples, pairs.deep.failed) == (8, 0)


def test_similarity_threshold_drops_every_image(shard_root: Path) -> None:
    # The synthetic images match their sentence with similarity 0.3.
    report = run(f"{shard_root}/mmc4/00000.tar", deep=True, sim_threshold=0.35)
    deep = report.groups[0].deep
    assert deep is not None
    assert deep.kept_per_sample == {0: 4}
    assert deep.dropped == {"not assigned": 8}
    assert deep.under_min_images == 4


@pytest.mark.slow
def test_token_counts_with_the_tiny_tokenizer(shard_root: Path) -> None:
    from flamingo_cli.model.tokenizer import TINY_TOKENIZER, load_tokenizer

    report = run(f"{shard_root}/laion/00000.tar", deep=True, tokenizer=str(TINY_TOKENIZER))
    tokenizer, _ = load_tokenizer(TINY_TOKENIZER)
    expected: dict[int, int] = {}
    for sample in laion_samples(0, 8, seed=0):
        text = f"<image>{sample['txt'].decode()}<|endofchunk|>{tokenizer.eos_token}"  # type: ignore[union-attr]
        n = len(tokenizer(text)["input_ids"])
        expected[n] = expected.get(n, 0) + 1
    deep = report.groups[0].deep
    assert deep is not None and dict(deep.tokens) == expected


# Tar-level damage (byte edits)


def test_truncated_tar(tmp_path: Path) -> None:
    path = laion(tmp_path / "cut.tar")
    header, data = offsets(path)["000000002.png"]
    path.write_bytes(path.read_bytes()[: data + 10])
    report = run(str(path))
    finding = only(report, "truncated")
    assert (Path(finding.shard).name, finding.key, finding.offset) == (
        "cut.tar",
        "000000002",
        header,
    )
    assert f"member at byte {header} needs" in finding.reason
    assert report.groups[0].shards[0].damaged_at == header
    assert report.groups[0].total("samples") == 2  # the two complete samples before the cut


def test_tar_without_end_marker_is_truncated(tmp_path: Path) -> None:
    path = laion(tmp_path / "cut.tar")
    header, _ = offsets(path)["000000003.png"]
    path.write_bytes(path.read_bytes()[:header])
    finding = only(run(str(path)), "truncated")
    assert finding.offset == header
    assert f"ends at byte {header} without the end-of-archive marker" in finding.reason


def test_corrupt_header_found_by_checksum(tmp_path: Path) -> None:
    path = laion(tmp_path / "bad.tar")
    header, _ = offsets(path)["000000001.txt"]
    data = bytearray(path.read_bytes())
    data[header + 3] ^= 0x20  # one letter of the member name: only the checksum tells
    path.write_bytes(bytes(data))
    report = run(str(path))
    finding = only(report, "corrupt-header")
    assert finding.offset == header
    assert finding.reason == (
        f"the tar has a corrupt header at byte offset {header} (after sample 000000001)"
    )
    assert not report.ok
    with pytest.raises(Exception, match=f"corrupt header at byte offset {header}"):
        count_samples(str(path))


def test_duplicate_key(tmp_path: Path) -> None:
    samples = list(laion_samples(0, 3, seed=0))
    samples.append(dict(samples[0]))
    path = tmp_path / "dup.tar"
    write_tar(path, samples)
    report = run(str(path))
    finding = only(report, "duplicate-key")
    assert finding.key == "000000000"
    with tarfile.open(path) as tar:
        repeats = [m.offset for m in tar.getmembers() if m.name == "000000000.png"]
    assert finding.offset == repeats[1]
    assert finding.reason == (
        f"key appears again at byte {repeats[1]} (first sample at byte 0); webdataset yields it twice"
    )
    assert report.groups[0].shards[0].duplicate_keys == 1


def test_missing_member(tmp_path: Path) -> None:
    def drop_txt(sample: Sample) -> Sample:
        if sample["__key__"] == "000000002":
            del sample["txt"]
        return sample

    report = run(str(laion(tmp_path / "miss.tar", edit=drop_txt)))
    finding = only(report, "missing-member")
    assert (finding.key, finding.reason) == ("000000002", "no .txt member")
    assert report.groups[0].shards[0].missing_members == 1


def _plain_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("deep", [False, True])
def test_member_repeated_within_a_sample(tmp_path: Path, deep: bool) -> None:
    image = next(iter(laion_samples(0, 1, seed=0)))["png"]
    members = [("a.png", image), ("a.txt", b"one"), ("a.txt", b"two"), ("b.png", image)]
    path = _plain_tar(tmp_path / "repeat.tar", [*members, ("b.txt", b"three")])
    report = run(str(path), deep=deep)
    finding = only(report, "duplicate-key")
    with tarfile.open(path) as tar:
        second = [m.offset for m in tar.getmembers() if m.name == "a.txt"][1]
    assert (finding.key, finding.offset) == ("a", second)
    assert finding.reason == (
        f"member a.txt appears twice in one sample (byte {second}); webdataset stops with an error"
    )
    shard = report.groups[0].shards[0]
    assert (shard.samples, shard.members, shard.duplicate_keys) == (2, 5, 1)
    assert shard.extensions == {"png": 2, "txt": 3}


def test_reports_are_the_same_without_the_compiled_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every structural finding, counted and placed the same by both walks."""
    samples = list(laion_samples(0, 6, seed=0))
    write_tar(tmp_path / "dup.tar", [*samples, dict(samples[1])])
    laion(tmp_path / "miss.tar", edit=lambda s: {k: v for k, v in s.items() if k != "txt"})
    laion(tmp_path / "clean.tar")
    image = samples[0]["png"]
    _plain_tar(tmp_path / "repeat.tar", [("a.png", image), ("a.txt", b"1"), ("a.txt", b"2")])
    truncated = (tmp_path / "clean.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(truncated[: len(truncated) // 2])
    write_sizes(tmp_path, {"clean.tar": 4, "dup.tar": 6, "miss.tar": 4})
    compiled = run(str(tmp_path)).to_dict()
    monkeypatch.setattr(tar_module, "_list_plain", None)
    assert run(str(tmp_path)).to_dict() == compiled
    checks = sorted((Path(f["shard"]).name, f["check"]) for f in compiled["findings"])
    assert checks == [
        ("cut.tar", "sizes-json"),
        ("cut.tar", "truncated"),
        ("dup.tar", "duplicate-key"),
        ("dup.tar", "sizes-json"),
        *[("miss.tar", "missing-member")] * 4,
        ("repeat.tar", "duplicate-key"),
        ("repeat.tar", "sizes-json"),
    ]


# Sample-level damage (--deep)


def test_bad_base64(tmp_path: Path) -> None:
    def damage(key: str, doc: dict[str, Any]) -> None:
        if key == "mmc4-00000-0001":
            doc["image_info"][1]["image_base64"] = "!!" + doc["image_info"][1]["image_base64"][2:]

    path = mmc4(tmp_path / "b64.tar", edit=damage)
    assert run(str(path)).ok  # fast mode reads headers only
    finding = only(run(str(path), deep=True), "base64")
    assert (finding.key, finding.shard) == ("mmc4-00000-0001", str(path))
    assert finding.reason.startswith("image_info[1].image_base64: ")


def test_corrupt_image_in_a_pair_shard(tmp_path: Path) -> None:
    path = laion(tmp_path / "img.tar")
    _, data_offset = offsets(path)["000000001.png"]
    data = bytearray(path.read_bytes())
    data[data_offset + 40 : data_offset + 60] = b"\x00" * 20  # inside the PNG's chunks
    path.write_bytes(bytes(data))
    report = run(str(path), deep=True)
    finding = only(report, "image")
    assert (finding.key, finding.offset) == ("000000001", offsets(path)["000000001.png"][0])
    assert finding.reason.startswith(".png cannot be decoded: ")
    deep = report.groups[0].deep
    assert deep is not None and (deep.samples, deep.failed) == (4, 1)


def test_corrupt_image_in_a_document(tmp_path: Path) -> None:
    def damage(key: str, doc: dict[str, Any]) -> None:
        if key == "mmc4-00000-0002":
            raw = base64.b64decode(doc["image_info"][0]["image_base64"])
            doc["image_info"][0]["image_base64"] = base64.b64encode(raw[:2000]).decode()

    report = run(str(mmc4(tmp_path / "img.tar", edit=damage)), deep=True)
    finding = only(report, "image")
    assert finding.key == "mmc4-00000-0002"
    assert finding.reason.startswith("image_info[0]: cannot be decoded: ")


def test_wrong_similarity_matrix_shape(tmp_path: Path) -> None:
    def damage(key: str, doc: dict[str, Any]) -> None:
        if key == "mmc4-00000-0000":
            doc["similarity_matrix"] = doc["similarity_matrix"][:1]

    report = run(str(mmc4(tmp_path / "sim.tar", edit=damage)), deep=True)
    finding = only(report, "similarity-shape")
    assert (finding.key, finding.offset) == ("mmc4-00000-0000", 0)  # the sample's first header
    assert finding.reason == ("similarity_matrix is 1x3, expected 2x3 (images x sentences)")


def test_matched_index_json_and_text_warnings(tmp_path: Path) -> None:
    def damage(key: str, doc: dict[str, Any]) -> None:
        if key == "mmc4-00000-0000":
            doc["image_info"][0]["matched_text_index"] = 7
        if key == "mmc4-00000-0001":
            doc["text_list"][0] = "click <image> here"
            doc["text_list"].append(" ")
            for row in doc["similarity_matrix"]:
                row.append(0.0)

    path = mmc4(tmp_path / "docs.tar", edit=damage)
    data = bytearray(path.read_bytes())
    _, start = offsets(path)["mmc4-00000-0002.json"]
    data[start] = ord("[")  # the third document is no longer valid JSON
    path.write_bytes(bytes(data))
    report = run(str(path), deep=True)
    assert [(f.key, f.check, f.severity) for f in report.findings()] == [
        ("mmc4-00000-0000", "matched-index", "error"),
        ("mmc4-00000-0002", "json", "error"),
        ("mmc4-00000-0001", "special-token", "warning"),
        ("mmc4-00000-0001", "empty-text", "warning"),
    ]
    assert only(report, "matched-index").reason == (
        "image_info[0].matched_text_index 7 is outside 0..2"
    )


# Counts against sizes.json and _stats.json


def test_sizes_json_mismatch_and_unlisted(tmp_path: Path) -> None:
    laion(tmp_path / "00000.tar")
    laion(tmp_path / "00001.tar")
    write_sizes(tmp_path, {"00000.tar": 9})
    report = run(str(tmp_path))
    mismatch = [f for f in report.findings() if f.severity == "error"]
    assert [(Path(f.shard).name, f.check, f.reason) for f in mismatch] == [
        ("00000.tar", "sizes-json", "sizes.json says 9 samples, the tar holds 4")
    ]
    assert findings(report)[1:] == [("00001.tar", None, "sizes-json")]
    assert report.findings()[1].reason == "not listed in sizes.json"


def test_stats_json_mismatch(tmp_path: Path) -> None:
    laion(tmp_path / "00000.tar")
    laion(tmp_path / "00001.tar")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 10, "successes": 3}))
    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": 10, "successes": 4}))
    report = run(str(tmp_path))
    finding = only(report, "stats-json")
    assert (Path(finding.shard).name, finding.reason) == (
        "00000.tar",
        "_stats.json says 3 successes, the tar holds 4 samples",
    )
    assert [s.stats_successes for s in report.groups[0].shards] == [3, 4]


def test_write_sizes_matches_true_counts(tmp_path: Path) -> None:
    laion(tmp_path / "00000.tar", count=5)
    laion(tmp_path / "00001.tar", count=3)
    cut = laion(tmp_path / "00002.tar", count=3)
    cut.write_bytes(cut.read_bytes()[:1500])
    write_sizes(tmp_path, {"00000.tar": 99, "other.tar": 7})
    report = run(str(tmp_path), write_sizes=True)
    assert report.sizes_written == [str(tmp_path / "sizes.json")]
    # Damaged shards are not written; entries for other shards are kept.
    assert read_sizes(str(tmp_path)) == {"00000.tar": 5, "00001.tar": 3, "other.tar": 7}
    assert {count_samples(str(tmp_path / n)) for n in ("00000.tar", "00001.tar")} == {5, 3}
    assert [f.check for f in report.findings() if f.severity == "error"] == ["truncated"]
    assert run(str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")).ok


# Readers: streams, long names, pipes, recipes


def test_stream_and_mapped_readers_agree(tmp_path: Path) -> None:
    path = tmp_path / "long.tar"
    long_name = "d" * 120 + "/sample.txt"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in (long_name, "x.json", "é" * 60 + ".txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, __import__("io").BytesIO(b"abc"))
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("p" * 150 + ".jpg")
        info.size = 5
        tar.addfile(info, __import__("io").BytesIO(b"12345"))
    for shard in (path, pax):
        with tarfile.open(shard) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
        for url in (str(shard), f"pipe:cat {shard}"):
            with TarReader(url, allow_pipe=True, want=lambda _n: True) as reader:
                got = [(m.name, m.data_offset, m.size, d) for m, d in reader]
            assert [g[:3] for g in got] == expected
            assert reader.damage is None
            assert {g[3] for g in got} <= {b"abc", b"12345"}


def test_remote_shards_stream_through_the_opener(http_dir: str, tmp_path: Path) -> None:  # noqa: F811
    laion(tmp_path / "00000.tar")
    write_sizes(tmp_path, {"00000.tar": 4})
    cut = laion(tmp_path / "00001.tar")
    header, data = offsets(cut)["000000001.png"]
    cut.write_bytes(cut.read_bytes()[: data + 100])
    report = run(f"{http_dir}/{{00000..00001}}.tar")
    first, second = report.groups[0].shards
    assert (first.samples, first.members, first.sizes_json, first.errors) == (4, 12, 4, 0)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        last = tar.getmembers()[-1]
    assert first.bytes == last.offset_data + -(-last.size // 512) * 512  # up to the end marker
    assert [(f.check, f.key, f.offset) for f in second.findings if f.severity == "error"] == [
        ("truncated", "000000001", header)
    ]


def test_pipe_needs_allow_pipe(tmp_path: Path) -> None:
    path = laion(tmp_path / "p.tar")
    refused = run(f"pipe:cat {path}")
    assert findings(refused) == [("p.tar", None, "unreadable")]
    assert "--allow-pipe" in refused.findings()[0].reason
    allowed = run(f"pipe:cat {path}", allow_pipe=True)
    assert allowed.ok and allowed.groups[0].total("samples") == 4


def test_pipe_stream_reports_truncation(tmp_path: Path) -> None:
    path = laion(tmp_path / "p.tar")
    header, data = offsets(path)["000000002.png"]
    finding = only(run(f"pipe:head -c {data + 10} {path}", allow_pipe=True), "truncated")
    assert (finding.key, finding.offset) == ("000000002", header)


def test_recipe_groups_and_kind_check(tmp_path: Path) -> None:
    opts = InspectOptions(workers=1)
    report = inspect_shards(groups_from_recipe(RECIPES / "tiny-cpu.toml", opts), opts)
    assert [(g.name, g.total("samples")) for g in report.groups] == [
        ("laion training", 64),
        ("laion eval", 32),
        ("mmc4 training", 32),
        ("mmc4 eval", 16),
    ]
    assert report.ok
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[data.mmc4]\nshards = "{RECIPES}/tiny-data/laion/00000.tar"\nbatch_size = 4\n'
    )
    wrong = inspect_shards(groups_from_recipe(recipe, opts), opts)
    assert only(wrong, "kind").reason == (
        "holds image-text pairs, but data.mmc4 expects interleaved documents"
    )


# The command line


def test_cli_exit_codes_and_json(shard_root: Path, tmp_path: Path) -> None:
    clean = runner.invoke(app, ["inspect-shards", str(shard_root / "laion"), "--json"])
    assert clean.exit_code == 0, clean.output
    data = json.loads(clean.stdout)
    assert (data["ok"], data["errors"], data["groups"][0]["totals"]["samples"]) == (True, 0, 32)

    path = laion(tmp_path / "cut.tar")
    path.write_bytes(path.read_bytes()[:3000])
    bad = runner.invoke(app, ["inspect-shards", str(path), "--json", "--workers", "2"])
    assert bad.exit_code == 1
    found = json.loads(bad.stdout)["findings"]
    assert [(f["shard"], f["check"], f["severity"]) for f in found] == [
        (str(path), "truncated", "error")
    ]

    table = runner.invoke(app, ["inspect-shards", str(path)])
    assert table.exit_code == 1
    assert "truncated" in table.stdout and "Traceback" not in table.output

    usage = runner.invoke(app, ["inspect-shards"])
    assert usage.exit_code == 2
    assert "give shard SPECs or --recipe RECIPE" in usage.stderr


def test_cli_max_errors_caps_the_listing(tmp_path: Path) -> None:
    def no_caption(sample: Sample) -> Sample:
        del sample["txt"]
        return sample

    laion(tmp_path / "00000.tar", count=3, edit=no_caption)
    result = runner.invoke(
        app, ["inspect-shards", str(tmp_path / "00000.tar"), "--json", "--max-errors", "2"]
    )
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert (data["errors"], len(data["findings"]), data["findings_truncated"]) == (3, 2, True)


def test_fast_and_deep_modes_do_not_import_torch(shard_root: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from flamingo_cli.inspect.run import InspectOptions, groups_from_specs, inspect_shards\n"
        "for deep in (False, True):\n"
        "    o = InspectOptions(deep=deep, workers=1)\n"
        f"    specs = [{str(shard_root / 'laion')!r}, {str(shard_root / 'mmc4')!r}]\n"
        "    r = inspect_shards(groups_from_specs(specs, o), o)\n"
        "    assert r.ok and [g.total('samples') for g in r.groups] == [32, 16], r.to_dict()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_json_run_imports_neither_rich_nor_pydantic(shard_root: Path) -> None:
    """Start-up is what the CLI loses against `tar -tf` on small shard sets: a fast `--json` run
    stays clear of rich's consoles, of pydantic (Typer >= 0.29 builds a pydantic adapter per
    option, about 0.25 s, which is why pyproject keeps Typer below it) and of numpy (--deep)."""
    output, loaded = cli_in_fresh_interpreter(
        ["inspect-shards", "--json", str(shard_root / "laion")]
    )
    assert json.loads(output)["groups"][0]["totals"]["samples"] == 32
    assert not loaded & {"rich", "pydantic", "numpy"}, loaded & {"rich", "pydantic", "numpy"}


def test_cli_write_sizes_preview_and_recipe(tmp_path: Path) -> None:
    laion(tmp_path / "00000.tar", count=3)
    laion(tmp_path / "00001.tar", count=2)
    page = tmp_path / "preview.html"
    args = ["inspect-shards", f"{tmp_path}/*.tar", "--write-sizes", "--json"]
    result = runner.invoke(app, [*args, "--preview", str(page), "--samples", "2", "--seed", "5"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sizes_written"] == [str(tmp_path / "sizes.json")]
    assert data["preview"] == str(page)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 2}
    assert page.read_text(encoding="utf-8").count("<img ") == 2

    recipe = runner.invoke(
        app, ["inspect-shards", "--recipe", str(RECIPES / "tiny-cpu.toml"), "--json"]
    )
    assert recipe.exit_code == 0, recipe.output
    names = [g["name"] for g in json.loads(recipe.stdout)["groups"]]
    assert names == ["laion training", "laion eval", "mmc4 training", "mmc4 eval"]


def test_corrupt_header_after_many_members(tmp_path: Path) -> None:
    """Checksums are verified in batches; damage past the first batch is still exact."""
    path = tmp_path / "many.tar"
    write_tar(path, ({"__key__": f"k{i:05d}", "txt": b"x"} for i in range(5000)))
    bad = 4500 * 1024  # each sample: one header and one data block
    data = bytearray(path.read_bytes())
    data[bad + 10] ^= 0x01
    path.write_bytes(bytes(data))
    report = run(str(path))
    finding = only(report, "corrupt-header")
    assert finding.offset == bad
    assert report.groups[0].total("samples") == 4500


def test_chatgpt_documents_are_checked(tmp_path: Path) -> None:
    images = [
        json.loads(s["json"])["image_info"][0]["image_base64"]  # type: ignore[arg-type]
        for s in mmc4_samples(0, 2, seed=0)
    ]
    doc = {
        "is_gpt": True,
        "example": "A cat _!_IMAGE1_!_ sits. Then a dog _!_IMAGE2_!_ runs.",
        "image_map": {
            "_!_IMAGE1_!_": {"base64_image": images[0]},
            "_!_IMAGE2_!_": {"base64_image": "not base64!"},
        },
    }
    path = tmp_path / "gpt.tar"
    write_tar(path, [{"__key__": "gpt-0", "json": json.dumps(doc).encode()}])
    report = run(str(path), deep=True)
    finding = only(report, "base64")
    assert (finding.key, finding.reason.split(":")[0]) == ("gpt-0", "image_map['_!_IMAGE2_!_']")
    deep = report.groups[0].deep
    assert deep is not None
    assert (deep.images_per_sample, deep.kept_per_sample) == ({1: 1}, {1: 1})


def _rendered(group: Any, width: int) -> list[str]:
    from rich.console import Console

    from flamingo_cli.ui.inspect import _shard_table

    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(_shard_table(group, width))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_shard_table_fits_the_terminal_and_keeps_names_whole(width: int) -> None:
    from flamingo_cli.inspect.report import GroupReport, ShardReport

    names = [f"docs_no_face_shard_{n}_v2.tar" for n in (7, 12345)]
    shards = [
        ShardReport(
            f"/data/mmc4/{name}",
            "interleaved",
            4,
            12,
            5 * 2**20,
            {"json": 4, "jpg": 8},
            sizes_json=4,
        )
        for name in names
    ]
    lines = _rendered(GroupReport("/data/mmc4", shards), width)
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    for name in names:
        assert name in text  # never cut to "docs_sha…"
    header = next(line for line in lines if "shard" in line and "samples" in line)
    assert "extension" not in header or "extensions" in header  # a header never wraps
    assert ("members" in header) == (width >= 120)
    assert "problems" in header
