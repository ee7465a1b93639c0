"""eval-fewshot's datasets and protocol: the shipped layouts read, every bad input named with
its file and what was expected, and demonstration draws that do not depend on the ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.cli.eval_fewshot import _shot_counts
from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.evaluate.fewshot.protocol import (
    FewshotProtocol,
    demonstrations,
    evaluated_indices,
    postprocess,
    prompt_text,
    query_set,
    shuffled_images,
)
from flamingo_cli.evaluate.fewshot.runner import FewshotRequest, prepare, trial_rows
from flamingo_cli.evaluate.fewshot.samples import DatasetLayoutError, FewshotSample
from flamingo_cli.evaluate.fewshot.tasks import load_task
from flamingo_cli.synthetic import VQA_QUESTIONS, write_coco_karpathy, write_vqav2

runner = CliRunner()
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.toml"


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco_karpathy(root, train=12, test=6, seed=1, size=16)
    return root


@pytest.fixture(scope="module")
def vqav2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vqav2")
    write_vqav2(root, train=5, test=3, seed=1, size=16)
    return root


def test_coco_karpathy_layout(coco: Path) -> None:
    data = load_task("coco", coco)
    assert (len(data.train), len(data.test), data.kind) == (12, 6, "caption")
    assert data.layout == "Karpathy dataset_coco.json"
    first = data.test[0]
    assert first.id == "100012"
    assert first.image == coco / "val2014" / "COCO_val2014_000000100012.jpg"
    assert first.image.is_file()
    color, shape = first.text.split()[1:]
    assert first.answers == (first.text, f"a {color} {shape} on a grey background")


def test_coco_annotations_file_gives_the_references(coco: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions_val2014.json"
    ids = range(100012, 100018)
    captions.write_text(
        json.dumps({"annotations": [{"image_id": i, "caption": f"ref {i}"} for i in ids]})
    )
    data = load_task("coco", coco, captions)
    assert data.references_of(data.test[0]) == ("ref 100012",)
    assert data.files == (coco / "dataset_coco.json", captions)
    captions.write_text(json.dumps({"annotations": [{"image_id": 100012, "caption": "x"}]}))
    with pytest.raises(DatasetLayoutError, match=r"no caption for test image 100013 .*5 test"):
        load_task("coco", coco, captions)


def test_vqav2_layout(vqav2: Path) -> None:
    data = load_task("vqav2", vqav2)
    assert (len(data.train), len(data.test), data.kind) == (10, 6, "vqa")
    assert data.layout == "VQAv2 questions + annotations"
    assert [f.name for f in data.files] == [
        "v2_OpenEnded_mscoco_train2014_questions.json",
        "v2_mscoco_train2014_annotations.json",
        "v2_OpenEnded_mscoco_val2014_questions.json",
        "v2_mscoco_val2014_annotations.json",
    ]
    sample = data.test[0]
    assert sample.text == VQA_QUESTIONS[0] and len(sample.answers) == 10
    assert sample.entries[0] == {
        "answer": sample.answers[0],
        "answer_confidence": "yes",
        "answer_id": 1,
    }
    assert sample.image == vqav2 / "val2014" / "COCO_val2014_000000200005.jpg"


def test_vizwiz_and_textvqa_native_layouts(tmp_path: Path) -> None:
    viz = tmp_path / "vizwiz"
    for split in ("train", "val"):
        (viz / split).mkdir(parents=True)
        (viz / split / f"VizWiz_{split}_00000000.jpg").write_bytes(b"x")
        entry = {
            "image": f"VizWiz_{split}_00000000.jpg",
            "question": "What is it?",
            "answers": [{"answer": "a can", "answer_confidence": "yes"}] * 10,
        }
        (viz / "annotations").mkdir(exist_ok=True)
        (viz / "annotations" / f"{split}.json").write_text(json.dumps([entry]))
    data = load_task("vizwiz", viz)
    assert data.layout == "VizWiz annotations"
    assert data.test[0].image == viz / "val" / "VizWiz_val_00000000.jpg"
    assert data.test[0].answers == ("a can",) * 10
    text = tmp_path / "textvqa"
    (text / "train_images").mkdir(parents=True)
    for split, image in (("train", "0a1"), ("val", "0b2")):
        (text / "train_images" / f"{image}.jpg").write_bytes(b"x")
        row = {
            "question_id": 7 if split == "val" else 3,
            "image_id": image,
            "question": "What brand?",
            "answers": ["nokia"] * 10,
        }
        (text / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps({"data": [row]}))
    data = load_task("textvqa", text)
    assert data.layout == "TextVQA json"
    assert (data.test[0].id, data.test[0].image) == ("7", text / "train_images" / "0b2.jpg")


def test_bad_layouts_name_the_file_and_what_was_expected(tmp_path: Path, vqav2: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"no dataset_coco\.json") as err:
        load_task("coco", tmp_path)
    assert err.value.fix and "Karpathy" in err.value.fix
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetLayoutError, match=r'dataset_coco\.json: no "images" list') as err:
        load_task("coco", tmp_path)
    assert err.value.fix and "Karpathy split layout" in err.value.fix
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"split": "test"}]}))
    with pytest.raises(DatasetLayoutError, match=r"images\[0\] has no 'filename'"):
        load_task("coco", tmp_path)
    (tmp_path / "dataset_coco.json").write_text("{not json")
    with pytest.raises(DatasetLayoutError, match=r"dataset_coco.json:1: not valid JSON"):
        load_task("coco", tmp_path)
    with pytest.raises(DatasetLayoutError, match="no okvqa question files") as err:
        load_task("okvqa", tmp_path)
    assert err.value.fix and "*train*questions*.json" in err.value.fix
    broken = tmp_path / "vqa"
    broken.mkdir()
    (broken / "v2_OpenEnded_mscoco_train2014_questions.json").write_text("{}")
    with pytest.raises(DatasetLayoutError, match="no train questions file with its annotations"):
        load_task("vqav2", broken)
    with pytest.raises(UsageError, match="is not a task"):
        load_task("gqa", vqav2)


def test_a_missing_image_is_named(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    write_coco_karpathy(root, train=4, test=2, size=16)
    missing = root / "val2014" / "COCO_val2014_000000100005.jpg"
    missing.unlink()
    with pytest.raises(DatasetLayoutError, match=f"image {missing} of test sample 100005"):
        prepare(FewshotRequest("coco", root, FewshotProtocol(shots=(0,))))
    vqa = tmp_path / "vqa"
    write_vqav2(vqa, train=2, test=1, size=16)
    (vqa / "val2014" / "COCO_val2014_000000200002.jpg").unlink()
    with pytest.raises(
        DatasetLayoutError, match=r"image COCO_val2014_000000200002\.jpg .*not found"
    ):
        load_task("vqav2", vqa)


def test_fewer_train_samples_than_shots(coco: Path) -> None:
    with pytest.raises(
        FlamingoError,
        match=r"dataset_coco.json: the train split has 12 samples, "
        r"fewer than the 16 demonstrations 16-shot prompts need",
    ) as err:
        prepare(FewshotRequest("coco", coco, FewshotProtocol(shots=(0, 16))))
    assert err.value.fix and "--shots" in err.value.fix
    with pytest.raises(FlamingoError, match=r"12 samples \(query set 3\), fewer than the 4"):
        prepare(FewshotRequest("coco", coco, FewshotProtocol(shots=(4,), query_set_size=3)))


def test_cli_reports_bad_input_without_traceback(coco: Path, tmp_path: Path) -> None:
    args = ["eval-fewshot", str(RECIPE), "--checkpoint", "latest", "--task", "coco"]
    result = runner.invoke(app, [*args, "--data", str(coco), "--shots", "0", "4", "16"])
    assert result.exit_code == 1, result.output
    assert "fewer than the 16 demonstrations" in result.output
    assert "fix" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*args, "--data", str(tmp_path), "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout[result.stdout.index("{") :])
    assert "no dataset_coco.json" in error["error"] and "Karpathy" in error["fix"]


def test_shot_counts_in_every_spelling() -> None:
    assert _shot_counts(None) == (0, 4, 8, 16, 32)
    assert _shot_counts(["0", "4"]) == (0, 4)
    assert _shot_counts(["0,4,8"]) == (0, 4, 8)
    assert _shot_counts(["0 8", "8"]) == (0, 8)
    with pytest.raises(UsageError, match="whole numbers"):
        _shot_counts(["-1"])


def _samples(n: int, prefix: str) -> list[FewshotSample]:
    return [
        FewshotSample(f"{prefix}{i}", Path(f"{prefix}{i}.jpg"), f"t{i}", (f"a{i}",))
        for i in range(n)
    ]


def test_demonstrations_do_not_depend_on_ranks_or_other_samples(coco: Path) -> None:
    data = load_task("coco", coco)
    protocol = FewshotProtocol(shots=(4,), trials=2)
    rows = trial_rows(data, protocol, 4, 0)
    assert [r.sample.id for r in rows] == [s.id for s in data.test]
    for world in (1, 2, 3):
        shares = [rows[rank::world] for rank in range(world)]
        again = sorted((r for share in shares for r in share), key=lambda r: r.position)
        assert again == rows
    pool = query_set(len(data.train), 2048, 42)
    assert sorted(pool) == list(range(12))  # min(2048, train size), no repeats
    first = rows[0]
    alone = demonstrations(pool, 4, 42, first.sample.id)
    assert [d.id for d in first.demos] == [data.train[j].id for j in alone]
    assert len(set(alone)) == 4
    other_trial = trial_rows(data, protocol, 4, 1)  # seed 43
    assert [r.demos for r in other_trial] != [r.demos for r in rows]
    subset = trial_rows(data, FewshotProtocol(num_samples=3), 4, 0)
    assert [r.sample.id for r in subset] == [data.test[i].id for i in evaluated_indices(6, 3, 42)]
    for row in subset:  # a sample's demonstrations are the same in the subset
        assert row.demos == next(r.demos for r in rows if r.sample.id == row.sample.id)


def test_seeded_draws_are_fixed() -> None:
    assert (
        evaluated_indices(10, 4, 42) == evaluated_indices(10, 4, 42) != evaluated_indices(10, 4, 43)
    )
    assert evaluated_indices(5, None, 42) == [0, 1, 2, 3, 4]
    order = shuffled_images(6, 42)
    assert sorted(order) == list(range(6)) and all(i != j for i, j in enumerate(order))
    assert shuffled_images(1, 42) == [0]


def test_prompts_and_the_zero_shot_trick() -> None:
    demos, query = _samples(2, "d"), FewshotSample("q", Path("q.jpg"), "What?", ("x",))
    assert prompt_text("caption", demos, query, 2) == (
        "<image>Output:t0<|endofchunk|>\n<image>Output:t1<|endofchunk|>\n<image>Output:"
    )
    assert prompt_text("caption", demos, query, 0) == (
        "Output:t0<|endofchunk|>\nOutput:t1<|endofchunk|>\n<image>Output:"
    )
    assert prompt_text("vqa", demos[:1], query, 1) == (
        "<image>Question:t0 Short answer:a0<|endofchunk|>\n<image>Question:What? Short answer:"
    )
    assert prompt_text("caption", demos, query, 2, "laion") == (
        "<image>t0<|endofchunk|><image>t1<|endofchunk|><image>"
    )
    assert FewshotProtocol().demos_for(0) == 2 and FewshotProtocol().demos_for(8) == 8


def test_postprocessing_as_openflamingo() -> None:
    assert postprocess("caption", 'a "red" circle Output: more') == "a red circle "
    assert postprocess("vqa", "red Question: what") == "red "
    assert postprocess("vqa", "two, three Answer:") == "two"
    assert postprocess("vqa", "yes Short answer:no") == "yes "


def test_okvqa_predictions_are_stemmed_before_scoring() -> None:
    from flamingo_cli.evaluate.fewshot.scoring import score_answers
    from flamingo_cli.evaluate.metrics.okvqa import okvqa_stemmer

    answers = {"1": [{"answer": "circle", "answer_id": k} for k in range(1, 11)]}
    stemmed = score_answers("okvqa", {"1": "circles"}, answers, "openflamingo")
    assert (stemmed.value, stemmed.scored) == (100.0, {"1": "circle"})
    assert f"OK-VQA answers stemmed ({okvqa_stemmer().backend})" in stemmed.scorer
    plain = score_answers("vqav2", {"1": "circles"}, answers, "openflamingo")
    assert (plain.value, plain.scored) == (0.0, {"1": "circles"})
    assert "stemmed" not in plain.scorer


def test_openflamingo_converted_vizwiz_and_textvqa(tmp_path: Path) -> None:
    """OpenFlamingo's converted files: `{split}_questions_vqa_format.json` and
    `{split}_annotations_vqa_format.json` with string image ids."""
    for task, image_of, folder in (
        ("vizwiz", lambda s: f"VizWiz_{s}_00000001.jpg", lambda s: s),
        ("textvqa", lambda s: f"{s}0f3", lambda s: "train_images"),
    ):
        root = tmp_path / task
        for qid, split in enumerate(("train", "val")):
            image = image_of(split)
            name = image if image.endswith(".jpg") else f"{image}.jpg"
            (root / folder(split)).mkdir(parents=True, exist_ok=True)
            (root / folder(split) / name).write_bytes(b"x")
            questions = {"questions": [{"question_id": qid, "image_id": image, "question": "Q?"}]}
            answers = {"annotations": [{"question_id": qid, "answers": [{"answer": "a"}] * 10}]}
            (root / f"{split}_questions_vqa_format.json").write_text(json.dumps(questions))
            (root / f"{split}_annotations_vqa_format.json").write_text(json.dumps(answers))
        data = load_task(task, root)
        assert data.layout == "VQAv2 questions + annotations"
        expected = root / folder("val") / (image_of("val") + ("" if task == "vizwiz" else ".jpg"))
        assert (data.test[0].id, data.test[0].image) == ("1", expected)
        assert data.train[0].image.is_file()
