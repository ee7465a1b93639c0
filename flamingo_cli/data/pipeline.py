"""webdataset pipelines: shard lists, tar reading through our opener, shuffling, batching.

One rank's epoch is split among `w` logical workers; logical worker `k` reads its own
deterministic stream of samples, preprocesses them and yields `batches_per_worker` full batches.
Every batch carries the worker's count of samples drawn from its shuffle buffer and its drop
counters, which is all a restart needs to replay the stream without decoding anything.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from flamingo_cli.data.preprocess import CORRUPT_IMAGES, Dropped, Sample, sample_rng
from flamingo_cli.errors import FlamingoError, OpenerError
from flamingo_cli.shards.opener import open_url

RawSample = dict[str, Any]
Preprocess = Callable[[RawSample, random.Random], Sample]
Collate = Callable[[list[Sample]], "Batch"]

# Passes over a worker's shards that may yield no usable sample before we give up.
_FRUITLESS_PASSES = 3


@dataclass
class Batch:
    """A training batch and the position of the stream that produced it.

    images `(B, N, 3, H, W)` float (N = 1 for LAION, max_num_images for MMC4, zero-padded);
    input_ids, attention_mask, labels `(B, L)` long (labels -100 where masked); the k-th
    `<image>` token of a row belongs to `images[row, k]`. `worker`, `drawn` and `dropped`
    are the loader's bookkeeping for exact resume and drop metrics.
    """

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    worker: int = 0
    drawn: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return Batch(
            self.images.pin_memory(),
            self.input_ids.pin_memory(),
            self.attention_mask.pin_memory(),
            self.labels.pin_memory(),
            self.keys,
            self.worker,
            self.drawn,
            self.dropped,
        )

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """The same batch with its tensors on `device`."""
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.keys,
            self.worker,
            self.drawn,
            self.dropped,
        )


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the sample stream of one rank in one epoch."""

    urls: tuple[str, ...]
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int  # logical workers, at least 1 (DataLoader workers, or 1 in-process)
    resampled: bool
    shuffle_buffer: int
    shuffle_initial: int
    batch_size: int
    batches_per_worker: int
    allow_pipe: bool


@dataclass(frozen=True)
class StreamStart:
    """Where each logical worker resumes: batches consumed, samples drawn, drops so far."""

    rotation: int
    worker_batches: tuple[int, ...]
    drawn: tuple[int, ...]
    dropped: tuple[dict[str, int], ...]

    @classmethod
    def fresh(cls, workers: int) -> StreamStart:
        return cls(0, (0,) * workers, (0,) * workers, tuple({} for _ in range(workers)))


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and Python versions."""
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def split_by_node(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards of one rank: every `world_size`-th one (explicit, no torch.distributed query)."""
    return list(urls[rank::world_size])


def split_by_worker(urls: Sequence[str], worker: int, workers: int) -> list[str]:
    """The shards of one loader worker within a rank."""
    return list(urls[worker::workers])


def pass_urls(spec: StreamSpec, worker: int, index: int) -> list[str]:
    """Shards of one pass of a logical worker.

    Resampled: len(urls) draws with replacement from a generator of (seed, epoch, rank, worker,
    pass). Otherwise the whole list shuffled by (seed, epoch, pass), the same on every rank,
    then split by node and by worker.
    """
    if spec.resampled:
        rng = random.Random(
            derive_seed("resample", spec.seed, spec.epoch, spec.rank, worker, index)
        )
        return [rng.choice(spec.urls) for _ in spec.urls]
    order = list(spec.urls)
    random.Random(derive_seed("shards", spec.seed, spec.epoch, index)).shuffle(order)
    mine = split_by_node(order, spec.rank, spec.world_size)
    return split_by_worker(mine, worker, spec.workers)


def open_shards(
    src: Iterable[dict[str, Any]], *, allow_pipe: bool, handler: Callable[[BaseException], bool]
) -> Iterator[dict[str, Any]]:
    """webdataset's URL-opener stage, through `open_url`; each stream is closed once read."""
    for item in src:
        url = item["url"]
        try:
            stream = open_url(url, allow_pipe=allow_pipe)
        except OpenerError as exc:
            if handler(exc):
                continue
            raise
        with stream:
            yield {**item, "stream": stream}


def read_stages(
    urls: Sequence[str], *, allow_pipe: bool, handler: Callable[[BaseException], bool]
) -> list[Any]:
    """The stages that turn shard URLs, in the given order, into raw samples (dicts of members);
    tar errors go to `handler`, which returns True to skip and go on."""
    return [
        wds.SimpleShardList(list(urls)),
        functools.partial(open_shards, allow_pipe=allow_pipe, handler=handler),
        functools.partial(tar_file_expander, handler=handler),
        functools.partial(group_by_keys, handler=handler),
    ]


def number_and_skip(
    src: Iterable[RawSample], *, skip: int, progress: list[int], on_skipped: Callable[[], None]
) -> Iterator[tuple[int, RawSample]]:
    """Number samples 1, 2, ...; pass over the first `skip` untouched (fast-forward)."""
    for drawn, sample in enumerate(src, start=1):
        if drawn <= skip:
            progress[1] += 1
            if drawn == skip:
                on_skipped()
            continue
        yield drawn, sample


def prepare(
    src: Iterable[tuple[int, RawSample]],
    *,
    preprocess: Preprocess,
    seed: int,
    epoch: int,
    counters: Counter[str],
    progress: list[int],
) -> Iterator[tuple[int, Sample]]:
    """Preprocess each sample with its own generator; count drops by reason."""
    for drawn, raw in src:
        key = str(raw.get("__key__", ""))
        try:
            sample = preprocess(raw, sample_rng(seed, epoch, key))
        except Dropped as dropped:
            counters[dropped.reason] += 1
            if dropped.corrupt_images:
                counters[CORRUPT_IMAGES] += dropped.corrupt_images
            continue
        if sample.corrupt_images:
            counters[CORRUPT_IMAGES] += sample.corrupt_images
        progress[0] += 1
        yield drawn, sample


def batch_up(
    src: Iterable[tuple[int, Sample]],
    *,
    size: int,
    collate: Collate,
    worker: int,
    counters: Counter[str],
) -> Iterator[Batch]:
    """Full batches only, yielded as soon as the last sample is in (so the stamp is exact)."""
    pending: list[Sample] = []
    for drawn, sample in src:
        pending.append(sample)
        if len(pending) == size:
            batch = collate(pending)
            batch.worker, batch.drawn, batch.dropped = worker, drawn, dict(counters)
            yield batch
            pending = []


class ShardStream(IterableDataset[Batch]):
    """The batches of one rank for one epoch, split among DataLoader workers."""

    def __init__(
        self,
        spec: StreamSpec,
        start: StreamStart,
        preprocess: Preprocess,
        collate: Collate,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.start = start
        self.preprocess = preprocess
        self.collate = collate

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # after a restart the worker due next is DataLoader worker 0: rotate the roles
        worker = (physical + self.start.rotation) % self.spec.workers
        remaining = self.spec.batches_per_worker - self.start.worker_batches[worker]
        if remaining <= 0:
            return iter(())
        return itertools.islice(self.batches(worker), remaining)

    def batches(self, worker: int) -> Iterator[Batch]:
        """The endless batch stream of logical worker `worker`, from its resume point."""
        spec = self.spec
        counters: Counter[str] = Counter()
        progress = [0, 0]  # samples accepted, samples skipped

        def skipped() -> None:
            # replayed tar errors were counted before the restart too: take the saved counters
            counters.clear()
            counters.update(self.start.dropped[worker])

        def handler(exc: BaseException) -> bool:
            counters["tar_error"] += 1
            return True

        pipeline = wds.DataPipeline(
            functools.partial(self.raw_samples, worker, handler, progress),
            functools.partial(
                number_and_skip,
                skip=self.start.drawn[worker],
                progress=progress,
                on_skipped=skipped,
            ),
            functools.partial(
                prepare,
                preprocess=self.preprocess,
                seed=spec.seed,
                epoch=spec.epoch,
                counters=counters,
                progress=progress,
            ),
            functools.partial(
                batch_up,
                size=spec.batch_size,
                collate=self.collate,
                worker=worker,
                counters=counters,
            ),
        )
        return iter(pipeline)

    def raw_samples(
        self, worker: int, handler: Callable[[BaseException], bool], progress: list[int]
    ) -> Iterator[RawSample]:
        """Raw samples of successive passes over the worker's shards, each pass shuffled."""
        spec = self.spec
        fruitless = 0
        for index in itertools.count():
            urls = pass_urls(spec, worker, index)
            before = (progress[0], progress[1])
            reader = wds.DataPipeline(
                *read_stages(urls, allow_pipe=spec.allow_pipe, handler=handler),
                wds.shuffle(
                    spec.shuffle_buffer,
                    spec.shuffle_initial,
                    rng=random.Random(
                        derive_seed("samples", spec.seed, spec.epoch, spec.rank, worker, index)
                    ),
                ),
            )
            yield from reader
            fruitless = fruitless + 1 if (progress[0], progress[1]) == before else 0
            if fruitless >= _FRUITLESS_PASSES:
                raise FlamingoError(
                    f"{_FRUITLESS_PASSES} passes over the shards of loader worker {worker} "
                    f"(rank {spec.rank}) gave no usable sample",
                    fix="run `flamingo inspect-shards` on these shards: they are empty, "
                    "unreadable, or every sample is dropped by the filters",
                )
