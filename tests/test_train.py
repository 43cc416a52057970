"""train.py: lr schedule, optimizer groups, learning, exact resume, checkpoints, logging, bad input."""

import math
from dataclasses import replace

import pytest
import torch

import checkpoint
import runtime
import train
from batches import Batches
from conftest import read_metrics, tiny_config
from errors import UserError
from model import GPT, GPTConfig


def test_lr_schedule_endpoints():
    o = train.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert train.lr_at(0, o, 999) == pytest.approx(1e-3 / 11)
    assert train.lr_at(9, o, 999) == pytest.approx(1e-3 * 10 / 11)
    assert train.lr_at(10, o, 999) == pytest.approx(1e-3)  # warmup ends at the peak
    assert train.lr_at(60, o, 999) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert train.lr_at(110, o, 999) == pytest.approx(1e-4)
    assert train.lr_at(5000, o, 999) == pytest.approx(1e-4)
    follow = replace(o, lr_decay_iters=0)  # 0 follows max_iters
    assert train.lr_at(60, follow, 110) == pytest.approx(train.lr_at(60, o, 999))
    lrs = [train.lr_at(s, o, 999) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_inverse_sqrt_schedule_cools_down_to_min_lr():
    o = train.OptimConfig(lr=1e-3, min_lr=1e-5, warmup_iters=99, schedule="inverse_sqrt", cooldown_iters=200,
                          lr_decay_iters=599)
    # 1/√step up to the cooldown's start (step 399: half the peak), then a straight line from there to min_lr
    assert train.lr_at(99, o, 999) == pytest.approx(1e-3)
    assert train.lr_at(399, o, 999) == pytest.approx(5e-4)
    assert train.lr_at(499, o, 999) == pytest.approx(1e-5 + (5e-4 - 1e-5) / 2)
    assert train.lr_at(599, o, 999) == train.lr_at(10**6, o, 999) == 1e-5
    follow = replace(o, lr_decay_iters=0)  # 0 follows max_iters
    assert train.lr_at(499, follow, 599) == pytest.approx(train.lr_at(499, o, 999))
    with pytest.raises(ValueError, match="the cosine one already ends at min_lr"):
        replace(o, schedule="cosine")
    short = replace(o, lr_decay_iters=250)  # a run too short for the whole cooldown: it starts when warmup ends
    assert train.lr_at(99, short, 999) == pytest.approx(1e-3)
    assert train.lr_at(174, short, 999) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 76 / 151)
    assert train.lr_at(250, short, 999) == 1e-5


def test_weight_decay_only_on_matrices():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = train.configure_optimizer(m, train.OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # every parameter in exactly one group (the tied embedding counted once)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 20, (4, 16))
    y = torch.randint(0, 20, (4, 16))
    for _ in range(150):
        loss = m(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # log(20) = 3.0 at the start


def test_training_lowers_loss_and_writes_run(char_data, tmp_path):
    cfg = tiny_config(char_data, tmp_path / "run", train=dict(max_iters=30, eval_interval=10, eval_iters=4))
    result = train.train(cfg, config_text="# resolved\n")
    assert result.step == 30 and result.stopped_by is None
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in evals)
    assert result.best_val_loss == min(r["val_loss"] for r in evals)
    assert (tmp_path / "run" / "config.toml").read_text() == "# resolved\n"
    ckpt = checkpoint.load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 30 and ckpt["best_val_loss"] == result.best_val_loss
    assert ckpt["config"]["model"]["vocab_size"] > 0 and ckpt["tokenizer"]["kind"] == "char"
    best = checkpoint.load_checkpoint(tmp_path / "run" / "best.pt")
    best_step = min(evals, key=lambda r: r["val_loss"])["step"]
    assert best["step"] == best_step


def weights(run_dir):
    return checkpoint.load_checkpoint(run_dir)["model"]


@pytest.mark.parametrize("sections", [
    {},
    {"train": {"grad_accum": 2}},
    {"model": {"dropout": 0.2}},
    {"run": {"dtype": "bfloat16"}},
], ids=["plain", "grad_accum", "dropout", "bf16"])
def test_resume_is_exact(char_data, tmp_path, sections):
    """N steps straight == N/2 steps, a checkpoint, a resume, N/2 steps: loss by loss, weight by weight."""
    def cfg(out, max_iters):
        merged = {k: dict(v) for k, v in sections.items()}
        merged.setdefault("train", {}).update(max_iters=max_iters, eval_interval=3)
        merged.setdefault("optim", {}).update(lr_decay_iters=10)  # the schedule must not depend on max_iters
        return tiny_config(char_data, out, **merged)

    train.train(cfg(tmp_path / "straight", 10))
    train.train(cfg(tmp_path / "split", 5))  # stops at 5: a checkpoint between evals (3 and 6)
    ckpt = checkpoint.load_checkpoint(tmp_path / "split")
    assert ckpt["step"] == 5
    train.train(cfg(tmp_path / "split", 10), checkpoint=ckpt)

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / run) if "loss" in r]

    assert losses("split") == losses("straight")
    def evals(run):  # the first leg also evaluates at its last step, 5; compare the steps both runs share
        return {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / run) if "val_loss" in r and r["step"] != 5}

    assert evals("split") == evals("straight") and sorted(evals("straight")) == [3, 6, 9, 10]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compiled_model_saves_raw_weights(char_data, tmp_path, monkeypatch):
    eager_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: eager_compile(m, backend="eager"))  # fast on CPU
    cfg = tiny_config(char_data, tmp_path / "run", run={"compile": True}, train={"max_iters": 2})
    train.train(cfg)
    state = checkpoint.load_checkpoint(tmp_path / "run")
    model = GPT(GPTConfig(**state["config"]["model"]))
    model.load_state_dict(state["model"], strict=True)  # no _orig_mod. prefixes
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_float16_uses_a_grad_scaler_and_saves_it(char_data, tmp_path):
    cfg = tiny_config(char_data, tmp_path / "run", run={"dtype": "float16"}, train={"max_iters": 3})
    train.train(cfg)
    state = checkpoint.load_checkpoint(tmp_path / "run")
    assert state["scaler"] and state["scaler"]["scale"] > 0
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"version": checkpoint.CHECKPOINT_VERSION, "model": {"w": torch.ones(2)},
                                     "config": {}})

    def crash(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, {"version": checkpoint.CHECKPOINT_VERSION, "model": {"w": torch.zeros(2)},
                                         "config": {}})
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_user_error(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"version": checkpoint.CHECKPOINT_VERSION, "model": {"w": torch.ones(1000)},
                                     "config": {}})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load_checkpoint(path)


def test_loading_never_runs_pickled_code(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "ckpt.pt"
    with open(path, "wb") as f:
        torch.save({"version": 1, "model": Evil()}, f, pickle_module=pickle)
    with pytest.raises(UserError):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()


def test_bad_inputs(char_data, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "nothing")
    with pytest.raises(UserError, match="meta.json|prepare"):
        train.train(tiny_config(tmp_path / "no_such_data", tmp_path / "run"))
    with pytest.raises(UserError, match="vocab_size"):
        train.train(tiny_config(char_data, tmp_path / "run", model={"vocab_size": 7}))
    assert not (tmp_path / "run").exists()
    cfg = tiny_config(char_data, tmp_path / "run", train={"max_iters": 1})
    train.train(cfg)
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match="--resume"):  # never overwrite a run by starting a new one on top
        train.train(cfg)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    with pytest.raises(UserError, match="block_size"):
        train.train(tiny_config(char_data, tmp_path / "big", model={"block_size": 10**7}))


def test_sigterm_saves_and_stops_after_the_current_step(char_data, tmp_path, monkeypatch):
    import os
    import signal

    real_step = train.train_step
    calls = []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of training, as from `kill`
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    result = train.train(tiny_config(char_data, tmp_path / "run", train={"max_iters": 50}))
    assert result.stopped_by == "SIGTERM" and result.step == 3
    assert checkpoint.load_checkpoint(tmp_path / "run")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored after the run


def test_resume_refuses_a_different_model_shape(char_data, tmp_path):
    train.train(tiny_config(char_data, tmp_path / "run", train={"max_iters": 2}))
    ckpt = checkpoint.load_checkpoint(tmp_path / "run")
    with pytest.raises(UserError, match="do not fit"):
        train.train(tiny_config(char_data, tmp_path / "run", model={"n_embd": 64}, train={"max_iters": 4}),
                    checkpoint=ckpt)


def test_wandb_offline_logs_the_run_and_is_untouched_when_off(char_data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now fails
    train.train(tiny_config(char_data, tmp_path / "off", train={"max_iters": 2}))
    monkeypatch.undo()
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.train(tiny_config(char_data, tmp_path / "on", train={"max_iters": 2}, log={"wandb": True}))
    runs = list((tmp_path / "on" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


FAULTS_PER_TOUCH = """
import resource, sys, torch, runtime, train
if sys.argv[1] == "setup":
    runtime.setup_runtime(train.RunConfig(device="cpu"))
counts = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MB: over glibc's default threshold of 32 MB
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(runtime.keep_freed_memory() if sys.argv[1] == "setup" else None, *counts)
"""


@pytest.mark.once
def test_cpu_runtime_keeps_freed_memory_on_glibc():
    """On glibc, setup_runtime raises malloc's mmap threshold so that freed activations are reused, not handed
    back to the kernel and page-faulted in again at the next step; elsewhere it does nothing and says so.
    Each case runs in a fresh process: the heap's history (and the setting itself) is per process."""
    import platform
    import subprocess
    import sys

    from conftest import REPO_ROOT

    def run(mode: str) -> tuple[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_TOUCH, mode], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], [int(n) for n in out[1:]]

    glibc = platform.libc_ver()[0] == "glibc"
    took, kept = run("setup")
    assert took == str(glibc)
    if glibc:
        _, default = run("default")
        assert min(default) > 16000  # 64 MB / 4 KB: unmapped on free, faulted in again at every touch
        # the first touches fault pages in (an aligned request may not fit the block just freed), then reuse
        assert min(kept[-4:]) < 1000


def test_prefetched_batch_is_the_one_get_would_make_and_train_step_prefetches_the_next(char_data, tmp_path):
    from dataset_format import read_meta

    cfg, _ = train.with_vocab(tiny_config(char_data, tmp_path / "run", train={"grad_accum": 2}))
    meta = read_meta(char_data)

    def batches():
        return Batches(char_data, meta, "train", 4, cfg.model, torch.device("cpu"), seed=3)

    b = batches()
    b.prefetch(5, 1)
    x, y = b.get(5, 1)
    fresh = batches().get(5, 1)
    assert torch.equal(x, fresh[0]) and torch.equal(y, fresh[1]) and b.ready is None
    b.prefetch(6, 0)
    other = b.get(7, 0)  # not the prefetched one: made afresh, and the stale one dropped
    assert torch.equal(other[0], batches().get(7, 0)[0]) and b.ready is None

    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizer = train.configure_optimizer(model, cfg.optim, torch.device("cpu"))
    rt = runtime.Runtime(torch.device("cpu"), torch.float32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    b = batches()
    train.train_step(model, optimizer, scaler, b, 4, rt, 1e-3, 2, 1.0)
    assert b.ready[0] == (5, 0)  # built during step 4, for step 5's first micro-batch
    assert torch.equal(b.ready[1][0], batches().get(5, 0)[0])


def test_training_a_finished_run_longer_continues_at_min_lr(char_data, tmp_path):
    """optim.lr_decay_iters = 0 follows the max_iters a run starts with, fixed in its checkpoint: raising
    train.max_iters on a resume must not send the learning rate back up a re-stretched cosine."""
    cfg = tiny_config(char_data, tmp_path / "run", train=dict(max_iters=8, eval_interval=4))
    assert cfg.optim.lr_decay_iters == 0
    train.train(cfg)
    state = checkpoint.load_checkpoint(tmp_path / "run")
    assert state["config"]["optim"]["lr_decay_iters"] == 8  # resolved once, at the start
    from cli.config_loader import build_config

    longer = build_config(train.Config, state["config"], ["train.max_iters=12"])  # what `--resume --set` builds
    train.train(longer, checkpoint=state)
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run") if "lr" in m]
    assert len(lrs) == 12 and lrs[8:] == [cfg.optim.min_lr] * 4
    assert max(lrs[4:]) <= lrs[4]  # never back up


def test_a_run_saves_its_final_step_once_and_a_finished_run_says_so(char_data, tmp_path, monkeypatch, capsys):
    saves = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, state: (saves.append(state["step"]), real(path, state)))
    cfg = tiny_config(char_data, tmp_path / "run", train=dict(max_iters=6, eval_interval=4))
    train.train(cfg)
    assert saves == [4, 6]  # the evaluation at the last step saves it; nothing saves it again
    capsys.readouterr()
    train.train(cfg, checkpoint=checkpoint.load_checkpoint(tmp_path / "run"))
    assert saves == [4, 6]  # a finished run resumed writes nothing
    assert "already trained its train.max_iters = 6 steps" in capsys.readouterr().out


def test_the_eta_counts_the_evaluations_to_come():
    t = train.TrainConfig(max_iters=10, eval_interval=4)
    assert train.eta_seconds(1, t, 1.0, 100.0) == 9 + 3 * 100  # evaluations at 4, 8 and the final 10
    assert train.eta_seconds(4, t, 1.0, 100.0) == 6 + 3 * 100  # step 4's own evaluation is still to come
    assert train.eta_seconds(5, t, 1.0, 100.0) == 5 + 2 * 100
    assert train.eta_seconds(10, t, 1.0, 100.0) == 0 + 1 * 100
    assert train.eta_seconds(8, train.TrainConfig(max_iters=8, eval_interval=4), 1.0, 10.0) == 10


def test_gpu_peaks_match_whole_names_only():
    assert runtime.gpu_peak_flops("NVIDIA H100 80GB HBM3") == runtime.GPU_PEAK_FLOPS["H100"]
    assert runtime.gpu_peak_flops("NVIDIA H100 PCIe") == runtime.GPU_PEAK_FLOPS["H100 PCIe"]
    assert runtime.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == runtime.GPU_PEAK_FLOPS["A100"]
    assert runtime.gpu_peak_flops("NVIDIA A10G") == runtime.GPU_PEAK_FLOPS["A10G"]
    assert runtime.gpu_peak_flops("NVIDIA L4") == runtime.GPU_PEAK_FLOPS["L4"]
    assert runtime.gpu_peak_flops("NVIDIA L40S") == runtime.GPU_PEAK_FLOPS["L40S"]
    assert runtime.gpu_peak_flops("NVIDIA L40") is None  # not an L4: no figure rather than a wrong one
    assert runtime.gpu_peak_flops("NVIDIA GeForce RTX 4090") == runtime.GPU_PEAK_FLOPS["4090"]


@pytest.mark.parametrize("when", ["during_the_step_before_an_evaluation", "during_the_evaluation"])
def test_a_stop_leaves_no_hole_in_the_evaluation_record(char_data, tmp_path, monkeypatch, when):
    """Ctrl-C in the step that ends on an evaluation, or in the evaluation itself: the run evaluates that step,
    saves once and stops there; resumed, it evaluates every eval_interval steps, each once."""
    import os
    import signal

    real_step, real_evaluate = train.train_step, train.evaluate
    steps, saves = [], []

    def step(*args, **kwargs):
        steps.append(1)
        if when == "during_the_step_before_an_evaluation" and len(steps) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    def evaluate(*args, **kwargs):
        if when == "during_the_evaluation":
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(train, "save_checkpoint", lambda path, state: (saves.append(state["step"]), real_save(path, state)))
    cfg = tiny_config(char_data, tmp_path / "run", train=dict(max_iters=12, eval_interval=4))
    result = train.train(cfg)
    assert result.stopped_by == "SIGINT" and result.step == 4 and saves == [4]  # no step trained after the stop
    monkeypatch.undo()
    train.train(cfg, checkpoint=checkpoint.load_checkpoint(tmp_path / "run"))
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "val_loss" in m] == [4, 8, 12]
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m] == list(range(1, 13))


def test_a_resumed_run_logs_on_into_the_same_wandb_run(char_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(char_data, tmp_path / "run", train=dict(max_iters=2, eval_interval=2), log={"wandb": True})
    train.train(cfg)
    first = checkpoint.load_checkpoint(tmp_path / "run")["wandb_run_id"]
    assert first
    train.train(replace(cfg, train=replace(cfg.train, max_iters=4)), checkpoint=checkpoint.load_checkpoint(tmp_path / "run"))
    assert checkpoint.load_checkpoint(tmp_path / "run")["wandb_run_id"] == first
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # offline-run-DATE_TIME-ID, with -1 added when both started in the same second: `wandb sync` makes them one run
    assert len(runs) == 2 and all(r.name.split("-")[3] == first for r in runs), runs


def test_a_decay_that_ends_inside_warmup_is_refused_and_a_short_run_keeps_its_warmup():
    with pytest.raises(ValueError, match=r"lr_decay_iters \(50\) must be >= warmup_iters \(100\)"):
        train.OptimConfig(warmup_iters=100, lr_decay_iters=50)
    train.OptimConfig(warmup_iters=100, lr_decay_iters=50, schedule="inverse_sqrt")  # it has no decay to end
    cfg = train.Config(optim=train.OptimConfig(warmup_iters=100), train=train.TrainConfig(max_iters=40))
    assert train.fix_schedule(cfg).optim.lr_decay_iters == 100  # max_iters inside warmup: the decay starts after it
    assert train.fix_schedule(replace(cfg, train=replace(cfg.train, max_iters=400))).optim.lr_decay_iters == 400
