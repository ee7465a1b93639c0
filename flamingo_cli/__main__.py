"""`python -m flamingo_cli` runs the same app as the `flamingo` console script; it is also what
torchrun starts on every rank (`python -m flamingo_cli train RECIPE --launched ...`)."""

import os
import sys
from typing import NoReturn

from flamingo_cli.cli.app import main


def run() -> None:
    """The app; in a rank torchrun started, under `record`, so that an uncaught error lands in
    the error file torchrun reports (without torch's import for plain commands)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        main()
        return
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        record(main)()
    except SystemExit as stop:
        _leave_rank(stop.code if isinstance(stop.code, int) else int(stop.code is not None))
    _leave_rank(0)


def _leave_rank(code: int) -> NoReturn:
    """End a rank whose work is done (outputs written and closed, process group destroyed)
    without interpreter finalisation: there, gloo's threads sometimes abort the process
    ("terminate called without an active exception"), which torchrun reports as a failed rank."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
