"""Translate an OpenFlamingo `train.py` launch command into an equivalent recipe."""

from __future__ import annotations

import argparse
import difflib
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from flamingo_cli.errors import Problem, UsageError
from flamingo_cli.recipe.toml_write import dumps
from flamingo_cli.shards.spec import split_spec, url_kind

SOURCE = "from --from-openflamingo"
_MODULE = "open_flamingo.train.train"
_PRECISION = {"amp_bfloat16": "amp_bf16"}
# Flags OpenFlamingo has that need no recipe value: we pick the backend and device ourselves.
_IGNORED = ("dist_url", "dist_backend", "no_set_device_rank", "fsdp_use_orig_params", "local_rank")


@dataclass(frozen=True)
class OpenFlamingoImport:
    """The recipe equivalent to a command, as data and TOML, and what did not translate."""

    data: dict[str, Any]
    toml: str
    problems: list[Problem]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"cannot parse the OpenFlamingo command: {message}")


def _parser() -> _Parser:
    """OpenFlamingo's train.py flags with its argparse defaults (both spellings it has used)."""
    p = _Parser(prog="train.py", add_help=False, allow_abbrev=False)
    _add_model_and_optim_flags(p.add_argument)
    _add_data_flags(p.add_argument)
    _add_launch_and_logging_flags(p.add_argument)
    return p


def _add_model_and_optim_flags(add: Callable[..., object]) -> None:
    add("--vision_encoder_path", default="ViT-L-14")
    add("--vision_encoder_pretrained", default="openai")
    add("--lm_path", default="facebook/opt-1.3b")
    add("--tokenizer_path", default="facebook/opt-30b")
    add("--cross_attn_every_n_layers", type=int, default=1)
    add("--run_name", default="openflamingo3B")
    add("--resume_from_checkpoint", default=None)
    add("--delete_previous_checkpoint", action="store_true")
    add(
        "--batch_size_mmc4",
        "--batch_size_interleaved",
        dest="batch_size_mmc4",
        type=int,
        default=128,
    )
    add("--batch_size_laion", type=int, default=128)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--seed", type=int, default=42)
    add("--learning_rate", type=float, default=1e-4)
    add("--lr_scheduler", default="constant")
    add(
        "--loss_multiplier_mmc4",
        "--loss_multiplier_interleaved",
        dest="loss_multiplier_mmc4",
        type=float,
        default=1.0,
    )
    add("--loss_multiplier_laion", type=float, default=1.0)
    add("--warmup_steps", type=int, default=5000)
    add("--weight_decay", type=float, default=0.1)
    add("--precision", default="fp32", choices=["amp_bf16", "amp_bfloat16", "bf16", "fp16", "fp32"])
    add("--gradient_checkpointing", action="store_true")
    add("--num_epochs", type=int, default=1)
    add("--offline", action="store_true")
    add("--freeze_lm_embeddings", action="store_true")
    add("--logging_steps", type=int, default=100)


def _add_data_flags(add: Callable[..., object]) -> None:
    add("--laion_shards", default=None)
    add("--mmc4_shards", default=None)
    add("--workers", type=int, default=1)
    add(
        "--train_num_samples_mmc4",
        "--train_num_samples_interleaved",
        dest="train_num_samples_mmc4",
        type=int,
        default=10000,
    )
    add("--train_num_samples_laion", type=int, default=10000)
    add("--dataset_resampled", action="store_true")
    add("--mmc4_textsim_threshold", type=float, default=30.0)
    add("--mmc4_max_num_images", type=int, default=6)
    add("--mmc4_min_num_images", type=int, default=1)


def _add_launch_and_logging_flags(add: Callable[..., object]) -> None:
    add("--dist-url", dest="dist_url", default="env://")
    add("--dist-backend", dest="dist_backend", default="nccl")
    add("--horovod", action="store_true")
    add("--no-set-device-rank", dest="no_set_device_rank", action="store_true")
    add("--fsdp", action="store_true")
    add("--fsdp_use_orig_params", action="store_true")
    add("--fsdp_sharding_strategy", default="full", choices=["full", "hybrid"])
    add("--report_to_wandb", action="store_true")
    add("--wandb_project", default=None)
    add("--wandb_entity", default=None)
    add("--save_checkpoints_to_wandb", action="store_true")
    add("--local-rank", "--local_rank", dest="local_rank", type=int, default=0)


def _split_launcher(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Split tokens into (launcher part, train.py flags) at the training script."""
    for i, token in enumerate(tokens):
        if token.endswith("train.py"):
            return tokens[:i], tokens[i + 1 :]
        if token == _MODULE and i > 0 and tokens[i - 1] == "-m":
            return tokens[: i - 1], tokens[i + 1 :]
    raise UsageError(
        "the command runs no OpenFlamingo training script",
        fix=f"give the whole command, ending in `train.py --flags...` or `-m {_MODULE} --flags...`",
    )


def _launcher_world(tokens: list[str]) -> tuple[int, int]:
    """(nproc_per_node, nnodes) from torchrun/torch.distributed.run or srun options."""
    values: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            name, eq, value = token.lstrip("-").partition("=")
            name = name.replace("-", "_")
            if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                value = tokens[i + 1]
                i += 1
            values[name] = value
        i += 1

    def number(*names: str) -> int:
        for name in names:
            if values.get(name, "").isdigit():
                return int(values[name])
        return 1

    return number("nproc_per_node", "ntasks_per_node"), number("nnodes", "nodes", "N")


def _absolute_spec(spec: str | None) -> str | None:
    """Anchor relative local shard paths at the current directory, as OpenFlamingo reads them."""
    if spec is None:
        return None
    parts = [
        str(Path(p).absolute()) if url_kind(p) == "local" and not Path(p).is_absolute() else p
        for p in split_spec(spec)
    ]
    return "::".join(parts)


def recipe_from_openflamingo(command: str) -> OpenFlamingoImport:
    """Build the recipe equivalent to `command` (torchrun/srun/python prefixes accepted)."""
    try:
        tokens = shlex.split(command.replace("\\\n", " "))
    except ValueError as exc:
        raise UsageError(f"cannot split the OpenFlamingo command: {exc}") from None
    launcher, flags = _split_launcher(tokens)
    nproc, nnodes = _launcher_world(launcher)
    parser = _parser()
    args, unknown = parser.parse_known_args(flags)
    problems = _flag_problems(parser, unknown, args)
    data = _data_section(args)
    problems += _missing_datasets(data)
    recipe = _without_none(_recipe(args, data, nproc, nnodes))
    return OpenFlamingoImport(recipe, dumps(recipe, _COMMENTS), problems)


_COMMENTS = {
    "model.lm_path": "translated from an OpenFlamingo train.py command",
    "model.trust_remote_code": "OpenFlamingo always loads the LM with its remote code",
    "data.mmc4.assignment": 'OpenFlamingo head; its 2.0.1 release used "argmax"',
    "run.output_dir": "OpenFlamingo writes checkpoints to ./<run_name>",
    "run.keep_last": "0 keeps every checkpoint, as OpenFlamingo does",
}


def _flag_problems(parser: _Parser, unknown: list[str], args: argparse.Namespace) -> list[Problem]:
    """Unknown flags (with the closest known one) and flags we do not support."""
    problems: list[Problem] = []
    known = [o for a in parser._actions for o in a.option_strings]
    for token in unknown:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            guess = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
            problems.append(
                Problem(
                    f"unknown OpenFlamingo flag {name}",
                    source=SOURCE,
                    fix=f"did you mean {guess[0]}?" if guess else "remove it",
                )
            )
    if args.horovod:
        problems.append(
            Problem(
                "--horovod is not supported: flamingo launches ranks with torchrun",
                source=SOURCE,
                severity="warning",
            )
        )
    return problems


def _data_section(args: argparse.Namespace) -> dict[str, Any]:
    """[data.laion] and [data.mmc4] for the datasets the command gives shards of."""
    data: dict[str, Any] = {}
    if args.laion_shards is not None:
        data["laion"] = {
            "shards": _absolute_spec(args.laion_shards),
            "batch_size": args.batch_size_laion,
            "train_num_samples": args.train_num_samples_laion,
            "workers": args.workers,
            "resampled": args.dataset_resampled,
            "loss_multiplier": args.loss_multiplier_laion,
        }
    if args.mmc4_shards is not None:
        data["mmc4"] = {
            "shards": _absolute_spec(args.mmc4_shards),
            "batch_size": args.batch_size_mmc4,
            "train_num_samples": args.train_num_samples_mmc4,
            "workers": args.workers,
            "resampled": args.dataset_resampled,
            "loss_multiplier": args.loss_multiplier_mmc4,
            "textsim_threshold": args.mmc4_textsim_threshold,
            "min_num_images": args.mmc4_min_num_images,
            "max_num_images": args.mmc4_max_num_images,
            "assignment": "hungarian",
        }
    return data


def _missing_datasets(data: dict[str, Any]) -> list[Problem]:
    """A warning for each dataset the command does not train on."""
    problems: list[Problem] = []
    for name in ("laion", "mmc4"):
        if name not in data:
            problems.append(
                Problem(
                    f"the command gives no --{name}_shards; OpenFlamingo needs both datasets",
                    source=SOURCE,
                    fix=f"add [data.{name}] with shards to the recipe",
                    severity="warning",
                )
            )
    return problems


def _recipe(
    args: argparse.Namespace, data: dict[str, Any], nproc: int, nnodes: int
) -> dict[str, Any]:
    """The whole recipe: model, data, optim, run, distributed and logging sections."""
    return {
        "model": {
            "vision_encoder": args.vision_encoder_path,
            "vision_pretrained": args.vision_encoder_pretrained,
            "lm_path": args.lm_path,
            "tokenizer_path": args.tokenizer_path or args.lm_path,
            "trust_remote_code": True,
            "cross_attn_every_n_layers": args.cross_attn_every_n_layers,
            "freeze_lm_embeddings": args.freeze_lm_embeddings,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "data": data,
        "optim": {
            "lr": args.learning_rate,
            "weight_decay": args.weight_decay,
            "scheduler": args.lr_scheduler,
            "warmup_steps": args.warmup_steps,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": 1.0,
        },
        "run": {
            "name": args.run_name,
            "output_dir": ".",
            "seed": args.seed,
            "num_epochs": args.num_epochs,
            "precision": _PRECISION.get(args.precision, args.precision),
            "log_every": args.logging_steps,
            "keep_last": 1 if args.delete_previous_checkpoint else 0,
            "resume": args.resume_from_checkpoint or "auto",
        },
        "distributed": {
            "strategy": "fsdp" if args.fsdp else "ddp",
            "nproc_per_node": nproc,
            "nnodes": nnodes,
            "sharding": args.fsdp_sharding_strategy,
        },
        "logging": {
            "wandb": args.report_to_wandb,
            "wandb_project": args.wandb_project,
            "wandb_entity": args.wandb_entity,
            "wandb_mode": "offline" if args.offline else "online",
            "save_checkpoints_to_wandb": args.save_checkpoints_to_wandb,
        },
    }


def _without_none(node: dict[str, Any]) -> dict[str, Any]:
    """Drop unset values (TOML has no null) so the data equals what the TOML text holds."""
    return {
        k: _without_none(v) if isinstance(v, dict) else v for k, v in node.items() if v is not None
    }
