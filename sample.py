"""Sampling, top to bottom: options, loading a run for inference, choosing the next token, and the
decode loop (prefill the prompt into the KV cache, then one token per step).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import (find_checkpoint, load_checkpoint, minigpt_version, unknown_settings, use_writer,
                        weights_do_not_fit, weights_mismatch, written_by)
from beam_search import beam_search
from cli.config_loader import ConfigError, build_config
from encoder_decoder import EncoderDecoder, build_model
from errors import UserError
from model import GPT, GPTConfig, KVCache
from pairs import SpecialTokens
from runtime import Runtime, cpu_has_bf16, resolve_device, setup_runtime
from tokenization import TextStream, Tokenizer, load_tokenizer
from train import RunConfig


@dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # < 1 sharpens the distribution, > 1 flattens it; 0 = greedy (argmax)
    top_k: int = 200  # sample among the k most likely tokens only; 0 = no limit
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches p; 1 = no limit
    seed: int = 1337  # the same seed gives the same text
    kv_cache: bool = True  # False recomputes the whole context every token (for comparison)
    compile: bool = False  # torch.compile the one-token decode step (replayed as a CUDA graph on a GPU)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**64:  # what torch's generators take
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass
class LoadedRun:
    model: GPT | EncoderDecoder
    tokenizer: Tokenizer
    rt: Runtime
    step: int
    special: SpecialTokens | None = None  # a run trained on pairs (or span corruption) decodes targets with these
    allowed: torch.Tensor | None = None  # (V,) bool: the ids such a target may hold

    @property
    def pairs(self) -> bool:
        """Whether `sample` gives it a source and prints the target (else it continues a prompt)."""
        return self.special is not None


# Decoding reads every weight once per token. Once the weights outgrow the CPU's caches, bfloat16 weights (half the
# bytes) decoded the baby GPT (10.7M parameters) 1.4x faster than float32; nanoGPT's 0.8M-parameter CPU model, which
# fits in cache, decoded 1.4x slower in bfloat16.
CPU_BF16_MIN_PARAMS = 4_000_000


INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def inference_runtime(model: GPT, device: str = "auto", dtype: str = "auto") -> Runtime:
    """Move the model to the device, with its weights in the dtype it decodes fastest in: the GPU's autocast dtype;
    on a CPU, bfloat16 for a model too big for its caches where the CPU has native bf16, else float32. The weights
    themselves are cast (not autocast at every call), so each token reads half the bytes. `dtype` other than auto
    overrides the choice (float32 reproduces a float32 reference, e.g. Hugging Face's output, exactly)."""
    if dtype not in INFERENCE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    rt = setup_runtime(RunConfig(device=device, dtype=dtype))
    if rt.device.type == "cpu" and dtype == "auto":
        bf16 = cpu_has_bf16() and model.num_params() >= CPU_BF16_MIN_PARAMS
        rt = replace(rt, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.to(rt.device, rt.dtype)
    return rt


@dataclass(frozen=True)
class ModelSection:
    """A config of [model] alone: a checkpoint's model settings are checked as a config file's [model] is."""
    model: GPTConfig = field(default_factory=GPTConfig)


def load_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Load a checkpoint's weights into the model its config builds; weights that do not fit it (its config edited,
    or a minigpt that names or shapes them differently) are a one-line error naming the first differences."""
    weights = state["model"]
    mismatch = weights_mismatch(model.state_dict(), weights) if isinstance(weights, dict) else "not a table of weights"
    if not mismatch:
        try:
            model.load_state_dict(weights)
            return
        except RuntimeError as e:  # what the comparison above does not see, e.g. a dtype that cannot be copied
            mismatch = str(e).strip().splitlines()[-1].strip()[:200] if str(e).strip() else type(e).__name__
    raise weights_do_not_fit(path, state, mismatch)


def model_config(path: Path, state: dict) -> GPTConfig:
    """The model config a checkpoint holds, checked as a config file's [model] is: a setting or value this release
    does not take is named, with the release that wrote it, not built."""
    saved = state["config"].get("model", {})
    unknown = sorted(set(saved) - {f.name for f in fields(GPTConfig)})
    if unknown:  # written by another minigpt, with model settings this one cannot build
        raise unknown_settings(path, state, "model settings", unknown, "use")
    try:
        return build_config(ModelSection, {"model": saved}).model
    except (ConfigError, TypeError, ValueError) as e:
        raise UserError(f"{path} holds a model config this minigpt ({minigpt_version()}) cannot build ({e}); it was "
                        f"written by {written_by(state)}: {use_writer(state, 'use')}") from None


def load_for_inference(run: str | Path, checkpoint: str | None = None, device: str = "auto",
                       dtype: str = "auto") -> LoadedRun:
    """The model (eval mode, on the device, in `dtype`: see inference_runtime) and tokenizer of a run: a run folder's
    ckpt.pt ('latest', the default) or best.pt ('best'), or a checkpoint file given itself (e.g. a step-NNNNNNN.pt)."""
    resolve_device(device)  # a bad --device is a one-line error before anything is read
    path = find_checkpoint(run, checkpoint)
    state = load_checkpoint(path)
    model = build_model(model_config(path, state))
    load_weights(model, state, path)
    rt = inference_runtime(model.eval(), device, dtype)
    tokenizer = load_tokenizer(state["tokenizer"])
    data = state.get("data") or {}
    special = SpecialTokens.from_dict(data["special_tokens"]) if data.get("special_tokens") else None
    allowed = None
    if special is not None:  # the tokenizer's ids and the end token; the sentinels for span corruption
        allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=rt.device)
        allowed[:tokenizer.vocab_size] = True
        allowed[special.eos] = True
        if data.get("kind") != "pairs":
            allowed[list(special.sentinels)] = True
    return LoadedRun(model, tokenizer, rt, state["step"], special, allowed)


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). Runs on the logits' device; no host sync."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(token_probs(logits, temperature, top_k, top_p), num_samples=1, generator=generator)


def token_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> the probabilities (B, V) that sample_next_token draws from (temperature > 0): temperature,
    then top-k, then top-p."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return F.softmax(logits, dim=-1)


def decode_one(model: GPT, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               prefix_len: int | None) -> torch.Tensor:
    """The decode step: logits (B, 1, V) for one new token (B, 1) at positions (1,), its keys added to the cache.
    Only tensors change from one token to the next, and none of their shapes, so it compiles to one graph."""
    return model(token, kv_cache=cache, positions=positions, prefix_len=prefix_len)[0]


# A one-token decode step multiplies one row by each weight matrix. On a CPU, oneDNN's bfloat16 matmul re-lays the
# weight out for every such call, which took as long as the product (torch 2.13, 2 cores: 49 against 26 µs for a
# 384 x 1152 weight; the baby GPT decodes 1.2x faster without it). So eager decode steps multiply by copies of the
# weights laid out once, in oneDNN's own blocked format (what inductor's freezing makes): bitwise the same output.
# float32 goes through MKL, which needs no such copy (and was no faster with one).
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> (weight's identity, packed copy)
_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its nn.Linear layers, packed forwards


def packs_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decoding uses packed weights (`packed_linears`): bfloat16 on a CPU with native bf16 and oneDNN."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and cpu_has_bf16())


def _packed_linear(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = linear.weight
    if x.dtype != w.dtype or torch.is_grad_enabled():
        return F.linear(x, w, linear.bias)
    try:
        version = w._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot change in place)
        version = None
    key = (w.data_ptr(), version, w.dtype, w.shape)  # a weight changed in place or replaced: packed again
    entry = _PACKED.get(linear)
    if entry is None or entry[0] != key:
        entry = _PACKED[linear] = key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], linear.bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module) -> Iterator[None]:
    """Within it, every nn.Linear of the model multiplies by its packed weight (see above); nothing changes after."""
    linears = _LINEARS.get(model)
    if linears is None:  # once per model, not once per token
        linears = _LINEARS[model] = [(m, functools.partial(_packed_linear, m)) for m in model.modules()
                                     if type(m) is torch.nn.Linear]
    for m, forward in linears:
        m.forward = forward
    try:
        yield
    finally:
        for m, _ in linears:
            del m.forward


def packed_decode_one(model: GPT, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                      prefix_len: int | None) -> torch.Tensor:
    """decode_one with packed weights (eager, bfloat16 on a CPU)."""
    with packed_linears(model):
        return decode_one(model, token, positions, cache, prefix_len)


@functools.cache
def compiled_decode_one(device_type: str) -> Callable:
    """decode_one compiled once per process: on a GPU replayed as a CUDA graph, a single launch per token
    instead of one per kernel; on a CPU, inductor's fused kernels."""
    return torch.compile(decode_one, mode="reduce-overhead" if device_type == "cuda" else None, dynamic=False)


def prefill_chunk(cfg: GPTConfig) -> int:
    """Tokens per prefill call: a causal sliding window needs only its own keys, so a prompt goes in window-sized
    chunks (a prefix-LM's prefix must see all of itself at once)."""
    return cfg.window if cfg.attn_mask == "causal" else cfg.block_size


def decode_cache(model: GPT, batch_size: int, device: torch.device, dtype: torch.dtype,
                 tokens: int | None = None) -> KVCache:
    """The KV cache decode_steps uses: two prefill chunks' worth of slots, at most block_size, and at most `tokens`,
    the positions one generation takes (its prompt's last block_size tokens and the new ones): an imported model's
    context can be 131,072 positions, whose cache would take gigabytes a 500-token sample never touches. One cache
    can serve several samples in turn (each prefill resets it), so a compiled step keeps the same static tensors."""
    cfg = model.config
    slots = min(cfg.block_size, 2 * prefill_chunk(cfg), tokens or cfg.block_size)
    return KVCache(cfg, batch_size, max_len=slots, device=device, dtype=dtype)


@torch.no_grad()
def decode_steps(model: GPT, prompt: torch.Tensor, max_new_tokens: int, vocab_size: int, *, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 kv_cache: bool | KVCache = True,
                 rt: Runtime | None = None, compile: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B, 1), the logits they were drawn from (B, vocab_size)) once per new token.

    With the cache: prefill the prompt, then feed one token per step. Past block_size tokens:
    - learned positions end at block_size, so the cache cannot slide: when the context is full it moves on by
      half a block and the cache is rebuilt from it, once per half block rather than every token (each token
      sees between half a block and a block of context); the uncached path recomputes the same window;
    - other encodings continue their positions, each token seeing the last block_size (or attn_window) ones;
      the cache overwrites keys older than that, and the uncached path masks them out of the whole sequence.
    A prefix-LM treats the prompt as its prefix. A bidirectional (masked-LM) model predicts a [MASK] appended
    to the context, which every earlier token sees, so nothing can be cached.
    `compile` compiles the one-token step (`decode_one`); the prefill, whose length varies, runs eagerly.
    `kv_cache` may be a cache from `decode_cache` to reuse (as `sample` does for its samples).
    """
    cfg = model.config
    block_size = cfg.block_size
    sliding = cfg.pos_encoding != "learned"
    mask_token = cfg.mask_token
    autocast = rt.autocast() if rt is not None else torch.autocast("cpu", enabled=False)
    idx = prompt[:, -block_size:]
    n_prompt = idx.size(1)
    dtype = rt.dtype if rt is not None else next(model.parameters()).dtype  # keys and values come out of autocast
    chunk = prefill_chunk(cfg)
    cache = None
    if kv_cache is not False and mask_token is None:  # True, or a cache to reuse
        cache = kv_cache if isinstance(kv_cache, KVCache) else decode_cache(model, prompt.size(0), prompt.device,
                                                                             dtype, n_prompt + max_new_tokens)
        if (cache.k.size(1), cache.k.device, cache.k.dtype) != (prompt.size(0), prompt.device, dtype):
            raise ValueError(f"the KV cache is for batch {cache.k.size(1)} on {cache.k.device} in {cache.k.dtype}, "
                             f"not batch {prompt.size(0)} on {prompt.device} in {dtype}")
    step = packed_decode_one if cache is not None and packs_linears(prompt.device, dtype) else decode_one
    if compile and cache is not None:
        step = compiled_decode_one(prompt.device.type)
        for t in (cache.k, cache.v, cache.slot_pos):  # updated in place: a CUDA graph may keep their addresses
            torch._dynamo.mark_static_address(t)
    cuda_graph = compile and cache is not None and prompt.device.type == "cuda"

    room = block_size - (mask_token is not None)  # a masked LM's [MASK] takes one position
    start = 0  # with learned positions, the context is idx[:, start:]
    fresh = True  # the cache holds nothing of the context yet
    token = idx[:, -1:]  # the newest token (a decode step always follows a prefill, which draws one)
    for _ in range(max_new_tokens):
        if not sliding and idx.size(1) - start > room:  # full: move the window on by half a block
            start, fresh = idx.size(1) - max(1, room // 2), True
        context = idx[:, start:]
        prefix = max(0, n_prompt - start)  # the prompt is a prefix-LM's prefix
        with autocast:
            if mask_token is not None:
                masked = torch.cat([context, torch.full_like(context[:, :1], mask_token)], dim=1)
                logits = model(masked, prefix_len=prefix)[0]
            elif cache is None:
                logits = model(context, prefix_len=prefix)[0]
            elif fresh:
                cache.reset()  # learned positions restart at 0 in a rebuilt window
                for part in context.split(chunk, dim=1):  # prefill (or rebuild)
                    logits = model(part, kv_cache=cache, prefix_len=prefix)[0]
                fresh = False
            else:  # decode: the newest token
                if cuda_graph:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are no longer read
                # the token drawn last step, not a slice of idx (whose stride grows: a recompile every step);
                # only a prefix-LM reads prefix_len: passing it otherwise would recompile when the window moves
                logits = step(model, token, cache.claim(1), cache, prefix if cfg.attn_mask == "prefix" else None)
                if cuda_graph:
                    logits = logits.clone()  # the graph's outputs are overwritten by its next replay
        logits = logits[:, -1, :vocab_size].float()  # padded rows (and [MASK]) are never sampled
        token = sample_next_token(logits, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, token], dim=1)
        yield token, logits


def generate(model: GPT, prompt: torch.Tensor, vocab_size: int, sc: SampleConfig, *,
             generator: torch.Generator | None = None, rt: Runtime | None = None,
             stop_token: int | None = None, on_token: Callable[[int], None] | None = None,
             cache: KVCache | None = None) -> list[int]:
    """Generate for a single prompt (1, T); return the new token ids, stopping early at `stop_token`. `cache`: a
    KV cache to reuse (from `decode_cache`) instead of a new one."""
    out = []
    for token, _ in decode_steps(model, prompt, sc.max_new_tokens, vocab_size, temperature=sc.temperature,
                                 top_k=sc.top_k, top_p=sc.top_p, generator=generator,
                                 kv_cache=cache if cache is not None else sc.kv_cache, rt=rt,
                                 compile=sc.compile):
        t = token.item()  # one host sync per token, to stream the text
        if t == stop_token:
            break
        out.append(t)
        if on_token is not None:
            on_token(t)
    return out


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's ids, as Hugging Face's tokenizer gives them (`Tokenizer.encode_prompt`). An empty prompt starts
    from what that gives for "" (a BOS, where the tokenizer adds one), else end-of-text, else a newline."""
    ids = tokenizer.encode_prompt(text)
    if ids:
        return ids
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode("\n")
    except UserError:
        return [0]


def sample(run: LoadedRun, prompt: str, num_samples: int, sc: SampleConfig,
           write: Callable[[str], None] = print) -> list[str]:
    """Generate num_samples texts from the prompt, streaming each through `write` as it is produced."""
    if run.model.config.mask_token is not None and sc.kv_cache:
        print("note: a bidirectional model's tokens see the ones after them, so there is no KV cache to use",
              file=sys.stderr)
    ids = encode_prompt(run.tokenizer, prompt)
    x = torch.tensor([ids], dtype=torch.long, device=run.rt.device)
    generator = torch.Generator(device=run.rt.device).manual_seed(sc.seed)
    # one cache for every sample: a compiled decode step (a CUDA graph) keeps reading the same tensors
    tokens = min(len(ids), run.model.config.block_size) + sc.max_new_tokens  # the most positions a sample takes
    cache = decode_cache(run.model, 1, run.rt.device, run.rt.dtype, tokens) if sc.kv_cache else None
    texts = []
    for i in range(num_samples):
        if i:
            write("\n" + "-" * 40 + "\n")
        write(prompt)
        stream = TextStream(run.tokenizer, ids)  # tokens may split a character, or need the text before them
        # every row of the model's vocabulary, as HF's generate: an imported model's may pass its tokenizer's
        generate(run.model, x, run.model.config.vocab_size, sc, generator=generator, rt=run.rt,
                 stop_token=run.tokenizer.eot_token, cache=cache, on_token=lambda t: write(stream.push(t)))
        write(stream.flush())
        texts.append(prompt + stream.text)
    write("\n")
    return texts


# ----------------------------------------------------------------------------------------------------
# Speculative decoding: a small draft model proposes tokens, the target checks them in one forward pass


def check_draft(run: LoadedRun, draft: LoadedRun, draft_name: str | Path = "the draft") -> None:
    """A draft must decode a token stream with the target's tokenizer, by a causal GPT (as the target)."""
    if run.tokenizer.spec != draft.tokenizer.spec:
        raise UserError(f"--draft {draft_name} uses another tokenizer ({draft.tokenizer.spec.get('kind')}, "
                        f"{draft.tokenizer.vocab_size} ids) than the run ({run.tokenizer.spec.get('kind')}, "
                        f"{run.tokenizer.vocab_size} ids): speculative decoding needs one tokenizer for both")
    for name, r in (("the run", run), (f"--draft {draft_name}", draft)):
        if r.pairs:
            raise UserError(f"--draft applies to a token stream; {name} decodes targets for sources (trained on "
                            "pairs): drop --draft")
        cfg = r.model.config
        if not isinstance(r.model, GPT) or cfg.mask_token is not None or cfg.attn_mask != "causal":
            kind = ("a bidirectional" if cfg.mask_token is not None else "a prefix-LM" if cfg.attn_mask == "prefix"
                    else "not a causal")
            raise UserError(f"--draft needs causal GPTs; {name} is {kind} model: drop --draft")


class CachedReader:
    """One model reading a growing token sequence through its own KV cache, as `decode_steps` reads it: learned
    positions end at block_size, so when the context is full its window moves on by half a block and the cache is
    rebuilt (`move_window`, the rule of decode_steps); other encodings continue their positions, each token seeing
    the last `window` ones, in a ring with room for the window plus every position one check may take back.

    The cache holds seq[start:start + cache.next_pos] at positions 0, 1, ...; `forward` reads the tokens after
    those (up to the sequence's end, plus any proposals), `truncate` forgets the positions of rejected ones."""

    def __init__(self, model: GPT, rt: Runtime | None, max_back: int, tokens: int | None = None):
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        self.autocast = rt.autocast() if rt is not None else torch.autocast("cpu", enabled=False)
        self.learned = cfg.pos_encoding == "learned"
        dtype = rt.dtype if rt is not None else next(model.parameters()).dtype
        # learned: positions stay below block_size, and so do slots (nothing wraps). Otherwise a forward of n
        # tokens overwrites the oldest slots, which must be older than any key a later query reads, even after a
        # rollback of max_back positions: 2 windows + max_back + 1 slots, and forwards of window + max_back + 2 at most
        max_len = cfg.block_size if self.learned else 2 * cfg.window + max_back + 1
        self.chunk = max_len if self.learned else max_len - cfg.window + 1
        if not self.learned and tokens is not None and tokens < max_len:
            # `tokens`: the most the sequence will hold, proposals included. Fewer slots than the ring needs never
            # wrap (an imported model's window can be 131,072 positions: its ring would take gigabytes)
            max_len = self.chunk = tokens
        self.cache = KVCache(cfg, 1, max_len=max_len, device=self.device, dtype=dtype)
        self.packed = packs_linears(self.device, dtype)  # the forwards of a few tokens, as decode_steps's
        self.start = 0

    def reset(self) -> None:
        self.cache.reset()
        self.start = 0

    def move_window(self, length: int) -> None:
        """Before reading a sequence of `length` tokens: past block_size (learned positions), move on by half a
        block, as decode_steps does."""
        room = self.cfg.block_size
        if self.learned and length - self.start > room:
            self.start = length - max(1, room // 2)
            self.cache.reset()

    def room(self, length: int) -> int:
        """How many more tokens than `length` fit the current window (learned positions)."""
        return self.cfg.block_size + self.start - length if self.learned else 1 << 30

    def forward(self, seq: list[int], extra: list[int], rows: int, vocab_size: int) -> torch.Tensor:
        """Logits (rows, vocab_size) at the last `rows` of seq + extra, reading what the cache lacks."""
        tokens = seq[self.start + self.cache.next_pos:] + extra
        head, tail = tokens[:len(tokens) - rows], tokens[len(tokens) - rows:]
        with self.autocast:
            for i in range(0, len(head), self.chunk):
                self.model(torch.tensor([head[i:i + self.chunk]], device=self.device), kv_cache=self.cache)
            with packed_linears(self.model) if self.packed else contextlib.nullcontext():
                out = self.model(torch.tensor([tail], device=self.device), kv_cache=self.cache)[0]
        return out[0, :, :vocab_size].float()  # padded ids are never drawn

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens of the sequence (forget the positions after them)."""
        n = length - self.start
        if self.cache.next_pos > n:
            self.cache.slot_pos.masked_fill_(self.cache.slot_pos >= n, -1)
            self.cache.next_pos = n


class SpeculativeDecoder:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batch 1.

    Each `step`: the draft proposes k tokens one at a time through its KV cache, drawing d_i from q_i; the target
    reads its pending token and the k proposals in one forward through its own cache, giving p_1 .. p_k+1. Proposal
    d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from
    norm(max(0, p_i - q_i)) instead and the step ends; when all k are accepted, one more is drawn from p_k+1. p and
    q are the distributions `sample_next_token` draws from (temperature, top-k, top-p), so every emitted token has
    exactly the target's distribution. At temperature 0 a proposal is accepted iff it is the target's argmax, and
    the correction is that argmax: the output is the target's greedy output, token for token.

    Both caches hold every token but the newest; after a rejection both are cut back to that. The target reads
    every token in the context a plain run would (`CachedReader`): with learned positions k shrinks so that the
    step's tokens share one window, and where the window must move first the step reads one token without the
    draft (k = 0), as decode_steps does there."""

    def __init__(self, target: GPT, draft: GPT, vocab_size: int, draft_tokens: int = 4, *, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 target_rt: Runtime | None = None, draft_rt: Runtime | None = None, tokens: int | None = None):
        """`tokens`: the most a generation will hold (prompt and new tokens), to size the caches no larger."""
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.vocab_size, self.draft_tokens = vocab_size, draft_tokens
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        most = None if tokens is None else tokens + draft_tokens + 1  # a check reads k proposals past the end
        self.target = CachedReader(target, target_rt, draft_tokens, most)
        self.draft = CachedReader(draft, draft_rt, draft_tokens, most)
        self.device = self.target.device
        self.proposed = self.accepted = self.forwards = self.emitted = 0
        self.seq: list[int] = []

    def start(self, prompt: list[int]) -> None:
        self.seq = list(prompt[-self.target.cfg.block_size:])  # as decode_steps crops the prompt
        self.target.reset()
        self.draft.reset()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return token_probs(logits, self.temperature, self.top_k, self.top_p)

    @torch.no_grad()
    def step(self, k: int | None = None) -> list[int]:
        """Propose up to k (default draft_tokens) tokens and check them; return the tokens emitted (the accepted
        ones plus one)."""
        n = len(self.seq)
        self.target.move_window(n)
        self.draft.move_window(n)
        # the target reads lengths n .. n + k in its window, the draft n .. n + k - 1 in its own
        k = max(0, min(self.draft_tokens if k is None else k, self.target.room(n), self.draft.room(n) + 1))
        greedy = self.temperature == 0
        proposals, qs = [], []
        for _ in range(k):
            logits = self.draft.forward(self.seq, proposals[-1:], 1, self.vocab_size)
            if greedy:
                proposals.append(int(logits.argmax()))
            else:
                q = self._probs(logits)
                qs.append(q[0])
                proposals.append(int(torch.multinomial(q, 1, generator=self.generator)))
        logits = self.target.forward(self.seq, proposals, k + 1, self.vocab_size)  # (k + 1, V)
        if greedy:
            best = logits.argmax(dim=-1).tolist()
            a = 0
            while a < k and proposals[a] == best[a]:
                a += 1
            token = best[a]
        else:
            p = self._probs(logits)  # (k + 1, V)
            a = 0
            if k:
                q, rows = torch.stack(qs), torch.arange(k, device=self.device)
                d = torch.tensor(proposals, device=self.device)
                u = torch.rand(k, generator=self.generator, device=self.device)
                accept = u * q[rows, d] < p[rows, d]  # u < p / q: probability min(1, p / q)
                a = int(accept.long().cumprod(0).sum())  # the accepted prefix
            if a < k:
                residual = (p[a] - q[a]).clamp_min(0)
                if not residual.sum() > 0:  # p == q up to rounding: no mass left over (a rejection is then ~never)
                    residual = p[a]
                token = int(torch.multinomial(residual / residual.sum(), 1, generator=self.generator))
            else:
                token = int(torch.multinomial(p[k], 1, generator=self.generator))
        out = proposals[:a] + [token]
        self.seq += out
        self.target.truncate(n + a)  # both hold the new sequence but its newest token, at most
        self.draft.truncate(n + a)
        self.proposed += k
        self.accepted += a
        self.forwards += 1
        self.emitted += len(out)
        return out

    def summary(self) -> str:
        rate = f" ({100 * self.accepted / self.proposed:.0f}%)" if self.proposed else ""
        per = self.emitted / self.forwards if self.forwards else 0.0
        return (f"draft: {self.accepted}/{self.proposed} proposed tokens accepted{rate}, "
                f"{per:.1f} tokens per target forward")


def generate_speculative(dec: SpeculativeDecoder, prompt: list[int], max_new_tokens: int, *,
                         stop_token: int | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """`generate` with a draft: the new token ids for one prompt, up to max_new_tokens or `stop_token` (left out)."""
    dec.start(prompt)
    out: list[int] = []
    while True:
        for t in dec.step():
            if t == stop_token:
                return out
            out.append(t)
            if on_token is not None:
                on_token(t)
            if len(out) == max_new_tokens:
                return out


def sample_speculative(run: LoadedRun, draft: LoadedRun, prompt: str, num_samples: int, sc: SampleConfig,
                       draft_tokens: int = 4, write: Callable[[str], None] = print,
                       log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[str]:
    """`sample` with a draft model proposing `draft_tokens` at a time; the acceptance rate goes to `log`."""
    if draft_tokens < 1:
        raise UserError(f"--draft-tokens must be >= 1, got {draft_tokens}")
    check_draft(run, draft)
    ids = encode_prompt(run.tokenizer, prompt)
    generator = torch.Generator(device=run.rt.device).manual_seed(sc.seed)
    dec = SpeculativeDecoder(run.model, draft.model, run.tokenizer.vocab_size, draft_tokens,
                             temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p, generator=generator,
                             target_rt=run.rt, draft_rt=draft.rt, tokens=len(ids) + sc.max_new_tokens)
    texts = []
    for i in range(num_samples):
        if i:
            write("\n" + "-" * 40 + "\n")
        write(prompt)
        stream = TextStream(run.tokenizer, ids)
        generate_speculative(dec, ids, sc.max_new_tokens, stop_token=run.tokenizer.eot_token,
                             on_token=lambda t: write(stream.push(t)))
        write(stream.flush())
        texts.append(prompt + stream.text)
    write("\n")
    log(dec.summary())
    return texts


# ----------------------------------------------------------------------------------------------------
# Pairs: the target for a source, from a model trained on (source, target) pairs, or on T5's span corruption


class PairDecoder:
    """Decodes targets for one source, `rows` at a time (samples or beams): a `beam_search.Decoder`.

    An encoder-decoder encodes the source once and keeps every layer's cross-attention keys and values, expanded
    once to the rows; its decoder starts from the start token. A decoder-only model prefills `source <sep>` (a
    prefix-LM's prefix). Self-attention then goes through a KV cache, whose rows are reordered when beams are;
    without the cache every step recomputes the whole target so far (the reference the cache is tested against).
    Only the tokenizer's tokens and the end token can be chosen (span corruption's sentinels too, for a model
    trained on it)."""

    def __init__(self, model: GPT | EncoderDecoder, source: list[int], special: SpecialTokens, allowed: torch.Tensor,
                 rt: Runtime | None = None, kv_cache: bool = True):
        self.model, self.special, self.kv_cache = model, special, kv_cache
        self.allowed = allowed  # (V,) bool over the ids a target may hold
        self.device = next(model.parameters()).device
        self.dtype = rt.dtype if rt is not None else next(model.parameters()).dtype
        self.autocast = rt.autocast() if rt is not None else torch.autocast("cpu", enabled=False)
        self.encoder_decoder = model.config.arch == "encoder_decoder"
        self.source = torch.tensor([source], dtype=torch.long, device=self.device)  # (1, S)
        self.prompt = [special.bos] if self.encoder_decoder else [*source, special.sep]
        self.cache: KVCache | None = None

    @property
    def max_new_tokens(self) -> int:
        """Tokens that fit in the decoder's context after the prompt (the last one is predicted, never read)."""
        return self.model.config.block_size - len(self.prompt) + 1

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            if self.encoder_decoder:
                out = self.model.decode(tokens, self.cross, self.cache)[0]
            else:  # the prompt is a prefix-LM's prefix
                out = self.model(tokens, kv_cache=self.cache, prefix_len=len(self.prompt))[0]
        out = out[:, -1, :len(self.allowed)].float()
        return out.masked_fill(~self.allowed, float("-inf"))

    def start(self, rows: int) -> torch.Tensor:
        self.tokens = torch.tensor([self.prompt], dtype=torch.long, device=self.device).expand(rows, -1)
        if self.encoder_decoder:
            with self.autocast:
                self.cross = self.model.cross_cache(self.model.encode(self.source)).expand(rows)
        if self.kv_cache:
            self.cache = KVCache(self.model.config, rows, device=self.device, dtype=self.dtype)
        return self.logits(self.tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        return self.logits(tokens if self.cache is not None else self.tokens)

    def reorder(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, rows)
        if self.cache is not None:  # only the self-attention cache: every row reads the same source
            self.cache.k = self.cache.k.index_select(1, rows)
            self.cache.v = self.cache.v.index_select(1, rows)


def sample_rows(decoder: PairDecoder, rows: int, max_new_tokens: int, eos: int, temperature: float, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """`rows` targets decoded side by side (greedy at temperature 0), each up to its end token (left out)."""
    logits = decoder.start(rows)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for i in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (rows, 1)
        for r, t in enumerate(token[:, 0].tolist()):  # one host sync per token
            done[r] = done[r] or t == eos
            if not done[r]:
                out[r].append(t)
        if all(done) or i == max_new_tokens - 1:
            return out
        logits = decoder.step(token)
    return out


def target_ids(run: LoadedRun, source: list[int], sc: SampleConfig, num_samples: int = 1, beams: int = 0,
               length_penalty: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Targets for a source's ids: num_samples sampled (greedy at temperature 0) or, with beams >= 2, the
    num_samples best of a beam search. Beam search with one beam is greedy decoding (as in Hugging Face)."""
    special = run.special
    decoder = PairDecoder(run.model, source, special, run.allowed, run.rt, kv_cache=sc.kv_cache)
    max_new = min(sc.max_new_tokens, decoder.max_new_tokens)
    if max_new < 1:
        raise UserError(f"a source of {len(source)} tokens leaves no room for a target in the model's context "
                        f"(block_size {run.model.config.block_size}); shorten it")
    if beams >= 2:
        return [h.tokens for h in beam_search(decoder, beams, max_new, special.eos, length_penalty)[:num_samples]]
    temperature = 0.0 if beams == 1 else sc.temperature
    return sample_rows(decoder, num_samples, max_new, special.eos, temperature, sc.top_k, sc.top_p, generator)


def decode_target(run: LoadedRun, ids: list[int]) -> str:
    """A target's text; span corruption's sentinels written as T5 writes them, <extra_id_N>."""
    special, text, run_ids = run.special, [], []
    for t in ids:
        if t < run.tokenizer.vocab_size:
            run_ids.append(t)
            continue
        text.append(run.tokenizer.decode(run_ids))
        run_ids = []
        text.append(f"<extra_id_{special.sentinels.index(t)}>" if t in special.sentinels else "")
    return "".join(text) + run.tokenizer.decode(run_ids)


def check_source(run: LoadedRun, source: list[int]) -> None:
    cfg = run.model.config
    limit, option = ((cfg.source_size, "source_block_size") if cfg.arch == "encoder_decoder"
                     else (cfg.block_size - 1, "block_size"))
    if len(source) > limit:
        raise UserError(f"the source is {len(source)} tokens, longer than the model reads ({limit}, model.{option}); "
                        "shorten it")
    if not source:
        raise UserError("the source is empty: pass --prompt SOURCE")


def check_beam_options(beams: int | None, length_penalty: float | None) -> None:
    """--beams and --length-penalty, as sample and eval take them (None: not given)."""
    if beams is not None and beams < 1:
        raise UserError(f"--beams must be >= 1 (1 = greedy), got {beams}")
    if length_penalty is not None:
        if beams is None:
            raise UserError("--length-penalty ranks the hypotheses of a beam search: add --beams K")
        if not math.isfinite(length_penalty):
            raise UserError(f"--length-penalty must be a finite number, got {length_penalty}")


def sample_targets(run: LoadedRun, source: str, num_samples: int, sc: SampleConfig, beams: int = 0,
                   length_penalty: float = 1.0, write: Callable[[str], None] = print) -> list[str]:
    """The decoded targets for a source, one line each (`sample` on a run trained on pairs)."""
    ids = run.tokenizer.encode(source)
    check_source(run, ids)
    generator = torch.Generator(device=run.rt.device).manual_seed(sc.seed)
    texts = [decode_target(run, t) for t in target_ids(run, ids, sc, num_samples, beams, length_penalty, generator)]
    for text in texts:
        write(text + "\n")
    return texts

if __name__ == "__main__":
    from cli.main import app

    app(["sample", *sys.argv[1:]], prog_name="sample.py")
