"""Training, top to bottom: config sections, runtime setup, batches, the lr schedule, the optimizer,
checkpoints, logging, `train_step` and `train`.

The walk from the command line: `minigpt train CONFIG` -> cli/main.py `train()` builds a `Config`
-> `train(cfg)` below -> `train_step()` -> `loss.backward()`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model import GPT, GPTConfig
from prepare_data import UserError, atomic_write, open_split, read_meta


# ----------------------------------------------------------------------------------------------------
# Config: one frozen dataclass per TOML section; `Config` groups them.


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/shakespeare_char"  # a folder written by `minigpt prepare` (train.bin, val.bin, meta.json)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate; small models tolerate a high one
    min_lr: float = 1e-4  # the cosine ends here: lr / 10, as in Chinchilla
    weight_decay: float = 0.1  # applied to matrices only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.99  # a little higher than GPT-2's 0.95: tiny batches give noisy gradients
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_iters: int = 100  # linear warmup from ~0 to lr over this many steps
    lr_decay_iters: int = 0  # the cosine reaches min_lr here; 0 = at train.max_iters

    def __post_init__(self) -> None:
        if not self.lr > 0:  # also catches NaN
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        for name in ("warmup_iters", "lr_decay_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # sequences per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step: the batch is batch_size * grad_accum sequences
    max_iters: int = 5000  # optimizer steps
    eval_interval: int = 250  # evaluate, checkpoint and maybe replace best.pt every this many steps
    eval_iters: int = 200  # batches averaged per split for an evaluation: enough to see 0.01 differences

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl and config.toml go here
    device: str = "auto"  # auto picks cuda, then mps, then cpu; or cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast dtype; auto: bf16 on GPUs that have it
    compile: bool = False  # torch.compile the model: faster steps after a compile of a minute or so
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass(frozen=True)
class LogConfig:
    interval: int = 10  # steps between progress lines and metrics.jsonl records
    wandb: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "minigpt"
    wandb_run_name: str = ""  # "" = the name of run.out_dir

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")


@dataclass(frozen=True)
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------------------------------
# Runtime: device, autocast dtype, gradient scaler.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --set run.device=cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for, but MPS is not available; use --set run.device=cpu (or auto)")
    return device


def setup_runtime(run: RunConfig) -> Runtime:
    device = resolve_device(run.device)
    if run.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = DTYPES[run.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores: ~8x, 1e-3 relative error
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, dtype)


# ----------------------------------------------------------------------------------------------------
# Batches: random windows of the token file, from a seeded generator whose state goes into checkpoints.


MLM_MASK_RATE = 0.15  # BERT's share of hidden tokens for a bidirectional model


class Batches:
    def __init__(self, data_dir: str | Path, meta: dict, split: str, batch_size: int, model: GPTConfig,
                 device: torch.device, seed: int):
        self.data_dir, self.meta, self.split = Path(data_dir), meta, split
        self.batch_size, self.model, self.device = batch_size, model, device
        self.block_size = block_size = model.block_size
        self.n_tokens = meta[f"{split}_tokens"]
        if self.n_tokens <= block_size:
            raise UserError(
                f"{split} split of {data_dir} has {self.n_tokens} tokens, fewer than block_size + 1 "
                f"({block_size + 1}); use a smaller model.block_size or more data"
            )
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (B, T) int64, y shifted by one; on the device."""
        data = open_split(self.data_dir, self.split, self.meta)  # a fresh memmap each batch: no leak over long runs
        starts = torch.randint(self.n_tokens - self.block_size, (self.batch_size,), generator=self.generator)
        windows = np.stack([data[i:i + self.block_size + 1] for i in starts.tolist()]).astype(np.int64)
        xy = torch.from_numpy(windows)  # (B, T + 1)
        x, y = self.objective(xy[:, :-1], xy[:, 1:])
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (-1 = no target) for the model's attention mask. Causal: the next token.
        Prefix-LM: no targets inside the prefix, where each token sees the one it would predict. Bidirectional:
        every token sees every other, so predict hidden ones instead (BERT's masked LM; always [MASK], no 80/10/10)."""
        if self.model.attn_mask == "prefix":
            return x, y.index_fill(1, torch.arange(self.model.prefix_len - 1), -1)
        if self.model.attn_mask == "bidirectional":
            hidden = torch.rand(x.shape, generator=self.generator) < MLM_MASK_RATE
            hidden[:, 0] |= ~hidden.any(dim=1)  # at least one target per row
            return x.masked_fill(hidden, self.model.mask_token), x.masked_fill(~hidden, -1)
        return x, y

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------
# Learning rate: a pure function of the step, so a resumed run follows the same curve.


def lr_at(step: int, optim: OptimConfig, max_iters: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at lr_decay_iters, then flat."""
    decay_iters = optim.lr_decay_iters or max_iters
    if step < optim.warmup_iters:
        return optim.lr * (step + 1) / (optim.warmup_iters + 1)
    if step >= decay_iters:
        return optim.min_lr
    progress = (step - optim.warmup_iters) / (decay_iters - optim.warmup_iters)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def configure_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embeddings) only: decaying biases and norm gains hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             fused=device.type == "cuda")  # fused: one kernel for all parameters


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written atomically (a temporary file, fsynced, renamed), so a crash never leaves a broken one;
# loaded with weights_only=True, so a crafted file cannot run code.

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def copy_checkpoint(src: Path, dst: Path) -> None:
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train one first with `minigpt train CONFIG`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, or a pickle that weights_only refuses
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or not a minigpt checkpoint ({reason[:200]}); "
                        "use another checkpoint (e.g. best.pt) or train again") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state \
            or not isinstance(state.get("config"), dict):
        raise UserError(f"{path} is not a minigpt checkpoint (version {CHECKPOINT_VERSION}); train again")
    return state


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    # torch.load gives lists where tuples were saved; random.setstate wants its tuples back
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": npst["key"].numpy().astype(np.uint32),
                         "pos": npst["pos"]}, "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Throughput: model FLOPs utilisation against the device's peak.

# Dense peak FLOP/s per GPU, (16-bit, float32 with TF32), from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    "H200": (989e12, 494e12), "H100 PCIe": (756e12, 378e12), "H100": (989e12, 494e12),
    "A100": (312e12, 156e12), "A10G": (70e12, 35e12), "A10": (125e12, 62.5e12), "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12), "4090": (165e12, 82.6e12), "3090": (71e12, 35.6e12), "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def device_peak_flops(rt: Runtime) -> float | None:
    """The device's peak FLOP/s in the run's dtype: from the table on GPUs, measured by a matmul on a CPU."""
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for key, (half, single) in GPU_PEAK_FLOPS.items():  # longest names first where they share a prefix
            if key in name:
                return single if rt.dtype == torch.float32 else half
        return None
    if rt.device.type == "cpu":
        n = 1024
        g = torch.Generator().manual_seed(0)  # a private generator: the run's random stream stays untouched
        a = torch.randn(n, n, generator=g).to(rt.dtype)
        b = torch.randn(n, n, generator=g).to(rt.dtype)
        a @ b  # warm up the kernel and thread pool
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.2:
            a @ b
            reps += 1
        return 2 * n**3 * reps / (time.perf_counter() - t0)
    return None


# ----------------------------------------------------------------------------------------------------
# Logging: a progress line, metrics.jsonl, and wandb when asked.


class Logger:
    def __init__(self, cfg: Config, out_dir: Path):
        self.metrics = open(out_dir / "metrics.jsonl", "a")
        self.wandb = None
        if cfg.log.wandb:
            import wandb  # imported only when used: nothing touches wandb otherwise

            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name or out_dir.name,
                                    config=asdict(cfg), dir=str(out_dir))

    def record(self, step: int, **values) -> None:
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------------------------------
# Signals: the first Ctrl-C / SIGTERM asks the loop to stop after the current step and save; a second
# one exits at once (the last checkpoint on disk stays as it was, since saves are atomic).


class StopFlag:
    def __init__(self):
        self.requested: str | None = None

    def __call__(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: saving a checkpoint after this step (again to quit at once)", flush=True)


@contextmanager
def stop_on_signals():
    flag = StopFlag()
    try:
        previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------
# One optimizer step, and evaluation.


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: Batches, rt: Runtime, lr: float, grad_accum: int, grad_clip: float) -> torch.Tensor:
    """Accumulate gradients over `grad_accum` micro-batches, clip, step. Returns the mean loss (a tensor,
    so the caller decides when to pay for a device sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=rt.device)
    for _ in range(grad_accum):
        x, y = batches.next()
        with rt.autocast():
            _, loss = model(x, y)
        scaler.scale(loss / grad_accum).backward()  # the mean over micro-batches, not the sum
        total += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: Config, meta: dict, rt: Runtime) -> dict[str, float]:
    """Mean loss over eval_iters batches per split. The batches come from a fixed seed, so every
    evaluation of a run (and of runs with the same seed) sees the same windows."""
    model.eval()
    losses = {}
    for i, split in enumerate(("train", "val")):
        batches = Batches(cfg.data.dir, meta, split, cfg.train.batch_size, cfg.model, rt.device,
                          seed=cfg.run.seed + 1 + i)
        total = torch.zeros((), device=rt.device)
        for _ in range(cfg.train.eval_iters):
            x, y = batches.next()
            with rt.autocast():
                total += model(x, y)[1]
        losses[split] = (total / cfg.train.eval_iters).item()
    model.train()
    return losses


# ----------------------------------------------------------------------------------------------------
# The training loop.


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    best_val_loss: float
    last_eval: dict | None  # {"train": ..., "val": ...} of the last evaluation, if any
    stopped_by: str | None  # the signal that stopped the run early, if one did


def resolve_vocab(cfg: Config, meta: dict, data_dir: str) -> Config:
    """Fill model.vocab_size from the data, or check that a given one agrees with it."""
    if cfg.model.vocab_size == 0:
        return replace(cfg, model=replace(cfg.model, vocab_size=meta["vocab_size"]))
    if cfg.model.vocab_size != meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) disagrees with {data_dir}/meta.json "
            f"({meta['vocab_size']}); the data was prepared with another tokenizer: point data.dir at the right "
            "folder or prepare it again"
        )
    return cfg


def train(cfg: Config, checkpoint: dict | None = None, config_text: str | None = None) -> TrainResult:
    """Train from scratch, or continue from `checkpoint` (a dict from load_checkpoint) in cfg.run.out_dir.

    `config_text`, when given, is written to out_dir/config.toml (the resolved config, for people and scripts).
    """
    rt = setup_runtime(cfg.run)
    meta = read_meta(cfg.data.dir)
    cfg = resolve_vocab(cfg, meta, cfg.data.dir)
    out_dir = Path(cfg.run.out_dir)
    if checkpoint is None and (out_dir / "ckpt.pt").exists():
        raise UserError(f"{out_dir} already holds a run; continue it with `minigpt train --resume {out_dir}` "
                        "or choose another --set run.out_dir=...")
    if checkpoint is not None and checkpoint["tokenizer"] != meta["tokenizer"]:
        raise UserError(f"the checkpoint's tokenizer differs from the one in {cfg.data.dir}/meta.json; "
                        "resume with the data the run was trained on (--set data.dir=...)")

    batches = Batches(cfg.data.dir, meta, "train", cfg.train.batch_size, cfg.model, rt.device, seed=cfg.run.seed)
    Batches(cfg.data.dir, meta, "val", 1, cfg.model, rt.device, seed=0)  # val is long enough too
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model).to(rt.device)  # the raw module: the one we save, whatever wraps it below
    optimizer = configure_optimizer(model, cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    step, best_val_loss, tokens_seen = 0, float("inf"), 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise UserError(f"the checkpoint's weights do not fit the configured model ({detail}); "
                            "do not change [model] shapes when resuming") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        batches.load_state_dict(checkpoint["sampler"])
        step, best_val_loss, tokens_seen = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["tokens_seen"]
        set_rng_state(checkpoint["rng"], rt.device)
    step_model = torch.compile(model) if cfg.run.compile else model

    out_dir.mkdir(parents=True, exist_ok=True)
    if config_text is not None:
        (out_dir / "config.toml").write_text(config_text)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    flops_per_step = model.flops_per_token(cfg.model.block_size) * tokens_per_step
    peak = device_peak_flops(rt)
    n_params = model.num_params()
    print(f"model: {n_params / 1e6:.2f}M parameters | {rt.device} {str(rt.dtype).removeprefix('torch.')} | "
          f"{tokens_per_step:,} tokens/step | " + (f"resuming at step {step}" if step else "from scratch"), flush=True)

    def state() -> dict:
        return {
            "version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
            "tokens_seen": tokens_seen, "best_val_loss": best_val_loss, "config": asdict(cfg),
            "tokenizer": meta["tokenizer"], "rng": rng_state(rt.device), "sampler": batches.state_dict(),
        }

    logger = Logger(cfg, out_dir)
    last_eval, stopped_by = None, None
    step_time, windows_logged, window_start, window_steps = 0.0, 0, time.perf_counter(), 0
    try:
        with stop_on_signals() as stop:
            model.train()
            while step < cfg.train.max_iters:
                lr = lr_at(step, cfg.optim, cfg.train.max_iters)
                loss = train_step(step_model, optimizer, scaler, batches, rt, lr, cfg.train.grad_accum,
                                  cfg.optim.grad_clip)
                step += 1
                tokens_seen += tokens_per_step
                window_steps += 1
                if step % cfg.log.interval == 0 or step == cfg.train.max_iters:
                    loss_value = loss.item()  # the one host sync per logging interval
                    now = time.perf_counter()
                    dt = (now - window_start) / window_steps
                    # the first window holds warm-up (and compilation): the second replaces it, then an average
                    step_time = dt if windows_logged < 2 else 0.7 * step_time + 0.3 * dt
                    windows_logged += 1
                    tok_s = tokens_per_step / step_time
                    mfu = flops_per_step / step_time / peak if peak else None
                    eta = format_duration((cfg.train.max_iters - step) * step_time)
                    print(f"step {step:>6}/{cfg.train.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | "
                          f"{tok_s:,.0f} tok/s | " + (f"mfu {100 * mfu:.1f}% | " if mfu else "") + f"eta {eta}",
                          flush=True)
                    aux = {"aux_loss": model.aux_loss().item()} if cfg.model.n_experts else {}  # experts' balance
                    logger.record(step, loss=loss_value, lr=lr, tokens_per_s=tok_s, mfu=mfu, tokens_seen=tokens_seen,
                                  **aux)
                    window_start, window_steps = time.perf_counter(), 0
                if stop.requested:
                    stopped_by = stop.requested
                    break
                if step % cfg.train.eval_interval == 0 or step == cfg.train.max_iters:
                    last_eval = evaluate(step_model, cfg, meta, rt)
                    improved = last_eval["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, last_eval["val"])
                    print(f"eval {step}: train {last_eval['train']:.4f} | val {last_eval['val']:.4f}"
                          + (" | new best" if improved else ""), flush=True)
                    logger.record(step, train_loss=last_eval["train"], val_loss=last_eval["val"],
                                  best_val_loss=best_val_loss)
                    save_checkpoint(out_dir / "ckpt.pt", state())
                    if improved:
                        copy_checkpoint(out_dir / "ckpt.pt", out_dir / "best.pt")
                    window_start, window_steps = time.perf_counter(), 0  # eval time is not training speed
            if stopped_by or step % cfg.train.eval_interval:  # work since the last checkpoint must not be lost
                save_checkpoint(out_dir / "ckpt.pt", state())
    finally:
        logger.close()
    if stopped_by:
        print(f"stopped by {stopped_by} at step {step}; checkpoint saved in {out_dir}/ckpt.pt\n"
              f"resume with: minigpt train --resume {out_dir}", flush=True)
    return TrainResult(step, best_val_loss, last_eval, stopped_by)


if __name__ == "__main__":
    import sys

    from cli.main import app

    app(["train", *sys.argv[1:]], prog_name="train.py")
