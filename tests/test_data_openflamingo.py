"""Our preprocessing agrees with OpenFlamingo's own code where docs/formats.md §5.9 changes nothing."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from flamingo_cli.data.preprocess import Context, preprocess_document, preprocess_pair
from flamingo_cli.model.tokenizer import ENDOFCHUNK, IMAGE, TINY_TOKENIZER, load_tokenizer
from flamingo_cli.recipe.schema import InterleavedConfig, PairsConfig
from flamingo_cli.synthetic import laion_samples, mmc4_samples


def openflamingo_data() -> Any:
    """OpenFlamingo's `train/data.py` (it imports its sibling `data_utils` as a top-level module)."""
    import open_flamingo  # type: ignore[import-untyped]

    sys.path.insert(0, str(Path(open_flamingo.__file__).parent / "train"))
    from open_flamingo.train import data  # type: ignore[import-untyped]

    return data


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Context]:
    tokenizer, tokens = load_tokenizer(TINY_TOKENIZER)
    ctx = Context.create(tokenizer, tokens, image_transform(32, is_train=False), fast_images=False)
    # transformers 5 dropped these attributes; OpenFlamingo's data code still reads them
    object.__setattr__(tokenizer, "additional_special_tokens", [ENDOFCHUNK, IMAGE])
    object.__setattr__(
        tokenizer, "additional_special_tokens_ids", [tokens.endofchunk, tokens.image]
    )
    return tokenizer, ctx


def member(sample: dict[str, str | bytes], name: str) -> bytes:
    value = sample[name]
    assert isinstance(value, bytes)
    return value


class NoFlip(random.Random):
    def random(self) -> float:
        return 0.9


@pytest.mark.parametrize("max_num_images", [1, 2, 6])
def test_mmc4_argmax_matches_openflamingo(
    setup: tuple[Any, Context], max_num_images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, ctx = setup
    of = openflamingo_data()
    # keep OpenFlamingo's random half of the single-image documents, as NoFlip does for ours
    monkeypatch.setattr(of.random, "random", lambda: 0.9)
    config = InterleavedConfig(
        shards="x", assignment="argmax", max_num_images=max_num_images, min_num_images=1
    )
    compared = 0
    for raw in mmc4_samples(shard=7, count=6, seed=3, images_per_doc=3):
        ours = preprocess_document(raw, ctx, config, NoFlip(0))
        torch.manual_seed(0)
        images, (ids, mask) = of.preprocess_interleaved(
            (raw["json"],), tokenizer, ctx.image_transform, 0.24, 1, max_num_images, 256
        )
        assert torch.equal(ours.input_ids, ids[0])
        assert torch.equal(ours.attention_mask, mask[0])
        # OpenFlamingo pads each document to max_num_images, we pad when batching
        padded = torch.zeros_like(images)
        padded[: len(ours.images)] = ours.images
        # OpenFlamingo flips the stack with the global RNG, we do not flip here
        assert torch.equal(padded, images) or torch.equal(padded, images.flip(-1))
        assert len(ours.images) == min(3, max_num_images)
        compared += 1
    assert compared == 6


def test_laion_text_and_images_match_openflamingo(setup: tuple[Any, Context]) -> None:
    tokenizer, ctx = setup
    of = openflamingo_data()
    raws = list(laion_samples(shard=1, count=5, seed=2))
    ours = [preprocess_pair(r, ctx, PairsConfig(shards="x"), NoFlip(0)) for r in raws]
    ids, mask = of.preprocess_laion_text(
        [member(r, "txt").decode() + "  " for r in raws], tokenizer, 32
    )
    length = ids.shape[1]
    for row, sample in enumerate(ours):
        n = len(sample.input_ids)
        assert torch.equal(ids[row, :n], sample.input_ids)
        assert (ids[row, n:] == ctx.tokens.pad).all() and n <= length
        assert torch.equal(mask[row, :n], sample.attention_mask)
    pil_images = [Image.open(io.BytesIO(member(r, "png"))).convert("RGB") for r in raws]
    theirs = of.preprocess_image(pil_images, ctx.image_transform)
    stacked = torch.cat([s.images for s in ours])
    assert torch.equal(stacked, theirs) or torch.equal(stacked, theirs.flip(-1))
