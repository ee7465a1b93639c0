"""The Flamingo model: open_clip vision tower -> perceiver resampler -> cross-attention in an LM."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from flamingo_cli.model.hf_masks import positions_not_packed
from flamingo_cli.model.layers import GatedCrossAttention, PerceiverResampler, TokenRouting
from flamingo_cli.model.lm import (
    FlamingoDecoderLayer,
    MediaState,
    input_embeddings,
    insert_cross_attention,
    output_embeddings,
)
from flamingo_cli.model.tokenizer import SpecialTokens

if TYPE_CHECKING:
    from flamingo_cli.model.generation import DecodeConfig


@dataclass(frozen=True)
class FlamingoConfig:
    """Sizes of the Flamingo layers; the defaults are OpenFlamingo's (fixed in its code)."""

    cross_attn_every_n_layers: int = 1
    perceiver_depth: int = 6
    perceiver_latents: int = 64
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    ff_mult: int = 4


class FlamingoModel(nn.Module):
    """Vision encoder, perceiver and an LM with gated cross-attention before its decoder layers.

    `images` are (B, N, 3, H, W), zero-padded to N per sample; the k-th `<image>` token of a
    sample uses image k, and each text token sees only the most recent image at or before it.
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        lm: nn.Module,
        special_tokens: SpecialTokens,
        *,
        vision_dim: int,
        config: FlamingoConfig = FlamingoConfig(),
    ) -> None:
        super().__init__()
        self.config = config
        self.special_tokens = special_tokens
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(
            vision_dim,
            depth=config.perceiver_depth,
            num_latents=config.perceiver_latents,
            heads=config.perceiver_heads,
            dim_head=config.perceiver_dim_head,
            ff_mult=config.ff_mult,
        )
        self.lm = lm
        lang_dim = int(input_embeddings(lm).weight.shape[1])
        self._media = MediaState()

        def make_block() -> GatedCrossAttention:
            return GatedCrossAttention(
                lang_dim,
                vision_dim,
                heads=config.cross_attn_heads,
                dim_head=config.cross_attn_dim_head,
                ff_mult=config.ff_mult,
            )

        path, layers = insert_cross_attention(
            lm, make_block, config.cross_attn_every_n_layers, self._media
        )
        self.decoder_layers_path = path
        self._layers = [layer for layer in layers if isinstance(layer, FlamingoDecoderLayer)]

    # -- structure -----------------------------------------------------------------------

    @property
    def decoder_layers(self) -> list[FlamingoDecoderLayer]:
        """The wrapped decoder layers, in order."""
        return list(self._layers)

    def cross_attention_blocks(self) -> list[GatedCrossAttention]:
        return [layer.gated_cross_attn for layer in self._layers if layer.gated_cross_attn]

    def shard_units(self) -> list[nn.Module]:
        """Modules to shard one by one (FSDP2 `fully_shard`), innermost first; the caller then
        shards the root. Vision blocks, the perceiver, each decoder layer with its block.
        `generate` is not `forward`: register it with FSDP2's `register_fsdp_forward_method`."""
        units: list[nn.Module] = []
        transformer = getattr(self.vision_encoder, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        if isinstance(blocks, nn.ModuleList):
            units.extend(blocks)
        units.append(self.perceiver)
        units.extend(self._layers)
        return units

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward: perceiver layers, cross-attention blocks and the
        LM's own decoder layers (through transformers' gradient checkpointing). Use this rather
        than wrapping the shard units from outside: the wrappers read the image latents from
        the model during its forward only, so a recomputation in backward would find none."""
        self.perceiver.activation_checkpointing = enabled
        for layer in self._layers:
            layer.activation_checkpointing = enabled
        lm: Any = self.lm
        if not getattr(lm, "supports_gradient_checkpointing", False):
            return
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
            if enabled:
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                lm.activation_checkpointing_disable()
        elif enabled:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_disable()

    # -- forward -------------------------------------------------------------------------

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, N, 3, H, W) pixels -> (B, N, latents, D) perceiver output."""
        if images.ndim != 5:
            raise ValueError(f"images must be (B, N, 3, H, W), got shape {tuple(images.shape)}")
        batch, count = images.shape[:2]
        train_vision = any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
            _, tokens = self.vision_encoder(images.flatten(0, 1))
        latents: Tensor = self.perceiver(tokens.unflatten(0, (batch, count)))
        return latents

    def images_used(self, input_ids: Tensor, count: int) -> Tensor:
        """(B, N) bool: the image slots some `<image>` token of the row refers to, computed
        where `input_ids` lies (on the host, the training step's choice costs the device no
        read; docs/formats.md §12)."""
        referenced = (input_ids == self.special_tokens.image).sum(dim=1).clamp(max=count)
        return torch.arange(count, device=input_ids.device) < referenced.unsqueeze(1)

    def encode_referenced(
        self, images: Tensor, input_ids: Tensor, used: Tensor | None = None
    ) -> Tensor:
        """`encode_images` for the images some `<image>` token refers to; the others (zero
        padding, images cut off with their text) get zero latents that nothing attends to.
        Same result, less work: documents often hold fewer images than the padded count.
        `used` (from `images_used`) may be given, on the host, to decide without a read."""
        batch, count = images.shape[:2]
        if used is None:
            used = self.images_used(input_ids, count)
        if count == 0 or bool(used.all()):
            return self.encode_images(images)
        if not bool(used.any()):
            used = used.clone()
            used[0, 0] = True  # encode one image: sharded layers run the same calls on every rank
        rows = used.flatten().nonzero().squeeze(1).to(images.device, non_blocking=True)
        picked = images.flatten(0, 1).index_select(0, rows)
        encoded = self.encode_images(picked.unsqueeze(0)).squeeze(0)
        latents = encoded.new_zeros(batch * count, *encoded.shape[1:])
        filled: Tensor = latents.index_copy(0, rows, encoded)
        return filled.view(batch, count, *encoded.shape[1:])

    def media_index(self, input_ids: Tensor, start: Tensor | None = None) -> Tensor:
        """Per token, the 1-based number of the most recent `<image>` at or before it (0: none);
        `start` (B,) counts images seen before these tokens (decoding with a cache)."""
        index = (input_ids == self.special_tokens.image).cumsum(dim=1)
        return index if start is None else index + start.unsqueeze(1)

    @contextmanager
    def _conditioned(
        self,
        latents: Tensor | None,
        media_index: Tensor,
        keys_values: dict[nn.Module, tuple[Tensor, Tensor]] | None = None,
    ) -> Iterator[None]:
        state = self._media
        state.latents, state.media_index, state.active = latents, media_index, True
        state.keys_values = keys_values
        if latents is not None:  # routed once here, used by every cross-attention layer
            state.routing = TokenRouting.from_media_index(media_index, latents.shape[1])
        try:
            yield
        finally:
            state.latents, state.media_index, state.routing, state.active = None, None, None, False
            state.keys_values = None

    def forward(
        self,
        images: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        use_media: bool = True,
        images_used: Tensor | None = None,
    ) -> Any:
        """Returns the LM's output (`.logits`; `.loss` when labels are given: shifted
        cross-entropy, -100 ignored). `use_media=False` removes the media: cross-attention
        outputs zero everywhere (images may be None), as for text before the first image.
        `images_used`: `images_used(input_ids, N)` computed on the host (no device read)."""
        if use_media:
            if images is None:
                raise ValueError("images are required unless use_media=False")
            latents: Tensor | None = self.encode_referenced(images, input_ids, images_used)
        else:
            latents = None
        with self._conditioned(latents, self.media_index(input_ids)):
            # no key/value cache: a whole sequence needs none, and filling one per layer
            # made each compiled decoder layer recompile (docs/formats.md §12)
            takes = inspect.signature(self.lm.forward).parameters
            no_cache = {"use_cache": False} if "use_cache" in takes else {}
            with positions_not_packed() if attention_mask is None else nullcontext():
                return self.lm(
                    input_ids=input_ids, attention_mask=attention_mask, labels=labels, **no_cache
                )

    # -- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        eos_token_ids: Sequence[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        config: DecodeConfig | None = None,
    ) -> Tensor:
        """Continue each prompt (left-padded when lengths differ) with `model/generation.py`:
        images encoded once, the LM's key/value cache reused across steps. Stops a sequence at
        any of `eos_token_ids` (default `<|endofchunk|>`, as OpenFlamingo; `()` never stops)
        and pads it afterwards. `config` (beam search and the rest) replaces the keyword
        options. Returns prompt + new tokens, (B, T + at most max_new_tokens)."""
        from flamingo_cli.model.generation import DecodeConfig, generate

        if config is None:
            stops = [self.special_tokens.endofchunk] if eos_token_ids is None else eos_token_ids
            config = DecodeConfig(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k or 0,
                stop_token_ids=tuple(int(t) for t in stops),
                pad_token_id=self.special_tokens.pad,
            )
        rows = generate(self, images, input_ids, attention_mask, config, generator=generator)
        width = max(len(row) for row in rows)
        new = input_ids.new_full((len(rows), width), config.pad_token_id)
        for b, row in enumerate(rows):
            new[b, : len(row)] = torch.tensor(row, dtype=new.dtype)
        return torch.cat((input_ids, new), dim=1)

    # -- embeddings ----------------------------------------------------------------------

    def input_embeddings(self) -> nn.Embedding:
        return input_embeddings(self.lm)

    def output_embeddings(self) -> nn.Module | None:
        return output_embeddings(self.lm)
