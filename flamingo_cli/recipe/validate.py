"""`validate-config` as a library call: load, plan, count shards on request, apply the rules."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flamingo_cli.errors import Problem, ProblemsFound
from flamingo_cli.recipe.load import LoadedRecipe, Override, RecipeProblems, load_recipe
from flamingo_cli.recipe.plan import Plan, make_plan
from flamingo_cli.recipe.rules import check_recipe, untyped_shard_problems
from flamingo_cli.recipe.schema import DatasetConfig, Recipe
from flamingo_cli.shards.sizes import known_counts
from flamingo_cli.shards.spec import expand_spec, local_path, url_kind
from flamingo_cli.shards.tar import count_samples


@dataclass(frozen=True)
class ShardCount:
    """Samples in one dataset's (or source's) training shards and where the numbers came
    from; a dataset's count holds its sources' by name (one named after it without a blend)."""

    total: int
    from_sizes_json: int
    scanned: int
    mean_sample_bytes: int | None
    sources: dict[str, ShardCount] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationReport:
    loaded: LoadedRecipe
    plan: Plan
    problems: list[Problem]
    counts: dict[str, ShardCount]

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict[str, object]:
        return {
            "recipe": str(self.loaded.path),
            "ok": self.ok,
            "plan": self.plan.to_dict(),
            "counts": {k: asdict(v) for k, v in self.counts.items()},
            "problems": [p.to_dict() for p in self.problems],
        }


def count_dataset(urls: Sequence[str], *, allow_pipe: bool, workers: int = 8) -> ShardCount:
    """Count samples from sizes.json where it lists a shard, else by reading the tar headers."""
    listed = known_counts(urls, allow_pipe=allow_pipe)
    to_scan = [u for u in urls if u not in listed]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scanned = list(pool.map(lambda u: count_samples(u, allow_pipe=allow_pipe), to_scan))
    total = sum(listed.values()) + sum(scanned)
    local = [u for u in urls if url_kind(u) == "local" and local_path(u).is_file()]
    mean_bytes = None
    if total and len(local) == len(urls):
        mean_bytes = sum(local_path(u).stat().st_size for u in local) // total
    return ShardCount(total, sum(listed.values()), sum(scanned), mean_bytes)


def count_sources(config: DatasetConfig, name: str, *, allow_pipe: bool) -> ShardCount:
    """Count each source's training shards; the dataset's count is their sum."""
    sources = {
        s.name: count_dataset(expand_spec(s.shards), allow_pipe=allow_pipe)
        for s in config.source_list(name)
    }
    counts = list(sources.values())
    total = sum(c.total for c in counts)
    mean_bytes = None
    if total and all(c.mean_sample_bytes is not None for c in counts):
        if len(counts) == 1:
            mean_bytes = counts[0].mean_sample_bytes
        else:  # weighted by samples; per source it was shard bytes over samples
            mean_bytes = sum((c.mean_sample_bytes or 0) * c.total for c in counts) // total
    return ShardCount(
        total,
        sum(c.from_sizes_json for c in counts),
        sum(c.scanned for c in counts),
        mean_bytes,
        sources,
    )


def validate_recipe(
    path: str | Path,
    overrides: Sequence[Override] = (),
    *,
    check_shards: bool = False,
    training: bool = False,
) -> ValidationReport:
    """Validate a recipe; raises ProblemsFound when it cannot even be typed, with the shard
    rules that can run on the untyped values too, so every problem is reported at once.
    `training`: the run starts here now (memory that cannot fit is an error)."""
    try:
        loaded = load_recipe(path, overrides)
    except RecipeProblems as found:
        reported = {p.key for p in found.problems}  # e.g. an unset ${VAR} inside a spec
        more = [p for p in untyped_shard_problems(found.untyped) if p.key not in reported]
        problems = [*found.problems, *more]
        raise ProblemsFound(found.message, problems) from None
    recipe = loaded.recipe
    counts: dict[str, ShardCount] = {}
    if check_shards:
        pre = check_recipe(loaded, make_plan(recipe))
        if not any(p.severity == "error" for p in pre):
            for name, config in recipe.datasets().items():
                counts[name] = count_sources(config, name, allow_pipe=recipe.data.allow_pipe)
    plan = make_plan(
        recipe,
        totals={k: v.total for k, v in counts.items()},
        sample_bytes={k: v.mean_sample_bytes for k, v in counts.items() if v.mean_sample_bytes},
        source_totals={k: {s: c.total for s, c in v.sources.items()} for k, v in counts.items()},
    )
    return ValidationReport(loaded, plan, check_recipe(loaded, plan, training=training), counts)
