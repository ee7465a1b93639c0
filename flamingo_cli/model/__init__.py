"""The Flamingo model: vision encoder, perceiver resampler, gated cross-attention, tokenizer.

The names below load lazily, so importing `flamingo_cli.model.tokenizer` or the package itself
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flamingo_cli.model.factory import build_model
    from flamingo_cli.model.flamingo import FlamingoConfig, FlamingoModel
    from flamingo_cli.model.openflamingo import (
        load_openflamingo_checkpoint,
        save_openflamingo_checkpoint,
    )
    from flamingo_cli.model.params import (
        checkpoint_parameter_names,
        checkpoint_state_dict,
        embedding_grad_mask,
        mask_embedding_grad,
        set_trainable,
        trainable_embedding_rows,
    )

_EXPORTS = {
    "build_model": "factory",
    "FlamingoConfig": "flamingo",
    "FlamingoModel": "flamingo",
    "load_openflamingo_checkpoint": "openflamingo",
    "save_openflamingo_checkpoint": "openflamingo",
    "checkpoint_parameter_names": "params",
    "checkpoint_state_dict": "params",
    "embedding_grad_mask": "params",
    "mask_embedding_grad": "params",
    "set_trainable": "params",
    "trainable_embedding_rows": "params",
}
__all__ = [
    "FlamingoConfig",
    "FlamingoModel",
    "build_model",
    "checkpoint_parameter_names",
    "checkpoint_state_dict",
    "embedding_grad_mask",
    "load_openflamingo_checkpoint",
    "mask_embedding_grad",
    "save_openflamingo_checkpoint",
    "set_trainable",
    "trainable_embedding_rows",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
