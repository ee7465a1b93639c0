"""Start ranks: whether this process is one torchrun/srun started, and running torchrun."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from flamingo_cli.recipe.schema import Recipe

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ABORTED = 130  # exit code of a run aborted by a second Ctrl-C (128 + SIGINT)


@dataclass(frozen=True)
class Rendezvous:
    """How this node meets the others: counts, rank and the c10d endpoint."""

    nproc_per_node: int
    nnodes: int
    node_rank: int | None = None
    endpoint: str | None = None
    run_id: str = "flamingo"


def started_by_launcher(world_size: int) -> bool:
    """True inside a rank that torchrun, or srun with one task per rank, started.

    Under srun with one task per node (SLURM_NTASKS == nnodes < world size) this process is a
    node's launcher instead, and starts that node's ranks through torchrun.
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return True
    tasks = int(env.get("SLURM_NTASKS", "1"))
    return "SLURM_PROCID" in env and tasks > 1 and tasks == world_size


def rendezvous_for(
    recipe: Recipe,
    *,
    node_rank: int | None = None,
    endpoint: str | None = None,
) -> Rendezvous:
    """Rendezvous settings from the recipe, the command line, then the environment."""
    env = os.environ
    if endpoint is None and "MASTER_ADDR" in env:
        endpoint = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
    if node_rank is None and "NODE_RANK" in env:
        node_rank = int(env["NODE_RANK"])
    if node_rank is None and "SLURM_NODEID" in env:
        node_rank = int(env["SLURM_NODEID"])
    dist = recipe.distributed
    return Rendezvous(dist.nproc_per_node, dist.nnodes, node_rank, endpoint, recipe.run.name)


def torchrun_command(rdzv: Rendezvous, rank_args: Sequence[str], log_dir: Path) -> list[str]:
    """The torchrun command (`flamingo_cli.cli.torchrun`, torchrun without its traceback for
    ranks that failed on a user error) starting `python -m flamingo_cli RANK_ARGS` (a
    subcommand and its arguments) on every rank of this node."""
    cmd = [sys.executable, "-m", "flamingo_cli.cli.torchrun"]
    if rdzv.nnodes == 1 and rdzv.endpoint is None:
        cmd += ["--standalone"]
    else:
        cmd += [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv.endpoint or "localhost:29500",
            "--rdzv-id",
            rdzv.run_id,
        ]
        if rdzv.node_rank is not None:
            cmd += ["--node-rank", str(rdzv.node_rank)]
    cmd += [
        "--nnodes",
        str(rdzv.nnodes),
        "--nproc-per-node",
        str(rdzv.nproc_per_node),
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",
        "--tee",
        "3",
        "--local-ranks-filter",
        "0",
        "-m",
        "flamingo_cli",
        *rank_args,
    ]
    return cmd


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc), to signal the ranks but not their agent."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: the ppid follows the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (torchrun starts each rank in its own session),
    or the process alone when it leads none."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_torchrun(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run torchrun; SIGTERM/SIGUSR1/SIGINT become SIGUSR1 to the ranks, which checkpoint and exit.

    torchrun runs in its own session so a signal sent to our process group (Slurm, Ctrl-C) does
    not make the elastic agent kill the ranks before they have saved. A second SIGINT (Ctrl-C
    again) kills the ranks, their loader workers and torchrun at once; that returns `ABORTED`.
    """
    proc = subprocess.Popen(list(cmd), start_new_session=True, env=env)
    stopping = aborted = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping, aborted
        if signum == signal.SIGINT and stopping:
            aborted = True
            for child in _children(proc.pid):
                _kill_group(child)  # a rank and its loader workers
            _kill_group(proc.pid)
            return
        stopping = True
        for child in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGUSR1)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = proc.wait()
        return ABORTED if aborted else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
