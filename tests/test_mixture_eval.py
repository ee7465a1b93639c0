"""Held-out loss of a mixture (docs/formats.md §11): a row per dataset of any name, a blended
dataset over all its sources' eval shards, `--by-source` rows that add up to it exactly, on one
process and on two ranks, and the periodic evaluation of training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.data.eval_loader import make_eval_loader
from flamingo_cli.errors import UsageError
from flamingo_cli.evaluate.loss import DatasetLoss, evaluate_dataset
from flamingo_cli.evaluate.run import eval_targets, evaluate_loss, periodic_evaluation
from flamingo_cli.model.factory import build_model
from flamingo_cli.model.params import checkpoint_parameter_names
from flamingo_cli.recipe.load import LoadedRecipe, load_recipe
from flamingo_cli.recipe.schema import DatasetConfig
from flamingo_cli.runtime.distributed import DistInfo
from flamingo_cli.runtime.weights import load_weights
from tests.model_util import export, open_gates

from .conftest import REPO

INFO = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
runner = CliRunner()
Built = tuple[Any, Any, Any, Any]

# laion is a blend of two sources with eval shards each (8 and 16 samples), coyo a third
# dataset of pairs, listed after mmc4
MIXTURE = """
[model]
preset = "tiny"

[data.laion]
batch_size = 4
train_num_samples = 16
workers = 0

[[data.laion.sources]]
name = "laion2b"
shards = "{root}/laion/00000.tar"
eval_shards = "{root}/laion/00000.tar"
weight = 0.7

[[data.laion.sources]]
name = "datacomp"
shards = "{root}/laion/00001.tar"
eval_shards = "{root}/laion/{00001..00002}.tar"
weight = 0.3

[data.mmc4]
shards = "{root}/mmc4/00000.tar"
eval_shards = "{root}/mmc4/00000.tar"
batch_size = 2
train_num_samples = 8
workers = 0
max_tokens = 64

[data.coyo]
kind = "pairs"
shards = "{root}/laion/00003.tar"
eval_shards = "{root}/laion/00003.tar"
batch_size = 4
train_num_samples = 16
workers = 0

[run]
name = "mix-eval"
output_dir = "{out}/runs"

[distributed]
strategy = "{strategy}"
timeout_s = 120
"""


@dataclass(frozen=True)
class Mixture:
    recipe: Path
    loaded: LoadedRecipe
    weights: Path
    shard_root: Path


def _write(folder: Path, shard_root: Path, strategy: str = "none", text: str = MIXTURE) -> Path:
    path = folder / "recipe.toml"
    body = text.replace("{root}", str(shard_root)).replace("{out}", str(folder))
    path.write_text(textwrap.dedent(body).replace("{strategy}", strategy), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixture(tmp_path_factory: pytest.TempPathFactory, shard_root: Path) -> Mixture:
    """The recipe and weights of a tiny model whose images matter (gates open, perturbed)."""
    folder = tmp_path_factory.mktemp("mixture-eval")
    recipe = _write(folder, shard_root)
    loaded = load_recipe(recipe)
    model = build_model(loaded.recipe.model, seed=loaded.recipe.run.seed)[0]
    open_gates(model)
    generator = torch.Generator().manual_seed(4)
    kept = checkpoint_parameter_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in kept:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return Mixture(recipe, loaded, export(model, folder).flamingo, shard_root)


@pytest.fixture(scope="module")
def by_source(mixture: Mixture) -> list[DatasetLoss]:
    return evaluate_loss(mixture.loaded, str(mixture.weights), by_source=True).datasets


@pytest.fixture(scope="module")
def built(mixture: Mixture) -> Built:
    """The model with the mixture's weights loaded, its transform, tokenizer and tokens."""
    recipe = mixture.loaded.recipe  # built as eval-loss builds it: the frozen parts too
    model, transform, tokenizer, special = build_model(recipe.model, seed=recipe.run.seed)
    load_weights(model, mixture.weights)
    return model, transform, tokenizer, special


def _plain(
    mixture: Mixture, built: Built, name: str, config: DatasetConfig, spec: str
) -> DatasetLoss:
    """The loss of one plain loader over `spec` (shard paths under the shard root)."""
    model, transform, tokenizer, special = built
    shards = "::".join(str(mixture.shard_root / part) for part in spec.split("::"))
    loader = make_eval_loader(name, config, shards, tokenizer, special, transform)
    tokens = sum(int((b.labels[:, 1:] != -100).sum()) for b in loader)
    result = evaluate_dataset(model, loader, INFO)
    assert result.target_tokens == tokens  # the targets of every batch, counted here
    return result


def test_a_row_per_dataset_and_per_source_that_add_up(
    mixture: Mixture, built: Built, by_source: list[DatasetLoss]
) -> None:
    assert [d.dataset for d in by_source] == ["laion", "mmc4", "coyo"]
    laion, mmc4, coyo = by_source
    assert [s.dataset for s in laion.sources] == ["laion/laion2b", "laion/datacomp"]
    assert [s.source for s in laion.sources] == ["laion2b", "datacomp"]
    assert (mmc4.sources, coyo.sources) == ([], [])
    assert [(s.samples, s.shards, s.batches) for s in laion.sources] == [(8, 1, 2), (16, 2, 4)]
    assert (laion.samples, laion.shards, laion.batches) == (24, 3, 6)
    assert (coyo.samples, coyo.shards) == (8, 1)
    # exact target-token counts of the generated shards (5 per caption, 56 in mmc4/00000)
    assert [s.target_tokens for s in laion.sources] == [40, 80]
    assert [d.target_tokens for d in by_source] == [120, 56, 40]
    # the dataset row is over every source: its sums are theirs, its loss their token mean
    assert laion.target_tokens == sum(s.target_tokens for s in laion.sources)
    weighted = sum(s.loss * s.target_tokens for s in laion.sources) / laion.target_tokens
    assert laion.loss == pytest.approx(weighted, rel=1e-12)
    assert laion.sources[0].loss != pytest.approx(laion.sources[1].loss, abs=1e-4)
    # each source row is the loss of its own eval shards; the dataset's, of all of them
    configs = mixture.loaded.recipe.datasets()
    specs = ["laion/00000.tar", "laion/00001.tar::laion/00002.tar"]
    plain = [_plain(mixture, built, "x", configs["laion"], spec) for spec in specs]
    plain.append(_plain(mixture, built, "x", configs["laion"], "::".join(specs)))
    plain.append(_plain(mixture, built, "x", configs["coyo"], "laion/00003.tar"))
    for row, alone in zip([*laion.sources, laion, coyo], plain, strict=True):
        assert (row.samples, row.target_tokens) == (alone.samples, alone.target_tokens)
        assert row.loss == pytest.approx(alone.loss, abs=1e-6)


def test_without_by_source_the_dataset_rows_are_the_same(
    mixture: Mixture, by_source: list[DatasetLoss]
) -> None:
    plain = evaluate_loss(mixture.loaded, str(mixture.weights)).datasets
    assert [d.sources for d in plain] == [[], [], []]
    for one, other in zip(plain, by_source, strict=True):
        assert (one.dataset, one.target_tokens, one.loss) == (
            other.dataset,
            other.target_tokens,
            other.loss,
        )


def test_the_command_prints_source_rows_and_picks_any_dataset(mixture: Mixture) -> None:
    args = ["eval-loss", str(mixture.recipe), "--checkpoint", str(mixture.weights)]
    done = runner.invoke(app, [*args, "--by-source", "--ablate-images", "none", "--json"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    laion = data["datasets"][0]
    assert [d["dataset"] for d in data["datasets"]] == ["laion", "mmc4", "coyo"]
    assert [s["dataset"] for s in laion["sources"]] == ["laion/laion2b", "laion/datacomp"]
    assert laion["source"] is None and laion["sources"][1]["source"] == "datacomp"
    tokens = [s["target_tokens"] for s in laion["sources"]]
    assert laion["target_tokens"] == sum(tokens)
    # the ablated loss adds up the same way (same batches, cross-attention off)
    ablated = sum(s["ablated_loss"] * t for s, t in zip(laion["sources"], tokens, strict=True))
    assert laion["ablated_loss"] == pytest.approx(ablated / sum(tokens), rel=1e-12)
    table = runner.invoke(app, [*args, "--by-source"])
    assert table.exit_code == 0, table.output
    assert "laion/laion2b" in table.stdout and "laion/datacomp" in table.stdout
    one = runner.invoke(app, [*args, "--dataset", "coyo", "--json"])
    assert one.exit_code == 0, one.output
    assert [d["dataset"] for d in json.loads(one.stdout)["datasets"]] == ["coyo"]
    assert json.loads(one.stdout)["datasets"][0]["samples"] == 8
    sources = runner.invoke(app, [*args, "--dataset", "laion", "--by-source", "--json"])
    assert sources.exit_code == 0, sources.output
    only = json.loads(sources.stdout)["datasets"]
    assert [d["dataset"] for d in only] == ["laion"] and len(only[0]["sources"]) == 2


def test_unknown_dataset_and_misused_options_are_usage_errors(mixture: Mixture) -> None:
    args = ["eval-loss", str(mixture.recipe), "--checkpoint", str(mixture.weights)]
    cases = [
        (["--dataset", "obelics"], "--dataset obelics: the recipe has no [data.obelics]"),
        (["--shards", "x.tar"], "--shards needs --dataset NAME"),
        (["--shards", "x.tar", "--dataset", "coyo", "--by-source"], "--by-source splits"),
    ]
    for extra, message in cases:
        done = runner.invoke(app, [*args, *extra])
        assert done.exit_code == 2, done.output
        assert message in done.output and "Traceback" not in done.output
    unknown = runner.invoke(app, [*args, "--dataset", "obelics"])
    assert "choose --dataset laion or mmc4 or coyo" in unknown.output
    with pytest.raises(UsageError, match=r"several datasets \(laion, mmc4, coyo\)"):
        eval_targets(mixture.loaded.recipe, shards="x.tar")


def test_a_source_without_eval_shards_is_named_in_the_note(
    tmp_path: Path, mixture: Mixture
) -> None:
    text = MIXTURE.replace('eval_shards = "{root}/laion/00000.tar"\n', "")
    loaded = load_recipe(_write(tmp_path, mixture.shard_root, text=text))
    targets = {t.name: t for t in eval_targets(loaded.recipe)}
    assert [name for name, _ in targets["laion"].sources] == ["datacomp"]
    assert targets["laion"].note() == ("source(s) without eval_shards, not in this loss: laion2b")
    report = evaluate_loss(loaded, str(mixture.weights), dataset="laion", by_source=True)
    (laion,) = report.datasets
    assert laion.samples == 16 and [s.source for s in laion.sources] == ["datacomp"]
    assert laion.note is not None and "not in this loss: laion2b" in laion.note
    # no source with eval shards: the key to set is named
    none = text.replace('eval_shards = "{root}/laion/{00001..00002}.tar"\n', "")
    bare = load_recipe(_write(tmp_path, mixture.shard_root, text=none)).recipe
    with pytest.raises(UsageError, match=r"data\.laion\.sources\[\]\.eval_shards"):
        eval_targets(bare, dataset="laion")


def test_periodic_evaluation_covers_every_dataset_blends_included(
    mixture: Mixture, built: Built, by_source: list[DatasetLoss]
) -> None:
    model, transform, tokenizer, special = built
    evaluate = periodic_evaluation(mixture.loaded.recipe, tokenizer, special, transform, INFO)
    assert evaluate is not None
    metrics = evaluate(model.train())
    assert model.training
    model.eval()
    assert list(metrics) == ["eval/loss/laion", "eval/loss/mmc4", "eval/loss/coyo"]
    for row in by_source:
        assert metrics[f"eval/loss/{row.dataset}"] == pytest.approx(row.loss, abs=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_give_the_same_rows(tmp_path: Path, mixture: Mixture) -> None:
    """Two FSDP2 ranks split each source's eval shards (by shard for datacomp, by sample for
    the others) and report the rows of one process."""
    recipe = _write(tmp_path, mixture.shard_root, strategy="fsdp")
    single = evaluate_loss(load_recipe(recipe), str(mixture.weights), by_source=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flamingo_cli", "eval-loss", str(recipe)]
    command += ["--checkpoint", str(mixture.weights), "--nproc-per-node", "2", "--json"]
    command += ["--by-source", "--ablate-images", "shuffle"]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sharded = json.loads(done.stdout)
    assert sharded["world_size"] == 2

    def rows(datasets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [row for d in datasets for row in (d, *d["sources"])]

    ones = rows([d.to_dict() for d in single.datasets])
    twos = rows(sharded["datasets"])
    assert [r["dataset"] for r in twos] == [r["dataset"] for r in ones]
    assert [r["dataset"] for r in twos][:3] == ["laion", "laion/laion2b", "laion/datacomp"]
    for one, two in zip(ones, twos, strict=True):
        assert (one["samples"], one["target_tokens"]) == (two["samples"], two["target_tokens"])
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
