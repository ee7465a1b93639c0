"""`eval-loss` as a library call: pick the eval shards, load the weights, evaluate on this
process's rank (one process, or each rank torchrun started), return a typed report."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.data.eval_loader import EvalLoader
    from flamingo_cli.model.factory import ImageTransform
    from flamingo_cli.model.tokenizer import SpecialTokens
    from flamingo_cli.runtime.distributed import DistInfo

DATASETS = ("laion", "mmc4")


@dataclass(frozen=True)
class EvalTarget:
    """One dataset to evaluate: its preprocessing settings and the shards to read."""

    name: str
    config: DatasetConfig
    shards: ShardSpec


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
    recipe: Recipe, shards: str | None = None, dataset: str | None = None
) -> list[EvalTarget]:
    """The datasets to evaluate: the recipe's `eval_shards`, or `shards` for one dataset."""
    configs = recipe.datasets()
    if dataset is not None and dataset not in DATASETS:
        raise UsageError(f"--dataset {dataset!r} is not a dataset", fix="use laion or mmc4")
    if dataset is not None and dataset not in configs:
        raise UsageError(
            f"--dataset {dataset}: the recipe has no [data.{dataset}] section, whose "
            "preprocessing settings the evaluation uses",
            fix=f"add [data.{dataset}] to the recipe, or choose --dataset "
            f"{' or '.join(configs) or 'laion'}",
        )
    if shards is not None:
        if dataset is None:
            if len(configs) != 1:
                raise UsageError(
                    "--shards needs --dataset laion|mmc4 when the recipe has both datasets",
                    fix="say which kind of samples the shards hold, e.g. --dataset mmc4",
                )
            dataset = next(iter(configs))
        return [EvalTarget(dataset, configs[dataset], shards)]
    chosen = {dataset: configs[dataset]} if dataset is not None else configs
    targets = _with_eval_shards(chosen)
    if not targets:
        which = f"data.{dataset}.eval_shards" if dataset else "data.<dataset>.eval_shards"
        raise UsageError(
            f"the recipe sets no eval shards ({which})",
            fix=f"set {which} in the recipe or with --set, or give --shards SPEC "
            "(with --dataset when the recipe has both datasets)",
        )
    return targets


def _with_eval_shards(configs: Mapping[str, DatasetConfig]) -> list[EvalTarget]:
    """The datasets that set `eval_shards`, each with them."""
    return [EvalTarget(n, c, c.eval_shards) for n, c in configs.items() if c.eval_shards]


def expected_batches(
    urls: list[str], batch_size: int, world_size: int, max_batches: int | None
) -> int | None:
    """Batches per rank when sizes.json knows every shard (before drops), for progress bars."""
    counts = known_counts(urls)
    if len(counts) != len(urls):
        return max_batches
    batches = math.ceil(sum(counts.values()) / (batch_size * world_size))
    return batches if max_batches is None else min(batches, max_batches)


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
) -> dict[str, EvalLoader]:
    """One evaluation loader per target, for this rank (images declaring more than
    `max_image_pixels` count as corrupt)."""
    from flamingo_cli.data.eval_loader import make_eval_loader

    return {
        t.name: make_eval_loader(
            t.name,
            t.config,
            t.shards,
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
        for t in targets
    }


def periodic_evaluation(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    tokens: SpecialTokens,
    transform: ImageTransform,
    info: DistInfo,
) -> Callable[[nn.Module], dict[str, float]] | None:
    """The evaluation training runs every `run.eval_every` steps: the held-out loss of the
    recipe's `eval_shards` as metrics `eval/loss/<dataset>` (None when no dataset has any).
    Collective: every rank calls the result at the same step with its wrapped model."""
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
) -> EvalReport:
    """Evaluate a checkpoint (`latest`, a directory or a file) on this process's rank.

    Collective when launched with several processes: every rank evaluates its share and all
    get the same report. The model is built as training built it (same seed), then the
    checkpoint's parameters are loaded over it.
    """
    from flamingo_cli.runtime.distributed import init_distributed, teardown
    from flamingo_cli.runtime.weights import resolve_checkpoint

    recipe = loaded.recipe
    targets = eval_targets(recipe, shards, dataset)
    if ablation == "shuffle":
        _check_shuffle_batches(targets, batch_size)
    source = resolve_checkpoint(loaded, checkpoint)
    info = init_distributed(recipe.distributed.timeout_s)
    try:
        model, kind, loaders = _set_up(recipe, source, targets, info, ablation, batch_size)
        results = [
            _evaluate_one(recipe, model, loader, info, ablation, max_batches, events)
            for loader in loaders.values()
        ]
    finally:
        teardown()
    return EvalReport(str(loaded.path), str(source), kind, info.world_size, results)


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
) -> tuple[nn.Module, str, dict[str, EvalLoader]]:
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
    loader: EvalLoader,
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
        expected_batches=expected_batches(
            list(loader.urls), loader.batch_size, info.world_size, max_batches
        ),
    )
    if result.target_tokens == 0:
        raise FlamingoError(
            f"no {loader.name} sample with target tokens was evaluated "
            f"(dropped: {result.dropped or 'none'})",
            fix="run `flamingo inspect-shards` on the eval shards: they are empty, "
            "unreadable, or every sample is dropped by the filters",
        )
    return result
