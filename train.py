"""Training, top to bottom: config sections, batches, the lr schedule, the optimizer, logging, `train_step`,
`evaluate` and `train`. What the run needs from the machine (device, dtype, processes) is in runtime.py; the
run folder's files (checkpoints, the lock) are in checkpoint.py.

The walk from the command line: `minigpt train CONFIG` -> cli/main.py `train()` builds a `Config`
-> `train(cfg)` below -> `train_step()` -> `loss.backward()`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from batches import BatchSource, batch_source, derived_seed, positions_per_example
from checkpoint import (CHECKPOINT_VERSION, FULL_STATE, copy_checkpoint, keep_last_checkpoints, minigpt_version,
                        new_run_files, remove_run_files, run_lock, save_checkpoint, tidy_run_dir, use_writer,
                        write_config, written_by)
from cli.config_loader import config_to_dict
from dataset_format import check_token_ids, read_meta
from encoder_decoder import CrossAttention, model_flops_per_token
from errors import UserError
from memory import BuildMemoryLog, out_of_memory
from model import Attention, GPTConfig
from pairs import N_SPECIAL, is_pairs, special_tokens
from runtime import Runtime, device_peak_flops, gradient_sync, setup_runtime, valid_device, wrap_for_training
from sharding import build_for_training, load_state, load_weights, shards_model


# ----------------------------------------------------------------------------------------------------
# Config: one frozen dataclass per TOML section; `Config` groups them.


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/shakespeare_char"  # a folder written by `minigpt prepare` (train.bin, val.bin, meta.json); "" in
    # an imported model's run (`minigpt import`), which has none


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate; small models tolerate a high one
    min_lr: float = 1e-4  # the cosine ends here: lr / 10, as in Chinchilla
    weight_decay: float = 0.1  # applied to matrices only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.99  # a little higher than GPT-2's 0.95: tiny batches give noisy gradients
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_iters: int = 100  # linear warmup from ~0 to lr over this many steps
    lr_decay_iters: int = 0  # the cosine reaches min_lr here; 0 = at the train.max_iters the run started with
    # after warmup: cosine to min_lr, or Vaswani 2017's lr · √(warmup / step) (floored at min_lr), with no end
    schedule: Literal["cosine", "inverse_sqrt"] = "cosine"
    # inverse_sqrt only: its last this many steps before lr_decay_iters (none of warmup's) fall linearly to min_lr;
    # 0 = no end
    cooldown_iters: int = 0
    # AdamW for every parameter, or Muon (torch >= 2.9) for the blocks' matrices and AdamW (above) for the rest
    name: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02  # Muon's peak lr (Keller Jordan's default), scaled by the schedule as lr is
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum: Keller Jordan's and torch's default

    def __post_init__(self) -> None:
        if not 0 < self.lr <= 1:  # also catches NaN; AdamW moves each weight by about lr per step
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        for name in ("warmup_iters", "lr_decay_iters", "cooldown_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.muon_lr <= 1:  # also catches NaN
            raise ValueError(f"muon_lr must be in (0, 1], got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.name == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"name = \"muon\" needs torch >= 2.9 (torch.optim.Muon), this is torch {torch.__version__}: "
                             "upgrade torch, or use name = \"adamw\"")
        if self.cooldown_iters and self.schedule != "inverse_sqrt":
            raise ValueError(f"cooldown_iters ends the inverse_sqrt schedule; the {self.schedule} one already ends at "
                             "min_lr: set schedule = \"inverse_sqrt\" or cooldown_iters = 0")
        if self.schedule == "cosine" and 0 < self.lr_decay_iters < self.warmup_iters:  # the cosine would never run
            raise ValueError(f"lr_decay_iters ({self.lr_decay_iters}) must be >= warmup_iters ({self.warmup_iters}): "
                             "the cosine runs from the end of warmup to lr_decay_iters (0 = train.max_iters)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # sequences per micro-step (per process under torchrun)
    grad_accum: int = 1  # micro-steps per optimizer step over all processes: with N processes each runs grad_accum / N
    max_iters: int = 5000  # optimizer steps
    eval_interval: int = 250  # evaluate, checkpoint and maybe replace best.pt every this many steps
    eval_iters: int = 200  # batches averaged per split for an evaluation: enough to see 0.01 differences
    max_bad_steps: int = 10  # steps in a row with a non-finite loss or gradient (each skipped) before the run stops
    # lm: the data's own task (the next token; on pairs, the target); span_corruption: T5's denoising of a token
    # stream, to pre-train an encoder-decoder
    objective: Literal["lm", "span_corruption"] = "lm"
    label_smoothing: float = 0.0  # this share of each target spread over the vocabulary (Vaswani 2017: 0.1)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl and config.toml go here
    device: str = "auto"  # auto picks cuda, then mps, then cpu; or cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast dtype; auto: bf16 on GPUs that have it
    compile: bool = False  # torch.compile the model: faster steps after a compile of a minute or so
    seed: int = 1337  # 0 <= seed < 2**64
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate the model (DDP) or shard it (FSDP2)
    keep_last: int = 0  # also keep the last N evaluation checkpoints as step-NNNNNNN.pt; 0 = ckpt.pt and best.pt only

    def __post_init__(self) -> None:
        if not valid_device(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {self.keep_last}")
        if not 0 <= self.seed < 2**64:  # what numpy's SeedSequence and torch's generators take
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if not self.out_dir.strip():
            raise ValueError("out_dir must name a folder (it is empty); e.g. --set run.out_dir=out/my_run")


@dataclass(frozen=True)
class LogConfig:
    interval: int = 10  # steps between progress lines and metrics.jsonl records
    wandb: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "minigpt"
    wandb_run_name: str = ""  # "" = the name of run.out_dir
    plot: bool = True  # draw loss.png into run.out_dir when the run ends: a look at the run costs nothing to ask for

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")


@dataclass(frozen=True)
class InitConfig:
    # "" = the model's own random initialisation; a minigpt run (folder or .pt) or a Hugging Face model folder or hub
    # id = fine-tuning: that model's weights and [model] config (dropout, grad_checkpointing and a smaller block_size
    # stay the config's), with a fresh optimizer and schedule. In TOML `from` (a Python keyword: see toml_key)
    from_: str = ""


@dataclass(frozen=True)
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step, over all micro-steps and processes."""
        return self.train.batch_size * self.train.grad_accum * self.model.block_size


# ----------------------------------------------------------------------------------------------------
# Randomness as a function of the step: micro-batch i of step s is drawn from a generator seeded with (seed, s, i)
# alone (batches.py), and process r's dropout masks in step s from (seed, s, r), so a resumed run, or one spread over
# any number of processes, sees exactly the same data, and continues every process's dropout stream: no generator
# state is saved.


def seed_step(seed: int, step: int, rank: int, device: torch.device) -> None:
    """Reseed the global generator, which dropout draws from, for step `step` of process `rank`."""
    s = derived_seed(seed, step, rank, 1)  # the 4th key: never a batch's (seed, step, micro)
    if device.type == "cpu":  # torch.manual_seed visits every backend: 75 µs, 0.5% of a small CPU step
        torch.default_generator.manual_seed(s)
    else:
        torch.manual_seed(s)


# ----------------------------------------------------------------------------------------------------
# Learning rate: a pure function of the step, so a resumed run follows the same curve.


def fix_schedule(cfg: Config) -> Config:
    """The config with its schedule fixed for good: lr_decay_iters = 0 becomes the train.max_iters the run starts with
    (warmup_iters if that is longer). A new run stores this in its checkpoint, so training it longer (more max_iters)
    goes on at min_lr rather than up a re-stretched cosine."""
    if cfg.optim.lr_decay_iters:
        return cfg
    return replace(cfg, optim=replace(cfg.optim, lr_decay_iters=max(cfg.train.max_iters, cfg.optim.warmup_iters)))


def lr_at(step: int, optim: OptimConfig, max_iters: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at lr_decay_iters, then flat; or with the
    inverse_sqrt schedule, lr · √(warmup / step) after warmup (Vaswani 2017), never below min_lr, and with
    cooldown_iters a linear fall from there to min_lr over the last cooldown_iters steps before lr_decay_iters
    (fewer if warmup would still be running), then flat."""
    decay_iters = optim.lr_decay_iters or max_iters
    if step < optim.warmup_iters:
        return optim.lr * (step + 1) / (optim.warmup_iters + 1)
    if optim.schedule == "inverse_sqrt":
        # an inverse square root anneals early but never ends; a run that must also end low cools down
        start = max(optim.warmup_iters, decay_iters - optim.cooldown_iters) if optim.cooldown_iters else math.inf
        lr = max(optim.min_lr, optim.lr * math.sqrt((optim.warmup_iters + 1) / (min(step, start) + 1)))
        if step < start:  # equal to lr at the end of warmup, then 1/√step
            return lr
        if step >= decay_iters:
            return optim.min_lr
        return optim.min_lr + (lr - optim.min_lr) * (decay_iters - step) / (decay_iters - start)
    if step >= decay_iters:
        return optim.min_lr
    progress = (step - optim.warmup_iters) / (decay_iters - optim.warmup_iters)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def configure_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (linear weights, embeddings) only: decaying biases and norm gains hurts.
    With optim.name = "muon", Muon takes the blocks' matrices (muon_params) and AdamW the rest, as one optimizer."""
    muon = muon_params(model) if optim.name == "muon" else {}
    in_muon = {id(p) for params in muon.values() for p in params}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in in_muon]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                              fused=device.type in ("cuda", "cpu"))  # fused: one kernel for all parameters
    if optim.name == "adamw":
        return adamw
    from torch.distributed.tensor import DTensor

    from optimizers import BlockMuon, MuonWithAdamW  # here: it subclasses torch.optim.Muon, new in torch 2.9

    if any(isinstance(p, DTensor) for params in muon.values() for p in params):
        raise UserError('optim.name = "muon" does not run under run.distributed = "fsdp" (Muon orthogonalises each '
                        'matrix whole, FSDP shards them): use run.distributed = "ddp", or optim.name = "adamw"')
    # lr_scale: train_step sets each group's lr to the schedule's times this, so Muon follows the same warmup and
    # decay from muon_lr. Its weight decay (torch's: w -= lr · wd · w) is scaled back by the same ratio, so every
    # matrix shrinks by the same lr · weight_decay per step under either optimizer.
    scale = optim.muon_lr / optim.lr
    muon_groups = [{"params": params, "row_blocks": list(rows), "lr_scale": scale}
                   for rows, params in muon.items() if params]
    return MuonWithAdamW(adamw, BlockMuon(muon_groups, lr=optim.muon_lr, weight_decay=optim.weight_decay / scale,
                                          momentum=optim.muon_momentum))


def muon_params(model: torch.nn.Module) -> dict[tuple[int, ...], list[torch.nn.Parameter]]:
    """The matrices Muon trains, by how their rows split into separately orthogonalised blocks (() = whole): every
    2-D weight inside the blocks (an encoder-decoder's encoder too): attention, cross-attention, MLPs, experts.
    Not the embeddings, the output layer (tied or not), norms, biases, nor the experts' router, an E x C classifier
    that scores experts as the output layer scores tokens (and with E of 2-8 rows, hardly a hidden matrix)."""
    cfg = model.config
    nh, kvh, hs = cfg.n_head, cfg.kv_heads, cfg.head_size
    fused = {}  # the fused projections: q, k, v (self-attention) and k, v (cross-attention) rows apart
    for module in model.modules():
        if isinstance(module, Attention):
            fused[id(module.c_attn.weight)] = (nh * hs, kvh * hs, kvh * hs)
        elif isinstance(module, CrossAttention):
            fused[id(module.c_kv.weight)] = (kvh * hs, kvh * hs)
    groups: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
    for stack in ("encoder", "blocks"):
        for name, p in getattr(model, stack, torch.nn.ModuleList()).named_parameters():
            if p.requires_grad and p.dim() == 2 and not name.endswith("mlp.router.weight"):
                groups.setdefault(fused.get(id(p), ()), []).append(p)
    return groups


# ----------------------------------------------------------------------------------------------------
# Logging: a progress line, metrics.jsonl, and wandb when asked.


class Logger:
    """metrics.jsonl, and a W&B run when asked: a resumed run passes the id its checkpoint kept, and logs on into
    the same W&B run rather than starting another."""

    def __init__(self, cfg: Config, out_dir: Path, wandb_run_id: str | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.metrics = open(self.path, "a")
        self.wandb = None
        if cfg.log.wandb:
            import wandb  # imported only when used: nothing touches wandb otherwise

            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name or out_dir.name,
                                    config=config_to_dict(cfg), dir=str(out_dir), id=wandb_run_id,
                                    resume="allow" if wandb_run_id else None)

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def record(self, step: int, **values) -> None:
        try:
            self.metrics.write(json.dumps({"step": step, **values}) + "\n")
            self.metrics.flush()
        except OSError as e:  # a full disk: the run stops; the checkpoint on disk is whole (saves are atomic)
            raise UserError(f"could not write {self.path} ({e.strerror or e}) at step {step}; the last checkpoint "
                            "is intact: free some space and resume") from None
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        try:
            self.metrics.close()
        except OSError:  # the flush of a line that a full disk refused, already reported by record()
            pass
        if self.wandb is not None:
            self.wandb.finish()


def eta_seconds(step: int, train: TrainConfig, step_time: float, eval_time: float) -> float:
    """Time left at a progress line for `step` (its evaluation, if it has one, still to come): the steps after it,
    and the evaluations from it on (each as long as the last one)."""
    evals = train.max_iters // train.eval_interval - (step - 1) // train.eval_interval
    evals += train.max_iters % train.eval_interval != 0  # the final step evaluates too
    return (train.max_iters - step) * step_time + evals * eval_time


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
        print(f"\n{self.requested} received: saving a checkpoint after this step and its evaluation, if one is due "
              "(again to quit at once)", flush=True)


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


def forward(model: torch.nn.Module, x: torch.Tensor | dict, y: torch.Tensor,
            label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and loss of a batch: x is a token stream's ids, or the keyword inputs of pairs (batches.py)."""
    if isinstance(x, dict):
        return model(**x, targets=y, label_smoothing=label_smoothing)
    return model(x, y, label_smoothing=label_smoothing)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: BatchSource, step: int, rt: Runtime, lr: float, micro_steps: int,
               grad_clip: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this process's `micro_steps` micro-batches of step `step`.

    Gradients accumulate locally and are synchronised across processes on the last micro-step only; they are
    clipped after that reduction. Returns the loss and the cross-entropy without label smoothing (the loss itself
    when there is none: no second pass over the logits), averaged over all processes, and whether the step was skipped because the loss or
    the gradient norm was not finite (every process decides alike: the gradients and the averaged loss are the
    same everywhere)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups: muon_lr / lr, the same schedule
    total = torch.zeros(2, device=rt.device)  # loss, nll
    first = rt.rank * micro_steps  # this process's share of the step's micro-batches
    for i in range(micro_steps):
        x, y = batches.get(step, first + i)
        with gradient_sync(model, enabled=i == micro_steps - 1), rt.autocast():
            logits, loss = forward(model, x, y, label_smoothing)
            scaler.scale(loss / micro_steps).backward()  # the mean over micro-batches, not the sum
        with torch.no_grad():
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1) if label_smoothing \
                else loss
        total += torch.stack([loss.detach(), nll.detach()]).float()
        # the next micro-batch (or the next step's first), built while the device computes this one
        batches.prefetch(*((step, first + i + 1) if i + 1 < micro_steps else (step + 1, first)))
    loss, nll = rt.sum(total) / (micro_steps * rt.world_size)
    scaler.unscale_(optimizer)  # check and clip the true gradients, not the float16-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    # float16's scaler skips overflowing steps by itself (and lowers its scale); only a bad loss counts there
    checks = loss if scaler.is_enabled() else torch.stack([loss, norm.to(loss.device).float()])
    bad = not bool(torch.isfinite(checks).all())  # one host sync per step
    if bad and not scaler.is_enabled():
        optimizer.zero_grad(set_to_none=True)  # skip: the weights stay as they were
        return loss, nll, True
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, nll, bad


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: Config, meta: dict, rt: Runtime) -> dict[str, float]:
    """Mean plain cross-entropy (no label smoothing) over eval_iters batches per split, shared out among the
    processes. The batches come from a fixed seed, so every evaluation of a run (and of runs with the same seed)
    sees the same windows."""
    model.eval()
    losses = {}
    for i, split in enumerate(("train", "val")):
        batches = batch_source(cfg.data.dir, meta, split, cfg.train.batch_size, cfg.model, cfg.train.objective,
                               rt.device, seed=cfg.run.seed + 1 + i)
        total = torch.zeros((), device=rt.device)
        rounds = -(-cfg.train.eval_iters // rt.world_size)  # every process runs as many forward passes:
        for j in range(rt.rank, rounds * rt.world_size, rt.world_size):  # FSDP gathers weights collectively
            x, y = batches.get(min(j, cfg.train.eval_iters - 1))
            with rt.autocast():
                loss = forward(model, x, y)[1].float()
            if j < cfg.train.eval_iters:  # a padding pass counts for nothing
                total += loss
        losses[split] = (rt.sum(total) / cfg.train.eval_iters).item()
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
    world_size: int  # processes that ran it (torchrun)


def resolve_vocab(cfg: Config, meta: dict, data_dir: str) -> Config:
    """Fill model.vocab_size from the data, or check that a given one agrees with it. Span corruption adds the
    special ids (the sentinels, the end) past a token stream's vocabulary, as a pairs dataset has them already."""
    vocab = meta["vocab_size"] + (N_SPECIAL if cfg.train.objective == "span_corruption" and not is_pairs(meta) else 0)
    if cfg.model.vocab_size == 0:
        return replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    # a pretrained model's vocabulary may have rows its tokenizer never produces (init.from: its tokenizer is checked)
    if cfg.model.vocab_size != vocab and not (cfg.init.from_ and cfg.model.vocab_size > vocab):
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) disagrees with {data_dir}/meta.json "
            f"({vocab}); the data was prepared with another tokenizer: point data.dir at the right "
            "folder or prepare it again"
        )
    return cfg


def data_info(cfg: Config, meta: dict) -> dict:
    """What sampling needs to know of the data a run trained on (kept in its checkpoints): a pairs run decodes a
    target for a source with these special ids, as does an encoder-decoder pre-trained with span corruption."""
    if is_pairs(meta):
        return {"kind": "pairs", "special_tokens": meta["special_tokens"], "task": meta.get("task")}
    if cfg.train.objective == "span_corruption":
        return {"kind": "tokens", "special_tokens": special_tokens(meta["vocab_size"]).to_dict(), "task": None}
    return {"kind": "tokens", "special_tokens": None, "task": None}


def with_vocab(cfg: Config) -> tuple[Config, str | None]:
    """For looking at a config before (or without) training it: model.vocab_size from the prepared data when
    there is some, else GPT-2's padded 50,304. Returns the config and a note when the data was not there."""
    if cfg.data.dir and (Path(cfg.data.dir) / "meta.json").exists():
        return resolve_vocab(cfg, read_meta(cfg.data.dir), cfg.data.dir), None
    note = (f"{cfg.data.dir}/meta.json does not exist (yet): no data to read" if cfg.data.dir else
            "data.dir is empty (an imported model): no data to read")
    if cfg.model.vocab_size:
        return cfg, note
    return replace(cfg, model=replace(cfg.model, vocab_size=50304)), note + "; assuming GPT-2's vocabulary (50,304 padded)"


def step_cost(cfg: Config, meta: dict | None, model: torch.nn.Module) -> tuple[int, float]:
    """Tokens and training FLOPs of one optimizer step: a token stream (or no data: random tokens) fills block_size;
    pairs count the positions their examples take on average, not the padding to a batch's longest."""
    seq_len, source_len = (positions_per_example(meta, cfg.model, cfg.train.objective) if meta is not None
                           else (float(cfg.model.block_size), 0.0))
    positions = cfg.train.batch_size * cfg.train.grad_accum * seq_len  # over all micro-steps and processes
    return round(positions), model_flops_per_token(model, seq_len, source_len) * positions


def micro_steps_per_process(cfg: Config, rt: Runtime) -> int:
    if cfg.train.grad_accum % rt.world_size:
        raise UserError(f"train.grad_accum ({cfg.train.grad_accum}) must be a multiple of the number of processes "
                        f"({rt.world_size}): it counts the micro-steps of one optimizer step over all of them")
    return cfg.train.grad_accum // rt.world_size


def train(cfg: Config, checkpoint: dict | None = None, config_text: str | None = None) -> TrainResult:
    """Train from scratch, or continue from `checkpoint` (a dict from load_checkpoint) in cfg.run.out_dir; once its
    weights and moments are loaded, the dict lets go of them (they are memory-mapped from the checkpoint's file).

    `config_text`, when given, is written to out_dir/config.toml (the resolved config, for people and scripts).
    Under torchrun every process runs this; only the first logs and writes files.
    """
    notes = []
    if checkpoint is None:
        cfg, notes = finetune_config(cfg)  # init.from's model: the runtime's dtype depends on it
    rt = setup_runtime(cfg.run, cfg.model)
    try:
        result = _train(cfg, rt, checkpoint, config_text, notes)
        if rt.world_size > 1:  # rank 0 writes the last checkpoint alone: a peer tearing the group down meanwhile
            dist.barrier()  # made gloo abort the process now and then
        return result
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        saved = (Path(cfg.run.out_dir) / "ckpt.pt").exists()
        raise UserError(f"out of memory on {rt.device} ({out_of_memory(e)}): train.batch_size {cfg.train.batch_size} "
                        f"x model.block_size {cfg.model.block_size} does not fit; lower train.batch_size (raising "
                        "train.grad_accum keeps the batch) or model.block_size" +
                        (f"; the last checkpoint in {cfg.run.out_dir} is intact" if saved else "; nothing was saved")) from None
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def finetune_config(cfg: Config) -> tuple[Config, list[str]]:
    """With init.from, the config of the model it names and notes on the [model] keys that do not apply (see
    interop.convert.finetune_model_config); else cfg as it is."""
    if not cfg.init.from_:
        return cfg, []
    from interop.convert import finetune_model_config

    model, notes = finetune_model_config(cfg.init.from_, cfg.model)
    return replace(cfg, model=model), notes


def _train(cfg: Config, rt: Runtime, checkpoint: dict | None, config_text: str | None,
           notes: list[str] = ()) -> TrainResult:
    meta = read_meta(cfg.data.dir)
    if checkpoint is None and cfg.init.from_:
        from interop.convert import check_finetune_data

        check_finetune_data(cfg.init.from_, meta["tokenizer"], cfg.data.dir)
    if rt.is_main:  # once the data is known to fit: a refused run says one line
        for note in notes:
            print(note, file=sys.stderr, flush=True)
    cfg = resolve_vocab(cfg, meta, cfg.data.dir)
    if checkpoint is None:
        cfg = fix_schedule(cfg)
    out_dir = Path(cfg.run.out_dir)
    if checkpoint is None and (out_dir / "ckpt.pt").exists():
        raise UserError(f"{out_dir} already holds a run; continue it with `minigpt train --resume {out_dir}` "
                        "or choose another --set run.out_dir=...")
    trained_with = (checkpoint["config"].get("optim") or {}).get("name", "adamw") if checkpoint is not None else None
    if trained_with is not None and trained_with != cfg.optim.name:  # the moments of one are no state of the other
        raise UserError(f'the run was trained with optim.name = "{trained_with}": resume it with the same optimizer '
                        "(drop --set optim.name)")
    if checkpoint is not None and checkpoint["tokenizer"] != meta["tokenizer"]:
        raise UserError(f"the checkpoint's tokenizer differs from the one in {cfg.data.dir}/meta.json; "
                        "resume with the data the run was trained on (--set data.dir=...)")
    micro_steps = micro_steps_per_process(cfg, rt)
    batches = batch_source(cfg.data.dir, meta, "train", cfg.train.batch_size, cfg.model, cfg.train.objective,
                           rt.device, seed=cfg.run.seed)
    batch_source(cfg.data.dir, meta, "val", 1, cfg.model, cfg.train.objective, rt.device, seed=0)  # val fits too
    if not is_pairs(meta):  # pairs: PairBatches read each split whole and check every id as they open it (above)
        for split in ("train", "val"):
            check_token_ids(cfg.data.dir, split, meta)

    memory_log = BuildMemoryLog(rt)  # what the build and the checkpoint take: for tests, off unless asked for
    torch.manual_seed(cfg.run.seed)  # the same initial weights in every process
    # the raw module: the one we save, whatever wraps it below (under FSDP, sharded: no process holds it whole)
    model = build_for_training(cfg, rt, new_run=checkpoint is None)
    if checkpoint is None and cfg.init.from_:  # fine-tuning: the pretrained weights, a fresh optimizer
        from interop.convert import pretrained_weights

        sharded = shards_model(cfg, rt)
        weights = pretrained_weights(cfg.init.from_, cfg.model) if rt.is_main or not sharded else None
        try:
            load_weights(model, weights, rt, sharded)
        except ValueError as e:
            raise UserError(f"init.from {cfg.init.from_}'s weights do not fit its own config ({e})") from None
        del weights
    optimizer = configure_optimizer(model, cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    step, best_val_loss, tokens_seen = 0, float("inf"), 0
    if checkpoint is not None:
        try:
            load_state(model, optimizer, checkpoint, rt, sharded=shards_model(cfg, rt))
        except (RuntimeError, KeyError, ValueError) as e:
            detail = " ".join(str(e).split())[:300]
            fix = ("do not change [model] shapes when resuming" if written_by(checkpoint) == f"minigpt {minigpt_version()}"
                   else f"it was written by {written_by(checkpoint)}: {use_writer(checkpoint, 'resume')}")
            raise UserError(f"the checkpoint's weights do not fit the configured model ({detail}); {fix}") from None
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        step, best_val_loss, tokens_seen = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["tokens_seen"]
        checkpoint["model"] = checkpoint["optimizer"] = None  # loaded: the run lets go of the file (memory-mapped)
    memory_log.done(model)
    step_model = wrap_for_training(model, cfg, rt)

    tokens_per_step, flops_per_step = step_cost(cfg, meta, model)
    peak = device_peak_flops(rt)
    peak = peak * rt.world_size if peak else None
    if rt.is_main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters | {rt.world_size} x {rt.device} "
              f"{str(rt.dtype).removeprefix('torch.')} | {tokens_per_step:,} tokens/step | "
              + (f"resuming at step {step}" if step else f"fine-tuning {cfg.init.from_}" if cfg.init.from_ else
                 "from scratch"), flush=True)
        if step >= cfg.train.max_iters:
            print(f"the run has already trained its train.max_iters = {cfg.train.max_iters} steps: nothing to do; to "
                  f"train it longer, --set train.max_iters={2 * cfg.train.max_iters} (for example)", flush=True)

    def state() -> dict | None:
        """The checkpoint; under FSDP every process must call this (the weights are gathered), rank 0 gets it."""
        weights = get_model_state_dict(model, options=FULL_STATE)
        moments = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
        if not rt.is_main:
            return None
        finite = all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
        if not finite or (last_eval and not all(math.isfinite(v) for v in last_eval.values())):
            raise UserError(f"the {'weights' if not finite else 'evaluation loss'} became non-finite by step {step} "
                            f"(is optim.lr too high?); nothing was saved over {out_dir}/ckpt.pt: "
                            + ("resume it" if saved_at is not None else "train again") + " with a lower optim.lr")
        return {
            "version": CHECKPOINT_VERSION, "model": weights, "optimizer": moments,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
            "tokens_seen": tokens_seen, "best_val_loss": best_val_loss, "config": config_to_dict(cfg),
            "tokenizer": meta["tokenizer"], "data": data_info(cfg, meta),
            "sampler": {"seed": cfg.run.seed, "step": step},  # batches are a pure function of (seed, step)
            "wandb_run_id": wandb_run_id, "elapsed_s": elapsed_s(),
        }

    def save(improved: bool = False, evaluated: bool = False) -> None:
        snapshot = state()
        if not rt.is_main:
            return
        try:
            save_checkpoint(out_dir / "ckpt.pt", snapshot)
            if improved:
                copy_checkpoint(out_dir / "ckpt.pt", out_dir / "best.pt")
            if evaluated:
                keep_last_checkpoints(out_dir, step, cfg.run.keep_last)
        except (OSError, RuntimeError) as e:
            # torch.save's zip writer meets a full disk as an OSError, then raises a RuntimeError ("unexpected pos")
            # while closing: that OSError is its context
            error = e if isinstance(e, OSError) else e.__context__
            if not isinstance(error, OSError):
                raise
            fix = ("the previous checkpoint is intact: free some space (or fix the permissions) and resume"
                   if saved_at is not None else "nothing was saved: free some space (or fix the permissions) and "
                   "train again")
            raise UserError(f"could not save a checkpoint in {out_dir} ({error.strerror or error}); {fix}") from None

    last_eval, stopped_by, bad_in_a_row, skipped = None, None, 0, 0
    wandb_run_id = checkpoint.get("wandb_run_id") if checkpoint is not None else None  # W&B's run, resumed with it
    elapsed_before = checkpoint.get("elapsed_s", 0.0) if checkpoint is not None else 0.0  # earlier processes' elapsed_s
    paused_s = 0.0  # this process's evaluations and their checkpoints: time to a loss should not pay for measuring it

    def elapsed_s() -> float:
        """Training wall time, evaluations and their checkpoints left out, summed across resumes."""
        return elapsed_before + time.perf_counter() - loop_start - paused_s

    @contextmanager
    def not_training():
        nonlocal paused_s
        start = time.perf_counter()
        try:
            yield
        finally:
            paused_s += time.perf_counter() - start

    saved_at = step if checkpoint is not None else None  # the step the checkpoint on disk holds
    eval_time = 0.0  # seconds the last evaluation took: the ETA counts the evaluations still to come
    step_time, windows_logged, window_start, window_steps = 0.0, 0, time.perf_counter(), 0
    with ExitStack() as cleanup:
        logger = None  # the lock, the log and the files belong to the first process
        if rt.is_main:
            new_files = new_run_files(out_dir)
            # runs last: a run that ends (an error, a full disk, out of memory) before it ever saved leaves nothing
            cleanup.callback(lambda: saved_at is None and remove_run_files(new_files))
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                cleanup.enter_context(run_lock(out_dir))
                tidy_run_dir(out_dir, step)
                if config_text is not None:
                    write_config(out_dir, config_text)
            except OSError as e:
                fix = ("a resumed run continues in its own folder: make it writable (or free some space), or copy it "
                       "somewhere writable and resume the copy" if checkpoint is not None
                       else "free some space, or choose another --set run.out_dir=...")
                raise UserError(f"cannot write to {out_dir} ({e.strerror or e}); {fix}") from None
            logger = Logger(cfg, out_dir, wandb_run_id)
            wandb_run_id = logger.wandb_run_id or wandb_run_id
            cleanup.callback(logger.close)
        stop = cleanup.enter_context(stop_on_signals())
        model.train()
        loop_start = time.perf_counter()
        while step < cfg.train.max_iters:
            lr = lr_at(step, cfg.optim, cfg.train.max_iters)
            seed_step(cfg.run.seed, step, rt.rank, rt.device)  # each process its own dropout masks, the same after a resume
            loss, nll, bad = train_step(step_model, optimizer, scaler, batches, step, rt, lr, micro_steps,
                                        cfg.optim.grad_clip, cfg.train.label_smoothing)
            step += 1  # a skipped step still uses up its batches and its place in the schedule
            tokens_seen += tokens_per_step
            window_steps += 1
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            skipped += bad
            if bad and rt.is_main:
                print(f"step {step}: non-finite loss or gradient ({loss.item():.4g}); step skipped "
                      f"({bad_in_a_row} in a row)", flush=True)
            if bad_in_a_row >= cfg.train.max_bad_steps:  # the weights were never updated with them: no save needed
                raise UserError(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; stopped at step {step}. "
                    + (f"The last good checkpoint is {out_dir}/ckpt.pt: resume it" if saved_at is not None
                       else "Nothing was saved: train again") + " with a lower optim.lr, or run.dtype=bfloat16 "
                    "instead of float16")
            if step % cfg.log.interval == 0 or step == cfg.train.max_iters:
                loss_value = loss.item()
                now = time.perf_counter()
                dt = (now - window_start) / window_steps
                # the first window holds warm-up (and compilation): the second replaces it, then an average
                step_time = dt if windows_logged < 2 else 0.7 * step_time + 0.3 * dt
                windows_logged += 1
                tok_s = tokens_per_step / step_time
                mfu = flops_per_step / step_time / peak if peak else None
                eta = format_duration(eta_seconds(step, cfg.train, step_time, eval_time))
                if rt.is_main:
                    print(f"step {step:>6}/{cfg.train.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | "
                          f"{tok_s:,.0f} tok/s | " + (f"mfu {100 * mfu:.1f}% | " if mfu else "") + f"eta {eta}",
                          flush=True)
                    extra = {"aux_loss": model.aux_loss().item()} if cfg.model.n_experts else {}  # experts' balance
                    logger.record(step, loss=loss_value, nll=nll.item(), lr=lr, tokens_per_s=tok_s, mfu=mfu,
                                  tokens_seen=tokens_seen, skipped_steps=skipped,
                                  elapsed_s=elapsed_s(), **extra)
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg.train.eval_interval == 0 or step == cfg.train.max_iters:
                with not_training():
                    eval_start = time.perf_counter()
                    last_eval = evaluate(step_model, cfg, meta, rt)
                    eval_time = time.perf_counter() - eval_start
                    improved = last_eval["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, last_eval["val"])
                    if rt.is_main:
                        print(f"eval {step}: train {last_eval['train']:.4f} | val {last_eval['val']:.4f}"
                              + (" | new best" if improved else ""), flush=True)
                        logger.record(step, train_loss=last_eval["train"], val_loss=last_eval["val"],
                                      best_val_loss=best_val_loss)
                with not_training():  # a block of its own: the checkpoint's elapsed_s leaves this evaluation out
                    save(improved=improved, evaluated=True)
                saved_at = step
                window_start, window_steps = time.perf_counter(), 0  # eval time is not training speed
            # after the step's evaluation, if it has one: a stop asked for during that step or during the evaluation
            # leaves no hole in the evaluation record (nor trains a step more)
            if rt.any(stop.requested is not None):  # every process stops at the same step
                stopped_by = stop.requested or "a signal to another process"
                break
        if step != saved_at:  # work since the last checkpoint must not be lost
            save()
            saved_at = step
    if stopped_by and rt.is_main:
        print(f"stopped by {stopped_by} at step {step}; checkpoint saved in {out_dir}/ckpt.pt\n"
              f"resume with: minigpt train --resume {out_dir}", flush=True)
    if cfg.log.plot and rt.is_main:  # a picture of the run; never a reason for the run to fail
        try:
            from plots import plot_runs  # matplotlib is imported here only

            plot_runs([out_dir], out_dir / "loss.png")
        except (Exception, KeyboardInterrupt) as e:  # a second Ctrl-C while drawing: the run is saved, just end
            print(f"note: no {out_dir}/loss.png ({type(e).__name__}: {e}); the run itself is saved", flush=True)
    return TrainResult(step, best_val_loss, last_eval, stopped_by, rt.world_size)


if __name__ == "__main__":
    from cli.main import app

    app(["train", *sys.argv[1:]], prog_name="train.py")
