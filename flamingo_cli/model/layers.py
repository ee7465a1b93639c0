"""Flamingo's own layers: perceiver resampler and gated cross-attention (docs/formats.md §5.7).

Attention runs through `scaled_dot_product_attention`; every linear layer is bias-free and every
feed-forward is LayerNorm -> Linear(x mult) -> exact GELU -> Linear, as in OpenFlamingo, so
released weights load one to one (see `openflamingo.py` for the key names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class FeedForward(nn.Module):
    """Pre-norm MLP with a `mult` times wider hidden layer."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, dim * mult, bias=False)
        self.fc_out = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc_out(F.gelu(self.fc_in(self.norm(x))))
        return out


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(..., L, heads * d) -> (..., heads, L, d)."""
    return x.view(*x.shape[:-1], heads, -1).transpose(-3, -2)


def _merge_heads(x: Tensor) -> Tensor:
    """(..., heads, L, d) -> (..., L, heads * d)."""
    return x.transpose(-3, -2).flatten(-2)


class PerceiverAttention(nn.Module):
    """Latents attend to the image tokens and to themselves (keys and values from both)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, heads * dim_head, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.out_proj = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """media (M, v, D), latents (M, n, D) -> update for the latents (M, n, D)."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = _split_heads(self.q_proj(latents), self.heads)
        k, v = self.kv_proj(torch.cat((media, latents), dim=-2)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            q, _split_heads(k, self.heads), _split_heads(v, self.heads)
        )
        result: Tensor = self.out_proj(_merge_heads(out))
        return result


class PerceiverLayer(nn.Module):
    """One resampler layer: attention then feed-forward, both residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        latents = latents + self.attn(media, latents)
        out: Tensor = latents + self.ff(latents)
        return out


class PerceiverResampler(nn.Module):
    """Turns each image's patch tokens into a fixed number of learned latents."""

    def __init__(
        self, dim: int, *, depth: int, num_latents: int, heads: int, dim_head: int, ff_mult: int
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, heads, dim_head, ff_mult) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.activation_checkpointing = False

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, v, D) for N images per sample -> latents (B, N, n, D)."""
        batch, images = tokens.shape[:2]
        media = tokens.flatten(0, 1)
        latents = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                latents = checkpoint(layer, media, latents, use_reentrant=False)
            else:
                latents = layer(media, latents)
        out: Tensor = self.norm(latents.view(batch, images, *latents.shape[1:]))
        return out


@dataclass(frozen=True)
class TokenRouting:
    """Which image each text token attends to: `image` (B, T), its 0-based number (any number
    where the token has none), and `valid` (B, T), whether it has one.

    Attention then runs densely per image, every image's latents answering all the tokens,
    and each token keeps its own image's answer (a gather). Every shape follows from (B, T, N)
    alone: nothing is read back from the device (no host sync), compiled code sees one shape
    per batch shape, and no mask stands in the way of the fused attention kernels.
    """

    image: Tensor
    valid: Tensor

    @classmethod
    def from_media_index(cls, media_index: Tensor, images: int) -> TokenRouting:
        """Routing for `media_index` (B, T) of 1-based image numbers (0 or > images: none)."""
        valid = (media_index > 0) & (media_index <= images)
        return cls((media_index - 1).clamp(0, max(images - 1, 0)), valid)


class MaskedCrossAttention(nn.Module):
    """Text attends to the latents of one image: the most recent `<image>` at or before it.

    `media_index[b, t]` is the 1-based number of that image (0: no image yet). Each image's
    latents are attended to by all tokens in one dense, unmasked attention per image
    (`TokenRouting`); each token takes the result of its own image, and tokens without a valid
    image get an exact zero output. The softmax of a token runs over its image's latents only,
    exactly as OpenFlamingo's masked attention over all images' latents computes it.
    """

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, heads * dim_head, bias=False)
        self.kv_proj = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.out_proj = nn.Linear(heads * dim_head, dim, bias=False)

    def keys_values(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of `media` (B, N, n, Dv), (B, N, n, h * d) each; decoding computes
        them once for all its steps (`keys_values` of `forward`), as the latents stay put."""
        k, v = self.kv_proj(media).chunk(2, dim=-1)
        return k, v

    def forward(
        self,
        x: Tensor,
        media: Tensor,
        media_index: Tensor | TokenRouting,
        keys_values: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (B, T, D), media (B, N, n, Dv), media_index (B, T) or its routing -> (B, T, D);
        `keys_values`: `self.keys_values(media)` computed before."""
        batch, length = x.shape[:2]
        images, latents = media.shape[1:3]
        if images == 0:
            empty: Tensor = self.out_proj(x.new_zeros(batch, length, self.q_proj.out_features))
            return empty
        routing = (
            media_index
            if isinstance(media_index, TokenRouting)
            else TokenRouting.from_media_index(media_index, images)
        )
        q = _split_heads(self.q_proj(self.norm(x)), self.heads)  # (B, h, T, d)
        width = self.q_proj.out_features
        k, v = self.keys_values(media) if keys_values is None else keys_values
        buckets = batch * images

        def per_image(t: Tensor) -> Tensor:  # (B, N, n, h * d) -> (B * N, h, n, d)
            return _split_heads(t.reshape(buckets, latents, width), self.heads)

        queries = q.unsqueeze(1).expand(-1, images, -1, -1, -1).reshape(buckets, *q.shape[1:])
        attended = F.scaled_dot_product_attention(queries, per_image(k), per_image(v))
        answers = _merge_heads(attended).view(batch, images, length, width)
        pick = routing.image.view(batch, 1, length, 1).expand(-1, -1, -1, width)
        own = answers.gather(1, pick).squeeze(1)  # (B, T, h * d): each token's image
        out = own.masked_fill(~routing.valid.unsqueeze(-1), 0.0)
        result: Tensor = self.out_proj(out)
        return result


class GatedCrossAttention(nn.Module):
    """Masked cross-attention then feed-forward, each scaled by tanh of a gate that starts at 0."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, heads, dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: Tensor,
        media: Tensor | None,
        media_index: Tensor | TokenRouting,
        keys_values: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """With `media=None` (media switched off) the attention branch contributes nothing;
        `keys_values` as `MaskedCrossAttention.forward` takes them."""
        if media is not None:
            x = x + self.attn(x, media, media_index, keys_values) * self.attn_gate.tanh()
        out: Tensor = x + self.ff(x) * self.ff_gate.tanh()
        return out
