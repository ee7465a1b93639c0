"""What every subcommand shares: option types and turning user errors into exit codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import click
import typer
from typer.core import TyperCommand, TyperOption

from flamingo_cli.errors import FlamingoError
from flamingo_cli.ui.console import settings

if TYPE_CHECKING:
    from flamingo_cli.recipe.load import Override
    from flamingo_cli.shards.cluster import Partition, RayOptions

T = TypeVar("T")
GLOBAL_PANEL = "Global options (also before the command)"


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        settings.verbosity = -1


def _verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        settings.verbosity = max(settings.verbosity, 0) + value


def _debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        settings.debug = True


def _global_option(decls: list[str], callback: Any, help: str, **kind: Any) -> TyperOption:
    """One of the global options as a subcommand takes it: no value of its own, set at parse."""
    return TyperOption(
        param_decls=decls,
        expose_value=False,
        callback=callback,
        help=help,
        rich_help_panel=GLOBAL_PANEL,
        **kind,
    )


class GlobalOptionsCommand(TyperCommand):
    """A subcommand that also takes `-q`, `-v` and `--debug` after its name
    (`flamingo convert mmc4 ... -q`), as uv and pip users type them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        flag = {"is_flag": True, "default": False}
        self.params += [
            _global_option(["--quiet", "-q"], _quiet, "Only errors and results.", **flag),
            _global_option(
                ["--verbose", "-v"], _verbose, "More detail (repeatable).", count=True, default=0
            ),
            _global_option(["--debug"], _debug, "Show tracebacks for user errors.", **flag),
        ]


def command(app: typer.Typer, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Register a subcommand of `app` that takes the global options after its name too."""
    return app.command(name, cls=GlobalOptionsCommand)


JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set optim.lr=3e-4 (repeatable).",
    ),
]

NprocOption = Annotated[
    int | None,
    typer.Option("--nproc-per-node", min=1, help="Processes per node (overrides the recipe)."),
]
NnodesOption = Annotated[
    int | None,
    typer.Option("--nnodes", min=1, help="Number of nodes (overrides the recipe)."),
]

NumNodesOption = Annotated[
    int | None,
    typer.Option(
        "--num-nodes",
        min=1,
        help="Machines sharing the work; each takes the inputs at positions p with "
        "p % N == rank (default: from Slurm or torchrun variables, else 1).",
        rich_help_panel="Many machines",
    ),
]
NodeRankOption = Annotated[
    int | None,
    typer.Option(
        "--node-rank",
        min=0,
        help="This machine's rank, 0..N-1 (with --num-nodes).",
        rich_help_panel="Many machines",
    ),
]
RayOption = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="One Ray task per input on a Ray cluster (a new local one, or RAY_ADDRESS). "
        "Needs pip install 'flamingo\\[ray]'.",
        rich_help_panel="Many machines",
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDRESS",
        help="Ray cluster to join, e.g. ray://head:10001 or auto (implies --ray).",
        rich_help_panel="Many machines",
    ),
]


def recipe_overrides(
    set_: list[str] | None,
    nproc_per_node: int | None = None,
    nnodes: int | None = None,
    *,
    allow_pipe: bool = False,
) -> list[Override]:
    """`--set` values, then the world-size and pipe options, as overrides naming their origin."""
    from flamingo_cli.recipe.load import Override, parse_override

    overrides = [parse_override(s) for s in set_ or []]
    if allow_pipe:
        overrides.append(Override("data.allow_pipe", True, "from --allow-pipe"))
    if nproc_per_node is not None:
        overrides.append(
            Override("distributed.nproc_per_node", nproc_per_node, "from --nproc-per-node")
        )
    if nnodes is not None:
        overrides.append(Override("distributed.nnodes", nnodes, "from --nnodes"))
    return overrides


def cluster_options(
    num_nodes: int | None, node_rank: int | None, ray: bool, ray_address: str | None
) -> tuple[Partition, RayOptions | None]:
    """This node's partition (flags, then Slurm/torchrun variables) and the Ray settings."""
    from flamingo_cli.shards.cluster import RayOptions, import_ray, resolve_partition

    partition = resolve_partition(num_nodes, node_rank)
    if not ray and ray_address is None:
        return partition, None
    import_ray()  # fail before any work when Ray is not installed
    return partition, RayOptions(address=ray_address)


AllowPipeOption = Annotated[
    bool,
    typer.Option(
        "--allow-pipe",
        help="Allow `pipe:` shard specs, which run shell commands (data.allow_pipe = true).",
    ),
]


@contextmanager
def user_errors(json_: bool = False) -> Iterator[None]:
    """Render FlamingoError without a traceback and exit with its code (1 data, 2 usage).

    With `json_`, stdout also gets `{"error": ..., "fix": ...}` so scripts never read nothing."""
    try:
        yield
    except FlamingoError as error:
        from flamingo_cli.ui.errors import error_json, render_error  # rich only on errors

        render_error(error)
        if json_:
            from flamingo_cli.ui.console import print_json

            print_json(error_json(error))
        raise typer.Exit(error.exit_code) from None


def report_of_ranks(kind: str, run_name: str, nproc: int, rank_args: list[str]) -> dict[str, Any]:
    """Start `nproc` ranks of an evaluating command (`kind`: eval, fewshot) through torchrun
    and return the report rank 0 wrote, as JSON data. A failure is a FlamingoError (so `--json` prints it too)
    pointing at rank 0's error and the logs, which are kept; after a success the working
    folder is removed."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from flamingo_cli.runtime.launch import Rendezvous, run_torchrun, torchrun_command
    from flamingo_cli.ui import console as ui

    work = Path(tempfile.mkdtemp(prefix=f"flamingo-{kind}-"))
    report_path = work / "report.json"
    cmd = torchrun_command(
        Rendezvous(nproc, 1, run_id=f"{run_name}-{kind}"),
        [*rank_args, "--report", str(report_path)],
        work / "logs",
    )
    ui.detail(" ".join(cmd))
    code = run_torchrun(cmd)
    if code != 0 or not report_path.is_file():
        raise FlamingoError(
            f"evaluation failed (exit {code})",
            fix=f"see rank 0's error above; every rank's log is under {work / 'logs'}",
        )
    data: dict[str, Any] = json.loads(report_path.read_text(encoding="utf-8"))
    shutil.rmtree(work, ignore_errors=True)
    return data
