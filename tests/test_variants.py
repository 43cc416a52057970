"""Every design choice of GPTConfig, swept pairwise: causality, SDPA == reference attention, KV-cached ==
uncached decoding (past block_size and with windows), gradient checkpointing == plain backward; and each
position encoding against its paper's formula."""

import itertools
import math
from dataclasses import replace

import pytest
import torch

import sample
from model import (GPT, GPTConfig, KVCache, alibi_slopes, apply_rope, rope_angles, sinusoidal_encoding)

FACTORS = {
    "pos_encoding": ["learned", "sinusoidal", "rope", "alibi", "none"],
    "attn_mask": ["causal", "prefix", "bidirectional"],
    "n_kv_head": [0, 1, 2],
    "attn_window": [0, 5],
    "qk_norm": [False, True],
    "norm": ["layernorm", "rmsnorm"],
    "norm_placement": ["pre", "post"],
    "mlp": ["gelu", "relu", "swiglu"],
    "n_experts": [0, 3],
    "bias": [True, False],
}


def pairwise(factors: dict) -> list[dict]:
    """A small set of combinations in which every pair of values of every two factors appears (greedy)."""
    names = list(factors)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    rows = []
    while uncovered:
        row = {}
        for name in names:  # each factor takes the value that covers most still-uncovered pairs
            def gain(value):
                return sum(((prev, row[prev]), (name, value)) in uncovered for prev in row) + \
                    sum(((name, value), (later, v)) in uncovered for later in names[names.index(name) + 1:]
                        for v in factors[later]) * 1e-3
            row[name] = max(factors[name], key=gain)
        covered = {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}
        if not covered & uncovered:  # cannot happen with the greedy above, but never loop forever
            break
        uncovered -= covered
        rows.append(row)
    return rows


COMBOS = pairwise(FACTORS)


def cfg_of(row: dict, **kw) -> GPTConfig:
    base = dict(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_embd=32, dropout=0.0, experts_per_token=2)
    if row.get("attn_mask") == "prefix":
        base["prefix_len"] = 4
    return GPTConfig(**{**base, **row, **kw})


def build(row: dict, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg_of(row, **kw))
    with torch.no_grad():  # non-trivial norm gains, so the qk/rms norms are exercised
        for name, p in model.named_parameters():
            if p.dim() == 1 and "weight" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def label(row: dict) -> str:
    return "-".join(str(v) for v in row.values())


def test_pairwise_covers_every_pair():
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(row[a], row[b]) for row in COMBOS}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
    assert len(COMBOS) < 30


@pytest.mark.parametrize("row", COMBOS, ids=map(label, COMBOS))
def test_sdpa_equals_reference_logits_and_grads(row):
    model = build(row).train()  # dropout is 0: train mode only switches MoE's aux loss on
    idx = torch.randint(0, 40, (2, 12))
    targets = torch.randint(0, 40, (2, 12))
    results = []
    for reference in (False, True):
        model.zero_grad()
        logits, loss = model(idx, targets, reference=reference)
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("row", COMBOS, ids=map(label, COMBOS))
def test_what_each_position_sees(row):
    model = build(row).eval()
    cfg = model.config
    idx = torch.randint(0, 40, (1, 12))
    base = model(idx)[0]
    for t in range(11):  # change token t+1: which logits move?
        changed = idx.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % 40
        moved = (model(changed)[0] - base).abs().amax(dim=-1)[0] > 1e-6  # (T,)
        if cfg.attn_mask == "causal":
            assert not moved[: t + 1].any(), f"position <= {t} saw token {t + 1}"
        elif cfg.attn_mask == "prefix":
            P = cfg.prefix_len
            if t + 1 >= P:  # outside the prefix: plain causal
                assert not moved[: t + 1].any()
            elif cfg.attn_window == 0:  # inside: the whole prefix sees it, and the (causal) rest too
                assert moved[:P].all()
        else:  # bidirectional: the neighbours on both sides see it (within the window)
            assert moved[max(0, t + 1 - 1)] and (t + 2 > 11 or moved[t + 2])


@pytest.mark.parametrize("row", COMBOS, ids=map(label, COMBOS))
def test_kv_cached_decoding_equals_uncached(row):
    model = build(row).eval()
    prompt = torch.randint(0, 40, (2, 5))
    n = 20  # past block_size = 12: rebuild (learned) or slide (the others)

    def run(kv_cache):
        steps = list(sample.decode_steps(model, prompt, n, 40, temperature=0, kv_cache=kv_cache))
        return torch.cat([t for t, _ in steps], dim=1), torch.stack([lg for _, lg in steps], dim=1)

    cached_tokens, cached_logits = run(True)
    plain_tokens, plain_logits = run(False)
    assert torch.equal(cached_tokens, plain_tokens)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("row", COMBOS, ids=map(label, COMBOS))
def test_gradient_checkpointing_changes_nothing(row):
    idx = torch.randint(0, 40, (2, 12))
    targets = torch.randint(0, 40, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = build(row, grad_checkpointing=ckpt, dropout=0.1).train()
        torch.manual_seed(7)  # the same dropout masks: checkpointing replays the RNG in the recomputation
        loss = model(idx, targets)[1]
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (la, ga), (lb, gb) = grads
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_cache_with_a_sliding_window_holds_two_windows_and_matches():
    row = {"pos_encoding": "rope", "attn_window": 4}
    model = build(row, block_size=32).eval()
    prompt = torch.randint(0, 40, (1, 20))  # prefilled in window-sized chunks
    steps = list(sample.decode_steps(model, prompt, 30, 40, temperature=0, kv_cache=True))
    plain = list(sample.decode_steps(model, prompt, 30, 40, temperature=0, kv_cache=False))
    assert [t.item() for t, _ in steps] == [t.item() for t, _ in plain]
    torch.testing.assert_close(torch.stack([lg for _, lg in steps]), torch.stack([lg for _, lg in plain]),
                               rtol=0, atol=1e-5)
    cache = KVCache(model.config, 1, max_len=8)
    model(prompt[:, :4], kv_cache=cache)
    for t in range(4, 20):  # decode far past the cache's 8 slots
        model(prompt[:, t:t + 1], kv_cache=cache)
    # the ring holds the last 8 positions, each in slot position % 8
    assert cache.next_pos == 20 and cache.slot_pos.tolist() == [16, 17, 18, 19, 12, 13, 14, 15]


def test_attention_maps_respect_windows_and_masks():
    maps = build({"attn_window": 3}).attention_maps(torch.randint(0, 40, (1, 10)))
    seen = maps[0][0, 0] > 0  # (T, T)
    expected = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-3)
    assert torch.equal(seen, expected)
    prefix = build({"attn_mask": "prefix"}).attention_maps(torch.randint(0, 40, (1, 10)))[1][0, 2] > 0
    assert prefix[:4, :4].all() and not prefix[:4, 4:].any() and not prefix[5, 6:].any()


# ----------------------------------------------------------------------------------------------------
# Each encoding against its paper


def test_sinusoidal_matches_vaswani():
    d, positions = 6, [0, 1, 5, 17]
    pe = sinusoidal_encoding(torch.tensor(positions), d)
    for r, pos in enumerate(positions):
        for i in range(d):
            expected = math.sin(pos / 10000 ** (i / d)) if i % 2 == 0 else math.cos(pos / 10000 ** ((i - 1) / d))
            assert pe[r, i].item() == pytest.approx(expected, abs=1e-6)


def test_alibi_slopes_and_bias_match_press():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(4).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
    # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence
    assert alibi_slopes(6).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    model = build({"pos_encoding": "alibi"}).eval()
    inputs = model.attention_inputs(torch.arange(5), None, 0)
    m = alibi_slopes(4)
    for h in range(4):
        for i in range(5):
            for j in range(5):
                expected = -m[h].item() * (i - j) if j <= i else float("-inf")
                assert inputs.mask[h, i, j].item() == pytest.approx(expected)


def test_rope_is_a_rotation_that_sees_only_offsets():
    torch.manual_seed(0)
    hs = 16
    q, k = torch.randn(1, 1, 1, hs), torch.randn(1, 1, 1, hs)

    def at(x, pos):
        cos, sin = rope_angles(torch.tensor([pos]), hs, 10000.0)
        return apply_rope(x, cos, sin)

    for pos in (0, 3, 100):
        torch.testing.assert_close(at(q, pos).norm(), q.norm())
    dots = [(at(q, m) * at(k, m - 4)).sum().item() for m in (4, 9, 50, 500)]
    assert max(dots) - min(dots) < 1e-4  # the same offset, the same score
    assert abs((at(q, 10) * at(k, 6)).sum().item() - (at(q, 10) * at(k, 2)).sum().item()) > 1e-3
    torch.testing.assert_close(at(q, 0), q)  # position 0 is the identity


# ----------------------------------------------------------------------------------------------------
# Grouped-query attention


def test_gqa_with_all_heads_is_multi_head_attention():
    torch.manual_seed(0)
    mha = GPT(cfg_of({})).eval()
    gqa = GPT(cfg_of({"n_kv_head": 4})).eval()
    gqa.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 40, (2, 12))
    assert torch.equal(mha(idx)[0], gqa(idx)[0])


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_each_kv_head_copied_to_its_group(kv_heads):
    gqa = build({"n_kv_head": kv_heads}).eval()
    mha = GPT(cfg_of({})).eval()
    state = gqa.state_dict()
    C, hs, nh = 32, 8, 4
    for i in range(2):
        w = state[f"blocks.{i}.attn.c_attn.weight"]
        b = state[f"blocks.{i}.attn.c_attn.bias"]
        q, k, v = w.split([C, kv_heads * hs, kv_heads * hs])
        qb, kb, vb = b.split([C, kv_heads * hs, kv_heads * hs])

        def expand(t):  # (kvh * hs, ...) -> (nh * hs, ...): head g serves query heads g*nh/kvh ...
            return t.view(kv_heads, hs, *t.shape[1:]).repeat_interleave(nh // kv_heads, dim=0).reshape(nh * hs, *t.shape[1:])

        state[f"blocks.{i}.attn.c_attn.weight"] = torch.cat([q, expand(k), expand(v)])
        state[f"blocks.{i}.attn.c_attn.bias"] = torch.cat([qb, expand(kb), expand(vb)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 40, (2, 12))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=0, atol=1e-5)
    assert KVCache(gqa.config, 1).k.shape[2] == kv_heads  # the cache stores only the kv heads


# ----------------------------------------------------------------------------------------------------
# Feed-forward sizes, experts, masked LM


def test_swiglu_hidden_size_follows_llama():
    assert GPTConfig(n_embd=384, n_head=6, mlp="swiglu").hidden_size == 1024  # ⅔·4·384 = 1024
    assert GPTConfig(n_embd=128, n_head=4, mlp="swiglu").hidden_size == 384  # 341.3 rounded up to 64s
    assert GPTConfig(n_embd=128, n_head=4, mlp="swiglu", mlp_hidden=200).hidden_size == 200


def test_moe_routes_top_k_and_balance_loss_is_one_when_uniform():
    model = build({"n_experts": 4}, experts_per_token=2).train()
    idx = torch.randint(0, 40, (2, 12))
    model(idx, idx)
    aux = model.aux_loss().item()
    assert 1.0 <= aux < 2.0  # 1 is perfectly balanced, E the worst
    moe = model.blocks[0].mlp
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router: every expert equally likely
    x = torch.randn(1, 6, 32)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-5)
    # the output is the router-weighted sum of the chosen experts, checked by hand for one token
    with torch.no_grad():
        moe.router.weight.normal_()
    y = moe(x)
    probs = torch.softmax(moe.router(x[0, 0]), -1)
    top_p, top_e = probs.topk(2)
    expected = sum(p / top_p.sum() * moe.experts[e](x[0, 0][None])[0] for p, e in zip(top_p, top_e.tolist()))
    torch.testing.assert_close(y[0, 0], expected, rtol=0, atol=1e-5)


def test_bidirectional_reserves_a_mask_token_that_is_never_sampled():
    cfg = cfg_of({"attn_mask": "bidirectional"}, vocab_multiple=1)
    assert cfg.mask_token == 40 and cfg.padded_vocab_size == 41
    model = GPT(cfg).eval()
    steps = list(sample.decode_steps(model, torch.zeros(1, 3, dtype=torch.long), 15, 40, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0)))
    assert all(t.item() < 40 for t, _ in steps) and steps[0][1].shape == (1, 40)


def test_invalid_variant_values_are_rejected():
    for bad, match in [({"n_kv_head": 3}, "n_kv_head"), ({"attn_mask": "prefix", "prefix_len": 12}, "prefix_len"),
                       ({"prefix_len": 4}, "prefix_len"), ({"arch": "encoder_decoder", "attn_mask": "prefix"}, "causal"),
                       ({"n_encoder_layer": 2}, "encoder_decoder"),
                       ({"scale_embeddings": True, "pos_encoding": "rope"}, "scale_embeddings"), ({"arch": "t5"}, "arch"),
                       ({"n_experts": 1}, "n_experts"), ({"n_experts": 2, "experts_per_token": 3}, "experts_per_token"),
                       ({"pos_encoding": "rope", "n_embd": 36, "n_head": 4}, "even")]:
        with pytest.raises(ValueError, match=match):
            cfg_of(bad)
    assert replace(cfg_of({}), attn_window=100).window == 12  # a window wider than the context is the context


# ----------------------------------------------------------------------------------------------------
# Each switch, end to end: a few training steps on the debug config, then sampling with the cache

SWITCHES = [
    {"pos_encoding": "sinusoidal"}, {"pos_encoding": "rope"}, {"pos_encoding": "alibi"}, {"pos_encoding": "none"},
    {"n_kv_head": 1}, {"attn_window": 8}, {"qk_norm": True}, {"attn_mask": "prefix", "prefix_len": 8},
    {"attn_mask": "bidirectional"}, {"norm": "rmsnorm"}, {"norm_placement": "post"}, {"mlp": "relu"},
    {"mlp": "swiglu"}, {"n_experts": 4, "experts_per_token": 2}, {"grad_checkpointing": True},
]


@pytest.mark.parametrize("switch", SWITCHES, ids=map(label, SWITCHES))
def test_each_switch_trains_and_samples(char_data, tmp_path, switch):
    import train
    from conftest import read_metrics, tiny_config

    model = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, **switch}
    cfg = tiny_config(char_data, tmp_path / "run", model=model, train={"max_iters": 12, "eval_interval": 12})
    result = train.train(cfg)
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert math.isfinite(result.best_val_loss)
    if "n_experts" in switch:
        assert all(r["aux_loss"] >= 1.0 for r in records if "loss" in r)  # logged; 1 = perfectly balanced
    run = sample.load_for_inference(tmp_path / "run")
    assert run.model.config == replace(cfg.model, vocab_size=run.model.config.vocab_size)
    sc = sample.SampleConfig(max_new_tokens=40, temperature=0, kv_cache=True)  # past block_size = 32
    texts = sample.sample(run, "ROMEO:", 1, sc, write=lambda s: None)
    uncached = sample.sample(run, "ROMEO:", 1, replace(sc, kv_cache=False), write=lambda s: None)
    assert len(texts[0]) == len("ROMEO:") + 40 and texts == uncached


@pytest.mark.parametrize("compiled,pos", [(False, "rope"), (False, "learned"), (True, "learned")])
def test_flex_attention_sliding_window_equals_reference(monkeypatch, compiled, pos):
    """The FlexAttention path (a GPU's, under torch.compile) gives the reference attention's logits. On this CPU
    flex_attention runs forward only, so it is forced on for inference: uncompiled it checks the block mask
    against the dense window; compiled it checks that the block mask is built inside the traced forward.
    (Compiled with RoPE, torch 2.13's CPU flex kernel gave logits 0.1 off, at position 0 too: not this path's
    mask, which the uncompiled case checks; a GPU compiles flex to a different, Triton, kernel.)"""
    import model as model_module

    monkeypatch.setattr(model_module, "flex_attention_applies", lambda device: True)
    model = build({"pos_encoding": pos, "attn_window": 5, "n_kv_head": 2}, block_size=32).eval()
    idx = torch.randint(0, 40, (2, 32))
    inputs = model.attention_inputs(torch.arange(32), None, 0)
    assert inputs.block_mask is not None  # which the flex path reads instead of the dense mask
    q, kv = torch.arange(32)[:, None], torch.arange(32)[None, :]
    assert torch.equal(inputs.block_mask.mask_mod(0, 0, q, kv), inputs.mask)  # the same window
    with torch.no_grad():
        expected = model(idx, reference=True)[0]
        forward = torch.compile(model) if compiled else model
        torch.testing.assert_close(forward(idx)[0], expected, rtol=0, atol=1e-5)
