"""Every bundled recipe validates; the bundled tiny data is what its script writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.recipe.validate import validate_recipe
from flamingo_cli.shards.sizes import read_sizes
from flamingo_cli.shards.tar import count_samples
from flamingo_cli.synthetic import write_dataset

from .conftest import RECIPES

ALL = sorted(RECIPES.glob("*.toml"))


def test_there_are_recipes_for_each_published_size() -> None:
    assert [p.name for p in ALL] == [
        "openflamingo-3b-vitl-mpt1b.toml",
        "openflamingo-4b-vitl-rpj3b.toml",
        "openflamingo-9b-vitl-mpt7b.toml",
        "tiny-cpu.toml",
    ]


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: p.stem)
def test_bundled_recipe_validates(
    recipe: Path, shard_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAION_SHARDS", f"{shard_root}/laion/{{00000..00003}}.tar")
    monkeypatch.setenv("MMC4_SHARDS", f"{shard_root}/mmc4/{{00000..00003}}.tar")
    report = validate_recipe(recipe, check_shards=True)
    assert report.ok, report.problems
    assert [p for p in report.problems if p.severity == "error"] == []
    laion, mmc4 = report.plan.datasets
    assert laion.batches_per_rank == mmc4.batches_per_rank


def test_tiny_data_matches_its_generator(tmp_path: Path) -> None:
    write_dataset("laion", tmp_path / "laion", shards=2, per_shard=32)
    write_dataset("mmc4", tmp_path / "mmc4", shards=2, per_shard=16)
    for kind in ("laion", "mmc4"):
        bundled = RECIPES / "tiny-data" / kind
        names = sorted(p.name for p in bundled.iterdir())
        assert names == sorted(p.name for p in (tmp_path / kind).iterdir())
        for name in names:
            assert (bundled / name).read_bytes() == (tmp_path / kind / name).read_bytes(), name
        sizes = read_sizes(str(bundled))
        assert sizes is not None
        assert {n: count_samples(str(bundled / n)) for n in sizes} == sizes


# Plans `validate-config --json` printed for the bundled recipes before mixtures (commit
# e65649c): mixtures only add keys (a dataset's kind and sources, docs/formats.md §7).
BEFORE_MIXTURES = json.loads((Path(__file__).parent / "data" / "bundled_plans.json").read_text())
ADDED_KEYS = {"kind", "sources"}


def _without_added_keys(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_added_keys(v) for k, v in value.items() if k not in ADDED_KEYS}
    if isinstance(value, list | tuple):
        return [_without_added_keys(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("openflamingo-3b-vitl-mpt1b", []),
        ("openflamingo-4b-vitl-rpj3b", []),
        ("openflamingo-9b-vitl-mpt7b", []),
        ("tiny-cpu", []),
        ("tiny-cpu --check-shards", ["--check-shards"]),
        ("tiny-cpu --check-shards --nproc-per-node 4", ["--check-shards", "--nproc-per-node", "4"]),
    ],
)
def test_bundled_plans_are_those_of_before_mixtures(
    case: str, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAION_SHARDS", "/nonexistent/laion/{00000..23099}.tar")
    monkeypatch.setenv("MMC4_SHARDS", "/nonexistent/mmc4/{00000..23098}.tar")
    recipe = RECIPES / f"{case.split(maxsplit=1)[0]}.toml"
    result = CliRunner().invoke(app, ["validate-config", str(recipe), "--json", *args])
    plan = json.loads(result.stdout)["plan"]
    assert _without_added_keys(plan) == BEFORE_MIXTURES[case]
    for dataset in plan["datasets"]:
        assert dataset["kind"] == {"laion": "pairs", "mmc4": "interleaved"}[dataset["name"]]
        (source,) = dataset["sources"]
        assert (source["name"], source["blended"], source["shards"]) == (
            dataset["name"],
            False,
            dataset["shards"],
        )
        assert source["samples_drawn_per_epoch"] == dataset["samples_drawn_per_epoch"]
        assert source["total_samples"] == dataset["total_samples"]
