"""Prompts as OpenFlamingo's eval writes them, and decoding: greedy, sampling, beam search."""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.evaluate.prompts import (
    caption_prompt,
    encode_prompts,
    image_batch,
    read_image,
    vqa_prompt,
    with_demonstrations,
)
from flamingo_cli.model.factory import TINY_FLAMINGO, tiny_lm
from flamingo_cli.model.flamingo import FlamingoModel
from flamingo_cli.model.generation import DecodeConfig, generate
from flamingo_cli.model.tokenizer import SpecialTokens
from flamingo_cli.synthetic import encode, shape_image
from tests.model_util import _vision, open_gates, tokenizer_and_ids, wrap

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


# -- decoding ----------------------------------------------------------------------------------


def _peaky(model: FlamingoModel) -> FlamingoModel:
    """Sharper next-token distributions (a random LM's are nearly flat), open gates."""
    with torch.no_grad():
        head = model.output_embeddings()
        assert isinstance(head, torch.nn.Linear)
        head.weight.mul_(20)
    open_gates(model, 0.5)
    return model


@pytest.fixture(scope="module")
def lm_pair() -> tuple[FlamingoModel, Any]:
    """A Flamingo model with closed gates (fresh) and a copy of its bare LM, same weights."""
    torch.manual_seed(0)
    tokenizer, _ = tokenizer_and_ids()
    lm: Any = tiny_lm().eval()
    lm.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(20)
    bare = copy.deepcopy(lm)
    return wrap(lm), bare


@pytest.fixture(scope="module")
def model() -> FlamingoModel:
    torch.manual_seed(1)
    return _peaky(wrap(tiny_lm().eval()))


PROMPTS = ["<image>Output:a red", "Question:what<image>Output:", "the", "<image>"]


def _inputs(prompts: list[str] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokenizer, _ = tokenizer_and_ids()
    ids, mask = encode_prompts(tokenizer, prompts)
    images = torch.randn(len(prompts), 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return images, ids, mask


def _hf_new_tokens(out: torch.Tensor, prompt_width: int, pad: int) -> list[list[int]]:
    """Hugging Face's output rows without the prompt and the padding after them."""
    rows = [row[prompt_width:].tolist() for row in out]
    return [row[: max((i + 1 for i, t in enumerate(row) if t != pad), default=0)] for row in rows]


@pytest.mark.parametrize(
    ("length_penalty", "min_new"), [(1.0, 0), (0.0, 0), (0.0, 3), (-1.0, 0), (2.0, 2)]
)
def test_three_beams_equal_transformers_beam_search_on_the_bare_lm(
    lm_pair: tuple[FlamingoModel, Any], length_penalty: float, min_new: int
) -> None:
    model, bare = lm_pair
    images, ids, mask = _inputs()
    greedy = generate(model, images, ids, mask, DecodeConfig(max_new_tokens=8))
    stops = (greedy[0][2], greedy[1][4])  # tokens this LM does produce, so beams do stop
    pad = model.special_tokens.pad
    config = DecodeConfig(
        max_new_tokens=8,
        min_new_tokens=min_new,
        num_beams=3,
        length_penalty=length_penalty,
        stop_token_ids=stops,
        pad_token_id=pad,
    )
    ours = generate(model, images, ids, mask, config)
    theirs = bare.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=3,
        length_penalty=length_penalty,
        max_new_tokens=8,
        min_new_tokens=min_new,
        eos_token_id=list(stops),
        pad_token_id=pad,
        do_sample=False,
    )
    assert ours == _hf_new_tokens(theirs, ids.shape[1], pad)
    assert any(len(row) < 8 for row in ours)  # some beams stopped early
    assert all(len(row) >= min_new for row in ours)


def _tiny_vocab_model() -> FlamingoModel:
    """A Flamingo model over a six-token vocabulary: 0 pad, 1 bos, 2 word, 3 end of chunk,
    4 image, 5 eos."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=6,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    lm: Any = LlamaForCausalLM(config)
    lm.eval()
    vision, width = _vision()
    special = SpecialTokens(image=4, endofchunk=3, pad=0, eos=5)
    model = FlamingoModel(
        copy.deepcopy(vision), lm, special, vision_dim=width, config=TINY_FLAMINGO
    )
    with torch.no_grad():
        lm.lm_head.weight.mul_(3)
    open_gates(model, 0.5)
    return model.eval()


def _exhaustive(
    model: FlamingoModel,
    images: torch.Tensor,
    prompt: list[int],
    steps: int,
    length_penalty: float,
    min_new: int,
) -> list[int]:
    """The best of every continuation (ending at token 3 or after `steps` tokens), scored
    sum log p / length ** penalty, each prefix run in full without a cache."""
    best: tuple[float, list[int]] = (float("-inf"), [])

    def visit(prefix: list[int], total: float) -> None:
        nonlocal best
        with torch.no_grad():
            logits = model(images, torch.tensor([prompt + prefix])).logits[0, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        for token in range(6):
            if token == 3 and len(prefix) < min_new:
                continue
            sequence, score = [*prefix, token], total + float(log_probs[token])
            if token == 3 or len(sequence) == steps:
                normed = score / len(sequence) ** length_penalty
                if normed > best[0]:
                    best = (normed, sequence)
            else:
                visit(sequence, score)

    visit([], 0.0)
    return best[1]


@pytest.mark.parametrize(("length_penalty", "min_new"), [(0.0, 0), (1.0, 0), (-0.5, 2)])
def test_beam_search_covering_every_prefix_is_exhaustive_search(
    length_penalty: float, min_new: int
) -> None:
    model = _tiny_vocab_model()
    images = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prompt = [1, 4, 2]
    config = DecodeConfig(
        max_new_tokens=3,
        min_new_tokens=min_new,
        num_beams=6**3,  # more beams than continuations at any step
        length_penalty=length_penalty,
        stop_token_ids=(3,),
    )
    beams = generate(model, images, torch.tensor([prompt]), None, config)
    assert beams == [_exhaustive(model, images, prompt, 3, length_penalty, min_new)]


def test_greedy_with_the_cache_equals_greedy_recomputing_everything(model: FlamingoModel) -> None:
    images, ids, mask = _inputs()
    stop = model.special_tokens.endofchunk
    config = DecodeConfig(max_new_tokens=6, stop_token_ids=(stop,), pad_token_id=0)
    cached = generate(model, images, ids, mask, config)
    for row in range(len(PROMPTS)):
        sequence = ids[row : row + 1][mask[row : row + 1].bool()].unsqueeze(0)
        new: list[int] = []
        with torch.no_grad():
            while len(new) < 6 and stop not in new:
                logits = model(images[row : row + 1], sequence).logits[0, -1]
                new.append(int(logits.argmax()))
                sequence = torch.cat((sequence, torch.tensor([[new[-1]]])), dim=1)
        assert cached[row] == new


@pytest.mark.parametrize("beams", [1, 3])
def test_left_padding_gives_what_each_row_gives_alone(model: FlamingoModel, beams: int) -> None:
    images, ids, mask = _inputs()
    config = DecodeConfig(max_new_tokens=6, num_beams=beams, stop_token_ids=(17, 388))
    batched = generate(model, images, ids, mask, config)
    tokenizer, _ = tokenizer_and_ids()
    for row, prompt in enumerate(PROMPTS):
        alone = torch.tensor([tokenizer(prompt).input_ids])
        assert generate(model, images[row : row + 1], alone, None, config) == [batched[row]]


def test_sampling_with_a_seed_repeats(model: FlamingoModel) -> None:
    images, ids, mask = _inputs()
    config = DecodeConfig(max_new_tokens=8, do_sample=True, temperature=2.0, seed=7)
    first = generate(model, images, ids, mask, config)
    assert generate(model, images, ids, mask, config) == first
    assert generate(model, images, ids, mask, replace(config, seed=8)) != first
    greedy = generate(model, images, ids, mask, DecodeConfig(max_new_tokens=8))
    for narrow in (replace(config, top_k=1), replace(config, top_p=1e-6)):
        assert generate(model, images, ids, mask, narrow) == greedy


def test_min_new_tokens_holds_the_stop_token_back(model: FlamingoModel) -> None:
    images, ids, mask = _inputs()
    first = generate(model, images, ids, mask, DecodeConfig(max_new_tokens=1))
    stops = tuple({row[0] for row in first})  # what every row would say first
    quick = DecodeConfig(max_new_tokens=6, stop_token_ids=stops)
    assert all(len(row) == 1 for row in generate(model, images, ids, mask, quick))
    for beams in (1, 3):
        held = replace(quick, min_new_tokens=3, num_beams=beams)
        for row in generate(model, images, ids, mask, held):
            assert len(row) >= 3 and not set(row[:3]) & set(stops)


def test_rows_without_images_decode_text_only(model: FlamingoModel) -> None:
    tokenizer, _ = tokenizer_and_ids()
    ids, mask = encode_prompts(tokenizer, ["the", "a red"])
    empty = torch.zeros(2, 0, 3, 32, 32)
    config = DecodeConfig(max_new_tokens=4)
    out = generate(model, empty, ids, mask, config)
    with torch.no_grad():
        first = model(None, ids, mask, use_media=False).logits[:, -1].argmax(-1).tolist()
    assert [row[0] for row in out] == first


def test_decode_config_rejects_what_cannot_run() -> None:
    with pytest.raises(UsageError, match="sampling and beam search do not combine"):
        DecodeConfig(do_sample=True, num_beams=3)
    with pytest.raises(UsageError, match="top_p must be in"):
        DecodeConfig(top_p=0.0)
    with pytest.raises(UsageError, match="max_new_tokens must be at least 1"):
        DecodeConfig(max_new_tokens=0)


@pytest.mark.parametrize("beams", [1, 3])
def test_images_and_their_keys_and_values_are_computed_once(
    model: FlamingoModel, beams: int
) -> None:
    images, ids, mask = _inputs()
    calls: list[str] = []
    hooks = [model.vision_encoder.register_forward_hook(lambda *_: calls.append("vision"))]
    for block in model.cross_attention_blocks():
        hooks.append(block.attn.kv_proj.register_forward_hook(lambda *_: calls.append("kv")))
    try:
        out = generate(model, images, ids, mask, DecodeConfig(max_new_tokens=5, num_beams=beams))
    finally:
        for hook in hooks:
            hook.remove()
    assert max(len(row) for row in out) == 5  # five steps ran
    assert calls == ["vision"] + ["kv"] * len(model.cross_attention_blocks())
