"""Where training metrics go: metrics.jsonl always, wandb and TensorBoard when the recipe asks."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flamingo_cli.recipe.schema import Recipe

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class SetAside:
    """Rows moved out of metrics.jsonl when a run resumed: how many, and where to."""

    rows: int
    path: Path


def set_aside_rows_after(path: Path, step: int) -> SetAside | None:
    """Move the rows of a metrics file logged after `step`, and any row that cannot be read
    (a line half written when a run was killed), to `<name>.replaced-N` (N counting up from 1),
    so that the resumed run writes each later step once. None when nothing was moved.

    Reads and writes line by line (a long run's file can be large); the kept rows are written
    to a temporary file that then replaces the original, so a crash here loses no row.
    """
    if not path.is_file():
        return None
    aside = _next_free(path)
    kept_tmp = path.with_name(f".{path.name}.tmp")
    aside_tmp = aside.with_name(f".{aside.name}.tmp")
    moved = 0
    with path.open("rb") as src, kept_tmp.open("wb") as kept, aside_tmp.open("wb") as other:
        for raw in src:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            row_step = _step_of(line)
            if row_step is not None and row_step <= step:
                kept.write(line + b"\n")
            else:
                other.write(line + b"\n")
                moved += 1
    if not moved:
        kept_tmp.unlink()
        aside_tmp.unlink()
        return None
    aside_tmp.replace(aside)
    kept_tmp.replace(path)
    return SetAside(moved, aside)


def _step_of(line: bytes) -> int | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # half written, or not JSON at all
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _next_free(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.replaced-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.replaced-{n}")


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def save_checkpoint(self, path: Path) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed as written, so a crash loses no logged step."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        self._file.flush()

    def save_checkpoint(self, path: Path) -> None:
        return None

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """wandb run tied to the run directory, so a resumed run continues the same wandb run."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import wandb

        settings = recipe.logging
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb-id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self._wandb = wandb
        self._upload = settings.save_checkpoints_to_wandb
        self._run = wandb.init(
            project=settings.wandb_project,
            entity=settings.wandb_entity,
            name=recipe.run.name,
            id=run_id,
            resume="allow",
            mode=settings.wandb_mode,
            dir=str(run_dir),
            config=recipe.model_dump(mode="json"),
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._run.log(metrics, step=step)

    def save_checkpoint(self, path: Path) -> None:
        if self._upload:
            artifact = self._wandb.Artifact(f"{self._run.id}-{path.name}", type="model")
            artifact.add_dir(str(path))
            self._run.log_artifact(artifact)

    def close(self) -> None:
        self._run.finish()


class TensorBoardSink:
    """Event files under `<run>/tensorboard` (torch's SummaryWriter), for clusters where wandb
    cannot reach the internet. A resumed run purges the events after its checkpoint's step,
    so TensorBoard shows each step once, as metrics.jsonl does."""

    def __init__(self, run_dir: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_step + 1 if resumed_step > 0 else None
        self._writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)

    def save_checkpoint(self, path: Path) -> None:
        self._writer.flush()  # what a checkpoint covers is on disk with it

    def close(self) -> None:
        self._writer.close()


class Sinks:
    """All sinks of rank 0 as one."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def save_checkpoint(self, path: Path) -> None:
        for sink in self.sinks:
            sink.save_checkpoint(path)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(recipe: Recipe, run_dir: Path, resumed_step: int = 0) -> Sinks:
    """The sinks the recipe asks for; `resumed_step`: the step this run continues from."""
    sinks: list[MetricsSink] = [JsonlSink(run_dir / METRICS_FILE)]
    if recipe.logging.wandb:
        sinks.append(WandbSink(recipe, run_dir))
    if recipe.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir, resumed_step))
    return Sinks(sinks)
