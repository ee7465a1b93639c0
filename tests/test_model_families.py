"""Every supported decoder family builds from a tiny config, keeps identity and trains."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from flamingo_cli.model.openflamingo import to_openflamingo_key
from flamingo_cli.model.params import checkpoint_parameter_names
from tests.model_util import batch, open_gates, tokenizer_and_ids, wrap

SMALL = {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES: dict[str, tuple[dict[str, Any], str, bool]] = {
    # model_type: (config, decoder layer path, tied input/output embeddings)
    "llama": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2},
        "model.layers", False,
    ),
    "mistral": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2},
        "model.layers", False,
    ),
    "qwen2": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2},
        "model.layers", False,
    ),
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}, "transformer.h", True),
    "gpt_neox": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4},
        "gpt_neox.layers", False,
    ),
    "opt": (
        {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "word_embed_proj_dim": 64, "max_position_embeddings": 128, "pad_token_id": 0},
        "model.decoder.layers", True,
    ),
    "mpt": ({"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128}, "transformer.blocks", True),
    "gptj": (
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 128},
        "transformer.h", False,
    ),
    "phi": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4},
        "model.layers", False,
    ),
}  # fmt: skip


def _lm(family: str) -> torch.nn.Module:
    overrides, _, _ = FAMILIES[family]
    config = AutoConfig.for_model(family, **SMALL, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_builds_keeps_identity_and_trains(family: str) -> None:
    _, path, tied = FAMILIES[family]
    lm = _lm(family)
    tokenizer, _ = tokenizer_and_ids()
    lm.resize_token_embeddings(len(tokenizer))
    bare = copy.deepcopy(lm)
    model = wrap(lm)
    assert model.decoder_layers_path == path
    assert len(model.cross_attention_blocks()) == 2
    inputs, outputs = model.input_embeddings(), model.output_embeddings()
    assert inputs.weight.shape[0] == len(tokenizer) == 515
    assert outputs is not None and outputs.weight.shape[0] == 515
    assert (outputs.weight is inputs.weight) == tied

    images, ids, mask = batch()
    with torch.no_grad():
        fresh = model(images, ids, mask).logits
        expected = bare(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(fresh, expected)

    open_gates(model)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(images, ids, mask, labels=labels)
    assert torch.isfinite(out.logits).all() and not torch.equal(out.logits, fresh)
    out.loss.backward()
    grads = [p.grad for p in model.perceiver.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, attention_mask: Any = None) -> tuple[torch.Tensor, None]:
        return x + self.mlp(x), None


class _RemoteStyleLM(nn.Module):
    """Shaped like OpenFlamingo's MPT-1B remote code: no get_input_embeddings, blocks that
    return tuples under `transformer.blocks`, logits from the embedding matrix itself."""

    def __init__(self) -> None:
        super().__init__()
        self.config = PretrainedConfig(vocab_size=512, n_layers=2)
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(512, 32), "blocks": nn.ModuleList([_Block(32), _Block(32)])}
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None
    ) -> CausalLMOutput:
        x = self.transformer["wte"](input_ids)
        for block in self.transformer["blocks"]:
            x = block(x, attention_mask=attention_mask)[0]
        return CausalLMOutput(logits=F.linear(x, self.transformer["wte"].weight))


def test_lm_without_embedding_accessors_is_found_by_inspection() -> None:
    torch.manual_seed(0)
    lm = _RemoteStyleLM()
    old_rows = lm.transformer["wte"].weight.detach().clone()
    model = wrap(lm)
    wte = model.input_embeddings()
    assert wte is lm.transformer["wte"] and wte.weight.shape == (515, 32)
    assert torch.equal(wte.weight[:512], old_rows)
    assert torch.equal(wte.weight[514], old_rows.mean(dim=0))
    assert model.decoder_layers_path == "transformer.blocks"
    keys = {to_openflamingo_key(k) for k in checkpoint_parameter_names(model)}
    assert "lang_encoder.transformer.wte.weight" in keys
    assert "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn.to_q.weight" in keys
    images, ids, mask = batch()
    with torch.no_grad():
        fresh = model(images, ids, mask).logits
        open_gates(model)
        assert not torch.equal(model(images, ids, mask).logits, fresh)
