"""OpenFlamingo `checkpoint.pt` files: their key layout, and their weights into our model.

Our runs write theirs in that layout too (train/export.py, through `to_openflamingo_key`).

OpenFlamingo keys (2.0.1, the released checkpoints) are its module paths: `vision_encoder.*`,
`perceiver.layers.{i}.0.to_q` (attention) / `.1.{0,1,3}` (feed-forward), and
`lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.*` / `.decoder_layer.*`, plus the
duplicates `lang_encoder.old_decoder_blocks.{i}` and `lang_encoder.gated_cross_attn_layers.{i}`
in unfiltered state dicts. Released files hold the perceiver, the cross-attention blocks and the
embeddings; training checkpoints wrap them in `model_state_dict` with DDP's `module.` prefix.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.flamingo import FlamingoModel

_ATTN = {"q_proj": "to_q", "kv_proj": "to_kv", "out_proj": "to_out"}
_FF = {"norm": "0", "fc_in": "1", "fc_out": "3"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_INFIXES = ("._checkpoint_wrapped_module", "._fsdp_wrapped_module")


def _rename_first(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}" if tail else table.get(head, head)


def to_openflamingo_key(key: str) -> str:
    """Our state dict key -> OpenFlamingo's."""
    if m := re.fullmatch(r"perceiver\.layers\.(\d+)\.attn\.(.+)", key):
        return f"perceiver.layers.{m[1]}.0.{_rename_first(m[2], _ATTN)}"
    if m := re.fullmatch(r"perceiver\.layers\.(\d+)\.ff\.(.+)", key):
        return f"perceiver.layers.{m[1]}.1.{_rename_first(m[2], _FF)}"
    if m := re.fullmatch(r"lm\.(.+)\.gated_cross_attn\.attn\.(.+)", key):
        return f"lang_encoder.{m[1]}.gated_cross_attn_layer.attn.{_rename_first(m[2], _ATTN)}"
    if m := re.fullmatch(r"lm\.(.+)\.gated_cross_attn\.ff\.(.+)", key):
        return f"lang_encoder.{m[1]}.gated_cross_attn_layer.ff.{_rename_first(m[2], _FF)}"
    if m := re.fullmatch(r"lm\.(.+)\.gated_cross_attn\.(.+)", key):
        return f"lang_encoder.{m[1]}.gated_cross_attn_layer.{m[2]}"
    if key.startswith("lm."):
        return "lang_encoder." + key.removeprefix("lm.")
    return key


def _canonical(key: str, layers_path: str) -> str:
    """Undo wrapper prefixes and OpenFlamingo's duplicate module lists."""
    for prefix in _WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    for infix in _WRAPPER_INFIXES:
        key = key.replace(infix, "")
    if m := re.fullmatch(r"lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)", key):
        return f"lang_encoder.{layers_path}.{m[1]}.decoder_layer.{m[2]}"
    if m := re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", key):
        return f"lang_encoder.{layers_path}.{m[1]}.gated_cross_attn_layer.{m[2]}"
    return key


@dataclass(frozen=True)
class ImportReport:
    """What an import changed: our keys loaded, and the file's keys we had no place for."""

    loaded: list[str]
    unexpected: list[str]


def required_weight_names(model: FlamingoModel) -> set[str]:
    """Names any checkpoint loaded into `model` must provide (an OpenFlamingo file or one of
    our directories): the Flamingo layers (perceiver, cross-attention) and input embeddings."""
    embeddings = model.input_embeddings().weight
    names = {n for n, p in model.named_parameters() if p is embeddings}
    names |= {n for n, _ in model.named_parameters() if n.startswith("perceiver.")}
    names |= {n for n, _ in model.named_parameters() if ".gated_cross_attn." in n}
    return names


def load_openflamingo_state_dict(
    model: FlamingoModel, state_dict: dict[str, Tensor]
) -> ImportReport:
    """Copy an OpenFlamingo state dict (released, training or full) into `model`.

    Every perceiver, cross-attention and input embedding weight must be present with our
    shape; other entries (frozen backbone weights of a full state dict) load when they match.
    """
    inner = state_dict.get("model_state_dict", state_dict)
    if not isinstance(inner, dict):
        raise FlamingoError("the OpenFlamingo checkpoint holds no state dict")
    layers_path = model.decoder_layers_path
    ours = model.state_dict()
    by_of_key = {to_openflamingo_key(k): k for k in ours}
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for raw_key, value in inner.items():
        if not isinstance(raw_key, str) or not isinstance(value, Tensor):
            what = "a key that is not a name" if not isinstance(raw_key, str) else "not a tensor"
            raise FlamingoError(
                f"the checkpoint's entry {raw_key!r} is {what} ({type(value).__name__}): "
                "the file does not hold a state dict of weights",
                fix="give the checkpoint.pt of an OpenFlamingo model, a flamingo.pt export or "
                "a checkpoint directory",
            )
        key = _canonical(raw_key, layers_path)
        target = by_of_key.get(key)
        if target is None:
            unexpected.append(raw_key)
            continue
        if tuple(value.shape) != tuple(ours[target].shape):
            raise FlamingoError(
                f"checkpoint entry {raw_key!r} has shape {tuple(value.shape)}, the model "
                f"expects {tuple(ours[target].shape)}",
                fix="build the model with the checkpoint's vision encoder, language model, "
                "tokenizer and cross_attn_every_n_layers",
            )
        mapped[target] = value
    flamingo_extra = [k for k in unexpected if "gated_cross_attn" in k or k.startswith("perceiver")]
    missing = sorted(required_weight_names(model) - set(mapped))
    if missing or flamingo_extra:
        shown = ", ".join((missing or flamingo_extra)[:4])
        raise FlamingoError(
            f"the checkpoint does not fit this model: {len(missing)} Flamingo weights missing, "
            f"{len(flamingo_extra)} without a place (e.g. {shown})",
            fix="set model.cross_attn_every_n_layers and the language model to the checkpoint's",
        )
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)
    return ImportReport(loaded=sorted(mapped), unexpected=unexpected)


_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")
_UNPICKLER = "WeightsUnpickler error:"
_ALLOW_ADVICE = " Please use `torch.serialization.add_safe_globals"


def weights_only_refusal(exc: BaseException) -> str:
    """What torch's weights-only refusal (or another load error) says was refused, without
    its advice: to load with `weights_only=False` or to allow-list the global, the very things
    not to do with a file nobody vouches for."""
    text = str(exc)
    if _UNPICKLER in text:  # "(1) ... weights_only=False ... (2) ... WeightsUnpickler error: X"
        text = text.split(_UNPICKLER, 1)[1]
    lines = [line.strip() for line in text.splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(_BOILERPLATE)]
    useful = [ln.split(_ALLOW_ADVICE, 1)[0].strip() for ln in useful if "weights_only" not in ln]
    return next((ln for ln in useful if ln), type(exc).__name__)


class NotPlainData(Exception):
    """torch.load refused a file or could not read it; `reason` says why, without torch's
    advice to load it anyway."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_plain(source: str | Path | IO[bytes]) -> Any:
    """torch.load on the CPU with weights_only=True: tensors and plain containers, no code run.
    Every failure is a NotPlainData: the refusals, damage, and bytes torch.save never writes
    (each of which fails its own way: a text file's first byte is a KeyError)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise NotPlainData(weights_only_refusal(exc)) from exc
    except Exception as exc:
        raise NotPlainData(f"not a file torch.save writes ({type(exc).__name__}: {exc})") from exc
