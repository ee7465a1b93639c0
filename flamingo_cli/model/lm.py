"""Gated cross-attention inside a Hugging Face causal LM, through explicit wrapper modules.

The decoder layer list is found by inspecting the model (no table of class names), and each
layer is replaced in that list by a `FlamingoDecoderLayer` holding the original layer and,
every n layers, a gated cross-attention block. No class is changed at run time: the LM's own
forward runs unchanged and calls the wrappers as it would call its layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.layers import GatedCrossAttention, TokenRouting

SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, OPT, MPT, GPT-J, Phi"
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


@dataclass
class MediaState:
    """What the wrapped layers read during one call of the LM: image latents and, per token,
    the 1-based number of the image it attends to (0: none). Set by the Flamingo model."""

    latents: Tensor | None = None
    media_index: Tensor | None = None
    routing: TokenRouting | None = None
    active: bool = False
    # per cross-attention block, its keys and values of `latents` (decoding: computed once)
    keys_values: dict[nn.Module, tuple[Tensor, Tensor]] | None = None


class FlamingoDecoderLayer(nn.Module):
    """A decoder layer with an optional gated cross-attention block applied before it.

    Positional and keyword arguments go to the original layer untouched, and its output (a
    Tensor in most transformers 5 models, a tuple in MPT and GPT-J) is returned as is.
    """

    def __init__(
        self,
        decoder_layer: nn.Module,
        gated_cross_attn: GatedCrossAttention | None,
        media: MediaState,
    ) -> None:
        super().__init__()
        self.decoder_layer = decoder_layer
        self.gated_cross_attn = gated_cross_attn
        self.media = media
        self.activation_checkpointing = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.gated_cross_attn is not None:
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = self._cross_attend(kwargs["hidden_states"])
            else:
                args = (self._cross_attend(args[0]), *args[1:])
        return self.decoder_layer(*args, **kwargs)

    def _cross_attend(self, hidden: Tensor) -> Tensor:
        media = self.media
        if not media.active or media.media_index is None:
            raise RuntimeError(
                "the Flamingo layers have no media: call the Flamingo model, not its LM directly"
            )
        if media.media_index.shape != hidden.shape[:2]:
            raise RuntimeError(
                f"media index of shape {tuple(media.media_index.shape)} for hidden states of "
                f"shape {tuple(hidden.shape)}"
            )
        assert self.gated_cross_attn is not None
        index = media.media_index if media.routing is None else media.routing
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            out: Tensor = checkpoint(
                self.gated_cross_attn, hidden, media.latents, index, use_reentrant=False
            )
            return out
        cached = media.keys_values.get(self.gated_cross_attn) if media.keys_values else None
        result: Tensor = self.gated_cross_attn(hidden, media.latents, index, cached)
        return result


def _layer_count(lm: nn.Module) -> int | None:
    config = getattr(lm, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """The LM's list of decoder layers and its dotted path, found by inspection.

    Candidates are module lists of identical modules; with a layer count in the config, only
    lists of that length qualify; the one holding the most parameters wins.
    """
    expected = _layer_count(lm)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in lm.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(type(child) is not type(module[0]) for child in module):
            continue
        if expected is not None and len(module) != expected:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        counted = f" of {expected} layers" if expected is not None else ""
        raise FlamingoError(
            f"cannot find the decoder layer list{counted} in {type(lm).__name__}",
            fix=f"use a causal LM whose decoder layers form an nn.ModuleList ({SUPPORTED_FAMILIES})",
        )
    if isinstance(best[2][0], FlamingoDecoderLayer):
        raise FlamingoError(f"{type(lm).__name__} already has Flamingo layers")
    return best[1], best[2]


def insert_cross_attention(
    lm: nn.Module,
    make_block: Callable[[], GatedCrossAttention],
    every_n_layers: int,
    media: MediaState,
) -> tuple[str, nn.ModuleList]:
    """Wrap every decoder layer of `lm` in place; layer i (0-based) gets a block from
    `make_block()` exactly when `(i + 1) % every_n_layers == 0`. Returns the list and its path."""
    path, layers = find_decoder_layers(lm)
    for i, layer in enumerate(layers):
        block = make_block() if (i + 1) % every_n_layers == 0 else None
        layers[i] = FlamingoDecoderLayer(layer, block, media)
    return path, layers


def input_embeddings(lm: nn.Module) -> nn.Embedding:
    """The LM's token embedding table: Hugging Face `get_input_embeddings`, or for models
    whose own code lacks it (OpenFlamingo's MPT-1B) the one embedding of vocabulary size."""
    getter: Any = getattr(lm, "get_input_embeddings", None)
    try:
        embeddings = getter() if getter is not None else None
    except NotImplementedError:
        embeddings = None
    if embeddings is None:
        embeddings = _embedding_by_inspection(lm)[1]
    if not isinstance(embeddings, nn.Embedding):
        raise FlamingoError(
            f"the input embeddings of {type(lm).__name__} are a {type(embeddings).__name__}, "
            "not an nn.Embedding",
            fix=f"use a causal LM of a supported family ({SUPPORTED_FAMILIES})",
        )
    return embeddings


def _embedding_by_inspection(lm: nn.Module) -> tuple[str, nn.Embedding]:
    vocab = getattr(getattr(lm, "config", None), "vocab_size", None)
    found = [
        (name, module)
        for name, module in lm.named_modules()
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab
    ]
    if len(found) != 1:
        raise FlamingoError(
            f"cannot find the token embeddings of {type(lm).__name__}: it has no "
            f"get_input_embeddings() and {len(found)} embeddings of its vocabulary size {vocab}",
            fix=f"use a causal LM of a supported family ({SUPPORTED_FAMILIES})",
        )
    return found[0]


def resize_embeddings(lm: nn.Module, size: int) -> None:
    """Resize the token embeddings to `size` rows, as OpenFlamingo does (also shrinking).

    Hugging Face's `resize_token_embeddings` (which keeps ties) when the model supports it;
    otherwise, for a model without a separate output head, the embedding found by inspection is
    replaced, added rows starting at the mean of the existing ones.
    """
    resize: Any = getattr(lm, "resize_token_embeddings", None)
    if resize is not None:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity(logging.ERROR)  # its notice on mean-initialised rows
        try:
            resize(size)
            return
        except NotImplementedError:
            pass
        finally:
            hf_logging.set_verbosity(verbosity)
    name, old = _embedding_by_inspection(lm)
    if output_embeddings(lm) is not None:
        raise FlamingoError(
            f"cannot resize the embeddings of {type(lm).__name__}: it has an output head but "
            "no resize_token_embeddings()",
            fix=f"use a causal LM of a supported family ({SUPPORTED_FAMILIES})",
        )
    new = nn.Embedding(size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    kept = min(size, old.num_embeddings)
    with torch.no_grad():
        new.weight[:kept] = old.weight[:kept]
        new.weight[kept:] = old.weight.mean(dim=0)
    parent, _, attr = name.rpartition(".")
    setattr(lm.get_submodule(parent), attr, new)
    config: Any = getattr(lm, "config", None)
    if config is not None:
        config.vocab_size = size


def output_embeddings(lm: nn.Module) -> nn.Module | None:
    """The LM head (None when the model has none)."""
    getter = getattr(lm, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return head if isinstance(head, nn.Module) else None
