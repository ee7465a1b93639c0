"""Tokenizer loading and OpenFlamingo's special tokens, added in the order that fixes their ids."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flamingo_cli.errors import FlamingoError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ENDOFCHUNK = "<|endofchunk|>"
IMAGE = "<image>"
PAD = "<PAD>"
TINY_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny" / "tokenizer"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the data pipeline and the model look for."""

    image: int
    endofchunk: int
    pad: int
    eos: int


def add_flamingo_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """Add `<|endofchunk|>`, `<image>`, then `<PAD>` when there is no pad token (docs/formats.md §5.1).

    The order fixes the embedding rows of released checkpoints: ids V and V+1 for a vocabulary
    of V, then V+2 for `<PAD>`. Adding to a tokenizer that already has them changes nothing.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": [ENDOFCHUNK, IMAGE]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    image = tokenizer.convert_tokens_to_ids(IMAGE)
    endofchunk = tokenizer.convert_tokens_to_ids(ENDOFCHUNK)
    assert isinstance(image, int) and isinstance(endofchunk, int)
    if tokenizer.eos_token_id is None:
        raise FlamingoError(
            f"tokenizer {tokenizer.name_or_path!r} has no end-of-sequence token",
            fix="use a tokenizer with an eos token (OpenFlamingo appends it to every text)",
        )
    return SpecialTokens(
        image=int(image),
        endofchunk=int(endofchunk),
        pad=int(tokenizer.pad_token_id),
        eos=int(tokenizer.eos_token_id),
    )


def load_tokenizer(
    path: str | Path, *, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, SpecialTokens]:
    """Load a tokenizer from a local directory or a name that resolves offline; add our tokens."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path),
            trust_remote_code=trust_remote_code,
            local_files_only=os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
        )
    except (OSError, ValueError) as exc:
        raise FlamingoError(
            f"cannot load tokenizer {str(path)!r}: {exc}",
            fix="give a local tokenizer directory, or a Hugging Face name already in the cache",
        ) from exc
    return tokenizer, add_flamingo_tokens(tokenizer)
