"""The training loaders: one per dataset, with epoch sizing, drop counters and exact resume."""

from __future__ import annotations

import functools
import random
import shlex
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from flamingo_cli.data.labels import interleaved_labels, pair_labels
from flamingo_cli.data.pipeline import (
    Collate,
    LoaderBatch,
    Preprocess,
    RawSample,
    ShardStream,
    SourceSpec,
    StreamFailure,
    StreamSpec,
    StreamStart,
    batches_of,
    check_pipes,
    worker_loader,
)
from flamingo_cli.data.preprocess import (
    Context,
    Sample,
    preprocess_document,
    preprocess_pair,
)
from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.tokenizer import SpecialTokens
from flamingo_cli.recipe.plan import batches_per_epoch
from flamingo_cli.recipe.schema import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMPLIED_KINDS,
    DatasetConfig,
    InterleavedConfig,
    PairsConfig,
)
from flamingo_cli.shards.spec import expand_spec
from flamingo_cli.shards.tar import printable_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.model.factory import ImageTransform

STATE_VERSION = 1


def collate_pairs(samples: list[Sample], tokens: SpecialTokens) -> LoaderBatch:
    """LAION batch: right padding to the longest caption (OpenFlamingo's `padding="longest"`)."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), tokens.pad, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        input_ids[row, : len(s.input_ids)] = s.input_ids
        attention_mask[row, : len(s.attention_mask)] = s.attention_mask
    return LoaderBatch(
        images=torch.stack([s.images for s in samples]),
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=pair_labels(input_ids, tokens),
        keys=[s.key for s in samples],
    )


def collate_documents(samples: list[Sample], tokens: SpecialTokens, slots: int) -> LoaderBatch:
    """MMC4 batch: images zero-padded to `slots` (max_num_images); text is padded already."""
    input_ids = torch.stack([s.input_ids for s in samples])
    images = torch.zeros((len(samples), slots, *samples[0].images.shape[1:]))
    for row, s in enumerate(samples):
        images[row, : len(s.images)] = s.images
    return LoaderBatch(
        images=images,
        input_ids=input_ids,
        attention_mask=torch.stack([s.attention_mask for s in samples]),
        labels=interleaved_labels(input_ids, tokens),
        keys=[s.key for s in samples],
    )


def _preprocess_pair(
    ctx: Context, config: PairsConfig, raw: RawSample, rng: random.Random
) -> Sample:
    return preprocess_pair(raw, ctx, config, rng)


def _preprocess_document(
    ctx: Context, config: InterleavedConfig, raw: RawSample, rng: random.Random
) -> Sample:
    return preprocess_document(raw, ctx, config, rng)


def sample_functions(config: DatasetConfig, ctx: Context) -> tuple[Preprocess, Collate]:
    """The per-sample preprocessing and the batch collation of a dataset (picklable, for
    DataLoader workers)."""
    if isinstance(config, PairsConfig):
        return (
            functools.partial(_preprocess_pair, ctx, config),
            functools.partial(collate_pairs, tokens=ctx.tokens),
        )
    return (
        functools.partial(_preprocess_document, ctx, config),
        functools.partial(collate_documents, tokens=ctx.tokens, slots=config.max_num_images),
    )


class TrainLoader:
    """Batches of one dataset for one rank, epoch by epoch, resumable exactly.

    An epoch has `num_batches` full batches on every rank (docs/formats.md §5.8). Call
    `set_epoch(e)` before iterating epoch e; iterating yields the batches of the current epoch
    not yet consumed. `state_dict()` records what the trainer consumed (not what workers
    prefetched); after `load_state_dict()` the next batches are those an uninterrupted run
    would have yielded. `dropped` counts dropped samples by reason over the whole run
    (`source_counts()` the samples and drops of each blended source);
    `damaged_shards` names the shards found unreadable or damaged (counted as `tar_error`), and
    `damage_notices()` gives one message per shard not yet reported. A worker that cannot go on
    (no usable sample in its shards) stops the iteration with a FlamingoError naming them.
    """

    def __init__(
        self,
        name: str,
        config: DatasetConfig,
        ctx: Context,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        allow_pipe: bool = False,
        epoch: int = 0,
    ) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.allow_pipe = allow_pipe
        self.workers = max(config.workers, 1)
        self.sources = _source_specs(name, config, self.workers, world_size)
        for source in self.sources:
            check_pipes(source.urls, allow_pipe)
        self.num_batches = batches_per_epoch(
            config.train_num_samples, config.batch_size, world_size, config.workers
        )
        self.epoch = epoch
        self._reset_position()
        self._dropped_before: Counter[str] = Counter()
        self._source_samples_before: Counter[str] = Counter()
        self._source_dropped_before: dict[str, Counter[str]] = {}
        self.damaged_shards: dict[str, str] = {}  # shard -> what is wrong, in the order found
        self._noticed = 0

    def _reset_position(self) -> None:
        self.batches = 0
        self._worker_batches = [0] * self.workers
        self._drawn = [0] * self.workers
        self._worker_dropped: list[dict[str, int]] = [{} for _ in range(self.workers)]
        self._worker_source_samples: list[dict[str, int]] = [{} for _ in range(self.workers)]
        self._worker_source_dropped: list[dict[str, dict[str, int]]] = [
            {} for _ in range(self.workers)
        ]

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; the current epoch (e.g. after a resume) is kept."""
        if epoch == self.epoch:
            return
        self._dropped_before += self._epoch_dropped()
        self._source_samples_before += _summed(self._worker_source_samples)
        self._source_dropped_before = self._source_dropped()
        self.epoch = epoch
        self._reset_position()

    def _epoch_dropped(self) -> Counter[str]:
        return _summed(self._worker_dropped)

    def _source_dropped(self) -> dict[str, Counter[str]]:
        """Each blended source's drops over the whole run, as consumed."""
        total = {s: Counter(c) for s, c in self._source_dropped_before.items()}
        for worker in self._worker_source_dropped:
            for source, counts in worker.items():
                total.setdefault(source, Counter()).update(counts)
        return total

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped samples by reason (and `images_corrupt`) over the whole run, as consumed."""
        return dict(sorted((self._dropped_before + self._epoch_dropped()).items()))

    def source_counts(self) -> dict[str, int]:
        """Per blended source, over the whole run as consumed: `samples/NAME/SOURCE` (samples
        that went into batches) and `dropped_by_source/NAME/SOURCE/REASON` (docs/formats.md §9.3)."""
        samples = self._source_samples_before + _summed(self._worker_source_samples)
        counts = {
            f"samples/{self.name}/{s.name}": samples.get(s.name, 0)
            for s in self.sources
            if s.name is not None
        }
        for source, dropped in sorted(self._source_dropped().items()):
            for reason, n in sorted(dropped.items()):
                counts[f"dropped_by_source/{self.name}/{source}/{reason}"] = n
        return counts

    @property
    def remaining(self) -> int:
        return self.num_batches - self.batches

    def stream(self) -> ShardStream:
        """The dataset that yields the rest of this epoch (what `__iter__` loads from)."""
        config = self.config
        spec = StreamSpec(
            sources=self.sources,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            workers=self.workers,
            shuffle_buffer=config.shuffle_buffer,
            shuffle_initial=config.shuffle_initial,
            batch_size=config.batch_size,
            batches_per_worker=self.num_batches // self.workers,
            allow_pipe=self.allow_pipe,
            name=self.name,
        )
        start = StreamStart(
            rotation=self.batches % self.workers,
            worker_batches=tuple(self._worker_batches),
            drawn=tuple(self._drawn),
            dropped=tuple(dict(d) for d in self._worker_dropped),
            source_samples=tuple(dict(d) for d in self._worker_source_samples),
            source_dropped=tuple(
                {s: dict(c) for s, c in d.items()} for d in self._worker_source_dropped
            ),
        )
        return ShardStream(spec, start, *sample_functions(config, self.ctx))

    def __iter__(self) -> Iterator[LoaderBatch]:
        if self.remaining <= 0:
            return
        loader = worker_loader(
            self.stream(),
            self.config.workers,
            self.config.prefetch_factor,
            # its own generator: creating worker seeds must not consume the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )
        for batch in batches_of(loader):
            if isinstance(batch, StreamFailure):
                raise batch.error()
            for url, message in batch.damaged.items():
                self.damaged_shards.setdefault(url, message)
            self.batches += 1
            self._worker_batches[batch.worker] += 1
            self._drawn[batch.worker] = batch.drawn
            self._worker_dropped[batch.worker] = batch.dropped
            self._worker_source_samples[batch.worker] = batch.source_samples
            self._worker_source_dropped[batch.worker] = batch.source_dropped
            yield batch

    def damage_notices(self) -> list[str]:
        """A message for each damaged shard found since the last call (each shard once)."""
        found = list(self.damaged_shards.items())[self._noticed :]
        self._noticed = len(self.damaged_shards)
        return [
            f"data.{self.name}: {message}; what cannot be read is skipped (counted as "
            f"dropped/{self.name}/tar_error). Fix: run `flamingo inspect-shards "
            f"{shlex.quote(printable_name(url))}`, then rewrite or re-download the shard"
            for url, message in found
        ]

    def skip_to(self, batches: int) -> None:
        """Start this epoch as if `batches` batches had been consumed from a fresh stream.

        For a resume on another world size or worker count, where no saved position fits:
        each worker skips its share of the batches (samples it would have drawn, dropped
        samples not counted), so the run continues near the global sample count, not exactly.
        """
        self._reset_position()
        batches = min(max(batches, 0), self.num_batches)
        self.batches = batches
        self._worker_batches = [
            len(range(worker, batches, self.workers)) for worker in range(self.workers)
        ]
        self._drawn = [n * self.config.batch_size for n in self._worker_batches]

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch, batches consumed, and per worker what it drew."""
        return {
            "version": STATE_VERSION,
            "dataset": self.name,
            "epoch": self.epoch,
            "batches": self.batches,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.workers,
            "worker_batches": list(self._worker_batches),
            "drawn": list(self._drawn),
            "worker_dropped": [dict(d) for d in self._worker_dropped],
            "dropped_before": dict(self._dropped_before),
            "worker_source_samples": [dict(d) for d in self._worker_source_samples],
            "worker_source_dropped": [
                {s: dict(c) for s, c in d.items()} for d in self._worker_source_dropped
            ],
            "source_samples_before": dict(self._source_samples_before),
            "source_dropped_before": {s: dict(c) for s, c in self._source_dropped_before.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` was taken; needs the same world size and worker count."""
        if state.get("version") != STATE_VERSION:
            raise FlamingoError(f"unknown {self.name} loader state version {state.get('version')}")
        if state.get("dataset") != self.name:
            raise FlamingoError(
                f"loader state of {state.get('dataset')!r} given to the {self.name} loader"
            )
        same = (state["world_size"], state["workers"]) == (self.world_size, self.workers)
        if not same:
            raise FlamingoError(
                f"the {self.name} loader state was saved with world size {state['world_size']} "
                f"and {state['workers']} workers, this run has {self.world_size} and "
                f"{self.workers}",
                fix="resume with the same number of ranks and data.*.workers, "
                "or start a new run from the checkpoint's weights (model.init_from)",
            )
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])
        self._worker_batches = [int(n) for n in state["worker_batches"]]
        self._drawn = [int(n) for n in state["drawn"]]
        self._worker_dropped = [dict(d) for d in state["worker_dropped"]]
        self._dropped_before = Counter(state["dropped_before"])
        # per-source counts: absent from checkpoints written before blends (none to restore)
        empty: list[dict[str, Any]] = [{} for _ in range(self.workers)]
        self._worker_source_samples = [dict(d) for d in state.get("worker_source_samples", empty)]
        self._worker_source_dropped = [
            {s: dict(c) for s, c in d.items()} for d in state.get("worker_source_dropped", empty)
        ]
        self._source_samples_before = Counter(state.get("source_samples_before", {}))
        self._source_dropped_before = {
            s: Counter(c) for s, c in state.get("source_dropped_before", {}).items()
        }


def _summed(counts: list[dict[str, int]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return total


def _source_specs(
    name: str, config: DatasetConfig, workers: int, world_size: int
) -> tuple[SourceSpec, ...]:
    """The dataset's sources with their shard lists expanded; each must feed every worker of
    every rank unless resampled (docs/formats.md §5.8, §7)."""
    readers = workers * world_size
    specs: list[SourceSpec] = []
    for source in config.source_list(name):
        where = f"data.{name}" if not source.blended else f"data.{name} source {source.name}"
        key = f"data.{name}.shards" if not source.blended else where + "'s shards"
        urls = tuple(expand_spec(source.shards))
        if not urls:
            raise FlamingoError(f"{key} names no shard")
        if not source.resampled and len(urls) < readers:
            raise FlamingoError(
                f"{where}: {len(urls)} shards cannot feed {workers} workers x {world_size} "
                "ranks without resampling",
                fix=f"set resampled = true for {where}, or give at least {readers} shards",
            )
        specs.append(
            SourceSpec(
                urls, source.resampled, source.name if source.blended else None, source.weight
            )
        )
    if not specs:
        raise FlamingoError(f"data.{name} has neither shards nor sources")
    return tuple(specs)


def make_loader(
    config: DatasetConfig,
    tokenizer: PreTrainedTokenizerBase,
    tokens: SpecialTokens,
    image_transform: ImageTransform,
    *,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    allow_pipe: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    name: str | None = None,
) -> TrainLoader:
    """The training loader of dataset `name` (default: laion or mmc4, by the config's kind)
    for one rank; images declaring more than `max_image_pixels` (the recipe's
    `data.max_image_pixels`) count as corrupt."""
    ctx = Context.create(
        tokenizer,
        tokens,
        image_transform,
        fast_images=config.fast_images,
        max_image_pixels=max_image_pixels,
    )
    if name is None:
        name = next(n for n, kind in IMPLIED_KINDS.items() if kind == config.kind)
    return TrainLoader(
        name,
        config,
        ctx,
        seed=seed,
        rank=rank,
        world_size=world_size,
        allow_pipe=allow_pipe,
        epoch=epoch,
    )
