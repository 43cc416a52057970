"""Loss curves: what `minigpt plot` draws (the numbers, from metrics.jsonl, resumed runs included), how it names
runs, the files it writes, loss.png at the end of training, and bad input as one error line."""

import json
import shutil
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import plots
from cli.main import app
from conftest import read_metrics, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 4 * 16  # tiny_config: batch_size 4 x block_size 16


@pytest.fixture(scope="module")
def resumed_run(char_data, tmp_path_factory):
    """A tiny run trained 4 steps, then resumed to 8 from a checkpoint that says 1000 s were trained before it:
    (run folder, the first process's checkpoint, wall seconds of the first and of the second process)."""
    import train
    from checkpoint import load_checkpoint
    from cli.config_loader import config_to_toml

    run = tmp_path_factory.mktemp("plots") / "run"
    start = time.perf_counter()
    train.train(tiny_config(char_data, run, train={"max_iters": 4}, log={"plot": True}))
    wall_1 = time.perf_counter() - start
    first = {k: v for k, v in load_checkpoint(run).items() if k in ("step", "elapsed_s")}
    first_png = (run / "loss.png").read_bytes()
    checkpoint = load_checkpoint(run)
    checkpoint["elapsed_s"] = 1000.0  # as if the first process had trained 1000 s: the second adds its own time
    cfg = tiny_config(char_data, run, train={"max_iters": 8}, log={"plot": True})
    start = time.perf_counter()
    train.train(cfg, checkpoint=checkpoint, config_text=config_to_toml(cfg))  # writes config.toml too
    wall_2 = time.perf_counter() - start
    return run, first, first_png, wall_1, wall_2


def test_elapsed_s_is_training_time_summed_across_resumes(resumed_run):
    from checkpoint import load_checkpoint

    run, first, _, wall_1, wall_2 = resumed_run
    progress = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in progress] == list(range(1, 9))  # log.interval 1, one record per step
    elapsed = np.array([r["elapsed_s"] for r in progress])
    assert np.all(np.diff(elapsed) > 0)
    # the first process: its checkpoint carries its time, at least that of its last record, at most its wall time
    assert first["step"] == 4 and 0 < elapsed[3] <= first["elapsed_s"] <= wall_1
    # the second process counts on from the checkpoint's elapsed_s (1000 s, set in the fixture)
    assert np.all((elapsed[4:] > 1000.0) & (elapsed[4:] <= 1000.0 + wall_2))
    assert elapsed[-1] <= load_checkpoint(run)["elapsed_s"] <= 1000.0 + wall_2


def test_elapsed_s_leaves_evaluations_and_their_checkpoints_out(char_data, tmp_path, monkeypatch):
    import types

    import train
    from checkpoint import load_checkpoint

    # a clock on which each evaluation and each checkpoint save takes an hour: none of it may show in elapsed_s
    hours = []
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + 3600 * len(hours))
    monkeypatch.setattr(train, "time", clock)

    def an_hour_long(real):
        def call(*args, **kwargs):
            hours.append(1)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(train, "evaluate", an_hour_long(train.evaluate))
    monkeypatch.setattr(train, "save_checkpoint", an_hour_long(train.save_checkpoint))
    train.train(tiny_config(char_data, tmp_path, train={"max_iters": 8, "eval_interval": 4}))
    elapsed = [r["elapsed_s"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(hours) == 4  # evaluations and saves at steps 4 and 8
    assert 0 < elapsed[-1] <= load_checkpoint(tmp_path)["elapsed_s"] < 3600


def test_curves_are_the_metrics_on_each_x_axis(resumed_run):
    run = resumed_run[0]
    records = read_metrics(run)
    progress = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    by_step = {r["step"]: r for r in progress}

    c = plots.run_curves(run, "step")
    np.testing.assert_array_equal(c.train_x, np.arange(1, 9))
    np.testing.assert_array_equal(c.train_loss, [r["nll"] for r in progress])
    np.testing.assert_array_equal(c.val_x, [4, 8])
    np.testing.assert_array_equal(c.val_loss, [r["val_loss"] for r in evals])

    c = plots.run_curves(run, "tokens")
    np.testing.assert_array_equal(c.train_x, TOKENS_PER_STEP * np.arange(1, 9))
    np.testing.assert_array_equal(c.val_x, [4 * TOKENS_PER_STEP, 8 * TOKENS_PER_STEP])

    c = plots.run_curves(run, "time")  # an evaluation sits at its step's progress record
    np.testing.assert_array_equal(c.train_x, [r["elapsed_s"] for r in progress])
    np.testing.assert_array_equal(c.val_x, [by_step[4]["elapsed_s"], by_step[8]["elapsed_s"]])


def write_metrics(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                                                  for line in lines))
    return folder


def test_reader_keeps_the_last_record_per_step_and_places_evaluations_between_records(tmp_path):
    run = write_metrics(tmp_path / "run", [
        {"step": 10, "loss": 9.0, "tokens_seen": 100, "elapsed_s": 50.0},  # replaced by the resumed run's step 10
        {"step": 5, "train_loss": 9.5, "val_loss": 9.9, "best_val_loss": 9.9},
        {"step": 10, "loss": 4.5, "nll": 4.0, "tokens_seen": 100, "elapsed_s": 5.0},
        {"step": 20, "loss": 3.0, "tokens_seen": 200, "elapsed_s": 15.0},  # no nll: an older file's loss
        {"step": 15, "train_loss": 3.6, "val_loss": 3.5, "best_val_loss": 3.5},
        "{\"step\": 30, \"loss\": 2.",  # the last line of a run killed mid-write
    ])
    c = plots.run_curves(run, "time")
    np.testing.assert_array_equal(c.train_x, [5.0, 15.0])
    np.testing.assert_array_equal(c.train_loss, [4.0, 3.0])
    np.testing.assert_array_equal(c.val_loss, [9.9, 3.5])
    np.testing.assert_allclose(c.val_x, [2.5, 10.0])  # step 5: half of step 10's 5 s; step 15: between 5 and 15
    np.testing.assert_allclose(plots.run_curves(run, "tokens").val_x, [50, 150])
    np.testing.assert_array_equal(plots.run_curves(run, "step").val_x, [5, 15])


def test_smoothing_is_a_trailing_mean_of_w_records():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(plots.smooth(values, 1), values)
    np.testing.assert_allclose(plots.smooth(values, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(plots.smooth(values, 3), [1.0, 1.5, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(plots.smooth(values, 99), [1.0, 1.5, 2.0, 2.5, 3.0])  # the mean so far
    # a skipped step's non-finite loss is left out of the means, not spread over the rest of the curve
    np.testing.assert_allclose(plots.smooth([1.0, np.nan, 3.0, 5.0, np.inf], 2), [1.0, 1.0, 3.0, 4.0, 5.0])


def test_runs_are_named_by_the_config_keys_that_differ():
    base = {"model.pos_encoding": "learned", "model.n_layer": 2, "optim.lr": 0.001, "run.out_dir": "out/a"}
    rope = {**base, "model.pos_encoding": "rope", "run.out_dir": "out/b"}
    both = {**base, "model.pos_encoding": "rope", "optim.lr": 0.003, "model.dropout": 0.1, "run.out_dir": "out/c"}
    assert plots.run_labels(["a", "b"], [base, rope]) == ["model.pos_encoding=learned", "model.pos_encoding=rope"]
    assert plots.run_labels(["a", "b", "c"], [base, rope, both]) == [
        "model.dropout=none, model.pos_encoding=learned, optim.lr=0.001",
        "model.dropout=none, model.pos_encoding=rope, optim.lr=0.001",
        "model.dropout=0.1, model.pos_encoding=rope, optim.lr=0.003"]
    assert plots.run_labels(["a", "b"], [base, {**base, "run.out_dir": "x"}]) == ["a", "b"]  # only where they lie
    assert plots.run_labels(["a", "b"], [base, None]) == ["a", "b"]  # a run without a config


def test_plot_command_labels_runs_by_their_configs_and_writes_png_and_svg(resumed_run, tmp_path):
    from checkpoint import load_checkpoint, save_checkpoint

    run = resumed_run[0]
    a, b, toml_only = tmp_path / "a", tmp_path / "b", tmp_path / "toml_only"
    for folder in (a, b, toml_only):
        shutil.copytree(run, folder)
    state = load_checkpoint(b)
    state["config"]["model"]["pos_encoding"] = "rope"
    save_checkpoint(b / "ckpt.pt", state)  # b: the same run, as if trained with RoPE
    assert plots.run_labels(["a", "b"], [plots.run_config(a), plots.run_config(b)]) == [
        "model.pos_encoding=learned", "model.pos_encoding=rope"]
    (toml_only / "ckpt.pt").unlink()  # a run without a checkpoint: its config.toml says
    assert plots.run_config(toml_only)["optim.lr"] == plots.run_config(a)["optim.lr"] == 0.003

    result = CliRunner().invoke(app, ["plot", str(a), str(b), "--out", str(tmp_path / "loss.png"), "--x", "time",
                                      "--smooth", "3", "--log"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    svg = tmp_path / "loss.svg"
    result = CliRunner().invoke(app, ["plot", str(a), "--out", str(svg), "--x", "tokens"])
    assert result.exit_code == 0, result.output
    assert b"<svg" in svg.read_bytes()[:1000]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_train_writes_loss_png_unless_log_plot_is_false(resumed_run, char_data, tmp_path, monkeypatch, capsys):
    import train

    run, _, first_png, _, _ = resumed_run
    assert first_png[:8] == PNG_MAGIC  # the first process drew its 4 steps; the second drew all 8 over it
    assert (run / "loss.png").read_bytes()[:8] == PNG_MAGIC and (run / "loss.png").read_bytes() != first_png
    train.train(tiny_config(char_data, tmp_path / "off", train={"max_iters": 2}, log={"plot": False}))
    assert (tmp_path / "off" / "ckpt.pt").is_file() and not (tmp_path / "off" / "loss.png").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plots, "plot_runs", broken)  # a failure to draw never fails the run
    result = train.train(tiny_config(char_data, tmp_path / "broken", train={"max_iters": 2}, log={"plot": True}))
    assert result.step == 2 and not (tmp_path / "broken" / "loss.png").exists()
    assert "note: no" in capsys.readouterr().out


BAD = {
    "unknown x": (["--x", "wall"], "--x takes step | tokens | time"),
    "smooth 0": (["--smooth", "0"], "--smooth"),
    "bad suffix": (["--out", "{tmp}/loss.jpg"], ".png or .svg"),
    "missing parent": (["--out", "{tmp}/nowhere/loss.png"], "does not exist"),
    "parent is a file": (["--out", "{tmp}/file.txt/loss.png"], "is a file"),
    "run without metrics": (["{tmp}/empty"], "has no metrics.jsonl"),
    "missing run": (["{tmp}/nope"], "does not exist"),
    "no elapsed_s": (["{tmp}/old", "--x", "time"], "no elapsed_s"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    write_metrics(tmp_path / "good", [{"step": 1, "loss": 4.0, "tokens_seen": 64, "elapsed_s": 0.1}])
    write_metrics(tmp_path / "old", [{"step": 1, "loss": 4.0, "tokens_seen": 64}])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("")
    extra, expected = BAD[case]
    args = ["plot", str(tmp_path / "good"), "--out", str(tmp_path / "loss.png"),
            *[a.format(tmp=tmp_path) for a in extra]]
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert sorted(tmp_path.rglob("*")) == before
