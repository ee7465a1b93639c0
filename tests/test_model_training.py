"""The factory, the trainable set, gradient masks, checkpoint contents and round trips."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.factory import build_model
from flamingo_cli.model.flamingo import FlamingoModel
from flamingo_cli.model.params import (
    checkpoint_parameter_names,
    embedding_grad_mask,
    set_trainable,
)
from flamingo_cli.model.tokenizer import TINY_TOKENIZER
from flamingo_cli.recipe.schema import ModelConfig
from flamingo_cli.runtime.weights import load_weights
from tests.model_util import batch, export, open_gates, wrap

TINY = ModelConfig(preset="tiny")


@pytest.fixture(scope="module")
def tiny() -> FlamingoModel:
    model, _, _, _ = build_model(TINY)
    return model.eval()


def _flamingo_layer(name: str) -> bool:
    return name.startswith("perceiver.") or ".gated_cross_attn." in name


def test_tiny_preset_builds_offline_with_its_transform_and_tokens() -> None:
    model, transform, tokenizer, special = build_model(TINY)
    assert (special.endofchunk, special.image, special.pad, special.eos) == (512, 513, 514, 2)
    assert len(tokenizer) == 515 == model.input_embeddings().weight.shape[0]
    pixels = transform(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert pixels.shape == (3, 32, 32)
    assert model.decoder_layers_path == "model.layers"
    assert len(model.cross_attention_blocks()) == 4
    # the same seed builds the same model; the global RNG is left alone
    before = torch.random.get_rng_state()
    again, _, _, _ = build_model(TINY)
    assert torch.equal(torch.random.get_rng_state(), before)
    theirs = again.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_trainable_set_is_openflamingos(tiny: FlamingoModel) -> None:
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    layers = {n for n, _ in tiny.named_parameters() if _flamingo_layer(n)}
    assert trainable == layers | {"lm.model.embed_tokens.weight"}
    assert checkpoint_parameter_names(tiny) == trainable | {"lm.lm_head.weight"}

    frozen, _, _, _ = build_model(ModelConfig(preset="tiny", freeze_lm_embeddings=True))
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == layers
    assert embedding_grad_mask(frozen) is None
    # embeddings are kept even when frozen: the added rows must survive
    assert "lm.model.embed_tokens.weight" in checkpoint_parameter_names(frozen)

    everything, _, _, _ = build_model(ModelConfig(preset="tiny", train_backbones=True))
    assert all(p.requires_grad for p in everything.parameters())
    assert embedding_grad_mask(everything) is None
    assert checkpoint_parameter_names(everything) == {n for n, _ in everything.named_parameters()}


def _backward(model: FlamingoModel) -> None:
    images, ids, mask = batch()
    open_gates(model, 0.3)
    model(images, ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_reaches_only_allowed_parameters_and_rows(family: str) -> None:
    if family == "llama":
        model, _, _, special = build_model(TINY)
    else:  # tied input and output embeddings
        config = AutoConfig.for_model(
            "gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
        )
        model = wrap(AutoModelForCausalLM.from_config(config))
        set_trainable(model)
        special = model.special_tokens
    _backward(model)
    allowed = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == allowed
    assert all(bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters() if n in allowed)  # type: ignore[union-attr]

    grad = model.input_embeddings().weight.grad
    assert grad is not None
    rows = [special.endofchunk, special.image]
    others = torch.ones(grad.shape[0], dtype=torch.bool)
    others[rows] = False
    assert grad[others].abs().sum() > 0  # text rows get gradient before masking
    mask = embedding_grad_mask(model)  # what the trainer multiplies the gradient by
    assert mask is not None
    grad.mul_(mask)
    assert torch.equal(grad[others], torch.zeros_like(grad[others]))
    assert (grad[rows].abs().sum(dim=1) > 0).all()


def test_openflamingo_checkpoint_round_trip(tiny: FlamingoModel, tmp_path: Path) -> None:
    trained, _, _, _ = build_model(TINY)
    open_gates(trained, 0.7)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    path = export(trained, tmp_path).openflamingo
    fresh, _, _, _ = build_model(TINY)
    assert load_weights(fresh, path) == "OpenFlamingo checkpoint"
    kept = checkpoint_parameter_names(fresh)
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items() if k in kept)
    images, ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(
            fresh.eval()(images, ids, mask).logits, trained.eval()(images, ids, mask).logits
        )


def test_bad_checkpoint_files_are_clear_errors(tiny: FlamingoModel, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FlamingoError, match="cannot read"):
        load_weights(tiny, junk)


@pytest.mark.slow
def test_named_architecture_and_local_lm_build_offline(tmp_path: Path) -> None:
    """A real open_clip architecture without weights, an LM directory, OpenFlamingo's sizes."""
    config = AutoConfig.for_model(
        "gpt2", vocab_size=512, n_embd=64, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")
    recipe = ModelConfig(
        vision_encoder="ViT-B-32",
        vision_pretrained=None,
        lm_path=str(tmp_path / "lm"),
        tokenizer_path=str(TINY_TOKENIZER),
        cross_attn_every_n_layers=2,
    )
    model, transform, _, _ = build_model(recipe)
    perceiver = model.perceiver
    assert len(perceiver.layers) == 6 and perceiver.latents.shape == (64, 768)
    attn = model.cross_attention_blocks()[0].attn
    assert attn.heads == 8 and attn.q_proj.out_features == 512
    assert [i for i, la in enumerate(model.decoder_layers) if la.gated_cross_attn] == [1, 3]
    assert transform(Image.new("RGB", (300, 200))).shape == (3, 224, 224)


@pytest.mark.slow
def test_user_errors_are_flamingo_errors_without_network(tmp_path: Path) -> None:
    with pytest.raises(FlamingoError, match="unknown open_clip vision encoder 'ViT-Q-99'"):
        build_model(ModelConfig(vision_encoder="ViT-Q-99", lm_path=str(tmp_path)))
    with pytest.raises(FlamingoError, match="cannot load language model"):
        build_model(
            ModelConfig(
                vision_encoder="flamingo-tiny-vit",
                vision_pretrained=None,
                lm_path=str(tmp_path / "nope"),
            )
        )
    start = time.monotonic()
    with pytest.raises(FlamingoError, match="cannot load open_clip 'ViT-B-32'"):
        build_model(ModelConfig(vision_encoder="ViT-B-32", vision_pretrained="openai", lm_path="x"))
    assert time.monotonic() - start < 30  # HF_HUB_OFFLINE: no waiting for the network


def _loss_and_grads(model: FlamingoModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, ids, mask = batch()
    loss = model(images, ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_activation_checkpointing_changes_nothing_but_memory() -> None:
    plain, _, _, _ = build_model(TINY)
    recomputed, _, _, _ = build_model(ModelConfig(preset="tiny", gradient_checkpointing=True))
    for model in (plain, recomputed):
        open_gates(model, 0.4)
        model.train()
    assert recomputed.perceiver.activation_checkpointing
    assert all(layer.activation_checkpointing for layer in recomputed.decoder_layers)
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(recomputed)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], msg=name)


@pytest.mark.slow
def test_fsdp2_shards_the_listed_units(tmp_path: Path) -> None:
    """fully_shard on each unit then the root (one process) gives the same loss and grads."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        sharded, _, _, _ = build_model(TINY)
        reference, _, _, _ = build_model(TINY)
        units = sharded.shard_units()
        assert units[-len(sharded.decoder_layers) :] == sharded.decoder_layers
        assert sharded.perceiver in units
        for model in (sharded, reference):
            open_gates(model, 0.4)
        for unit in units:
            fully_shard(unit)
        fully_shard(sharded)
        loss_a, grads_a = _loss_and_grads(sharded)
        loss_b, grads_b = _loss_and_grads(reference)
        torch.testing.assert_close(loss_a, loss_b)
        for name, grad in grads_b.items():
            full = grads_a[name]
            full = full.full_tensor() if hasattr(full, "full_tensor") else full
            torch.testing.assert_close(full, grad, msg=name)
    finally:
        dist.barrier()
        dist.destroy_process_group()
