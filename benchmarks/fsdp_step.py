"""Samples/s, tokens/s, MFU and peak memory of our training step under FSDP2, for GPU machines.

The default shape is OpenFlamingo-3B's, from configs alone (random weights, nothing is
downloaded): an open_clip ViT-L/14 (frozen), a 1B Llama-style LM (24 layers, hidden 2048,
frozen), OpenFlamingo's perceiver and a gated cross-attention before every decoder layer
(trained). The trainer's own `apply_parallelism` shards it (FSDP2 `fully_shard` per block, bf16
parameters, fp32 reduction; `--compile` compiles each repeated block first), and
`optimizer_step` runs on synthetic batches of LAION pairs (32 tokens) and 6-image MMC4
documents (256 tokens). Model FLOPs are counted by the step itself (train/flops.py), MFU is
against the device's dense bf16 peak (the table in train/flops.py, or --peak-tflops).

`--openflamingo` builds OpenFlamingo 2.0.1's model and ours with the same weights (through
benchmarks/train_step.py, the tokenizer-sized vocabulary then) and times OpenFlamingo's own
`train_one_epoch` (amp_bf16 on a GPU, fp32 on a CPU) on the same batches, for the ratio.
`--sync-check` runs one more step with any host-device sync but the step's one read raising.

    torchrun --nproc-per-node 1 benchmarks/fsdp_step.py [--compile] [--openflamingo]
    torchrun --nproc-per-node 8 benchmarks/fsdp_step.py --mmc4-batch 16
    python benchmarks/fsdp_step.py --smoke [--compile] [--openflamingo]   # tiny, on a CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/inspect.py would shadow the standard library's inspect module for scripts here
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

SMOKE_VISION = "bench-smoke-vit"
SMOKE_VISION_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@dataclass
class Batch:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="ViT-L-14")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cross-attn-every", type=int, default=1)
    parser.add_argument("--laion-batch", type=int, default=32, help="per GPU")
    parser.add_argument("--mmc4-batch", type=int, default=8, help="per GPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="run.compile = true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--openflamingo", action="store_true", help="also OpenFlamingo's step")
    parser.add_argument("--sync-check", action="store_true", help="one step, syncs raising")
    parser.add_argument("--json", type=Path, default=None, help="append the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check on a CPU")
    args = parser.parse_args()
    if args.smoke:
        args.vision, args.hidden, args.layers, args.vocab = SMOKE_VISION, 64, 2, 512
        args.laion_batch, args.mmc4_batch, args.steps, args.warmup = 2, 2, 2, 1
    if args.compile:  # the first step counts FLOPs eagerly, the second compiles
        args.warmup = max(args.warmup, 2)
    return args


def register_smoke_vision() -> None:
    import open_clip

    folder = Path(tempfile.mkdtemp())
    (folder / f"{SMOKE_VISION}.json").write_text(json.dumps(SMOKE_VISION_CONFIG))
    open_clip.add_model_config(folder)


def llama(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4,
            num_hidden_layers=args.layers,
            num_attention_heads=max(args.hidden // 128, 1),
            num_key_value_heads=max(args.hidden // 512, 1),
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    )


def build(args: argparse.Namespace) -> Any:
    """Our Flamingo model (random weights) with our special tokens at the end of the vocab."""
    from flamingo_cli.model.factory import build_vision_encoder
    from flamingo_cli.model.flamingo import FlamingoConfig, FlamingoModel
    from flamingo_cli.model.lm import resize_embeddings
    from flamingo_cli.model.params import set_trainable
    from flamingo_cli.model.tokenizer import SpecialTokens

    vision, _, width = build_vision_encoder(args.vision, None)
    lm = llama(args)
    resize_embeddings(lm, args.vocab + 3)
    special = SpecialTokens(image=args.vocab + 1, endofchunk=args.vocab, pad=args.vocab + 2, eos=2)
    layout = FlamingoConfig(cross_attn_every_n_layers=args.cross_attn_every)
    model = FlamingoModel(vision, lm, special, vision_dim=width, config=layout)
    set_trainable(model)
    return model


def train_step() -> Any:
    """benchmarks/train_step.py as a module (this folder is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location(
        "train_step", Path(__file__).parent / "train_step.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_pair(args: argparse.Namespace, root: Path) -> tuple[Any, Any, Any]:
    """OpenFlamingo's model and ours on the same weights and tokenizer (benchmarks/train_step)."""
    from flamingo_cli.model.tokenizer import TINY_TOKENIZER

    llama(args).save_pretrained(root / "lm")
    return train_step().build(root / "lm", TINY_TOKENIZER, vision=args.vision)


def make_batches(model: Any, args: argparse.Namespace, count: int) -> list[dict[str, Batch]]:
    """Synthetic LAION pairs and MMC4 documents with their OpenFlamingo labels."""
    from flamingo_cli.data.labels import interleaved_labels, pair_labels

    tokens = model.special_tokens
    high = min(tokens.image, tokens.endofchunk, tokens.pad)
    side = 32 if args.smoke else 224
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, high, (args.laion_batch, 32), generator=generator)
        ids[:, 0], ids[:, -2], ids[:, -1] = tokens.image, tokens.endofchunk, tokens.eos
        images = torch.randn(args.laion_batch, 1, 3, side, side, generator=generator)
        laion = Batch(images, ids, torch.ones_like(ids), pair_labels(ids, tokens))
        docs = torch.randint(3, high, (args.mmc4_batch, 256), generator=generator)
        for k in range(6):  # <|endofchunk|><image> every 40 tokens
            docs[:, 10 + 40 * k] = tokens.endofchunk
            docs[:, 11 + 40 * k] = tokens.image
        docs[:, -1] = tokens.eos
        images = torch.randn(args.mmc4_batch, 6, 3, side, side, generator=generator)
        mmc4 = Batch(images, docs, torch.ones_like(docs), interleaved_labels(docs, tokens))
        if torch.cuda.is_available():  # as the loaders hand them out
            laion, mmc4 = (
                Batch(*(t.pin_memory() for t in vars(b).values())) for b in (laion, mmc4)
            )
        out.append({"laion": laion, "mmc4": mmc4})
    return out


def timed(step: Callable[[Any], Any], batches: list[Any], device: torch.device) -> float:
    """Seconds per step over `batches`, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(batches)


def sync_check(step: Callable[[], Any]) -> str:
    """Run one step with host-device syncs raising, except in the step's one read."""
    from flamingo_cli.train import loop

    read = loop._read_once

    def allowed(*args: Any) -> Any:
        torch.cuda.set_sync_debug_mode(0)
        try:
            return read(*args)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    loop._read_once = allowed  # type: ignore[assignment]
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:  # where: the innermost frames outside torch
        frames = [
            f"{Path(f.filename).name}:{f.lineno} {f.name}"
            for f in traceback.extract_tb(error.__traceback__)
            if "/torch/" not in f.filename
        ]
        return f"synced: {str(error).splitlines()[0]} at {' < '.join(reversed(frames[-3:]))}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        loop._read_once = read  # type: ignore[assignment]
    return "no host sync but the step's one read"


def run_ours(model: Any, args: argparse.Namespace, info: Any, batches: list[Any]) -> dict[str, Any]:
    """Our step under FSDP2 (bf16), eager or compiled: seconds, FLOPs, memory."""
    from flamingo_cli.runtime.distributed import apply_parallelism, repeated_blocks
    from flamingo_cli.runtime.precision import use_tf32
    from flamingo_cli.train.loop import LoopConfig, optimizer_step
    from flamingo_cli.train.optim import build_optimizer
    from flamingo_cli.train.run import grad_masks
    from flamingo_cli.train.schedule import build_scheduler

    use_tf32("bf16", info.device)
    model.set_activation_checkpointing(args.gradient_checkpointing)
    model.to(info.device)
    compiled = repeated_blocks(model) if args.compile else ()
    wrapped = apply_parallelism(
        model, model.shard_units(), strategy="fsdp", sharding="full", precision="bf16",
        info=info, compiled=compiled,
    )  # fmt: skip
    optimizer = build_optimizer(wrapped, lr=1e-4, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=10**6)
    config = LoopConfig(1, {"laion": 1.0, "mmc4": 1.0}, 1.0, "bf16", grad_masks(model, wrapped))
    last: list[Any] = []

    def step(batch: dict[str, Batch]) -> None:
        result = optimizer_step(wrapped, [batch], optimizer, scheduler, config, info, "fsdp")
        last[:] = [result]

    for batch in batches[: args.warmup]:  # compiles, counts the FLOPs
        step(batch)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    seconds = timed(step, batches[args.warmup :], info.device)
    found: dict[str, Any] = {
        "seconds": seconds,
        "model_flops": last[0].model_flops,
        "memory_peak_gib": torch.cuda.max_memory_allocated(info.device) / 2**30
        if info.device.type == "cuda"
        else None,
    }
    if args.sync_check and info.device.type == "cuda":
        found["sync_check"] = sync_check(lambda: step(batches[-1]))
    return found


def run_openflamingo(theirs: Any, tokenizer: Any, info: Any, batches: list[Any]) -> float:
    """Seconds per step of OpenFlamingo's own train_one_epoch on the same batches."""
    if importlib.util.find_spec("wandb") is None:  # OpenFlamingo imports it, uses it not here
        sys.modules["wandb"] = types.ModuleType("wandb")
    time_openflamingo = train_step().time_openflamingo
    theirs.to(info.device)
    theirs.train()
    text = [
        {
            name: (
                b.images,
                SimpleNamespace(input_ids=b.input_ids, attention_mask=b.attention_mask),
            )
            for name, b in batch.items()
        }
        for batch in batches
    ]
    precision = "amp_bf16" if info.device.type == "cuda" else "fp32"
    warm = max(1, len(text) // 4)
    time_openflamingo(theirs, tokenizer, text[:warm], info.device, precision)
    return time_openflamingo(theirs, tokenizer, text[warm:], info.device, precision)


def report(
    args: argparse.Namespace, info: Any, ours: dict[str, Any], batches: list[Any]
) -> dict[str, Any]:
    """The figures of the run, from rank 0's step (per GPU) and the world size."""
    from flamingo_cli.train.flops import peak_tflops

    seconds = ours["seconds"]
    samples = (args.laion_batch + args.mmc4_batch) * info.world_size
    tokens = sum(int(b.attention_mask.sum()) for b in batches[0].values()) * info.world_size
    device = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
    peak = peak_tflops(info.device, args.peak_tflops)
    tflops = ours["model_flops"] / seconds / 1e12 if ours["model_flops"] else None
    return {
        "device": device,
        "world_size": info.world_size,
        "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing,
        "shape": {k: getattr(args, k) for k in ("vision", "hidden", "layers", "vocab")},
        "laion_batch": args.laion_batch,
        "mmc4_batch": args.mmc4_batch,
        "step_ms": seconds * 1000,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if tflops is not None and peak else None,
        "memory_peak_gib": ours["memory_peak_gib"],
        "sync_check": ours.get("sync_check"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    args = parse()
    if args.smoke:
        register_smoke_vision()

    import torch.distributed as dist

    from flamingo_cli.runtime.distributed import init_distributed, teardown

    info = init_distributed(timeout_s=600)
    if not dist.is_initialized():  # FSDP2 needs a process group, even of one rank
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(info.backend, rank=0, world_size=1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = tokenizer = None
        if args.openflamingo:
            theirs, model, tokenizer = build_pair(args, Path(tmp))
        else:
            model = build(args)
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        batches = make_batches(model, args, args.warmup + args.steps)
        figures = report(args, info, run_ours(model, args, info, batches), batches)
        if theirs is not None:
            del model
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
            base = run_openflamingo(theirs, tokenizer, info, batches)
            figures["openflamingo_step_ms"] = base * 1000
            figures["ratio"] = base * 1000 / figures["step_ms"]
    figures["parameters_m"], figures["trained_m"] = total / 1e6, trained / 1e6
    if info.is_main:
        print_figures(figures)
        if args.json is not None:
            with args.json.open("a", encoding="utf-8") as out:
                out.write(json.dumps(figures) + "\n")
    teardown()


def print_figures(f: dict[str, Any]) -> None:
    mode = "compiled" if f["compile"] else "eager"
    print(
        f"{f['world_size']} x {f['device']}; {f['parameters_m']:,.0f}M parameters "
        f"({f['trained_m']:,.0f}M trained); per GPU: {f['laion_batch']} pairs + "
        f"{f['mmc4_batch']} documents of 6 images and 256 tokens; FSDP2, bf16, {mode}"
    )
    print(
        f"step: {f['step_ms']:.1f} ms; {f['samples_per_s']:.1f} samples/s; "
        f"{f['tokens_per_s']:,.0f} tokens/s"
    )
    if f["tflops_per_gpu"] is not None:
        mfu = f"MFU {f['mfu']:.1%}" if f["mfu"] is not None else "MFU: no peak known"
        print(f"model FLOP/s per GPU: {f['tflops_per_gpu']:.3f} TFLOP/s; {mfu}")
    if f["memory_peak_gib"] is not None:
        print(f"peak memory: {f['memory_peak_gib']:.1f} GiB")
    if f.get("sync_check"):
        print(f"sync check: {f['sync_check']}")
    if "ratio" in f:
        print(
            f"OpenFlamingo train_one_epoch: {f['openflamingo_step_ms']:.1f} ms/step; "
            f"ours / OpenFlamingo: {f['ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
