"""Captioning CIDEr x 100: hand-computed values, pycocoevalcap's `Cider` on the same tokens,
the Java PTB tokenizer against our Python one, and OpenFlamingo's `compute_cider`."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluate.metrics.captioning import cider, java_tokenize, tokenize
from flamingo_cli.evaluate.metrics.ptb import DROPPED_TOKENS, ptb_tokenize, ptb_tokenize_lines

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")

# Four images with no word in common, so every n-gram has document frequency 1 and the same
# idf (log 4): tf-idf cosines are then plain count cosines.
PREDICTIONS = {
    1: "Red circle near white.",  # equals its reference once tokenized
    2: "blue square in",  # its reference minus the last word
    3: "a dog",  # shares nothing
    4: "yellow star above purple",  # equals the first of its two references
}
REFERENCES = {
    1: ["red circle near white"],
    2: ["Blue square in black"],
    3: ["green stripes beside grey"],
    4: ["yellow star above purple", "orange moon over sea"],
}


def _partial_score() -> float:
    """Image 2 by hand: hypothesis "blue square in" against "blue square in black"."""
    unigram = 3 / (math.sqrt(3) * 2)  # 3 shared of 3 and 4 unigrams
    bigram = 2 / (math.sqrt(2) * math.sqrt(3))
    trigram = 1 / math.sqrt(2)
    fourgram = 0.0  # the hypothesis has none
    # Gaussian length penalty, sigma 6; pycocoevalcap measures length in bigrams (2 vs 3).
    penalty = math.exp(-((2 - 3) ** 2) / (2 * 6.0**2))
    return 10 * (unigram + bigram + trigram + fourgram) / 4 * penalty


def test_cider_hand_computed_values_x100() -> None:
    result = cider(PREDICTIONS, REFERENCES, tokenizer="python")
    expected = {1: 1000.0, 2: 100 * _partial_score(), 3: 0.0, 4: 500.0}
    assert result.per_image == pytest.approx(expected)
    assert result.score_x100 == pytest.approx(sum(expected.values()) / 4)
    assert result.tokenizer == "python"
    assert result.score_x100 == pytest.approx(522.2918, abs=1e-4)  # (1000 + 589.17 + 500) / 4


def test_cider_equals_pycocoevalcap_cider_on_the_same_tokens() -> None:
    from pycocoevalcap.cider.cider import Cider  # type: ignore[import-untyped]

    tokenized_res = {key: [ptb_tokenize(text)] for key, text in PREDICTIONS.items()}
    tokenized_gts = {key: [ptb_tokenize(text) for text in refs] for key, refs in REFERENCES.items()}
    assert tokenized_res[1] == ["red circle near white"]
    score, scores = Cider().compute_score(tokenized_gts, tokenized_res)
    ours = cider(PREDICTIONS, REFERENCES, tokenizer="python")
    assert ours.score_x100 == pytest.approx(100 * score)
    assert list(ours.per_image.values()) == pytest.approx([100 * s for s in scores])


def test_cider_restricts_references_to_predicted_images() -> None:
    # Image 4 unscored: idf becomes log 3, still uniform, so the others keep their values.
    subset = {key: PREDICTIONS[key] for key in (1, 2, 3)}
    result = cider(subset, REFERENCES, tokenizer="python")
    assert result.per_image == pytest.approx({1: 1000.0, 2: 100 * _partial_score(), 3: 0.0})


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man's dog, running.", "a man 's dog running"),
        ("Don't stop; it can't be", "do n't stop it ca n't be"),
        ('"Quoted" words (really) [yes]', "quoted words -lrb- really -rrb- -lsb- yes -rsb-"),
        ("a red-blue t-shirt, well--known", "a red-blue t-shirt well known"),
        ("1,000 3.5 $5 5% 10:30 1/2 2nd", "1,000 3.5 $ 5 5 % 10:30 1/2 2nd"),
        ("Mr. Smith lives in the U.S. now etc.", "mr. smith lives in the u.s. now etc."),
        ("wow!!! really? what?!", "wow !!! really what ?!"),
        (
            "en\u2013dash \u2026 \u00bd \u201ccurly\u201d \u2018single\u2019",
            "en dash 1/2 curly single",
        ),
        ("caf\u00e9 na\u00efve \U0001f600 \u732b", "caf\u00e9 na\u00efve \u732b"),
        ("gonna cannot the kids' toys", "gon na can not the kids toys"),
        ("", ""),
    ],
)
def test_python_tokenizer_rules(caption: str, expected: str) -> None:
    assert ptb_tokenize(caption) == expected


def test_dropped_tokens_are_pycocoevalcaps_punctuation() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS  # type: ignore[import-untyped]

    assert frozenset(PUNCTUATIONS) == DROPPED_TOKENS


# Captions chosen to exercise the jar's rules: punctuation, quotes, hyphens, numbers,
# apostrophes, abbreviations, unicode, and a line that depends on the next one.
TRICKY = [
    "A man's dog, running.",
    "\"Quoted\" words and 'single quotes' here",
    "Don't can't won't it's they're I'm we'll you've cannot gonna",
    "red-blue t-shirt well--known e-mail 10-year-old 1990-2000",
    "1,000 3.5 $5 5% 10:30 1/2 a/b 2nd 1990s .5 and 5. end",
    "Mr. Smith lives in the U.S. now etc.",
    "Wait... what?! (really) [yes] {no} wow!!! ok?",
    "Caf\u00e9 na\u00efve \u00fcber \u2014 en\u2013dash \u201ccurly\u201d \u2018single\u2019 \u2026 \u00bd",
    "The colour of the theatre is grey",
    "a & b &amp; c < d > e @ f # g * h = i + j",
    "  leading and trailing spaces  ",
    "it's' dogs' '90s o'clock rock'n'roll 'tis ma'am y'all",
    "don\u2019t can\u2019t it\u2019s",
    "#1 C++ AT&T 3-4 3 - 4 -- --- - a - b",
    "email@x.com http://x.com www.google.com",
    "100km 5pm $5.00 \u00a35 \u20ac5 50\u00b0 2x4",
    "vitamin c. the letter a.",
    "He is Jr. and she is Sr.",
    "jan. feb. inc. co. ltd. vs. ft. lb. oz. No. 5",
    "I said no. Then yes.",
    "a dog's toy \U0001f600 \u732b\u304c",
    "plan b. Then we go",
    "A.",
    "A man riding a wave on top of a surfboard.",
    "plan b. York then plan c. The end, I. Smith",  # only some words end the sentence
    "the '10 season, '10! and the '90s; o'neil it'sa ma'am C# B#",
    "",
    "line\nbreak and line\u2028separator",
]


@needs_java
def test_java_and_python_tokenizers_agree_on_a_tricky_set() -> None:
    assert java_tokenize(TRICKY) == ptb_tokenize_lines(TRICKY)
    assert ptb_tokenize_lines(TRICKY)[22] == "a"  # "A." before "A man": the period goes
    assert ptb_tokenize_lines(TRICKY)[24] == "plan b. york then plan c the end i. smith"


@needs_java
def test_java_and_python_tokenizers_give_the_same_cider() -> None:
    predictions = {i: TRICKY[(i + 3) % len(TRICKY)] for i in range(len(TRICKY))}
    references = {i: [TRICKY[i], TRICKY[(i + 1) % len(TRICKY)]] for i in range(len(TRICKY))}
    java = cider(predictions, references, tokenizer="java")
    python = cider(predictions, references, tokenizer="python")
    assert (java.tokenizer, python.tokenizer) == ("java", "python")
    assert java.score_x100 == pytest.approx(python.score_x100)
    assert java.per_image == pytest.approx(python.per_image)
    assert java.score_x100 > 0


def _site_packages_writable() -> bool:
    from pycocoevalcap.tokenizer import ptbtokenizer  # type: ignore[import-untyped]

    return os.access(Path(ptbtokenizer.__file__).parent, os.W_OK)


@needs_java
def test_java_path_equals_pycocoevalcaps_ptbtokenizer(capsys: pytest.CaptureFixture[str]) -> None:
    if not _site_packages_writable():
        pytest.skip("pycocoevalcap's PTBTokenizer needs to write next to itself")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    lines = [line for line in TRICKY if "\n" not in line and "\u2028" not in line]
    theirs = PTBTokenizer().tokenize({i: [{"caption": line}] for i, line in enumerate(lines)})
    capsys.readouterr()
    assert java_tokenize(lines) == [theirs[i][0] for i in range(len(lines))]


@needs_java
def test_java_path_writes_nothing_beside_the_jar_or_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pycocoevalcap.tokenizer import ptbtokenizer

    package = Path(ptbtokenizer.__file__).parent
    before = sorted(package.iterdir())
    monkeypatch.chdir(tmp_path)
    assert java_tokenize(["A dog."]) == ["a dog"]
    assert sorted(package.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


@needs_java
@pytest.mark.slow  # importing open_flamingo imports torch and open_clip; four JVM starts
def test_cider_equals_openflamingo_compute_cider_x100(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pycocotools")
    coco_metric = pytest.importorskip("open_flamingo.eval.coco_metric")
    if not _site_packages_writable():
        pytest.skip("pycocoevalcap's PTBTokenizer needs to write next to itself")
    import pycocoevalcap.eval as coco_eval  # type: ignore[import-untyped]

    # Only CIDEr: the other scorers run more Java, and SPICE downloads models.
    for name in ("Bleu", "Meteor", "Rouge", "Spice"):
        monkeypatch.setattr(coco_eval, name, _NoScore)
    predictions = {i + 1: TRICKY[(i + 5) % len(TRICKY)] for i in range(12)}
    references = {i + 1: [TRICKY[i], TRICKY[i + 6], TRICKY[i + 12]] for i in range(12)}
    annotations = {
        "info": {},
        "licenses": [],
        "type": "captions",
        "images": [{"id": key} for key in references],
        "annotations": [
            {"image_id": key, "id": 100 * key + n, "caption": caption}
            for key, captions in references.items()
            for n, caption in enumerate(captions)
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    results = [{"image_id": key, "caption": caption} for key, caption in predictions.items()]
    (tmp_path / "results.json").write_text(json.dumps(results))
    metrics = coco_metric.compute_cider(
        str(tmp_path / "results.json"), str(tmp_path / "annotations.json")
    )
    capsys.readouterr()
    ours = cider(predictions, references, tokenizer="java")
    # OpenFlamingo's evaluate_captioning reports metrics["CIDEr"] * 100.0.
    assert ours.score_x100 == pytest.approx(metrics["CIDEr"] * 100.0)
    assert ours.score_x100 > 0


class _NoScore:
    """Stands in for COCOEvalCap's other scorers."""

    def __init__(self, *args: Any) -> None:
        self.n = args[0] if args else None

    def compute_score(self, gts: dict[Any, Any], res: dict[Any, Any]) -> tuple[Any, Any]:
        if self.n is None:
            return 0.0, [0.0] * len(gts)
        return [0.0] * self.n, [[0.0] * len(gts)] * self.n

    def method(self) -> str:
        return "none"


def test_auto_reports_python_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    tokens, used = tokenize(["A Dog."])
    assert (tokens, used) == (["a dog"], "python")
    assert cider(PREDICTIONS, REFERENCES).tokenizer == "python"
    with pytest.raises(FlamingoError, match="needs `java` on PATH") as caught:
        cider(PREDICTIONS, REFERENCES, tokenizer="java")
    assert "default-jre-headless" in (caught.value.fix or "")


@needs_java
def test_auto_reports_java_when_present() -> None:
    assert cider(PREDICTIONS, REFERENCES).tokenizer == "java"


def test_cider_errors_name_the_image_and_a_fix() -> None:
    with pytest.raises(FlamingoError, match=r"have no reference captions, e\.g\. 9") as caught:
        cider({9: "a dog"}, REFERENCES, tokenizer="python")
    assert caught.value.fix
    with pytest.raises(FlamingoError, match="image 5 has an empty list"):
        cider({5: "a dog"}, {5: []}, tokenizer="python")
    with pytest.raises(FlamingoError, match="no captions to score"):
        cider({}, REFERENCES, tokenizer="python")
    with pytest.raises(FlamingoError, match="no words once tokenized"):
        cider({5: "a dog"}, {5: ["..."]}, tokenizer="python")
    with pytest.raises(FlamingoError, match="unknown caption tokenizer 'perl'"):
        cider(PREDICTIONS, REFERENCES, tokenizer="perl")  # type: ignore[arg-type]
