"""Faults: processes killed at random moments, signals, non-finite losses, full disks, unwritable folders,
a second trainer on the same run, flipped bits in a checkpoint, hostile inputs, and junk config values.

Each test asserts what the user is promised: a checkpoint on disk always loads, a resumed run logs every step
once, bad input ends as one `error:` line with exit code 2 and nothing changed, and no non-finite weight is saved.
"""

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import checkpoint
import train
from cli.config_loader import ConfigError, build_config
from cli.main import app
from conftest import REPO_ROOT, read_metrics, tiny_config
from errors import UserError
from model import GPT

# one intra-op thread: on a small, busy machine several trainers at once would otherwise spin against each other
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
DEBUG = REPO_ROOT / "config" / "debug.toml"
# a model whose checkpoints (weights + Adam moments, ~10 MB) take a while to write, saved every other step
SAVE_HEAVY = ["--set", "model.n_layer=4", "--set", "model.n_embd=128", "--set", "model.n_head=4",
              "--set", "train.eval_interval=2", "--set", "train.eval_iters=1", "--set", "log.interval=1"]
STEP_LINE = re.compile(r"^step +(\d+)/", re.M)


def train_args(data_dir, out_dir, *extra):
    return ["train", DEBUG, "--set", f"data.dir={data_dir}", "--set", f"run.out_dir={out_dir}", *extra]


def start(args, log: Path, cwd: Path) -> subprocess.Popen:
    """`minigpt ARGS` as a real process, stdout and stderr into `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=cwd, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, log: Path, pattern, timeout: float = 90.0, exited_ok: bool = False):
    """Poll `log` until `pattern` (a regex) matches; return the match, or None if the process ended first
    (allowed only with exited_ok)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(), re.M)
        if found:
            return found
        if proc.poll() is not None:
            assert exited_ok, f"process ended ({proc.returncode}) before {pattern!r}:\n{log.read_text()[-3000:]}"
            return None
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    pytest.fail(f"timed out waiting for {pattern!r}:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def snapshot(*dirs) -> dict:
    return {p: p.read_bytes() for d in dirs if Path(d).exists() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


# ----------------------------------------------------------------------------------------------------
# 1. SIGKILL at random moments, over and over: the checkpoint always loads and the final log is whole.


@pytest.mark.once
def test_random_sigkills_never_break_the_run(char_data, tmp_path):
    max_iters, kills_wanted = 150, 8  # long enough that a fast CPU still sees several kills before the end
    rng = random.Random(20250611)
    run = tmp_path / "run"
    fresh = train_args(char_data, run, *SAVE_HEAVY, "--set", f"train.max_iters={max_iters}")
    started = time.monotonic()
    kills, resumes, tmps_left, last_step, finished = 0, 0, 0, 0, False
    for i in range(kills_wanted):
        resuming = (run / "ckpt.pt").exists()
        stale = set(run.glob(".*.tmp")) if run.exists() else set()
        tmps_left += len(stale)
        log = tmp_path / f"leg{i}.log"
        proc = start(["train", "--resume", run] if resuming else fresh, log, tmp_path)
        try:
            first = wait_for(proc, log, STEP_LINE.pattern, exited_ok=True)
            if first is None:  # it had so little left that it finished before its first progress line showed
                assert proc.returncode == 0, log.read_text()
                finished = True
                break
            resumes += resuming
            if resuming:
                assert f"resuming at step {last_step}" in log.read_text()
                assert int(first[1]) == last_step + 1
            # the temporary files of the saves the last kill cut short are gone once training runs again
            assert not [p for p in stale if p.exists()], stale
            time.sleep(rng.uniform(0.3, 1.8))
            if proc.poll() is not None:
                assert proc.returncode == 0, log.read_text()
                finished = True
                break
            proc.send_signal(signal.SIGKILL)
        finally:
            stop(proc)
        kills += 1
        if (run / "ckpt.pt").exists():
            state = checkpoint.load_checkpoint(run / "ckpt.pt")  # CRCs checked: never a half-written file
            assert all_finite(state["model"])
            assert last_step <= state["step"] <= max_iters and state["step"] % 2 == 0
            last_step = state["step"]
        if (run / "best.pt").exists():
            checkpoint.load_checkpoint(run / "best.pt")
        if time.monotonic() - started > 35:  # a slow machine: enough kills, keep the test short
            break
    assert kills >= 3 and resumes >= 2, (kills, resumes)

    if not finished:
        # whether a kill landed inside a save is chance: leave a half-written temp file the way one would
        planted = run / ".ckpt.pt.cut_short.tmp"
        planted.write_bytes((run / "ckpt.pt").read_bytes()[:4096])
        stale = set(run.glob(".*.tmp"))
        tmps_left += len(stale)
        r = subprocess.run([sys.executable, "-m", "cli", "train", "--resume", str(run)], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert f"resuming at step {last_step}" in r.stdout
        assert not [p for p in stale if p.exists()]
    assert not list(run.glob(".*.tmp")), f"{tmps_left} temp files were left by kills"
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, max_iters + 1))  # each step once, in order
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_loss" in r] == list(range(2, max_iters + 1, 2))
    assert checkpoint.load_checkpoint(run)["step"] == max_iters
    owner = (run / "lock").read_text().strip()
    assert owner == "" or not pid_alive(int(owner))  # no live pid holds the run


# ----------------------------------------------------------------------------------------------------
# 2. Signals through a real process: SIGTERM saves and exits 0; a second SIGINT exits at once.


@pytest.mark.once
def test_sigterm_then_double_sigint(char_data, tmp_path):
    run = tmp_path / "run"
    bigger = ["--set", "model.n_embd=256", "--set", "train.max_iters=100000"]  # ~40 MB saves every other step
    log = tmp_path / "term.log"
    proc = start(train_args(char_data, run, *SAVE_HEAVY, *bigger), log, tmp_path)
    try:
        wait_for(proc, log, r"^step +5/")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        stop(proc)
    out = log.read_text()
    assert "SIGTERM received" in out and f"resume with: minigpt train --resume {run}" in out
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", out)[1])
    assert int(STEP_LINE.findall(out)[-1]) == stopped_at  # it finished the step it was in, and no more
    assert checkpoint.load_checkpoint(run)["step"] == stopped_at
    assert (run / "lock").read_text() == ""

    log = tmp_path / "int.log"
    proc = start(["train", "--resume", run], log, tmp_path)
    try:
        wait_for(proc, log, rf"^step +{stopped_at + 3}/")
        proc.send_signal(signal.SIGINT)
        wait_for(proc, log, r"SIGINT received")  # the handler ran: the next one is a second signal, not a merged one
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    assert code == 128 + signal.SIGINT, log.read_text()  # os._exit: no save, no clean-up, non-zero
    assert took < 3
    assert "stopped by SIGINT" not in log.read_text()
    state = checkpoint.load_checkpoint(run)  # whatever the signal cut short, the file on disk is a whole checkpoint
    assert state["step"] >= stopped_at and all_finite(state["model"])


# ----------------------------------------------------------------------------------------------------
# 3. Non-finite losses: isolated ones are skipped and counted; too many in a row stop the run, checkpoint intact.


@pytest.fixture
def nan_steps(monkeypatch):
    """A set of training steps (1-based: the n-th forward with gradients) whose loss the model turns into NaN."""
    bad: set[int] = set()
    calls = [0]
    real = GPT.forward

    def forward(self, idx, targets=None, *args, **kwargs):
        logits, loss = real(self, idx, targets, *args, **kwargs)
        if loss is not None and torch.is_grad_enabled():  # training, not evaluation (no_grad)
            calls[0] += 1
            if calls[0] in bad or "all" in bad:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    return bad


def test_isolated_nan_steps_are_skipped_and_counted(char_data, tmp_path, monkeypatch, nan_steps):
    nan_steps.update({2, 5, 6})
    saved = {}
    real_save = checkpoint.save_checkpoint

    def keep_copy(path, state):
        saved[state["step"]] = {k: v.clone() for k, v in state["model"].items()}
        real_save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", keep_copy)
    run = tmp_path / "run"
    result = train.train(tiny_config(char_data, run, train=dict(max_iters=8, eval_interval=2, max_bad_steps=3)))
    assert result.step == 8 and result.stopped_by is None
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 2, 3, 3, 3]
    assert [math.isnan(r["loss"]) for r in records] == [s in nan_steps for s in range(1, 9)]
    assert sorted(saved) == [2, 4, 6, 8]
    # steps 5 and 6 were skipped: the weights at 6 are those of 4; steps 7 and 8 train again
    assert all(torch.equal(saved[4][k], saved[6][k]) for k in saved[4])
    assert not all(torch.equal(saved[6][k], saved[8][k]) for k in saved[6])
    state = checkpoint.load_checkpoint(run)
    assert state["step"] == 8 and all_finite(state["model"])


def test_too_many_bad_steps_in_a_row_stop_with_the_checkpoint_untouched(char_data, tmp_path, nan_steps):
    run = tmp_path / "run"
    train.train(tiny_config(char_data, run, train=dict(max_iters=4, eval_interval=4)))
    before = (run / "ckpt.pt").read_bytes()
    ckpt = checkpoint.load_checkpoint(run)
    nan_steps.add("all")
    cfg = tiny_config(char_data, run, train=dict(max_iters=40, eval_interval=4, max_bad_steps=3))
    with pytest.raises(UserError) as caught:
        train.train(cfg, checkpoint=ckpt)
    message = str(caught.value)
    assert "3 steps in a row" in message and "stopped at step 7" in message
    assert f"last good checkpoint is {run}/ckpt.pt" in message
    assert (run / "ckpt.pt").read_bytes() == before
    assert all_finite(checkpoint.load_checkpoint(run)["model"])
    assert (run / "lock").read_text() == ""  # released on the way out
    # steps 5 and 6 are logged as skipped; the run stops at step 7 before logging it
    assert [(r["step"], r["skipped_steps"]) for r in read_metrics(run) if "loss" in r][-3:] == [(4, 0), (5, 1), (6, 2)]


def test_weights_made_non_finite_by_the_update_are_a_user_error(char_data, tmp_path, monkeypatch):
    """An update can make weights non-finite although its loss and gradient were finite, so the step is not
    skipped (simulated here by poisoning a weight after the first update). The run must end with a one-line
    UserError naming the last good checkpoint, not a traceback, and must save nothing non-finite."""
    for absurd in (math.inf, math.nan, 1e3):
        with pytest.raises(ValueError, match="lr"):
            train.OptimConfig(lr=absurd)
    real_step = train.train_step

    def poisoned(model, optimizer, *args, **kwargs):
        out = real_step(model, optimizer, *args, **kwargs)
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(train, "train_step", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config(char_data, run, train=dict(max_iters=20, eval_interval=3, max_bad_steps=10))
    with pytest.raises(UserError, match="non-finite.*train again"):
        train.train(cfg)
    assert not run.exists()  # nothing non-finite was written, and a run that never saved leaves nothing


# ----------------------------------------------------------------------------------------------------
# 4. A full disk at save time; a run folder that cannot be created.


def test_disk_full_on_the_second_save_keeps_the_first(char_data, tmp_path, monkeypatch):
    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"\0" * 1000)  # part of the file made it to disk before the space ran out
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    cfg = tiny_config(char_data, run, train=dict(max_iters=6, eval_interval=2))
    with pytest.raises(UserError) as caught:
        train.train(cfg)
    message = str(caught.value)
    assert "No space left on device" in message and "previous checkpoint is intact" in message
    assert "\n" not in message
    assert checkpoint.load_checkpoint(run)["step"] == 2
    assert not list(run.glob(".*.tmp"))
    assert (run / "lock").read_text() == ""
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes from step 2
    result = train.train(cfg, checkpoint=checkpoint.load_checkpoint(run))
    assert result.step == 6
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("how", ["under_a_file", "read_only_parent"])
def test_unwritable_run_dir_is_one_line_and_creates_nothing(char_data, tmp_path, how):
    blocker = tmp_path / "parent"
    if how == "under_a_file":
        blocker.write_text("a regular file, not a folder\n")
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions")
        blocker.mkdir()
        blocker.chmod(0o500)
    out_dir = blocker / "run"
    before = snapshot(tmp_path, char_data)
    try:
        result = CliRunner().invoke(app, [str(a) for a in train_args(char_data, out_dir, "--set", "train.max_iters=2")])
    finally:
        if how == "read_only_parent":
            blocker.chmod(0o700)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write to {out_dir}"), result.stderr
    assert "Traceback" not in result.output
    assert snapshot(tmp_path, char_data) == before and not out_dir.exists()


def can_mount_tmpfs() -> bool:
    """Whether this user may mount a tmpfs in a mount namespace of its own (an unprivileged user namespace)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True)
    return probe.returncode == 0


# Runs inside `unshare -rm` (the mount is gone when it ends): $CASE's commands against a tmpfs of $SIZE at $MNT,
# each command's stdout, stderr and exit code kept in $LOGS, and the run folder copied out after each one.
FULL_DISK_SCRIPT = r"""
mount -t tmpfs -o size=$SIZE tmpfs $MNT || exit 99
i=0
while read -r cmd; do
    i=$((i + 1))
    sh -c "$cmd" >$LOGS/$i.out 2>$LOGS/$i.err; echo $? >$LOGS/$i.rc
    if [ -d $MNT/run ]; then cp -r $MNT/run $LOGS/run.$i; fi
done
"""
FILL = "dd if=/dev/zero of=$MNT/filler bs=4096 2>/dev/null"  # the tmpfs is full when dd ends


def on_small_tmpfs(tmp_path, size: str, commands: list[str]) -> list[dict]:
    """Run `commands` (shell lines, $MNT the tmpfs) one after another; each one's exit code, stdout, stderr and a
    copy of $MNT/run after it."""
    mnt, logs = tmp_path / "mnt", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    env = {**ENV, "SIZE": size, "MNT": str(mnt), "LOGS": str(logs)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK_SCRIPT], input="\n".join(commands) + "\n",
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0
    return [{"rc": int((logs / f"{i}.rc").read_text()), "out": (logs / f"{i}.out").read_text(),
             "err": (logs / f"{i}.err").read_text(), "run": logs / f"run.{i}"} for i in range(1, len(commands) + 1)]


def cli(*args) -> str:
    return " ".join([sys.executable, "-m", "cli", *map(str, args)])


def one_error_line(result: dict) -> str:
    lines = result["err"].strip().splitlines()
    assert result["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    return lines[0]


needs_tmpfs = pytest.mark.skipif(not can_mount_tmpfs(), reason="mounting a small tmpfs needs a user namespace")


@pytest.mark.once
@needs_tmpfs
def test_a_real_full_disk_at_a_save_is_one_line_and_keeps_the_previous_checkpoint(char_data, tmp_path):
    # torch.save meets ENOSPC as an OSError, then raises "RuntimeError: ... unexpected pos" while closing
    probe = tmp_path / "probe"
    subprocess.run(cli(*train_args(char_data, probe, "--set", "train.max_iters=1")), shell=True, env=ENV, check=True,
                   capture_output=True)
    size = (probe / "ckpt.pt").stat().st_size
    # ckpt.pt, best.pt and the temporary file of a save fit in 3.3 checkpoints' room; beside a filler of 0.6, the
    # second save's temporary file does not
    results = on_small_tmpfs(tmp_path, f"{int(3.3 * size) // 1024}k", [
        f"head -c {int(0.6 * size)} /dev/zero >$MNT/filler && " + cli(*train_args(
            char_data, "$MNT/run", "--set", "train.max_iters=6", "--set", "train.eval_interval=2",
            "--set", "train.eval_iters=1", "--set", "log.interval=1")),
        "rm $MNT/filler",  # space freed: the run resumes from step 2
        cli("train", "--resume", "$MNT/run"),
    ])
    error = one_error_line(results[0])
    assert "could not save a checkpoint" in error and "No space left on device" in error
    assert "previous checkpoint is intact" in error
    saved = results[0]["run"]
    assert checkpoint.load_checkpoint(saved)["step"] == 2
    assert not list(saved.glob(".*.tmp")) and (saved / "lock").read_text() == ""
    assert results[2]["rc"] == 0, results[2]
    assert checkpoint.load_checkpoint(results[2]["run"])["step"] == 6
    assert [r["step"] for r in read_metrics(results[2]["run"]) if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.once
@needs_tmpfs
def test_a_real_full_disk_for_metrics_is_one_line_and_the_run_resumes(char_data, tmp_path):
    results = on_small_tmpfs(tmp_path, "2m", [
        cli(*train_args(char_data, "$MNT/run", "--set", "train.max_iters=2", "--set", "train.eval_interval=2",
                        "--set", "train.eval_iters=1", "--set", "log.interval=1")),
        FILL + "; truncate -s -8192 $MNT/filler",  # two pages free: metrics.jsonl is rewritten, grows, and fills them
        cli("train", "--resume", "$MNT/run", "--set", "train.max_iters=200", "--set", "train.eval_interval=1000"),
        "rm $MNT/filler",
        cli("train", "--resume", "$MNT/run", "--set", "train.max_iters=200", "--set", "train.eval_interval=1000"),
    ])
    assert results[0]["rc"] == 0 and results[1]["rc"] == 0, results[:2]
    error = one_error_line(results[2])
    assert "metrics.jsonl (No space left on device)" in error and "last checkpoint is intact" in error
    assert checkpoint.load_checkpoint(results[2]["run"])["step"] == 2  # the run stopped; its checkpoint is whole
    assert results[4]["rc"] == 0, results[4]
    assert [r["step"] for r in read_metrics(results[4]["run"]) if "loss" in r] == list(range(1, 201))


@pytest.mark.once
@needs_tmpfs
def test_a_new_run_on_a_full_disk_leaves_nothing_behind(char_data, tmp_path):
    results = on_small_tmpfs(tmp_path, "200k", [  # config.toml and the metrics fit; the first checkpoint does not
        cli(*train_args(char_data, "$MNT/run", "--set", "train.max_iters=4", "--set", "train.eval_interval=2")),
        FILL + "; " + cli(*train_args(char_data, "$MNT/run")),  # not even config.toml fits
        "ls -A $MNT",
    ])
    error = one_error_line(results[0])
    assert "No space left on device" in error and "nothing was saved" in error
    assert not results[0]["run"].exists()
    error = one_error_line(results[1])
    assert error.startswith("error: cannot write to") and "No space left on device" in error
    assert results[2]["out"].split() == ["filler"]  # no run folder, no temporary file


@pytest.mark.once
def test_running_out_of_memory_is_one_line_and_leaves_nothing_behind(char_data, tmp_path):
    """A batch that passes the memory check (which reads MemAvailable) but not the process's address-space limit:
    the CPU allocator fails as it would on a machine without the memory."""
    import resource

    run = tmp_path / "run"
    limit = 2 * 2**30  # torch and its threads take about 1.2 GiB of address space; the batch asks for more than 2

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "cli", *map(str, train_args(
        char_data, run, "--set", "train.batch_size=2048", "--set", "model.block_size=256", "--set",
        "train.max_iters=2"))], env=ENV, capture_output=True, text=True, preexec_fn=cap, timeout=120)
    error = one_error_line({"rc": done.returncode, "err": done.stderr, "out": done.stdout})
    assert re.match(r"error: out of memory on cpu \(could not allocate [\d,]+ MiB\): train.batch_size 2048", error)
    assert "nothing was saved" in error and not run.exists()


# ----------------------------------------------------------------------------------------------------
# 5. One trainer per run folder; a killed trainer's lock is taken over.


@pytest.mark.once
def test_second_trainer_is_refused_and_a_dead_ones_lock_is_taken_over(char_data, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "first.log"
    proc = start(train_args(char_data, run, "--set", "train.max_iters=1000000", "--set", "train.eval_interval=5",
                            "--set", "log.interval=1"),
                 log, tmp_path)
    try:
        wait_for(proc, log, r"^step +10/")  # a checkpoint (step 5) exists
        assert (run / "lock").read_text() == f"{proc.pid}\n"
        result = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "train.max_iters=3"])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by another training process (pid {proc.pid})" in lines[0], result.stderr
        assert "Traceback" not in result.output
        assert (run / "lock").read_text() == f"{proc.pid}\n"  # the refused one changed nothing
        assert proc.poll() is None  # and the first one runs on
    finally:
        stop(proc)  # SIGKILL: no clean-up, the lock file still names the dead process
    assert (run / "lock").read_text() == f"{proc.pid}\n" and not pid_alive(proc.pid)
    step = checkpoint.load_checkpoint(run)["step"]
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", f"train.max_iters={step + 3}"])
    assert result.exit_code == 0, result.output
    assert f"resuming at step {step}" in result.stdout
    assert checkpoint.load_checkpoint(run)["step"] == step + 3
    assert (run / "lock").read_text() == ""
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-4:] == [step, step + 1, step + 2, step + 3]


# ----------------------------------------------------------------------------------------------------
# 6. keep_last


def test_keep_last_keeps_the_two_newest_evaluation_checkpoints(char_data, tmp_path):
    run = tmp_path / "run"
    train.train(tiny_config(char_data, run, train=dict(max_iters=10, eval_interval=2), run=dict(keep_last=2)))
    kept = sorted(p.name for p in run.glob("step-*.pt"))
    assert kept == ["step-0000008.pt", "step-0000010.pt"]
    for name, step in zip(kept, (8, 10)):
        state = checkpoint.load_checkpoint(run / name)
        assert state["step"] == step
    assert (run / "step-0000010.pt").read_bytes() == (run / "ckpt.pt").read_bytes()
    assert not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------------
# 7. One flipped bit inside a tensor: torch.load takes it; the CRC check does not.


def test_flipped_byte_in_tensor_data_is_caught_by_the_crc(tmp_path):
    import zipfile

    path = tmp_path / "ckpt.pt"
    weights = torch.arange(4096, dtype=torch.float32)
    checkpoint.save_checkpoint(path, {"version": checkpoint.CHECKPOINT_VERSION, "model": {"w": weights}, "config": {}})
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if re.fullmatch(r".*/data/0", i.filename))
    data = bytearray(path.read_bytes())
    header = info.header_offset
    name_len = int.from_bytes(data[header + 26:header + 28], "little")
    extra_len = int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len
    middle = start + info.file_size // 2 + 3  # the sign-and-exponent byte of one float
    data[middle] ^= 0x40
    path.write_bytes(bytes(data))

    silently = torch.load(path, map_location="cpu", weights_only=True)  # no CRC check in torch.load
    assert not torch.equal(silently["model"]["w"], weights)
    with pytest.raises(UserError, match="corrupt") as caught:
        checkpoint.load_checkpoint(path)
    assert "CRC" in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# 8. Hostile inputs through the CLI: exit 2, one `error:` line, no traceback, nothing on disk changed.


@pytest.fixture(scope="module")
def sample_run(char_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_run")
    train.train(tiny_config(char_data, root / "run", train=dict(max_iters=1, eval_interval=1)))
    return root / "run"


def _truncate_train(data):
    p = data / "train.bin"
    p.write_bytes(p.read_bytes()[:-1])


def _bad_token(data):
    meta = json.loads((data / "meta.json").read_text())
    p = data / "train.bin"
    raw = bytearray(p.read_bytes())
    raw[100:102] = meta["vocab_size"].to_bytes(2, "little")  # uint16 id == vocab_size: one past the end
    p.write_bytes(bytes(raw))


def _meta_edit(**changes):
    def edit(data):
        meta = json.loads((data / "meta.json").read_text())
        for key, value in changes.items():
            if value is None:
                del meta[key]
            else:
                meta[key] = value
        (data / "meta.json").write_text(json.dumps(meta))
    return edit


def _write(name, content: bytes):
    def make(root):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return make


HOSTILE = {
    # case: (how to damage the copied data folder / the workspace, extra CLI args, text expected in the error)
    "train.bin short by one byte": (_truncate_train, [], "truncated"),
    "token id >= vocab_size": (_bad_token, [], "holds token id"),
    "meta field of the wrong type": (_meta_edit(vocab_size="65"), [], "'vocab_size' is missing or of the wrong type"),
    "meta field missing": (_meta_edit(train_tokens=None), [], "'train_tokens' is missing"),
    "block_size 0": (None, ["--set", "model.block_size=0"], "block_size must be >= 1"),
    "lr nan": (None, ["--set", "optim.lr=nan"], "lr must be in (0, 1]"),
    "batch too big for memory": (None, ["--set", "train.batch_size=100000000"], "lower train.batch_size"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_training_input(char_data, tmp_path, case):
    damage, extra, expected = HOSTILE[case]
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    if damage:
        damage(data)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, [str(a) for a in train_args(data, tmp_path / "run", *extra)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


HOSTILE_OTHER = {
    "prepare a non-UTF-8 file": (_write("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 50),
                                 ["prepare", "{root}/latin1.txt", "--out", "{root}/d"], "UTF-8"),
    "prepare a folder with no .txt": (_write("texts/notes.md", b"# not a txt\n" * 50),
                                      ["prepare", "{root}/texts", "--out", "{root}/d"], "no .txt files"),
    "prepare an empty folder": (lambda root: (root / "empty").mkdir(),
                                ["prepare", "{root}/empty", "--out", "{root}/d"], "no .txt files"),
    "sample a non-UTF-8 prompt file": (_write("prompt.txt", b"\xff\xfe\x80 caf\xe9"),
                                       ["sample", "{run}", "--prompt-file", "{root}/prompt.txt"], "prompt-file"),
    "sample a prompt file that is a folder": (lambda root: (root / "pdir").mkdir(),
                                              ["sample", "{run}", "--prompt-file", "{root}/pdir"], "prompt-file"),
}


@pytest.mark.parametrize("case", list(HOSTILE_OTHER), ids=list(HOSTILE_OTHER))
def test_hostile_prepare_and_sample_input(tmp_path, sample_run, case):
    make, args, expected = HOSTILE_OTHER[case]
    make(tmp_path)
    args = [a.format(root=tmp_path, run=sample_run) for a in args]
    before = snapshot(tmp_path, sample_run)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(tmp_path, sample_run) == before and not (tmp_path / "d").exists()


def test_infinite_lr_through_the_cli_is_one_line_not_a_traceback(char_data, tmp_path):
    """lr=inf is refused by the config check: a one-line error (exit 2), not a traceback, with nothing saved."""
    r = CliRunner().invoke(app, [str(a) for a in train_args(char_data, tmp_path / "run", "--set", "optim.lr=inf",
                                                            "--set", "train.eval_interval=3")])
    assert r.exit_code == 2, repr(r.exception)  # not 1 with a RuntimeError
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------------------------------
# 9. The config loader against the real train.Config: typed values resolve exactly, junk is a ConfigError.


def _int_text(n: int):
    return st.sampled_from([str(n), f" {n} ", f"{n:_}"] + ([f"+{n}"] if n >= 0 else []))


def _float_text(x: float):
    return st.sampled_from([repr(x), f"{x:.17g}", f"{x:.17e}", f" {x!r}\t"])


INT_KEYS = {  # key: (smallest valid value, largest tried)
    "train.batch_size": (1, 10**6), "train.max_iters": (1, 10**9), "train.eval_iters": (1, 10**6),
    "model.n_layer": (1, 1000), "run.seed": (0, 2**64 - 1), "run.keep_last": (0, 100),
    "optim.warmup_iters": (0, 10**6),
}
FLOAT_KEYS = {  # key: (low, high), both valid
    "optim.lr": (1e-4, 1.0), "optim.weight_decay": (0.0, 10.0), "optim.beta1": (0.0, 0.999999),
    "optim.beta2": (0.0, 0.999999), "optim.grad_clip": (0.0, 1e6), "model.dropout": (0.0, 0.999),
}


@st.composite
def valid_override(draw):
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(INT_KEYS)))
        low, high = INT_KEYS[key]
        value = draw(st.integers(low, high))
        text = draw(_int_text(value))
    else:
        key = draw(st.sampled_from(sorted(FLOAT_KEYS)))
        low, high = FLOAT_KEYS[key]
        value = draw(st.floats(low, high, allow_nan=False, allow_infinity=False))
        text = draw(_float_text(value))
    return key, value, text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_override())
def test_valid_numeric_override_resolves_to_the_typed_value(override):
    key, value, text = override
    cfg = build_config(train.Config, {}, [f"{key}={text}"])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value), (text, got)
    again = build_config(train.Config, {section: {name: value}})  # the same value from TOML
    assert getattr(getattr(again, section), name) == value


NUMERIC_KEYS = sorted(INT_KEYS) + sorted(FLOAT_KEYS) + ["run.dtype", "run.compile", "model.block_size"]
JUNK = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789.eE+-_ xX#'\"nainf", max_size=12),
    st.sampled_from(["", "nan", "-inf", "1e999", "1.5", "0x10", "1,000", "½", "١٢", "\x00", "\ud800", "True",
                     "None", "[1]", "{}", "1 2", "--1", "9" * 5000]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(NUMERIC_KEYS), junk=JUNK)
def test_junk_override_is_a_config_error_or_a_valid_value(key, junk):
    try:
        cfg = build_config(train.Config, {}, [f"{key}={junk}"])
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    section, name = key.split(".")  # accepted: then it must have parsed as the field's type
    value = getattr(getattr(cfg, section), name)
    if isinstance(value, bool) or isinstance(value, str):
        return
    number = int(junk.strip()) if isinstance(value, int) else float(junk.strip())
    assert value == number or (math.isnan(value) and math.isnan(number))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40))
def test_any_override_text_is_a_config_error_or_a_config(text):
    try:
        cfg = build_config(train.Config, {}, [text])
    except ConfigError:
        return
    assert isinstance(cfg, train.Config)
