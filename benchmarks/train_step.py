"""Optimizer steps per second: our training step against OpenFlamingo's `train_one_epoch`.

Both train the same weights on the same batches in one run, on 2 threads, fp32: batch 4,
6 images of 64x64 per document, 256 tokens, a tiny ViT (2 layers, width 128, patch 8), a
Llama-style LM (4 layers, hidden 256, 4 heads), cross-attention before every layer. The
baseline is OpenFlamingo 2.0.1's own model and its own step function (`train_one_epoch`,
with its label-masking loops); ours is `flamingo_cli.train.loop.optimizer_step` with the
labels computed by `flamingo_cli.data.labels` inside the timed step.

    python benchmarks/train_step.py [--steps 8] [--threads 2] [--mixed]
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/inspect.py would shadow the standard library's inspect module for scripts here
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

VISION = "bench-vit-64"
VISION_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 2, "layers": 1},
}


@dataclass
class Batch:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def make_batches(
    tokenizer: Any, steps: int, seed: int = 0, mixed: bool = False
) -> list[dict[str, Any]]:
    """LAION pairs (4 x 1 image, <= 32 tokens) and documents (4 x 6 images, 256 tokens);
    `mixed`: documents hold 1 to 6 images, zero-padded to 6 as the loaders batch them."""
    generator = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "square", "circle", "stripe", "a", "the", "shape"]
    out = []
    for step in range(steps):
        captions = [
            f"<image>a {words[(step + i) % 3]} {words[3 + i % 3]}<|endofchunk|>{tokenizer.eos_token}"
            for i in range(4)
        ]
        documents = []
        counts = [1 + (step + 2 * i) % 6 if mixed else 6 for i in range(4)]
        for i in range(4):
            parts = []
            for k in range(counts[i]):
                sentence = " ".join(words[(step + i + k + j) % len(words)] for j in range(12))
                parts.append(f"<|endofchunk|><image>{sentence}.")
            documents.append(
                ("Some text first. " + " ".join(parts)).replace("<|endofchunk|>", "", 1)
                + f"<|endofchunk|>{tokenizer.eos_token}"
            )
        tokenizer.padding_side = "right"
        laion = tokenizer(
            captions, max_length=32, truncation=True, padding="longest", return_tensors="pt"
        )
        mmc4 = tokenizer(
            documents, max_length=256, truncation=True, padding="max_length", return_tensors="pt"
        )
        images = torch.randn(4, 6, 3, 64, 64, generator=generator)
        for i, count in enumerate(counts):
            images[i, count:] = 0
        out.append(
            {
                "laion": (torch.randn(4, 1, 3, 64, 64, generator=generator), laion),
                "mmc4": (images, mmc4),
            }
        )
    return out


def build_tiny(root: Path) -> tuple[Any, Any, Any]:
    """`build` on the tiny ViT and a random 4-layer Llama written under `root` (seed 0), with
    the bundled tokenizer (also benchmarks/generate.py's pair)."""
    import open_clip
    from transformers import LlamaConfig, LlamaForCausalLM

    from flamingo_cli.model.tokenizer import TINY_TOKENIZER

    (root / "clip").mkdir()
    (root / "clip" / f"{VISION}.json").write_text(json.dumps(VISION_CONFIG))
    open_clip.add_model_config(root / "clip")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "lm")
    return build(root / "lm", TINY_TOKENIZER)


def build(lm_dir: Path, tokenizer_dir: Path, vision: str = VISION) -> tuple[Any, Any, Any]:
    """OpenFlamingo's model and ours with the same weights, and the tokenizer (also used by
    benchmarks/fsdp_step.py --openflamingo, with another vision tower)."""
    from open_flamingo.src.factory import create_model_and_transforms

    from flamingo_cli.model.factory import assemble, build_lm, build_vision_encoder
    from flamingo_cli.model.flamingo import FlamingoConfig
    from flamingo_cli.model.openflamingo import load_openflamingo_state_dict
    from flamingo_cli.model.params import set_trainable
    from flamingo_cli.model.tokenizer import load_tokenizer

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs, _, _ = create_model_and_transforms(
            vision,
            None,
            str(lm_dir),
            str(tokenizer_dir),
            cross_attn_every_n_layers=1,
            use_local_files=True,
        )
    encoder, _, width = build_vision_encoder(vision, None)
    tokenizer, special = load_tokenizer(tokenizer_dir)
    ours = assemble(encoder, width, build_lm(lm_dir), tokenizer, special, FlamingoConfig())
    load_openflamingo_state_dict(ours, theirs.state_dict())
    set_trainable(ours)
    return theirs, ours, tokenizer


def time_openflamingo(
    model: Any,
    tokenizer: Any,
    batches: list[dict[str, Any]],
    device: Any = "cpu",
    precision: str = "fp32",
) -> float:
    """Seconds per optimizer step of OpenFlamingo's own `train_one_epoch` (on `device` in its
    `precision`, e.g. "amp_bf16" on a GPU)."""
    from open_flamingo.train.train_utils import train_one_epoch

    object.__setattr__(tokenizer, "additional_special_tokens", ["<|endofchunk|>", "<image>"])

    class Loader:
        def __init__(self, items: list[Any]) -> None:
            self.items, self.num_batches = items, len(items)

        def __iter__(self) -> Any:
            return iter(self.items)

    laion = Loader(
        [
            (b["laion"][0].flatten(0, 1), (b["laion"][1].input_ids, b["laion"][1].attention_mask))
            for b in batches
        ]
    )
    mmc4 = Loader(
        [
            (
                b["mmc4"][0],
                [
                    (ids[None], mask[None])
                    for ids, mask in zip(
                        b["mmc4"][1].input_ids, b["mmc4"][1].attention_mask, strict=True
                    )
                ],
            )
            for b in batches
        ]
    )

    class Ddp(torch.nn.Module):  # OpenFlamingo reads model.module when not under FSDP
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs: Any) -> Any:
            return self.module(**kwargs)

    wrapped = Ddp(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "gated_cross_attn" in n]
    rest = [
        p for n, p in model.named_parameters() if p.requires_grad and "gated_cross_attn" not in n
    ]
    assert len(decay) + len(rest) == len(params)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-4
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    args = SimpleNamespace(
        num_epochs=1,
        precision=precision,
        fsdp=False,
        rank=1,
        gradient_accumulation_steps=1,
        loss_multiplier_laion=1.0,
        loss_multiplier_mmc4=1.0,
        freeze_lm_embeddings=False,
        fsdp_use_orig_params=False,
        report_to_wandb=False,
        batch_size_laion=len(batches[0]["laion"][0]),
        batch_size_mmc4=len(batches[0]["mmc4"][0]),
        world_size=1,
        logging_steps=10**9,
        delete_previous_checkpoint=False,
        run_name="bench",
    )
    start = time.perf_counter()
    train_one_epoch(args, wrapped, 0, laion, mmc4, tokenizer, optimizer, scheduler, device, None)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(batches)


def time_ours(model: Any, tokenizer: Any, batches: list[dict[str, Any]]) -> float:
    """Seconds per optimizer step of our `optimizer_step`, labels computed inside the step."""
    from flamingo_cli.data.labels import interleaved_labels, pair_labels
    from flamingo_cli.model.params import embedding_grad_mask
    from flamingo_cli.runtime.distributed import DistInfo
    from flamingo_cli.train.loop import LoopConfig, optimizer_step
    from flamingo_cli.train.optim import build_optimizer
    from flamingo_cli.train.schedule import build_scheduler

    tokens = model.special_tokens
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    scheduler = build_scheduler(
        optimizer, kind="constant", warmup_steps=0, total_steps=len(batches)
    )
    mask = embedding_grad_mask(model)
    config = LoopConfig(
        1,
        {"laion": 1.0, "mmc4": 1.0},
        1.0,
        "fp32",
        [(model.input_embeddings().weight, mask)] if mask is not None else [],
    )
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    model.train()
    # a run counts its model FLOPs once, before its first step (train/loop.py _count_flops):
    # not a per-step cost, so not timed
    config.flops.per_sample.update({"laion": 0.0, "mmc4": 0.0})
    start = time.perf_counter()
    for b in batches:
        laion_images, laion_text = b["laion"]
        mmc4_images, mmc4_text = b["mmc4"]
        window = [
            {
                "laion": Batch(
                    laion_images,
                    laion_text.input_ids,
                    laion_text.attention_mask,
                    pair_labels(laion_text.input_ids, tokens),
                ),
                "mmc4": Batch(
                    mmc4_images,
                    mmc4_text.input_ids,
                    mmc4_text.attention_mask,
                    interleaved_labels(mmc4_text.input_ids, tokens),
                ),
            }
        ]
        optimizer_step(model, window, optimizer, scheduler, config, info, "none")
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="documents with 1 to 6 images, zero-padded to 6 (as real MMC4 batches)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours, tokenizer = build_tiny(Path(tmp))
        batches = make_batches(tokenizer, args.steps + args.warmup, mixed=args.mixed)
        warm, timed = batches[: args.warmup], batches[args.warmup :]
        time_openflamingo(theirs, tokenizer, warm)
        time_ours(ours, tokenizer, warm)
        results = {"openflamingo": [], "ours": []}
        for _ in range(3):  # alternate, keep the best of three
            results["openflamingo"].append(time_openflamingo(theirs, tokenizer, timed))
            results["ours"].append(time_ours(ours, tokenizer, timed))
    base, mine = min(results["openflamingo"]), min(results["ours"])
    images = "1-6 images per document, padded to 6" if args.mixed else "6 images per document"
    print(f"threads {args.threads}, {args.steps} steps per pass, best of 3, {images}")
    print(f"OpenFlamingo train_one_epoch: {1 / base:6.2f} steps/s ({base * 1000:7.1f} ms/step)")
    print(f"flamingo optimizer_step:      {1 / mine:6.2f} steps/s ({mine * 1000:7.1f} ms/step)")
    print(f"ratio (ours / OpenFlamingo):  {base / mine:.2f}x")


if __name__ == "__main__":
    main()
