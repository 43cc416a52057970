"""Pairs datasets (pairs.py): the on-disk format, user files (.tsv, .jsonl), `minigpt prepare` for pairs,
and every bad input ending as one `error:` line, exit 2, nothing on disk changed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import pairs
import dataset_format as fmt
import prepare_data as pd
import sources
import tokenization as tk
from cli.main import app
from conftest import REPO_ROOT
from errors import UserError


def quiet(_msg: str) -> None:
    pass


def snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def prep(tmp_path, source, tokenizer="char", **kw):
    kw.setdefault("data_root", tmp_path / "data")
    return pd.prepare(str(source), tokenizer, progress=False, log=kw.pop("log", quiet), **kw)


def _meta(v, **kw):
    return {"tokenizer": {"kind": "char", "chars": "abc"}, "tokenizer_vocab_size": v, "source": "test",
            "source_sha256": "0" * 64, "val_fraction": 0.1, "tokenizer_kind": "char", **kw}


# ----------------------------------------------------------------------------- special ids


def test_special_ids_follow_the_tokenizer_vocabulary():
    sp = pairs.special_tokens(10)
    assert (sp.eos, sp.pad, sp.bos, sp.sep) == (10, 11, 12, 13)
    assert sp.sentinels == tuple(range(14, 14 + 64)) and pairs.N_SENTINELS == 64 and pairs.N_SPECIAL == 68
    assert pairs.SpecialTokens.from_dict(json.loads(json.dumps(sp.to_dict()))) == sp
    with pytest.raises(UserError, match="special_tokens must hold"):
        pairs.SpecialTokens.from_dict({**sp.to_dict(), "sentinels": [1, 2]})


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("v, dtype, itemsize", [(3, "uint16", 2), (65536 - 68, "uint16", 2), (65536 - 67, "uint32", 4)])
def test_write_open_round_trip(tmp_path, v, dtype, itemsize):
    rng = np.random.default_rng(0)
    data = {split: [(rng.integers(0, v, rng.integers(1, 6)).tolist(), rng.integers(0, v, rng.integers(1, 4)).tolist())
                    for _ in range(n)] for split, n in (("train", 50), ("val", 7), ("length", 5))}
    data["train"][0] = ([v - 1], [0])
    meta = pairs.write_pairs(tmp_path, data, _meta(v, task="copy"))

    assert fmt.read_meta(tmp_path) == meta == pairs.read_pairs_meta(tmp_path)  # read_meta still reads it
    assert pairs.is_pairs(meta) and not pairs.is_pairs({"vocab_size": 3})
    assert meta["kind"] == "pairs" and meta["task"] == "copy" and meta["dtype"] == dtype
    assert meta["vocab_size"] == v + 68 and meta["tokenizer_vocab_size"] == v
    assert meta["special_tokens"] == pairs.special_tokens(v).to_dict()
    tokens = {s: sum(len(a) + len(b) for a, b in p) for s, p in data.items()}
    assert meta["splits"] == {s: {"pairs": len(p), "tokens": tokens[s]} for s, p in data.items()}
    assert (meta["train_tokens"], meta["val_tokens"]) == (tokens["train"], tokens["val"])
    src_lens = [len(a) for a, _ in data["train"]]
    assert meta["length_stats"]["train"]["source"]["max"] == max(src_lens)
    assert meta["length_stats"]["train"]["source"]["mean"] == round(float(np.mean(src_lens)), 2)

    # the bytes are the documented format: source then target ids, pair after pair; (n, 2) uint32 lengths
    raw = np.fromfile(tmp_path / "val.bin", dtype="<u2" if itemsize == 2 else "<u4")
    assert raw.tolist() == [i for a, b in data["val"] for i in a + b]
    idx = np.fromfile(tmp_path / "val.idx", dtype="<u4").reshape(-1, 2)
    assert idx.tolist() == [[len(a), len(b)] for a, b in data["val"]]
    for split, p in data.items():
        ps = pairs.open_pairs(tmp_path, split)
        assert ps.n == len(ps) == len(p)
        assert ps.source_lengths.dtype == np.int64 and ps.source_lengths.tolist() == [len(a) for a, _ in p]
        assert ps.target_lengths.tolist() == [len(b) for _, b in p]
        for i, (a, b) in enumerate(p):
            src, tgt = ps.pair(i)
            assert src.dtype == np.int64 and (src.tolist(), tgt.tolist()) == (a, b)
        pairs.check_pair_ids(tmp_path, split)
    assert not list(tmp_path.glob(".*"))


def test_write_pairs_refuses_bad_pairs(tmp_path):
    for bad in ({"train": [([0], [])], "val": [([0], [0])]}, {"train": [([3], [0])], "val": [([0], [0])]},
                {"train": [([0], [0])]}, {"train": [([0], [0])], "val": [([0], [0])], "test": [([0], [0])]}):
        with pytest.raises(ValueError):
            pairs.write_pairs(tmp_path / "x", bad, _meta(3))
    assert not (tmp_path / "x").exists()


def test_open_pairs_detects_truncated_and_stale_files(tmp_path):
    meta = pairs.write_pairs(tmp_path, {"train": [([0, 1], [2])] * 3, "val": [([1], [1])]}, _meta(3))
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(UserError, match="train.bin has 20 bytes.*truncated or stale: re-run `minigpt prepare .* --force`"):
        pairs.open_pairs(tmp_path, "train", meta)
    (tmp_path / "val.idx").write_bytes(b"")
    with pytest.raises(UserError, match="val.idx has 0 bytes.*truncated or stale"):
        pairs.open_pairs(tmp_path, "val", meta)
    (tmp_path / "val.idx").write_bytes(np.array([[2, 0]], dtype="<u4").tobytes())  # right size, wrong lengths
    with pytest.raises(UserError, match="do not add up.*truncated or stale"):
        pairs.open_pairs(tmp_path, "val", meta)
    (tmp_path / "val.idx").unlink()
    with pytest.raises(UserError, match="val.idx is missing"):
        pairs.open_pairs(tmp_path, "val", meta)
    with pytest.raises(UserError, match="no 'length' split; it holds: train, val"):
        pairs.open_pairs(tmp_path, "length", meta)


def test_check_pair_ids_finds_a_foreign_id(tmp_path):
    pairs.write_pairs(tmp_path, {"train": [([0, 1], [2]), ([1], [0, 1])], "val": [([1], [1])]}, _meta(3))
    raw = np.fromfile(tmp_path / "train.bin", dtype="<u2")
    raw[4] = 3  # the eos id, inside pair 1's target: special ids are never stored
    raw.tofile(tmp_path / "train.bin")
    with pytest.raises(UserError, match="token id 3 in pair 1, but the tokenizer has 3 tokens"):
        pairs.check_pair_ids(tmp_path, "train")


def test_pairs_record_their_largest_ids_and_a_run_checks_them_without_a_second_read(tmp_path):
    """write_pairs records each split's largest id; check_pair_ids reads a small split whole but, past
    FULL_ID_CHECK_BYTES, only checks that record; PairBatches checks every id of the split it reads whole."""
    import torch

    import batches
    from model import GPTConfig

    data = {"train": [([0, 1], [2]), ([1], [0, 1]), ([2, 2], [1])], "val": [([1], [1])], "length": [([0], [2])]}
    meta = pairs.write_pairs(tmp_path, data, _meta(3))
    assert meta["max_token_id"] == {"train": 2, "val": 1, "length": 2} == fmt.read_meta(tmp_path)["max_token_id"]
    raw = np.fromfile(tmp_path / "train.bin", dtype="<u2")
    raw[6] = 4  # the first id of pair 2's source (pairs 0 and 1 hold 3 ids each)
    raw.tofile(tmp_path / "train.bin")
    expected = r"train.bin holds token id 4 in pair 2, but the tokenizer has 3 tokens: the file is corrupt"
    with pytest.raises(UserError, match=expected):
        pairs.check_pair_ids(tmp_path, "train", meta)  # 16 bytes: read whole
    pairs.check_pair_ids(tmp_path, "train", meta, full_check_bytes=15)  # "large": not read again here
    model = GPTConfig(vocab_size=3 + pairs.N_SPECIAL, block_size=16, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(UserError, match=expected):  # ... but where training reads it, before any batch
        batches.PairBatches(tmp_path, meta, "train", 2, model, torch.device("cpu"), seed=0)
    batches.PairBatches(tmp_path, meta, "val", 2, model, torch.device("cpu"), seed=0)  # a clean split builds
    with pytest.raises(UserError, match=r"meta.json records token id 3 as the largest of the val split, but the "
                                        r"tokenizer has 3 tokens"):
        pairs.check_pair_ids(tmp_path, "val", {**meta, "max_token_id": {"train": 2, "val": 3}}, full_check_bytes=0)


def test_a_token_dataset_is_not_pairs_and_formats_replace_each_other(tmp_path):
    fmt.write_dataset(tmp_path, [0, 1, 2], [1], {**_meta(3), "vocab_size": 3})
    with pytest.raises(UserError, match="token-stream dataset, not source/target pairs"):
        pairs.read_pairs_meta(tmp_path)
    pairs.write_pairs(tmp_path, {"train": [([0], [1])], "val": [([1], [1])], "length": [([2], [2])]}, _meta(3))
    assert {p.name for p in tmp_path.iterdir()} == {f"{s}.{e}" for s in ("train", "val", "length") for e in ("bin", "idx")} | {"meta.json"}
    pairs.write_pairs(tmp_path, {"train": [([0], [1])], "val": [([1], [1])]}, _meta(3))  # no length split now
    assert not (tmp_path / "length.bin").exists() and not (tmp_path / "length.idx").exists()
    fmt.write_dataset(tmp_path, [0, 1, 2], [1], {**_meta(3), "vocab_size": 3})
    assert {p.name for p in tmp_path.iterdir()} == {"train.bin", "val.bin", "meta.json"}


# ----------------------------------------------------------------------------- user files


def test_read_tsv(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_bytes("\ufeffhello\tbonjour\r\n\n  \ncat \t le chat\n\u00e9t\u00e9\tsummer".encode("utf-8"))
    assert pairs.read_pairs_file(f) == [("hello", "bonjour"), ("cat ", " le chat"), ("\u00e9t\u00e9", "summer")]


def test_read_jsonl_pairs_and_kind(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('\n{"source": "a\\tb", "target": "x\\ny", "id": 3}\n\n{"target": "2", "source": "1"}\n')
    assert pairs.read_pairs_file(f) == [("a\tb", "x\ny"), ("1", "2")]
    assert pairs.jsonl_kind(f) == "pairs"
    (tmp_path / "t.jsonl").write_text('{"text": "doc"}\n')
    assert pairs.jsonl_kind(tmp_path / "t.jsonl") == "text"


def test_jsonl_text_corpus_is_a_token_stream(tmp_path):
    f = tmp_path / "docs.jsonl"
    docs = ["First document.", "Second one,\nwith two lines.", "", "Third: \u00fcml\u00e4ut \U0001f389"]
    f.write_text("\n".join(json.dumps({"text": d, "meta": 1}) for d in docs) + "\n\n")
    out = prep(tmp_path, f, val_fraction=0.3)
    assert out == tmp_path / "data" / "docs_char"
    meta = fmt.read_meta(out)
    assert not pairs.is_pairs(meta) and meta["source_sha256"] == sources._sha256(f.read_bytes())
    tok = tk.load_tokenizer(meta["tokenizer"])
    assert meta["documents"] == 4 and meta["val_split"] == "documents"
    # whole documents in each split, in order (the char vocabulary has no eot to put between them)
    train, val = (tok.decode(fmt.open_split(out, s)) for s in ("train", "val"))
    held = [d for d in docs if d and d in val]
    assert held and train + val != "" and sorted(train + val) == sorted("".join(docs))
    assert all(d in train or d in val for d in docs)


# ----------------------------------------------------------------------------- prepare


def decoded(out: Path) -> dict:
    meta = pairs.read_pairs_meta(out)
    tok = tk.load_tokenizer(meta["tokenizer"])
    return {s: [tuple(tok.decode(x) for x in pairs.open_pairs(out, s, meta).pair(i)) for i in range(c["pairs"])]
            for s, c in meta["splits"].items()}


def test_prepare_task_writes_the_generated_pairs(tmp_path):
    import tasks

    msgs = []
    out = prep(tmp_path, "task:add", examples=300, seed=5, log=msgs.append)
    assert out == tmp_path / "data" / "task_add_char"
    assert decoded(out) == tasks.generate("add", 300, 5, quiet)
    meta = pairs.read_pairs_meta(out)
    assert (meta["task"], meta["examples"], meta["seed"], meta["source"]) == ("add", 300, 5, "task:add")
    assert meta["tokenizer"]["chars"] == "+0123456789" and meta["vocab_size"] == 11 + 68
    assert list(meta["length_stats"]) == ["train", "val", "length"]
    assert any(m.startswith("task:add: a+b with 1-3 digit operands") for m in msgs)
    line = next(m for m in msgs if m.strip().startswith("length"))
    s = meta["length_stats"]["length"]["source"]
    assert f"source min {s['min']} / mean {s['mean']:.1f} / p95 {s['p95']} / max {s['max']}" in line


def test_prepare_is_deterministic(tmp_path):
    a = prep(tmp_path, "task:sort", examples=300, seed=1, out=tmp_path / "a")
    b = prep(tmp_path, "task:sort", examples=300, seed=1, out=tmp_path / "b")
    c = prep(tmp_path, "task:sort", examples=300, seed=2, out=tmp_path / "c")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train.bin").read_bytes() != (c / "train.bin").read_bytes()


def test_prepare_a_pairs_file(tmp_path):
    f = tmp_path / "my pairs.tsv"
    rows = [(f"source {i}", f"target {i * 7}") for i in range(40)]
    f.write_text("".join(f"{s}\t{t}\n" for s, t in rows))
    out = prep(tmp_path, f, "bpe", vocab_size=260, val_fraction=0.25, seed=9)
    assert out == tmp_path / "data" / "my_pairs_bpe"
    got = decoded(out)
    assert len(got["val"]) == 10 and sorted(got["train"] + got["val"]) == sorted(rows) and "length" not in got
    assert got["train"] != rows[10:]  # shuffled before the split
    meta = pairs.read_pairs_meta(out)
    assert meta["task"] is None and meta["source_sha256"] == sources._sha256(f.read_bytes()) and meta["val_fraction"] == 0.25
    assert meta["bpe_vocab_size"] == 260 and (out / "tokenizer.tiktoken").is_file()

    j = tmp_path / "pairs.jsonl"
    j.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    assert decoded(prep(tmp_path, j, val_fraction=0.25, seed=9)) == decoded(prep(tmp_path, f, val_fraction=0.25, seed=9))


def test_char_vocabulary_covers_every_split(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("".join(f"{c}\t{c.upper()}\n" for c in "abcdefghij"))
    meta = pairs.read_pairs_meta(prep(tmp_path, f, val_fraction=0.5))
    assert meta["tokenizer"]["chars"] == "ABCDEFGHIJabcdefghij"


def test_reuse_refuse_force(tmp_path):
    out = tmp_path / "ds"
    prep(tmp_path, "task:copy", examples=300, out=out)
    before = snapshot(out)
    msgs = []
    prep(tmp_path, "task:copy", examples=300, out=out, log=msgs.append)
    assert any("reusing" in m for m in msgs) and snapshot(out) == before
    for kw in ({"seed": 2}, {"examples": 301}, {"tokenizer": "bpe"}):
        with pytest.raises(UserError, match="different source or tokenizer.*--force"):
            prep(tmp_path, "task:copy", out=out, **{"examples": 300, **kw})
        assert snapshot(out) == before
    with pytest.raises(UserError, match="kind 'pairs' -> 'tokens'"):  # a token stream over pairs
        prep(tmp_path, Path(REPO_ROOT / "README.md"), out=out)
    with pytest.raises(UserError, match="task 'copy' -> 'reverse'"):
        prep(tmp_path, "task:reverse", examples=300, out=out)
    assert snapshot(out) == before
    prep(tmp_path, "task:copy", examples=300, seed=2, out=out, force=True)
    assert pairs.read_pairs_meta(out)["seed"] == 2

    (out / "length.idx").write_bytes(b"")  # damaged: the same request writes it again
    prep(tmp_path, "task:copy", examples=300, seed=2, out=out)
    assert pairs.open_pairs(out, "length").n == 200

    text = tmp_path / "t.txt"
    text.write_text("some text to make a token stream of\n" * 20)
    tokens = prep(tmp_path, text, out=tmp_path / "tok")
    with pytest.raises(UserError, match="kind 'tokens' -> 'pairs'"):
        prep(tmp_path, "task:copy", examples=300, out=tokens)
    prep(tmp_path, "task:copy", examples=300, out=tokens, force=True)
    assert pairs.is_pairs(fmt.read_meta(tokens)) and not list(tokens.glob(".*"))


def test_import_chain_stays_light():
    code = ("import sys, pairs, tasks; bad = {'torch', 'rustbpe', 'tiktoken'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ----------------------------------------------------------------------------- bad input, through the CLI

# name: (files to write into the input folder, the prepare arguments, a piece of the expected error line)
BAD = {
    "tsv without a tab": ({"p.tsv": b"a\tb\nno tab here\n"}, ["{in}/p.tsv"], "p.tsv line 2 has no tab; each line needs `source<TAB>target`"),
    "tsv with two tabs": ({"p.tsv": b"a\tb\tc\n"}, ["{in}/p.tsv"], "p.tsv line 1 has 2 tabs (ambiguous"),
    "empty source": ({"p.tsv": b"a\tb\n\n\tb\n"}, ["{in}/p.tsv"], "p.tsv line 3 has an empty source"),
    "empty target": ({"p.jsonl": b'{"source": "a", "target": " "}\n'}, ["{in}/p.jsonl"], "p.jsonl line 1 has an empty target"),
    "tsv not utf-8": ({"p.tsv": b"a\tb\ncaf\xe9\tc\n"}, ["{in}/p.tsv"], "p.tsv is not UTF-8 text (bad byte b'\\xe9' at byte offset 7) on line 2; convert it to UTF-8, e.g. `iconv"),
    "jsonl not utf-8": ({"p.jsonl": b'\n{"source": "caf\xe9", "target": "b"}\n'}, ["{in}/p.jsonl"], "at byte offset 16) on line 2"),
    "jsonl not utf-8 later": ({"p.jsonl": b'{"source": "a", "target": "b"}\n{"source": "\xff", "target": "b"}\n'},
                              ["{in}/p.jsonl"], "at byte offset 43) on line 2"),
    "empty tsv": ({"p.tsv": b""}, ["{in}/p.tsv"], "p.tsv is empty; write one pair a line"),
    "blank tsv": ({"p.tsv": b"\n  \n"}, ["{in}/p.tsv"], "p.tsv is empty"),
    "empty jsonl": ({"p.jsonl": b"\n"}, ["{in}/p.jsonl"], "p.jsonl is empty; write one JSON object a line"),
    "jsonl invalid": ({"p.jsonl": b'{"source": "a", "target": "b"}\n{oops\n'}, ["{in}/p.jsonl"], "p.jsonl line 2 is not valid JSON"),
    "jsonl not an object": ({"p.jsonl": b'{"source": "a", "target": "b"}\n["a", "b"]\n'}, ["{in}/p.jsonl"], "line 2 is a JSON array, not an object"),
    "jsonl lacks a key": ({"p.jsonl": b'{"source": "a", "target": "b"}\n{"source": "a"}\n'}, ["{in}/p.jsonl"], 'line 2 has no "target" key (it has: "source")'),
    "jsonl non-string": ({"p.jsonl": b'{"source": "a", "target": "b"}\n{"source": "a", "target": 3}\n'}, ["{in}/p.jsonl"], 'line 2: "target" is a JSON number, not a string'),
    "jsonl neither kind": ({"p.jsonl": b'{"input": "a"}\n'}, ["{in}/p.jsonl"], 'p.jsonl line 1 has no "text" key (it has: "input")'),
    "jsonl text not a string": ({"d.jsonl": b'{"text": "a"}\n{"text": null}\n'}, ["{in}/d.jsonl"], 'd.jsonl line 2: "text" is a JSON null, not a string'),
    "missing pairs file": ({}, ["{in}/none.tsv"], "pairs file {in}/none.tsv does not exist"),
    "too few pairs": ({"p.tsv": b"a\tb\n"}, ["{in}/p.tsv"], "has 1 pair(s), too few to split"),
    "unknown task": ({}, ["task:nope"], "unknown task 'nope'; choose one of: copy, reverse, sort, add, speaker, modernize"),
    "examples for a file": ({"p.tsv": b"a\tb\nc\td\n"}, ["{in}/p.tsv", "--examples", "5"], "--examples applies only to task: sources"),
    "examples for text": ({"t.txt": b"some text\n" * 20}, ["{in}/t.txt", "--examples", "5"], "--examples applies only to task: sources"),
    "examples zero": ({}, ["task:copy", "--examples", "0"], "--examples must be a positive integer"),
    "examples too many": ({}, ["task:add", "--examples", "600000"], "--examples can be at most 454,546"),
    "val-fraction for a task": ({}, ["task:copy", "--val-fraction", "0.2"], "--val-fraction does not apply to task:copy"),
    "input for a generated task": ({"x.txt": b"x"}, ["task:add", "--input", "{in}/x.txt"], "task:add is generated: drop --input"),
    "input for a pairs file": ({"p.tsv": b"a\tb\nc\td\n"}, ["{in}/p.tsv", "--input", "{in}/p.tsv"], "--input only applies to 'shakespeare'"),
    "bad tokenizer": ({}, ["task:copy", "--tokenizer", "words"], "unknown tokenizer 'words'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, case):
    files, args, expected = BAD[case]
    (tmp_path / "in").mkdir()
    for name, data in files.items():
        (tmp_path / "in" / name).write_bytes(data)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["prepare", *(a.format(**{"in": tmp_path / "in"}) for a in args), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected.format(**{"in": tmp_path / "in"}) in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before and not out.exists()


def test_refusal_leaves_an_existing_dataset_as_it_was(tmp_path):
    out = prep(tmp_path, "task:copy", examples=300, out=tmp_path / "ds")
    before = snapshot(out)
    result = CliRunner().invoke(app, ["prepare", "task:copy", "--examples", "300", "--seed", "2", "--out", str(out)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "seed 1337 -> 2" in result.stderr
    assert snapshot(out) == before


def test_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    f = tmp_path / "p.tsv"
    f.write_text("a\tb\nno tab\n")
    r = subprocess.run([sys.executable, "-m", "cli", "prepare", str(f)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"error: {f} line 2 has no tab; each line needs `source<TAB>target` with exactly one tab\n"
    r = subprocess.run([sys.executable, "-m", "cli", "prepare", "task:reverse", "--examples", "100"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert pairs.read_pairs_meta(tmp_path / "data" / "task_reverse_char")["splits"]["train"]["pairs"] == 100
    assert "  train      100 pairs   source min 1" in r.stderr


def test_shakespeare_tasks_through_the_cli(tmp_path, shakespeare_path):
    if shakespeare_path is None:
        pytest.skip("the shared tiny-Shakespeare corpus is not present")
    out = tmp_path / "mod"
    result = CliRunner().invoke(app, ["prepare", "task:modernize", "--input", str(shakespeare_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = pairs.read_pairs_meta(out)
    assert meta["baseline"]["exact_match"] == 0.0 and list(meta["splits"]) == ["train", "val"]
    assert "exact match 0.000, character similarity 0.9" in result.stderr
    got = decoded(out)
    assert all(s != t for s, t in got["val"])
    assert any(s.startswith("Thou art") and t.startswith("You are") for s, t in got["train"] + got["val"])
