"""Shapes, identity at initialisation, the media masking rules, placement and generation."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flamingo_cli.data.labels import content_length
from flamingo_cli.errors import FlamingoError
from flamingo_cli.model.factory import tiny_lm
from flamingo_cli.model.flamingo import FlamingoModel
from flamingo_cli.model.layers import MaskedCrossAttention
from flamingo_cli.model.lm import find_decoder_layers
from tests.model_util import batch, open_gates, tokenizer_and_ids, wrap


def _tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_lm().eval()


@pytest.fixture(scope="module")
def model() -> FlamingoModel:
    return wrap(_tiny_lm())


def test_shapes_and_loss(model: FlamingoModel) -> None:
    images, ids, mask = batch()
    latents = model.encode_images(images)
    assert latents.shape == (3, 2, 8, 64)  # tiny perceiver: 8 latents of the ViT width
    labels = ids.masked_fill(mask == 0, -100)
    out = model(images, ids, mask, labels=labels)
    assert out.logits.shape == (*ids.shape, 515)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_fresh_model_reproduces_the_language_model_exactly() -> None:
    lm = _tiny_lm()
    tokenizer, _ = tokenizer_and_ids()
    lm.resize_token_embeddings(len(tokenizer))
    bare = copy.deepcopy(lm)
    model = wrap(lm)
    images, ids, mask = batch()
    with torch.no_grad():
        ours = model(images, ids, mask).logits
        theirs = bare(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


def _reference(
    attn: MaskedCrossAttention, x: torch.Tensor, media: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Per token, plain softmax attention over the latents of its one image (0 when none)."""
    out = torch.zeros(*x.shape[:2], attn.q_proj.out_features)
    q = attn.q_proj(attn.norm(x))
    k, v = attn.kv_proj(media).chunk(2, dim=-1)
    heads = attn.heads
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            i = int(index[b, t])
            if not 1 <= i <= media.shape[1]:
                continue
            qh = q[b, t].view(heads, -1)
            kh, vh = (
                k[b, i - 1].view(-1, heads, qh.shape[1]),
                v[b, i - 1].view(-1, heads, qh.shape[1]),
            )
            weights = torch.einsum("hd,nhd->hn", qh, kh).mul(qh.shape[1] ** -0.5).softmax(-1)
            out[b, t] = torch.einsum("hn,nhd->hd", weights, vh).flatten()
    result: torch.Tensor = attn.out_proj(out)
    return result


@pytest.mark.parametrize(
    "backend", [None, SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
)
def test_text_sees_only_its_most_recent_image(backend: SDPBackend | None) -> None:
    torch.manual_seed(0)
    attn = MaskedCrossAttention(dim=16, dim_visual=8, heads=2, dim_head=4)
    x = torch.randn(2, 7, 16)
    media = torch.randn(2, 3, 5, 8)  # 3 images of 5 latents
    # 0: before the first image; 4: more <image> tokens than images
    index = torch.tensor([[0, 0, 1, 1, 2, 3, 3], [1, 2, 2, 2, 3, 4, 0]])
    with torch.no_grad(), contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
        try:
            out = attn(x, media, index)
        except RuntimeError as exc:  # a backend this machine's torch build cannot run
            pytest.skip(f"{backend}: {exc}")
        torch.testing.assert_close(out, _reference(attn, x, media, index), rtol=1e-5, atol=1e-6)
        assert not out.isnan().any()
        no_image = (index == 0) | (index > 3)
        assert torch.equal(out[no_image], torch.zeros_like(out[no_image]))
        # changing image 2 changes exactly the tokens whose most recent image is 2
        changed = media.clone()
        changed[:, 1] += 1.0
        moved = (attn(x, changed, index) != out).any(-1)
    assert torch.equal(moved, index == 2)


def test_routed_attention_has_the_gradients_of_the_per_token_reference() -> None:
    torch.manual_seed(0)
    attn = MaskedCrossAttention(dim=16, dim_visual=8, heads=2, dim_head=4)
    x = torch.randn(3, 9, 16)
    media = torch.randn(3, 3, 5, 8)
    # uneven spans, a sample without any image, indices past the images, out of order
    index = torch.tensor(
        [[0, 1, 1, 1, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0], [2, 2, 1, 4, 3, 0, 3, 3, 1]]
    )
    grads = []
    for forward in (attn, lambda *a: _reference(attn, *a)):
        xs, ms = x.clone().requires_grad_(), media.clone().requires_grad_()
        attn.zero_grad()
        forward(xs, ms, index).square().sum().backward()
        assert xs.grad is not None and ms.grad is not None
        grads.append([xs.grad, ms.grad, *(p.grad for p in attn.parameters())])
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_text_before_any_image_has_finite_gradients() -> None:
    torch.manual_seed(0)
    attn = MaskedCrossAttention(dim=16, dim_visual=8, heads=2, dim_head=4)
    x = torch.randn(2, 4, 16, requires_grad=True)
    out = attn(x, torch.randn(2, 1, 5, 8), torch.zeros(2, 4, dtype=torch.long))
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in attn.parameters())


@pytest.mark.parametrize(("every_n", "expected"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_cross_attention_sits_before_layers_where_i_plus_1_divides(
    every_n: int, expected: list[int]
) -> None:
    model = wrap(_tiny_lm(), every_n=every_n)
    placed = [i for i, layer in enumerate(model.decoder_layers) if layer.gated_cross_attn]
    assert placed == expected
    assert model.decoder_layers_path == "model.layers"
    assert len(find_decoder_layers(_tiny_lm())[1]) == 4


def test_decoder_layers_not_found_names_the_class() -> None:
    class NoLayers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

    with pytest.raises(FlamingoError, match="NoLayers"):
        find_decoder_layers(NoLayers())


def test_cutting_right_padding_keeps_loss_and_gradients(model: FlamingoModel) -> None:
    images, ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    padded = torch.nn.functional.pad(ids, (0, 5), value=int(ids[0, -1]))
    probe = copy.deepcopy(model)
    open_gates(probe)
    results = []
    for width in (ids.shape[1], padded.shape[1]):
        probe.zero_grad()
        ids_w = padded[:, :width]
        mask_w = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
        labels_w = torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=-100)
        assert content_length(mask_w, labels_w) == int(mask.sum(1).max())
        out = probe(images, ids_w, mask_w, labels=labels_w)
        out.loss.backward()
        grads = [p.grad.clone() for p in probe.parameters() if p.grad is not None]
        results.append((out.loss.detach(), grads))
    (short_loss, short_grads), (long_loss, long_grads) = results
    torch.testing.assert_close(short_loss, long_loss, rtol=1e-6, atol=1e-6)
    for short, long in zip(short_grads, long_grads, strict=True):
        torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)


def test_only_referenced_images_are_encoded_with_the_same_result(model: FlamingoModel) -> None:
    images, ids, mask = batch()  # 2, 1 and 1 <image> tokens for 2 image slots each
    labels = ids.masked_fill(mask == 0, -100)
    probe = copy.deepcopy(model).train()
    open_gates(probe)
    seen: list[int] = []
    probe.perceiver.register_forward_hook(lambda m, a, out: seen.append(out.shape[:2].numel()))
    results = []
    for encode in (probe.encode_referenced, lambda images, ids: probe.encode_images(images)):
        probe.zero_grad()
        latents = encode(images, ids)
        with probe._conditioned(latents, probe.media_index(ids)):
            loss = probe.lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads = [p.grad.clone() for p in probe.parameters() if p.grad is not None]
        results.append((latents.detach(), loss.detach(), grads))
    assert seen == [4, 6]  # the referenced images only, then all slots
    (latents, loss, grads), (all_latents, all_loss, all_grads) = results
    torch.testing.assert_close(latents[0], all_latents[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(latents[1:, 1], torch.zeros_like(latents[1:, 1]))
    torch.testing.assert_close(loss, all_loss, rtol=1e-6, atol=1e-6)
    for ours, reference in zip(grads, all_grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    # no <image> at all: one image is still encoded (every rank runs the same layers)
    none = probe.encode_referenced(images, torch.zeros_like(ids)).flatten(0, 1)
    assert seen[-1] == 1 and torch.equal(none[1:], torch.zeros_like(none[1:]))


def test_media_switched_off_removes_only_the_attention_branch(model: FlamingoModel) -> None:
    images, ids, mask = batch()
    probe = copy.deepcopy(model)
    with torch.no_grad():
        open_gates(probe)
        with_media = probe(images, ids, mask).logits
        without = probe(None, ids, mask, use_media=False).logits
        for block in probe.cross_attention_blocks():
            block.attn_gate.zero_()
        attn_closed = probe(images, ids, mask).logits
    assert not torch.equal(with_media, without)
    assert torch.equal(without, attn_closed)


def test_generate_matches_step_by_step_greedy_decoding(model: FlamingoModel) -> None:
    probe = copy.deepcopy(model)
    open_gates(probe, 0.5)
    tokenizer, _ = tokenizer_and_ids()
    images, _, _ = batch()
    prompts = ["<image>a red", "the<image>blue<|endofchunk|><image>a", "<image>"]
    calls: list[int] = []
    probe.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    # left padding for generation
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(prompts, padding="longest", return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    generated = probe.generate(
        images, encoded.input_ids, encoded.attention_mask, max_new_tokens=6, eos_token_ids=()
    )
    assert len(calls) == 1  # images encoded once for all steps
    assert generated.shape == (3, encoded.input_ids.shape[1] + 6)
    for row, prompt in enumerate(prompts):
        sequence = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(6):
                logits = probe(images[row : row + 1], sequence).logits
                sequence = torch.cat((sequence, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        width = sequence.shape[1]
        assert generated[row, -width:].tolist() == sequence[0].tolist()


def test_generate_stops_at_end_of_chunk_and_pads(model: FlamingoModel) -> None:
    images, ids, mask = batch()
    first = model.generate(images, ids, mask, max_new_tokens=1, eos_token_ids=())[:, -1]
    stop = int(first[0])
    out = model.generate(images, ids, mask, max_new_tokens=3, eos_token_ids=[stop])
    assert int(out[0, ids.shape[1]]) == stop
    assert (out[0, ids.shape[1] + 1 :] == model.special_tokens.pad).all()
