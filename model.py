"""The GPT model, top to bottom: config, positions, KV cache, attention, MLP and experts, block, GPT.

Pure PyTorch: no device choice, autocast, compile, DDP or logging here (runtime.py, train.py and sample.py do that),
so the same module trains, samples and is tested on the CPU in float32.

Today's GPT-2 block is the default; every other design choice is one field of `GPTConfig`, acting in one
place. Shapes, named once for the whole file:
    B  batch size            T  new tokens in this call (queries)
    C  n_embd                S  keys attended to: the cached ones kept plus the T new ones
    nh n_head                kvh n_kv_head (key/value heads; nh for plain multi-head attention)
    hs head size, C // nh    V  padded vocabulary size       E  experts
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 0  # 0 = take it from the data's meta.json (train.py fills it in)
    block_size: int = 256  # training context; learned position embeddings end here
    n_layer: int = 6  # nanoGPT's "baby GPT" shapes: small enough for a laptop, big enough to learn
    n_head: int = 6
    n_embd: int = 384
    head_dim: int = 0  # each head's width; 0 = n_embd // n_head (Qwen3 sets it apart from the width)
    dropout: float = 0.0  # 0 for large data; 0.1-0.2 keeps a small corpus from being memorised
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm; False is a little faster and no worse
    attn_bias: bool | None = None  # biases of the attention's projections; none = `bias` (Llama's attention_bias)
    mlp_bias: bool | None = None  # biases of the MLP's matrices; none = `bias` (Llama's mlp_bias)
    norm_eps: float = 0.0  # added to the variance in every norm; 0 = torch's (1e-5 LayerNorm, the dtype's eps RMSNorm)
    tie_embeddings: bool = True  # the output layer reads the input embedding back (GPT-2); False: a matrix of its own
    vocab_multiple: int = 64  # embedding rows padded to a multiple of this: faster matmuls on GPU
    # positions
    pos_encoding: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "learned"  # GPT-2 learns a table
    rope_theta: float = 10000.0  # RoPE base (Su 2021, Llama 2); larger stretches the longest wavelength
    # RoPE trained with stretched frequencies (RopeScaling): "llama3" = Llama 3.1+'s; the four below are its settings
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0  # long wavelengths are divided by this
    rope_original_context: int = 8192  # the context wavelengths are measured against
    rope_low_freq: float = 1.0  # pairs turning fewer times than this in that context are divided by rope_factor,
    rope_high_freq: float = 4.0  # pairs turning more times than this are kept; a linear blend between
    # attention
    n_kv_head: int = 0  # key/value heads: 0 = n_head (multi-head), 1 = multi-query, between = grouped-query
    attn_window: int = 0  # sliding window: each token sees itself and the W-1 before it; 0 = the whole context
    qk_norm: bool = False  # RMSNorm on each head's queries and keys: bounded attention logits (OLMo 2, Gemma 3)
    attn_mask: Literal["causal", "bidirectional", "prefix"] = "causal"  # bidirectional trains a masked LM (BERT)
    prefix_len: int = 0  # attn_mask = "prefix": the first prefix_len tokens of a window see each other (T5's prefix-LM)
    # blocks
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # RMSNorm (Llama) skips the mean: cheaper, as good
    norm_placement: Literal["pre", "post"] = "pre"  # post = Vaswani 2017, normalising after each residual add
    mlp: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"  # SwiGLU (Shazeer 2020, Llama) gates the hidden layer;
    # gelu_tanh is GELU's tanh approximation, which GPT-2 was trained with (HF's "gelu_new")
    mlp_hidden: int = 0  # 0 = 4·n_embd, or for swiglu ⅔ of that rounded up to a multiple of 64 (same parameters)
    n_experts: int = 0  # mixture of experts: 0 = one dense MLP per block, else this many expert MLPs
    experts_per_token: int = 2  # top-k routing: each token is processed by its k best-scoring experts
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss (Switch Transformer) in the training loss
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30% slower
    # the whole Transformer (Vaswani 2017): an encoder over a source, and this decoder cross-attending to it
    arch: Literal["decoder", "encoder_decoder"] = "decoder"  # encoder_decoder: see encoder_decoder.py
    n_encoder_layer: int = 0  # encoder blocks of an encoder-decoder; 0 = n_layer
    source_block_size: int = 0  # longest source an encoder-decoder reads; 0 = block_size
    scale_embeddings: bool = False  # token embeddings x √n_embd where positions are added (Vaswani 2017)

    def __post_init__(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vocab_size", "n_kv_head", "attn_window", "mlp_hidden", "n_experts", "prefix_len",
                     "n_encoder_layer", "source_block_size", "head_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise ValueError(f"norm_eps must be >= 0 (0 = torch's default), got {self.norm_eps}")
        if self.n_embd % self.n_head and not self.head_dim:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd = {self.n_head * max(1, round(self.n_embd / self.n_head))}, or set head_dim"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head and (self.n_kv_head > self.n_head or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); 0 means n_head")
        if self.pos_encoding == "rope" and self.head_size % 2:
            raise ValueError(f"rope rotates pairs of dimensions: the head size ({self.head_size}) must be even")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling != "none":
            if self.pos_encoding != "rope":
                raise ValueError(f"rope_scaling = {self.rope_scaling!r} stretches RoPE: set pos_encoding = 'rope'")
            self.trained_rope_scaling  # RopeScaling checks its own values
        if self.attn_mask == "prefix" and not self.prefix_len < self.block_size:
            raise ValueError(f"attn_mask = 'prefix' needs prefix_len < block_size ({self.block_size}) (0: each "
                             f"example's source, on a pairs dataset), got {self.prefix_len}")
        if self.prefix_len and self.attn_mask != "prefix":
            raise ValueError(f"prefix_len ({self.prefix_len}) only applies with attn_mask = 'prefix'")
        if self.arch not in ("decoder", "encoder_decoder"):
            raise ValueError(f"arch must be decoder or encoder_decoder, got {self.arch!r}")
        if self.arch == "encoder_decoder" and self.attn_mask != "causal":
            raise ValueError("an encoder-decoder's encoder is bidirectional and its decoder causal: leave attn_mask "
                             f"at 'causal' (got {self.attn_mask!r})")
        if self.scale_embeddings and self.pos_encoding not in ("learned", "sinusoidal"):
            raise ValueError(f"scale_embeddings balances token embeddings against the positions added to them; "
                             f"pos_encoding = {self.pos_encoding!r} adds none: use learned or sinusoidal, or drop it")
        if self.arch == "decoder" and (self.n_encoder_layer or self.source_block_size):
            raise ValueError("n_encoder_layer and source_block_size apply to arch = 'encoder_decoder' only; "
                             "set model.arch=encoder_decoder or leave them at 0")
        if self.n_experts == 1 or (self.n_experts and not 1 <= self.experts_per_token <= self.n_experts):
            raise ValueError(f"n_experts must be 0 (dense) or >= 2 with 1 <= experts_per_token <= n_experts, "
                             f"got {self.n_experts} and {self.experts_per_token}")
        if not self.moe_aux_weight >= 0:
            raise ValueError(f"moe_aux_weight must be >= 0, got {self.moe_aux_weight}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def trained_rope_scaling(self) -> RopeScaling | None:
        if self.rope_scaling == "none":
            return None
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_original_context,
                           beta_fast=self.rope_high_freq, beta_slow=self.rope_low_freq)

    @property
    def has_attn_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    @property
    def has_mlp_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layer or self.n_layer

    @property
    def source_size(self) -> int:
        """The longest source an encoder-decoder reads."""
        return self.source_block_size or self.block_size

    @property
    def window(self) -> int:
        """How many positions a token sees, itself included."""
        return min(self.attn_window or self.block_size, self.block_size)

    @property
    def mask_token(self) -> int | None:
        """The [MASK] id of a bidirectional (masked-LM) model: the first row past the real vocabulary."""
        return self.vocab_size if self.attn_mask == "bidirectional" else None

    @property
    def padded_vocab_size(self) -> int:
        rows = self.vocab_size + (self.mask_token is not None)
        return math.ceil(rows / self.vocab_multiple) * self.vocab_multiple

    @property
    def hidden_size(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # three matrices instead of two: ⅔ the width keeps the parameter count
            return math.ceil(2 * 4 * self.n_embd / 3 / 64) * 64
        return 4 * self.n_embd


# ----------------------------------------------------------------------------------------------------
# Positions


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)). Shape (T, dim)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, ceil(dim/2))
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # sin, cos interleaved
    return pe[:, :dim]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE stretched to run past the context it was trained on: linear, ntk and yarn at evaluation time (`minigpt
    eval --rope-scaling`, as `GPT.rope_scaling`), llama3 as a model was trained (GPTConfig.rope_scaling). `factor`
    s >= 1 (1 changes nothing); `original` is the trained context, which the ramps measure wavelengths against.
      linear  positions divided by s (Chen 2023, position interpolation)
      ntk     the base raised to θ·s^(hs/(hs-2)) ("NTK-aware"): the lowest frequency is divided by s, the highest kept
      yarn    each frequency divided by s where its wavelength is long against the original context, kept where it
              turns more than beta_fast times in it, a linear ramp between (Peng 2023); and queries and keys each
              scaled by 0.1·ln(s) + 1, so attention logits by its square (YaRN's temperature)
      llama3  as yarn, but the ramp is linear in the rotations themselves, between beta_slow (Llama 3's
              low_freq_factor) and beta_fast (its high_freq_factor), and no temperature"""

    kind: Literal["linear", "ntk", "yarn", "llama3"]
    factor: float
    original: int
    beta_fast: float = 32.0  # YaRN's defaults: rotations in the original context above which a pair is kept,
    beta_slow: float = 1.0  # and below which it is interpolated

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "ntk", "yarn", "llama3"):
            raise ValueError(f"RoPE scaling is linear, ntk, yarn or llama3, got {self.kind!r}")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"RoPE scaling needs 0 < low ({self.beta_slow}) < high ({self.beta_fast}) rotations")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"the RoPE scaling factor must be >= 1 (1 = unscaled), got {self.factor}")
        if self.original < 1:
            raise ValueError(f"the original context must be >= 1, got {self.original}")


def rope_angles(positions: torch.Tensor, head_size: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles p·θ^(-2i/hs) for each position and each pair i, each (T, hs/2); `scaling`
    changes them as RopeScaling says."""
    if scaling is not None:
        return scaled_rope_angles(positions, head_size, theta, scaling)
    inv_freq = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device) / head_size)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def scaled_rope_angles(positions: torch.Tensor, head_size: int, theta: float,
                       scaling: RopeScaling) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_angles under a RopeScaling: at factor 1 every kind gives exactly the unscaled angles."""
    s, pos = scaling.factor, positions.float()
    dims = torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device) / head_size  # 2i/hs
    inv_freq, magnitude = theta ** (-dims), 1.0
    if scaling.kind == "linear":
        pos = pos / s
    elif scaling.kind == "llama3":  # rotations of each pair in the original context, original / wavelength
        rotations = scaling.original * inv_freq / (2 * math.pi)
        kept = ((rotations - scaling.beta_slow) / (scaling.beta_fast - scaling.beta_slow)).clamp(0, 1)
        inv_freq = inv_freq / s * (1 - kept) + inv_freq * kept
    elif scaling.kind == "ntk":  # with one pair (hs = 2) its frequency is 1 whatever the base
        inv_freq = (theta * s ** (head_size / (head_size - 2) if head_size > 2 else 1.0)) ** (-dims)
    else:  # yarn: pair i turns original·θ^(-2i/hs)/2π times in the original context
        if not theta > 1:
            raise ValueError(f"YaRN ranks RoPE's pairs by wavelength, which needs rope_theta > 1, got {theta}")

        def pair_turning(rotations: float) -> float:
            return head_size * math.log(scaling.original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(pair_turning(scaling.beta_fast)), 0)
        high = min(math.ceil(pair_turning(scaling.beta_slow)), head_size - 1)  # as YaRN's code (and HF) bound it
        high = high + 0.001 if high == low else high
        ramp = ((torch.arange(head_size // 2, dtype=torch.float32, device=positions.device) - low)
                / (high - low)).clamp(0, 1)  # 0: kept (extrapolated), 1: divided by s (interpolated)
        inv_freq = inv_freq + (inv_freq / s - inv_freq) * ramp
        magnitude = 0.1 * math.log(s) + 1.0
    angles = pos[:, None] * inv_freq[None, :]
    return angles.cos() * magnitude, angles.sin() * magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, h, T, hs) by its angle: q·k then depends only on the
    positions' difference (the GPT-NeoX / Llama 'rotate half' pairing)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press 2022: the geometric sequence 2^(-8/n), 2^(-16/n), ...; for n not a power of two, the slopes of
    the nearest smaller power of two, then every other slope of the next one."""
    def geometric(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    p = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(p) + geometric(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes)


# ----------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer, in a preallocated ring of `max_len` slots that never changes shape.

    Position p is stored in slot p % max_len, over the oldest key, so nothing is ever moved or reallocated: the
    one-token decode step sees the same shapes every time, which is what lets it be compiled (and replayed as a
    CUDA graph). `slot_pos` holds the absolute position in each slot (-1: empty); attention reads every slot
    through a mask built from it. A forward call first claims positions for its T new tokens (`claim`), records
    them in their slots (`record`), then every layer stores its keys (`write`).
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.block_size
        self.window = cfg.window
        self.last_pos = cfg.block_size - 1 if cfg.pos_encoding == "learned" else None  # learned positions end there
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, self.max_len, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((self.max_len,), -1, dtype=torch.long, device=device)
        self.next_pos = 0  # positions claimed so far, counted on the host: no device sync to read it

    def claim(self, n: int) -> torch.Tensor:
        """The positions (n,) of the next n tokens, after checking that they fit."""
        start, end = self.next_pos, self.next_pos + n
        if self.last_pos is not None and end - 1 > self.last_pos:
            raise ValueError(f"{end} positions exceed block_size {self.last_pos + 1} (learned positions end there)")
        # the first new query still needs the window - 1 keys before it: its n - 1 successors must not overwrite them
        if end > self.max_len and n + self.window - 1 > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {n + self.window - 1} needed")
        self.next_pos = end
        return torch.arange(start, end, device=self.k.device)

    def record(self, positions: torch.Tensor) -> torch.Tensor:
        """Mark the slots of these positions (T,) as holding them; return the slots (T,)."""
        slots = positions % self.max_len
        self.slot_pos.index_copy_(0, slots, positions)
        return slots

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kvh, T, hs) in their slots; return every slot's keys and values (B, kvh, max_len, hs)."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.next_pos = 0


# ----------------------------------------------------------------------------------------------------
# Dropout


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p and scale the rest by 1 / (1 - p).

    On the CPU, torch's own dropout draws one Mersenne-Twister number per element through bernoulli_, about
    7 ns each: with attention dropout that was a quarter of a baby-GPT training step. Here every 64-bit draw
    gives four 16-bit uniforms (7x cheaper), so p is rounded to a multiple of 1/65536 (0.2 becomes 0.199997)
    and the scale follows the rounded p, keeping the expectation exact. CUDA's fused dropout is already fast.
    The draws come from torch's default generator, so torch.manual_seed and its saved state govern them.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    drop = round(p * 65536)  # int16 draws below -32768 + drop are dropped
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= drop - 32768
    return torch.where(keep, x, 0.0) * (65536 / (65536 - drop))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# ----------------------------------------------------------------------------------------------------
# Attention


@dataclass
class AttentionInputs:
    """What every layer's attention needs for one forward call, built once per call by `attention_inputs`."""

    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (T, hs/2) for the new positions
    # (T, S) bool, True = may attend; or (nh, T, S) float bias (ALiBi); (B, 1 or nh, T, S) where it differs per
    # example (padding, each example's own prefix); None: see is_causal
    mask: torch.Tensor | None
    is_causal: bool  # the plain lower triangle with T == S, which flash kernels handle without a mask
    slots: torch.Tensor | None = None  # (T,) the KV cache slots the new keys go to; the keys are then every slot
    block_mask: BlockMask | None = None  # the same sliding window as `mask`, as FlexAttention's blocks


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask for T queries that are the *last* T of S positions (query i sits at S - T + i).
    SDPA's is_causal aligns the triangle top-left instead, which is only right when T == S."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs,
                        dropout_p: float = 0.0, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / √hs + mask) v written out: the textbook path SDPA is tested against.

    q (B, nh, T, hs), k and v (B, nh, S, hs). Returns the output (B, nh, T, hs) and the attention weights
    (B, nh, T, S) before dropout.
    """
    B, nh, T, hs = q.shape
    S = k.size(-2)
    mask = causal_mask(T, S, q.device) if inputs.is_causal else inputs.mask
    if mask is None:
        bias, beta = torch.zeros((), dtype=q.dtype, device=q.device), 0.0  # beta=0: the bias is not read
    else:
        bias, beta = mask.to(q.dtype), 1.0
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        if bias.dim() > 2:  # ALiBi's (nh, T, S) or a per-example (B, ., T, S): one (T, S) bias per batch row
            bias = bias.expand(B, nh, T, S).reshape(B * nh, T, S)
    # bias + q kᵀ / √hs in one batched matmul: the GEMM adds the mask and applies the scale as it writes the
    # scores, so neither costs a pass over the T x T scores (forward or backward)
    scores = torch.baddbmm(bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                           beta=beta, alpha=1 / math.sqrt(hs)).view(B, nh, T, S)  # heads folded into the batch
    # no upcast: torch's softmax kernels accumulate in float32 for 16-bit inputs anyway, and a float32 copy of the
    # T x T scores (then cast back) cost half the attention's time in bfloat16 training on the CPU
    weights = F.softmax(scores, dim=-1).to(q.dtype)
    return dropout(weights, dropout_p, training) @ v, weights


def attention_inputs(cfg: GPTConfig, qpos: torch.Tensor, kpos: torch.Tensor | None, prefix_len: int | torch.Tensor,
                     alibi: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                     rope_scaling: RopeScaling | None = None) -> AttentionInputs:
    """The rotary angles and the mask for queries at positions qpos (T,) over keys at kpos (S,): a KV cache's
    slot positions (-1 for an empty slot), or None for the queries themselves (no cache; qpos = 0..T-1).

    Without a cache the common cases are decided from the shapes alone and need no mask; with one the mask is
    always built, from tensors only, so a decode step has the same graph at every position. A causal sliding
    window on a GPU under torch.compile also comes as FlexAttention blocks (`attend` picks). Two things make the
    mask differ per example, (B, 1 or nh, T, S): a prefix_len tensor (B,), each example's own prefix (a prefix-LM
    on pairs), and key_mask (B, S), False on padding keys (an encoder's padded sources). `alibi`: the (nh,) slopes.
    """
    rope = rope_angles(qpos, cfg.head_size, cfg.rope_theta, rope_scaling) if cfg.pos_encoding == "rope" else None
    cached = kpos is not None
    per_example = isinstance(prefix_len, torch.Tensor) or key_mask is not None
    if not cached:
        T = len(qpos)
        # a prefix only adds keys for queries before its last token, which must have a later key to see
        causal_like = cfg.attn_mask == "causal" or (cfg.attn_mask == "prefix" and not per_example
                                                    and (T == 1 or prefix_len <= 1))
        if cfg.pos_encoding != "alibi" and T <= cfg.window and not per_example:  # the window cuts nothing off
            if cfg.attn_mask == "bidirectional":
                return AttentionInputs(rope, None, False)  # every query sees every key
            if causal_like:
                return AttentionInputs(rope, None, True)  # the plain triangle: flash kernels, no mask
        kpos = qpos
    dist = qpos[:, None] - kpos[None, :]  # (T, S): how far back each key is from each query
    if cfg.attn_mask == "prefix":  # the prefix sees all of itself; (T, S), or (B, T, S) for per-example prefixes
        prefix = prefix_len[:, None, None] if isinstance(prefix_len, torch.Tensor) else prefix_len
        allowed = (dist >= 0) | (kpos < prefix)
    else:
        allowed = dist >= 0 if cfg.attn_mask == "causal" else torch.ones_like(dist, dtype=torch.bool)
    allowed = allowed & (dist.abs() < cfg.window) & (kpos >= 0)  # kpos -1: an empty cache slot
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]  # (B, T, S): no query reads a padding key
    if allowed.dim() == 3:
        allowed = allowed[:, None]  # (B, 1, T, S): the same for every head
    if cfg.pos_encoding == "alibi":  # a linear penalty on distance, steeper for some heads than others
        bias = -alibi[:, None, None] * dist.abs()  # (nh, T, S)
        return AttentionInputs(rope, bias.masked_fill(~allowed, float("-inf")), False)
    blocks = None
    if not cached and not per_example and cfg.attn_mask == "causal" and flex_attention_applies(qpos.device):
        # the flex path leaves the dense mask unread, so the compiled graph drops it
        blocks = sliding_window_blocks(len(qpos), cfg.window, qpos.device)
    return AttentionInputs(rope, allowed, False, block_mask=blocks)


def sliding_window_blocks(T: int, window: int, device: torch.device) -> BlockMask:
    """The causal sliding window for FlexAttention: its kernel skips the (128 x 128) blocks that lie wholly
    outside the window instead of masking them, so attention costs O(T x window), not O(T²)."""
    def in_window(b, h, q, kv):
        return (q >= kv) & (q - kv < window)
    return create_block_mask(in_window, None, None, T, T, device=device)


def flex_attention_applies(device: torch.device) -> bool:
    """Whether sliding windows go through FlexAttention: on a GPU, inside torch.compile. Uncompiled, flex_attention
    materialises the T x T scores like a dense mask; on a CPU it has no backward pass (torch 2.13)."""
    return device.type == "cuda" and torch.compiler.is_compiling()


def sdpa_is_slow(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether training on the CPU is faster through the written-out attention than through SDPA: SDPA has no
    CPU kernel with dropout (it falls back to the same math with torch's slower dropout), and its bfloat16
    flash backward ran ~5x slower than the batched matmuls (torch 2.13; see docs/benchmarks.md)."""
    return q.device.type == "cpu" and q.requires_grad and (dropout_p > 0.0 or q.dtype != torch.float32)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, dropout_p: float,
           training: bool, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q (B, nh, T, hs) over k, v (B, kvh, S, hs) through the fastest path that applies: the output
    (B, nh, T, hs), and the weights (B, nh, T, S) when the written-out path ran (always with `reference`)."""
    nh, kvh = q.size(1), k.size(1)
    if reference or sdpa_is_slow(q, dropout_p):
        if kvh != nh:  # each kv head serves nh / kvh query heads
            k, v = k.repeat_interleave(nh // kvh, dim=1), v.repeat_interleave(nh // kvh, dim=1)  # (B, nh, S, hs)
        return reference_attention(q, k, v, inputs, dropout_p, training)
    if inputs.block_mask is not None and dropout_p == 0.0:  # flex_attention has no dropout
        return flex_attention(q, k, v, block_mask=inputs.block_mask, enable_gqa=kvh != nh), None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, dropout_p=dropout_p,
                                          is_causal=inputs.is_causal, enable_gqa=kvh != nh), None


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.kv_heads, cfg.head_size
        # q, k, v in one matmul; k and v have only kvh heads, each shared by nh / kvh query heads
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_size, bias=cfg.has_attn_bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=cfg.has_attn_bias)
        self.q_norm = make_norm(cfg, cfg.head_size, "rmsnorm") if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_size, "rmsnorm") if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None, layer: int = 0,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        nh, kvh, hs = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([nh * hs, kvh * hs, kvh * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, kvh, hs).transpose(1, 2)  # (B, kvh, T, hs)
        v = v.view(B, T, kvh, hs).transpose(1, 2)  # (B, kvh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if inputs.rope is not None:  # keys are cached rotated, at their own positions
            q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
        if kv_cache is not None:
            k, v = kv_cache.write(layer, k, v, inputs.slots)  # (B, kvh, S, hs): S = every cache slot
        y, weights = attend(q, k, v, inputs, self.dropout if self.training else 0.0, self.training, reference)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh·hs): heads side by side again (C, but
        # for a head_dim set apart from the width)
        return self.resid_dropout(self.c_proj(y)), weights


# ----------------------------------------------------------------------------------------------------
# Feed-forward: one MLP, or a mixture of expert MLPs


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.has_mlp_bias)
        # SwiGLU: silu(x W) ⊙ (x V); the gate V is the only extra matrix
        self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.has_mlp_bias) if cfg.mlp == "swiglu" else None
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
                    "swiglu": nn.SiLU()}[cfg.mlp]
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.has_mlp_bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c_fc(x))
        if self.c_gate is not None:
            h = h * self.c_gate(x)
        return self.dropout(self.c_proj(h))


class MoE(nn.Module):
    """Top-k routed experts (Shazeer 2017; Mixtral): a router scores the experts for each token, the token is
    processed by its k best, and their outputs are mixed by the router's renormalised probabilities.
    No token is dropped. After each forward, `aux_loss` holds the Switch Transformer load-balancing loss."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.k = cfg.experts_per_token
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C): routing is per token
        probs = F.softmax(self.router(flat).float(), dim=-1)  # (N, E)
        top_p, top_e = probs.topk(self.k, dim=-1)  # (N, k)
        top_p = (top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            # Every expert runs, even on no tokens (a (0, C) input): its parameters then get zero gradients
            # rather than none, as DDP and FSDP need every parameter in every backward on every process.
            token, slot = (top_e == e).nonzero(as_tuple=True)
            out.index_add_(0, token, top_p[token, slot, None] * expert(flat[token]))
        # E · Σ_e (share of routing slots that went to e) · (mean router probability of e): 1 when balanced
        share = F.one_hot(top_e, probs.size(-1)).float().mean(dim=(0, 1))  # (E,)
        self.aux_loss = probs.size(-1) * (share * probs.mean(dim=0)).sum()
        return out.view(B, T, C)


def make_norm(cfg: GPTConfig, dim: int, kind: str | None = None) -> nn.Module:
    """The config's norm (or `kind`: qk-norm is always RMSNorm) over the last `dim` features."""
    if (kind or cfg.norm) == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps or 1e-5, bias=cfg.bias)
    return nn.RMSNorm(dim, eps=cfg.norm_eps or None)


def residual(x: torch.Tensor, norm: nn.Module, f, post: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sublayer with its residual connection: pre-norm x + f(norm(x)) (GPT-2), or post-norm norm(x + f(x))
    (Vaswani 2017: the residual stream itself is normalised). f returns (output, attention weights or None)."""
    if post:
        out, weights = f(x)
        return norm(x + out), weights
    out, weights = f(norm(x))
    return x + out, weights


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None, layer: int = 0,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, weights = residual(x, self.ln_1, lambda h: self.attn(h, inputs, kv_cache, layer, reference), self.post_norm)
        x, _ = residual(x, self.ln_2, lambda h: (self.mlp(h), None), self.post_norm)
        return x, weights


def run_block(block: nn.Module, cfg: GPTConfig, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """block(x, *args), its activations recomputed in backward instead of kept when gradient checkpointing is on."""
    if cfg.grad_checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


def embed(cfg: GPTConfig, wte: nn.Embedding, wpe: nn.Embedding | None, idx: torch.Tensor,
          positions: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T) at positions (T,) -> (B, T, C): the token embedding (x √C with scale_embeddings, so that
    it is not drowned by the position encoding added to it), plus the learned or sinusoidal positions."""
    x = wte(idx)
    if cfg.scale_embeddings:
        x = x * math.sqrt(cfg.n_embd)
    if wpe is not None:
        return x + wpe(positions)
    if cfg.pos_encoding == "sinusoidal":
        return x + sinusoidal_encoding(positions, cfg.n_embd).to(x.dtype)
    return x


def experts_balance_loss(cfg: GPTConfig, blocks) -> torch.Tensor:
    """The experts' load-balancing loss of the last forward, averaged over the blocks (0 without experts)."""
    if not cfg.n_experts:
        return torch.zeros(())
    return torch.stack([block.mlp.aux_loss for block in blocks]).mean()


def training_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) (-1: no target), plus the experts'
    load-balancing loss when training with experts. With label smoothing ε, each target is (1 - ε) the true token
    and ε spread evenly over the real vocabulary (Szegedy 2016; not over the padding rows, which are never drawn)."""
    logits, targets = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    if label_smoothing:
        logp = F.log_softmax(logits, dim=-1)
        real = model.config.vocab_size + (model.config.mask_token is not None)
        nll = -logp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
        per_target = (1 - label_smoothing) * nll - label_smoothing * logp[:, :real].mean(dim=-1)
        loss = per_target[targets >= 0].mean()
    else:
        loss = F.cross_entropy(logits, targets, ignore_index=-1)
    if model.training and model.config.n_experts:  # evaluation reports the language-model loss alone
        loss = loss + model.config.moe_aux_weight * model.aux_loss()
    return loss


# ----------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("GPTConfig.vocab_size must be set (it comes from the data's meta.json)")
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # post-norm blocks already end in a norm
        self.ln_f = make_norm(cfg, cfg.n_embd) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied: the output layer reads the input embedding back
        # the stretched RoPE it was trained with, or evaluation's (minigpt eval --rope-scaling)
        self.rope_scaling: RopeScaling | None = cfg.trained_rope_scaling
        if cfg.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head), persistent=False)
        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream, so scale them down to keep
        # its variance independent of depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counted once despite the tie; without the position table by default (as GPT-2 reports)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def active_params(self) -> int:
        """Non-embedding parameters one token passes through: with experts, only k of them."""
        cfg = self.config
        unused = 0
        if cfg.n_experts:
            per_expert = sum(p.numel() for p in self.blocks[0].mlp.experts[0].parameters())
            unused = cfg.n_layer * (cfg.n_experts - cfg.experts_per_token) * per_expert
        return self.num_params() - unused

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per active weight, plus the attention score and
        value matmuls over the keys each query actually sees (the window, when there is one)."""
        cfg = self.config
        keys = min(seq_len or cfg.block_size, cfg.window)
        return 6 * self.active_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * keys

    def attention_inputs(self, qpos: torch.Tensor, kpos: torch.Tensor | None,
                         prefix_len: int | torch.Tensor) -> AttentionInputs:
        return attention_inputs(self.config, qpos, kpos, prefix_len, getattr(self, "alibi_slopes", None),
                                rope_scaling=self.rope_scaling)

    def trunk(self, idx: torch.Tensor, kv_cache: KVCache | None = None, reference: bool = False,
              prefix_len: int | torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Token ids (B, T) -> final hidden states (B, T, C), and attention weights if `reference`.

        With a KV cache the new tokens continue after the cached ones, at `positions` (T,) when given (a
        compiled decode step passes them as a tensor, see sample.py) or else at the cache's next positions."""
        cfg = self.config
        B, T = idx.shape
        prefix_len = cfg.prefix_len if prefix_len is None else prefix_len
        if kv_cache is None:
            if cfg.pos_encoding == "learned" and T > cfg.block_size:
                raise ValueError(f"{T} positions exceed block_size {cfg.block_size} (learned positions end there)")
            positions = torch.arange(T, device=idx.device)
            inputs = self.attention_inputs(positions, None, prefix_len)
        else:
            positions = kv_cache.claim(T) if positions is None else positions
            slots = kv_cache.record(positions)  # before the mask, so that the new keys are among those it allows
            inputs = self.attention_inputs(positions, kv_cache.slot_pos, prefix_len)
            inputs.slots = slots
        x = self.drop(embed(cfg, self.wte, self.wpe, idx, positions))  # (B, T, C)
        maps = []
        for i, block in enumerate(self.blocks):
            x, weights = run_block(block, cfg, x, inputs, kv_cache, i, reference)
            if reference:  # the weights of the CPU training path are not kept: T x T per layer
                maps.append(weights)
        return self.ln_f(x), maps

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                reference: bool = False, prefix_len: int | torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for every position, and the mean cross-entropy when targets (B, T) are given
        (-1 marks positions without a target), plus the experts' load-balancing loss when training with experts.

        `reference=True` runs the explicit softmax attention instead of SDPA (slower; for tests and maps).
        `prefix_len` overrides config.prefix_len for a prefix-LM (e.g. the prompt's length when sampling), or
        gives each example its own, (B,). `label_smoothing` spreads that share of each target over the vocabulary.
        """
        x, _ = self.trunk(idx, kv_cache, reference, prefix_len, positions)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, training_loss(self, logits, targets, label_smoothing)

    def aux_loss(self) -> torch.Tensor:
        return experts_balance_loss(self.config, self.blocks)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor, prefix_len: int | None = None) -> list[torch.Tensor]:
        """Attention weights of every layer, each (B, nh, T, T), for inspecting what the model attends to."""
        return self.trunk(idx, reference=True, prefix_len=prefix_len)[1]
