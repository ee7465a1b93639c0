"""Decoding tokens/s: our `model/generation.generate` against OpenFlamingo's `Flamingo.generate`.

Both decode the same weights (built by `benchmarks/train_step.py`'s `build`: the tiny ViT,
perceiver and gated cross-attention before each of 4 Llama layers, hidden 256) from the
same left-padded batch of few-shot captioning prompts (2 demonstrations and the query, 3
images of 64x64 per row, one row with 2), with the KV cache, greedy and with 3 beams and
length penalty 0 (OpenFlamingo's evaluation setting), at most 20 new tokens, stopping at
`<|endofchunk|>`. The gates are opened and the LM head sharpened in both models alike, so
the images matter and near-ties do not decide tokens. The outputs must be the same token
for token; the script fails otherwise.

    python benchmarks/generate.py [--batch 8] [--threads 2] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/inspect.py would shadow the standard library's inspect module for scripts here
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

MAX_NEW = 20
CAPTIONS = ["a red square", "a blue circle with a thin border", "green stripes", "a shape"]


def _train_step() -> Any:
    """benchmarks/train_step.py as a module (its `build` makes both models)."""
    path = Path(__file__).resolve().parent / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Inputs:
    images: torch.Tensor  # (B, N, 3, H, W)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def make_inputs(tokenizer: Any, batch: int, device: torch.device) -> Inputs:
    """Few-shot caption prompts of different lengths, left-padded; row 1 has one shot less."""
    from flamingo_cli.evaluate.prompts import caption_prompt, encode_prompts, with_demonstrations

    texts = []
    for row in range(batch):
        shots = 1 if row == 1 else 2
        demos = [caption_prompt(CAPTIONS[(row + k) % len(CAPTIONS)]) for k in range(shots)]
        texts.append(with_demonstrations(demos, caption_prompt()))
    ids, mask = encode_prompts(tokenizer, texts)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 3, 64, 64, generator=generator)
    images[1, 2] = 0  # row 1 refers to two images: the third is padding
    return Inputs(images.to(device), ids.to(device), mask.to(device))


def prepare(theirs: Any, ours: Any) -> None:
    """Open the gates and sharpen the LM head the same way in both models."""
    with torch.no_grad():
        for layer in theirs.lang_encoder.gated_cross_attn_layers:
            if layer is not None:
                layer.attn_gate.fill_(0.5)
                layer.ff_gate.fill_(0.5)
        theirs.lang_encoder.get_output_embeddings().weight.mul_(20)
        for block in ours.cross_attention_blocks():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
        ours.output_embeddings().weight.mul_(20)
    theirs.eval()
    ours.eval()


def run_openflamingo(model: Any, inputs: Inputs, beams: int, special: Any) -> list[list[int]]:
    """OpenFlamingo 2.0.1's `Flamingo.generate` (Hugging Face's generate underneath), new
    tokens per row with the padding after a stop removed."""
    with torch.inference_mode():
        out = model.generate(
            inputs.images.unsqueeze(2),  # (B, N, F=1, 3, H, W)
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            max_new_tokens=MAX_NEW,
            num_beams=beams,
            eos_token_id=special.endofchunk,
            pad_token_id=special.pad,
            do_sample=False,
            **({"length_penalty": 0.0} if beams > 1 else {}),  # greedy has none
        )
    rows = out[:, inputs.input_ids.shape[1] :].tolist()
    return [_until_stop(row, special.endofchunk) for row in rows]


def _until_stop(row: list[int], stop: int) -> list[int]:
    return row[: row.index(stop) + 1] if stop in row else row


def run_ours(model: Any, inputs: Inputs, beams: int, special: Any) -> list[list[int]]:
    from flamingo_cli.model.generation import DecodeConfig, generate

    config = DecodeConfig(
        max_new_tokens=MAX_NEW,
        num_beams=beams,
        length_penalty=0.0,
        stop_token_ids=(special.endofchunk,),
        pad_token_id=special.pad,
    )
    with torch.inference_mode():
        return generate(model, inputs.images, inputs.input_ids, inputs.attention_mask, config)


def best_time(fn: Callable[[], list[list[int]]], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(
    theirs: Any, ours: Any, inputs: Inputs, beams: int, repeats: int, device: torch.device
) -> tuple[float, float, int]:
    """Seconds of each (best of `repeats`, alternating) and the tokens decoded; fails when
    the outputs differ."""
    special = ours.special_tokens
    expected = run_openflamingo(theirs, inputs, beams, special)
    got = run_ours(ours, inputs, beams, special)
    if got != expected:
        for row, (a, b) in enumerate(zip(got, expected, strict=True)):
            if a != b:
                print(f"row {row}: ours {a}\n        OpenFlamingo {b}")
        raise SystemExit(f"beams={beams}: the outputs differ")
    base, mine = [], []
    for _ in range(repeats):
        base.append(best_time(lambda: run_openflamingo(theirs, inputs, beams, special), device))
        mine.append(best_time(lambda: run_ours(ours, inputs, beams, special), device))
    return min(base), min(mine), sum(len(row) for row in got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    bench = _train_step()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(sys.stdout):
        theirs, ours, tokenizer = bench.build_tiny(Path(tmp))
    prepare(theirs, ours)
    theirs.to(device)
    ours.to(device)
    inputs = make_inputs(tokenizer, args.batch, device)
    print(
        f"{args.device}, threads {args.threads}, batch {args.batch}, prompt "
        f"{inputs.input_ids.shape[1]} tokens (left-padded), 3 images of 64x64 per row, "
        f"<= {MAX_NEW} new tokens, best of {args.repeats}"
    )
    for beams, name in ((1, "greedy"), (3, "beam-3")):
        base, mine, tokens = compare(theirs, ours, inputs, beams, args.repeats, device)
        print(
            f"{name:7s} OpenFlamingo {tokens / base:8.1f} tokens/s ({base * 1000:7.1f} ms)   "
            f"ours {tokens / mine:8.1f} tokens/s ({mine * 1000:7.1f} ms)   "
            f"ratio {base / mine:.2f}x   outputs identical"
        )


if __name__ == "__main__":
    main()
