"""The architecture map between Hugging Face causal LMs and minigpt's GPT: config.json <-> GPTConfig, and each HF
weight name <-> ours, in both directions from one table.

    GPT2LMHeadModel     learned positions, LayerNorm, GELU (tanh-approximated: "gelu_new"), biases everywhere
    LlamaForCausalLM    RoPE, RMSNorm, SwiGLU, grouped-query attention, biases as attention_bias / mlp_bias
    MistralForCausalLM  Llama with a sliding window, no biases
    Qwen3ForCausalLM    Llama with RMSNorm on each head's queries and keys, and a head size set apart from the width

Exporting goes the other way: learned, sinusoidal or no positions -> GPT-2 (a sinusoidal table or zeros are written
as its learned one: the same numbers); rope + rmsnorm + swiglu -> Llama, + a window -> Mistral, + qk-norm -> Qwen3.
Whatever has no exact HF class is refused, naming the switch: never an export that loads but computes otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from errors import UserError
from model import GPTConfig, sinusoidal_encoding

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}  # model_type -> the class minigpt imports and exports
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# HF weights that are not parameters of the model (GPT-2's causal-mask buffers, old Llamas' saved RoPE frequencies)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def architecture(hf: dict, where: str) -> str:
    """The model_type of a supported config.json, or a one-line refusal naming what is supported."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or [ARCHITECTURES.get(model_type)]
    if model_type not in ARCHITECTURES or archs[0] != ARCHITECTURES[model_type]:
        found = archs[0] or model_type or "a model of no stated type"
        raise UserError(f"{where} is {found}; minigpt imports {', '.join(ARCHITECTURES.values())}")
    return model_type


def _number(hf: dict, key: str, where: str, default=None, kind=int):
    value = hf.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise UserError(f"{where}: config.json's {key} is {value!r}, not a number; the config is damaged")
    return kind(value)


def _refuse(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what}, which minigpt cannot compute exactly; nothing was written")


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig that computes what the HF config describes (vocab_multiple 1: no padding rows, so the
    logits and the loss are HF's exactly)."""
    model_type = architecture(hf, where)
    n = lambda key, default=None, kind=int: _number(hf, key, where, default, kind)  # noqa: E731
    common = dict(vocab_size=n("vocab_size"), vocab_multiple=1, dropout=0.0)
    try:
        if model_type == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in GPT2_ACTIVATIONS:
                raise _refuse(where, f"activation_function {act!r} (minigpt has {', '.join(GPT2_ACTIVATIONS)})")
            for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                             ("add_cross_attention", True)):
                if hf.get(key, not bad) == bad:
                    raise _refuse(where, f"GPT-2 with {key} = {bad}")
            return GPTConfig(**common, block_size=n("n_positions", 1024), n_layer=n("n_layer"), n_head=n("n_head"),
                             n_embd=n("n_embd"), bias=True, pos_encoding="learned", norm="layernorm",
                             norm_eps=n("layer_norm_epsilon", 1e-5, float), mlp=GPT2_ACTIVATIONS[act],
                             mlp_hidden=n("n_inner", 0) if hf.get("n_inner") is not None else 0,
                             tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        # the Llama family
        if hf.get("hidden_act", "silu") != "silu":
            raise _refuse(where, f"hidden_act {hf.get('hidden_act')!r} (Llama-family SwiGLU uses silu)")
        # transformers 5 writes rope_parameters; earlier releases rope_theta and a rope_scaling dict (or null)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise UserError(f"{where}: config.json's RoPE parameters are {rope!r}, not an object; the config is damaged")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise _refuse(where, f"RoPE scaling {rope_type!r} (minigpt imports plain RoPE and Llama 3's llama3)")
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise _refuse(where, "RoPE on part of each head (partial_rotary_factor)")
        r = lambda key: _number(rope, key, where, kind=float)  # noqa: E731
        scaling = {} if rope_type == "default" else dict(
            rope_scaling="llama3", rope_factor=r("factor"), rope_low_freq=r("low_freq_factor"),
            rope_high_freq=r("high_freq_factor"), rope_original_context=int(r("original_max_position_embeddings")))
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        width, heads = n("hidden_size"), n("num_attention_heads")
        head_dim = n("head_dim", width // heads) if hf.get("head_dim") is not None else width // heads
        kv_heads = n("num_key_value_heads", heads) if hf.get("num_key_value_heads") is not None else heads
        window = 0
        if model_type == "mistral":
            window = n("sliding_window") if hf.get("sliding_window") is not None else 0
        if model_type == "qwen3" and (hf.get("use_sliding_window") or
                                      any(t != "full_attention" for t in hf.get("layer_types") or [])):
            raise _refuse(where, "Qwen3 with sliding-window layers")
        return GPTConfig(**common, block_size=n("max_position_embeddings"), n_layer=n("num_hidden_layers"),
                         n_head=heads, n_embd=width,
                         head_dim=0 if head_dim * heads == width else head_dim,
                         n_kv_head=0 if kv_heads == heads else kv_heads, attn_window=window,
                         qk_norm=model_type == "qwen3", bias=False,
                         attn_bias=True if hf.get("attention_bias") else None,
                         mlp_bias=True if model_type == "llama" and hf.get("mlp_bias") else None,
                         pos_encoding="rope", rope_theta=float(theta), **scaling, norm="rmsnorm",
                         norm_eps=n("rms_norm_eps", 1e-6, float), mlp="swiglu", mlp_hidden=n("intermediate_size"),
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except ValueError as e:  # GPTConfig's own checks: a config.json no model can have
        raise UserError(f"{where}: config.json describes a model minigpt cannot build ({e})") from None


# ----------------------------------------------------------------------------------------------------
# Weight names


@dataclass(frozen=True)
class Link:
    """One of our tensors and the HF tensors it is made of: several are stacked along the first dimension (Llama's
    q, k and v projections are our one c_attn); GPT-2's Conv1D stores (in, out), so it is transposed."""
    ours: str
    theirs: tuple[str, ...]
    conv1d: bool = False


def links(model_type: str, cfg: GPTConfig) -> list[Link]:
    """Every tensor of the model, ours to theirs. Biases are listed where either side has them (an export writes
    zeros where ours has none)."""
    out: list[Link] = []

    def add(ours: str, *theirs: str, conv1d: bool = False) -> None:
        out.append(Link(ours, theirs, conv1d))

    if model_type == "gpt2":
        add("wte.weight", "transformer.wte.weight")
        add("wpe.weight", "transformer.wpe.weight")
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for name, conv1d in (("ln_1", False), ("attn.c_attn", True), ("attn.c_proj", True), ("ln_2", False),
                                 ("mlp.c_fc", True), ("mlp.c_proj", True)):
                add(f"{ours}{name}.weight", f"{theirs}{name}.weight", conv1d=conv1d)
                add(f"{ours}{name}.bias", f"{theirs}{name}.bias")
        add("ln_f.weight", "transformer.ln_f.weight")
        add("ln_f.bias", "transformer.ln_f.bias")
    else:
        add("wte.weight", "model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            add(f"{ours}ln_1.weight", f"{theirs}input_layernorm.weight")
            kinds = ("weight", "bias") if cfg.has_attn_bias else ("weight",)
            for kind in kinds:
                add(f"{ours}attn.c_attn.{kind}", *(f"{theirs}self_attn.{p}_proj.{kind}" for p in "qkv"))
                add(f"{ours}attn.c_proj.{kind}", f"{theirs}self_attn.o_proj.{kind}")
            if cfg.qk_norm:
                add(f"{ours}attn.q_norm.weight", f"{theirs}self_attn.q_norm.weight")
                add(f"{ours}attn.k_norm.weight", f"{theirs}self_attn.k_norm.weight")
            add(f"{ours}ln_2.weight", f"{theirs}post_attention_layernorm.weight")
            for kind in ("weight", "bias") if cfg.has_mlp_bias else ("weight",):
                add(f"{ours}mlp.c_fc.{kind}", f"{theirs}mlp.gate_proj.{kind}")  # silu(gate) * up, then down
                add(f"{ours}mlp.c_gate.{kind}", f"{theirs}mlp.up_proj.{kind}")
                add(f"{ours}mlp.c_proj.{kind}", f"{theirs}mlp.down_proj.{kind}")
        add("ln_f.weight", "model.norm.weight")
    if not cfg.tie_embeddings:
        add("lm_head.weight", "lm_head.weight")
    return out


def split_sizes(link: Link, cfg: GPTConfig) -> list[int]:
    """The first-dimension sizes of link.theirs inside our stacked tensor (q, k, v)."""
    if len(link.theirs) == 1:
        return []
    return [cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.kv_heads * cfg.head_size]


# ----------------------------------------------------------------------------------------------------
# Export: which class, its config.json, and our weights under its names


def export_class(cfg: GPTConfig) -> str:
    """The model_type whose HF class computes what cfg does, or a refusal naming the switch that has none."""
    def refuse(switch: str, why: str) -> UserError:
        return UserError(f"model.{switch} has no Hugging Face equivalent ({why}); nothing was written")

    if cfg.arch != "decoder":
        raise refuse(f"arch = {cfg.arch!r}", "minigpt exports decoder-only causal LMs")
    if cfg.attn_mask != "causal":
        raise refuse(f"attn_mask = {cfg.attn_mask!r}", "GPT-2, Llama, Mistral and Qwen3 are causal LMs")
    if cfg.n_experts:
        raise refuse(f"n_experts = {cfg.n_experts}", "minigpt exports dense models")
    if cfg.norm_placement != "pre":
        raise refuse("norm_placement = 'post'", "every exported class is pre-norm")
    if cfg.scale_embeddings:
        raise refuse("scale_embeddings = true", "no exported class scales its token embeddings")
    windowed = cfg.window < cfg.block_size
    if cfg.pos_encoding in ("learned", "sinusoidal", "none"):
        family = "GPT-2 (what learned, sinusoidal and no positions export as)"
        for bad, switch in ((cfg.norm != "layernorm", f"norm = {cfg.norm!r}"),
                            (cfg.mlp not in ("gelu", "gelu_tanh", "relu"), f"mlp = {cfg.mlp!r}"),
                            (cfg.kv_heads != cfg.n_head, f"n_kv_head = {cfg.n_kv_head}"),
                            (cfg.head_size * cfg.n_head != cfg.n_embd, f"head_dim = {cfg.head_dim}"),
                            (cfg.qk_norm, "qk_norm = true"), (windowed, f"attn_window = {cfg.attn_window}")):
            if bad:
                raise refuse(switch, f"{family} has none")
        return "gpt2"
    if cfg.pos_encoding != "rope":
        raise refuse(f"pos_encoding = {cfg.pos_encoding!r}", "minigpt exports learned, sinusoidal or no positions "
                     "as GPT-2 and rope as Llama, Mistral or Qwen3")
    family = "the Llama family (what rope exports as)"
    for bad, switch in ((cfg.norm != "rmsnorm", f"norm = {cfg.norm!r}"), (cfg.mlp != "swiglu", f"mlp = {cfg.mlp!r}")):
        if bad:
            raise refuse(switch, f"{family} has none")
    if cfg.qk_norm:
        if windowed:
            raise refuse(f"attn_window = {cfg.attn_window} with qk_norm", "Qwen3 (what qk_norm exports as) windows "
                         "only some layers")
        if cfg.has_mlp_bias:
            raise refuse("mlp_bias", "Qwen3 (what qk_norm exports as) has no MLP biases")
        return "qwen3"
    if windowed:
        if cfg.has_attn_bias or cfg.has_mlp_bias:
            raise refuse("bias = true with attn_window", "Mistral (what a window exports as) has no biases")
        return "mistral"
    return "llama"


def hf_config(model_type: str, cfg: GPTConfig, token_ids: dict, dtype: torch.dtype) -> dict:
    """config.json for the class: its maximum positions are the run's block_size."""
    common = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": str(dtype).removeprefix("torch."),
              **{k: v for k, v in token_ids.items() if v is not None}}
    if model_type == "gpt2":
        activation = {v: k for k, v in reversed(GPT2_ACTIVATIONS.items())}[cfg.mlp]  # gelu_tanh -> gelu_new
        return {**common, "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": None if cfg.hidden_size == 4 * cfg.n_embd else cfg.hidden_size,
                "activation_function": activation, "layer_norm_epsilon": cfg.norm_eps or 1e-5,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True}
    # RMSNorm's eps 0 means torch's default, the dtype's machine epsilon: written as float32's
    eps = cfg.norm_eps or float(torch.finfo(torch.float32).eps)
    out = {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_size,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_size, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
           "rms_norm_eps": eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope_parameters(cfg),
           "attention_dropout": cfg.dropout}
    if cfg.rope_scaling != "none":
        out["rope_scaling"] = {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"}
    if model_type == "llama":
        out.update(attention_bias=cfg.has_attn_bias, mlp_bias=cfg.has_mlp_bias)
    elif model_type == "mistral":
        out.update(sliding_window=cfg.attn_window if cfg.window < cfg.block_size else None)
    else:
        out.update(attention_bias=cfg.has_attn_bias, use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.n_layer, layer_types=["full_attention"] * cfg.n_layer)
    return out


def rope_parameters(cfg: GPTConfig) -> dict:
    """config.json's rope_parameters (transformers 5; earlier releases read rope_theta and rope_scaling, also
    written)."""
    if cfg.rope_scaling == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq, "high_freq_factor": cfg.rope_high_freq,
            "original_max_position_embeddings": cfg.rope_original_context}


def hf_weights(model_type: str, cfg: GPTConfig, state: dict[str, torch.Tensor]):
    """Yield (HF name, tensor) for the whole model: padding rows of the vocabulary removed, biases our model has
    none of written as zeros (GPT-2 always has them), positions other than learned written as GPT-2's table.
    Tied weights are written once, under the embedding's name, as save_pretrained does."""
    V = cfg.vocab_size
    for link in links(model_type, cfg):
        t = state.get(link.ours)
        if link.ours == "wpe.weight" and t is None:  # sinusoidal positions are a fixed table; none is zeros
            t = (sinusoidal_encoding(torch.arange(cfg.block_size), cfg.n_embd) if cfg.pos_encoding == "sinusoidal"
                 else torch.zeros(cfg.block_size, cfg.n_embd)).to(state["wte.weight"].dtype)
        elif t is None:  # a bias (Linear or LayerNorm) that our model was built without
            weight = state[link.ours.removesuffix(".bias") + ".weight"]
            t = torch.zeros(weight.shape[0], dtype=weight.dtype)
        if link.ours in ("wte.weight", "lm_head.weight"):
            t = t[:V]
        if link.conv1d:
            t = t.t()
        sizes = split_sizes(link, cfg)
        for name, part in zip(link.theirs, t.split(sizes, dim=0) if sizes else [t]):
            yield name, part.contiguous()
