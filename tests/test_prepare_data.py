"""Tests for prepare_data: tokenizers, the on-disk format, sources and prepare(). No network."""

import codecs
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataset_format as fmt
import prepare_data as pd
import sources as src
import tokenization as tk
from errors import UserError

AWKWARD = [
    "",
    "a",
    "Hello, world!",
    "  leading and trailing   \n\n\n  ",
    "tabs\tand\r\nCRLF\r\n\x0bvt\x0cff",
    "naïve café — “quotes” … ß ẞ İ ı",
    "emoji 🎉👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ZWJ",
    "中文字符，日本語のテキスト、한국어",
    "Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0301combining e\u0301",
    "<|endoftext|> is plain text here",
    "numbers 1234567890 3.14159 1e-10",
    " " * 50 + "\n" * 10 + "x",
]
settings.register_profile("fast", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fast")


def quiet(_msg: str) -> None:
    pass


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text(corpus_path) -> str:
    return corpus_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_tok(text):
    return tk.CharTokenizer.from_text(text)


@pytest.fixture(scope="module")
def gpt2_tok(has_gpt2_cache):
    if not has_gpt2_cache:
        pytest.skip("no offline tiktoken cache for GPT-2 (set TIKTOKEN_CACHE_DIR)")
    return tk.gpt2_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok(text):
    return tk.train_bpe(tk.split_chunks(text), 400, log=quiet)


@pytest.fixture(scope="module", params=["char", "gpt2", "bpe"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def prep(tmp_path, source, tokenizer="char", **kw):
    kw.setdefault("data_root", tmp_path / "data")
    return pd.prepare(str(source), tokenizer, progress=False, log=kw.pop("log", quiet), **kw)


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- tokenizers


def test_round_trip_on_corpus(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@pytest.fixture(scope="module", params=["gpt2", "bpe"])
def tt_tok(request):
    """The tiktoken-based tokenizers (gpt2 skips without the offline cache; bpe always runs)."""
    return request.getfixturevalue(f"{request.param}_tok")


@pytest.mark.parametrize("s", AWKWARD)
def test_round_trip_awkward_strings(tt_tok, s):
    assert tt_tok.decode(tt_tok.encode(s)) == s


def test_char_round_trip_and_unknown_char(char_tok, text):
    s = "".join(sorted(set(text)))[::-1] + "  \n\n" + text[:200]
    assert char_tok.decode(char_tok.encode(s)) == s
    assert char_tok.vocab_size == len(set(text)) and char_tok.eot_token is None
    assert char_tok.chars == "".join(sorted(set(text)))
    with pytest.raises(UserError, match=r"character '🎉' \(U\+1F389\) is not in this char vocabulary of \d+ characters"):
        char_tok.encode("hello 🎉")


def test_streaming_decode_bytes_is_byte_exact(tt_tok):
    s = "multi-byte: é 中 🎉👩‍👩‍👧 done"
    pieces = [tt_tok.decode_bytes([i]) for i in tt_tok.encode(s)]
    assert any(p.decode("utf-8", "replace") != p.decode("utf-8", "ignore") for p in pieces)  # some split a character
    dec = codecs.getincrementaldecoder("utf-8")()
    assert "".join(dec.decode(p) for p in pieces) + dec.decode(b"", final=True) == s


def test_load_tokenizer_rebuilds_identical_after_json(tok, text):
    spec = json.loads(json.dumps(tok.spec))
    again = tk.load_tokenizer(spec)
    sample = text[:5000]
    assert again.encode(sample) == tok.encode(sample)
    assert (again.vocab_size, again.eot_token, again.spec) == (tok.vocab_size, tok.eot_token, tok.spec)


def test_gpt2_properties(gpt2_tok):
    assert gpt2_tok.spec == {"kind": "gpt2"}
    assert gpt2_tok.vocab_size == 50257 and gpt2_tok.eot_token == 50256
    assert gpt2_tok.encode("Hello world") == [15496, 995]
    assert gpt2_tok.encode("<|endoftext|>") != [50256]  # encode_ordinary: special text is plain text


def test_gpt2_corpus_token_count(gpt2_tok, shakespeare_path):
    if shakespeare_path is None:
        pytest.skip("the shared tiny-Shakespeare corpus is not present")
    assert len(gpt2_tok.encode(shakespeare_path.read_text(encoding="utf-8"))) == 338_025


def test_gpt2_unavailable_is_a_user_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise OSError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        tk.gpt2_tokenizer()


def test_bpe_ranks_file_and_spec(tmp_path, bpe_tok):
    from tiktoken.load import load_tiktoken_bpe

    assert bpe_tok.spec["kind"] == "bpe" and bpe_tok.vocab_size == 400 and bpe_tok.eot_token is None
    f = tmp_path / "r.tiktoken"
    f.write_text(bpe_tok.spec["ranks"])
    ranks = load_tiktoken_bpe(str(f))
    assert len(ranks) == 400 and sorted(ranks.values()) == list(range(400))
    assert ranks == bpe_tok.encoding._mergeable_ranks


def test_bpe_vocab_size_too_small(text):
    with pytest.raises(UserError, match=">= 256"):
        tk.train_bpe([text], 255, log=quiet)


def test_bpe_vocab_capped_by_corpus():
    msgs = []
    t = tk.train_bpe(["abc abc"], 400, log=msgs.append)
    assert t.vocab_size == 259 and "only supports 259" in msgs[0]
    assert t.decode(t.encode("abc abd")) == "abc abd"


@pytest.mark.parametrize("spec", [
    {}, {"kind": "wordpiece"}, {"kind": "char"}, {"kind": "char", "chars": "aab"},
    {"kind": "bpe", "pattern": r"\w+"}, {"kind": "bpe", "pattern": r"\w+", "ranks": "!!! x\n"},
    {"kind": "bpe", "pattern": r"\w+", "ranks": "YQ== 0\n"},  # lacks most single bytes
])
def test_load_tokenizer_bad_spec(spec):
    with pytest.raises(UserError):
        tk.load_tokenizer(spec)


def test_chunked_encoding_equals_whole_text(tt_tok, text):
    size = min(20_000, len(text) // 8)
    chunks = tk.split_chunks(text, size)
    assert "".join(chunks) == text and len(chunks) >= 5
    assert np.concatenate([tk.encode_ids(tt_tok, c) for c in chunks]).tolist() == tt_tok.encode(text)


# ----------------------------------------------------------------------------- property tests

ws_heavy = st.text(alphabet=st.sampled_from(list("ab Z9.,'!\n\n  \t\r") + ["é", "🎉", "\u00a0", "\u3000"]), max_size=300)


@given(data=st.data())
def test_char_round_trip_property(char_tok, data):
    s = data.draw(st.text(alphabet=st.sampled_from(char_tok.chars), max_size=200))
    assert char_tok.decode(char_tok.encode(s)) == s


@given(s=st.one_of(st.text(max_size=200), ws_heavy))
def test_tiktoken_round_trip_property(tt_tok, s):
    ids = tt_tok.encode(s)
    assert tt_tok.decode(ids) == s and tt_tok.decode_bytes(ids) == s.encode("utf-8")


@given(s=ws_heavy, size=st.integers(1, 40))
def test_chunking_never_changes_tokens_property(tt_tok, s, size):
    chunks = tk.split_chunks(s, size)
    assert "".join(chunks) == s
    assert [i for c in chunks for i in tt_tok.encode(c)] == tt_tok.encode(s)


# ----------------------------------------------------------------------------- on-disk format


def _meta(vocab_size, **kw):
    return {"tokenizer": {"kind": "char", "chars": "ab"}, "vocab_size": vocab_size, "source": "test",
            "source_sha256": "0" * 64, "val_fraction": 0.1, "tokenizer_kind": "char", **kw}


@pytest.mark.parametrize("vocab_size, dtype, itemsize", [(65, "uint16", 2), (65536, "uint16", 2), (65537, "uint32", 4), (100_000, "uint32", 4)])
def test_bin_format_round_trip(tmp_path, vocab_size, dtype, itemsize):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, vocab_size, 1000), rng.integers(0, vocab_size, 100)
    train[0], val[0] = vocab_size - 1, 0
    meta = fmt.write_dataset(tmp_path, train, val, _meta(vocab_size))
    assert meta["dtype"] == dtype and (meta["train_tokens"], meta["val_tokens"]) == (1000, 100)
    assert fmt.read_meta(tmp_path) == meta
    assert (tmp_path / "train.bin").stat().st_size == 1000 * itemsize
    raw = np.fromfile(tmp_path / "train.bin", dtype="<u2" if itemsize == 2 else "<u4")
    assert raw.tolist() == train.tolist()
    for split, ids in (("train", train), ("val", val)):
        m = fmt.open_split(tmp_path, split)
        assert isinstance(m, np.memmap) and m.dtype == np.dtype(dtype) and m.tolist() == ids.tolist()
        assert fmt.open_split(tmp_path, split, meta) is not m  # a fresh memmap each call
    assert not list(tmp_path.glob("*.tmp"))


def test_write_dataset_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match="must lie in"):
        fmt.write_dataset(tmp_path / "x", [0, 65], [0], _meta(65))
    assert not (tmp_path / "x").exists()


def test_write_dataset_failure_leaves_old_files_and_no_temp(tmp_path, monkeypatch):
    fmt.write_dataset(tmp_path, [1, 2, 3], [1], _meta(65))
    before = snapshot(tmp_path)

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(fmt.os, "fsync", boom)
    with pytest.raises(OSError):
        fmt.write_dataset(tmp_path, [4, 5], [6], _meta(65))
    assert snapshot(tmp_path) == before


def test_read_meta_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*minigpt prepare"):
        fmt.read_meta(tmp_path / "nope")
    with pytest.raises(UserError, match="no meta.json.*minigpt prepare"):
        fmt.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable.*minigpt prepare"):
        fmt.read_meta(tmp_path)
    good = fmt.write_dataset(tmp_path, [1, 2], [1], _meta(65))
    for bad in ({"format_version": 2}, {"vocab_size": "65"}, {"dtype": "uint32"}, {"train_tokens": None}, {"tokenizer": {}}):
        (tmp_path / "meta.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(UserError, match="minigpt prepare"):
            fmt.read_meta(tmp_path)


def test_open_split_errors(tmp_path):
    meta = fmt.write_dataset(tmp_path, [1, 2, 3], [1, 2], _meta(65))
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\x00")  # not a multiple of 2 bytes
    with pytest.raises(UserError, match="truncated or stale"):
        fmt.open_split(tmp_path, "train", meta)
    (tmp_path / "val.bin").write_bytes(b"\x01\x00")  # one token, meta says two
    with pytest.raises(UserError, match="truncated or stale"):
        fmt.open_split(tmp_path, "val", meta)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(UserError, match="missing"):
        fmt.open_split(tmp_path, "val", meta)


# ----------------------------------------------------------------------------- prepare


def _split_in_memory(text: str, val_fraction: float) -> int:
    """The split a one-document corpus had when prepare read it whole: the reference for sources.split_text."""
    n = int(len(text) * (1 - val_fraction))
    after, before = text.find("\n", n), text.rfind("\n", 0, n)
    candidates = [i + 1 for i in (after, before) if i != -1 and 0 < i + 1 < len(text)]
    return min(candidates, key=lambda c: abs(c - n)) if candidates else n


def test_split_is_fixed_and_cut_at_newline(text, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    at = src.split_text(path, 0.1)
    train = path.read_bytes()[:at].decode("utf-8")
    assert train.endswith("\n") and abs(1 - len(train) / len(text) - 0.1) < 0.01
    assert len(train) == _split_in_memory(text, 0.1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.text(alphabet=st.sampled_from(list("ab \n") + ["é", "🎉", "\u3000"]), min_size=1, max_size=200),
       fraction=st.floats(0.01, 0.99))
def test_split_text_reads_blocks_as_the_whole_text_splits_property(tmp_path, monkeypatch, s, fraction):
    monkeypatch.setattr(src, "HASH_BLOCK", 7)  # blocks cut through characters
    monkeypatch.setattr(src, "SCAN_BYTES", 5)
    path = tmp_path / "t.txt"
    path.write_text(s, encoding="utf-8")
    at = src.split_text(path, fraction)
    assert len(path.read_bytes()[:at].decode("utf-8")) == _split_in_memory(s, fraction)


def test_prepare_char_meta_and_data(tmp_path, corpus_path, text):
    out = prep(tmp_path, corpus_path, out=tmp_path / "ds")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["tokenizer_kind"] == "char" and "bpe_vocab_size" not in meta
    assert meta["tokenizer"] == {"kind": "char", "chars": "".join(sorted(set(text)))}
    assert meta["vocab_size"] == len(set(text)) and meta["dtype"] == "uint16" and meta["val_fraction"] == 0.1
    assert meta["source"] == str(corpus_path.resolve())
    import hashlib
    assert meta["source_sha256"] == hashlib.sha256(corpus_path.read_bytes()).hexdigest()
    tok = tk.load_tokenizer(meta["tokenizer"])
    train, val = fmt.open_split(out, "train"), fmt.open_split(out, "val")
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert tok.decode(train) + tok.decode(val) == text
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_shakespeare_all_tokenizers(tmp_path, shakespeare_path, has_gpt2_cache):
    if shakespeare_path is None:
        pytest.skip("the shared tiny-Shakespeare corpus is not present")
    kinds = ["char", "bpe"] + (["gpt2"] if has_gpt2_cache else [])
    vals = set()
    for kind in kinds:
        out = prep(tmp_path, "shakespeare", kind, input_path=shakespeare_path)
        assert out == tmp_path / "data" / f"shakespeare_{kind}"
        meta = fmt.read_meta(out)
        assert meta["source_sha256"] == src.SHAKESPEARE_SHA256 and meta["source"].startswith("shakespeare")
        if kind == "gpt2":
            assert meta["train_tokens"] + meta["val_tokens"] == 338_025 and meta["eot_token"] == 50256
        if kind == "bpe":
            assert meta["bpe_vocab_size"] == tk.DEFAULT_BPE_VOCAB_SIZE == meta["vocab_size"]
            assert (out / "tokenizer.tiktoken").read_text() == meta["tokenizer"]["ranks"]
        tok = tk.load_tokenizer(meta["tokenizer"])
        vals.add(tok.decode(fmt.open_split(out, "val")))
        assert tok.decode(fmt.open_split(out, "train")) + vals.pop() == shakespeare_path.read_text()
        vals.add(tok.decode(fmt.open_split(out, "val")))
    assert len(vals) == 1  # the same fixed val text whatever the tokenizer


def test_reuse_refuse_force(tmp_path, corpus_path):
    out = tmp_path / "ds"
    prep(tmp_path, corpus_path, "bpe", vocab_size=300, out=out)
    before = snapshot(out)
    msgs = []
    assert prep(tmp_path, corpus_path, "bpe", vocab_size=300, out=out, log=msgs.append) == out
    assert any("reusing" in m for m in msgs) and snapshot(out) == before

    for kw in ({"tokenizer": "bpe", "vocab_size": 400}, {"tokenizer": "char"}, {"tokenizer": "bpe", "vocab_size": 300, "val_fraction": 0.2}):
        with pytest.raises(UserError, match="different source or tokenizer.*--force.*--out"):
            prep(tmp_path, corpus_path, out=out, **kw)
        assert snapshot(out) == before
    other = tmp_path / "other.txt"
    other.write_text("a different corpus\nwith other text\n" * 50)
    with pytest.raises(UserError, match="different source"):
        prep(tmp_path, other, "bpe", vocab_size=300, out=out)
    assert snapshot(out) == before

    prep(tmp_path, corpus_path, "char", out=out, force=True)
    assert fmt.read_meta(out)["tokenizer_kind"] == "char"
    assert not (out / "tokenizer.tiktoken").exists() and not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_refuses_unreadable_existing_dataset(tmp_path, corpus_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "meta.json").write_text("garbage")
    with pytest.raises(UserError, match="--force"):
        prep(tmp_path, corpus_path, out=out)
    assert (out / "meta.json").read_text() == "garbage"
    prep(tmp_path, corpus_path, out=out, force=True)
    assert fmt.read_meta(out)["tokenizer_kind"] == "char"


def test_incomplete_output_is_rewritten(tmp_path, corpus_path):
    out = prep(tmp_path, corpus_path, out=tmp_path / "ds")
    (out / "val.bin").write_bytes(b"")
    prep(tmp_path, corpus_path, out=out)
    assert len(fmt.open_split(out, "val")) == fmt.read_meta(out)["val_tokens"] > 0


def test_folder_source(tmp_path):
    src = tmp_path / "plays"
    src.mkdir()
    (src / "b.txt").write_text("second file\n" * 30)
    (src / "a.txt").write_text("first file, no newline at end" * 30)
    (src / "notes.md").write_text("ignored")
    out = prep(tmp_path, src)
    assert out == tmp_path / "data" / "plays_char"
    tok = tk.load_tokenizer(fmt.read_meta(out)["tokenizer"])
    # two documents: whole ones are held out, so each split gets one (the char vocabulary has no eot)
    splits = {tok.decode(fmt.open_split(out, s)) for s in ("train", "val")}
    assert splits == {"first file, no newline at end" * 30, "second file\n" * 30}


def test_default_out_dir_uses_file_stem(tmp_path, corpus_path):
    assert prep(tmp_path, corpus_path).name == f"{corpus_path.stem}_char"


def test_shakespeare_download_cached_and_verified(tmp_path, monkeypatch, shakespeare_path):
    if shakespeare_path is None:
        pytest.skip("the shared tiny-Shakespeare corpus is not present")
    calls = []

    class Resp:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return shakespeare_path.read_bytes()

    def fake_urlopen(url, timeout=None):
        calls.append((url, timeout))
        return Resp()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    out = prep(tmp_path, "shakespeare")
    cache = src.shakespeare_cache_path(tmp_path / "data")
    assert cache == tmp_path / "data" / "shakespeare" / "input.txt"
    assert cache.read_bytes() == shakespeare_path.read_bytes() and calls == [(src.SHAKESPEARE_URL, src.DOWNLOAD_TIMEOUT_S)]
    prep(tmp_path, "shakespeare", out=tmp_path / "again")
    assert len(calls) == 1 and fmt.read_meta(out)["source_sha256"] == src.SHAKESPEARE_SHA256


# ----------------------------------------------------------------------------- bad input


def test_shakespeare_offline_without_input(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"could not download the tiny-Shakespeare corpus \(.*name resolution\); pass a local copy with --input PATH"):
        prep(tmp_path, "shakespeare")
    assert not (tmp_path / "data" / "shakespeare_char").exists()


def test_shakespeare_wrong_input(tmp_path):
    f = tmp_path / "fake.txt"
    f.write_text("not shakespeare\n" * 10)
    with pytest.raises(UserError, match=r"not the tiny-Shakespeare corpus.*minigpt prepare .*fake\.txt"):
        prep(tmp_path, "shakespeare", input_path=f)
    with pytest.raises(UserError, match="is not a file"):
        prep(tmp_path, "shakespeare", input_path=tmp_path / "missing.txt")
    with pytest.raises(UserError, match="--input only applies"):
        prep(tmp_path, f, input_path=f)


@pytest.mark.parametrize("content, match", [
    (b"", "no text"),
    (b"  \n\t\n   \n", "no text"),
    (b"good text\nthen latin-1: caf\xe9\n", r"not UTF-8 text \(bad byte b'\\xe9' at byte offset 27\)"),
])
def test_bad_file_contents(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        prep(tmp_path, f)
    assert str(f) in str(e.value) or "bad.txt" in str(e.value)
    assert not (tmp_path / "data").exists()


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        prep(tmp_path, tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.md").write_text("not a txt")
    with pytest.raises(UserError, match="holds no .txt files"):
        prep(tmp_path, tmp_path / "empty")


def test_non_utf8_file_in_folder_is_named(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("fine\n")
    (d / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=r"b\.txt is not UTF-8 text .*offset 0"):
        prep(tmp_path, d)


@pytest.mark.parametrize("kw, match", [
    ({"tokenizer": "sentencepiece"}, "unknown tokenizer 'sentencepiece'; choose one of: char, gpt2, bpe"),
    ({"tokenizer": "char", "vocab_size": 100}, "--vocab-size applies only to --tokenizer bpe"),
    ({"tokenizer": "gpt2", "vocab_size": 100}, "--vocab-size applies only to --tokenizer bpe"),
    ({"tokenizer": "bpe", "vocab_size": 100}, ">= 256"),
    ({"val_fraction": 0}, "--val-fraction must be a number between 0 and 1"),
    ({"val_fraction": 1.0}, "--val-fraction"),
    ({"val_fraction": -0.1}, "--val-fraction"),
    ({"val_fraction": float("nan")}, "--val-fraction"),
])
def test_bad_requests(tmp_path, corpus_path, kw, match):
    with pytest.raises(UserError, match=match.replace("(", r"\(")):
        prep(tmp_path, corpus_path, **kw)
    assert not (tmp_path / "data").exists()


def test_text_too_short_to_split(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="too short"):
        prep(tmp_path, f)


def test_import_is_cheap_and_torch_free():
    code = "import sys, prepare_data; assert 'torch' not in sys.modules and 'rustbpe' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(pd.__file__))


# ----------------------------------------------------------------------------- token ids: at prepare, start, batch


def _corrupt(path, at, value, dtype="<u2"):
    raw = np.fromfile(path, dtype=dtype)
    raw[at] = value
    raw.tofile(path)


def test_write_dataset_records_each_splits_largest_id(tmp_path):
    meta = fmt.write_dataset(tmp_path, [3, 64, 7], [], _meta(65))
    assert meta["max_token_id"] == {"train": 64, "val": None} == fmt.read_meta(tmp_path)["max_token_id"]
    assert fmt.recorded_max_id(meta, "train") == 64 and fmt.recorded_max_id(meta, "val") is None
    assert fmt.recorded_max_id({}, "train") is None  # prepared before the record existed: nothing to trust


def test_start_check_scans_a_small_split_and_trusts_prepare_for_a_large_one(tmp_path):
    meta = fmt.write_dataset(tmp_path, list(range(60)) * 10, [1, 2], _meta(65))
    fmt.check_token_ids(tmp_path, "train", meta)  # clean
    _corrupt(tmp_path / "train.bin", 123, 65)  # one past the vocabulary, after prepare
    with pytest.raises(UserError, match=r"train.bin holds token id 65 at position 123, but vocab_size is 65: .*--force"):
        fmt.check_token_ids(tmp_path, "train", meta)  # 1,200 bytes: read whole
    fmt.check_token_ids(tmp_path, "train", meta, full_check_bytes=1199)  # "large": not read (batches check it)
    old = {k: v for k, v in meta.items() if k != "max_token_id"}  # a dataset from before the record: same rule
    fmt.check_token_ids(tmp_path, "train", old, full_check_bytes=0)
    with pytest.raises(UserError, match="holds token id 65 at position 123"):
        fmt.check_token_ids(tmp_path, "train", old)
    # a meta.json whose record contradicts its vocabulary is refused without reading the file
    with pytest.raises(UserError, match=r"meta.json records token id 70 as the largest of the val split, but "
                                        r"vocab_size is 65; re-run `minigpt prepare"):
        fmt.check_token_ids(tmp_path, "val", {**meta, "max_token_id": {"train": 59, "val": 70}}, full_check_bytes=0)
    with pytest.raises(UserError, match="truncated or stale"):  # sizes are still checked, always
        fmt.check_token_ids(tmp_path, "val", {**meta, "val_tokens": 3}, full_check_bytes=0)


@pytest.mark.parametrize("n_tokens, bad_at", [(20, 7), (40, 25)])
def test_each_batch_checks_its_ids_and_names_the_position_in_the_file(tmp_path, n_tokens, bad_at):
    """With a window of 20 tokens, every batch of a 20-token split covers position 7, and most of a 40-token
    split's windows cover 25: the error names the file position whatever row and column it was cut into."""
    import torch

    import batches
    from model import GPTConfig

    meta = fmt.write_dataset(tmp_path, [i % 60 for i in range(n_tokens)], [1] * 20, _meta(65))
    model = GPTConfig(vocab_size=65, block_size=19, n_layer=1, n_head=1, n_embd=8)
    source = batches.Batches(tmp_path, meta, "train", 8, model, torch.device("cpu"), seed=0)
    x, y = source.make(0, 0)
    assert x.shape == (8, 19) and int(x.max()) < 60
    _corrupt(tmp_path / "train.bin", bad_at, 300)
    with pytest.raises(UserError, match=rf"train.bin holds token id 300 at position {bad_at}, but vocab_size is 65"):
        source.make(0, 0)
    if n_tokens > 20:  # a window that misses the bad id passes
        source.check_ids(np.fromfile(tmp_path / "train.bin", dtype="<u2")[None, :20], [0])


def test_a_corrupt_id_in_a_split_too_large_to_scan_ends_training_when_a_batch_reaches_it(char_data, tmp_path,
                                                                                           monkeypatch):
    """The start no longer reads a large split whole: a corrupt id is the same one-line error (exit 2, no
    traceback) from the first batch that holds it."""
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from conftest import REPO_ROOT

    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    meta = json.loads((data / "meta.json").read_text())
    raw = np.fromfile(data / "train.bin", dtype="<u2")
    raw[::7] = meta["vocab_size"]  # every window of 8+ tokens holds one
    raw.tofile(data / "train.bin")
    monkeypatch.setattr(fmt, "FULL_ID_CHECK_BYTES", 0)  # as if the split were larger than the start reads
    args = ["train", str(REPO_ROOT / "config" / "debug.toml"), "--set", f"data.dir={data}",
            "--set", f"run.out_dir={tmp_path / 'run'}", "--set", "train.max_iters=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert re.fullmatch(rf"error: {re.escape(str(data / 'train.bin'))} holds token id {meta['vocab_size']} at "
                        rf"position (\d+), but vocab_size is {meta['vocab_size']}: .*", lines[0]), lines[0]
    assert int(re.search(r"position (\d+)", lines[0]).group(1)) % 7 == 0  # a real corrupt position
