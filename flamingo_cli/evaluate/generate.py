"""`flamingo generate`: a trained model continues a prompt about images (docs/formats.md §16).

The prompt is the user's own text with an `<image>` per image, or OpenFlamingo's captioning
or VQA template with in-context examples (shots) first. The checkpoint is anything
`eval-loss` takes (`runtime/weights.py`); the model is built as training built it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.evaluate.prompts import (
    MAX_PROMPT_TOKENS,
    caption_prompt,
    image_count,
    vqa_prompt,
    with_demonstrations,
)
from flamingo_cli.model.generation import DecodeConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.model.factory import ImageTransform
    from flamingo_cli.model.flamingo import FlamingoModel
    from flamingo_cli.model.tokenizer import SpecialTokens
    from flamingo_cli.recipe.load import LoadedRecipe

Task = Literal["caption", "vqa"]
VQA_SHOT_SEPARATOR = "||"


@dataclass(frozen=True)
class Shot:
    """An in-context example: an image and its caption, or for VQA `QUESTION||ANSWER`."""

    image: Path
    text: str


@dataclass(frozen=True)
class GenerateRequest:
    """What to ask: `prompt` with its `images`, or a `task` template about one image."""

    images: tuple[Path, ...] = ()
    prompt: str | None = None
    task: Task | None = None
    question: str | None = None
    shots: tuple[Shot, ...] = ()
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def split_vqa_shot(shot: Shot) -> tuple[str, str]:
    """A VQA shot's question and answer, written `QUESTION||ANSWER`."""
    question, sep, answer = shot.text.partition(VQA_SHOT_SEPARATOR)
    if not sep or not question.strip() or not answer.strip():
        raise UsageError(
            f"--shot {shot.image} {shot.text!r}: a VQA example is QUESTION||ANSWER",
            fix='write it as --shot IMAGE "What colour is it?||red"',
        )
    return question.strip(), answer.strip()


def build_prompt(request: GenerateRequest) -> tuple[str, list[Path]]:
    """The text the model continues and its images in `<image>` order. Conflicting options
    are usage errors; a prompt whose `<image>` count differs from the images is an error."""
    if (request.prompt is None) == (request.task is None):
        raise UsageError(
            "give either --prompt TEXT or --task caption|vqa",
            fix='e.g. --task caption --image cat.jpg, or --prompt "<image>Output:" --image cat.jpg',
        )
    if request.question is not None and request.task != "vqa":
        raise UsageError("--question goes with --task vqa", fix="add --task vqa")
    if request.prompt is not None:
        if request.shots:
            raise UsageError(
                "--shot goes with --task; a --prompt holds its own examples",
                fix="write the examples into --prompt and give their images with --image, in order",
            )
        _check_count(request.prompt, list(request.images))
        return request.prompt, list(request.images)
    if len(request.images) != 1:
        raise UsageError(
            f"--task {request.task} asks about one image, got {len(request.images)} --image",
            fix="give one --image (in-context examples go in --shot IMAGE TEXT)",
        )
    if request.task == "caption":
        demos = [caption_prompt(shot.text.strip()) for shot in request.shots]
        query = caption_prompt()
    else:
        if not request.question:
            raise UsageError("--task vqa needs --question TEXT", fix='add --question "..."')
        demos = [vqa_prompt(*split_vqa_shot(shot)) for shot in request.shots]
        query = vqa_prompt(request.question)
    images = [shot.image for shot in request.shots] + list(request.images)
    return with_demonstrations(demos, query), images


def _check_count(prompt: str, images: list[Path]) -> None:
    marks = image_count(prompt)
    if marks != len(images):
        raise FlamingoError(
            f"the prompt has {marks} <image> mark(s) and {len(images)} --image given",
            fix="put one <image> in --prompt where each image goes, and one --image per mark "
            "(in the same order)",
        )


def check_decoding(decode: DecodeConfig) -> None:
    """What `DecodeConfig` lets through but cannot decode: a NaN or infinite temperature or
    length penalty (NaN probabilities), and a minimum over the maximum (silently cut)."""
    import math

    for option, value in (
        ("--temperature", decode.temperature),
        ("--length-penalty", decode.length_penalty),
    ):
        if not math.isfinite(value):
            raise UsageError(
                f"{option} {value}: not a finite number", fix=f"give {option} a number such as 1.0"
            )
    if decode.min_new_tokens > decode.max_new_tokens:
        raise UsageError(
            f"--min-new-tokens {decode.min_new_tokens} is over --max-new-tokens {decode.max_new_tokens}",
            fix="give a --min-new-tokens no larger than --max-new-tokens",
        )


def check_context(model: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt and the new tokens fit the positions the language model was built for: past
    them its text is noise, and a huge `--max-new-tokens` would run for hours (or allocate
    its beams' tokens up front and run out of memory)."""
    from flamingo_cli.evaluate.prompts import context_length

    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        left = limit - prompt_tokens
        after = f" after a prompt of {prompt_tokens:,} tokens" if prompt_tokens else ""
        raise UsageError(
            f"--max-new-tokens {max_new_tokens:,}{after} is over the {limit:,} positions of "
            "the language model",
            fix=f"give --max-new-tokens {left} or less" if left > 0 else "use a shorter prompt",
        )


@dataclass(frozen=True)
class Generation:
    """A continuation and how it was made."""

    text: str  # decoded, special tokens removed, surrounding spaces stripped
    tokens: list[int]  # new tokens; a stopped sequence ends with its stop token
    stopped: bool
    prompt: str
    images: list[str]
    checkpoint: str
    weights: str
    decoding: dict[str, Any]
    prompt_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainedModel:
    """A model built as its recipe builds it with a checkpoint loaded over it, in eval mode."""

    model: FlamingoModel
    transform: ImageTransform
    tokenizer: PreTrainedTokenizerBase
    special: SpecialTokens
    weights: str  # what kind of checkpoint it was
    source: Path
    device: torch.device


def load_trained_model(
    loaded: LoadedRecipe, checkpoint: str, device: torch.device | None = None
) -> TrainedModel:
    """Build the recipe's model (`model.init_from` first, as training starts), load
    `checkpoint` (a directory, `latest`, `flamingo.pt` or OpenFlamingo `checkpoint.pt`) over
    it, and move it to `device` (default: the GPU when there is one)."""
    import torch

    from flamingo_cli.model.factory import build_model
    from flamingo_cli.runtime.weights import load_weights, resolve_checkpoint

    recipe = loaded.recipe
    source = resolve_checkpoint(loaded, checkpoint)
    model, transform, tokenizer, special = build_model(recipe.model, seed=recipe.run.seed)
    if recipe.model.init_from:
        load_weights(model, Path(recipe.model.init_from))
    kind = load_weights(model, source)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return TrainedModel(model, transform, tokenizer, special, kind, source, device)


def generate_text(loaded: LoadedRecipe, checkpoint: str, request: GenerateRequest) -> Generation:
    """Continue the request's prompt with the checkpoint's model. Errors in the request and
    its images come before the model loads."""
    from flamingo_cli.evaluate.prompts import read_image

    prompt, paths = build_prompt(request)
    cap = loaded.recipe.data.max_image_pixels
    images = [read_image(path, cap) for path in paths]
    trained = load_trained_model(loaded, checkpoint)
    return continue_prompt(trained, prompt, images, request.decode, loaded, paths)


def continue_prompt(
    trained: TrainedModel,
    prompt: str,
    images: list[Any],
    decode: DecodeConfig,
    loaded: LoadedRecipe,
    paths: list[Path],
) -> Generation:
    """One prompt through `model/generation.generate` under the recipe's precision; the
    stop token defaults to `<|endofchunk|>`, the padding to the tokenizer's."""
    from flamingo_cli.evaluate.prompts import encode_prompts, image_batch
    from flamingo_cli.model.generation import generate
    from flamingo_cli.runtime.memory import memory_named
    from flamingo_cli.runtime.precision import autocast_for

    tokenizer, special, device = trained.tokenizer, trained.special, trained.device
    count = len(tokenizer(prompt)["input_ids"])
    if count > MAX_PROMPT_TOKENS:
        raise FlamingoError(
            f"the prompt is {count:,} tokens, over the {MAX_PROMPT_TOKENS:,} OpenFlamingo's "
            "evaluation keeps",
            fix="use fewer or shorter --shot examples",
        )
    check_context(trained.model, count, decode.max_new_tokens)
    config = replace(
        decode,
        stop_token_ids=decode.stop_token_ids or (special.endofchunk,),
        pad_token_id=special.pad,
    )
    ids, mask = encode_prompts(tokenizer, [prompt])
    pixels = image_batch([images], trained.transform)
    start = time.perf_counter()
    what = f"decoding a prompt of {ids.shape[1]} tokens and {len(paths)} image(s)"
    fix = "lower --num-beams or --max-new-tokens, or give fewer --shot examples"
    with autocast_for(loaded.recipe.run.precision, device, "none"), memory_named(what, fix, device):
        (tokens,) = generate(
            trained.model, pixels.to(device), ids.to(device), mask.to(device), config
        )
    seconds = time.perf_counter() - start
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(
        text=str(text).strip(),
        tokens=tokens,
        stopped=bool(tokens) and tokens[-1] in config.stop_token_ids,
        prompt=prompt,
        images=[str(path) for path in paths],
        checkpoint=str(trained.source),
        weights=trained.weights,
        decoding=asdict(config) | {"stop_token_ids": list(config.stop_token_ids)},
        prompt_tokens=count,
        seconds=seconds,
    )
