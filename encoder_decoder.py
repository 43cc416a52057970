"""The whole Transformer (Vaswani 2017; T5, BART): an encoder reads the source, a decoder writes the target while
cross-attending to the encoder's output. Built from model.py's parts, so every `GPTConfig` switch means here what
it means in a GPT: positions, norm and its placement, MLP kind and experts, GQA/MQA (in cross-attention too),
qk-norm, dropout, gradient checkpointing, the decoder's sliding window.

    encoder  source (B, S) -> embed -> n_encoder_layer x Block (bidirectional, padding keys masked) -> memory
    decoder  target (B, T) -> embed -> n_layer x [causal self-attention, cross-attention to memory, MLP] -> logits

One token embedding serves the encoder, the decoder and the output layer. Sources come padded to the longest of
the batch: `source_mask` (B, S) is False on padding, and no query (in the encoder's self-attention or the decoder's
cross-attention) reads a padding key. Shapes as in model.py, plus S = source positions (keys of cross-attention).

Decoding (sample.py): `encode` once per source, `cross_cache` computes every layer's cross-attention keys and values
once, then `decode` runs the decoder on the new target tokens with model.py's KVCache for its self-attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from model import (GPT, Attention, AttentionInputs, Block, Dropout, GPTConfig, KVCache, MLP, MoE, alibi_slopes, attend,
                   attention_inputs, embed, experts_balance_loss, make_norm, residual, run_block, training_loss)


def encoder_config(cfg: GPTConfig) -> GPTConfig:
    """The encoder's blocks: the model's own switches, with bidirectional attention over the whole source."""
    return replace(cfg, arch="decoder", attn_mask="bidirectional", attn_window=0, prefix_len=0,
                   block_size=cfg.source_size, n_layer=cfg.encoder_layers, n_encoder_layer=0, source_block_size=0)


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's output. No positions: RoPE and ALiBi describe
    distances within one sequence, and there is none between a target token and a source token."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.kv_heads, cfg.head_size
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_size, bias=cfg.has_attn_bias)
        self.c_kv = nn.Linear(cfg.n_embd, 2 * cfg.kv_heads * cfg.head_size, bias=cfg.has_attn_bias)  # kvh heads each
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=cfg.has_attn_bias)
        self.q_norm = make_norm(cfg, cfg.head_size, "rmsnorm") if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_size, "rmsnorm") if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = Dropout(cfg.dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, kvh, S, hs) of the encoder's output (B, S, C): computed once per source."""
        B, S, _ = memory.shape
        k, v = self.c_kv(memory).split(self.n_kv_head * self.head_size, dim=2)
        k = k.view(B, S, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, kvh, S, hs)
        v = v.view(B, S, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, kvh, S, hs)
        return (self.k_norm(k) if self.k_norm is not None else k), v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], inputs: AttentionInputs,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q = self.q_norm(q)
        y, weights = attend(q, *kv, inputs, self.dropout if self.training else 0.0, self.training, reference)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)  # (B, T, nh·hs)
        return self.resid_dropout(self.c_proj(y)), weights


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the source, MLP: three sublayers, each with its residual."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)  # model.py's self-attention, KV cache and all
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.cross = CrossAttention(cfg)
        self.ln_3 = make_norm(cfg, cfg.n_embd)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv: tuple[torch.Tensor, torch.Tensor],
                cross_inputs: AttentionInputs, kv_cache: KVCache | None = None, layer: int = 0,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        post = self.post_norm
        x, _ = residual(x, self.ln_1, lambda h: self.attn(h, inputs, kv_cache, layer, reference), post)
        x, weights = residual(x, self.ln_2, lambda h: self.cross(h, kv, cross_inputs, reference), post)
        x, _ = residual(x, self.ln_3, lambda h: (self.mlp(h), None), post)
        return x, weights


@dataclass
class CrossCache:
    """Every decoder layer's cross-attention keys and values for a batch of sources, and the mask over them."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (B, kvh, S, hs)
    inputs: AttentionInputs  # the source padding mask, (B, 1, 1, S), or none

    def expand(self, n: int) -> "CrossCache":
        """Each source's keys and values repeated for n rows (beams or samples) of the decoder: done once."""
        kv = [(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for k, v in self.kv]
        mask = self.inputs.mask
        return CrossCache(kv, AttentionInputs(None, None if mask is None else mask.repeat_interleave(n, dim=0), False))


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("GPTConfig.vocab_size must be set (it comes from the data's meta.json)")
        self.config = cfg
        self.encoder_config = enc = encoder_config(cfg)
        learned = cfg.pos_encoding == "learned"
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.encoder_wpe = nn.Embedding(enc.block_size, cfg.n_embd) if learned else None
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if learned else None
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(Block(enc) for _ in range(enc.n_layer))
        # post-norm blocks already end in a norm
        self.encoder_ln_f = make_norm(cfg, cfg.n_embd) if cfg.norm_placement == "pre" else nn.Identity()
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:  # one embedding for the source, the target and the output
            self.lm_head.weight = self.wte.weight
        if cfg.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head), persistent=False)
        self.apply(GPT._init_weights)
        # as in GPT-2: each residual add is scaled down by the depth of its stack (2 adds per encoder block, 3 per
        # decoder block), keeping the residual stream's variance independent of depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                adds = 2 * enc.n_layer if name.startswith("encoder.") else 3 * cfg.n_layer
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(adds))

    # -- the two stacks -------------------------------------------------------------------------------------

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor | None = None,
               reference: bool = False) -> torch.Tensor:
        """Source ids (B, S) -> the encoder's output (B, S, C); source_mask (B, S) is False on padding."""
        enc = self.encoder_config
        S = source.size(1)
        if enc.pos_encoding == "learned" and S > enc.block_size:
            raise ValueError(f"a source of {S} tokens exceeds source_block_size {enc.block_size}")
        positions = torch.arange(S, device=source.device)
        inputs = attention_inputs(enc, positions, None, 0, getattr(self, "alibi_slopes", None), key_mask=source_mask,
                                  rope_scaling=enc.trained_rope_scaling)
        x = self.drop(embed(enc, self.wte, self.encoder_wpe, source, positions))
        for block in self.encoder:
            x, _ = run_block(block, enc, x, inputs, None, 0, reference)
        return self.encoder_ln_f(x)

    def cross_cache(self, memory: torch.Tensor, source_mask: torch.Tensor | None = None) -> CrossCache:
        """Every decoder layer's keys and values of the encoder's output (B, S, C), and the padding mask."""
        mask = None if source_mask is None else source_mask[:, None, None, :]  # (B, 1, 1, S)
        return CrossCache([block.cross.memory_kv(memory) for block in self.blocks], AttentionInputs(None, mask, False))

    def decode(self, target: torch.Tensor, cross: CrossCache, kv_cache: KVCache | None = None,
               positions: torch.Tensor | None = None, reference: bool = False) -> tuple[torch.Tensor, list]:
        """Target ids (B, T) -> logits (B, T, V), and each layer's cross-attention weights if `reference`. With a
        KV cache the new tokens continue after the cached ones (at `positions` when given), as in GPT.trunk."""
        cfg = self.config
        T = target.size(1)
        slopes = getattr(self, "alibi_slopes", None)
        if kv_cache is None:
            if cfg.pos_encoding == "learned" and T > cfg.block_size:
                raise ValueError(f"{T} positions exceed block_size {cfg.block_size} (learned positions end there)")
            positions = torch.arange(T, device=target.device)
            inputs = attention_inputs(cfg, positions, None, 0, slopes, rope_scaling=cfg.trained_rope_scaling)
        else:
            positions = kv_cache.claim(T) if positions is None else positions
            slots = kv_cache.record(positions)
            inputs = attention_inputs(cfg, positions, kv_cache.slot_pos, 0, slopes,
                                      rope_scaling=cfg.trained_rope_scaling)
            inputs.slots = slots
        x = self.drop(embed(cfg, self.wte, self.wpe, target, positions))
        maps = []
        for i, block in enumerate(self.blocks):
            x, weights = run_block(block, cfg, x, inputs, cross.kv[i], cross.inputs, kv_cache, i, reference)
            maps.append(weights)
        return self.lm_head(self.ln_f(x)), maps

    def forward(self, source: torch.Tensor, target: torch.Tensor, targets: torch.Tensor | None = None,
                source_mask: torch.Tensor | None = None, label_smoothing: float = 0.0,
                reference: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: logits (B, T, V) of the target's next tokens given the source and the target so far
        (target starts with the start token), and the mean cross-entropy when targets (B, T) are given (-1: none)."""
        memory = self.encode(source, source_mask, reference)
        logits, _ = self.decode(target, self.cross_cache(memory, source_mask), reference=reference)
        if targets is None:
            return logits, None
        return logits, training_loss(self, logits, targets, label_smoothing)

    # -- what a model costs -------------------------------------------------------------------------------

    def aux_loss(self) -> torch.Tensor:
        return experts_balance_loss(self.config, [*self.encoder, *self.blocks])  # both stacks' experts

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counted once despite the tie; without the position tables by default (as GPT-2 reports)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel() + self.encoder_wpe.weight.numel()
        return n

    def active_params(self) -> int:
        """Non-embedding parameters one token passes through: with experts, only k of them per layer."""
        cfg = self.config
        unused = 0
        if cfg.n_experts:
            per_expert = sum(p.numel() for p in self.blocks[0].mlp.experts[0].parameters())
            unused = (cfg.n_layer + cfg.encoder_layers) * (cfg.n_experts - cfg.experts_per_token) * per_expert
        return self.num_params() - unused

    def flops_per_token(self, seq_len: int | None = None, source_len: int | None = None) -> float:
        """Training FLOPs per target token (forward + backward) for sources of source_len tokens per seq_len target
        tokens: 6 per weight a token passes through (the encoder's weights once per source token), plus the
        attention matmuls over the keys each query sees (self-attention in both stacks, cross-attention)."""
        cfg = self.config
        T = min(seq_len or cfg.block_size, cfg.block_size)
        S = min(source_len or cfg.source_size, cfg.source_size)
        per_block = {n: sum(p.numel() for p in b.parameters()) for n, b in (("enc", self.encoder[0]),
                                                                             ("dec", self.blocks[0]))}
        if cfg.n_experts:  # k of the experts
            unused = (cfg.n_experts - cfg.experts_per_token) * sum(p.numel() for p in self.blocks[0].mlp.experts[0].parameters())
            per_block = {n: p - unused for n, p in per_block.items()}
        embedding = self.wte.weight.numel()  # the output layer: once per target token
        decoder = 6 * (cfg.n_layer * per_block["dec"] + embedding) + 12 * cfg.n_layer * cfg.n_embd * (min(T, cfg.window) + S)
        encoder = 6 * cfg.encoder_layers * per_block["enc"] + 12 * cfg.encoder_layers * cfg.n_embd * S  # per source token
        return decoder + encoder * S / T


def build_model(cfg: GPTConfig) -> GPT | EncoderDecoder:
    """The model a config describes: a GPT, or with arch = "encoder_decoder" the whole Transformer."""
    return EncoderDecoder(cfg) if cfg.arch == "encoder_decoder" else GPT(cfg)


def model_flops_per_token(model: GPT | EncoderDecoder, seq_len: float, source_len: float = 0.0) -> float:
    """Training FLOPs per decoder token, for sequences of seq_len tokens (and, for an encoder-decoder, sources of
    source_len tokens): what MFU and the cost per target token are computed from."""
    if isinstance(model, EncoderDecoder):
        return model.flops_per_token(max(1, round(seq_len)), max(1, round(source_len)))
    return model.flops_per_token(max(1, round(seq_len)))
