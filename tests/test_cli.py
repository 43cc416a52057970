"""The command line, end to end: prepare -> train -> sample -> interrupt -> resume, and every bad input
ending as one line on stderr with exit code 2 and nothing on disk changed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.config_loader import load_config
from cli.main import app
from conftest import REPO_ROOT, read_metrics

CONFIGS = sorted((REPO_ROOT / "config").glob("*.toml"))


def minigpt(*args, cwd, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def debug_args(data_dir, out_dir, *extra):
    return ["train", REPO_ROOT / "config" / "debug.toml", "--set", f"data.dir={data_dir}",
            "--set", f"run.out_dir={out_dir}", *extra]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path):
    from dataclasses import replace

    import train
    from encoder_decoder import build_model

    cfg = load_config(train.Config, path)
    assert cfg.data.dir.startswith("data/") and cfg.run.out_dir.startswith("out/")
    model = build_model(replace(cfg.model, vocab_size=65))  # the shapes are consistent
    assert type(model).__name__ == ("EncoderDecoder" if cfg.model.arch == "encoder_decoder" else "GPT")


@pytest.mark.once
def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from cli.main import app; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
    for script in ("train.py", "sample.py", "prepare_data.py"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "Usage" in out.stdout, script
    out = subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert all(cmd in out.stdout for cmd in ("prepare", "train", "sample"))


def test_print_config_prints_the_resolved_toml(tmp_path):
    import tomllib

    result = CliRunner().invoke(app, ["train", str(REPO_ROOT / "config" / "debug.toml"), "--set", "optim.lr=0.5",
                                      "--set", "model.n_layer=3", "--print-config"])
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads(result.stdout)
    assert resolved["optim"]["lr"] == 0.5 and resolved["model"]["n_layer"] == 3
    assert resolved["train"]["max_iters"] == 40  # from the file
    assert not (tmp_path / "out").exists()


def test_pipeline_end_to_end_with_interrupt_and_resume(corpus_path, tmp_path):
    # prepare
    r = minigpt("prepare", corpus_path, "--tokenizer", "char", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = next((tmp_path / "data").iterdir())
    assert {p.name for p in data.iterdir()} >= {"train.bin", "val.bin", "meta.json"}
    r = minigpt("prepare", corpus_path, "--tokenizer", "char", cwd=tmp_path)
    assert r.returncode == 0 and "reusing" in r.stderr

    # train the debug config, uninterrupted, as the reference
    common = ["--set", "train.max_iters=300", "--set", "log.interval=1", "--set", "train.eval_interval=100"]
    r = minigpt(*debug_args(data, tmp_path / "straight", *common), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "straight" / "config.toml").exists() and (tmp_path / "straight" / "best.pt").exists()

    # sample: streamed text, greedy with and without the cache agree
    greedy = ["sample", tmp_path / "straight", "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "80"]
    cached = minigpt(*greedy, cwd=tmp_path)
    plain = minigpt(*greedy, "--no-kv-cache", cwd=tmp_path)
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr + plain.stderr
    assert cached.stdout.startswith("ROMEO:") and len(cached.stdout) == len("ROMEO:") + 80 + 1  # 80 chars, a newline
    assert cached.stdout == plain.stdout
    seeded = ["sample", tmp_path / "straight", "--seed", "7", "--max-new-tokens", "50", "--num-samples", "2"]
    assert minigpt(*seeded, cwd=tmp_path).stdout == minigpt(*seeded, cwd=tmp_path).stdout

    # the same run, stopped by Ctrl-C part way, then resumed
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "interrupted.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, debug_args(data, tmp_path / "split", *common))],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while "step     30/" not in (tmp_path / "interrupted.log").read_text() and time.time() < deadline:
        assert proc.poll() is None, (tmp_path / "interrupted.log").read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    output = (tmp_path / "interrupted.log").read_text()
    assert "SIGINT" in output and f"minigpt train --resume {tmp_path / 'split'}" in output
    stopped_at = json.loads((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 30 <= stopped_at < 300, "the interrupt came too late to test a resume"
    r = minigpt("train", "--resume", tmp_path / "split", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {stopped_at}" in r.stdout

    def losses(run):
        return [(m["step"], m["loss"]) for m in read_metrics(tmp_path / run) if "loss" in m]

    assert losses("split") == losses("straight")  # every step, the final one included


@pytest.fixture(scope="module")
def workspace(char_data, tmp_path_factory):
    """A trained debug run next to its data, for the bad-input tests."""
    root = tmp_path_factory.mktemp("ws")
    result = CliRunner().invoke(app, [str(a) for a in debug_args(char_data, root / "run", "--set", "train.max_iters=4")])
    assert result.exit_code == 0, result.output
    # and an encoder-decoder trained on pairs, for the bad inputs of beam search
    result = CliRunner().invoke(app, ["prepare", "task:copy", "--examples", "50", "--out", str(root / "copy")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [str(a) for a in debug_args(root / "copy", root / "pairs_run", "--set",
                                                                 "train.max_iters=2", "--set", "model.arch=encoder_decoder")])
    assert result.exit_code == 0, result.output
    return root, char_data


def snapshot(*dirs):
    return {p: p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


BAD = {
    "missing config": (["train", "config/nope.toml"], "not found"),
    "unknown key": (["train", "{debug}", "--set", "optim.learning_rate=1"], "did you mean 'optim.lr'"),
    "ill-typed key": (["train", "{debug}", "--set", "optim.lr=fast"], "optim.lr"),
    "bad value": (["train", "{debug}", "--set", "model.n_embd=33"], "divisible by n_head"),
    "negative lr": (["train", "{debug}", "--set", "optim.lr=-1"], "lr must be in (0, 1]"),
    "missing data dir": (["train", "{debug}", "--set", "data.dir={root}/nodata", "--set", "run.out_dir={root}/new"],
                         "minigpt prepare"),
    "vocab disagrees": (["train", "{debug}", "--set", "data.dir={data}", "--set", "model.vocab_size=7",
                         "--set", "run.out_dir={root}/new"], "vocab_size"),
    "existing run": (["train", "{debug}", "--set", "data.dir={data}", "--set", "run.out_dir={root}/run"], "--resume"),
    "resume without checkpoint": (["train", "--resume", "{root}/empty"], "no checkpoint"),
    "sample without checkpoint": (["sample", "{root}/empty"], "no checkpoint"),
    "sample missing run": (["sample", "{root}/nowhere"], "does not exist"),
    "corrupt checkpoint": (["sample", "{root}/corrupt"], "corrupt"),
    "resume corrupt checkpoint": (["train", "--resume", "{root}/corrupt"], "corrupt"),
    "max_new_tokens 0": (["sample", "{root}/run", "--max-new-tokens", "0"], "max-new-tokens"),
    "sample bad device": (["sample", "{root}/run", "--device", "tpu"], "device must be auto, cpu"),
    "compile without cache": (["sample", "{root}/run", "--compile", "--no-kv-cache"], "drop --no-kv-cache"),
    "bench sample bad device": (["bench", "sample", "{debug}", "--device", "cuda:x"], "device must be auto, cpu"),
    "bench sample --set on a run": (["bench", "sample", "{root}/run", "--set", "model.n_layer=2"], "--set changes"),
    "missing prompt file": (["sample", "{root}/run", "--prompt-file", "{root}/none.txt"], "prompt-file"),
    "unencodable prompt": (["sample", "{root}/run", "--prompt", "naïve"], "'ï'"),
    "missing corpus": (["prepare", "{root}/no_such.txt", "--out", "{root}/d"], "no_such.txt"),
    "bad tokenizer": (["prepare", "shakespeare", "--tokenizer", "words"], "tokenizer"),
    # a run is never rewound, nor written anywhere but its own folder
    "a run as config": (["train", "{root}/run"], "is a run, not a config: continue it with `minigpt train --resume"),
    "a checkpoint as config": (["train", "{root}/run/ckpt.pt"], "is a run, not a config"),
    "resume into another folder": (["train", "--resume", "{root}/run", "--set", "run.out_dir={root}/new"],
                                   "continues in its own folder"),
    "negative seed": (["train", "{debug}", "--set", "data.dir={data}", "--set", "run.out_dir={root}/new", "--set",
                       "run.seed=-1"], "seed must be in [0, 2**64)"),
    "seed past 64 bits": (["train", "{debug}", "--set", "data.dir={data}", "--set", "run.out_dir={root}/new",
                           "--set", "run.seed=18446744073709551616"], "seed must be in [0, 2**64)"),
    "empty out_dir": (["train", "{debug}", "--set", "data.dir={data}", "--set", "run.out_dir="], "out_dir must name"),
    "sample seed past 64 bits": (["sample", "{root}/run", "--seed", "99999999999999999999999"], "--seed must be in"),
    # sequence to sequence
    "beams 0": (["sample", "{root}/pairs_run", "--prompt", "abc", "--beams", "0"], "--beams must be >= 1"),
    "beams over the vocabulary": (["sample", "{root}/pairs_run", "--prompt", "abc", "--beams", "1000"],
                                  "larger than the vocabulary"),
    "beams with top-k": (["sample", "{root}/pairs_run", "--beams", "2", "--top-k", "5"], "does not apply"),
    "more samples than beams": (["sample", "{root}/pairs_run", "--beams", "2", "--num-samples", "3"], "<= --beams"),
    "beams on a token stream": (["sample", "{root}/run", "--beams", "2"], "trained on a token stream"),
    "compile on pairs": (["sample", "{root}/pairs_run", "--prompt", "abc", "--compile"], "drop --compile"),
    "unknown arch": (["train", "{debug}", "--set", "model.arch=t5"], "model.arch"),
    "pairs too long": (["train", "{debug}", "--set", "data.dir={root}/copy", "--set", "model.block_size=4",
                        "--set", "run.out_dir={root}/new"], "raise it with --set model.block_size="),
    "encoder-decoder on a stream": (["train", "{debug}", "--set", "data.dir={data}", "--set", "model.arch=encoder_decoder",
                                     "--set", "run.out_dir={root}/new"], "span_corruption"),
    "eval a stream run on pairs": (["eval", "{root}/run", "--data", "{root}/copy"], "token stream"),
    "unknown task": (["prepare", "task:juggle", "--out", "{root}/d"], "unknown task 'juggle'"),
    "negative task seed": (["prepare", "task:add", "--seed", "-3", "--out", "{root}/d"], "--seed must be an integer >= 0"),
    "length penalty without beams": (["sample", "{root}/pairs_run", "--prompt", "abc", "--length-penalty", "2"],
                                     "add --beams K"),
    "length penalty not a number": (["sample", "{root}/pairs_run", "--prompt", "abc", "--beams", "2",
                                     "--length-penalty", "nan"], "finite"),
    # click's own parse errors, too
    "unknown option": (["train", "--bogus"], "No such option: --bogus (see: "),
    "unknown command": (["frobnicate"], "No such command 'frobnicate'"),
    "missing argument": (["sample"], "Missing argument 'run_dir'"),
    "ill-typed option": (["bench", "sample", "{root}/run", "--batch", "many"], "Invalid value for '--batch'"),
}


def test_encoder_decoder_sample_prints_one_target_per_line_the_same_with_and_without_the_cache(workspace):
    root, _ = workspace
    runner = CliRunner()
    texts = {}
    for extra in ([], ["--no-kv-cache"]):
        result = runner.invoke(app, ["sample", str(root / "pairs_run"), "--prompt", "abc", "--temperature", "0",
                                     "--max-new-tokens", "12", "--num-samples", "2", *extra])
        assert result.exit_code == 0, result.output
        texts[bool(extra)] = result.stdout
    assert texts[True] == texts[False]
    lines = texts[False].split("\n")
    assert len(lines) == 3 and lines[0] == lines[1] and lines[2] == ""  # greedy twice: the same line, then the end
    beams = runner.invoke(app, ["sample", str(root / "pairs_run"), "--prompt", "abc", "--beams", "3",
                                "--num-samples", "3", "--max-new-tokens", "12"])
    assert beams.exit_code == 0 and len(beams.stdout.splitlines()) == 3, beams.output


def test_a_kept_step_checkpoint_can_be_sampled_and_evaluated(char_data, tmp_path):
    """run.keep_last keeps step-NNNNNNN.pt files: a checkpoint file is accepted wherever a run is."""
    runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in debug_args(char_data, tmp_path / "run", "--set", "train.max_iters=4",
                                                            "--set", "train.eval_interval=2", "--set", "run.keep_last=2")])
    assert result.exit_code == 0, result.output
    step2 = tmp_path / "run" / "step-0000002.pt"
    assert step2.is_file()
    args = ["--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20"]
    early = runner.invoke(app, ["sample", str(step2), *args])
    latest = runner.invoke(app, ["sample", str(tmp_path / "run"), *args])
    assert early.exit_code == 0 and latest.exit_code == 0, early.output + latest.output
    assert early.stdout != latest.stdout  # the weights of step 2, not of the last step
    ev = runner.invoke(app, ["eval", str(step2), "--max-examples", "2", "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout.splitlines()[-1])["checkpoint_step"] == 2
    bad = runner.invoke(app, ["sample", str(step2), "--checkpoint", "best"])
    assert bad.exit_code == 2 and "drop one of them" in bad.stderr


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workspace, case):
    root, data = workspace
    (root / "empty").mkdir(exist_ok=True)
    (root / "corrupt").mkdir(exist_ok=True)
    (root / "corrupt" / "ckpt.pt").write_bytes(b"\x00PK garbage" * 100)
    args, expected = BAD[case]
    args = [a.format(root=root, data=data, debug=REPO_ROOT / "config" / "debug.toml") for a in args]
    before = snapshot(root, data)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" or case in ("existing run",)  # the run may have printed nothing else
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(root, data) == before
    assert not (root / "new").exists() and not (root / "d").exists()


def test_bad_input_through_a_real_process_has_no_traceback(tmp_path):
    r = minigpt("train", REPO_ROOT / "config" / "debug.toml", "--set", "modle.n_layer=2", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: unknown section 'modle' (did you mean 'model'?); sections are: model, init, data, optim, train, run, log"
    r = minigpt("bench", "train", REPO_ROOT / "config" / "debug.toml", "--stpes", "3", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: No such option: --stpes")  # click's wording
    assert r.stderr.endswith(" (see: minigpt bench train --help)\n") and "--steps" in r.stderr  # its suggestion


def test_readme_documents_every_config_key_with_its_default():
    import dataclasses
    import re

    import train
    from cli.config_loader import toml_key

    readme = (REPO_ROOT / "README.md").read_text()
    for section in dataclasses.fields(train.Config):
        defaults = section.default_factory()
        for f in dataclasses.fields(defaults):
            key, default = f"{section.name}.{toml_key(f.name)}", getattr(defaults, f.name)
            row = re.search(rf"^\| `{re.escape(key)}` \| ([^|]*) \| \S", readme, re.M)
            assert row, f"README's config reference lacks {key}"
            shown = row.group(1).strip()
            if default is None:
                assert shown == "none", key
            elif isinstance(default, bool):
                assert shown == str(default).lower(), key
            elif isinstance(default, (int, float)):
                assert float(shown) == default, key
            else:
                assert shown == (default or '""'), key


@pytest.mark.parametrize("tokenizer", ["bpe", "gpt2"])
def test_subword_tokenizers_prepare_train_and_sample(corpus_path, tmp_path, tokenizer, has_gpt2_cache):
    if tokenizer == "gpt2" and not has_gpt2_cache:
        pytest.skip("no offline tiktoken cache for GPT-2")
    runner = CliRunner()
    extra = ["--vocab-size", "300"] if tokenizer == "bpe" else []
    r = runner.invoke(app, ["prepare", str(corpus_path), "--tokenizer", tokenizer, "--out", str(tmp_path / "d"), *extra])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    r = runner.invoke(app, [str(a) for a in debug_args(tmp_path / "d", tmp_path / "run", "--set", "train.max_iters=3")])
    assert r.exit_code == 0, r.output
    state = __import__("checkpoint").load_checkpoint(tmp_path / "run")
    assert state["config"]["model"]["vocab_size"] == meta["vocab_size"]
    assert state["model"]["wte.weight"].shape[0] % 64 == 0  # padded for speed
    r = runner.invoke(app, ["sample", str(tmp_path / "run"), "--prompt", "Thou art", "--max-new-tokens", "20"])
    assert r.exit_code == 0 and r.stdout.startswith("Thou art") and len(r.stdout) > len("Thou art") + 5, r.output


def test_sample_compile_gives_the_eager_text(workspace):
    """`sample --compile` reaches the compiled decode step and writes the same greedy text."""
    import torch
    from torch._dynamo.utils import counters

    root, _ = workspace
    args = ["sample", str(root / "run"), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40"]
    torch._dynamo.reset()
    counters.clear()
    eager = CliRunner().invoke(app, args)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = CliRunner().invoke(app, [*args, "--compile"])
    assert counters["stats"]["unique_graphs"] == 1  # the decode step, compiled once
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    assert compiled.stdout == eager.stdout and len(eager.stdout) == len("ROMEO:") + 40 + 1
    torch._dynamo.reset()
