"""`generate` output: the continuation alone on stdout, how it was made on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.markup import escape

from flamingo_cli.ui.console import err_console, settings

if TYPE_CHECKING:
    from flamingo_cli.evaluate.generate import Generation


@contextmanager
def loading(checkpoint: str) -> Iterator[None]:
    """A spinner on a terminal's stderr while the model loads and decodes."""
    if settings.verbosity < 0 or not err_console.is_terminal:
        yield
        return
    with err_console.status(f"loading {escape(checkpoint)} and generating"):
        yield


def render_generation(result: Generation) -> None:
    """The continuation as plain text (scripts read stdout); the prompt with -v, then a
    line on the tokens, the time and the weights unless -q."""
    if settings.verbosity > 0:
        err_console.print(f"prompt: {result.prompt!r}", style="dim", markup=False)
        for k, path in enumerate(result.images, 1):
            err_console.print(f"image {k}: {path}", style="dim", markup=False)
    sys.stdout.write(result.text + "\n")
    sys.stdout.flush()
    if settings.verbosity < 0:
        return
    count = len(result.tokens)
    end = "stopped at <|endofchunk|>" if result.stopped else "reached --max-new-tokens"
    rate = f", {count / result.seconds:.1f} tokens/s" if result.seconds > 0 and count else ""
    beams = result.decoding.get("num_beams", 1)
    mode = "sampled" if result.decoding.get("do_sample") else f"{beams} beam(s)"
    err_console.print(
        f"{count} new token(s), {mode}, {end}, {result.seconds:.2f} s{rate}; "
        f"{result.weights} {result.checkpoint}",
        style="dim",
        markup=False,
    )
