"""Shared fixtures: offline environment, generated shards, recipe files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


def cli_in_fresh_interpreter(args: list[str]) -> tuple[str, set[str]]:
    """Run `flamingo ARGS` in a new Python (exit 0 expected): its stdout, and the top-level
    packages it imported, for start-up checks that must not see this process's imports."""
    code = (
        "import json, sys\n"
        "from flamingo_cli.cli.app import app\n"
        "try:\n"
        f"    app({args!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    *output, loaded = done.stdout.splitlines()
    return "\n".join(output), set(json.loads(loaded))


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated LAION and MMC4 shards: laion/0000{0..3}.tar (8 each), mmc4/0000{0..3}.tar (4)."""
    from flamingo_cli.synthetic import write_dataset

    root = tmp_path_factory.mktemp("shards")
    write_dataset("laion", root / "laion", shards=4, per_shard=8)
    write_dataset("mmc4", root / "mmc4", shards=4, per_shard=4)
    return root


@pytest.fixture
def write_recipe(tmp_path: Path, shard_root: Path) -> Callable[[str], Path]:
    """Write a recipe file; `{root}` in the text is replaced by the generated shard root."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        body = textwrap.dedent(text).lstrip("\n").replace("{root}", str(shard_root))
        path.write_text(body, encoding="utf-8")
        return path

    return write
