"""`eval-loss` as a library call: pick the eval shards, load the weights, evaluate on this
process's rank (one process, or each rank torchrun started), return a typed report."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.evaluate.loss import (
    Ablation,
    DatasetLoss,
    EvalEvents,
    evaluate_dataset,
    evaluate_during_training,
)
from flamingo_cli.recipe.load import LoadedRecipe
from flamingo_cli.recipe.schema import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DatasetConfig,
    Recipe,
    ShardSpec,
    Strategy,
)
from flamingo_cli.shards.sizes import known_counts
from flamingo_cli.shards.spec import split_spec

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.data.eval_loader import BlendedEvalLoader, EvalLoader
    from flamingo_cli.model.factory import ImageTransform
    from flamingo_cli.model.tokenizer import SpecialTokens
    from flamingo_cli.runtime.distributed import DistInfo


@dataclass(frozen=True)
class EvalTarget:
    """One dataset to evaluate: its preprocessing settings and the shards to read. For a
    blended dataset, `sources` holds each source that has eval shards with them (`shards` is
    all of them) and `unevaluated` names the sources that have none."""

    name: str
    config: DatasetConfig
    shards: ShardSpec
    sources: tuple[tuple[str, ShardSpec], ...] = ()
    unevaluated: tuple[str, ...] = ()

    def note(self) -> str | None:
        """What the dataset's loss leaves out, for the report."""
        if not self.sources or not self.unevaluated:
            return None
        return f"source(s) without eval_shards, not in this loss: {', '.join(self.unevaluated)}"


@dataclass(frozen=True)
class EvalReport:
    """Held-out losses of a checkpoint, one entry per dataset."""

    recipe: str
    checkpoint: str
    weights: str
    world_size: int
    datasets: list[DatasetLoss]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "world_size": self.world_size,
            "datasets": [d.to_dict() for d in self.datasets],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        return cls(
            recipe=str(data["recipe"]),
            checkpoint=str(data["checkpoint"]),
            weights=str(data["weights"]),
            world_size=int(data["world_size"]),
            datasets=[DatasetLoss.from_dict(d) for d in data["datasets"]],
        )


def eval_targets(
    recipe: Recipe,
    shards: str | None = None,
    dataset: str | None = None,
    *,
    by_source: bool = False,
) -> list[EvalTarget]:
    """The datasets to evaluate: the recipe's eval shards (a blend's by source), or `shards`
    for one dataset."""
    configs = recipe.datasets()
    known = " or ".join(configs) or "laion"
    if dataset is not None and dataset not in configs:
        raise UsageError(
            f"--dataset {dataset}: the recipe has no [data.{dataset}] section, whose "
            "preprocessing settings the evaluation uses",
            fix=f"choose --dataset {known}, or add [data.{dataset}] (with its kind) to the recipe",
        )
    if shards is not None:
        if by_source:
            raise UsageError(
                "--by-source splits the recipe's eval shards by source; --shards belong to none",
                fix="drop --shards to evaluate the recipe's eval shards, or drop --by-source",
            )
        if dataset is None:
            if len(configs) != 1:
                raise UsageError(
                    "--shards needs --dataset NAME when the recipe has several datasets "
                    f"({', '.join(configs)})",
                    fix=f"say which dataset's samples the shards hold: --dataset {known}",
                )
            dataset = next(iter(configs))
        return [EvalTarget(dataset, configs[dataset], shards)]
    chosen = {dataset: configs[dataset]} if dataset is not None else configs
    targets = _with_eval_shards(chosen)
    if not targets:
        which = _eval_key(dataset, configs[dataset]) if dataset else "data.<dataset>.eval_shards"
        raise UsageError(
            f"the recipe sets no eval shards ({which})",
            fix=f"set {which} in the recipe or with --set, or give --shards SPEC "
            "(with --dataset when the recipe has several datasets)",
        )
    return targets


def _eval_key(name: str, config: DatasetConfig) -> str:
    """Where a dataset's eval shards are set: its table, or each of its sources'."""
    if config.sources:
        return f"data.{name}.sources[].eval_shards"
    return f"data.{name}.eval_shards"


def _with_eval_shards(configs: Mapping[str, DatasetConfig]) -> list[EvalTarget]:
    """The datasets that have eval shards, each with them: a dataset's own `eval_shards`, or
    those of the sources of a blend (docs/formats.md §7.2)."""
    targets = []
    for name, config in configs.items():
        sources = config.source_list(name)
        if not any(s.blended for s in sources):
            if config.eval_shards:
                targets.append(EvalTarget(name, config, config.eval_shards))
            continue
        given = tuple((s.name, s.eval_shards) for s in sources if s.eval_shards)
        if not given:
            continue
        shards = [part for _, spec in given for part in split_spec(spec)]
        missing = tuple(s.name for s in sources if not s.eval_shards)
        targets.append(EvalTarget(name, config, shards, given, missing))
    return targets


def expected_batches(
    urls: list[str], batch_size: int, world_size: int, max_batches: int | None
) -> int | None:
    """Batches per rank when sizes.json knows every shard (before drops), for progress bars."""
    counts = known_counts(urls)
    if len(counts) != len(urls):
        return max_batches
    batches = math.ceil(sum(counts.values()) / (batch_size * world_size))
    return batches if max_batches is None else min(batches, max_batches)


def _expected(
    loader: EvalLoader | BlendedEvalLoader, world_size: int, max_batches: int | None
) -> int | None:
    """Batches per rank of a dataset's loader, a blend's sources one after the other."""
    from flamingo_cli.data.eval_loader import BlendedEvalLoader

    parts = loader.sources.values() if isinstance(loader, BlendedEvalLoader) else [loader]
    counts = [expected_batches(list(p.urls), p.batch_size, world_size, None) for p in parts]
    if any(c is None for c in counts):
        return max_batches
    total = sum(c for c in counts if c is not None)
    return total if max_batches is None else min(total, max_batches)


def make_eval_loaders(
    targets: list[EvalTarget],
    tokenizer: PreTrainedTokenizerBase,
    tokens: SpecialTokens,
    transform: ImageTransform,
    info: DistInfo,
    *,
    allow_pipe: bool = False,
    batch_size: int | None = None,
    no_single: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, EvalLoader | BlendedEvalLoader]:
    """One evaluation loader per target for this rank, a blend's made of one loader per source
    named `DATASET/SOURCE` (images declaring more than `max_image_pixels` count as corrupt)."""
    from flamingo_cli.data.eval_loader import BlendedEvalLoader, make_eval_loader

    def loader(name: str, target: EvalTarget, shards: ShardSpec) -> EvalLoader:
        return make_eval_loader(
            name,
            target.config,
            shards,
            tokenizer,
            tokens,
            transform,
            rank=info.rank,
            world_size=info.world_size,
            batch_size=batch_size,
            allow_pipe=allow_pipe,
            no_single=no_single,
            max_image_pixels=max_image_pixels,
        )

    loaders: dict[str, EvalLoader | BlendedEvalLoader] = {}
    for t in targets:
        if t.sources:
            parts = {src: loader(f"{t.name}/{src}", t, spec) for src, spec in t.sources}
            loaders[t.name] = BlendedEvalLoader(t.name, parts)
        else:
            loaders[t.name] = loader(t.name, t, t.shards)
    return loaders


def periodic_evaluation(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    tokens: SpecialTokens,
    transform: ImageTransform,
    info: DistInfo,
) -> Callable[[nn.Module], dict[str, float]] | None:
    """The evaluation training runs every `run.eval_every` steps: the held-out loss of every
    dataset with eval shards (a blend's over all its sources) as metrics `eval/loss/<dataset>`
    (None when no dataset has any). Collective: every rank calls the result at the same step
    with its wrapped model."""
    from flamingo_cli.runtime.precision import autocast_for

    targets = _with_eval_shards(recipe.datasets())
    if not targets:
        return None
    loaders = make_eval_loaders(
        targets,
        tokenizer,
        tokens,
        transform,
        info,
        allow_pipe=recipe.data.allow_pipe,
        max_image_pixels=recipe.data.max_image_pixels,
    )
    precision, strategy = recipe.run.precision, recipe.distributed.strategy

    def evaluate(model: nn.Module) -> dict[str, float]:
        autocast = lambda: autocast_for(precision, info.device, strategy)  # noqa: E731
        return evaluate_during_training(model, loaders, info, autocast=autocast)

    return evaluate


def evaluate_loss(
    loaded: LoadedRecipe,
    checkpoint: str,
    *,
    shards: str | None = None,
    dataset: str | None = None,
    max_batches: int | None = None,
    ablation: Ablation | None = None,
    batch_size: int | None = None,
    events: EvalEvents | None = None,
    by_source: bool = False,
) -> EvalReport:
    """Evaluate a checkpoint (`latest`, a directory or a file) on this process's rank; with
    `by_source`, each dataset row of a blend holds a row per source.

    Collective when launched with several processes: every rank evaluates its share and all
    get the same report. The model is built as training built it (same seed), then the
    checkpoint's parameters are loaded over it.
    """
    from flamingo_cli.runtime.distributed import init_distributed, teardown
    from flamingo_cli.runtime.weights import resolve_checkpoint

    recipe = loaded.recipe
    targets = eval_targets(recipe, shards, dataset, by_source=by_source)
    if ablation == "shuffle":
        _check_shuffle_batches(targets, batch_size)
    source = resolve_checkpoint(loaded, checkpoint)
    info = init_distributed(recipe.distributed.timeout_s)
    try:
        model, kind, loaders = _set_up(recipe, source, targets, info, ablation, batch_size)
        results = [
            _reported(
                _evaluate_one(recipe, model, loader, info, ablation, max_batches, events),
                target,
                by_source=by_source,
            )
            for target, loader in zip(targets, loaders.values(), strict=True)
        ]
    finally:
        teardown()
    return EvalReport(str(loaded.path), str(source), kind, info.world_size, results)


def _reported(result: DatasetLoss, target: EvalTarget, *, by_source: bool) -> DatasetLoss:
    """A dataset's row as reported: its source rows only when asked, the sources left out
    (no eval shards) in its note."""
    note = "; ".join(n for n in (result.note, target.note()) if n) or None
    return replace(result, note=note, sources=result.sources if by_source else [])


def _check_shuffle_batches(targets: list[EvalTarget], batch_size: int | None) -> None:
    """Shuffling images needs two samples in a batch to swap between."""
    for t in targets:
        if (batch_size or t.config.batch_size) < 2:
            raise UsageError(
                f"--ablate-images shuffle swaps images between the samples of a batch, "
                f"and the {t.name} batch size is 1",
                fix="give --batch-size 2 or more",
            )


def _eval_strategy(recipe: Recipe, info: DistInfo) -> Strategy:
    """FSDP2 when the recipe trains with it on several ranks; else the plain model."""
    return "fsdp" if recipe.distributed.strategy == "fsdp" and info.world_size > 1 else "none"


def _set_up(
    recipe: Recipe,
    source: Path,
    targets: list[EvalTarget],
    info: DistInfo,
    ablation: Ablation | None,
    batch_size: int | None,
) -> tuple[nn.Module, str, dict[str, EvalLoader | BlendedEvalLoader]]:
    """The model built as training built it with the checkpoint loaded over it (and what kind
    of checkpoint it was), wrapped for this rank, and this rank's loaders."""
    from flamingo_cli.model.factory import build_model
    from flamingo_cli.runtime.distributed import apply_parallelism
    from flamingo_cli.runtime.weights import load_weights

    model, transform, tokenizer, special = build_model(recipe.model, seed=recipe.run.seed)
    if recipe.model.init_from:
        load_weights(model, Path(recipe.model.init_from))
    kind = load_weights(model, source)
    model.to(info.device)
    wrapped = apply_parallelism(
        model,
        model.shard_units(),
        strategy=_eval_strategy(recipe, info),
        sharding=recipe.distributed.sharding,
        precision=recipe.run.precision,
        info=info,
    )
    loaders = make_eval_loaders(
        targets,
        tokenizer,
        special,
        transform,
        info,
        allow_pipe=recipe.data.allow_pipe,
        batch_size=batch_size,
        no_single=ablation == "shuffle",
        max_image_pixels=recipe.data.max_image_pixels,
    )
    return wrapped, kind, loaders


def _evaluate_one(
    recipe: Recipe,
    model: nn.Module,
    loader: EvalLoader | BlendedEvalLoader,
    info: DistInfo,
    ablation: Ablation | None,
    max_batches: int | None,
    events: EvalEvents | None,
) -> DatasetLoss:
    """One dataset's loss; an error when no sample with target tokens was evaluated."""
    from flamingo_cli.runtime.precision import autocast_for

    strategy = _eval_strategy(recipe, info)
    result = evaluate_dataset(
        model,
        loader,
        info,
        ablation=ablation,
        max_batches=max_batches,
        autocast=lambda: autocast_for(recipe.run.precision, info.device, strategy),
        seed=recipe.run.seed,
        events=events if info.is_main else None,
        expected_batches=_expected(loader, info.world_size, max_batches),
    )
    if result.target_tokens == 0:
        raise FlamingoError(
            f"no {loader.name} sample with target tokens was evaluated "
            f"(dropped: {result.dropped or 'none'})",
            fix="run `flamingo inspect-shards` on the eval shards: they are empty, "
            "unreadable, or every sample is dropped by the filters",
        )
    return result
