"""Captioning CIDEr as OpenFlamingo reports it: pycocoevalcap's `Cider` x 100 on PTB-tokenized
captions (docs/formats.md §13).

OpenFlamingo scores through `COCOEvalCap.evaluate()`, whose SPICE step downloads Stanford models;
we run its tokenization and its `Cider` scorer only. Tokenization is the Stanford PTB tokenizer
that pycocoevalcap bundles (`stanford-corenlp-3.4.1.jar`, options `-preserveLines -lowerCase`,
then pycocoevalcap's punctuation tokens dropped) when `java` is on PATH; otherwise our Python
tokenizer that follows the same rules (`ptb_tokenize`), and the result says which one ran.

pycocoevalcap's `PTBTokenizer` writes its temporary file into its own package directory, which
fails on a read-only install; we run the same jar, by absolute path, on a file in the system's
temporary directory instead.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from flamingo_cli.errors import FlamingoError
from flamingo_cli.evaluate.metrics.coverage import check_covered
from flamingo_cli.evaluate.metrics.ptb import LINE_BREAKS, ptb_tokenize_lines

K = TypeVar("K", bound=Hashable)  # an image or sample id
TokenizerChoice = Literal["auto", "java", "python"]
TokenizerName = Literal["java", "python"]
TOKENIZER_CHOICES: tuple[TokenizerChoice, ...] = ("auto", "java", "python")

_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
_PTB_OPTIONS = ("-preserveLines", "-lowerCase")
_INSTALL_FIX = "install flamingo's dependency pycocoevalcap: pip install 'pycocoevalcap>=1.2'"


@dataclass(frozen=True)
class CiderResult(Generic[K]):
    """Corpus CIDEr (CIDEr-D as pycocoevalcap computes it) x 100, and each image's x 100."""

    score_x100: float
    tokenizer: TokenizerName
    per_image: dict[K, float]


def cider(
    predictions: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    tokenizer: TokenizerChoice = "auto",
) -> CiderResult[K]:
    """CIDEr x 100 of `predictions` (id -> caption) against `references` (id -> captions).

    Every predicted id is scored, with the references of the predicted ids only (as
    OpenFlamingo restricts COCOEvalCap to the result's image ids: document frequencies come
    from those). `tokenizer`: "java" (the bundled PTB jar; an error without Java), "python",
    or "auto" (Java when `java` is on PATH)."""
    _check_ids(predictions, references)
    ids = list(predictions)
    # Two runs, predictions then references, each in id order, as COCOEvalCap tokenizes
    # them: the jar's treatment of a line can depend on the next one.
    tokens, used = tokenize([predictions[key] for key in ids], tokenizer)
    res = {key: [line] for key, line in zip(ids, tokens, strict=True)}
    flat, _ = tokenize([caption for key in ids for caption in references[key]], used)
    gts: dict[K, list[str]] = {}
    at = 0
    for key in ids:
        count = len(references[key])
        gts[key] = flat[at : at + count]
        at += count
    if not any(line.split() for line in flat):
        raise FlamingoError(
            "the reference captions have no words once tokenized",
            fix="check that the references are the dataset's captions (sentences[].raw)",
        )
    score, scores = _cider_scorer().compute_score(gts, res)
    per_image = {key: 100.0 * float(value) for key, value in zip(ids, scores, strict=True)}
    return CiderResult(score_x100=100.0 * float(score), tokenizer=used, per_image=per_image)


def _check_ids(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> None:
    check_covered(
        predictions,
        references,
        nothing=("no captions to score", "score at least one image (check --num-samples)"),
        unmatched=(
            "captioned image(s) have no reference captions",
            "score predictions against the references of the same split",
        ),
    )
    empty = [key for key in predictions if not references[key]]
    if empty:
        raise FlamingoError(
            f"image {empty[0]!r} has an empty list of reference captions",
            fix="give every scored image at least one reference caption",
        )


def _cider_scorer() -> Any:
    try:
        from pycocoevalcap.cider.cider import Cider  # type: ignore[import-untyped]
    except ImportError as error:
        raise FlamingoError(f"CIDEr needs pycocoevalcap ({error})", fix=_INSTALL_FIX) from error
    return Cider()


def tokenize(
    captions: Sequence[str], tokenizer: TokenizerChoice = "auto"
) -> tuple[list[str], TokenizerName]:
    """Each caption as pycocoevalcap's tokenization leaves it (tokens joined by single spaces),
    and which tokenizer ran."""
    if tokenizer not in TOKENIZER_CHOICES:
        raise FlamingoError(
            f"unknown caption tokenizer {tokenizer!r}",
            fix=f"use one of: {', '.join(TOKENIZER_CHOICES)}",
        )
    if tokenizer == "python" or (tokenizer == "auto" and shutil.which("java") is None):
        return ptb_tokenize_lines(captions), "python"
    return java_tokenize(captions), "java"


def _ptb_module() -> Any:
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer  # type: ignore[import-untyped]
    except ImportError as error:
        raise FlamingoError(
            f"the PTB tokenizer needs pycocoevalcap ({error})", fix=_INSTALL_FIX
        ) from error
    return ptbtokenizer


def java_tokenize(captions: Sequence[str]) -> list[str]:
    """The bundled Stanford PTB tokenizer, run as pycocoevalcap runs it, on a temporary file of
    ours; its output filtered of pycocoevalcap's punctuation tokens."""
    java = shutil.which("java")
    if java is None:
        raise FlamingoError(
            "the Java PTB tokenizer needs `java` on PATH",
            fix="install a Java runtime (Debian: apt-get install default-jre-headless) "
            "or use the Python tokenizer",
        )
    module = _ptb_module()
    jar = Path(str(module.__file__)).resolve().parent / str(module.STANFORD_CORENLP_3_4_1_JAR)
    dropped = frozenset(str(token) for token in module.PUNCTUATIONS)
    lines = [LINE_BREAKS.sub(" ", caption) for caption in captions]
    with tempfile.TemporaryDirectory(prefix="flamingo-ptb-") as folder:
        source = Path(folder) / "captions.txt"
        source.write_text("\n".join(lines), encoding="utf-8")
        done = subprocess.run(
            [java, "-cp", str(jar), _PTB_CLASS, *_PTB_OPTIONS, source.name],
            cwd=folder,
            capture_output=True,
            check=False,
        )
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-500:]
        raise FlamingoError(
            f"the Java PTB tokenizer ({jar.name}) failed with exit code {done.returncode}: {tail}",
            fix="check the Java runtime (java -version), or use the Python tokenizer",
        )
    out = done.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines) or any(line.strip() for line in out[len(lines) :]):
        raise FlamingoError(
            f"the Java PTB tokenizer returned {len(out)} lines for {len(lines)} captions",
            fix="report this caption set; meanwhile use the Python tokenizer",
        )
    return [" ".join(t for t in line.split() if t not in dropped) for line in out[: len(lines)]]
