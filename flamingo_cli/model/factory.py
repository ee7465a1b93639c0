"""Build the Flamingo model, its image transform and tokenizer from a recipe's `model` section."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.flamingo import FlamingoConfig, FlamingoModel
from flamingo_cli.model.lm import resize_embeddings
from flamingo_cli.model.params import set_trainable
from flamingo_cli.model.tokenizer import TINY_TOKENIZER, SpecialTokens, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flamingo_cli.recipe.schema import ModelConfig

TINY_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TINY_VISION = "flamingo-tiny-vit"
TINY_LM = TINY_ASSETS / "lm"
# Smaller Flamingo layers for the tiny preset; real models keep OpenFlamingo's sizes.
TINY_FLAMINGO = FlamingoConfig(
    perceiver_depth=2,
    perceiver_latents=8,
    perceiver_heads=2,
    perceiver_dim_head=32,
    cross_attn_heads=2,
    cross_attn_dim_head=32,
)

# What a vision encoder's preprocessing does: a PIL image to its `(C, H, W)` input tensor.
ImageTransform = Callable[[Image.Image], torch.Tensor]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip logs through the root logger, which installs a stderr handler on first use;
    a temporary null handler keeps its notices ("initialized randomly") off the console."""
    root = logging.getLogger()
    handler = logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(handler)
    try:
        yield
    finally:
        if added:
            root.removeHandler(handler)


def register_tiny_vision() -> None:
    """Make the bundled tiny ViT config known to open_clip (idempotent)."""
    import open_clip

    if TINY_VISION not in open_clip.list_models():
        open_clip.add_model_config(TINY_ASSETS / "open_clip")


def build_vision_encoder(
    name: str, pretrained: str | None
) -> tuple[nn.Module, ImageTransform, int]:
    """The open_clip visual tower returning patch tokens, its validation transform, its width."""
    import open_clip

    register_tiny_vision()
    if pretrained is not None and pretrained.lower() in ("", "none"):
        pretrained = None  # TOML has no null: vision_pretrained = "none" means random weights
    if open_clip.get_model_config(name) is None:
        raise FlamingoError(
            f"unknown open_clip vision encoder {name!r}",
            fix="use a name from open_clip.list_models(), e.g. ViT-L-14",
        )
    try:
        with _quiet_root_logger():
            clip, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except RuntimeError as exc:
        raise FlamingoError(
            f"cannot load open_clip {name!r} with pretrained={pretrained!r}: {exc}",
            fix="give a pretrained tag already in the Hugging Face cache (or unset HF_HUB_OFFLINE), "
            "a local weights file, or vision_pretrained = none for random weights",
        ) from exc
    visual: Any = clip.visual
    visual.output_tokens = True
    width = int(open_clip.get_model_config(name)["vision_cfg"]["width"])
    return visual, transform, width


def tiny_lm() -> nn.Module:
    """The tiny preset's Llama-style LM, randomly initialised from the bundled config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        AutoConfig.from_pretrained(TINY_LM)
    )
    return model


def build_lm(path: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """A pretrained causal LM from a local directory or a name that resolves offline."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=_offline()
        )
    except (OSError, ValueError) as exc:
        raise FlamingoError(
            f"cannot load language model {str(path)!r}: {exc}",
            fix="give a local model directory or a Hugging Face name already in the cache; "
            "set model.trust_remote_code = true only for models that need their own code",
        ) from exc
    result: nn.Module = model
    return result


def assemble(
    vision: nn.Module,
    vision_dim: int,
    lm: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    special_tokens: SpecialTokens,
    config: FlamingoConfig,
) -> FlamingoModel:
    """Resize the LM's embeddings to the tokenizer (ties kept) and join the parts."""
    resize_embeddings(lm, len(tokenizer))
    return FlamingoModel(vision, lm, special_tokens, vision_dim=vision_dim, config=config)


def build_model(
    config: ModelConfig, *, seed: int = 0
) -> tuple[FlamingoModel, ImageTransform, PreTrainedTokenizerBase, SpecialTokens]:
    """Model, open_clip validation transform, tokenizer (our tokens added) and their ids.

    Random initialisation (new Flamingo layers, added embedding rows, tiny backbones) draws
    from a generator seeded with `seed`, so every rank and every later load builds the same
    model; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.preset == "tiny":
            vision, transform, vision_dim = build_vision_encoder(TINY_VISION, None)
            lm = tiny_lm()
            tokenizer, special = load_tokenizer(TINY_TOKENIZER)
            layout = TINY_FLAMINGO
        else:
            if config.lm_path is None:
                raise FlamingoError(
                    "model.lm_path is not set", fix='set model.lm_path or model.preset = "tiny"'
                )
            vision, transform, vision_dim = build_vision_encoder(
                config.vision_encoder, config.vision_pretrained
            )
            lm = build_lm(config.lm_path, trust_remote_code=config.trust_remote_code)
            tokenizer, special = load_tokenizer(
                config.tokenizer_path or config.lm_path, trust_remote_code=config.trust_remote_code
            )
            layout = FlamingoConfig()
        layout = replace(layout, cross_attn_every_n_layers=config.cross_attn_every_n_layers)
        model = assemble(vision, vision_dim, lm, tokenizer, special, layout)
    set_trainable(
        model,
        freeze_lm_embeddings=config.freeze_lm_embeddings,
        train_backbones=config.train_backbones,
    )
    if config.gradient_checkpointing:
        model.set_activation_checkpointing(True)
    return model, transform, tokenizer, special
