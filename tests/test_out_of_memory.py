"""Running out of memory is a message naming what ran out and what to lower, not a traceback
(docs/formats.md §12): the training step per dataset, `generate`'s decoding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flamingo_cli.errors import DeviceOutOfMemory
from flamingo_cli.runtime.memory import memory_named
from flamingo_cli.train.loop import optimizer_step

from .test_generate_cli import _run, trained  # noqa: F401  (the module's fixture)
from .test_step_sync import CPU, Probe, setup, window

CUDA_SAYS = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"


def test_running_out_names_the_work_and_the_fix() -> None:
    cpu = torch.device("cpu")
    with (
        pytest.raises(DeviceOutOfMemory) as caught,
        memory_named("decoding 4 prompts", "lower --batch-size", cpu),
    ):
        raise torch.OutOfMemoryError(CUDA_SAYS + "\nmore detail")
    assert caught.value.message == f"cpu ran out of memory decoding 4 prompts ({CUDA_SAYS})"
    assert caught.value.fix == "lower --batch-size"
    with (
        pytest.raises(DeviceOutOfMemory, match="can't allocate memory"),
        memory_named("x", "y", cpu),
    ):
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 GB")
    # other errors pass through
    with pytest.raises(RuntimeError, match="shape mismatch"), memory_named("x", "y", cpu):
        raise RuntimeError("shape mismatch")


class RunsOutOnDocuments(Probe):
    """The probe model, out of memory on batches of more than one image slot."""

    def forward(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if images.shape[1] > 1:
            raise torch.OutOfMemoryError(CUDA_SAYS)
        return super().forward(images, *args, **kwargs)


def test_a_step_out_of_memory_names_the_dataset_its_batch_and_the_settings() -> None:
    model = RunsOutOnDocuments()
    optimizer, scheduler, config = setup(model)
    batches = window()
    for named in batches:
        mmc4 = named["mmc4"]
        mmc4.images = mmc4.images.expand(-1, 3, -1).contiguous()
    with pytest.raises(DeviceOutOfMemory) as caught:
        optimizer_step(model, batches, optimizer, scheduler, config, CPU, "none")
    assert caught.value.message == (
        "cpu ran out of memory in the forward and backward of data.mmc4 on rank 0 (a batch of "
        f"1 samples x 8 tokens, 3 image(s) each) ({CUDA_SAYS})"
    )
    assert caught.value.fix == (
        "lower data.mmc4.batch_size (raise optim.gradient_accumulation_steps to keep the global "
        "batch), or set model.gradient_checkpointing = true"
    )


def test_generate_out_of_memory_exits_1_with_the_fix(
    trained: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flamingo_cli.model import generation

    def runs_out(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError(CUDA_SAYS)

    monkeypatch.setattr(generation, "generate", runs_out)
    image = trained["images"]["red"]
    result = _run(
        "--checkpoint", str(trained["flamingo"]), "--task", "caption", "--image", str(image)
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "ran out of memory decoding a prompt of" in result.stderr
    assert "lower --num-beams or --max-new-tokens" in result.stderr


def test_eval_loss_out_of_memory_names_the_batch_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from flamingo_cli.evaluate.loss import _Forward
    from flamingo_cli.runtime.precision import autocast_for

    class RunsOut(torch.nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise torch.OutOfMemoryError(CUDA_SAYS)

    forward = _Forward(RunsOut(), CPU, lambda: autocast_for("fp32", CPU.device, "none"), None, 0)
    batch = SimpleNamespace(
        input_ids=torch.ones(2, 6, dtype=torch.long),
        attention_mask=torch.ones(2, 6, dtype=torch.long),
        labels=torch.ones(2, 6, dtype=torch.long),
        images=torch.zeros(2, 3, 3, 8, 8),
    )
    with pytest.raises(DeviceOutOfMemory) as caught:
        forward.loss(batch, batch.images)  # type: ignore[arg-type]
    assert caught.value.message == (
        f"cpu ran out of memory evaluating a batch of 2 samples x 6 tokens, 3 image(s) each "
        f"({CUDA_SAYS})"
    )
    assert caught.value.fix == (
        "give eval-loss a lower --batch-size (during training: data.NAME.batch_size)"
    )
