"""The optimizer step reads the device once, at its end (docs/formats.md §12): losses, token
counts and the gradient norm stay tensors until then, a non-finite step is skipped on the
device by the fused AdamW, and the losses are those the step recorded before the change."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from flamingo_cli.runtime.distributed import DistInfo
from flamingo_cli.train import loop
from flamingo_cli.train.loop import LoopConfig, StepResult, metrics_of, optimizer_step
from flamingo_cli.train.optim import build_optimizer
from flamingo_cli.train.schedule import build_scheduler

from .conftest import RECIPES

CPU = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
GOLDEN = Path(__file__).parent / "data" / "tiny_cpu_losses.jsonl"
# what a tensor turns into a Python value (or a data-dependent shape) through: a host sync on
# a GPU
READS = {"__float__", "__int__", "__bool__", "__index__", "item", "tolist", "nonzero", "numpy"}


@dataclass
class B:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def batch(rows: int, mask: list[list[int]], fill: float = 1.0) -> B:
    ids = torch.ones(rows, len(mask[0]), dtype=torch.long)
    return B(torch.full((rows, 1, 2), fill), ids, torch.tensor(mask), ids.clone())


class Probe(nn.Module):
    """loss = (w . mean image)^2 times `scale`; `scale = inf` gives an infinite gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.5, -0.25]))
        self.scale = 1.0

    def forward(self, images: torch.Tensor, *_: Any, **__: Any) -> SimpleNamespace:
        pixel = images.flatten(1).mean(dim=0).view(-1, 2).mean(dim=0)
        return SimpleNamespace(loss=(self.weight * pixel).sum().pow(2) * self.scale + 1.0)


class CountReads(TorchFunctionMode):
    """The reads made under it, by name, and the function each was made in (`callers`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.callers: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in READS:
            self.reads.append(name)
            self.callers.append(sys._getframe(1).f_code.co_name)
        return func(*args, **(kwargs or {}))


def window() -> list[dict[str, B]]:
    """Two micro-steps of two datasets: 2 pairs of 5 tokens, 1 document of 7, each time."""
    laion = batch(2, [[1, 1, 1, 0], [1, 1, 0, 0]])
    mmc4 = batch(1, [[1, 1, 1, 1, 1, 1, 1, 0]], fill=2.0)
    return [{"laion": laion, "mmc4": mmc4}, {"laion": laion, "mmc4": mmc4}]


def setup(model: nn.Module) -> tuple[torch.optim.Optimizer, Any, LoopConfig]:
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.1, fused=True)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10)
    config = LoopConfig(2, {"laion": 1.0, "mmc4": 0.5}, 1.0, "fp32")
    return optimizer, scheduler, config


@pytest.fixture
def full_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """host_view reads the host batch (free: it is not on a device); take it out of the
    count so that what is left is the step's own reads."""
    monkeypatch.setattr(
        loop, "host_view", lambda batch, config: loop.HostView(batch.input_ids.shape[1], False, {})
    )


@pytest.mark.usefixtures("full_length")
def test_a_fused_step_reads_once_at_its_end() -> None:
    model = Probe()
    optimizer, scheduler, config = setup(model)
    counter = CountReads()
    with counter:
        result = optimizer_step(model, window(), optimizer, scheduler, config, CPU, "none")
    assert counter.reads == ["tolist"]
    assert result.dataset_samples == {"laion": 4, "mmc4": 2}
    assert result.dataset_tokens == {"laion": 10, "mmc4": 14}
    assert (result.samples, result.tokens, result.skipped) == (6, 24, False)
    # loss = (0.5 - 0.25)^2 * pixel^2 + 1: 1.0625 for LAION's pixels of 1, 1.25 for MMC4's 2
    assert result.losses == {"laion": 1.0625, "mmc4": 1.25}
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [p.detach().clone() for p in model.parameters()]
    for entry in optimizer.state.values():
        state.extend(v.clone() for v in entry.values())
    return state


@pytest.mark.usefixtures("full_length")
def test_a_non_finite_step_is_skipped_on_the_device_leaving_adamw_unchanged() -> None:
    skipping, straight = Probe(), Probe()
    runs = {"skipping": (skipping, *setup(skipping)), "straight": (straight, *setup(straight))}

    def step(name: str) -> StepResult:
        model, optimizer, scheduler, config = runs[name]
        return optimizer_step(model, window(), optimizer, scheduler, config, CPU, "none")

    step("skipping")
    before = state_of(skipping, runs["skipping"][1])
    skipping.scale = math.inf
    counter = CountReads()
    with counter:
        bad = step("skipping")
    assert counter.reads == ["tolist"]  # the skip was decided without reading the norm
    assert bad.skipped and not math.isfinite(bad.grad_norm)
    after = state_of(skipping, runs["skipping"][1])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert float(runs["skipping"][1].state[skipping.weight]["step"]) == 1.0
    skipping.scale = 1.0
    step("skipping")
    step("straight")
    step("straight")
    # the skipped step left no trace: the same weights as a run that never had it
    assert torch.equal(skipping.weight, straight.weight)


def test_metrics_have_throughput_per_dataset() -> None:
    result = StepResult(
        losses={"laion": 2.0, "web": 3.0},
        lr=0.1,
        grad_norm=1.5,
        skipped=False,
        samples=12,
        tokens=300,
        data_wait_s=0.5,
        elapsed_s=2.0,
        dataset_samples={"laion": 8, "web": 4},
        dataset_tokens={"laion": 100, "web": 200},
    )
    metrics = metrics_of(result, {"web/too_long": 3})
    assert metrics == {
        "loss/laion": 2.0,
        "loss/web": 3.0,
        "lr": 0.1,
        "grad_norm": 1.5,
        "skipped": 0,
        "samples_per_s": 6.0,
        "tokens_per_s": 150.0,
        "data_wait": 0.25,
        "samples_per_s/laion": 4.0,
        "samples_per_s/web": 2.0,
        "tokens_per_s/laion": 50.0,
        "tokens_per_s/web": 100.0,
        "dropped/web/too_long": 3,
    }


@pytest.mark.slow
def test_the_tiny_recipe_trains_with_the_recorded_losses(tmp_path: Path) -> None:
    """Per-step losses of the bundled tiny recipe as recorded before the one-read step (to 1e-6
    relative: the recording's thread count may add float rounding noise at 1e-7)."""
    from flamingo_cli.recipe.load import load_recipe, parse_override
    from flamingo_cli.train.run import train_rank

    loaded = load_recipe(RECIPES / "tiny-cpu.toml", [parse_override(f"run.output_dir={tmp_path}")])
    train_rank(loaded)
    lines = (tmp_path / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(line) for line in lines]
    want = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert [g["step"] for g in got] == [w["step"] for w in want] == list(range(1, 17))
    for g, w in zip(got, want, strict=True):
        for key in ("loss/laion", "loss/mmc4", "grad_norm", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-12), (g["step"], key)
        # LAION's batch is 8 pairs, MMC4's 4 documents: the step's split of samples/s
        assert g["samples_per_s/laion"] == pytest.approx(2 * g["samples_per_s/mmc4"])
        total = g["samples_per_s/laion"] + g["samples_per_s/mmc4"]
        assert total == pytest.approx(g["samples_per_s"])
        tokens = g["tokens_per_s/laion"] + g["tokens_per_s/mmc4"]
        assert tokens == pytest.approx(g["tokens_per_s"])


def test_cross_attention_reads_nothing_from_the_device() -> None:
    """The routing of tokens to images has no data-dependent shape: no host sync in forward or
    backward, and the same shapes for every batch of one (B, T, N)."""
    from flamingo_cli.model.layers import MaskedCrossAttention, TokenRouting

    torch.manual_seed(0)
    attention = MaskedCrossAttention(dim=8, dim_visual=6, heads=2, dim_head=4)
    x = torch.randn(2, 5, 8, requires_grad=True)
    media = torch.randn(2, 3, 4, 6)
    index = torch.tensor([[0, 1, 1, 2, 2], [1, 1, 3, 3, 3]])
    counter = CountReads()
    with counter:
        routing = TokenRouting.from_media_index(index, images=3)
        attention(x, media, routing).sum().backward()
    assert counter.reads == []
    assert routing.image.shape == routing.valid.shape == (2, 5)
    assert x.grad is not None and bool(x.grad.isfinite().all())


def test_host_decisions_give_the_losses_the_device_would() -> None:
    """The images to encode chosen on the host, and no mask for an unpadded batch, change
    nothing: same loss, same gradients, as the model deciding on its own."""
    from flamingo_cli.model.factory import tiny_lm
    from tests.model_util import open_gates, tokenizer_and_ids, wrap

    torch.manual_seed(0)
    model = wrap(tiny_lm())
    open_gates(model, 0.5)
    tokenizer, _ = tokenizer_and_ids()
    texts = ["<image>a red cat<|endofchunk|>", "<image>a dog<|endofchunk|><image>"]
    encoded = tokenizer(texts, padding="longest", return_tensors="pt")
    assert bool(encoded.attention_mask.all())
    ids = encoded.input_ids
    images = torch.randn(2, 3, 3, 32, 32)  # a third, unused slot in both rows

    def loss_and_grads(**kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(images, ids, labels=ids, **kwargs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    mine = loss_and_grads(images_used=model.images_used(ids, 3))
    theirs = loss_and_grads(attention_mask=encoded.attention_mask)
    assert torch.equal(mine[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(mine[1], theirs[1], strict=True))
    assert model.images_used(ids, 3).tolist() == [[True, False, False], [True, True, False]]


@pytest.mark.parametrize(
    ("mask", "labels", "needed"),
    [
        ([[1, 1, 1], [1, 1, 1]], [[5, 5, 5], [5, 5, 5]], False),  # no padding
        ([[1, 1, 1], [1, 0, 0]], [[5, 5, 5], [5, -100, -100]], False),  # right padding
        ([[1, 1, 1], [0, 1, 1]], [[5, 5, 5], [-100, 5, 5]], True),  # left padding
        ([[1, 1, 1], [1, 0, 1]], [[5, 5, 5], [5, -100, 5]], True),  # a hole
        ([[1, 1, 1], [1, 1, 0]], [[5, 5, 5], [5, 5, 5]], True),  # a padded target
    ],
)
def test_the_lm_gets_a_mask_only_when_its_loss_depends_on_one(
    mask: list[list[int]], labels: list[list[int]], needed: bool
) -> None:
    from flamingo_cli.data.labels import needs_mask

    assert needs_mask(torch.tensor(mask), torch.tensor(labels)) is needed


def padded_flamingo_batch() -> tuple[nn.Module, Any]:
    """The tiny Flamingo model and a right-padded MMC4-like batch, padding not a target."""
    from tests.test_gpu import flamingo_step_batch

    torch.manual_seed(0)
    texts = ["<image>a cat<|endofchunk|></s>", "<image>a red<|endofchunk|><image>dog</s>"]
    model, padded = flamingo_step_batch(texts)
    assert not bool(padded.attention_mask.all())
    return model, padded


def test_right_padding_without_a_mask_gives_the_masked_loss_and_gradients() -> None:
    model, padded = padded_flamingo_batch()
    ids, mask = padded.input_ids, padded.attention_mask

    def loss_and_grads(attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(padded.images, ids, attention_mask, labels=padded.labels).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    masked, unmasked = loss_and_grads(mask), loss_and_grads(None)
    assert len(masked) == len(unmasked) > 1
    for a, b in zip(masked, unmasked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_padded_flamingo_step_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole step through the tiny Flamingo model and transformers' LM, on right-padded
    batches: the one read at its end is all (transformers asks a 2D mask whether it is all
    ones, a read, so the LM must get none)."""
    model, padded = padded_flamingo_batch()
    optimizer, scheduler, config = setup(model)
    config.images_used = model.images_used  # type: ignore[attr-defined]
    optimizer_step(model, [{"mmc4": padded}], optimizer, scheduler, config, CPU, "none")
    view = loop.host_view(padded, config)  # host copies: free on a GPU machine
    assert not view.masked
    monkeypatch.setattr(loop, "host_view", lambda batch, config: view)
    counter = CountReads()
    with counter:
        optimizer_step(model, [{"mmc4": padded}], optimizer, scheduler, config, CPU, "none")
    # encode_referenced decides on the host's images_used (on a GPU machine, no device read)
    device_reads = [
        name
        for name, caller in zip(counter.reads, counter.callers, strict=True)
        if caller != "encode_referenced"
    ]
    assert device_reads == ["tolist"], list(zip(counter.reads, counter.callers, strict=True))
