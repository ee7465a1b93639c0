"""Training on mixtures (docs/formats.md §7): the bundled tiny recipe means what it meant before
mixtures, three datasets (one a blend) train and resume exactly, on one process and on two
FSDP2 ranks killed at a random step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flamingo_cli.data.loader import make_loader
from flamingo_cli.model.factory import build_model
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.train.run import train_rank

from .conftest import RECIPES
from .test_train import env, losses, metrics

TINY = RECIPES / "tiny-cpu.toml"
DATA = Path(__file__).parent / "data"

MIX = """
[model]
preset = "tiny"
cross_attn_every_n_layers = 1

# listed first, stepped last: laion and mmc4 come first whatever the file's order
[data.coyo]
kind = "pairs"
shards = "{root}/laion/0000{0..3}.tar"
batch_size = 4
train_num_samples = 32
resampled = true
shuffle_buffer = 8
shuffle_initial = 4

[data.laion]
batch_size = 4
train_num_samples = 32
loss_multiplier = 0.2
shuffle_buffer = 8
shuffle_initial = 4

[[data.laion.sources]]
name = "first"
shards = "{root}/laion/0000{0..1}.tar"
weight = 0.7

[[data.laion.sources]]
name = "second"
shards = "{root}/laion/0000{2..3}.tar"
weight = 0.3
resampled = true

[data.mmc4]
shards = "{root}/mmc4/0000{0..3}.tar"
batch_size = 2
train_num_samples = 16
max_tokens = 128
shuffle_buffer = 8
shuffle_initial = 4

[optim]
lr = 1e-3
warmup_steps = 2

[run]
name = "mix"
num_epochs = 2
log_every = 1
keep_last = 0

[distributed]
strategy = "none"
"""


def test_the_tiny_recipe_reads_the_batches_it_read_before_mixtures() -> None:
    """Keys and token ids of every batch of both epochs, recorded from the code before
    mixtures (commit e65649c): machine-independent, so compared exactly."""
    recipe = load_recipe(TINY).recipe
    _, transform, tokenizer, special = build_model(recipe.model, seed=recipe.run.seed)
    expected = json.loads((DATA / "tiny_cpu_batches.json").read_text())
    assert list(recipe.datasets()) == list(expected) == ["laion", "mmc4"]
    import hashlib

    for name, config in recipe.datasets().items():
        loader = make_loader(config, tokenizer, special, transform, seed=recipe.run.seed, name=name)
        seen = []
        for epoch in range(recipe.run.num_epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                digest = hashlib.sha256(batch.input_ids.numpy().tobytes()).hexdigest()[:16]
                seen.append({"keys": batch.keys, "ids": digest})
        assert seen == expected[name], name


@pytest.mark.slow
def test_the_tiny_recipe_trains_to_the_losses_it_had_before_mixtures(tmp_path: Path) -> None:
    """Per-step losses recorded from the code before mixtures. The last digits depend on the
    CPU's kernels (README), hence the tolerance; another batch order moves them more."""
    train_rank(load_recipe(TINY, [parse_override(f"run.output_dir={tmp_path}")]))
    before = [
        json.loads(line) for line in (DATA / "tiny_cpu_losses.jsonl").read_text().splitlines()
    ]
    now = losses(tmp_path / "tiny-cpu")
    assert sorted(now) == [row["step"] for row in before] == list(range(1, 17))
    for row in before:
        assert now[row["step"]] == pytest.approx((row["loss/laion"], row["loss/mmc4"]), abs=2e-4)


def _mix(write_recipe: Any) -> Path:
    return write_recipe(MIX)  # type: ignore[no-any-return]


def _series(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    return {
        m["step"]: (m["loss/laion"], m["loss/mmc4"], m["loss/coyo"])
        for m in metrics(run_dir)
        if "loss/laion" in m
    }


def test_three_datasets_train_and_resume_exactly(write_recipe: Any, tmp_path: Path) -> None:
    recipe = _mix(write_recipe)
    loaded = load_recipe(recipe, [parse_override(f"run.output_dir={tmp_path / 'straight'}")])
    assert list(loaded.recipe.datasets()) == ["laion", "mmc4", "coyo"]
    assert train_rank(loaded).step == 16
    straight = tmp_path / "straight" / "mix"
    kept = straight / "checkpoints" / "step-00000016" / "recipe.toml"
    assert load_recipe(kept).recipe == loaded.recipe  # the blend survives recipe.toml
    resumed_dir = [parse_override(f"run.output_dir={tmp_path / 'resumed'}")]
    assert train_rank(load_recipe(recipe, resumed_dir), max_steps=5).step == 5  # mid-epoch 0
    assert train_rank(load_recipe(recipe, resumed_dir)).step == 16
    resumed = tmp_path / "resumed" / "mix"
    expected = _series(straight)
    got = _series(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step, values in expected.items():
        assert got[step] == pytest.approx(values, abs=1e-6), step
    last, last_resumed = metrics(straight)[-1], metrics(resumed)[-1]
    # per-source counts continue across the resume, and add up to what laion consumed
    sources = {k: v for k, v in last.items() if k.startswith("samples/laion/")}
    assert sorted(sources) == ["samples/laion/first", "samples/laion/second"]
    assert sum(sources.values()) == 2 * 32  # two epochs of 8 batches of 4
    assert sources["samples/laion/first"] > sources["samples/laion/second"] > 0
    assert {k: last_resumed[k] for k in sources} == sources
    for name in ("laion", "mmc4", "coyo"):
        assert last[f"samples_per_s/{name}"] > 0 and last[f"tokens_per_s/{name}"] > 0


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.communicate()}")
        rows = path.read_text().splitlines() if path.exists() else []
        done = [json.loads(r) for r in rows[:-1]] + (
            [json.loads(rows[-1])] if rows and rows[-1].endswith("}") else []
        )
        if any(r.get("step", 0) >= step for r in done):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _train_cli(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flamingo_cli",
        "-q",
        "train",
        str(recipe),
        "--set",
        f"run.output_dir={out}",
        "--set",
        "distributed.strategy=fsdp",
        "--set",
        "run.checkpoint_every=1",
        "--set",
        "run.num_epochs=1",
        "--nproc-per-node",
        "2",
        "--take-over",
        *extra,
    ]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_fsdp_ranks_killed_at_a_random_step_resume_exactly(
    write_recipe: Any, tmp_path: Path
) -> None:
    recipe = _mix(write_recipe)
    straight = subprocess.run(
        _train_cli(recipe, tmp_path / "straight"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
        check=False,
    )
    assert straight.returncode == 0, straight.stderr
    expected = _series(tmp_path / "straight" / "mix")
    assert sorted(expected) == [1, 2, 3, 4]  # 32 samples / (4 x 2 ranks) per epoch

    kill_at = random.SystemRandom().randint(1, 3)
    run_dir = tmp_path / "killed" / "mix"
    proc = subprocess.Popen(
        _train_cli(recipe, tmp_path / "killed"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        start_new_session=True,
    )
    try:
        _wait_for_step(run_dir, kill_at, proc, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-step
        proc.communicate()
    again = subprocess.run(
        _train_cli(recipe, tmp_path / "killed"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    got = _series(run_dir)
    assert sorted(got) == sorted(expected), kill_at
    for step, values in expected.items():
        assert got[step] == pytest.approx(values, abs=1e-6), (kill_at, step)
