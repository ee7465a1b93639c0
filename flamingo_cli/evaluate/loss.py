"""The evaluation loop: exact token-weighted loss over every batch of a dataset, on every rank
in lockstep, with an optional image ablation evaluated on the same batches.

The loss is the sum of per-token cross-entropies over all target tokens divided by their number
(not a mean of batch means); ranks add their sums and counts with one all-reduce at the end.
A rank out of data runs a fully masked padding batch while others still have some, so every
rank makes the same forward calls (FSDP all-gathers must match).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flamingo_cli.data.eval_loader import DROP_KEYS, BlendedEvalLoader, EvalLoader
from flamingo_cli.data.labels import IGNORE, content_length
from flamingo_cli.data.pipeline import LoaderBatch, derive_seed
from flamingo_cli.runtime.distributed import DistInfo, any_rank
from flamingo_cli.runtime.memory import memory_named

Ablation = Literal["none", "shuffle"]
ABLATIONS: tuple[Ablation, ...] = ("none", "shuffle")
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


class EvalEvents(Protocol):
    """What the evaluation reports while it runs (rank 0 only; the UI renders it)."""

    def dataset_started(self, name: str, expected_batches: int | None) -> None: ...

    def batch_done(self, name: str, batches: int, samples: int, loss: float) -> None:
        """After each batch: this rank's batches, samples and running loss so far."""

    def dataset_done(self, result: DatasetLoss) -> None: ...


@dataclass(frozen=True)
class DatasetLoss:
    """The held-out loss of one dataset over all ranks.

    `loss` is nats per target token over every evaluated sample; with an ablation,
    `ablated_loss` is the loss of the same batches without (or with shuffled) images and `gap`
    is `ablated_loss` minus the loss with images over the same samples (positive: images
    help). `batches` counts real batches over all ranks, `padding_batches` the masked ones.
    A blended dataset's row is over all its sources' eval shards; `sources` holds a row per
    source (named `DATASET/SOURCE`, `source` its name) whose sums add up to it.
    """

    dataset: str
    shards: int
    samples: int
    target_tokens: int
    batches: int
    padding_batches: int
    loss: float
    perplexity: float
    seconds: float
    ablation: Ablation | None = None
    ablated_loss: float | None = None
    gap: float | None = None
    ablated_samples: int = 0
    note: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    source: str | None = None
    sources: list[DatasetLoss] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "shards": self.shards,
            "samples": self.samples,
            "target_tokens": self.target_tokens,
            "batches": self.batches,
            "padding_batches": self.padding_batches,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "seconds": self.seconds,
            "ablation": self.ablation,
            "ablated_loss": self.ablated_loss,
            "gap": self.gap,
            "ablated_samples": self.ablated_samples,
            "note": self.note,
            "dropped": dict(self.dropped),
            "source": self.source,
            "sources": [s.to_dict() for s in self.sources],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetLoss:
        sources = [cls.from_dict(s) for s in data.get("sources") or []]
        return cls(**{**data, "dropped": dict(data.get("dropped") or {}), "sources": sources})


def token_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of next-token cross-entropies over the target tokens (labels != -100), and their
    number; position t predicts label t + 1, as the LM's own loss shifts them."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    total = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, (shifted_labels != IGNORE).sum()


def derangement(n: int, rng: random.Random) -> list[int]:
    """A random permutation with no fixed point (Sattolo's algorithm: one n-cycle); n >= 2."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return order


def shuffled_images(batch: LoaderBatch, seed: int) -> Tensor | None:
    """Each sample gets another sample's whole image set (a derangement within the batch, drawn
    from the seed and the batch's keys); None for a batch of one sample."""
    rows = int(batch.images.shape[0])
    if rows < 2:
        return None
    order = derangement(rows, random.Random(derive_seed("shuffle-images", seed, *batch.keys)))
    return batch.images[order]


def _no_autocast() -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass
class _Sums:
    """What every rank adds up over its batches; one all-reduce then sums them over ranks.

    `paired_*` are the loss with images over the batches an ablation was compared on,
    `ablated_*` the same batches' ablated loss; `alone` counts samples with nobody to swap
    images with; `dropped` follows `DROP_KEYS`."""

    loss: float = 0.0
    tokens: float = 0.0
    samples: float = 0.0
    batches: float = 0.0
    padding: float = 0.0
    paired_loss: float = 0.0
    paired_tokens: float = 0.0
    ablated_loss: float = 0.0
    ablated_samples: float = 0.0
    alone: float = 0.0
    dropped: list[float] = field(default_factory=lambda: [0.0] * len(DROP_KEYS))

    def add(self, batch: LoaderBatch, loss: float, tokens: int, *, real: bool) -> None:
        self.loss += loss
        self.tokens += tokens
        if real:
            self.samples += len(batch.keys)
            self.batches += 1
        else:
            self.padding += 1

    def add_ablated(
        self, batch: LoaderBatch, loss: float, tokens: int, ablated: float | None
    ) -> None:
        """A real batch's ablated loss, or None when it could not be ablated (alone)."""
        if ablated is None:
            self.alone += len(batch.keys)
            return
        self.paired_loss += loss
        self.paired_tokens += tokens
        self.ablated_loss += ablated
        self.ablated_samples += len(batch.keys)

    def plus(self, other: _Sums) -> _Sums:
        """Both sums added (a blend's sources into the dataset's)."""
        totals = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        dropped = [a + b for a, b in zip(self.dropped, other.dropped, strict=True)]
        return replace(self, **{**totals, "dropped": dropped})

    def across_ranks(self, info: DistInfo) -> _Sums:
        """These sums added over every rank (collective)."""
        if info.world_size == 1 or not dist.is_initialized():
            return self
        names = [f.name for f in fields(self) if f.name != "dropped"]
        values = [*(getattr(self, name) for name in names), *self.dropped]
        tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        summed = [float(v) for v in tensor.tolist()]
        totals = dict(zip(names, summed, strict=False))
        return replace(self, **totals, dropped=summed[len(names) :])


# eval-loss takes --batch-size; evaluation during training uses the datasets' batch sizes
_EVAL_MEMORY_FIX = "give eval-loss a lower --batch-size (during training: data.NAME.batch_size)"


@dataclass(frozen=True)
class _Forward:
    """How a batch's loss is computed here: model, device, autocast, and the ablation."""

    model: nn.Module
    info: DistInfo
    autocast: Autocast
    ablation: Ablation | None
    seed: int

    def loss(
        self, batch: LoaderBatch, images: Tensor, *, use_media: bool = True
    ) -> tuple[float, int]:
        """The summed target-token loss of `batch` with `images`, and the tokens counted."""
        device = self.info.device
        length = content_length(batch.attention_mask, batch.labels)  # right padding: no change
        rows, images_per = batch.input_ids.shape[0], images.shape[1]
        what = f"evaluating a batch of {rows} samples x {length} tokens, {images_per} image(s) each"
        with memory_named(what, _EVAL_MEMORY_FIX, device):
            with self.autocast():
                out = self.model(
                    images.to(device),
                    batch.input_ids[:, :length].to(device),
                    batch.attention_mask[:, :length].to(device),
                    use_media=use_media,
                )
            total, count = token_loss_sum(out.logits, batch.labels[:, :length].to(device))
        return float(total), int(count)

    def ablated(self, batch: LoaderBatch) -> float | None:
        """The same batch without its images (`none`) or with another sample's (`shuffle`);
        None for a batch of one sample, which cannot be shuffled. Every rank runs the second
        forward all the same, so the calls stay in lockstep."""
        if self.ablation == "none":
            return self.loss(batch, batch.images, use_media=False)[0]
        images = shuffled_images(batch, self.seed)
        loss = self.loss(batch, batch.images if images is None else images)[0]
        return None if images is None else loss


def evaluate_dataset(
    model: nn.Module,
    loader: EvalLoader | BlendedEvalLoader,
    info: DistInfo,
    *,
    ablation: Ablation | None = None,
    max_batches: int | None = None,
    autocast: Autocast = _no_autocast,
    seed: int = 0,
    events: EvalEvents | None = None,
    expected_batches: int | None = None,
) -> DatasetLoss:
    """Evaluate every batch of `loader` (at most `max_batches` per rank); collective: every
    rank calls it with its own loader and gets the same result. A blended dataset's sources
    are read one after the other, each row in the result's `sources`. The model is put in eval
    mode for the duration and gradients are off."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    if events is not None:
        events.dataset_started(loader.name, expected_batches)
    parts = loader.sources if isinstance(loader, BlendedEvalLoader) else {loader.name: loader}
    forward = _Forward(model, info, autocast, ablation, seed)
    try:
        with torch.no_grad():
            done = _evaluate_batches(forward, loader.name, parts, max_batches, events)
    finally:
        model.train(was_training)
    result = _combined(loader, parts, done, info, ablation, time.perf_counter() - start)
    if events is not None:
        events.dataset_done(result)
    return result


@dataclass
class _Pass:
    """This rank's sums by part (a source of a blend, or the dataset itself), those of its
    padding batches, the seconds spent on each part, and the parts it started reading."""

    sums: dict[str, _Sums]
    padding: _Sums = field(default_factory=_Sums)
    seconds: dict[str, float] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)

    def so_far(self) -> tuple[int, float]:
        """Samples and loss per token over every part read so far, for progress events."""
        samples = sum(s.samples for s in self.sums.values())
        loss = sum(s.loss for s in self.sums.values())
        return int(samples), _per_token(loss, sum(s.tokens for s in self.sums.values()))


def _tagged(
    parts: Mapping[str, EvalLoader], started: set[str]
) -> Generator[tuple[str, LoaderBatch], None, None]:
    """Every part's batches, one part after the other, each with its part's name."""
    for name, loader in parts.items():
        started.add(name)
        iterator = iter(loader)
        try:
            for batch in iterator:
                yield name, batch
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()


def _evaluate_batches(
    forward: _Forward,
    name: str,
    parts: Mapping[str, EvalLoader],
    max_batches: int | None,
    events: EvalEvents | None,
) -> _Pass:
    """This rank's sums over its batches; a rank out of data runs padding batches until every
    rank is (so all make the same forward calls)."""
    done = _Pass({part: _Sums() for part in parts}, seconds=dict.fromkeys(parts, 0.0))
    padding = next(iter(parts.values())).padding_batch
    batches = _tagged(parts, done.started)
    steps = 0
    try:
        while max_batches is None or steps < max_batches:
            tick = time.perf_counter()
            part, batch = next(batches, (None, None))
            if not any_rank(batch is not None, forward.info):
                break
            sums = done.padding if part is None else done.sums[part]
            batch = padding() if batch is None else batch
            loss, tokens = forward.loss(batch, batch.images)
            sums.add(batch, loss, tokens, real=part is not None)
            if forward.ablation is not None:
                ablated = forward.ablated(batch)
                if part is not None:
                    sums.add_ablated(batch, loss, tokens, ablated)
            if part is not None:
                done.seconds[part] += time.perf_counter() - tick
            steps += 1
            if events is not None:
                events.batch_done(name, steps, *done.so_far())
    finally:
        batches.close()
    return done


def _combined(
    loader: EvalLoader | BlendedEvalLoader,
    parts: Mapping[str, EvalLoader],
    done: _Pass,
    info: DistInfo,
    ablation: Ablation | None,
    seconds: float,
) -> DatasetLoss:
    """The dataset's result over all ranks, with a row per source of a blend (collective: one
    all-reduce per part, in the same order on every rank)."""
    rows: list[DatasetLoss] = []
    total = done.padding.across_ranks(info)
    damage: list[str] = []
    for name, part in parts.items():
        sums = done.sums[name]
        if name in done.started:  # a part never reached keeps the counts of an older pass
            sums.dropped = [float(part.dropped.get(key, 0)) for key in DROP_KEYS]
        sums = sums.across_ranks(info)
        total = total.plus(sums)
        note = part.damage_note() if name in done.started else None  # this rank's, named
        damage += [note] if note else []
        source = name if isinstance(loader, BlendedEvalLoader) else None
        rows.append(
            _result(part.name, len(part.urls), sums, ablation, done.seconds[name], note, source)
        )
    note = "; ".join(damage) or None
    result = _result(loader.name, len(loader.urls), total, ablation, seconds, note)
    return replace(result, sources=rows) if isinstance(loader, BlendedEvalLoader) else result


def _per_token(total: float, tokens: float) -> float:
    return total / tokens if tokens else math.nan


def _perplexity(loss: float) -> float:
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf


def _result(
    name: str,
    shards: int,
    sums: _Sums,
    ablation: Ablation | None,
    seconds: float,
    damage: str | None,
    source: str | None = None,
) -> DatasetLoss:
    """One row of the report from sums over all ranks; `damage` names damaged shards."""
    loss = _per_token(sums.loss, sums.tokens)
    dropped = {key: int(n) for key, n in zip(DROP_KEYS, sums.dropped, strict=True) if n}
    ablated = gap = None
    note = None
    if ablation is not None:
        ablated = _per_token(sums.ablated_loss, sums.paired_tokens)
        gap = ablated - _per_token(sums.paired_loss, sums.paired_tokens)
        if sums.alone:
            note = (
                f"{int(sums.alone)} sample(s) were alone in their batch: with nobody to swap "
                "images with, they are left out of the shuffle comparison"
            )
    note = damage if note is None else note if damage is None else f"{note}; {damage}"
    return DatasetLoss(
        dataset=name,
        shards=shards,
        samples=int(sums.samples),
        target_tokens=int(sums.tokens),
        batches=int(sums.batches),
        padding_batches=int(sums.padding),
        loss=loss,
        perplexity=_perplexity(loss),
        seconds=seconds,
        ablation=ablation,
        ablated_loss=ablated,
        gap=gap,
        ablated_samples=int(sums.ablated_samples),
        note=note,
        dropped=dropped,
        source=source,
    )


def evaluate_during_training(
    model: nn.Module,
    loaders: Mapping[str, EvalLoader | BlendedEvalLoader],
    info: DistInfo,
    *,
    autocast: Autocast = _no_autocast,
    max_batches: int | None = None,
) -> dict[str, float]:
    """The held-out loss of each eval loader as metrics `eval/loss/<dataset>`, for the training
    loop to log every `run.eval_every` steps; a blended dataset's is over all its sources, with
    no per-source metric (docs/formats.md §11). Collective: every rank calls it at the same
    step with its (possibly FSDP- or DDP-wrapped) model; training mode is restored afterwards."""
    return {
        f"eval/loss/{name}": evaluate_dataset(
            model, loader, info, autocast=autocast, max_batches=max_batches
        ).loss
        for name, loader in loaders.items()
    }
