"""Training under torchrun on CPU (gloo): 2 processes give the same run as 1 (DDP and FSDP2), a run resumes on
another number of processes, a dead worker takes the whole job down, and a bad grad_accum is one line.

Every launch runs in its own session, with a timeout, and is killed as a group: a hang fails a test, never CI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, read_metrics

TOL = 1e-6
STEPS = 8  # the straight run; resumes split it in half
HALF = STEPS // 2

# Every run shares these: a tiny model in float32 on the CPU, the global batch of 4 micro-steps, a schedule
# that does not depend on max_iters (so a run of HALF steps is the first half of one of STEPS), and logs and
# evaluations at fixed steps.
COMMON = {
    "model.dropout": 0.0,
    "run.device": "cpu",
    "run.dtype": "float32",
    "log.interval": 1,
    "train.grad_accum": 4,
    "train.max_iters": STEPS,
    "train.eval_interval": HALF,
    "train.eval_iters": 4,
    "optim.warmup_iters": 2,
    "optim.lr_decay_iters": STEPS,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def command(nproc: int, *args) -> list[str]:
    """`python -m cli ...`, under torchrun when nproc > 1."""
    if nproc == 1:
        return [sys.executable, "-m", "cli", *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(free_port()), "-m", "cli", *map(str, args)]


def descendants(pid: int) -> list[int]:
    """pid's children, theirs, and so on (from /proc: torchrun starts each worker in a session of its own, so
    killing torchrun's process group alone would leave them running)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def kill_group(proc: subprocess.Popen, also=()) -> None:
    """SIGKILL the launch and every process it started (each torchrun worker leads a session), then reap it."""
    victims = [*descendants(proc.pid), *also] if proc.poll() is None else list(also)
    for kill, target in [(os.killpg, proc.pid), *((os.kill, pid) for pid in victims)]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def launch(nproc: int, *args, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(command(nproc, *args), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{nproc} process(es) still running after {timeout} s (a hang?)\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        kill_group(proc)  # workers torchrun left behind, if any
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_args(data, out_dir, **overrides) -> list[str]:
    args = ["train", REPO_ROOT / "config" / "debug.toml", "--set", f"data.dir={data}", "--set", f"run.out_dir={out_dir}"]
    for key, value in {**COMMON, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args


def train_ok(nproc: int, data, out_dir, cwd, **overrides) -> Path:
    r = launch(nproc, *train_args(data, out_dir, **overrides), cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"| {nproc} x cpu float32 |" in r.stdout  # it really ran on that many processes
    return Path(out_dir)


def resume_ok(nproc: int, run_dir, cwd, *overrides: str) -> subprocess.CompletedProcess:
    args = ["train", "--resume", run_dir, "--set", f"train.max_iters={STEPS}"]
    for o in overrides:
        args += ["--set", o]
    r = launch(nproc, *args, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"| {nproc} x cpu float32 |" in r.stdout and f"resuming at step {HALF}" in r.stdout, r.stdout
    return r


def records(run_dir, key: str) -> dict[int, float]:
    out = {}
    for m in read_metrics(run_dir):
        if key in m:
            assert m["step"] not in out, f"step {m['step']} logged twice in {run_dir}"
            out[m["step"]] = m[key]
    return out


def logged(run_dir, key: str) -> int:
    """How many records of `key` a running job has logged so far (a line being written is not one yet)."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    n = 0
    for line in lines:
        try:
            n += key in json.loads(line)
        except json.JSONDecodeError:
            pass
    return n


def max_diffs(run_dir, reference) -> dict[str, float]:
    """The largest |difference| to the reference run of the per-step losses, evaluations and final weights."""
    from checkpoint import load_checkpoint

    diffs = {}
    for key in ("loss", "train_loss", "val_loss"):
        got, want = records(run_dir, key), records(reference, key)
        assert list(got) == list(want), f"{key}: steps {list(got)} vs the reference's {list(want)}"
        diffs[key] = max(abs(got[s] - want[s]) for s in want)
    assert list(records(reference, "loss")) == list(range(1, STEPS + 1))
    assert list(records(reference, "val_loss")) == [HALF, STEPS]

    got, want = load_checkpoint(run_dir), load_checkpoint(reference)
    assert got["step"] == want["step"] == STEPS
    assert got["model"].keys() == want["model"].keys()
    diffs["weights"] = max((got["model"][k].float() - want["model"][k].float()).abs().max().item()
                           for k in want["model"])
    print(f"\n{run_dir.name}: max |diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return diffs


def assert_same_run(run_dir, reference, tol: float = TOL) -> None:
    diffs = max_diffs(run_dir, reference)
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    assert not bad, f"differs from the single-process run by more than {tol}: {bad}"


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory) -> Path:
    """The single-process run of STEPS steps with the whole global batch (grad_accum 4) in one process."""
    root = tmp_path_factory.mktemp("reference")
    run = train_ok(1, char_data, root / "single", root)
    losses = records(run, "loss")
    assert losses[STEPS] < losses[1] - 0.05, "the reference run did not learn: the comparisons would be weak"
    return run


# ----------------------------------------------------------------------------------------------------
# 1, 2: two processes, each running half of the micro-steps, train exactly like one running all of them.


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(strategy, reference, char_data, tmp_path):
    run = train_ok(2, char_data, tmp_path / strategy, tmp_path, **{"run.distributed": strategy})
    assert_same_run(run, reference)
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == ["best.pt", "ckpt.pt"]  # rank 0 alone


# ----------------------------------------------------------------------------------------------------
# 3: checkpoints hold whole weights and optimizer state, so a run continues on another number of processes.


@pytest.mark.parametrize("first,second,strategy", [(2, 1, "ddp"), (1, 2, "fsdp")],
                         ids=["2-ddp-then-1", "1-then-2-fsdp"])
def test_resume_on_another_number_of_processes_continues_the_same_run(first, second, strategy, reference,
                                                                       char_data, tmp_path):
    run = train_ok(first, char_data, tmp_path / f"{first}-then-{second}", tmp_path,
                   **{"train.max_iters": HALF, "run.distributed": strategy})
    assert list(records(run, "loss")) == list(range(1, HALF + 1))
    resume_ok(second, run, tmp_path, f"run.distributed={strategy}")
    assert_same_run(run, reference)


def test_a_resumed_two_process_run_with_dropout_continues_every_process_exactly(char_data, tmp_path):
    """Each process draws its own dropout masks, a function of (seed, step, rank): stopped and resumed on two
    processes, the run takes exactly the steps of the uninterrupted one (the checkpoint holds no rank 1 state)."""
    dropout = {"model.dropout": 0.2}
    straight = train_ok(2, char_data, tmp_path / "straight", tmp_path, **dropout)
    split = train_ok(2, char_data, tmp_path / "split", tmp_path, **dropout, **{"train.max_iters": HALF})
    resume_ok(2, split, tmp_path)
    assert max_diffs(split, straight) == {"loss": 0.0, "train_loss": 0.0, "val_loss": 0.0, "weights": 0.0}
    one = train_ok(1, char_data, tmp_path / "one", tmp_path, **dropout)  # dropout really acts, per process
    assert max_diffs(one, straight)["loss"] > 1e-4


# ----------------------------------------------------------------------------------------------------
# 4: a worker that dies takes the job down, instead of leaving the others waiting for it.


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.once
def test_a_killed_worker_makes_the_whole_job_exit_nonzero(char_data, tmp_path):
    out_dir = tmp_path / "long"
    args = train_args(char_data, out_dir, **{"train.max_iters": 100000, "train.eval_interval": 100000,
                                             "train.grad_accum": 2})
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(command(2, *args), cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    workers = {}
    try:
        deadline = time.monotonic() + 90
        while logged(out_dir, "loss") < 3:
            assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no training steps within 90 s"
            time.sleep(0.1)
        workers = {rank_of(p): p for p in children(proc.pid)}
        assert set(workers) == {0, 1}, f"torchrun's children: {workers}"
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun still running 60 s after a worker was SIGKILLed")
        assert code != 0, "a job that lost a worker must not report success"
        deadline = time.monotonic() + 10
        while alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(workers[0]), "the surviving worker outlived torchrun"
        output = (tmp_path / "torchrun.log").read_text()
        assert "SIGKILL" in output or "Signal 9" in output, output[-3000:]
        print(f"\ntorchrun exited {code} {time.monotonic() - killed_at:.1f} s after rank 1 was killed")
    finally:
        kill_group(proc, also=[pid for pid in workers.values() if alive(pid)])
        log.close()


# ----------------------------------------------------------------------------------------------------
# 5: grad_accum must split evenly among the processes.


def test_grad_accum_not_divisible_by_processes_is_a_one_line_error(char_data, tmp_path):
    r = launch(2, *train_args(char_data, tmp_path / "odd", **{"train.grad_accum": 3}), cwd=tmp_path, timeout=90)
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert errors, r.stdout[-2000:] + r.stderr[-3000:]
    assert all(line == errors[0] for line in errors)  # each process says the same one line
    assert "train.grad_accum (3)" in errors[0] and "number of processes (2)" in errors[0], errors[0]
    assert not (tmp_path / "odd").exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------------
# Evaluation is shared out among the processes: eval_iters need not be a multiple of their number.


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_with_eval_iters_not_divisible_by_processes(strategy, char_data, tmp_path):
    import torch

    import train
    from checkpoint import load_checkpoint
    from cli.config_loader import build_config
    from model import GPT
    from dataset_format import read_meta
    from runtime import Runtime

    # 3 batches per split: rank 0 evaluates 2 of them, rank 1 one. One step, then an evaluation.
    run = tmp_path / "run"
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(command(2, *train_args(char_data, run, **{
        "train.max_iters": 1, "train.eval_interval": 1, "train.eval_iters": 3, "optim.lr_decay_iters": 0,
        "run.distributed": strategy})), cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:  # a healthy run takes under 10 s here; its evaluation of 6 small batches, milliseconds
        deadline, stepped_at = time.monotonic() + 90, None
        while proc.poll() is None:
            assert time.monotonic() < deadline, "still running after 90 s"
            if stepped_at is None and logged(run, "loss"):
                stepped_at = time.monotonic()
            if stepped_at is not None and time.monotonic() - stepped_at > 15:
                pytest.fail(f"{strategy}: the evaluation hangs when eval_iters (3) is not a multiple of the number "
                            f"of processes (2): no val_loss 15 s after step 1; metrics so far:\n"
                            + (run / "metrics.jsonl").read_text())
            time.sleep(0.1)
    finally:
        kill_group(proc)
        log.close()
    out = (tmp_path / "torchrun.log").read_text()
    assert proc.returncode == 0, out[-5000:]

    # the logged evaluation is the mean over all 3 batches: the same as one process evaluating the saved weights
    checkpoint = load_checkpoint(tmp_path / "run")
    cfg = build_config(train.Config, checkpoint["config"])
    model = GPT(cfg.model)
    model.load_state_dict(checkpoint["model"])
    want = train.evaluate(model, cfg, read_meta(cfg.data.dir), Runtime(torch.device("cpu"), torch.float32))
    got = records(tmp_path / "run", "val_loss")[1], records(tmp_path / "run", "train_loss")[1]
    assert got == pytest.approx((want["val"], want["train"]), abs=1e-5)


def test_a_finished_worker_exits_zero_with_its_output_flushed(tmp_path):
    """The end of a torchrun worker skips the interpreter's finalization (where a gloo thread still releasing a
    collective aborted the process): the exit code is 0 and nothing buffered is lost, though atexit is skipped."""
    code = ("import atexit, sys, runtime; atexit.register(print, 'finalized'); print('out', end=''); "
            "print('err', end='', file=sys.stderr); runtime.end_torchrun_worker()")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "out", "err")


# ----------------------------------------------------------------------------------------------------
# Mixture of experts: an expert that no token of a process chose still takes part in its backward (with zero
# gradients), as DDP and FSDP need every parameter in every backward on every process.

# 8 experts, 1 per token, and micro-batches of 1 x 4 tokens: at most 4 experts of each layer get a token in a
# micro-step, so at least 4 get none, on every process, every micro-step. No biases: with 4 tokens the attention
# key bias, whose gradient is zero but for rounding, takes Adam steps from noise that differ by 1e-6 between runs.
MOE = {"model.n_experts": 8, "model.experts_per_token": 1, "model.block_size": 4, "train.batch_size": 1,
       "model.bias": False}


def test_an_expert_without_tokens_gets_zero_gradients_not_none():
    import torch

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=4, n_layer=2, n_head=2, n_embd=16, dropout=0.0, n_experts=8,
                          experts_per_token=1, mlp="swiglu", bias=True)).train()
    rows = {}  # expert -> how many tokens it processed
    for block in model.blocks:
        for expert in block.mlp.experts:
            rows[expert] = 0
            expert.register_forward_hook(lambda m, args, out: rows.__setitem__(m, rows[m] + args[0].shape[0]))
    idx = torch.randint(0, 16, (1, 4))
    _, loss = model(idx, idx)
    loss.backward()
    idle = [expert for expert, n in rows.items() if n == 0]
    assert idle, "4 tokens among 8 experts per layer: some expert must be idle"
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    for expert in idle:
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in expert.parameters())
    busy = [expert for expert, n in rows.items() if n]
    assert all(any(p.grad.abs().sum() > 0 for p in expert.parameters()) for expert in busy)


@pytest.fixture(scope="module")
def moe_reference(char_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe-reference")
    return train_ok(1, char_data, root / "single", root, **MOE)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_experts_that_get_no_tokens_on_a_process_train_under_torchrun(strategy, moe_reference, char_data,
                                                                       tmp_path):
    import math

    run = train_ok(2, char_data, tmp_path / strategy, tmp_path, **MOE, **{"run.distributed": strategy})
    assert all(math.isfinite(v) for v in records(run, "loss").values())
    # a router weight whose gradient is nearly zero in some step moves by lr · g / √v under AdamW, so the rounding of
    # the reduction (its order differs with 2 processes) shows up to ~1.6e-6 on conftest's small corpus, 5e-7 on
    # Shakespeare: the same run, to float32 rounding amplified that way
    assert_same_run(run, moe_reference, tol=1e-5)
