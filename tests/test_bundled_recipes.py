"""Every bundled recipe validates; the bundled tiny data is what its script writes."""

from __future__ import annotations

from pathlib import Path

import pytest

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
