"""`minigpt import`, `minigpt export` and `init.from`, end to end through the command line, against transformers:
imported models sample greedily exactly what HF's generate produces, exported runs load with AutoModelForCausalLM
and AutoTokenizer and generate what `minigpt sample` prints, a fine-tune from an imported folder starts from its
weights and lowers the loss, and every bad input is one line with nothing written. Skipped without transformers."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from cli.main import app  # noqa: E402
from conftest import REPO_ROOT, SMALL_CORPUS, error_line, read_metrics, tiny_config  # noqa: E402
from test_hf_models import randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args, **kw):
    return CliRunner().invoke(app, [*map(str, args)], **kw)


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def byte_level_tokenizer(folder: Path, vocab_size: int = 300):
    """A Llama-style tokenizer.json built here (no downloads): a byte-level BPE trained on a few lines, <s> added in
    front of every encoding by its post-processor, </s> the end; saved as transformers saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SMALL_CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM (grouped-query attention, untied output) with a tokenizer.json; its vocabulary
    has 3 rows more than the tokenizer, as real models pad theirs."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    tok = byte_level_tokenizer(folder)
    config = transformers.LlamaConfig(vocab_size=len(tok) + 3, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    randomize(model, seed=3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A tiny random GPT2LMHeadModel with GPT-2's 50,257-token vocabulary and no tokenizer files."""
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=48, n_embd=32,
                                                                 n_layer=2, n_head=4))
    randomize(model, seed=4)
    model.save_pretrained(folder)
    return folder


def hf_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         pad_token_id=model.generation_config.eos_token_id or 0)
    return out[0, len(prompt_ids):].tolist()


def greedy_sample(run: Path, prompt: str, n: int) -> str:
    return ok(cli("sample", run, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", n, "--dtype", "float32"))


def test_imported_llama_samples_what_hf_generates(llama_folder, tmp_path):
    run = tmp_path / "llama_run"
    assert cli("import", llama_folder, "--out", run).exit_code == 0
    tok = transformers.AutoTokenizer.from_pretrained(llama_folder)
    prompt = "JULIET:\nO Romeo"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id  # HF's default adds <s>: so must minigpt's prompt
    new = hf_greedy(llama_folder, ids, 24)
    assert len(new) >= 8
    assert greedy_sample(run, prompt, 24) == prompt + tok.decode(new, skip_special_tokens=True) + "\n"
    # the run folder is a normal run: inspect, attention and bench sample work on it
    assert "untied" in ok(cli("inspect", run))
    ok(cli("attention", run, "--out", tmp_path / "maps", "--prompt", prompt))
    assert (tmp_path / "maps" / "heads.json").is_file()
    ok(cli("bench", "sample", run, "--prompt-len", 8, "--new-tokens", 4))


def test_rows_past_the_tokenizer_are_generated_as_hf_generates_them(llama_folder, tmp_path):
    """HF's generate picks from every row of the model's vocabulary, and its decode leaves out an id its tokenizer
    does not have: minigpt's sampling does the same."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llama_folder)
    prompt = "JULIET:\nO Romeo"
    ids = tok(prompt)["input_ids"]
    extra = model.config.vocab_size - 1  # a row no token of the tokenizer maps to
    with torch.no_grad():  # wherever the first greedy token would win, the extra row wins instead
        model.lm_head.weight[extra] = 2 * model.lm_head.weight[hf_greedy(llama_folder, ids, 1)[0]]
    folder = tmp_path / "padded"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    new = hf_greedy(folder, ids, 16)
    assert extra in new and extra >= len(tok)
    ok(cli("import", folder, "--out", tmp_path / "run"))
    assert greedy_sample(tmp_path / "run", prompt, 16) == prompt + tok.decode(new, skip_special_tokens=True) + "\n"


def test_imported_gpt2_without_tokenizer_files_uses_tiktoken_and_samples_what_hf_generates(gpt2_folder, tmp_path,
                                                                                        has_gpt2_cache):
    if not has_gpt2_cache:
        pytest.skip("tiktoken's GPT-2 files are not cached here")
    import tiktoken

    run = tmp_path / "gpt2_run"
    assert cli("import", gpt2_folder, "--out", run).exit_code == 0
    enc = tiktoken.get_encoding("gpt2")
    prompt = "To be, or not to be"
    new = hf_greedy(gpt2_folder, enc.encode(prompt), 20)
    assert greedy_sample(run, prompt, 20) == prompt + enc.decode(new) + "\n"


def test_bf16_import_keeps_bf16_and_float32_is_asked_for(llama_folder, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).write_bytes((llama_folder / name).read_bytes())
    ok(cli("import", tmp_path / "bf16", "--out", tmp_path / "kept"))
    ok(cli("import", tmp_path / "bf16", "--out", tmp_path / "f32", "--dtype", "float32"))
    kept = torch.load(tmp_path / "kept" / "ckpt.pt", weights_only=True)["model"]
    f32 = torch.load(tmp_path / "f32" / "ckpt.pt", weights_only=True)["model"]
    assert {t.dtype for t in kept.values()} == {torch.bfloat16} and {t.dtype for t in f32.values()} == {torch.float32}
    assert all(torch.equal(kept[k].float(), f32[k]) for k in kept)


# ----------------------------------------------------------------------------------------------------
# Export: trained runs -> transformers


@pytest.fixture(scope="module")
def trained_runs(char_data, tmp_path_factory) -> dict[str, Path]:
    import train

    ws = tmp_path_factory.mktemp("runs")
    variants = {"gpt2_style": dict(), "llama_style": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                                                          bias=False, n_kv_head=1)}
    runs = {}
    for name, model in variants.items():
        cfg = tiny_config(char_data, ws / name, model=dict(block_size=64, n_head=4, **model),
                          train=dict(max_iters=30, eval_interval=30, eval_iters=1, batch_size=8))
        train.train(cfg)
        runs[name] = ws / name
    return runs


@pytest.mark.parametrize("variant,hf_class", [("gpt2_style", "GPT2LMHeadModel"), ("llama_style", "LlamaForCausalLM")])
def test_exported_run_generates_in_transformers_what_minigpt_samples(trained_runs, tmp_path, variant, hf_class):
    out = tmp_path / "hf"
    assert cli("export", trained_runs[variant], "--out", out).exit_code == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class] and config["max_position_embeddings" if "llama" in variant
                                                            else "n_positions"] == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "JULIET:\n"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.size(1):]
    assert greedy_sample(trained_runs[variant], prompt, 40) == prompt + tok.decode(generated) + "\n"
    # and back: importing the export gives the same model, weight for weight (padding rows aside)
    back = tmp_path / "back"
    ok(cli("import", out, "--out", back))
    ours = torch.load(trained_runs[variant] / "ckpt.pt", weights_only=True)["model"]
    again = torch.load(back / "ckpt.pt", weights_only=True)["model"]
    vocab = config["vocab_size"]
    for name, t in again.items():
        assert torch.equal(t, ours[name][:vocab] if name in ("wte.weight", "lm_head.weight") else ours[name]), name


def test_export_shards_large_weights_as_save_pretrained_does(trained_runs, tmp_path):
    from interop.convert import export_run

    export_run(trained_runs["llama_style"], tmp_path / "sharded", max_shard_bytes=40_000, log=lambda s: None)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    whole = tmp_path / "whole"
    ok(cli("export", trained_runs["llama_style"], "--out", whole))
    ref = transformers.AutoModelForCausalLM.from_pretrained(whole).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: init.from


def test_finetuning_an_imported_model_starts_from_its_weights_and_lowers_the_loss(llama_folder, tmp_path,
                                                                                  corpus_path):
    import train
    from checkpoint import load_checkpoint

    run = tmp_path / "imported"
    ok(cli("import", llama_folder, "--out", run))
    ok(cli("prepare", corpus_path, "--tokenizer", run, "--out", tmp_path / "data"))
    scored = json.loads(ok(cli("eval", run, "--data", tmp_path / "data", "--json")).strip().splitlines()[-1])
    assert 0 < scored["loss"] < 20  # an imported run is evaluated like a trained one, on data in its tokenizer
    assert "--data" in error_line(cli("eval", run))  # it has no dataset of its own
    # a step at a negligible rate: the weights are the imported ones
    cfg = tiny_config(tmp_path / "data", tmp_path / "still", model=dict(block_size=32),
                      optim=dict(lr=1e-9, min_lr=1e-9, warmup_iters=0, weight_decay=0.0),
                      train=dict(max_iters=1, eval_interval=1, eval_iters=1))
    cfg = train.Config(**{**cfg.__dict__, "init": train.InitConfig(from_=str(llama_folder))})
    train.train(cfg)
    imported, tuned = load_checkpoint(run)["model"], load_checkpoint(tmp_path / "still")["model"]
    assert tuned.keys() == imported.keys()
    assert all(torch.allclose(tuned[k], imported[k], atol=1e-6) for k in imported)
    # a real fine-tune, from the minigpt run this time: the loss falls
    cfg = tiny_config(tmp_path / "data", tmp_path / "tuned", model=dict(block_size=32),
                      optim=dict(lr=3e-3, min_lr=3e-3, warmup_iters=0),
                      train=dict(max_iters=30, eval_interval=10, eval_iters=2, batch_size=8))
    cfg = train.Config(**{**cfg.__dict__, "init": train.InitConfig(from_=str(run))})
    train.train(cfg)
    evals = [r for r in read_metrics(tmp_path / "tuned") if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    # the run's own config says what it trained: the imported model's shapes, the config's block_size
    saved = load_checkpoint(tmp_path / "tuned")["config"]
    assert saved["init"]["from"] == str(run) and saved["model"]["n_head"] == 4 and saved["model"]["block_size"] == 32


def test_finetune_config_is_shown_by_print_config_and_other_data_is_refused(llama_folder, char_data, tmp_path):
    import tomllib

    result = cli("train", REPO_ROOT / "config" / "finetune_shakespeare.toml", "--set", f"init.from={llama_folder}",
                 "--print-config")
    resolved = tomllib.loads(ok(result))
    assert resolved["init"]["from"] == str(llama_folder)
    assert resolved["model"]["n_embd"] == 32 and resolved["model"]["pos_encoding"] == "rope"
    assert resolved["model"]["block_size"] == 64  # the config's 256 is more than the model's 64 positions
    line = error_line(cli("train", REPO_ROOT / "config" / "debug.toml", "--set", f"init.from={llama_folder}",
                          "--set", f"data.dir={char_data}", "--set", f"run.out_dir={tmp_path / 'x'}"))
    assert "another tokenizer" in line and "--tokenizer" in line
    assert not (tmp_path / "x").exists()


def test_resuming_an_imported_run_is_refused(llama_folder, tmp_path):
    ok(cli("import", llama_folder, "--out", tmp_path / "run"))
    assert "init.from" in error_line(cli("train", "--resume", tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def refused(*args) -> str:
    out = Path(args[args.index("--out") + 1])
    line = error_line(cli(*args))
    assert not out.exists(), f"{out} was written"
    return line


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_imports_are_one_line_each(llama_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in refused("import", tmp_path / "empty", "--out", tmp_path / "o1")

    bert = copy_folder(llama_folder, tmp_path / "bert")
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    line = refused("import", bert, "--out", tmp_path / "o2")
    assert "BertForMaskedLM" in line and "LlamaForCausalLM" in line and "GPT2LMHeadModel" in line

    shapes = copy_folder(llama_folder, tmp_path / "shapes")
    config = json.loads((shapes / "config.json").read_text())
    (shapes / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    assert "belong to different models" in refused("import", shapes, "--out", tmp_path / "o3")

    cut = copy_folder(llama_folder, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in refused("import", cut, "--out", tmp_path / "o4")

    assert "--dtype" in refused("import", llama_folder, "--out", tmp_path / "o5", "--dtype", "int8")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "not an empty folder" in error_line(cli("import", llama_folder, "--out", tmp_path / "taken"))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


class RunsCode:
    """A pickle that would create a file when unpickled (the attack a .bin can carry)."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_never_run(llama_folder, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((llama_folder / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (evil / name).write_bytes((llama_folder / name).read_bytes())
    marker = tmp_path / "pwned"
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": RunsCode(marker)}, f)
    assert "would run code" in refused("import", evil, "--out", tmp_path / "o")
    assert not marker.exists()


def test_a_hub_id_without_network_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    r = subprocess.run([sys.executable, "-m", "cli", "import", "openai-community/gpt2", "--out", str(tmp_path / "o")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not fetch openai-community/gpt2" in lines[0]
    assert not (tmp_path / "o").exists()


def test_export_of_a_variant_without_an_hf_class_writes_nothing(char_data, tmp_path):
    import train

    train.train(tiny_config(char_data, tmp_path / "alibi", model=dict(pos_encoding="alibi"),
                            train=dict(max_iters=2, eval_interval=2, eval_iters=1)))
    line = refused("export", tmp_path / "alibi", "--out", tmp_path / "hf")
    assert "pos_encoding = 'alibi'" in line and "no Hugging Face equivalent" in line
