"""VQA accuracy: answer normalisation and the leave-one-out average (docs/formats.md §13).

A question scores min(matches / 3, 1) averaged over the leave-one-out subsets of its human
answers, where matches counts the remaining human answers equal to the prediction after both
sides are normalised. Two variants differ in which human answers are normalised and in what
"leaving one out" removes:

- `openflamingo` (default): what OpenFlamingo 2.0.1's `open_flamingo/eval/vqa_metric.py`
  computes, so numbers compare with its papers. Every human answer gets both rule sets
  (punctuation; number words, articles, contractions). Leaving answer i out removes every
  entry equal to entry i (the whole entry: answer text and any other fields, so VQAv2's
  distinct `answer_id`s make it positional, while VizWiz's entries without one drop all
  identical copies at once, which lowers VizWiz scores).
- `official`: the official VQA evaluation's rules. Human answers get the punctuation rules
  only, and only when the annotators disagree (the set of raw answers has more than one
  element); each of the answers is left out once, by position.

The prediction gets both rule sets in both variants.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluate.metrics.coverage import check_covered

Q = TypeVar("Q", bound=Hashable)  # a question id: VQAv2's ints, VizWiz's file names
VqaVariant = Literal["openflamingo", "official"]
VQA_VARIANTS: tuple[VqaVariant, ...] = ("openflamingo", "official")

# One human answer as its file holds it: a VQA-layout entry (`{"answer": ..., "answer_id": ...,
# "answer_confidence": ...}`) or a bare string. Pass the entries as read: the `openflamingo`
# variant compares whole entries when it leaves one out.
AnswerEntry = str | Mapping[str, Any]

# Marks the punctuation rule deletes or turns into a space (the apostrophe, colon, period and
# others are not among them; periods have their own rule below).
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
# A digit, a comma, a digit ("1,000"): then every listed mark is deleted, never spaced.
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# A period not followed by a digit goes ("3.5" keeps its point). The official script passes
# re.UNICODE (32) where `re.sub` takes its count, so only the first 32 such periods go; kept.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS: dict[str, str] = {word: str(value) for value, word in enumerate(_NUMBERS)} | {
    "none": "0"
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Words written without their apostrophe, mapped to the spelling annotators used, as the
# official evaluation's table has them (its quirks included: capitalised keys that never match
# lower-cased text, and "somebody'd" mapped to "somebodyd").
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't
itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're
theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've
whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've
yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've
y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())


@dataclass(frozen=True)
class VqaResult(Generic[Q]):
    """Accuracy over the predicted questions.

    `accuracy_x100` is the mean of the per-question accuracies times 100, not rounded
    (OpenFlamingo reports it rounded to 2 decimals). `per_question` holds each question's
    accuracy in [0, 1].
    """

    accuracy_x100: float
    per_question: dict[Q, float]
    variant: VqaVariant

    @property
    def count(self) -> int:
        return len(self.per_question)


def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces; leading and trailing blanks go."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)  # answers repeat ("yes", "2"): normalise each once
def normalize_punctuation(text: str) -> str:
    """The punctuation rules: each listed mark is deleted where it touches a space somewhere
    in the text (or when the text has a digit-comma-digit), else it becomes a space; then
    periods not followed by a digit are deleted."""
    glue_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        glued = glue_all or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if glued else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def normalize_digits_articles(text: str) -> str:
    """Lower-case, split on blanks, number words to digits ("two" -> "2", "none" -> "0"),
    articles dropped, contractions restored ("dont" -> "don't"), joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(text: str) -> str:
    """What a prediction goes through in both variants (and a human answer in OpenFlamingo's)."""
    return normalize_digits_articles(normalize_punctuation(clean_whitespace(text)))


def _answer_text(entry: AnswerEntry, question: Hashable) -> str:
    text = entry if isinstance(entry, str) else entry.get("answer")
    if not isinstance(text, str):
        raise FlamingoError(
            f"question {question!r}: a human answer has no text answer ({entry!r})",
            fix='give each answer as a string or as an entry with an "answer" string',
        )
    return text


def _openflamingo_accuracy(
    prediction: str, entries: Sequence[AnswerEntry], question: Hashable
) -> float:
    texts = [normalize_answer(_answer_text(entry, question)) for entry in entries]
    # Entries are compared after normalisation, as OpenFlamingo rewrites them in place first.
    keys: list[object] = [
        text if isinstance(entry, str) else {**entry, "answer": text}
        for entry, text in zip(entries, texts, strict=True)
    ]
    matches = sum(text == prediction for text in texts)
    total = 0.0
    for key, text in zip(keys, texts, strict=True):
        # Leaving this entry out removes every equal entry; they all match iff this one does.
        removed = sum(other == key for other in keys) if text == prediction else 0
        total += min(1.0, (matches - removed) / 3)
    return total / len(entries)


def _official_accuracy(
    prediction: str, entries: Sequence[AnswerEntry], question: Hashable
) -> float:
    texts = [_answer_text(entry, question) for entry in entries]
    if len(set(texts)) > 1:
        texts = [normalize_punctuation(text) for text in texts]
    matches = sum(text == prediction for text in texts)
    total = sum(min(1.0, (matches - (text == prediction)) / 3) for text in texts)
    return total / len(entries)


def question_accuracy(
    prediction: str,
    answers: Sequence[AnswerEntry],
    variant: VqaVariant = "openflamingo",
    *,
    question: Hashable = None,
) -> float:
    """One question's accuracy in [0, 1]; `question` only names it in errors."""
    if not answers:
        raise FlamingoError(
            f"question {question!r} has no human answers to score against",
            fix="give every scored question its annotators' answers (VQA layout: ten each)",
        )
    normalized = normalize_answer(prediction)
    if variant == "openflamingo":
        return _openflamingo_accuracy(normalized, answers, question)
    if variant == "official":
        return _official_accuracy(normalized, answers, question)
    raise FlamingoError(
        f"unknown VQA metric variant {variant!r}",
        fix=f"use one of: {', '.join(VQA_VARIANTS)}",
    )


def vqa_accuracy(
    predictions: Mapping[Q, str],
    annotations: Mapping[Q, Sequence[AnswerEntry]],
    variant: VqaVariant = "openflamingo",
) -> VqaResult[Q]:
    """VQA accuracy of `predictions` (question id -> answer), each against its human answers
    in `annotations` (question id -> answer entries). Every predicted question is scored;
    annotated questions without a prediction are not (a `--num-samples` subset)."""
    check_covered(
        predictions,
        annotations,
        nothing=("no predictions to score", "score at least one question (check --num-samples)"),
        unmatched=(
            "predicted question(s) have no annotation",
            "score predictions against the annotations file of the same split",
        ),
    )
    per_question = {
        question: question_accuracy(answer, annotations[question], variant, question=question)
        for question, answer in predictions.items()
    }
    mean = sum(per_question.values()) / len(per_question)
    return VqaResult(accuracy_x100=100.0 * mean, per_question=per_question, variant=variant)
