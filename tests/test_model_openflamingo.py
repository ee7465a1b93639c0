"""Our model against OpenFlamingo 2.0.1's own code: same weights both ways, same logits."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.factory import (
    TINY_VISION,
    assemble,
    build_lm,
    build_vision_encoder,
    register_tiny_vision,
    tiny_lm,
)
from flamingo_cli.model.flamingo import FlamingoConfig, FlamingoModel
from flamingo_cli.model.openflamingo import load_openflamingo_state_dict, to_openflamingo_key
from flamingo_cli.model.params import set_trainable
from flamingo_cli.model.tokenizer import TINY_TOKENIZER, load_tokenizer
from flamingo_cli.runtime.weights import load_weights
from tests.model_util import export

of_factory = pytest.importorskip("open_flamingo.src.factory")
of_train_utils = pytest.importorskip("open_flamingo.train.train_utils")

pytestmark = pytest.mark.slow
EVERY_N = 2


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with fixed random weights, saved so OpenFlamingo can load it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm")
    tiny_lm().save_pretrained(path)
    return path


def _openflamingo(lm_dir: Path) -> Any:
    register_tiny_vision()
    with contextlib.redirect_stdout(io.StringIO()):
        model, _, _ = of_factory.create_model_and_transforms(
            TINY_VISION,
            None,
            str(lm_dir),
            str(TINY_TOKENIZER),
            cross_attn_every_n_layers=EVERY_N,
            use_local_files=True,
        )
    return model.eval()


def _ours(lm_dir: Path) -> FlamingoModel:
    vision, _, width = build_vision_encoder(TINY_VISION, None)
    tokenizer, special = load_tokenizer(TINY_TOKENIZER)
    model = assemble(
        vision,
        width,
        build_lm(lm_dir),
        tokenizer,
        special,
        FlamingoConfig(cross_attn_every_n_layers=EVERY_N),
    )
    set_trainable(model)
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text before the first image, three images in one sample, padding on the right."""
    tokenizer, _ = load_tokenizer(TINY_TOKENIZER)
    texts = [
        "We the people<image>a red square<|endofchunk|><image>a blue one<|endofchunk|>"
        "<image>and green<|endofchunk|></s>",
        "<image>a cat<|endofchunk|></s>",
        "Four score and seven<image>years ago<|endofchunk|><image>our fathers",
    ]
    encoded = tokenizer(texts, padding="longest", return_tensors="pt")
    torch.manual_seed(1)
    images = torch.randn(3, 3, 3, 32, 32)
    images[1, 1:] = 0  # zero-padded image slots
    images[2, 2:] = 0
    return images, encoded.input_ids, encoded.attention_mask


def _randomize_flamingo_layers(module: torch.nn.Module, seed: int) -> None:
    """Non-zero gates and fresh weights, so cross-attention changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            elif "perceiver" in name or "gated_cross_attn" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _logits_pair(ours: FlamingoModel, theirs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images, ids, mask = _batch()
    with torch.no_grad():
        a = ours(images, ids, mask).logits
        b = theirs(images.unsqueeze(2), ids, attention_mask=mask).logits
    return a, b


def test_openflamingo_weights_give_equal_logits(lm_dir: Path, tmp_path: Path) -> None:
    theirs, ours = _openflamingo(lm_dir), _ours(lm_dir)
    _randomize_flamingo_layers(theirs, seed=2)
    # full state dict (with OF's duplicate module lists): backbones and Flamingo layers
    report = load_openflamingo_state_dict(ours, theirs.state_dict())
    assert report.unexpected == []
    a, b = _logits_pair(ours, theirs)
    assert not torch.isnan(a).any()
    assert _rel_error(a, b) < 1e-5
    # cross-attention matters here: the bare LM disagrees
    _, ids, mask = _batch()
    with torch.no_grad(), ours._conditioned(None, ours.media_index(ids)):
        text_only = ours.lm(input_ids=ids, attention_mask=mask).logits
    assert (text_only - b).abs().max() > 100 * (a - b).abs().max() + 1e-6

    # a checkpoint written by OpenFlamingo's own filter (trainable + embeddings), new values
    _randomize_flamingo_layers(theirs, seed=3)
    path = tmp_path / "checkpoint.pt"
    state = of_train_utils.filter_state_dict_to_trainable(theirs, theirs.state_dict())
    assert not any(k.startswith("vision_encoder") for k in state)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    assert load_weights(ours, path) == "OpenFlamingo checkpoint"
    a, b = _logits_pair(ours, theirs)
    assert _rel_error(a, b) < 1e-5


def test_our_checkpoint_loads_into_openflamingo(lm_dir: Path, tmp_path: Path) -> None:
    theirs, ours = _openflamingo(lm_dir), _ours(lm_dir)
    # same backbones first (frozen weights are not part of a checkpoint)
    load_openflamingo_state_dict(ours, theirs.state_dict())
    _randomize_flamingo_layers(ours, seed=4)
    path = export(ours, tmp_path).openflamingo  # as a training run writes it
    saved = torch.load(path, weights_only=True)
    assert "perceiver.layers.0.0.to_q.weight" in saved
    assert "lang_encoder.model.layers.1.gated_cross_attn_layer.ff.3.weight" in saved
    assert "lang_encoder.model.embed_tokens.weight" in saved
    assert not any("layers.0.gated_cross_attn" in k for k in saved)  # (0 + 1) % 2 != 0
    result = theirs.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == []
    a, b = _logits_pair(ours, theirs)
    assert _rel_error(a, b) < 1e-5
    # and the full export is exactly OpenFlamingo's own state dict layout
    full = {to_openflamingo_key(k) for k in ours.state_dict()}
    expected = {
        k
        for k in theirs.state_dict()
        if "old_decoder_blocks" not in k and "gated_cross_attn_layers" not in k
    }
    assert set(full) == expected


def test_checkpoint_of_another_layout_is_refused(lm_dir: Path) -> None:
    theirs = _openflamingo(lm_dir)
    vision, _, width = build_vision_encoder(TINY_VISION, None)
    tokenizer, special = load_tokenizer(TINY_TOKENIZER)
    every_layer = assemble(vision, width, build_lm(lm_dir), tokenizer, special, FlamingoConfig())
    with pytest.raises(FlamingoError, match="does not fit this model"):
        load_openflamingo_state_dict(every_layer, theirs.state_dict())
