"""Helpers shared by the model tests: tiny parts, a Flamingo around any LM, a mixed batch."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flamingo_cli.model.factory import TINY_FLAMINGO, TINY_VISION, build_vision_encoder
from flamingo_cli.model.flamingo import FlamingoConfig, FlamingoModel
from flamingo_cli.model.lm import resize_embeddings
from flamingo_cli.model.params import checkpoint_parameter_names
from flamingo_cli.model.tokenizer import TINY_TOKENIZER, SpecialTokens, load_tokenizer

if TYPE_CHECKING:
    from flamingo_cli.train.export import ExportPaths

TEXTS = [
    "We the people<image>a red square<|endofchunk|><image>a blue one<|endofchunk|></s>",
    "<image>a cat<|endofchunk|></s>",
    "Four score and seven<image>years ago<|endofchunk|>",
]


@cache
def _vision() -> tuple[nn.Module, int]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vision, _, width = build_vision_encoder(TINY_VISION, None)
    return vision.eval(), width


@cache
def tokenizer_and_ids() -> tuple[Any, SpecialTokens]:
    return load_tokenizer(TINY_TOKENIZER)


def wrap(lm: nn.Module, every_n: int = 1, config: FlamingoConfig = TINY_FLAMINGO) -> FlamingoModel:
    """A Flamingo model around `lm` (embeddings resized to the tiny tokenizer first)."""
    tokenizer, special = tokenizer_and_ids()
    resize_embeddings(lm, len(tokenizer))
    vision, width = _vision()
    layout = FlamingoConfig(**{**config.__dict__, "cross_attn_every_n_layers": every_n})
    return FlamingoModel(copy.deepcopy(vision), lm, special, vision_dim=width, config=layout).eval()


def batch(texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 2, 3, 32, 32), right-padded ids and mask; text before images, padding."""
    tokenizer, _ = tokenizer_and_ids()
    encoded = tokenizer(texts or TEXTS, padding="longest", return_tensors="pt")
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(encoded.input_ids.shape[0], 2, 3, 32, 32, generator=generator)
    images[1, 1] = 0
    images[2, 1] = 0
    return images, encoded.input_ids, encoded.attention_mask


def open_gates(model: FlamingoModel, value: float = 1.0) -> None:
    """Non-zero gates, so the cross-attention blocks change the LM's output."""
    with torch.no_grad():
        for block in model.cross_attention_blocks():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def export(model: FlamingoModel, run_dir: Path) -> ExportPaths:
    """`flamingo.pt` and OpenFlamingo's `checkpoint.pt` of `model` under `run_dir/export/`,
    written as a finished training run writes them (one process)."""
    from flamingo_cli.runtime.distributed import DistInfo
    from flamingo_cli.train.export import export_weights

    one = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    paths = export_weights(model, checkpoint_parameter_names(model), run_dir, one)
    assert paths is not None
    return paths
