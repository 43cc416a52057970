"""`minigpt eval --lengths`: length extrapolation. Every length scores the same targets, each against a direct
computation (one forward pass per target over exactly the context the windows give it); a window of block_size
reproduces the plain eval of the same windows; past block_size every query sees the whole window (only attn_window
limits it) and learned positions are "n/a"; RoPE scaling at factor 1 is the unscaled model exactly, linear is
positions / S, NTK a larger base, YaRN the paper's frequencies and temperature; bad input is one error line."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import evaluation
from cli.main import app
from conftest import error_line, tiny_config
from model import GPT, AttentionInputs, GPTConfig, RopeScaling, rope_angles

T = 16  # the tiny runs' block_size (conftest.tiny_config)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tmp_path_factory.mktemp("lengths")


def train_run(data_dir, out_dir, iters, **model):
    import train

    cfg = tiny_config(data_dir, out_dir, model=model, train=dict(max_iters=iters, eval_interval=iters, eval_iters=1,
                                                                 batch_size=8), log=dict(interval=1000))
    train.train(cfg)
    return out_dir


@pytest.fixture(scope="module")
def rope_run(char_data, ws):
    return train_run(char_data, ws / "rope", 30, pos_encoding="rope")


@pytest.fixture(scope="module")
def learned_run(char_data, ws):
    return train_run(char_data, ws / "learned", 4)


def loaded(run):
    import sample

    return sample.load_for_inference(run, device="cpu")


def val_ids(char_data) -> np.ndarray:
    import dataset_format

    return np.asarray(dataset_format.open_split(char_data, "val"), dtype=np.int64)


def cli(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# The numbers, against direct computations


def context_start(t: int, first: int, length: int, stride: int | None) -> int:
    """Where the context of target t begins, as the section comment of evaluation.py defines it: targets are cut
    into chunks of S (= stride, or the length) from `first`; a chunk starting at t0 is read from t0 + S - 1 - L."""
    s = stride or length
    t0 = first + (t - first) // s * s
    return t0 + s - 1 - length


@pytest.mark.parametrize("stride", [None, 4])
def test_every_length_scores_the_same_targets_as_a_direct_computation(rope_run, char_data, stride):
    lengths, n = (8, 16, 40), 37  # 40 > block_size; 37 targets: the last chunk is a short one
    result = evaluation.evaluate_run(rope_run, lengths=",".join(map(str, lengths)), stride=stride, max_tokens=n,
                                     per_position=True, device="cpu", progress=False)
    run = loaded(rope_run)
    data, first = val_ids(char_data), max(lengths)
    # the reference: a model built with a context of 64 (same weights), one forward pass per target
    reference = GPT(replace(run.model.config, block_size=64)).eval()
    reference.load_state_dict(run.model.state_dict())
    n_bytes = len(run.tokenizer.decode_bytes(data[first:first + n].tolist()))
    assert result["scored_tokens"] == n and result["first_target"] == first and result["stride"] == stride
    for row, L in zip(result["lengths"], lengths):
        nats, by_position = 0.0, {}
        for t in range(first, first + n):
            c = context_start(t, first, L, stride)
            assert (L - (stride or L) + 1 if stride else 1) <= t - c <= L  # the context the docs promise
            with torch.no_grad():
                logits = reference(torch.from_numpy(data[c:t])[None])[0][0, -1]
            nll = F.cross_entropy(logits[None], torch.tensor([data[t]])).item()
            nats += nll
            by_position.setdefault(t - c - 1, []).append(nll)
        assert row["length"] == L and row["tokens"] == n
        assert row["loss"] == pytest.approx(nats / n, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(nats / n), rel=1e-5)
        assert row["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
        buckets = row["per_position"]
        assert [(b["first"], b["last"]) for b in buckets] == [(a, b - 1) for a, b in
                                                               evaluation.position_buckets(lengths, T) if b <= L]
        for b in buckets:
            nlls = [x for p in range(b["first"], b["last"] + 1) for x in by_position.get(p, [])]
            assert b["tokens"] == len(nlls)
            assert b["loss"] == (pytest.approx(sum(nlls) / len(nlls), rel=1e-5) if nlls else None)
    losses = [row["loss"] for row in result["lengths"]]
    assert len(set(losses)) == 3  # the lengths do differ


def test_position_buckets_double_and_cut_at_block_size_and_each_length():
    assert evaluation.position_buckets((8, 40), 16) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 40)]
    assert evaluation.position_buckets((64,), 48) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 48),
                                                      (48, 64)]


def test_a_window_of_block_size_reproduces_the_plain_eval(rope_run, char_data, tmp_path):
    """--lengths 16 over n targets == plain `eval` of a split made of exactly those windows (block_size + 1 tokens
    each, the last shorter), which scores the same targets with the same contexts."""
    import dataset_format

    n = 10 * T + 5
    got = evaluation.evaluate_run(rope_run, lengths=[T], max_tokens=n, device="cpu", progress=False)["lengths"][0]
    data, first = val_ids(char_data), T
    windows = [data[s - 1:min(s + T, first + n)] for s in range(first, first + n, T)]
    meta = dataset_format.read_meta(char_data)
    dataset_format.write_dataset(tmp_path / "windows", data[:100], np.concatenate(windows), meta)
    plain = evaluation.evaluate_run(rope_run, data=tmp_path / "windows", device="cpu", progress=False)
    assert plain["tokens"] == got["tokens"] == n
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], rel=1e-6)


@pytest.mark.parametrize("pos,window", [("rope", 0), ("alibi", 0), ("sinusoidal", 0), ("none", 0), ("rope", 6)])
def test_past_block_size_every_query_sees_the_whole_window(pos, window):
    """A 2-layer model with block_size 16 reading 40 tokens: its last query sees token 0 (through 39 positions),
    which the model's default sliding window of block_size would cut off; an attn_window still limits it."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=T, n_layer=2, n_head=2, n_embd=32, pos_encoding=pos, attn_window=window)
    model = GPT(cfg).eval()
    x = torch.randint(50, (1, 40))
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % 50
    with torch.no_grad():
        plain, plain2 = model(x)[0], model(x2)[0]
        with evaluation.context_of(model, 40):
            wide, wide2 = model(x)[0], model(x2)[0]
        assert model.config is cfg  # restored
        big = GPT(replace(cfg, block_size=40)).eval()
        big.load_state_dict(model.state_dict())
        assert torch.allclose(wide, big(x)[0], atol=1e-6)
    assert torch.equal(plain[0, 39], plain2[0, 39])  # block_size's window: token 0 is out of reach
    if window:
        assert torch.equal(wide[0, 39], wide2[0, 39]) and torch.allclose(wide, plain, atol=1e-6)
    else:
        assert (wide[0, 39] - wide2[0, 39]).abs().max() > 1e-6  # token 0 reaches the last query
        assert torch.allclose(wide[0, :T], plain[0, :T], atol=1e-6)  # within block_size nothing changes


def test_learned_positions_past_block_size_are_not_applicable(learned_run):
    result = last_json(cli(learned_run, "--lengths", "8,16,32", "--max-tokens", "40", "--per-position", "--json"))
    rows = {r["length"]: r for r in result["lengths"]}
    assert rows[32] == {"length": 32, "tokens": None, "loss": None, "perplexity": None, "bits_per_byte": None,
                        "per_position": None}
    assert rows[8]["tokens"] == rows[16]["tokens"] == 40 and rows[8]["loss"] > 0 and rows[16]["loss"] > 0
    assert result["pos_encoding"] == "learned" and result["block_size"] == T and result["first_target"] == 32
    table = cli(learned_run, "--lengths", "8,16,32", "--max-tokens", "40", "--per-position")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert "40 tokens from token 32, non-overlapping windows" in lines[0]
    assert lines[1].split() == ["length", "tokens", "loss", "perplexity", "bits_per_byte"]
    assert lines[4].split() == ["32", "-", "n/a", "n/a", "n/a"]
    assert "learned positions end at block_size 16" in lines[5]
    assert lines[6].startswith("loss by position") and lines[7].split() == ["position", "8", "16", "32"]
    last = rows[16]["per_position"][-1]
    assert (last["first"], last["last"]) == (8, 15) and lines[-1].split() == ["8-15", "-", f"{last['loss']:.3f}", "-"]


# ----------------------------------------------------------------------------------------------------
# RoPE scaling


def rope_model(**kw) -> GPT:
    """Random weights, with queries and keys 10x GPT-2's init: attention that depends on the positions."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=T, n_layer=2, n_head=2, n_embd=32, pos_encoding="rope", **kw))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_attn.weight[:2 * 32].mul_(10)
    return model.eval()


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_factor_1_is_the_unscaled_model_exactly(kind, rope_run):
    model = rope_model()
    x = torch.randint(50, (2, 40))
    with torch.no_grad(), evaluation.context_of(model, 40):
        plain = model(x)[0]
        model.rope_scaling = RopeScaling(kind, 1.0, T)
        assert torch.equal(model(x)[0], plain)
        model.rope_scaling = RopeScaling(kind, 2.0, T)
        assert not torch.allclose(model(x)[0], plain, atol=1e-4)  # and a factor does change it
    args = dict(lengths="8,40", max_tokens=30, device="cpu", progress=False)
    unscaled = evaluation.evaluate_run(rope_run, **args)
    scaled = evaluation.evaluate_run(rope_run, rope_scaling=kind, rope_factor=1, **args)
    assert scaled["lengths"] == unscaled["lengths"]
    assert (scaled["rope_scaling"], scaled["rope_factor"]) == (kind, 1.0) and "rope_scaling" not in unscaled


def manual_logits(model: GPT, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's forward written out with the given rotary angles: embeddings, blocks, final norm, head."""
    inputs = AttentionInputs((cos, sin), None, True)
    x = model.wte(idx)
    for block in model.blocks:
        x, _ = block(x, inputs)
    return model.lm_head(model.ln_f(x))


def test_linear_scaling_is_positions_divided_by_the_factor():
    model, x, s = rope_model(), torch.randint(50, (2, 40)), 2.5
    cfg = model.config
    with torch.no_grad():
        direct = manual_logits(model, x, *rope_angles(torch.arange(40) / s, cfg.head_size, cfg.rope_theta))
        model.rope_scaling = RopeScaling("linear", s, T)
        with evaluation.context_of(model, 40):
            scaled = model(x)[0]
        model.rope_scaling = None
        unscaled = manual_logits(model, x, *rope_angles(torch.arange(40), cfg.head_size, cfg.rope_theta))
    assert torch.allclose(scaled, direct, atol=1e-6)
    assert not torch.allclose(scaled, unscaled, atol=1e-3)


def test_ntk_scaling_is_a_larger_base():
    model, x, s = rope_model(), torch.randint(50, (2, 40)), 4.0
    hs = model.config.head_size
    other = GPT(replace(model.config, rope_theta=10000.0 * s ** (hs / (hs - 2)))).eval()
    other.load_state_dict(model.state_dict())
    model.rope_scaling = RopeScaling("ntk", s, T)
    with torch.no_grad(), evaluation.context_of(model, 40), evaluation.context_of(other, 40):
        assert torch.allclose(model(x)[0], other(x)[0], atol=1e-5)


def test_yarn_frequencies_and_temperature_are_the_papers():
    """YaRN (Peng 2023, its reference code): pair i's frequency blends θ^(-2i/d) (kept) and θ^(-2i/d)/s
    (interpolated) by a ramp over the pairs that turn between β_slow = 1 and β_fast = 32 times in the original
    context; cos and sin (so queries and keys) scaled by 0.1·ln(s) + 1."""
    d, theta, original, s = 64, 10000.0, 4096, 8.0  # Llama 2's head size, base and context
    pos = torch.arange(0, 1024, 5)  # angles of float32 positions agree with float64 to ~1e-4 up to here

    def correction_dim(rotations):
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(correction_dim(32)), 0), min(math.ceil(correction_dim(1)), d - 1)
    base_freq = theta ** (torch.arange(0, d, 2).double() / d)
    extrapolation_factor = 1 - ((torch.arange(d // 2).double() - low) / (high - low)).clamp(0, 1)
    inv = (1 / (s * base_freq)) * (1 - extrapolation_factor) + (1 / base_freq) * extrapolation_factor
    m = 0.1 * math.log(s) + 1
    angles = pos.double()[:, None] * inv[None, :]
    cos, sin = rope_angles(pos, d, theta, RopeScaling("yarn", s, original))
    assert torch.allclose(cos.double(), angles.cos() * m, atol=5e-4)
    assert torch.allclose(sin.double(), angles.sin() * m, atol=5e-4)
    assert 0 < low < high < d // 2  # the ramp lies inside: some pairs kept, some interpolated
    plain_cos, _ = rope_angles(pos, d, theta)
    assert torch.allclose(cos[:, :low] / m, plain_cos[:, :low], atol=1e-6)  # fast pairs kept
    interp_cos, _ = rope_angles(pos, d, theta, RopeScaling("linear", s, original))
    assert torch.allclose(cos[:, high:] / m, interp_cos[:, high:], atol=5e-4)  # slow ones divided by s


def test_rope_scaling_through_the_cli(rope_run):
    result = last_json(cli(rope_run, "--lengths", "16,48", "--max-tokens", "20", "--rope-scaling", "yarn",
                           "--rope-factor", "3", "--json"))
    assert result["rope_scaling"] == "yarn" and result["rope_factor"] == 3.0
    assert [r["tokens"] for r in result["lengths"]] == [20, 20]
    plain = last_json(cli(rope_run, "--max-examples", "2", "--rope-scaling", "linear", "--rope-factor", "2", "--json"))
    unscaled = last_json(cli(rope_run, "--max-examples", "2", "--json"))
    assert plain["tokens"] == unscaled["tokens"] == 2 * T and plain["loss"] != unscaled["loss"]
    table = cli(rope_run, "--lengths", "16,48", "--max-tokens", "20", "--stride", "8", "--rope-scaling", "ntk",
                "--rope-factor", "3", "--per-position")
    lines = table.stdout.splitlines()
    assert "windows sliding by 8, RoPE ntk x3)" in lines[0]
    # sliding by 8, only a window's last 8 positions are scored: 8-15 at length 16, 40-47 at 48 (bucket 32-47)
    start = next(i for i, line in enumerate(lines) if line.startswith("loss by position")) + 2
    assert [line.split()[0] for line in lines[start:]] == ["8-15", "32-47"]


# ----------------------------------------------------------------------------------------------------
# Bad input: one error line, exit code 2, nothing written


def snapshot(*dirs):
    return {p: p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


BAD = {
    "a zero length": (["{rope}", "--lengths", "64,0"], "--lengths takes context lengths >= 1"),
    "a length that is no number": (["{rope}", "--lengths", "64,abc"], "--lengths takes context lengths >= 1"),
    "no length": (["{rope}", "--lengths", ""], "--lengths takes context lengths >= 1"),
    "rope scaling without rope": (["{learned}", "--rope-scaling", "linear", "--rope-factor", "2"],
                                  "has pos_encoding = 'learned', not 'rope'"),
    "an unknown rope scaling": (["{rope}", "--rope-scaling", "cubic", "--rope-factor", "2"],
                                "--rope-scaling takes linear | ntk | yarn"),
    "rope scaling without a factor": (["{rope}", "--rope-scaling", "ntk"], "needs --rope-factor"),
    "a factor without rope scaling": (["{rope}", "--rope-factor", "2"], "--rope-factor goes with --rope-scaling"),
    "a factor below 1": (["{rope}", "--rope-scaling", "yarn", "--rope-factor", "0.5"], "--rope-factor must be >= 1"),
    "stride without lengths": (["{rope}", "--stride", "4"], "--stride applies to scoring with several context"),
    "per-position without lengths": (["{rope}", "--per-position"], "--per-position applies to scoring"),
    "stride past the shortest length": (["{rope}", "--lengths", "8,16", "--stride", "9"], "--stride must be between 1"),
    "stride 0": (["{rope}", "--lengths", "8", "--stride", "0"], "--stride must be between 1 and the shortest"),
    "max tokens 0": (["{rope}", "--lengths", "8", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    "max examples with lengths": (["{rope}", "--lengths", "8", "--max-examples", "3"],
                                  "limit the tokens scored with --max-tokens"),
    "a length past the split": (["{rope}", "--lengths", "8,100000000"], "needs more than 100,000,000"),
    "a prefix LM": (["{prefix}", "--lengths", "8"], "has attn_mask = 'prefix'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, ws, rope_run, learned_run, char_data):
    prefix = ws / "prefix"
    if not prefix.exists():
        train_run(char_data, prefix, 2, attn_mask="prefix", prefix_len=4)
    args, expected = BAD[case]
    args = [a.format(rope=rope_run, learned=learned_run, prefix=prefix) for a in args]
    before = snapshot(ws, char_data)
    assert expected in error_line(cli(*args))
    assert snapshot(ws, char_data) == before
