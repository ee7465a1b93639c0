"""A tiny model trained here on interleaved documents written in OpenFlamingo's VQA prompt
format answers held-out questions 4-shot through eval-fewshot with at least twice the
accuracy it gets with its images removed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.data.labels import IGNORE
from flamingo_cli.evaluate.prompts import vqa_prompt, with_demonstrations
from flamingo_cli.model.factory import build_model
from flamingo_cli.model.tokenizer import ENDOFCHUNK
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.synthetic import COLORS, SHAPES, VQA_QUESTIONS, shape_image, write_vqav2

runner = CliRunner()
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.toml"
TRAINABLE = [parse_override("model.train_backbones=true")]


Doc = tuple[list[Any], str, list[tuple[int, int]]]


def _documents(count: int, per_doc: int, seed: int) -> list[Doc]:
    """Documents of `per_doc` (image, question, answer) items as VQA prompts joined by
    newlines, with their images and the character spans of the answers."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        images, prompts, spans, text = [], [], [], ""
        for n in range(per_doc):
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            images.append(shape_image(color, shape, 32, rng, noise=12))
            k = rng.randrange(2)
            question, answer = VQA_QUESTIONS[k], (color, shape)[k]
            prompts.append(vqa_prompt(question, answer))
            text += ("\n" if n else "") + vqa_prompt(question)
            spans.append((len(text), len(text) + len(answer) + len(ENDOFCHUNK)))
            text += answer + ENDOFCHUNK
        assert text == with_demonstrations(prompts[:-1], prompts[-1])
        docs.append((images, text, spans))
    return docs


def _answer_labels(encoded: Any, docs: list[Doc], image: int) -> torch.Tensor:
    """Targets: only the answers and their `<|endofchunk|>` (the rest is -100)."""
    labels = torch.full_like(encoded.input_ids, IGNORE)
    for row, (_, _, spans) in enumerate(docs):
        for col, (start, end) in enumerate(encoded.offset_mapping[row].tolist()):
            if end > start and any(a <= start < b for a, b in spans):
                labels[row, col] = encoded.input_ids[row, col]
    return labels.masked_fill(encoded.input_ids == image, IGNORE)


def _train(out: Path, steps: int = 120, batch: int = 8) -> None:
    """Train every parameter of the tiny model on VQA-format documents; save flamingo.pt."""
    torch.manual_seed(0)
    model, transform, tokenizer, special = build_model(
        load_recipe(RECIPE, TRAINABLE).recipe.model, seed=0
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    docs = _documents(steps * batch, 5, seed=1)
    for step in range(steps):
        chunk = docs[step * batch : (step + 1) * batch]
        images = torch.stack([torch.stack([transform(i) for i in imgs]) for imgs, _, _ in chunk])
        texts = [text for _, text, _ in chunk]
        encoded = tokenizer(
            texts, padding="longest", return_tensors="pt", return_offsets_mapping=True
        )
        labels = _answer_labels(encoded, chunk, special.image)
        loss = model(images, encoded.input_ids, encoded.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * (1 - step / steps)
    torch.save(model.state_dict(), out)


@pytest.mark.slow
def test_vqa_four_shot_uses_the_images(tmp_path: Path) -> None:
    weights = tmp_path / "flamingo.pt"
    _train(weights)
    write_vqav2(tmp_path / "vqa", train=32, test=24, seed=3, size=32, noise=12)
    result = runner.invoke(
        app,
        [
            "eval-fewshot",
            str(RECIPE),
            "--checkpoint",
            str(weights),
            "--set",
            "model.train_backbones=true",
            "--task",
            "vqav2",
            "--data",
            str(tmp_path / "vqa"),
            "--shots",
            "4",
            "--ablate-images",
            "none",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    shot = json.loads(result.stdout)["results"][0]
    assert shot["samples"] == 48
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    shown = [(x["prediction"], x["references"][0]) for x in map(json.loads, lines[:12])]
    assert shot["mean"] >= 50, shown
    assert shot["mean"] >= 2 * shot["ablated_mean"], (shot, shown)
