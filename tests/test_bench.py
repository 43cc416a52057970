"""bench.py and `minigpt bench`: the figures exist, are consistent with each other, and come out as JSON."""

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

import bench
import plots
import runtime
import train
from batches import positions_per_example
from cli.main import app
from conftest import REPO_ROOT, tiny_config
from dataset_format import read_meta
from encoder_decoder import build_model, model_flops_per_token
from model import GPT, GPTConfig

DEBUG = str(REPO_ROOT / "config" / "debug.toml")


def test_bench_train_figures_are_consistent(char_data, tmp_path):
    cfg = tiny_config(char_data, tmp_path / "run")
    r = bench.bench_train(cfg, steps=3, warmup=1)
    assert r["data"] == str(char_data) and r["tokens_per_step"] == 4 * 16
    assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["ms_per_step"] * 1000)
    flops_per_token = GPT(train.with_vocab(cfg)[0].model).flops_per_token(16)
    assert r["tflops"] * 1e12 == pytest.approx(r["tokens_per_s"] * flops_per_token, rel=1e-6)
    assert 0 < r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
    assert r["peak_mem_mb"] > 10
    assert not (tmp_path / "run").exists()  # a benchmark writes nothing


def test_bench_train_without_data_uses_random_tokens(tmp_path):
    cfg = tiny_config(tmp_path / "no_data", tmp_path / "run")
    r = bench.bench_train(cfg, steps=2, warmup=1)
    assert r["data"] == "random tokens" and r["tokens_per_s"] > 0


@pytest.fixture(scope="module")
def add_data(tmp_path_factory):
    from prepare_data import prepare

    out = tmp_path_factory.mktemp("pairs") / "add"
    prepare("task:add", out=out, examples=300, seed=1, log=lambda s: None)
    return out


def test_bench_train_on_pairs_counts_target_tokens(add_data, tmp_path):
    """A decoder-only model reads `source <sep> target`: its FLOPs per target token pay for the source too."""
    cfg = tiny_config(add_data, tmp_path / "run")
    r = bench.bench_train(cfg, steps=2, warmup=1)
    meta = read_meta(add_data)
    target = meta["length_stats"]["train"]["target"]["mean"] + 1  # each target and its end token
    seq_len, source_len = positions_per_example(meta, cfg.model, "lm")
    assert (r["decoder_positions"], r["encoder_positions"]) == (seq_len, source_len) and seq_len > target
    assert r["tokens_per_step"] == round(4 * seq_len) and r["target_tokens_per_step"] == pytest.approx(4 * target)
    assert r["target_tokens_per_s"] * r["ms_per_target_token"] / 1000 == pytest.approx(1)
    assert r["target_tokens_per_s"] == pytest.approx(r["target_tokens_per_step"] / r["ms_per_step"] * 1000)
    model = build_model(train.with_vocab(cfg)[0].model)
    assert r["flops_per_target_token"] == pytest.approx(model_flops_per_token(model, seq_len) * seq_len / target)
    assert r["tflops"] * 1e12 == pytest.approx(r["target_tokens_per_s"] * r["flops_per_target_token"])
    assert "decoder_only" not in r and "cost_ratio" not in r


def test_bench_train_times_an_encoder_decoder_beside_the_decoder_only_model(add_data, tmp_path):
    model = dict(arch="encoder_decoder", n_layer=2, n_encoder_layer=1, block_size=8, source_block_size=8)
    cfg = tiny_config(add_data, tmp_path / "run", model=model)
    r = bench.bench_train(cfg, steps=2, warmup=1)
    meta = read_meta(add_data)
    lengths = meta["length_stats"]["train"]
    target = lengths["target"]["mean"] + 1
    assert (r["decoder_positions"], r["encoder_positions"]) == (target, lengths["source"]["mean"])
    encdec = build_model(train.with_vocab(cfg)[0].model)
    # the decoder reads `<start> target`: as many positions as target tokens
    assert r["flops_per_target_token"] == pytest.approx(
        model_flops_per_token(encdec, r["decoder_positions"], r["encoder_positions"]))
    assert r["target_tokens_per_s"] * r["ms_per_target_token"] / 1000 == pytest.approx(1)
    d = r["decoder_only"]
    assert d["n_embd"] == 32 and d["n_layer"] == 3  # as wide, and as many blocks as both stacks together
    assert d["block_size"] == lengths["source"]["max"] + 1 + lengths["target"]["max"]
    decoder = build_model(bench.decoder_only_config(train.with_vocab(cfg)[0], meta).model)
    assert isinstance(decoder, GPT) and d["params"] == decoder.num_params()
    assert d["decoder_positions"] == lengths["source"]["mean"] + 1 + lengths["target"]["mean"]
    assert d["encoder_positions"] == 0 and d["target_tokens_per_step"] == r["target_tokens_per_step"]
    assert d["flops_per_target_token"] == pytest.approx(
        model_flops_per_token(decoder, d["decoder_positions"]) * d["decoder_positions"] / target)
    assert d["target_tokens_per_s"] * d["ms_per_target_token"] / 1000 == pytest.approx(1)
    assert r["cost_ratio"] == pytest.approx(r["ms_per_target_token"] / d["ms_per_target_token"])
    assert r["flops_ratio"] == pytest.approx(r["flops_per_target_token"] / d["flops_per_target_token"])
    json.dumps(r)


def test_cli_bench_encoder_decoder_table_and_no_data(add_data, tmp_path):
    runner = CliRunner()
    config = str(REPO_ROOT / "config" / "transformer_2017.toml")
    tiny = ["--set", "model.n_layer=1", "--set", "model.n_encoder_layer=1", "--set", "model.n_embd=32",
            "--set", "model.mlp_hidden=64", "--set", "train.batch_size=4"]
    r = runner.invoke(app, ["bench", "train", config, "--set", f"data.dir={add_data}", *tiny, "--steps", "2",
                            "--warmup", "1"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f"bench train {config}" and "  decoder_only" in lines
    rows = {line.split()[0]: line for line in lines[1:]}
    assert {"ms_per_target_token", "target_tokens_per_s", "flops_per_target_token", "cost_ratio"} <= rows.keys()
    assert rows["n_layer"].startswith("    n_layer ") and rows["n_layer"].split()[1] == "2"  # decoder-only, indented
    numbers = [line for line in lines[1:] if line.split()[0] not in ("decoder_only", "data")]  # data: a long path
    assert len({len(line) for line in numbers}) == 1  # one right edge for both models' figures
    r = runner.invoke(app, ["bench", "train", config, "--set", f"data.dir={tmp_path / 'none'}", *tiny, "--steps", "2"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: an encoder-decoder is benchmarked on a pairs dataset")


def test_bench_sample_reports_cache_speedup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32))
    rt = runtime.setup_runtime(train.RunConfig(device="cpu"))
    r = bench.bench_sample(model, rt, batch=2, prompt_len=16, new_tokens=20, repeats=1)
    assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["decode_tokens_per_s_no_cache"] > 0
    assert r["kv_cache_speedup"] == pytest.approx(r["decode_tokens_per_s"] / r["decode_tokens_per_s_no_cache"])


def test_bench_sample_counts_only_the_prompt_tokens_it_prefills(monkeypatch):
    """A prompt longer than block_size is cut to its last block_size tokens (as sampling does): prefill tokens/s
    counts those, and they are exactly the tokens that went into the prefill's KV cache, a window at a time."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, attn_window=4))
    rt = runtime.setup_runtime(train.RunConfig(device="cpu", dtype="float32"))
    caches, fed = [], []
    make_cache = bench.decode_cache
    monkeypatch.setattr(bench, "decode_cache", lambda *a: caches.append(make_cache(*a)) or caches[-1])
    model.register_forward_pre_hook(
        lambda m, args, kwargs: fed.append(args[0].size(1)) if kwargs.get("kv_cache") is caches[0] else None,
        with_kwargs=True)
    r = bench.bench_sample(model, rt, batch=2, prompt_len=40, new_tokens=3, repeats=2)
    assert (r["prompt_len"], r["prefill_tokens"], r["context_end"]) == (40, 16, 19)
    assert r["prefill_tokens_per_s"] == pytest.approx(2 * 16 / (r["prefill_ms"] / 1000))
    assert caches[0].max_len == 8  # the sampler's cache: 2 x window
    assert fed == [4] * 4 * 3  # three prefills (one warm-up) of 16 tokens, in chunks of the window
    short = bench.bench_sample(model, rt, batch=1, prompt_len=5, new_tokens=3, repeats=1)
    assert (short["prefill_tokens"], short["context_end"]) == (5, 8)


def test_cli_bench_json_and_bad_arguments(char_data):
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "train", DEBUG, "--set", f"data.dir={char_data}", "--steps", "2", "--warmup", "1",
                            "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert {"ms_per_step", "tokens_per_s", "mfu", "peak_mem_mb"} <= result.keys()
    r = runner.invoke(app, ["bench", "sample", DEBUG, "--set", f"data.dir={char_data}", "--new-tokens", "5",
                            "--prompt-len", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert {"prefill_ms", "decode_tokens_per_s", "decode_tokens_per_s_no_cache"} <= json.loads(r.stdout).keys()
    r = runner.invoke(app, ["bench", "sample", DEBUG])
    assert r.exit_code == 0 and "kv_cache_speedup" in r.stdout  # the table
    for args in (["bench", "train", DEBUG, "--steps", "0"], ["bench", "sample", DEBUG, "--new-tokens", "1"],
                 ["bench", "train", "nope.toml"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_bench_sample_runs_on_the_configs_device():
    """Without --device, a config's run.device decides: here cuda, which this machine lacks."""
    r = CliRunner().invoke(app, ["bench", "sample", DEBUG, "--set", "run.device=cuda", "--new-tokens", "3"])
    assert r.exit_code == 2 and "sees no CUDA GPU" in r.stderr
    r = CliRunner().invoke(app, ["bench", "sample", DEBUG, "--set", "run.device=cuda", "--device", "cpu",
                                 "--new-tokens", "3", "--prompt-len", "2", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["device"] == "cpu"  # --device wins


# --- minigpt bench sample --draft: plain against speculative decoding ------------------------------------------


@pytest.fixture(scope="module")
def spec_runs(char_data, tmp_path_factory):
    """A target and a smaller draft trained briefly on the same characters (as tests/test_speculative.py's)."""
    root = tmp_path_factory.mktemp("bench_spec")
    short = dict(max_iters=20, eval_interval=20, eval_iters=1)
    train.train(tiny_config(char_data, root / "target", train=short))
    train.train(tiny_config(char_data, root / "draft", model=dict(n_layer=1, n_head=2, n_embd=16, block_size=12),
                            train=short))
    return root / "target", root / "draft"


def test_bench_speculative_figures_are_consistent(spec_runs):
    import sample

    target, draft = (sample.load_for_inference(r, device="cpu") for r in spec_runs)
    r = bench.bench_speculative(target, draft, prompt_len=3, new_tokens=40, draft_tokens=3, repeats=1)
    assert (r["prompt_len"], r["new_tokens"], r["draft_tokens"]) == (3, 40, 3)
    assert r["params"] > r["draft_params"] and r["dtype"] == r["draft_dtype"] == "float32"
    for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        m = r[name]
        assert m["temperature"] == temperature and m["top_k"] == 200
        assert m["plain_tokens_per_s"] > 0 and m["speculative_tokens_per_s"] > 0
        assert m["speedup"] == pytest.approx(m["speculative_tokens_per_s"] / m["plain_tokens_per_s"])
        assert 0 <= m["acceptance"] <= 1 and 0 <= m["accepted_per_check"] <= 3
        # each check emits its accepted tokens and one of the target's own; 40 tokens need at least 40 / 4 checks
        assert m["tokens_per_check"] == pytest.approx(m["accepted_per_check"] + 1)
        assert 10 <= m["checks"] <= 40 and m["checks"] * m["tokens_per_check"] >= 40
    assert r["greedy"]["same_tokens"] is True  # float32: speculative greedy is plain greedy, token for token
    itself = bench.bench_speculative(target, target, prompt_len=1, new_tokens=12, draft_tokens=2, repeats=1)
    assert itself["greedy"]["acceptance"] == itself["sampled"]["acceptance"] == 1.0


def test_cli_bench_sample_with_a_draft(spec_runs):
    runner = CliRunner()
    target, draft = map(str, spec_runs)
    r = runner.invoke(app, ["bench", "sample", target, "--draft", draft, "--draft-tokens", "2", "--new-tokens", "12",
                            "--prompt-len", "2", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["draft_tokens"] == 2 and {"speedup", "acceptance", "accepted_per_check"} <= result["greedy"].keys()
    r = runner.invoke(app, ["bench", "sample", target, "--draft", draft, "--new-tokens", "6", "--device", "cpu"])
    assert r.exit_code == 0 and "speculative_tokens_per_s" in r.stdout and "acceptance" in r.stdout  # the table
    cases = [
        (["--draft-tokens", "2"], "--draft-tokens is how many tokens a draft model proposes: add --draft"),
        (["--draft", draft, "--draft-tokens", "0"], "--draft-tokens must be >= 1, got 0"),
        (["--draft", draft, "--batch", "2"], "drop --batch"),
        (["--draft", draft, "--compile"], "drop --compile"),
        (["--draft", str(spec_runs[0].parent / "missing")], ""),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["bench", "sample", target, "--device", "cpu", *args])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, args
        assert message in r.stderr
    r = runner.invoke(app, ["bench", "sample", DEBUG, "--draft", draft])
    assert r.exit_code == 2 and r.stderr.startswith("error: --draft needs a trained run as TARGET")


# --- minigpt bench nanogpt ---------------------------------------------------------------------------
# nanoGPT itself is not needed: a fake checkout prints lines in its exact formats, so the parsing, the warm-up
# skipping and the ratios are checked against numbers we know, while our side really runs.

NANOGPT_LOG = """\
found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)
step 0: train loss 4.1676, val loss 4.1649
iter 0: loss 4.1828, time 7122.05ms, mfu -100.00%
iter 1: loss 4.1373, time 117.43ms, mfu -100.00%
iter 5: loss 3.9758, time 169.28ms, mfu 0.01%
step 2000: train loss 1.7610, val loss 1.8835
saving checkpoint to out-shakespeare-char
iter 2000: loss nan, time 1104.73ms, mfu 0.01%
"""

FAKE_TRAIN = """\
import os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
assert sys.argv[1] == "config/train_shakespeare_char.py" and args["device"] == "cpu", sys.argv
if os.environ.get("FAKE_FAIL"):
    sys.exit("RuntimeError: fake nanoGPT ran out of memory")
last, every = int(args["max_iters"]), int(args["eval_interval"])
os.makedirs(args["out_dir"], exist_ok=True)
for i in range(last + 1):
    if i % every == 0:
        print(f"step {i}: train loss 4.1676, val loss {4 - i / 1000:.4f}")
        if i > 0 and args.get("always_save_checkpoint") == "True":
            open(os.path.join(args["out_dir"], "ckpt.pt"), "w").write("weights")
    print(f"iter {i}: loss 4.1828, time {5000 if i == 0 else 20 + i * i:.2f}ms, mfu -100.00%")
"""

FAKE_SAMPLE = """\
import os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
if not os.path.isfile(os.path.join(args["out_dir"], "ckpt.pt")):
    sys.exit("FileNotFoundError: no ckpt.pt")
time.sleep(0.02 * int(args["max_new_tokens"]))
print("x" * int(args["max_new_tokens"]))
"""

FAKE_PREPARE = """\
import os, pickle
here = os.path.dirname(__file__)
text = open(os.path.join(here, "input.txt")).read()
for name in ("train.bin", "val.bin"):
    open(os.path.join(here, name), "wb").write(b"\\0\\0")
pickle.dump({"vocab_size": len(set(text))}, open(os.path.join(here, "meta.pkl"), "wb"))
"""

TINY = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32", "--set",
        "model.block_size=16", "--set", "train.batch_size=4"]


@pytest.fixture
def fake_nanogpt(tmp_path):
    root = tmp_path / "nanoGPT"
    (root / "config").mkdir(parents=True)
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    (root / "train.py").write_text(FAKE_TRAIN)
    (root / "sample.py").write_text(FAKE_SAMPLE)
    (root / "configurator.py").write_text("")
    (root / "config" / "train_shakespeare_char.py").write_text("")
    (root / "data" / "shakespeare_char" / "prepare.py").write_text(FAKE_PREPARE)
    return root


def test_nanogpt_output_parsers():
    assert bench.parse_nanogpt_iter_ms(NANOGPT_LOG) == {0: 7122.05, 1: 117.43, 5: 169.28, 2000: 1104.73}
    assert bench.parse_nanogpt_val_losses(NANOGPT_LOG) == {0: 4.1649, 2000: 1.8835}
    assert bench.parse_nanogpt_val_losses("iter 0: loss 4.1828, time 7122.05ms, mfu -100.00%\n") == {}
    assert bench.tokens_per_s_from_runs(500, 12.0, 2.02) == pytest.approx(499 / 9.98)
    with pytest.raises(bench.UserError, match="too busy"):
        bench.tokens_per_s_from_runs(500, 2.0, 2.1)


def test_nanogpt_train_seconds_leave_evaluations_out():
    # evaluations at 0, 3 and 6: iterations 0 and 3 hold one (and iteration 0 its warm-up); each counts as the
    # median of the iterations after it up to the next evaluation, (1, 2) and (4, 5)
    ms = {0: 9000.0, 1: 10.0, 2: 30.0, 3: 5000.0, 4: 40.0, 5: 60.0, 6: 7000.0, 7: 99.0}
    seconds = bench.nanogpt_train_seconds(ms, [3, 0, 6])
    assert seconds == pytest.approx({0: 0.0, 3: (20 + 10 + 30) / 1000, 6: (60 + 50 + 40 + 60) / 1000})
    with pytest.raises(bench.UserError, match="printed no `iter 4: "):
        bench.nanogpt_train_seconds({i: 10.0 for i in range(6) if i != 4}, [0, 3, 6])


def test_time_to_loss_is_the_first_evaluation_at_or_below_it():
    curve = [[0, 0.0, 4.2], [100, 3.0, 2.5], [200, 6.5, 1.89], [300, 9.0, 1.95], [400, 12.0, 1.80]]
    assert bench.time_to_loss(curve, 1.89) == {"step": 200, "train_s": 6.5}  # equal counts as reached
    assert bench.time_to_loss(curve, 1.5) is None


def test_minigpt_val_curve_takes_training_time_from_progress_records(tmp_path):
    records = [{"step": 10, "loss": 3.0, "tokens_seen": 100, "elapsed_s": 1.0},
               {"step": 20, "loss": 2.5, "tokens_seen": 200, "elapsed_s": 2.5},
               {"step": 20, "train_loss": 2.4, "val_loss": 2.6, "best_val_loss": 2.6},
               {"step": 30, "loss": 2.2, "tokens_seen": 300, "elapsed_s": 3.5},
               {"step": 40, "loss": 2.0, "tokens_seen": 400, "elapsed_s": 4.0},
               {"step": 40, "train_loss": 2.0, "val_loss": 2.1, "best_val_loss": 2.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.minigpt_val_curve(tmp_path) == [[20, 2.5, 2.6], [40, 4.0, 2.1]]


@pytest.mark.once
def test_cli_bench_nanogpt_side_by_side(fake_nanogpt, char_data, corpus_path, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "QUALITY_EVAL_INTERVAL", 2)  # 4 steps: evaluations at 2 and 4 (and nanoGPT's 0)
    r = CliRunner().invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--case", "sample", "--case", "cpu",
                                 "--quality", "--input", str(corpus_path), "--steps", "3", "--warmup", "2",
                                 "--new-tokens", "20", "--set", f"data.dir={char_data}", *TINY,
                                 "--set", "train.max_iters=4", "--set", "train.eval_iters=2",
                                 "--plot", str(tmp_path / "quality.svg"), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "quality.svg").read_text().startswith("<?xml")
    result = json.loads(r.stdout)
    data = fake_nanogpt / "data" / "shakespeare_char"
    assert (data / "input.txt").read_text() == corpus_path.read_text()  # --input went to nanoGPT's prepare.py
    assert list(result["cases"]) == ["cpu", "sample"]  # always in this order
    cpu = result["cases"]["cpu"]
    # warm-up iterations 0 and 1 (5000 ms, 21 ms) are left out: 24, 29, 36 ms, mean 29.67; 4 x 16 tokens per step
    theirs = cpu["nanogpt"]["runs"][0]
    assert theirs["ms_per_step"] == pytest.approx(89 / 3) and theirs["ms_per_step_median"] == 29
    assert cpu["nanogpt"]["tokens_per_s"] == pytest.approx(64 / 0.089 * 3)
    assert cpu["minigpt"]["runs"][0]["steps"] == 3 and cpu["minigpt"]["runs"][0]["tokens_per_step"] == 64
    assert cpu["ratio"] == pytest.approx(cpu["minigpt"]["runs"][0]["tokens_per_s"] / (64 / 0.089 * 3))
    for flag in ("--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.0",
                 "--max_iters=4"):
        assert flag in cpu["commands"]["nanogpt"].split()  # nanoGPT got our shapes; 2 + 3 iterations, 0 to 4
    sample = result["cases"]["sample"]
    theirs = sample["nanogpt"]["runs"][0]
    assert sample["nanogpt"]["tokens_per_s"] == pytest.approx(19 / (theirs["seconds"] - theirs["seconds_one_token"]))
    assert "--dropout=0.2" in sample["commands"]["nanogpt_checkpoint"].split()  # the baby config's dropout
    ours = sample["minigpt"]["runs"][0]
    assert (ours["prompt_len"], ours["new_tokens"]) == (1, 20)
    assert sample["ratio"] == pytest.approx(ours["decode_tokens_per_s"] / sample["nanogpt"]["tokens_per_s"])
    quality = result["quality"]
    assert quality["steps"] == 4 and quality["target_val_loss"] == 3.996  # the fake's last `val loss` line
    # iterations 0 to 3 take 5000, 21, 24, 29 ms; 0 and 2 hold evaluations and count as 21 and 29 (see above)
    theirs = quality["nanogpt"]
    assert theirs["curve"] == [[0, 0.0, 4.0], [2, pytest.approx(0.042), 3.998], [4, pytest.approx(0.1), 3.996]]
    assert theirs["time_to_target"] == {"step": 4, "train_s": pytest.approx(0.1)}
    assert "--eval_interval=2" in theirs["command"].split() and "--log_interval=1" in theirs["command"].split()
    assert list(quality["minigpt"]) == list(bench.QUALITY_CONFIGS)
    for ours in quality["minigpt"].values():
        assert [step for step, _, _ in ours["curve"]] == [2, 4] and 0 < ours["curve"][0][1] < ours["curve"][1][1]
        assert ours["val_loss"] == ours["curve"][-1][2] and 0 < ours["val_loss"] < 6
        reached = ours["time_to_target"]
        assert ours["sooner"] == (pytest.approx(0.1 / reached["train_s"]) if reached else None)
    assert "[cpu 1/1] nanoGPT" in r.stderr and "[sample 1/1] minigpt" in r.stderr  # progress


def test_format_comparison_table():
    result = {"date": "2026-11-23T06:00:00+00:00", "machine": {"cpus": 2, "torch": "2.13.0", "python": "3.11.7"},
              "repeats": 1, "minigpt_dir": "/m", "nanogpt_dir": "/n", "cases": {
                  "cpu": {"title": "train, nanoGPT's CPU shapes", "shapes": "4 layers", "target": 1.5, "ratio": 1.25,
                          "minigpt": {"tokens_per_s": 2500.0, "dtype": "float32", "runs": []},
                          "nanogpt": {"tokens_per_s": 2000.0, "dtype": "float32", "runs": []},
                          "commands": {"nanogpt": "python train.py", "minigpt": "python -m cli bench train"}}}}
    table = bench.format_comparison(result).splitlines()
    assert table[2].split() == ["case", "(tokens/s)", "minigpt", "nanoGPT", "ratio", "target"]
    assert table[3].split()[-6:] == ["2,500.0", "2,000.0", "1.25x", ">=", "1.5x", "MISSED"]
    assert "  cpu nanoGPT: python train.py" in table
    assert "  cpu: 4 layers; minigpt float32, nanoGPT float32" in table
    result["cases"]["cpu"]["minigpt"]["compile"] = True  # --set run.compile=true on our side says so
    assert "  cpu: 4 layers; minigpt float32 (compiled), nanoGPT float32" in bench.format_comparison(result)


def quality_result() -> dict:
    """compare_quality's result for 1000 steps: nanoGPT reaches its final 2.0 at 100 s, ours 1.9 at 15 s."""
    def run(curve: list, reached: dict, sooner: float | None = None) -> dict:
        return {"val_loss": curve[-1][2], "curve": curve, "time_to_target": reached, "sooner": sooner,
                "command": "python train.py"}

    steps = range(100, 1001, 100)
    return {"steps": 1000, "eval_interval": 100, "eval_iters": 200, "target_val_loss": 1.9,
            "nanogpt": run([[0, 0.0, 4.2], *([s, s / 10, 3 - s / 1000] for s in steps)],
                           {"step": 1000, "train_s": 100.0}),
            "minigpt": {"config/fast.toml": run([[s, s / 40, 2.5 - s / 1000] for s in steps],
                                                {"step": 600, "train_s": 15.0}, 100 / 15)}}


def test_format_comparison_quality():
    quality, steps = quality_result(), range(100, 1001, 100)
    result = {"date": "2026-11-29T12:00:00+00:00", "machine": {"cpus": 2, "torch": "2.13.0", "python": "3.11.7"},
              "repeats": 1, "minigpt_dir": "/m", "nanogpt_dir": "/n", "cases": {}, "quality": quality}
    table = bench.format_comparison(result).splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("val loss, 1000 steps at the CPU shapes"))
    assert table[head].split()[-5:] == ["final", "first", "<=", "1.9000", "sooner"]
    assert table[head + 1].split() == ["nanoGPT", "2.0000", "step", "1000,", "100.0", "s"]
    assert table[head + 2].split() == ["minigpt", "config/fast.toml", "1.5000", "step", "600,", "15.0", "s", "6.67x"]
    assert table[head + 4].split() == ["val", "loss", "at", "step", *map(str, steps)]
    assert table[head + 6].split()[2:5] == ["2.400", "2.300", "2.200"]
    assert "  quality minigpt config/fast.toml: python train.py" in table
    quality["minigpt"]["config/fast.toml"]["time_to_target"] = None
    assert "not reached" in bench.format_comparison(result)


def test_plot_quality_draws_both_tools(tmp_path):
    out = plots.plot_quality(quality_result(), tmp_path / "quality.png")
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(bench.UserError, match=r"^--plot .*quality.jpg: the suffix picks the format"):
        plots.plot_quality(quality_result(), tmp_path / "quality.jpg")


def test_cli_bench_nanogpt_bad_input(fake_nanogpt, tmp_path, monkeypatch):
    runner = CliRunner()
    (fake_nanogpt / "sample.py").unlink()
    cases = [
        ([str(tmp_path / "missing")], "is not a folder"),
        ([str(fake_nanogpt)], "has no sample.py"),
        ([str(tmp_path), "--case", "gpu"], "--case takes cpu | baby | sample, got gpu"),
        ([str(tmp_path), "--case", "baby", "--quality"], "--quality trains at the CPU shapes"),
        ([str(tmp_path), "--warmup", "0"], "--warmup must be >= 1"),
        ([str(tmp_path), "--new-tokens", "1"], "--new-tokens must be >= 2, got 1"),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["bench", "nanogpt", *args])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert message in r.stderr
    (fake_nanogpt / "sample.py").write_text(FAKE_SAMPLE)
    for f in ("train.bin", "val.bin"):
        (fake_nanogpt / "data" / "shakespeare_char" / f).write_bytes(b"")
    # read when our own data is missing (a clean clone): our random tokens then take nanoGPT's vocabulary
    (fake_nanogpt / "data" / "shakespeare_char" / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65}))
    for args, message in [(["--set", "run.device=cuda"], "drop --set run.device=cuda"),  # nanoGPT runs on the CPU
                          (["--set", "model.norm=rmsnorm"], "model.norm = 'rmsnorm', which nanoGPT's model does not")]:
        r = runner.invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--case", "cpu", *args])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    refused = [(["--set", "data.dir=data/none"], "error: --quality trains on real data"),
               (["--set", "train.max_iters=250"], "error: --quality evaluates every 100 steps and compares the last "
                                                  "evaluation: train.max_iters must be a multiple of it, got 250"),
               (["--quality-config", str(REPO_ROOT / "config" / "shakespeare_char.toml")],
                "error: --quality compares at nanoGPT's shapes and budget, and config/shakespeare_char.toml has "
                "model.n_layer = 6 (nanoGPT's run: 4)")]
    for args, message in refused:  # before any timing
        r = runner.invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--quality", *args])
        assert r.exit_code == 2 and r.stderr.startswith(message) and "[cpu" not in r.stderr, r.stderr
    r = runner.invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--quality-config", DEBUG])
    assert r.exit_code == 2 and r.stderr == "error: --quality-config picks our configs for --quality: add --quality\n"
    r = runner.invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--quality", "--quality-config", "nope.toml"])
    assert r.exit_code == 2 and r.stderr == "error: --quality-config nope.toml is not a file\n"
    r = runner.invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--plot", str(tmp_path / "q.png")])
    assert r.exit_code == 2 and r.stderr == "error: --plot draws the val loss curves of --quality: add --quality\n"
    r = runner.invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--quality", "--plot", str(tmp_path / "q.gif")])
    assert r.exit_code == 2 and r.stderr.startswith("error: --plot ") and "[cpu" not in r.stderr
    monkeypatch.setenv("FAKE_FAIL", "1")  # a failing nanoGPT: its last stderr line, in the one error line
    r = runner.invoke(app, ["bench", "nanogpt", str(fake_nanogpt), "--case", "cpu"])
    progress, error = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and progress.startswith("[cpu 1/1] nanoGPT")
    assert error.startswith("error: nanoGPT's train.py failed with exit code 1: RuntimeError: fake nanoGPT ran out")


def test_bench_prepare_reports_both_tools_over_the_same_documents(tmp_path, corpus_path, has_gpt2_cache):
    """`bench prepare` on a small generated folder: its token counts are checked against tiktoken's (plus one eot
    a document), its memory is a real sample, and the CLI prints the table (figures only, no timing asserted)."""
    if not has_gpt2_cache:
        pytest.skip("needs tiktoken's GPT-2 files (TIKTOKEN_CACHE_DIR)")
    folder = tmp_path / "corpus"
    n = bench.write_repeated_corpus(folder, corpus_path, 3 * corpus_path.stat().st_size)
    assert n == 3 and sorted(p.read_bytes() for p in folder.iterdir()) == [corpus_path.read_bytes()] * 3
    result = bench.bench_prepare(folder, workers=2, repeats=2)
    assert result["tokens_match"] and result["corpus"]["documents"] == 3
    assert len(result["minigpt"]["runs"]) == len(result["tiktoken"]["runs"]) == 2
    assert result["minigpt"]["peak_rss_mb"] > 30 and result["ratio"] > 0
    out = CliRunner().invoke(app, ["bench", "prepare", str(folder), "--repeats", "0"])
    assert out.exit_code == 2 and "--repeats must be at least 1" in out.output
    out = CliRunner().invoke(app, ["bench", "prepare", str(folder), "--generate-mb", "1", "--input", str(tmp_path / "none")])
    assert out.exit_code == 2 and "is not a file; pass the text --generate-mb should copy" in out.output
    text = bench.format_prepare(result)
    assert "tiktoken's + one eot per document: True" in text and "median of 2 run(s)" in text
