"""Data preparation: tokenizers, the on-disk format, dataset preparers."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message as one line on stderr and exits 2.

    It lives here, at the bottom of the import chain (model <- prepare_data <- train <- sample <- cli),
    so every layer that checks user input can raise it.
    """


# Read top to bottom:
#   1. tokenizers (char, gpt2, bpe; hf in interop/hf_tokenizer.py), load_tokenizer(spec), TextStream
#   2. the on-disk format: write_dataset, read_meta, open_split
#   3. sources: the tiny-Shakespeare download, or local .txt files
#   4. prepare(...): source -> split -> tokenize -> write, the one entry point the CLI calls
# Source/target pairs (task:NAME, .tsv, .jsonl of pairs) have their own format and pipeline in pairs.py,
# which prepare(...) hands them to.
#
# Only numpy is imported at module level; tiktoken and rustbpe are imported where they are used,
# so that `import prepare_data` (done by every other module for UserError) stays cheap.

import base64
import codecs
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

DATA_ROOT = Path("data")  # relative to where minigpt runs, like the data.dir paths in config/*.toml

TOKENIZER_KINDS = ("char", "gpt2", "bpe")
EXAMPLES_ONLY_FOR_TASKS = "--examples applies only to task: sources (it sets how many train pairs a task makes); drop it"
DEFAULT_SEED = 1337  # shuffles pairs datasets and seeds generated tasks (a token-stream split is fixed, no seed)
DEFAULT_BPE_VOCAB_SIZE = 1024
CHUNK_CHARS = 1 << 20  # ~1 MB of text per tiktoken encode call
PROGRESS_MIN_CHARS = 4 << 20  # show a progress bar only for inputs above ~4 MB

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Tokenizers
# ---------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What the trainer and the sampler need from a tokenizer.

    `spec` is a JSON-able dict holding everything needed to rebuild the tokenizer with
    `load_tokenizer(spec)`; it is stored in meta.json and in checkpoints (never pickle).
    `encode` is for training text: ordinary text, no special tokens. `encode_prompt` is for a prompt to sample
    from: the ids Hugging Face's tokenizer gives with its defaults (special-token text such as "<|endoftext|>"
    matched, a BOS added where it adds one).
    `decode_bytes` returns the raw bytes of the tokens, so a sampler can stream text byte-exact
    through an incremental UTF-8 decoder (a BPE token may end in the middle of a character).
    """

    spec: dict
    vocab_size: int
    eot_token: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


def _int_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of the corpus's characters."""

    eot_token = None

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise UserError("a char tokenizer needs a non-empty string of distinct characters; re-run `minigpt prepare`")
        self.chars = "".join(sorted(chars))  # sorted by code point, so ids can be found by binary search
        self.vocab_size = len(self.chars)
        self.spec = {"kind": "char", "chars": self.chars}
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to an int64 array (vectorised: fast on large corpora)."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)
        found = self._codes[np.minimum(ids, self.vocab_size - 1)] == codes
        if not found.all():
            ch = chr(int(codes[np.argmin(found)]))
            raise UserError(
                f"character {ch!r} (U+{ord(ch):04X}) is not in this char vocabulary of {self.vocab_size} characters; "
                "use only characters from the training corpus, or prepare the data with --tokenizer gpt2 or bpe"
            )
        return ids.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)  # no special tokens to match

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in _int_list(ids):
            if not 0 <= i < self.vocab_size:
                raise UserError(f"token id {i} is out of range for this char vocabulary of {self.vocab_size} characters")
            out.append(self.chars[i])
        return "".join(out)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")


class TiktokenTokenizer:
    """A byte-level BPE run by tiktoken: the GPT-2 encoding, or one trained here with rustbpe."""

    def __init__(self, encoding, spec: dict, eot_token: int | None):
        self.encoding = encoding
        self.spec = spec
        self.eot_token = eot_token
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)  # special-token text like "<|endoftext|>" is plain text

    def encode_prompt(self, text: str) -> list[int]:
        """As Hugging Face's GPT-2 tokenizer: "<|endoftext|>" in a prompt is the token 50256 (a trained bpe has no
        special tokens, so this is `encode`)."""
        return self.encoding.encode(text, allowed_special="all")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        ids = _int_list(ids)
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, ValueError, OverflowError):
            bad = next((i for i in ids if not 0 <= i < self.vocab_size), "?")
            raise UserError(f"token id {bad} is out of range for this tokenizer's vocabulary of {self.vocab_size}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The text, special tokens left out ("<|endoftext|>" is not printed), as Hugging Face's
        decode(ids, skip_special_tokens=True); decode_bytes keeps every token's bytes."""
        ids = _int_list(ids)
        if self.eot_token is not None:
            ids = [i for i in ids if i != self.eot_token]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def gpt2_tokenizer() -> TiktokenTokenizer:
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError, a bad cache file, ...: all mean "cannot load"
        raise UserError(
            f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
            "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached GPT-2 files, or go online once"
        ) from None
    return TiktokenTokenizer(enc, {"kind": "gpt2"}, eot_token=enc.eot_token)  # 50256, <|endoftext|>


def ranks_to_text(ranks: Iterable[tuple[bytes, int]]) -> str:
    """tiktoken's ranks-file format: one `base64(token_bytes) rank` line per token, by rank."""
    return "".join(f"{base64.b64encode(b).decode('ascii')} {r}\n" for b, r in sorted(ranks, key=lambda br: br[1]))


def text_to_ranks(text: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        for line in text.splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
        raise UserError(f"bad line in BPE ranks {line[:60]!r}; expected `base64 rank`; re-run `minigpt prepare`") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError("BPE ranks must be 0..N-1 without gaps or repeats; re-run `minigpt prepare`")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError("BPE ranks lack some of the 256 single bytes, so not every text can be encoded; re-run `minigpt prepare`")
    return ranks


def _bpe_from_spec(spec: dict) -> TiktokenTokenizer:
    import tiktoken

    pattern, ranks_text = spec.get("pattern"), spec.get("ranks")
    if not isinstance(pattern, str) or not isinstance(ranks_text, str):
        raise UserError("a bpe tokenizer spec needs string fields 'pattern' and 'ranks'; re-run `minigpt prepare`")
    ranks = text_to_ranks(ranks_text)
    try:
        enc = tiktoken.Encoding(f"minigpt-bpe-{len(ranks)}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except ValueError as e:
        raise UserError(f"bad bpe tokenizer spec ({e}); re-run `minigpt prepare`") from None
    return TiktokenTokenizer(enc, {"kind": "bpe", "pattern": pattern, "ranks": ranks_text}, eot_token=None)


def train_bpe(texts: Iterable[str], vocab_size: int, log: Log = _stderr) -> TiktokenTokenizer:
    """Train a byte-level BPE with rustbpe and run it with tiktoken.

    rustbpe is the trainer nanochat uses: it emits tiktoken mergeable ranks directly (no byte-to-unicode
    remapping as HF `tokenizers` needs), trains on 1 MB in well under a second, and works offline.
    It splits text with a GPT-4-style regex, which we keep as the tiktoken pattern.
    """
    import rustbpe

    _check_bpe_vocab_size(vocab_size)  # rustbpe panics (no clean exception) below 256
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size)
    ranks = [(bytes(b), int(r)) for b, r in trainer.get_mergeable_ranks()]
    if len(ranks) < vocab_size:
        log(f"note: the corpus only supports {len(ranks)} BPE tokens (fewer than the {vocab_size} asked for)")
    return _bpe_from_spec({"kind": "bpe", "pattern": trainer.get_pattern(), "ranks": ranks_to_text(ranks)})


def load_tokenizer(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from its spec (from meta.json or a checkpoint). The hf kind (a Hugging Face tokenizer.json)
    lives in interop/hf_tokenizer.py and needs the `tokenizers` library, imported only here."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char":
        chars = spec.get("chars")
        if not isinstance(chars, str):
            raise UserError("a char tokenizer spec needs a string field 'chars'; re-run `minigpt prepare`")
        return CharTokenizer(chars)
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        return _bpe_from_spec(spec)
    if kind == "hf":
        from interop.hf_tokenizer import HFTokenizer

        return HFTokenizer(spec)
    raise UserError(f"unknown tokenizer spec (kind {kind!r}); expected one of {', '.join(TOKENIZER_KINDS)}, hf; re-run `minigpt prepare`")


class TextStream:
    """The text of generated tokens, one piece per token as they come, for a sampler to print.

    Byte-level tokenizers (char, gpt2, bpe) stream their tokens' bytes through an incremental UTF-8 decoder: a
    token may end inside a character. A Hugging Face tokenizer (`stream_by_text`) decodes the whole sequence,
    prompt included, and prints what its text gained past the prompt's, as HF's TextStreamer does: a metaspace
    token's leading space ("▁the") exists only after the text before it. What later tokens may still change
    waits: a trailing run of the tokenizer's `stream_open_ids` (byte-fallback tokens <0xE6><0x97>..., valid
    UTF-8 only as a whole, each byte a U+FFFD if not) and a trailing U+FFFD. `text` is the text of the new
    tokens: decode(new) for the byte-level kinds, decode(prompt + new) past decode(prompt) for hf, so it is
    exactly what was printed.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer, self.prompt, self.new = tokenizer, _int_list(prompt_ids), []
        self.by_text = getattr(tokenizer, "stream_by_text", False)
        self._open_ids = getattr(tokenizer, "stream_open_ids", frozenset())
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._base = tokenizer.decode(self.prompt) if self.by_text else ""
        self._printed = 0  # characters of `text` written so far (by_text only)

    def _gained(self, new: list[int]) -> str:
        full = self.tokenizer.decode(self.prompt + new)
        if full.startswith(self._base):
            return full[len(self._base):]
        return full[len(os.path.commonprefix([full, self._base])):]  # a decoder that rewrote the prompt's end

    def push(self, token: int) -> str:
        """The text to print for one more token (maybe "", while a character is unfinished)."""
        self.new.append(int(token))
        if not self.by_text:
            return self._utf8.decode(self.tokenizer.decode_bytes([token]))
        settled = len(self.new)
        while settled and self.new[settled - 1] in self._open_ids:
            settled -= 1
        ready = self._gained(self.new[:settled]).rstrip("\ufffd")
        piece = ready[self._printed:]
        self._printed = max(self._printed, len(ready))
        return piece

    def flush(self) -> str:
        """What is left to print once generation ends."""
        if not self.by_text:
            return self._utf8.decode(b"", final=True)
        piece = self._gained(self.new)[self._printed:]
        self._printed += len(piece)
        return piece

    @property
    def text(self) -> str:
        return self._gained(self.new) if self.by_text else self.tokenizer.decode(self.new)


# ---------------------------------------------------------------------------------------------
# 2. The on-disk format (the only place that knows it)
#
#   <dir>/train.bin, <dir>/val.bin   raw little-endian token ids, dtype uint16 if vocab_size <= 65536 else uint32
#   <dir>/meta.json                  format_version, tokenizer spec, vocab_size, dtype, token counts, source, ...
#   <dir>/tokenizer.tiktoken         (bpe only) the ranks in tiktoken's format; the same text is in the spec
# ---------------------------------------------------------------------------------------------

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"
BPE_RANKS_FILE = "tokenizer.tiktoken"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def write_temp(folder: Path, name: str, write: Callable[[BinaryIO], object]) -> str:
    """Write `name`'s new contents through `write(f)` into a temporary file in `folder`, fsynced; return its path."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` so that a crash at any moment leaves the old file or the new one, never a part of one:
    a temporary file beside it, fsynced, renamed over it, and the rename made durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, path.name, write)
    try:
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dtype_name_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _prepare_hint(data_dir: Path) -> str:
    return f"run `minigpt prepare SOURCE --out {data_dir}` (e.g. SOURCE=shakespeare) to create it"


def _check_meta(meta, data_dir: Path) -> dict:
    where = data_dir / META_FILE
    if not isinstance(meta, dict):
        raise UserError(f"{where} does not hold a JSON object; {_prepare_hint(data_dir)}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{where} has format_version {meta.get('format_version')!r}, this minigpt reads {FORMAT_VERSION}; "
            f"re-run `minigpt prepare ... --out {data_dir} --force`"
        )
    fields = {
        "tokenizer": dict, "vocab_size": int, "dtype": str, "train_tokens": int, "val_tokens": int,
        "source": str, "source_sha256": str, "val_fraction": (int, float), "tokenizer_kind": str,
    }
    for name, typ in fields.items():
        value = meta.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise UserError(f"{where}: field {name!r} is missing or of the wrong type; {_prepare_hint(data_dir)}")
    if meta["vocab_size"] < 1 or meta["train_tokens"] < 0 or meta["val_tokens"] < 0:
        raise UserError(f"{where}: vocab_size and token counts must be positive; {_prepare_hint(data_dir)}")
    if meta["dtype"] != dtype_name_for_vocab(meta["vocab_size"]):
        raise UserError(
            f"{where}: dtype {meta['dtype']!r} does not fit vocab_size {meta['vocab_size']} "
            f"(expected {dtype_name_for_vocab(meta['vocab_size'])!r}); {_prepare_hint(data_dir)}"
        )
    if not isinstance(meta["tokenizer"].get("kind"), str):
        raise UserError(f"{where}: the tokenizer spec has no 'kind'; {_prepare_hint(data_dir)}")
    return meta


def read_meta(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; {_prepare_hint(data_dir)}")
    path = data_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{data_dir} is not a prepared dataset (no {META_FILE}); {_prepare_hint(data_dir)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); {_prepare_hint(data_dir)}") from None
    return _check_meta(meta, data_dir)


def open_split(data_dir: str | Path, split: str, meta: dict | None = None) -> np.memmap:
    """A fresh read-only memmap of one split. Create one per batch: a memmap held for a long run leaks memory."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if meta is None:
        meta = read_meta(data_dir)
    dtype = DTYPES[meta["dtype"]]
    path = data_dir / f"{split}.bin"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path} is missing; re-run `minigpt prepare ... --out {data_dir} --force`") from None
    expected = meta[f"{split}_tokens"]
    if size % dtype.itemsize or size // dtype.itemsize != expected:
        raise UserError(
            f"{path} has {size} bytes, but meta.json says {expected} {meta['dtype']} tokens ({expected * dtype.itemsize} bytes); "
            f"the data is truncated or stale: re-run `minigpt prepare ... --out {data_dir} --force`"
        )
    if expected == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# A split of at most this many bytes is scanned whole at the start of a run (milliseconds from the page cache);
# a larger one is trusted to prepare's check, recorded in meta.json's max_token_id, and to the check of every
# batch cut from it (batches.Batches.check_ids): an OpenWebText-sized train.bin is ~18 GB of reading per start.
FULL_ID_CHECK_BYTES = 256 << 20


def token_id_error(path: str | Path, token: int, at: int, vocab_size: int) -> UserError:
    """The one error for a token id past the vocabulary, at `at` (a token's index in the file)."""
    return UserError(
        f"{path} holds token id {token} at position {at}, but vocab_size is {vocab_size}: the file is corrupt or "
        f"from another tokenizer; re-run `minigpt prepare ... --force`"
    )


def recorded_max_id(meta: dict, split: str) -> int | None:
    """The largest id of a split that prepare recorded in meta.json (max_token_id), or None: not recorded (a
    dataset prepared before the record existed) or an empty split."""
    recorded = meta.get("max_token_id")
    value = recorded.get(split) if isinstance(recorded, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_recorded_max_id(data_dir: str | Path, split: str, meta: dict, limit: int, what: str) -> None:
    """The max id meta.json records for a split must lie below `limit`: an edited or foreign meta.json."""
    top = recorded_max_id(meta, split)
    if top is not None and not 0 <= top < limit:
        raise UserError(f"{Path(data_dir) / META_FILE} records token id {top} as the largest of the {split} split, "
                        f"but {what}; re-run `minigpt prepare ... --out {data_dir} --force`")


def check_token_ids(data_dir: str | Path, split: str, meta: dict, chunk: int = 1 << 24,
                    full_check_bytes: int | None = None) -> None:
    """What a run checks of a split's ids at its start, cheaply: the file's size against meta.json (open_split),
    the largest id prepare recorded against vocab_size, and, for a file of at most `full_check_bytes`
    (FULL_ID_CHECK_BYTES), every id. A larger file is not read here: training checks each batch it cuts from it
    (Batches.check_ids), so a corrupt or foreign .bin is the same one-line error when a batch reaches it."""
    data = open_split(data_dir, split, meta)
    vocab_size = meta["vocab_size"]
    check_recorded_max_id(data_dir, split, meta, vocab_size, f"vocab_size is {vocab_size}")
    if data.nbytes > (FULL_ID_CHECK_BYTES if full_check_bytes is None else full_check_bytes):
        return
    for start in range(0, len(data), chunk):
        part = np.asarray(data[start:start + chunk])
        if part.size and int(part.max()) >= vocab_size:
            at = start + int(np.argmax(part >= vocab_size))
            raise token_id_error(Path(data_dir) / f"{split}.bin", int(data[at]), at, vocab_size)


def write_dataset(out_dir: str | Path, train_ids, val_ids, meta: dict) -> dict:
    """Write train.bin, val.bin, meta.json (and tokenizer.tiktoken for bpe) atomically; return the full meta.

    `meta` must hold at least the tokenizer spec, vocab_size, source, source_sha256, val_fraction and
    tokenizer_kind; this function adds format_version, dtype, the token counts and each split's largest id
    (max_token_id, None for an empty split). Every file is written to a temp file in out_dir and moved into
    place with os.replace, meta.json last (the old one is removed first), so a crash never leaves a meta.json
    that describes other files.
    """
    out_dir = Path(out_dir)
    dtype_name = dtype_name_for_vocab(meta["vocab_size"])
    arrays = {}
    for split, ids in zip(SPLITS, (train_ids, val_ids)):
        a = np.asarray(ids)
        if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{split} ids must be a 1-D integer array")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= meta["vocab_size"]):
            raise ValueError(f"{split} ids must lie in [0, {meta['vocab_size']}), got [{int(a.min())}, {int(a.max())}]")
        arrays[split] = a.astype(DTYPES[dtype_name], copy=False)
    full = {
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in meta.items() if k != "tokenizer"},
        "dtype": dtype_name,
        "train_tokens": int(arrays["train"].size),
        "val_tokens": int(arrays["val"].size),
        # checked above; a run trusts this record instead of reading a large split whole (check_token_ids)
        "max_token_id": {s: int(a.max()) if a.size else None for s, a in arrays.items()},
        "tokenizer": meta["tokenizer"],  # last: for bpe it holds the whole ranks text
    }
    _check_meta(full, out_dir)

    contents: dict[str, Callable] = {f"{s}.bin": (lambda f, a=arrays[s]: a.tofile(f)) for s in SPLITS}
    contents.update(dataset_extras(full))
    # A pairs dataset's files (pairs.py) go, so the folder holds one format and nothing stale beside it.
    stale = [f"{s}.idx" for s in (*SPLITS, "length")] + ["length.bin"]
    write_files(out_dir, contents, stale)
    return full


def dataset_extras(meta: dict) -> dict[str, Callable[[BinaryIO], object]]:
    """The files every dataset format writes beside its token files: tokenizer.tiktoken (bpe) and meta.json, last."""
    extras: dict[str, Callable[[BinaryIO], object]] = {}
    if meta["tokenizer"]["kind"] == "bpe":
        extras[BPE_RANKS_FILE] = lambda f: f.write(meta["tokenizer"]["ranks"].encode("utf-8"))
    extras[META_FILE] = lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return extras


def write_files(out_dir: str | Path, contents: dict[str, Callable[[BinaryIO], object]], stale: Iterable[str] = ()) -> None:
    """Replace a dataset's files in out_dir: each written to a fsynced temp file first (a failure there changes
    nothing), then meta.json and the `stale` files removed, then each moved into place in order, meta.json last,
    so a crash never leaves a meta.json that describes other files. tokenizer.tiktoken is stale unless written."""
    out_dir = Path(out_dir)
    if list(contents)[-1] != META_FILE:
        raise ValueError(f"{META_FILE} must be the last file written")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass --out DIR to write elsewhere")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [n for n in (*stale, BPE_RANKS_FILE) if n not in contents]
    tmp: dict[str, str] = {}
    try:
        for name, write in contents.items():
            tmp[name] = write_temp(out_dir, name, write)
        (out_dir / META_FILE).unlink(missing_ok=True)
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
        for name in contents:
            os.replace(tmp.pop(name), out_dir / name)
    finally:
        for path in tmp.values():
            Path(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# 3. Sources
# ---------------------------------------------------------------------------------------------

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 30


@dataclass
class Source:
    name: str  # used for the default output dir, data/<name>_<tokenizer>
    label: str  # human-readable, stored in meta.json
    path: str  # the file or folder read
    text: str
    sha256: str  # of the corpus bytes (for a folder: of the concatenation that was tokenized)
    nbytes: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode_utf8(data: bytes, path: Path, offset: int = 0, first_line: int = 1) -> str:
    """`data` as text; `offset` and `first_line` say where data starts in the file, so an error names the file's
    byte and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise UserError(
            f"{path} is not UTF-8 text (bad byte {data[e.start:e.start + 1]!r} at byte offset {offset + e.start}) on "
            f"line {line}; convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _json_type(value) -> str:
    """JSON's name for a parsed value's type, for messages about a file the user wrote."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "object", list: "array", str: "string"}.get(type(value), "number")


def parse_jsonl_line(line: str, path: Path, lineno: int, example: str) -> dict:
    """One line of a JSON Lines file as an object; `example` shows the expected shape in the error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); write one object a line, e.g. {example}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} line {lineno} is a JSON {_json_type(obj)}, not an object; write one object a line, e.g. {example}")
    return obj


def jsonl_string(obj: dict, key: str, path: Path, lineno: int, example: str) -> str:
    if key not in obj:
        keys = ", ".join(map(json.dumps, obj)) or "none"
        raise UserError(f'{path} line {lineno} has no "{key}" key (it has: {keys}); each line needs {example}')
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f'{path} line {lineno}: "{key}" is a JSON {_json_type(value)}, not a string; each line needs {example}')
    return value


def read_jsonl(data: bytes, path: Path, example: str) -> list[tuple[int, dict]]:
    """The objects of a JSON Lines file's bytes with their line numbers (from 1), blank lines skipped."""
    text = _decode_utf8(data, path).removeprefix("\ufeff")  # a BOM would make line 1 invalid JSON
    return [(n, parse_jsonl_line(line, path, n, example)) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def shakespeare_cache_path(data_root: Path = DATA_ROOT) -> Path:
    return Path(data_root) / "shakespeare" / "input.txt"


def _shakespeare(input_path, data_root: Path, log: Log) -> Source:
    """The tiny-Shakespeare corpus: from --input, else the cache in data/shakespeare/, else downloaded once."""
    if input_path is not None:
        path = Path(input_path).expanduser()
        if not path.is_file():
            raise UserError(f"--input {path} is not a file; pass the path of a local copy of tiny-Shakespeare's input.txt")
        data = path.read_bytes()
        if _sha256(data) != SHAKESPEARE_SHA256:
            raise UserError(
                f"{path} is not the tiny-Shakespeare corpus (sha256 {_sha256(data)[:16]}..., expected {SHAKESPEARE_SHA256[:16]}...); "
                f"to prepare this text anyway pass it as the source: `minigpt prepare {path}`"
            )
    else:
        path = shakespeare_cache_path(data_root)
        data = path.read_bytes() if path.is_file() else None
        if data is not None and _sha256(data) != SHAKESPEARE_SHA256:
            log(f"{path} does not match the expected sha256; downloading it again")
            data = None
        if data is None:
            log(f"downloading tiny-Shakespeare from {SHAKESPEARE_URL}")
            try:
                data = _download(SHAKESPEARE_URL)
            except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and timeouts are OSErrors
                reason = getattr(e, "reason", None) or e
                raise UserError(f"could not download the tiny-Shakespeare corpus ({reason}); pass a local copy with --input PATH") from None
            if _sha256(data) != SHAKESPEARE_SHA256:
                raise UserError(
                    f"the downloaded tiny-Shakespeare corpus has sha256 {_sha256(data)[:16]}..., expected {SHAKESPEARE_SHA256[:16]}...; "
                    "pass a verified local copy with --input PATH"
                )
            atomic_write(path, lambda f: f.write(data))
            log(f"saved the corpus to {path}")
    return Source("shakespeare", f"shakespeare (tiny-Shakespeare, {SHAKESPEARE_URL})", str(path.resolve()),
                  data.decode("utf-8"), SHAKESPEARE_SHA256, len(data))


JSONL_TEXT_EXAMPLE = '{"text": "..."}'


def _local(source: str) -> Source:
    """A .txt file, a folder whose *.txt files are concatenated in sorted order, or a .jsonl file of
    {"text": ...} documents joined by newlines (JSONL of source/target pairs goes to pairs.py instead)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        data = path.read_bytes()
        text = "\n".join(jsonl_string(obj, "text", path, n, JSONL_TEXT_EXAMPLE) for n, obj in read_jsonl(data, path, JSONL_TEXT_EXAMPLE))
        name = path.stem
    elif path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no .txt files; put the text in *.txt files there, or pass one file")
        parts = []
        for f in files:
            t = _decode_utf8(f.read_bytes(), f)
            parts.append(t if not t or t.endswith("\n") else t + "\n")  # keep files from running into each other
        text = "".join(parts)
        data = text.encode("utf-8")
        name = path.resolve().name
    elif path.is_file():
        data = path.read_bytes()
        text = _decode_utf8(data, path)
        name = path.stem
    else:
        raise UserError(
            f"source {source!r} is not 'shakespeare' and no such file or folder exists; pass 'shakespeare', "
            "'task:NAME', a .txt file, a folder of .txt files, or a .tsv or .jsonl file"
        )
    if not text.strip():
        raise UserError(f"{path} holds no text (it is empty or whitespace only); pass a file with some text in it")
    name = re.sub(r"[^\w.-]+", "_", name).strip("._") or "data"
    return Source(name, str(path.resolve()), str(path.resolve()), text, _sha256(data), len(data))


def read_source(source: str, input_path=None, data_root: Path = DATA_ROOT, log: Log = _stderr) -> Source:
    if source == "shakespeare":
        return _shakespeare(input_path, Path(data_root), log)
    if input_path is not None:
        raise UserError("--input only applies to 'shakespeare' and task:speaker / task:modernize; pass your file or folder as SOURCE instead")
    return _local(source)


# ---------------------------------------------------------------------------------------------
# 4. prepare: source -> train/val split -> tokenize -> write
# ---------------------------------------------------------------------------------------------

# A chunk boundary is safe after a "\n" that sits between two non-whitespace characters: no pre-tokenizer
# piece of the GPT-2 or rustbpe regexes spans it, and the lookahead `\s+(?!\S)` sees the same thing on both
# sides of the cut, so encoding the chunks separately gives exactly the tokens of the whole text.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def split_chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars)
        if m is None:
            break
        chunks.append(text[start:m.end()])
        start = m.end()
    chunks.append(text[start:])
    return chunks


def split_train_val(text: str, val_fraction: float) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters is train, the rest val, cut just after the nearest newline.

    Fixed (no shuffling, no seed), so validation numbers are comparable across runs.
    """
    n = int(len(text) * (1 - val_fraction))
    after, before = text.find("\n", n), text.rfind("\n", 0, n)
    candidates = [i + 1 for i in (after, before) if i != -1 and 0 < i + 1 < len(text)]
    cut = min(candidates, key=lambda c: abs(c - n)) if candidates else n
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise UserError(
            f"the text ({len(text)} characters) is too short to split with val_fraction={val_fraction}; "
            "use more text or a different --val-fraction"
        )
    return train, val


class _Progress:
    """A one-line progress bar on stderr: percent, MB/s, ETA."""

    def __init__(self, total_chars: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total_chars, label, enabled
        self.done, self.t0 = 0, time.perf_counter()

    def update(self, chars: int) -> None:
        self.done += chars
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate else 0.0
        sys.stderr.write(f"\r{self.label}: {100 * self.done / self.total:5.1f}%  {rate / 1e6:6.1f} MB/s  ETA {eta:4.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def encode_text(tok: Tokenizer, text: str, chunk_chars: int = CHUNK_CHARS, progress: bool = False, label: str = "encoding") -> np.ndarray:
    """Encode a whole corpus to an int64 array; tiktoken runs ~1 MB chunks on all cores."""
    if isinstance(tok, CharTokenizer):
        return tok.encode_array(text)
    if not isinstance(tok, TiktokenTokenizer):
        return np.asarray(tok.encode(text), dtype=np.int64)
    threads = os.cpu_count() or 1
    chunks = split_chunks(text, chunk_chars)
    bar = _Progress(len(text), label, progress and len(text) > PROGRESS_MIN_CHARS)
    parts = []
    for g in range(0, len(chunks), 2 * threads):
        group = chunks[g:g + 2 * threads]
        parts.extend(np.asarray(ids, dtype=np.int64) for ids in tok.encoding.encode_ordinary_batch(group, num_threads=threads))
        bar.update(sum(map(len, group)))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check_bpe_vocab_size(vocab_size) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 256 <= vocab_size <= 1 << 31:
        raise UserError(
            f"--vocab-size {vocab_size} is not valid for a byte-level BPE: it must be an integer >= 256 "
            f"(the byte alphabet); try {DEFAULT_BPE_VOCAB_SIZE}"
        )


def _check_request(tokenizer: str, vocab_size, val_fraction, given: Tokenizer | None = None) -> tuple[str, int | None]:
    """The tokenizer kind and the bpe vocabulary size asked for. `given`: the tokenizer --tokenizer PATH named."""
    kind = tokenizer.lower() if isinstance(tokenizer, str) else tokenizer
    if given is not None:
        kind = given.spec["kind"]
        if vocab_size is not None:
            raise UserError(f"--vocab-size applies only to --tokenizer bpe (the tokenizer from {tokenizer} has its own "
                            "vocabulary); drop it")
    elif kind not in TOKENIZER_KINDS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZER_KINDS)}, "
                        "or (for a text corpus) a minigpt run folder, a checkpoint .pt file or a Hugging Face model folder")
    elif kind == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
        _check_bpe_vocab_size(vocab_size)
    elif vocab_size is not None:
        raise UserError(f"--vocab-size applies only to --tokenizer bpe (the {kind} vocabulary is fixed); drop it or use bpe")
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}; e.g. 0.1")
    return kind, vocab_size


def is_tokenizer_path(tokenizer) -> bool:
    """Whether --tokenizer names a path (a run, a checkpoint, a HF folder) rather than a kind (char, gpt2, bpe)."""
    if isinstance(tokenizer, os.PathLike):
        return True
    return (isinstance(tokenizer, str) and tokenizer.lower() not in TOKENIZER_KINDS
            and (os.sep in tokenizer or "/" in tokenizer or tokenizer.endswith(".pt") or Path(tokenizer).expanduser().exists()))


def tokenizer_from_path(path: str | Path) -> Tokenizer:
    """--tokenizer PATH: the tokenizer a minigpt run was trained with (its folder, or one of its .pt checkpoints:
    the spec stored in the checkpoint), or a Hugging Face model or tokenizer folder's (config.json, tokenizer.json
    or tokenizer_config.json, and no ckpt.pt), so that a corpus can be prepared for fine-tuning a run or an
    imported model with the very same ids."""
    p = Path(path).expanduser()
    hf_files = ("config.json", "tokenizer.json", "tokenizer_config.json")
    if p.is_dir() and any((p / name).is_file() for name in hf_files) and not (p / "ckpt.pt").exists():
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8")) if (p / "config.json").is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{p / 'config.json'} is unreadable ({e}); copy it again from the model's repository") from None
        from interop.hf_tokenizer import tokenizer_from_hf_folder  # the `tokenizers` library, only for this

        return tokenizer_from_hf_folder(p, config if isinstance(config, dict) else {})
    if (p.is_file() and p.suffix == ".pt") or (p.is_dir() and (p / "ckpt.pt").is_file()):
        from checkpoint import load_checkpoint  # torch, only for this

        state = load_checkpoint(p)
        spec = state.get("tokenizer") if isinstance(state, dict) else None
        if not isinstance(spec, dict):
            raise UserError(f"checkpoint {p} holds no tokenizer spec; pass the run's dataset tokenizer (char, gpt2, bpe) instead")
        return load_tokenizer(spec)
    if not p.exists():
        raise UserError(f"--tokenizer {path}: no such file or folder; pass char, gpt2, bpe, a minigpt run folder, "
                        "a checkpoint .pt file or a Hugging Face model folder")
    raise UserError(f"--tokenizer {path} is neither a minigpt run (no ckpt.pt), a checkpoint .pt file, nor a "
                    "Hugging Face model folder (no config.json or tokenizer.json)")


def tokenizer_sha256(spec: dict) -> str:
    """A tokenizer's identity, for meta.json and the reuse check: the sha256 of its spec as canonical JSON."""
    return _sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def _open_token_splits(out_dir: Path, meta: dict) -> None:
    for split in SPLITS:
        open_split(out_dir, split, meta)


def _reusable(out_dir: Path, request: dict, force: bool, log: Log, verify: Callable[[Path, dict], object] = _open_token_splits) -> bool:
    """True if out_dir already holds this exact dataset; raise if it holds another one (unless force).

    `verify(out_dir, meta)` raises a UserError when the files on disk do not match the meta (then they are rewritten).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass --out DIR to write elsewhere")
    if not (out_dir / META_FILE).exists():
        return False
    try:
        meta = read_meta(out_dir)
    except UserError as e:
        if force:
            return False
        raise UserError(f"{out_dir} holds a dataset this minigpt cannot read ({e}); pass --force to overwrite or --out DIR to write elsewhere") from None
    current = {"kind": "tokens", **meta}  # token-stream datasets have no "kind": the format predates pairs
    diffs = [f"{k} {current.get(k)!r} -> {v!r}" for k, v in {"kind": "tokens", **request}.items() if current.get(k) != v]
    if force:
        log(f"overwriting {out_dir} (--force)")
        return False
    if diffs:
        raise UserError(
            f"{out_dir} was prepared from a different source or tokenizer ({'; '.join(diffs)}); "
            "pass --force to overwrite or --out DIR to write elsewhere"
        )
    try:
        verify(out_dir, meta)
    except UserError:
        log(f"{out_dir} is incomplete; writing it again")
        return False
    return True


def prepare(
    source: str,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    out: str | Path | None = None,
    input_path: str | Path | None = None,
    val_fraction: float = 0.1,
    force: bool = False,
    data_root: Path = DATA_ROOT,
    progress: bool = True,
    log: Log | None = None,
    examples: int | None = None,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Tokenize a corpus into <out>/{train.bin,val.bin,meta.json}; return the output folder.

    A sequence-to-sequence source ('task:NAME', a .tsv file, a .jsonl file of source/target objects) goes to
    pairs.prepare_pairs, which alone uses `examples` (task: only) and `seed` (shuffling and generation).

    source: 'shakespeare' (downloaded once to data/shakespeare/input.txt, or --input PATH), or a path to a
    .txt file, a folder of .txt files, or a .jsonl file of {"text": ...} documents. tokenizer: 'char', 'gpt2' or 'bpe' (vocab_size, default 1024, is
    only for bpe; the bpe is trained on the train split only), or a path (tokenizer_from_path): a minigpt run or
    checkpoint, or a Hugging Face model folder, whose tokenizer is used as it is. out defaults to
    data/<source>_<tokenizer kind>.
    An existing output from the same corpus bytes and the same request is reused; a different one is refused
    unless force. log: where messages go (default: stderr); pass `lambda s: None` for silence.
    """
    log = log or _stderr
    source = os.fspath(source)
    if source.startswith("task:") or Path(source).suffix in (".tsv", ".jsonl"):
        import pairs  # here: pairs imports this module, and a token-stream run never needs it

        if pairs.is_pairs_source(source):
            return pairs.prepare_pairs(source, tokenizer, vocab_size, out, input_path, val_fraction, force, data_root,
                                       log, examples=examples, seed=seed)
    if examples is not None:
        raise UserError(EXAMPLES_ONLY_FOR_TASKS)
    t0 = time.perf_counter()
    given = tokenizer_from_path(tokenizer) if is_tokenizer_path(tokenizer) else None
    kind, bpe_vocab_size = _check_request(tokenizer, vocab_size, val_fraction, given)
    src = read_source(source, input_path, data_root, log)
    out_dir = Path(out).expanduser() if out is not None else Path(data_root) / f"{src.name}_{kind}"

    request = {"format_version": FORMAT_VERSION, "source_sha256": src.sha256, "tokenizer_kind": kind,
               "val_fraction": float(val_fraction), "bpe_vocab_size": bpe_vocab_size}
    if given is not None:  # a tokenizer from a path is only the same one if its spec is
        request["tokenizer_sha256"] = tokenizer_sha256(given.spec)
    if _reusable(out_dir, request, force, log):
        log(f"reusing {out_dir} (already prepared from the same source and tokenizer)")
        return out_dir

    train_text, val_text = split_train_val(src.text, val_fraction)
    if given is not None:
        tok: Tokenizer = given
    elif kind == "char":
        tok = CharTokenizer.from_text(src.text)  # the whole corpus, so val has no unknown characters
    elif kind == "gpt2":
        tok = gpt2_tokenizer()
    else:
        log(f"training a {bpe_vocab_size}-token BPE on {len(train_text):,} characters with rustbpe")
        tok = train_bpe(split_chunks(train_text), bpe_vocab_size, log)
    train_ids = encode_text(tok, train_text, progress=progress, label="encoding train")
    val_ids = encode_text(tok, val_text, progress=progress, label="encoding val")
    if train_ids.size < 2 or val_ids.size < 2:
        raise UserError(f"the text is too short: {train_ids.size} train and {val_ids.size} val tokens; use more text")

    meta = {
        "source": src.label,
        "source_path": src.path,
        "source_sha256": src.sha256,
        "source_bytes": src.nbytes,
        "val_fraction": float(val_fraction),
        "tokenizer_kind": kind,
        **({"bpe_vocab_size": bpe_vocab_size} if bpe_vocab_size is not None else {}),
        **({"tokenizer_from": str(Path(tokenizer).expanduser().resolve())} if given is not None else {}),
        "tokenizer_sha256": tokenizer_sha256(tok.spec),
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eot_token,
        "tokenizer": tok.spec,
    }
    meta = write_dataset(out_dir, train_ids, val_ids, meta)
    log(
        f"wrote {out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens, "
        f"{kind} vocab {meta['vocab_size']:,}, {meta['dtype']} ({time.perf_counter() - t0:.1f}s)"
    )
    return out_dir


if __name__ == "__main__":
    from cli.main import app

    app(["prepare", *sys.argv[1:]], prog_name="prepare_data.py")
