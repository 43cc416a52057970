"""`minigpt eval`: metrics against direct computations (sacrebleu itself, the model's own logits, the bits-per-byte
formula), the CLI's table, --json and --out, a tiny model overfit on copy scoring 1.0, and every bad input as one
error line with exit code 2 and nothing written."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import evaluation
from cli.main import app
from conftest import REPO_ROOT, error_line, tiny_config

PAIR_KEYS = {"examples", "exact_match", "token_accuracy", "bleu", "chrf", "loss", "split", "data", "checkpoint_step",
             "beams"}
STREAM_KEYS = {"loss", "perplexity", "bits_per_byte", "tokens", "split", "data", "checkpoint_step"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def prepare(source, out, examples=16):
    import prepare_data

    return prepare_data.prepare(source, tokenizer="char", out=out, examples=examples, seed=1, log=lambda s: None)


def train_run(data_dir, out_dir, iters, **model):
    import train

    cfg = tiny_config(data_dir, out_dir, model=model,
                      train=dict(max_iters=iters, eval_interval=iters, batch_size=16, eval_iters=1),
                      optim=dict(lr=3e-3, min_lr=3e-4, warmup_iters=10), log=dict(interval=1000))
    train.train(cfg)
    return out_dir


ARCHS = {
    "encoder_decoder": dict(arch="encoder_decoder", block_size=24, source_block_size=24),
    "decoder": dict(block_size=24),
    "prefix": dict(block_size=24, attn_mask="prefix", prefix_len=0),
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def copy_data(ws):
    """task:copy with 16 train pairs (val and length: 200 each)."""
    return prepare("task:copy", ws / "copy")


@pytest.fixture(scope="module")
def copy_run(copy_data, ws):
    """A 2-layer encoder-decoder overfit on the 16 train pairs (~5 s on one core)."""
    return train_run(copy_data, ws / "copy_run", 200, n_embd=64, **ARCHS["encoder_decoder"])


@pytest.fixture(scope="module")
def short_runs(copy_data, ws):
    """Barely trained runs of each architecture: for the teacher-forced numbers, which need no good model."""
    return {arch: train_run(copy_data, ws / f"short_{arch}", 4, **model) for arch, model in ARCHS.items()}


@pytest.fixture(scope="module")
def stream_run(char_data, ws):
    return train_run(char_data, ws / "stream_run", 4)


@pytest.fixture(scope="module")
def other_stream_runs(char_data, ws):
    """A prefix-LM and a masked LM on the token stream, and an encoder-decoder pre-trained with span corruption."""
    import train

    runs = {"prefix": train_run(char_data, ws / "stream_prefix", 4, attn_mask="prefix", prefix_len=4),
            "masked": train_run(char_data, ws / "stream_masked", 4, attn_mask="bidirectional")}
    cfg = tiny_config(char_data, ws / "span", model=dict(arch="encoder_decoder"),
                      train=dict(max_iters=4, eval_interval=4, eval_iters=1, objective="span_corruption"))
    train.train(cfg)
    return {**runs, "span": ws / "span"}


def cli(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Metrics against direct computations


def test_text_metrics_are_sacrebleus():
    import sacrebleu

    references = ["the cat sat on the mat", "a quick brown fox", "hello world", "to be or not to be"]
    predictions = ["the cat sat on the mat", "a quick brown dog", "hello world", "to be or not"]
    m = evaluation.text_metrics(predictions, references)
    assert m["exact_match"] == 0.5
    assert m["bleu"] == sacrebleu.corpus_bleu(predictions, [references]).score
    assert m["chrf"] == sacrebleu.corpus_chrf(predictions, [references]).score
    assert 0 < m["bleu"] < 100 and 0 < m["chrf"] < 100
    perfect = evaluation.text_metrics(references, references)
    assert perfect == {"exact_match": 1.0, "bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    assert evaluation.text_metrics(["x", "y"], ["a", "b"])["exact_match"] == 0.0
    with pytest.raises(ValueError):
        evaluation.text_metrics(["a"], ["a", "b"])


def test_target_sums_count_only_targets_and_choose_among_allowed_ids():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]], [[0.0, 0.0, 9.0], [1.0, 3.0, 0.0]]])
    targets = torch.tensor([[1, 2], [-1, 0]])
    nll, correct, count = evaluation.target_sums(logits, targets)
    mask = targets != -1
    assert count == 3 and correct == 1  # only position (0, 0) has its target as argmax
    assert nll == pytest.approx(F.cross_entropy(logits[mask], targets[mask], reduction="sum").item())
    allowed = torch.tensor([True, False, True])  # id 1 may not be chosen: (0, 0) now picks 2, (1, 1) picks 0
    assert evaluation.target_sums(logits[1:], targets[1:])[1:] == (0, 1)
    assert evaluation.target_sums(logits[1:], targets[1:], allowed)[1:] == (1, 1)
    assert evaluation.target_sums(logits[:1], targets[:1], allowed)[1:] == (0, 2)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_token_accuracy_and_loss_equal_the_models_logits(short_runs, copy_data, arch, monkeypatch):
    import sample
    import train
    from batches import collate_pairs
    from pairs import open_pairs

    n = 10
    result = evaluation.evaluate_run(short_runs[arch], split="train", max_examples=n, device="cpu", progress=False)
    run = sample.load_for_inference(short_runs[arch], device="cpu")
    split = open_pairs(copy_data, "train")
    x, y = collate_pairs([split.pair(i) for i in range(n)], run.model.config, run.special)
    with torch.no_grad():
        logits, loss = train.forward(run.model, x, y)
    mask = y != -1
    assert int(mask.sum()) == sum(int(split.target_lengths[i]) + 1 for i in range(n))  # targets and their ends
    masked = logits[..., :len(run.allowed)].masked_fill(~run.allowed, float("-inf"))
    accuracy = int((masked.argmax(-1)[mask] == y[mask]).sum()) / int(mask.sum())
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)  # the model's own mean cross-entropy
    assert result["token_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert result["examples"] == n and result["beams"] == 1
    # batched in threes, the sums come out the same
    monkeypatch.setattr(evaluation, "PAIRS_PER_BATCH", 3)
    again = evaluation.evaluate_run(short_runs[arch], split="train", max_examples=n, device="cpu", progress=False)
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-5)
    assert again["token_accuracy"] == result["token_accuracy"]


def test_stream_loss_perplexity_and_bits_per_byte(stream_run, char_data, monkeypatch):
    import dataset_format
    import sample

    n = 20
    monkeypatch.setattr(evaluation, "WINDOWS_PER_BATCH", 7)  # three batches, the last a short one
    result = evaluation.evaluate_run(stream_run, split="val", max_examples=n, device="cpu", progress=False)
    run = sample.load_for_inference(stream_run, device="cpu")
    T = run.model.config.block_size
    data = dataset_format.open_split(char_data, "val")
    windows = torch.from_numpy(np.asarray(data[:n * (T + 1)], dtype=np.int64)).view(n, T + 1)
    with torch.no_grad():
        logits, loss = run.model(windows[:, :-1], windows[:, 1:])
    nats = loss.item() * n * T
    n_bytes = len(run.tokenizer.decode_bytes(windows[:, 1:].flatten().tolist()))
    assert result["tokens"] == n * T
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert set(result) == STREAM_KEYS and result["split"] == "val"


def test_stream_windows_cover_the_split():
    assert evaluation.stream_windows(10, 3, None) == [(0, 4), (4, 4), (8, 2)]
    assert evaluation.stream_windows(9, 3, None) == [(0, 4), (4, 4)]  # one token left: nothing to predict
    assert evaluation.stream_windows(10, 3, 1) == [(0, 4)]


def test_the_whole_stream_split(stream_run, char_data):
    import dataset_format

    meta = dataset_format.read_meta(char_data)
    result = evaluation.evaluate_run(stream_run, device="cpu", progress=False)
    T = tiny_config(char_data, "x").model.block_size
    full, rest = divmod(meta["val_tokens"], T + 1)
    assert result["tokens"] == full * T + max(rest - 1, 0)  # every token but each window's first
    assert result["loss"] > 0 and result["bits_per_byte"] > 0


# ----------------------------------------------------------------------------------------------------
# End to end, through the CLI


def test_overfit_copy_scores_exact_match_1(copy_run):
    result = last_json(cli(copy_run, "--split", "train", "--json", "--device", "cpu"))
    assert set(result) == PAIR_KEYS
    assert result["examples"] == 16 and result["split"] == "train" and result["beams"] == 1
    assert result["exact_match"] == 1.0 and result["token_accuracy"] == 1.0 and result["chrf"] == pytest.approx(100)
    assert 0 <= result["loss"] < 0.1
    # BLEU counts words (13a): a one-word target has no 2- to 4-grams, so a perfect corpus of them scores 0
    assert result["bleu"] == 0.0


def test_json_out_and_max_examples(copy_run, copy_data, tmp_path):
    out = tmp_path / "predictions.jsonl"
    result = last_json(cli(copy_run, "--max-examples", "7", "--out", out, "--json"))
    assert set(result) == PAIR_KEYS and result["split"] == "val" and result["examples"] == 7
    assert result["data"] == str(copy_data) and result["checkpoint_step"] == 200
    for key in ("exact_match", "token_accuracy"):
        assert 0 <= result[key] <= 1
    for key in ("bleu", "chrf"):
        assert 0 <= result[key] <= 100
    assert result["loss"] >= 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 7 and all(set(r) == {"source", "reference", "prediction", "correct"} for r in rows)
    assert all(r["reference"] == r["source"] for r in rows)  # copy
    assert all(r["correct"] == (r["prediction"] == r["reference"]) for r in rows)
    assert sum(r["correct"] for r in rows) / 7 == result["exact_match"]


def test_beam_search(copy_run):
    result = last_json(cli(copy_run / "ckpt.pt", "--split", "train", "--beams", "2", "--length-penalty", "0.6",
                           "--max-examples", "5", "--json"))
    assert result["beams"] == 2 and result["examples"] == 5 and result["exact_match"] == 1.0


def test_table_and_best_checkpoint(copy_run):
    r = cli(copy_run, "--split", "train", "--max-examples", "3", "--checkpoint", "best")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"eval {copy_run} (step 200) on ") and "(train, greedy)" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list(evaluation.PAIR_METRICS)
    assert lines[1].split() == ["examples", "3"]


def test_stream_through_the_cli(stream_run):
    result = last_json(cli(stream_run, "--max-examples", "5", "--json"))
    assert set(result) == STREAM_KEYS and result["tokens"] == 5 * 16
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    r = cli(stream_run, "--max-examples", "5")
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == list(evaluation.STREAM_METRICS)


def test_a_prefix_lm_stream_has_no_targets_inside_its_prefix(other_stream_runs):
    result = last_json(cli(other_stream_runs["prefix"], "--max-examples", "3", "--json"))
    assert result["tokens"] == 3 * (16 - 3)  # as in training: positions 0..prefix_len-2 predict inside the prefix


def test_progress_on_stderr(copy_run, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "PROGRESS_AFTER_S", 0.0)
    evaluation.evaluate_run(copy_run, split="train", max_examples=4, device="cpu")
    err = capsys.readouterr().err
    assert "\rdecoding: 4/4 examples" in err and "examples/s" in err and "ETA" in err and err.endswith("\n")


def test_a_real_process_prints_json_last(copy_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "cli", "eval", str(copy_run), "--split", "train", "--max-examples", "2",
                        "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["examples"] == 2


# ----------------------------------------------------------------------------------------------------
# Bad input: one error line, exit code 2, nothing written


def snapshot(*dirs):
    return {p: p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


BAD = {
    "stream run on pairs": (["{stream}", "--data", "{copy}"], "was trained on a token stream; evaluate it on "
                                                             "token-stream data (--data DIR)"),
    "pairs run on a stream": (["{pairs}", "--data", "{chars}"], "was trained on source/target pairs"),
    "no such pairs split": (["{pairs}", "--split", "test"], "has no 'test' split; it holds: train, val, length"),
    "no length split in a stream": (["{stream}", "--split", "length"], "has no 'length' split; it holds: train, val"),
    "beams 0": (["{pairs}", "--beams", "0"], "--beams must be >= 1"),
    "beams past the vocabulary": (["{pairs}", "--beams", "1000"], "larger than the vocabulary (94 ids)"),
    "beams on a stream": (["{stream}", "--beams", "2"], "drop --beams"),
    "length penalty without beams": (["{pairs}", "--length-penalty", "0.5"], "add --beams"),
    "max examples 0": (["{pairs}", "--max-examples", "0"], "--max-examples must be >= 1"),
    "missing run": (["{ws}/nowhere"], "run directory"),
    "run without checkpoint": (["{ws}/empty"], "no checkpoint"),
    "missing checkpoint file": (["{pairs}/step-0000200.pt"], "no checkpoint at"),
    "missing data": (["{pairs}", "--data", "{ws}/nodata"], "does not exist"),
    "other tokenizer": (["{pairs}", "--data", "{add}"], "another tokenizer (char, 11 characters) than"),
    "out in a missing folder": (["{pairs}", "--out", "{ws}/no/such/p.jsonl"], "does not exist"),
    "out on a stream": (["{stream}", "--out", "{ws}/p.jsonl"], "drop --out"),
    "pairs longer than the model": (["{decoder}", "--split", "length"], "evaluate a split that fits"),
    "bad checkpoint name": (["{pairs}", "--checkpoint", "newest"], "--checkpoint must be"),
    "bad device": (["{pairs}", "--device", "tpu"], "device must be"),
    "masked LM on a stream": (["{masked}"], "masked language model"),
    "span corruption run": (["{span}", "--data", "{copy}"], "pre-trained with span corruption"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, ws, copy_run, short_runs, stream_run, other_stream_runs,
                                                         copy_data, char_data):
    add = ws / "add"
    if not add.exists():
        prepare("task:add", add)
    (ws / "empty").mkdir(exist_ok=True)
    args, expected = BAD[case]
    names = dict(ws=ws, pairs=copy_run, stream=stream_run, copy=copy_data, chars=char_data, add=add,
                 decoder=short_runs["decoder"], masked=other_stream_runs["masked"], span=other_stream_runs["span"])
    args = [a.format(**names) for a in args]
    before = snapshot(ws, char_data)
    assert expected in error_line(cli(*args))
    assert snapshot(ws, char_data) == before
