"""`flamingo generate`: what a checkpoint says about images, in one process."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperOption

from flamingo_cli.cli.common import GlobalOptionsCommand, JsonOption, SetOption, user_errors

if TYPE_CHECKING:
    from flamingo_cli.evaluate.generate import GenerateRequest, Generation

_DECODING = "Decoding"
_SHOT_HELP = (
    "An in-context example before the query (repeatable, in order): its image and, for "
    "--task caption, its caption; for --task vqa, QUESTION||ANSWER "
    '(--shot red.png "What colour is it?||red").'
)


class Task(str, Enum):
    caption = "caption"
    vqa = "vqa"


def _keep_shots(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta["generate.shots"] = list(value or ())


class GenerateCommand(GlobalOptionsCommand):
    """`generate` with `--shot IMAGE TEXT`, an option of two values that Typer's own
    annotations cannot declare."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shot = TyperOption(
            param_decls=["--shot"],
            nargs=2,
            multiple=True,
            type=(click.Path(path_type=Path), str),
            metavar="IMAGE TEXT",
            expose_value=False,
            callback=_keep_shots,
            help=_SHOT_HELP,
        )
        after = next(i for i, param in enumerate(self.params) if param.name == "question")
        self.params.insert(after + 1, shot)


def register(app: typer.Typer) -> None:
    app.command("generate", cls=GenerateCommand)(generate)


_RecipeArg = Annotated[
    Path, typer.Argument(help="Recipe TOML file (builds the model).", dir_okay=False)
]
_CheckpointOption = Annotated[
    str,
    typer.Option(
        "--checkpoint",
        metavar="DIR|FILE|latest",
        help="A checkpoint directory, an exported flamingo.pt or OpenFlamingo checkpoint.pt, "
        "or 'latest' (the newest complete checkpoint of the recipe's run).",
    ),
]
_ImageOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--image",
        metavar="PATH",
        help="An image (repeatable): the k-th --image is the k-th <image> of --prompt; "
        "with --task, the one image asked about.",
    ),
]
_PromptOption = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        metavar="TEXT",
        help='Text to continue, with <image> where each image goes, e.g. "<image>Output:".',
    ),
]
_TaskOption = Annotated[
    Task | None,
    typer.Option(
        "--task",
        help="OpenFlamingo's template: caption (<image>Output:) or vqa "
        "(<image>Question:Q Short answer:), after the --shot examples.",
    ),
]
_QuestionOption = Annotated[
    str | None, typer.Option("--question", metavar="TEXT", help="The question (--task vqa).")
]
_BeamsOption = Annotated[
    int,
    typer.Option(
        "--num-beams",
        min=1,
        help="Beam search with N beams (eval-fewshot: 3); 1 is greedy.",
        rich_help_panel=_DECODING,
    ),
]
_PenaltyOption = Annotated[
    float,
    typer.Option(
        "--length-penalty",
        help="Beam score = summed log-probability / length ** this (eval-fewshot: 0).",
        rich_help_panel=_DECODING,
    ),
]
_MaxOption = Annotated[
    int,
    typer.Option(
        "--max-new-tokens", min=1, help="At most N new tokens.", rich_help_panel=_DECODING
    ),
]
_MinOption = Annotated[
    int,
    typer.Option(
        "--min-new-tokens",
        min=0,
        help="No <|endofchunk|> before N new tokens.",
        rich_help_panel=_DECODING,
    ),
]
_SampleOption = Annotated[
    bool,
    typer.Option(
        "--sample", help="Sample instead of taking the likeliest.", rich_help_panel=_DECODING
    ),
]
_TemperatureOption = Annotated[
    float,
    typer.Option("--temperature", min=0.0, help="Sampling temperature.", rich_help_panel=_DECODING),
]
_TopKOption = Annotated[
    int,
    typer.Option(
        "--top-k",
        min=0,
        help="Sample from the K likeliest tokens (0: all).",
        rich_help_panel=_DECODING,
    ),
]
_TopPOption = Annotated[
    float,
    typer.Option(
        "--top-p",
        min=0.0,
        max=1.0,
        help="Sample from the likeliest tokens holding this much probability.",
        rich_help_panel=_DECODING,
    ),
]
_SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed", help="Seed for --sample (same seed, same text).", rich_help_panel=_DECODING
    ),
]


# a Typer command: long only for its options, the body is parse -> call -> render
def generate(
    ctx: typer.Context,
    recipe: _RecipeArg,
    checkpoint: _CheckpointOption,
    image: _ImageOption = None,
    prompt: _PromptOption = None,
    task: _TaskOption = None,
    question: _QuestionOption = None,
    num_beams: _BeamsOption = 1,
    length_penalty: _PenaltyOption = 1.0,
    max_new_tokens: _MaxOption = 20,
    min_new_tokens: _MinOption = 0,
    sample: _SampleOption = False,
    temperature: _TemperatureOption = 1.0,
    top_k: _TopKOption = 0,
    top_p: _TopPOption = 1.0,
    seed: _SeedOption = None,
    set_: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Continue a prompt about images with a trained checkpoint and print the continuation.

    Give --prompt with one <image> per --image, or --task caption|vqa about one --image with --shot examples first (OpenFlamingo's evaluation prompts). Decoding stops at <|endofchunk|>; greedy unless --num-beams or --sample. Exit 0 on success, 1 on image or checkpoint errors, 2 on usage errors.
    """
    from flamingo_cli.evaluate.generate import GenerateRequest, Shot
    from flamingo_cli.model.generation import DecodeConfig

    with user_errors(json_):
        decode = DecodeConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            do_sample=sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        shots = tuple(Shot(Path(p), t) for p, t in ctx.meta.get("generate.shots", []))
        request = GenerateRequest(
            images=tuple(image or ()),
            prompt=prompt,
            task=task.value if task else None,
            question=question,
            shots=shots,
            decode=decode,
        )
        _show(_run(recipe, checkpoint, request, set_), json_)


def _run(
    recipe: Path, checkpoint: str, request: GenerateRequest, set_: list[str] | None
) -> Generation:
    from flamingo_cli.evaluate.generate import build_prompt, check_decoding, generate_text
    from flamingo_cli.recipe.load import load_recipe, parse_override
    from flamingo_cli.ui.generate_view import loading

    loaded = load_recipe(recipe, [parse_override(s) for s in set_ or []])
    build_prompt(request)  # usage errors before the model loads
    check_decoding(request.decode)
    with loading(checkpoint):
        return generate_text(loaded, checkpoint, request)


def _show(result: Generation, json_: bool) -> None:
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.generate_view import render_generation

    if json_:
        ui.print_json(result.to_dict())
    else:
        render_generation(result)
