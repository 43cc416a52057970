"""model.py: shapes, causality, SDPA == reference attention, KV cache == full forward, init and tying."""

import math

import pytest
import torch
import torch.nn.functional as F

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
    assert cache.next_pos == 16 and cache.slot_pos.tolist() == list(range(16))


def test_cache_and_positions_refuse_overflow():
    m = make()
    cache = KVCache(m.config, batch_size=1)
    m(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_ring_cache_refuses_a_chunk_that_would_overwrite_keys_it_needs():
    m = make(pos_encoding="rope", attn_window=4)
    cache = KVCache(m.config, batch_size=1, max_len=8)
    m(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)  # fills the ring
    m(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)  # 5 new + the 3 keys before them: exactly 8 slots
    with pytest.raises(ValueError, match="holds 8 positions; 9 needed"):
        m(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    assert cache.next_pos == 13  # the refused chunk claimed nothing


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 50, (2, 8))
    m.eval()
    torch.testing.assert_close(m(idx)[0], m(idx)[0], rtol=0, atol=0)
    m.train()
    assert not torch.allclose(m(idx)[0], m(idx)[0])


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_drops_at_rate_p_in_every_lane_and_keeps_the_expectation(p):
    """Each 64-bit draw feeds four elements: every one of the four must drop at rate p, and the kept ones are
    scaled so that the expectation is unchanged."""
    from model import dropout

    torch.manual_seed(0)
    n = 1 << 20
    out = dropout(torch.ones(n), p, training=True)
    dropped = out == 0
    scale = out[~dropped].unique()
    assert scale.numel() == 1  # every kept element is scaled alike: 1 / (1 - p), p rounded to 1/65536
    assert scale.item() == pytest.approx(1 / (1 - p), rel=1e-4)
    sigma = (p * (1 - p) / (n / 4)) ** 0.5
    for lane in range(4):  # the four 16-bit quarters of each draw
        assert abs(dropped[lane::4].float().mean().item() - p) < 5 * sigma
    assert out.mean().item() == pytest.approx(1.0, abs=5 * sigma * 4)


def test_dropout_follows_the_torch_seed_and_its_gradient_is_the_mask():
    from model import dropout

    x = torch.randn(3, 1000, requires_grad=True)
    torch.manual_seed(1)
    a = dropout(x, 0.3, training=True)
    torch.manual_seed(1)
    b = dropout(x, 0.3, training=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.3, training=True))  # the generator moved on
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a != 0).float() * (a / x).max(), rtol=1e-6, atol=0)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x


def test_cpu_training_attention_path_matches_sdpa():
    """On the CPU, training in bfloat16 (or with dropout) goes through the written-out attention instead of SDPA
    (it is faster there): at dropout 0 it must give SDPA's loss and gradients, within bfloat16 rounding."""
    from model import sdpa_is_slow

    q = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16, requires_grad=True)
    assert sdpa_is_slow(q, 0.0) and sdpa_is_slow(q.float(), 0.1) and not sdpa_is_slow(q.float(), 0.0)
    assert not sdpa_is_slow(q.detach(), 0.0)  # inference keeps SDPA's flash kernel

    torch.manual_seed(0)
    m = GPT(tiny(block_size=32)).train()
    idx, targets = torch.randint(0, 50, (4, 32)), torch.randint(0, 50, (4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = m(idx, targets)[1]  # weights that require grad: the written-out path
        with torch.no_grad():
            sdpa = m(idx, targets)[1]  # no grad: SDPA
    assert fast.item() == pytest.approx(sdpa.item(), abs=2e-2)
    fast.backward()
    ref = GPT(tiny(block_size=32)).train()
    ref.load_state_dict(m.state_dict())
    ref(idx, targets)[1].backward()  # float32 training: SDPA's gradients
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        assert F.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0) > 0.99, name
