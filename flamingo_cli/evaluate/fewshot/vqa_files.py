"""VQA datasets as they ship: the VQAv2 questions + annotations layout (VQAv2, OK-VQA, and the
converted TextVQA and VizWiz files OpenFlamingo publishes), and VizWiz's and TextVQA's own.

- VQAv2 layout: `*train*questions*.json` (`{"questions": [{"question_id", "image_id",
  "question"}]}`) with the `*annotations*.json` of the same split (`{"annotations":
  [{"question_id", "answers": [{"answer": ...}, ...]}]}`); the test split is the `val` pair
  (else `test`). An integer image id is COCO's `COCO_<subtype>_<id:012d>.jpg` in
  `DIR/<subtype>/` (train2014, val2014); a string id is a file name (VizWiz) or a stem (TextVQA,
  `.jpg` added).
- VizWiz: `annotations/train.json` and `annotations/val.json`, lists of `{"image",
  "question", "answers": [{"answer": ...}]}`, images in `DIR/train/` and `DIR/val/`.
- TextVQA: `TextVQA_0.5.1_train.json` and `TextVQA_0.5.1_val.json`, `{"data": [{"question_id",
  "image_id", "question", "answers": [...]}]}`, images in `DIR/train_images/`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flamingo_cli.evaluate.fewshot.samples import (
    DatasetLayoutError,
    FewshotSample,
    TaskData,
    field_of,
    first_dir_holding,
    layout_error,
    read_json,
)

_QUESTIONS = '{"questions": [{"question_id": ..., "image_id": ..., "question": ...}, ...]}'
_ANSWERS = '{"annotations": [{"question_id": ..., "answers": [{"answer": ...}, ...]}, ...]}'
_VIZWIZ = 'a list of {"image": ..., "question": ..., "answers": [{"answer": ...}, ...]}'
_TEXTVQA = '{"data": [{"question_id": ..., "image_id": ..., "question": ..., "answers": [...]}]}'
_SPLIT = re.compile(r"(train|val|test)(\d{4})?")
VQAV2_LAYOUT = "VQAv2 questions + annotations"


def load_vqa(task: str, data: Path) -> TaskData:
    """The train and test splits of a VQA task, from whichever layout `data` holds."""
    questions = _json_files(data, "questions")
    if questions:
        return _load_vqav2_layout(task, data, questions)
    if task == "vizwiz" and _vizwiz_file(data, "train") is not None:
        return _load_vizwiz(data)
    if task == "textvqa" and _textvqa_file(data, "train") is not None:
        return _load_textvqa(data)
    native = {
        "vizwiz": " or VizWiz's annotations/train.json + annotations/val.json",
        "textvqa": " or TextVQA_0.5.1_train.json + TextVQA_0.5.1_val.json",
    }.get(task, "")
    raise DatasetLayoutError(
        f"--data {data}: no {task} question files found",
        fix=f"give the folder holding *train*questions*.json and *val*questions*.json with "
        f"their *annotations*.json (the VQAv2 layout){native}, and the image folders",
    )


def _json_files(data: Path, word: str) -> list[Path]:
    folders = [data, data / "annotations", data / "questions"]
    return sorted({p for f in folders if f.is_dir() for p in f.glob(f"*{word}*.json")})


def _split_token(path: Path) -> tuple[str, str] | None:
    """(`train`|`val`|`test`, the full token such as `train2014`) named in a file name."""
    found = _SPLIT.search(path.name.replace("test-dev", "testdev"))
    return (found.group(1), found.group(0)) if found else None


def _load_vqav2_layout(task: str, data: Path, questions: list[Path]) -> TaskData:
    answers = _json_files(data, "annotations")
    pairs: dict[str, tuple[Path, Path, str]] = {}
    for q in questions:
        token = _split_token(q)
        match = next((a for a in answers if token and _split_token(a) == token), None)
        if token is None or match is None or token[0] in pairs:
            continue
        pairs[token[0]] = (q, match, token[1])
    test = pairs.get("val") or pairs.get("test")
    if "train" not in pairs or test is None:
        which = "train" if "train" not in pairs else "val (or test)"
        raise DatasetLayoutError(
            f"--data {data}: no {which} questions file with its annotations file "
            f"(found {', '.join(p.name for p in questions + answers)})",
            fix="put the split's *questions*.json beside the *annotations*.json of the same "
            "split (e.g. v2_OpenEnded_mscoco_val2014_questions.json and "
            "v2_mscoco_val2014_annotations.json)",
        )
    train = _vqav2_split(data, *pairs["train"])
    tested = _vqav2_split(data, *test)
    files = (*pairs["train"][:2], *test[:2])
    return TaskData(task, "vqa", VQAV2_LAYOUT, files, train, tested)


def _vqav2_split(data: Path, questions: Path, answers: Path, token: str) -> list[FewshotSample]:
    content = read_json(questions, _QUESTIONS)
    entries = content.get("questions") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise layout_error(questions, 'no "questions" list at the top level', _QUESTIONS)
    subtype = content.get("data_subtype") if isinstance(content.get("data_subtype"), str) else token
    by_question = _answers_by_question(answers)
    rows: list[tuple[str, str, str]] = []
    for n, entry in enumerate(entries):
        where = f"questions[{n}]"
        qid = str(field_of(entry, "question_id", (int, str), questions, where, _QUESTIONS))
        image_id = field_of(entry, "image_id", (int, str), questions, where, _QUESTIONS)
        text = field_of(entry, "question", str, questions, where, _QUESTIONS)
        if qid not in by_question:
            raise layout_error(
                answers, f"no annotation for question_id {qid} of {questions.name}", _ANSWERS
            )
        rows.append((qid, _image_name(image_id, subtype), text))
    if not rows:
        raise layout_error(questions, '"questions" is empty', _QUESTIONS)
    folder = first_dir_holding(_image_dirs(data, subtype, token), rows[0][1], questions.name)
    return [
        FewshotSample(q, folder / name, t, _texts(by_question[q]), by_question[q])
        for q, name, t in rows
    ]


def _texts(entries: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(e["answer"]) if isinstance(e, dict) else str(e) for e in entries)


def _answers_by_question(path: Path) -> dict[str, tuple[Any, ...]]:
    content = read_json(path, _ANSWERS)
    entries = content.get("annotations") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise layout_error(path, 'no "annotations" list at the top level', _ANSWERS)
    found: dict[str, tuple[Any, ...]] = {}
    for n, entry in enumerate(entries):
        where = f"annotations[{n}]"
        qid = str(field_of(entry, "question_id", (int, str), path, where, _ANSWERS))
        answers = _answers(entry, path, where, _ANSWERS)
        for k, a in enumerate(answers):
            field_of(a, "answer", str, path, f"{where}.answers[{k}]", _ANSWERS)
        if qid in found:
            raise layout_error(path, f"{where}: question_id {qid} is annotated twice", _ANSWERS)
        found[qid] = tuple(answers)
    return found


def _answers(entry: Any, path: Path, where: str, expected: str) -> list[Any]:
    """An entry's non-empty `answers` list (a question without answers cannot be scored, nor
    shown as a demonstration)."""
    answers: list[Any] = field_of(entry, "answers", list, path, where, expected)
    if not answers:
        raise layout_error(path, f"{where}: 'answers' is empty", expected)
    return answers


def _image_name(image_id: int | str, subtype: str) -> str:
    if isinstance(image_id, int):
        return f"COCO_{subtype}_{image_id:012d}.jpg"
    return image_id if Path(image_id).suffix else f"{image_id}.jpg"


def _image_dirs(data: Path, subtype: str, token: str) -> list[Path]:
    names = [subtype, token, f"{token}_images", "train_images", "images"]
    unique = list(dict.fromkeys(names))
    return [*(data / n for n in unique), data / "train_val_images" / "train_images", data]


def _vizwiz_file(data: Path, split: str) -> Path | None:
    found = [data / "annotations" / f"{split}.json", data / f"{split}.json"]
    return next((p for p in found if p.is_file()), None)


def _load_vizwiz(data: Path) -> TaskData:
    splits: dict[str, list[FewshotSample]] = {}
    files: list[Path] = []
    for split in ("train", "val"):
        path = _vizwiz_file(data, split)
        if path is None:
            raise DatasetLayoutError(
                f"--data {data}: VizWiz's annotations/train.json is there, "
                f"annotations/{split}.json is not",
                fix="download both VizWiz annotation files (train.json and val.json)",
            )
        files.append(path)
        entries = read_json(path, _VIZWIZ)
        if not isinstance(entries, list) or not entries:
            raise layout_error(path, "not a non-empty list of questions", _VIZWIZ)
        splits[split] = [_vizwiz_sample(data, split, e, path, n) for n, e in enumerate(entries)]
    return TaskData(
        "vizwiz", "vqa", "VizWiz annotations", tuple(files), splits["train"], splits["val"]
    )


def _vizwiz_sample(data: Path, split: str, entry: Any, path: Path, n: int) -> FewshotSample:
    where = f"[{n}]"
    image = field_of(entry, "image", str, path, where, _VIZWIZ)
    question = field_of(entry, "question", str, path, where, _VIZWIZ)
    answers = _answers(entry, path, where, _VIZWIZ)
    for k, a in enumerate(answers):
        field_of(a, "answer", str, path, f"{where}.answers[{k}]", _VIZWIZ)
    entries = tuple(answers)
    return FewshotSample(Path(image).stem, data / split / image, question, _texts(entries), entries)


def _textvqa_file(data: Path, split: str) -> Path | None:
    return next(iter(sorted(data.glob(f"TextVQA_*_{split}.json"))), None)


def _load_textvqa(data: Path) -> TaskData:
    splits: dict[str, list[FewshotSample]] = {}
    files: list[Path] = []
    for split in ("train", "val"):
        path = _textvqa_file(data, split)
        if path is None:
            raise DatasetLayoutError(
                f"--data {data}: TextVQA's train file is there, TextVQA_*_{split}.json is not",
                fix="download both TextVQA files (TextVQA_0.5.1_train.json and _val.json)",
            )
        files.append(path)
        content = read_json(path, _TEXTVQA)
        entries = content.get("data") if isinstance(content, dict) else None
        if not isinstance(entries, list) or not entries:
            raise layout_error(path, 'no non-empty "data" list at the top level', _TEXTVQA)
        rows = [_textvqa_row(e, path, n) for n, e in enumerate(entries)]
        dirs = [data / "train_images", data / "train_val_images" / "train_images", data]
        folder = first_dir_holding(dirs, rows[0][1], path.name)
        splits[split] = [FewshotSample(q, folder / name, t, a, a) for q, name, t, a in rows]
    return TaskData("textvqa", "vqa", "TextVQA json", tuple(files), splits["train"], splits["val"])


def _textvqa_row(entry: Any, path: Path, n: int) -> tuple[str, str, str, tuple[str, ...]]:
    where = f"data[{n}]"
    qid = str(field_of(entry, "question_id", (int, str), path, where, _TEXTVQA))
    image_id = str(field_of(entry, "image_id", str, path, where, _TEXTVQA))
    question = field_of(entry, "question", str, path, where, _TEXTVQA)
    answers = _answers(entry, path, where, _TEXTVQA)
    if not all(isinstance(a, str) for a in answers):
        raise layout_error(path, f"{where}: answers are not strings", _TEXTVQA)
    return qid, f"{image_id}.jpg", question, tuple(answers)
