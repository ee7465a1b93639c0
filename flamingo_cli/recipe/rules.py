"""Cross-field rules on a typed recipe; each problem names the key, line and fix."""

from __future__ import annotations

from flamingo_cli.errors import Problem
from flamingo_cli.recipe.load import SHARD_KEYS, LoadedRecipe
from flamingo_cli.recipe.plan import Plan, batches_per_epoch
from flamingo_cli.recipe.schema import LaionConfig, Mmc4Config
from flamingo_cli.shards.spec import expand_spec, missing_local, url_kind

MAX_LISTED = 5
SHUFFLE_MEMORY_WARNING_BYTES = 64 * 2**30


def check_recipe(loaded: LoadedRecipe, plan: Plan, *, check_files: bool = True) -> list[Problem]:
    """Every rule at once: errors first, then warnings."""
    problems = [
        *_model_source(loaded),
        *_datasets_present(loaded),
        *_equal_batches(loaded),
        *_shard_rules(loaded, check_files=check_files),
        *_mmc4_rules(loaded),
        *_distributed_rules(loaded),
        *_logging_rules(loaded),
        *_warnings(loaded, plan),
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
    """Both loaders must give every rank the same number of batches per epoch (FORMATS 5.8)."""
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
            if not urls:
                problems.append(loaded.problem(key, "the shard spec expands to no shards"))
                continue
            pipes = [u for u in urls if url_kind(u) == "pipe"]
            if pipes and not recipe.data.allow_pipe:
                problems.append(
                    loaded.problem(
                        key,
                        f"{len(pipes)} `pipe:` spec(s) would run shell commands: {_listed(pipes)}",
                        fix="set data.allow_pipe = true if you trust these commands, or use "
                        "s3:// / gs:// / https:// URLs, which stream without a shell",
                    )
                )
            missing = missing_local(urls) if check_files else []
            if missing:
                problems.append(
                    loaded.problem(
                        key,
                        f"{len(missing)} of {len(urls)} local shard(s) do not exist: "
                        f"{_listed(missing)}",
                        fix="check the path and brace range (relative paths in a recipe file "
                        "are relative to the recipe's directory)",
                    )
                )
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
    if logging.save_checkpoints_to_wandb and not logging.wandb:
        return [
            loaded.problem(
                "logging.save_checkpoints_to_wandb",
                "saving checkpoints to wandb needs wandb logging, which is off",
                fix="set logging.wandb = true or logging.save_checkpoints_to_wandb = false",
            )
        ]
    return []


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
        config: LaionConfig | Mmc4Config = loaded.recipe.datasets()[dataset.name]
        total = dataset.total_samples
        if total is not None and not dataset.resampled and dataset.samples_drawn_per_epoch > total:
            problems.append(
                loaded.problem(
                    f"data.{dataset.name}.train_num_samples",
                    f"an epoch draws {dataset.samples_drawn_per_epoch} samples but the shards "
                    f"hold {total}: without resampling the loaders run dry before the epoch ends",
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
