"""Sequence-to-sequence ("pairs") datasets: the one definition of their format on disk, beside prepare_data's
token stream, the readers of user files (.tsv, .jsonl), and prepare_pairs, which `minigpt prepare` runs for
'task:NAME' and for pairs files.

Read top to bottom:
  1. special ids, reserved past the tokenizer's vocabulary
  2. the on-disk format: write_pairs, read_pairs_meta, open_pairs, check_pair_ids
  3. user files: read_pairs_file (.tsv, .jsonl), jsonl_kind
  4. prepare_pairs: source -> pairs -> train/val(/length) -> tokenize -> write

numpy only, like prepare_data: every module imports prepare_data, and prepare_data imports this module only
inside `prepare`, when a source is pairs.
"""

import hashlib
import itertools
import json
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import dataset_format
import prepare_data
import sources
import tokenization
from dataset_format import META_FILE
from errors import Log, UserError, log_to_stderr
from prepare_data import DEFAULT_SEED
from sources import DATA_ROOT

# ---------------------------------------------------------------------------------------------
# 1. Special ids
#
# The tokenizer's ids are 0..V-1; the ids a seq2seq model needs beyond them follow in this fixed order.
# eos comes first so that logits sliced to V+1 allow exactly the tokenizer's tokens plus the end token.
# ---------------------------------------------------------------------------------------------

N_SENTINELS = 64  # T5 span-corruption sentinels <extra_id_0..63>: more spans than any short pair masks
N_SPECIAL = 4 + N_SENTINELS  # eos, pad, bos, sep, sentinels


@dataclass(frozen=True)
class SpecialTokens:
    eos: int  # V: ends every target (and an encoder's source)
    pad: int  # V+1: fills batches to one length; never predicted
    bos: int  # V+2: the decoder's start token
    sep: int  # V+3: between source and target when one decoder-only model reads both
    sentinels: tuple[int, ...]  # V+4+i: T5 span-corruption sentinels

    def to_dict(self) -> dict:
        return {"eos": self.eos, "pad": self.pad, "bos": self.bos, "sep": self.sep, "sentinels": list(self.sentinels)}

    @classmethod
    def from_dict(cls, d) -> "SpecialTokens":
        fields = ("eos", "pad", "bos", "sep")
        ok = isinstance(d, dict) and all(_is_int(d.get(k)) for k in fields) and isinstance(d.get("sentinels"), list) \
            and len(d["sentinels"]) == N_SENTINELS and all(_is_int(i) for i in d["sentinels"])
        if not ok:
            raise UserError(
                f"special_tokens must hold integer eos, pad, bos, sep and a list of {N_SENTINELS} integer sentinels; "
                "re-run `minigpt prepare ... --force`"
            )
        return cls(*(d[k] for k in fields), tuple(d["sentinels"]))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def special_tokens(tokenizer_vocab_size: int) -> SpecialTokens:
    v = tokenizer_vocab_size
    if not _is_int(v) or v < 1:
        raise ValueError(f"tokenizer_vocab_size must be a positive integer, got {v!r}")
    return SpecialTokens(eos=v, pad=v + 1, bos=v + 2, sep=v + 3, sentinels=tuple(range(v + 4, v + 4 + N_SENTINELS)))


# ---------------------------------------------------------------------------------------------
# 2. The on-disk format (the only place that knows it)
#
#   <dir>/<split>.bin   each pair's source ids then its target ids, pair after pair; tokenizer ids only (no
#                       special ids: a model adds eos/bos/sep as its architecture needs); the dtype of
#                       prepare_data (uint16 if vocab_size <= 65536 else uint32), by the total vocabulary
#   <dir>/<split>.idx   little-endian uint32, shape (n_pairs, 2): source length, target length
#   <dir>/meta.json     prepare_data's fields (so read_meta reads it) plus kind "pairs", tokenizer_vocab_size,
#                       special_tokens, splits, task, length_stats
#   <dir>/tokenizer.tiktoken   (bpe only) as in prepare_data
#
# Splits: train and val always; `length` (longer inputs than train's) for the generated tasks.
# ---------------------------------------------------------------------------------------------

KIND = "pairs"
PAIR_SPLITS = ("train", "val", "length")
REQUIRED_SPLITS = ("train", "val")
IDX_DTYPE = np.dtype("<u4")
MAX_LENGTH = (1 << 32) - 1  # what a uint32 .idx entry holds


def is_pairs(meta: dict) -> bool:
    """True for a pairs dataset; a token-stream meta.json has no "kind" (it predates pairs)."""
    return meta.get("kind", "tokens") == KIND


def _rerun(data_dir: Path) -> str:
    return f"re-run `minigpt prepare ... --out {data_dir} --force`"


def check_pairs_meta(meta: dict, data_dir: str | Path) -> dict:
    """The pairs fields of a meta.json that dataset_format.check_meta has passed; return it."""
    data_dir = Path(data_dir)
    where = data_dir / META_FILE
    if not is_pairs(meta):
        raise UserError(
            f"{data_dir} holds a token-stream dataset, not source/target pairs; prepare pairs with "
            "`minigpt prepare task:NAME` or a .tsv/.jsonl file of pairs"
        )
    v = meta.get("tokenizer_vocab_size")
    if not _is_int(v) or v < 1 or meta["vocab_size"] != v + N_SPECIAL:
        raise UserError(f"{where}: vocab_size must be tokenizer_vocab_size + {N_SPECIAL} special ids; {_rerun(data_dir)}")
    if meta.get("special_tokens") != special_tokens(v).to_dict():
        raise UserError(f"{where}: special_tokens are not the ids this minigpt reserves after the tokenizer's; {_rerun(data_dir)}")
    splits = meta.get("splits")
    ok = isinstance(splits, dict) and all(s in splits for s in REQUIRED_SPLITS) and all(
        s in PAIR_SPLITS and isinstance(c, dict) and _is_int(c.get("pairs")) and _is_int(c.get("tokens"))
        and c["pairs"] >= 0 and c["tokens"] >= 0 for s, c in splits.items())
    if not ok or any(meta[f"{s}_tokens"] != splits[s]["tokens"] for s in REQUIRED_SPLITS):
        raise UserError(f"{where}: 'splits' must give pairs and tokens for train, val (and length) matching "
                        f"train_tokens/val_tokens; {_rerun(data_dir)}")
    return meta


def read_pairs_meta(data_dir: str | Path) -> dict:
    """meta.json of a pairs dataset, checked: what every reader of pairs starts from."""
    meta = dataset_format.read_meta(data_dir)
    return check_pairs_meta(meta, data_dir)


def length_stats(lengths: np.ndarray) -> dict:
    """Pairs and per-side token-length statistics of one split; lengths has shape (n, 2).

    p95 is the empirical quantile (the smallest length that 95% of the pairs do not exceed): a context of that
    many tokens holds 95% of the sources (or targets) whole.
    """
    stats = {"pairs": int(len(lengths))}
    for side, col in (("source", 0), ("target", 1)):
        x = lengths[:, col]
        stats[side] = {"min": int(x.min()), "mean": round(float(x.mean()), 2),
                       "p95": int(np.quantile(x, 0.95, method="inverted_cdf")), "max": int(x.max())}
    return stats


Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


def write_pairs(out_dir: str | Path, splits: dict[str, Pairs], meta: dict) -> dict:
    """Write <split>.bin/.idx for each split, tokenizer.tiktoken (bpe) and meta.json, atomically; return the meta.

    splits: {"train": [(source ids, target ids), ...], "val": [...], optionally "length": [...]}, tokenizer ids
    only, every source and target at least one token. meta must hold the tokenizer spec, tokenizer_vocab_size,
    source, source_sha256, val_fraction and tokenizer_kind; this adds format_version, kind, vocab_size,
    dtype, special_tokens, splits, train_tokens/val_tokens, length_stats, max_token_id (each split's largest id)
    and task (None unless given).
    Files go through dataset_format.write_files: temp files first, meta.json last, a token-stream dataset's or
    an earlier pairs run's other files removed.
    """
    out_dir = Path(out_dir)
    unknown, missing = set(splits) - set(PAIR_SPLITS), set(REQUIRED_SPLITS) - set(splits)
    if unknown or missing:
        raise ValueError(f"splits must be train, val and optionally length; unknown {sorted(unknown)}, missing {sorted(missing)}")
    v = meta["tokenizer_vocab_size"]
    specials = special_tokens(v)
    vocab_size = v + N_SPECIAL
    dtype_name = dataset_format.dtype_name_for_vocab(vocab_size)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in (s for s in PAIR_SPLITS if s in splits):
        id_pairs = splits[split]
        if not id_pairs:
            raise ValueError(f"split {split!r} has no pairs")
        lengths = np.array([(len(s), len(t)) for s, t in id_pairs], dtype=np.int64)
        if int(lengths.min()) < 1 or int(lengths.max()) > MAX_LENGTH:
            raise ValueError(f"every source and target of {split!r} needs 1..{MAX_LENGTH} tokens")
        ids = np.fromiter(itertools.chain.from_iterable(itertools.chain(s, t) for s, t in id_pairs), dtype=np.int64,
                          count=int(lengths.sum()))
        if int(ids.min()) < 0 or int(ids.max()) >= v:
            raise ValueError(f"{split} ids must lie in [0, {v}) (tokenizer ids, no special ids), got [{int(ids.min())}, {int(ids.max())}]")
        arrays[split] = ids.astype(dataset_format.DTYPES[dtype_name]), lengths.astype(IDX_DTYPE)

    full = {
        "format_version": dataset_format.FORMAT_VERSION,
        **{k: val for k, val in meta.items() if k != "tokenizer"},
        "kind": KIND,
        "task": meta.get("task"),
        "vocab_size": vocab_size,
        "dtype": dtype_name,
        "special_tokens": specials.to_dict(),
        "splits": {s: {"pairs": int(len(idx)), "tokens": int(ids.size)} for s, (ids, idx) in arrays.items()},
        "train_tokens": int(arrays["train"][0].size),
        "val_tokens": int(arrays["val"][0].size),
        "length_stats": {s: length_stats(idx.astype(np.int64)) for s, (_, idx) in arrays.items()},
        # checked above; a run trusts this record instead of reading a large split whole (check_pair_ids)
        "max_token_id": {s: int(ids.max()) for s, (ids, _) in arrays.items()},
        "tokenizer": meta["tokenizer"],  # last: for bpe it holds the whole ranks text
    }
    dataset_format.check_meta(full, out_dir)
    check_pairs_meta(full, out_dir)

    contents: dict[str, Callable] = {}
    for split, (ids, idx) in arrays.items():
        contents[f"{split}.bin"] = lambda f, a=ids: a.tofile(f)
        contents[f"{split}.idx"] = lambda f, a=idx: a.tofile(f)
    contents.update(dataset_format.dataset_extras(full))
    stale = [f"{s}.{ext}" for s in PAIR_SPLITS for ext in ("bin", "idx")]  # e.g. an earlier run's length split
    dataset_format.write_files(out_dir, contents, stale)
    return full


@dataclass(frozen=True, eq=False)
class PairSplit:
    """One split of a pairs dataset, read whole (pairs sets are small, so no memmap is held open)."""

    path: Path  # the .bin file
    tokens: np.ndarray  # every pair's source then target ids, in the file's dtype
    source_lengths: np.ndarray  # int64, one per pair
    target_lengths: np.ndarray  # int64, one per pair
    offsets: np.ndarray  # int64: where each pair's source starts in `tokens`

    @property
    def n(self) -> int:
        return len(self.source_lengths)

    def __len__(self) -> int:
        return self.n

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair i's (source ids, target ids) as int64 arrays of tokenizer ids."""
        if not -self.n <= i < self.n:
            raise IndexError(f"pair {i} is out of range for {self.n} pairs")
        start = int(self.offsets[i])
        mid = start + int(self.source_lengths[i])
        return self.tokens[start:mid].astype(np.int64), self.tokens[mid:mid + int(self.target_lengths[i])].astype(np.int64)

    def check_ids(self, tokenizer_vocab_size: int) -> None:
        """Every stored id a tokenizer id (< tokenizer_vocab_size): special ids are never stored, and a corrupt or
        foreign .bin would otherwise index past the embedding or pose as an eos. One max over the split, which is
        in memory already: a few ms per 100 MB, beside the reading of it."""
        v = tokenizer_vocab_size
        if self.tokens.size and int(self.tokens.max()) >= v:
            at = int(np.argmax(self.tokens >= v))
            i = int(np.searchsorted(self.offsets, at, side="right")) - 1
            raise pair_id_error(self.path, int(self.tokens[at]), i, v)


def open_pairs(data_dir: str | Path, split: str, meta: dict | None = None) -> PairSplit:
    """One split of a pairs dataset, its file sizes checked against meta.json and the .idx."""
    data_dir = Path(data_dir)
    meta = read_pairs_meta(data_dir) if meta is None else check_pairs_meta(meta, data_dir)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir} has no {split!r} split; it holds: {', '.join(meta['splits'])}")
    counts = meta["splits"][split]
    dtype = dataset_format.DTYPES[meta["dtype"]]
    bin_path, idx_path = data_dir / f"{split}.bin", data_dir / f"{split}.idx"
    try:
        idx_bytes, bin_bytes = idx_path.stat().st_size, bin_path.stat().st_size
    except FileNotFoundError as e:
        raise UserError(f"{e.filename} is missing; {_rerun(data_dir)}") from None
    stale = f"the data is truncated or stale: {_rerun(data_dir)}"
    if idx_bytes != counts["pairs"] * 2 * IDX_DTYPE.itemsize:
        raise UserError(f"{idx_path} has {idx_bytes} bytes, but meta.json says {counts['pairs']} pairs "
                        f"({counts['pairs'] * 2 * IDX_DTYPE.itemsize} bytes); {stale}")
    if bin_bytes != counts["tokens"] * dtype.itemsize:
        raise UserError(f"{bin_path} has {bin_bytes} bytes, but meta.json says {counts['tokens']} {meta['dtype']} tokens "
                        f"({counts['tokens'] * dtype.itemsize} bytes); {stale}")
    lengths = np.fromfile(idx_path, dtype=IDX_DTYPE).astype(np.int64).reshape(-1, 2)
    if int(lengths.sum()) != counts["tokens"] or (lengths.size and int(lengths.min()) < 1):
        raise UserError(f"{idx_path} gives pair lengths that do not add up to the {counts['tokens']} tokens of "
                        f"{bin_path.name} (or an empty source or target); {stale}")
    per_pair = lengths.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(per_pair)[:-1]]).astype(np.int64)
    return PairSplit(bin_path, np.fromfile(bin_path, dtype=dtype), lengths[:, 0].copy(), lengths[:, 1].copy(), offsets)


def pair_id_error(path: Path, token: int, pair: int, tokenizer_vocab_size: int) -> UserError:
    """The one error for a stored id that is no tokenizer id, in pair `pair` of the file at `path`."""
    return UserError(
        f"{path} holds token id {token} in pair {pair}, but the tokenizer has {tokenizer_vocab_size} tokens: "
        f"the file is corrupt or from another tokenizer; {_rerun(path.parent)}"
    )


def check_pair_ids(data_dir: str | Path, split: str, meta: dict | None = None,
                   full_check_bytes: int | None = None) -> None:
    """Every stored id must be a tokenizer id (`PairSplit.check_ids`). What a run checks at its start, like
    dataset_format.check_token_ids: the largest id prepare recorded (max_token_id) and, for a .bin of at most
    `full_check_bytes` (dataset_format.FULL_ID_CHECK_BYTES), every id and the files' sizes. A larger split is not
    read again here: PairBatches checks every id of the split it reads whole (batches.py)."""
    data_dir = Path(data_dir)
    meta = read_pairs_meta(data_dir) if meta is None else meta
    v = meta["tokenizer_vocab_size"]
    dataset_format.check_recorded_max_id(data_dir, split, meta, v, f"the tokenizer has {v} tokens")
    counts = meta["splits"].get(split, {})
    limit = dataset_format.FULL_ID_CHECK_BYTES if full_check_bytes is None else full_check_bytes
    if counts.get("tokens", 0) * dataset_format.DTYPES[meta["dtype"]].itemsize > limit:
        return
    open_pairs(data_dir, split, meta).check_ids(v)


# ---------------------------------------------------------------------------------------------
# 3. User files: FILE.tsv (source<TAB>target a line) or FILE.jsonl ({"source": ..., "target": ...} a line)
# ---------------------------------------------------------------------------------------------

JSONL_PAIR_EXAMPLE = '{"source": "...", "target": "..."}'


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"pairs file {path} does not exist; pass a .tsv (source<TAB>target a line) or .jsonl file")
    text = sources.decode_utf8(path.read_bytes(), path)
    text = text.removeprefix("\ufeff")  # a BOM (some editors write one) is not part of the first source
    if not text.strip():
        hint = "`source<TAB>target`" if path.suffix == ".tsv" else JSONL_PAIR_EXAMPLE
        raise UserError(f"{path} is empty; write one pair a line: {hint}")
    return text


def _check_side(value: str, side: str, path: Path, lineno: int) -> str:
    if not value.strip():
        raise UserError(f"{path} line {lineno} has an empty {side}; every pair needs a non-empty source and target")
    return value


def read_pairs_file(path: str | Path) -> list[tuple[str, str]]:
    """The (source, target) pairs of a .tsv or .jsonl file, in file order; blank lines are skipped.

    TSV: exactly one tab a line. A line with two or more tabs is refused rather than split on its first tab:
    whether the extra tab belongs to the source or the target cannot be known (use JSONL for text with tabs).
    A line's trailing "\\r" (a Windows line end) is dropped; other whitespace is kept as written.
    """
    path = Path(path).expanduser()
    if path.suffix not in (".tsv", ".jsonl"):
        raise UserError(f"{path}: a pairs file ends in .tsv (source<TAB>target a line) or .jsonl ({JSONL_PAIR_EXAMPLE} a line)")
    text = _read_text(path)
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            obj = sources.parse_jsonl_line(line, path, n, JSONL_PAIR_EXAMPLE)
            source, target = (sources.jsonl_string(obj, k, path, n, JSONL_PAIR_EXAMPLE) for k in ("source", "target"))
        else:
            tabs = line.count("\t")
            if tabs != 1:
                what = "has no tab" if tabs == 0 else f"has {tabs} tabs (ambiguous; use .jsonl for text with tabs)"
                raise UserError(f"{path} line {n} {what}; each line needs `source<TAB>target` with exactly one tab")
            source, target = line.split("\t")
        out.append((_check_side(source, "source", path, n), _check_side(target, "target", path, n)))
    return out


def jsonl_kind(path: str | Path) -> str:
    """'pairs' or 'text': the keys of a .jsonl file's first non-blank line decide (source+target -> pairs,
    anything else -> a document corpus for prepare_data). Reads only up to that line: a text corpus may be large."""
    path = Path(path).expanduser()
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                break
            offset += len(raw)
        else:
            raise UserError(f"{path} is empty; write one JSON object a line: {JSONL_PAIR_EXAMPLE} (pairs) or "
                            f"{sources.JSONL_TEXT_EXAMPLE} (documents)")
    line = sources.decode_utf8(raw, path, offset, n).removeprefix("\ufeff")
    example = f"{JSONL_PAIR_EXAMPLE} (pairs) or {sources.JSONL_TEXT_EXAMPLE} (documents)"
    obj = sources.parse_jsonl_line(line, path, n, example)
    # anything else is a corpus of documents, whose reader names a line without its text field (--text-key)
    return "pairs" if "source" in obj and "target" in obj else "text"


# ---------------------------------------------------------------------------------------------
# 4. prepare_pairs: source -> pairs -> splits -> tokenize -> write
# ---------------------------------------------------------------------------------------------

TASK_PREFIX = "task:"


def is_pairs_source(source: str) -> bool:
    """'task:NAME', a .tsv path, or a .jsonl file whose first line holds source and target."""
    if source.startswith(TASK_PREFIX) or Path(source).suffix == ".tsv":
        return True
    path = Path(source).expanduser()
    return path.suffix == ".jsonl" and path.is_file() and jsonl_kind(path) == "pairs"


def _content_sha256(splits: dict[str, list[tuple[str, str]]]) -> str:
    """A task's identity on disk: the hash of the pairs it generated, so a changed generator is never reused."""
    return hashlib.sha256(json.dumps(splits, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def split_pairs(text_pairs: list[tuple[str, str]], val_fraction: float, seed: int, label: str) -> dict[str, list[tuple[str, str]]]:
    """Shuffle with the seed, then the first round(n * val_fraction) pairs (at least one) are val, the rest train."""
    shuffled = list(text_pairs)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction))
    if len(shuffled) - n_val < 1:
        raise UserError(f"{label} has {len(text_pairs)} pair(s), too few to split with --val-fraction {val_fraction}; "
                        "add pairs or use a smaller --val-fraction")
    return {"train": shuffled[n_val:], "val": shuffled[:n_val]}


def _build_tokenizer(kind: str, bpe_vocab_size: int | None, splits: dict[str, list[tuple[str, str]]], log: Log):
    if kind == "char":  # from every split's text, so no split holds a character the vocabulary lacks
        return tokenization.CharTokenizer.from_text("".join(s + t for text_pairs in splits.values() for s, t in text_pairs))
    if kind == "gpt2":
        return tokenization.gpt2_tokenizer()
    texts = [x for pair in splits["train"] for x in pair]
    log(f"training a {bpe_vocab_size}-token BPE on the {len(splits['train']):,} train pairs with rustbpe")
    return tokenization.train_bpe(texts, bpe_vocab_size, log)


def encode_many(tok, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids. char: one encode of the joined texts, cut by their lengths (one id per character);
    tiktoken: a batch call on all cores."""
    if isinstance(tok, tokenization.CharTokenizer):
        ids = tok.encode_array("".join(texts))
        return np.split(ids, np.cumsum([len(t) for t in texts])[:-1]) if texts else []
    if isinstance(tok, tokenization.TiktokenTokenizer):
        return [np.asarray(x, dtype=np.int64) for x in tok.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)]
    return [np.asarray(tok.encode(t), dtype=np.int64) for t in texts]


def _open_all_splits(data_dir: Path, meta: dict) -> None:
    """Raise a UserError unless every split on disk matches meta.json (prepare's reuse check)."""
    for split in meta["splits"]:
        open_pairs(data_dir, split, meta)


def format_stats(split: str, stats: dict) -> str:
    def side(name):
        s = stats[name]
        return f"{name} min {s['min']} / mean {s['mean']:.1f} / p95 {s['p95']} / max {s['max']}"

    return f"  {split:<6} {stats['pairs']:>7,} pairs   {side('source')}   {side('target')}"


def prepare_pairs(
    source: str,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    out: str | Path | None = None,
    input_path: str | Path | None = None,
    val_fraction: float = 0.1,
    force: bool = False,
    data_root: Path = DATA_ROOT,
    log: Log | None = None,
    examples: int | None = None,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write a pairs dataset from 'task:NAME' (tasks.py) or a .tsv/.jsonl pairs file; return the output folder.

    Files: shuffled with `seed`, then split train/val by `val_fraction`. Tasks: generated from (examples, seed);
    each task fixes its own validation split, so `val_fraction` must stay at its default. out defaults to
    data/task_<name>_<tokenizer> or data/<file stem>_<tokenizer>. The same request on an existing output is
    reused; a different one is refused unless force.
    """
    log = log or log_to_stderr
    t0 = time.perf_counter()
    kind, bpe_vocab_size = prepare_data._check_request(tokenizer, vocab_size, val_fraction)
    prepare_data.check_count("seed", seed, 0, str(DEFAULT_SEED))
    if source.startswith(TASK_PREFIX):
        import tasks

        name = source[len(TASK_PREFIX):]
        task = tasks.get_task(name)
        if val_fraction != 0.1:  # prepare's default: the user did not ask for another
            raise UserError(f"--val-fraction does not apply to task:{name} (the task sets its own validation split); drop it")
        splits = tasks.generate(name, examples, seed, log, input_path=input_path, data_root=data_root)
        default_out = f"task_{name}_{kind}"
        n_total = len(splits["train"]) + len(splits["val"])
        info = {"source": f"task:{name}", "source_sha256": _content_sha256(splits),
                "val_fraction": round(len(splits["val"]) / n_total, 6), "task": name,
                "task_description": task.description, "examples": len(splits["train"])}
        baseline = tasks.baseline(name, splits)
        if baseline is not None:
            info["baseline"] = baseline
        request_keys = ("source_sha256", "task", "examples", "seed")
    else:
        if examples is not None:
            raise UserError(prepare_data.EXAMPLES_ONLY_FOR_TASKS)
        if input_path is not None:
            raise UserError("--input only applies to 'shakespeare' and task:speaker / task:modernize; pass your pairs file as SOURCE")
        path = Path(source).expanduser()
        splits = split_pairs(read_pairs_file(path), val_fraction, seed, str(path))
        stem = re.sub(r"[^\w.-]+", "_", path.stem).strip("._") or "pairs"  # as prepare_data names a file's folder
        default_out = f"{stem}_{kind}"
        data = path.read_bytes()
        info = {"source": str(path.resolve()), "source_path": str(path.resolve()),
                "source_sha256": sources._sha256(data), "source_bytes": len(data),
                "val_fraction": float(val_fraction), "task": None}
        request_keys = ("source_sha256", "task", "val_fraction", "seed")
        train_sources = {s for s, _ in splits["train"]}
        leaked = sum(s in train_sources for s, _ in splits["val"])
        if leaked:
            log(f"note: {leaked} of {len(splits['val'])} val pairs have a source that also appears in train")
    out_dir = Path(out).expanduser() if out is not None else Path(data_root) / default_out

    meta_fields = {**info, "seed": seed, "tokenizer_kind": kind}
    request = {"format_version": dataset_format.FORMAT_VERSION, "kind": KIND, "tokenizer_kind": kind,
               "bpe_vocab_size": bpe_vocab_size, **{k: meta_fields[k] for k in request_keys}}
    if prepare_data._reusable(out_dir, request, force, log, _open_all_splits):
        log(f"reusing {out_dir} (already prepared from the same source, request and tokenizer)")
        return out_dir

    tok = _build_tokenizer(kind, bpe_vocab_size, splits, log)
    encoded = {}
    for split, text_pairs in splits.items():
        ids = encode_many(tok, [x for pair in text_pairs for x in pair])
        encoded[split] = list(zip(ids[0::2], ids[1::2]))
    meta = {
        **meta_fields,
        **({"bpe_vocab_size": bpe_vocab_size} if kind == "bpe" else {}),
        "tokenizer_vocab_size": tok.vocab_size,
        "eot_token": tok.eot_token,  # the tokenizer's own end-of-text (gpt2); a pair ends with special_tokens.eos
        "tokenizer": tok.spec,
    }
    meta = write_pairs(out_dir, encoded, meta)
    if meta["task"] is not None:
        log(f"task:{meta['task']}: {meta['task_description']}")
    log(f"pairs per split; source and target lengths in {kind} tokens (min / mean / p95 / max):")
    for split, stats in meta["length_stats"].items():
        log(format_stats(split, stats))
    if "baseline" in meta:
        b = meta["baseline"]
        log(f"baseline on {b['split']}, predicting {b['prediction']}: exact match {b['exact_match']:.3f}, "
            f"character similarity {b['difflib_ratio']:.3f} ({b['what']})")
    log(
        f"wrote {out_dir}: {kind} vocab {meta['tokenizer_vocab_size']:,} + {N_SPECIAL} special ids = "
        f"{meta['vocab_size']:,}, {meta['dtype']} ({time.perf_counter() - t0:.1f}s)"
    )
    return out_dir
