"""The evaluation loader: every sample of the eval shards once, in a fixed order, split among
ranks; no shuffling, no resampling, no flips and no random drops.

A rank's share is cut into `slots = world_size x workers` parts (one per rank and loader
worker): whole shards when there are at least as many shards as slots, else every `slots`-th
sample of the concatenated shards. Ranks may get different numbers of batches; the evaluator
pads the short ones with `padding_batch()` so every rank runs the same forward passes.
"""

from __future__ import annotations

import functools
import shlex
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from flamingo_cli.data.labels import IGNORE
from flamingo_cli.data.loader import sample_functions
from flamingo_cli.data.pipeline import (
    Collate,
    LoaderBatch,
    Preprocess,
    RawSample,
    ReadLog,
    batches_of,
    check_pipes,
    prepare,
    read_stages,
    worker_loader,
)
from flamingo_cli.data.preprocess import (
    CORRUPT_IMAGES,
    DROP_REASONS,
    Context,
    Sample,
)
from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.tokenizer import SpecialTokens
from flamingo_cli.recipe.schema import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DatasetConfig,
    InterleavedConfig,
)
from flamingo_cli.shards.spec import expand_spec, missing_local
from flamingo_cli.shards.tar import printable_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.model.factory import ImageTransform

# Drop counters in a fixed order, so ranks can sum them as one tensor.
DROP_KEYS = (*DROP_REASONS, CORRUPT_IMAGES)


@dataclass(frozen=True)
class EvalSlice:
    """What one (rank, worker) slot reads: these shards, and of their samples (numbered from 0
    in order) those with `index % stride == offset`."""

    urls: tuple[str, ...]
    offset: int
    stride: int


def eval_slice(urls: Sequence[str], slot: int, slots: int) -> EvalSlice:
    """Whole shards per slot when there are enough shards, else every `slots`-th sample."""
    if len(urls) >= slots:
        return EvalSlice(tuple(urls[slot::slots]), 0, 1)
    return EvalSlice(tuple(urls), slot, slots)


def select_samples(
    src: Iterable[RawSample], *, offset: int, stride: int
) -> Iterator[tuple[int, RawSample]]:
    """Number samples 0, 1, ... and keep this slot's ones (unread samples are never decoded)."""
    for index, sample in enumerate(src):
        if index % stride == offset:
            yield index, sample


def _stats_only(worker: int, log: ReadLog) -> LoaderBatch:
    empty = torch.zeros((0,), dtype=torch.long)
    return log.stamp(LoaderBatch(torch.zeros((0,)), empty, empty, empty, []), worker)


def batch_all(
    src: Iterable[tuple[int, Sample]],
    *,
    size: int,
    collate: Collate,
    worker: int,
    log: ReadLog,
    no_single: bool,
) -> Iterator[LoaderBatch]:
    """Batches of `size`, then the rest (evaluation keeps every sample). With `no_single`, a
    lone leftover sample joins the previous batch (image shuffling needs two samples). Ends with
    a batch of no rows carrying the final drop counters."""
    held: list[Sample] = []
    pending: list[Sample] = []
    for _, sample in src:
        pending.append(sample)
        if len(pending) == size:
            if held:
                yield log.stamp(collate(held), worker)
            held, pending = pending, []
    if pending and held and no_single and len(pending) == 1:
        held, pending = held + pending, []
    for rows in (held, pending):
        if rows:
            yield log.stamp(collate(rows), worker)
    yield _stats_only(worker, log)


class EvalStream(IterableDataset[LoaderBatch]):
    """One rank's evaluation batches, split among DataLoader workers by `eval_slice`."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        rank: int,
        world_size: int,
        workers: int,
        batch_size: int,
        preprocess: Preprocess,
        collate: Collate,
        allow_pipe: bool,
        no_single: bool,
    ) -> None:
        super().__init__()
        self.urls = tuple(urls)
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.collate = collate
        self.allow_pipe = allow_pipe
        self.no_single = no_single

    def __iter__(self) -> Iterator[LoaderBatch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        part = eval_slice(
            self.urls, self.rank * self.workers + worker, self.world_size * self.workers
        )
        log = ReadLog()
        pipeline = wds.DataPipeline(
            *read_stages(part.urls, allow_pipe=self.allow_pipe, log=log),
            functools.partial(select_samples, offset=part.offset, stride=part.stride),
            functools.partial(
                prepare,
                preprocess=self.preprocess,
                seed=0,  # unused: a deterministic context draws nothing
                epoch=0,
                log=log,
            ),
            functools.partial(
                batch_all,
                size=self.batch_size,
                collate=self.collate,
                worker=worker,
                log=log,
                no_single=self.no_single,
            ),
        )
        return iter(pipeline)


class EvalLoader:
    """Evaluation batches of one dataset for one rank; iterate as often as needed (each pass
    yields the same batches). `dropped` counts the samples preprocessing dropped so far in the
    current pass, by reason; `damaged_shards` names the shards of this rank that pass found
    unreadable or damaged (each counted as `tar_error`, the rest of the shards still read)."""

    def __init__(
        self,
        name: str,
        config: DatasetConfig,
        ctx: Context,
        shards: str | Sequence[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        allow_pipe: bool = False,
        no_single: bool = False,
    ) -> None:
        if not ctx.deterministic:
            raise ValueError("an evaluation loader needs a deterministic preprocessing context")
        self.name = name
        self.config = config
        self.ctx = ctx
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size or config.batch_size
        self.allow_pipe = allow_pipe
        self.no_single = no_single
        self.urls = tuple(expand_spec(shards, globs=True))
        if not self.urls:
            raise FlamingoError(
                f"the {name} eval shards {shards!r} name no shard",
                fix="give .tar files: a brace spec (dir/{00000..00009}.tar), a glob, or a "
                "folder holding .tar shards",
            )
        missing = missing_local(self.urls)
        if missing:
            raise FlamingoError(
                f"{len(missing)} {name} eval shard(s) do not exist: {', '.join(missing[:3])}",
                fix="check data.<dataset>.eval_shards or --shards (relative paths in a recipe "
                "are relative to the recipe's folder, on the command line to the current one)",
            )
        check_pipes(self.urls, allow_pipe)
        self.dropped: dict[str, int] = {}
        self.damaged_shards: dict[str, str] = {}

    def stream(self) -> EvalStream:
        preprocess, collate = sample_functions(self.config, self.ctx)
        return EvalStream(
            self.urls,
            rank=self.rank,
            world_size=self.world_size,
            workers=max(self.config.workers, 1),
            batch_size=self.batch_size,
            preprocess=preprocess,
            collate=collate,
            allow_pipe=self.allow_pipe,
            no_single=self.no_single,
        )

    def __iter__(self) -> Iterator[LoaderBatch]:
        loader = worker_loader(self.stream(), self.config.workers, self.config.prefetch_factor)
        per_worker: dict[int, dict[str, int]] = {}
        self.dropped = {}
        self.damaged_shards = {}
        for batch in batches_of(loader):
            per_worker[batch.worker] = batch.dropped
            self.damaged_shards.update(batch.damaged)
            total: Counter[str] = Counter()
            for counts in per_worker.values():
                total.update(counts)
            self.dropped = dict(sorted(total.items()))
            if batch.keys:
                yield batch

    def damage_note(self) -> str | None:
        """The damaged shards of the last pass, for the report; None when there were none."""
        if not self.damaged_shards:
            return None
        shards = " ".join(shlex.quote(printable_name(u)) for u in self.damaged_shards)
        return (
            f"{len(self.damaged_shards)} damaged shard(s) skipped where unreadable "
            f"(dropped tar_error): {'; '.join(self.damaged_shards.values())}. Fix: run "
            f"`flamingo inspect-shards {shards}`, then rewrite or re-download them"
        )

    def padding_batch(self) -> LoaderBatch:
        """One row whose labels are all masked: the forward pass of a rank with no data left."""
        tokens = self.ctx.tokens
        slots = self.config.max_num_images if isinstance(self.config, InterleavedConfig) else 1
        input_ids = torch.tensor([[tokens.image, tokens.eos]], dtype=torch.long)
        return LoaderBatch(
            images=torch.zeros((1, slots, *self.ctx.image_shape)),
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            labels=torch.full_like(input_ids, IGNORE),
            keys=[],
        )


@dataclass(frozen=True)
class BlendedEvalLoader:
    """The evaluation loaders of a blended dataset: one per source that has eval shards, in
    recipe order, by source name; each source loader is named `DATASET/SOURCE`. The dataset's
    loss is over all of them (docs/formats.md §11)."""

    name: str
    sources: dict[str, EvalLoader]

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(url for loader in self.sources.values() for url in loader.urls)


def make_eval_loader(
    name: str,
    config: DatasetConfig,
    shards: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    tokens: SpecialTokens,
    image_transform: ImageTransform,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    allow_pipe: bool = False,
    no_single: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> EvalLoader:
    """The evaluation loader of a dataset's `shards`, preprocessed as its config says; images
    declaring more than `max_image_pixels` count as corrupt."""
    ctx = Context.create(
        tokenizer,
        tokens,
        image_transform,
        fast_images=config.fast_images,
        deterministic=True,
        max_image_pixels=max_image_pixels,
    )
    return EvalLoader(
        name,
        config,
        ctx,
        shards,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        allow_pipe=allow_pipe,
        no_single=no_single,
    )
