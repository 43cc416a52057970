"""The encoder-decoder against its reference paths: SDPA == written-out attention, cached == uncached decoding,
padding changes nothing, causality, gradient checkpointing, and every switch of GPTConfig in both stacks."""

from dataclasses import replace

import pytest
import torch

from encoder_decoder import EncoderDecoder, build_model
from model import GPT, GPTConfig, KVCache

V = 24

# every switch that means something in an encoder-decoder, one row each, on top of the base
SWITCHES = [
    {},
    {"pos_encoding": "sinusoidal", "scale_embeddings": True},
    {"pos_encoding": "rope"},
    {"pos_encoding": "alibi"},
    {"pos_encoding": "none"},
    {"norm_placement": "post", "mlp": "relu"},
    {"norm": "rmsnorm", "mlp": "swiglu", "bias": False},
    {"n_kv_head": 1},
    {"n_kv_head": 2, "qk_norm": True},
    {"n_experts": 4, "experts_per_token": 2},
    {"attn_window": 4, "pos_encoding": "rope"},
    {"n_encoder_layer": 3, "source_block_size": 10},
]


def make(row: dict, seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**dict(vocab_size=V, block_size=12, n_layer=2, n_head=4, n_embd=32, arch="encoder_decoder",
                              source_block_size=14), **row})
    return EncoderDecoder(cfg).eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False  # two padded sources
    mask[2, 2:] = False
    source = source.masked_fill(~mask, V - 1)
    target = torch.randint(0, V, (3, 10), generator=g)
    return source, mask, target


@pytest.mark.parametrize("row", SWITCHES, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()) or "base")
def test_sdpa_equals_reference_and_cached_equals_uncached(row):
    model = make(row)
    source, mask, target = batch()
    logits, _ = model(source, target, source_mask=mask)
    reference, _ = model(source, target, source_mask=mask, reference=True)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    # cached: the source encoded once, then a prefill of 3 target tokens and one token at a time
    cross = model.cross_cache(model.encode(source, mask), mask)
    cache = KVCache(model.config, batch_size=3)
    steps = [model.decode(target[:, :3], cross, cache)[0]]
    steps += [model.decode(target[:, t:t + 1], cross, cache)[0] for t in range(3, target.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", SWITCHES[:6], ids=str)
def test_more_padding_changes_no_logit(row):
    model = make(row)
    source, mask, target = batch()
    logits, _ = model(source, target, source_mask=mask)
    longer = torch.cat([source, torch.full((3, 4), V - 1)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    padded, _ = model(longer, target, source_mask=longer_mask)
    torch.testing.assert_close(padded, logits, atol=1e-6, rtol=1e-6)
    # and the padding is really masked: without the mask, the same ids change the logits
    unmasked, _ = model(longer, target)
    assert (unmasked - logits).abs().max() > 1e-3


def test_no_attention_row_is_all_masked_and_the_loss_is_finite():
    model = make({})
    source, mask, target = batch()
    mask[2, :] = False  # even a source of padding alone: its real token, the first, is kept below
    mask[2, 0] = True
    logits, loss = model(source, target, targets=target, source_mask=mask)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_decoder_is_causal_and_sees_the_source():
    model = make({})
    source, mask, target = batch()
    logits, _ = model(source, target, source_mask=mask)
    changed = target.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    after, _ = model(source, changed, source_mask=mask)
    torch.testing.assert_close(after[:, :6], logits[:, :6])
    assert (after[:, 6:] - logits[:, 6:]).abs().max() > 1e-4
    other = source.clone()
    other[:, 0] = (other[:, 0] + 1) % V
    assert (model(other, target, source_mask=mask)[0] - logits).abs().max() > 1e-4


@pytest.mark.parametrize("row", [{}, {"norm_placement": "post"}, {"n_experts": 4}], ids=str)
def test_gradient_checkpointing_changes_neither_loss_nor_gradients(row):
    source, mask, target = batch()
    results = []
    for ckpt in (False, True):
        model = make({**row, "grad_checkpointing": ckpt}).train()
        _, loss = model(source, target, targets=target, source_mask=mask)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_one_embedding_is_shared_and_counts_are_consistent():
    model = make({"n_encoder_layer": 3})
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert len(model.encoder) == 3 and len(model.blocks) == 2
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n
    assert model.num_params() == n - model.wpe.weight.numel() - model.encoder_wpe.weight.numel()
    assert model.flops_per_token(8, 8) > 6 * model.num_params() / 2
    assert isinstance(build_model(model.config), EncoderDecoder)
    assert isinstance(build_model(replace(model.config, arch="decoder", n_encoder_layer=0, source_block_size=0)), GPT)


def test_learned_source_positions_end_at_source_block_size():
    model = make({"source_block_size": 6})
    source, mask, target = batch()
    with pytest.raises(ValueError, match="source_block_size 6"):
        model(source, target, source_mask=mask)
