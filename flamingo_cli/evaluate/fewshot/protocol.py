"""OpenFlamingo's few-shot protocol, point by point (docs/formats.md §14): which train samples
are shown, how prompts are written, how the model decodes, how its text is cut.

Every draw is a `random.Random` seeded by a string of what it is for, the trial's seed and (for
demonstrations) the test sample's id, so a sample's prompt is the same whatever the number of
ranks, the batch size or the other samples evaluated (OpenFlamingo seeds each rank with
seed + rank instead).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.evaluate.fewshot.samples import FewshotSample, TaskKind
from flamingo_cli.evaluate.prompts import caption_prompt, vqa_prompt, with_demonstrations
from flamingo_cli.model.tokenizer import ENDOFCHUNK, IMAGE

# How a caption task writes its prompts: OpenFlamingo's `<image>Output:{caption}<|endofchunk|>`
# joined by newlines, or `laion`: `<image>{caption}<|endofchunk|>` back to back, the text LAION
# pairs train with (docs/formats.md §5.2), for a model that saw no other captions.
CaptionTemplate = Literal["openflamingo", "laion"]

DEFAULT_SHOTS = (0, 4, 8, 16, 32)
DEFAULT_SEED = 42
QUERY_SET_SIZE = 2048
ZERO_SHOT_DEMOS = 2  # "0-shot": two demonstrations without their images (Flamingo's trick)
NUM_BEAMS = 3
LENGTH_PENALTY = 0.0


@dataclass(frozen=True)
class FewshotProtocol:
    """The knobs of one evaluation; the defaults are OpenFlamingo's."""

    shots: tuple[int, ...] = DEFAULT_SHOTS
    trials: int = 1
    seed: int = DEFAULT_SEED
    num_samples: int | None = None
    query_set_size: int = QUERY_SET_SIZE
    num_beams: int = NUM_BEAMS
    length_penalty: float = LENGTH_PENALTY
    min_new_tokens: int = 0
    max_new_tokens: int | None = None  # None: the task's (20 for captions, 5 for answers)
    zero_shot_demos: int = ZERO_SHOT_DEMOS
    caption_template: CaptionTemplate = "openflamingo"

    def trial_seed(self, trial: int) -> int:
        """Trial k (0-based) uses seed + k."""
        return self.seed + trial

    def demos_for(self, shots: int) -> int:
        """Demonstrations a prompt carries: `shots`, or the text-only ones at 0 shots."""
        return shots if shots > 0 else self.zero_shot_demos

    def to_dict(self) -> dict[str, object]:
        return {
            "shots": list(self.shots),
            "trials": self.trials,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "query_set_size": self.query_set_size,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
            "zero_shot_demos": self.zero_shot_demos,
            "caption_template": self.caption_template,
        }


def check_protocol(protocol: FewshotProtocol, train_size: int, train_file: str) -> None:
    """Usage errors before any model loads: shot counts, and a train split too small."""
    if not protocol.shots or min(protocol.shots) < 0:
        raise UsageError("--shots needs shot counts of 0 or more", fix="e.g. --shots 0 4 8")
    needed = max(protocol.demos_for(s) for s in protocol.shots)
    pool = min(protocol.query_set_size, train_size)
    if pool < needed:
        shown = max(protocol.shots)
        raise FlamingoError(
            f"{train_file}: the train split has {train_size} samples"
            + (f" (query set {pool})" if pool < train_size else "")
            + f", fewer than the {needed} demonstrations {shown}-shot prompts need",
            fix="give fewer --shots, or a dataset whose train split has more samples",
        )


def evaluated_indices(test_size: int, num_samples: int | None, trial_seed: int) -> list[int]:
    """The test samples of a trial, in order: all, or a random subset of `num_samples` drawn
    with the trial's seed (as OpenFlamingo, whose subset also changes with the trial)."""
    if num_samples is None or num_samples >= test_size:
        return list(range(test_size))
    return sorted(random.Random(f"fewshot-test-{trial_seed}").sample(range(test_size), num_samples))


def query_set(train_size: int, size: int, trial_seed: int) -> list[int]:
    """The trial's pool of demonstrations: min(size, train size) train samples, no repeats."""
    count = min(size, train_size)
    return random.Random(f"fewshot-query-{trial_seed}").sample(range(train_size), count)


def demonstrations(pool: Sequence[int], count: int, trial_seed: int, sample_id: str) -> list[int]:
    """The `count` demonstrations (train indices, in prompt order) of one test sample: a draw
    from the pool seeded by the trial seed and the sample's id alone."""
    return random.Random(f"fewshot-demos-{trial_seed}-{sample_id}").sample(list(pool), count)


def shuffled_images(count: int, trial_seed: int) -> list[int]:
    """For `--ablate-images shuffle`: test sample i gets the image of sample `result[i]`, a
    derangement (no sample keeps its own) drawn from the trial seed; identity for one sample."""
    if count < 2:
        return list(range(count))
    rng = random.Random(f"fewshot-shuffle-{trial_seed}")
    while True:
        order = rng.sample(range(count), count)
        if all(i != j for i, j in enumerate(order)):
            return order


def prompt_text(
    kind: TaskKind,
    demos: Sequence[FewshotSample],
    query: FewshotSample,
    shots: int,
    template: CaptionTemplate = "openflamingo",
) -> str:
    """The text the model continues: each demonstration (a caption task's first reference, a
    VQA task's first answer) and a newline, then the query; at 0 shots the demonstrations
    lose their `<image>` markers."""
    if kind == "caption" and template == "laion":
        texts = [f"{IMAGE}{d.text.strip()}{ENDOFCHUNK}" for d in demos]
        if shots == 0:
            texts = [t.replace(IMAGE, "") for t in texts]
        return "".join(texts) + IMAGE
    if kind == "caption":
        texts = [caption_prompt(d.text.strip()) for d in demos]
        ask = caption_prompt()
    else:
        texts = [vqa_prompt(d.text, d.answers[0] if d.answers else "") for d in demos]
        ask = vqa_prompt(query.text)
    if shots == 0:
        texts = [t.replace(IMAGE, "") for t in texts]
    return with_demonstrations(texts, ask)


def postprocess(kind: TaskKind, generated: str) -> str:
    """OpenFlamingo's cuts: a caption ends before the first "Output" and loses its double
    quotes; an answer ends before the first "Question", "Answer" or "Short", then before its
    first ", ". (OK-VQA's stemming is the metric's.)"""
    if kind == "caption":
        return generated.split("Output", 1)[0].replace('"', "")
    answer = re.split("Question|Answer|Short", generated, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]
