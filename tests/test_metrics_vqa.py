"""VQA accuracy: each normalisation rule, both leave-one-out variants by hand, and the default
variant against OpenFlamingo 2.0.1's own `vqa_metric.py` on files the test writes; OK-VQA
stemming against its `ok_vqa_utils`, and the fallback without NLTK data."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluate.metrics.okvqa import (
    MANUAL_MATCHES,
    _fallback_stem,
    okvqa_stemmer,
    porter_ing,
    singularize,
    stem_answer,
)
from flamingo_cli.evaluate.metrics.vqa import (
    normalize_answer,
    normalize_digits_articles,
    normalize_punctuation,
    question_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello, world", "hello world"),  # a mark touching a space is deleted
        ("black/white", "black white"),  # a mark between letters becomes a space
        ("t-shirt, red", "t shirt red"),  # decided per mark: "," touches a space, "-" not
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted
        ("red-blue 1,2", "redblue 12"),
        ("yes.", "yes"),  # a period not before a digit goes
        ("3.5", "3.5"),  # a decimal point stays
        ("st. louis", "st louis"),
        ("it's 10:30", "it's 10:30"),  # apostrophes and colons are not punctuation here
        ("(left)", " left "),
        ("." * 40, "." * 8),  # only the first 32 periods go, as the official script's quirk
    ],
)
def test_punctuation_rules(text: str, expected: str) -> None:
    assert normalize_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("zero cats", "0 cats"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten and none are number words
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("another", "another"),
        ("dont", "don't"),
        ("Whats  up", "what's up"),
        ("Im", "im"),  # the table's capitalised keys never match lower-cased text
        ("somebody'd", "somebodyd"),  # the table's own oddity, kept
    ],
)
def test_number_article_contraction_rules(text: str, expected: str) -> None:
    assert normalize_digits_articles(text) == expected


def test_prediction_gets_whitespace_cleanup_and_both_rule_sets() -> None:
    assert normalize_answer("  Two Dogs.\n") == "2 dogs"
    assert normalize_answer("the\tred car!") == "red car"


def _entries(answers: list[str], *, ids: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, answer in enumerate(answers):
        row: dict[str, Any] = {"answer": answer, "answer_confidence": "yes"}
        if ids:
            row["answer_id"] = i + 1
        rows.append(row)
    return rows


THREE_YES = ["yes"] * 3 + ["no"] * 7


def test_three_matches_leave_one_out_by_position() -> None:
    # Left out: a "yes" (3 times) leaves 2 matches -> 2/3; a "no" (7 times) leaves 3 -> 1.
    expected = (3 * (2 / 3) + 7 * 1.0) / 10
    assert question_accuracy("yes", THREE_YES, "official") == pytest.approx(expected)
    assert question_accuracy("yes", _entries(THREE_YES), "openflamingo") == pytest.approx(expected)
    assert expected == pytest.approx(0.9)


def test_openflamingo_drops_every_equal_entry() -> None:
    # Without answer ids the three "yes" entries are equal: leaving one out removes all three
    # (0 matches, 3 times); leaving a "no" out keeps 3 matches (1.0, 7 times).
    assert question_accuracy("yes", THREE_YES, "openflamingo") == pytest.approx(0.7)
    assert question_accuracy("yes", _entries(THREE_YES, ids=False)) == pytest.approx(0.7)
    assert question_accuracy("yes", _entries(THREE_YES, ids=False), "official") == pytest.approx(
        0.9
    )


def test_unanimous_vizwiz_answers_score_zero_under_openflamingo() -> None:
    answers = _entries(["unanswerable"] * 10, ids=False)
    assert question_accuracy("unanswerable", answers, "openflamingo") == 0.0
    assert question_accuracy("unanswerable", answers, "official") == 1.0


def test_entries_compare_whole_after_normalisation() -> None:
    # "Yes" and "yes" with the same confidence become equal entries once normalised; the one
    # with another confidence stays apart. Left out: a yes/yes entry removes 2 (1/3, twice),
    # the yes/maybe entry removes 1 (2/3, once), a "no" removes nothing (1.0, seven times).
    answers: list[dict[str, Any]] = [
        {"answer": "Yes", "answer_confidence": "yes"},
        {"answer": "yes", "answer_confidence": "yes"},
        {"answer": "yes", "answer_confidence": "maybe"},
    ] + [{"answer": "no", "answer_confidence": "yes"}] * 7
    expected = (2 * (1 / 3) + 2 / 3 + 7) / 10
    assert question_accuracy("yes", answers) == pytest.approx(expected)


def test_official_leaves_unanimous_human_answers_unnormalised() -> None:
    answers = _entries(["Yes"] * 10)
    assert question_accuracy("yes", answers, "official") == 0.0  # "Yes" != "yes"
    assert question_accuracy("yes", answers, "openflamingo") == 1.0


def test_official_normalises_human_answers_for_punctuation_only() -> None:
    # Humans: 4 x "two", 2 x "2", 4 x "three"; the prediction "two" normalises to "2".
    answers = _entries(["two"] * 4 + ["2"] * 2 + ["three"] * 4)
    # official: only the two "2" match; out goes a "2" -> 1/3 (twice), else 2/3 (8 times).
    assert question_accuracy("two", answers, "official") == pytest.approx((2 / 3 + 16 / 3) / 10)
    # openflamingo: "two" -> "2" on the human side too, 6 matches, always >= 3.
    assert question_accuracy("two", answers, "openflamingo") == 1.0
    # When they disagree, official still removes human punctuation: "yes." matches "yes".
    assert question_accuracy("yes", _entries(["yes."] * 3 + ["no"] * 7), "official") == 0.9


def test_vqa_accuracy_means_over_predicted_questions_times_100() -> None:
    annotations = {
        1: _entries(THREE_YES),
        2: _entries(["dog"] * 10),
        3: _entries(["red"] * 10),  # not predicted: not scored
    }
    result = vqa_accuracy({1: "yes", 2: "a dog"}, annotations)
    assert result.per_question == {1: pytest.approx(0.9), 2: 1.0}
    assert result.accuracy_x100 == pytest.approx(95.0)
    assert result.count == 2
    assert result.variant == "openflamingo"


def test_vqa_accuracy_errors_name_the_question() -> None:
    with pytest.raises(FlamingoError, match=r"no annotation, e\.g\. 7") as caught:
        vqa_accuracy({7: "yes"}, {1: ["yes"]})
    assert caught.value.fix
    with pytest.raises(FlamingoError, match="question 1 has no human answers"):
        vqa_accuracy({1: "yes"}, {1: []})
    with pytest.raises(FlamingoError, match="no text answer"):
        vqa_accuracy({1: "yes"}, {1: [{"answer_id": 1}]})
    with pytest.raises(FlamingoError, match="no predictions"):
        vqa_accuracy({}, {1: ["yes"]})
    with pytest.raises(FlamingoError, match="unknown VQA metric variant 'vizwiz'"):
        vqa_accuracy({1: "yes"}, {1: ["yes"]}, "vizwiz")  # type: ignore[arg-type]


# Answers in the forms annotators and models write them, so every rule gets exercised.
VOCABULARY = [
    "yes", "Yes", "yes.", "no", "No!", "two", "2", "Two", "the dog", "dog", "a dog", "dogs",
    "black/white", "black white", "black and white", "1,000", "1000", "dont", "don't",
    "st. louis", "st louis", "3.5", "red-blue", "(red)", "unanswerable", "none", "0",
    "it's", "its", "  tennis\n", "tennis", "surf board", "surfboard", "left", "right",
]  # fmt: skip


def _write_vqa_files(tmp_path: Path) -> tuple[dict[int, str], dict[int, list[dict[str, Any]]]]:
    rng = random.Random(18)
    questions: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for qid in range(1, 301):
        pool = rng.sample(VOCABULARY, rng.randint(1, 4))
        answers = [rng.choice(pool) for _ in range(10)]
        with_ids = qid % 2 == 0  # VQAv2-like entries with ids; VizWiz-like without
        entries = _entries(answers, ids=with_ids)
        if not with_ids:
            for entry in entries:
                entry["answer_confidence"] = rng.choice(["yes", "maybe"])
        prediction = rng.choice(pool) if rng.random() < 0.7 else rng.choice(VOCABULARY)
        questions.append({"question_id": qid, "image_id": qid, "question": "what?"})
        annotations.append(
            {
                "question_id": qid,
                "image_id": qid,
                "question_type": "what",
                "answer_type": "other",
                "answers": entries,
            }
        )
        results.append({"question_id": qid, "answer": prediction})
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco"}
    header |= {"data_subtype": "val2014", "license": {}}
    (tmp_path / "questions.json").write_text(json.dumps(header | {"questions": questions}))
    (tmp_path / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    (tmp_path / "results.json").write_text(json.dumps(results))
    predictions = {row["question_id"]: row["answer"] for row in results}
    return predictions, {row["question_id"]: row["answers"] for row in annotations}


@pytest.mark.slow  # importing open_flamingo imports torch and open_clip
def test_default_variant_equals_openflamingo_vqa_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vqa_metric = pytest.importorskip("open_flamingo.eval.vqa_metric")
    predictions, annotations = _write_vqa_files(tmp_path)
    files = [
        str(tmp_path / name) for name in ("results.json", "questions.json", "annotations.json")
    ]
    theirs = vqa_metric.compute_vqa_accuracy(*files)
    # Per question too, through its VQA/VQAEval classes (evalQA: 100 x accuracy, 2 decimals).
    vqa = vqa_metric.VQA(files[2], files[1])
    evaluator = vqa_metric.VQAEval(vqa, vqa.loadRes(files[0], files[1]), n=2)
    evaluator.evaluate()
    capsys.readouterr()  # its progress prints
    ours = vqa_accuracy(predictions, annotations)
    assert round(ours.accuracy_x100, 2) == theirs
    assert {q: round(100 * acc, 2) for q, acc in ours.per_question.items()} == evaluator.evalQA
    # The fixed set is not degenerate, and the variants disagree on it.
    assert 20 < theirs < 80
    assert vqa_accuracy(predictions, annotations, "official").accuracy_x100 != ours.accuracy_x100


# OK-VQA stemming ---------------------------------------------------------------------------


def _openflamingo_ok_vqa_utils() -> Any:
    """OpenFlamingo's ok_vqa_utils loaded from its file (its package __init__ imports torch)."""
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_flamingo is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "eval" / "ok_vqa_utils.py"
    pytest.importorskip("nltk")
    pytest.importorskip("inflection")
    module_spec = importlib.util.spec_from_file_location("_of_ok_vqa_utils", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


OKVQA_ANSWERS = [
    "riding bikes", "skiing", "surfing", "two horses", "the dogs", "tennis rackets",
    "christmas", "leaves", "jeans", "running shoes", "umbrellas", "baking cookies",
    "police", "yes", "fire hydrant", "sitting", "hell's kitchen", "glasses",
]  # fmt: skip


@pytest.fixture
def fresh_stemmer() -> Iterator[None]:
    okvqa_stemmer.cache_clear()
    yield
    okvqa_stemmer.cache_clear()


def test_manual_table_is_openflamingos() -> None:
    assert _openflamingo_ok_vqa_utils()._MANUAL_MATCHES == MANUAL_MATCHES


def test_nltk_backend_follows_openflamingos_procedure(
    monkeypatch: pytest.MonkeyPatch, fresh_stemmer: None
) -> None:
    # NLTK's data is not installed here: stand-ins for its tokenizer, tagger and WordNet show
    # that our procedure calls them, and the manual table and inflection, as OpenFlamingo does.
    import nltk  # type: ignore[import-untyped]

    utils = _openflamingo_ok_vqa_utils()
    monkeypatch.setattr(nltk.tokenize, "word_tokenize", lambda text: text.split())
    monkeypatch.setattr(
        nltk, "pos_tag", lambda words: [(w, "NNS" if w.endswith("s") else "NN") for w in words]
    )
    monkeypatch.setattr(nltk.stem.WordNetLemmatizer, "lemmatize", lambda self, w, pos: w[:-3])
    assert okvqa_stemmer().backend == "nltk"
    for answer in OKVQA_ANSWERS:
        assert stem_answer(answer) == utils.stemmer.stem(answer), answer


def test_real_nltk_backend_equals_openflamingo(fresh_stemmer: None) -> None:
    if okvqa_stemmer().backend != "nltk":
        pytest.skip("NLTK's data (punkt_tab, averaged_perceptron_tagger_eng, wordnet) absent")
    utils = _openflamingo_ok_vqa_utils()
    for answer in OKVQA_ANSWERS:
        assert stem_answer(answer) == utils.stemmer.stem(answer), answer


def test_fallback_without_nltk_data(fresh_stemmer: None) -> None:
    if okvqa_stemmer().backend != "fallback":
        pytest.skip("NLTK's data is installed: the NLTK backend runs")
    expected = [
        "ride bike", "ski", "surf", "two horse", "the dog", "tennis racket", "christmas",
        "leaf", "jean", "run shoe", "umbrella", "bake cooky", "police", "yes", "fire hydrant",
        "sit", "hell 's kitchen", "glass",
    ]  # fmt: skip
    assert [stem_answer(answer) for answer in OKVQA_ANSWERS] == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("running", "run"),  # doubled consonant undoubled
        ("hiking", "hike"),  # short consonant-vowel-consonant stem gets an e
        ("eating", "eat"),  # "at" but one short syllable: no e
        ("rotating", "rotate"),  # "at" in a longer stem: e
        ("dancing", "dance"),  # consonant + c
        ("juggling", "juggle"),
        ("skiing", "ski"),
        ("surfing", "surf"),
        ("falling", "fall"),  # "ll" stays
        ("sing", "sing"),  # no vowel before "ing"
        ("something", "something"),  # WordNet has no verb for it
    ],
)
def test_fallback_ing_rules(word: str, expected: str) -> None:
    assert porter_ing(word) == expected


def test_fallback_without_inflection_or_nltk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "inflection", None)
    words = ["cherries", "wolves", "boxes", "churches", "dishes", "dogs"]
    assert [singularize(w) for w in words] == ["cherry", "wolf", "box", "church", "dish", "dog"]
    monkeypatch.setitem(sys.modules, "nltk.tokenize", None)
    assert _fallback_stem("surfing dogs, yes") == "surf dog , yes"


def test_scoring_needs_predictions_each_with_an_annotation() -> None:
    with pytest.raises(FlamingoError, match="no predictions to score") as caught:
        vqa_accuracy({}, {1: ["red"] * 10})
    assert "--num-samples" in (caught.value.fix or "")
    with pytest.raises(FlamingoError) as caught:
        vqa_accuracy({1: "red", 7: "blue", 8: "blue"}, {1: ["red"] * 10})
    assert caught.value.message == "2 predicted question(s) have no annotation, e.g. 7, 8"
    assert caught.value.fix == "score predictions against the annotations file of the same split"
