"""The training step of docs/formats.md §5.6 with our differences (§5.9), one optimizer step at a time.

Per micro-step: LAION forward/backward, then MMC4 forward/backward, each loss times its
multiplier over the accumulation steps; gradients are reduced once per optimizer step. Then the
embedding-row gradient mask, one clip on the global norm, and AdamW (skipped on every rank when
the norm is not finite). Distributed set-up, precision and logging happen before the loop.
The step reads the device once, at its end (docs/formats.md §12).
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import torch
from torch import nn

from flamingo_cli.data.labels import content_length, needs_mask
from flamingo_cli.recipe.schema import Precision, Strategy
from flamingo_cli.runtime.distributed import DistInfo, any_rank, gradient_sync
from flamingo_cli.runtime.memory import memory_named
from flamingo_cli.runtime.precision import autocast_for
from flamingo_cli.train.flops import StepFlops, peak_memory_gib, reset_peak_memory
from flamingo_cli.train.optim import step_if_finite


class Batch(Protocol):
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass
class StopFlag:
    """Set by SIGTERM, SIGUSR1 or SIGINT (Ctrl-C); checked, and agreed on by all ranks, at step
    boundaries, where the run saves a checkpoint and stops. A second SIGINT aborts at once
    (KeyboardInterrupt). `on_request` hears of the first request (a message for the user).
    """

    requested: bool = False
    on_request: Callable[[str], None] | None = None
    _previous: dict[int, Any] = field(default_factory=dict, repr=False)

    def request(self, why: str) -> None:
        if not self.requested:
            self.requested = True
            if self.on_request is not None:
                self.on_request(why)

    def install(self) -> None:
        """Handle the stop signals (main thread only: elsewhere Python cannot set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self.requested:
                raise KeyboardInterrupt
            again = "; Ctrl-C again aborts without saving" if signum == signal.SIGINT else ""
            self.request(
                f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, "
                f"then stopping{again}"
            )

        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


@dataclass
class StepResult:
    """What one optimizer step measured: totals, and samples and tokens per dataset."""

    losses: dict[str, float]
    lr: float
    grad_norm: float
    skipped: bool
    samples: int
    tokens: int
    data_wait_s: float
    elapsed_s: float
    dataset_samples: dict[str, int] = field(default_factory=dict)
    dataset_tokens: dict[str, int] = field(default_factory=dict)
    model_flops: float | None = None  # of this step on this rank (train/flops.py)
    peak_tflops: float | None = None  # of this rank's device, when known
    peak_memory_gib: float | None = None


@dataclass
class LoopConfig:
    gradient_accumulation_steps: int
    loss_multipliers: dict[str, float]
    max_grad_norm: float
    precision: Precision
    grad_masks: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    peak_tflops: float | None = None
    flops: StepFlops = field(default_factory=StepFlops)
    # FlamingoModel.images_used, run on the host copies of a batch (None: a model without it)
    images_used: Callable[[torch.Tensor, int], torch.Tensor] | None = None


def global_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip all gradients together on their global norm, returned as a tensor on the device
    (not read: no host sync); works on FSDP2's sharded DTensors."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


@dataclass
class _Window:
    """What the backward window measured, per dataset: loss sums as device tensors (float64:
    the sums Python floats would make), token counts as tensors where the batches are (moved
    with the one read), samples from the batch shapes."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, loss: torch.Tensor, tokens: torch.Tensor, samples: int) -> None:
        self.losses[name] = self.losses[name] + loss if name in self.losses else loss
        self.tokens[name] = self.tokens[name] + tokens if name in self.tokens else tokens
        self.samples[name] = self.samples.get(name, 0) + samples


def optimizer_step(
    model: nn.Module,
    batches: Sequence[Mapping[str, Batch]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: LoopConfig,
    info: DistInfo,
    strategy: Strategy,
    scaler: torch.amp.GradScaler | None = None,
    data_wait_s: float = 0.0,
) -> StepResult:
    """Run the micro-steps of one optimizer step; every rank calls it with its own batches.

    The step reads the device once, at its end (docs/formats.md §12): losses and the gradient
    norm stay tensors until then, and the skip of a non-finite step is decided on the device
    (train/optim.py `step_if_finite`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    _count_flops(model, params, batches[0], config, info, strategy)
    start = time.perf_counter()
    reset_peak_memory(info.device)
    lr = float(optimizer.param_groups[0]["lr"])
    window = _backward_window(model, batches, config, info, strategy, scaler)
    norm = _update(params, optimizer, scheduler, config, scaler)
    grad_norm, losses, tokens = _read_once(norm, window)
    return StepResult(
        losses=losses,
        lr=lr,
        grad_norm=grad_norm,
        skipped=not math.isfinite(grad_norm),
        samples=sum(window.samples.values()),
        tokens=sum(tokens.values()),
        data_wait_s=data_wait_s,
        elapsed_s=time.perf_counter() - start + data_wait_s,
        dataset_samples=window.samples,
        dataset_tokens=tokens,
        model_flops=config.flops.of(window.samples),
        peak_tflops=config.peak_tflops,
        peak_memory_gib=peak_memory_gib(info.device),
    )


def _read_once(
    norm: torch.Tensor, window: _Window
) -> tuple[float, dict[str, float], dict[str, int]]:
    """The step's one host read: gradient norm, mean loss and tokens per dataset."""
    names = list(window.losses)
    counts = [window.tokens[name].to(norm.device, non_blocking=True) for name in names]
    values = [norm.detach().double(), *(window.losses[name] for name in names), *counts]
    grad_norm, *read = torch.stack(values).tolist()
    losses = dict(zip(names, read[: len(names)], strict=True))
    tokens = {name: int(v) for name, v in zip(names, read[len(names) :], strict=True)}
    return grad_norm, losses, tokens


def _backward_window(
    model: nn.Module,
    batches: Sequence[Mapping[str, Batch]],
    config: LoopConfig,
    info: DistInfo,
    strategy: Strategy,
    scaler: torch.amp.GradScaler | None,
) -> _Window:
    """Forward and backward of every micro-batch, gradients reduced on the last only; the mean
    loss per dataset (a device tensor), and the samples and tokens seen per dataset."""
    accum = config.gradient_accumulation_steps
    seen = _Window()
    for micro, named in enumerate(batches):
        with gradient_sync(model, enabled=micro == len(batches) - 1):
            for name, batch in named.items():
                with memory_named(*_memory_fix(name, batch, info)):
                    out = _forward(model, batch, config, info, strategy)
                    loss = out.loss * config.loss_multipliers[name] / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                rows = int(batch.input_ids.shape[0])
                seen.add(
                    name,
                    out.loss.detach().double() / len(batches),
                    batch.attention_mask.sum(dtype=torch.float64),
                    rows,
                )
    return seen


def _memory_fix(name: str, batch: Batch, info: DistInfo) -> tuple[str, str, torch.device]:
    """What a step that runs out of memory on `batch` says: the dataset, rank and sizes, and
    the settings that lower them."""
    rows, columns = batch.input_ids.shape
    what = (
        f"in the forward and backward of data.{name} on rank {info.rank} (a batch of {rows} "
        f"samples x {columns} tokens, {batch.images.shape[1]} image(s) each)"
    )
    fix = (
        f"lower data.{name}.batch_size (raise optim.gradient_accumulation_steps to keep the "
        "global batch), or set model.gradient_checkpointing = true"
    )
    return what, fix, info.device


def _forward(
    model: nn.Module, batch: Batch, config: LoopConfig, info: DistInfo, strategy: Strategy
) -> Any:
    """The model's output on one batch; right padding is cut off: same loss, less work (OF
    pads MMC4 to 256 tokens), and what needs the data decided on the host (`host_view`)."""
    host = host_view(batch, config)
    length = host.length
    mask = _to(batch.attention_mask, info.device)[:, :length] if host.masked else None
    with autocast_for(config.precision, info.device, strategy):
        return model(
            _to(batch.images, info.device),
            _to(batch.input_ids, info.device)[:, :length],
            mask,
            labels=_to(batch.labels, info.device)[:, :length],
            **host.media,
        )


@dataclass(frozen=True)
class HostView:
    """What the step decides from a batch's host copies (docs/formats.md §12): asked of the
    device, each would be a read. `length`: columns kept (right padding cut off); `masked`:
    whether the LM needs the attention mask at all (not for right padding that no loss term
    reads: its causal fast path gives the same loss); `media`: the model's `images_used`."""

    length: int
    masked: bool
    media: dict[str, Any]


def host_view(batch: Batch, config: LoopConfig) -> HostView:
    length = content_length(batch.attention_mask, batch.labels)
    media: dict[str, Any] = {}
    if config.images_used is not None:
        media["images_used"] = config.images_used(batch.input_ids, batch.images.shape[1])
    masked = needs_mask(batch.attention_mask[:, :length], batch.labels[:, :length])
    return HostView(length, masked, media)


def _count_flops(
    model: nn.Module,
    params: list[nn.Parameter],
    named: Mapping[str, Batch],
    config: LoopConfig,
    info: DistInfo,
    strategy: Strategy,
) -> None:
    """Count the FLOPs of the datasets not counted yet on a forward and backward of their first
    batch of its own, before the step (docs/formats.md §12): the counter changes the kernels'
    sums in the last bits, so counting on a training batch would make a resumed run differ
    from an uninterrupted one. Gradients and random state are left as they were."""
    todo = [name for name in named if name not in config.flops.per_sample]
    if not todo:
        return
    devices = [info.device] if info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for name in todo:
            batch = named[name]
            counting = config.flops.counting(name, int(batch.input_ids.shape[0]))
            with counting, memory_named(*_memory_fix(name, batch, info)):
                _forward(model, batch, config, info, strategy).loss.backward()
    for param in params:
        param.grad = None


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without waiting: whole (a column slice would be copied through pageable memory
    first), from the loaders' page-locked memory on a GPU machine."""
    return tensor.to(device, non_blocking=True)


def _update(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: LoopConfig,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor:
    """Mask, clip and apply the gradients (not when their norm is not finite), then advance
    the schedule; returns the global gradient norm, not read."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    for param, mask in config.grad_masks:
        if param.grad is not None:
            param.grad.mul_(mask)
    grad_norm = global_grad_norm(params, config.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        step_if_finite(optimizer, grad_norm)
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # a skipped step still advances the schedule, which counts optimizer steps
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    return grad_norm


def accumulation_windows(
    iterators: Mapping[str, Iterator[Batch]], start: int, total: int, accum: int
) -> Iterator[tuple[int, list[dict[str, Batch]], float]]:
    """Yield (batches consumed so far, the micro-batches of one optimizer step, seconds spent
    waiting for data). Windows end at multiples of `accum` and at `total`, so a resumed epoch
    (`start` > 0, always at a window boundary) regroups exactly as the uninterrupted one did.
    """
    index = start
    while index < total:
        window: list[dict[str, Batch]] = []
        waited = 0.0
        while index < total and (not window or index % accum != 0):
            tick = time.perf_counter()
            window.append({name: next(it) for name, it in iterators.items()})
            waited += time.perf_counter() - tick
            index += 1
        yield index, window, waited


def metrics_of(result: StepResult, counters: dict[str, int]) -> dict[str, Any]:
    """The metrics line of one optimizer step: throughput in all and per dataset."""
    seconds = max(result.elapsed_s, 1e-9)
    metrics: dict[str, Any] = {f"loss/{k}": v for k, v in result.losses.items()}
    metrics.update(
        lr=result.lr,
        grad_norm=result.grad_norm,
        skipped=int(result.skipped),
        samples_per_s=result.samples / seconds,
        tokens_per_s=result.tokens / seconds,
        data_wait=result.data_wait_s / seconds,
    )
    for name, samples in result.dataset_samples.items():
        metrics[f"samples_per_s/{name}"] = samples / seconds
    for name, tokens in result.dataset_tokens.items():
        metrics[f"tokens_per_s/{name}"] = tokens / seconds
    metrics.update(utilisation(result, seconds))
    metrics.update({f"dropped/{k}": v for k, v in counters.items()})
    return metrics


def utilisation(result: StepResult, seconds: float) -> dict[str, float]:
    """`tflops_per_gpu` (this rank's model FLOP/s), `mfu` (against its peak, when known) and
    `memory/peak_gib`, each where it was measured."""
    found: dict[str, float] = {}
    if result.model_flops is not None:
        found["tflops_per_gpu"] = result.model_flops / seconds / 1e12
        if result.peak_tflops is not None:
            found["mfu"] = found["tflops_per_gpu"] / result.peak_tflops
    if result.peak_memory_gib is not None:
        found["memory/peak_gib"] = result.peak_memory_gib
    return found


def should_stop(flag: StopFlag, info: DistInfo) -> bool:
    return any_rank(flag.requested, info)
