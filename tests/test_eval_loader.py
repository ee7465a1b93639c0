"""Evaluation loader: deterministic preprocessing, every sample exactly once across ranks and
workers, padding batches, and training preprocessing left as it was."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from open_clip.transform import image_transform

from flamingo_cli.data.eval_loader import EvalLoader, eval_slice, make_eval_loader
from flamingo_cli.data.preprocess import (
    Context,
    decode_image,
    preprocess_document,
    preprocess_pair,
)
from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.tokenizer import TINY_TOKENIZER, SpecialTokens, load_tokenizer
from flamingo_cli.recipe.schema import DatasetConfig, InterleavedConfig, PairsConfig
from flamingo_cli.shards.write import write_tar
from flamingo_cli.synthetic import laion_samples, mmc4_samples

TRANSFORM = image_transform(32, is_train=False)


@pytest.fixture(scope="module")
def tok() -> tuple[Any, SpecialTokens]:
    return load_tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """LAION shards of 5, 9 and 2 samples; MMC4 shards of 3 and 4 documents."""
    root = tmp_path_factory.mktemp("eval-shards")
    laion = []
    for shard, count in enumerate((5, 9, 2)):
        path = root / f"laion-{shard}.tar"
        write_tar(path, laion_samples(shard, count, seed=3))
        laion.append(str(path))
    mmc4 = []
    for shard, count in enumerate((3, 4)):
        path = root / f"mmc4-{shard}.tar"
        write_tar(path, mmc4_samples(shard, count, seed=3, images_per_doc=1 + shard))
        mmc4.append(str(path))
    return {"laion": laion, "mmc4": mmc4}


def _loader(
    tok: tuple[Any, SpecialTokens], kind: str, shards: list[str], **kwargs: Any
) -> EvalLoader:
    tokenizer, special = tok
    config: DatasetConfig
    workers = kwargs.pop("workers", 0)
    if kind == "laion":
        config = PairsConfig(shards="unused.tar", batch_size=4, workers=workers)
    else:
        config = InterleavedConfig(
            shards="unused.tar", batch_size=2, workers=workers, max_tokens=64
        )
    return make_eval_loader(kind, config, shards, tokenizer, special, TRANSFORM, **kwargs)


def _keys(loader: EvalLoader) -> list[str]:
    return [k for batch in loader for k in batch.keys]


def test_slices_cover_every_shard_or_sample_once() -> None:
    urls = ["a", "b", "c"]
    by_shard = [eval_slice(urls, slot, 2) for slot in range(2)]
    assert [(s.urls, s.offset, s.stride) for s in by_shard] == [
        (("a", "c"), 0, 1),
        (("b",), 0, 1),
    ]
    by_sample = [eval_slice(urls, slot, 4) for slot in range(4)]
    assert [(s.urls, s.offset, s.stride) for s in by_sample] == [
        (("a", "b", "c"), k, 4) for k in range(4)
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_laion_sample_once_in_shard_order(
    tok: tuple[Any, SpecialTokens], uneven: dict[str, list[str]], world_size: int
) -> None:
    expected = [f"{shard:05d}{i:04d}" for shard, n in enumerate((5, 9, 2)) for i in range(n)]
    seen: list[str] = []
    for rank in range(world_size):
        loader = _loader(tok, "laion", uneven["laion"], rank=rank, world_size=world_size)
        keys = _keys(loader)
        assert keys == _keys(loader)  # a second pass gives the same batches
        seen += keys
    assert sorted(seen) == sorted(expected)
    assert len(seen) == len(set(seen))
    if world_size == 1:
        assert seen == expected  # fixed order: the shards as listed, their samples in order


def test_workers_split_the_samples_and_batches_keep_the_rest(
    tok: tuple[Any, SpecialTokens], uneven: dict[str, list[str]]
) -> None:
    loader = _loader(tok, "laion", uneven["laion"], workers=2)
    sizes = [len(b.keys) for b in loader]
    # worker 0 reads shards 0 and 2 (7 samples: 4 + 3), worker 1 shard 1 (9: 4 + 4 + 1),
    # interleaved by the DataLoader; partial batches are kept
    assert sorted(sizes) == [1, 3, 4, 4, 4]
    assert sum(sizes) == 16
    merged = _loader(tok, "laion", uneven["laion"], workers=2, no_single=True)
    assert sorted(len(b.keys) for b in merged) == [3, 4, 4, 5]


def test_mmc4_keeps_single_image_documents_and_never_flips(
    tok: tuple[Any, SpecialTokens], uneven: dict[str, list[str]]
) -> None:
    # shard 0 has single-image documents, which training drops half of at random
    loader = _loader(tok, "mmc4", uneven["mmc4"])
    batches = list(loader)
    assert [k for b in batches for k in b.keys] == [
        *(f"mmc4-00000-{i:04d}" for i in range(3)),
        *(f"mmc4-00001-{i:04d}" for i in range(4)),
    ]
    assert loader.dropped == {}
    tokenizer, special = tok
    ctx = Context.create(tokenizer, special, TRANSFORM, deterministic=True)
    config = InterleavedConfig(shards="x.tar", max_tokens=64)
    sample = next(iter(mmc4_samples(0, 1, seed=3, images_per_doc=1)))
    rng = random.Random(0)
    state = rng.getstate()
    first = preprocess_document(sample, ctx, config, rng)
    assert rng.getstate() == state  # nothing drawn
    assert first.images.shape[0] == 1
    # the images are the transform's output, unflipped
    info = json.loads(sample["json"])
    raw = base64.b64decode(info["image_info"][0]["image_base64"])
    transform = ctx.fast_transform or TRANSFORM
    assert torch.equal(first.images[0], transform(decode_image(raw, ctx.draft_size)))


def test_training_context_still_flips_and_drops(tok: tuple[Any, SpecialTokens]) -> None:
    tokenizer, special = tok
    ctx = Context.create(tokenizer, special, TRANSFORM)
    config = PairsConfig(shards="x.tar")
    sample = next(iter(laion_samples(0, 1, seed=0)))
    flipped = {
        bool(
            torch.equal(
                preprocess_pair(sample, ctx, config, random.Random(seed)).images,
                preprocess_pair(sample, ctx, config, random.Random(0)).images,
            )
        )
        for seed in range(8)
    }
    assert flipped == {True, False}


def test_padding_batch_is_fully_masked(
    tok: tuple[Any, SpecialTokens], uneven: dict[str, list[str]]
) -> None:
    pad = _loader(tok, "mmc4", uneven["mmc4"]).padding_batch()
    assert pad.images.shape == (1, 6, 3, 32, 32)
    assert bool((pad.labels == -100).all())
    assert pad.keys == []


def test_missing_eval_shard_names_the_fix(tok: tuple[Any, SpecialTokens], tmp_path: Path) -> None:
    with pytest.raises(FlamingoError, match="do not exist") as info:
        _loader(tok, "laion", [str(tmp_path / "nope.tar")])
    assert info.value.fix is not None and "eval_shards" in info.value.fix
