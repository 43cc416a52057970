"""sample.py: cached == uncached decoding (past block_size too), token sampling rules, seeds, loading a run."""

from dataclasses import replace

import pytest
import torch

import checkpoint
import sample
import train
from conftest import tiny_config
from errors import UserError
from model import GPT, GPTConfig


def tiny_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def run_steps(model, prompt, n, kv_cache, **kw):
    tokens, logits = [], []
    for token, lg in sample.decode_steps(model, prompt, n, model.config.vocab_size, kv_cache=kv_cache, **kw):
        tokens.append(token)
        logits.append(lg)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


@pytest.mark.parametrize("prompt_len", [1, 5, 12])
def test_cached_greedy_equals_uncached_past_block_size(prompt_len):
    model = tiny_model()
    prompt = torch.randint(0, 50, (2, prompt_len))
    n = 30  # well past block_size = 12: the window slides and the cache is rebuilt
    cached_tokens, cached_logits = run_steps(model, prompt, n, kv_cache=True, temperature=0)
    plain_tokens, plain_logits = run_steps(model, prompt, n, kv_cache=False, temperature=0)
    assert torch.equal(cached_tokens, plain_tokens)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-5)


def test_decoding_never_reallocates_or_reshapes_the_cache(monkeypatch):
    """The cache is one fixed ring: every decode step writes into the same storage, at the same shapes."""
    model = tiny_model(pos_encoding="rope", attn_window=4)  # positions run on past the 8 slots
    seen = []
    real = sample.decode_one

    def spy(model, token, positions, cache, prefix_len):
        seen.append((cache.k.data_ptr(), cache.k.shape, cache.slot_pos.data_ptr(), token.shape, positions.shape))
        return real(model, token, positions, cache, prefix_len)

    monkeypatch.setattr(sample, "decode_one", spy)
    run_steps(model, torch.randint(0, 50, (2, 3)), 25, kv_cache=True, temperature=0)
    assert len(seen) == 24 and len(set(seen)) == 1  # the first token comes from the prefill
    assert seen[0][1] == (2, 2, 2, 8, 16) and seen[0][3:] == ((2, 1), (1,))


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_a_long_context_gets_only_the_slots_one_generation_takes(monkeypatch, pos_encoding):
    """An imported model's context can be 131,072 positions: the cache holds the prompt and the new tokens only,
    and decodes as the uncached path does."""
    model = tiny_model(block_size=4096, pos_encoding=pos_encoding)
    made = []

    class Recorded(sample.KVCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(sample, "KVCache", Recorded)
    prompt = torch.randint(0, 50, (1, 7))
    cached_tokens, cached_logits = run_steps(model, prompt, 20, kv_cache=True, temperature=0)
    assert [c.max_len for c in made] == [7 + 20]
    plain_tokens, plain_logits = run_steps(model, prompt, 20, kv_cache=False, temperature=0)
    assert torch.equal(cached_tokens, plain_tokens)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_decode_step_equals_eager_and_compiles_once(batch):
    """The compiled one-token step gives the eager tokens and logits, through one graph for every position
    (no recompile as positions advance and the ring wraps)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(pos_encoding="rope", attn_window=4, n_kv_head=1)
    prompt = torch.randint(0, 50, (batch, 3))
    eager_tokens, eager_logits = run_steps(model, prompt, 30, kv_cache=True, temperature=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, logits = run_steps(model, prompt, 30, kv_cache=True, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] == 1  # compiled, in one piece (no graph break)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)
    torch._dynamo.reset()


def test_same_seed_same_tokens_and_different_seed_differs():
    model = tiny_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return run_steps(model, prompt, 40, kv_cache=True, temperature=1.0, generator=g)[0]

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_sample_next_token_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample.sample_next_token(logits, temperature=0).item() == 1  # greedy
    g = torch.Generator().manual_seed(0)
    top2 = {sample.sample_next_token(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert top2 == {1, 3}
    # probabilities ~ [0.03, 0.64, 0.09, 0.24]: top_p 0.7 keeps tokens 1 and 3, top_p 0.5 only token 1
    assert {sample.sample_next_token(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)} == {1, 3}
    assert {sample.sample_next_token(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)} == {1}
    everything = {sample.sample_next_token(logits, 5.0, generator=g).item() for _ in range(400)}
    assert everything == {0, 1, 2, 3}


def test_padded_vocabulary_is_never_sampled():
    model = tiny_model(vocab_size=5)  # padded to 64 rows
    assert model.config.padded_vocab_size == 64
    with torch.no_grad():  # make the padded rows the most likely by far
        model.lm_head.weight[5:] = model.lm_head.weight[5:] * 0 + 1.0
    g = torch.Generator().manual_seed(0)
    tokens, logits = run_steps(model, torch.zeros(1, 1, dtype=torch.long), 50, kv_cache=True,
                               temperature=2.0, generator=g)
    assert logits.shape[-1] == 5 and tokens.max().item() < 5
    assert run_steps(model, torch.zeros(1, 1, dtype=torch.long), 5, kv_cache=True, temperature=0)[0].max() < 5


def test_generate_respects_max_tokens_and_stop_token():
    model = tiny_model()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    sc = sample.SampleConfig(max_new_tokens=17, temperature=0)
    out = sample.generate(model, prompt, 50, sc)
    assert len(out) == 17
    streamed = []
    stopped = sample.generate(model, prompt, 50, sc, stop_token=out[4], on_token=streamed.append)
    assert stopped == out[:out.index(out[4])] == streamed


def test_sample_config_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample.SampleConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        sample.SampleConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        sample.SampleConfig(temperature=-1)


@pytest.fixture(scope="module")
def trained_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    train.train(tiny_config(char_data, out, train=dict(max_iters=20, eval_interval=10, eval_iters=2)))
    return out


def test_load_and_sample_a_run(trained_run):
    run = sample.load_for_inference(trained_run)
    assert run.step == 20 and run.tokenizer.spec["kind"] == "char"
    sc = sample.SampleConfig(max_new_tokens=40, temperature=0.9, seed=3)
    pieces = []
    texts = sample.sample(run, "ROMEO:", 2, sc, write=pieces.append)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 40 for t in texts)
    assert texts[0] in "".join(pieces) and texts[1] in "".join(pieces)  # what was streamed is what was returned
    assert texts == sample.sample(run, "ROMEO:", 2, sc, write=lambda s: None)  # same seed, same text
    no_cache = sample.sample(run, "ROMEO:", 1, sample.SampleConfig(max_new_tokens=40, temperature=0, kv_cache=False),
                             write=lambda s: None)
    cached = sample.sample(run, "ROMEO:", 1, sample.SampleConfig(max_new_tokens=40, temperature=0),
                           write=lambda s: None)
    assert cached == no_cache


def test_samples_share_one_cache_and_a_used_cache_decodes_like_none(trained_run, monkeypatch):
    """sample() hands one KV cache to every sample (a compiled step keeps its static tensors); what the first
    sample left in it changes nothing for the next ones."""
    run = sample.load_for_inference(trained_run)
    sc = sample.SampleConfig(max_new_tokens=30, temperature=0.9, top_k=5, seed=7)
    uncached = sample.sample(run, "KING:", 3, replace(sc, kv_cache=False), write=lambda s: None)
    caches = set()
    real = sample.decode_one

    def spy(model, token, positions, cache, prefix_len):
        caches.add((cache.k.data_ptr(), cache.v.data_ptr(), cache.slot_pos.data_ptr()))
        return real(model, token, positions, cache, prefix_len)

    monkeypatch.setattr(sample, "decode_one", spy)
    assert sample.sample(run, "KING:", 3, sc, write=lambda s: None) == uncached
    assert len(caches) == 1
    with pytest.raises(ValueError, match="batch 1"):  # a cache for another batch size is refused, not misused
        list(sample.decode_steps(run.model, torch.zeros(2, 3, dtype=torch.long), 2, 65,
                                 kv_cache=sample.decode_cache(run.model, 1, run.rt.device, run.rt.dtype), rt=run.rt))


def test_load_bad_runs(trained_run, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sample.load_for_inference(tmp_path / "missing")
    with pytest.raises(UserError, match="no checkpoint"):
        sample.load_for_inference(tmp_path)
    with pytest.raises(UserError, match="latest"):
        sample.load_for_inference(trained_run, checkpoint="newest")
    run = sample.load_for_inference(trained_run)
    with pytest.raises(UserError, match="'€'"):
        sample.encode_prompt(run.tokenizer, "a€b")
    # a checkpoint from a newer version, whose model has a setting this one lacks, or a value it refuses
    state = checkpoint.load_checkpoint(trained_run)
    for change, message in [({"attn_sinks": 4}, r"does not know \(attn_sinks\)"), ({"n_head": 5}, "divisible")]:
        future = tmp_path / f"future-{len(message)}"
        checkpoint.save_checkpoint(future / "ckpt.pt", {**state, "config": {**state["config"],
                                                        "model": {**state["config"]["model"], **change}}})
        with pytest.raises(UserError, match=message):
            sample.load_for_inference(future)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "alibi"])
def test_inference_runtime_casts_big_models_to_bf16_on_a_bf16_cpu(monkeypatch, pos_encoding):
    """Decoding is memory-bound once the weights outgrow the caches: those models get bfloat16 weights on a CPU
    with native bf16, small ones stay float32; the bf16 logits stay within bf16 rounding of float32's, and the
    decode loop runs on them (positions, masks and cache in the same dtype)."""
    monkeypatch.setattr(sample, "cpu_has_bf16", lambda: True)
    torch.manual_seed(0)
    big = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=512, pos_encoding=pos_encoding))
    assert big.num_params() >= sample.CPU_BF16_MIN_PARAMS
    idx = torch.randint(0, 65, (1, 20))
    with torch.no_grad():
        ref = big.eval()(idx)[0]
    rt = sample.inference_runtime(big, "cpu")
    assert rt.dtype == torch.bfloat16 and {p.dtype for p in big.parameters()} == {torch.bfloat16}
    with torch.no_grad(), rt.autocast():
        out = big(idx)[0].float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    tokens = [t for t, _ in sample.decode_steps(big, idx, 20, 65, temperature=1.0, top_k=5, rt=rt)]
    assert len(tokens) == 20 and all(0 <= t.item() < 65 for t in tokens)

    small = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
    assert sample.inference_runtime(small, "cpu").dtype == torch.float32
    monkeypatch.setattr(sample, "cpu_has_bf16", lambda: False)
    assert sample.inference_runtime(big, "cpu").dtype == torch.float32
    assert {p.dtype for p in big.parameters()} == {torch.float32}


@pytest.mark.skipif(not sample.packs_linears(torch.device("cpu"), torch.bfloat16),
                    reason="needs a CPU with native bf16 and oneDNN's linear ops")
def test_packed_linears_decode_bitwise_as_plain_linears(monkeypatch):
    """bfloat16 decoding on a CPU multiplies by weights laid out once (sample.packed_linears): the same logits bit for
    bit, prefill and decode, nothing left on the model afterwards, and a weight changed in place is packed again."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64)).eval().to(torch.bfloat16)
    idx = torch.randint(0, 65, (2, 9))
    with torch.no_grad():
        ref = model(idx)[0]
        with sample.packed_linears(model):
            assert torch.equal(model(idx)[0], ref)
        assert not any("forward" in m.__dict__ for m in model.modules())
        model.blocks[0].mlp.c_fc.weight.mul_(2)
        ref = model(idx)[0]
        with sample.packed_linears(model):
            assert torch.equal(model(idx)[0], ref)

    def decode(packed: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(sample, "packs_linears", lambda *a: packed)
        steps = sample.decode_steps(model, idx[:1], 40, 65, temperature=1.0, top_k=5,
                                    generator=torch.Generator().manual_seed(0))
        return [logits for _, logits in steps]

    plain, packed = decode(False), decode(True)  # past block_size: the window moves and the cache is rebuilt
    assert len(plain) == 40 and all(torch.equal(a, b) for a, b in zip(plain, packed))
