"""What `eval-fewshot` reports: one score per trial for each shot count, their mean and
standard deviation, and the same for the images ablated; JSON both ways (ranks hand rank 0's
report to the launching process as JSON)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShotResult:
    """One shot count: the metric of each trial (`scores`) on `samples` test samples per
    trial, and with an ablation the same trials without (or with shuffled) images."""

    shots: int
    scores: tuple[float, ...]
    samples: int
    ablated_scores: tuple[float, ...] | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        """Population standard deviation over trials (numpy's `np.std`, as OpenFlamingo)."""
        return statistics.pstdev(self.scores)

    @property
    def ablated_mean(self) -> float | None:
        return statistics.fmean(self.ablated_scores) if self.ablated_scores else None

    @property
    def gap(self) -> float | None:
        """Mean score with images minus without them (positive: the images help)."""
        ablated = self.ablated_mean
        return None if ablated is None else self.mean - ablated

    def to_dict(self) -> dict[str, Any]:
        return {
            "shots": self.shots,
            "samples": self.samples,
            "scores": list(self.scores),
            "mean": self.mean,
            "std": self.std,
            "ablated_scores": list(self.ablated_scores) if self.ablated_scores else None,
            "ablated_mean": self.ablated_mean,
            "gap": self.gap,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShotResult:
        ablated = data.get("ablated_scores")
        return cls(
            shots=int(data["shots"]),
            scores=tuple(float(s) for s in data["scores"]),
            samples=int(data["samples"]),
            ablated_scores=tuple(float(s) for s in ablated) if ablated else None,
        )


@dataclass(frozen=True)
class FewshotReport:
    """A task's scores at each shot count, with what was read and how it was scored."""

    recipe: str
    checkpoint: str
    weights: str
    task: str
    layout: str
    files: tuple[str, ...]
    metric: str
    scorer: str
    world_size: int
    protocol: dict[str, Any]
    ablation: str | None
    results: tuple[ShotResult, ...]
    predictions: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "task": self.task,
            "layout": self.layout,
            "files": list(self.files),
            "metric": self.metric,
            "scorer": self.scorer,
            "world_size": self.world_size,
            "protocol": self.protocol,
            "ablation": self.ablation,
            "results": [r.to_dict() for r in self.results],
            "predictions": self.predictions,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FewshotReport:
        return cls(
            recipe=str(data["recipe"]),
            checkpoint=str(data["checkpoint"]),
            weights=str(data["weights"]),
            task=str(data["task"]),
            layout=str(data["layout"]),
            files=tuple(str(f) for f in data["files"]),
            metric=str(data["metric"]),
            scorer=str(data["scorer"]),
            world_size=int(data["world_size"]),
            protocol=dict(data["protocol"]),
            ablation=data.get("ablation"),
            results=tuple(ShotResult.from_dict(r) for r in data["results"]),
            predictions=data.get("predictions"),
            seconds=float(data["seconds"]),
        )
