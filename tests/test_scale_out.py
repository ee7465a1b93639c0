"""Many machines: node partitions, `convert merge`, killed nodes, fsspec outputs, inspect merge."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.convert.mmc4 import Mmc4Options, convert_mmc4
from flamingo_cli.convert.runner import RunOptions
from flamingo_cli.errors import UsageError
from flamingo_cli.shards.cluster import Partition, resolve_partition
from flamingo_cli.shards.store import FsspecDir
from flamingo_cli.synthetic import RawMmc4, write_dataset, write_raw_mmc4

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLUSTER_VARS = ("SLURM_", "WORLD_SIZE", "RANK", "RAY_ADDRESS")


def clean_env(**extra: str) -> dict[str, str]:
    """The test environment without any Slurm/torchrun variables, plus `extra`."""
    env = {k: v for k, v in ENV.items() if not k.startswith(CLUSTER_VARS)}
    return {**env, **extra}


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def memory_tree(url: str) -> dict[str, bytes]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return {path[len(root) + 1 :]: fs.cat(path) for path in sorted(fs.find(root))}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> RawMmc4:
    """7 zips (number 4 missing), bad lines and missing images."""
    return write_raw_mmc4(
        tmp_path_factory.mktemp("raw"),
        shards=7,
        docs_per_shard=5,
        missing_shards=(4,),
        missing_image_rate=0.2,
        bad_lines_per_shard=1,
    )


@pytest.fixture(scope="module")
def single(raw: RawMmc4, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, one machine: the output every other way must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("single")
    convert_mmc4(
        raw.docs_spec, out, Mmc4Options(str(raw.image_dir), docs_per_shard=3), RunOptions(workers=1)
    )
    return out


def test_partition_from_flags_and_environment() -> None:
    array = {
        "SLURM_ARRAY_TASK_ID": "14",
        "SLURM_ARRAY_TASK_MIN": "10",
        "SLURM_ARRAY_TASK_STEP": "2",
        "SLURM_ARRAY_TASK_COUNT": "5",
    }
    assert resolve_partition(env=array) == Partition(5, 2, "slurm-array")
    no_step = {**array, "SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_STEP": ""}
    assert resolve_partition(env=no_step) == Partition(5, 2, "slurm-array")
    step = {k: v for k, v in array.items() if k != "SLURM_ARRAY_TASK_STEP"}
    assert resolve_partition(env={**step, "SLURM_ARRAY_TASK_ID": "11"}).rank == 1
    everything = {**array, "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "WORLD_SIZE": "8"}
    # precedence: flags, Slurm array, Slurm tasks, torchrun
    assert resolve_partition(3, 1, env=everything) == Partition(3, 1, "flags")
    assert resolve_partition(env=everything).source == "slurm-array"
    tasks = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "WORLD_SIZE": "8", "RANK": "7"}
    assert resolve_partition(env=tasks) == Partition(4, 3, "slurm")
    assert resolve_partition(env={"WORLD_SIZE": "8", "RANK": "7"}) == Partition(8, 7, "torchrun")
    assert resolve_partition(env={}) == Partition(1, 0, "single")
    assert Partition(3, 1).select(list(range(8))) == [1, 4, 7]
    with pytest.raises(UsageError, match="not a range: task 13 of min 10, step 2"):
        resolve_partition(env={**array, "SLURM_ARRAY_TASK_ID": "13"})
    with pytest.raises(UsageError, match=r"node rank 3 is not in 0\.\.2"):
        resolve_partition(3, 3, env={})
    with pytest.raises(UsageError, match="--num-nodes and --node-rank go together"):
        resolve_partition(3, None, env={})


def convert_args(raw: RawMmc4, out: Path | str, docs_per_shard: int = 3) -> list[str]:
    return [
        "convert",
        "mmc4",
        raw.docs_spec,
        "--image-dir",
        str(raw.image_dir),
        "--out",
        str(out),
        "--docs-per-shard",
        str(docs_per_shard),
        "-w",
        "1",
        "--json",
    ]


@pytest.mark.multiprocess
def test_three_node_processes_then_merge_equal_one_process(
    raw: RawMmc4, single: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flamingo_cli", "-q", *convert_args(raw, out)]
    # Rank 0 from the flags, rank 1 from Slurm tasks, rank 2 from a Slurm array (ids 5..7).
    array = {"SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    nodes = [
        (["--num-nodes", "3", "--node-rank", "0"], clean_env()),
        ([], clean_env(SLURM_NTASKS="3", SLURM_PROCID="1")),
        ([], clean_env(SLURM_ARRAY_TASK_ID="7", **array)),
    ]
    procs = [
        subprocess.Popen([*cmd, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for flags, env in nodes
    ]
    reports = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
        reports.append(json.loads(stdout))
    names = [[i["name"] for i in r["inputs"]] for r in reports]
    assert names == [
        ["docs_shard_0_v2", "docs_shard_3_v2", "docs_shard_6_v2"],
        ["docs_shard_1_v2", "docs_shard_4_v2"],
        ["docs_shard_2_v2", "docs_shard_5_v2"],
    ]
    assert [(r["node"]["rank"], r["node"]["source"]) for r in reports] == [
        (0, "flags"),
        (1, "slurm"),
        (2, "slurm-array"),
    ]
    assert all(r["manifest"] is None for r in reports)
    assert not (out / "manifest.json").exists() and not (out / "sizes.json").exists()

    result = runner.invoke(app, ["convert", "merge", str(out), "--json"])
    assert result.exit_code == 0, result.output
    merged = json.loads(result.stdout)
    assert (merged["inputs"], merged["complete"], merged["incomplete"]) == (7, 6, [])
    assert merged["missing"] == [
        {"name": "docs_shard_4_v2", "input": raw.docs_spec.replace("{0..6}", "4")}
    ]
    assert merged["totals"]["docs_out"] == sum(r["totals"]["docs_out"] for r in reports)
    assert tree(out) == tree(single)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_node_reruns_only_its_unfinished_part(tmp_path: Path) -> None:
    big = write_raw_mmc4(tmp_path / "raw", shards=6, docs_per_shard=20)
    options = Mmc4Options(str(big.image_dir), docs_per_shard=8)
    convert_mmc4(big.docs_spec, tmp_path / "clean", options, RunOptions(workers=1))
    out = tmp_path / "out"
    for rank in (0, 2):  # the other nodes finish
        report = convert_mmc4(
            big.docs_spec, out, options, RunOptions(workers=1, partition=Partition(3, rank))
        )
        assert not report.manifest_written
    others = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # Node 1 owns inputs 1 and 4. An image of input 4's document 18 is a FIFO nobody writes:
    # node 1 finishes input 1, publishes input 4's first shards and hangs there until killed.
    with zipfile.ZipFile(big.zips[4]) as archive:
        doc = json.loads(archive.read(archive.namelist()[0]).decode().splitlines()[17])
    image = big.image_dir / "4" / doc["image_info"][0]["image_name"]
    saved = image.read_bytes()
    image.unlink()
    os.mkfifo(image)
    cmd = [
        sys.executable,
        "-m",
        "flamingo_cli",
        "-q",
        *convert_args(big, out, docs_per_shard=8),
        "--num-nodes",
        "3",
        "--node-rank",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=clean_env(), start_new_session=True)
    first = out / "manifest.d" / "docs_shard_1_v2.json"
    deadline = time.monotonic() + 60
    while not (out / "docs_shard_4_v2-1.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    image.unlink()
    image.write_bytes(saved)
    assert first.exists() and (out / "docs_shard_4_v2-0.tar").exists()
    assert not (out / "manifest.d" / "docs_shard_4_v2.json").exists()
    assert list(out.glob(".docs_shard_4_v2-2.tar.tmp-*"))  # killed mid-shard

    result = runner.invoke(app, ["convert", "merge", str(out), "--json"])
    assert result.exit_code == 1
    incomplete = json.loads(result.stdout)["incomplete"]
    assert [(i["name"], i["reason"]) for i in incomplete] == [
        ("docs_shard_4_v2", "not converted yet (no record)")
    ]
    result = runner.invoke(app, ["convert", "merge", str(out)])
    assert result.exit_code == 1
    assert "docs_shard_4_v2.jsonl.zip: not converted yet" in " ".join(result.stderr.split())

    rerun = subprocess.run(cmd, env=clean_env(), capture_output=True, check=False)
    assert rerun.returncode == 0, rerun.stderr.decode()
    again = json.loads(rerun.stdout)
    assert (again["totals"]["inputs"], again["totals"]["inputs_reused"]) == (2, 1)
    assert [(i["name"], i["status"]) for i in again["inputs"]] == [
        ("docs_shard_1_v2", "complete"),  # its own finished input, reused
        ("docs_shard_4_v2", "converted"),  # the one it was killed in, redone
    ]
    assert {p: p.stat().st_mtime_ns for p in others} == others  # the others' files untouched
    assert runner.invoke(app, ["convert", "merge", str(out)]).exit_code == 0
    assert not list(out.glob(".*tmp-*"))
    assert tree(out) == tree(tmp_path / "clean")


def test_fsspec_outputs_memory_and_local_equal_the_fast_path(
    raw: RawMmc4, single: Path, tmp_path: Path
) -> None:
    options = Mmc4Options(str(raw.image_dir), docs_per_shard=3)
    # Three nodes writing to memory:// (temporary key, then move), merged from the CLI.
    url = "memory://scale-test/nodes"
    for rank in range(3):
        convert_mmc4(
            raw.docs_spec, url, options, RunOptions(workers=1, partition=Partition(3, rank))
        )
    result = runner.invoke(app, ["convert", "merge", url])
    assert result.exit_code == 0, result.output
    assert memory_tree(url) == tree(single)
    # One run writing whole objects straight to their keys (the object-store path).
    direct = FsspecDir("memory://scale-test/direct", direct=True)
    report = convert_mmc4(raw.docs_spec, direct, options, RunOptions(workers=1))
    assert report.manifest_written and memory_tree(direct.url) == tree(single)
    # The local filesystem through fsspec.
    local = FsspecDir(f"file://{tmp_path / 'fs'}")
    convert_mmc4(raw.docs_spec, local, options, RunOptions(workers=1))
    assert tree(tmp_path / "fs") == tree(single)


def test_laion_folder_on_two_nodes_in_memory_equals_one_local_run(tmp_path: Path) -> None:
    from flamingo_cli.convert.laion import LaionOptions, convert_laion
    from flamingo_cli.synthetic import encode, shape_image

    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(11):
        (folder / f"{i:02d}.png").write_bytes(encode(shape_image("red", "circle", 16, rng), "PNG"))
        if i != 4:  # one image without a caption: a _stats.json with a failure
            (folder / f"{i:02d}.txt").write_text(f"caption {i}")
    options = LaionOptions(samples_per_shard=3)
    convert_laion(str(folder), tmp_path / "one", options, RunOptions(workers=1))
    url = "memory://scale-test/laion"
    for rank in (1, 0):
        convert_laion(
            str(folder), url, options, RunOptions(workers=1, partition=Partition(2, rank))
        )
    assert runner.invoke(app, ["convert", "merge", url]).exit_code == 0
    one = tree(tmp_path / "one")
    assert memory_tree(url) == one
    assert sorted(n for n in one if n.endswith(".tar")) == [f"0000{k}.tar" for k in range(4)]


def test_fsspec_sink_publishes_only_complete_files() -> None:
    out = FsspecDir("memory://scale-test/atomic")
    sink = out.open_sink("a.tar")
    sink.file.write(b"x" * 100)
    (temporary,) = out.file_sizes()  # only a temporary key so far
    assert temporary.startswith(".a.tar.tmp-") and temporary.endswith(f"-{os.getpid()}")
    assert sink.commit() == 100
    assert out.file_sizes() == {"a.tar": 100}
    failed = out.open_sink("b.tar")
    failed.file.write(b"partial")
    failed.abort()
    assert sorted(out.fs.find(out.root)) == [f"{out.root}/a.tar"]
    direct = FsspecDir("memory://scale-test/atomic", direct=True).open_sink("c.tar")
    direct.file.write(b"partial")
    direct.abort()
    assert sorted(out.fs.find(out.root)) == [f"{out.root}/a.tar"]


def test_object_store_uploads_appear_only_when_complete() -> None:
    """An object store (multipart upload, object created when the upload completes): the final
    key is written directly, and an aborted upload never becomes an object."""
    from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

    from flamingo_cli.shards.store import FsspecSink

    objects: dict[str, bytes] = {}

    class Upload(AbstractBufferedFile):  # type: ignore[misc]
        def _initiate_upload(self) -> None:
            self.parts: list[bytes] = []

        def _upload_chunk(self, final: bool = False) -> bool:
            self.parts.append(self.buffer.getvalue())
            if final:
                objects[self.path] = b"".join(self.parts)
            return True

    class Store(AbstractFileSystem):  # type: ignore[misc]
        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Upload:
            return Upload(self, path, mode, block_size=16)

    done = FsspecSink(Store(), "bucket/a.tar", direct=True)
    done.file.write(b"x" * 100)  # several parts uploaded already
    assert done.file.parts and objects == {}  # type: ignore[attr-defined]
    assert done.commit() == 100 and objects == {"bucket/a.tar": b"x" * 100}
    failed = FsspecSink(Store(), "bucket/b.tar", direct=True)
    failed.file.write(b"y" * 100)
    failed.abort()
    del failed
    assert objects == {"bucket/a.tar": b"x" * 100}


def test_ray_missing_gives_the_install_command(
    raw: RawMmc4, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    result = runner.invoke(app, [*convert_args(raw, tmp_path / "o"), "--ray"])
    assert result.exit_code == 2
    assert "pip install 'flamingo[ray]'" in result.stderr
    assert not (tmp_path / "o").exists()


def inspect_json(args: list[str]) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["inspect-shards", *args, "--json"])
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def damaged_shards(tmp_path: Path) -> tuple[str, str]:
    """5 LAION and 4 MMC4 shards; one LAION shard cut short, one sizes.json entry wrong."""
    write_dataset("laion", tmp_path / "laion", shards=5, per_shard=6)
    write_dataset("mmc4", tmp_path / "mmc4", shards=4, per_shard=3)
    damaged = tmp_path / "laion" / "00003.tar"
    damaged.write_bytes(damaged.read_bytes()[:3000])
    sizes = json.loads((tmp_path / "mmc4" / "sizes.json").read_text())
    sizes["00001.tar"] += 1
    (tmp_path / "mmc4" / "sizes.json").write_text(json.dumps(sizes))
    return str(tmp_path / "laion" / "{00000..00004}.tar"), str(tmp_path / "mmc4")


def test_inspect_nodes_merged_equal_one_inspect_run(
    damaged_shards: tuple[str, str], tmp_path: Path
) -> None:
    specs = list(damaged_shards)
    code, whole = inspect_json([*specs, "--deep", "--workers", "1"])
    assert code == 1 and whole["errors"] >= 2
    paths = []
    for rank in range(3):
        code, part = inspect_json(
            [*specs, "--deep", "--workers", "1", "--num-nodes", "3", "--node-rank", str(rank)]
        )
        assert part["node"] == {"count": 3, "rank": rank, "source": "flags"}
        paths.append(tmp_path / f"node-{rank}.json")
        paths[-1].write_text(json.dumps(part))
    counts = [sum(len(g["shards"]) for g in json.loads(p.read_text())["groups"]) for p in paths]
    assert counts == [3, 3, 3]  # 9 shards, positions p % 3
    code, merged = inspect_json(["--merge", *map(str, reversed(paths))])
    assert code == 1
    assert merged == whole

    result = runner.invoke(app, ["inspect-shards", "--merge", str(paths[0]), str(paths[2])])
    assert result.exit_code == 2 and "missing [1]" in result.stderr

    # --write-sizes belongs to the merge, which then matches a single --write-sizes run.
    result = runner.invoke(
        app, ["inspect-shards", *specs, "--num-nodes", "3", "--node-rank", "0", "--write-sizes"]
    )
    assert result.exit_code == 2 and "pass --write-sizes to" in " ".join(result.stderr.split())
    code, merged = inspect_json(["--merge", *map(str, paths), "--write-sizes"])
    assert code == 1  # the cut-off shard is still an error; the sizes.json entry is fixed
    assert merged["sizes_written"] == [str(tmp_path / d / "sizes.json") for d in ("laion", "mmc4")]
    assert json.loads((tmp_path / "mmc4" / "sizes.json").read_text())["00001.tar"] == 3
    code, again = inspect_json([*specs, "--workers", "1"])
    assert again["errors"] == whole["errors"] - 1  # only the damaged shard is left


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """A local Ray instance of 2 CPUs for this module (the library joins it)."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra flamingo[ray]")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ray_runs_convert_and_inspect_with_the_same_bytes(
    raw: RawMmc4, single: Path, tmp_path: Path, local_ray: Any, shard_root: Path
) -> None:
    from flamingo_cli.convert.runner import ProgressState
    from flamingo_cli.inspect.run import InspectOptions, groups_from_specs, inspect_shards
    from flamingo_cli.shards.cluster import RayOptions

    options = Mmc4Options(str(raw.image_dir), docs_per_shard=3)
    states: list[tuple[int, int, int]] = []

    def progress(state: ProgressState) -> None:
        states.append((state.tasks_done, state.tasks_total, state.samples))

    out = tmp_path / "ray"
    report = convert_mmc4(
        raw.docs_spec, out, options, RunOptions(on_progress=progress, ray=RayOptions())
    )
    assert tree(out) == tree(single)
    docs_out = report.totals["docs_out"]
    assert states[-1] == (7, 7, docs_out) and len({s[0] for s in states}) == 8
    again = convert_mmc4(raw.docs_spec, out, options, RunOptions(ray=RayOptions()))
    assert len(again.reused) == 6  # every converted input; the missing one is looked for again
    assert tree(out) == tree(single)
    # The command line, in a process of its own: it starts (and stops) its own Ray instance.
    cli = subprocess.run(
        [sys.executable, "-m", "flamingo_cli", *convert_args(raw, tmp_path / "cli"), "--ray"],
        env=clean_env(),
        capture_output=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr.decode()
    assert json.loads(cli.stdout)["totals"]["docs_out"] == docs_out
    assert tree(tmp_path / "cli") == tree(single)

    spec = [str(shard_root / "laion"), str(shard_root / "mmc4")]
    local = inspect_shards(groups_from_specs(spec, InspectOptions()), InspectOptions(workers=1))
    on_ray = InspectOptions(ray=RayOptions(), partition=Partition(2, 1))
    part = inspect_shards(groups_from_specs(spec, on_ray), on_ray)
    assert [s.url for g in part.groups for s in g.shards] == [
        s.url for g in local.groups for s in g.shards
    ][1::2]
    whole = inspect_shards(
        groups_from_specs(spec, InspectOptions()), InspectOptions(ray=RayOptions())
    )
    assert whole.to_dict() == local.to_dict()
