"""Hostile input to `flamingo status`, `flamingo generate` and `flamingo eval-fewshot`: each
case ends with a message naming the file, key or sample and a fix (exit 1 or 2), or with a
result that skips and counts, never with a traceback, a hang or unbounded memory."""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import FlamingoError
from flamingo_cli.monitor.metrics_file import MAX_LINE, MetricsTail, read_metrics
from flamingo_cli.monitor.status import METRICS_FILE
from flamingo_cli.runtime.run_lock import acquire_run_lock
from flamingo_cli.synthetic import encode, shape_image, write_coco_karpathy, write_vqav2

from .conftest import RECIPES
from .test_status import fake_run

RECIPE = RECIPES / "tiny-cpu.toml"

runner = CliRunner()


def _no_traceback(result: Any) -> str:
    """The output of a run that ended by itself (no exception escaped the command)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def _strict(text: str) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} in --json output")

    return json.loads(text, parse_constant=refuse)


# --- status ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_status_of_a_sparse_2_gib_metrics_file_reads_in_bounded_memory(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    with (run_dir / METRICS_FILE).open("ab") as handle:
        handle.truncate(2 * 1024**3)  # a hole: 2 GiB of NUL bytes with no newline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    found = read_metrics(run_dir / METRICS_FILE)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert (len(found.rows), found.bad_lines, found.partial_line) == (16, 1, False)
    assert grown_mib < 64, f"reading grew the process by {grown_mib:.0f} MiB"
    assert time.perf_counter() - start < 30
    data = _strict(runner.invoke(app, ["status", str(run_dir), "--json"]).stdout)
    assert (data["step"], data["ignored_lines"]) == (16, 1)


def test_an_overlong_line_is_counted_once_and_the_rows_after_it_kept(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    tail = MetricsTail(path)
    path.write_bytes(b'{"step": 1}\n' + b"x" * (MAX_LINE + 10))
    assert tail.read() == [{"step": 1}]
    with path.open("ab") as handle:
        handle.write(b"y" * (3 * MAX_LINE) + b'\n{"step": 2}\n')
    assert tail.read() == [{"step": 2}]
    assert tail.read_so_far.bad_lines == 1


def test_garbage_lists_and_negative_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    with (run_dir / METRICS_FILE).open("ab") as handle:
        handle.write(os.urandom(3000).replace(b"\n", b" ") + b"\n\xff\xfe\x00\n")
        handle.write(b'[1, 2]\n"text"\n{"step": "7"}\n{"step": -5, "loss/laion": 1.0}\n')
    data = _strict(runner.invoke(app, ["status", str(run_dir), "--json"]).stdout)
    assert (data["step"], data["ignored_lines"]) == (16, 6)
    text = _no_traceback(runner.invoke(app, ["status", str(run_dir)]))
    assert "note: 6 line(s) of metrics.jsonl are not metrics rows" in text


def test_non_finite_values_show_and_json_stays_json(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    row = (
        '{"step": 17, "loss/laion": NaN, "loss/mmc4": Infinity, "samples_per_s": -Infinity, '
        '"epoch": Infinity, "dropped/laion/bad_image": NaN, "dropped/mmc4/bad_image": 1e400}\n'
    )
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(row)
    result = runner.invoke(app, ["status", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = _strict(result.stdout)
    assert data["datasets"]["laion"]["loss"] is None  # NaN: JSON has no NaN
    assert data["datasets"]["mmc4"]["loss"] is None
    assert (data["datasets"]["laion"]["dropped"], data["epoch"], data["step"]) == (0, None, 17)
    assert data["last_metrics"]["samples_per_s"] is None
    text = _no_traceback(runner.invoke(app, ["status", str(run_dir)]))
    assert "laion nan" in text and "mmc4 inf" in text


def test_a_file_given_as_the_run_dir_is_named(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    target.write_text('{"step": 1}\n', encoding="utf-8")
    result = runner.invoke(app, ["status", str(target)])
    assert result.exit_code == 1
    text = _no_traceback(result)
    assert f"{target} is a file, not a run directory or a recipe (.toml)" in text
    assert "fix: give a run directory" in text


def test_a_non_utf8_run_dir_name_prints(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe"))
    run_dir = fake_run(odd)
    result = runner.invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path}/\\udcff\\udcfe/tiny-cpu" in "".join(result.output.split())
    assert "finished at step 16" in result.output


def test_a_damaged_finished_file_and_kept_recipe_do_not_stop_status(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    (run_dir / "FINISHED").write_text("١٢", encoding="utf-8")  # digits, not ASCII ones
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    (newest / "recipe.toml").write_text("[[[ not toml", encoding="utf-8")
    (newest / "meta.json").write_text("{broken", encoding="utf-8")
    result = runner.invoke(app, ["status", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = _strict(result.stdout)
    assert (data["detail"], data["total_steps"], data["recipe"]) == (
        "finished at step 16",
        0,
        None,
    )


def test_follow_on_a_run_dir_deleted_meanwhile_stops_with_a_message(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=10, checkpoints=(8,), finished=False)
    lock = acquire_run_lock(run_dir)

    def delete() -> None:
        time.sleep(0.5)
        lock.release()
        shutil.rmtree(run_dir)

    thread = threading.Thread(target=delete)
    thread.start()
    result = runner.invoke(app, ["status", str(run_dir), "--follow", "--interval", "0.1"])
    thread.join()
    assert result.exit_code == 1
    text = _no_traceback(result)
    assert f"{run_dir} is gone: it was removed or moved while status read it" in text


# --- generate and eval-fewshot: a tiny model's weights and data -------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe's model as built, exported as flamingo.pt."""
    import torch

    from flamingo_cli.model.factory import build_model
    from flamingo_cli.recipe.load import load_recipe

    model, *_ = build_model(load_recipe(RECIPE).recipe.model, seed=0)
    path = tmp_path_factory.mktemp("weights") / "flamingo.pt"
    torch.save(model.state_dict(), path)
    return path


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A 60-byte PNG whose header declares `width` x `height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))
    return path


def _generate(weights: Path, *args: str) -> Any:
    return runner.invoke(app, ["generate", str(RECIPE), "--checkpoint", str(weights), *args])


def test_generate_refuses_what_it_cannot_decode_with_the_option_and_a_fix(
    weights: Path, tmp_path: Path
) -> None:
    red = tmp_path / "red.png"
    red.write_bytes(encode(shape_image("red", "square", 32, random.Random(0)), "PNG"))
    empty, text = tmp_path / "empty.png", tmp_path / "text.png"
    empty.write_bytes(b"")
    text.write_text("hello", encoding="utf-8")
    caption = ["--task", "caption", "--image", str(red)]
    cases: list[tuple[list[str], int, str]] = [
        (["--task", "caption", "--image", str(empty)], 1, f"image {empty}: the file is empty"),
        (["--task", "caption", "--image", str(text)], 1, "not an image Pillow can identify"),
        ([*caption, "--sample", "--temperature", "nan"], 2, "--temperature nan: not a finite"),
        ([*caption, "--sample", "--temperature", "inf"], 2, "--temperature inf: not a finite"),
        ([*caption, "--num-beams", "2", "--length-penalty", "nan"], 2, "--length-penalty nan"),
        ([*caption, "--min-new-tokens", "30", "--max-new-tokens", "2"], 2, "is over --max-new"),
        (
            [*caption, "--max-new-tokens", "1000000000"],
            2,
            "--max-new-tokens 1,000,000,000 after a prompt of 7 tokens is over the 512 "
            "positions of the language model fix: give --max-new-tokens 505 or less",
        ),
        (
            [*caption, "--num-beams", "3", "--max-new-tokens", "1000000000"],
            2,
            "over the 512 positions",
        ),
    ]
    for args, code, message in cases:
        result = _generate(weights, *args)
        assert result.exit_code == code, (args, result.output)
        assert message in _no_traceback(result), (args, result.output)
    assert "BytesIO" not in _generate(weights, "--task", "caption", "--image", str(text)).output


def test_generate_with_a_bomb_shot_a_symlink_loop_and_a_crafted_pickle(
    weights: Path, tmp_path: Path
) -> None:
    red = tmp_path / "red.png"
    red.write_bytes(encode(shape_image("red", "square", 32, random.Random(0)), "PNG"))
    bomb = png_bomb(tmp_path / "bomb.png")
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {ran}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    caption = ["--task", "caption", "--image", str(red)]
    result = _generate(weights, *caption, "--shot", str(bomb), "a bomb")
    assert result.exit_code == 1
    assert f"image {bomb}: 10,000,000,000 pixels is over the cap" in _no_traceback(result)
    result = _generate(weights, "--task", "caption", "--image", str(loop))
    assert result.exit_code == 1
    assert f"cannot read image {loop}: Too many levels of symbolic links" in _no_traceback(result)
    result = runner.invoke(app, ["generate", str(RECIPE), "--checkpoint", str(evil), *caption])
    assert result.exit_code == 1
    assert "nothing from it was run" in _no_traceback(result)
    assert not ran.exists()


def _fewshot(weights: Path, data: Path, out: Path, *extra: str, task: str = "coco") -> Any:
    args = ["eval-fewshot", str(RECIPE), "--checkpoint", str(weights), "--task", task]
    args += ["--data", str(data), "--shots", "0", "--num-beams", "1", "--max-new-tokens", "2"]
    return runner.invoke(app, [*args, "--out", str(out), *extra])


def test_fewshot_refuses_bad_data_before_the_model_loads(weights: Path, tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    write_coco_karpathy(coco, train=4, test=2, size=16)
    deep = tmp_path / "deep"
    shutil.copytree(coco, deep)
    (deep / "dataset_coco.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    bombs = tmp_path / "bombs"
    shutil.copytree(coco, bombs)
    train_image = sorted((bombs / "train2014").iterdir())[0]
    png_bomb(train_image)
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    cases: list[tuple[Path, list[str], str]] = [
        (deep, [], f"{deep / 'dataset_coco.json'}: JSON nested too deep to read"),
        (
            bombs,
            [],
            f"image {train_image} of train sample 100000: 10,000,000,000 pixels is over the cap "
            "of 40,000,000 (max_image_pixels) fix: resize the image",
        ),
        (coco, ["--out", str(blocker / "out")], f"cannot write the results into {blocker}"),
    ]
    for data, extra, message in cases:
        result = _fewshot(weights, data, tmp_path / "out", *extra)
        assert result.exit_code == 1, (data, result.output)
        text = _no_traceback(result)
        assert message in text, (data, text)
        assert "trial" not in text  # nothing was evaluated, so nothing is lost
    result = _fewshot(weights, coco, tmp_path / "out", "--max-new-tokens", "1000000000")
    assert result.exit_code == 2
    assert "--max-new-tokens 1,000,000,000 is over the 512 positions" in _no_traceback(result)


def test_fewshot_vqa_answers_and_ids_that_cannot_be_scored(weights: Path, tmp_path: Path) -> None:
    vqa = tmp_path / "vqa"
    write_vqav2(vqa, train=4, test=2, size=16)

    def edited(name: str, file: str, change: Any) -> Path:
        root = tmp_path / name
        shutil.copytree(vqa, root)
        path = next(root.glob(f"*{file}.json"))
        content = json.loads(path.read_text(encoding="utf-8"))
        change(content)
        path.write_text(json.dumps(content), encoding="utf-8")
        return root

    no_answers = edited(
        "none", "train2014_annotations", lambda c: c["annotations"][0].update(answers=[])
    )
    repeated = edited(
        "twice", "val2014_questions", lambda c: c["questions"].append(dict(c["questions"][0]))
    )
    qid = json.loads(next(vqa.glob("*val2014_questions.json")).read_text())["questions"][0]
    cases = [
        (no_answers, "v2_mscoco_train2014_annotations.json: annotations[0]: 'answers' is empty"),
        (
            repeated,
            f"v2_OpenEnded_mscoco_val2014_questions.json: test sample id "
            f"{qid['question_id']} appears more than once",
        ),
    ]
    for data, message in cases:
        result = _fewshot(weights, data, tmp_path / "out", task="vqav2")
        assert result.exit_code == 1, result.output
        assert message in _no_traceback(result)


@pytest.mark.parametrize("content", [b"", b"hello\n", b"\x80\x02"])
def test_a_rices_cache_that_is_no_torch_file_is_named_with_the_fix(
    tmp_path: Path, content: bytes
) -> None:
    from flamingo_cli.evaluate.fewshot.rices import RicesConfig, _read_cache

    cache = tmp_path / "features.pt"
    cache.write_bytes(content)
    with pytest.raises(FlamingoError) as caught:
        _read_cache(RicesConfig(cache=cache), ["a", "b"])
    assert caught.value.message.startswith(f"cannot read the RICES feature cache {cache}: ")
    assert caught.value.fix == "delete the file; it is written again"
