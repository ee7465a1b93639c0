"""Scoring a trial's predictions with the task's metric (evaluate/metrics), and saying how."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flamingo_cli.evaluate.metrics.vqa import VqaVariant, vqa_accuracy


@dataclass(frozen=True)
class Score:
    """A trial's score (x 100, as OpenFlamingo reports both metrics) and how it was computed."""

    value: float
    scorer: str
    scored: dict[str, str] = field(default_factory=dict)  # the predictions as scored


def score_captions(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> Score:
    """CIDEr x 100 of the captions against their references (`Cider` on PTB tokens)."""
    from flamingo_cli.evaluate.metrics.captioning import cider

    result = cider(dict(predictions), {k: list(v) for k, v in references.items()})
    scorer = f"CIDEr x 100, PTB tokenizer ({result.tokenizer})"
    return Score(result.score_x100, scorer, dict(predictions))


def score_answers(
    task: str,
    predictions: Mapping[str, str],
    annotations: Mapping[str, Sequence[Any]],
    variant: VqaVariant,
) -> Score:
    """VQA accuracy x 100; OK-VQA predictions are stemmed first, as OpenFlamingo's
    `postprocess_ok_vqa_generation` does (the human answers are not)."""
    scorer = f"VQA accuracy x 100, {variant} rules"
    if task == "okvqa":
        from flamingo_cli.evaluate.metrics.okvqa import okvqa_stemmer

        stemmer = okvqa_stemmer()
        predictions = {k: stemmer.stem(v) for k, v in predictions.items()}
        scorer += f", OK-VQA answers stemmed ({stemmer.backend})"
    result = vqa_accuracy(predictions, annotations, variant)
    return Score(result.accuracy_x100, scorer, dict(predictions))
