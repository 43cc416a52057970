"""Corpora of documents (sources.py) through prepare_data's streaming pipeline: a folder, .jsonl, .parquet and
hf: datasets; whole-document validation, the end-of-text token, --max-docs, workers, bounded tasks, Ctrl-C and
a full disk. The token reference is the tokenizer run on each document whole."""

import errno
import json
import random

import numpy as np
import pytest

import dataset_format as fmt
import prepare_data as pd
import sources
import tokenization as tk
from errors import UserError


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def docs(corpus_path) -> list[str]:
    """~40 documents of different sizes cut from the corpus, some non-ASCII, one with no newline at all."""
    text = corpus_path.read_text(encoding="utf-8")
    text = (text * (200_000 // len(text) + 1))[:200_000]  # the small fallback corpus, repeated
    rng = random.Random(0)
    out, at = [], 0
    while at < len(text) and len(out) < 40:
        n = rng.randint(200, 8000)
        out.append(text[at:at + n])
        at += n
    out[3] = out[3].replace("\n", " ") + " ünïcödé 🎉"
    return out


@pytest.fixture(scope="module")
def gpt2(has_gpt2_cache):
    if not has_gpt2_cache:
        pytest.skip("needs tiktoken's GPT-2 files (TIKTOKEN_CACHE_DIR)")
    return tk.gpt2_tokenizer()


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks of a few KB, so that documents are cut into pieces and a corpus into many tasks."""
    monkeypatch.setattr(sources, "TASK_BYTES", 3000)
    monkeypatch.setattr(sources, "SCAN_BYTES", 64)


def write_folder(folder, docs):
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    return folder


def prep(source, out, **kw):
    kw.setdefault("workers", 1)
    return pd.prepare(str(source), out=out, progress=False, log=kw.pop("log", quiet), **kw)


def splits_of(out):
    meta = fmt.read_meta(out)
    return meta, {s: np.asarray(fmt.open_split(out, s)).tolist() for s in fmt.SPLITS}


def documents_in(ids: list[int], eot: int) -> list[list[int]]:
    """ids cut after each eot: the documents of a split, each with its eot."""
    out, start = [], 0
    for i, t in enumerate(ids):
        if t == eot:
            out.append(ids[start:i + 1])
            start = i + 1
    assert start == len(ids), "a split ends with a document's eot"
    return out


def test_folder_holds_out_whole_documents_each_followed_by_eot(tmp_path, docs, gpt2, small_tasks):
    out = prep(write_folder(tmp_path / "docs", docs), tmp_path / "d", tokenizer="gpt2", val_fraction=0.2)
    meta, ids = splits_of(out)
    encoded = [gpt2.encode(d) + [gpt2.eot_token] for d in docs]
    train, val = (documents_in(ids[s], gpt2.eot_token) for s in fmt.SPLITS)
    # every document whole and in order, in exactly one split: tiktoken's tokens plus one eot each
    assert sorted(train + val) == sorted(encoded) and len(train) + len(val) == len(docs) == meta["documents"]
    assert [d for d in encoded if d in train] == train and [d for d in encoded if d in val] == val
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, encoded))
    assert 0.05 < len(val) / len(docs) < 0.4  # the draw: about val_fraction of the documents
    assert meta["val_split"] == "documents" and meta["end_of_text_between_documents"] and meta["seed"] == 1337
    # the draw is the seed's: another seed holds out other documents
    _, other = splits_of(prep(tmp_path / "docs", tmp_path / "d2", tokenizer="gpt2", val_fraction=0.2, seed=7))
    assert other["val"] != ids["val"]


def test_workers_write_what_one_process_writes(tmp_path, docs, small_tasks):
    folder = write_folder(tmp_path / "docs", docs)
    for tokenizer in ("char", "bpe"):
        one = prep(folder, tmp_path / f"one_{tokenizer}", tokenizer=tokenizer, vocab_size=300 if tokenizer == "bpe" else None)
        two = prep(folder, tmp_path / f"two_{tokenizer}", tokenizer=tokenizer, workers=2,
                   vocab_size=300 if tokenizer == "bpe" else None)
        for name in ("train.bin", "val.bin"):
            assert (one / name).read_bytes() == (two / name).read_bytes()
        assert fmt.read_meta(one)["tokenizer"] == fmt.read_meta(two)["tokenizer"]


def test_a_long_text_without_newlines_is_cut_only_where_tokens_do_not_change(tmp_path, gpt2, small_tasks):
    rng = random.Random(1)
    words = ["the", "king", "'s", "don't", "  ", "12345", "é", "🎉", ",", "\u00a0", "a.b", "\t"]
    text = " ".join(rng.choice(words) for _ in range(6000))  # ~30 KB, no newline: ten or more pieces
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    spans = list(sources.file_spans(path, 0, path.stat().st_size, True, True))
    assert len(spans) >= 8
    pieces = [t for s in spans for t, _ in sources.FileSpans((s,)).texts()]
    assert "".join(pieces) == text
    assert [i for p in pieces for i in gpt2.encode(p)] == gpt2.encode(text)
    out = prep(path, tmp_path / "d", tokenizer="gpt2")
    _, ids = splits_of(out)
    at = sources.split_text(path, 0.1)
    data = path.read_bytes()
    assert ids["train"] == gpt2.encode(data[:at].decode()) and ids["val"] == gpt2.encode(data[at:].decode())


def test_jsonl_documents_with_a_text_key(tmp_path, docs, small_tasks):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    out = prep(f, tmp_path / "d", text_key="body", max_docs=25)
    meta, ids = splits_of(out)
    tok = tk.load_tokenizer(meta["tokenizer"])
    assert meta["documents"] == 25 and meta["text_key"] == "body" and meta["max_docs"] == 25
    # the char vocabulary is that of the first 25 documents only
    assert set(tok.chars) == set("".join(docs[:25]))
    assert sorted(tok.decode(ids["train"]) + tok.decode(ids["val"])) == sorted("".join(docs[:25]))


@pytest.mark.parametrize("line, message", [
    ('{"text": "fine"', r"line 58 is not valid JSON"),
    ('{"txt": "no text key"}', r'line 58 has no "text" key \(it has: "txt"\)'),
    ('{"text": 3}', r'line 58: "text" is a JSON number, not a string'),
    ('["text"]', r"line 58 is a JSON array, not an object"),
])
def test_a_bad_jsonl_line_is_named_by_its_number(tmp_path, small_tasks, line, message):
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(60)]
    lines[57] = line  # far past the first task: its number counts every line before it
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(UserError, match=message):
            prep(f, tmp_path / "d", workers=workers)
    assert not (tmp_path / "d" / "meta.json").exists() and not list((tmp_path / "d").glob(".*"))


def test_parquet_file_and_folder(tmp_path, docs, gpt2):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"content": docs[:20], "n": list(range(20))}), folder / "a.parquet", row_group_size=6)
    pq.write_table(pa.table({"content": docs[20:], "n": list(range(20, len(docs)))}), folder / "b.parquet")
    out = prep(folder, tmp_path / "d", tokenizer="gpt2", text_key="content", workers=2)
    meta, ids = splits_of(out)
    encoded = [gpt2.encode(d) + [gpt2.eot_token] for d in docs]
    assert sorted(documents_in(ids["train"], gpt2.eot_token) + documents_in(ids["val"], gpt2.eot_token)) == sorted(encoded)
    assert meta["documents"] == len(docs)
    one = prep(folder / "a.parquet", tmp_path / "one", tokenizer="gpt2", text_key="content")
    assert fmt.read_meta(one)["documents"] == 20
    with pytest.raises(UserError, match=r"a.parquet has no column 'text' \(it has: content, n\); pass --text-key"):
        prep(folder, tmp_path / "d3", tokenizer="gpt2")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(UserError, match="empty.parquet holds no documents"):
        prep(tmp_path / "empty.parquet", tmp_path / "d4", tokenizer="gpt2")


def test_hf_dataset_from_a_local_folder_and_without_the_network(tmp_path, docs, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    # as without a network (read at import, so set on the modules): no minutes of retries against the hub
    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]))
    out = prep(f"hf:{folder}", tmp_path / "d")
    meta, ids = splits_of(out)
    tok = tk.load_tokenizer(meta["tokenizer"])
    assert meta["documents"] == 10 and meta["source_path"] == f"hf:{folder}"
    assert sorted(tok.decode(ids["train"]) + tok.decode(ids["val"])) == sorted("".join(docs[:10]))
    with pytest.raises(UserError, match="could not open the Hugging Face dataset 'nobody/no-such-dataset'.*network"):
        prep("hf:nobody/no-such-dataset", tmp_path / "d2")


def test_bpe_learns_from_a_bounded_sample(tmp_path, docs):
    folder = write_folder(tmp_path / "docs", docs)
    small = prep(folder, tmp_path / "small", tokenizer="bpe", vocab_size=320, bpe_sample_bytes=2000)
    full = prep(folder, tmp_path / "full", tokenizer="bpe", vocab_size=320)
    assert fmt.read_meta(small)["bpe_sample_bytes"] == 2000
    assert fmt.read_meta(small)["tokenizer"] != fmt.read_meta(full)["tokenizer"]
    with pytest.raises(UserError, match="--bpe-sample-bytes applies only to --tokenizer bpe"):
        prep(folder, tmp_path / "x", bpe_sample_bytes=2000)


@pytest.mark.parametrize("content, kw, message", [
    ("docs", {"workers": 0}, r"--workers must be an integer >= 1, got 0"),
    ("docs", {"max_docs": 0}, r"--max-docs must be an integer >= 1"),
    ("empty.jsonl", {}, r"empty.jsonl is empty"),
    ("one.jsonl", {}, r"holds one document.*pass its text as a .txt file"),
    ("book.txt", {"max_docs": 3}, r"--max-docs applies to a corpus of documents"),
    ("book.txt", {"text_key": "body"}, r"--text-key applies to .jsonl, .parquet and hf: sources"),
])
def test_bad_corpus_requests(tmp_path, docs, content, kw, message):
    write_folder(tmp_path / "docs", docs[:3])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")
    (tmp_path / "book.txt").write_text(docs[0])
    with pytest.raises(UserError, match=message):
        prep(tmp_path / content, tmp_path / "d", **kw)


@pytest.mark.parametrize("failure", ["interrupt", "disk full"])
def test_an_interrupted_or_failed_prepare_leaves_the_old_dataset(tmp_path, docs, monkeypatch, small_tasks, failure):
    folder = write_folder(tmp_path / "docs", docs)
    out = prep(folder, tmp_path / "d")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    appended = []

    def append(self, split, ids):
        appended.append(len(ids))
        if len(appended) == 5:  # mid-way, after some ids reached the temporary files
            raise KeyboardInterrupt if failure == "interrupt" else OSError(errno.ENOSPC, "No space left on device")
        return real(self, split, ids)

    real = fmt.DatasetWriter.append
    monkeypatch.setattr(fmt.DatasetWriter, "append", append)
    expected = KeyboardInterrupt if failure == "interrupt" else UserError
    with pytest.raises(expected, match=None if failure == "interrupt" else "No space left on device.*nothing was written"):
        prep(folder, out, tokenizer="bpe", vocab_size=300, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file left, nothing replaced


def test_the_cli_takes_the_corpus_options(tmp_path, docs):
    from typer.testing import CliRunner

    from cli.main import app

    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:12]))
    result = CliRunner().invoke(app, ["prepare", str(f), "--out", str(tmp_path / "d"), "--text-key", "body",
                                      "--max-docs", "10", "--workers", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    meta = fmt.read_meta(tmp_path / "d")
    assert (meta["documents"], meta["seed"], meta["text_key"]) == (10, 3, "body")


@pytest.mark.once
def test_ctrl_c_stops_the_workers_and_leaves_the_old_dataset(tmp_path, docs):
    """A real Ctrl-C (SIGINT to the process group, as a terminal sends it) while 2 workers encode: one line, no
    traceback from any process, no temporary file, the earlier dataset untouched, no worker left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    small = write_folder(tmp_path / "small", docs[:4])
    big = tmp_path / "big"
    big.mkdir()
    block = "".join(docs)
    for i in range(120):  # ~25 MB: several seconds of work on 2 cores
        (big / f"{i:04d}.txt").write_text(block, encoding="utf-8")
    out = prep(small, tmp_path / "d")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "prepare", str(big), "--out", str(out), "--force",
                             "--workers", "2"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(out.glob(".train.bin.*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the encoding pass has begun writing
    assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted:" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for _ in range(100):  # multiprocessing's helpers (the fork server) leave once they see the main one gone
        alive = subprocess.run(["pgrep", "-a", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"processes left in the group: {alive}"


def test_without_the_data_extra_parquet_and_hf_sources_name_it(tmp_path, monkeypatch):
    import sys

    for name in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"needs pyarrow, which is not installed: pip install 'minigpt\[data\]'"):
        prep(tmp_path / "a.parquet", tmp_path / "d")
    with pytest.raises(UserError, match=r"need the `datasets` library.*pip install 'minigpt\[data\]'"):
        prep("hf:roneneldan/TinyStories", tmp_path / "d")
