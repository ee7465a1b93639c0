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
    StreamFailure,
    StreamSpec,
    StreamStart,
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
from flamingo_cli.recipe.schema import DEFAULT_MAX_IMAGE_PIXELS, LaionConfig, Mmc4Config
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
    ctx: Context, config: LaionConfig, raw: RawSample, rng: random.Random
) -> Sample:
    return preprocess_pair(raw, ctx, config, rng)


def _preprocess_document(
    ctx: Context, config: Mmc4Config, raw: RawSample, rng: random.Random
) -> Sample:
    return preprocess_document(raw, ctx, config, rng)


def sample_functions(config: LaionConfig | Mmc4Config, ctx: Context) -> tuple[Preprocess, Collate]:
    """The per-sample preprocessing and the batch collation of a dataset (picklable, for
    DataLoader workers)."""
    if isinstance(config, LaionConfig):
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
    would have yielded. `dropped` counts dropped samples by reason over the whole run;
    `damaged_shards` names the shards found unreadable or damaged (counted as `tar_error`), and
    `damage_notices()` gives one message per shard not yet reported. A worker that cannot go on
    (no usable sample in its shards) stops the iteration with a FlamingoError naming them.
    """

    def __init__(
        self,
        name: str,
        config: LaionConfig | Mmc4Config,
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
        self.urls = tuple(expand_spec(config.shards))
        self.workers = max(config.workers, 1)
        self.num_batches = batches_per_epoch(
            config.train_num_samples, config.batch_size, world_size, config.workers
        )
        if not self.urls:
            raise FlamingoError(f"data.{name}.shards names no shard")
        if not config.resampled and len(self.urls) < self.workers * world_size:
            raise FlamingoError(
                f"data.{name}: {len(self.urls)} shards cannot feed {self.workers} workers "
                f"x {world_size} ranks without resampling",
                fix=f"set data.{name}.resampled = true, or give at least "
                f"{self.workers * world_size} shards",
            )
        check_pipes(self.urls, allow_pipe)
        self.epoch = epoch
        self._reset_position()
        self._dropped_before: Counter[str] = Counter()
        self.damaged_shards: dict[str, str] = {}  # shard -> what is wrong, in the order found
        self._noticed = 0

    def _reset_position(self) -> None:
        self.batches = 0
        self._worker_batches = [0] * self.workers
        self._drawn = [0] * self.workers
        self._worker_dropped: list[dict[str, int]] = [{} for _ in range(self.workers)]

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; the current epoch (e.g. after a resume) is kept."""
        if epoch == self.epoch:
            return
        self._dropped_before += self._epoch_dropped()
        self.epoch = epoch
        self._reset_position()

    def _epoch_dropped(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self._worker_dropped:
            total.update(counts)
        return total

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped samples by reason (and `images_corrupt`) over the whole run, as consumed."""
        return dict(sorted((self._dropped_before + self._epoch_dropped()).items()))

    @property
    def remaining(self) -> int:
        return self.num_batches - self.batches

    def stream(self) -> ShardStream:
        """The dataset that yields the rest of this epoch (what `__iter__` loads from)."""
        config = self.config
        spec = StreamSpec(
            urls=self.urls,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            workers=self.workers,
            resampled=config.resampled,
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
        for batch in loader:
            if isinstance(batch, StreamFailure):
                raise batch.error()
            for url, message in batch.damaged.items():
                self.damaged_shards.setdefault(url, message)
            self.batches += 1
            self._worker_batches[batch.worker] += 1
            self._drawn[batch.worker] = batch.drawn
            self._worker_dropped[batch.worker] = batch.dropped
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


def make_loader(
    config: LaionConfig | Mmc4Config,
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
) -> TrainLoader:
    """The training loader of a LAION or MMC4 dataset config for one rank; images declaring
    more than `max_image_pixels` (the recipe's `data.max_image_pixels`) count as corrupt."""
    ctx = Context.create(
        tokenizer,
        tokens,
        image_transform,
        fast_images=config.fast_images,
        max_image_pixels=max_image_pixels,
    )
    name = "laion" if isinstance(config, LaionConfig) else "mmc4"
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
