"""OpenFlamingo's special tokens on the bundled tiny tokenizer."""

from __future__ import annotations

from flamingo_cli.model.tokenizer import TINY_TOKENIZER, add_flamingo_tokens, load_tokenizer


def test_special_token_ids_follow_openflamingo_order() -> None:
    tokenizer, ids = load_tokenizer(TINY_TOKENIZER)
    assert (ids.endofchunk, ids.image, ids.pad) == (512, 513, 514)
    assert ids.eos == tokenizer.eos_token_id == 2
    assert len(tokenizer) == 515
    assert add_flamingo_tokens(tokenizer) == ids  # idempotent
    assert len(tokenizer) == 515


def test_tiny_tokenizer_keeps_control_tokens_whole() -> None:
    tokenizer, ids = load_tokenizer(TINY_TOKENIZER)
    encoded = tokenizer("<image>a red square<|endofchunk|></s>").input_ids
    assert encoded[:2] == [tokenizer.bos_token_id, ids.image]
    assert encoded[-2:] == [ids.endofchunk, ids.eos]
    assert tokenizer.decode(encoded[2:-2]) == "a red square"
