"""The model the quickstart trains captions held-out images: the quickstart's last stage and
eval-fewshot on more generated images both score a CIDEr at least 3x the one the same model
gets with its images removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.quickstart import QuickstartResult, QuickstartSettings, run_quickstart
from flamingo_cli.synthetic import write_coco_karpathy

runner = CliRunner()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> QuickstartResult:
    """The shortened quickstart of tests/test_quickstart.py."""
    settings = QuickstartSettings(
        caption_images=256,
        heldout_images=32,
        mmc4_shards=1,
        mmc4_docs_per_shard=16,
        heldout_docs=8,
        epochs=10,
    )
    return run_quickstart(tmp_path_factory.mktemp("fewshot") / "qs", settings=settings)


@pytest.mark.slow
def test_quickstart_captions_held_out_images(quickstart: QuickstartResult) -> None:
    assert quickstart.stages[-1].name == "caption"
    report = quickstart.captioning
    assert report is not None and report.task == "coco" and report.ablation == "none"
    assert len(quickstart.captions) == 8
    for caption in quickstart.captions:
        assert caption.reference.startswith("a ") and Path(caption.image).is_file()
    shot = report.results[0]
    assert shot.ablated_mean is not None
    assert shot.mean >= 3 * shot.ablated_mean, quickstart.to_dict()["captions"]
    exact = sum(c.caption == c.reference for c in quickstart.captions)
    assert exact >= 4, quickstart.to_dict()["captions"]
    assert quickstart.to_dict()["captioning"]["results"][0]["mean"] == shot.mean


@pytest.mark.slow
def test_eval_fewshot_on_the_quickstart_model(quickstart: QuickstartResult, tmp_path: Path) -> None:
    write_coco_karpathy(tmp_path / "coco", train=8, test=32, seed=7, size=32, noise=12)
    weights = quickstart.directory / "runs" / "tiny-cpu" / "export" / "flamingo.pt"
    result = runner.invoke(
        app,
        [
            "eval-fewshot",
            str(quickstart.recipe),
            "--checkpoint",
            str(weights),
            "--set",
            "model.train_backbones=true",
            "--task",
            "coco",
            "--data",
            str(tmp_path / "coco"),
            "--shots",
            "0",
            "--zero-shot-demos",
            "0",
            "--caption-template",
            "laion",
            "--ablate-images",
            "none",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    shot = json.loads(result.stdout)["results"][0]
    assert shot["samples"] == 32
    assert shot["mean"] >= 3 * shot["ablated_mean"], shot
