"""Held-out loss: exact token weighting, the two image ablations, every kind of weights file,
the eval-loss command, and the periodic evaluation inside a training run."""

from __future__ import annotations

import copy
import json
import random
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.data.eval_loader import EvalLoader, make_eval_loader
from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.evaluate.loss import (
    derangement,
    evaluate_dataset,
    evaluate_during_training,
    shuffled_images,
)
from flamingo_cli.evaluate.run import eval_targets, evaluate_loss
from flamingo_cli.model.factory import build_model
from flamingo_cli.model.flamingo import FlamingoModel
from flamingo_cli.model.params import checkpoint_parameter_names
from flamingo_cli.recipe.load import Override, load_recipe
from flamingo_cli.recipe.schema import DatasetConfig, InterleavedConfig, ModelConfig, PairsConfig
from flamingo_cli.runtime.distributed import DistInfo
from flamingo_cli.runtime.weights import resolve_checkpoint
from flamingo_cli.shards.write import write_tar
from flamingo_cli.synthetic import laion_samples, mmc4_samples
from tests.model_util import export

from .conftest import RECIPES

INFO = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
runner = CliRunner()
Built = tuple[FlamingoModel, Any, Any, Any]


@pytest.fixture(scope="module")
def built() -> Built:
    """The tiny model with its gates open, so the images change the predictions."""
    model, transform, tokenizer, special = build_model(ModelConfig(preset="tiny"), seed=0)
    _open_gates(model, 1.0)
    return model.eval(), transform, tokenizer, special


def _open_gates(model: FlamingoModel, value: float) -> None:
    with torch.no_grad():
        for block in model.cross_attention_blocks():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("eval")
    laion = []
    for shard, count in enumerate((7, 6)):
        path = root / f"laion-{shard}.tar"
        write_tar(path, laion_samples(shard, count, seed=5))
        laion.append(str(path))
    mmc4 = root / "mmc4.tar"
    write_tar(mmc4, mmc4_samples(0, 5, seed=5))
    single = root / "single.tar"
    write_tar(single, laion_samples(9, 1, seed=5))
    return {"laion": laion, "mmc4": [str(mmc4)], "single": [str(single)]}


def _loader(built: Built, kind: str, urls: list[str], **kwargs: Any) -> EvalLoader:
    _, transform, tokenizer, special = built
    config: DatasetConfig = (
        PairsConfig(shards="x.tar", batch_size=5, workers=0)
        if kind == "laion"
        else InterleavedConfig(shards="x.tar", batch_size=2, workers=0, max_tokens=64)
    )
    return make_eval_loader(kind, config, urls, tokenizer, special, transform, **kwargs)


def test_loss_is_token_weighted_over_every_batch(
    built: Built, shards: dict[str, list[str]]
) -> None:
    model = built[0]
    loader = _loader(built, "laion", shards["laion"])
    result = evaluate_dataset(model, loader, INFO)
    total, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for batch in loader:
            out = model(batch.images, batch.input_ids, batch.attention_mask, labels=batch.labels)
            count = int((batch.labels[:, 1:] != -100).sum())
            total += float(out.loss) * count
            tokens += count
            means.append(float(out.loss))
    assert (result.samples, result.batches, result.padding_batches) == (13, 3, 0)
    assert result.target_tokens == tokens
    assert result.loss == pytest.approx(total / tokens, abs=1e-6)
    assert result.perplexity == pytest.approx(torch.tensor(total / tokens).exp().item(), rel=1e-6)
    # batches of 5, 5 and 3 samples: a mean of batch means would weigh the last one too much
    assert abs(sum(means) / len(means) - result.loss) > 1e-4
    capped = evaluate_dataset(model, loader, INFO, max_batches=1)
    assert (capped.samples, capped.batches) == (5, 1)


def test_none_ablation_is_the_model_with_closed_attention_gates(
    built: Built, shards: dict[str, list[str]]
) -> None:
    model = built[0]
    for kind in ("laion", "mmc4"):
        loader = _loader(built, kind, shards[kind])
        result = evaluate_dataset(model, loader, INFO, ablation="none")
        closed = copy.deepcopy(model)
        with torch.no_grad():  # the attention gates: the feed-forward branch stays, as in OF
            for block in closed.cross_attention_blocks():
                block.attn_gate.zero_()
        assert result.ablated_loss == pytest.approx(
            evaluate_dataset(closed, loader, INFO).loss, abs=1e-6
        )
        assert result.gap == pytest.approx(result.ablated_loss - result.loss, abs=1e-9)
        assert abs(result.gap) > 1e-3
        assert result.ablated_samples == result.samples


def test_derangements_have_no_fixed_point() -> None:
    for n in range(2, 10):
        for seed in range(20):
            order = derangement(n, random.Random(seed))
            assert sorted(order) == list(range(n))
            assert all(order[i] != i for i in range(n))


def test_shuffle_ablation_swaps_whole_image_sets(
    built: Built, shards: dict[str, list[str]]
) -> None:
    model = built[0]
    loader = _loader(built, "mmc4", shards["mmc4"], no_single=True)
    batches = list(loader)
    assert [len(b.keys) for b in batches] == [2, 3]  # the lone fifth document joined a batch
    total = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            images = shuffled_images(batch, seed=7)
            assert images is not None
            assert torch.equal(images, shuffled_images(batch, seed=7))  # deterministic
            for row in range(images.shape[0]):  # each row holds another row's whole stack
                assert not torch.equal(images[row], batch.images[row])
                assert any(torch.equal(images[row], other) for other in batch.images)
            logits = model(images, batch.input_ids, batch.attention_mask).logits
            labels = batch.labels[:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum"
                )
            )
            tokens += int((labels != -100).sum())
    result = evaluate_dataset(model, loader, INFO, ablation="shuffle", seed=7)
    assert result.ablated_loss == pytest.approx(total / tokens, abs=1e-6)
    assert result.note is None
    alone = evaluate_dataset(
        model, _loader(built, "laion", shards["single"], no_single=True), INFO, ablation="shuffle"
    )
    assert alone.samples == 1 and alone.ablated_samples == 0
    assert alone.note is not None and "alone in their batch" in alone.note


def _recipe(tmp_path: Path, shards: dict[str, list[str]], extra: str = "") -> Path:
    path = tmp_path / "recipe.toml"
    laion = "::".join(shards["laion"])
    path.write_text(
        textwrap.dedent(
            f"""
            [model]
            preset = "tiny"
            [data.laion]
            shards = "{laion}"
            eval_shards = "{laion}"
            batch_size = 4
            workers = 0
            [data.mmc4]
            shards = "{shards["mmc4"][0]}"
            eval_shards = "{shards["mmc4"][0]}"
            batch_size = 2
            workers = 0
            max_tokens = 64
            [run]
            name = "eval-test"
            output_dir = "{tmp_path / "runs"}"
            [distributed]
            strategy = "none"
            """
        )
        + extra,
        encoding="utf-8",
    )
    return path


def test_every_weights_format_gives_the_same_loss(
    tmp_path: Path, shards: dict[str, list[str]]
) -> None:
    from flamingo_cli.train.checkpoint import TrainState, save_checkpoint

    recipe = _recipe(tmp_path, shards)
    loaded = load_recipe(recipe)
    model, *_ = build_model(loaded.recipe.model, seed=loaded.recipe.run.seed)
    generator = torch.Generator().manual_seed(3)
    kept = checkpoint_parameter_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in kept:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    exported = export(model, tmp_path)
    optimizer = torch.optim.AdamW(model.parameters())
    state = TrainState(
        model,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        keep=lambda k: k in kept,
        progress={"step": 3, "epoch": 0},
    )
    save_checkpoint(
        tmp_path / "runs" / "eval-test", 3, state, {}, INFO, recipe_text="", keep_last=0
    )
    reports = {
        source: evaluate_loss(loaded, source, dataset="laion", ablation="none")
        for source in (
            "latest",
            str(tmp_path / "runs" / "eval-test" / "checkpoints" / "step-00000003"),
            str(exported.flamingo),
            str(exported.openflamingo),
        )
    }
    kinds = [r.weights for r in reports.values()]
    assert kinds == [
        "flamingo checkpoint",
        "flamingo checkpoint",
        "flamingo export",
        "OpenFlamingo checkpoint",
    ]
    losses = [r.datasets[0].loss for r in reports.values()]
    assert losses == pytest.approx([losses[0]] * 4, abs=1e-6)
    loader = _loader((model, *build_model(loaded.recipe.model)[1:]), "laion", shards["laion"])
    assert losses[0] == pytest.approx(evaluate_dataset(model, loader, INFO).loss, abs=1e-6)
    fresh = build_model(loaded.recipe.model, seed=loaded.recipe.run.seed)[0]
    assert abs(evaluate_dataset(fresh, loader, INFO).loss - losses[0]) > 1e-3
    # the command prints the same numbers as JSON
    result = runner.invoke(
        app,
        ["eval-loss", str(recipe), "--checkpoint", "latest", "--json", "--ablate-images", "none"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["dataset"] for d in data["datasets"]] == ["laion", "mmc4"]
    assert data["datasets"][0]["loss"] == pytest.approx(losses[0], abs=1e-9)
    assert data["datasets"][0]["gap"] == pytest.approx(reports["latest"].datasets[0].gap)


def test_bad_input_names_the_option_and_the_fix(
    tmp_path: Path, shards: dict[str, list[str]]
) -> None:
    loaded = load_recipe(_recipe(tmp_path, shards))
    with pytest.raises(UsageError, match="--shards needs --dataset"):
        eval_targets(loaded.recipe, shards="x.tar")
    assert [t.name for t in eval_targets(loaded.recipe, "x.tar", "mmc4")] == ["mmc4"]
    none_set = load_recipe(
        RECIPES / "tiny-cpu.toml",
        [Override("data.laion.eval_shards", []), Override("data.mmc4.eval_shards", [])],
    ).recipe
    laion_only = none_set.model_copy(
        update={"data": none_set.data.model_copy(update={"mmc4": None})}
    )
    with pytest.raises(UsageError, match=r"no \[data\.mmc4\] section"):
        eval_targets(laion_only, dataset="mmc4")
    with pytest.raises(FlamingoError, match="no complete checkpoint under") as info:
        resolve_checkpoint(loaded, "latest")
    assert info.value.fix is not None and "--checkpoint" in info.value.fix
    cases: list[tuple[list[str], int, str]] = [
        (["--checkpoint", "latest"], 1, "no complete checkpoint"),
        (["--checkpoint", str(tmp_path / "nope")], 1, "does not exist"),
        (["--checkpoint", "latest", "--shards", "x.tar"], 2, "--shards needs --dataset"),
        (["--checkpoint", "latest", "--dataset", "coco"], 2, "coco"),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, ["eval-loss", str(tmp_path / "recipe.toml"), *args])
        assert result.exit_code == code, result.output
        assert message in result.output
        assert "Traceback" not in result.output
    empty = runner.invoke(
        app,
        [
            "eval-loss",
            str(RECIPES / "tiny-cpu.toml"),
            "--checkpoint",
            "latest",
            "--set",
            "data.laion.eval_shards=[]",
            "--set",
            "data.mmc4.eval_shards=[]",
        ],
    )
    assert empty.exit_code == 2 and "sets no eval shards" in empty.output


def test_periodic_eval_restores_training_mode(built: Built, shards: dict[str, list[str]]) -> None:
    model = copy.deepcopy(built[0]).train()
    loaders = {"laion": _loader(built, "laion", shards["laion"])}
    metrics = evaluate_during_training(model, loaders, INFO)
    assert model.training
    assert list(metrics) == ["eval/loss/laion"]
    assert metrics["eval/loss/laion"] == pytest.approx(
        evaluate_dataset(built[0], loaders["laion"], INFO).loss, abs=1e-9
    )


@pytest.mark.slow
def test_training_logs_held_out_loss_every_eval_every_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flamingo_cli.train.run import train_rank

    overrides = [
        Override("run.output_dir", str(tmp_path / "runs")),
        Override("run.eval_every", 4),
    ]
    loaded = load_recipe(RECIPES / "tiny-cpu.toml", overrides)
    train_rank(loaded)
    lines = [json.loads(line) for line in (tmp_path / "runs" / "tiny-cpu" / "metrics.jsonl").open()]
    evals: dict[int, dict[str, float]] = {}
    for line in lines:
        found = {k: v for k, v in line.items() if k.startswith("eval/")}
        if found:
            evals[line["step"]] = found
    assert sorted(evals) == [4, 8, 12, 16]
    assert all(set(v) == {"eval/loss/laion", "eval/loss/mmc4"} for v in evals.values())
    # the last one is the held-out loss of the final checkpoint, as eval-loss computes it
    final = evaluate_loss(loaded, "latest")
    by_name = {d.dataset: d.loss for d in final.datasets}
    assert evals[16]["eval/loss/laion"] == pytest.approx(by_name["laion"], abs=1e-6)
    assert evals[16]["eval/loss/mmc4"] == pytest.approx(by_name["mmc4"], abs=1e-6)
