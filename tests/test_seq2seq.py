"""Training and decoding on pairs, for every architecture: the batch layouts, per-example prefix masks, span
corruption, exact resume, label smoothing and the plain loss, the inverse-sqrt schedule, cached == uncached
encoder-decoder decoding, beam search on a real model, and the bad inputs of this path."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import batches
import checkpoint
import sample
import train
from beam_search import beam_search
from conftest import read_metrics, tiny_config
from dataset_format import read_meta
from errors import UserError
from model import GPT, GPTConfig
from pairs import special_tokens
from prepare_data import prepare

ARCHS = {
    "encoder_decoder": dict(arch="encoder_decoder", block_size=16, source_block_size=16),
    "decoder": dict(block_size=32),
    "prefix": dict(block_size=32, attn_mask="prefix", prefix_len=0),
}


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "copy"
    prepare("task:copy", out=out, examples=300, seed=1, log=lambda s: None)
    return out


def pairs_config(data, out, arch: str, **sections):
    model = {**ARCHS[arch], **sections.pop("model", {})}
    return tiny_config(data, out, model=model, **sections)


# ----------------------------------------------------------------------------------------------------
# Batches


def test_pair_batches_lay_out_each_architecture():
    V = 10
    special = special_tokens(V)
    pairs = [(np.array([1, 2, 3]), np.array([4, 5])), (np.array([6]), np.array([7, 8, 9]))]
    x, y = batches.collate_pairs(pairs, GPTConfig(vocab_size=V + 68, arch="encoder_decoder"), special)
    assert x["source"].tolist() == [[1, 2, 3], [6, special.pad, special.pad]]
    assert x["source_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert x["target"].tolist() == [[special.bos, 4, 5, special.pad], [special.bos, 7, 8, 9]]
    assert y.tolist() == [[4, 5, special.eos, -1], [7, 8, 9, special.eos]]
    x, y = batches.collate_pairs(pairs, GPTConfig(vocab_size=V + 68), special)
    sep, eos, pad = special.sep, special.eos, special.pad
    assert x["idx"].tolist() == [[1, 2, 3, sep, 4, 5], [6, sep, 7, 8, 9, pad]]
    assert y.tolist() == [[-1, -1, -1, 4, 5, eos], [-1, 7, 8, 9, eos, -1]]  # the loss is on the target only
    assert "prefix_len" not in x
    x, _ = batches.collate_pairs(pairs, GPTConfig(vocab_size=V + 68, attn_mask="prefix"), special)
    assert x["prefix_len"].tolist() == [4, 2]  # the source and the separator


@pytest.mark.parametrize("pos", ["learned", "alibi", "rope"])
def test_per_example_prefixes_equal_each_example_alone(pos):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, block_size=12, n_layer=2, n_head=4, n_embd=32, attn_mask="prefix",
                    pos_encoding=pos)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 20, (3, 10))
    prefix = torch.tensor([3, 7, 1])
    together = model(idx, prefix_len=prefix)[0]
    reference = model(idx, prefix_len=prefix, reference=True)[0]
    torch.testing.assert_close(together, reference, atol=1e-5, rtol=1e-5)
    for b in range(3):
        alone = model(idx[b:b + 1], prefix_len=int(prefix[b]))[0]
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=1e-5)


def test_span_corruption_hides_spans_behind_sentinels_and_gives_them_back():
    special = special_tokens(50)
    g = torch.Generator().manual_seed(0)
    for n in (8, 20, 64, 200):
        tokens = torch.randint(0, 50, (n,), generator=g).tolist()
        source, target = batches.span_corruption(tokens, special, g)
        assert target[-1] == special.eos
        sentinels = [t for t in source if t in special.sentinels]
        assert sentinels == list(special.sentinels[:len(sentinels)]) and sentinels  # in order, one per span
        assert [t for t in target if t in special.sentinels] == sentinels
        hidden = len(target) - 1 - len(sentinels)
        assert hidden == min(max(round(0.15 * n), 1), n - 1)  # 15% noise
        # putting each span back in place of its sentinel restores the window
        spans, current = {}, None
        for t in target[:-1]:
            if t in special.sentinels:
                current = t
                spans[t] = []
            else:
                spans[current].append(t)
        restored = [u for t in source for u in (spans[t] if t in special.sentinels else [t])]
        assert restored == tokens
        assert source[0] not in special.sentinels  # kept text comes first


def test_pairs_batches_are_a_function_of_seed_step_and_micro(copy_data):
    meta = read_meta(copy_data)
    cfg = GPTConfig(vocab_size=meta["vocab_size"], arch="encoder_decoder", block_size=16, source_block_size=16)
    a = batches.PairBatches(copy_data, meta, "train", 4, cfg, torch.device("cpu"), seed=3)
    b = batches.PairBatches(copy_data, meta, "train", 4, cfg, torch.device("cpu"), seed=3)
    xa, ya = a.get(5, 1)
    xb, yb = b.get(5, 1)
    assert all(torch.equal(xa[k], xb[k]) for k in xa) and torch.equal(ya, yb)
    xc, _ = a.get(5, 2)
    assert not torch.equal(xa["source"], xc["source"]) or not torch.equal(xa["target"], xc["target"])


# ----------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_trains_on_pairs_and_resumes_exactly(copy_data, tmp_path, arch):
    schedule = dict(lr=3e-3, min_lr=3e-4, warmup_iters=2, lr_decay_iters=8)  # the same lr curve for both runs
    straight = train.train(pairs_config(copy_data, tmp_path / "a", arch, train=dict(max_iters=8, eval_interval=4),
                                        optim=schedule))
    half = pairs_config(copy_data, tmp_path / "b", arch, train=dict(max_iters=4, eval_interval=4), optim=schedule)
    train.train(half)
    resumed = train.train(replace(half, train=replace(half.train, max_iters=8)),
                          checkpoint=checkpoint.load_checkpoint(tmp_path / "b"))
    assert resumed.last_eval == straight.last_eval
    a, b = checkpoint.load_checkpoint(tmp_path / "a"), checkpoint.load_checkpoint(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    losses = [m["loss"] for m in read_metrics(tmp_path / "a") if "loss" in m]
    assert losses[-1] < losses[0]
    assert a["data"]["kind"] == "pairs" and a["data"]["special_tokens"]["eos"] == read_meta(copy_data)["tokenizer_vocab_size"]


def test_label_smoothing_logs_the_plain_nll_and_best_follows_the_plain_val_loss(copy_data, tmp_path):
    cfg = pairs_config(copy_data, tmp_path / "run", "encoder_decoder",
                       train=dict(max_iters=6, eval_interval=3, label_smoothing=0.1))
    result = train.train(cfg)
    records = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert all(m["loss"] != m["nll"] for m in records)
    plain = train.train(replace(cfg, run=replace(cfg.run, out_dir=str(tmp_path / "plain")),
                                train=replace(cfg.train, label_smoothing=0.0)))
    assert all(m["loss"] == m["nll"] for m in read_metrics(tmp_path / "plain") if "loss" in m)
    # evaluation reports the plain cross-entropy: recompute it for the last checkpoint
    model, meta = sample.load_for_inference(tmp_path / "run", device="cpu").model, read_meta(copy_data)
    rt = train.setup_runtime(cfg.run)
    recomputed = train.evaluate(model, replace(cfg, model=model.config), meta, rt)
    assert recomputed["val"] == pytest.approx(result.last_eval["val"], abs=1e-5)
    assert checkpoint.load_checkpoint(tmp_path / "run" / "best.pt")["best_val_loss"] == result.best_val_loss
    assert plain.best_val_loss != result.best_val_loss


def test_label_smoothing_is_the_textbook_mixture_over_the_real_vocabulary():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, vocab_multiple=16, n_layer=1, n_head=1, n_embd=8, block_size=4))
    logits = torch.randn(2, 3, 16)
    targets = torch.tensor([[1, 2, -1], [9, 0, 3]])
    from model import training_loss

    assert training_loss(model, logits, targets) == pytest.approx(
        torch.nn.functional.cross_entropy(logits.view(-1, 16), targets.view(-1), ignore_index=-1).item())
    logp = torch.log_softmax(logits, dim=-1).view(-1, 16)
    keep = targets.view(-1) >= 0
    nll = -logp[keep].gather(1, targets.view(-1)[keep, None])[:, 0]
    expected = (0.9 * nll - 0.1 * logp[keep, :10].mean(dim=-1)).mean()  # uniform over the 10 real ids only
    assert training_loss(model, logits, targets, 0.1) == pytest.approx(expected.item(), rel=1e-6)


def test_inverse_sqrt_schedule():
    optim = train.OptimConfig(lr=1e-3, min_lr=1e-5, warmup_iters=99, schedule="inverse_sqrt")
    assert train.lr_at(98, optim, 10) == pytest.approx(1e-3 * 99 / 100)
    assert train.lr_at(99, optim, 10) == pytest.approx(1e-3)  # the peak at the end of warmup
    assert train.lr_at(399, optim, 10) == pytest.approx(1e-3 * 0.5)  # 1 / sqrt(step): 4x the steps, half the lr
    assert train.lr_at(10**7, optim, 10) == 1e-5  # floored at min_lr; max_iters plays no part


def test_span_corruption_pretrains_an_encoder_decoder_on_a_token_stream(char_data, tmp_path):
    cfg = tiny_config(char_data, tmp_path / "t5", model=dict(arch="encoder_decoder", source_block_size=32,
                                                             block_size=16),
                      train=dict(objective="span_corruption", max_iters=6, eval_interval=3))
    result = train.train(cfg)
    meta = read_meta(char_data)
    state = checkpoint.load_checkpoint(tmp_path / "t5")
    assert state["config"]["model"]["vocab_size"] == meta["vocab_size"] + 68  # the special ids past the vocabulary
    assert state["data"]["special_tokens"]["sentinels"][0] == meta["vocab_size"] + 4
    assert np.isfinite(result.best_val_loss)
    run = sample.load_for_inference(tmp_path / "t5", device="cpu")
    out = sample.sample_targets(run, "First Citizen", 1, sample.SampleConfig(temperature=0, max_new_tokens=8),
                                write=lambda s: None)
    assert isinstance(out[0], str)


@pytest.mark.parametrize("overrides, match", [
    (dict(model=dict(block_size=6, arch="decoder", source_block_size=0)), "model.block_size = "),
    (dict(model=dict(source_block_size=4)), "model.source_block_size = "),
    (dict(model=dict(arch="decoder", source_block_size=0, attn_mask="bidirectional")), "masked-LM"),
    (dict(train=dict(objective="span_corruption")), "token-stream"),
])
def test_pairs_the_model_cannot_take_are_one_line_errors(copy_data, tmp_path, overrides, match):
    cfg = pairs_config(copy_data, tmp_path / "run", "encoder_decoder", **overrides)
    with pytest.raises(UserError, match=match):
        train.train(cfg)
    assert not (tmp_path / "run").exists()


def test_stream_data_refuses_an_encoder_decoder_without_span_corruption(char_data, tmp_path):
    with pytest.raises(UserError, match="span_corruption"):
        train.train(tiny_config(char_data, tmp_path / "run", model=dict(arch="encoder_decoder")))
    with pytest.raises(UserError, match="prefix_len > 0"):
        train.train(tiny_config(char_data, tmp_path / "run", model=dict(attn_mask="prefix", prefix_len=0)))


# ----------------------------------------------------------------------------------------------------
# Decoding


@pytest.fixture(scope="module")
def trained_runs(copy_data, tmp_path_factory):
    runs = {}
    for arch in ARCHS:
        out = tmp_path_factory.mktemp("runs") / arch
        train.train(pairs_config(copy_data, out, arch, train=dict(max_iters=40, eval_interval=40),
                                 optim=dict(lr=1e-2, min_lr=1e-3)))
        runs[arch] = out
    return runs


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_decoding_equals_uncached(trained_runs, copy_data, arch):
    run = sample.load_for_inference(trained_runs[arch], device="cpu")
    meta = read_meta(copy_data)
    split = __import__("pairs").open_pairs(copy_data, "val", meta)
    for i in range(5):
        source = split.pair(i)[0].tolist()
        steps = {}
        for cached in (True, False):
            decoder = sample.PairDecoder(run.model, source, run.special, run.allowed, run.rt, kv_cache=cached)
            logits = decoder.start(1)
            seen = [logits]
            for _ in range(6):
                token = logits.argmax(-1, keepdim=True)
                logits = decoder.step(token)
                seen.append(logits)
            steps[cached] = torch.cat(seen)
        finite = torch.isfinite(steps[False])
        assert torch.equal(finite, torch.isfinite(steps[True]))
        torch.testing.assert_close(steps[True][finite], steps[False][finite], atol=1e-5, rtol=1e-5)
        texts = [sample.target_ids(run, source, sample.SampleConfig(temperature=0, kv_cache=c)) for c in (True, False)]
        assert texts[0] == texts[1]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_beam_is_greedy_and_more_beams_score_at_least_as_well(trained_runs, copy_data, arch):
    run = sample.load_for_inference(trained_runs[arch], device="cpu")
    greedy_cfg = sample.SampleConfig(temperature=0, max_new_tokens=12)
    meta = read_meta(copy_data)
    split = __import__("pairs").open_pairs(copy_data, "val", meta)
    for i in range(4):
        source = split.pair(i)[0].tolist()
        greedy = sample.target_ids(run, source, greedy_cfg)[0]
        assert sample.target_ids(run, source, greedy_cfg, beams=1)[0] == greedy
        decoder = sample.PairDecoder(run.model, source, run.special, run.allowed, run.rt)
        one = beam_search(decoder, 1, 12, run.special.eos, length_penalty=0.0)[0]
        assert one.tokens == greedy  # without a length penalty, one beam is greedy search
        decoder = sample.PairDecoder(run.model, source, run.special, run.allowed, run.rt)
        best = beam_search(decoder, 4, 12, run.special.eos, length_penalty=0.0)
        assert best[0].logprob >= one.logprob - 1e-5
        assert len(best) == 4 and [h.score for h in best] == sorted((h.score for h in best), reverse=True)
