"""Benchmarks, measured the way training and sampling really run: the same train_step and decode loop,
timed after warm-up (and compilation), on the configured device and dtype.

    bench_train(cfg, steps)  -> ms/step, tokens/s, achieved TFLOP/s, MFU, peak memory
    bench_sample(...)        -> prefill ms, decode tokens/s with and without the KV cache
"""

from __future__ import annotations

import resource
import time

import torch

import train
from model import GPT, KVCache
from prepare_data import read_meta
from sample import decode_steps


class RandomBatches:
    """Uniformly random tokens in place of a dataset, with the interface of train.Batches."""

    def __init__(self, batch_size: int, block_size: int, vocab_size: int, device: torch.device):
        self.batch_size, self.block_size, self.vocab_size, self.device = batch_size, block_size, vocab_size, device

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step * 1000 + micro)
        xy = torch.randint(self.vocab_size, (self.batch_size, self.block_size + 1), generator=g)
        return xy[:, :-1].to(self.device), xy[:, 1:].to(self.device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors took; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg: train.Config, steps: int = 20, warmup: int = 5) -> dict:
    """Time `steps` optimizer steps of the configured run after `warmup` untimed ones."""
    cfg, note = train.with_vocab(cfg)
    rt = train.setup_runtime(cfg.run, cfg.model)
    real_data = note is None
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model).to(rt.device)
    train.parallelize(model, cfg, rt)
    optimizer = train.configure_optimizer(model, cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    step_model = train.wrap_for_training(model, cfg, rt)
    if real_data:
        batches = train.Batches(cfg.data.dir, read_meta(cfg.data.dir), "train", cfg.train.batch_size, cfg.model,
                                rt.device, cfg.run.seed)
    else:
        batches = RandomBatches(cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size, rt.device)
    micro_steps = train.micro_steps_per_process(cfg, rt)
    peak = train.device_peak_flops(rt)
    model.train()

    def run(first: int, n: int) -> float:
        sync(rt.device)
        t0 = time.perf_counter()
        for step in range(first, first + n):
            train.train_step(step_model, optimizer, scaler, batches, step, rt, cfg.optim.lr, micro_steps,
                             cfg.optim.grad_clip)
        sync(rt.device)
        return time.perf_counter() - t0

    t_compile = run(0, warmup)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    seconds = run(warmup, steps)
    step_s = seconds / steps
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    flops = model.flops_per_token(cfg.model.block_size) * tokens / step_s
    return {
        "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."), "compile": cfg.run.compile,
        "data": cfg.data.dir if real_data else "random tokens", "params": model.num_params(), "tokens_per_step": tokens,
        "warmup_s": t_compile, "steps": steps, "ms_per_step": 1000 * step_s, "tokens_per_s": tokens / step_s,
        "tflops": flops / 1e12, "peak_tflops": peak / 1e12 if peak else None,
        "mfu": flops / (peak * rt.world_size) if peak else None, "peak_mem_mb": peak_memory_mb(rt.device),
    }


@torch.no_grad()
def bench_sample(model: GPT, rt: train.Runtime, batch: int = 1, prompt_len: int = 64, new_tokens: int = 200,
                 repeats: int = 3) -> dict:
    """Prefill time for a random prompt, then decode throughput with and without the KV cache, through the
    same decode loop `minigpt sample` uses (top-k 200 sampling at temperature 1)."""
    cfg = model.config
    model.eval()
    prompt = torch.randint(cfg.vocab_size, (batch, prompt_len), device=rt.device)

    def prefill() -> float:
        cache = KVCache(cfg, batch, device=rt.device, dtype=rt.dtype)
        sync(rt.device)
        t0 = time.perf_counter()
        with rt.autocast():
            model(prompt[:, -cfg.block_size:], kv_cache=cache)
        sync(rt.device)
        return time.perf_counter() - t0

    def decode(kv_cache: bool) -> float:
        steps = decode_steps(model, prompt, new_tokens, cfg.vocab_size, temperature=1.0, top_k=200,
                             generator=torch.Generator(device=rt.device).manual_seed(0), kv_cache=kv_cache, rt=rt)
        next(steps)  # the first token comes from the prefill
        sync(rt.device)
        t0 = time.perf_counter()
        for _ in steps:
            pass
        sync(rt.device)
        return batch * (new_tokens - 1) / (time.perf_counter() - t0)

    prefill()  # warm-up
    decode(True)
    prefill_s = min(prefill() for _ in range(repeats))
    cached = max(decode(True) for _ in range(repeats))
    uncached = decode(False)
    return {
        "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."), "params": model.num_params(),
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "context_end": prompt_len + new_tokens,
        "prefill_ms": 1000 * prefill_s, "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": cached, "decode_tokens_per_s_no_cache": uncached, "kv_cache_speedup": cached / uncached,
    }


def format_table(title: str, result: dict) -> str:
    """An aligned two-column table of a result dict."""
    def show(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return "-" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    width = max(map(len, result))
    return "\n".join([title] + [f"  {k:<{width}}  {show(v):>14}" for k, v in result.items()])
