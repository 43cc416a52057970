"""Speculative decoding (sample.SpeculativeDecoder, `minigpt sample --draft`): greedy output equals plain greedy
token for token, sampled tokens follow the target's distribution, bad inputs are one-line errors."""

import copy

import pytest
import torch
from typer.testing import CliRunner

import checkpoint
import sample
import train
from cli.main import app
from conftest import tiny_config
from errors import UserError
from model import GPT, GPTConfig
from pairs import SpecialTokens


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory):
    """A target and a smaller draft trained on the same characters; the draft's context is shorter (12 < 16)."""
    root = tmp_path_factory.mktemp("spec")
    train.train(tiny_config(char_data, root / "target", train=dict(max_iters=40, eval_interval=40, eval_iters=1)))
    train.train(tiny_config(char_data, root / "draft", model=dict(n_layer=1, n_head=2, n_embd=16, block_size=12),
                            train=dict(max_iters=40, eval_interval=40, eval_iters=1)))
    return root / "target", root / "draft"


def plain_and_speculative(target, draft, prompt, sc, k):
    plain = sample.sample(target, prompt, 1, sc, write=lambda s: None)
    logs = []
    spec = sample.sample_speculative(target, draft, prompt, 1, sc, k, write=lambda s: None, log=logs.append)
    return plain, spec, logs


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_plain_greedy(runs, k):
    """Through rejections and cache rollbacks, and far past the contexts (16 and 12 tokens), whose windows move on
    by half a block (the target's where a plain run's does); a prompt longer than the context is cropped."""
    target, draft = (sample.load_for_inference(r, device="cpu") for r in runs)
    sc = sample.SampleConfig(max_new_tokens=80, temperature=0)
    for prompt in ["ROMEO:", "First Citizen:\nBefore we proceed any further", "", "O"]:
        plain, spec, logs = plain_and_speculative(target, draft, prompt, sc, k)
        assert spec == plain, (prompt, k)
        assert len(logs) == 1 and logs[0].startswith("draft: ") and "proposed tokens accepted" in logs[0]


def test_acceptance_stats(runs):
    target, draft = (sample.load_for_inference(r, device="cpu") for r in runs)
    sc = sample.SampleConfig(max_new_tokens=50, temperature=0)
    dec = sample.SpeculativeDecoder(target.model, draft.model, target.tokenizer.vocab_size, 3, temperature=0)
    ids = target.tokenizer.encode("KING:")
    out = sample.generate_speculative(dec, ids, sc.max_new_tokens)
    assert sample.generate(target.model, torch.tensor([ids]), target.tokenizer.vocab_size, sc) == out
    assert dec.emitted >= 50 and dec.emitted == dec.accepted + dec.forwards and dec.forwards < 50
    assert 0 < dec.accepted <= dec.proposed <= 3 * dec.forwards


def test_a_draft_that_is_the_target_accepts_everything(runs):
    target = sample.load_for_inference(runs[0], device="cpu")
    for temperature in (0, 0.9):
        dec = sample.SpeculativeDecoder(target.model, target.model, target.tokenizer.vocab_size, 4,
                                        temperature=temperature, generator=torch.Generator().manual_seed(0))
        sample.generate_speculative(dec, target.tokenizer.encode("KING:"), 10)
        assert dec.accepted == dec.proposed > 0


def test_sampled_speculative_is_seeded(runs):
    target, draft = (sample.load_for_inference(r, device="cpu") for r in runs)
    sc = sample.SampleConfig(max_new_tokens=30, temperature=0.9, top_k=10, seed=5)
    texts = [sample.sample_speculative(target, draft, "ROMEO:", 2, sc, 3, write=lambda s: None, log=lambda s: None)
             for _ in range(2)]
    assert texts[0] == texts[1] and all(len(t) == len("ROMEO:") + 30 for t in texts[0])


def random_gpt(seed, vocab=5, scale=0.5, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=16), **kw})).eval()
    # an output layer of its own (not the embedding's, which makes a random model repeat its last token), with
    # sharp, varied distributions, so that p and q differ clearly
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * scale)
    return model


def exact_joint(model, prompt, vocab, temperature, top_k, top_p):
    """P(first two new tokens) under the model, as a plain sampler draws them: (vocab, vocab)."""
    def probs(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][:, -1, :vocab]
        return sample.token_probs(logits, temperature, top_k, top_p)[0].double()

    first = probs(prompt)
    return torch.stack([first[a] * probs(prompt + [a]) for a in range(vocab)])


@pytest.mark.parametrize("k, top_k, top_p, n", [(1, 0, 1.0, 1500), (3, 4, 0.9, 3000)])
def test_sampled_tokens_follow_the_targets_distribution(k, top_k, top_p, n):
    """The first two emitted tokens (from one step, or two when the first proposal is rejected) over many draws:
    their empirical distribution is within sampling noise of the target's, and clearly not the draft's."""
    vocab, temperature = 5, 1.0
    target, draft = random_gpt(1), random_gpt(2)
    prompt = [0, 3]
    p = exact_joint(target, prompt, vocab, temperature, top_k, top_p)
    q = exact_joint(draft, prompt, vocab, temperature, top_k, top_p)
    assert 0.5 * (p - q).abs().sum() > 0.25  # the test can tell the two apart
    dec = sample.SpeculativeDecoder(target, draft, vocab, k, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=torch.Generator().manual_seed(1234))
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for _ in range(n):
        dec.start(prompt)
        out = []
        while len(out) < 2:
            out += dec.step()
        counts[out[0], out[1]] += 1
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < 0.05, tv  # sampling noise is about half that
    assert 0 < dec.accepted < dec.proposed  # proposals were both accepted and rejected
    assert counts[p == 0].sum() == 0  # nothing outside the target's top-k / top-p


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
    target, draft = runs
    cli = CliRunner()

    def error(*args):
        result = cli.invoke(app, ["sample", str(target), *map(str, args)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        return lines[0]

    assert "--draft-tokens must be >= 1" in error("--draft", draft, "--draft-tokens", 0)
    assert "add --draft" in error("--draft-tokens", 3)
    assert "--beams" in error("--draft", draft, "--beams", 2, "--num-samples", 1)
    assert "--no-kv-cache" in error("--draft", draft, "--no-kv-cache")
    assert "--compile" in error("--draft", draft, "--compile")
    state = checkpoint.load_checkpoint(draft)
    chars = state["tokenizer"]["chars"]
    new = next(c for c in "~|#@%^" if c not in chars)  # the same number of characters, one of them different
    other = tmp_path / "other"
    tokenizer = {**state["tokenizer"], "chars": chars[:-1] + new}
    checkpoint.save_checkpoint(other / "ckpt.pt", {**state, "tokenizer": tokenizer})
    assert "uses another tokenizer" in error("--draft", other, "--prompt", "A")
    result = cli.invoke(app, ["sample", str(target), "--draft", str(draft), "--draft-tokens", "3", "--temperature",
                              "0", "--max-new-tokens", "20", "--prompt", "ROMEO:"])
    assert result.exit_code == 0, result.output
    assert "ROMEO:" in result.output and "proposed tokens accepted" in result.output


def test_check_draft_refuses_non_causal_models_and_pairs_runs(runs):
    target = sample.load_for_inference(runs[0], device="cpu")
    for kw in (dict(attn_mask="prefix", prefix_len=2), dict(attn_mask="bidirectional")):
        model = GPT(GPTConfig(**{**vars(target.model.config), **kw}))
        bad = sample.LoadedRun(model, target.tokenizer, target.rt, 0)
        with pytest.raises(UserError, match="causal"):
            sample.check_draft(target, bad)
    pairs = sample.LoadedRun(target.model, target.tokenizer, target.rt, 0, special=SpecialTokens(65, 66, 67, 68, ()))
    for a, b in ((target, pairs), (pairs, target)):
        with pytest.raises(UserError, match="pairs"):
            sample.check_draft(a, b)


@pytest.mark.parametrize("pos_encoding, attn_window", [("learned", 0), ("rope", 0), ("alibi", 5)])
def test_greedy_equals_plain_for_other_position_encodings(pos_encoding, attn_window):
    """Random models with sharp logits (rollbacks happen), past block_size: the positions continue (rope, alibi:
    the cache is a ring, overwritten as it goes and rolled back) or the window moves on (learned)."""
    vocab = 11
    target = random_gpt(3, vocab, 0.5, pos_encoding=pos_encoding, attn_window=attn_window, block_size=10, n_layer=2)
    draft = copy.deepcopy(target)  # the target with a noisy output layer: some proposals accepted, some not
    with torch.no_grad():
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight) * 0.4)
    sc = sample.SampleConfig(max_new_tokens=60, temperature=0)
    for prompt in ([1], [2, 7, 3, 3]):
        plain = sample.generate(target, torch.tensor([prompt]), vocab, sc)
        dec = sample.SpeculativeDecoder(target, draft, vocab, 3, temperature=0)
        assert sample.generate_speculative(dec, prompt, sc.max_new_tokens) == plain
        assert 0 < dec.accepted < dec.proposed


@pytest.mark.parametrize("k", [1, 4])
def test_a_long_context_gets_caches_the_size_of_the_generation(k):
    """An imported model's window can be 131,072 positions: given the generation's length, both caches hold that
    (and a check's proposals), never wrap, and greedy speculation still equals plain greedy decoding."""
    target = random_gpt(1, vocab=50, block_size=4096, pos_encoding="rope")
    draft = random_gpt(2, vocab=50, block_size=4096, pos_encoding="rope")
    prompt, n = [3, 1, 4, 1, 5], 40
    dec = sample.SpeculativeDecoder(target, draft, 50, k, temperature=0, tokens=len(prompt) + n)
    assert dec.target.cache.max_len == dec.draft.cache.max_len == len(prompt) + n + k + 1
    plain = sample.generate(target, torch.tensor([prompt]), 50, sample.SampleConfig(max_new_tokens=n, temperature=0))
    assert sample.generate_speculative(dec, prompt, n) == plain
