"""eval-loss on 2 ranks (torchrun, gloo, FSDP2) gives the single-process numbers, with uneven
shares so that both ranks run padding batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flamingo_cli.evaluate.run import evaluate_loss
from flamingo_cli.model.factory import build_model
from flamingo_cli.model.params import checkpoint_parameter_names
from flamingo_cli.recipe.load import Override, load_recipe
from flamingo_cli.shards.write import write_tar
from flamingo_cli.synthetic import laion_samples, mmc4_samples
from tests.model_util import export

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    laion = []
    for shard, count in enumerate((5, 9, 2)):  # by shard: rank 0 gets 7 samples, rank 1 gets 9
        path = tmp_path / f"laion-{shard}.tar"
        write_tar(path, laion_samples(shard, count, seed=11))
        laion.append(str(path))
    mmc4 = tmp_path / "mmc4.tar"  # one shard: split by sample, 3 documents and 2
    write_tar(mmc4, mmc4_samples(0, 5, seed=11))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            [model]
            preset = "tiny"
            [data.laion]
            shards = "{laion[0]}"
            eval_shards = "{"::".join(laion)}"
            batch_size = 4
            workers = 0
            [data.mmc4]
            shards = "{mmc4}"
            eval_shards = "{mmc4}"
            batch_size = 2
            workers = 0
            max_tokens = 64
            [run]
            output_dir = "{tmp_path / "runs"}"
            [distributed]
            strategy = "fsdp"
            timeout_s = 120
            """
        ),
        encoding="utf-8",
    )
    loaded = load_recipe(recipe)
    model = build_model(loaded.recipe.model, seed=loaded.recipe.run.seed)[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.cross_attention_blocks():
            block.attn_gate.fill_(1.0)
        kept = checkpoint_parameter_names(model)
        for name, param in model.named_parameters():
            if name in kept:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    weights = export(model, tmp_path).flamingo

    single = evaluate_loss(loaded, str(weights), ablation="none")
    scratch = tmp_path / "tmp"  # the launcher's working folder goes here, and away after
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "flamingo_cli", "eval-loss", str(recipe)]
    command += ["--checkpoint", str(weights), "--nproc-per-node", "2", "--json"]
    command += ["--ablate-images", "none"]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sharded = json.loads(done.stdout)
    assert sharded["world_size"] == 2
    for one, two in zip(single.datasets, sharded["datasets"], strict=True):
        assert one.dataset == two["dataset"]
        assert (one.samples, one.target_tokens) == (two["samples"], two["target_tokens"])
        assert two["loss"] == pytest.approx(one.loss, abs=1e-6)
        assert two["ablated_loss"] == pytest.approx(one.ablated_loss, abs=1e-6)
        assert two["padding_batches"] == 1  # the rank with fewer batches padded once
    assert [d["samples"] for d in sharded["datasets"]] == [16, 5]
    assert list(scratch.glob("flamingo-eval-*")) == []  # (wandb leaves folders of its own)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_periodic_eval_under_fsdp_training(tmp_path: Path) -> None:
    """Every rank evaluates at the same steps inside a 2-rank FSDP2 run, training goes on, and
    the last held-out loss is the one eval-loss gives for the final checkpoint."""
    sets = [
        "distributed.strategy=fsdp",
        "run.eval_every=4",
        f"run.output_dir={tmp_path / 'runs'}",
    ]
    command = [
        sys.executable,
        "-m",
        "flamingo_cli",
        "train",
        str(REPO / "recipes" / "tiny-cpu.toml"),
    ]
    command += ["--nproc-per-node", "2", *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = tmp_path / "runs" / "tiny-cpu" / "metrics.jsonl"
    evals = {
        line["step"]: line
        for line in map(json.loads, metrics.read_text().splitlines())
        if "eval/loss/laion" in line
    }
    assert sorted(evals) == [4, 8]  # 8 steps at world size 2
    loaded = load_recipe(
        REPO / "recipes" / "tiny-cpu.toml",
        [Override("run.output_dir", str(tmp_path / "runs"))],
    )
    final = {d.dataset: d.loss for d in evaluate_loss(loaded, "latest").datasets}
    assert evals[8]["eval/loss/laion"] == pytest.approx(final["laion"], abs=1e-5)
    assert evals[8]["eval/loss/mmc4"] == pytest.approx(final["mmc4"], abs=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_user_error_on_every_rank_is_a_message_not_torchruns_traceback(tmp_path: Path) -> None:
    """Each rank prints its message and fix and exits 1; torchrun adds no ChildFailedError
    traceback of its own (the launcher runs it through flamingo_cli.cli.torchrun)."""
    damaged = tmp_path / "step-00000001"
    damaged.mkdir()
    (damaged / "COMPLETE").write_text("", encoding="utf-8")  # complete, but no .metadata
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flamingo_cli", "eval-loss", str(RECIPES / "tiny-cpu.toml")]
    command += ["--checkpoint", str(damaged), "--nproc-per-node", "2", "--max-batches", "1"]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{damaged}/.metadata" in " ".join(done.stderr.split())
    assert "fix:" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "ChildFailedError" not in done.stderr
