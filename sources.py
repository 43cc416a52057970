"""What `minigpt prepare` reads: a corpus of documents, cut into tasks that worker processes read and encode.

A corpus is one of
  'shakespeare'        tiny-Shakespeare, downloaded once (checksummed) or from --input PATH: one document
  a .txt file          one document
  a folder             one document per *.txt file in it (sorted by name)
  a .jsonl file        one document per line, an object whose `text` (--text-key) is a string
  a .parquet file      one document per row, its `text` (--text-key) column; or a folder of .parquet files
  hf:NAME[:CONFIG]     a Hugging Face dataset's train split, streamed with `datasets` (`text` column)
(.tsv files, task:NAME and .jsonl files of source/target objects are pairs datasets: pairs.py.)

A task is a picklable description of up to TASK_BYTES of text (a span of a file, some lines of a .jsonl, a
parquet row group, a batch of a streamed dataset's texts); `task.texts()`, run in a worker, yields the text as
(piece, ends_document) pairs. A document larger than a task is cut only at safe cuts (tokenization.SAFE_CUT_BYTES),
so its pieces encode to exactly its tokens; where the tokenizer cannot be cut (hf), a document is one piece.
Only the main process lists tasks, and only workers read text, so memory stays bounded by the tasks in flight.
"""

import hashlib
import http.client
import json
import logging
import os
import re
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import Log, UserError, log_to_stderr
from tokenization import SAFE_CUT_BYTES

DATA_ROOT = Path("data")  # relative to where minigpt runs, like the data.dir paths in config/*.toml

TASK_BYTES = 4 << 20  # text a worker reads and encodes at a time: ~0.3 s of tiktoken, a few MB of ids back
SCAN_BYTES = 1 << 16  # read at a time when looking for a safe cut
MAX_CUT_SCAN = 64 << 20  # how far past a task's end to look for a safe cut before taking the rest whole
HASH_BLOCK = 8 << 20

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 30
DEFAULT_TEXT_KEY = "text"
HF_PREFIX = "hf:"
JSONL_TEXT_EXAMPLE = '{"text": "..."}'
DATA_EXTRA = "pip install 'minigpt[data]'"


# ---------------------------------------------------------------------------------------------
# Reading user files
# ---------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _count_lines_before(path: str | Path, offset: int) -> int:
    """1 + the newlines in a file's first `offset` bytes: the line number at that byte, for an error message."""
    lines, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(HASH_BLOCK, offset - done))
            if not block:
                break
            lines, done = lines + block.count(b"\n"), done + len(block)
    return lines


def decode_utf8(data: bytes, path: str | Path, offset: int = 0, first_line: int | None = None) -> str:
    """`data` as text; `offset` says where data starts in the file (and `first_line` its line, counted from the
    file when not given), so an error names the file's byte and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = first_line if first_line is not None else _count_lines_before(path, offset)
        line = start + data.count(b"\n", 0, e.start)
        raise UserError(
            f"{path} is not UTF-8 text (bad byte {data[e.start:e.start + 1]!r} at byte offset {offset + e.start}) on "
            f"line {line}; convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _json_type(value) -> str:
    """JSON's name for a parsed value's type, for messages about a file the user wrote."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "object", list: "array", str: "string"}.get(type(value), "number")


def parse_jsonl_line(line: str | bytes, path: Path, lineno: int, example: str) -> dict:
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
    text = decode_utf8(data, path, first_line=1).removeprefix("\ufeff")  # a BOM would make line 1 invalid JSON
    return [(n, parse_jsonl_line(line, path, n, example)) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def text_example(key: str) -> str:
    return JSONL_TEXT_EXAMPLE.replace('"text"', json.dumps(key))


# ---------------------------------------------------------------------------------------------
# Tasks: what one worker reads at a time
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of a text file; `ends_document` when end is the end of its document."""
    path: str
    start: int
    end: int
    ends_document: bool


@dataclass(frozen=True)
class FileSpans:
    spans: tuple[Span, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.end - s.start for s in self.spans)

    def texts(self) -> Iterator[tuple[str, bool]]:
        for s in self.spans:
            with open(s.path, "rb") as f:
                f.seek(s.start)
                data = f.read(s.end - s.start)
            yield decode_utf8(data, s.path, s.start), s.ends_document


@dataclass(frozen=True)
class JsonlLines:
    """The lines in bytes [start, end) of a .jsonl file (start and end at line starts), a document each."""
    path: str
    start: int
    end: int
    key: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def texts(self) -> Iterator[tuple[str, bool]]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        text = decode_utf8(data, self.path, self.start)
        if self.start == 0:
            text = text.removeprefix("\ufeff")  # a BOM would make line 1 invalid JSON
        for n, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            value = obj.get(self.key) if isinstance(obj, dict) else None
            if not isinstance(value, str):  # the error names the line: counted from the file's start, only now
                self._raise(line, _count_lines_before(self.path, self.start) + n)
            yield value, True

    def _raise(self, line: str, lineno: int):
        path, example = Path(self.path), text_example(self.key)
        jsonl_string(parse_jsonl_line(line, path, lineno, example), self.key, path, lineno, example)


@dataclass(frozen=True)
class ParquetRowGroup:
    """One row group of a parquet file's text column (its writer chose the size), a document a row."""
    path: str
    row_group: int
    column: str
    nbytes: int

    def texts(self) -> Iterator[tuple[str, bool]]:
        pq = import_pyarrow_parquet()
        column = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=[self.column]).column(0)
        for i, text in enumerate(t for chunk in column.chunks for t in chunk.to_pylist()):
            if not isinstance(text, str):
                what = "null" if text is None else type(text).__name__
                raise UserError(f"{self.path} row group {self.row_group}, row {i}: column {self.column!r} holds "
                                f"{what}, not text; pass --text-key with a text column")
            yield text, True


@dataclass(frozen=True)
class Texts:
    """Documents already read (a streamed dataset's, read by the main process)."""
    documents: tuple[str, ...]
    nbytes: int

    def texts(self) -> Iterator[tuple[str, bool]]:
        for t in self.documents:
            yield t, True


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """A source to prepare. A one-document corpus (`text_file`) is split by its text (split_text) and read as spans
    of that file; any other lists its tasks in order with `tasks(cut)`, where `cut` says whether a document may be
    cut into pieces (at safe cuts), and is split by whole documents."""
    name: str  # the default output folder is data/<name>_<tokenizer>
    label: str  # human-readable, stored in meta.json
    path: str  # the file or folder read (or hf:NAME)
    sha256: str  # the corpus's identity: its bytes' hash (hf: of its name), for reusing a prepared folder
    nbytes: int | None  # bytes to read, for the progress bar (None: unknown, a streamed dataset)
    text_file: str | None = None  # a one-document corpus's file
    tasks: Callable[[bool], Iterator] | None = field(default=None, repr=False)  # any other corpus's tasks

    @property
    def one_document(self) -> bool:
        return self.text_file is not None


def _file_sha256(paths: list[Path], names: bool) -> str:
    """The sha256 of a file's bytes; of several files', each preceded by its name and size when `names`."""
    h = hashlib.sha256()
    for p in paths:
        if names:
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode("utf-8"))
        with open(p, "rb") as f:
            while block := f.read(HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def safe_cut_at_or_after(path: str | Path, pos: int, end: int) -> int:
    """The first safe cut in a file at or after byte `pos` (and before `end`), or `end` if there is none within
    MAX_CUT_SCAN bytes: then the rest of the document is one piece."""
    with open(path, "rb") as f:
        start = max(pos - 1, 0)  # a cut after "\n" at pos needs the byte before it
        while start < min(end, pos + MAX_CUT_SCAN):
            f.seek(start)
            block = f.read(min(SCAN_BYTES + 2, end - start))
            m = SAFE_CUT_BYTES.search(block)
            if m is not None and start + m.end() < end:
                return max(start + m.end(), pos)
            if len(block) < SCAN_BYTES + 2:
                break
            start += SCAN_BYTES
    return end


def file_spans(path: str | Path, start: int, end: int, cut: bool, ends_document: bool) -> Iterator[Span]:
    """Bytes [start, end) of a file as spans of about TASK_BYTES cut at safe cuts (one span if not `cut`)."""
    while end - start > TASK_BYTES and cut:
        at = safe_cut_at_or_after(path, start + TASK_BYTES, end)
        if at >= end:
            break
        yield Span(str(path), start, at, False)
        start = at
    yield Span(str(path), start, end, ends_document)


def group_spans(spans: Iterator[Span]) -> Iterator[FileSpans]:
    """Spans in tasks of about TASK_BYTES: many small files in one task, a large one's pieces one each."""
    group, size = [], 0
    for s in spans:
        if group and size + (s.end - s.start) > TASK_BYTES:
            yield FileSpans(tuple(group))
            group, size = [], 0
        group.append(s)
        size += s.end - s.start
    if group:
        yield FileSpans(tuple(group))


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "data"


def _text_file(path: Path, name: str, label: str, sha256: str | None = None) -> Corpus:
    size = path.stat().st_size
    if size == 0 or not _has_text(path):
        raise UserError(f"{path} holds no text (it is empty or whitespace only); pass a file with some text in it")
    return Corpus(name, label, str(path.resolve()), sha256 or _file_sha256([path], names=False), size,
                  text_file=str(path.resolve()))


def _has_text(path: Path) -> bool:
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            if block.strip():
                return True
    return False


def _folder(path: Path) -> Corpus:
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"folder {path} holds no .txt files; put the text in *.txt files there, or pass one file")
    name = _safe_name(path.resolve().name)
    if len(files) == 1:  # one document: split by text, like a .txt file
        return _text_file(files[0], name, str(path.resolve()), _file_sha256(files, names=True))
    sizes = [f.stat().st_size for f in files]

    def tasks(cut: bool):
        return group_spans(s for f, n in zip(files, sizes) for s in file_spans(f, 0, n, cut, True))

    return Corpus(name, str(path.resolve()), str(path.resolve()), _file_sha256(files, names=True), sum(sizes),
                  tasks=tasks)


def _jsonl(path: Path, key: str) -> Corpus:
    size = path.stat().st_size

    def tasks(cut: bool):
        start = 0
        with open(path, "rb") as f:
            while start < size:
                f.seek(start + TASK_BYTES)
                f.readline()  # on to the next line's start (or the end)
                end = min(f.tell(), size)
                yield JsonlLines(str(path), start, end, key)
                start = end

    return Corpus(_safe_name(path.stem), str(path.resolve()), str(path.resolve()), _file_sha256([path], names=False),
                  size, tasks=tasks)


def import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading .parquet files needs pyarrow, which is not installed: {DATA_EXTRA}") from None
    return pq


def _parquet(path: Path, key: str) -> Corpus:
    pq = import_pyarrow_parquet()
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.parquet") if p.is_file())
    groups = []
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except Exception as e:  # pyarrow's ArrowInvalid and OSError: not a parquet file
            raise UserError(f"{f} is not a readable parquet file ({str(e).splitlines()[0][:200]}); pass a .parquet file "
                            "written by pyarrow, pandas or datasets") from None
        columns = meta.schema_arrow.names
        if key not in columns:
            raise UserError(f"{f} has no column {key!r} (it has: {', '.join(columns) or 'none'}); pass --text-key "
                            "with the column that holds the text")
        groups += [ParquetRowGroup(str(f), i, key, meta.metadata.row_group(i).total_byte_size)
                   for i in range(meta.num_row_groups)]
    name = path.stem if path.is_file() else path.resolve().name
    return Corpus(_safe_name(name), str(path.resolve()), str(path.resolve()), _file_sha256(files, names=True),
                  sum(g.nbytes for g in groups), tasks=lambda cut: iter(groups))


def _hf_dataset(source: str, key: str) -> Corpus:
    spec = source[len(HF_PREFIX):]
    name, _, config = spec.partition(":")
    if not name:
        raise UserError(f"{source!r} names no dataset; write hf:NAME or hf:NAME:CONFIG, e.g. hf:roneneldan/TinyStories")
    try:
        import datasets
    except ImportError:
        raise UserError(f"hf: sources need the `datasets` library, which is not installed: {DATA_EXTRA}") from None
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would be lines of their own before our one
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        first = next(iter(stream), None)
    except Exception as e:  # no network, no such dataset, no such config: datasets raises many kinds
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"could not open the Hugging Face dataset {spec!r} ({reason}); it is streamed from the hub, "
                        "which needs the network: where there is none, download its .parquet files and pass their "
                        "folder") from None
    finally:
        hub_log.setLevel(level)
    if first is not None and key not in first:
        keys = ", ".join(map(str, first)) or "none"
        raise UserError(f"the dataset {spec!r} has no {key!r} column (it has: {keys}); pass --text-key COLUMN")

    def tasks(cut: bool):
        batch, size = [], 0
        for n, row in enumerate(stream):
            text = row.get(key)
            if not isinstance(text, str):
                raise UserError(f"the dataset {spec!r}, row {n}: {key!r} holds {type(text).__name__}, not text; "
                                "pass --text-key with a text column")
            batch.append(text)
            size += len(text)
            if size >= TASK_BYTES:
                yield Texts(tuple(batch), size)
                batch, size = [], 0
        if batch:
            yield Texts(tuple(batch), size)

    label = f"{source} (Hugging Face dataset, train split)"
    return Corpus(_safe_name(spec.replace("/", "_")), label, source, _sha256(source.encode("utf-8")), None, tasks=tasks)


def _download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def shakespeare_cache_path(data_root: Path = DATA_ROOT) -> Path:
    return Path(data_root) / "shakespeare" / "input.txt"


def shakespeare_file(input_path, data_root: Path, log: Log) -> Path:
    """The tiny-Shakespeare corpus's file: --input, else the cache in data/shakespeare/, else downloaded once."""
    from dataset_format import atomic_write

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
        return path
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
    return path


def read_corpus(source: str, input_path=None, data_root: Path = DATA_ROOT, log: Log = log_to_stderr,
                text_key: str | None = None) -> Corpus:
    """The corpus a `minigpt prepare SOURCE` names (see the module's docstring)."""
    key = DEFAULT_TEXT_KEY if text_key is None else text_key
    if not isinstance(key, str) or not key:
        raise UserError(f"--text-key must name a field or column, got {text_key!r}; e.g. --text-key text")
    if source == "shakespeare":
        path = shakespeare_file(input_path, Path(data_root), log)
        return _text_file(path, "shakespeare", f"shakespeare (tiny-Shakespeare, {SHAKESPEARE_URL})", SHAKESPEARE_SHA256)
    if input_path is not None:
        raise UserError("--input only applies to 'shakespeare' and task:speaker / task:modernize; pass your file or folder as SOURCE instead")
    if source.startswith(HF_PREFIX):
        return _hf_dataset(source, key)
    path = Path(source).expanduser()
    is_parquet = path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet")) and not any(path.glob("*.txt")))
    if text_key is not None and not (path.suffix in (".jsonl", ".parquet") or is_parquet):
        raise UserError(f"--text-key applies to .jsonl, .parquet and hf: sources, not {source}; drop it")
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl(path, key)
    if path.exists() and is_parquet:
        return _parquet(path, key)
    if path.is_dir():
        return _folder(path)
    if path.is_file():
        return _text_file(path, _safe_name(path.stem), str(path.resolve()))
    raise UserError(
        f"source {source!r} is not 'shakespeare' and no such file or folder exists; pass 'shakespeare', "
        "'task:NAME', 'hf:NAME', a .txt, .jsonl or .parquet file, a folder of .txt or .parquet files, or a .tsv file"
    )


# ---------------------------------------------------------------------------------------------
# Splitting one document by its text
# ---------------------------------------------------------------------------------------------


def _char_starts(block: bytes) -> np.ndarray:
    """Where characters start in UTF-8 bytes: every byte but a continuation byte (0b10xxxxxx)."""
    return (np.frombuffer(block, dtype=np.uint8) & 0xC0) != 0x80


def _chars_between(f, start: int, end: int) -> int:
    n = 0
    f.seek(start)
    while start < end:
        block = f.read(min(HASH_BLOCK, end - start))
        n += int(_char_starts(block).sum())
        start += len(block)
    return n


def _byte_of_char(f, index: int, block_chars: list[int], size: int) -> int:
    """The byte offset of character `index` (size: past the last), given the characters in each HASH_BLOCK block
    of the file: only the block that holds it is read again."""
    seen = 0
    for i, count in enumerate(block_chars):
        if seen + count > index:
            f.seek(i * HASH_BLOCK)
            return i * HASH_BLOCK + int(np.flatnonzero(_char_starts(f.read(HASH_BLOCK)))[index - seen])
        seen += count
    return size


def _newline_after(f, pos: int, size: int) -> int:
    f.seek(pos)
    while pos < size:
        block = f.read(SCAN_BYTES)
        i = block.find(b"\n")
        if i != -1:
            return pos + i
        pos += len(block)
    return -1


def _newline_before(f, pos: int) -> int:
    while pos > 0:
        start = max(pos - SCAN_BYTES, 0)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i != -1:
            return start + i
        pos = start
    return -1


def split_text(path: str | Path, val_fraction: float) -> int:
    """Where a one-document corpus splits: the first (1 - val_fraction) of its characters is train, the rest val,
    cut just after the nearest newline; read in blocks, so a file of any size. Returns the byte offset.

    Fixed (no shuffling, no seed), so validation numbers are comparable across runs and with nanoGPT's.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        block_chars = [int(_char_starts(block).sum()) for block in iter(lambda: f.read(HASH_BLOCK), b"")]
        n = int(sum(block_chars) * (1 - val_fraction))
        at = _byte_of_char(f, n, block_chars, size)
        candidates = [i + 1 for i in (_newline_after(f, at, size), _newline_before(f, at)) if i != -1 and 0 < i + 1 < size]
        if not candidates:
            return at
        return min(candidates, key=lambda c: _chars_between(f, min(c, at), max(c, at)))
