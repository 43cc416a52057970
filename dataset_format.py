"""The on-disk format of a token-stream dataset, the only place that knows it:

  <dir>/train.bin, <dir>/val.bin   raw little-endian token ids, dtype uint16 if vocab_size <= 65536 else uint32
  <dir>/meta.json                  format_version, tokenizer spec, vocab_size, dtype, token counts, source, ...
  <dir>/tokenizer.tiktoken         (bpe only) the ranks in tiktoken's format; the same text is in the spec

Written by DatasetWriter as it is made (any size, in bounded memory), read with memory maps (open_split).
pairs.py keeps its own format beside this one and shares the files' writing (write_files).
"""

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from errors import UserError

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


def check_meta(meta, data_dir: Path) -> dict:
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
    return check_meta(meta, data_dir)


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
    """Write a dataset whose ids are in memory (DatasetWriter for one made piece by piece); return the full meta.

    `meta` must hold at least the tokenizer spec, vocab_size, source, source_sha256, val_fraction and
    tokenizer_kind; DatasetWriter.finish adds the rest.
    """
    arrays = []
    for split, ids in zip(SPLITS, (train_ids, val_ids)):
        a = np.asarray(ids)
        if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{split} ids must be a 1-D integer array")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= meta["vocab_size"]):
            raise ValueError(f"{split} ids must lie in [0, {meta['vocab_size']}), got [{int(a.min())}, {int(a.max())}]")
        arrays.append(a)
    with DatasetWriter(out_dir, meta["vocab_size"]) as writer:
        for split, a in zip(SPLITS, arrays):
            writer.append(split, a)
        return writer.finish(meta)


class DatasetWriter:
    """A token dataset written as it is made: each split's ids appended to a temporary file in out_dir, moved
    into place by finish() (meta.json last), or removed by close() without it: an interrupted or failed prepare
    leaves the folder as it was. Use it as a context manager."""

    def __init__(self, out_dir: str | Path, vocab_size: int):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"{self.out_dir} exists and is not a folder; pass --out DIR to write elsewhere")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.dtype_name = dtype_name_for_vocab(vocab_size)
        self.dtype = DTYPES[self.dtype_name]
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.max_id: dict[str, int | None] = dict.fromkeys(SPLITS)
        self.document_start = dict.fromkeys(SPLITS, 0)  # where each split's last document began, in tokens
        self.tmp, self.files = {}, {}
        for split in SPLITS:
            fd, self.tmp[split] = tempfile.mkstemp(dir=self.out_dir, prefix=f".{split}.bin.", suffix=".tmp")
            self.files[split] = os.fdopen(fd, "w+b")

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, split: str, ids: np.ndarray) -> None:
        if not ids.size:
            return
        top = int(ids.max())
        if top >= self.vocab_size:
            raise ValueError(f"{split} ids must lie below vocab_size {self.vocab_size}, got {top}")
        self.files[split].write(np.ascontiguousarray(ids, dtype=self.dtype).data)
        self.tokens[split] += ids.size
        self.max_id[split] = max(top, self.max_id[split] or 0)

    def start_document(self, split: str, offset: int = 0) -> None:
        """A document starts in `split` `offset` ids past those appended so far."""
        self.document_start[split] = self.tokens[split] + offset

    def move_last_document(self, source: str, to: str) -> None:
        """Move `source`'s last document (since its start_document) to the end of `to`: so that a corpus of a few
        documents, whose seeded draw gave one split none, still has some in each."""
        start = self.document_start[source]
        f, item = self.files[source], self.dtype.itemsize
        f.flush()
        f.seek(start * item)
        self.start_document(to)
        while block := f.read(1 << 24):
            self.append(to, np.frombuffer(block, dtype=self.dtype))
        f.seek(start * item)
        f.truncate()
        self.tokens[source] = start
        self.max_id[source] = self._scan_max(source)

    def _scan_max(self, split: str) -> int | None:
        f, top = self.files[split], None
        f.seek(0)
        while block := f.read(1 << 24):
            top = max(int(np.frombuffer(block, dtype=self.dtype).max()), top or 0)
        return top

    def finish(self, meta: dict) -> dict:
        """Move the files into place with meta.json (`meta` plus format_version, dtype, the token counts and each
        split's largest id, max_token_id: None for an empty split); return the full meta."""
        full = {
            "format_version": FORMAT_VERSION,
            **{k: v for k, v in meta.items() if k != "tokenizer"},
            "dtype": self.dtype_name,
            "train_tokens": self.tokens["train"],
            "val_tokens": self.tokens["val"],
            # a run trusts this record instead of reading a large split whole (check_token_ids)
            "max_token_id": dict(self.max_id),
            "tokenizer": meta["tokenizer"],  # last: for bpe it holds the whole ranks text
        }
        if full["vocab_size"] != self.vocab_size:
            raise ValueError(f"meta's vocab_size {full['vocab_size']} is not the writer's {self.vocab_size}")
        check_meta(full, self.out_dir)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        written = {f"{s}.bin": self.tmp[s] for s in SPLITS}
        # A pairs dataset's files (pairs.py) go, so the folder holds one format and nothing stale beside it.
        stale = [f"{s}.idx" for s in (*SPLITS, "length")] + ["length.bin"]
        write_files(self.out_dir, dataset_extras(full), stale, written)
        self.tmp.clear()
        return full

    def close(self) -> None:
        """Remove what finish() did not move into place."""
        for f in self.files.values():
            f.close()
        for path in self.tmp.values():
            Path(path).unlink(missing_ok=True)
        self.tmp.clear()


def dataset_extras(meta: dict) -> dict[str, Callable[[BinaryIO], object]]:
    """The files every dataset format writes beside its token files: tokenizer.tiktoken (bpe) and meta.json, last."""
    extras: dict[str, Callable[[BinaryIO], object]] = {}
    if meta["tokenizer"]["kind"] == "bpe":
        extras[BPE_RANKS_FILE] = lambda f: f.write(meta["tokenizer"]["ranks"].encode("utf-8"))
    extras[META_FILE] = lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return extras


def write_files(out_dir: str | Path, contents: dict[str, Callable[[BinaryIO], object]], stale: Iterable[str] = (),
                written: dict[str, str] | None = None) -> None:
    """Replace a dataset's files in out_dir: each written to a fsynced temp file first (a failure there changes
    nothing), then meta.json and the `stale` files removed, then each moved into place in order, meta.json last,
    so a crash never leaves a meta.json that describes other files. tokenizer.tiktoken is stale unless written.
    `written`: files already written to temp files in out_dir ({name: temp path}), moved in first."""
    out_dir = Path(out_dir)
    if list(contents)[-1] != META_FILE:
        raise ValueError(f"{META_FILE} must be the last file written")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass --out DIR to write elsewhere")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [n for n in (*stale, BPE_RANKS_FILE) if n not in contents and n not in (written or {})]
    tmp: dict[str, str] = dict(written or {})
    try:
        for name, write in contents.items():
            tmp[name] = write_temp(out_dir, name, write)
        (out_dir / META_FILE).unlink(missing_ok=True)
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
        for name in list(tmp):
            os.replace(tmp.pop(name), out_dir / name)
    finally:
        for path in tmp.values():
            Path(path).unlink(missing_ok=True)
