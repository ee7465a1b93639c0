"""`flamingo generate`: the prompt it builds, what it prints, and each bad input's message."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.evaluate.generate import GenerateRequest, Shot, build_prompt
from flamingo_cli.evaluate.prompts import encode_prompts, image_batch, read_image
from flamingo_cli.model.factory import build_model
from flamingo_cli.model.generation import DecodeConfig, generate
from flamingo_cli.model.params import checkpoint_parameter_names
from flamingo_cli.recipe.load import load_recipe
from flamingo_cli.synthetic import encode, shape_image
from tests.model_util import export, open_gates

from .conftest import RECIPES

runner = CliRunner()
RECIPE = RECIPES / "tiny-cpu.toml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny recipe's model with changed weights and open gates, exported as flamingo.pt
    and OpenFlamingo checkpoint.pt, and three images on disk."""
    root = tmp_path_factory.mktemp("generate")
    loaded = load_recipe(RECIPE)
    model, transform, tokenizer, special = build_model(
        loaded.recipe.model, seed=loaded.recipe.run.seed
    )
    generator = torch.Generator().manual_seed(5)
    kept = checkpoint_parameter_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in kept:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    open_gates(model, 1.0)
    paths = export(model, root)
    rng = random.Random(0)
    images = {}
    for color, shape in (("red", "square"), ("blue", "circle"), ("green", "stripe")):
        images[color] = root / f"{color}.png"
        images[color].write_bytes(encode(shape_image(color, shape, 32, rng), "PNG"))
    return {
        "model": model.eval(),
        "transform": transform,
        "tokenizer": tokenizer,
        "special": special,
        "flamingo": paths.flamingo,
        "openflamingo": paths.openflamingo,
        "images": images,
        "root": root,
    }


def _expected(trained: dict[str, Any], prompt: str, images: list[Path], **decode: Any) -> list[int]:
    """The new tokens straight from `model/generation.generate` on the same weights."""
    ids, mask = encode_prompts(trained["tokenizer"], [prompt])
    pixels = image_batch([[read_image(p, 10**6) for p in images]], trained["transform"])
    config = DecodeConfig(
        stop_token_ids=(trained["special"].endofchunk,),
        pad_token_id=trained["special"].pad,
        **decode,
    )
    return generate(trained["model"], pixels, ids, mask, config)[0]


def _run(*args: str) -> Any:
    return runner.invoke(app, ["generate", str(RECIPE), *args])


def test_caption_with_a_shot_prints_what_the_model_decodes(trained: dict[str, Any]) -> None:
    red, blue = trained["images"]["red"], trained["images"]["blue"]
    args = ["--task", "caption", "--image", str(blue), "--shot", str(red), " a red square "]
    result = _run(
        "--checkpoint", str(trained["flamingo"]), *args, "--max-new-tokens", "6", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    prompt = "<image>Output:a red square<|endofchunk|>\n<image>Output:"
    assert data["prompt"] == prompt
    assert data["images"] == [str(red), str(blue)]
    assert data["weights"] == "flamingo export"
    expected = _expected(trained, prompt, [red, blue], max_new_tokens=6)
    assert data["tokens"] == expected
    text = trained["tokenizer"].decode(expected, skip_special_tokens=True).strip()
    assert data["text"] == text
    assert data["decoding"]["num_beams"] == 1
    assert data["decoding"]["stop_token_ids"] == [trained["special"].endofchunk]
    # the same weights as OpenFlamingo's checkpoint.pt, printed as plain text
    plain = _run("--checkpoint", str(trained["openflamingo"]), *args, "--max-new-tokens", "6")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == text + "\n"
    assert "OpenFlamingo checkpoint" in plain.stderr


def test_vqa_with_beams_and_a_free_prompt(trained: dict[str, Any]) -> None:
    red, green = trained["images"]["red"], trained["images"]["green"]
    result = _run(
        "--checkpoint",
        str(trained["flamingo"]),
        "--task",
        "vqa",
        "--question",
        "What colour is it?",
        "--image",
        str(green),
        "--shot",
        str(red),
        "What colour is it?||red",
        "--num-beams",
        "3",
        "--length-penalty",
        "0",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    prompt = (
        "<image>Question:What colour is it? Short answer:red<|endofchunk|>\n"
        "<image>Question:What colour is it? Short answer:"
    )
    assert data["prompt"] == prompt
    beams = {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0}
    assert data["tokens"] == _expected(trained, prompt, [red, green], **beams)
    free = "<image>A red one.<|endofchunk|><image>A"
    result = _run(
        "--checkpoint",
        str(trained["flamingo"]),
        "--prompt",
        free,
        "--image",
        str(red),
        "--image",
        str(green),
        "--sample",
        "--seed",
        "3",
        "--top-k",
        "5",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert result.exit_code == 0, result.output
    sampled = {"max_new_tokens": 4, "do_sample": True, "seed": 3, "top_k": 5}
    assert json.loads(result.stdout)["tokens"] == _expected(trained, free, [red, green], **sampled)


def test_prompt_building_rules() -> None:
    a, b = Path("a.png"), Path("b.png")
    assert build_prompt(GenerateRequest(images=(a, b), prompt="<image>x<image>")) == (
        "<image>x<image>",
        [a, b],
    )
    assert build_prompt(GenerateRequest(images=(b,), task="caption")) == ("<image>Output:", [b])
    usage = [
        (GenerateRequest(images=(a,)), "either --prompt TEXT or --task"),
        (GenerateRequest(images=(a,), prompt="<image>", task="caption"), "either --prompt"),
        (GenerateRequest(images=(a,), task="caption", question="q"), "--question goes with"),
        (GenerateRequest(images=(a,), task="vqa"), "--task vqa needs --question"),
        (GenerateRequest(images=(a, b), task="caption"), "asks about one image, got 2"),
        (GenerateRequest(prompt="<image>", images=(a,), shots=(Shot(b, "x"),)), "--shot goes"),
        (
            GenerateRequest(images=(a,), task="vqa", question="q", shots=(Shot(b, "no answer"),)),
            "a VQA example is QUESTION||ANSWER",
        ),
    ]
    for request, message in usage:
        with pytest.raises(UsageError, match=message):
            build_prompt(request)
    with pytest.raises(FlamingoError, match=r"2 <image> mark\(s\) and 1 --image given") as info:
        build_prompt(GenerateRequest(images=(a,), prompt="<image><image>"))
    assert info.value.exit_code == 1 and "one <image>" in (info.value.fix or "")


def test_bad_input_exits_with_the_file_and_a_fix(trained: dict[str, Any]) -> None:
    red = str(trained["images"]["red"])
    broken = trained["root"] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    garbage = trained["root"] / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    weights = str(trained["flamingo"])
    caption = ["--task", "caption"]
    cases: list[tuple[list[str], int, str]] = [
        ([weights, *caption, "--image", "missing.png"], 1, "image missing.png does not exist"),
        ([weights, *caption, "--image", str(broken)], 1, f"cannot decode image {broken}"),
        ([weights, *caption, "--image", red, "--shot", "nope.png", "x"], 1, "nope.png does not"),
        ([weights, "--prompt", "<image><image>", "--image", red], 1, "2 <image> mark(s)"),
        ([str(trained["root"] / "none.pt"), *caption, "--image", red], 1, "does not exist"),
        ([str(garbage), *caption, "--image", red], 1, f"cannot read {garbage}"),
        ([weights, "--image", red], 2, "either --prompt TEXT or --task"),
        ([weights, *caption, "--image", red, "--sample", "--num-beams", "3"], 2, "do not combine"),
        (
            [weights, "--task", "vqa", "--question", "q", "--image", red, "--shot", red, "x"],
            2,
            "QUESTION||ANSWER",
        ),
    ]
    for args, code, message in cases:
        result = _run("--checkpoint", *args)
        assert result.exit_code == code, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    as_json = _run("--checkpoint", weights, *caption, "--image", "missing.png", "--json")
    assert as_json.exit_code == 1
    error = json.loads(as_json.stdout)
    assert "missing.png" in error["error"] and error["fix"]
