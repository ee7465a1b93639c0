"""Each rule has a recipe that breaks it; the message names the key and its line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flamingo_cli.errors import Problem, ProblemsFound
from flamingo_cli.recipe.load import Override
from flamingo_cli.recipe.validate import validate_recipe

BASE = """
[model]
preset = "tiny"

[data.laion]
shards = "{root}/laion/{00000..00003}.tar"
batch_size = 8
train_num_samples = 64
workers = 2

[data.mmc4]
shards = "{root}/mmc4/{00000..00003}.tar"
batch_size = 4
train_num_samples = 32
workers = 2

[optim]
warmup_steps = 1

[distributed]
strategy = "ddp"
nproc_per_node = 2
"""

WriteRecipe = Callable[[str], Path]


def problems_of(path: Path, overrides: tuple[Override, ...] = ()) -> list[Problem]:
    try:
        return validate_recipe(path, overrides).problems
    except ProblemsFound as exc:
        return exc.problems


def only(problems: list[Problem], key: str) -> Problem:
    found = [p for p in problems if p.key == key]
    assert len(found) == 1, problems
    return found[0]


def test_base_recipe_is_clean(write_recipe: WriteRecipe) -> None:
    assert problems_of(write_recipe(BASE)) == []


def test_unknown_key_with_did_you_mean(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE.replace("batch_size = 8", "batch_sise = 8"))
    problem = only(problems_of(path), "data.laion.batch_sise")
    assert problem.line == 6
    assert problem.file == str(path)
    assert "did you mean 'batch_size'" in problem.message


def test_unknown_table_lists_known_keys(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE + "\n[optimizer]\nlr = 1\n")
    problem = only(problems_of(path), "optimizer")
    assert problem.line == 23
    assert "did you mean 'optim'" in problem.message


def test_all_problems_reported_at_once(write_recipe: WriteRecipe) -> None:
    text = BASE.replace("batch_size = 8", "batch_size = 0").replace(
        "train_num_samples = 32", 'train_num_samples = "many"'
    )
    problems = problems_of(write_recipe(text))
    assert {(p.key, p.line) for p in problems} == {
        ("data.laion.batch_size", 6),
        ("data.mmc4.train_num_samples", 13),
    }
    assert "greater than 0" in only(problems, "data.laion.batch_size").message


def test_unequal_batches_show_both_counts_and_fix(write_recipe: WriteRecipe) -> None:
    # laion: ceil(ceil(64 / 16) / 2) * 2 = 4; mmc4: ceil(ceil(40 / 8) / 2) * 2 = 6
    path = write_recipe(BASE.replace("train_num_samples = 32", "train_num_samples = 40"))
    problem = only(problems_of(path), "data.mmc4.train_num_samples")
    assert problem.line == 13
    assert "laion 4" in problem.message and "mmc4 6" in problem.message
    # nearest fixes: mmc4 to 4 batches (4 * 4 * 2 = 32 samples) or laion to 6 (6 * 8 * 2 = 96)
    assert problem.fix == (
        "set data.mmc4.train_num_samples = 32 or data.laion.train_num_samples = 96"
    )


def test_floor_division_equality_is_not_enough(write_recipe: WriteRecipe) -> None:
    # OpenFlamingo's launcher only checks n // b: 64 // 8 == 33 // 4 == 8 passes, yet with
    # 2 ranks x 2 workers the loaders give ceil(ceil(64 / 16) / 2) * 2 = 4 and
    # ceil(ceil(33 / 8) / 2) * 2 = 6 batches: the ranks would hang at the end of the epoch.
    path = write_recipe(BASE.replace("train_num_samples = 32", "train_num_samples = 33"))
    problem = only(problems_of(path), "data.mmc4.train_num_samples")
    assert "laion 4" in problem.message and "mmc4 6" in problem.message


def test_too_few_shards_without_resampling(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BASE.replace('{00000..00003}.tar"\nbatch_size = 8', '{00000..00002}.tar"\nbatch_size = 8')
    )
    problem = only(problems_of(path), "data.laion.shards")
    assert problem.line == 5
    assert "3 shard(s) for 2 worker(s) x world size 2" in problem.message
    resampled = write_recipe(
        BASE.replace(
            '{00000..00003}.tar"\nbatch_size = 8', '{00000..00002}.tar"\nbatch_size = 8'
        ).replace("workers = 2\n\n[data.mmc4]", "workers = 2\nresampled = true\n\n[data.mmc4]"),
    )
    assert problems_of(resampled) == []


def test_world_size_from_command_line_counts(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE)
    overrides = (Override("distributed.nproc_per_node", 4, "from --nproc-per-node"),)
    problems = problems_of(path, overrides)
    shard_problem = only(problems, "data.laion.shards")
    assert "x world size 4" in shard_problem.message


def test_missing_local_shards(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE.replace("mmc4/{00000..00003}", "mmc4/{00000..00004}"))
    problem = only(problems_of(path), "data.mmc4.shards")
    assert problem.line == 11
    assert problem.message.startswith("1 of 5 local shard(s) do not exist")
    assert "00004.tar" in problem.message


def test_pipe_refused_unless_allowed(write_recipe: WriteRecipe) -> None:
    text = BASE.replace(
        'shards = "{root}/laion/{00000..00003}.tar"',
        'shards = "pipe:cat {root}/laion/{00000..00003}.tar"',
    )
    problem = only(problems_of(write_recipe(text)), "data.laion.shards")
    assert "`pipe:` spec(s) would run shell commands" in problem.message
    assert problem.fix is not None and "data.allow_pipe = true" in problem.fix
    allowed = write_recipe(
        text.replace("[optim]", "[optim]").replace(
            "[data.laion]", "[data]\nallow_pipe = true\n\n[data.laion]"
        )
    )
    assert problems_of(allowed) == []


def test_wandb_checkpoints_need_wandb(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE + "\n[logging]\nsave_checkpoints_to_wandb = true\n")
    problem = only(problems_of(path), "logging.save_checkpoints_to_wandb")
    assert problem.line == 24


def test_hybrid_sharding_needs_several_nodes(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE.replace('strategy = "ddp"', 'strategy = "fsdp"\nsharding = "hybrid"'))
    problem = only(problems_of(path), "distributed.sharding")
    assert problem.line == 21
    assert "nnodes > 1" in problem.message


def test_min_images_above_max(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BASE.replace(
            "workers = 2\n\n[optim]",
            "workers = 2\nmin_num_images = 4\nmax_num_images = 3\n\n[optim]",
        )
    )
    problem = only(problems_of(path), "data.mmc4.min_num_images")
    assert problem.line == 15


def test_openflamingo_threshold_of_30_is_an_error(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BASE.replace("workers = 2\n\n[optim]", "workers = 2\ntextsim_threshold = 30\n\n[optim]")
    )
    problem = only(problems_of(path), "data.mmc4.textsim_threshold")
    assert problem.line == 15
    assert problem.fix is not None and "0.24" in problem.fix


def test_positive_sizes(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE.replace("[optim]", "[optim]\ngradient_accumulation_steps = 0"))
    problem = only(problems_of(path), "optim.gradient_accumulation_steps")
    assert problem.line == 17


def test_model_needs_a_language_model(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE.replace('preset = "tiny"', 'vision_encoder = "ViT-B-32"'))
    problem = only(problems_of(path), "model.lm_path")
    assert problem.line == 1  # the [model] table
    both = write_recipe(BASE.replace('preset = "tiny"', 'preset = "tiny"\nlm_path = "gpt2"'))
    assert only(problems_of(both), "model.preset").line == 2


def test_strategy_none_needs_one_process(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE.replace('strategy = "ddp"', 'strategy = "none"'))
    assert only(problems_of(path), "distributed.strategy").line == 20


def test_warmup_longer_than_training_is_a_warning(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE.replace("warmup_steps = 1", "warmup_steps = 500"))
    report = validate_recipe(path)
    assert report.ok
    problem = only(report.problems, "optim.warmup_steps")
    assert problem.severity == "warning"
    assert "(4 optimizer steps)" in problem.message


def test_epoch_larger_than_data_warns_with_counts(write_recipe: WriteRecipe) -> None:
    # 4 shards x 8 = 32 LAION samples on disk, the epoch draws 64 without resampling
    report = validate_recipe(write_recipe(BASE), check_shards=True)
    assert report.ok
    assert report.counts["laion"].total == 32
    assert report.counts["mmc4"].total == 16
    laion = only(report.problems, "data.laion.train_num_samples")
    assert laion.severity == "warning"
    assert "draws 64 samples but the shards hold 32" in laion.message
    assert "goes over its shards again, so samples repeat within the epoch" in laion.message


def test_check_shards_scans_tars_without_sizes_json(
    write_recipe: WriteRecipe, shard_root: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "nosizes"
    shutil.copytree(shard_root / "laion", copy)
    (copy / "sizes.json").unlink()
    path = write_recipe(BASE.replace("{root}/laion", str(copy)))
    report = validate_recipe(path, check_shards=True)
    assert report.counts["laion"].total == 32
    assert report.counts["laion"].scanned == 32
    assert report.counts["laion"].from_sizes_json == 0
    assert report.counts["mmc4"].from_sizes_json == 16


def test_large_shuffle_buffers_warn(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BASE.replace("workers = 2\n\n[optim]", "workers = 2\nshuffle_buffer = 100000\n\n[optim]")
    )
    problem = only(problems_of(path), "data.mmc4.shuffle_buffer")
    assert problem.severity == "warning"
    assert "GiB per node" in problem.message


def test_unset_environment_variable_names_the_key(
    write_recipe: WriteRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLAMINGO_TEST_UNSET", raising=False)
    path = write_recipe(
        BASE.replace('"{root}/mmc4/{00000..00003}.tar"', '"${FLAMINGO_TEST_UNSET}"')
    )
    problem = only(problems_of(path), "data.mmc4.shards")
    assert problem.line == 11
    assert "FLAMINGO_TEST_UNSET is not set" in problem.message


def test_set_override_problems_say_so(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE)
    problems = problems_of(path, (Override("optim.lr", -1.0), Override("optim.lrr", 1.0)))
    lr = only(problems, "optim.lr")
    assert lr.source == "from --set" and lr.line is None and lr.file is None
    assert "(from --set)" in lr.location
    assert "did you mean 'lr'" in only(problems, "optim.lrr").message
