"""The module torchrun starts on every rank: `python -m flamingo_cli.train.worker RECIPE [--set K=V]...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from flamingo_cli.errors import FlamingoError
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.train.run import train_rank
from flamingo_cli.ui.errors import render_error
from flamingo_cli.ui.train_view import TrainDisplay


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flamingo_cli.train.worker")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--take-over", action="store_true")  # rank 0 takes the run's lock
    return parser.parse_args(list(argv))


@record
def main(argv: Sequence[str] | None = None) -> int:
    """Train as this rank; user errors exit 1 with a message, bugs raise for @record's report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        loaded = load_recipe(args.recipe, [parse_override(o) for o in args.overrides])
        with TrainDisplay() as display:
            train_rank(loaded, display, max_steps=args.max_steps, take_over=args.take_over)
    except FlamingoError as error:
        render_error(error)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
