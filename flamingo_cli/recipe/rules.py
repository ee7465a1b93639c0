"""Cross-field rules on a typed recipe; each problem names the key, line and fix."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from flamingo_cli.errors import Problem
from flamingo_cli.recipe.load import SHARD_KEYS, LoadedRecipe, UntypedRecipe
from flamingo_cli.recipe.plan import Plan, batches_per_epoch
from flamingo_cli.recipe.schema import DatasetConfig
from flamingo_cli.shards.spec import expand_spec, missing_local, url_kind
from flamingo_cli.units import format_bytes

MAX_LISTED = 5
SHUFFLE_MEMORY_WARNING_BYTES = 64 * 2**30


def check_recipe(
    loaded: LoadedRecipe, plan: Plan, *, check_files: bool = True, training: bool = False
) -> list[Problem]:
    """Every rule at once: errors first, then warnings. `training`: the run starts on this
    machine now, so what cannot fit in its memory is an error rather than a warning."""
    problems = [
        *_model_source(loaded),
        *_datasets_present(loaded),
        *_equal_batches(loaded),
        *_shard_rules(loaded, check_files=check_files),
        *_mmc4_rules(loaded),
        *_distributed_rules(loaded),
        *_logging_rules(loaded),
        *_warnings(loaded, plan),
        *_memory_rules(loaded, plan, machine_memory_bytes(), training=training),
    ]
    return sorted(problems, key=lambda p: p.severity != "error")


def _model_source(loaded: LoadedRecipe) -> list[Problem]:
    model = loaded.recipe.model
    if model.preset is None and model.lm_path is None:
        return [
            loaded.problem(
                "model.lm_path",
                "no language model: neither model.lm_path nor model.preset is set",
                fix='set model.lm_path to a Hugging Face name or local directory, or model.preset = "tiny"',
            )
        ]
    if model.preset is not None and model.lm_path is not None:
        return [
            loaded.problem(
                "model.preset",
                f"model.preset = {model.preset!r} replaces the language model, "
                "but model.lm_path is also set",
                fix="remove one of model.preset and model.lm_path",
            )
        ]
    return []


def _datasets_present(loaded: LoadedRecipe) -> list[Problem]:
    if loaded.recipe.datasets():
        return []
    return [
        loaded.problem(
            "data",
            "no training data: neither [data.laion] nor [data.mmc4] is set",
            fix="add a [data.laion] and/or [data.mmc4] table with shards",
        )
    ]


def _equal_batches(loaded: LoadedRecipe) -> list[Problem]:
    """Both loaders must give every rank the same number of batches per epoch (docs/formats.md §5.8)."""
    recipe = loaded.recipe
    laion, mmc4 = recipe.data.laion, recipe.data.mmc4
    if laion is None or mmc4 is None:
        return []
    world = recipe.distributed.world_size
    counts = {
        name: batches_per_epoch(c.train_num_samples, c.batch_size, world, c.workers)
        for name, c in (("laion", laion), ("mmc4", mmc4))
    }
    if counts["laion"] == counts["mmc4"]:
        return []
    fixes = []
    for name, config, other in (("mmc4", mmc4, "laion"), ("laion", laion, "mmc4")):
        target = counts[other]
        if target % max(config.workers, 1) == 0:
            samples = target * config.batch_size * world
            fixes.append(f"data.{name}.train_num_samples = {samples}")
    fix = " or ".join(fixes) if fixes else "give both datasets the same number of workers"
    return [
        loaded.problem(
            "data.mmc4.train_num_samples",
            f"the two loaders give different batches per rank per epoch: laion "
            f"{counts['laion']} (n={laion.train_num_samples}, batch {laion.batch_size}, "
            f"{laion.workers} workers) vs mmc4 {counts['mmc4']} (n={mmc4.train_num_samples}, "
            f"batch {mmc4.batch_size}, {mmc4.workers} workers) at world size {world}; "
            "ceil(ceil(n / (batch * world)) / workers) * workers must match",
            fix=f"set {fix}",
        )
    ]


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown} and {len(items) - MAX_LISTED} more"


def _shard_rules(loaded: LoadedRecipe, *, check_files: bool) -> list[Problem]:
    recipe = loaded.recipe
    world = recipe.distributed.world_size
    problems: list[Problem] = []
    for name, config in recipe.datasets().items():
        for field in SHARD_KEYS:
            spec = getattr(config, field)
            if spec is None:
                continue
            key = f"data.{name}.{field}"
            urls = expand_spec(spec)
            problems += _spec_problems(
                loaded, key, urls, allow_pipe=recipe.data.allow_pipe, check_files=check_files
            )
            if not urls:
                continue
            needed = max(config.workers, 1) * world
            if field == "shards" and not config.resampled and len(urls) < needed:
                problems.append(
                    loaded.problem(
                        key,
                        f"{len(urls)} shard(s) for {config.workers} worker(s) x world size "
                        f"{world}: without resampling every worker needs at least one shard "
                        f"({needed})",
                        fix=f"set data.{name}.resampled = true, give at least {needed} shards, "
                        f"or lower data.{name}.workers",
                    )
                )
    return problems


def _spec_problems(
    loaded: LoadedRecipe, key: str, urls: list[str], *, allow_pipe: bool, check_files: bool
) -> list[Problem]:
    """What is wrong with one shard spec on its own: empty, refused `pipe:`, missing files."""
    if not urls:
        return [loaded.problem(key, "the shard spec expands to no shards")]
    problems = []
    pipes = [u for u in urls if url_kind(u) == "pipe"]
    if pipes and not allow_pipe:
        problems.append(
            loaded.problem(
                key,
                f"{len(pipes)} `pipe:` spec(s) would run shell commands: {_listed(pipes)}",
                fix="set data.allow_pipe = true (or pass --allow-pipe) if you trust these "
                "commands, or use s3:// / gs:// / https:// URLs, which stream without a shell",
            )
        )
    missing = missing_local(urls) if check_files else []
    if missing:
        problems.append(
            loaded.problem(
                key,
                f"{len(missing)} of {len(urls)} local shard(s) do not exist: {_listed(missing)}",
                fix="check the path and brace range (relative paths in a recipe file "
                "are relative to the recipe's directory)",
            )
        )
    return problems


def untyped_shard_problems(untyped: UntypedRecipe) -> list[Problem]:
    """The shard and `pipe:` rules on a recipe that failed typing, so that every problem is
    reported at once; specs that are not strings or lists of strings were reported already."""
    data = untyped.data.get("data")
    if not isinstance(data, dict):
        return []
    allow_pipe = data.get("allow_pipe") is True
    problems: list[Problem] = []
    for name, section in data.items():
        if not isinstance(section, dict):
            continue
        for field in SHARD_KEYS:
            spec = section.get(field)
            if isinstance(spec, str) or (
                isinstance(spec, list) and all(isinstance(s, str) for s in spec)
            ):
                problems += _spec_problems(
                    untyped.where,
                    f"data.{name}.{field}",
                    expand_spec(spec),
                    allow_pipe=allow_pipe,
                    check_files=True,
                )
    return problems


def _mmc4_rules(loaded: LoadedRecipe) -> list[Problem]:
    mmc4 = loaded.recipe.data.mmc4
    if mmc4 is None:
        return []
    problems: list[Problem] = []
    if mmc4.min_num_images > mmc4.max_num_images:
        problems.append(
            loaded.problem(
                "data.mmc4.min_num_images",
                f"min_num_images ({mmc4.min_num_images}) is above max_num_images "
                f"({mmc4.max_num_images}): every document would be rejected",
                fix=f"set data.mmc4.min_num_images <= {mmc4.max_num_images}",
            )
        )
    if mmc4.textsim_threshold > 1:
        problems.append(
            loaded.problem(
                "data.mmc4.textsim_threshold",
                f"textsim_threshold {mmc4.textsim_threshold} is above 1, the largest CLIP "
                "similarity: every image would be dropped (OpenFlamingo's argparse default of "
                "30 does this)",
                fix="set data.mmc4.textsim_threshold = 0.24 (OpenFlamingo's published value)",
            )
        )
    return problems


def _distributed_rules(loaded: LoadedRecipe) -> list[Problem]:
    dist = loaded.recipe.distributed
    problems: list[Problem] = []
    if dist.sharding == "hybrid" and dist.nnodes < 2:
        problems.append(
            loaded.problem(
                "distributed.sharding",
                f"hybrid sharding shards within a node and replicates across nodes; it needs "
                f"nnodes > 1 (nnodes is {dist.nnodes})",
                fix='set distributed.sharding = "full" or distributed.nnodes >= 2',
            )
        )
    if dist.sharding == "hybrid" and dist.strategy != "fsdp":
        problems.append(
            loaded.problem(
                "distributed.sharding",
                f"sharding applies to the fsdp strategy, not {dist.strategy!r}",
                fix='set distributed.strategy = "fsdp" or distributed.sharding = "full"',
            )
        )
    if dist.strategy == "none" and dist.world_size > 1:
        problems.append(
            loaded.problem(
                "distributed.strategy",
                f'strategy "none" trains one process, but the world size is {dist.world_size}',
                fix='set distributed.strategy = "ddp" or "fsdp", or use one process',
            )
        )
    return problems


def _logging_rules(loaded: LoadedRecipe) -> list[Problem]:
    logging = loaded.recipe.logging
    problems = []
    if logging.save_checkpoints_to_wandb and not logging.wandb:
        problems.append(
            loaded.problem(
                "logging.save_checkpoints_to_wandb",
                "saving checkpoints to wandb needs wandb logging, which is off",
                fix="set logging.wandb = true or logging.save_checkpoints_to_wandb = false",
            )
        )
    # looked up, not imported: validate-config stays free of torch and tensorboard
    if logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append(
            loaded.problem(
                "logging.tensorboard",
                "TensorBoard logging needs the tensorboard package, which is not installed",
                fix="pip install 'flamingo[tensorboard]', or set logging.tensorboard = false",
            )
        )
    return problems


def machine_memory_bytes() -> int | None:
    """This machine's memory, or the cgroup limit (Slurm, containers) when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _memory_rules(
    loaded: LoadedRecipe, plan: Plan, memory: int | None, *, training: bool
) -> list[Problem]:
    """One batch of every dataset's pixels on each process of a node must fit in memory."""
    needed = plan.batch_pixel_bytes_per_node
    if memory is None or needed <= memory or not plan.datasets:
        return []
    parts = ", ".join(
        f"{d.name} {d.batch_size} x {format_bytes(d.batch_pixel_bytes / d.batch_size)} per sample"
        for d in plan.datasets
    )
    where = "this machine" if training else "the machine validating it"
    largest = max(plan.datasets, key=lambda d: d.batch_pixel_bytes)
    return [
        loaded.problem(
            f"data.{largest.name}.batch_size",
            f"one batch of images takes {format_bytes(needed)} per node ({parts}, "
            f"x {plan.nproc_per_node} process(es)), more than the {format_bytes(memory)} of {where}",
            fix="lower the batch sizes (and use gradient accumulation for a large global batch)"
            + ("" if training else "; ignore this if the training nodes have more memory"),
            severity="error" if training else "warning",
        )
    ]


def _warnings(loaded: LoadedRecipe, plan: Plan) -> list[Problem]:
    problems: list[Problem] = []
    if plan.datasets and plan.warmup_steps > plan.total_optimizer_steps:
        problems.append(
            loaded.problem(
                "optim.warmup_steps",
                f"warmup ({plan.warmup_steps} steps) is longer than the whole run "
                f"({plan.total_optimizer_steps} optimizer steps): the learning rate never "
                "reaches its peak",
                fix=f"set optim.warmup_steps below {plan.total_optimizer_steps}",
                severity="warning",
            )
        )
    for dataset in plan.datasets:
        config: DatasetConfig = loaded.recipe.datasets()[dataset.name]
        total = dataset.total_samples
        if total is not None and not dataset.resampled and dataset.samples_drawn_per_epoch > total:
            problems.append(
                loaded.problem(
                    f"data.{dataset.name}.train_num_samples",
                    f"an epoch draws {dataset.samples_drawn_per_epoch} samples but the shards "
                    f"hold {total}: without resampling each loader worker goes over its shards "
                    "again, so samples repeat within the epoch (docs/formats.md §5.8)",
                    fix=f"set data.{dataset.name}.resampled = true or lower train_num_samples",
                    severity="warning",
                )
            )
        if dataset.shuffle_buffer_bytes_per_node > SHUFFLE_MEMORY_WARNING_BYTES:
            gib = dataset.shuffle_buffer_bytes_per_node / 2**30
            problems.append(
                loaded.problem(
                    f"data.{dataset.name}.shuffle_buffer",
                    f"shuffle buffers hold about {gib:.0f} GiB per node ({config.shuffle_buffer} "
                    f"samples x {max(config.workers, 1)} workers x "
                    f"{loaded.recipe.distributed.nproc_per_node} processes)",
                    fix=f"lower data.{dataset.name}.shuffle_buffer or workers",
                    severity="warning",
                )
            )
    return problems
