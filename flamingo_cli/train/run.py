"""One rank's training run: build everything, resume, loop over epochs, checkpoint, export.

Set-up happens here, in order, before the loop: process group, stop signals, the run
directory's lock (which also checks that the directory can be written), model (same seed on
every rank), sharding, optimizer and schedule, loaders, resume or `init_from`, metrics sinks
(rows of steps the run does again are moved aside first).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from flamingo_cli.data.loader import TrainLoader, make_loader
from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluate.run import periodic_evaluation
from flamingo_cli.model.factory import build_model
from flamingo_cli.model.flamingo import FlamingoModel
from flamingo_cli.model.params import checkpoint_parameter_names, embedding_grad_mask
from flamingo_cli.recipe.load import LoadedRecipe
from flamingo_cli.recipe.plan import make_plan
from flamingo_cli.recipe.schema import Recipe
from flamingo_cli.recipe.toml_write import dumps
from flamingo_cli.runtime.distributed import (
    DistInfo,
    any_rank,
    apply_parallelism,
    gathered,
    init_distributed,
    mean_across_ranks,
    repeated_blocks,
    teardown,
)
from flamingo_cli.runtime.precision import require_gpu_for_fp16, use_tf32
from flamingo_cli.runtime.run_dir import resolve_resume, run_dir_of
from flamingo_cli.runtime.run_lock import RunDirLocked, RunLock, claim_for_rank
from flamingo_cli.runtime.weights import load_weights
from flamingo_cli.train.checkpoint import (
    TrainState,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flamingo_cli.train.export import export_weights
from flamingo_cli.train.flops import peak_tflops
from flamingo_cli.train.loop import (
    Batch,
    LoopConfig,
    StepResult,
    StopFlag,
    accumulation_windows,
    metrics_of,
    optimizer_step,
    should_stop,
)
from flamingo_cli.train.metrics import METRICS_FILE, Sinks, open_sinks, set_aside_rows_after
from flamingo_cli.train.optim import build_optimizer
from flamingo_cli.train.schedule import build_scheduler

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.model.factory import ImageTransform
    from flamingo_cli.model.tokenizer import SpecialTokens

FINISHED = "FINISHED"


class TrainEvents(Protocol):
    """What rank 0 reports while training (the CLI renders it; other ranks report nothing)."""

    def started(self, total_steps: int, start_step: int) -> None: ...

    def step(self, step: int, metrics: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


class _Silent:
    def started(self, total_steps: int, start_step: int) -> None:
        return None

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        return None

    def message(self, text: str) -> None:
        return None


@dataclass(frozen=True)
class TrainOutcome:
    """How a rank's run ended."""

    run_dir: Path
    step: int
    total_steps: int
    stopped_early: bool
    last_checkpoint: Path | None
    metrics: dict[str, Any]


def grad_masks(model: FlamingoModel, wrapped: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The embedding-row mask, laid out like the (possibly sharded) embedding parameter."""
    mask = embedding_grad_mask(model)
    if mask is None:
        return []
    weight = model.input_embeddings().weight
    assert isinstance(weight, nn.Parameter)
    placements = getattr(weight, "placements", None)
    if placements is not None:  # an FSDP2 DTensor: shard the mask the same way
        from torch.distributed.tensor import distribute_tensor

        mesh = getattr(weight, "device_mesh")  # noqa: B009
        mask = distribute_tensor(mask.to(weight.device), mesh, placements)
    return [(weight, mask.to(weight.device))]


def train_rank(
    loaded: LoadedRecipe,
    events: TrainEvents | None = None,
    *,
    max_steps: int | None = None,
    take_over: bool = False,
) -> TrainOutcome:
    """Train as this process's rank (a single process when not launched distributed).

    `max_steps` stops after that many optimizer steps in all, with a checkpoint, as a
    preemption signal would. The run directory's lock (runtime/run_lock.py) is held while
    training, by rank 0 unless `flamingo train` launched the ranks and holds it;
    `take_over` replaces a lock that looks alive.
    """
    recipe = loaded.recipe
    require_gpu_for_fp16(recipe.run.precision)
    info = init_distributed(recipe.distributed.timeout_s)
    use_tf32(recipe.run.precision, info.device)
    shown = events if info.is_main and events else _Silent()
    stop = StopFlag(on_request=shown.message)
    stop.install()  # from here a stop signal means: checkpoint at the next step boundary
    try:
        with hold_run_dir(run_dir_of(loaded), info, take_over, stop, shown) as lock:
            return _train(loaded, info, shown, max_steps, stop, lock)
    finally:
        stop.restore()
        teardown()


@contextlib.contextmanager
def hold_run_dir(
    run_dir: Path, info: DistInfo, take_over: bool, stop: StopFlag, events: TrainEvents
) -> Iterator[RunLock | None]:
    """The run directory's lock for the length of the run (None where rank 0 does not hold it
    itself). Creating the directory checks it is writable, before anything is built; when
    rank 0 cannot, every rank stops."""
    lock: RunLock | None = None
    failure: FlamingoError | None = None
    if info.is_main:
        try:
            lock = claim_for_rank(run_dir, take_over=take_over)
        except FlamingoError as error:
            failure = error
    if any_rank(failure is not None, info):
        raise failure or FlamingoError(
            f"rank 0 could not take the run directory {run_dir}", fix="see rank 0's error"
        )
    try:
        if lock is not None:
            if lock.took_over:
                events.message(lock.took_over)
            lock.on_lost = lambda: stop.request(
                f"another run took over {run_dir}: stopping at the end of this step, "
                "without saving over its checkpoints"
            )
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _lost_error(run_dir: Path, lock: RunLock | None) -> RunDirLocked:
    holder = lock.lost_to.describe() if lock is not None and lock.lost_to else "another run"
    return RunDirLocked(
        f"{holder} took over the run directory {run_dir} while this run was training; "
        "this run stopped without saving, so as not to write over that run's checkpoints",
        fix="let one run at a time use a run directory (--take-over only for a run that is "
        "gone); the other run continues from the newest checkpoint",
    )


@dataclass
class TrainSession:
    """What one rank's run holds from set-up to the end: model, optimizer, loaders, progress."""

    recipe: Recipe
    info: DistInfo
    events: TrainEvents
    run_dir: Path
    total_steps: int
    model: FlamingoModel  # unwrapped, for the gradient masks and the export's names
    wrapped: nn.Module
    keep: set[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: dict[str, TrainLoader]
    evaluate: Callable[[nn.Module], dict[str, float]] | None
    progress: dict[str, int]
    state: TrainState
    last_checkpoint: Path | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    named_damage: set[str] = field(default_factory=set)  # notices shown, each once a run


@dataclass
class _Loop:
    """How the step loop runs: the step arithmetic, gradient scaler, sinks and when to stop."""

    config: LoopConfig
    scaler: torch.amp.GradScaler | None
    sinks: Sinks | None
    recipe_text: str  # saved with each checkpoint
    stop: StopFlag
    lock: RunLock | None
    max_steps: int | None


def _train(
    loaded: LoadedRecipe,
    info: DistInfo,
    events: TrainEvents,
    max_steps: int | None,
    stop: StopFlag,
    lock: RunLock | None,
) -> TrainOutcome:
    """Set up, resume, then epochs until the recipe's last or a stop; export at the end."""
    session = _set_up(loaded, info, events)
    session.last_checkpoint = _resume(session)
    run = _start(session, stop, lock, max_steps)
    stopped = False
    try:
        while not stopped and session.progress["epoch"] < session.recipe.run.num_epochs:
            stopped = _run_epoch(session, run)
            if not stopped:
                _end_epoch(session)
                session.last_checkpoint = _checkpoint(session, run)
        if not stopped:
            _finish(session)
    finally:
        if run.sinks is not None:
            run.sinks.close()
    progress = session.progress
    return TrainOutcome(
        session.run_dir,
        progress["step"],
        session.total_steps,
        stopped,
        session.last_checkpoint,
        session.last_metrics,
    )


def _set_up(loaded: LoadedRecipe, info: DistInfo, events: TrainEvents) -> TrainSession:
    """Model (same seed on every rank), sharding, optimizer and schedule, loaders, eval."""
    # the recipe's world size is what was planned; the real one is what torchrun started
    dist_cfg = loaded.recipe.distributed.model_copy(
        update={"nproc_per_node": info.local_world_size, "nnodes": info.nnodes}
    )
    recipe = loaded.recipe.model_copy(update={"distributed": dist_cfg})
    plan = make_plan(recipe)
    torch.manual_seed(recipe.run.seed + info.rank)
    model, transform, tokenizer, special = build_model(recipe.model, seed=recipe.run.seed)
    if recipe.model.init_from:
        load_weights(model, Path(recipe.model.init_from))  # fine-tuning, not a resume
    model.to(info.device)
    keep = checkpoint_parameter_names(model)
    wrapped = apply_parallelism(
        model,
        model.shard_units(),
        strategy=recipe.distributed.strategy,
        sharding=recipe.distributed.sharding,
        precision=recipe.run.precision,
        info=info,
        compiled=repeated_blocks(model) if recipe.run.compile else (),
    )
    optim = recipe.optim
    optimizer = build_optimizer(wrapped, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = build_scheduler(
        optimizer,
        kind=optim.scheduler,
        warmup_steps=optim.warmup_steps,
        total_steps=plan.total_optimizer_steps,
    )
    loaders = _make_loaders(recipe, tokenizer, special, transform, info)
    evaluate = None
    if recipe.run.eval_every:
        evaluate = periodic_evaluation(recipe, tokenizer, special, transform, info)
    # every key must exist before a resume: DCP restores only the keys of this template
    progress = {"step": 0, "epoch": 0, "skipped_steps": 0, **{f"samples_{n}": 0 for n in loaders}}
    state = TrainState(wrapped, optimizer, scheduler, keep=lambda k: k in keep, progress=progress)
    return TrainSession(
        recipe=recipe,
        info=info,
        events=events,
        run_dir=run_dir_of(loaded),
        total_steps=plan.total_optimizer_steps,
        model=model,
        wrapped=wrapped,
        keep=keep,
        optimizer=optimizer,
        scheduler=scheduler,
        loaders=loaders,
        evaluate=evaluate,
        progress=progress,
        state=state,
    )


def _make_loaders(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    special: SpecialTokens,
    transform: ImageTransform,
    info: DistInfo,
) -> dict[str, TrainLoader]:
    """One training loader per dataset, for this rank."""
    return {
        name: make_loader(
            config,
            tokenizer,
            special,
            transform,
            seed=recipe.run.seed,
            rank=info.rank,
            world_size=info.world_size,
            allow_pipe=recipe.data.allow_pipe,
            max_image_pixels=recipe.data.max_image_pixels,
            name=name,
        )
        for name, config in recipe.datasets().items()
    }


def _resume(session: TrainSession) -> Path | None:
    """Load `run.resume`'s checkpoint, if any, and put the loaders where it left off."""
    resume = resolve_resume(session.run_dir, session.recipe.run.resume)
    if resume is None:
        return None
    info, loaders = session.info, session.loaders
    rank_state = load_checkpoint(resume, session.state, info)
    if rank_state is not None:
        try:
            for name, loader in loaders.items():
                loader.load_state_dict(rank_state["loaders"][name])
            set_rng_state(rank_state["rng"])
        except FlamingoError:  # another worker count: no saved position fits
            rank_state = None
    if rank_state is None:
        for name, loader in loaders.items():
            loader.set_epoch(session.progress["epoch"])
            consumed = session.progress.get(f"samples_{name}", 0)
            loader.skip_to(consumed // (loader.config.batch_size * info.world_size))
        session.events.message(
            f"resuming {resume} on another world size or worker count: weights and "
            "optimizer reshard; the data continues from the global number of samples "
            "consumed in this epoch, not with exactly the batches an unchanged run would see"
        )
    return resume


def _start(
    session: TrainSession, stop: StopFlag, lock: RunLock | None, max_steps: int | None
) -> _Loop:
    """Announce the run, set the step up, and open the metrics sinks (rank 0)."""
    recipe, events, progress = session.recipe, session.events, session.progress
    events.started(session.total_steps, progress["step"])
    if recipe.run.eval_every and session.evaluate is None:
        events.message("run.eval_every is set but no dataset has eval_shards: no evaluation")
    config = LoopConfig(
        gradient_accumulation_steps=recipe.optim.gradient_accumulation_steps,
        loss_multipliers={name: cfg.loss_multiplier for name, cfg in recipe.datasets().items()},
        max_grad_norm=recipe.optim.max_grad_norm,
        precision=recipe.run.precision,
        grad_masks=grad_masks(session.model, session.wrapped),
        peak_tflops=peak_tflops(session.info.device, recipe.run.peak_tflops),
        images_used=session.model.images_used,
    )
    scaler = torch.amp.GradScaler("cuda") if recipe.run.precision == "fp16" else None
    sinks: Sinks | None = None
    if session.info.is_main:  # one row per step: rows of steps this run does again move aside
        moved = set_aside_rows_after(session.run_dir / METRICS_FILE, progress["step"])
        if moved is not None:
            events.message(
                f"moved {moved.rows} row(s) of {METRICS_FILE} after step {progress['step']} "
                f"to {moved.path.name}: this run logs those steps again"
            )
        sinks = open_sinks(recipe, session.run_dir, progress["step"])
    # the recipe as this run resolved it: overrides applied, world size as launched
    recipe_text = dumps(recipe.model_dump(mode="json", exclude_none=True))
    return _Loop(config, scaler, sinks, recipe_text, stop, lock, max_steps)


def _run_epoch(session: TrainSession, run: _Loop) -> bool:
    """The optimizer steps left in this epoch; True when the run stopped (and saved)."""
    epoch = session.progress["epoch"]
    for loader in session.loaders.values():
        loader.set_epoch(epoch)
    iterators = {name: iter(loader) for name, loader in session.loaders.items()}
    total = min(loader.num_batches for loader in session.loaders.values())
    start = min(loader.batches for loader in session.loaders.values())
    accum = session.recipe.optim.gradient_accumulation_steps
    try:
        for index, window, waited in accumulation_windows(iterators, start, total, accum):
            if _step(session, run, window, waited, at_end=index == total):
                return True
    finally:
        for it in iterators.values():
            close = getattr(it, "close", None)
            if callable(close):
                close()
    return False


def _step(
    session: TrainSession,
    run: _Loop,
    window: list[dict[str, Batch]],
    waited: float,
    *,
    at_end: bool,
) -> bool:
    """One optimizer step, its metrics, and a checkpoint when due; True when stopping."""
    info, recipe = session.info, session.recipe
    result = optimizer_step(
        session.wrapped,
        window,
        session.optimizer,
        session.scheduler,
        run.config,
        info,
        recipe.distributed.strategy,
        run.scaler,
        waited,
    )
    step = _count(session, result)
    eval_metrics: dict[str, float] = {}
    if session.evaluate is not None and step % recipe.run.eval_every == 0:  # every rank
        eval_metrics = session.evaluate(session.wrapped)
    _log(session, run, result, eval_metrics, at_end=at_end)
    stopping = should_stop(run.stop, info) or (run.max_steps is not None and step >= run.max_steps)
    if stopping and any_rank(run.lock is not None and run.lock.lost, info):
        raise _lost_error(session.run_dir, run.lock)
    every = recipe.run.checkpoint_every
    if every and step % every == 0 and not at_end and not stopping:  # a stop saves this step
        session.last_checkpoint = _checkpoint(session, run)
    if stopping:
        if not _logged(session, step, at_end):  # name what the ranks met since the last row
            _across_ranks(session)
        if at_end:  # the epoch is complete: resume at the next one
            _end_epoch(session)
        session.last_checkpoint = _checkpoint(session, run)
    return stopping


def _logged(session: TrainSession, step: int, at_end: bool) -> bool:
    """Whether `step` gets a full metrics row: every `run.log_every` steps and an epoch's last."""
    return step % session.recipe.run.log_every == 0 or at_end


def _count(session: TrainSession, result: StepResult) -> int:
    """Advance the progress counters past one step."""
    progress, info = session.progress, session.info
    progress["step"] += 1
    progress["skipped_steps"] += int(result.skipped)
    for name, loader in session.loaders.items():
        progress[f"samples_{name}"] = loader.batches * loader.config.batch_size * info.world_size
    return progress["step"]


def _log(
    session: TrainSession,
    run: _Loop,
    result: StepResult,
    eval_metrics: dict[str, float],
    *,
    at_end: bool,
) -> None:
    """The step's metrics every `run.log_every` steps and at an epoch's end; eval ones always."""
    step = session.progress["step"]
    metrics: dict[str, Any] = dict(eval_metrics)
    if _logged(session, step, at_end):
        ranks = _across_ranks(session, result.peak_memory_gib)
        result.losses = mean_across_ranks(result.losses, session.info)
        metrics = metrics_of(result, ranks.dropped)
        metrics.update(ranks.by_source)
        if ranks.peak_gib is not None:  # the rank nearest to running out
            metrics["memory/peak_gib"], metrics["memory/peak_rank"] = (
                ranks.peak_gib,
                ranks.peak_rank,
            )
        metrics["epoch"] = session.progress["epoch"]
        metrics.update(eval_metrics)
        metrics["skipped_steps"] = session.progress["skipped_steps"]
        session.last_metrics = metrics
    if not metrics:
        return
    if run.sinks is not None:
        run.sinks.log(step, metrics)
    session.events.step(step, metrics)


@dataclass(frozen=True)
class _RankSums:
    """What the ranks report at a logged step (docs/formats.md §9.3): drop counters
    (`NAME/REASON`) and per-source counts summed, and the highest peak memory and its rank."""

    dropped: dict[str, int]
    by_source: dict[str, int]
    peak_gib: float | None
    peak_rank: int


def _across_ranks(session: TrainSession, peak_gib: float | None = None) -> _RankSums:
    """Gather every rank's counts and peak memory, and name every rank's damaged shards once
    (shown by rank 0). Collective: all ranks log, and stop, at the same steps."""
    loaders = session.loaders
    mine = (
        {
            f"{name}/{why}": n
            for name, loader in loaders.items()
            for why, n in loader.dropped.items()
        },
        {key: n for loader in loaders.values() for key, n in loader.source_counts().items()},
        [note for loader in loaders.values() for note in loader.damage_notices()],
        peak_gib,
    )
    dropped: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    peaks: list[tuple[float, int]] = []
    for rank, (counts, sources, found, peak) in enumerate(gathered(mine, session.info)):
        dropped.update(counts)
        by_source.update(sources)
        peaks += [(peak, rank)] if peak is not None else []
        for note in found:  # a shard can move to another rank at a new epoch: named once
            if note not in session.named_damage:
                session.named_damage.add(note)
                session.events.message(note)  # shown on rank 0; the others' events are silent
    top, top_rank = max(peaks, key=lambda p: (p[0], -p[1])) if peaks else (None, 0)
    return _RankSums(dict(dropped), dict(by_source), top, top_rank)


def _end_epoch(session: TrainSession) -> None:
    """The epoch is complete: a resume from here starts the next one at its beginning."""
    session.progress["epoch"] += 1
    for name in session.loaders:
        session.progress[f"samples_{name}"] = 0


def _checkpoint(session: TrainSession, run: _Loop) -> Path:
    """Save a checkpoint of this step on every rank (collective)."""
    rank_state = {
        "loaders": {name: loader.state_dict() for name, loader in session.loaders.items()},
        "rng": rng_state(),
    }
    path = save_checkpoint(
        session.run_dir,
        session.progress["step"],
        session.state,
        rank_state,
        session.info,
        recipe_text=run.recipe_text,
        keep_last=session.recipe.run.keep_last,
    )
    if run.sinks is not None:
        run.sinks.save_checkpoint(path)
    return path


def _finish(session: TrainSession) -> None:
    """The last epoch is done: export the weights and mark the run finished."""
    export_weights(session.wrapped, session.keep, session.run_dir, session.info)
    if session.info.is_main:
        (session.run_dir / FINISHED).write_text(f"{session.progress['step']}\n", encoding="utf-8")
