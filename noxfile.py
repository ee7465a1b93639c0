"""Developer and CI sessions. virtualenv + pip on purpose: pip takes torch from local disk here."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests"]

LINTED = ("flamingo_cli", "tests", "benchmarks", "scripts", "noxfile.py", "setup.py")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PYTHONHASHSEED": "0",
}


def install_project(session: nox.Session, extras: str = "test") -> None:
    session.install("-e", f".[{extras}]")
    # OpenFlamingo's own code, for equivalence tests and baselines; its pinned deps are too old.
    session.install("--no-deps", "open-flamingo==2.0.1")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, slow and multi-process tests included."""
    install_project(session)
    args = session.posargs or ["-n", "auto", "--durations=15"]
    session.run("pytest", *args, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    install_project(session, extras="dev")
    session.run("mypy", "flamingo_cli")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark against its baseline, at sizes that finish in minutes on 2 cores."""
    install_project(session)
    runs = {
        "convert": ["--docs", "1000"],
        "inspect": ["--gb", "0.5"],
        "loader": ["--docs", "60"],
        "train_step": ["--steps", "6"],
        "generate": ["--repeats", "2"],
    }
    for name, args in runs.items():
        if session.posargs and name not in session.posargs:
            continue
        session.run("python", f"benchmarks/{name}.py", *args, env=OFFLINE)


@nox.session
def quickstart(session: nox.Session) -> None:
    """`flamingo quickstart` end to end in a fresh directory (exit 1 if images do not help)."""
    install_project(session)
    session.run(
        "flamingo", "quickstart", "--dir", session.create_tmp() + "/quickstart", env=OFFLINE
    )
