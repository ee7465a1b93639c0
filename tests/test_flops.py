"""Utilisation in the metrics: model FLOPs counted once per dataset, tflops_per_gpu, mfu against
the device's peak (a table of GPUs or run.peak_tflops) and memory/peak_gib (docs/formats.md §12)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from flamingo_cli.runtime.distributed import DistInfo
from flamingo_cli.train.flops import StepFlops, known_peak_tflops, peak_tflops
from flamingo_cli.train.loop import LoopConfig, metrics_of, optimizer_step
from flamingo_cli.train.optim import build_optimizer
from flamingo_cli.train.schedule import build_scheduler

from .conftest import RECIPES

CPU = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")


@dataclass
class B:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def batch(rows: int, images: int) -> B:
    ids = torch.ones(rows, 3, dtype=torch.long)
    return B(torch.ones(rows, images, 2), ids, torch.ones_like(ids), ids.clone())


class Linear(nn.Module):
    """One bias-free 2 -> 1 linear layer over every image: a forward of R image rows is one
    (R x 2) @ (2 x 1) product, 2 * R * 2 FLOPs, and its backward the same again for the
    weight's gradient (the images need none)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 1, bias=False)

    def forward(self, images: torch.Tensor, *_: Any, **__: Any) -> SimpleNamespace:
        return SimpleNamespace(loss=self.proj(images.reshape(-1, 2)).pow(2).mean())


def test_model_flops_are_counted_once_per_dataset_and_scaled_by_samples() -> None:
    model = Linear()
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10)
    config = LoopConfig(2, {"laion": 1.0, "mmc4": 1.0}, 1.0, "fp32", peak_tflops=2e-9)
    micro = {"laion": batch(2, 1), "mmc4": batch(1, 3)}
    result = optimizer_step(model, [micro, micro], optimizer, scheduler, config, CPU, "none")
    # LAION: 2 image rows, 8 FLOPs forward + 8 backward for 2 samples; MMC4: 3 image rows,
    # 12 + 12 for its one document
    assert config.flops.per_sample == {"laion": 8.0, "mmc4": 24.0}
    assert result.dataset_samples == {"laion": 4, "mmc4": 2}
    assert result.model_flops == 4 * 8.0 + 2 * 24.0
    metrics = metrics_of(result, {})
    seconds = result.elapsed_s
    assert metrics["tflops_per_gpu"] == pytest.approx(80.0 / seconds / 1e12)
    assert metrics["mfu"] == pytest.approx(80.0 / seconds / 2e3)
    assert metrics["memory/peak_gib"] > 0  # the process's peak resident set on a CPU
    # counted once: a second step reuses the numbers
    again = optimizer_step(model, [micro], optimizer, scheduler, config, CPU, "none")
    assert again.model_flops == 2 * 8.0 + 1 * 24.0


def test_no_mfu_without_a_known_peak() -> None:
    model = Linear()
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10)
    config = LoopConfig(1, {"laion": 1.0}, 1.0, "fp32")
    result = optimizer_step(
        model, [{"laion": batch(2, 1)}], optimizer, scheduler, config, CPU, "none"
    )
    metrics = metrics_of(result, {})
    assert "mfu" not in metrics
    assert metrics["tflops_per_gpu"] == pytest.approx(16.0 / result.elapsed_s / 1e12)


def test_a_dataset_never_counted_has_no_flops() -> None:
    flops = StepFlops()
    flops.per_sample["laion"] = 10.0
    assert flops.of({"laion": 3}) == 30.0
    assert flops.of({"laion": 3, "web": 1}) is None


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_peak_of_known_gpus(name: str, tflops: float | None) -> None:
    assert known_peak_tflops(name) == tflops


def test_peak_on_a_cpu_only_when_given() -> None:
    assert peak_tflops(torch.device("cpu"), None) is None
    assert peak_tflops(torch.device("cpu"), 3.5) == 3.5


@pytest.mark.slow
def test_training_logs_utilisation(tmp_path: Path) -> None:
    from flamingo_cli.recipe.load import load_recipe, parse_override
    from flamingo_cli.train.run import train_rank

    overrides = [f"run.output_dir={tmp_path}", "run.peak_tflops=0.5"]
    loaded = load_recipe(RECIPES / "tiny-cpu.toml", [parse_override(o) for o in overrides])
    train_rank(loaded, max_steps=2)
    lines = (tmp_path / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["tflops_per_gpu"] > 0
        assert row["mfu"] == pytest.approx(row["tflops_per_gpu"] / 0.5)
        assert row["memory/peak_gib"] > 0


@pytest.mark.slow
def test_the_step_benchmark_runs_at_a_tiny_shape_on_a_cpu(tmp_path: Path) -> None:
    """benchmarks/fsdp_step.py --smoke: our FSDP2 step and OpenFlamingo's on the same weights."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/fsdp_step.py",
            "--smoke",
            "--openflamingo",
            "--json",
            str(out),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["device"] == "CPU" and row["compile"] is False
    assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and row["tflops_per_gpu"] > 0
    assert row["mfu"] is None  # no peak known for a CPU
    assert row["openflamingo_step_ms"] > 0
    assert row["ratio"] == pytest.approx(row["openflamingo_step_ms"] / row["step_ms"])
    assert "ours / OpenFlamingo" in done.stdout


def test_logged_counts_and_peak_memory_are_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a logged step the drop counters are the ranks' sums, the peak memory the highest
    rank's (the first of a tie) and every rank's damaged shard is named once."""
    from types import SimpleNamespace

    from flamingo_cli.train import run

    reports = [
        ({"laion/too_long": 2}, {"samples/laion/coyo": 5}, ["shard a"], 1.5),
        ({"laion/too_long": 1, "laion/tar_error": 1}, {"samples/laion/coyo": 7}, ["shard b"], 3.25),
        ({}, {"samples/laion/coyo": 6}, ["shard a"], 3.25),
    ]
    monkeypatch.setattr(run, "gathered", lambda mine, info: reports)
    shown: list[str] = []
    session = SimpleNamespace(
        loaders={}, info=None, named_damage=set(), events=SimpleNamespace(message=shown.append)
    )
    sums = run._across_ranks(session, 1.5)  # type: ignore[arg-type]
    assert sums.dropped == {"laion/too_long": 3, "laion/tar_error": 1}
    assert sums.by_source == {"samples/laion/coyo": 18}
    assert (sums.peak_gib, sums.peak_rank) == (3.25, 1)
    assert shown == ["shard a", "shard b"]
    assert run._across_ranks(session).peak_gib == 3.25  # a stop's call: names nothing twice
    assert shown == ["shard a", "shard b"]
