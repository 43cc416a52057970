"""What a run needs from the machine: the device and autocast dtype, the allocator's settings, under torchrun
the process group and the sharded or wrapped model, and the device's peak FLOP/s (for MFU). Building a model
under FSDP without any process holding it whole is in sharding.py; what a training process needs of memory, in
memory.py.

train.py, sample.py and bench.py take a `Runtime` from `setup_runtime` and leave the machine to this module.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel as DDP

from errors import UserError
from model import GPT, GPTConfig

if TYPE_CHECKING:  # for the annotations only: train.py imports this module, not the other way round
    from train import Config, RunConfig


# ----------------------------------------------------------------------------------------------------
# Runtime: device, autocast dtype, and the process group when torchrun started several processes.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0  # this process, of world_size started by torchrun
    world_size: int = 1

    @property
    def is_main(self) -> bool:  # only the first process logs and writes files
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over all processes (t itself with one)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """Whether the flag is set in any process (so that all of them act alike)."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=self.device)).item())


def valid_device(name: str) -> bool:
    kind, _, index = name.partition(":")
    return name == "auto" or (kind in ("cpu", "cuda", "mps") and (not index or index.isdigit()))


def resolve_device(name: str) -> torch.device:
    if not valid_device(name):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use cpu (or auto) instead")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for, but MPS is not available; use cpu (or auto) instead")
    return device


# On a CPU with native bfloat16, autocast trained the 384-wide baby GPT 1.8x faster and nanoGPT's 128-wide CPU
# model 1.3-1.45x faster (same val loss), but narrower models slower: their casts cost more than the matmuls save.
CPU_BF16_MIN_WIDTH = 128


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX): then autocast to it pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep large freed blocks for reuse instead of returning them to the kernel.

    By default every block over 32 MB is mmap'd and unmapped again when freed, so each CPU training step
    page-faults its activations back in, zeroed: ~1M faults and a third of a baby-GPT step on a 2-core CPU.
    With these thresholds the process keeps its peak memory (as CUDA's caching allocator does) and reuses it.
    Returns whether the allocator took the settings (False off glibc, e.g. macOS or musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def setup_runtime(run: RunConfig, model: GPTConfig | None = None) -> Runtime:
    """The device and dtype (for `model`, when given); under torchrun (WORLD_SIZE > 1) also the process group:
    NCCL between GPUs, gloo between CPU processes, one GPU per process (LOCAL_RANK)."""
    device = resolve_device(run.device)
    rank, world_size = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
        rank = dist.get_rank()
    if run.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "cpu" and cpu_has_bf16() and model is not None and model.n_embd >= CPU_BF16_MIN_WIDTH:
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
    else:
        dtype = DTYPES[run.dtype]
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores: ~8x, 1e-3 relative error
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, dtype, rank, world_size)


def parallelize(model: GPT, cfg: Config, rt: Runtime) -> torch.nn.Module:
    """Under torchrun, shard the model in place with FSDP2 (each block, then the root) before the optimizer
    sees its parameters; DDP instead wraps it after (see `wrap_for_training`). The raw module stays the
    one whose weights are saved. Training shards a model built on the meta device (`build_on_meta`)."""
    if rt.world_size > 1 and cfg.run.distributed == "fsdp":
        for block in [*getattr(model, "encoder", []), *model.blocks]:  # an encoder-decoder's encoder too
            cross = getattr(block, "cross", None)  # an encoder-decoder's decoder block: its cross-attention is
            if cross is not None:  # called outside the block too, for the source's keys and values (cross_cache)
                fully_shard(cross)
                register_fsdp_forward_method(cross, "memory_kv")
            fully_shard(block)
        fully_shard(model)
    return model


def wrap_for_training(model: GPT, cfg: Config, rt: Runtime) -> torch.nn.Module:
    if rt.world_size > 1 and cfg.run.distributed == "ddp":
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(model) if cfg.run.compile else model


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Under DDP or FSDP, skip the gradient all-reduce for micro-steps whose gradients only accumulate: it must be
    off before their forward pass, and on again for the last micro-step."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if enabled or not isinstance(model, (DDP, FSDPModule)):
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def end_torchrun_worker() -> NoReturn:
    """Exit a torchrun worker whose run has finished, skipping the interpreter's finalization.

    FSDP's process group outlives destroy_process_group (torch's DTensor sharding cache keeps its device mesh),
    so gloo's worker threads live on, and one may still be releasing a finished collective whose tensors are
    Python objects. Once the interpreter is finalizing, that thread cannot take the GIL and aborts the process
    ("terminate called without an active exception", SIGABRT): a finished run would end as a failed torchrun
    job, now and then, more often on a loaded machine. Everything the run writes is closed by now.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------------
# Throughput: model FLOPs utilisation against the device's peak.

# Dense peak FLOP/s per GPU, (16-bit, float32 with TF32), from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    "H200": (989e12, 494e12), "H100 PCIe": (756e12, 378e12), "H100": (989e12, 494e12),
    "A100": (312e12, 156e12), "A10G": (70e12, 35e12), "A10": (125e12, 62.5e12), "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12), "4090": (165e12, 82.6e12), "3090": (71e12, 35.6e12), "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def gpu_peak_flops(name: str) -> tuple[float, float] | None:
    """(16-bit, float32) peak FLOP/s of the GPU torch names, e.g. "NVIDIA H100 80GB HBM3", or None when it is not in
    the table. A key matches as a whole word, longest first: an L40 is not an L4, an A10G not an A10."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return GPU_PEAK_FLOPS[key]
    return None


def device_peak_flops(rt: Runtime) -> float | None:
    """The device's peak FLOP/s in the run's dtype: from the table on GPUs, measured on a CPU."""
    if rt.device.type == "cuda":
        peaks = gpu_peak_flops(torch.cuda.get_device_name(rt.device))
        return None if peaks is None else peaks[1] if rt.dtype == torch.float32 else peaks[0]
    if rt.device.type == "cpu":
        return cpu_matmul_flops(rt.dtype, torch.get_num_threads())
    return None


@functools.lru_cache(maxsize=None)
def cpu_matmul_flops(dtype: torch.dtype, threads: int) -> float:
    """The best of a few large square matmuls: what this CPU's cores sustain in this dtype (bfloat16 runs on
    the AVX-512 BF16 / AMX units where the CPU has them). Measured once per process, in well under a second:
    the size doubles up to 2048 only while a matmul takes under 50 ms (float16 is emulated, and slow)."""
    g = torch.Generator().manual_seed(0)  # a private generator: the run's random stream stays untouched
    n = 128
    while True:
        n *= 2
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        a @ b  # warm up the kernel and thread pool
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        if n >= 2048 or best > 0.05:
            return 2 * n**3 / best
