"""The module torchrun starts on every rank for `flamingo eval-loss --nproc-per-node N`:
each rank evaluates its share; rank 0 writes the report as JSON for the launching process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluate.run import evaluate_loss
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.ui.errors import render_error
from flamingo_cli.ui.eval_view import EvalDisplay


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flamingo_cli.evaluate.worker")
    parser.add_argument("recipe")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--report", required=True, help="where rank 0 writes the JSON report")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--shards", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--ablate-images", default=None, choices=["none", "shuffle"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(list(argv))


@record
def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate as this rank; user errors exit 1 with a message, bugs raise for @record."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        loaded = load_recipe(args.recipe, [parse_override(o) for o in args.overrides])
        with EvalDisplay(enabled=not args.quiet) as display:
            report = evaluate_loss(
                loaded,
                args.checkpoint,
                shards=args.shards,
                dataset=args.dataset,
                max_batches=args.max_batches,
                ablation=args.ablate_images,
                batch_size=args.batch_size,
                events=display,
            )
    except FlamingoError as error:
        render_error(error)
        return error.exit_code
    if _is_rank0():
        Path(args.report).write_text(json.dumps(report.to_dict()), encoding="utf-8")
    return 0


def _is_rank0() -> bool:
    from flamingo_cli.runtime.distributed import world_from_env

    return world_from_env()[0] == 0


if __name__ == "__main__":
    sys.exit(main())
