"""Blended datasets in the loaders (docs/formats.md §7.2): proportions per worker count, the
same draws on a rerun, exact resume of every source, per-source counts, and loader states
written before blends."""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from open_clip.transform import image_transform

from flamingo_cli.data.loader import TrainLoader, make_loader
from flamingo_cli.data.pipeline import (
    SOURCE_NAME,
    LoaderBatch,
    RawSample,
    ShardStream,
    SourceSpec,
    StreamSpec,
    StreamStart,
    worker_loader,
)
from flamingo_cli.data.preprocess import Sample
from flamingo_cli.model.tokenizer import TINY_TOKENIZER, SpecialTokens, load_tokenizer
from flamingo_cli.recipe.schema import PairsConfig
from flamingo_cli.synthetic import write_dataset

WEIGHTS = {"big": 0.5, "mid": 0.3, "small": 0.2}


@pytest.fixture(scope="module")
def tok() -> tuple[Any, SpecialTokens]:
    return load_tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="module")
def blend_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three pair sources of 4 shards x 8 samples each."""
    root = tmp_path_factory.mktemp("blend")
    for seed, name in enumerate(WEIGHTS):
        write_dataset("laion", root / name, shards=4, per_shard=8, seed=seed)
    return root


def _source_only(raw: RawSample, rng: random.Random) -> Sample:
    """A preprocessing that keeps only which source a sample came from (no decoding)."""
    empty = torch.zeros(0, dtype=torch.long)
    return Sample(str(raw[SOURCE_NAME]), torch.zeros(0), empty, empty)


def _keys(samples: list[Sample]) -> LoaderBatch:
    empty = torch.zeros(0, dtype=torch.long)
    return LoaderBatch(torch.zeros(0), empty, empty, empty, [s.key for s in samples])


def _stream(root: Path, workers: int, batches_per_worker: int) -> ShardStream:
    sources = tuple(
        SourceSpec(tuple(str(root / n / f"{i:05d}.tar") for i in range(4)), True, n, w)
        for n, w in WEIGHTS.items()
    )
    spec = StreamSpec(sources, 11, 0, 0, 1, max(workers, 1), 16, 4, 50, batches_per_worker, False)
    return ShardStream(spec, StreamStart.fresh(max(workers, 1)), _source_only, _keys)


def _drawn_sources(root: Path, workers: int, draws: int) -> list[str]:
    per_worker = draws // 50 // max(workers, 1)
    loader = worker_loader(_stream(root, workers, per_worker), workers, 2)
    return [key for batch in loader for key in batch.keys]  # type: ignore[union-attr]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_blend_shares_follow_the_weights_for_any_worker_count(
    blend_root: Path, workers: int
) -> None:
    drawn = _drawn_sources(blend_root, workers, 20_000)
    assert len(drawn) == 20_000
    counts = collections.Counter(drawn)
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] / len(drawn) - weight) < 0.015, (name, counts)


def test_a_rerun_draws_the_same_sequence(blend_root: Path) -> None:
    first = _drawn_sources(blend_root, 2, 2_000)
    assert _drawn_sources(blend_root, 2, 2_000) == first
    # and another worker count draws another sequence with the same shares
    assert _drawn_sources(blend_root, 1, 2_000) != first


def blended(root: Path, **kw: Any) -> PairsConfig:
    base: dict[str, Any] = {
        "sources": [
            {"name": n, "shards": str(root / n / "{00000..00003}.tar"), "weight": w}
            for n, w in WEIGHTS.items()
        ],
        "batch_size": 3,
        "train_num_samples": 24,
        "shuffle_buffer": 6,
        "shuffle_initial": 3,
        "workers": 0,
        "resampled": True,
    }
    return PairsConfig(**(base | kw))


def build(config: PairsConfig, tok: tuple[Any, SpecialTokens], **kw: Any) -> TrainLoader:
    transform = image_transform(32, is_train=False)
    return make_loader(config, tok[0], tok[1], transform, seed=5, name="coyo", **kw)


def _consume(loader: TrainLoader, n: int | None = None) -> list[tuple[list[str], Any]]:
    """Keys and token ids of the batches (the sources share key names, not captions)."""
    seen: list[tuple[list[str], Any]] = []
    for batch in loader:
        seen.append((batch.keys, batch.input_ids.tolist()))
        if n is not None and len(seen) == n:
            break
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_a_blend_resumes_exactly_mid_epoch(
    blend_root: Path, tok: tuple[Any, SpecialTokens], workers: int
) -> None:
    config = blended(blend_root, workers=workers)
    straight = build(config, tok)
    whole = _consume(straight)
    first = build(config, tok)
    head = _consume(first, 3)
    resumed = build(config, tok)
    resumed.load_state_dict(first.state_dict())
    assert head + _consume(resumed) == whole
    assert resumed.source_counts() == straight.source_counts()
    assert resumed.dropped == straight.dropped


def test_per_source_counts_add_up_to_the_batches(
    blend_root: Path, tok: tuple[Any, SpecialTokens]
) -> None:
    loader = build(blended(blend_root), tok)
    batches = _consume(loader)
    counts = loader.source_counts()
    samples = {k: v for k, v in counts.items() if k.startswith("samples/")}
    assert sorted(samples) == [f"samples/coyo/{n}" for n in sorted(WEIGHTS)]
    assert sum(samples.values()) == sum(len(keys) for keys, _ in batches) == 24
    assert all(counts[f"samples/coyo/{n}"] > 0 for n in WEIGHTS)


def test_per_source_drops_are_counted_under_their_source(
    blend_root: Path, tok: tuple[Any, SpecialTokens], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive" * 64)
    config = blended(blend_root)
    sources = [s.model_dump() for s in config.sources or []]
    sources[1]["shards"] = f"{sources[1]['shards']}::{junk}"  # "mid" gets a damaged shard
    loader = build(PairsConfig(**(config.model_dump() | {"sources": sources})), tok)
    _consume(loader)
    counts = loader.source_counts()
    dropped = {k: v for k, v in counts.items() if k.startswith("dropped_by_source/")}
    assert list(dropped) == ["dropped_by_source/coyo/mid/tar_error"]
    assert dropped["dropped_by_source/coyo/mid/tar_error"] == loader.dropped["tar_error"] > 0


def test_a_loader_state_from_before_blends_resumes(
    blend_root: Path, tok: tuple[Any, SpecialTokens]
) -> None:
    config = PairsConfig(
        shards=str(blend_root / "big" / "{00000..00003}.tar"),
        batch_size=3,
        train_num_samples=24,
        shuffle_buffer=6,
        shuffle_initial=3,
        workers=0,
    )
    transform = image_transform(32, is_train=False)
    whole = _consume(make_loader(config, tok[0], tok[1], transform, seed=5))
    first = make_loader(config, tok[0], tok[1], transform, seed=5)
    head = _consume(first, 2)
    # the keys a checkpoint of the previous release held, and no others
    old_keys = [
        "version",
        "dataset",
        "epoch",
        "batches",
        "rank",
        "world_size",
        "workers",
        "worker_batches",
        "drawn",
        "worker_dropped",
        "dropped_before",
    ]
    state = {k: v for k, v in first.state_dict().items() if k in old_keys}
    resumed = make_loader(config, tok[0], tok[1], transform, seed=5)
    resumed.load_state_dict(state)
    assert head + _consume(resumed) == whole
    assert resumed.source_counts() == {}


def test_a_blend_continues_on_another_worker_count(
    blend_root: Path, tok: tuple[Any, SpecialTokens]
) -> None:
    """No saved position fits another worker count: the loader skips its share of draws and
    yields the rest of the epoch (approximately the batches an unchanged run would see)."""
    first = build(blended(blend_root, workers=0), tok)
    _consume(first, 3)
    other = build(blended(blend_root, workers=2), tok)
    with pytest.raises(Exception, match="this run has 1 and 2"):
        other.load_state_dict(first.state_dict())
    other.skip_to(first.batches)
    rest = _consume(other)
    assert len(rest) == other.num_batches - 3 == 5
    counts = other.source_counts()
    assert sum(v for k, v in counts.items() if k.startswith("samples/")) == 5 * 3
