"""model.py: shapes, causality, SDPA == reference attention, KV cache == full forward, init and tying."""

import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache, causal_mask


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    return GPTConfig(**{**base, **kw})


def make(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def test_shapes_and_padded_vocab():
    m = make(vocab_size=65)
    idx = torch.randint(0, 65, (3, 10))
    logits, loss = m(idx, torch.randint(0, 65, (3, 10)))
    assert logits.shape == (3, 10, 128)  # 65 padded up to a multiple of 64
    assert loss.shape == () and torch.isfinite(loss)
    # at init the model is close to uniform over the padded vocabulary
    assert abs(loss.item() - math.log(128)) < 0.2


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_head"):
        tiny(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dropout"):
        tiny(dropout=1.0)
    with pytest.raises(ValueError, match="block_size"):
        tiny(block_size=0)


def test_weights_tied_and_residual_projections_scaled():
    m = make(n_layer=8)
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    std = m.blocks[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert m.num_params(non_embedding=False) == sum(p.numel() for p in m.parameters())


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_causality():
    m = make()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    a, _ = m(idx)
    b, _ = m(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_sdpa_equals_reference_logits_and_grads():
    m = make(bias=True)
    idx = torch.randint(0, 50, (2, 16))
    loss_sdpa = m(idx, idx)[1]
    loss_sdpa.backward()
    g_sdpa = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    loss_ref = m(idx, idx, reference=True)[1]
    loss_ref.backward()
    torch.testing.assert_close(loss_sdpa, loss_ref, rtol=0, atol=1e-5)
    for a, b in zip(g_sdpa, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(m(idx)[0], m(idx, reference=True)[0], rtol=0, atol=1e-5)


def test_attention_maps_are_causal_distributions():
    m = make()
    maps = m.attention_maps(torch.randint(0, 50, (1, 9)))
    assert len(maps) == 2 and maps[0].shape == (1, 4, 9, 9)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 4, 9))
    assert maps[1][0, :, 3, 4:].abs().max() == 0  # nothing attends to the future


@pytest.mark.parametrize("reference", [False, True])
def test_kv_cache_prefill_and_decode_match_full_forward(reference):
    m = make()
    idx = torch.randint(0, 50, (2, 16))
    full, _ = m(idx, reference=reference)
    cache = KVCache(m.config, batch_size=2)
    parts = [m(idx[:, :5], kv_cache=cache, reference=reference)[0]]  # prefill
    parts.append(m(idx[:, 5:9], kv_cache=cache, reference=reference)[0])  # multi-token chunk after a cache
    for t in range(9, 16):  # one-token decode steps
        parts.append(m(idx[:, t:t + 1], kv_cache=cache, reference=reference)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 16


def test_cache_and_positions_refuse_overflow():
    m = make()
    cache = KVCache(m.config, batch_size=1)
    m(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 50, (2, 8))
    m.eval()
    torch.testing.assert_close(m(idx)[0], m(idx)[0], rtol=0, atol=0)
    m.train()
    assert not torch.allclose(m(idx)[0], m(idx)[0])
