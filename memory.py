"""Memory: what a training process needs at least (its weights, gradients and AdamW state, and one micro-batch's
activations), what the device has free, and, for the tests, what building the model took.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor

import inspection
from errors import UserError
from inspection import DTYPE_BYTES
from model import GPTConfig
from runtime import DTYPES, Runtime

if TYPE_CHECKING:
    from train import Config


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device: the GPU's, or a CPU's MemAvailable (its host's, shared by its processes)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and Path("/proc/meminfo").exists():
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(meminfo.get("MemAvailable", "0 kB").split()[0]) * 1024 or None
    return None


def training_memory(cfg: Config, rt: Runtime, n_params: int) -> tuple[int, int]:
    """Lower bounds on what one training process keeps, in bytes: (its float32 weights, gradients and AdamW's two
    moments, 16 bytes for each of the `n_params` parameters it holds: its shards' under FSDP; the activations of
    one micro-batch of train.batch_size, inspection.py's estimate in the run's dtype).

    The estimate counts each layer's attention scores (T x T), which only the written-out attention keeps (a CPU
    training with dropout or in 16 bits, see model.sdpa_is_slow); where SDPA's fused kernels may run instead they
    are left out, so that the bound holds. Nothing else is added: the float32 logits are among the activations,
    and FSDP's gathered layers, DDP's buckets and the allocator's slack come on top."""
    dtype = {v: k for k, v in DTYPES.items()}[rt.dtype]
    m, batch = cfg.model, cfg.train.batch_size
    estimate = (inspection.encoder_decoder_activation_bytes if m.arch == "encoder_decoder"
                else inspection.activation_bytes)(m, batch, dtype)
    activations = estimate["bytes_with_checkpointing" if m.grad_checkpointing else "bytes"]
    if not (rt.device.type == "cpu" and (m.dropout > 0 or rt.dtype != torch.float32)):
        activations -= attention_scores_bytes(m, batch, dtype)
    return 16 * n_params, activations


def attention_scores_bytes(cfg: GPTConfig, batch_size: int, dtype: str) -> int:
    """The attention scores (and with dropout their mask and dropped copy) among inspection.py's activations: nh
    scores per query and key, per layer kept (one layer's, the larger stack's, with gradient checkpointing)."""
    dropout = cfg.dropout > 0
    per_score = DTYPE_BYTES[dtype] * (2 if dropout else 1) + dropout  # as layer_activation_bytes counts them

    def scores(queries: int, keys: int) -> int:
        return batch_size * cfg.n_head * queries * keys * per_score

    T = cfg.block_size
    if cfg.arch != "encoder_decoder":
        return scores(T, T) * (1 if cfg.grad_checkpointing else cfg.n_layer)
    S = cfg.source_size
    encoder, decoder = scores(S, S), scores(T, T) + scores(T, S)  # a decoder layer also cross-attends
    if cfg.grad_checkpointing:
        return max(encoder, decoder)
    return cfg.encoder_layers * encoder + cfg.n_layer * decoder


def process_status() -> dict[str, int]:
    """This process's memory counters from /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile), in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class BuildMemoryLog:
    """With MINIGPT_BUILD_MEMORY_LOG=DIR (tests; off otherwise), what building the model and loading a checkpoint
    took in this process: its resident memory at the start, the peak over the span (Linux's high-water mark,
    reset at the start) and at the end, and the bytes of the parameters it holds, as DIR/build-rank<N>.json."""

    VARIABLE = "MINIGPT_BUILD_MEMORY_LOG"

    def __init__(self, rt: Runtime):
        self.folder, self.rt, self.start = os.environ.get(self.VARIABLE), rt, None
        if self.folder:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
            except OSError:  # not Linux: nothing is written, and the tests that read it skip
                return
            self.start = process_status()

    def done(self, model: torch.nn.Module) -> None:
        if self.start is None:
            return
        import json

        end = process_status()
        params = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
        record = {"rank": self.rt.rank, "world_size": self.rt.world_size, "param_bytes": params,
                  "rss_start": self.start["VmRSS"], "rss_end": end["VmRSS"], "peak": end["VmHWM"],
                  "file_start": self.start["RssFile"], "file_end": end["RssFile"]}
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"build-rank{self.rt.rank}.json").write_text(json.dumps(record))


def check_memory(cfg: Config, rt: Runtime, n_params: int) -> None:
    """Refuse a run that surely cannot fit: one process holding `n_params` parameters (its shards' under FSDP)
    needs at least their weights, gradients and AdamW state and one micro-batch's activations
    (training_memory); the processes on one CPU share its memory."""
    available = free_memory(rt.device)
    if not available:
        return
    state, activations = training_memory(cfg, rt, n_params)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if rt.device.type == "cpu" else 1
    needed = processes * (state + activations)
    if needed <= available:
        return

    def gib(n: int) -> str:
        return f"{n / 2**30:.1f} GiB"

    if processes * state >= available:  # no batch fits: fewer weights per process
        fix = ("shard the weights over more GPUs (torchrun with run.distributed = \"fsdp\") or train a smaller model"
               if rt.device.type == "cuda" else "train a smaller model (fewer or narrower layers)")
    else:
        fix = "lower train.batch_size (raising train.grad_accum keeps the batch)" + (
            "" if cfg.model.grad_checkpointing else " or set model.grad_checkpointing = true")
    who = f"{processes} processes x " if processes > 1 else ""
    raise UserError(f"train.batch_size {cfg.train.batch_size} x model.block_size {cfg.model.block_size} needs at "
                    f"least {gib(needed)} ({who}{gib(state)} of weights, gradients and AdamW state + "
                    f"{gib(activations)} of activations), but {gib(available)} is free on {rt.device}; {fix}")


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation that failed asked for ("20.00 MiB", "805306368 bytes"), or None when `e` is another
    error. CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError that says "can't allocate memory"."""
    text = str(e)
    if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text):
        return None
    asked = re.search(r"[Tt]ried to allocate ([\d.]+) ?([A-Za-z]+)", text)
    if not asked:
        return "an allocation failed"
    amount, unit = asked.groups()
    return f"could not allocate {int(amount) / 2**20:,.0f} MiB" if unit == "bytes" else f"could not allocate {amount} {unit}"
