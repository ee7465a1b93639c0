"""`flamingo eval-loss`: held-out loss of a checkpoint, here, as a rank, or through torchrun.

The ranks torchrun starts run this same command (`python -m flamingo_cli eval-loss ...`);
rank 0 writes the report to the hidden `--report PATH` for the launching process."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flamingo_cli.cli.common import (
    AllowPipeOption,
    JsonOption,
    SetOption,
    command,
    report_of_ranks,
    user_errors,
)

if TYPE_CHECKING:
    from flamingo_cli.evaluate.loss import Ablation
    from flamingo_cli.evaluate.run import EvalReport
    from flamingo_cli.recipe.load import LoadedRecipe


class Ablate(str, Enum):
    none = "none"
    shuffle = "shuffle"


def register(app: typer.Typer) -> None:
    command(app, "eval-loss")(eval_loss)


_RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file.", dir_okay=False)]

_CheckpointOption = Annotated[
    str,
    typer.Option(
        "--checkpoint",
        metavar="DIR|FILE|latest",
        help="A checkpoint directory, an exported flamingo.pt or OpenFlamingo checkpoint.pt, "
        "or 'latest' (the newest complete checkpoint of the recipe's run).",
    ),
]

_ShardsOption = Annotated[
    str | None,
    typer.Option(
        "--shards",
        metavar="SPEC",
        help="Shards to evaluate instead of the recipe's eval_shards (brace spec, '::', "
        "directory).",
    ),
]

_DatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        metavar="NAME",
        help="Only this dataset of the recipe; with --shards, the dataset whose samples (and "
        "preprocessing) they hold.",
    ),
]

_BySourceOption = Annotated[
    bool,
    typer.Option(
        "--by-source",
        help="Also a row per source of each blended dataset (NAME/SOURCE), from its eval shards.",
    ),
]

_MaxBatchesOption = Annotated[
    int | None, typer.Option("--max-batches", min=1, help="At most N batches per rank.")
]

_AblateOption = Annotated[
    Ablate | None,
    typer.Option(
        "--ablate-images",
        help="Also evaluate the same batches without images (none: cross-attention off) "
        "or with each sample given another sample's images (shuffle), and show the gap.",
    ),
]

_BatchSizeOption = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Samples per batch (default: the recipe's)."),
]

_NprocOption = Annotated[
    int | None,
    typer.Option("--nproc-per-node", min=1, help="Evaluate with N processes (torchrun)."),
]

_ReportOption = Annotated[
    Path | None,
    typer.Option(
        "--report",
        hidden=True,
        help="As a rank `flamingo eval-loss` started: rank 0 writes the report here as JSON.",
    ),
]


def eval_loss(
    recipe: _RecipeArg,
    checkpoint: _CheckpointOption,
    shards: _ShardsOption = None,
    dataset: _DatasetOption = None,
    max_batches: _MaxBatchesOption = None,
    ablate_images: _AblateOption = None,
    batch_size: _BatchSizeOption = None,
    by_source: _BySourceOption = False,
    set_: SetOption = None,
    allow_pipe: AllowPipeOption = False,
    json_: JsonOption = False,
    nproc_per_node: _NprocOption = None,
    report_to: _ReportOption = None,
) -> None:
    """Held-out loss per dataset: exact token-weighted loss, perplexity, token and sample counts.

    Deterministic: every sample of the eval shards once, in a fixed order, no flips or random drops. Exit 0 on success, 1 on data or checkpoint errors, 2 on usage errors.
    """
    from flamingo_cli.evaluate.run import eval_targets
    from flamingo_cli.runtime.launch import started_by_launcher

    with user_errors(json_):
        loaded = _loaded(recipe, set_, allow_pipe)
        ask = _Asked(
            checkpoint,
            shards,
            dataset,
            max_batches,
            _ablation(ablate_images),
            batch_size,
            by_source,
        )
        # usage errors before torch loads
        eval_targets(loaded.recipe, ask.shards, ask.dataset, by_source=by_source)
        nproc = nproc_per_node or 1
        if started_by_launcher(nproc) or nproc == 1:
            report = ask.evaluate_here(loaded, display=not json_)
            if report is None or report_to is not None:
                _write_report(report, report_to)
                return
        else:
            rank_args = _rank_args(recipe, ask, set_, allow_pipe, json_)
            report = _through_torchrun(loaded.recipe.run.name, nproc, rank_args)
        _show(report, json_)


@dataclass(frozen=True)
class _Asked:
    """What to evaluate, as the command line said it."""

    checkpoint: str
    shards: str | None
    dataset: str | None
    max_batches: int | None
    ablation: Ablation | None
    batch_size: int | None
    by_source: bool = False

    def evaluate_here(self, loaded: LoadedRecipe, *, display: bool) -> EvalReport | None:
        """Evaluate as this process's rank; the report on rank 0, None on the others."""
        from flamingo_cli.evaluate.run import evaluate_loss
        from flamingo_cli.runtime.distributed import world_from_env
        from flamingo_cli.ui.eval_view import EvalDisplay

        with EvalDisplay(enabled=display) as events:
            report = evaluate_loss(
                loaded,
                self.checkpoint,
                shards=self.shards,
                dataset=self.dataset,
                max_batches=self.max_batches,
                ablation=self.ablation,
                batch_size=self.batch_size,
                events=events,
                by_source=self.by_source,
            )
        return report if world_from_env()[0] == 0 else None

    def args(self) -> list[str]:
        """These choices as `eval-loss` options (a path checkpoint made absolute)."""
        path = self.checkpoint != "latest"
        args = ["--checkpoint", str(Path(self.checkpoint).resolve()) if path else "latest"]
        args += ["--shards", self.shards] if self.shards else []
        args += ["--dataset", self.dataset] if self.dataset else []
        args += ["--max-batches", str(self.max_batches)] if self.max_batches else []
        args += ["--ablate-images", self.ablation] if self.ablation else []
        args += ["--batch-size", str(self.batch_size)] if self.batch_size else []
        args += ["--by-source"] if self.by_source else []
        return args


def _loaded(recipe: Path, set_: list[str] | None, allow_pipe: bool) -> LoadedRecipe:
    """The recipe with `--set` and `--allow-pipe` applied."""
    from flamingo_cli.recipe.load import load_recipe, parse_override

    sets = [*(set_ or []), *(["data.allow_pipe=true"] if allow_pipe else [])]
    return load_recipe(recipe, [parse_override(s) for s in sets])


def _ablation(ablate_images: Ablate | None) -> Ablation | None:
    if ablate_images is Ablate.none:
        return "none"
    return "shuffle" if ablate_images is Ablate.shuffle else None


def _write_report(report: EvalReport | None, path: Path | None) -> None:
    """Rank 0's report, as JSON for the launching process (other ranks have none)."""
    import json

    if report is not None and path is not None:
        path.write_text(json.dumps(report.to_dict()), encoding="utf-8")


def _show(report: EvalReport, json_: bool) -> None:
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.eval_view import render_eval_report

    if json_:
        ui.print_json(report.to_dict())
    else:
        render_eval_report(report)


def _rank_args(
    recipe: Path, ask: _Asked, set_: list[str] | None, allow_pipe: bool, json_: bool
) -> list[str]:
    """The user's arguments for the ranks' own `flamingo eval-loss` (quiet under --json)."""
    args = ["eval-loss", str(recipe.resolve()), *ask.args()]
    args += [arg for s in set_ or [] for arg in ("--set", s)]
    args += ["--allow-pipe"] if allow_pipe else []
    return [*args, "-q"] if json_ else args


def _through_torchrun(run_name: str, nproc: int, rank_args: list[str]) -> EvalReport:
    """The report of `nproc` ranks of this command (cli/common.py `report_of_ranks`)."""
    from flamingo_cli.evaluate.run import EvalReport

    return EvalReport.from_dict(report_of_ranks("eval", run_name, nproc, rank_args))
