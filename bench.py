"""Benchmarks, measured the way training and sampling really run: the same train_step and decode loop,
timed after warm-up (and compilation), on the configured device and dtype.

    bench_train(cfg, steps)  -> ms/step, tokens/s, achieved TFLOP/s, MFU, peak memory; on pairs also the time and
                                FLOPs per target token, and an encoder-decoder beside the decoder-only model of its size
    bench_sample(...)        -> prefill ms and tokens/s, decode tokens/s with and without the KV cache
    bench_speculative(...)   -> tokens/s plain and with a draft model, the draft's acceptance, the speed-up
    compare_with_nanogpt(..) -> the same figures side by side with Karpathy's nanoGPT, run alternately; with
                                quality, both tools' val loss curves and their training time to nanoGPT's final loss
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import pickle
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch

import train
from batches import BatchSource, batch_source, positions_per_example
from dataset_format import read_meta
from encoder_decoder import build_model
from errors import UserError
from model import GPT, GPTConfig
from pairs import is_pairs
from runtime import Runtime, device_peak_flops, parallelize, setup_runtime, wrap_for_training
import sample
from plots import read_metrics, run_curves
from sample import LoadedRun, decode_cache, decode_steps


class RandomBatches(BatchSource):
    """Uniformly random tokens in place of a dataset, with the interface of batches.Batches."""

    def __init__(self, batch_size: int, block_size: int, vocab_size: int, device: torch.device):
        self.batch_size, self.block_size, self.vocab_size, self.device = batch_size, block_size, vocab_size, device

    def make(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    """Time `steps` optimizer steps of the configured run after `warmup` untimed ones.

    On a pairs dataset a step's examples are their own lengths, not block_size: tokens, TFLOP/s and MFU count the
    mean positions an example takes (batches.positions_per_example, as train.py logs them; padding to a batch's
    longest example is not useful work and is not counted), and the target tokens a step teaches (each target and
    its end token) give ms_per_target_token, target_tokens_per_s and flops_per_target_token: what decoder-only
    and encoder-decoder models are compared by, since the decoder-only one also reads the source in its decoder.
    For an encoder-decoder on pairs the decoder-only model of the same width and depth (decoder_only_config) is
    timed after it on the same examples (a step's pairs depend on the seed and the step alone), under
    "decoder_only"; cost_ratio is the encoder-decoder's ms per target token over the decoder-only model's (below 1:
    the encoder-decoder is cheaper), flops_ratio the same for FLOPs per target token."""
    cfg, note = train.with_vocab(cfg)
    real_data = note is None
    if not real_data and cfg.model.arch == "encoder_decoder":
        raise UserError(f"an encoder-decoder is benchmarked on a pairs dataset, and {cfg.data.dir}/meta.json does not "
                        f"exist: prepare one (e.g. minigpt prepare task:add --out {cfg.data.dir}) or --set data.dir=DIR")
    meta = read_meta(cfg.data.dir) if real_data else None
    rt = setup_runtime(cfg.run, cfg.model)
    result = {"device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."), "compile": cfg.run.compile,
              "data": cfg.data.dir if real_data else "random tokens", **time_training(cfg, rt, meta, steps, warmup)}
    if meta is not None and is_pairs(meta) and cfg.model.arch == "encoder_decoder":
        dec_cfg = decoder_only_config(cfg, meta)
        gc.collect()  # the encoder-decoder's model and optimizer go before the second model comes
        decoder_only = time_training(dec_cfg, rt, meta, steps, warmup)
        del decoder_only["peak_tflops"]  # the same device
        if rt.device.type != "cuda":
            decoder_only["peak_mem_mb"] = None  # the process's peak resident set: the larger of both runs, not its own
        m = dec_cfg.model
        result["cost_ratio"] = result["ms_per_target_token"] / decoder_only["ms_per_target_token"]
        result["flops_ratio"] = result["flops_per_target_token"] / decoder_only["flops_per_target_token"]
        result["decoder_only"] = {"n_layer": m.n_layer, "n_embd": m.n_embd, "block_size": m.block_size, **decoder_only}
    return result


def decoder_only_config(cfg: train.Config, meta: dict) -> train.Config:
    """The decoder-only model of an encoder-decoder's width and depth: as many blocks in one stack as its encoder
    and decoder have together, every other switch the same, and the context `source <sep> target` needs for the
    longest source and the longest target of the train split."""
    m, lengths = cfg.model, meta["length_stats"]["train"]
    need = lengths["source"]["max"] + 1 + lengths["target"]["max"]
    model = replace(m, arch="decoder", n_layer=m.n_layer + m.encoder_layers, n_encoder_layer=0, source_block_size=0,
                    block_size=need)
    return replace(cfg, model=model)


def time_training(cfg: train.Config, rt: Runtime, meta: dict | None, steps: int, warmup: int) -> dict:
    """Build the configured model and optimizer, run `warmup` untimed steps then `steps` timed ones on the data of
    `meta` (random tokens without), and return what bench_train reports of them (see there)."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(rt.device)
    parallelize(model, cfg, rt)
    optimizer = train.configure_optimizer(model, cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    step_model = wrap_for_training(model, cfg, rt)
    if meta is not None:
        batches = batch_source(cfg.data.dir, meta, "train", cfg.train.batch_size, cfg.model, cfg.train.objective,
                               rt.device, cfg.run.seed)
    else:
        batches = RandomBatches(cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size, rt.device)
    micro_steps = train.micro_steps_per_process(cfg, rt)
    peak = device_peak_flops(rt)
    model.train()

    def run(first: int, n: int) -> float:
        sync(rt.device)
        t0 = time.perf_counter()
        for step in range(first, first + n):
            train.train_step(step_model, optimizer, scaler, batches, step, rt, cfg.optim.lr, micro_steps,
                             cfg.optim.grad_clip, cfg.train.label_smoothing)
        sync(rt.device)
        return time.perf_counter() - t0

    t_compile = run(0, warmup)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    seconds = run(warmup, steps)
    step_s = seconds / steps
    tokens, flops_per_step = train.step_cost(cfg, meta, model)  # what train.py logs
    flops = flops_per_step / step_s
    result = {
        "params": model.num_params(), "tokens_per_step": tokens,
        "warmup_s": t_compile, "steps": steps, "ms_per_step": 1000 * step_s, "tokens_per_s": tokens / step_s,
        "tflops": flops / 1e12, "peak_tflops": peak / 1e12 if peak else None,
        "mfu": flops / (peak * rt.world_size) if peak else None, "peak_mem_mb": peak_memory_mb(rt.device),
    }
    if meta is not None and is_pairs(meta):
        seq_len, source_len = positions_per_example(meta, cfg.model, cfg.train.objective)
        sequences = cfg.train.batch_size * cfg.train.grad_accum  # per step, over all micro-steps and processes
        target_tokens = sequences * (meta["length_stats"]["train"]["target"]["mean"] + 1)  # each target and its end
        result.update({
            "decoder_positions": seq_len, "encoder_positions": source_len,  # the mean per example
            "target_tokens_per_step": target_tokens, "ms_per_target_token": 1000 * step_s / target_tokens,
            "target_tokens_per_s": target_tokens / step_s, "flops_per_target_token": flops_per_step / target_tokens,
        })
    return result


@torch.no_grad()
def bench_sample(model: GPT, rt: Runtime, batch: int = 1, prompt_len: int = 64, new_tokens: int = 200,
                 repeats: int = 3, compile: bool = False) -> dict:
    """Prefill time for a random prompt, then decode throughput with and without the KV cache, through the
    same decode loop `minigpt sample` uses (top-k 200 sampling at temperature 1). The prefill is that loop's
    first step: the prompt's last block_size tokens (all that sampling keeps of a longer prompt) into the
    sampler's KV cache, a sliding window's in window-sized chunks, and the first token drawn from them; its
    tokens/s counts those `prefill_tokens`, not prompt_len. `compile` compiles the cached decode step; the
    warm-up decode pays for the compilation and is not timed."""
    cfg = model.config
    model.eval()
    prompt = torch.randint(cfg.vocab_size, (batch, prompt_len), device=rt.device)
    prefilled = min(prompt_len, cfg.block_size)  # decode_steps keeps prompt[:, -block_size:]
    cache = decode_cache(model, batch, rt.device, rt.dtype)  # one cache for every timed prefill, as `sample` does

    def prefill() -> float:
        steps = decode_steps(model, prompt, 1, cfg.vocab_size, temperature=1.0, top_k=200,
                             generator=torch.Generator(device=rt.device).manual_seed(0), kv_cache=cache, rt=rt)
        sync(rt.device)
        t0 = time.perf_counter()
        next(steps)
        sync(rt.device)
        return time.perf_counter() - t0

    def decode(kv_cache: bool) -> float:
        steps = decode_steps(model, prompt, new_tokens, cfg.vocab_size, temperature=1.0, top_k=200,
                             generator=torch.Generator(device=rt.device).manual_seed(0), kv_cache=kv_cache, rt=rt,
                             compile=compile and kv_cache)
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
        "compile": compile, "batch": batch, "prompt_len": prompt_len, "prefill_tokens": prefilled,
        "new_tokens": new_tokens, "context_end": prefilled + new_tokens,
        "prefill_ms": 1000 * prefill_s, "prefill_tokens_per_s": batch * prefilled / prefill_s,
        "decode_tokens_per_s": cached, "decode_tokens_per_s_no_cache": uncached, "kv_cache_speedup": cached / uncached,
    }


@torch.no_grad()
def bench_speculative(run: LoadedRun, draft: LoadedRun, prompt_len: int = 1, new_tokens: int = 200,
                      draft_tokens: int = 4, repeats: int = 3, seed: int = 1337) -> dict:
    """Plain against speculative decoding (`sample --draft`) for one prompt of prompt_len random tokens and
    new_tokens new ones, greedy and sampled at SampleConfig's defaults (temperature 0.8, top-k 200): tokens/s of
    each, timed over the whole generation (the prompt's prefill included, for both), alternately, `repeats` times
    after a warm-up, medians; the speed-up; and the draft's acceptance: accepted draft tokens per check (per target
    forward) and the share of proposed tokens accepted. Neither stops at an end-of-text token, so both make
    exactly new_tokens; each run restarts the same seed, so every repeat makes the same tokens (`same_tokens`:
    whether, greedy, they are the plain run's, as they are in exact arithmetic)."""
    sample.check_draft(run, draft)
    vocab = run.tokenizer.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (prompt_len,), generator=g).tolist()
    prompt = torch.tensor([ids], device=run.rt.device)
    result = {"device": str(run.rt.device), "dtype": str(run.rt.dtype).removeprefix("torch."),
              "params": run.model.num_params(), "draft_dtype": str(draft.rt.dtype).removeprefix("torch."),
              "draft_params": draft.model.num_params(), "prompt_len": prompt_len, "new_tokens": new_tokens,
              "draft_tokens": draft_tokens, "repeats": repeats}
    base = sample.SampleConfig()
    for name, sc in (("greedy", replace(base, max_new_tokens=new_tokens, temperature=0.0)),
                     ("sampled", replace(base, max_new_tokens=new_tokens))):
        dec = sample.SpeculativeDecoder(run.model, draft.model, vocab, draft_tokens, temperature=sc.temperature,
                                        top_k=sc.top_k, top_p=sc.top_p, target_rt=run.rt, draft_rt=draft.rt)
        cache = decode_cache(run.model, 1, run.rt.device, run.rt.dtype)

        def plain(n: int) -> tuple[float, list[int]]:
            generator = torch.Generator(device=run.rt.device).manual_seed(seed)
            t0 = time.perf_counter()
            out = sample.generate(run.model, prompt, vocab, replace(sc, max_new_tokens=n), generator=generator,
                                  rt=run.rt, cache=cache)
            return time.perf_counter() - t0, out

        def speculative(n: int) -> tuple[float, list[int]]:
            dec.generator = torch.Generator(device=run.rt.device).manual_seed(seed)
            dec.proposed = dec.accepted = dec.forwards = dec.emitted = 0
            t0 = time.perf_counter()
            out = sample.generate_speculative(dec, ids, n)
            return time.perf_counter() - t0, out

        plain(min(new_tokens, 16))  # warm-up
        speculative(min(new_tokens, 16))
        plain_s, spec_s = [], []
        for _ in range(repeats):
            seconds, plain_out = plain(new_tokens)
            plain_s.append(seconds)
            seconds, spec_out = speculative(new_tokens)
            spec_s.append(seconds)
        plain_tps, spec_tps = new_tokens / statistics.median(plain_s), new_tokens / statistics.median(spec_s)
        result[name] = {
            "temperature": sc.temperature, "top_k": sc.top_k,
            "plain_tokens_per_s": plain_tps, "speculative_tokens_per_s": spec_tps, "speedup": spec_tps / plain_tps,
            "checks": dec.forwards, "accepted_per_check": dec.accepted / dec.forwards,
            "acceptance": dec.accepted / dec.proposed if dec.proposed else None,
            "tokens_per_check": dec.emitted / dec.forwards,
        }
        if name == "greedy":
            result[name]["same_tokens"] = spec_out == plain_out
    return result


def format_table(title: str, result: dict) -> str:
    """An aligned two-column table of a result dict; a nested dict is a titled group of indented rows."""
    def show(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return "-" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    def rows(d: dict, indent: str) -> list[tuple[str, str, str | None]]:  # None: a group's title
        out = []
        for k, v in d.items():
            out += [(indent, k, None), *rows(v, indent + "  ")] if isinstance(v, dict) else [(indent, k, show(v))]
        return out

    table = rows(result, "  ")
    width = max(len(indent + k) for indent, k, _ in table)
    return "\n".join([title] + [indent + k if v is None else f"{indent + k:<{width}}  {v:>14}" for indent, k, v in table])


# ----------------------------------------------------------------------------------------------------
# Side by side with nanoGPT (github.com/karpathy/nanoGPT), in its own checkout: we run its scripts, we copy
# none of its code. Both tools run as fresh processes of this interpreter, alternately, so that a busy machine
# slows both alike; nanoGPT takes its shapes from our resolved config, so the two cannot drift apart.

REPO_ROOT = Path(__file__).resolve().parent
NANOGPT_DATA = Path("data") / "shakespeare_char"  # what its config/train_shakespeare_char.py reads
NANOGPT_CONFIG = "config/train_shakespeare_char.py"
# nanoGPT's model is the GPT-2 block, which GPTConfig's defaults describe: a config changing any of these
# would compare two different models
NANOGPT_FIXED = ("pos_encoding", "n_kv_head", "attn_window", "qk_norm", "attn_mask", "norm", "norm_placement", "mlp",
                 "mlp_hidden", "n_experts", "grad_checkpointing")


@dataclass(frozen=True)
class Case:
    title: str
    config: str  # ours, relative to the repository
    overrides: tuple[str, ...]
    target: float  # the goal for minigpt / nanoGPT
    steps: int = 0  # training cases: timed and untimed steps by default
    warmup: int = 0


CASES = {
    "cpu": Case("train, nanoGPT's CPU shapes", "config/shakespeare_char_cpu.toml", (), 1.5, steps=100, warmup=10),
    "baby": Case("train, baby GPT", "config/shakespeare_char.toml", ("run.device=cpu",), 2.0, steps=4, warmup=1),
    "sample": Case("sample, baby GPT", "config/shakespeare_char.toml", ("run.device=cpu",), 5.0),
}

# --quality: both tools evaluate this often, so time to a loss is known to within this many steps
QUALITY_EVAL_INTERVAL = 100
# ours, by default: nanoGPT's own block (AdamW), then our best preset at its shapes
QUALITY_CONFIGS = ("config/shakespeare_char_cpu.toml", "config/shakespeare_char_cpu_fast.toml")
# what a quality config must share with nanoGPT's run; how the model is built and trained may differ
QUALITY_SHAPES = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.dropout", "data.dir",
                  "train.batch_size", "train.grad_accum", "train.max_iters", "train.eval_iters")

_ITER_LINE = re.compile(r"^iter (\d+): loss [^,\s]+, time ([\d.]+)ms", re.M)
_EVAL_LINE = re.compile(r"^step (\d+): train loss [^,\s]+, val loss ([^,\s]+)", re.M)


def parse_nanogpt_iter_ms(text: str) -> dict[int, float]:
    """{iteration: ms} from nanoGPT's `iter 5: loss 3.9758, time 169.28ms, mfu 0.01%` lines."""
    return {int(m[1]): float(m[2]) for m in _ITER_LINE.finditer(text)}


def parse_nanogpt_val_losses(text: str) -> dict[int, float]:
    """{step: val loss} from nanoGPT's `step 2000: train loss 1.7610, val loss 1.8835` lines."""
    return {int(step): float(loss) for step, loss in _EVAL_LINE.findall(text)}


def nanogpt_train_seconds(iter_ms: dict[int, float], eval_steps: Iterable[int]) -> dict[int, float]:
    """{step: seconds of training before the evaluation at that step}, evaluations not counted, from nanoGPT's
    per-iteration times (--log_interval=1). nanoGPT evaluates, and saves its checkpoint, at the start of an
    iteration, and the time it prints for that iteration holds both: that time is replaced by the median time of
    the iterations after it up to the next evaluation. Iteration 0 loses its warm-up with it, in nanoGPT's favour."""
    evals = sorted(eval_steps)
    missing = [i for i in range(evals[-1]) if i not in iter_ms]
    if missing:
        raise UserError(f"nanoGPT's train.py printed no `iter {missing[0]}: loss L, time T ms` line: is it nanoGPT?")
    ms = [iter_ms[i] for i in range(evals[-1])]
    for start, end in zip(evals, evals[1:]):
        ms[start] = statistics.median(ms[start + 1:end])
    elapsed = [0.0, *itertools.accumulate(ms)]  # elapsed[n]: the first n iterations
    return {step: elapsed[step] / 1000 for step in evals}


def minigpt_val_curve(run_dir: Path) -> list[list[float]]:
    """[step, training seconds, val loss] per evaluation of one of our runs: the seconds are the elapsed_s of the
    step's progress record (evaluations not counted)."""
    _, evals = read_metrics(run_dir)
    curves = run_curves(run_dir, "time")
    return [[r["step"], float(t), float(v)] for r, t, v in zip(evals, curves.val_x, curves.val_loss)]


def time_to_loss(curve: Iterable[Sequence[float]], target: float) -> dict | None:
    """The first evaluation of a [step, seconds, val loss] curve at or below target, as {"step", "train_s"}; None
    if the curve never gets there."""
    return next(({"step": step, "train_s": t} for step, t, val in curve if val <= target), None)


def tokens_per_s_from_runs(new_tokens: int, seconds: float, seconds_one: float) -> float:
    """Decode speed of a script that reports no timing: its whole runs for N tokens and for 1 differ only by the
    N - 1 extra tokens, so start-up and checkpoint loading cancel out."""
    if seconds <= seconds_one:
        raise UserError(f"sampling {new_tokens} tokens took no longer than sampling 1 ({seconds:.2f} s vs "
                        f"{seconds_one:.2f} s): the machine is too busy to time it; try again when it is quieter")
    return (new_tokens - 1) / (seconds - seconds_one)


def run_process(cmd: Sequence[str], cwd: Path, what: str) -> str:
    """Run a command to completion and return its stdout; a failure becomes one UserError line."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"cannot run {what}: {e.strerror or e}") from None
    if proc.returncode:
        raise process_failed(what, cmd, cwd, proc.returncode, proc.stderr)
    return proc.stdout


def process_failed(what: str, cmd: Sequence[str], cwd: Path, code: int, stderr: str) -> UserError:
    """The one line for a command that failed: its code, the last lines of its stderr, and how to rerun it."""
    tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-2:])[-300:]
    return UserError(f"{what} failed with exit code {code}: {tail or 'nothing on stderr'} "
                     f"[ran: cd {shlex.quote(str(cwd))} && {shlex.join(cmd)}]")


def check_nanogpt_dir(nanogpt_dir: Path) -> None:
    clone = "clone it with `git clone https://github.com/karpathy/nanoGPT` and pass that folder"
    if not nanogpt_dir.is_dir():
        raise UserError(f"{nanogpt_dir} is not a folder: {clone}")
    needed = ("train.py", "sample.py", "configurator.py", NANOGPT_CONFIG)
    missing = [f for f in needed if not (nanogpt_dir / f).is_file()]
    if missing:
        raise UserError(f"{nanogpt_dir} is not a nanoGPT checkout, it has no {', '.join(missing)}: {clone}")


def ensure_nanogpt_data(nanogpt_dir: Path, input_path: Path | None, log: Callable[[str], None]) -> None:
    """nanoGPT reads its own train.bin, val.bin and meta.pkl: make them with its prepare.py when they are missing."""
    data = nanogpt_dir / NANOGPT_DATA
    if all((data / f).is_file() for f in ("train.bin", "val.bin", "meta.pkl")):
        return
    if not (data / "prepare.py").is_file():
        raise UserError(f"{data} has neither prepared data nor the prepare.py that makes it: "
                        f"is {nanogpt_dir} a complete nanoGPT checkout?")
    if input_path is not None:  # else prepare.py downloads the corpus
        try:
            shutil.copyfile(input_path, data / "input.txt")
        except OSError as e:
            raise UserError(f"cannot copy --input {input_path} to {data / 'input.txt'}: {e.strerror or e}") from None
    log(f"preparing nanoGPT's data with {data / 'prepare.py'}")
    run_process([sys.executable, "prepare.py"], data, "nanoGPT's data/shakespeare_char/prepare.py")


def nanogpt_vocab_size(nanogpt_dir: Path) -> int:
    path = nanogpt_dir / NANOGPT_DATA / "meta.pkl"
    try:
        with open(path, "rb") as f:
            return int(pickle.load(f)["vocab_size"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read nanoGPT's vocabulary from {path} ({type(e).__name__}): delete its "
                        "data/shakespeare_char/*.bin and meta.pkl so that its prepare.py runs again") from None


def check_like_nanogpt(cfg: train.Config, name: str) -> None:
    default = GPTConfig()
    differs = [f"model.{f} = {getattr(cfg.model, f)!r}" for f in NANOGPT_FIXED
               if getattr(cfg.model, f) != getattr(default, f)]
    if differs:
        raise UserError(f"{name} with --set gives {', '.join(differs)}, which nanoGPT's model does not have: compare "
                        "a GPT-2 block (leave these at their defaults)")
    if cfg.run.device != "cpu":  # nanoGPT runs with --device=cpu: both must
        raise UserError(f"the comparison runs on the CPU, as nanoGPT is run there; drop --set run.device="
                        f"{cfg.run.device}")


def nanogpt_train_command(cfg: train.Config, extra: Iterable[str]) -> list[str]:
    """nanoGPT's train.py on the CPU at our config's shapes (its configurator reads Python literals)."""
    m, t = cfg.model, cfg.train
    return [sys.executable, "train.py", NANOGPT_CONFIG, "--device=cpu", "--compile=False",
            f"--n_layer={m.n_layer}", f"--n_head={m.n_head}", f"--n_embd={m.n_embd}", f"--block_size={m.block_size}",
            f"--batch_size={t.batch_size}", f"--gradient_accumulation_steps={t.grad_accum}",
            f"--dropout={float(m.dropout)}", f"--bias={m.bias}", *extra]


def nanogpt_train(nanogpt_dir: Path, cfg: train.Config, steps: int, warmup: int, out_dir: Path) -> dict:
    """nanoGPT's train.py for warmup + steps iterations. It times each iteration itself, back to back, so the mean
    of the timed ones is what `bench train` reports for ours: the time of the timed steps over their number. (The
    median is kept too.) Iteration 0 also holds an evaluation (of one batch here), so warm-up must include it."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (iteration 0 holds an evaluation), got {warmup}")
    last = warmup + steps - 1  # it runs iterations 0 to max_iters
    cmd = nanogpt_train_command(cfg, [f"--max_iters={last}", f"--lr_decay_iters={last}", f"--eval_interval={last + 1}",
                                      "--eval_iters=1", "--log_interval=1", f"--out_dir={out_dir}"])
    ms = parse_nanogpt_iter_ms(run_process(cmd, nanogpt_dir, "nanoGPT's train.py"))
    timed = [ms[i] for i in range(warmup, last + 1) if i in ms]
    if len(timed) < steps:
        raise UserError(f"nanoGPT's train.py printed {len(timed)} of the {steps} `iter N: loss L, time T ms` lines "
                        f"expected after warm-up: is {nanogpt_dir} nanoGPT?")
    step_ms = statistics.fmean(timed)
    tokens = cfg.tokens_per_step
    return {"steps": steps, "warmup": warmup, "tokens_per_step": tokens, "ms_per_step": step_ms,
            "tokens_per_s": tokens / step_ms * 1000, "ms_per_step_median": statistics.median(timed),
            "command": shlex.join(cmd)}


def nanogpt_checkpoint(nanogpt_dir: Path, cfg: train.Config, out_dir: Path) -> str:
    """A ckpt.pt for sample.py: the evaluation at iteration 1 saves one (weights after one step, which the speed
    of sampling does not depend on)."""
    cmd = nanogpt_train_command(cfg, ["--max_iters=1", "--lr_decay_iters=1", "--eval_interval=1", "--eval_iters=1",
                                      "--log_interval=1", "--always_save_checkpoint=True", f"--out_dir={out_dir}"])
    run_process(cmd, nanogpt_dir, "nanoGPT's train.py (making a checkpoint to sample from)")
    if not (out_dir / "ckpt.pt").is_file():
        raise UserError(f"nanoGPT's train.py wrote no {out_dir / 'ckpt.pt'} for sample.py: is {nanogpt_dir} nanoGPT?")
    return shlex.join(cmd)


def nanogpt_sample(nanogpt_dir: Path, out_dir: Path, new_tokens: int, seed: int = 1337) -> dict:
    """nanoGPT's sample.py (no KV cache; it starts from its default prompt, "\\n"), timed as whole processes for
    new_tokens and for 1 token: see tokens_per_s_from_runs."""
    def timed(n: int) -> tuple[float, list[str]]:
        cmd = [sys.executable, "sample.py", f"--out_dir={out_dir}", "--device=cpu", "--compile=False",
               "--num_samples=1", f"--max_new_tokens={n}", f"--seed={seed}"]
        t0 = time.perf_counter()
        run_process(cmd, nanogpt_dir, "nanoGPT's sample.py")
        return time.perf_counter() - t0, cmd

    seconds_one, _ = timed(1)
    seconds, cmd = timed(new_tokens)
    return {"new_tokens": new_tokens, "seconds": seconds, "seconds_one_token": seconds_one,
            "tokens_per_s": tokens_per_s_from_runs(new_tokens, seconds, seconds_one),
            "command": shlex.join(cmd) + " (and again with --max_new_tokens=1)"}


def run_minigpt(args: Sequence[str], what: str) -> dict:
    """`python -m cli ARGS --json` in a fresh process, like nanoGPT: its one JSON object."""
    out = run_process([sys.executable, "-m", "cli", *args], REPO_ROOT, what)
    return json.loads(out.strip().splitlines()[-1])


def final_val_loss(metrics: Path) -> float | None:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    return losses[-1] if losses else None


def _set_args(overrides: Iterable[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _shapes(cfg: train.Config, sampling: str = "") -> str:
    m = cfg.model
    model = f"{m.n_layer} layers x {m.n_head} heads x {m.n_embd} wide, block {m.block_size}, bias {m.bias}"
    if sampling:
        return f"{model}, {sampling}"
    return f"{model}, batch {cfg.train.batch_size * cfg.train.grad_accum}, dropout {m.dropout:g}"


def _setting(cfg: train.Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_quality_config(cfg: train.Config, nanogpt_cfg: train.Config, name: str) -> None:
    """A quality config may build and train its model its own way, but at nanoGPT's shapes, data and budget."""
    differs = [f"{key} = {_setting(cfg, key)!r} (nanoGPT's run: {_setting(nanogpt_cfg, key)!r})"
               for key in QUALITY_SHAPES if _setting(cfg, key) != _setting(nanogpt_cfg, key)]
    if differs:
        raise UserError(f"--quality compares at nanoGPT's shapes and budget, and {name} has {', '.join(differs)}: "
                        "--set them equal or pick another --quality-config")
    if cfg.run.device != "cpu":
        raise UserError(f"the comparison runs on the CPU, as nanoGPT is run there; {name} has run.device = "
                        f"{cfg.run.device!r}: --set run.device=cpu")


def repo_name(path: Path) -> str:
    """A config's path as the commands and docs write it: relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def compare_quality(nanogpt_dir: Path, cfg: train.Config, configs: Sequence[Path], overrides: list[str], tmp: Path,
                    log: Callable[[str], None]) -> dict:
    """nanoGPT at the shapes and schedule of `cfg`, then each of our `configs`, for train.max_iters steps, evaluated
    every QUALITY_EVAL_INTERVAL steps (over train.eval_iters batches, for both): each tool's val loss curve, and the
    training time (evaluations not counted) at which it first reaches nanoGPT's final val loss."""
    steps, every = cfg.train.max_iters, QUALITY_EVAL_INTERVAL
    their_cmd = nanogpt_train_command(cfg, [f"--max_iters={steps}", f"--lr_decay_iters={steps}",
                                            f"--eval_interval={every}", f"--eval_iters={cfg.train.eval_iters}",
                                            "--log_interval=1", f"--out_dir={tmp / 'nanogpt-quality'}"])
    log(f"[quality] nanoGPT train.py: {steps} steps, evaluated every {every}")
    out = run_process(their_cmd, nanogpt_dir, "nanoGPT's train.py")
    val = parse_nanogpt_val_losses(out)
    if steps not in val:
        raise UserError(f"nanoGPT's train.py printed no `step {steps}: train loss A, val loss B` line: is it nanoGPT?")
    seconds = nanogpt_train_seconds(parse_nanogpt_iter_ms(out), val)
    target = val[steps]
    curve = [[step, seconds[step], val[step]] for step in sorted(val)]
    theirs = {"val_loss": target, "curve": curve, "time_to_target": time_to_loss(curve, target),
              "command": shlex.join(their_cmd)}
    log(f"[quality]   val loss {target:.4f} after {seconds[steps]:.1f} s of training")
    ours = {}
    for i, path in enumerate(configs):
        name, out_dir = repo_name(path), tmp / f"minigpt-quality-{i}"
        args = ["train", str(path), *_set_args(overrides), "--set", f"train.eval_interval={every}",
                "--set", "log.plot=false", "--set", f"run.out_dir={out_dir}"]
        log(f"[quality] minigpt train {name}: {steps} steps, evaluated every {every}")
        run_process([sys.executable, "-m", "cli", *args], REPO_ROOT, "minigpt train")
        curve = minigpt_val_curve(out_dir)
        if not curve or curve[-1][0] != steps:
            raise UserError(f"minigpt train {name} recorded no val_loss at step {steps} in metrics.jsonl")
        reached = time_to_loss(curve, target)  # nanoGPT's own curve always reaches its final loss
        ratio = theirs["time_to_target"]["train_s"] / reached["train_s"] if reached else None
        ours[name] = {"val_loss": curve[-1][2], "curve": curve, "time_to_target": reached, "sooner": ratio,
                      "command": shlex.join([sys.executable, "-m", "cli", *args])}
        log(f"[quality]   val loss {curve[-1][2]:.4f} after {curve[-1][1]:.1f} s of training")
    return {"steps": steps, "eval_interval": every, "eval_iters": cfg.train.eval_iters, "target_val_loss": target,
            "nanogpt": theirs, "minigpt": ours}


def check_quality(load_config: Callable[[Path, list[str]], train.Config], configs: Sequence[Path],
                  overrides: Sequence[str]) -> None:
    """What --quality would refuse after minutes of timing, refused first: configs at other shapes than nanoGPT's
    run (the CPU case), a budget the evaluations do not end on, no data."""
    sets = [*CASES["cpu"].overrides, *overrides]
    nanogpt_cfg = load_config(REPO_ROOT / CASES["cpu"].config, sets)
    for path in configs:
        check_quality_config(load_config(path, sets), nanogpt_cfg, repo_name(path))
    steps = nanogpt_cfg.train.max_iters
    if steps % QUALITY_EVAL_INTERVAL:
        raise UserError(f"--quality evaluates every {QUALITY_EVAL_INTERVAL} steps and compares the last evaluation: "
                        f"train.max_iters must be a multiple of it, got {steps}")
    data_dir = REPO_ROOT / nanogpt_cfg.data.dir
    if not (data_dir / "meta.json").exists():
        raise UserError(f"--quality trains on real data, and {data_dir} has none: run "
                        "`minigpt prepare shakespeare --tokenizer char` in the repository first")


def compare_with_nanogpt(nanogpt_dir: Path, load_config: Callable[[Path, list[str]], train.Config],
                         cases: Iterable[str] = tuple(CASES), repeats: int = 1, steps: dict[str, int] | None = None,
                         warmup: int | None = None, new_tokens: int = 500, quality: bool = False,
                         input_path: Path | None = None, overrides: Sequence[str] = (),
                         quality_configs: Sequence[Path] = (),
                         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Speed of minigpt and nanoGPT at the same shapes, each case run `repeats` times per tool, alternately, with
    medians and the ratio minigpt / nanoGPT. `load_config(path, overrides)` resolves one of our TOML configs.
    `steps` sets timed steps per training case ({"cpu": 100}); `quality` also trains nanoGPT at the CPU case's
    shapes for its train.max_iters steps, then each of our `quality_configs` (QUALITY_CONFIGS by default) at those
    shapes, and compares their val loss curves (see compare_quality)."""
    nanogpt_dir = Path(nanogpt_dir).resolve()
    check_nanogpt_dir(nanogpt_dir)
    quality_configs = [Path(p).resolve() for p in quality_configs or [REPO_ROOT / c for c in QUALITY_CONFIGS]]
    if quality:  # before minutes of timing, not after them
        check_quality(load_config, quality_configs, overrides)
    ensure_nanogpt_data(nanogpt_dir, input_path, log)
    result = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "nanogpt_dir": str(nanogpt_dir),
              "minigpt_dir": str(REPO_ROOT),
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]},
              "repeats": repeats, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="minigpt-vs-nanogpt-") as tmp:
        tmp = Path(tmp)
        for name in [n for n in CASES if n in set(cases)]:
            case = CASES[name]
            sets = [*case.overrides, *overrides]
            cfg = load_config(REPO_ROOT / case.config, sets)
            if not (REPO_ROOT / cfg.data.dir / "meta.json").exists() and not cfg.model.vocab_size:
                # our bench then trains on random tokens: of nanoGPT's vocabulary, not of GPT-2's 50,304
                sets.append(f"model.vocab_size={nanogpt_vocab_size(nanogpt_dir)}")
                cfg = load_config(REPO_ROOT / case.config, sets)
            check_like_nanogpt(cfg, case.config)
            commands = {}
            if name == "sample":
                log("[sample] nanoGPT train.py: two steps, to save a checkpoint for sample.py")
                commands["nanogpt_checkpoint"] = nanogpt_checkpoint(nanogpt_dir, cfg, tmp / "sample")
                our_args = ["bench", "sample", case.config, *_set_args(sets), "--prompt-len", "1",
                            "--new-tokens", str(new_tokens), "--json"]
                what, ours_key = f"sample.py, {new_tokens} tokens and 1", "decode_tokens_per_s"

                def theirs_run(r: int) -> dict:
                    return nanogpt_sample(nanogpt_dir, tmp / "sample", new_tokens)
            else:
                n, w = (steps or {}).get(name, case.steps), warmup or case.warmup
                our_args = ["bench", "train", case.config, *_set_args(sets), "--steps", str(n), "--warmup", str(w),
                            "--json"]
                what, ours_key = f"train.py, {w} + {n} steps", "tokens_per_s"

                def theirs_run(r: int) -> dict:
                    return nanogpt_train(nanogpt_dir, cfg, n, w, tmp / f"{name}-{r}")
            ours, theirs = [], []
            for r in range(repeats):
                tag = f"[{name} {r + 1}/{repeats}]"
                log(f"{tag} nanoGPT {what}")
                theirs.append(theirs_run(r))
                log(f"{tag}   {theirs[-1]['tokens_per_s']:,.1f} tokens/s")
                log(f"{tag} minigpt {' '.join(our_args[:2])}")
                ours.append(run_minigpt(our_args, f"minigpt {' '.join(our_args[:2])}"))
                log(f"{tag}   {ours[-1][ours_key]:,.1f} tokens/s")
            ours_tps = statistics.median(r[ours_key] for r in ours)
            theirs_tps = statistics.median(r["tokens_per_s"] for r in theirs)
            commands["nanogpt"] = theirs[0]["command"]
            commands["minigpt"] = shlex.join([sys.executable, "-m", "cli", *our_args])
            result["cases"][name] = {
                "title": case.title,
                "shapes": _shapes(cfg, f"batch 1, {new_tokens} tokens after one" if name == "sample" else ""),
                "target": case.target, "ratio": ours_tps / theirs_tps,
                "minigpt": {"tokens_per_s": ours_tps, "dtype": ours[0]["dtype"], "compile": ours[0].get("compile", False),
                            "runs": ours},
                "nanogpt": {"tokens_per_s": theirs_tps, "dtype": "float32", "runs": theirs},
                "commands": commands,
            }
            if name == "cpu" and quality:
                result["quality"] = compare_quality(nanogpt_dir, cfg, quality_configs, sets, tmp, log)
    return result


_WHO = {"nanogpt": "nanoGPT", "nanogpt_checkpoint": "nanoGPT checkpoint", "minigpt": "minigpt"}


def format_comparison(result: dict) -> str:
    """The table of compare_with_nanogpt: per case minigpt, nanoGPT and the ratio, then shapes, commands and method."""
    m = result["machine"]
    rows = [("case (tokens/s)", "minigpt", "nanoGPT", "ratio", "target")]
    for c in result["cases"].values():
        met = "met" if c["ratio"] >= c["target"] else "MISSED"
        rows.append((c["title"], f"{c['minigpt']['tokens_per_s']:,.1f}", f"{c['nanogpt']['tokens_per_s']:,.1f}",
                     f"{c['ratio']:.2f}x", f">= {c['target']:g}x {met}"))
    lines = [f"minigpt vs nanoGPT, {result['date']}, {m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}; "
             f"median of {result['repeats']} run(s) per tool, alternating", "", *_aligned(rows, left=(0, 4))]
    if q := result.get("quality"):
        lines += ["", *format_quality(q)]
    lines += ["", "shapes (the same for both):"]
    lines += [f"  {name}: {c['shapes']}; minigpt {c['minigpt']['dtype']}"
              f"{' (compiled)' if c['minigpt'].get('compile') else ''}, nanoGPT {c['nanogpt']['dtype']}"
              for name, c in result["cases"].items()]
    lines += ["", f"commands (minigpt in {result['minigpt_dir']}, nanoGPT in {result['nanogpt_dir']}):"]
    for name, c in result["cases"].items():
        lines += [f"  {name} {_WHO[who]}: {cmd}" for who, cmd in c["commands"].items()]
    if q:
        lines.append(f"  quality nanoGPT: {q['nanogpt']['command']}")
        lines += [f"  quality minigpt {name}: {r['command']}" for name, r in q["minigpt"].items()]
    lines += ["", "how:"]
    if {"cpu", "baby"} & result["cases"].keys():
        lines.append("  training: ms/step is the mean over the timed steps after warm-up, for both: nanoGPT's from "
                     "the per-iteration times it prints, minigpt's from bench train. Each tool's runs are then "
                     "reduced to their median.")
    if s := result["cases"].get("sample"):
        their, our = s["nanogpt"]["runs"][0], s["minigpt"]["runs"][0]
        n = their["new_tokens"]
        lines.append(f"  sampling: nanoGPT's sample.py prints no timing, so it is timed as a whole process for {n} "
                     f"new tokens and for 1, and its tokens/s is ({n} - 1) / (t{n} - t1), which takes out start-up "
                     f"and loading. minigpt's is decode tokens/s with the KV cache (bench sample, best of 3); without "
                     f"the cache it decoded {our['decode_tokens_per_s_no_cache']:,.1f} tokens/s.")
    if q:
        lines.append(f"  quality: both train {q['steps']} steps at the CPU case's shapes, each with its own config, "
                     f"and evaluate every {q['eval_interval']} steps over {q['eval_iters']} batches per split. Time "
                     "to loss is the training time, evaluations not counted, at the first evaluation at or below "
                     "nanoGPT's final val loss; 'sooner' is nanoGPT's time over ours. minigpt's is the elapsed_s "
                     "it records (its clock stops for evaluations and their checkpoints). nanoGPT's is the sum of "
                     "the per-iteration times it prints (--log_interval=1), where an iteration that opens with an "
                     "evaluation (and a checkpoint) counts as the median of the iterations after it up to the next "
                     "one; iteration 0 thus also loses its warm-up, in nanoGPT's favour.")
    return "\n".join(lines)


def format_quality(q: dict) -> list[str]:
    """Lines of the --quality comparison: each tool's final val loss and time to nanoGPT's final val loss, then
    their val loss at ten points of the run."""
    target = q["target_val_loss"]
    runs = {"nanoGPT": q["nanogpt"], **{f"minigpt {name}": r for name, r in q["minigpt"].items()}}

    def reached(r: dict) -> str:
        t = r["time_to_target"]
        return f"step {t['step']}, {t['train_s']:.1f} s" if t else "not reached"

    rows = [(f"val loss, {q['steps']} steps at the CPU shapes", "final", f"first <= {target:.4f}", "sooner")]
    rows += [(who, f"{r['val_loss']:.4f}", reached(r), f"{r['sooner']:.2f}x" if r.get("sooner") else "")
             for who, r in runs.items()]
    points = [step for step in range(q["steps"] // 10, q["steps"] + 1, q["steps"] // 10)
              if step % q["eval_interval"] == 0]
    curves = [("val loss at step", *map(str, points))]
    curves += [(who, *(f"{dict((c[0], c[2]) for c in r['curve'])[step]:.3f}" for step in points))
               for who, r in runs.items()]
    return [*_aligned(rows, left=(0,)), "", *_aligned(curves, left=(0,))]


def _aligned(rows: Sequence[Sequence[str]], left: Iterable[int]) -> list[str]:
    """Columns padded to their widest cell: the `left` ones left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = set(left)
    return ["  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


# ---------------------------------------------------------------------------------------------
# minigpt prepare against tiktoken's own batch encoder
# ---------------------------------------------------------------------------------------------


def write_repeated_corpus(folder: Path, text_path: Path, total_bytes: int) -> int:
    """A folder of copies of one text, a file (a document) each, up to `total_bytes`: a corpus of any size from
    tiny-Shakespeare. Returns the number of files."""
    data = Path(text_path).read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    n = max(1, total_bytes // len(data))
    for i in range(n):
        path = folder / f"{i:06d}.txt"
        if not path.exists():
            path.write_bytes(data)
    return n


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc (0 for what has exited)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
            total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        except (OSError, ValueError):
            continue
    return total


def run_with_peak_rss(cmd: Sequence[str], cwd: Path, what: str, every_s: float = 0.05) -> tuple[float, int]:
    """Run a command to completion: its wall time and the peak of its RSS summed over its process tree (sampled);
    a failure becomes one UserError line, as in run_process."""
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a long run's log cannot fill it and block
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(every_s)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            err.seek(0)
            raise process_failed(what, cmd, cwd, proc.returncode, err.read())
    return seconds, peak


def tiktoken_batch_baseline(files: Sequence[Path], threads: int, batch_bytes: int = 64 << 20) -> dict:
    """tiktoken's GPT-2 encode_ordinary_batch on `threads` threads over the files (a document each), read in
    batches of ~batch_bytes; tokens counted, not kept."""
    from tokenization import gpt2_tokenizer

    enc = gpt2_tokenizer().encoding
    t0, tokens, nbytes, batch, size = time.perf_counter(), 0, 0, [], 0
    for i, f in enumerate(files):
        data = f.read_bytes()
        batch.append(data.decode("utf-8"))
        size += len(data)
        if size >= batch_bytes or i == len(files) - 1:
            tokens += sum(map(len, enc.encode_ordinary_batch(batch, num_threads=threads)))
            nbytes, batch, size = nbytes + size, [], 0
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "bytes": nbytes}


def bench_prepare(folder: Path, workers: int | None = None, repeats: int = 1,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """`minigpt prepare FOLDER --tokenizer gpt2` (a folder of .txt documents) against tiktoken's
    encode_ordinary_batch on all cores over the same documents, in the same run, alternately `repeats` times: the
    median MB/s of each and their ratio, the token counts (ours: tiktoken's plus one eot per document), and
    prepare's peak RSS summed over its processes."""
    files = sorted(p for p in Path(folder).glob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"{folder} holds no .txt files; make a corpus with `minigpt bench prepare {folder} --generate-mb N`")
    import prepare_data

    cores = prepare_data.default_workers()
    log(f"[prepare] warming the page cache over {len(files)} files")
    for f in files:
        f.read_bytes()
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-prepare-") as tmp:
        cmd = [sys.executable, "-m", "cli", "prepare", str(Path(folder).resolve()), "--tokenizer", "gpt2",
               "--out", str(Path(tmp) / "out"), "--force"] + (["--workers", str(workers)] if workers else [])
        for r in range(repeats):
            log(f"[prepare {r + 1}/{repeats}] tiktoken encode_ordinary_batch, {cores} threads")
            theirs.append(tiktoken_batch_baseline(files, cores))
            log(f"[prepare {r + 1}/{repeats}] {shlex.join(cmd[2:])}")
            seconds, peak = run_with_peak_rss(cmd, REPO_ROOT, "minigpt prepare")
            ours.append({"seconds": seconds, "peak_rss_mb": peak / 1e6})
        meta = read_meta(Path(tmp) / "out")
    nbytes = theirs[0]["bytes"]
    our_s, their_s = statistics.median(r["seconds"] for r in ours), statistics.median(r["seconds"] for r in theirs)
    ours_tokens = meta["train_tokens"] + meta["val_tokens"]
    return {
        "corpus": {"folder": str(folder), "documents": len(files), "bytes": nbytes},
        "machine": {"cpus": cores, "python": sys.version.split()[0]},
        "repeats": repeats,
        "minigpt": {"seconds": our_s, "mb_per_s": nbytes / 1e6 / our_s, "tokens": ours_tokens,
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in ours), "workers": workers or cores, "runs": ours},
        "tiktoken": {"seconds": their_s, "mb_per_s": nbytes / 1e6 / their_s, "tokens": theirs[0]["tokens"],
                     "threads": cores, "runs": theirs},
        "ratio": their_s / our_s,
        "tokens_match": ours_tokens == theirs[0]["tokens"] + len(files),
    }


def format_prepare(result: dict) -> str:
    """The table of bench_prepare: each tool's median time, MB/s and tokens, then the ratio and prepare's memory."""
    m, t, c = result["minigpt"], result["tiktoken"], result["corpus"]
    rows = [("", "seconds", "MB/s", "tokens"),
            (f"minigpt prepare, {m['workers']} workers", f"{m['seconds']:.1f}", f"{m['mb_per_s']:.1f}", f"{m['tokens']:,}"),
            (f"tiktoken encode_ordinary_batch, {t['threads']} threads", f"{t['seconds']:.1f}", f"{t['mb_per_s']:.1f}",
             f"{t['tokens']:,}")]
    return "\n".join([
        f"corpus: {c['documents']:,} documents, {c['bytes'] / 1e6:,.0f} MB; {result['machine']['cpus']} cores; "
        f"median of {result['repeats']} run(s) each, alternating", "", *_aligned(rows, left=(0,)), "",
        f"ratio: {result['ratio']:.2f}x tiktoken's throughput; prepare's peak RSS {m['peak_rss_mb']:,.0f} MB over "
        f"all its processes; tokens = tiktoken's + one eot per document: {result['tokens_match']}"])
