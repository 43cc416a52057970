"""What a model configuration costs, before training it: parameters, FLOPs, KV cache and activation memory.

Pure functions of a `GPTConfig` (plus a batch size and a dtype name: "auto" is what training picks on this
machine); `minigpt inspect` calls `inspect_model` and prints `format_report` of it (or the dict itself as JSON).
Top to bottom:

    parameters    counted from the real model (a GPT or an encoder-decoder) built on the meta device (no memory,
                  exact), grouped by name
    FLOPs         the model's own `flops_per_token`: one formula for training (6·N + attention), forward = ⅓;
                  an encoder-decoder's per target token, its encoder's share spread over the target
    KV cache      2 (k and v) · layers · kv heads · head size · bytes, per token and for the positions a sampler
                  allocates (a sliding window's: min(block, 2 × window)), next to plain multi-head attention
                  without a window; an encoder-decoder's decoder also keeps every layer's cross-attention keys
                  and values of the source (`cross_cache_bytes`)
    activations   an estimate of what one training micro-batch keeps for the backward pass, with and
                  without gradient checkpointing (Korthikanti et al. 2022, adapted; see `activation_bytes`,
                  and `encoder_decoder_activation_bytes` for both stacks and cross-attention)
"""

from __future__ import annotations

import torch

import runtime
from encoder_decoder import EncoderDecoder, build_model, encoder_config
from model import GPT, GPTConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def auto_dtype(cfg: GPTConfig, device: str = "auto") -> tuple[str, str]:
    """What run.dtype = "auto" trains this model in on `device` (run.device; auto: this machine's default), and
    where: the rule of runtime.setup_runtime (a CUDA GPU: bfloat16, or float16 where it lacks bfloat16; a CPU:
    bfloat16 when it multiplies it natively and the model is at least CPU_BF16_MIN_WIDTH wide, else float32;
    MPS: float32)."""
    kind = device.partition(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():  # training would refuse; report what a GPU picks
            return "bfloat16", "a CUDA GPU (this machine has none)"
        return ("bfloat16" if torch.cuda.is_bf16_supported() else "float16"), "this machine's GPU"
    if kind == "mps":
        return "float32", "MPS"
    if not runtime.cpu_has_bf16():
        return "float32", "this CPU, which has no native bfloat16"
    if cfg.n_embd < runtime.CPU_BF16_MIN_WIDTH:
        return "float32", f"this CPU for a model under {runtime.CPU_BF16_MIN_WIDTH} wide"
    return "bfloat16", "this CPU, which multiplies bfloat16 natively"


def resolve_dtype(name: str, cfg: GPTConfig, device: str = "auto") -> tuple[str, str | None]:
    """The dtype to report for run.dtype `name`, and for "auto" a note saying which one training picks on
    `device` (`auto_dtype`) and, off a GPU, what a GPU would pick."""
    if name == "auto":
        dtype, where = auto_dtype(cfg, device)
        note = f"run.dtype is auto: reporting for {dtype}, what training picks on {where}"
        if "GPU" not in where:
            note += "; a CUDA GPU picks bfloat16 (float16 where it lacks it)"
        return dtype, note
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; expected auto or one of {', '.join(DTYPE_BYTES)}")
    return name, None


def describe(cfg: GPTConfig) -> str:
    """One line naming the model, e.g. '4 layers, 4 heads (kv 2), 128 wide, block 64, rope, rmsnorm pre, swiglu';
    an encoder-decoder's begins 'encoder-decoder, 3 encoder + 3 decoder layers' and names its source length."""
    heads = f"{cfg.n_head} heads" + (f" (kv {cfg.kv_heads})" if cfg.kv_heads != cfg.n_head else "")
    if cfg.arch == "encoder_decoder":
        parts = ["encoder-decoder", f"{cfg.encoder_layers} encoder + {cfg.n_layer} decoder layers", heads,
                 f"{cfg.n_embd} wide", f"source {cfg.source_size}", f"block {cfg.block_size}"]
    else:
        parts = [f"{cfg.n_layer} layers", heads, f"{cfg.n_embd} wide", f"block {cfg.block_size}"]
    if cfg.window < cfg.block_size:
        parts.append(f"window {cfg.window}")
    parts += [cfg.pos_encoding, f"{cfg.norm} {cfg.norm_placement}", cfg.mlp]
    if cfg.n_experts:
        parts.append(f"{cfg.n_experts} experts top-{cfg.experts_per_token}")
    if cfg.qk_norm:
        parts.append("qk-norm")
    if cfg.attn_mask != "causal":
        parts.append(cfg.attn_mask)
    parts.append(f"vocab {cfg.vocab_size}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Parameters


def meta_model(cfg: GPTConfig) -> GPT | EncoderDecoder:
    """The real model with shapes but no storage: exact counts for any size, instantly."""
    with torch.device("meta"):
        return build_model(cfg)


def component(name: str) -> str:
    """The report's group of a parameter name (the LM head is tied to wte, so it has no name of its own)."""
    if name.startswith("wte."):
        return "token_embedding"
    if name.startswith("wpe."):
        return "position_embedding"
    if name.startswith("lm_head."):  # named only where untied (model.tie_embeddings = false)
        return "output_layer"
    if ".attn." in name:  # c_attn, c_proj and the q/k norms
        return "attention"
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp." in name:
        return "mlp"
    if name.startswith("ln_f.") or ".ln_" in name:
        return "norms"
    return "other"  # a parameter this report does not know yet: still counted in the total


def encoder_decoder_component(name: str) -> str:
    """`component` for an encoder-decoder: both position tables are position_embedding; attention and MLPs are
    told apart by stack (encoder_attention, decoder_attention = the decoder's self-attention, cross_attention with
    its own qk norms, encoder_/decoder_ mlp, experts, router); every norm is in norms."""
    if name.startswith("encoder_wpe."):
        return "position_embedding"
    if name.startswith("encoder_ln_f."):
        return "norms"
    if ".cross." in name:
        return "cross_attention"
    key = component(name)
    if key in ("attention", "mlp", "experts", "router"):
        return ("encoder_" if name.startswith("encoder.") else "decoder_") + key
    return key


def count_params(cfg: GPTConfig, model: GPT | EncoderDecoder | None = None) -> dict[str, int]:
    """Parameters by component, their `total` (= num_params(non_embedding=False)) and `active`: what one token
    uses (all of them, but with experts only experts_per_token of each layer's experts)."""
    model = model or meta_model(cfg)
    mlp = ["experts", "router"] if cfg.n_experts else ["mlp"]
    if cfg.arch == "encoder_decoder":
        order = ["token_embedding", "position_embedding", "encoder_attention", *(f"encoder_{k}" for k in mlp),
                 "decoder_attention", "cross_attention", *(f"decoder_{k}" for k in mlp), "norms"]
        name_group = encoder_decoder_component
    else:
        order, name_group = ["token_embedding", "position_embedding", "attention", *mlp, "norms"], component
    groups = dict.fromkeys(order, 0)
    for name, p in model.named_parameters():  # shared tensors (the tied LM head) are listed once
        key = name_group(name)
        groups[key] = groups.get(key, 0) + p.numel()
    if cfg.pos_encoding != "learned":
        del groups["position_embedding"]
    total = sum(groups.values())
    unused_experts = model.num_params() - model.active_params()  # 0 for a dense model
    return {**groups, "total": total, "active": total - unused_experts}


# ----------------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(cfg: GPTConfig, model: GPT | EncoderDecoder | None = None) -> dict[str, float]:
    """Forward and training (forward + backward = 3 × forward) FLOPs per token at a full context, from the
    model's own formula: 2 per active weight per token forward, plus the score and value matmuls over the
    keys each query sees (at most the window). An encoder-decoder's are per target token, for targets of
    block_size tokens with sources of source_size: the encoder's work on a source is spread over its target, and
    each target token's queries also see the source's keys in cross-attention."""
    model = model or meta_model(cfg)
    if cfg.arch != "encoder_decoder":
        training = float(model.flops_per_token(cfg.block_size))
        return {"forward": training / 3, "training": training, "keys_per_query": min(cfg.block_size, cfg.window)}
    training = float(model.flops_per_token(cfg.block_size, cfg.source_size))
    return {"forward": training / 3, "training": training, "keys_per_query": min(cfg.block_size, cfg.window),
            "target_len": cfg.block_size, "source_len": cfg.source_size}


# ----------------------------------------------------------------------------------------------------
# KV cache


def format_ratio(r: float) -> str:
    return f"{r:.1f}x" if float(r).is_integer() else f"{r:.3g}x"


def sampler_cache_slots(cfg: GPTConfig) -> int:
    """The positions per row of the KV cache a sampler allocates (model.KVCache's max_len). `minigpt sample`
    (sample.decode_cache) keeps two prefill chunks: a causal sliding window's prompt goes in a window at a time,
    and the window - 1 keys before a chunk must survive its writes, so min(block_size, 2 x window) slots; a
    prefix-LM prefills its whole block at once (block_size). Pair decoding (sample.PairDecoder: an
    encoder-decoder's decoder, or a decoder-only model trained on pairs) keeps block_size."""
    if cfg.arch == "encoder_decoder" or cfg.attn_mask != "causal":
        return cfg.block_size
    return min(cfg.block_size, 2 * cfg.window)


def kv_cache_bytes(cfg: GPTConfig, batch_size: int, dtype: str) -> dict:
    """Bytes of keys and values that sampling keeps, per token and for a full context, beside plain
    multi-head attention (kv heads = heads, no window). A full context is the cache the sampler allocates,
    `sampler_cache_slots`: block_size positions, or with a sliding window min(block_size, 2 x window)
    (model.KVCache's ring overwrites keys no query needs any more, but a prefill chunk of a window needs room
    beside the window before it), so a window saves block_size / (2 x window), not block_size / window.
    `context` is what one query sees, min(block_size, window)."""
    elem = DTYPE_BYTES[dtype]
    per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_size * elem
    mha_per_token = 2 * cfg.n_layer * cfg.n_head * cfg.head_size * elem
    context = min(cfg.block_size, cfg.window)
    slots = sampler_cache_slots(cfg)
    full = per_token * slots * batch_size
    mha_full = mha_per_token * cfg.block_size * batch_size
    savings = []
    if cfg.kv_heads != cfg.n_head:
        kind = "MQA" if cfg.kv_heads == 1 else "GQA"
        savings.append(f"{kind} {cfg.kv_heads}/{cfg.n_head} heads: {format_ratio(cfg.n_head / cfg.kv_heads)} smaller")
    if slots < cfg.block_size:
        savings.append(f"window {context}/{cfg.block_size}, {slots} slots: {format_ratio(cfg.block_size / slots)} smaller")
    elif context < cfg.block_size:
        savings.append(f"window {context}/{cfg.block_size}: none, the sampler keeps {slots} slots")
    return {
        "dtype": dtype,
        "bytes_per_token": per_token,
        "context": context,
        "slots": slots,
        "batch_size": batch_size,
        "bytes_full_context": full,
        "mha_bytes_per_token": mha_per_token,
        "mha_bytes_full_context": mha_full,
        "ratio_vs_mha": mha_full / full,
        "savings": savings,
    }


def cross_cache_bytes(cfg: GPTConfig, batch_size: int, dtype: str) -> dict:
    """An encoder-decoder's other cache for decoding: every decoder layer's cross-attention keys and values of
    the encoder's output (EncoderDecoder.cross_cache), computed once per source and read by every target token,
    n_layer · 2 · kv heads · head size · source_size values for a full source. PairDecoder repeats them for each
    row (beam or sample) of one source: `batch_size` sources or rows in all."""
    elem = DTYPE_BYTES[dtype]
    values = cfg.n_layer * 2 * cfg.kv_heads * cfg.head_size * cfg.source_size
    return {
        "dtype": dtype,
        "source_len": cfg.source_size,
        "batch_size": batch_size,
        "values_per_source": values,
        "bytes_per_source_token": values // cfg.source_size * elem,
        "bytes_per_source": values * elem,
        "bytes_full_batch": values * elem * batch_size,
    }


# ----------------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(cfg: GPTConfig, batch_size: int, dtype: str) -> int:
    """What one block keeps for its backward pass, in bytes (an estimate).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1) count,
    per layer of a GPT-2 block in 16-bit without flash attention, B·T·C·(34 + 5·nh·T/C) bytes. The same
    terms, with e bytes per element of the run's dtype, kv heads, our MLP width and dropout only when on:
        norms         2 inputs                                2·e·C       per token
        attention     c_attn input, q, k, v, c_proj input     e·(3C + 2·kvC)   (+ q, k before qk-norm)
        scores        softmax output (nh·T per token)         e·nh·T; with dropout + its mask and output
        MLP           input, c_fc output, activation output   e·(C + 2H); SwiGLU keeps 4 H-wide tensors;
                      experts: each token's k experts, their inputs and outputs, and the router's probabilities
        dropout       masks of the two residual branches      2·C bytes (1 byte each), with dropout only
    With e = 2, kvC = C, H = 4C and dropout this is exactly Korthikanti's 34 + 5·nh·T/C. The T×T scores are
    what flash attention (SDPA's fused kernels) would not keep: on those the estimate is high.
    """
    e = DTYPE_BYTES[dtype]
    N, T, C = batch_size * cfg.block_size, cfg.block_size, cfg.n_embd
    kvC, H = cfg.kv_heads * cfg.head_size, cfg.hidden_size
    dropout = cfg.dropout > 0
    norms = 2 * N * C * e
    attention = N * e * (3 * C + 2 * kvC) + (N * e * (C + kvC) if cfg.qk_norm else 0)
    scores = batch_size * cfg.n_head * T * T * (e + (1 + e if dropout else 0))
    hidden = 4 if cfg.mlp == "swiglu" else 2  # (c_fc out, act out) or (c_fc out, silu out, gate out, product)
    if cfg.n_experts:
        k = cfg.experts_per_token
        mlp = N * e * C * (1 + 2 * k) + k * N * e * H * hidden + N * cfg.n_experts * 4
    else:
        mlp = N * e * (C + hidden * H)
    masks = 2 * N * C if dropout else 0
    return norms + attention + scores + mlp + masks


def activation_bytes(cfg: GPTConfig, batch_size: int, dtype: str) -> dict:
    """Peak activation memory of one training micro-batch (batch_size × block_size tokens), an estimate:
    every layer's activations (see `layer_activation_bytes`), the final norm's input and the LM head's input,
    and the float32 logits the loss reads (B·T·V·4). With gradient checkpointing each layer keeps only its
    input (B·T·C) and one layer's activations exist at a time, recomputed in the backward pass.
    Weights, gradients and optimizer state are not included."""
    e = DTYPE_BYTES[dtype]
    N = batch_size * cfg.block_size
    layer = layer_activation_bytes(cfg, batch_size, dtype)
    head = 2 * N * cfg.n_embd * e  # ln_f's input and the LM head's input
    logits = N * cfg.padded_vocab_size * 4
    return {
        "dtype": dtype,
        "batch_size": batch_size,
        "tokens": N,
        "per_layer": layer,
        "logits": logits,
        "bytes": cfg.n_layer * layer + head + logits,
        "bytes_with_checkpointing": cfg.n_layer * N * cfg.n_embd * e + layer + head + logits,
        "checkpointing_on": cfg.grad_checkpointing,
    }


def cross_attention_activation_bytes(cfg: GPTConfig, batch_size: int, dtype: str) -> tuple[int, int]:
    """What one decoder layer's cross-attention keeps for its backward pass (an estimate, in the terms of
    `layer_activation_bytes`), for targets of block_size and sources of source_size tokens: (inside the block,
    outside it). Inside: its norm's input, c_q's input, q (and q before its qk-norm), c_proj's input, the
    nh·T·S scores (with dropout their mask and output) and the residual dropout's mask. Outside: the source's
    keys and values (and k before its qk-norm), which `cross_cache` computes before the decoder's blocks run, so
    gradient checkpointing does not free them. The encoder's output they are made from is counted once, in
    `encoder_decoder_activation_bytes`."""
    e = DTYPE_BYTES[dtype]
    N, M, C = batch_size * cfg.block_size, batch_size * cfg.source_size, cfg.n_embd
    kvC = cfg.kv_heads * cfg.head_size
    dropout = cfg.dropout > 0
    inside = N * e * 4 * C + (N * e * C if cfg.qk_norm else 0)  # norm input, c_q input, q, c_proj input
    inside += batch_size * cfg.n_head * cfg.block_size * cfg.source_size * (e + (1 + e if dropout else 0))
    inside += N * C if dropout else 0
    outside = M * e * 2 * kvC + (M * e * kvC if cfg.qk_norm else 0)
    return inside, outside


def encoder_decoder_activation_bytes(cfg: GPTConfig, batch_size: int, dtype: str) -> dict:
    """`activation_bytes` for an encoder-decoder, micro-batches of batch_size targets of block_size tokens and
    sources of source_size (the longest: batches are padded to their longest example). The encoder's layers are
    `layer_activation_bytes` of its own config (bidirectional, S positions); each decoder layer is a GPT layer
    (causal self-attention and MLP) plus its cross-attention (`cross_attention_activation_bytes`); the encoder's
    final norm input and its output (every layer's c_kv input) are counted like the decoder's head (2·B·S·C),
    then the decoder's head and float32 logits. With gradient checkpointing each layer keeps its input, the
    cross-attention keys and values stay, and one layer's activations (the larger stack's) exist at a time."""
    e = DTYPE_BYTES[dtype]
    enc = encoder_config(cfg)
    N, M = batch_size * cfg.block_size, batch_size * cfg.source_size
    encoder_layer = layer_activation_bytes(enc, batch_size, dtype)
    cross_inside, cross_kv = cross_attention_activation_bytes(cfg, batch_size, dtype)
    decoder_inside = layer_activation_bytes(cfg, batch_size, dtype) + cross_inside
    tails = 2 * M * cfg.n_embd * e + 2 * N * cfg.n_embd * e  # encoder: ln_f input, output; decoder: ln_f, LM head
    logits = N * cfg.padded_vocab_size * 4
    kept = enc.n_layer * encoder_layer + cfg.n_layer * (decoder_inside + cross_kv)
    inputs = enc.n_layer * M * cfg.n_embd * e + cfg.n_layer * (N * cfg.n_embd * e + cross_kv)
    return {
        "dtype": dtype,
        "batch_size": batch_size,
        "tokens": N,
        "source_tokens": M,
        "per_layer": decoder_inside + cross_kv,
        "per_encoder_layer": encoder_layer,
        "logits": logits,
        "bytes": kept + tails + logits,
        "bytes_with_checkpointing": inputs + max(encoder_layer, decoder_inside) + tails + logits,
        "checkpointing_on": cfg.grad_checkpointing,
    }


# ----------------------------------------------------------------------------------------------------
# The report


def inspect_model(cfg: GPTConfig, batch_size: int, dtype: str = "auto", notes: list[str] = (),
                  device: str = "auto") -> dict:
    """Everything above as one plain dict (what `minigpt inspect --json` prints); `device` (run.device) only
    decides what dtype = "auto" is."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    dtype, dtype_note = resolve_dtype(dtype, cfg, device)
    model = meta_model(cfg)
    encoder_decoder = cfg.arch == "encoder_decoder"
    report = {
        "model": describe(cfg),
        "params": count_params(cfg, model),
        "flops_per_token": flops_per_token(cfg, model),
        "kv_cache": kv_cache_bytes(cfg, batch_size, dtype),  # an encoder-decoder's: its decoder's self-attention
    }
    if encoder_decoder:
        report["cross_attention_cache"] = cross_cache_bytes(cfg, batch_size, dtype)
    activations = encoder_decoder_activation_bytes if encoder_decoder else activation_bytes
    report["activations"] = activations(cfg, batch_size, dtype)
    report["notes"] = [*notes, *([dtype_note] if dtype_note else [])]
    return report


PARAM_LABELS = {
    "token_embedding": "token embedding (LM head tied: +0)",
    "position_embedding": "position embedding (learned)",
    "output_layer": "output layer (untied)",
    "attention": "attention (c_attn, c_proj, qk norms)",
    "encoder_attention": "encoder self-attention",
    "decoder_attention": "decoder self-attention (causal)",
    "cross_attention": "cross-attention (c_q, c_kv, c_proj, qk norms)",
    "encoder_mlp": "encoder MLP",
    "decoder_mlp": "decoder MLP",
    "encoder_experts": "encoder experts (all of them)",
    "decoder_experts": "decoder experts (all of them)",
    "encoder_router": "encoder router",
    "decoder_router": "decoder router",
    "mlp": "MLP",
    "experts": "experts (all of them)",
    "router": "router",
    "norms": "norms",
    "other": "other",
    "total": "total",
    "active": "active per token",
}


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(report: dict) -> str:
    """The report as an aligned text table: a title line, then one section per quantity."""
    params, flops, kv, act = report["params"], report["flops_per_token"], report["kv_cache"], report["activations"]
    cross = report.get("cross_attention_cache")  # an encoder-decoder's
    rows: list[tuple[str, str, str] | str] = ["parameters"]
    for key, n in params.items():
        label = PARAM_LABELS.get(key, key)
        if cross and key == "position_embedding":
            label = "position embeddings (learned: encoder, decoder)"
        rows.append((label, f"{n:,}", human_count(n)))
    if cross:
        rows.append(f"FLOPs per target token (targets of {flops['target_len']} tokens, sources of {flops['source_len']}; "
                    f"each query sees {flops['keys_per_query']} keys and {flops['source_len']} source keys)")
    else:
        rows.append(f"FLOPs per token (each query sees {flops['keys_per_query']} keys)")
    rows.append(("forward", f"{flops['forward']:,.0f}", human_count(flops["forward"])))
    rows.append(("training (3 x forward)", f"{flops['training']:,.0f}", human_count(flops["training"])))
    rows.append(f"{'decoder self-attention ' if cross else ''}KV cache for sampling ({kv['dtype']}, batch {kv['batch_size']})")
    rows.append(("per token", f"{kv['bytes_per_token']:,}", human_bytes(kv["bytes_per_token"])))
    full = (f"full context ({kv['slots']} tokens)" if kv["slots"] == kv["context"] else
            f"full context ({kv['slots']} slots, window {kv['context']})")
    rows.append((full, f"{kv['bytes_full_context']:,}", human_bytes(kv["bytes_full_context"])))
    rows.append(("plain multi-head, per token", f"{kv['mha_bytes_per_token']:,}", human_bytes(kv["mha_bytes_per_token"])))
    rows.append(("plain multi-head, full context", f"{kv['mha_bytes_full_context']:,}",
                 human_bytes(kv["mha_bytes_full_context"])))
    rows.append(("saved vs plain multi-head", format_ratio(kv["ratio_vs_mha"]) + " smaller",
                 "; ".join(kv["savings"]) or "nothing"))
    if cross:
        rows.append(f"Cross-attention keys and values of the source, computed once per source ({cross['dtype']}, "
                    f"batch {cross['batch_size']})")
        rows.append(("per source token", f"{cross['bytes_per_source_token']:,}",
                     human_bytes(cross["bytes_per_source_token"])))
        rows.append((f"full source ({cross['source_len']} tokens)", f"{cross['bytes_per_source']:,}",
                     human_bytes(cross["bytes_per_source"])))
        rows.append((f"full batch ({cross['batch_size']} sources or beams)", f"{cross['bytes_full_batch']:,}",
                     human_bytes(cross["bytes_full_batch"])))
        sources = f" and {act['batch_size']} x {act['source_tokens'] // act['batch_size']} sources"
    else:
        sources = ""
    rows.append(f"Activations, one training micro-batch of {act['batch_size']} x {act['tokens'] // act['batch_size']}"
                f"{' targets' if cross else ''}{sources} ({act['dtype']}; estimate, no flash attention)")
    used = " (this config)"
    on, off = (used, "") if act["checkpointing_on"] else ("", used)
    rows.append(("without checkpointing" + off, f"{act['bytes']:,}", human_bytes(act["bytes"])))
    rows.append(("with gradient checkpointing" + on, f"{act['bytes_with_checkpointing']:,}",
                 human_bytes(act["bytes_with_checkpointing"])))
    rows.append(("of which logits (float32)", f"{act['logits']:,}", human_bytes(act["logits"])))

    cells = [r for r in rows if isinstance(r, tuple)]
    w0 = max(len(r[0]) for r in cells) + 2
    w1 = max(len(r[1]) for r in cells)
    lines = [report["model"]]
    for r in rows:
        lines.append(r if isinstance(r, str) else f"  {r[0]:<{w0}}{r[1]:>{w1}}  {r[2]}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
