"""Which parameters train, which embedding rows may change, and what a checkpoint keeps (5.7)."""

from __future__ import annotations

import torch
from torch import Tensor

from flamingo_cli.model.flamingo import FlamingoModel


def set_trainable(
    model: FlamingoModel, *, freeze_lm_embeddings: bool = False, train_backbones: bool = False
) -> None:
    """OpenFlamingo's trainable set: perceiver, cross-attention blocks and the LM input
    embeddings unless frozen; everything else frozen. `train_backbones` trains everything
    (for the tiny CPU quickstart, where the random backbones must learn too)."""
    model.requires_grad_(train_backbones)
    if train_backbones:
        return
    model.perceiver.requires_grad_(True)
    for block in model.cross_attention_blocks():
        block.requires_grad_(True)
    if not freeze_lm_embeddings:
        model.input_embeddings().requires_grad_(True)


def trainable_embedding_rows(model: FlamingoModel) -> list[int]:
    """Rows of the input embeddings that training may change: `<|endofchunk|>` and `<image>`."""
    return [model.special_tokens.endofchunk, model.special_tokens.image]


def embedding_grad_mask(model: FlamingoModel) -> Tensor | None:
    """(vocab, 1) float mask for the input embedding gradient: 1 on the rows that may change,
    0 elsewhere; multiply the gradient by it after backward (OF zeroes the other rows). None
    when there is nothing to mask: embeddings frozen, or every parameter trains."""
    weight = model.input_embeddings().weight
    if not weight.requires_grad:
        return None
    if all(p.requires_grad for p in model.parameters()):
        return None
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[trainable_embedding_rows(model)] = 1
    return mask


def checkpoint_parameter_names(model: FlamingoModel) -> set[str]:
    """Names (as in `model.named_parameters()`) a checkpoint must keep: the trainable ones and
    the input and output embeddings, always (their added rows must survive even when frozen)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    embeddings = [model.input_embeddings().weight]
    head = model.output_embeddings()
    head_weight = getattr(head, "weight", None)
    if isinstance(head_weight, torch.nn.Parameter):
        embeddings.append(head_weight)
    for name, p in model.named_parameters():
        if any(p is e for e in embeddings):
            names.add(name)
    return names
