"""Shared pytest fixtures. Tests never use the network."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# A small Shakespeare-like text for machines without the shared corpus (varied characters, several speakers).
# The char tokenizer knows only its characters: the tests' prompts (ROMEO:, KING:, ...) must be spelt from them.
SMALL_CORPUS = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

MENENIUS:
What work's, my countrymen, in hand? where go you
With bats and clubs? The matter? speak, I pray you.

KING RICHARD II:
For God's sake, let us sit upon the ground
And tell sad stories of the death of kings.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

HAMLET:
To be, or not to be: that is the question --
Whether 'tis nobler in the mind to suffer
The slings & arrows of outrageous fortune (1601; act 3, scene 1).
"""


def _shared_data() -> Path | None:
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.fixture(scope="session", autouse=True)
def _tiktoken_cache():
    """Point tiktoken at the shared offline cache (before any encoding is loaded)."""
    cache = SHARED_DATA / "tiktoken_cache"
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    if cache.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield
    if old is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path | None:
    """/work/shared/data (found next to the repo), or None when absent."""
    return _shared_data()


@pytest.fixture(scope="session")
def shakespeare_path(shared_data) -> Path | None:
    """The real tiny-Shakespeare file, or None when absent."""
    p = shared_data / "tinyshakespeare" / "input.txt" if shared_data else None
    return p if p and p.is_file() else None


@pytest.fixture(scope="session")
def corpus_path(shakespeare_path, tmp_path_factory) -> Path:
    """The tiny-Shakespeare file if present, else a small Shakespeare-like text written to a temp folder."""
    if shakespeare_path is not None:
        return shakespeare_path
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(SMALL_CORPUS * 20, encoding="utf-8")
    return p


# tiktoken caches each file under sha1(url); these two are the GPT-2 vocab.bpe and encoder.json.
GPT2_CACHE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")


@pytest.fixture(scope="session")
def has_gpt2_cache(_tiktoken_cache) -> bool:
    """True when tiktoken can load GPT-2 without the network; gpt2 tests skip otherwise."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    return bool(cache) and all((Path(cache) / f).is_file() for f in GPT2_CACHE_FILES)


@pytest.fixture(scope="session")
def char_data(corpus_path, tmp_path_factory) -> Path:
    """The corpus prepared with the char tokenizer into a temp folder (train.bin, val.bin, meta.json)."""
    import prepare_data

    out = tmp_path_factory.mktemp("data") / "char"
    prepare_data.prepare(str(corpus_path), tokenizer="char", out=out, log=lambda s: None)
    return out


def tiny_config(data_dir, out_dir, **sections):
    """A train.Config small enough for a test: {'train': {'max_iters': 8}, ...} overrides per section."""
    from dataclasses import replace

    import train

    base = {
        "model": dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0),
        "data": dict(dir=str(data_dir)),
        "optim": dict(lr=3e-3, min_lr=3e-4, warmup_iters=2),
        "train": dict(batch_size=4, max_iters=8, eval_interval=4, eval_iters=2),
        "run": dict(out_dir=str(out_dir), device="cpu", dtype="float32"),
        "log": dict(interval=1, plot=False),  # drawing loss.png costs ~0.2 s a run: test_plots.py turns it on
    }
    cfg = train.Config()
    for name, values in base.items():
        merged = {**values, **sections.get(name, {})}
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **merged)})
    return cfg


def read_metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): they
    run a token or a small batch at a time, so a second thread only waits for the first (and the machine is shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def error_line(result) -> str:
    """The one `error:` line of a refused command (a typer CliRunner result): exit code 2, nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
