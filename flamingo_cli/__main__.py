"""`python -m flamingo_cli` runs the same app as the `flamingo` console script; it is also what
torchrun starts on every rank (`python -m flamingo_cli train RECIPE --launched ...`)."""

import os

from flamingo_cli.cli.app import main


def run() -> None:
    """The app; in a rank torchrun started, under `record`, so that an uncaught error lands in
    the error file torchrun reports (without torch's import for plain commands)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()


if __name__ == "__main__":
    run()
