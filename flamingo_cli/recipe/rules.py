"""Cross-field rules on a typed recipe; each problem names the key, line and fix."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path

from flamingo_cli.errors import Problem
from flamingo_cli.recipe.load import SHARD_KEYS, LoadedRecipe, UntypedRecipe
from flamingo_cli.recipe.plan import DatasetPlan, Plan, SourcePlan, batches_per_epoch
from flamingo_cli.recipe.schema import (
    KINDS,
    NAME_PATTERN,
    DatasetConfig,
    InterleavedConfig,
    Source,
)
from flamingo_cli.shards.spec import expand_spec, missing_local, url_kind
from flamingo_cli.units import format_bytes

MAX_LISTED = 5
SHUFFLE_MEMORY_WARNING_BYTES = 64 * 2**30
MAX_PASSES_PER_EPOCH = 10  # more passes over a source per epoch: warn (docs/formats.md §7.3)


def check_recipe(
    loaded: LoadedRecipe, plan: Plan, *, check_files: bool = True, training: bool = False
) -> list[Problem]:
    """Every rule at once: errors first, then warnings. `training`: the run starts on this
    machine now, so what cannot fit in its memory is an error rather than a warning."""
    problems = [
        *_model_source(loaded),
        *_datasets_present(loaded),
        *_dataset_structure(loaded),
        *_equal_batches(loaded),
        *_shard_rules(loaded, check_files=check_files),
        *_interleaved_rules(loaded),
        *_distributed_rules(loaded),
        *_logging_rules(loaded),
        *_compile_rules(loaded),
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
    kinds = " or ".join(f'"{k}"' for k in KINDS)
    return [
        loaded.problem(
            "data",
            "no training data: the recipe has no [data.NAME] table",
            fix=f"add [data.laion] (pairs), [data.mmc4] (interleaved) or a [data.NAME] with "
            f"kind = {kinds}, each with shards or [[data.NAME.sources]] (docs/formats.md §7)",
        )
    ]


def source_key(dataset: str, index: int, blended: bool, field: str) -> str:
    """The recipe key of a source's `field`: `data.NAME.sources.N.FIELD` in a blend, else
    the dataset's own `data.NAME.FIELD`."""
    if blended:
        return f"data.{dataset}.sources.{index}.{field}"
    return f"data.{dataset}.{field}"


def _dataset_structure(loaded: LoadedRecipe) -> list[Problem]:
    """Names, and shards given once per dataset: either `shards` or a blend (§7.1, §7.2)."""
    problems: list[Problem] = []
    for name, config in loaded.recipe.datasets().items():
        if not NAME_PATTERN.fullmatch(name):
            problems.append(
                loaded.problem(
                    f"data.{name}",
                    f"dataset name {name!r} must start with a letter and hold only letters, "
                    "digits, _ and - (at most 64): it becomes part of metric names",
                    fix=f"rename [data.{name}], e.g. to [data.{_suggested_name(name)}]",
                )
            )
        problems += _shards_or_sources(loaded, name, config)
    return problems


def _suggested_name(name: str) -> str:
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in name)
    cleaned = cleaned if cleaned[:1].isalpha() else f"d{cleaned}"
    return cleaned[:64]


def _shards_or_sources(loaded: LoadedRecipe, name: str, config: DatasetConfig) -> list[Problem]:
    if config.sources is not None and config.shards is not None:
        return [
            _sources_problem(
                loaded,
                name,
                f"[data.{name}] gives both shards and [[data.{name}.sources]]",
                fix=f"remove data.{name}.shards (or make it a source of the blend), or "
                f"remove the [[data.{name}.sources]] tables",
            )
        ]
    if not config.sources:
        if config.shards is not None:
            return []
        fix = (
            f'set data.{name}.shards = "path/{{00000..00099}}.tar", or add '
            f"[[data.{name}.sources]] tables with name, shards and weight"
        )
        if config.sources is not None:
            return [_sources_problem(loaded, name, f"[data.{name}] has no sources", fix=fix)]
        return [loaded.problem(f"data.{name}.shards", f"[data.{name}] has no shards", fix=fix)]
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for index, source in enumerate(config.sources):
        if source.name in seen:
            problems.append(
                loaded.problem(
                    f"data.{name}.sources.{index}.name",
                    f"sources {seen[source.name]} and {index} of [data.{name}] (counted from 0) "
                    f"are both named {source.name!r}",
                    fix="give each source of the dataset its own name: metrics and the plan "
                    "name sources by it",
                )
            )
        seen.setdefault(source.name, index)
    if config.eval_shards is not None:
        problems.append(
            loaded.problem(
                f"data.{name}.eval_shards",
                f"[data.{name}] is a blend of sources, so its eval shards are given per source",
                fix=f"move data.{name}.eval_shards into the [[data.{name}.sources]] table(s) "
                "the shards belong to",
            )
        )
    return problems


def _sources_problem(loaded: LoadedRecipe, name: str, message: str, *, fix: str) -> Problem:
    """A problem at `data.NAME.sources`, on the line of its first `[[data.NAME.sources]]`
    (the line map records array tables by index only)."""
    key = f"data.{name}.sources"
    problem = loaded.problem(key, message, fix=fix)
    line = loaded.lines.get(key) or loaded.lines.get(f"{key}.0")
    return dataclasses.replace(problem, line=line) if problem.file and line else problem


def _equal_batches(loaded: LoadedRecipe) -> list[Problem]:
    """Every loader must give each rank the same number of batches per epoch
    (docs/formats.md §5.8, §7.1); each fix proposed aligns all datasets to one count."""
    recipe = loaded.recipe
    datasets = recipe.datasets()
    world = recipe.distributed.world_size
    counts = {
        name: batches_per_epoch(c.train_num_samples, c.batch_size, world, c.workers)
        for name, c in datasets.items()
    }
    names = list(counts)
    differing = [n for n in names[1:] if counts[n] != counts[names[0]]]
    if not differing:
        return []
    fixes = []
    for target in dict.fromkeys(counts.values()):  # the first dataset's count first
        changes = [
            f"data.{n}.train_num_samples = {target * c.batch_size * world}"
            for n, c in datasets.items()
            if counts[n] != target
        ]
        if all(target % max(c.workers, 1) == 0 for n, c in datasets.items() if counts[n] != target):
            fixes.append(" and ".join(changes))
    # "A = x or B = y" for two datasets; alternatives of several changes: "...; or set ..."
    joined = "; or set ".join(fixes) if any(" and " in f for f in fixes) else " or ".join(fixes)
    fix = joined or "give every dataset the same number of workers"
    described = [
        f"{n} {counts[n]} (n={datasets[n].train_num_samples}, batch {datasets[n].batch_size}, "
        f"{datasets[n].workers} workers)"
        for n in (names[0], *differing)
    ]
    return [
        loaded.problem(
            f"data.{differing[0]}.train_num_samples",
            f"the loaders give different batches per rank per epoch: {described[0]} vs "
            f"{', '.join(described[1:])} at world size {world}; "
            "ceil(ceil(n / (batch * world)) / workers) * workers must match",
            fix=f"set {fix}",
        )
    ]


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown} and {len(items) - MAX_LISTED} more"


def _shard_rules(loaded: LoadedRecipe, *, check_files: bool) -> list[Problem]:
    """Each source's shard specs on their own, and enough shards for every worker of every
    rank unless the source is resampled (docs/formats.md §5.8, §7.3)."""
    recipe = loaded.recipe
    world = recipe.distributed.world_size
    problems: list[Problem] = []
    for name, config in recipe.datasets().items():
        for index, source in enumerate(config.source_list(name)):
            for field in SHARD_KEYS:
                spec = getattr(source, field)
                if spec is None:
                    continue
                key = source_key(name, index, source.blended, field)
                urls = expand_spec(spec)
                problems += _spec_problems(
                    loaded, key, urls, allow_pipe=recipe.data.allow_pipe, check_files=check_files
                )
                needed = max(config.workers, 1) * world
                if field == "shards" and urls and not source.resampled and len(urls) < needed:
                    problems.append(_too_few_shards(loaded, name, index, source, len(urls), world))
    return problems


def _too_few_shards(
    loaded: LoadedRecipe, name: str, index: int, source: Source, shards: int, world: int
) -> Problem:
    workers = loaded.recipe.datasets()[name].workers
    needed = max(workers, 1) * world
    resampled = source_key(name, index, source.blended, "resampled")
    return loaded.problem(
        source_key(name, index, source.blended, "shards"),
        f"{shards} shard(s) for {workers} worker(s) x world size {world}: without "
        f"resampling every worker needs at least one shard ({needed})",
        fix=f"set {resampled} = true, give at least {needed} shards, or lower data.{name}.workers",
    )


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
        sources = section.get("sources")
        tables = [(f"data.{name}", section)]
        if isinstance(sources, list):
            tables += [
                (f"data.{name}.sources.{i}", s)
                for i, s in enumerate(sources)
                if isinstance(s, dict)
            ]
        for prefix, table in tables:
            for field in SHARD_KEYS:
                spec = table.get(field)
                if isinstance(spec, str) or (
                    isinstance(spec, list) and all(isinstance(s, str) for s in spec)
                ):
                    problems += _spec_problems(
                        untyped.where,
                        f"{prefix}.{field}",
                        expand_spec(spec),
                        allow_pipe=allow_pipe,
                        check_files=True,
                    )
    return problems


def _interleaved_rules(loaded: LoadedRecipe) -> list[Problem]:
    """Image limits of every interleaved dataset (mmc4, and any kind = "interleaved")."""
    problems: list[Problem] = []
    for name, config in loaded.recipe.datasets().items():
        if not isinstance(config, InterleavedConfig):
            continue
        key = f"data.{name}"
        if config.min_num_images > config.max_num_images:
            problems.append(
                loaded.problem(
                    f"{key}.min_num_images",
                    f"min_num_images ({config.min_num_images}) is above max_num_images "
                    f"({config.max_num_images}): every document would be rejected",
                    fix=f"set {key}.min_num_images <= {config.max_num_images}",
                )
            )
        if config.textsim_threshold > 1:
            problems.append(
                loaded.problem(
                    f"{key}.textsim_threshold",
                    f"textsim_threshold {config.textsim_threshold} is above 1, the largest CLIP "
                    "similarity: every image would be dropped (OpenFlamingo's argparse default "
                    "of 30 does this)",
                    fix=f"set {key}.textsim_threshold = 0.24 (OpenFlamingo's published value)",
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


COMPILERS = ("g++", "clang++", "c++", "gcc", "clang", "cc")


def _compile_rules(loaded: LoadedRecipe) -> list[Problem]:
    """torch.compile builds its kernels (C++ on CPUs, Triton's launchers on GPUs) with a C or C++
    compiler: without one the run would fail at its first step, deep inside torch."""
    if not loaded.recipe.run.compile:
        return []
    if os.environ.get("CXX") or os.environ.get("CC") or any(map(shutil.which, COMPILERS)):
        return []
    return [
        loaded.problem(
            "run.compile",
            "run.compile = true needs a C or C++ compiler (torch.compile builds its kernels "
            "with one), and none is on PATH",
            fix="install one (e.g. apt-get install g++) or set run.compile = false",
        )
    ]


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
        for index, source in enumerate(dataset.sources):
            problems += _source_warnings(loaded, dataset.name, index, source)
        if dataset.shuffle_buffer_bytes_per_node > SHUFFLE_MEMORY_WARNING_BYTES:
            gib = dataset.shuffle_buffer_bytes_per_node / 2**30
            problems.append(
                loaded.problem(
                    f"data.{dataset.name}.shuffle_buffer",
                    f"shuffle buffers hold about {gib:.0f} GiB per node ({config.shuffle_buffer} "
                    f"samples x {_streams(dataset)}{max(config.workers, 1)} workers x "
                    f"{loaded.recipe.distributed.nproc_per_node} processes)",
                    fix=f"lower data.{dataset.name}.shuffle_buffer or workers",
                    severity="warning",
                )
            )
    return problems


def _streams(dataset: DatasetPlan) -> str:
    """`N sources x ` for a blend, whose every source has a shuffle buffer; else nothing."""
    return f"{len(dataset.sources)} sources x " if len(dataset.sources) > 1 else ""


def _source_warnings(
    loaded: LoadedRecipe, name: str, index: int, source: SourcePlan
) -> list[Problem]:
    """A source read too often or too little in an epoch, once its samples are counted
    (docs/formats.md §7.3); a dataset given by `shards` is its one source."""
    total, drawn, passes = (
        source.total_samples,
        source.samples_drawn_per_epoch,
        source.passes_per_epoch,
    )
    if not total or passes is None:
        return []
    blended = source.blended
    key = source_key(name, index, blended, "weight" if blended else "train_num_samples")
    what = f"source {source.name!r} of [data.{name}]" if blended else f"[data.{name}]"
    if passes > MAX_PASSES_PER_EPOCH:
        message = (
            f"{what} is drawn about {drawn:,} samples per epoch, {passes:.1f} passes over the "
            f"{total:,} samples its shards hold: each sample is seen about {passes:.0f} times "
            "per epoch"
        )
        fix = f"lower {key}, or give {'the source' if blended else 'it'} more shards"
    elif not source.resampled and drawn > total:
        message = (
            f"{what} is drawn about {drawn:,} samples per epoch but its shards hold {total:,}"
            if blended  # below: the message of recipes before mixtures
            else f"an epoch draws {drawn} samples but the shards hold {total}"
        ) + (
            ": without resampling each loader worker goes over its shards again, so samples "
            "repeat within the epoch (docs/formats.md §5.8)"
        )
        resampled = source_key(name, index, blended, "resampled")
        fix = f"set {resampled} = true or lower " + (
            "its weight" if blended else "train_num_samples"
        )
    elif drawn * source.shards < total:
        message = (
            f"{what} is drawn about {drawn:,} samples per epoch, fewer than one of its shards "
            f"holds on average ({total / source.shards:,.0f}): an epoch reads a small part of "
            "its data"
        )
        fix = f"raise {key}" + (" or leave the source out" if blended else "")
    else:
        return []
    return [loaded.problem(key, message, fix=fix, severity="warning")]
