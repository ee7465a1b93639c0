"""Decoding a Flamingo model: greedy, sampling and beam search, batched with left padding,
with the LM's key/value cache in every mode (docs/formats.md §16).

Images are encoded once per row (only those an `<image>` refers to), each cross-attention
block's keys and values of them computed once for all steps, and the prompt runs once per
row; for beam search all of it is then repeated for the row's beams, and each step reorders
the cache and the cross-attention media state (images seen so far) to follow the beams.
Beam search is Hugging Face's (transformers 5, `early_stopping=False`) step for step, so
it returns what `generate(num_beams=K)` returns for the same logits.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from flamingo_cli.errors import UsageError

if TYPE_CHECKING:
    from flamingo_cli.model.flamingo import FlamingoModel

_NEG = -1.0e9  # Hugging Face's "never": a score no real hypothesis reaches


@dataclass(frozen=True)
class DecodeConfig:
    """How to continue a prompt. `top_k = 0` and `top_p = 1.0` switch those filters off;
    `stop_token_ids` end a sequence (OpenFlamingo: `<|endofchunk|>`; empty: never stop);
    `length_penalty` divides a finished beam's summed log-probability by its length (new
    tokens, the stop token included) to that power, as Hugging Face does."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        problems = [
            ("max_new_tokens must be at least 1", self.max_new_tokens < 1),
            ("min_new_tokens must be 0 or more", self.min_new_tokens < 0),
            ("num_beams must be at least 1", self.num_beams < 1),
            ("temperature must be above 0", self.temperature <= 0),
            ("top_k must be 0 (off) or more", self.top_k < 0),
            ("top_p must be in (0, 1]", not 0 < self.top_p <= 1),
            ("sampling and beam search do not combine", self.do_sample and self.num_beams > 1),
        ]
        for message, wrong in problems:
            if wrong:
                raise UsageError(
                    f"decoding: {message}",
                    fix="greedy: the defaults; sampling: --sample with --temperature/--top-k/"
                    "--top-p; beam search: --num-beams N (no --sample)",
                )


@torch.no_grad()
def generate(
    model: FlamingoModel,
    images: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    config: DecodeConfig,
    *,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens of each row of a left-padded batch (`images` (B, N, 3, H, W), the k-th
    `<image>` of a row using its k-th image). A sequence that stopped ends with its stop token,
    as in OpenFlamingo (Hugging Face's `generate` keeps it; decode with
    `skip_special_tokens=True`); one that ran out of `max_new_tokens` has none.

    Sampling draws from `generator`, else from one seeded with `config.seed`, else from
    torch's global generator."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    decoder = _Decoder(model, _latents(model, images, input_ids), input_ids, attention_mask)
    if config.num_beams > 1:
        return _beam_search(decoder, input_ids, config)
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    return _one_path(decoder, input_ids, config, generator)


def _latents(model: FlamingoModel, images: Tensor, input_ids: Tensor) -> Tensor:
    """Perceiver latents of the images the prompts refer to; none at all without images."""
    if images.shape[1] == 0:
        width = model.perceiver.latents.shape
        return images.new_zeros(images.shape[0], 0, *width)
    return model.encode_referenced(images, input_ids)


class _Decoder:
    """One batch's decoding state: latents, the LM cache, attention mask, positions and the
    images seen so far per row. `step` feeds new tokens and returns the next-token logits."""

    def __init__(
        self, model: FlamingoModel, latents: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> None:
        self.model = model
        self.latents = latents
        self.mask = attention_mask.long()
        params = inspect.signature(model.lm.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.positions: Tensor | None = None
        if "position_ids" in params:  # as Hugging Face: counted over the unpadded tokens
            self.positions = (self.mask.cumsum(dim=1) - 1).masked_fill(self.mask == 0, 0)
        self.keep_last = "logits_to_keep" in params
        self.cache: Any = None
        self.seen = torch.zeros_like(input_ids[:, 0])
        self.keys_values = self._keys_values()

    def _keys_values(self) -> dict[nn.Module, tuple[Tensor, Tensor]]:
        """Every cross-attention block's keys and values of the latents, once for all steps."""
        blocks = self.model.cross_attention_blocks()
        return {block: block.attn.keys_values(self.latents) for block in blocks}

    def step(self, ids: Tensor) -> Tensor:
        """Logits (rows, V), float32, after `ids` (rows, T): the prompt, then one token."""
        model, kwargs = self.model, {self.cache_key: self.cache}
        if self.cache is not None:  # a new token: extend the mask and the positions
            self.mask = torch.cat((self.mask, self.mask.new_ones(ids.shape[0], 1)), dim=1)
            if self.positions is not None:
                self.positions = self.positions[:, -1:] + 1
        if self.positions is not None:
            kwargs["position_ids"] = self.positions
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        index = model.media_index(ids, self.seen)
        with model._conditioned(self.latents, index, self.keys_values):
            out = model.lm(input_ids=ids, attention_mask=self.mask, use_cache=True, **kwargs)
        self.cache = getattr(out, "cache", None) or out.past_key_values
        self.seen = index[:, -1]
        logits: Tensor = out.logits[:, -1, :].float()
        return logits

    def repeat(self, times: int) -> None:
        """Each row `times` times in a row (its beams), after the prompt ran once per row."""
        self.latents = self.latents.repeat_interleave(times, dim=0)
        self.keys_values = {
            block: (k.repeat_interleave(times, dim=0), v.repeat_interleave(times, dim=0))
            for block, (k, v) in self.keys_values.items()
        }
        self.mask = self.mask.repeat_interleave(times, dim=0)
        self.seen = self.seen.repeat_interleave(times, dim=0)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(times, dim=0)
        if hasattr(self.cache, "batch_repeat_interleave"):
            self.cache.batch_repeat_interleave(times)
        else:  # a legacy tuple cache (models with their own code)
            self.cache = _map_cache(self.cache, lambda t: t.repeat_interleave(times, dim=0))

    def reorder(self, rows: Tensor) -> None:
        """Row i continues from row `rows[i]` (beam search); the latents of a batch row's beams
        are the same, so only the per-row state moves."""
        self.mask = self.mask.index_select(0, rows)
        self.seen = self.seen.index_select(0, rows)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, rows)
        if hasattr(self.cache, "reorder_cache"):
            self.cache.reorder_cache(rows)
        else:
            self.cache = _map_cache(self.cache, lambda t: t.index_select(0, rows))


def _map_cache(cache: Any, fn: Any) -> Any:
    return tuple(tuple(fn(t) for t in layer) for layer in cache)


def _suppress_stops(scores: Tensor, step: int, config: DecodeConfig) -> Tensor:
    """No stop token before `min_new_tokens` new tokens (Hugging Face's processor)."""
    if step < config.min_new_tokens and config.stop_token_ids:
        scores[:, list(config.stop_token_ids)] = float("-inf")
    return scores


def _stops(config: DecodeConfig, device: torch.device) -> Tensor:
    return torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)


# -- greedy and sampling -------------------------------------------------------------------


def _one_path(
    decoder: _Decoder, input_ids: Tensor, config: DecodeConfig, generator: torch.Generator | None
) -> list[list[int]]:
    """Greedy decoding or sampling, one sequence per row; finished rows get padding."""
    stops = _stops(config, input_ids.device)
    finished = torch.zeros_like(input_ids[:, 0], dtype=torch.bool)
    logits = decoder.step(input_ids)
    picked: list[Tensor] = []
    for step in range(config.max_new_tokens):
        scores = _suppress_stops(logits, step, config)
        next_ids = _sample(scores, config, generator) if config.do_sample else scores.argmax(-1)
        next_ids = next_ids.masked_fill(finished, config.pad_token_id)
        picked.append(next_ids)
        finished = finished | torch.isin(next_ids, stops)
        if step + 1 == config.max_new_tokens or bool(finished.all()):
            break
        logits = decoder.step(next_ids.unsqueeze(1))
    rows = torch.stack(picked, dim=1).tolist()
    return [_cut_at_stop(row, config.stop_token_ids) for row in rows]


def _cut_at_stop(tokens: list[int], stops: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def _sample(scores: Tensor, config: DecodeConfig, generator: torch.Generator | None) -> Tensor:
    """One token per row from softmax(scores / temperature), cut to the `top_k` most likely
    and to the smallest set holding `top_p` of the probability (Hugging Face's order)."""
    scores = scores / config.temperature
    if 0 < config.top_k < scores.shape[-1]:
        kth = scores.topk(config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        before = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)
        drop = before >= config.top_p  # the mass before it already reaches top_p (first kept)
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# -- beam search -----------------------------------------------------------------------------


@dataclass
class _Beams:
    """Beam search state for B rows and K beams: the running beams and the finished
    hypotheses (best first), as Hugging Face keeps them."""

    tokens: Tensor  # (B, K, max_new) running beams' new tokens
    scores: Tensor  # (B, K) their summed log-probabilities
    done_tokens: Tensor  # (B, K, max_new) finished hypotheses
    done_scores: Tensor  # (B, K) length-penalised scores (_NEG: empty slot)
    done_lengths: Tensor  # (B, K)
    done_full: Tensor  # (B, K) bool: slot holds a hypothesis
    open: Tensor  # (B, 1) bool: a running beam may still beat the finished ones

    @classmethod
    def start(cls, rows: int, beams: int, config: DecodeConfig, device: torch.device) -> _Beams:
        tokens = torch.full(
            (rows, beams, config.max_new_tokens), config.pad_token_id, device=device
        )
        scores = torch.zeros(rows, beams, device=device)
        scores[:, 1:] = _NEG  # only the first beam's tokens count at the first step
        return cls(
            tokens,
            scores,
            tokens.clone(),
            torch.full((rows, beams), _NEG, device=device),
            torch.zeros(rows, beams, dtype=torch.long, device=device),
            torch.zeros(rows, beams, dtype=torch.bool, device=device),
            torch.ones(rows, 1, dtype=torch.bool, device=device),
        )


def _beam_search(decoder: _Decoder, input_ids: Tensor, config: DecodeConfig) -> list[list[int]]:
    rows, beams = input_ids.shape[0], config.num_beams
    stops = _stops(config, input_ids.device)
    state = _Beams.start(rows, beams, config, input_ids.device)
    logits = decoder.step(input_ids)  # the prompt once per row ...
    decoder.repeat(beams)  # ... then copied for its beams
    logits = logits.repeat_interleave(beams, dim=0)
    offsets = torch.arange(rows, device=input_ids.device).unsqueeze(1) * beams
    for step in range(config.max_new_tokens):
        log_probs = _suppress_stops(torch.log_softmax(logits, dim=-1), step, config)
        parents, tokens, hits = _beam_step(state, log_probs, step, stops, config)
        state.open &= _may_improve(state, step + 1, config.length_penalty)
        if not bool(state.open.any()) or bool(hits.all()):
            break
        decoder.reorder((parents + offsets).flatten())
        logits = decoder.step(tokens.flatten().unsqueeze(1))
    lengths = state.done_lengths[:, 0].tolist()
    best = state.done_tokens[:, 0].tolist()
    return [row[:length] for row, length in zip(best, lengths, strict=True)]


def _beam_step(
    state: _Beams, log_probs: Tensor, step: int, stops: Tensor, config: DecodeConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """One step: the best continuations of every beam, the running beams they leave, the
    finished hypotheses updated. Returns the running beams' parents and last tokens (B, K)
    and which of the candidates stopped."""
    rows, beams, vocab = state.scores.shape[0], state.scores.shape[1], log_probs.shape[-1]
    totals = (log_probs.view(rows, beams, vocab) + state.scores.unsqueeze(-1)).view(rows, -1)
    # enough candidates that K of them are still running when the best ones all stop
    kept = max(2, 1 + len(config.stop_token_ids)) * beams
    cand_scores, flat = totals.topk(kept, dim=-1)
    cand_parents, cand_last = flat // vocab, flat % vocab
    cand_tokens = _gather(state.tokens, cand_parents).clone()
    cand_tokens[:, :, step] = cand_last
    hits = torch.isin(cand_last, stops) | (step + 1 == config.max_new_tokens)
    # the running beams: the K best candidates that did not stop
    running = cand_scores + hits.float() * _NEG
    best = running.topk(beams, dim=-1).indices
    state.tokens, state.scores = _gather(cand_tokens, best), _gather(running, best)
    # the finished: among the K best candidates, those that stopped, if they rank
    top = torch.arange(kept, device=hits.device) < beams
    finished = hits & top
    penalised = cand_scores / float(step + 1) ** config.length_penalty
    penalised = penalised + (~state.open).float() * _NEG + (~finished).float() * _NEG
    merged = torch.cat((state.done_scores, penalised), dim=1).topk(beams, dim=-1).indices
    state.done_scores = _gather(torch.cat((state.done_scores, penalised), dim=1), merged)
    state.done_tokens = _gather(torch.cat((state.done_tokens, cand_tokens), dim=1), merged)
    lengths = torch.full_like(cand_parents, step + 1)
    state.done_lengths = _gather(torch.cat((state.done_lengths, lengths), dim=1), merged)
    state.done_full = _gather(torch.cat((state.done_full, finished), dim=1), merged)
    return _gather(cand_parents, best), _gather(cand_last, best), hits


def _may_improve(state: _Beams, generated: int, length_penalty: float) -> Tensor:
    """Hugging Face's early-stop heuristic: the best running beam, scored at its current
    length, beats the worst finished hypothesis (or a slot is still empty)."""
    best_running = state.scores[:, :1] / float(generated) ** length_penalty
    worst = state.done_scores.min(dim=1, keepdim=True).values
    worst_done = torch.where(state.done_full, worst, torch.full_like(worst, _NEG))
    improves: Tensor = (best_running > worst_done).any(dim=-1, keepdim=True)
    return improves


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values[b, index[b, j], ...] for (B, M, ...) values and (B, J) indices."""
    while index.ndim < values.ndim:
        index = index.unsqueeze(-1)
    gathered: Tensor = torch.take_along_dim(values, index, dim=1)
    return gathered
