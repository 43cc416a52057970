"""The GPT model, top to bottom: config, KV cache, attention, MLP, block, GPT.

Pure PyTorch: no device choice, autocast, compile, DDP or logging here (train.py and sample.py do that),
so the same module trains, samples and is tested on the CPU in float32.

Shapes, named once for the whole file:
    B  batch size            T  new tokens in this call (queries)
    C  n_embd                S  keys attended to: the tokens cached before this call plus the T new ones
    nh n_head                hs head size, C // nh
    V  padded vocabulary size
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 0  # 0 = take it from the data's meta.json (train.py fills it in)
    block_size: int = 256  # longest context; learned position embeddings end here
    n_layer: int = 6  # nanoGPT's "baby GPT" shapes: small enough for a laptop, big enough to learn
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0  # 0 for large data; 0.1-0.2 keeps a small corpus from being memorised
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm; False is a little faster and no worse
    vocab_multiple: int = 64  # embedding rows padded to a multiple of this: faster matmuls on GPU

    def __post_init__(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0 (0 = from the data), got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd = {self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    One forward call appends T positions to every layer (`append`), then the model moves `length` on
    (`advance`), so the next call's positions start where this one's ended.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.block_size
        shape = (cfg.n_layer, batch_size, cfg.n_head, self.max_len, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) after what is cached; return all keys and values (B, nh, S, hs)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask, True where a query may attend to a key.

    The T queries are the *last* T of the S positions, so query i sits at position S - T + i and sees
    keys 0..S-T+i. SDPA's is_causal aligns the triangle top-left instead, which is only right when T == S.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                        training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / √hs) v with the causal mask, written out: the textbook path SDPA is tested against.

    q (B, nh, T, hs), k and v (B, nh, S, hs). Returns the output (B, nh, T, hs) and the attention
    weights (B, nh, T, S) before dropout.
    """
    T, S = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    weights = F.softmax(scores, dim=-1)
    return F.dropout(weights, dropout_p, training) @ v, weights


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # (B, nh, S, hs)
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if reference:
            y, weights = reference_attention(q, k, v, dropout_p, self.training)
        elif T == S:  # no cached keys: the plain causal triangle, which flash kernels handle without a mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token after the cache sees every cached key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # several new tokens after a cache: is_causal would align the triangle wrongly
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, x.device), dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y)), weights


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), kv_cache, layer, reference)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("GPTConfig.vocab_size must be set (it comes from the data's meta.json)")
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: the output layer reads the input embedding back
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
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus the attention score matmuls."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    def trunk(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
              reference: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Token ids (B, T) -> final hidden states (B, T, C), and attention weights if `reference`."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0  # new tokens continue after the cache
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        maps = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, kv_cache, i, reference)
            if weights is not None:
                maps.append(weights)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x), maps

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for every position, and the mean cross-entropy when targets (B, T) are given.

        `reference=True` runs the explicit softmax attention instead of SDPA (slower; for tests and maps).
        """
        x, _ = self.trunk(idx, kv_cache, reference)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every layer, each (B, nh, T, T), for inspecting what the model attends to."""
        return self.trunk(idx, reference=True)[1]
