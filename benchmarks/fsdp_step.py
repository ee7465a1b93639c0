"""Samples/s and model FLOPs utilisation of our training step under FSDP2, for GPU machines.

Builds a Flamingo of about 1.2B parameters from configs alone (random weights, nothing is
downloaded): an open_clip ViT (frozen), a Llama-style LM (frozen) and OpenFlamingo's perceiver
and gated cross-attention (trained); shards it with the trainer's own `apply_parallelism`
(FSDP2 `fully_shard` per block, bf16 parameters, fp32 reduction) and times
`optimizer_step` on synthetic batches of LAION pairs and 6-image MMC4 documents. FLOPs are
counted once with torch's FlopCounterMode on the unsharded model (forward and backward of
both datasets); MFU is those FLOPs per second over the peak of all GPUs.

    torchrun --nproc-per-node 1 benchmarks/fsdp_step.py                 # one H100/H200
    torchrun --nproc-per-node 8 benchmarks/fsdp_step.py --mmc4-batch 16
    torchrun --nproc-per-node 1 benchmarks/fsdp_step.py --smoke         # tiny, on CPU

Peak bf16 dense FLOP/s is taken from the device name (H100/H200: 989 TFLOP/s, A100: 312) or
from --peak-tflops.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/inspect.py would shadow the standard library's inspect module for scripts here
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
SMOKE_VISION = "bench-smoke-vit"


@dataclass
class Batch:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def build(args: argparse.Namespace) -> Any:
    """The Flamingo model (random weights) with our special tokens at the end of the vocab."""
    import open_clip
    from transformers import LlamaConfig, LlamaForCausalLM

    from flamingo_cli.model.factory import build_vision_encoder
    from flamingo_cli.model.flamingo import FlamingoConfig, FlamingoModel
    from flamingo_cli.model.lm import resize_embeddings
    from flamingo_cli.model.params import set_trainable
    from flamingo_cli.model.tokenizer import SpecialTokens

    vision_name = args.vision
    if args.smoke:
        folder = Path(tempfile.mkdtemp())
        config = {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
            "text_cfg": {
                "context_length": 8,
                "vocab_size": 64,
                "width": 32,
                "heads": 2,
                "layers": 1,
            },
        }
        (folder / f"{SMOKE_VISION}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)
        vision_name = SMOKE_VISION
    vision, _, width = build_vision_encoder(vision_name, None)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4,
            num_hidden_layers=args.layers,
            num_attention_heads=max(args.hidden // 128, 1),
            num_key_value_heads=max(args.hidden // 512, 1),
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    )
    resize_embeddings(lm, args.vocab + 3)
    special = SpecialTokens(image=args.vocab + 1, endofchunk=args.vocab, pad=args.vocab + 2, eos=2)
    layout = FlamingoConfig(cross_attn_every_n_layers=args.cross_attn_every)
    if args.smoke:
        layout = FlamingoConfig(
            perceiver_depth=2, perceiver_latents=8, perceiver_heads=2, perceiver_dim_head=16
        )
    model = FlamingoModel(vision, lm, special, vision_dim=width, config=layout)
    set_trainable(model)
    return model, special


def make_batches(model: Any, args: argparse.Namespace, count: int) -> list[dict[str, Batch]]:
    """Synthetic LAION pairs and MMC4 documents with their OpenFlamingo labels."""
    from flamingo_cli.data.labels import interleaved_labels, pair_labels

    tokens = model.special_tokens
    side = 32 if args.smoke else 224
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, args.vocab, (args.laion_batch, 32), generator=generator)
        ids[:, 0], ids[:, -2], ids[:, -1] = tokens.image, tokens.endofchunk, tokens.eos
        laion = Batch(
            torch.randn(args.laion_batch, 1, 3, side, side, generator=generator),
            ids,
            torch.ones_like(ids),
            pair_labels(ids, tokens),
        )
        docs = torch.randint(3, args.vocab, (args.mmc4_batch, 256), generator=generator)
        for k in range(6):  # <|endofchunk|><image> every 40 tokens
            docs[:, 10 + 40 * k] = tokens.endofchunk
            docs[:, 11 + 40 * k] = tokens.image
        docs[:, -1] = tokens.eos
        mmc4 = Batch(
            torch.randn(args.mmc4_batch, 6, 3, side, side, generator=generator),
            docs,
            torch.ones_like(docs),
            interleaved_labels(docs, tokens),
        )
        out.append({"laion": laion, "mmc4": mmc4})
    return out


def count_flops(model: Any, batches: dict[str, Batch], device: torch.device) -> int:
    """FLOPs of one forward and backward of both datasets, on the unsharded model."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        for batch in batches.values():
            out = model(
                batch.images.to(device),
                batch.input_ids.to(device),
                batch.attention_mask.to(device),
                labels=batch.labels.to(device),
            )
            out.loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="ViT-L-14")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cross-attn-every", type=int, default=4)
    parser.add_argument("--laion-batch", type=int, default=32, help="per GPU")
    parser.add_argument("--mmc4-batch", type=int, default=8, help="per GPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check on a CPU")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.cross_attn_every = 64, 2, 512, 1
        args.laion_batch, args.mmc4_batch, args.steps, args.warmup = 2, 2, 2, 1

    import torch.distributed as dist

    from flamingo_cli.runtime.distributed import apply_parallelism, init_distributed, teardown
    from flamingo_cli.train.loop import LoopConfig, optimizer_step
    from flamingo_cli.train.optim import build_optimizer
    from flamingo_cli.train.run import grad_masks
    from flamingo_cli.train.schedule import build_scheduler

    info = init_distributed(timeout_s=600)
    if not dist.is_initialized():  # FSDP2 needs a process group, even of one rank
        dist.init_process_group(info.backend, rank=0, world_size=1)
    torch.manual_seed(0)
    model, _ = build(args)
    model.to(info.device)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = make_batches(model, args, args.warmup + args.steps)
    flops = count_flops(model, batches[0], info.device)
    wrapped = apply_parallelism(
        model,
        model.shard_units(),
        strategy="fsdp",
        sharding="full",
        precision="bf16",
        info=info,
    )
    optimizer = build_optimizer(wrapped, lr=1e-4, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10**6)
    config = LoopConfig(1, {"laion": 1.0, "mmc4": 1.0}, 1.0, "bf16", grad_masks(model, wrapped))

    def step(batch: dict[str, Batch]) -> None:
        optimizer_step(wrapped, [batch], optimizer, scheduler, config, info, "fsdp")

    for batch in batches[: args.warmup]:
        step(batch)
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    start = time.perf_counter()
    for batch in batches[args.warmup :]:
        step(batch)
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    seconds = (time.perf_counter() - start) / args.steps
    samples = (args.laion_batch + args.mmc4_batch) * info.world_size
    if info.is_main:
        device = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
        print(
            f"{info.world_size} x {device}; {total / 1e6:,.0f}M parameters "
            f"({trained / 1e6:,.0f}M trained); per GPU: {args.laion_batch} pairs + "
            f"{args.mmc4_batch} documents of 6 images and 256 tokens; FSDP2, bf16"
        )
        print(f"step: {seconds * 1000:.1f} ms; {samples / seconds:.1f} samples/s")
        peak = peak_flops(info.device, args.peak_tflops)
        achieved = flops * info.world_size / seconds
        if peak is None:
            print(f"model FLOP/s: {achieved / 1e9:.2f} GFLOP/s (no peak known: --peak-tflops)")
        else:
            mfu = achieved / (peak * info.world_size)
            print(f"model FLOP/s: {achieved / 1e12:.1f} TFLOP/s per run; MFU {mfu:.1%}")
    teardown()


if __name__ == "__main__":
    main()
