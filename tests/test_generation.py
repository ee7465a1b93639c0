"""Prompts as OpenFlamingo's eval writes them, and decoding: greedy, sampling, beam search."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluate.prompts import (
    caption_prompt,
    encode_prompts,
    image_batch,
    read_image,
    vqa_prompt,
    with_demonstrations,
)
from flamingo_cli.synthetic import encode, shape_image
from tests.model_util import tokenizer_and_ids

# -- prompts ---------------------------------------------------------------------------------


def test_prompt_templates_are_openflamingos() -> None:
    assert caption_prompt("a red square") == "<image>Output:a red square<|endofchunk|>"
    assert caption_prompt() == "<image>Output:"
    assert caption_prompt(None) == "<image>Output:"
    assert vqa_prompt("What colour?", "red") == (
        "<image>Question:What colour? Short answer:red<|endofchunk|>"
    )
    assert vqa_prompt("What colour?") == "<image>Question:What colour? Short answer:"
    assert with_demonstrations([caption_prompt("a"), caption_prompt("b")], caption_prompt()) == (
        "<image>Output:a<|endofchunk|>\n<image>Output:b<|endofchunk|>\n<image>Output:"
    )


def test_encode_prompts_pads_on_the_left_with_one_bos_like_training() -> None:
    tokenizer, special = tokenizer_and_ids()
    short, long = caption_prompt(), with_demonstrations([caption_prompt("a b")], caption_prompt())
    ids, mask = encode_prompts(tokenizer, [short, long])
    alone = tokenizer(short).input_ids  # training's call: the tokenizer's own BOS first
    assert alone[0] == tokenizer.bos_token_id and alone[1] == special.image
    assert ids.dtype == torch.long and ids.shape == (2, len(tokenizer(long).input_ids))
    pad = ids.shape[1] - len(alone)
    assert ids[0].tolist() == [special.pad] * pad + alone
    assert mask[0].tolist() == [0] * pad + [1] * len(alone)
    assert mask[1].tolist() == [1] * ids.shape[1]
    assert tokenizer.padding_side == "right"  # the tokenizer's own setting is left alone


def test_image_batch_pads_rows_with_fewer_images() -> None:
    rng = random.Random(0)
    red, blue = (shape_image(c, "square", 8, rng) for c in ("red", "blue"))

    def transform(image: object) -> torch.Tensor:
        return torch.full((3, 4, 4), 1.0 if image is red else 2.0)

    out = image_batch([[red, blue], [blue], []], transform)
    assert out.shape == (3, 2, 3, 4, 4)
    assert out[:, :, 0, 0, 0].tolist() == [[1.0, 2.0], [2.0, 0.0], [0.0, 0.0]]
    assert image_batch([[], []], transform, (3, 4, 4)).shape == (2, 0, 3, 4, 4)


def test_read_image_names_the_file_and_the_fix(tmp_path: Path) -> None:
    good = tmp_path / "red.png"
    good.write_bytes(encode(shape_image("red", "circle", 16, random.Random(0)), "PNG"))
    image = read_image(good, 10_000)
    assert image.size == (16, 16) and image.mode == "RGB"
    with pytest.raises(FlamingoError, match=r"image .*missing\.png does not exist"):
        read_image(tmp_path / "missing.png", 10_000)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(FlamingoError, match=r"cannot decode image .*bad\.jpg") as caught:
        read_image(bad, 10_000)
    assert "Pillow" in (caught.value.fix or "")
    with pytest.raises(FlamingoError, match=r"red\.png: 16x16 = 256 pixels is over the cap"):
        read_image(good, 100)
