"""`flamingo eval-fewshot`: few-shot captioning and VQA scores of a checkpoint, here, as a
rank, or through torchrun (docs/formats.md §14).

The ranks torchrun starts run this same command (`python -m flamingo_cli eval-fewshot ...`);
rank 0 writes the report to the hidden `--report PATH` for the launching process."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flamingo_cli.cli.common import (
    GlobalOptionsCommand,
    JsonOption,
    SetOption,
    report_of_ranks,
    user_errors,
)

if TYPE_CHECKING:
    from flamingo_cli.evaluate.fewshot.report import FewshotReport
    from flamingo_cli.evaluate.fewshot.runner import FewshotRequest
    from flamingo_cli.recipe.load import LoadedRecipe

DEFAULT_SHOTS = (0, 4, 8, 16, 32)  # evaluate/fewshot/protocol.py (not imported: no torch here)


class Task(str, Enum):
    coco = "coco"
    flickr30k = "flickr30k"
    vqav2 = "vqav2"
    okvqa = "okvqa"
    textvqa = "textvqa"
    vizwiz = "vizwiz"


class Ablate(str, Enum):
    none = "none"
    shuffle = "shuffle"


class VqaMetric(str, Enum):
    openflamingo = "openflamingo"
    official = "official"


class CaptionTemplate(str, Enum):
    openflamingo = "openflamingo"
    laion = "laion"


class _ShotsCommand(GlobalOptionsCommand):
    """Also takes `--shots 0 4 8` (the counts after one `--shots`, as OpenFlamingo's
    `--shots` takes them), besides `--shots 0 --shots 4` and `--shots 0,4,8`."""

    def make_parser(self, ctx: Any) -> Any:
        parser = super().make_parser(ctx)
        option = parser._long_opt["--shots"]
        plain = option.process

        def process(value: Any, state: Any) -> None:
            plain(value, state)
            while state.rargs and state.rargs[0].isdigit():
                plain(state.rargs.pop(0), state)

        option.process = process  # type: ignore[method-assign]
        return parser


def register(app: typer.Typer) -> None:
    app.command("eval-fewshot", cls=_ShotsCommand)(eval_fewshot)


_Recipe = Annotated[Path, typer.Argument(help="Recipe TOML file.", dir_okay=False)]
_Checkpoint = Annotated[
    str,
    typer.Option(
        "--checkpoint",
        metavar="DIR|FILE|latest",
        help="A checkpoint directory, an exported flamingo.pt or OpenFlamingo checkpoint.pt, "
        "or 'latest' (the newest complete checkpoint of the recipe's run).",
    ),
]
_TaskOption = Annotated[Task, typer.Option("--task", help="The benchmark.")]
_Data = Annotated[
    Path,
    typer.Option(
        "--data",
        metavar="DIR",
        file_okay=False,
        help="The dataset's folder as it ships: annotation files and image folders "
        "(coco: dataset_coco.json + train2014/ val2014/; VQA: *questions*.json + "
        "*annotations*.json; see docs/formats.md §14).",
    ),
]
_Shots = Annotated[
    list[str] | None,
    typer.Option(
        "--shots",
        metavar="N...",
        help="Shot counts (default 0 4 8 16 32); `--shots 0 4`, `--shots 0,4` or repeated.",
    ),
]
_Trials = Annotated[int, typer.Option("--trials", min=1, help="Trials per shot count.")]
_Seed = Annotated[int, typer.Option("--seed", help="Seed of trial 1; trial k uses seed + k - 1.")]
_NumSamples = Annotated[
    int | None,
    typer.Option("--num-samples", min=1, help="A seeded random subset of N test samples."),
]
_ZeroShotDemos = Annotated[
    int,
    typer.Option(
        "--zero-shot-demos",
        min=0,
        help="Text-only demonstrations a 0-shot prompt carries (OpenFlamingo: 2).",
    ),
]
_QuerySet = Annotated[
    int, typer.Option("--query-set-size", min=1, help="Train samples demonstrations come from.")
]
_BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per batch.")]
_Beams = Annotated[int, typer.Option("--num-beams", min=1, help="Beam search width.")]
_MaxNew = Annotated[
    int | None,
    typer.Option("--max-new-tokens", min=1, help="Default: 20 for captions, 5 for answers."),
]
_Ablate = Annotated[
    Ablate | None,
    typer.Option(
        "--ablate-images",
        help="Also decode without images (none: cross-attention off) or with each test "
        "sample shown another's image (shuffle), and show the gap.",
    ),
]
_CocoAnnotations = Annotated[
    Path | None,
    typer.Option(
        "--coco-annotations",
        metavar="FILE",
        dir_okay=False,
        help="Captioning references from a COCO-format captions file (OpenFlamingo's "
        "--coco_annotations_json_path) instead of the Karpathy sentences.",
    ),
]
_Metric = Annotated[
    VqaMetric,
    typer.Option(
        "--vqa-metric",
        help="openflamingo: as OpenFlamingo's vqa_metric.py (comparable with its papers); "
        "official: the official VQA evaluation's rules.",
    ),
]
_Template = Annotated[
    CaptionTemplate,
    typer.Option(
        "--caption-template",
        help="openflamingo: <image>Output:{caption}; laion: <image>{caption}, the text of "
        "LAION pairs, for models trained on pairs only.",
    ),
]
_Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        metavar="DIR",
        file_okay=False,
        help="Where results.json and predictions.jsonl go (default <run>/eval-fewshot/TASK).",
    ),
]
_Rices = Annotated[
    bool,
    typer.Option(
        "--rices",
        help="Demonstrations most similar to the test image (RICES) instead of drawn at random.",
        rich_help_panel="RICES",
    ),
]
_RicesEncoder = Annotated[
    str,
    typer.Option(
        "--rices-encoder",
        metavar="NAME|model",
        help="open_clip model that embeds the images, or 'model': the evaluated model's own "
        "vision encoder.",
        rich_help_panel="RICES",
    ),
]
_RicesPretrained = Annotated[
    str | None,
    typer.Option(
        "--rices-pretrained",
        metavar="TAG",
        help="Its pretrained tag (default: the recipe's model.vision_pretrained).",
        rich_help_panel="RICES",
    ),
]
_RicesCache = Annotated[
    Path | None,
    typer.Option(
        "--rices-cache",
        metavar="FILE",
        dir_okay=False,
        help="Train image features cached here (default: rices-ENCODER.pt in --out).",
        rich_help_panel="RICES",
    ),
]
_Nproc = Annotated[
    int | None,
    typer.Option("--nproc-per-node", min=1, help="Evaluate with N processes (torchrun)."),
]
_Report = Annotated[
    Path | None,
    typer.Option("--report", hidden=True, help="As a rank: rank 0 writes the report here."),
]


# Long only for its options: the body is the same four steps as eval-loss's.
def eval_fewshot(
    recipe: _Recipe,
    checkpoint: _Checkpoint,
    task: _TaskOption,
    data: _Data,
    shots: _Shots = None,
    trials: _Trials = 1,
    seed: _Seed = 42,
    num_samples: _NumSamples = None,
    query_set_size: _QuerySet = 2048,
    zero_shot_demos: _ZeroShotDemos = 2,
    batch_size: _BatchSize = 8,
    num_beams: _Beams = 3,
    max_new_tokens: _MaxNew = None,
    ablate_images: _Ablate = None,
    coco_annotations: _CocoAnnotations = None,
    vqa_metric: _Metric = VqaMetric.openflamingo,
    caption_template: _Template = CaptionTemplate.openflamingo,
    out: _Out = None,
    rices: _Rices = False,
    rices_encoder: _RicesEncoder = "ViT-L-14",
    rices_pretrained: _RicesPretrained = None,
    rices_cache: _RicesCache = None,
    set_: SetOption = None,
    json_: JsonOption = False,
    nproc_per_node: _Nproc = None,
    report_to: _Report = None,
) -> None:
    """Few-shot captioning (CIDEr) and VQA (accuracy) as OpenFlamingo's papers score them.

    Demonstrations from the train split, beam search 3, a table per shot count with mean and std over trials; every prediction in predictions.jsonl beside results.json. Exit 0 on success, 1 on data or checkpoint errors, 2 on usage errors.
    """
    from flamingo_cli.runtime.launch import started_by_launcher

    with user_errors(json_):
        loaded = _loaded(recipe, set_)
        pretrained = rices_pretrained or loaded.recipe.model.vision_pretrained
        cache = rices_cache.resolve() if rices_cache else None
        ask = _Asked(
            checkpoint,
            task.value,
            data.resolve(),
            _shot_counts(shots),
            (trials, seed, num_samples, query_set_size, num_beams, max_new_tokens, zero_shot_demos),
            batch_size,
            ablate_images.value if ablate_images else None,
            coco_annotations.resolve() if coco_annotations else None,
            vqa_metric.value,
            caption_template.value,
            out.resolve() if out else None,
            (rices_encoder, pretrained, cache) if rices else None,
        )
        nproc = nproc_per_node or 1
        if started_by_launcher(nproc) or nproc == 1:
            report = ask.evaluate_here(loaded, display=not json_)
            if report is None or report_to is not None:
                _write_report(report, report_to)
                return
        else:
            from flamingo_cli.evaluate.fewshot.runner import prepare

            # data and usage errors before torchrun starts
            prepare(ask.request(), loaded.recipe.data.max_image_pixels)
            args = ["eval-fewshot", str(recipe.resolve()), *ask.args()]
            args += [arg for s in set_ or [] for arg in ("--set", s)]
            report = _through_torchrun(
                loaded.recipe.run.name, nproc, [*args, "-q"] if json_ else args
            )
        _show(report, json_)


def _shot_counts(values: list[str] | None) -> tuple[int, ...]:
    """`--shots` values, each one count or several joined by commas or spaces."""
    from flamingo_cli.errors import UsageError

    if not values:
        return DEFAULT_SHOTS
    parts = [p for v in values for p in v.replace(",", " ").split()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(
            f"--shots {' '.join(values)}: shot counts are whole numbers of 0 or more",
            fix="e.g. --shots 0 4 8 16 32",
        )
    return tuple(dict.fromkeys(int(p) for p in parts))


@dataclass(frozen=True)
class _Asked:
    """What to evaluate, as the command line said it (paths made absolute)."""

    checkpoint: str
    task: str
    data: Path
    shots: tuple[int, ...]
    numbers: tuple[int, int, int | None, int, int, int | None, int]
    batch_size: int
    ablation: str | None
    coco_annotations: Path | None
    vqa_metric: str
    caption_template: str
    out: Path | None
    rices: tuple[str, str | None, Path | None] | None

    def request(self) -> FewshotRequest:
        from flamingo_cli.evaluate.fewshot.protocol import FewshotProtocol
        from flamingo_cli.evaluate.fewshot.rices import RicesConfig
        from flamingo_cli.evaluate.fewshot.runner import FewshotRequest

        trials, seed, num_samples, query_set, beams, max_new, zero_shot = self.numbers
        protocol = FewshotProtocol(
            shots=self.shots,
            trials=trials,
            seed=seed,
            num_samples=num_samples,
            query_set_size=query_set,
            num_beams=beams,
            max_new_tokens=max_new,
            zero_shot_demos=zero_shot,
            caption_template=self.caption_template,  # type: ignore[arg-type]
        )
        return FewshotRequest(
            self.task,
            self.data,
            protocol,
            coco_annotations=self.coco_annotations,
            ablation=self.ablation,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            out=self.out,
            vqa_metric=self.vqa_metric,  # type: ignore[arg-type]
            rices=RicesConfig(*self.rices) if self.rices else None,
        )

    def evaluate_here(self, loaded: LoadedRecipe, *, display: bool) -> FewshotReport | None:
        """Evaluate as this process's rank; the report on rank 0, None on the others."""
        from flamingo_cli.evaluate.fewshot.runner import evaluate_fewshot
        from flamingo_cli.ui.fewshot_view import FewshotDisplay

        with FewshotDisplay(enabled=display) as events:
            return evaluate_fewshot(loaded, self.checkpoint, self.request(), events)

    def args(self) -> list[str]:
        """These choices as `eval-fewshot` options for the ranks."""
        trials, seed, num_samples, query_set, beams, max_new, zero_shot = self.numbers
        path = self.checkpoint != "latest"
        args = ["--checkpoint", str(Path(self.checkpoint).resolve()) if path else "latest"]
        args += ["--task", self.task, "--data", str(self.data)]
        args += ["--shots", ",".join(str(s) for s in self.shots), "--trials", str(trials)]
        args += ["--seed", str(seed), "--query-set-size", str(query_set)]
        args += ["--zero-shot-demos", str(zero_shot)]
        args += ["--batch-size", str(self.batch_size), "--num-beams", str(beams)]
        args += ["--num-samples", str(num_samples)] if num_samples else []
        args += ["--max-new-tokens", str(max_new)] if max_new else []
        args += ["--ablate-images", self.ablation] if self.ablation else []
        args += ["--coco-annotations", str(self.coco_annotations)] if self.coco_annotations else []
        args += ["--vqa-metric", self.vqa_metric, "--caption-template", self.caption_template]
        if self.rices:
            encoder, pretrained, cache = self.rices
            args += ["--rices", "--rices-encoder", encoder]
            args += ["--rices-pretrained", pretrained] if pretrained else []
            args += ["--rices-cache", str(cache)] if cache else []
        return args + (["--out", str(self.out)] if self.out else [])


def _loaded(recipe: Path, set_: list[str] | None) -> LoadedRecipe:
    from flamingo_cli.recipe.load import load_recipe, parse_override

    return load_recipe(recipe, [parse_override(s) for s in set_ or []])


def _write_report(report: FewshotReport | None, path: Path | None) -> None:
    import json

    if report is not None and path is not None:
        path.write_text(json.dumps(report.to_dict()), encoding="utf-8")


def _show(report: FewshotReport, json_: bool) -> None:
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.fewshot_view import render_fewshot_report

    if json_:
        ui.print_json(report.to_dict())
    else:
        render_fewshot_report(report)


def _through_torchrun(run_name: str, nproc: int, rank_args: list[str]) -> FewshotReport:
    """The report of `nproc` ranks of this command (cli/common.py `report_of_ranks`)."""
    from flamingo_cli.evaluate.fewshot.report import FewshotReport

    return FewshotReport.from_dict(report_of_ranks("fewshot", run_name, nproc, rank_args))
