"""Training labels from input ids (docs/formats.md §5.5), with tensor operations only."""

from __future__ import annotations

import torch

from flamingo_cli.model.tokenizer import SpecialTokens

IGNORE = -100


def pair_labels(input_ids: torch.Tensor, tokens: SpecialTokens) -> torch.Tensor:
    """LAION: every token is a target except `<PAD>` and `<image>` (eos stays a target)."""
    masked = (input_ids == tokens.pad) | (input_ids == tokens.image)
    return input_ids.masked_fill(masked, IGNORE)


def interleaved_labels(input_ids: torch.Tensor, tokens: SpecialTokens) -> torch.Tensor:
    """MMC4: a token is a target only when the last `<image>`/`<|endofchunk|>` before it is an
    `<image>`; `<image>` and `<PAD>` never are.

    This is OpenFlamingo's rule (mask up to the first `<image>`, and after each
    `<|endofchunk|>` up to the next `<image>`), so the final eos is masked and
    `<|endofchunk|>` itself stays a target. `input_ids` is `(B, L)`.
    """
    is_image = input_ids == tokens.image
    is_marker = is_image | (input_ids == tokens.endofchunk)
    length = input_ids.shape[-1]
    positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    # index of the latest marker at or before each position (-1 when none) ...
    latest = torch.where(is_marker, positions, torch.full_like(positions, -1)).cummax(-1).values
    # ... shifted by one: the latest marker strictly before each position
    before = torch.cat([torch.full_like(latest[..., :1], -1), latest[..., :-1]], dim=-1)
    after_image = (before >= 0) & is_image.gather(-1, before.clamp(min=0))
    keep = after_image & ~is_image & (input_ids != tokens.pad)
    return input_ids.masked_fill(~keep, IGNORE)


def content_length(attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """Columns up to the last one holding a real token or a target in any row. The columns after
    it are right padding: in a causal LM they change no earlier output and no loss term, so a
    step may cut them off and compute exactly the same loss with less work."""
    used = (attention_mask != 0) | (labels != IGNORE)
    columns = used.any(dim=0).nonzero()
    return int(columns[-1]) + 1 if len(columns) else 1


def needs_mask(attention_mask: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether a causal LM's loss on this batch depends on its padding mask (docs/formats.md
    §12). Not when every row is real tokens then padding and no padded position is a target:
    a real token attends only to earlier columns, all real, and a padded position's output
    predicts the next label, padded too, so ignored. Holes, left padding or padded targets
    need the mask."""
    mask = attention_mask != 0
    right_padded = not bool((mask[:, 1:] & ~mask[:, :-1]).any())
    padded_targets = bool((~mask & (labels != IGNORE)).any())
    return not right_padded or padded_targets
