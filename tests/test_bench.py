"""bench.py and `minigpt bench`: the figures exist, are consistent with each other, and come out as JSON."""

import json

import pytest
import torch
from typer.testing import CliRunner

import bench
import train
from cli.main import app
from conftest import REPO_ROOT, tiny_config
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


def test_bench_sample_reports_cache_speedup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32))
    rt = train.setup_runtime(train.RunConfig(device="cpu"))
    r = bench.bench_sample(model, rt, batch=2, prompt_len=16, new_tokens=20, repeats=1)
    assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["decode_tokens_per_s_no_cache"] > 0
    assert r["kv_cache_speedup"] == pytest.approx(r["decode_tokens_per_s"] / r["decode_tokens_per_s_no_cache"])


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
