"""Weights into a model built here: which checkpoint a name means, and loading it.

A checkpoint is one of our DCP directories (read through `runtime.dcp_metadata`, nothing
unpickled unchecked), our exported `flamingo.pt`, or an OpenFlamingo `checkpoint.pt`. Training
loads `model.init_from` this way; evaluation its `--checkpoint`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from flamingo_cli.errors import CheckpointDamaged, FlamingoError
from flamingo_cli.model.flamingo import FlamingoModel
from flamingo_cli.model.openflamingo import (
    NotPlainData,
    load_openflamingo_state_dict,
    load_plain,
    required_weight_names,
    to_openflamingo_key,
)
from flamingo_cli.recipe.load import LoadedRecipe
from flamingo_cli.runtime.dcp_metadata import CheckpointReader, fit, load
from flamingo_cli.runtime.run_dir import COMPLETE, resolve_resume, run_dir_of

MODEL_PREFIX = "train.model."
_ANOTHER = "give another checkpoint: an older step-N directory of the run"


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is what we mean then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def does_not_fit(
    path: Path, what: str, missing: list[str], extra: list[str], reshaped: list[str]
) -> str:
    """Why a checkpoint does not fit the model (or run) built here, with a few examples."""
    examples = [
        f"missing: {', '.join(missing[:3])}" if missing else "",
        f"no place for: {', '.join(extra[:3])}" if extra else "",
        f"another shape: {'; '.join(reshaped[:2])}" if reshaped else "",
    ]
    counts = [
        f"{len(missing)} missing from it" if missing else "",
        f"{len(extra)} with no place in the {what}" if extra else "",
        f"{len(reshaped)} of another shape" if reshaped else "",
    ]
    return (
        f"the checkpoint {path} does not fit this {what}: "
        f"{', '.join(c for c in counts if c)} ({'; '.join(e for e in examples if e)})"
    )


def resolve_checkpoint(loaded: LoadedRecipe, checkpoint: str) -> Path:
    """`latest`: the newest complete checkpoint of the recipe's run; else an existing path."""
    if checkpoint == "latest":
        run_dir = run_dir_of(loaded)
        found = resolve_resume(run_dir, "auto")
        if found is None:
            raise FlamingoError(
                f"--checkpoint latest: no complete checkpoint under {run_dir / 'checkpoints'}",
                fix="train the recipe first, pass the same run.output_dir/run.name overrides as "
                "training did, or give --checkpoint DIR|FILE",
            )
        return found
    path = Path(checkpoint)
    if not path.exists():
        raise FlamingoError(
            f"--checkpoint {checkpoint} does not exist",
            fix="give a checkpoint directory (<run>/checkpoints/step-N), an exported "
            "flamingo.pt or OpenFlamingo checkpoint.pt, or 'latest'",
        )
    return path


def load_weights(model: FlamingoModel, path: Path) -> str:
    """Load a checkpoint into an unwrapped model; returns what kind of checkpoint it was.

    A directory is one of our DCP checkpoints; a file is our exported `flamingo.pt` (our
    parameter names) or an OpenFlamingo `checkpoint.pt` (its names), told apart by the keys.
    """
    if path.is_dir():
        load_model_weights(model, required_weight_names(model), path)
        return "flamingo checkpoint"
    if not path.is_file():
        raise FlamingoError(
            f"{path} is not a regular file (a pipe, socket or device)",
            fix="give a checkpoint directory, an exported flamingo.pt or an OpenFlamingo "
            "checkpoint.pt",
        )
    try:
        state = load_plain(path)
    except NotPlainData as exc:
        raise FlamingoError(
            f"cannot read {path} as a weights file ({exc.reason}): it is "
            "damaged, or not a weights file; nothing from it was run",
            fix="give a checkpoint directory, an exported flamingo.pt or an OpenFlamingo "
            "checkpoint.pt",
        ) from exc
    if not isinstance(state, dict) or not state:
        raise FlamingoError(f"{path} does not hold a state dict")
    ours = set(model.state_dict())
    if all(isinstance(k, str) and k in ours for k in state):
        # our names: map them to OpenFlamingo's to share its checks (shapes, missing layers)
        state = {to_openflamingo_key(k): v for k, v in state.items()}
        kind = "flamingo export"
    else:
        kind = "OpenFlamingo checkpoint"
    load_openflamingo_state_dict(model, state)
    return kind


def load_model_weights(model: nn.Module, required: set[str], path: Path) -> None:
    """Load the model part of a checkpoint directory into an unwrapped model: every entry the
    model has a place for (trainable weights, embeddings, the backbones when they trained),
    on any number of processes (each reads what it needs; no collective). The checkpoint must
    hold every name in `required`, and nothing the model lacks. For `init_from` and eval."""
    if not (path / COMPLETE).is_file():
        raise FlamingoError(
            f"{path} is not a complete flamingo checkpoint (no {COMPLETE} marker)",
            fix="pick a directory under <run>/checkpoints/ that has COMPLETE, or 'latest'",
        )
    reader = CheckpointReader(path)
    try:
        index = reader.index()
    except CheckpointDamaged as exc:
        raise CheckpointDamaged(exc.message, fix=_ANOTHER) from None
    ours = model.state_dict()
    saved = {
        k.removeprefix(MODEL_PREFIX)
        for k in index.state_dict_metadata
        if k.startswith(MODEL_PREFIX)
    }
    state = {k: ours[k] for k in sorted(saved) if k in ours}
    found = fit({MODEL_PREFIX + k: v for k, v in state.items()}, index, MODEL_PREFIX)
    missing = sorted(required - saved)
    if missing or found.unexpected or found.reshaped:
        raise FlamingoError(
            does_not_fit(path, "model", missing, found.unexpected, found.reshaped),
            fix=f"build the model as the checkpoint's run did ({path / 'recipe.toml'}: "
            "model.cross_attn_every_n_layers, the language model, vision encoder and tokenizer)",
        )
    try:
        with single_process_ok():
            load({"train": {"model": state}}, reader, no_dist=True)
    except CheckpointDamaged as exc:
        raise CheckpointDamaged(exc.message, fix=_ANOTHER) from None
    model.load_state_dict(state, strict=False)
