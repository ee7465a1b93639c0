"""Training end to end on the tiny preset: single process, DDP and FSDP2 ranks, exact resume,
resharding on another world size, preemption, a kill during a save, and two "nodes".

The multi-process runs are started once per module (each torchrun costs seconds here) and the
tests read their run directories.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.runtime.run_dir import COMPLETE, list_checkpoints, resolve_resume
from flamingo_cli.train.run import FINISHED, train_rank

from .conftest import RECIPES

TINY = RECIPES / "tiny-cpu.toml"


def env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parent.parent)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
    }


def flamingo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flamingo_cli", "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        check=False,
    )


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", str(TINY), "--set", f"run.output_dir={out}", *extra]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss/laion"], m["loss/mmc4"]) for m in metrics(run_dir)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_single_process_trains_checkpoints_and_exports(tmp_path: Path) -> None:
    loaded = load_recipe(TINY, [parse_override(f"run.output_dir={tmp_path}")])
    outcome = train_rank(loaded)
    run_dir = tmp_path / "tiny-cpu"
    assert (outcome.step, outcome.total_steps, outcome.stopped_early) == (16, 16, False)
    assert (run_dir / FINISHED).read_text() == "16\n"
    # one checkpoint per epoch (8 steps each), both kept (keep_last = 2)
    assert [c.step for c in list_checkpoints(run_dir)] == [8, 16]
    series = losses(run_dir)
    assert sorted(series) == list(range(1, 17))
    first = sum(series[1]) + sum(series[2])
    last = sum(series[15]) + sum(series[16])
    assert last < first - 0.5, series
    saved = load_recipe(run_dir / "checkpoints" / "step-00000016" / "recipe.toml").recipe
    assert saved == loaded.recipe  # the resolved recipe, overrides included
    exported = torch.load(run_dir / "export" / "flamingo.pt", weights_only=True)
    openflamingo = torch.load(run_dir / "export" / "checkpoint.pt", weights_only=True)
    assert len(exported) == len(openflamingo) > 0
    assert any(k.startswith("perceiver.") for k in exported)
    assert any("gated_cross_attn_layer" in k for k in openflamingo)


def test_init_from_an_exported_checkpoint_is_not_a_resume(tmp_path: Path) -> None:
    trained = tmp_path / "first"
    train_rank(load_recipe(TINY, [parse_override(f"run.output_dir={trained}")]))
    exported = trained / "tiny-cpu" / "export" / "checkpoint.pt"

    def first_step(output: Path, *extra: str) -> tuple[float, float]:
        overrides = [parse_override(f"run.output_dir={output}"), *map(parse_override, extra)]
        outcome = train_rank(load_recipe(TINY, overrides), max_steps=1)
        assert outcome.step == 1  # a fresh run, not a resume of the first one
        return losses(output / "tiny-cpu")[1]

    fresh = first_step(tmp_path / "fresh")
    tuned = first_step(tmp_path / "tuned", f"model.init_from={exported}")
    assert sum(tuned) < sum(fresh) - 0.5
    # our own checkpoint directories work as init_from too, with the same weights
    directory = first_step(
        tmp_path / "from-dir",
        f"model.init_from={trained / 'tiny-cpu' / 'checkpoints' / 'step-00000016'}",
    )
    assert directory == pytest.approx(tuned, abs=1e-5)
    ours = first_step(
        tmp_path / "from-ours", f"model.init_from={exported.with_name('flamingo.pt')}"
    )
    assert ours == pytest.approx(tuned, abs=1e-5)


def test_resume_with_another_worker_count_continues(tmp_path: Path) -> None:
    base = [parse_override(f"run.output_dir={tmp_path}")]
    first = train_rank(load_recipe(TINY, base), max_steps=3)
    assert first.step == 3
    more_workers = [
        *base,
        parse_override("data.laion.workers=2"),
        parse_override("data.mmc4.workers=2"),
    ]
    messages: list[str] = []

    class Events:
        def started(self, total_steps: int, start_step: int) -> None:
            messages.append(f"start {start_step}/{total_steps}")

        def step(self, step: int, metrics: dict[str, Any]) -> None:
            return None

        def message(self, text: str) -> None:
            messages.append(text)

    second = train_rank(load_recipe(TINY, more_workers), Events(), max_steps=5)
    assert second.step == 5
    assert (
        messages[0].startswith("resuming ") and "another world size or worker count" in messages[0]
    )
    assert messages[1] == "start 3/16"
    assert sorted(losses(tmp_path / "tiny-cpu")) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("precision", ["amp_bf16", "bf16"])
def test_bf16_precisions_train_on_cpu(tmp_path: Path, precision: str) -> None:
    loaded = load_recipe(
        TINY,
        [
            parse_override(f"run.output_dir={tmp_path}"),
            parse_override(f"run.precision={precision}"),
        ],
    )
    outcome = train_rank(loaded, max_steps=3)
    series = losses(tmp_path / "tiny-cpu")
    assert outcome.step == 3
    assert all(math.isfinite(v) for pair in series.values() for v in pair)


def test_fp16_needs_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = flamingo(*train_args(tmp_path, "--set", "run.precision=fp16"))
    assert done.returncode == 1
    assert 'run.precision = "fp16" needs a GPU' in done.stderr
    assert "Traceback" not in done.stderr


def test_wandb_offline_run_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [
        parse_override(f"run.output_dir={tmp_path}"),
        parse_override("logging.wandb=true"),
        parse_override('logging.wandb_mode="offline"'),
        parse_override('logging.wandb_project="flamingo-tests"'),
    ]
    train_rank(load_recipe(TINY, overrides), max_steps=2)
    run = tmp_path / "tiny-cpu"
    run_id = (run / "wandb-id.txt").read_text().strip()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}")), list((run / "wandb").iterdir())


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2-rank FSDP2: 6 steps straight; 3 steps then stop; resume to 6; resume on 1 process."""
    root = tmp_path_factory.mktemp("fsdp")
    common = (
        "--set",
        "distributed.strategy=fsdp",
        "--set",
        "run.keep_last=0",
        "--nproc-per-node",
        "2",
    )
    straight = flamingo(*train_args(root / "straight", *common, "--max-steps", "6"))
    assert straight.returncode == 0, straight.stderr
    first = flamingo(*train_args(root / "resumed", *common, "--max-steps", "3"))
    assert first.returncode == 0, first.stderr
    second = flamingo(*train_args(root / "resumed", *common, "--max-steps", "6"))
    assert second.returncode == 0, second.stderr
    # the step-3 checkpoint of the resumed run, continued by a single process
    single = root / "single" / "tiny-cpu"
    (single / "checkpoints").mkdir(parents=True)
    step3 = root / "resumed" / "tiny-cpu" / "checkpoints" / "step-00000003"
    assert (step3 / COMPLETE).is_file()
    shutil.copytree(step3, single / "checkpoints" / "step-00000003")
    resharded = flamingo(
        *train_args(root / "single", "--set", "distributed.strategy=none", "--max-steps", "5")
    )
    assert resharded.returncode == 0, resharded.stderr
    return {
        "straight": root / "straight" / "tiny-cpu",
        "resumed": root / "resumed" / "tiny-cpu",
        "single": single,
    }


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_resume_is_exact_and_reshards(fsdp_runs: dict[str, Path]) -> None:
    """One test over the shared runs: xdist would otherwise start them on each worker."""
    # resuming mid-epoch gives the losses of the uninterrupted run
    straight = losses(fsdp_runs["straight"])
    resumed = losses(fsdp_runs["resumed"])
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    # the loss falls under FSDP2 too
    assert sum(straight[6]) < sum(straight[1])

    # the stop left a mid-epoch checkpoint with every rank's loader state
    run = fsdp_runs["resumed"]
    assert [c.step for c in list_checkpoints(run)] == [3, 4, 6]  # stop, epoch end, stop
    meta = json.loads((run / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["world_size"]) == (3, 0, 2)
    assert not (run / FINISHED).exists()
    ranks = sorted(p.name for p in (run / "checkpoints" / "step-00000003").glob("rank*.json"))
    assert ranks == ["rank0.json", "rank1.json"]

    # the step-3 checkpoint of 2 ranks continues on 1 process
    run = fsdp_runs["single"]
    series = losses(run)
    assert sorted(series) == [4, 5]
    assert all(math.isfinite(v) and v < 10 for pair in series.values() for v in pair)
    assert [c.step for c in list_checkpoints(run)][-1] == 5


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_two_ranks_train(tmp_path: Path) -> None:
    done = flamingo(
        *train_args(tmp_path, "--set", "distributed.strategy=ddp", "--nproc-per-node", "2")
    )
    assert done.returncode == 0, done.stderr
    run = tmp_path / "tiny-cpu"
    series = losses(run)
    assert sorted(series) == list(range(1, 9))  # 4 batches per rank per epoch, 2 epochs
    assert sum(series[8]) < sum(series[1])
    assert (run / FINISHED).read_text() == "8\n"
    assert list((run / "logs").rglob("stdout.log")), "per-rank logs are kept"


@pytest.fixture
def gpt2_recipe(tmp_path: Path) -> Path:
    """A recipe whose LM is a tiny GPT-2 (tied input/output embeddings) from a config dir."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from flamingo_cli.model.tokenizer import TINY_TOKENIZER

    lm = tmp_path / "gpt2"
    config = GPT2Config(
        vocab_size=512,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(lm)
    text = TINY.read_text().replace(
        'preset = "tiny"',
        f'vision_encoder = "flamingo-tiny-vit"\nvision_pretrained = "none"\n'
        f'lm_path = "{lm}"\ntokenizer_path = "{TINY_TOKENIZER}"',
    )
    text = text.replace('shards = "tiny-data/', f'shards = "{RECIPES}/tiny-data/')
    text = text.replace('eval_shards = "tiny-data/', f'eval_shards = "{RECIPES}/tiny-data/')
    path = tmp_path / "gpt2.toml"
    path.write_text(text)
    return path


@pytest.mark.multiprocess
@pytest.mark.slow
def test_tied_embeddings_under_fsdp2(gpt2_recipe: Path, tmp_path: Path) -> None:
    done = flamingo(
        "train",
        str(gpt2_recipe),
        "--set",
        f"run.output_dir={tmp_path}",
        "--set",
        "distributed.strategy=fsdp",
        "--nproc-per-node",
        "2",
        "--max-steps",
        "4",
    )
    assert done.returncode == 0, done.stderr
    run = tmp_path / "tiny-cpu"
    series = losses(run)
    assert sorted(series) == [1, 2, 3, 4]
    assert sum(series[4]) < sum(series[1])
    saved = resolve_resume(run, "auto")
    assert saved is not None and saved.name == "step-00000004"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flamingo_cli",
            "-q",
            *train_args(
                tmp_path,
                "--set",
                "distributed.strategy=ddp",
                "--set",
                "run.num_epochs=100",
                "--nproc-per-node",
                "2",
            ),
        ],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "tiny-cpu" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (
        not log.exists() or len(log.read_text().splitlines()) < 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    run = tmp_path / "tiny-cpu"
    saved = list_checkpoints(run)
    assert len(saved) >= 1
    assert saved[-1].step >= 2
    assert saved[-1].step == metrics(run)[-1]["step"]
    assert not (run / FINISHED).exists()


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import flamingo_cli.train.checkpoint as ck
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.train.run import train_rank

saves = []
original = ck.dcp_save
def dying_save(*args, **kwargs):
    saves.append(1)
    original(*args, **kwargs)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
ck.dcp_save = dying_save
train_rank(load_recipe(sys.argv[1], [parse_override("run.output_dir=" + sys.argv[2])]))
"""


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, str(TINY), str(tmp_path)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "tiny-cpu"
    assert [c.step for c in list_checkpoints(run)] == [8]
    assert (run / "checkpoints" / ".step-00000016.tmp").is_dir()  # the interrupted save
    resumed = flamingo(*train_args(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert [c.step for c in list_checkpoints(run)] == [8, 16]
    assert not (run / "checkpoints" / ".step-00000016.tmp").exists()
    assert (run / FINISHED).read_text() == "16\n"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_nodes_meet_at_a_c10d_rendezvous(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flamingo_cli",
                "-q",
                *train_args(
                    tmp_path,
                    "--set",
                    "distributed.strategy=fsdp",
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--node-rank",
                    str(rank),
                    "--rdzv-endpoint",
                    endpoint,
                    "--max-steps",
                    "3",
                ),
            ],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results
    run = tmp_path / "tiny-cpu"
    assert sorted(losses(run)) == [1, 2, 3]
    meta = json.loads((run / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["world_size"] == 2
