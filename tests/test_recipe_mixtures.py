"""validate-config on mixtures (docs/formats.md §7): named datasets, weighted sources, the
plan per source, and every error and warning of §7.3 with its key and line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import Problem, ProblemsFound
from flamingo_cli.recipe.load import load_recipe
from flamingo_cli.recipe.openflamingo import recipe_from_openflamingo
from flamingo_cli.recipe.plan import SourcePlan, make_plan
from flamingo_cli.recipe.validate import validate_recipe

runner = CliRunner()
WriteRecipe = Callable[[str], Path]

# laion: a blend of two sources (coyo resampled); mmc4 by shards; cc12m a third pairs dataset.
# Every loader gives 4 batches per rank per epoch at world size 2.
BLEND = """
[model]
preset = "tiny"

[data.laion]
batch_size = 8
train_num_samples = 64
workers = 2

[[data.laion.sources]]
name = "laion2b"
shards = "{root}/laion/{00000..00003}.tar"
weight = 3

[[data.laion.sources]]
name = "coyo"
shards = "{root}/laion/{00000..00001}.tar"
weight = 1
resampled = true

[data.mmc4]
shards = "{root}/mmc4/{00000..00003}.tar"
batch_size = 4
train_num_samples = 32
workers = 2

[data.cc12m]
kind = "pairs"
shards = "{root}/laion/{00000..00003}.tar"
batch_size = 2
train_num_samples = 16
workers = 2

[optim]
warmup_steps = 1

[distributed]
strategy = "ddp"
nproc_per_node = 2
"""
LAION2B_LINE, COYO_LINE, CC12M_LINE = 9, 14, 26


def problems_of(path: Path, *, check_shards: bool = False) -> list[Problem]:
    try:
        return validate_recipe(path, check_shards=check_shards).problems
    except ProblemsFound as exc:
        return exc.problems


def only(problems: list[Problem], key: str) -> Problem:
    found = [p for p in problems if p.key == key]
    assert len(found) == 1, problems
    return found[0]


def test_lines_of_the_base_recipe(write_recipe: WriteRecipe) -> None:
    lines = load_recipe(write_recipe(BLEND)).lines
    assert lines["data.laion.sources.0"] == LAION2B_LINE
    assert lines["data.laion.sources.1"] == COYO_LINE
    assert lines["data.cc12m"] == CC12M_LINE


def test_three_datasets_with_a_blend_plan_exactly(write_recipe: WriteRecipe) -> None:
    report = validate_recipe(write_recipe(BLEND))
    assert report.problems == []
    plan = report.plan
    assert [(d.name, d.kind) for d in plan.datasets] == [
        ("laion", "pairs"),
        ("mmc4", "interleaved"),
        ("cc12m", "pairs"),
    ]
    assert [d.batches_per_rank for d in plan.datasets] == [4, 4, 4]
    assert (plan.batches_per_epoch, plan.total_optimizer_steps) == (4, 4)
    laion, mmc4, cc12m = plan.datasets
    # S = 4 batches x 8 x 2 ranks = 64 draws, 3:1 over laion2b and coyo; 2 workers x 2 ranks
    assert (laion.shards, laion.samples_drawn_per_epoch, laion.shards_per_worker) == (6, 64, 1.5)
    assert laion.sources == (
        SourcePlan("laion2b", 3.0, 0.75, 4, 0, 1.0, False, 48, blended=True),
        SourcePlan("coyo", 1.0, 0.25, 2, 0, 0.5, True, 16, blended=True),
    )
    assert mmc4.sources == (SourcePlan("mmc4", 1.0, 1.0, 4, 0, 1.0, False, 32, blended=False),)
    assert cc12m.sources == (SourcePlan("cc12m", 1.0, 1.0, 4, 0, 1.0, False, 16, blended=False),)


def test_check_shards_counts_each_source(write_recipe: WriteRecipe) -> None:
    report = validate_recipe(write_recipe(BLEND), check_shards=True)
    assert report.ok
    laion = report.counts["laion"]
    assert (laion.total, laion.from_sizes_json) == (48, 48)
    assert {n: c.total for n, c in laion.sources.items()} == {"laion2b": 32, "coyo": 16}
    assert report.counts["cc12m"].sources["cc12m"].total == 32
    sources = report.plan.datasets[0].sources
    assert [(s.total_samples, s.passes_per_epoch) for s in sources] == [(32, 1.5), (16, 1.0)]
    assert report.plan.datasets[0].total_samples == 48
    # laion2b draws 48 of its 32 samples without resampling; mmc4 draws 32 of 16
    assert sorted((p.key, p.line, p.severity) for p in report.problems) == [
        ("data.laion.sources.0.weight", LAION2B_LINE + 3, "warning"),
        ("data.mmc4.train_num_samples", 23, "warning"),
    ]
    blended = only(report.problems, "data.laion.sources.0.weight")
    assert blended.message == (
        "source 'laion2b' of [data.laion] is drawn about 48 samples per epoch but its shards "
        "hold 32: without resampling each loader worker goes over its shards again, so "
        "samples repeat within the epoch (docs/formats.md §5.8)"
    )
    assert blended.fix == "set data.laion.sources.0.resampled = true or lower its weight"


def test_json_plan_of_a_blend(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BLEND)
    result = runner.invoke(app, ["validate-config", str(path), "--json", "--check-shards"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    laion = data["plan"]["datasets"][0]
    assert (laion["name"], laion["kind"], laion["total_samples"]) == ("laion", "pairs", 48)
    assert laion["sources"] == [
        {
            "name": "laion2b",
            "weight": 3.0,
            "share": 0.75,
            "shards": 4,
            "eval_shards": 0,
            "shards_per_worker": 1.0,
            "resampled": False,
            "samples_drawn_per_epoch": 48,
            "blended": True,
            "total_samples": 32,
            "passes_per_epoch": 1.5,
        },
        {
            "name": "coyo",
            "weight": 1.0,
            "share": 0.25,
            "shards": 2,
            "eval_shards": 0,
            "shards_per_worker": 0.5,
            "resampled": True,
            "samples_drawn_per_epoch": 16,
            "blended": True,
            "total_samples": 16,
            "passes_per_epoch": 1.0,
        },
    ]
    assert [d["name"] for d in data["plan"]["datasets"]] == ["laion", "mmc4", "cc12m"]
    counts = data["counts"]["laion"]
    assert (counts["total"], counts["sources"]["coyo"]["total"]) == (48, 16)


def test_text_plan_shows_sources_in_80_columns(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BLEND.replace('name = "coyo"', 'name = "a-rather-long-source-name"'))
    result = runner.invoke(
        app, ["validate-config", str(path), "--check-shards"], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
    assert ["kind", "pairs", "interleaved", "pairs"] in cells
    assert ["laion", "", "", "6", "1.50", "64", ""] in cells
    assert ["laion2b", "3", "75%", "4", "1.00", "~48", "1.50"] in cells
    name = next(c for c in cells if c[0].startswith("a-rather"))
    assert name[1:] == ["1", "25%", "2*", "0.50", "~16", "1.00"]
    assert "* resampled" in result.stdout


def test_more_datasets_than_fit_go_on_in_a_second_table(write_recipe: WriteRecipe) -> None:
    extra = '\n[data.obelics]\nkind = "interleaved"\nshards = "{root}/mmc4/{00000..00003}.tar"\n'
    text = BLEND.replace(
        "\n[optim]", extra + "batch_size = 4\ntrain_num_samples = 32\nworkers = 2\n\n[optim]"
    )
    result = runner.invoke(app, ["validate-config", str(write_recipe(text))], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "(continued)" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


# errors of §7.3, each through the CLI's file:line: key rendering or the library's Problem


def test_duplicate_source_names(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BLEND.replace('name = "coyo"', 'name = "laion2b"'))
    problem = only(problems_of(path), "data.laion.sources.1.name")
    assert problem.line == COYO_LINE + 1
    assert problem.message == (
        "sources 0 and 1 of [data.laion] (counted from 0) are both named 'laion2b'"
    )
    result = runner.invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1
    assert f"{path}:{COYO_LINE + 1}: data.laion.sources.1.name: sources 0 and 1" in result.stderr
    assert "fix: give each source of the dataset its own name" in result.stderr


def test_shards_and_sources_both_given(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BLEND.replace(
            "workers = 2\n\n[[data.laion", 'workers = 2\nshards = "x.tar"\n\n[[data.laion', 1
        )
    )
    problem = only(problems_of(path), "data.laion.sources")
    assert problem.line == LAION2B_LINE + 1  # the first [[data.laion.sources]]
    assert problem.message == "[data.laion] gives both shards and [[data.laion.sources]]"
    assert problem.fix is not None and "remove data.laion.shards" in problem.fix


def test_neither_shards_nor_sources(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BLEND.replace(
            'shards = "{root}/laion/{00000..00003}.tar"\nbatch_size = 2', "batch_size = 2"
        )
    )
    problem = only(problems_of(path), "data.cc12m.shards")
    assert (problem.line, problem.message) == (CC12M_LINE, "[data.cc12m] has no shards")
    assert problem.fix == (
        'set data.cc12m.shards = "path/{00000..00099}.tar", or add [[data.cc12m.sources]] '
        "tables with name, shards and weight"
    )


def test_an_empty_list_of_sources(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BLEND.replace(
            'shards = "{root}/laion/{00000..00003}.tar"\nbatch_size = 2',
            "sources = []\nbatch_size = 2",
        )
    )
    problem = only(problems_of(path), "data.cc12m.sources")
    assert (problem.line, problem.message) == (CC12M_LINE + 2, "[data.cc12m] has no sources")


def test_too_few_shards_for_a_source_that_is_not_resampled(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BLEND.replace("resampled = true", "resampled = false"))
    problem = only(problems_of(path), "data.laion.sources.1.shards")
    assert problem.line == COYO_LINE + 2
    assert problem.message == (
        "2 shard(s) for 2 worker(s) x world size 2: without resampling every worker needs at "
        "least one shard (4)"
    )
    assert problem.fix == (
        "set data.laion.sources.1.resampled = true, give at least 4 shards, "
        "or lower data.laion.workers"
    )


def test_a_source_takes_the_datasets_resampled_unless_it_says(write_recipe: WriteRecipe) -> None:
    # coyo (2 shards) without its own setting follows [data.laion] resampled = true: no error
    inherits = BLEND.replace("resampled = true\n", "").replace(
        "workers = 2\n\n[[data.laion", "workers = 2\nresampled = true\n\n[[data.laion", 1
    )
    assert problems_of(write_recipe(inherits)) == []
    # and its own resampled = false overrides the dataset's
    overrides = inherits.replace("weight = 1\n", "weight = 1\nresampled = false\n")
    problem = only(problems_of(write_recipe(overrides)), "data.laion.sources.1.shards")
    assert "2 shard(s) for 2 worker(s)" in problem.message


def test_unequal_batches_across_three_datasets(write_recipe: WriteRecipe) -> None:
    # cc12m: ceil(ceil(24 / (2 x 2)) / 2) x 2 = 6 batches, laion and mmc4 give 4
    path = write_recipe(BLEND.replace("train_num_samples = 16", "train_num_samples = 24"))
    problem = only(problems_of(path), "data.cc12m.train_num_samples")
    assert problem.line == CC12M_LINE + 4
    assert problem.message == (
        "the loaders give different batches per rank per epoch: laion 4 (n=64, batch 8, "
        "2 workers) vs cc12m 6 (n=24, batch 2, 2 workers) at world size 2; "
        "ceil(ceil(n / (batch * world)) / workers) * workers must match"
    )
    assert problem.fix == (
        "set data.cc12m.train_num_samples = 16; or set data.laion.train_num_samples = 96 "
        "and data.mmc4.train_num_samples = 48"
    )


def test_unequal_batches_name_every_dataset_that_differs(write_recipe: WriteRecipe) -> None:
    text = BLEND.replace("train_num_samples = 16", "train_num_samples = 24").replace(
        "train_num_samples = 32", "train_num_samples = 40"
    )
    problem = only(problems_of(write_recipe(text)), "data.mmc4.train_num_samples")
    assert (
        "laion 4 (n=64, batch 8, 2 workers) vs mmc4 6 (n=40, batch 4, 2 workers), "
        "cc12m 6 (n=24, batch 2, 2 workers)" in problem.message
    )
    assert problem.fix == (
        "set data.mmc4.train_num_samples = 32 and data.cc12m.train_num_samples = 16; "
        "or set data.laion.train_num_samples = 96"
    )


def test_a_weight_must_be_positive(write_recipe: WriteRecipe) -> None:
    problem = only(
        problems_of(write_recipe(BLEND.replace("weight = 3", "weight = 0"))),
        "data.laion.sources.0.weight",
    )
    assert problem.line == LAION2B_LINE + 3
    assert "greater than 0" in problem.message
    assert problem.fix is not None and problem.fix.startswith("give a number > 0")
    assert "[[data.laion.sources]]" in problem.fix


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "",
            "[data.cc12m] does not say its kind: only laion and mmc4 have theirs implied; "
            'set kind = "pairs" or "interleaved"',
        ),
        ('kind = "pair"\n', 'unknown dataset kind \'pair\': kind is "pairs" or "interleaved"'),
    ],
    ids=["missing", "unknown"],
)
def test_kind_missing_or_unknown(write_recipe: WriteRecipe, kind: str, message: str) -> None:
    path = write_recipe(BLEND.replace('kind = "pairs"\n', kind))
    problem = only(problems_of(path), "data.cc12m.kind")
    assert problem.message == message
    assert problem.line == (CC12M_LINE + 1 if kind else CC12M_LINE)


def test_dataset_and_source_names_follow_the_metric_name_rule(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BLEND.replace("[data.cc12m]", '[data."cc 12m"]'))
    problem = only(problems_of(path), "data.cc 12m")
    assert problem.line == CC12M_LINE
    assert problem.message.startswith("dataset name 'cc 12m' must start with a letter")
    assert problem.fix == "rename [data.cc 12m], e.g. to [data.cc_12m]"
    source = write_recipe(BLEND.replace('name = "coyo"', 'name = "2coyo"'))
    assert only(problems_of(source), "data.laion.sources.1.name").line == COYO_LINE + 1


def test_eval_shards_of_a_blend_are_given_per_source(write_recipe: WriteRecipe) -> None:
    text = BLEND.replace(
        "workers = 2\n\n[[data.laion", 'workers = 2\neval_shards = "e.tar"\n\n[[data.laion', 1
    )
    problem = only(problems_of(write_recipe(text)), "data.laion.eval_shards")
    assert problem.line == LAION2B_LINE - 1
    assert problem.message == (
        "[data.laion] is a blend of sources, so its eval shards are given per source"
    )
    per_source = BLEND.replace(
        "weight = 1\n", 'weight = 1\neval_shards = "{root}/laion/00003.tar"\n'
    )
    report = validate_recipe(write_recipe(per_source))
    assert report.problems == []
    assert [s.eval_shards for s in report.plan.datasets[0].sources] == [0, 1]
    assert report.plan.datasets[0].eval_shards == 1


def test_missing_shards_of_a_source(write_recipe: WriteRecipe) -> None:
    text = BLEND.replace("laion/{00000..00001}.tar", "laion/{00000..00005}.tar").replace(
        "weight = 1\n", 'weight = 1\neval_shards = "{root}/laion/00009.tar"\n'
    )
    problems = problems_of(write_recipe(text))
    shards = only(problems, "data.laion.sources.1.shards")
    assert shards.line == COYO_LINE + 2
    assert shards.message.startswith("2 of 6 local shard(s) do not exist: ")
    assert only(problems, "data.laion.sources.1.eval_shards").line == COYO_LINE + 4


def test_missing_shards_of_a_source_in_a_recipe_that_fails_typing(
    write_recipe: WriteRecipe,
) -> None:
    text = BLEND.replace("laion/{00000..00001}.tar", "laion/{00000..00005}.tar").replace(
        "batch_size = 2", "batch_size = 0"
    )
    problems = problems_of(write_recipe(text))
    assert {p.key for p in problems} == {"data.cc12m.batch_size", "data.laion.sources.1.shards"}
    assert only(problems, "data.laion.sources.1.shards").line == COYO_LINE + 2


def test_image_rules_apply_to_every_interleaved_dataset(write_recipe: WriteRecipe) -> None:
    text = BLEND.replace('kind = "pairs"', 'kind = "interleaved"\nmin_num_images = 9').replace(
        'shards = "{root}/laion/{00000..00003}.tar"\nbatch_size = 2',
        'shards = "{root}/mmc4/{00000..00003}.tar"\nbatch_size = 2',
    )
    problem = only(problems_of(write_recipe(text)), "data.cc12m.min_num_images")
    assert problem.line == CC12M_LINE + 2
    assert problem.fix == "set data.cc12m.min_num_images <= 6"


def test_no_training_data_names_the_table_form(write_recipe: WriteRecipe) -> None:
    problem = only(problems_of(write_recipe('[model]\npreset = "tiny"\n')), "data")
    assert problem.message == "no training data: the recipe has no [data.NAME] table"
    assert problem.fix is not None and 'kind = "pairs" or "interleaved"' in problem.fix


# warnings of §7.3: they need sample counts (--check-shards)

# one dataset at world size 1: 32 batches x 8 = 256 draws; shards hold 8 samples each
WARN = """
[model]
preset = "tiny"

[data.laion]
batch_size = 8
train_num_samples = 256
workers = 2
resampled = true

[[data.laion.sources]]
name = "big"
shards = "{root}/laion/{00000..00003}.tar"
weight = 0.25

[[data.laion.sources]]
name = "small"
shards = "{root}/laion/00000.tar"
weight = 0.74

[[data.laion.sources]]
name = "rare"
shards = "{root}/laion/{00000..00003}.tar"
weight = 0.01

[optim]
warmup_steps = 1
"""


def test_source_repeated_more_than_ten_times_and_one_read_too_little(
    write_recipe: WriteRecipe,
) -> None:
    path = write_recipe(WARN)
    assert problems_of(path) == []  # counts unknown: no guess
    report = validate_recipe(path, check_shards=True)
    assert report.ok
    drawn = [
        (s.name, s.samples_drawn_per_epoch, s.total_samples)
        for s in report.plan.datasets[0].sources
    ]
    assert drawn == [("big", 64, 32), ("small", 189, 8), ("rare", 3, 32)]
    assert [(p.key, p.line, p.severity) for p in report.problems] == [
        ("data.laion.sources.1.weight", 18, "warning"),
        ("data.laion.sources.2.weight", 23, "warning"),
    ]
    small, rare = report.problems
    assert small.message == (
        "source 'small' of [data.laion] is drawn about 189 samples per epoch, 23.6 passes over "
        "the 8 samples its shards hold: each sample is seen about 24 times per epoch"
    )
    assert small.fix == "lower data.laion.sources.1.weight, or give the source more shards"
    assert rare.message == (
        "source 'rare' of [data.laion] is drawn about 3 samples per epoch, fewer than one of "
        "its shards holds on average (8): an epoch reads a small part of its data"
    )
    assert rare.fix == "raise data.laion.sources.2.weight or leave the source out"


def test_a_dataset_given_by_shards_repeated_more_than_ten_times(
    write_recipe: WriteRecipe,
) -> None:
    text = WARN.split("[[data.laion.sources]]", maxsplit=1)[0] + (
        'shards = "{root}/laion/{00000..00001}.tar"\n\n[optim]\nwarmup_steps = 1\n'
    )
    problem = only(
        problems_of(write_recipe(text), check_shards=True), "data.laion.train_num_samples"
    )
    assert problem.severity == "warning"
    assert problem.message == (
        "[data.laion] is drawn about 256 samples per epoch, 16.0 passes over the 16 samples its "
        "shards hold: each sample is seen about 16 times per epoch"
    )
    assert problem.fix == "lower data.laion.train_num_samples, or give it more shards"


# unchanged: OpenFlamingo's two datasets


def test_from_openflamingo_still_gives_the_two_datasets(tmp_path: Path) -> None:
    command = (Path(__file__).parent / "data" / "openflamingo_readme_command.txt").read_text()
    imported = recipe_from_openflamingo(command)
    assert set(imported.data["data"]["laion"]) >= {"shards"}
    assert (
        "kind" not in imported.data["data"]["laion"]
        and "sources" not in imported.data["data"]["mmc4"]
    )
    path = tmp_path / "of.toml"
    path.write_text(imported.toml, encoding="utf-8")
    recipe = load_recipe(path).recipe
    assert [(n, c.kind) for n, c in recipe.datasets().items()] == [
        ("laion", "pairs"),
        ("mmc4", "interleaved"),
    ]
    plan = make_plan(recipe)
    assert [(d.name, [s.name for s in d.sources]) for d in plan.datasets] == [
        ("laion", ["laion"]),
        ("mmc4", ["mmc4"]),
    ]
    assert not any(s.blended for d in plan.datasets for s in d.sources)


def test_each_source_of_a_blend_has_its_own_shuffle_buffer(write_recipe: WriteRecipe) -> None:
    # pairs: 25,000 bytes a sample when not counted; 5000 samples x 2 workers x 2 processes
    laion, _, cc12m = validate_recipe(write_recipe(BLEND)).plan.datasets
    assert cc12m.shuffle_buffer_bytes_per_node == 5000 * 25_000 * 2 * 2
    assert laion.shuffle_buffer_bytes_per_node == 2 * 5000 * 25_000 * 2 * 2
    text = BLEND.replace(
        "workers = 2\n\n[[data.laion", "workers = 2\nshuffle_buffer = 500000\n\n[[data.laion", 1
    )
    problem = only(problems_of(write_recipe(text)), "data.laion.shuffle_buffer")
    assert problem.message == (
        "shuffle buffers hold about 93 GiB per node (500000 samples x 2 sources x 2 workers x "
        "2 processes)"
    )
