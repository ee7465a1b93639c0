"""The package's layers import one way: each module only its own layer or lower ones.

Order, lowest first: errors, units < shards < recipe < model < data < runtime < train, evaluate,
convert, inspect < quickstart, synthetic, monitor < ui < cli < __main__. Imports under
`TYPE_CHECKING` and inside functions count as well. `train` may import `evaluate` (for periodic
evaluation); `evaluate` never imports `train`; nothing below `ui` imports rich.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flamingo_cli"

LAYERS: dict[str, int] = {
    "": 0,  # flamingo_cli/__init__.py: the version
    "errors": 0,
    "units": 0,
    "shards": 1,
    "recipe": 2,
    "model": 3,
    "data": 4,
    "runtime": 5,
    "train": 6,
    "evaluate": 6,
    "convert": 6,
    "inspect": 6,
    "quickstart": 7,
    "synthetic": 7,
    "monitor": 7,  # watching runs: metrics rows, the launcher's events, `flamingo status`
    "ui": 8,
    "cli": 9,
    "__main__": 10,
}
FORBIDDEN_SAME_LAYER = {("evaluate", "train")}
RICH_FROM_LAYER = LAYERS["ui"]


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    target: str  # the imported module's dotted name


def part_of(relative: Path) -> str:
    """The layer name of a module path relative to the package (`train/run.py` -> `train`)."""
    first = relative.parts[0]
    return "" if first == "__init__.py" else first.removesuffix(".py")


def imports_of(file: Path, root: Path) -> list[Import]:
    """Every module `file` imports, wherever the import statement is (relative ones resolved)."""
    package = list(file.relative_to(root.parent).with_suffix("").parts)[:-1]
    found: list[Import] = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            found += [Import(file, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append(Import(file, node.lineno, module))
            found += [Import(file, node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    """Each import that breaks the order, as `file:line: from -> to (why)`."""
    found: set[str] = set()
    for file in sorted(root.rglob("*.py")):
        source = part_of(file.relative_to(root))
        for imp in imports_of(file, root):
            where = f"{imp.file.relative_to(root.parent)}:{imp.line}"
            head = imp.target.split(".")
            if head[0] == "rich" and LAYERS[source] < RICH_FROM_LAYER:
                found.add(f"{where}: {source} -> rich (only ui and cli render)")
            if head[0] != "flamingo_cli" or len(head) < 2 or head[1] not in LAYERS:
                continue
            target = head[1]
            if LAYERS[target] > LAYERS[source]:
                found.add(f"{where}: {source} -> {target} (a lower layer imports a higher one)")
            elif (source, target) in FORBIDDEN_SAME_LAYER:
                found.add(f"{where}: {source} -> {target} (evaluate never imports train)")
    return sorted(found)


def test_every_package_has_a_layer() -> None:
    names = {part_of(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")}
    assert names - set(LAYERS) == set()


def test_layers_import_downwards_only() -> None:
    bad = violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """TYPE_CHECKING and relative imports count; each is named with its file and line."""
    train = tmp_path / "flamingo_cli" / "train"
    train.mkdir(parents=True)
    (train / "probe.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from flamingo_cli.ui.console import settings\n"
        "    import rich\n"
        "from ..evaluate import run\n"
        "from ..runtime.distributed import DistInfo\n",
        encoding="utf-8",
    )
    (tmp_path / "flamingo_cli" / "evaluate").mkdir()
    (tmp_path / "flamingo_cli" / "evaluate" / "probe.py").write_text(
        "def f() -> None:\n    from ..train import run\n", encoding="utf-8"
    )
    assert violations(tmp_path / "flamingo_cli") == [
        "flamingo_cli/evaluate/probe.py:2: evaluate -> train (evaluate never imports train)",
        "flamingo_cli/train/probe.py:3: train -> ui (a lower layer imports a higher one)",
        "flamingo_cli/train/probe.py:4: train -> rich (only ui and cli render)",
    ]
