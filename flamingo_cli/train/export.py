"""Consolidated weights at the end of a run: one file of ours and OpenFlamingo's checkpoint.pt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from flamingo_cli.model.openflamingo import to_openflamingo_key
from flamingo_cli.runtime.distributed import DistInfo

EXPORT_DIR = "export"


@dataclass(frozen=True)
class ExportPaths:
    flamingo: Path
    openflamingo: Path


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(tensors, tmp)
    tmp.replace(path)


def export_weights(
    wrapped: nn.Module, keep: set[str], run_dir: Path, info: DistInfo
) -> ExportPaths | None:
    """Gather the kept parameters (collective: every rank calls it) and write them on rank 0.

    `flamingo.pt` holds our keys; `checkpoint.pt` the same tensors under OpenFlamingo's keys,
    loadable by its `model.load_state_dict(..., strict=False)` and by our `model.init_from`.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(wrapped, options=options)
    if not info.is_main:
        return None
    kept = {
        k: v.detach().cpu().contiguous()
        for k, v in full.items()
        if k in keep and isinstance(v, torch.Tensor)
    }
    out = run_dir / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = ExportPaths(out / "flamingo.pt", out / "checkpoint.pt")
    _save(kept, paths.flamingo)
    _save({to_openflamingo_key(k): v for k, v in kept.items()}, paths.openflamingo)
    return paths
