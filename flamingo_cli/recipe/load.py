"""Load a recipe: TOML, `${VAR}` substitution, `--set` overrides, typed validation, rules."""

from __future__ import annotations

import difflib
import os
import re
import stat
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from flamingo_cli.errors import Problem, ProblemsFound, UsageError
from flamingo_cli.recipe.schema import IMPLIED_KINDS, KIND_MODELS, DataConfig, Recipe
from flamingo_cli.recipe.toml_lines import key_lines, line_of
from flamingo_cli.shards.spec import split_spec, url_kind

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
SHARD_KEYS = ("shards", "eval_shards")


@dataclass(frozen=True)
class Override:
    """One `key.path=value` assignment from the command line."""

    key: str
    value: Any
    source: str = "from --set"


def parse_override(text: str, source: str = "from --set") -> Override:
    """Parse `a.b=c`; the value is read as a TOML value when it is one, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(
            f"--set expects KEY=VALUE, got {text!r}", fix="for example --set optim.lr=3e-4"
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw.strip()
    return Override(key, value, source)


@dataclass
class LoadedRecipe:
    """A validated recipe with what is needed to point a problem at its origin."""

    recipe: Recipe
    path: Path
    lines: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def problem(self, key: str, message: str, **kwargs: Any) -> Problem:
        return _make_problem(self.path, self.lines, self.sources, key, message, **kwargs)


def _make_problem(
    path: Path,
    lines: dict[str, int],
    sources: dict[str, str],
    key: str,
    message: str,
    **kwargs: Any,
) -> Problem:
    source = next((s for k, s in sources.items() if key == k or key.startswith(k + ".")), None)
    if source is not None:
        return Problem(message, key=key, source=source, **kwargs)
    return Problem(message, key=key, file=str(path), line=line_of(lines, key), **kwargs)


def load_recipe(path: str | Path, overrides: Sequence[Override] = ()) -> LoadedRecipe:
    """Load and validate `path` with `overrides` applied; raise ProblemsFound listing all errors.

    Warnings do not raise: run `check_recipe` on the result for the cross-field rules.
    """
    path = Path(path)
    text = read_recipe_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION.search(str(exc))
        line = int(match.group(1)) if match else None
        problem = Problem(f"not valid TOML: {exc}", file=str(path), line=line)
        raise ProblemsFound(f"{path} is not valid TOML", [problem]) from None
    except RecursionError:
        problem = Problem("not a recipe: arrays or tables nest too deeply", file=str(path))
        raise ProblemsFound(f"{path} is not valid TOML", [problem]) from None

    lines = key_lines(text)
    sources: dict[str, str] = {}
    problems: list[Problem] = []

    def report(key: str, message: str, **kwargs: Any) -> None:
        problems.append(_make_problem(path, lines, sources, key, message, **kwargs))

    data = _substitute_env(data, "", report)
    _anchor_shard_paths(data, path.parent)
    for override in overrides:
        sources[override.key] = override.source
        _apply_override(data, override, report)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for key, message in _validation_messages(exc):
            report(key, message, fix=_fix_for(key))
    else:
        if not problems:
            return LoadedRecipe(recipe, path, lines, sources)
    untyped = UntypedRecipe(data, LoadedRecipe(Recipe(), path, lines, sources))
    raise RecipeProblems(f"{path} has {len(problems)} problem(s)", problems, untyped)


@dataclass(frozen=True)
class UntypedRecipe:
    """A recipe document that failed typing, kept so rules on its raw values can still run.

    `where` locates problems (its `recipe` is the default one, never to be read)."""

    data: dict[str, Any]
    where: LoadedRecipe


class RecipeProblems(ProblemsFound):
    """The recipe parsed but did not type-check; carries the raw document for further rules."""

    def __init__(self, message: str, problems: list[Problem], untyped: UntypedRecipe) -> None:
        super().__init__(message, problems)
        self.untyped = untyped


MAX_RECIPE_BYTES = 4 * 1024 * 1024  # far beyond any recipe; a bound for a mistaken path


def _read_bounded(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_RECIPE_BYTES: a FIFO, a device (/dev/zero)
    or a huge file is refused before it is read, so a mistaken path never blocks or fills
    memory. Raises OSError for a file that cannot be opened."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(
            f"recipe {path} is not a regular file (a pipe, socket or device)",
            fix="write the recipe to a .toml file and give its path",
        )
    if info.st_size > MAX_RECIPE_BYTES:
        raise UsageError(
            f"recipe {path} is {info.st_size:,} bytes, more than any recipe "
            f"(at most {MAX_RECIPE_BYTES:,})",
            fix="give the recipe's .toml file (a shard, checkpoint or log is not a recipe)",
        )
    with path.open("rb") as handle:
        return handle.read(MAX_RECIPE_BYTES + 1)[:MAX_RECIPE_BYTES]


def read_recipe_text(path: Path) -> str:
    """The recipe's text: UTF-8, a leading byte-order mark dropped (editors on Windows add one)."""
    try:
        raw = _read_bounded(path)
    except FileNotFoundError:
        raise UsageError(f"recipe {path} does not exist", fix="check the path") from None
    except IsADirectoryError:
        raise UsageError(f"recipe {path} is a directory", fix="give the .toml file") from None
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror}") from None
    if b"\0" in raw:
        raise UsageError(
            f"recipe {path} is a binary file, not TOML text",
            fix="give the recipe's .toml file (a checkpoint or shard is not a recipe)",
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ProblemsFound(
            f"{path} is not UTF-8 text",
            [
                Problem(
                    f"byte 0x{raw[exc.start]:02x} is not UTF-8 (TOML files are UTF-8)",
                    file=str(path),
                    line=line,
                    fix=f"re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path}",
                )
            ],
        ) from None


def _substitute_env(value: Any, key: str, report: Any) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of the document."""
    if isinstance(value, dict):
        return {k: _substitute_env(v, f"{key}.{k}" if key else k, report) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, key, report) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        report(
            key,
            f"environment variable {name} is not set",
            fix=f"export {name}=... before running, or write ${{{name}:-default}}",
        )
        return match.group(0)

    return _VAR.sub(replace, value)


def _anchor_shard_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative local shard paths in the recipe file relative to the file's directory."""
    section = data.get("data")
    if not isinstance(section, dict):
        return
    for dataset in section.values():
        if not isinstance(dataset, dict):
            continue
        sources = dataset.get("sources")
        tables = [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []
        for table in (dataset, *tables):
            for key in SHARD_KEYS:
                spec = table.get(key)
                if isinstance(spec, str | list) and all(isinstance(s, str) for s in spec):
                    table[key] = "::".join(
                        str(base / part)
                        if url_kind(part) == "local" and not Path(part).is_absolute()
                        else part
                        for part in split_spec(spec)
                    )


def _apply_override(data: dict[str, Any], override: Override, report: Any) -> None:
    parts = override.key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            report(".".join(parts[: i + 1]), f"is a value, not a table: cannot set {override.key}")
            return
        node = child
    node[parts[-1]] = override.value


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X`, `X | None`, `Optional[X]` or
    `list[X] | None` (a table array)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if isinstance(annotation, types.UnionType) or origin in (typing.Union, list):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _resolve_loc(loc: Iterable[int | str]) -> tuple[str, type[BaseModel] | None]:
    """Turn a pydantic error location into a dotted recipe key, dropping union-member tags.

    Also returns the model that owns the last part (for did-you-mean on unknown keys).
    """
    parts: list[str] = []
    model: type[BaseModel] | None = Recipe
    owner: type[BaseModel] | None = Recipe
    for item in loc:
        if model is DataConfig and isinstance(item, str) and item not in model.model_fields:
            parts.append(item)  # a [data.NAME] table: its model follows as the kind tag
            owner = model
            model = _DatasetTag
        elif model is _DatasetTag:
            model = KIND_MODELS.get(str(item))
            if model is None:  # not a tag: the dataset's own key
                parts.append(str(item))
        elif model is not None and isinstance(item, str) and item in model.model_fields:
            parts.append(item)
            owner = model
            model = _model_of(model.model_fields[item].annotation)
        elif model is not None and isinstance(item, str):
            parts.append(item)  # an unknown key inside a model
            owner = model
            model = None
        elif isinstance(item, int):
            parts.append(str(item))
        # else: a union tag such as "str" or "list[str]": not part of the key
    return ".".join(parts), owner


class _DatasetTag(BaseModel):
    """Marks, while resolving a location, that the next part is a dataset's kind tag."""


def _kind_message(key: str, error: Any) -> str:
    """The message for a `[data.NAME]` table whose kind is missing or unknown."""
    name = key.rsplit(".", 1)[-1]
    kinds = " or ".join(f'"{k}"' for k in KIND_MODELS)
    if error["type"] == "union_tag_invalid":
        return f"unknown dataset kind {error['ctx']['tag']!r}: kind is {kinds}"
    guess = difflib.get_close_matches(name, list(IMPLIED_KINDS), n=1, cutoff=0.6)
    hint = f" (or did you mean [data.{guess[0]}]?)" if guess else ""
    return (
        f"[data.{name}] does not say its kind: only laion and mmc4 have theirs implied; "
        f"set kind = {kinds}{hint}"
    )


_SOURCE_WEIGHT = re.compile(r"data\.([^.]+)\.sources\.\d+\.weight")


def _fix_for(key: str) -> str | None:
    """The fix of a typing problem, where the key alone says what to do."""
    match = _SOURCE_WEIGHT.fullmatch(key)
    if match:
        return (
            "give a number > 0: a source's weight is its share of the dataset's samples "
            f"relative to the other sources; to leave it out, remove its [[data.{match.group(1)}"
            ".sources]] table"
        )
    return None


def _validation_messages(exc: ValidationError) -> list[tuple[str, str]]:
    """One (key, message) per problem, union alternatives merged, unknown keys with a hint."""
    merged: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        key, owner = _resolve_loc(error["loc"])
        if error["type"] == "extra_forbidden":
            name = key.rsplit(".", 1)[-1]
            known = list(owner.model_fields) if owner is not None else []
            guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(known)}"
            merged.setdefault(key, []).append(f"unknown key{hint}")
            continue
        if error["type"] == "missing":
            merged.setdefault(key, []).append("required key is missing")
            continue
        if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
            merged.setdefault(f"{key}.kind", []).append(_kind_message(key, error))
            continue
        message = error["msg"]
        if "input" in error and not isinstance(error["input"], dict):
            message = f"{message} (got {error['input']!r})"
        merged.setdefault(key, []).append(message)
    return [(key, "; or ".join(dict.fromkeys(msgs))) for key, msgs in merged.items()]
