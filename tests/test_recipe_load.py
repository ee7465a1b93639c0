"""Loading: TOML errors, ${VAR}, --set typing, relative shard paths, union messages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flamingo_cli.errors import ProblemsFound, UsageError
from flamingo_cli.recipe.load import load_recipe, parse_override

WriteRecipe = Callable[..., Path]

MINIMAL = """
[model]
preset = "tiny"

[data.laion]
shards = "laion/{00000..00001}.tar"
"""


def test_overrides_are_typed_as_toml_values() -> None:
    assert parse_override("optim.lr=3e-4").value == pytest.approx(3e-4)
    assert parse_override("data.laion.resampled=true").value is True
    assert parse_override("run.name=my-run").value == "my-run"
    assert parse_override('run.name="42"').value == "42"
    assert parse_override("data.laion.shards=['a.tar', 'b.tar']").value == ["a.tar", "b.tar"]
    with pytest.raises(UsageError):
        parse_override("optim.lr")


def test_set_values_reach_the_model(write_recipe: WriteRecipe) -> None:
    path = write_recipe(MINIMAL)
    loaded = load_recipe(path, [parse_override("optim.lr=0.5"), parse_override("run.num_epochs=3")])
    assert loaded.recipe.optim.lr == 0.5
    assert loaded.recipe.run.num_epochs == 3
    assert loaded.sources == {"optim.lr": "from --set", "run.num_epochs": "from --set"}


def test_relative_shards_resolve_against_the_recipe_directory(
    write_recipe: WriteRecipe, tmp_path: Path
) -> None:
    loaded = load_recipe(write_recipe(MINIMAL))
    assert loaded.recipe.data.laion is not None
    assert loaded.recipe.data.laion.shards == f"{tmp_path}/laion/{{00000..00001}}.tar"


def test_set_shards_stay_relative_to_the_working_directory(write_recipe: WriteRecipe) -> None:
    loaded = load_recipe(write_recipe(MINIMAL), [parse_override("data.laion.shards=x/{0..1}.tar")])
    assert loaded.recipe.data.laion is not None
    assert loaded.recipe.data.laion.shards == "x/{0..1}.tar"


def test_remote_and_absolute_shards_are_kept(write_recipe: WriteRecipe) -> None:
    text = MINIMAL.replace('"laion/{00000..00001}.tar"', '"s3://bucket/{0..1}.tar::/abs/x.tar"')
    loaded = load_recipe(write_recipe(text))
    assert loaded.recipe.data.laion is not None
    assert loaded.recipe.data.laion.shards == "s3://bucket/{0..1}.tar::/abs/x.tar"


def test_environment_variables_and_defaults(
    write_recipe: WriteRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLAMINGO_TEST_DIR", "/data/laion")
    text = (
        MINIMAL.replace('"laion/{00000..00001}.tar"', '"${FLAMINGO_TEST_DIR}/{0..1}.tar"')
        + '\n[run]\nname = "${FLAMINGO_TEST_NAME:-fallback}"\n'
    )
    loaded = load_recipe(write_recipe(text))
    assert loaded.recipe.data.laion is not None
    assert loaded.recipe.data.laion.shards == "/data/laion/{0..1}.tar"
    assert loaded.recipe.run.name == "fallback"


def test_invalid_toml_reports_the_line(write_recipe: WriteRecipe) -> None:
    path = write_recipe('[model]\npreset = "tiny"\nlm_path = \n')
    with pytest.raises(ProblemsFound) as info:
        load_recipe(path)
    (problem,) = info.value.problems
    assert problem.line == 3
    assert problem.message.startswith("not valid TOML")


def test_wrong_type_for_a_union_gives_one_message(write_recipe: WriteRecipe) -> None:
    path = write_recipe(MINIMAL.replace('"laion/{00000..00001}.tar"', "3"))
    with pytest.raises(ProblemsFound) as info:
        load_recipe(path)
    (problem,) = info.value.problems
    assert problem.key == "data.laion.shards"
    assert problem.line == 5
    assert "valid string" in problem.message and "valid list" in problem.message


def test_wrong_literal_names_the_choices(write_recipe: WriteRecipe) -> None:
    path = write_recipe(MINIMAL + '\n[run]\nprecision = "fp8"\n')
    with pytest.raises(ProblemsFound) as info:
        load_recipe(path)
    (problem,) = info.value.problems
    assert problem.key == "run.precision"
    assert problem.line == 8
    assert "'fp32', 'bf16', 'amp_bf16' or 'fp16'" in problem.message


def test_missing_recipe_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_set_into_a_value_is_reported(write_recipe: WriteRecipe) -> None:
    with pytest.raises(ProblemsFound) as info:
        load_recipe(write_recipe(MINIMAL), [parse_override("run.name.x=1")])
    assert [p.key for p in info.value.problems] == ["run.name"]
