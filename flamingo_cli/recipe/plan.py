"""The resolved plan of a recipe: batches, optimizer steps and memory, as the trainer will run."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from flamingo_cli.recipe.schema import (
    DatasetConfig,
    InterleavedConfig,
    ModelConfig,
    Recipe,
    Source,
)
from flamingo_cli.shards.spec import expand_spec

# Raw bytes a sample occupies in a shuffle buffer when the shards cannot tell us:
# img2dataset pairs at 256 px are ~25 KB; an MMC4 document carries several base64 JPEGs.
DEFAULT_SAMPLE_BYTES = {"pairs": 25_000, "interleaved": 500_000}
# The vision input side when open_clip's config for the encoder cannot be read (ViT-L/14's).
DEFAULT_IMAGE_SIZE = 224
TINY_VISION_CONFIG = Path(__file__).resolve().parent.parent / "assets/tiny/open_clip"
FLOAT_BYTES = 4  # the loaders hand the model float32 pixels


@functools.cache
def _open_clip_image_size(name: str) -> int | None:
    """The encoder's input side from open_clip's bundled JSON config, without importing it."""
    spec = importlib.util.find_spec("open_clip")
    roots = [TINY_VISION_CONFIG]
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    for root in roots:
        try:
            config = json.loads((root / f"{name}.json").read_text(encoding="utf-8"))
            size = config["vision_cfg"]["image_size"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        side = size if isinstance(size, int) else max(size)
        return int(side)
    return None


def image_size(model: ModelConfig) -> int:
    """The side of the square images the vision encoder takes (the tiny preset's for it)."""
    name = "flamingo-tiny-vit" if model.preset == "tiny" else model.vision_encoder
    return _open_clip_image_size(name) or DEFAULT_IMAGE_SIZE


def batch_pixel_bytes(config: DatasetConfig, side: int) -> int:
    """Bytes of one batch's image tensor on one rank: batch x images per sample x 3 x side^2."""
    images = config.max_num_images if isinstance(config, InterleavedConfig) else 1
    return config.batch_size * images * 3 * side * side * FLOAT_BYTES


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, workers: int) -> int:
    """Batches each rank runs per epoch, OpenFlamingo's formula (docs/formats.md §5.8).

    ceil(ceil(n / (b * W)) / w) * w: every loader worker yields the same number of batches.
    """
    w = max(workers, 1)
    per_rank = math.ceil(num_samples / (batch_size * world_size))
    return math.ceil(per_rank / w) * w


@dataclass(frozen=True)
class SourcePlan:
    """What one source of a dataset contributes to an epoch (docs/formats.md §7.3).

    A dataset given by `shards` has one source, named after the dataset (`blended` false)."""

    name: str
    weight: float
    share: float  # p = weight / sum of the dataset's weights
    shards: int
    eval_shards: int
    shards_per_worker: float
    resampled: bool
    samples_drawn_per_epoch: int  # about p x S (more when samples are dropped)
    blended: bool
    total_samples: int | None = None
    # samples drawn per epoch over the samples its shards hold
    passes_per_epoch: float | None = None


@dataclass(frozen=True)
class DatasetPlan:
    """What one dataset contributes to an epoch."""

    name: str
    shards: int
    eval_shards: int
    samples_per_epoch: int
    batch_size: int
    global_batch: int
    batches_per_rank: int
    samples_drawn_per_epoch: int
    workers: int
    shards_per_worker: float
    resampled: bool
    shuffle_buffer_bytes_per_node: int
    batch_pixel_bytes: int
    total_samples: int | None = None
    kind: str = "pairs"
    sources: tuple[SourcePlan, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The derived numbers `validate-config` prints and `train` runs."""

    world_size: int
    nproc_per_node: int
    nnodes: int
    gradient_accumulation_steps: int
    num_epochs: int
    datasets: tuple[DatasetPlan, ...]
    batches_per_epoch: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int
    warmup_steps: int

    @property
    def batch_pixel_bytes_per_node(self) -> int:
        """One batch of every dataset's images on each process of a node."""
        return sum(d.batch_pixel_bytes for d in self.datasets) * self.nproc_per_node

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def source_plans(
    sources: list[Source],
    *,
    drawn: int,
    slots: int,
    totals: dict[str, int] | None = None,
) -> tuple[SourcePlan, ...]:
    """Plan a dataset's sources: `drawn` samples per epoch shared by weight over `slots`
    (workers x ranks) readers; `totals` holds the sample counts of the sources that have one."""
    totals = totals or {}
    weights = sum(s.weight for s in sources)
    plans = []
    for source in sources:
        share = source.weight / weights
        shards = len(expand_spec(source.shards))
        total = totals.get(source.name)
        source_drawn = round(share * drawn)
        plans.append(
            SourcePlan(
                name=source.name,
                weight=source.weight,
                share=share,
                shards=shards,
                eval_shards=len(expand_spec(source.eval_shards)) if source.eval_shards else 0,
                shards_per_worker=shards / slots,
                resampled=source.resampled,
                samples_drawn_per_epoch=source_drawn,
                blended=source.blended,
                total_samples=total,
                passes_per_epoch=source_drawn / total if total else None,
            )
        )
    return tuple(plans)


def dataset_plan(
    name: str,
    config: DatasetConfig,
    recipe: Recipe,
    *,
    total_samples: int | None = None,
    sample_bytes: int | None = None,
    source_totals: dict[str, int] | None = None,
) -> DatasetPlan:
    """Plan one dataset; `total_samples`, `sample_bytes` and the sources' sample counts
    (`source_totals`, by source name) come from the shards when known."""
    dist = recipe.distributed
    world = dist.world_size
    batches = batches_per_epoch(config.train_num_samples, config.batch_size, world, config.workers)
    workers = max(config.workers, 1)
    drawn = batches * config.batch_size * world
    listed = config.source_list(name)
    if source_totals is None and total_samples is not None and len(listed) == 1:
        source_totals = {listed[0].name: total_samples}  # a dataset's count is its source's
    sources = source_plans(listed, drawn=drawn, slots=workers * world, totals=source_totals)
    if total_samples is None and sources and all(s.total_samples is not None for s in sources):
        total_samples = sum(s.total_samples or 0 for s in sources)
    shards = sum(s.shards for s in sources)
    per_sample = sample_bytes or DEFAULT_SAMPLE_BYTES[config.kind]
    return DatasetPlan(
        name=name,
        shards=shards,
        eval_shards=sum(s.eval_shards for s in sources),
        samples_per_epoch=config.train_num_samples,
        batch_size=config.batch_size,
        global_batch=config.batch_size * world * recipe.optim.gradient_accumulation_steps,
        batches_per_rank=batches,
        samples_drawn_per_epoch=drawn,
        workers=config.workers,
        shards_per_worker=shards / (workers * world),
        resampled=config.resampled,
        # every source has its own stream, and so its own shuffle buffer (§7.2)
        shuffle_buffer_bytes_per_node=config.shuffle_buffer
        * per_sample
        * max(len(sources), 1)
        * workers
        * dist.nproc_per_node,
        batch_pixel_bytes=batch_pixel_bytes(config, image_size(recipe.model)),
        total_samples=total_samples,
        kind=config.kind,
        sources=sources,
    )


def make_plan(
    recipe: Recipe,
    *,
    totals: dict[str, int] | None = None,
    sample_bytes: dict[str, int] | None = None,
    source_totals: dict[str, dict[str, int]] | None = None,
) -> Plan:
    """Resolve the recipe into per-dataset and whole-run numbers; `totals` and
    `sample_bytes` by dataset, `source_totals` by dataset and source, when counted."""
    totals = totals or {}
    sample_bytes = sample_bytes or {}
    source_totals = source_totals or {}
    datasets = tuple(
        dataset_plan(
            name,
            config,
            recipe,
            total_samples=totals.get(name),
            sample_bytes=sample_bytes.get(name),
            source_totals=source_totals.get(name),
        )
        for name, config in recipe.datasets().items()
    )
    # The trainer steps every loader together, so the shortest one bounds the epoch.
    batches = min((d.batches_per_rank for d in datasets), default=0)
    accum = recipe.optim.gradient_accumulation_steps
    steps = math.ceil(batches / accum)
    return Plan(
        world_size=recipe.distributed.world_size,
        nproc_per_node=recipe.distributed.nproc_per_node,
        nnodes=recipe.distributed.nnodes,
        gradient_accumulation_steps=accum,
        num_epochs=recipe.run.num_epochs,
        datasets=datasets,
        batches_per_epoch=batches,
        optimizer_steps_per_epoch=steps,
        total_optimizer_steps=steps * recipe.run.num_epochs,
        warmup_steps=recipe.optim.warmup_steps,
    )
