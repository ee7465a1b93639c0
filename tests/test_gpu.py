"""The CUDA paths of the step (docs/formats.md §12): no host sync but the step's one read, fused
AdamW skipping a non-finite step on the device, cross-attention on the fused attention
kernels, TF32 for reduced-precision runs, page-locked batches. The `gpu` tests skip without
CUDA; the CPU halves run everywhere."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flamingo_cli.runtime.distributed import DistInfo
from flamingo_cli.runtime.precision import use_tf32
from flamingo_cli.train import loop
from flamingo_cli.train.loop import LoopConfig, optimizer_step
from flamingo_cli.train.optim import build_optimizer, is_fused
from flamingo_cli.train.schedule import build_scheduler

CUDA = torch.cuda.is_available()


def gpu(test: Any) -> Any:
    """A test of the CUDA paths: marked `gpu`, skipped without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


@dataclass
class B:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def host_batch(rows: int, length: int, images: int) -> B:
    ids = torch.randint(3, 50, (rows, length))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some right padding, cut off by the step
    batch = B(torch.randn(rows, images, 3, 8, 8), ids, mask, ids.clone())
    if CUDA:
        batch = B(*(t.pin_memory() for t in vars(batch).values()))
    return batch


class Probe(nn.Module):
    """A small model with matrix products on every input; `scale = inf` gives an inf loss."""

    def __init__(self) -> None:
        super().__init__()
        self.pixels = nn.Linear(3 * 8 * 8, 16)
        self.tokens = nn.Embedding(50, 16)
        self.scale = 1.0

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, *_: Any, **__: Any
    ) -> SimpleNamespace:
        seen = self.pixels(images.flatten(2)).mean(dim=1, keepdim=True)
        text = self.tokens(input_ids)
        return SimpleNamespace(loss=(text @ seen.transpose(1, 2)).square().mean() * self.scale)


@pytest.fixture
def sync_errors() -> Iterator[None]:
    """Any host-device sync raises, except in the step's one read."""
    read = loop._read_once

    def allowed(*args: Any) -> Any:
        torch.cuda.set_sync_debug_mode(0)
        try:
            return read(*args)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    loop._read_once = allowed  # type: ignore[assignment]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
        loop._read_once = read  # type: ignore[assignment]


def cuda_step_setup(model: nn.Module) -> tuple[Any, Any, LoopConfig, DistInfo]:
    device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=100)
    config = LoopConfig(2, {"laion": 1.0, "mmc4": 0.5}, 1.0, "amp_bf16")
    return optimizer, scheduler, config, DistInfo(0, 1, 0, 1, device, "nccl")


def window() -> list[dict[str, B]]:
    return [{"laion": host_batch(4, 12, 1), "mmc4": host_batch(2, 20, 3)} for _ in range(2)]


@gpu
def test_the_step_syncs_only_in_its_one_read(request: pytest.FixtureRequest) -> None:
    model = Probe()
    optimizer, scheduler, config, info = cuda_step_setup(model)
    assert is_fused(optimizer)
    optimizer_step(model, window(), optimizer, scheduler, config, info, "none")  # counts FLOPs
    batches, more = window(), window()  # page-locking allocates: before the syncs raise
    request.getfixturevalue("sync_errors")
    result = optimizer_step(model, batches, optimizer, scheduler, config, info, "none")
    assert not result.skipped and math.isfinite(result.grad_norm)
    model.scale = math.inf
    skipped = optimizer_step(model, more, optimizer, scheduler, config, info, "none")
    assert skipped.skipped


def flamingo_step_batch(texts: list[str]) -> tuple[nn.Module, B]:
    """The tiny Flamingo model and a batch of `texts`, right-padded, padding not a target."""
    from flamingo_cli.data.labels import IGNORE
    from flamingo_cli.model.factory import tiny_lm
    from tests.model_util import tokenizer_and_ids, wrap

    model = wrap(tiny_lm()).train()
    tokenizer, _ = tokenizer_and_ids()
    encoded = tokenizer(texts, padding="longest", return_tensors="pt")
    ids, mask = encoded.input_ids, encoded.attention_mask
    labels = ids.masked_fill(mask == 0, IGNORE)
    return model, B(torch.randn(len(texts), 2, 3, 32, 32), ids, mask, labels)


@gpu
def test_the_flamingo_step_on_unpadded_batches_syncs_only_in_its_one_read(
    request: pytest.FixtureRequest,
) -> None:
    """Which images to encode and whether the LM needs a mask are decided on the host copies
    (train/loop.py host_view): a batch without padding runs the whole step without a read."""
    texts = ["<image>a red cat<|endofchunk|>", "<image>a dog<|endofchunk|><image>"]
    model, batch = flamingo_step_batch(texts)
    assert bool(batch.attention_mask.all())
    optimizer, scheduler, config, info = cuda_step_setup(model)
    config.images_used = model.images_used  # type: ignore[attr-defined]
    optimizer_step(model, [{"mmc4": batch}], optimizer, scheduler, config, info, "none")
    request.getfixturevalue("sync_errors")
    optimizer_step(model, [{"mmc4": batch}], optimizer, scheduler, config, info, "none")


@gpu
def test_the_flamingo_step_on_padded_batches_syncs_only_in_its_one_read(
    request: pytest.FixtureRequest,
) -> None:
    """Right padding that is no target reaches the LM with no mask (transformers' SDPA mask
    building would ask the device whether the mask is all ones)."""
    texts = ["<image>a cat<|endofchunk|></s>", "<image>a red<|endofchunk|><image>dog</s>"]
    model, batch = flamingo_step_batch(texts)
    assert not bool(batch.attention_mask.all())
    optimizer, scheduler, config, info = cuda_step_setup(model)
    config.images_used = model.images_used  # type: ignore[attr-defined]
    optimizer_step(model, [{"mmc4": batch}], optimizer, scheduler, config, info, "none")
    request.getfixturevalue("sync_errors")
    optimizer_step(model, [{"mmc4": batch}], optimizer, scheduler, config, info, "none")


@gpu
def test_fused_adamw_skips_a_non_finite_step_on_the_gpu() -> None:
    model = Probe()
    optimizer, scheduler, config, info = cuda_step_setup(model)
    optimizer_step(model, window(), optimizer, scheduler, config, info, "none")
    before = [p.detach().clone() for p in model.parameters()]
    moments = [v.clone() for s in optimizer.state.values() for v in s.values()]
    model.scale = math.inf
    assert optimizer_step(model, window(), optimizer, scheduler, config, info, "none").skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    after = [v for s in optimizer.state.values() for v in s.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, after, strict=True))


@gpu
@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
def test_cross_attention_and_perceiver_run_on_fused_kernels(backend: SDPBackend) -> None:
    """With only one fused kernel allowed, SDPA raises when the inputs (a mask, a layout) rule
    it out: the routed cross-attention and the perceiver pass no mask."""
    from flamingo_cli.model.layers import MaskedCrossAttention, PerceiverAttention

    device = torch.device("cuda")
    cross = MaskedCrossAttention(dim=256, dim_visual=128, heads=4, dim_head=64)
    perceiver = PerceiverAttention(dim=128, heads=4, dim_head=64)
    cross.to(device, torch.bfloat16)
    perceiver.to(device, torch.bfloat16)
    x = torch.randn(2, 40, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    media = torch.randn(2, 3, 16, 128, device=device, dtype=torch.bfloat16)
    index = torch.tensor([[0] * 5 + [1] * 15 + [2] * 10 + [3] * 10] * 2, device=device)
    tokens = torch.randn(6, 50, 128, device=device, dtype=torch.bfloat16)
    with sdpa_kernel([backend]):
        cross(x, media, index).sum().backward()
        perceiver(tokens, media.flatten(0, 1)).sum().backward()
    assert x.grad is not None and bool(x.grad.isfinite().all())


@gpu
def test_tf32_for_reduced_precision_runs_on_a_gpu() -> None:
    device = torch.device("cuda")
    try:
        assert not use_tf32("fp32", device)
        assert torch.get_float32_matmul_precision() == "highest"
        assert use_tf32("bf16", device)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_no_tf32_on_a_cpu() -> None:
    assert not use_tf32("bf16", torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == "highest"


def test_loaders_page_lock_their_batches_on_a_gpu_machine_only() -> None:
    from torch.utils.data import IterableDataset

    from flamingo_cli.data.pipeline import worker_loader

    class Stream(IterableDataset[torch.Tensor]):
        def __iter__(self) -> Iterator[torch.Tensor]:
            yield torch.ones(2, 3)

    loader = worker_loader(Stream(), workers=0, prefetch_factor=2)
    assert loader.pin_memory is CUDA
    assert next(iter(loader)).is_pinned() is CUDA


def test_attention_hands_sdpa_no_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps the fused kernels open on a GPU, checked on any machine: the cross-attention
    and the perceiver call SDPA with 4-D inputs and no mask (flash attention takes none)."""
    import torch.nn.functional as F

    from flamingo_cli.model import layers
    from flamingo_cli.model.layers import MaskedCrossAttention, PerceiverAttention

    calls: list[tuple[int, bool]] = []
    real = F.scaled_dot_product_attention

    def recorded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
        calls.append((q.ndim, kwargs.get("attn_mask") is not None))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recorded)
    cross = MaskedCrossAttention(dim=16, dim_visual=8, heads=2, dim_head=4)
    index = torch.tensor([[0, 1, 1, 2], [2, 2, 1, 0]])
    cross(torch.randn(2, 4, 16), torch.randn(2, 2, 3, 8), index)
    PerceiverAttention(dim=8, heads=2, dim_head=4)(torch.randn(4, 5, 8), torch.randn(4, 3, 8))
    assert calls == [(4, False), (4, False)]


def _lm_attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """(mask given, causal) of each SDPA call the LM makes through transformers."""
    from transformers.integrations import sdpa_attention

    calls: list[tuple[bool, bool]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recorded(*args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_code is sdpa_attention.sdpa_attention_forward.__code__:
            calls.append((kwargs.get("attn_mask") is not None, bool(kwargs.get("is_causal"))))
        return real(*args, **kwargs)

    monkeypatch.setattr(
        sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", recorded
    )
    return calls


def test_a_right_padded_batch_runs_the_lm_causal_and_unmasked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The step's forward on a right-padded batch (padding no target) hands every self-attention
    of the LM no mask and `is_causal`: the form flash attention takes (docs/formats.md §12)."""
    texts = ["<image>a cat<|endofchunk|></s>", "<image>a red<|endofchunk|><image>dog</s>"]
    model, batch = flamingo_step_batch(texts)
    assert not bool(batch.attention_mask.all())
    config = LoopConfig(1, {"mmc4": 1.0}, 1.0, "fp32")
    calls = _lm_attention_calls(monkeypatch)
    loop._forward(model, batch, config, DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo"), "none")
    layers = model.lm.config.num_hidden_layers  # type: ignore[union-attr]
    assert calls == [(False, True)] * layers


@gpu
def test_a_right_padded_step_runs_the_lm_on_flash_attention() -> None:
    """With only flash attention allowed, a mask handed to the LM would make SDPA raise."""
    texts = ["<image>a cat<|endofchunk|></s>", "<image>a red<|endofchunk|><image>dog</s>"]
    model, batch = flamingo_step_batch(texts)
    _, _, config, info = cuda_step_setup(model)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loop._forward(model, batch, config, info, "none").loss.backward()
