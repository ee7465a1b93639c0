"""The torchrun our launchers start: `python -m flamingo_cli.cli.torchrun ARGS` is torchrun
(`torch.distributed.run`), except when ranks fail.

A rank that stops on a user error has printed its message and fix and exited 1; torchrun would
then print a traceback of its own (`ChildFailedError`) that says nothing more. Here that
failure ends quietly with exit 1, and only a rank that crashed (its error file holds a
traceback) gets torchrun's summary, which shows it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with `argv`; 0 when every rank succeeded, 1 otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))  # type: ignore[no-untyped-call]
    except ChildFailedError as failed:
        if any(failure.error_file_data for failure in failed.failures.values()):
            sys.stderr.write(failed.format_msg() + "\n")  # type: ignore[no-untyped-call]
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
