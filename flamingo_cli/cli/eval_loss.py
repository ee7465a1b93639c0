"""`flamingo eval-loss`: held-out loss of a checkpoint, here, as a rank, or through torchrun."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flamingo_cli.cli.common import AllowPipeOption, JsonOption, SetOption, command, user_errors

if TYPE_CHECKING:
    from flamingo_cli.evaluate.loss import Ablation
    from flamingo_cli.evaluate.run import EvalReport


class Dataset(str, Enum):
    laion = "laion"
    mmc4 = "mmc4"


class Ablate(str, Enum):
    none = "none"
    shuffle = "shuffle"


def register(app: typer.Typer) -> None:
    command(app, "eval-loss")(eval_loss)


def eval_loss(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.", dir_okay=False)],
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            metavar="DIR|FILE|latest",
            help="A checkpoint directory, an exported flamingo.pt or OpenFlamingo checkpoint.pt, "
            "or 'latest' (the newest complete checkpoint of the recipe's run).",
        ),
    ],
    shards: Annotated[
        str | None,
        typer.Option(
            "--shards",
            metavar="SPEC",
            help="Shards to evaluate instead of the recipe's eval_shards (brace spec, '::', "
            "directory).",
        ),
    ] = None,
    dataset: Annotated[
        Dataset | None,
        typer.Option(
            "--dataset",
            help="Only this dataset; with --shards, the kind of samples they hold.",
        ),
    ] = None,
    max_batches: Annotated[
        int | None, typer.Option("--max-batches", min=1, help="At most N batches per rank.")
    ] = None,
    ablate_images: Annotated[
        Ablate | None,
        typer.Option(
            "--ablate-images",
            help="Also evaluate the same batches without images (none: cross-attention off) "
            "or with each sample given another sample's images (shuffle), and show the gap.",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help="Samples per batch (default: the recipe's)."),
    ] = None,
    set_: SetOption = None,
    allow_pipe: AllowPipeOption = False,
    json_: JsonOption = False,
    nproc_per_node: Annotated[
        int | None,
        typer.Option("--nproc-per-node", min=1, help="Evaluate with N processes (torchrun)."),
    ] = None,
) -> None:
    """Held-out loss per dataset: exact token-weighted loss, perplexity, token and sample counts.

    Deterministic: every sample of the eval shards once, in a fixed order, no flips or random drops. Exit 0 on success, 1 on data or checkpoint errors, 2 on usage errors.
    """
    from flamingo_cli.recipe.load import load_recipe, parse_override
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.eval_view import EvalDisplay, render_eval_report

    with user_errors(json_):
        set_ = [*(set_ or []), *(["data.allow_pipe=true"] if allow_pipe else [])]
        loaded = load_recipe(recipe, [parse_override(s) for s in set_])
        # fail on a wrong dataset or missing eval shards before any heavy import
        from flamingo_cli.evaluate.run import eval_targets

        chosen = dataset.value if dataset else None
        eval_targets(loaded.recipe, shards, chosen)
        from flamingo_cli.runtime.launch import started_by_launcher

        nproc = nproc_per_node or 1
        ablation: Ablation | None = "none" if ablate_images is Ablate.none else None
        if ablate_images is Ablate.shuffle:
            ablation = "shuffle"
        if started_by_launcher(nproc) or nproc == 1:
            from flamingo_cli.evaluate.run import evaluate_loss

            with EvalDisplay(enabled=not json_) as display:
                report = evaluate_loss(
                    loaded,
                    checkpoint,
                    shards=shards,
                    dataset=chosen,
                    max_batches=max_batches,
                    ablation=ablation,
                    batch_size=batch_size,
                    events=display,
                )
            from flamingo_cli.runtime.distributed import world_from_env

            if world_from_env()[0] != 0:
                return
        else:
            launched = _through_torchrun(
                recipe,
                loaded.recipe.run.name,
                nproc,
                [
                    *(a for s in set_ for a in ("--set", s)),
                    "--checkpoint",
                    str(Path(checkpoint).resolve()) if checkpoint != "latest" else checkpoint,
                    *(("--shards", shards) if shards else ()),
                    *(("--dataset", chosen) if chosen else ()),
                    *(("--max-batches", str(max_batches)) if max_batches else ()),
                    *(("--ablate-images", ablation) if ablation else ()),
                    *(("--batch-size", str(batch_size)) if batch_size else ()),
                    *(("--quiet",) if json_ else ()),
                ],
            )
            report = launched
        if json_:
            ui.print_json(report.to_dict())
        else:
            render_eval_report(report)


def _through_torchrun(
    recipe: Path, run_name: str, nproc: int, worker_args: list[str]
) -> EvalReport:
    """Start `nproc` ranks of the eval worker; the report rank 0 wrote. A failure is a
    FlamingoError (so `--json` prints it too) pointing at rank 0's error and the logs."""
    import json
    import tempfile

    from flamingo_cli.errors import FlamingoError
    from flamingo_cli.evaluate.run import EvalReport
    from flamingo_cli.runtime.launch import Rendezvous, run_torchrun, torchrun_command
    from flamingo_cli.ui import console as ui

    work = Path(tempfile.mkdtemp(prefix="flamingo-eval-"))
    report_path = work / "report.json"
    cmd = torchrun_command(
        Rendezvous(nproc, 1, run_id=f"{run_name}-eval"),
        recipe.resolve(),
        [*worker_args, "--report", str(report_path)],
        work / "logs",
        module="flamingo_cli.evaluate.worker",
    )
    ui.detail(" ".join(cmd))
    code = run_torchrun(cmd)
    if code != 0 or not report_path.is_file():
        raise FlamingoError(
            f"evaluation failed (exit {code})",
            fix=f"see rank 0's error above; every rank's log is under {work / 'logs'}",
        )
    return EvalReport.from_dict(json.loads(report_path.read_text(encoding="utf-8")))
