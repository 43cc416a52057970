"""Hugging Face weights in and out, against transformers itself: tiny random models of every supported class are
saved with save_pretrained, read by minigpt, and must give HF's logits (1e-5, float32) and HF's greedy generation
token for token; exported minigpt variants must load in transformers and compute the same; a round trip keeps
every weight. Skipped without the `hf` extra (transformers)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
# nothing here reads the corpus (GPT-2's tests skip without tiktoken's cache either way): CI's first pass only
pytestmark = pytest.mark.once

from errors import UserError  # noqa: E402
from interop.convert import expected_shapes, read_state  # noqa: E402
from interop.hf_files import Weights, write_weights  # noqa: E402
from interop.hf_models import config_from_hf, export_class, hf_config, hf_weights  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sample import SampleConfig, generate  # noqa: E402

SHAPES = dict(vocab_size=97)
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                            bos_token_id=96, eos_token_id=96),
    "gpt2_relu_untied": lambda: transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=2,
                                                        activation_function="relu", n_inner=40,
                                                        layer_norm_epsilon=1e-3, tie_word_embeddings=False,
                                                        bos_token_id=96, eos_token_id=96),
    "gpt2_exact_gelu": lambda: transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=1, n_head=4,
                                                       activation_function="gelu", bos_token_id=96, eos_token_id=96),
    "llama_gqa_untied": lambda: transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=72,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=48,
                                                         rope_theta=500.0, rms_norm_eps=1e-5,
                                                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama_mqa_biases_tied": lambda: transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=1, max_position_embeddings=48,
                                                              attention_bias=True, mlp_bias=True,
                                                              tie_word_embeddings=True, bos_token_id=1,
                                                              eos_token_id=2),
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, max_position_embeddings=48,
                                                            rope_parameters=dict(rope_type="llama3", rope_theta=10000.0,
                                                                                 factor=4.0, low_freq_factor=1.0,
                                                                                 high_freq_factor=4.0,
                                                                                 original_max_position_embeddings=64),
                                                            bos_token_id=1, eos_token_id=2),
    "mistral_window": lambda: transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=48,
                                                         sliding_window=8, rope_theta=1000.0, bos_token_id=1,
                                                         eos_token_id=2),
    "qwen3_head_dim": lambda: transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, head_dim=16,
                                                       max_position_embeddings=48, rms_norm_eps=1e-6,
                                                       attention_bias=True, tie_word_embeddings=True,
                                                       bos_token_id=1, eos_token_id=2),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """HF's init (std 0.02) gives near-uniform logits, whose argmax is a coin toss: spread the weights so that
    greedy decoding has clear winners, and norms' weights away from 1 so a swapped norm would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(p.shape[-1]) if "wpe" not in name
                                                             else 0.3))
            elif "norm" in name or "ln_" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def save_hf(kind: str, folder: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind](), dtype=torch.float32)
    randomize(model, seed)
    model.eval().save_pretrained(folder)
    return model


def ours_from(folder: Path) -> GPT:
    hf = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(hf, str(folder))
    with Weights(folder) as w:
        state = read_state(w, hf["model_type"], cfg, None, str(folder))
    model = GPT(cfg)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_import_matches_hf_logits_and_greedy_generation(tmp_path, kind):
    hf_model = save_hf(kind, tmp_path)
    ours = ours_from(tmp_path)
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf_model(idx).logits
        mine = ours(idx)[0]
    assert mine.shape == theirs.shape  # vocab_multiple 1: no padding rows
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)

    prompt = idx[:1, :6]
    eos = hf_model.generation_config.eos_token_id
    want = hf_model.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=eos)[0, 6:].tolist()
    if want and want[-1] == eos:
        want = want[:-1]  # HF keeps the end token it stopped at; minigpt stops before it
    got = generate(ours, prompt, 97, SampleConfig(max_new_tokens=30, temperature=0.0), stop_token=eos)
    assert got == want and len(got) >= 10


def test_sharded_safetensors_and_a_pytorch_bin_import_the_same(tmp_path):
    model = save_hf("llama_gqa_untied", tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    reference = ours_from(tmp_path / "one").state_dict()
    for folder in ("sharded", "pickled"):
        state = ours_from(tmp_path / folder).state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state)


def test_bf16_weights_stay_bf16_unless_asked(tmp_path):
    model = save_hf("gpt2", tmp_path)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    hf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    cfg = config_from_hf(hf, "x")
    with Weights(tmp_path / "bf16") as w:
        kept = read_state(w, "gpt2", cfg, None, "x")
        asked = read_state(w, "gpt2", cfg, torch.float32, "x")
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}
    assert {t.dtype for t in asked.values()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------
# Export: minigpt variants -> the HF class that computes them


EXPORTABLE = {
    "gpt2_learned": (dict(), "GPT2LMHeadModel"),
    "gpt2_tanh_nobias_untied": (dict(mlp="gelu_tanh", bias=False, tie_embeddings=False, norm_eps=1e-3),
                                "GPT2LMHeadModel"),
    "gpt2_sinusoidal": (dict(pos_encoding="sinusoidal", mlp="relu"), "GPT2LMHeadModel"),
    "gpt2_no_positions": (dict(pos_encoding="none"), "GPT2LMHeadModel"),
    "llama": (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, rope_theta=300.0),
              "LlamaForCausalLM"),
    "llama_biases_untied": (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=True, attn_bias=True,
                                 mlp_bias=False, tie_embeddings=False, norm_eps=1e-5), "LlamaForCausalLM"),
    "llama3_rope": (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, rope_scaling="llama3",
                         rope_factor=8.0, rope_original_context=40, rope_low_freq=1.0, rope_high_freq=3.0,
                         n_embd=64), "LlamaForCausalLM"),
    "mistral": (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, attn_window=8, n_kv_head=1),
                "MistralForCausalLM"),
    "qwen3": (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, head_dim=12,
                   n_kv_head=2), "Qwen3ForCausalLM"),
}


def our_model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32), **overrides})
    model = GPT(cfg)
    randomize(model)
    return model.eval()


def export_weights(model: GPT, folder: Path) -> None:
    cfg = model.config
    model_type = export_class(cfg)
    folder.mkdir()
    write_weights(folder, hf_weights(model_type, cfg, model.state_dict()), max_shard_bytes=30_000)
    (folder / "config.json").write_text(json.dumps(hf_config(model_type, cfg, {}, torch.float32)))


@pytest.mark.parametrize("variant", sorted(EXPORTABLE))
def test_export_loads_in_transformers_and_round_trips(tmp_path, variant):
    overrides, hf_class = EXPORTABLE[variant]
    ours = our_model(**overrides)
    export_weights(ours, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == hf_class
    idx = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0][..., :61], atol=1e-5, rtol=1e-5)
    # back again: every weight minigpt has is read back bit for bit (padding rows aside)
    back = ours_from(tmp_path / "hf").state_dict()
    for name, t in ours.state_dict().items():
        rows = slice(0, 61) if name in ("wte.weight", "lm_head.weight") else slice(None)
        assert torch.equal(back[name], t[rows]), name


REFUSED = {
    "alibi": (dict(pos_encoding="alibi"), "pos_encoding = 'alibi'"),
    "post_norm": (dict(norm_placement="post"), "norm_placement"),
    "bidirectional": (dict(attn_mask="bidirectional"), "attn_mask = 'bidirectional'"),
    "moe": (dict(n_experts=4), "n_experts = 4"),
    "gqa_learned": (dict(n_kv_head=2), "n_kv_head = 2"),
    "rope_gelu": (dict(pos_encoding="rope", norm="rmsnorm"), "mlp = 'gelu'"),
    "rope_layernorm": (dict(pos_encoding="rope", mlp="swiglu"), "norm = 'layernorm'"),
    "mistral_bias": (dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", attn_window=8), "bias"),
    "encoder_decoder": (dict(arch="encoder_decoder"), "arch = 'encoder_decoder'"),
}


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_variants_without_an_hf_class_are_refused_naming_the_switch(variant):
    overrides, switch = REFUSED[variant]
    cfg = GPTConfig(vocab_size=61, block_size=32, n_layer=1, n_head=4, n_embd=32, **overrides)
    with pytest.raises(UserError, match="no Hugging Face equivalent") as e:
        export_class(cfg)
    assert switch in str(e.value) and "\n" not in str(e.value)


def test_new_config_fields_default_to_the_old_model():
    """head_dim 0, biases none, norm_eps 0, tied: the GPT every earlier checkpoint was trained as."""
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=4, n_embd=32, norm="rmsnorm", qk_norm=True)
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    assert model.blocks[0].ln_1.eps is None and model.blocks[0].attn.q_norm.eps is None
    assert model.blocks[0].attn.c_attn.bias is not None and model.blocks[0].mlp.c_fc.bias is not None
    explicit = GPT(replace(cfg, head_dim=8, attn_bias=True, mlp_bias=True))
    assert explicit.state_dict().keys() == model.state_dict().keys()
    assert {k: v.shape for k, v in explicit.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert set(expected_shapes(cfg)) == set(model.state_dict())
    assert asdict(cfg)["head_dim"] == 0


def test_llama3_rope_scaling_stretches_each_band_as_llama3_does():
    """Pairs turning more than high_freq times in the original context keep their frequency, those under low_freq
    are divided by the factor, and the ones between blend linearly in their rotations; as transformers computes."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from model import rope_angles

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                                  rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = config_from_hf(hf.to_dict() | {"architectures": ["LlamaForCausalLM"]}, "x")
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_context) == ("llama3", 8.0, 8192)
    cos, sin = rope_angles(torch.tensor([1]), cfg.head_size, cfg.rope_theta, cfg.trained_rope_scaling)
    ours = torch.atan2(sin[0], cos[0])  # the angle at position 1 is the frequency itself
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    plain = cfg.rope_theta ** (-torch.arange(0, cfg.head_size, 2) / cfg.head_size)
    assert torch.allclose(ours[0], plain[0].float(), rtol=1e-6)  # the fastest pair: kept
    assert torch.allclose(ours[-1], plain[-1].float() / 8, rtol=1e-5)  # the slowest: divided by the factor
