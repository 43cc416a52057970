"""`minigpt inspect` and inspection.py: exact parameter counts, FLOPs, KV-cache savings and activation
estimates, checked against numbers known independently of this code."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import checkpoint
import inspection
import train
from cli.config_loader import config_to_dict, load_config
from cli.main import app
from conftest import REPO_ROOT
from encoder_decoder import EncoderDecoder, encoder_config
from model import GPT, GPTConfig, KVCache

GPT2 = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
SMALL = GPTConfig(vocab_size=65, block_size=256, n_layer=2, n_head=6, n_embd=48)
DEBUG = str(REPO_ROOT / "config" / "debug.toml")


def test_gpt2_small_has_its_well_known_parameter_count():
    params = inspection.count_params(GPT2)
    assert params["total"] == 124_475_904  # nanoGPT's 123.69M plus the 1024 x 768 position table
    assert params["total"] - params["position_embedding"] == 123_689_472
    assert params["token_embedding"] == 50304 * 768 and params["position_embedding"] == 1024 * 768
    assert params["active"] == params["total"]


@pytest.mark.parametrize("changes", [
    {}, {"n_kv_head": 2, "qk_norm": True, "pos_encoding": "rope", "norm": "rmsnorm"},
    {"n_experts": 4, "experts_per_token": 2, "mlp": "swiglu", "bias": False},
    {"norm_placement": "post", "pos_encoding": "alibi", "attn_window": 64},
], ids=["gpt2", "gqa-rope-qknorm", "moe-swiglu", "post-alibi-window"])
def test_groups_sum_to_the_models_own_count(changes):
    cfg = replace(SMALL, **changes)
    model = inspection.meta_model(cfg)
    params = inspection.count_params(cfg, model)
    groups = {k: v for k, v in params.items() if k not in ("total", "active")}
    assert "other" not in groups  # every parameter has a named group
    assert sum(groups.values()) == params["total"] == model.num_params(non_embedding=False)
    assert ("position_embedding" in groups) == (cfg.pos_encoding == "learned")


def test_moe_uses_fewer_parameters_per_token_than_it_has():
    cfg = replace(SMALL, n_experts=8, experts_per_token=2)
    params = inspection.count_params(cfg)
    assert params["active"] < params["total"]
    per_expert = params["experts"] // (cfg.n_layer * cfg.n_experts)
    assert params["total"] - params["active"] == cfg.n_layer * 6 * per_expert


def test_training_flops_are_three_forwards_and_the_window_caps_attention():
    flops = inspection.flops_per_token(SMALL)
    assert flops["training"] == 3 * flops["forward"]
    windowed = inspection.flops_per_token(replace(SMALL, attn_window=64))
    attention_saved = 12 * SMALL.n_layer * SMALL.n_embd * (256 - 64)  # score and value matmuls, fwd + bwd
    assert flops["training"] - windowed["training"] == attention_saved


def test_kv_cache_ratios_are_exact():
    assert inspection.kv_cache_bytes(SMALL, 1, "bfloat16")["ratio_vs_mha"] == 1.0
    gqa = inspection.kv_cache_bytes(replace(SMALL, n_kv_head=2), 4, "bfloat16")
    assert gqa["ratio_vs_mha"] == 3.0 and gqa["savings"] == ["GQA 2/6 heads: 3.0x smaller"]
    assert gqa["bytes_per_token"] == 2 * 2 * 2 * 8 * 2  # k and v, layers, kv heads, head size, bytes
    assert gqa["bytes_full_context"] == gqa["bytes_per_token"] * 256 * 4
    assert gqa["mha_bytes_per_token"] == 3 * gqa["bytes_per_token"]
    assert inspection.kv_cache_bytes(replace(SMALL, n_kv_head=1), 1, "float32")["ratio_vs_mha"] == 6.0
    window = inspection.kv_cache_bytes(replace(SMALL, attn_window=64), 2, "float32")
    assert window["ratio_vs_mha"] == 2.0 and window["savings"] == ["window 64/256, 128 slots: 2.0x smaller"]
    assert (window["context"], window["slots"]) == (64, 128)  # a query sees 64 keys; the sampler keeps 2 x 64
    assert window["bytes_per_token"] == window["mha_bytes_per_token"]
    wide = inspection.kv_cache_bytes(replace(SMALL, attn_window=200), 1, "float32")  # 2 x 200 > 256: no saving
    assert wide["ratio_vs_mha"] == 1.0 and wide["savings"] == ["window 200/256: none, the sampler keeps 256 slots"]
    assert inspection.kv_cache_bytes(SMALL, 1, "float32")["bytes_per_token"] == \
        2 * inspection.kv_cache_bytes(SMALL, 1, "float16")["bytes_per_token"]


@pytest.mark.parametrize("changes", [
    {}, {"attn_window": 64}, {"attn_window": 16, "n_kv_head": 2}, {"attn_window": 200}, {"attn_window": 256},
    {"attn_window": 64, "attn_mask": "prefix", "prefix_len": 8},
], ids=["no-window", "window-64", "window-16-gqa", "window-200", "window-256", "prefix-window"])
def test_kv_cache_figure_is_what_the_sampler_allocates(changes):
    """The full-context bytes are those of the cache `minigpt sample` builds (sample.decode_cache), so a window's
    saving is block / (2 x window) where that is what the sampler keeps: the issue's 4x that was really 2x."""
    import sample

    cfg = replace(SMALL, **changes)
    with torch.device("meta"):
        model = GPT(cfg)
    cache = sample.decode_cache(model, 3, torch.device("meta"), torch.bfloat16)
    kv = inspection.kv_cache_bytes(cfg, 3, "bfloat16")
    assert kv["bytes_full_context"] == cache.k.nbytes + cache.v.nbytes
    assert kv["slots"] == cache.max_len
    assert kv["ratio_vs_mha"] == kv["mha_bytes_full_context"] / (cache.k.nbytes + cache.v.nbytes)


def test_windowed_table_names_the_slots(tmp_path):
    table = inspection.format_report(inspection.inspect_model(replace(SMALL, attn_window=64), 2, "float32"))
    assert "full context (128 slots, window 64)" in table and "window 64/256, 128 slots: 2.0x smaller" in table
    assert "full context (256 tokens)" in inspection.format_report(inspection.inspect_model(SMALL, 2, "float32"))


@pytest.mark.parametrize("has_bf16, width, expected", [
    (True, 128, "bfloat16"), (True, 64, "float32"), (False, 384, "float32"),
])
def test_auto_dtype_is_what_training_picks_on_this_cpu(monkeypatch, has_bf16, width, expected):
    """run.dtype = auto is reported in the dtype runtime.setup_runtime picks for this model on this CPU, which the
    note names, beside a GPU's choice."""
    import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    cfg = replace(SMALL, n_head=4, n_embd=width)
    picked = runtime.setup_runtime(train.RunConfig(device="cpu", dtype="auto"), cfg).dtype
    assert str(picked).removeprefix("torch.") == expected  # the rule itself, for these two inputs
    report = inspection.inspect_model(cfg, batch_size=2)
    assert report["kv_cache"]["dtype"] == report["activations"]["dtype"] == expected
    assert report["kv_cache"]["bytes_per_token"] == 2 * 2 * width * (2 if expected == "bfloat16" else 4)
    note = report["notes"][-1]
    assert note.startswith(f"run.dtype is auto: reporting for {expected}, what training picks on this CPU")
    assert "a CUDA GPU picks bfloat16" in note
    assert ("no native bfloat16" in note) == (not has_bf16) and ("under 128 wide" in note) == (has_bf16 and width < 128)


def test_auto_dtype_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, expected in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        dtype, note = inspection.resolve_dtype("auto", SMALL)
        assert dtype == expected and note == f"run.dtype is auto: reporting for {expected}, what training picks on " \
                                              "this machine's GPU"
    assert inspection.resolve_dtype("float16", SMALL) == ("float16", None)


def test_auto_dtype_follows_run_device(monkeypatch):
    """run.device = cpu on a GPU machine trains by the CPU's rule; cuda on a machine without one is a GPU's choice."""
    import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert inspection.auto_dtype(SMALL, "cpu") == ("float32", "this CPU, which has no native bfloat16")
    assert inspection.inspect_model(SMALL, 1, device="cpu")["kv_cache"]["dtype"] == "float32"
    assert inspection.inspect_model(SMALL, 1, device="cuda:0")["kv_cache"]["dtype"] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dtype, note = inspection.resolve_dtype("auto", SMALL, "cuda")
    assert dtype == "bfloat16" and note.endswith("a CUDA GPU (this machine has none)")
    assert inspection.auto_dtype(SMALL, "mps") == ("float32", "MPS")


def test_activation_estimate_reproduces_korthikanti_and_checkpointing_saves_memory():
    cfg = replace(GPT2, dropout=0.1)
    B, T, C, nh = 2, 1024, 768, 12
    expected = B * T * C * (34 + 5 * nh * T / C)  # Korthikanti et al. 2022, eq. 1, bytes per layer in 16-bit
    assert inspection.layer_activation_bytes(cfg, B, "bfloat16") == expected
    for c in (GPT2, replace(SMALL, n_experts=4, mlp="swiglu", n_kv_head=2)):
        act = inspection.activation_bytes(c, 4, "float32")
        assert act["bytes_with_checkpointing"] < act["bytes"]
        assert act["logits"] == 4 * c.block_size * c.padded_vocab_size * 4
        assert inspection.activation_bytes(c, 8, "float32")["bytes"] == 2 * act["bytes"]  # linear in the batch


def test_report_dict_and_table():
    cfg = replace(SMALL, n_layer=4, n_head=4, n_embd=128, n_kv_head=2, block_size=64, pos_encoding="rope",
                  norm="rmsnorm", mlp="swiglu")
    report = inspection.inspect_model(cfg, batch_size=3)
    assert report["model"].startswith("4 layers, 4 heads (kv 2), 128 wide, block 64, rope, rmsnorm pre, swiglu")
    assert report["kv_cache"]["dtype"] == inspection.auto_dtype(cfg)[0] and "auto" in report["notes"][0]
    json.dumps(report)  # plain values only
    table = inspection.format_report(report)
    assert table.splitlines()[0] == report["model"]
    assert "GQA 2/4 heads: 2.0x smaller" in table and "estimate" in table
    with pytest.raises(ValueError):
        inspection.inspect_model(cfg, batch_size=0)


ENCDEC = replace(SMALL, arch="encoder_decoder", n_layer=2, n_encoder_layer=3, block_size=24, source_block_size=20)


@pytest.mark.parametrize("changes", [
    {}, {"n_kv_head": 2, "qk_norm": True, "pos_encoding": "rope", "norm": "rmsnorm"},
    {"n_experts": 4, "experts_per_token": 2, "mlp": "swiglu", "bias": False},
    {"norm_placement": "post", "pos_encoding": "sinusoidal", "n_encoder_layer": 0, "attn_window": 8},
], ids=["learned", "gqa-rope-qknorm", "moe-swiglu", "post-sinusoidal-window"])
def test_encoder_decoder_groups_sum_to_the_models_own_count(changes):
    cfg = replace(ENCDEC, **changes)
    model = inspection.meta_model(cfg)
    assert isinstance(model, EncoderDecoder)
    params = inspection.count_params(cfg, model)
    groups = {k: v for k, v in params.items() if k not in ("total", "active")}
    assert "other" not in groups and "attention" not in groups  # every parameter in a group of its stack
    assert sum(groups.values()) == params["total"] == model.num_params(non_embedding=False)
    assert ("position_embedding" in groups) == (cfg.pos_encoding == "learned")
    enc, dec = cfg.encoder_layers, cfg.n_layer
    assert groups["encoder_attention"] == enc * sum(p.numel() for p in model.encoder[0].attn.parameters())
    assert groups["decoder_attention"] == dec * sum(p.numel() for p in model.blocks[0].attn.parameters())
    assert groups["cross_attention"] == dec * sum(p.numel() for p in model.blocks[0].cross.parameters())
    if cfg.n_experts:
        per_expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
        assert params["total"] - params["active"] == (enc + dec) * (cfg.n_experts - 2) * per_expert
        assert groups["encoder_experts"] == enc * cfg.n_experts * per_expert
    else:
        assert params["active"] == params["total"]
        assert groups["encoder_mlp"] == enc * sum(p.numel() for p in model.encoder[0].mlp.parameters())


def test_encoder_decoder_caches_match_the_models_own_tensors():
    """The cross-attention cache is every decoder layer's keys and values of a full source; the self-attention
    cache is model.KVCache's, over the decoder's layers."""
    cfg = replace(ENCDEC, n_kv_head=2, vocab_size=50)
    torch.manual_seed(0)
    model = EncoderDecoder(cfg)
    with torch.no_grad():
        cross = model.cross_cache(model.encode(torch.randint(50, (1, cfg.source_size))))
    report = inspection.inspect_model(cfg, batch_size=3, dtype="float32")
    c = report["cross_attention_cache"]
    assert c["values_per_source"] == sum(k.numel() + v.numel() for k, v in cross.kv)
    assert c["values_per_source"] == cfg.n_layer * 2 * cfg.kv_heads * cfg.head_size * cfg.source_size
    assert c["bytes_full_batch"] == sum(k.nbytes + v.nbytes for k, v in cross.expand(3).kv)  # 3 beams of it
    assert c["bytes_per_source_token"] * cfg.source_size == c["bytes_per_source"] == 4 * c["values_per_source"]
    cache = KVCache(cfg, 3, dtype=torch.float32)
    assert report["kv_cache"]["bytes_full_context"] == cache.k.nbytes + cache.v.nbytes


def test_pair_decoding_of_a_windowed_decoder_keeps_a_whole_block():
    """sample.PairDecoder builds KVCache(cfg, rows): block_size slots, window or not."""
    cfg = replace(ENCDEC, attn_window=8)
    kv = inspection.kv_cache_bytes(cfg, 3, "float32")
    cache = KVCache(cfg, 3, dtype=torch.float32, device="meta")
    assert kv["slots"] == cfg.block_size and kv["bytes_full_context"] == cache.k.nbytes + cache.v.nbytes
    assert kv["savings"] == ["window 8/24: none, the sampler keeps 24 slots"]


def test_encoder_decoder_flops_and_activations():
    cfg = replace(ENCDEC, dropout=0.1)
    model = inspection.meta_model(cfg)
    flops = inspection.flops_per_token(cfg, model)
    assert flops["training"] == model.flops_per_token(24, 20) == 3 * flops["forward"]
    assert (flops["target_len"], flops["source_len"]) == (24, 20)
    act = inspection.encoder_decoder_activation_bytes(cfg, 2, "bfloat16")
    assert act["per_encoder_layer"] == inspection.layer_activation_bytes(encoder_config(cfg), 2, "bfloat16")
    assert act["per_layer"] > inspection.layer_activation_bytes(cfg, 2, "bfloat16")  # plus cross-attention
    assert act["bytes"] > act["bytes_with_checkpointing"] > act["logits"] == 2 * 24 * cfg.padded_vocab_size * 4
    assert inspection.encoder_decoder_activation_bytes(cfg, 4, "bfloat16")["bytes"] == 2 * act["bytes"]
    # the decoder alone, as a GPT of the same config, keeps less
    assert act["bytes"] > inspection.activation_bytes(replace(cfg, arch="decoder", n_encoder_layer=0,
                                                              source_block_size=0), 2, "bfloat16")["bytes"]


def test_encoder_decoder_report_table():
    report = inspection.inspect_model(replace(ENCDEC, n_kv_head=2), batch_size=3)
    assert report["model"].startswith("encoder-decoder, 3 encoder + 2 decoder layers, 6 heads (kv 2), 48 wide, "
                                      "source 20, block 24")
    json.dumps(report)
    table = inspection.format_report(report)
    for line in ("FLOPs per target token (targets of 24 tokens, sources of 20;", "decoder self-attention KV cache",
                 "Cross-attention keys and values of the source", "  cross-attention (c_q, c_kv, c_proj, qk norms)",
                 "  full source (20 tokens)", "3 x 24 targets and 3 x 20 sources"):
        assert line in table, line


def invoke(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def test_cli_prints_the_table_and_json(tmp_path):
    result = invoke(DEBUG, "--set", f"data.dir={tmp_path / 'unprepared'}", "--set", "model.n_kv_head=1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("2 layers, 2 heads (kv 1), 32 wide, block 32")
    assert "MQA 1/2 heads: 2.0x smaller" in result.stdout
    assert "meta.json does not exist (yet)" in result.stdout and "50,304" in result.stdout

    result = invoke(DEBUG, "--json", "--batch-size", "3", "--set", "run.dtype=float32",
                    "--set", f"data.dir={tmp_path / 'unprepared'}")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"token_embedding", "attention", "mlp", "norms", "total", "active"} <= set(report["params"])
    assert set(report["flops_per_token"]) >= {"forward", "training"}
    assert set(report["kv_cache"]) >= {"bytes_per_token", "bytes_full_context", "mha_bytes_per_token", "ratio_vs_mha"}
    assert set(report["activations"]) >= {"bytes", "bytes_with_checkpointing"}
    assert report["kv_cache"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # float32, batch-independent
    assert report["kv_cache"]["bytes_full_context"] == report["kv_cache"]["bytes_per_token"] * 32 * 3


def test_cli_takes_the_vocabulary_from_prepared_data_and_reads_a_run_dir(tmp_path):
    import dataset_format

    data = tmp_path / "data"
    data.mkdir()
    meta = {"format_version": dataset_format.FORMAT_VERSION, "tokenizer": {"kind": "char"}, "vocab_size": 65,
            "dtype": dataset_format.dtype_name_for_vocab(65), "train_tokens": 10, "val_tokens": 1, "source": "x",
            "source_sha256": "0", "val_fraction": 0.1, "tokenizer_kind": "char"}
    (data / "meta.json").write_text(json.dumps(meta))
    result = invoke(DEBUG, "--set", f"data.dir={data}", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"]["token_embedding"] == 128 * 32  # 65 padded to 128 rows

    run = tmp_path / "run"
    run.mkdir()
    saved = load_config(train.Config, DEBUG, ["model.vocab_size=65", "model.n_layer=3"])
    torch.save({"version": checkpoint.CHECKPOINT_VERSION, "model": {}, "config": config_to_dict(saved)}, run / "ckpt.pt")
    result = invoke(run, "--set", "model.n_kv_head=1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("3 layers, 2 heads (kv 1)") and "does not exist" not in result.stdout


def test_cli_inspects_the_2017_transformer_without_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its data.dir, data/pairs, is not there: GPT-2's vocabulary, as for a GPT
    config = REPO_ROOT / "config" / "transformer_2017.toml"
    result = invoke(config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cfg = load_config(train.Config, config, ["model.vocab_size=50304"]).model
    assert report["model"].startswith("encoder-decoder, 3 encoder + 3 decoder layers")
    assert report["params"]["total"] == inspection.meta_model(cfg).num_params(non_embedding=False)
    assert report["params"]["token_embedding"] == 50304 * 128
    assert report["cross_attention_cache"]["source_len"] == 64 and report["flops_per_token"]["source_len"] == 64
    assert any("meta.json does not exist" in n for n in report["notes"])
    result = invoke(config)
    assert result.exit_code == 0 and result.stdout.startswith("encoder-decoder") and "cross-attention" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["missing/run"], "not found"),
    (["missing.toml"], "not found"),
    ([REPO_ROOT / "config"], "no checkpoint"),
    ([DEBUG, "--set", "model.n_kv_head=3"], "n_kv_head"),
    ([DEBUG, "--batch-size", "0"], "--batch-size"),
])
def test_cli_bad_arguments_end_as_one_error_line(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args, "--set", f"data.dir={tmp_path}") if args[0] == DEBUG else invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
