"""eval-fewshot end to end on the tiny model: the report, the predictions file, the images
ablation, and the same predictions on two ranks as on one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.model.factory import build_model
from flamingo_cli.recipe.load import load_recipe
from flamingo_cli.synthetic import write_coco_karpathy, write_vqav2

runner = CliRunner()
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.toml"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's model as built (random weights), exported as flamingo.pt."""
    model, *_ = build_model(load_recipe(RECIPE).recipe.model, seed=0)
    path = tmp_path_factory.mktemp("weights") / "flamingo.pt"
    torch.save(model.state_dict(), path)
    return path


def fewshot_args(weights: Path, task: str, data: Path) -> list[str]:
    """`eval-fewshot` of the tiny recipe with `weights` on `task` read from `data`."""
    command = ["eval-fewshot", str(RECIPE), "--checkpoint", str(weights)]
    return [*command, "--task", task, "--data", str(data)]


def _run(args: list[str]) -> dict[str, object]:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_captioning_report_and_predictions(weights: Path, tmp_path: Path) -> None:
    write_coco_karpathy(tmp_path / "coco", train=6, test=3, size=16)
    out = tmp_path / "out"
    report = _run(
        [
            *fewshot_args(weights, "coco", tmp_path / "coco"),
            "--shots",
            "0",
            "2",
            "--trials",
            "2",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "3",
            "--ablate-images",
            "none",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert (report["task"], report["layout"], report["weights"]) == (
        "coco",
        "Karpathy dataset_coco.json",
        "flamingo export",
    )
    assert report["protocol"]["seed"] == 42 and report["protocol"]["num_beams"] == 2
    results = report["results"]
    assert [r["shots"] for r in results] == [0, 2]
    for r in results:
        assert r["samples"] == 3 and len(r["scores"]) == 2 and len(r["ablated_scores"]) == 2
    assert "CIDEr x 100, PTB tokenizer" in str(report["scorer"])
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 3 * 2  # shots x trials x samples x (with, none)
    zero = next(x for x in lines if x["shots"] == 0 and x["images"] == "with")
    assert zero["prompt"].count("<image>") == 1 and len(zero["demonstrations"]) == 2
    assert {x["seed"] for x in lines} == {42, 43}
    assert json.loads((out / "results.json").read_text())["results"] == results


def test_vqa_runs_with_each_metric_variant(weights: Path, tmp_path: Path) -> None:
    write_vqav2(tmp_path / "vqa", train=3, test=2, size=16)
    for variant in ("openflamingo", "official"):
        report = _run(
            [
                *fewshot_args(weights, "vqav2", tmp_path / "vqa"),
                "--shots",
                "1",
                "--num-beams",
                "1",
                "--vqa-metric",
                variant,
                "--out",
                str(tmp_path / variant),
                "--json",
            ]
        )
        assert report["layout"] == "VQAv2 questions + annotations"
        assert f"{variant} rules" in str(report["scorer"])
        assert report["results"][0]["samples"] == 4


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_predict_what_one_does(weights: Path, tmp_path: Path) -> None:
    write_coco_karpathy(tmp_path / "coco", train=6, test=5, size=16)
    common = [
        *fewshot_args(weights, "coco", tmp_path / "coco"),
        "--shots",
        "2",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--json",
    ]
    one = _run([*common, "--out", str(tmp_path / "one")])
    two = _run([*common, "--out", str(tmp_path / "two"), "--nproc-per-node", "2"])
    assert two["world_size"] == 2
    assert two["results"] == one["results"]

    def predictions(folder: str) -> list[tuple[str, str]]:
        text = (tmp_path / folder / "predictions.jsonl").read_text().splitlines()
        return sorted((x["id"], x["prompt"]) for x in map(json.loads, text))

    assert predictions("two") == predictions("one")


def test_shuffled_images_come_from_other_test_samples(weights: Path, tmp_path: Path) -> None:
    write_coco_karpathy(tmp_path / "coco", train=4, test=3, size=16)
    out = tmp_path / "out"
    report = _run(
        [
            *fewshot_args(weights, "coco", tmp_path / "coco"),
            "--shots",
            "1",
            "--num-beams",
            "1",
            "--max-new-tokens",
            "2",
            "--ablate-images",
            "shuffle",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert report["ablation"] == "shuffle"
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    own = {x["id"]: x["image"] for x in lines if x["images"] == "with"}
    shuffled = {x["id"]: x["image"] for x in lines if x["images"] == "shuffle"}
    assert set(shuffled) == set(own)
    assert sorted(shuffled.values()) == sorted(own.values())
    assert all(shuffled[k] != own[k] for k in own)


def test_rices_puts_the_most_similar_train_image_last(weights: Path, tmp_path: Path) -> None:
    import shutil

    from flamingo_cli.evaluate.fewshot.tasks import load_task

    root = tmp_path / "coco"
    write_coco_karpathy(root, train=6, test=3, size=16)
    data = load_task("coco", root)
    shutil.copyfile(data.train[4].image, data.test[0].image)  # test 0 shows train 4's pixels
    out = tmp_path / "out"
    args = [
        *fewshot_args(weights, "coco", root),
        "--shots",
        "2",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "2",
        "--rices",
        "--rices-encoder",
        "model",
        "--out",
        str(out),
        "--json",
    ]
    report = _run(args)
    assert report["protocol"]["demonstrations"] == "RICES (model)"
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    first = next(x for x in lines if x["id"] == data.test[0].id)
    assert first["demonstrations"][-1] == data.train[4].id
    cache = out / "rices-model.pt"
    assert cache.is_file()
    written = cache.stat().st_mtime_ns
    again = _run(args)  # the cached train features are read, not written again
    assert cache.stat().st_mtime_ns == written
    assert again["results"] == report["results"]


def test_the_table_names_layout_scorer_and_predictions(weights: Path, tmp_path: Path) -> None:
    write_coco_karpathy(tmp_path / "coco", train=4, test=2, size=16)
    result = runner.invoke(
        app,
        [
            *fewshot_args(weights, "coco", tmp_path / "coco"),
            "--shots",
            "0",
            "1",
            "--trials",
            "2",
            "--num-beams",
            "1",
            "--max-new-tokens",
            "2",
            "--ablate-images",
            "none",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    for text in (
        "CIDEr (mean of 2)",
        "std",
        "images removed",
        "gap",
        "read Karpathy dataset_coco.json",
        "PTB tokenizer",
        "0-shot trial 2",
        "1-shot trial 1",
        "predictions.jsonl",
    ):
        assert text in out, text
