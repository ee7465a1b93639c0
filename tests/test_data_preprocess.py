"""Each preprocessing and labelling rule (docs/formats.md §5.2-§5.5, §5.9) against hand-computed values."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from flamingo_cli.data.labels import content_length, interleaved_labels, pair_labels
from flamingo_cli.data.preprocess import (
    Context,
    Dropped,
    b64_size,
    decode_image,
    preprocess_document,
    preprocess_pair,
    sample_rng,
)
from flamingo_cli.data.text import strip_control_tokens
from flamingo_cli.model.tokenizer import TINY_TOKENIZER, SpecialTokens, load_tokenizer
from flamingo_cli.recipe.schema import InterleavedConfig, PairsConfig
from flamingo_cli.synthetic import encode, shape_image

EOC, IMG = "<|endofchunk|>", "<image>"


class FixedRng(random.Random):
    """A generator whose random() returns the given values in turn (drop draw, then flip)."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


KEEP = (0.9, 0.9)  # no single-image drop, no flip
FLIP = (0.9, 0.1)


class CountingTransform:
    """The open_clip validation transform, counting its calls."""

    def __init__(self) -> None:
        self.inner = image_transform(32, is_train=False)
        self.calls = 0

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.calls += 1
        result: torch.Tensor = self.inner(image)
        return result


@pytest.fixture(scope="module")
def tok() -> tuple[Any, SpecialTokens]:
    return load_tokenizer(TINY_TOKENIZER)


@pytest.fixture
def transform() -> CountingTransform:
    return CountingTransform()


@pytest.fixture
def ctx(tok: tuple[Any, SpecialTokens], transform: CountingTransform) -> Context:
    context = Context.create(tok[0], tok[1], transform, fast_images=False)
    transform.calls = 0  # forget the shape probe
    return context


def png(color: str, seed: int, noise: int = 60, size: int = 64) -> bytes:
    return encode(shape_image(color, "square", size, random.Random(seed), noise=noise), "PNG")


def pixels(ctx: Context, data: bytes) -> torch.Tensor:
    return ctx.image_transform(decode_image(data, None))


def decode(ctx: Context, ids: torch.Tensor) -> str:
    return str(ctx.tokenizer.decode(ids[ids != ctx.tokens.pad].tolist()))


def document(
    sentences: Sequence[str], images: Sequence[bytes | None], sims: Sequence[Sequence[float]]
) -> dict[str, Any]:
    info = [
        {"image_name": f"{i}.jpg"}
        | ({} if b is None else {"image_base64": base64.b64encode(b).decode()})
        for i, b in enumerate(images)
    ]
    doc = {
        "text_list": list(sentences),
        "image_info": info,
        "similarity_matrix": [list(r) for r in sims],
    }
    return {"__key__": "doc", "json": json.dumps(doc).encode()}


MMC4 = InterleavedConfig(shards="x.tar", assignment="argmax", max_tokens=64)


# ---- LAION (5.2) -------------------------------------------------------------------------


def pair(caption: bytes, image: bytes | None = None, ext: str = "png") -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": "p", "txt": caption}
    if image is not None:
        sample[ext] = image
    return sample


def test_pair_text_and_image(ctx: Context) -> None:
    data = png("red", 1)
    out = preprocess_pair(
        pair(b"  a red square \n", data), ctx, PairsConfig(shards="x"), FixedRng(0.9)
    )
    assert decode(ctx, out.input_ids) == f"<s>{IMG}a red square{EOC}</s>"
    assert out.attention_mask.tolist() == [1] * len(out.input_ids)
    assert out.images.shape == (1, 3, 32, 32)
    assert torch.equal(out.images[0], pixels(ctx, data))
    flipped = preprocess_pair(
        pair(b"a red square", data), ctx, PairsConfig(shards="x"), FixedRng(0.1)
    )
    assert torch.equal(flipped.images[0], pixels(ctx, data).flip(-1))


def test_pair_truncates_to_max_tokens(ctx: Context) -> None:
    out = preprocess_pair(
        pair(b"a red square " * 20, png("red", 1)), ctx, PairsConfig(shards="x"), FixedRng(0.9)
    )
    assert len(out.input_ids) == 32
    assert out.input_ids[1].item() == ctx.tokens.image


def test_pair_needs_caption_and_an_accepted_image_extension(ctx: Context) -> None:
    config = PairsConfig(shards="x")
    with pytest.raises(Dropped, match="missing_member"):
        preprocess_pair(pair(b"cap"), ctx, config, FixedRng(0.9))
    with pytest.raises(Dropped, match="missing_member"):
        preprocess_pair(pair(b"cap", png("red", 1), ext="webp"), ctx, config, FixedRng(0.9))
    with pytest.raises(Dropped, match="corrupt_image"):
        preprocess_pair(pair(b"cap", b"not an image" * 2000, ext="jpg"), ctx, config, FixedRng(0.9))
    with pytest.raises(Dropped, match="bad_caption"):
        preprocess_pair(pair(b"\xff\xfe", png("red", 1)), ctx, config, FixedRng(0.9))


def test_control_strings_are_removed_from_web_text(ctx: Context) -> None:
    assert strip_control_tokens("a<im<image>age>b<PAD>c</s>", ctx.control_strings) == "abc"
    out = preprocess_pair(
        pair(f"x{IMG}y{EOC}".encode(), png("red", 1)), ctx, PairsConfig(shards="x"), FixedRng(0.9)
    )
    assert decode(ctx, out.input_ids) == f"<s>{IMG}xy{EOC}</s>"


# ---- MMC4 (5.3) --------------------------------------------------------------------------


def test_argmax_text_lets_images_share_a_sentence(ctx: Context) -> None:
    a, b = png("red", 1), png("blue", 2)
    sample = document(["Intro.", "Two here.", "End."], [a, b], [[0.1, 0.3, 0.1], [0.1, 0.25, 0.2]])
    out = preprocess_document(sample, ctx, MMC4, FixedRng(*KEEP))
    assert decode(ctx, out.input_ids) == f"<s>Intro.{IMG}{EOC}{IMG}Two here. End.{EOC}</s>"
    assert out.images.shape == (2, 3, 32, 32)  # batching pads to max_num_images
    assert torch.equal(out.images[0], pixels(ctx, a))
    assert torch.equal(out.images[1], pixels(ctx, b))
    assert out.input_ids.shape == (64,)
    assert out.attention_mask.sum() == (out.input_ids != ctx.tokens.pad).sum()


def test_hungarian_is_one_to_one(ctx: Context) -> None:
    a, b = png("red", 1), png("blue", 2)
    sample = document(["Intro.", "Two here.", "End."], [a, b], [[0.1, 0.3, 0.1], [0.1, 0.29, 0.26]])
    out = preprocess_document(
        sample, ctx, MMC4.model_copy(update={"assignment": "hungarian"}), FixedRng(*KEEP)
    )
    assert decode(ctx, out.input_ids) == f"<s>Intro.{IMG}Two here.{EOC}{IMG}End.{EOC}</s>"


def test_images_follow_token_order_not_image_index(ctx: Context) -> None:
    # image 0 goes to the last sentence, image 1 to the first: the first <image> is image 1
    a, b = png("red", 1), png("blue", 2)
    sample = document(["First.", "Second."], [a, b], [[0.1, 0.3], [0.3, 0.1]])
    out = preprocess_document(sample, ctx, MMC4, FixedRng(*KEEP))
    assert decode(ctx, out.input_ids) == f"<s>{IMG}First.{EOC}{IMG}Second.{EOC}</s>"
    assert torch.equal(out.images[0], pixels(ctx, b))
    assert torch.equal(out.images[1], pixels(ctx, a))


def test_max_num_images_cuts_in_token_order(ctx: Context) -> None:
    a, b, c = png("red", 1), png("blue", 2), png("green", 3)
    sample = document(
        ["S0.", "S1.", "S2."], [a, b, c], [[0.1, 0.1, 0.3], [0.1, 0.3, 0.1], [0.3, 0.1, 0.1]]
    )
    out = preprocess_document(
        sample, ctx, MMC4.model_copy(update={"max_num_images": 2}), FixedRng(*KEEP)
    )
    assert decode(ctx, out.input_ids) == f"<s>{IMG}S0.{EOC}{IMG}S1. S2.{EOC}</s>"
    assert out.images.shape[0] == 2
    assert torch.equal(out.images[0], pixels(ctx, c))
    assert torch.equal(out.images[1], pixels(ctx, b))


def test_size_presence_and_threshold_filters(ctx: Context) -> None:
    small = png("red", 1, noise=0)  # ~100 bytes, under 11,000
    big = png("blue", 2)
    assert len(small) < 11_000 <= len(big)
    with pytest.raises(Dropped, match="no_images"):
        preprocess_document(document(["S."], [None], [[0.3]]), ctx, MMC4, FixedRng(*KEEP))
    with pytest.raises(Dropped, match="too_small"):
        preprocess_document(document(["S."], [small], [[0.3]]), ctx, MMC4, FixedRng(*KEEP))
    with pytest.raises(Dropped, match="below_threshold"):
        preprocess_document(document(["S."], [big], [[0.2399]]), ctx, MMC4, FixedRng(*KEEP))
    # the small image is filtered out, the big one at the threshold (inclusive) stays
    out = preprocess_document(
        document(["S.", "T."], [small, big], [[0.3, 0.1], [0.1, 0.24]]), ctx, MMC4, FixedRng(*KEEP)
    )
    assert decode(ctx, out.input_ids) == f"<s>S.{IMG}T.{EOC}</s>"


def test_min_images_and_random_single_image_drop(ctx: Context) -> None:
    one = document(["Lead.", "Caption."], [png("red", 1)], [[0.1, 0.3]])
    with pytest.raises(Dropped, match="too_few_images"):
        preprocess_document(
            one, ctx, MMC4.model_copy(update={"min_num_images": 2}), FixedRng(*KEEP)
        )
    with pytest.raises(Dropped, match="single_image"):
        preprocess_document(one, ctx, MMC4, FixedRng(0.5, 0.9))  # draws <= 0.5 drop
    out = preprocess_document(one, ctx, MMC4, FixedRng(0.51, 0.9))
    assert decode(ctx, out.input_ids) == f"<s>Lead.{IMG}Caption.{EOC}</s>"


def test_single_image_as_last_token_is_dropped(ctx: Context) -> None:
    lead = "Lead text."
    n = len(ctx.tokenizer(lead, add_special_tokens=False).input_ids)
    one = document([lead, "Caption."], [png("red", 1)], [[0.1, 0.3]])
    with pytest.raises(Dropped, match="image_at_end"):
        preprocess_document(
            one, ctx, MMC4.model_copy(update={"max_tokens": n + 2}), FixedRng(*KEEP)
        )
    out = preprocess_document(
        one, ctx, MMC4.model_copy(update={"max_tokens": n + 3}), FixedRng(*KEEP)
    )
    assert out.input_ids[-2].item() == ctx.tokens.image


def test_truncated_images_are_neither_counted_nor_decoded(
    ctx: Context, transform: CountingTransform
) -> None:
    lead = "Lead text."
    n = len(ctx.tokenizer(lead, add_special_tokens=False).input_ids)
    a, b = png("red", 1), png("blue", 2)
    sample = document([lead, "One.", "Two."], [a, b], [[0.1, 0.3, 0.1], [0.1, 0.1, 0.3]])
    config = MMC4.model_copy(update={"max_tokens": n + 4})
    out = preprocess_document(sample, ctx, config, FixedRng(*KEEP))
    assert (out.input_ids == ctx.tokens.image).sum() == 1
    assert transform.calls == 1
    assert out.images.shape[0] == 1
    assert torch.equal(out.images[0], pixels(ctx, a))


def test_corrupt_images_are_dropped_one_by_one_and_only_assigned_ones_decoded(
    ctx: Context, transform: CountingTransform
) -> None:
    bad = b"\xff\xd8garbage" * 2000  # large enough, not an image
    a, b = png("red", 1), png("blue", 2)
    # hungarian: the corrupt image 0 wins sentence 1; once it is gone, image 1 takes it
    sims = [[0.1, 0.35, 0.1], [0.1, 0.3, 0.28], [0.1, 0.1, 0.3]]
    config = MMC4.model_copy(update={"assignment": "hungarian"})
    out = preprocess_document(
        document(["S0.", "S1.", "S2."], [bad, a, b], sims), ctx, config, FixedRng(*KEEP)
    )
    assert decode(ctx, out.input_ids) == f"<s>S0.{IMG}S1.{EOC}{IMG}S2.{EOC}</s>"
    assert out.corrupt_images == 1
    assert transform.calls == 2
    assert torch.equal(out.images[0], pixels(ctx, a))
    # an unassigned corrupt image is never decoded, so never noticed
    transform.calls = 0
    out = preprocess_document(
        document(["S0.", "S1."], [a, bad, b], [[0.3, 0.1], [0.1, 0.1], [0.1, 0.3]]),
        ctx,
        MMC4,
        FixedRng(*KEEP),
    )
    assert out.corrupt_images == 0 and transform.calls == 2
    with pytest.raises(Dropped, match="corrupt_image"):
        preprocess_document(document(["S0."], [bad], [[0.3]]), ctx, MMC4, FixedRng(*KEEP))


def test_flip_is_one_per_document(ctx: Context) -> None:
    a, b = png("red", 1), png("blue", 2)
    sample = document(["S0.", "S1."], [a, b], [[0.3, 0.1], [0.1, 0.3]])
    out = preprocess_document(sample, ctx, MMC4, FixedRng(*FLIP))
    assert torch.equal(out.images[0], pixels(ctx, a).flip(-1))
    assert torch.equal(out.images[1], pixels(ctx, b).flip(-1))


def test_malformed_documents(ctx: Context) -> None:
    with pytest.raises(Dropped, match="bad_json"):
        preprocess_document({"__key__": "k", "json": b"{nope"}, ctx, MMC4, FixedRng(*KEEP))
    with pytest.raises(Dropped, match="bad_json"):
        preprocess_document(
            document(["S0.", "S1."], [png("red", 1)], [[0.3]]), ctx, MMC4, FixedRng(*KEEP)
        )
    with pytest.raises(Dropped, match="bad_json"):
        preprocess_document(
            {"__key__": "k", "json": b'{"text_list": 3}'}, ctx, MMC4, FixedRng(*KEEP)
        )


# ---- ChatGPT-generated (5.4) -------------------------------------------------------------


def gpt(example: str, images: dict[int, bytes]) -> dict[str, Any]:
    image_map = {
        f"_!_IMAGE{k}_!_": {"base64_image": base64.b64encode(v).decode()} for k, v in images.items()
    }
    return {
        "__key__": "g",
        "json": json.dumps({"is_gpt": 0, "example": example, "image_map": image_map}).encode(),
    }


def test_gpt_text_images_and_no_filters(ctx: Context) -> None:
    small, big = png("red", 1, noise=0), png("blue", 2)
    sample = gpt("Hi _!_IMAGE2_!_ two _!_IMAGE1_!_ one.", {1: small, 2: big})
    out = preprocess_document(sample, ctx, MMC4, FixedRng(0.9))
    assert decode(ctx, out.input_ids) == f"<s>Hi{IMG}two{EOC}{IMG}one.{EOC}</s>"
    # images follow the placeholders' order; the small image is not filtered
    assert torch.equal(out.images[0], pixels(ctx, big))
    assert torch.equal(out.images[1], pixels(ctx, small))
    # a single image is never dropped at random
    single = preprocess_document(gpt("_!_IMAGE1_!_ x", {1: small}), ctx, MMC4, FixedRng(0.9))
    assert decode(ctx, single.input_ids) == f"<s>{IMG}x{EOC}</s>"


def test_gpt_cut_before_the_max_th_image_when_over_the_limit(ctx: Context) -> None:
    images = {k: png("red", k) for k in (1, 2, 3)}
    config = MMC4.model_copy(update={"max_num_images": 2})
    out = preprocess_document(
        gpt("A _!_IMAGE1_!_ b _!_IMAGE2_!_ c _!_IMAGE3_!_ d", images), ctx, config, FixedRng(0.9)
    )
    assert decode(ctx, out.input_ids) == f"<s>A{IMG}b{EOC}{EOC}</s>"
    assert out.images.shape[0] == 1
    exact = preprocess_document(
        gpt("A _!_IMAGE1_!_ b _!_IMAGE2_!_ c", images), ctx, config, FixedRng(0.9)
    )
    assert decode(ctx, exact.input_ids) == f"<s>A{IMG}b{EOC}{IMG}c{EOC}</s>"


def test_gpt_corrupt_image_takes_its_placeholder_away(ctx: Context) -> None:
    sample = gpt("A _!_IMAGE1_!_ b _!_IMAGE2_!_ c", {1: b"junk", 2: png("red", 2)})
    out = preprocess_document(sample, ctx, MMC4, FixedRng(0.9))
    assert decode(ctx, out.input_ids) == f"<s>A  b{IMG}c{EOC}</s>"
    assert out.corrupt_images == 1


# ---- decoding, randomness, labels (5.5) --------------------------------------------------


def test_draft_mode_decodes_jpeg_at_a_reduced_scale() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (512, 384), (200, 10, 10)).save(buffer, format="JPEG")
    assert decode_image(buffer.getvalue(), 32).size == (64, 48)  # 1/8 scale, both sides >= 32
    assert decode_image(buffer.getvalue(), 224).size == (512, 384)  # 1/2 would give 192 < 224
    assert decode_image(buffer.getvalue(), None).size == (512, 384)


def test_sample_rng_depends_on_seed_epoch_and_key() -> None:
    draws = {
        (s, e, k): sample_rng(s, e, k).random() for s in (0, 1) for e in (0, 1) for k in ("a", "b")
    }
    assert len(set(draws.values())) == 8
    assert sample_rng(0, 0, "a").random() == draws[(0, 0, "a")]


TOKENS = SpecialTokens(image=9, endofchunk=8, pad=0, eos=2)


def test_pair_labels() -> None:
    ids = torch.tensor([[1, 9, 5, 6, 8, 2, 0, 0], [1, 9, 5, 8, 2, 0, 0, 0]])
    assert pair_labels(ids, TOKENS).tolist() == [
        [1, -100, 5, 6, 8, 2, -100, -100],
        [1, -100, 5, 8, 2, -100, -100, -100],
    ]


def test_interleaved_labels() -> None:
    ids = torch.tensor(
        [
            # bos  t  <img> t  t  eoc  t  t  <img> t  eoc eoc  eos pad
            [1, 4, 9, 5, 6, 8, 7, 7, 9, 5, 8, 8, 2, 0],
            [9, 9, 5, 8, 9, 5, 8, 2, 0, 0, 0, 0, 0, 0],
            [1, 4, 8, 5, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no image: nothing is a target
        ]
    )
    M = -100
    assert interleaved_labels(ids, TOKENS).tolist() == [
        [M, M, M, 5, 6, 8, M, M, M, 5, 8, M, M, M],
        [M, M, 5, 8, M, 5, 8, M, M, M, M, M, M, M],
        [M] * 14,
    ]


def test_content_length_keeps_every_real_token_and_target() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    labels = torch.full_like(mask, -100)
    assert content_length(mask, labels) == 4
    labels[0, 4] = 7  # a target past the mask (never from our loaders) still counts
    assert content_length(mask, labels) == 5
    assert content_length(torch.tensor([[0, 1, 1]]), torch.full((1, 3), -100)) == 3  # left pad
    assert content_length(torch.zeros(2, 3), torch.full((2, 3), -100)) == 1


def test_b64_size_is_the_decoded_length() -> None:
    for n in (0, 1, 2, 3, 10, 11_000, 11_001):
        text = base64.b64encode(bytes(n)).decode()
        assert b64_size(text) == n
        assert b64_size(text[:4] + "\n" + text[4:]) == n  # decoders skip whitespace
    assert b64_size("abc") is None
    assert b64_size(None) is None
