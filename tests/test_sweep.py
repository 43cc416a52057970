"""`minigpt sweep`: every combination x seed trained and evaluated, mean and spread over seeds in results.md/json
and the plots; killed (the whole process group) and run again, it finishes without training a finished run again and
gives the clean sweep's numbers; a [sweep] table in the config; bad --vary is one error line, exit 2, nothing written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import sweep
from cli.main import app
from conftest import REPO_ROOT, SMALL_CORPUS

DEBUG = REPO_ROOT / "config" / "debug.toml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A small char dataset (about 2k val tokens): evaluating the whole val split stays instant."""
    import prepare_data

    src = tmp_path_factory.mktemp("sweep_corpus") / "corpus.txt"
    src.write_text(SMALL_CORPUS * 20, encoding="utf-8")
    out = tmp_path_factory.mktemp("sweep_data") / "char"
    prepare_data.prepare(str(src), tokenizer="char", out=out, log=lambda s: None)
    return out


def sweep_args(data, out):
    return ["sweep", str(DEBUG), "--set", f"data.dir={data}", "--set", "train.max_iters=4", "--set",
            "train.eval_iters=1", "--set", "train.batch_size=4", "--vary", "model.pos_encoding=rope,alibi",
            "--seeds", "2", "--lengths", "32,64", "--rope-scaling", "linear", "--rope-factor", "2",
            "--max-tokens", "512", "--out", str(out)]


@pytest.fixture(scope="module")
def clean(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "sweep"
    result = CliRunner().invoke(app, sweep_args(small_data, out))
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_a_sweep_trains_every_combination_and_seed_and_tabulates_mean_and_spread(clean):
    out, log = clean
    names = ["pos_encoding-rope_seed1337", "pos_encoding-rope_seed1338", "pos_encoding-alibi_seed1337",
             "pos_encoding-alibi_seed1338"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)
    assert "run 1/4: model.pos_encoding=rope seed=1337: training" in log
    assert "run 4/4: model.pos_encoding=alibi seed=1338: training" in log
    evals = {n: json.loads((out / "runs" / n / "eval.json").read_text()) for n in names}
    assert all(e["val"]["checkpoint_step"] == 4 and e["val"]["tokens"] <= 512 + 32 for e in evals.values())
    assert [r["length"] for r in evals[names[0]]["lengths"]["lengths"]] == [32, 64]
    assert "rope" in evals[names[0]] and "rope" not in evals[names[2]]  # scalings apply to RoPE runs only
    assert evals[names[0]]["rope"]["linear"]["rope_factor"] == 2.0

    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["values"]["model.pos_encoding"], r["rope_scaling"]) for r in rows] == [
        ("rope", None), ("rope", "linear"), ("alibi", None)]
    a, b = (evals[n]["val"]["loss"] for n in names[2:])
    val = rows[2]["val_loss"]
    assert val["n"] == 2 and val["mean"] == pytest.approx((a + b) / 2)
    assert val["std"] == pytest.approx(abs(a - b) / 2 ** 0.5) and (val["min"], val["max"]) == (min(a, b), max(a, b))
    rope_64 = [evals[n]["rope"]["linear"]["lengths"][1]["loss"] for n in names[:2]]
    assert rows[1]["lengths"][1]["loss"]["mean"] == pytest.approx(sum(rope_64) / 2)
    md = (out / "results.md").read_text()
    assert "| model.pos_encoding | RoPE scaling | val loss | loss @ 32 | loss @ 64 |" in md
    assert f"| alibi | - | {val['mean']:.4f} ± {val['std']:.4f} |" in md and "| rope | linear x2 | - |" in md
    for png in ("loss.png", "lengths.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_the_same_command_skips_a_finished_sweep(clean, small_data):
    out, _ = clean
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    result = CliRunner().invoke(app, sweep_args(small_data, out))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("done, skipped") == 4 and "training" not in result.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")} == before


def test_a_killed_sweep_continues_where_it_stopped(clean, small_data, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli", *sweep_args(small_data, out)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "run 2/4" not in (tmp_path / "log").read_text():  # run 1 is evaluated: done
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as a closed terminal does
        proc.wait()
    first = out / "runs" / "pos_encoding-rope_seed1337" / "ckpt.pt"
    stamp = (first.stat().st_mtime_ns, first.read_bytes())
    assert not (out / "results.json").exists()

    result = CliRunner().invoke(app, sweep_args(small_data, out))
    assert result.exit_code == 0, result.output
    assert "run 1/4: model.pos_encoding=rope seed=1337: done, skipped" in result.stdout
    assert (first.stat().st_mtime_ns, first.read_bytes()) == stamp  # not trained again
    got, want = (json.loads((d / "results.json").read_text())["rows"] for d in (out, clean[0]))
    assert len(got) == len(want)
    for g, w in zip(got, want):  # training is deterministic: the interrupted sweep's numbers are the clean one's
        assert g["runs"] == w["runs"]
        assert g["lengths"][1]["loss"]["mean"] == pytest.approx(w["lengths"][1]["loss"]["mean"], rel=1e-4)
        if w["val_loss"] is not None:
            assert g["val_loss"]["mean"] == pytest.approx(w["val_loss"]["mean"], rel=1e-4)


def test_a_sweep_table_in_the_config_gives_the_defaults(small_data, tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(DEBUG.read_text() + '\n[sweep]\nseeds = 2\nlengths = [32, 64]\n'
                      '[sweep.vary]\n"model.n_layer" = [1, 2]\nmodel.pos_encoding = ["rope", "none"]\n')
    plan = sweep.plan_sweep(config, [f"data.dir={small_data}"], ["model.n_layer=3"], tmp_path / "out")
    assert plan.vary == {"model.n_layer": (3,), "model.pos_encoding": ("rope", "none")}  # --vary wins for its key
    assert [r.name for r in plan.runs] == [f"n_layer-3_pos_encoding-{p}_seed{s}" for p in ("rope", "none")
                                           for s in (1337, 1338)]
    assert plan.runs[3].cfg.model.pos_encoding == "none" and plan.runs[3].cfg.run.seed == 1338
    assert plan.evals.lengths == (32, 64) and not (tmp_path / "out").exists()


def test_the_positions_study_config_plans_its_study(small_data, tmp_path):
    plan = sweep.plan_sweep(REPO_ROOT / "config" / "positions_study.toml", [f"data.dir={small_data}"],
                            ["model.pos_encoding=learned,sinusoidal,rope,alibi,none"], tmp_path / "out", seeds=2,
                            lengths="64,128,256,512", rope_scaling="linear,ntk,yarn", rope_factor=8)
    assert len(plan.runs) == 10 and {r.cfg.model.block_size for r in plan.runs} == {64}
    assert len({(r.cfg.train.max_iters, r.cfg.model.n_embd) for r in plan.runs}) == 1  # same shapes and budget


BAD = {
    "unknown key": (["--vary", "model.pos_encodin=rope,alibi"], "unknown key 'model.pos_encodin' (did you mean "
                                                                "'model.pos_encoding'?)"),
    "unknown section": (["--vary", "modle.n_layer=1,2"], "unknown section 'modle'"),
    "wrong type": (["--vary", "model.n_layer=2,two"], "model.n_layer expects an int, got 'two'"),
    "not a choice": (["--vary", "model.pos_encoding=rope,rotary"], "must be one of"),
    "no values": (["--vary", "model.n_layer"], "--vary takes KEY=V1,V2"),
    "the sweep's own key": (["--vary", "run.seed=1,2"], "use --seeds N"),
    "a value twice": (["--vary", "model.n_layer=2,2"], "gives a value twice"),
    "zero seeds": (["--vary", "model.n_layer=1,2", "--seeds", "0"], "--seeds must be >= 1"),
    "one value": (["--vary", "model.n_head=2,3"], "--vary model.n_head=2,3: invalid [model]: n_embd (32) must be "
                                                  "divisible by n_head (3)"),
    "a combination": (["--vary", "model.n_embd=32,30", "--vary", "model.n_head=2,4"],
                      "the combination model.n_embd=30 model.n_head=4 is not a valid config"),
    "scaling without lengths": (["--vary", "model.n_layer=1,2", "--rope-scaling", "ntk", "--rope-factor", "2"],
                                "add --lengths"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(small_data, tmp_path, case):
    extra, expected = BAD[case]
    args = ["sweep", str(DEBUG), "--set", f"data.dir={small_data}", "--out", str(tmp_path / "out"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_sweep_table_key_and_another_sweeps_folder_are_errors(small_data, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(DEBUG.read_text() + "\n[sweep]\nseed = 2\n")
    result = CliRunner().invoke(app, ["sweep", str(config), "--vary", "model.n_layer=1,2", "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown key 'sweep.seed' (did you mean 'seeds'?)" in result.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "sweep.json").write_text(json.dumps({"config": {}, "vary": {}, "seeds": 1}))
    result = CliRunner().invoke(app, ["sweep", str(DEBUG), "--set", f"data.dir={small_data}", "--vary",
                                      "model.n_layer=1,2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds another sweep" in result.stderr


def test_ctrl_c_during_an_evaluation_stops_the_sweep_and_the_same_command_evaluates_it(small_data, tmp_path,
                                                                                      monkeypatch):
    import sweep

    real, calls = sweep.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first run is scored
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", interrupted)
    out = tmp_path / "sweep"
    args = sweep_args(small_data, out)
    args[args.index("--seeds") + 1] = "1"
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "sweep stopped by SIGINT while evaluating run 1/2" in first.stdout, first.output
    assert (out / "runs" / "pos_encoding-rope_seed1337" / "ckpt.pt").is_file() and not (out / "results.json").exists()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "run 1/2: model.pos_encoding=rope seed=1337: trained, evaluating" in again.stdout
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3
