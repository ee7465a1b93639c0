"""`--from-openflamingo`: OpenFlamingo launch commands become equivalent recipes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flamingo_cli.errors import UsageError
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.recipe.openflamingo import recipe_from_openflamingo
from flamingo_cli.recipe.validate import validate_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

README_COMMAND = (Path(__file__).parent / "data" / "openflamingo_readme_command.txt").read_text()


def test_readme_command_translates_flag_for_flag() -> None:
    imported = recipe_from_openflamingo(README_COMMAND)
    assert imported.problems == []
    data = tomllib.loads(imported.toml)
    assert data == imported.data
    assert data["model"]["lm_path"] == "anas-awadalla/mpt-1b-redpajama-200b"
    assert data["model"]["tokenizer_path"] == "anas-awadalla/mpt-1b-redpajama-200b"
    assert data["model"]["cross_attn_every_n_layers"] == 1
    assert data["model"]["vision_encoder"] == "ViT-L-14"
    assert data["data"]["laion"] == {
        "shards": "/path/to/shards/shard-{0000..0999}.tar",
        "batch_size": 64,
        "train_num_samples": 250000,
        "workers": 4,
        "resampled": True,
        "loss_multiplier": 0.2,
    }
    mmc4 = data["data"]["mmc4"]
    assert (mmc4["batch_size"], mmc4["train_num_samples"], mmc4["textsim_threshold"]) == (
        32,
        125000,
        0.24,
    )
    assert data["run"]["name"] == "OpenFlamingo-3B-vitl-mpt1b"
    assert data["run"]["num_epochs"] == 480
    assert data["optim"]["warmup_steps"] == 1875
    assert data["distributed"] == {
        "strategy": "ddp",
        "nproc_per_node": 4,
        "nnodes": 1,
        "sharding": "full",
    }
    assert data["logging"]["wandb"] is True


def test_readme_command_validates_against_real_shards(tmp_path: Path, shard_root: Path) -> None:
    imported = recipe_from_openflamingo(README_COMMAND)
    path = tmp_path / "imported.toml"
    path.write_text(imported.toml)
    overrides = [
        parse_override(f"data.laion.shards={shard_root}/laion/{{00000..00003}}.tar"),
        parse_override(f"data.mmc4.shards={shard_root}/mmc4/{{00000..00003}}.tar"),
    ]
    report = validate_recipe(path, overrides)
    assert report.ok, report.problems
    assert [d.batches_per_rank for d in report.plan.datasets] == [980, 980]
    assert report.plan.total_optimizer_steps == 980 * 480


def test_the_bundled_3b_recipe_matches_the_readme_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAION_SHARDS", "/path/to/shards/shard-{0000..0999}.tar")
    monkeypatch.setenv("MMC4_SHARDS", "/path/to/shards/shard-{0000..0999}.tar")
    bundled = load_recipe(
        Path(__file__).parent.parent / "recipes" / "openflamingo-3b-vitl-mpt1b.toml"
    )
    imported_path = Path(__file__).parent / "data" / "_imported.toml"
    try:
        imported_path.write_text(recipe_from_openflamingo(README_COMMAND).toml)
        imported = load_recipe(imported_path)
    finally:
        imported_path.unlink(missing_ok=True)
    ours, theirs = bundled.recipe, imported.recipe
    assert ours.data == theirs.data
    assert ours.optim == theirs.optim
    assert ours.model.lm_path == theirs.model.lm_path
    assert ours.model.trust_remote_code == theirs.model.trust_remote_code
    assert ours.model.cross_attn_every_n_layers == theirs.model.cross_attn_every_n_layers
    assert ours.distributed.world_size == theirs.distributed.world_size
    assert (ours.run.name, ours.run.num_epochs, ours.run.seed) == (
        theirs.run.name,
        theirs.run.num_epochs,
        theirs.run.seed,
    )


def test_left_out_flags_take_openflamingo_defaults(tmp_path: Path) -> None:
    imported = recipe_from_openflamingo(
        "python -m open_flamingo.train.train --laion_shards /l/{0..3}.tar --mmc4_shards /m/{0..3}.tar"
    )
    data = imported.data
    assert data["data"]["mmc4"]["textsim_threshold"] == 30.0
    assert data["data"]["mmc4"]["batch_size"] == 128
    assert data["model"]["lm_path"] == "facebook/opt-1.3b"
    assert data["model"]["tokenizer_path"] == "facebook/opt-30b"
    assert data["optim"]["warmup_steps"] == 5000
    path = tmp_path / "r.toml"
    path.write_text(imported.toml)
    problems = validate_recipe(path).problems
    assert "data.mmc4.textsim_threshold" in {p.key for p in problems if p.severity == "error"}


def test_interleaved_spellings_and_srun_prefix() -> None:
    imported = recipe_from_openflamingo(
        "srun --nodes=2 --ntasks-per-node=8 --cpu_bind=v python -u open_flamingo/train/train.py "
        "--batch_size_interleaved 16 --train_num_samples_interleaved 5000 "
        "--laion_shards a.tar --mmc4_shards b.tar --fsdp --fsdp_sharding_strategy hybrid "
        "--precision amp_bfloat16 --delete_previous_checkpoint"
    )
    mmc4 = imported.data["data"]["mmc4"]
    assert (mmc4["batch_size"], mmc4["train_num_samples"]) == (16, 5000)
    assert mmc4["shards"].endswith("/b.tar") and mmc4["shards"].startswith("/")
    assert imported.data["distributed"] == {
        "strategy": "fsdp",
        "nproc_per_node": 8,
        "nnodes": 2,
        "sharding": "hybrid",
    }
    assert imported.data["run"]["precision"] == "amp_bf16"
    assert imported.data["run"]["keep_last"] == 1


def test_unknown_flags_are_reported_with_a_guess() -> None:
    imported = recipe_from_openflamingo(
        "torchrun train.py --laion_shards a.tar --mmc4_shards b.tar --batch_size_laoin 3 --bogus"
    )
    messages = [(p.message, p.fix) for p in imported.problems]
    assert messages == [
        ("unknown OpenFlamingo flag --batch_size_laoin", "did you mean --batch_size_laion?"),
        ("unknown OpenFlamingo flag --bogus", "remove it"),
    ]


def test_not_a_training_command() -> None:
    with pytest.raises(UsageError, match="no OpenFlamingo training script"):
        recipe_from_openflamingo("python something_else.py --lm_path x")
