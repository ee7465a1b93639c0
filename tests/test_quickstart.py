"""The quickstart: captions that name what the image shows, a safe working directory, and a
shortened end-to-end run in which the images are worth at least 0.3 nats per caption token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import UsageError
from flamingo_cli.quickstart import (
    MARKER,
    STAGES,
    QuickstartSettings,
    prepare_directory,
    run_quickstart,
    train_run,
    write_caption_folder,
)
from flamingo_cli.synthetic import COLORS

runner = CliRunner()


def test_captions_name_the_colour_shown(tmp_path: Path) -> None:
    counts = write_caption_folder(tmp_path, 24, seed=0, size=32, noise=12)
    assert sum(counts.values()) == 24
    for caption_file in sorted(tmp_path.glob("*.txt")):
        _, color, shape = caption_file.read_text().split()
        pixels = np.asarray(Image.open(caption_file.with_suffix(".png")), dtype=np.int16)
        centre = pixels[16, 16]
        assert np.abs(centre - np.array(COLORS[color])).max() <= 12, caption_file.name
        corner = pixels[0, 0]  # grey background, except where a stripe crosses it
        assert shape == "stripe" or np.abs(corner - 128).max() <= 12


def test_directory_must_be_new_or_an_earlier_quickstart(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        prepare_directory(tmp_path)
    result = runner.invoke(app, ["quickstart", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--dir" in result.output and "Traceback" not in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    again = tmp_path / "qs"
    prepare_directory(again)
    (again / "runs").mkdir()
    (again / "runs" / "old").write_text("x")
    prepare_directory(again)  # an earlier quickstart is cleared
    assert (again / MARKER).is_file() and not (again / "runs").exists()


@pytest.mark.slow
def test_shortened_quickstart_learns_to_use_images(tmp_path: Path) -> None:
    settings = QuickstartSettings(
        caption_images=256,
        heldout_images=32,
        mmc4_shards=1,
        mmc4_docs_per_shard=16,
        heldout_docs=8,
        epochs=10,
    )
    seen: list[str] = []
    result = run_quickstart(
        tmp_path / "qs", settings=settings, on_stage=lambda name, what: seen.append(name)
    )
    assert seen == list(STAGES)
    assert [s.name for s in result.stages] == list(STAGES)
    assert result.evaluation is not None
    by_name = {d.dataset: d for d in result.evaluation.datasets}
    assert (by_name["laion"].samples, by_name["mmc4"].samples) == (32, 8)
    gap = result.caption_gap
    assert gap is not None and gap >= 0.3, result.to_dict()
    assert result.passed
    run = tmp_path / "qs" / "runs" / "tiny-cpu"
    # what the CLI's live view is given: the run the train stage wrote, checkpoints and all
    assert train_run(tmp_path / "qs") == ("tiny-cpu", run.resolve())
    assert (run / "export" / "flamingo.pt").is_file()
    assert (run / "FINISHED").read_text().strip() == "80"
