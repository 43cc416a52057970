"""interop/hf_tokenizer.py: Hugging Face tokenizers in (import) and out (export), checked against transformers'
AutoTokenizer on the same folder: the same prompt ids, the same decoded text. Tiny tokenizers are trained here
with the `tokenizers` library (no downloads); every test takes seconds."""

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
# nothing here reads the corpus (GPT-2's tests skip without tiktoken's cache either way): CI's first pass only
pytestmark = pytest.mark.once

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

import checkpoint  # noqa: E402
import dataset_format as fmt  # noqa: E402
import prepare_data as pd  # noqa: E402
import sources  # noqa: E402
import tokenization as tk  # noqa: E402
import sample  # noqa: E402
from errors import UserError  # noqa: E402
from interop import hf_tokenizer as hft  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenization import TextStream  # noqa: E402

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog; don't it? 1234567.",
    "Café au lait, naïve résumé, 日本語のテキスト, emoji 🙂🎉.",
    "  Indented line\n\n\tTabbed line with  two  spaces\n",
    "To be, or not to be: that is the question.",
] * 4
PROBES = [
    "Hello world",
    "café é 日本語 🙂🎉",  # 日本語 and the emoji are partly unseen: byte-level / byte fallback
    "  \n\n\t  x",
    " leading space",
    "trailing space ",
    "a<|endoftext|>b",
    "<s>Hello</s>",
    "don't stop, it's 1234567!",
    "",
]
EOT = "<|endoftext|>"


def auto(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_ids(auto_tok, text):
    return auto_tok(text)["input_ids"]


def hf_text(auto_tok, ids):
    return auto_tok.decode(ids, skip_special_tokens=True)


def assert_parity(ours, auto_tok, probes=PROBES):
    """Our prompt ids and decoded text equal AutoTokenizer's on every probe."""
    for text in probes:
        ids = ours.encode_prompt(text)
        assert ids == hf_ids(auto_tok, text), text
        assert ours.decode(ids) == hf_text(auto_tok, ids), text


def write_config(folder, **config):
    (folder / "config.json").write_text(json.dumps(config))
    return config


# ----------------------------------------------------------------------------- tiny Hugging Face folders


@pytest.fixture(scope="module")
def byte_level_folder(tmp_path_factory):
    """A GPT-2-style byte-level BPE with <|endoftext|> as bos and eos (HF's gpt2 adds neither to a prompt)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=[EOT],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("hf") / "byte_level"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT).save_pretrained(folder)
    write_config(folder, model_type="gpt2", vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id(EOT),
                 eos_token_id=tok.token_to_id(EOT))
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A Llama-2-like tokenizer: "▁" metaspace, byte fallback (<0x0A> for a newline), <s> added to every prompt,
    a decoder that strips the leading space; eos </s> = 2 from generation_config.json."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"]))
    learned = json.loads(trained.to_str())["model"]
    # as Llama 2: <unk> <s> </s>, then the 256 byte tokens <0x00>..<0xFF> (ordinary vocabulary), then the rest
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>").save_pretrained(folder)
    write_config(folder, model_type="llama", vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=99)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def load_folder(folder):
    return hft.tokenizer_from_hf_folder(folder, json.loads((folder / "config.json").read_text()))


@pytest.fixture(params=["byte_level", "llama"])
def hf_folder(request):
    return request.getfixturevalue(f"{request.param}_folder")


# ----------------------------------------------------------------------------- import


def test_imported_folder_encodes_and_decodes_as_auto_tokenizer(hf_folder):
    tok, auto_tok = load_folder(hf_folder), auto(hf_folder)
    assert tok.spec["kind"] == "hf"
    assert_parity(tok, auto_tok)
    for text in PROBES:  # training text: no BOS, special-token text is plain text (HF's split_special_tokens)
        assert tok.encode(text) == auto_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok.vocab_size == len(auto_tok)
    rng = random.Random(0)  # any ids, special and byte-fallback ones too, decode as HF decodes them
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids) == hf_text(auto_tok, ids)


def test_llama_like_prompt_gets_bos_and_eos_comes_from_generation_config(llama_folder):
    tok = load_folder(llama_folder)
    assert tok.encode_prompt("Hello")[0] == 1 and tok.encode("Hello")[0] != 1
    assert tok.eot_token == 2  # generation_config.json's, over config.json's 99
    omega = [tok.backend.token_to_id(f"<0x{b:02X}>") for b in "Ω".encode()]  # unseen in training: byte fallback
    assert tok.encode("Ω") == [tok.backend.token_to_id("▁")] + omega and tok.decode(omega) == "Ω"


def test_add_bos_token_in_tokenizer_config_is_what_auto_tokenizer_makes_of_it(byte_level_folder, tmp_path):
    """add_bos_token / add_eos_token in tokenizer_config.json: whatever the installed transformers does with them
    (5.x leaves tokenizer.json's post-processor in charge when there is one) is in the backend we keep."""
    tokenizer_json = json.loads((byte_level_folder / "tokenizer.json").read_text())
    for post_processor in (None, tokenizer_json["post_processor"]):
        (tmp_path / "tokenizer.json").write_text(json.dumps({**tokenizer_json, "post_processor": post_processor}))
        token_config = json.loads((byte_level_folder / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**token_config, "add_bos_token": True,
                                                                    "add_eos_token": True}))
        assert_parity(hft.tokenizer_from_hf_folder(tmp_path, {}), auto(tmp_path))


def test_byte_level_decode_bytes_are_exact(byte_level_folder):
    tok = load_folder(byte_level_folder)
    text = "café 日本語 🙂🎉"
    ids = tok.encode(text)
    assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")
    assert tok.eot_token == tok.backend.token_to_id(EOT) and tok.decode_bytes([tok.eot_token]) == b""


def test_import_without_transformers_reads_tokenizer_json(hf_folder, monkeypatch):
    """The fallback without transformers: tokenizer.json as it is, the eos from the folder's configs. That is
    AutoTokenizer's encoding for a PreTrainedTokenizerFast folder; transformers 5 rebuilds a LlamaTokenizer's
    pre-tokenizer (Metaspace instead of the file's Prepend + Replace normalizer), which differs on leading spaces."""
    with_transformers = load_folder(hf_folder)
    monkeypatch.setattr(hft, "_transformers", lambda: None)
    tok = load_folder(hf_folder)
    assert (tok.eot_token, tok.spec["bos_token_id"]) == (with_transformers.eot_token, with_transformers.spec["bos_token_id"])
    raw = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    for text in PROBES:
        assert tok.encode_prompt(text) == raw.encode(text).ids
    if hf_folder.name == "byte_level":
        assert_parity(tok, auto(hf_folder))
    else:
        assert tok.encode_prompt("Hello world") == hf_ids(auto(hf_folder), "Hello world")
        assert tok.encode_prompt(" x") != hf_ids(auto(hf_folder), " x")  # why transformers is preferred


def test_vocab_and_merges_folder_goes_through_transformers(byte_level_folder, tmp_path, monkeypatch):
    """vocab.json + merges.txt and no tokenizer.json (an old GPT-2 folder): transformers converts it."""
    model = json.loads((byte_level_folder / "tokenizer.json").read_text())["model"]
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT,
                                                              "eos_token": EOT, "unk_token": EOT}))
    config = write_config(folder, model_type="gpt2", vocab_size=len(model["vocab"]))
    tok = hft.tokenizer_from_hf_folder(folder, config)
    assert_parity(tok, auto(folder))
    assert tok.encode_prompt("Hello world") == load_folder(byte_level_folder).encode_prompt("Hello world")
    monkeypatch.setattr(hft, "_transformers", lambda: None)
    with pytest.raises(UserError, match=r"vocab.json \+ merges.txt but no tokenizer.json.*pip install") as e:
        hft.tokenizer_from_hf_folder(folder, config)
    assert "\n" not in str(e.value)


def test_gpt2_folder_without_tokenizer_files_is_tiktoken_gpt2(tmp_path, has_gpt2_cache):
    if not has_gpt2_cache:
        pytest.skip("no offline tiktoken cache for GPT-2 (set TIKTOKEN_CACHE_DIR)")
    config = write_config(tmp_path, model_type="gpt2", vocab_size=50257)
    tok = hft.tokenizer_from_hf_folder(tmp_path, config)
    assert tok.spec == {"kind": "gpt2"} and tok.eot_token == 50256


@pytest.mark.parametrize("config", [{"model_type": "llama", "vocab_size": 32000},
                                    {"model_type": "gpt2", "vocab_size": 50304}])
def test_folder_without_a_tokenizer_is_refused_in_one_line(tmp_path, config):
    write_config(tmp_path, **config)
    with pytest.raises(UserError, match="holds no tokenizer.*tokenizer.json.*vocab.json.*tokenizer.model") as e:
        hft.tokenizer_from_hf_folder(tmp_path, config)
    assert "\n" not in str(e.value)


def test_hf_spec_round_trips_through_meta_json(hf_folder):
    tok = load_folder(hf_folder)
    again = tk.load_tokenizer(json.loads(json.dumps(tok.spec)))
    assert again.spec == tok.spec and (again.vocab_size, again.eot_token) == (tok.vocab_size, tok.eot_token)
    for text in PROBES:
        assert again.encode_prompt(text) == tok.encode_prompt(text) and again.encode(text) == tok.encode(text)
    with pytest.raises(UserError, match="'json'"):
        tk.load_tokenizer({"kind": "hf"})
    with pytest.raises(UserError, match="no valid tokenizer.json"):
        tk.load_tokenizer({"kind": "hf", "json": "{}"})


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def char_tok():
    return tk.CharTokenizer.from_text("".join(CORPUS + PROBES))


@pytest.fixture(scope="module")
def bpe_tok():
    return tk.train_bpe(CORPUS, 400, log=lambda s: None)


@pytest.fixture(scope="module")
def gpt2_tok(has_gpt2_cache):
    if not has_gpt2_cache:
        pytest.skip("no offline tiktoken cache for GPT-2 (set TIKTOKEN_CACHE_DIR)")
    return tk.gpt2_tokenizer()


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2", "hf_byte_level", "hf_llama"])
def test_exported_tokenizer_loads_in_auto_tokenizer_with_our_ids(kind, request, tmp_path):
    if kind.startswith("hf_"):
        tok = load_folder(request.getfixturevalue(f"{kind[3:]}_folder"))
    else:
        tok = request.getfixturevalue(f"{kind}_tok")
    ids = hft.export_tokenizer(tok, tmp_path, model_max_length=256)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    auto_tok = auto(tmp_path)
    assert_parity(tok, auto_tok, PROBES + ["\n".join(CORPUS)])
    assert auto_tok.model_max_length == 256
    assert (ids["bos_token_id"], ids["eos_token_id"]) == (auto_tok.bos_token_id, auto_tok.eos_token_id)
    # and back in: the exported folder imports to the same ids
    back = hft.tokenizer_from_hf_folder(tmp_path, {})
    for text in PROBES:
        assert back.encode_prompt(text) == tok.encode_prompt(text) and back.encode(text) == tok.encode(text)
    if kind in ("gpt2", "hf_byte_level"):  # the end-of-text token: one id in a prompt, bos and eos, not printed
        eot = tok.eot_token
        assert ids == {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}
        assert tok.encode_prompt(EOT) == [eot] == hf_ids(auto_tok, EOT) and tok.decode([eot]) == ""
    if kind in ("char", "bpe"):
        assert ids == {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def test_exported_char_tokenizer_is_one_token_per_character(char_tok, tmp_path):
    hft.export_tokenizer(char_tok, tmp_path, model_max_length=64)
    auto_tok = auto(tmp_path)
    text = " \n\t" + char_tok.chars
    assert hf_ids(auto_tok, text) == char_tok.encode(text) and len(hf_ids(auto_tok, text)) == len(text)
    assert hf_text(auto_tok, char_tok.encode(text)) == text  # no spaces added between tokens
    assert len(auto_tok) == char_tok.vocab_size


def test_exported_gpt2_equals_tiktoken_on_a_real_text(gpt2_tok, tmp_path, shakespeare_path):
    """The ranks -> merges conversion on GPT-2's full vocabulary, checked on a longer text."""
    hft.export_tokenizer(gpt2_tok, tmp_path, model_max_length=1024)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (EOT, EOT, EOT)
    text = shakespeare_path.read_text()[:60_000] if shakespeare_path else "\n".join(CORPUS * 20)
    assert hf_ids(auto(tmp_path), text) == gpt2_tok.encode_prompt(text)


# ----------------------------------------------------------------------------- streaming and sampling


def test_stream_of_a_metaspace_tokenizer_is_hf_decode_of_the_whole_sequence(llama_folder):
    tok, auto_tok = load_folder(llama_folder), auto(llama_folder)
    prompt = tok.encode_prompt("Hello")
    new = tok.encode(" world, Ω€ café 日本語 🙂\n  x")  # "▁world", Ω and € in byte-fallback pieces
    stream = TextStream(tok, prompt)
    pieces = [stream.push(t) for t in new] + [stream.flush()]
    expected = hf_text(auto_tok, prompt + new)[len(hf_text(auto_tok, prompt)):]
    assert "".join(pieces) == stream.text == expected == " world, Ω€ café 日本語 🙂\n  x"
    assert "\ufffd" not in "".join(pieces)  # an unfinished byte sequence waits for its last byte
    assert "".join(tok.decode([t]) for t in new) != expected  # one token alone loses its leading space


@pytest.fixture(scope="module")
def llama_run(llama_folder):
    tok = load_folder(llama_folder)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    return sample.LoadedRun(model=model, tokenizer=tok, rt=sample.inference_runtime(model, "cpu"), step=0)


def test_sample_streams_what_it_returns_with_an_hf_tokenizer(llama_run, llama_folder):
    tok, auto_tok = llama_run.tokenizer, auto(llama_folder)
    assert sample.encode_prompt(tok, "Hello") == hf_ids(auto_tok, "Hello")
    assert sample.encode_prompt(tok, "") == [1]  # HF's defaults on "": the BOS
    pieces = []
    sc = sample.SampleConfig(max_new_tokens=30, temperature=1.0, top_k=0, seed=5)
    texts = sample.sample(llama_run, "Hello", 2, sc, write=pieces.append)
    streamed = "".join(pieces).split("\n" + "-" * 40 + "\n")
    assert [s.removesuffix("\n") for s in streamed] == texts and all(t.startswith("Hello") for t in texts)


def test_sample_text_is_prompt_plus_hf_decode_of_the_new_ids(llama_run, llama_folder, monkeypatch):
    """The returned text is the prompt, then what HF's decode of prompt + new ids adds to the prompt's."""
    auto_tok, seen = auto(llama_folder), []
    real_push = TextStream.push
    monkeypatch.setattr(TextStream, "push", lambda self, t: (seen.append(t), real_push(self, t))[1])
    [text] = sample.sample(llama_run, "Hello", 1, sample.SampleConfig(max_new_tokens=25, temperature=1.0, top_k=0,
                                                                      seed=1), write=lambda s: None)
    prompt = hf_ids(auto_tok, "Hello")
    assert seen and text == "Hello" + hf_text(auto_tok, prompt + seen)[len(hf_text(auto_tok, prompt)):]


def test_empty_prompt_without_bos_starts_from_eos(byte_level_folder):
    tok = load_folder(byte_level_folder)
    assert hf_ids(auto(byte_level_folder), "") == [] and sample.encode_prompt(tok, "") == [tok.eot_token]


# ----------------------------------------------------------------------------- prepare --tokenizer PATH

TRAIN_TEXT = "\n".join(CORPUS * 10)


def text_split(path: Path) -> tuple[str, str]:
    """A one-document corpus's train and val text, as prepare splits it."""
    data, at = path.read_bytes(), sources.split_text(path, 0.1)
    return data[:at].decode("utf-8"), data[at:].decode("utf-8")


def test_prepare_with_a_hf_folder_tokenizer(hf_folder, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TRAIN_TEXT)
    out = pd.prepare(str(src), tokenizer=str(hf_folder), out=tmp_path / "data", log=lambda s: None)
    meta = fmt.read_meta(out)
    tok = load_folder(hf_folder)
    assert meta["tokenizer_kind"] == "hf" and meta["tokenizer"] == tok.spec and meta["eot_token"] == tok.eot_token
    assert meta["tokenizer_sha256"] == tk.tokenizer_sha256(tok.spec) and meta["tokenizer_from"] == str(hf_folder.resolve())
    train_text, _ = text_split(src)
    assert fmt.open_split(out, "train").tolist() == tok.encode(train_text)
    assert tk.load_tokenizer(meta["tokenizer"]).encode("Hello") == tok.encode("Hello")
    logs = []
    assert pd.prepare(str(src), tokenizer=str(hf_folder), out=out, log=logs.append) == out
    assert any("reusing" in line for line in logs)


def test_prepare_refuses_another_tokenizer_in_the_same_folder(byte_level_folder, llama_folder, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TRAIN_TEXT)
    out = pd.prepare(str(src), tokenizer=str(byte_level_folder), out=tmp_path / "data", log=lambda s: None)
    with pytest.raises(UserError, match="different source or tokenizer.*tokenizer_sha256.*--force"):
        pd.prepare(str(src), tokenizer=str(llama_folder), out=out, log=lambda s: None)
    pd.prepare(str(src), tokenizer=str(llama_folder), out=out, force=True, log=lambda s: None)
    assert fmt.read_meta(out)["tokenizer"] == load_folder(llama_folder).spec
    with pytest.raises(UserError, match="--vocab-size applies only to --tokenizer bpe"):
        pd.prepare(str(src), tokenizer=str(llama_folder), vocab_size=500, out=out, log=lambda s: None)


def test_prepare_with_a_run_folder_tokenizer(bpe_tok, tmp_path):
    """A run's tokenizer is the spec in its checkpoint: the corpus gets exactly the run's ids (for fine-tuning)."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"version": checkpoint.CHECKPOINT_VERSION, "model": {}, "config": {}, "tokenizer": bpe_tok.spec},
               run / "ckpt.pt")
    src = tmp_path / "corpus.txt"
    src.write_text(TRAIN_TEXT)
    for given in (run, run / "ckpt.pt"):
        out = pd.prepare(str(src), tokenizer=str(given), out=tmp_path / f"data_{given.name}", log=lambda s: None)
        meta = fmt.read_meta(out)
        assert meta["tokenizer"] == bpe_tok.spec and meta["tokenizer_kind"] == "bpe" and "bpe_vocab_size" not in meta
        assert fmt.open_split(out, "val").tolist() == bpe_tok.encode(text_split(src)[1])


@pytest.mark.parametrize("given, message", [
    ("no/such/folder", "no such file or folder"),
    (".", "neither a minigpt run .*nor a Hugging Face model folder"),
])
def test_prepare_refuses_a_path_without_a_tokenizer(given, message, tmp_path, monkeypatch):
    src = tmp_path / "corpus.txt"
    src.write_text(TRAIN_TEXT)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        pd.prepare(str(src), tokenizer=given, out=tmp_path / "data", log=lambda s: None)
    assert "\n" not in str(e.value)
