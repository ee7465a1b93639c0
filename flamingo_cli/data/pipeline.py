"""webdataset pipelines: shard lists, tar reading through our opener, shuffling, batching.

One rank's epoch is split among `w` logical workers; logical worker `k` reads its own
deterministic stream of samples, preprocesses them and yields `batches_per_worker` full batches.
A blended dataset's worker draws each sample from one of its sources by a seeded generator
(docs/formats.md §7). Every batch carries the worker's count of samples drawn and its drop
counters, which is all a restart needs to replay the stream without decoding anything.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import random
import re
import shlex
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from flamingo_cli.data.preprocess import CORRUPT_IMAGES, Dropped, Sample, sample_rng
from flamingo_cli.data.worker_signals import leave_stop_signals_to_parent
from flamingo_cli.errors import FlamingoError, OpenerError
from flamingo_cli.shards.opener import open_url
from flamingo_cli.shards.spec import url_kind
from flamingo_cli.shards.tar import TarReader, is_utf8, printable_name, split_member

RawSample = dict[str, Any]
Preprocess = Callable[[RawSample, random.Random], Sample]
Collate = Callable[[list[Sample]], "LoaderBatch"]

T = TypeVar("T")

# Passes in a row over a worker's shards that may yield no usable sample before we give up
# (at least, with every shard tried; at most).
_FRUITLESS_PASSES = 3
_MAX_FRUITLESS_PASSES = 50
# webdataset's tar reader skips these members (`__key__`-style metadata files)
_META = re.compile(r"__[^/]*__($|/)")
# damaged shards named in the error that stops a worker with no usable sample
_NAMED_SHARDS = 5


@dataclass
class LoaderBatch:
    """What a loader yields: a batch and the position of the stream that produced it.

    images `(B, N, 3, H, W)` float (N = 1 for LAION, max_num_images for MMC4, zero-padded);
    input_ids, attention_mask, labels `(B, L)` long (labels -100 where masked); the k-th
    `<image>` token of a row belongs to `images[row, k]`. `worker`, `drawn` and `dropped`
    are the loader's bookkeeping for exact resume and drop metrics (`source_samples` and
    `source_dropped` the same per source of a blend); `damaged` names the shards the worker
    found damaged since its previous batch (shard -> what is wrong).
    """

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    worker: int = 0
    drawn: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    source_samples: dict[str, int] = field(default_factory=dict)
    source_dropped: dict[str, dict[str, int]] = field(default_factory=dict)

    def pin_memory(self) -> LoaderBatch:
        """Called by DataLoader(pin_memory=True)."""
        return self._with(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> LoaderBatch:
        """The same batch with its tensors on `device`."""
        return self._with(lambda t: t.to(device, non_blocking=non_blocking))

    def _with(self, move: Callable[[torch.Tensor], torch.Tensor]) -> LoaderBatch:
        return dataclasses.replace(
            self,
            images=move(self.images),
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
        )


@dataclass(frozen=True)
class StreamFailure:
    """What a worker sends instead of a batch when it cannot go on: the loader raises it as a
    FlamingoError in the training process (torch would turn a worker's exception into its
    traceback as the message, and drop the fix)."""

    message: str
    fix: str | None = None

    def error(self) -> FlamingoError:
        return FlamingoError(self.message, fix=self.fix)


@dataclass
class ReadLog:
    """What reading shards met, for one logical worker: drop counters by reason (shared with
    preprocessing), the same per source of a blend, samples accepted per blended source, the
    samples accepted and skipped per source index (progress), and the damaged shards, each
    named once (`take_damaged` hands over the ones not yet reported)."""

    counters: Counter[str] = field(default_factory=Counter)
    damaged: dict[str, str] = field(default_factory=dict)
    source_dropped: dict[str, Counter[str]] = field(default_factory=dict)
    source_samples: Counter[str] = field(default_factory=Counter)
    progress: dict[int, list[int]] = field(default_factory=dict)
    _reported: int = 0

    def count(self, reason: str, source: str | None, n: int = 1) -> None:
        """`n` more samples dropped for `reason` (a blended source's also counted as its own)."""
        self.counters[reason] += n
        if source is not None:
            self.source_dropped.setdefault(source, Counter())[reason] += n

    def accepted(self, index: int, source: str | None) -> None:
        self.progress_of(index)[0] += 1
        if source is not None:
            self.source_samples[source] += 1

    def progress_of(self, index: int) -> list[int]:
        """[samples accepted, samples skipped] of source `index` (a pass that moves neither
        gave nothing)."""
        return self.progress.setdefault(index, [0, 0])

    def damage(self, url: str, message: str, source: str | None = None) -> None:
        """A shard that could not be read to its end: one `tar_error` per pass over it."""
        self.count("tar_error", source)
        self.damaged.setdefault(url, message)

    def handler_for(self, source: str | None) -> Callable[[BaseException], bool]:
        """webdataset's error hook (grouping members into samples): count and go on."""

        def handler(exc: BaseException) -> bool:
            self.count("tar_error", source)
            return True

        return handler

    def restore(self, start: StreamStart, worker: int) -> None:
        """Take a restart's saved counters (replayed samples were counted before it)."""
        self.counters = Counter(start.dropped[worker])
        saved = start.source_dropped[worker] if start.source_dropped else {}
        self.source_dropped = {s: Counter(c) for s, c in saved.items()}
        samples = start.source_samples[worker] if start.source_samples else {}
        self.source_samples = Counter(samples)

    def stamp(self, batch: LoaderBatch, worker: int) -> LoaderBatch:
        """Put this worker's bookkeeping on a batch it yields."""
        batch.worker, batch.dropped = worker, dict(self.counters)
        batch.source_samples = dict(self.source_samples)
        batch.source_dropped = {s: dict(c) for s, c in self.source_dropped.items()}
        batch.damaged = self.take_damaged()
        return batch

    def take_damaged(self) -> dict[str, str]:
        """The damaged shards found since the previous call."""
        items = list(self.damaged.items())[self._reported :]
        self._reported = len(self.damaged)
        return dict(items)


@dataclass(frozen=True)
class SourceSpec:
    """One source of a dataset's stream: its shards, how they are drawn, its blend weight."""

    urls: tuple[str, ...]
    resampled: bool
    # a blended source's name, part of its seeds (docs/formats.md §7); None for a dataset's
    # own `shards`, whose seeds stay those of §5.8
    name: str | None = None
    weight: float = 1.0

    @property
    def label(self) -> str:
        return "" if self.name is None else f" source {self.name}"


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the sample stream of one rank in one epoch."""

    sources: tuple[SourceSpec, ...]
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int  # logical workers, at least 1 (DataLoader workers, or 1 in-process)
    shuffle_buffer: int
    shuffle_initial: int
    batch_size: int
    batches_per_worker: int
    allow_pipe: bool
    name: str = "dataset"  # in messages: data.NAME


@dataclass(frozen=True)
class StreamStart:
    """Where each logical worker resumes: batches consumed, samples drawn, drops so far (and
    per blended source: samples accepted, drops; empty tuples for none)."""

    rotation: int
    worker_batches: tuple[int, ...]
    drawn: tuple[int, ...]
    dropped: tuple[dict[str, int], ...]
    source_samples: tuple[dict[str, int], ...] = ()
    source_dropped: tuple[dict[str, dict[str, int]], ...] = ()

    @classmethod
    def fresh(cls, workers: int) -> StreamStart:
        return cls(0, (0,) * workers, (0,) * workers, tuple({} for _ in range(workers)))


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and Python versions."""
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def check_pipes(urls: Sequence[str], allow_pipe: bool) -> None:
    """Refuse `pipe:` shards (they run shell commands) unless allowed; the opener raises the
    error with its fix."""
    pipe = next((u for u in urls if url_kind(u) == "pipe"), None)
    if pipe is not None and not allow_pipe:
        open_url(pipe)


def worker_loader(
    stream: IterableDataset[T],
    workers: int,
    prefetch_factor: int,
    generator: torch.Generator | None = None,
) -> DataLoader[T]:
    """A DataLoader over a stream that batches itself, in `workers` processes (0: this one).

    The workers leave stop signals to the trainer (data/worker_signals.py)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        worker_init_fn=leave_stop_signals_to_parent,
        generator=generator,
        pin_memory=torch.cuda.is_available(),  # page-locked: the step's copies do not block
    )


def batches_of(loader: DataLoader[T]) -> Iterator[T]:
    """Iterate a DataLoader; when done (or closed), shut its workers down and wait for the
    threads that fed its workers' queues to end. CPython 3.11 can deadlock a child forked while
    a thread is ending (the child waits forever on the interpreter's thread-list lock), and
    the next loader forks its workers right after this one (periodic evaluation, epochs)."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        # torch's own clean-up, then the feeder thread of each worker's index queue (torch
        # closes the queues without waiting for them)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        for queue in getattr(iterator, "_index_queues", []):
            feeder = getattr(queue, "_thread", None)
            if isinstance(feeder, threading.Thread) and feeder is not threading.current_thread():
                feeder.join(timeout=10)


def split_by_node(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards of one rank: every `world_size`-th one (explicit, no torch.distributed query)."""
    return list(urls[rank::world_size])


def split_by_worker(urls: Sequence[str], worker: int, workers: int) -> list[str]:
    """The shards of one loader worker within a rank."""
    return list(urls[worker::workers])


def _seed_parts(tag: str, source: SourceSpec) -> tuple[object, ...]:
    """A seed's leading parts: its tag, then a blended source's name (docs/formats.md §7)."""
    return (tag,) if source.name is None else (tag, source.name)


def pass_urls(spec: StreamSpec, source: SourceSpec, worker: int, index: int) -> list[str]:
    """Shards of one pass of a logical worker over one source (docs/formats.md §5.8).

    Resampled: len(urls) draws with replacement from a generator of (seed, epoch, rank, worker,
    pass). Otherwise the whole list shuffled by (seed, epoch, pass), the same on every rank,
    then split by node and by worker.
    """
    if source.resampled:
        rng = random.Random(
            derive_seed(
                *_seed_parts("resample", source), spec.seed, spec.epoch, spec.rank, worker, index
            )
        )
        return [rng.choice(source.urls) for _ in source.urls]
    order = list(source.urls)
    random.Random(
        derive_seed(*_seed_parts("shards", source), spec.seed, spec.epoch, index)
    ).shuffle(order)
    mine = split_by_node(order, spec.rank, spec.world_size)
    return split_by_worker(mine, worker, spec.workers)


def tar_members(
    src: Iterable[dict[str, Any]], *, allow_pipe: bool, log: ReadLog, source: str | None = None
) -> Iterator[dict[str, Any]]:
    """webdataset's opener and tar stages in one, on our tar reader: the members of each shard
    as `{"fname", "data", "__url__"}`, then `{}` at its end (webdataset's end-of-shard mark).

    Unlike Python's tarfile, which ends a shard quietly at a corrupt header, the reader says
    why and where it stopped: an unreadable or damaged shard is one `tar_error` per pass, named
    in `log`. Members whose name is not UTF-8 are skipped and counted (`bad_name`, once per
    sample key): their key cannot seed a sample's generator nor appear in a message.
    """
    for item in src:
        url = item["url"]
        try:
            yield from _shard_members(url, allow_pipe, log, source)
        except OpenerError as exc:  # cannot open, or a stream failed while being read
            log.damage(url, exc.message, source)
        yield {}


def _shard_members(
    url: str, allow_pipe: bool, log: ReadLog, source: str | None
) -> Iterator[dict[str, Any]]:
    bad_key: str | None = None
    with TarReader(url, allow_pipe=allow_pipe, want=_every_member) as reader:
        for member, data in reader:
            name = member.name
            if _META.match(name):
                continue  # as webdataset: metadata members
            if not is_utf8(name):
                key = split_member(name)[0]
                if key != bad_key:
                    log.count("bad_name", source)
                    bad_key = key
                continue
            yield {"fname": name, "data": data, "__url__": url}
    if reader.damage is not None:
        log.damage(url, f"tar shard {printable_name(url)} {reader.damage.message}", source)


def _every_member(name: str) -> bool:
    return True


def read_stages(
    urls: Sequence[str], *, allow_pipe: bool, log: ReadLog, source: str | None = None
) -> list[Any]:
    """The stages that turn shard URLs, in the given order, into raw samples (dicts of members);
    damage is counted in `log` (and for a blended `source`) and reading goes on."""
    return [
        wds.SimpleShardList(list(urls)),
        functools.partial(tar_members, allow_pipe=allow_pipe, log=log, source=source),
        functools.partial(group_by_keys, handler=log.handler_for(source)),
    ]


# raw-sample fields the blend adds: the source's index and its name (None: not blended)
SOURCE_INDEX = "__source_index__"
SOURCE_NAME = "__source__"


def number_and_skip(
    src: Iterable[RawSample], *, skip: int, log: ReadLog, on_skipped: Callable[[], None]
) -> Iterator[tuple[int, RawSample]]:
    """Number samples 1, 2, ...; pass over the first `skip` untouched (fast-forward)."""
    for drawn, sample in enumerate(src, start=1):
        if drawn <= skip:
            log.progress_of(sample.get(SOURCE_INDEX, 0))[1] += 1
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
    log: ReadLog,
) -> Iterator[tuple[int, Sample]]:
    """Preprocess each sample with its own generator; count drops by reason (and source)."""
    for drawn, raw in src:
        key = str(raw.get("__key__", ""))
        source = raw.get(SOURCE_NAME)
        try:
            sample = preprocess(raw, sample_rng(seed, epoch, key))
        except Dropped as dropped:
            log.count(dropped.reason, source)
            if dropped.corrupt_images:
                log.count(CORRUPT_IMAGES, source, dropped.corrupt_images)
            continue
        if sample.corrupt_images:
            log.count(CORRUPT_IMAGES, source, sample.corrupt_images)
        log.accepted(raw.get(SOURCE_INDEX, 0), source)
        yield drawn, sample


def batch_up(
    src: Iterable[tuple[int, Sample]],
    *,
    size: int,
    collate: Collate,
    worker: int,
    log: ReadLog,
) -> Iterator[LoaderBatch]:
    """Full batches only, yielded as soon as the last sample is in (so the stamp is exact)."""
    pending: list[Sample] = []
    for drawn, sample in src:
        pending.append(sample)
        if len(pending) == size:
            batch = log.stamp(collate(pending), worker)
            batch.drawn = drawn
            yield batch
            pending = []


class ShardStream(IterableDataset[LoaderBatch | StreamFailure]):
    """The batches of one rank for one epoch, split among DataLoader workers.

    A worker that cannot go on yields one `StreamFailure` and stops."""

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

    def __iter__(self) -> Iterator[LoaderBatch | StreamFailure]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # after a restart the worker due next is DataLoader worker 0: rotate the roles
        worker = (physical + self.start.rotation) % self.spec.workers
        remaining = self.spec.batches_per_worker - self.start.worker_batches[worker]
        if remaining <= 0:
            return iter(())
        return _failures_as_items(itertools.islice(self.batches(worker), remaining))

    def batches(self, worker: int) -> Iterator[LoaderBatch]:
        """The endless batch stream of logical worker `worker`, from its resume point."""
        spec = self.spec
        log = ReadLog()
        pipeline = wds.DataPipeline(
            functools.partial(self.raw_samples, worker, log),
            functools.partial(
                number_and_skip,
                skip=self.start.drawn[worker],
                log=log,
                # replayed tar errors were counted before the restart too: take the saved ones
                on_skipped=functools.partial(log.restore, self.start, worker),
            ),
            functools.partial(
                prepare,
                preprocess=self.preprocess,
                seed=spec.seed,
                epoch=spec.epoch,
                log=log,
            ),
            functools.partial(
                batch_up,
                size=spec.batch_size,
                collate=self.collate,
                worker=worker,
                log=log,
            ),
        )
        return iter(pipeline)

    def raw_samples(self, worker: int, log: ReadLog) -> Iterator[RawSample]:
        """The worker's raw samples: its one source's, or each drawn from a blend's sources
        in proportion to their weights by a generator of (seed, epoch, rank, worker)."""
        spec = self.spec
        if len(spec.sources) == 1 and spec.sources[0].name is None:
            return self.source_samples(0, worker, log)
        return _blend(
            [self.source_samples(i, worker, log) for i in range(len(spec.sources))],
            [source.weight for source in spec.sources],
            random.Random(derive_seed("blend", spec.seed, spec.epoch, spec.rank, worker)),
        )

    def source_samples(self, index: int, worker: int, log: ReadLog) -> Iterator[RawSample]:
        """Raw samples of successive passes over the worker's shards of one source, each pass
        shuffled; a blended source's samples carry its index and name."""
        spec = self.spec
        source = spec.sources[index]
        progress = log.progress_of(index)
        shards = len(set(source.urls))
        fruitless = 0  # passes in a row without a usable sample
        tried: set[str] = set()  # and their shards
        for number in itertools.count():
            urls = pass_urls(spec, source, worker, number)
            before = (progress[0], progress[1])
            reader = wds.DataPipeline(
                *read_stages(urls, allow_pipe=spec.allow_pipe, log=log, source=source.name),
                wds.shuffle(
                    spec.shuffle_buffer,
                    spec.shuffle_initial,
                    rng=random.Random(
                        derive_seed(
                            *_seed_parts("samples", source),
                            spec.seed,
                            spec.epoch,
                            spec.rank,
                            worker,
                            number,
                        )
                    ),
                ),
            )
            for raw in reader:
                if source.name is not None:
                    raw[SOURCE_INDEX], raw[SOURCE_NAME] = index, source.name
                yield raw
            if (progress[0], progress[1]) != before:
                fruitless = 0
                tried.clear()
                continue
            fruitless += 1
            tried.update(urls)
            # hopeless once every shard was tried (a resampled or reshuffled pass may just
            # have drawn only the bad ones), or after many passes in any case
            covered = len(tried) == shards or fruitless >= _MAX_FRUITLESS_PASSES
            if fruitless >= _FRUITLESS_PASSES and covered:
                raise _no_usable_sample(spec, source, worker, fruitless, tried, log)


def _blend(
    streams: Sequence[Iterator[RawSample]], weights: Sequence[float], rng: random.Random
) -> Iterator[RawSample]:
    """Each sample from the stream whose share of the cumulative weights holds the next draw
    of `rng` (docs/formats.md §7): one `random()` per sample, so replaying `n` draws puts
    every stream where it was."""
    bounds = list(itertools.accumulate(weights))
    total = bounds[-1]
    last = len(streams) - 1
    while True:
        index = min(bisect.bisect_right(bounds, rng.random() * total), last)
        yield next(streams[index])


def _no_usable_sample(
    spec: StreamSpec, source: SourceSpec, worker: int, passes: int, tried: set[str], log: ReadLog
) -> FlamingoError:
    """The error of a worker whose passes give nothing: its damaged shards named, the fix."""
    where = (
        f"data.{spec.name}{source.label}: {passes} passes over the shards of loader worker {worker} "
        f"(rank {spec.rank}) gave no usable sample"
    )
    damaged = [u for u in log.damaged if u in tried]
    if not damaged:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(log.counters.items())) or "none"
        return FlamingoError(
            f"{where} (dropped: {dropped})",
            fix="run `flamingo inspect-shards --deep` on these shards: every sample is dropped "
            "by the filters, or the shards are empty",
        )
    named = damaged[:_NAMED_SHARDS]
    more = f"; {len(damaged) - len(named)} more" if len(damaged) > len(named) else ""
    shown = " ".join(shlex.quote(printable_name(u)) for u in named)
    return FlamingoError(
        f"{where}; unreadable or damaged: {'; '.join(log.damaged[u] for u in named)}{more}",
        fix=f"run `flamingo inspect-shards {shown}`, then rewrite or re-download these "
        f"shards, or leave them out of data.{spec.name}"
        + (".shards" if source.name is None else f" source {source.name}'s shards"),
    )


def _failures_as_items(batches: Iterator[LoaderBatch]) -> Iterator[LoaderBatch | StreamFailure]:
    """The batches, and a FlamingoError raised while making them as a last StreamFailure."""
    try:
        yield from batches
    except FlamingoError as exc:
        yield StreamFailure(exc.message, exc.fix)
