"""Data preparation, read top to bottom: a corpus (sources.py) -> its documents, read and tokenized on all cores
(tokenization.py) -> train and val ids, written as they come (dataset_format.py) -> a dataset folder.

    minigpt prepare shakespeare --tokenizer char      tiny-Shakespeare, char-level (nanoGPT's shakespeare_char)
    minigpt prepare path/to/docs --tokenizer gpt2     a folder of .txt documents (or .jsonl, .parquet, hf:NAME)

Memory stays bounded whatever the corpus's size: the main process lists tasks of a few MB (sources.TASK_BYTES),
at most two per worker are in flight, and ids go to disk as they come back. A one-document corpus keeps its last
`val_fraction` of text for validation (as nanoGPT does); a corpus of documents holds out whole documents, drawn
with a seed, each followed by the end-of-text token where the tokenizer has one (as nanoGPT's OpenWebText script
does). Source/target pairs (task:NAME, .tsv, .jsonl of pairs) have their own pipeline in pairs.py.
"""

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dataset_format import FORMAT_VERSION, META_FILE, SPLITS, DatasetWriter, open_split, read_meta
from errors import Log, UserError, log_to_stderr
from sources import DATA_ROOT, DEFAULT_TEXT_KEY, Corpus, file_spans, group_spans, read_corpus, split_text
from tokenization import (DEFAULT_BPE_VOCAB_SIZE, TOKENIZER_KINDS, CharTokenizer, Tokenizer,
                          check_bpe_vocab_size, encode_ids, encodes_in_pieces, gpt2_tokenizer, is_tokenizer_path,
                          load_tokenizer, split_chunks, tokenizer_from_path, tokenizer_sha256, train_bpe)

EXAMPLES_ONLY_FOR_TASKS = "--examples applies only to task: sources (it sets how many train pairs a task makes); drop it"
DEFAULT_SEED = 1337  # draws a corpus's val documents, shuffles pairs datasets, seeds generated tasks
DEFAULT_BPE_SAMPLE_BYTES = 100 << 20  # what rustbpe learns from: its time and memory must not grow with the corpus
IN_FLIGHT_PER_WORKER = 2  # tasks queued per worker: enough to keep it busy, few enough to bound memory
PROGRESS_MIN_BYTES = 4 << 20  # show progress only for corpora above ~4 MB
PROGRESS_LINE_S = 30.0  # off a terminal (a log file), a progress line this often


# ---------------------------------------------------------------------------------------------
# Workers: tasks run in order on N processes, at most a few in flight
# ---------------------------------------------------------------------------------------------

# A worker's tokenizer, built once by _start_worker (a process-pool initializer can only leave state in a global;
# with one worker, Workers sets it in this process).
_tokenizer: Tokenizer | None = None


def _start_worker(spec: dict | None) -> None:
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops the workers
    _tokenizer = load_tokenizer(spec) if spec is not None else None


def encode_task(task, eot: int | None, dtype: np.dtype) -> tuple[np.ndarray, list[int], list[bool]]:
    """A task's ids as `dtype` (the dataset's: half the bytes to send back for uint16), an `eot` after each
    document that ends in it (unless None), with each piece's number of ids and whether it ends a document."""
    parts, sizes, ends = [], [], []
    for text, ends_document in task.texts():
        ids = encode_ids(_tokenizer, text)
        parts.append(ids)
        with_eot = ends_document and eot is not None
        if with_eot:
            parts.append(np.array([eot], np.uint32))
        sizes.append(len(ids) + with_eot)
        ends.append(ends_document)
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint32)).astype(dtype), sizes, ends


def chars_task(task) -> tuple[list[str], list[bool]]:
    """The characters of each piece of a task (a char vocabulary's first pass), and whether it ends a document."""
    pieces = list(task.texts())
    return ["".join(set(text)) for text, _ in pieces], [ends for _, ends in pieces]


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C held back until the block ends (POSIX). A worker process started halfway when Ctrl-C ends this one
    finds its queues gone and prints a traceback; threads and processes started inside keep SIGINT blocked, so
    the pool's threads never take it from the main thread and the workers never see it: the main process alone
    stops them, cleanly."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Workers:
    """Runs tasks in order on `n` processes (or in this one, for n = 1), at most IN_FLIGHT_PER_WORKER each in
    flight, and gives their results in order. Leaving the `with` (done, an error, Ctrl-C) cancels what has not
    started and waits for what has (a task is a fraction of a second); a worker that dies is an error here."""

    def __init__(self, n: int, tokenizer: Tokenizer | None):
        global _tokenizer
        self.n, self.pool = n, None
        if n == 1:
            _tokenizer = tokenizer
        else:  # forkserver: a clean process per worker, and no fork of a parent that may hold threads
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            spec = tokenizer.spec if tokenizer is not None else None
            with sigint_deferred():  # the fork server, started here, and its children inherit the blocked SIGINT
                if method == "forkserver":
                    multiprocessing.forkserver.ensure_running()
                self.pool = ProcessPoolExecutor(n, multiprocessing.get_context(method), _start_worker, (spec,))

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable, plan: Iterable["Planned"], *args) -> Iterator[tuple["Planned", object]]:
        """(planned, fn(planned.task, *args)) for each planned task, in order."""
        if self.pool is None:
            yield from ((p, fn(p.task, *args)) for p in plan)
            return
        pending = deque()
        for p in plan:
            with sigint_deferred():  # a submit may start a worker process: never cut in half
                pending.append((p, self.pool.submit(fn, p.task, *args)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * self.n:
                yield self._next(pending)
        while pending:
            yield self._next(pending)

    @staticmethod
    def _next(pending: deque) -> tuple["Planned", object]:
        planned, future = pending.popleft()
        try:
            return planned, future.result()
        except BrokenProcessPool:
            raise UserError("a worker process of minigpt prepare died (out of memory?); try fewer --workers") from None


# ---------------------------------------------------------------------------------------------
# The plan: which tasks, in which order, for which split
# ---------------------------------------------------------------------------------------------


class Planned(NamedTuple):
    task: object  # a sources task: .texts() and .nbytes
    split: str | None  # "train" or "val" for a one-document corpus's spans; None: each document is drawn


def plan_tasks(corpus: Corpus, val_fraction: float, cut: bool) -> Iterator[Planned]:
    """A one-document corpus's train text then its val text; any other corpus's tasks, its documents drawn."""
    if not corpus.one_document:
        yield from (Planned(task, None) for task in corpus.tasks(cut))
        return
    path = corpus.text_file
    at = split_text(path, val_fraction)
    for split, (start, end) in zip(SPLITS, ((0, at), (at, os.path.getsize(path)))):
        yield from (Planned(task, split) for task in group_spans(file_spans(path, start, end, cut, False)))


class ValDraw:
    """Which documents are held out for validation: document i when the i-th uniform number of a generator seeded
    with `seed` is below val_fraction. About val_fraction of the documents, and so of the bytes, chosen the same
    way whatever the number of workers; asked in order, so it keeps one block of numbers at a time."""

    BLOCK = 1 << 16

    def __init__(self, seed: int, val_fraction: float):
        self.rng, self.fraction = np.random.default_rng(seed), val_fraction
        self.first, self.held = 0, np.zeros(0, dtype=bool)

    def split(self, document: int) -> str:
        while document >= self.first + len(self.held):
            self.first += len(self.held)
            self.held = self.rng.random(self.BLOCK) < self.fraction
        return "val" if self.held[document - self.first] else "train"


class Documents:
    """Counts documents as their pieces come in order, and says which split each piece goes to, up to max_docs."""

    def __init__(self, draw: ValDraw, max_docs: int | None):
        self.draw, self.max_docs = draw, max_docs
        self.count, self.starting = 0, True  # documents finished; whether the next piece starts one

    @property
    def full(self) -> bool:
        return self.max_docs is not None and self.count >= self.max_docs

    def route(self, fixed: str | None, ends: bool) -> tuple[str, bool]:
        """The split of the next piece, and whether it starts a document."""
        split, starts = fixed or self.draw.split(self.count), self.starting
        self.starting = ends
        self.count += ends
        return split, starts

    def route_tasks(self, results: Iterable[tuple[Planned, tuple]]) -> Iterator[tuple[Planned, tuple, list]]:
        """For each (planned task, its result), in order, the (split, starts a document) of each of its pieces up
        to max_docs; the result's last item is its pieces' ends_document flags. Stops at max_docs."""
        for planned, result in results:
            routes = []
            for ends in result[-1]:
                if self.full:
                    break
                routes.append(self.route(planned.split, ends))
            yield planned, result, routes
            if self.full:
                return


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class Progress:
    """Bytes read, tokens/s and the ETA while a pass runs: a live bar on a terminal (rich, which typer brings),
    a line every PROGRESS_LINE_S seconds in a log file."""

    def __init__(self, label: str, total_bytes: int | None, enabled: bool, log: Log):
        self.label, self.total, self.log = label, total_bytes, log
        self.enabled = enabled and (total_bytes is None or total_bytes > PROGRESS_MIN_BYTES)
        self.done = self.tokens = 0
        self.t0 = self.last_line = time.perf_counter()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TextColumn("{task.fields[tokens_per_s]}"), TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total_bytes, tokens_per_s="")

    def update(self, nbytes: int, ntokens: int = 0) -> None:
        self.done, self.tokens = self.done + nbytes, self.tokens + ntokens
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = f"{self.tokens / max(now - self.t0, 1e-9):,.0f} tokens/s" if self.tokens else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, tokens_per_s=rate)
        elif now - self.last_line >= PROGRESS_LINE_S:
            self.last_line = now
            share = f"{100 * self.done / self.total:.1f}% of " if self.total else ""
            eta = f", ETA {(self.total - self.done) * (now - self.t0) / max(self.done, 1):.0f}s" if self.total else ""
            self.log(f"{self.label}: {share}{self.done / 1e6:,.0f} MB, {rate}{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------
# The tokenizer: fixed (gpt2, a path's), or learned from the corpus (char: its characters; bpe: a sample)
# ---------------------------------------------------------------------------------------------


def char_vocabulary(corpus: Corpus, plan: Callable[[], Iterator[Planned]], workers: int, max_docs: int | None,
                    progress: bool, log: Log) -> CharTokenizer:
    """A first pass over the corpus (the whole of it, so val has no unknown characters) for its characters."""
    chars: set[str] = set()
    documents = Documents(ValDraw(0, 0.0), max_docs)
    bar = Progress("collecting characters", corpus.nbytes, progress, log)
    with Workers(workers, None) as pool:
        for planned, (pieces, _), routes in documents.route_tasks(pool.map(chars_task, plan())):
            chars.update(*pieces[:len(routes)])
            bar.update(planned.task.nbytes)
    bar.close()
    if not chars:
        raise UserError(f"{corpus.path} holds no text; pass a corpus with some text in it")
    return CharTokenizer("".join(sorted(chars)))


def bpe_sample(plan: Iterator[Planned], draw: ValDraw, max_docs: int | None, sample_bytes: int) -> Iterator[str]:
    """The first `sample_bytes` of the train text, in ~1 MB pieces, read here (no workers: it is a small share)."""
    documents, taken = Documents(draw, max_docs), 0
    for planned in plan:
        for text, ends in planned.task.texts():
            if documents.full or taken >= sample_bytes:
                return
            split, _ = documents.route(planned.split, ends)
            if split == "train":
                data = text.encode("utf-8")[:sample_bytes - taken]
                taken += len(data)
                yield from split_chunks(data.decode("utf-8", errors="ignore"))


# ---------------------------------------------------------------------------------------------
# prepare: corpus -> tokenizer -> ids -> dataset
# ---------------------------------------------------------------------------------------------


def encode_corpus(writer: DatasetWriter, plan: Iterator[Planned], tok: Tokenizer, eot: int | None,
                  documents: Documents, workers: int, bar: Progress) -> None:
    """Every piece's ids to its split, in order, `eot` after each document (None: nothing after them)."""
    with Workers(workers, tok) as pool:
        for planned, (ids, sizes, _), routes in documents.route_tasks(pool.map(encode_task, plan, eot, writer.dtype)):
            at, run_split, run_start = 0, None, 0  # pieces going to the same split are written as one run
            for size, (split, starts) in zip(sizes, routes):
                if split != run_split:
                    if run_split:
                        writer.append(run_split, ids[run_start:at])
                    run_split, run_start = split, at
                if starts:
                    writer.start_document(split, at - run_start)
                at += size
            if run_split:
                writer.append(run_split, ids[run_start:at])
            bar.update(planned.task.nbytes, at)


def check_count(name: str, value, minimum: int, example: str) -> None:
    """An integer option (None: not given) of at least `minimum`. --seed's minimum is 0: Python's random.seed
    takes the absolute value of an int, so -3 would make the same data as 3."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise UserError(f"--{name} must be an integer >= {minimum}, got {value!r}; e.g. --{name} {example}")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    workers: int | None = None,
    text_key: str | None = None,
    max_docs: int | None = None,
    bpe_sample_bytes: int | None = None,
) -> Path:
    """Tokenize a corpus into <out>/{train.bin,val.bin,meta.json}; return the output folder.

    source: see sources.py ('shakespeare', a .txt file, a folder of .txt files, a .jsonl or .parquet file,
    a folder of .parquet files, hf:NAME[:CONFIG]); a sequence-to-sequence source ('task:NAME', a .tsv file, a
    .jsonl file of source/target objects) goes to pairs.prepare_pairs, which alone uses `examples`.
    tokenizer: 'char', 'gpt2' or 'bpe' (vocab_size, default 1024, is only for bpe; it is trained on the first
    `bpe_sample_bytes` of the train text), or a path (tokenization.tokenizer_from_path): a minigpt run or
    checkpoint, or a Hugging Face model folder, whose tokenizer is used as it is. out defaults to
    data/<source>_<tokenizer kind>. workers: processes that read and encode (default: one per core).
    text_key: the field or column of a .jsonl, .parquet or hf: corpus holding the text. max_docs: only the first
    N documents. seed: draws a corpus's val documents (and shuffles pairs).
    An existing output from the same corpus bytes and the same request is reused; a different one is refused
    unless force. log: where messages go (default: stderr); pass `lambda s: None` for silence.
    """
    log = log or log_to_stderr
    source = os.fspath(source)
    if source.startswith("task:") or Path(source).suffix in (".tsv", ".jsonl"):
        import pairs  # here: pairs imports this module, and a token-stream run never needs it

        if pairs.is_pairs_source(source):
            for name, value in (("text-key", text_key), ("max-docs", max_docs), ("bpe-sample-bytes", bpe_sample_bytes)):
                if value is not None:
                    raise UserError(f"--{name} applies to text corpora, not to source/target pairs; drop it")
            return pairs.prepare_pairs(source, tokenizer, vocab_size, out, input_path, val_fraction, force, data_root,
                                       log, examples=examples, seed=seed)
    if examples is not None:
        raise UserError(EXAMPLES_ONLY_FOR_TASKS)
    t0 = time.perf_counter()
    workers = default_workers() if workers is None else workers
    check_count("workers", workers, 1, "2")
    check_count("max-docs", max_docs, 1, "1000")
    check_count("bpe-sample-bytes", bpe_sample_bytes, 1, str(DEFAULT_BPE_SAMPLE_BYTES))
    check_count("seed", seed, 0, str(DEFAULT_SEED))
    given = tokenizer_from_path(tokenizer) if is_tokenizer_path(tokenizer) else None
    kind, bpe_vocab_size = _check_request(tokenizer, vocab_size, val_fraction, given)
    if bpe_sample_bytes is not None and kind != "bpe":
        raise UserError(f"--bpe-sample-bytes applies only to --tokenizer bpe (the {kind} tokenizer is not trained); drop it")
    corpus = read_corpus(source, input_path, data_root, log, text_key)
    if corpus.one_document and max_docs is not None:
        raise UserError(f"--max-docs applies to a corpus of documents; {corpus.path} is one document: drop it")
    out_dir = Path(out).expanduser() if out is not None else Path(data_root) / f"{corpus.name}_{kind}"

    sample = DEFAULT_BPE_SAMPLE_BYTES if bpe_sample_bytes is None else bpe_sample_bytes
    request = {"format_version": FORMAT_VERSION, "source_sha256": corpus.sha256, "tokenizer_kind": kind,
               "val_fraction": float(val_fraction), "bpe_vocab_size": bpe_vocab_size}
    if given is not None:  # a tokenizer from a path is only the same one if its spec is
        request["tokenizer_sha256"] = tokenizer_sha256(given.spec)
    if not corpus.one_document:  # a one-document corpus's request stays what it was before documents
        request.update(val_split="documents", seed=seed, max_docs=max_docs,
                       text_key=DEFAULT_TEXT_KEY if text_key is None else text_key)
    if kind == "bpe" and (corpus.nbytes is None or corpus.nbytes > sample):  # else the sample is the whole text
        request["bpe_sample_bytes"] = sample
    if _reusable(out_dir, request, force, log):
        log(f"reusing {out_dir} (already prepared from the same source and tokenizer)")
        return out_dir

    def plan(cut: bool = True) -> Iterator[Planned]:
        return plan_tasks(corpus, val_fraction, cut)

    if given is not None:
        tok: Tokenizer = given
    elif kind == "char":
        tok = char_vocabulary(corpus, plan, workers, max_docs, progress, log)
    elif kind == "gpt2":
        tok = gpt2_tokenizer()
    else:
        log(f"training a {bpe_vocab_size}-token BPE with rustbpe on up to {sample:,} bytes of the train text")
        tok = train_bpe(bpe_sample(plan(), ValDraw(seed, val_fraction), max_docs, sample), bpe_vocab_size, log)

    documents = Documents(ValDraw(seed, val_fraction), max_docs)
    bar = Progress(f"encoding ({workers} worker{'s' * (workers > 1)})", corpus.nbytes, progress, log)
    try:
        with DatasetWriter(out_dir, tok.vocab_size) as writer:
            eot = None if corpus.one_document else tok.eot_token
            encode_corpus(writer, plan(encodes_in_pieces(tok)), tok, eot, documents, workers, bar)
            _check_splits(writer, corpus, documents.count)
            meta = {
                "source": corpus.label,
                "source_path": corpus.path,
                "source_sha256": corpus.sha256,
                "source_bytes": bar.done,
                "val_fraction": float(val_fraction),
                **({k: v for k, v in request.items() if k in ("val_split", "seed", "max_docs", "text_key")}),
                **({"documents": documents.count} if not corpus.one_document else {}),
                "end_of_text_between_documents": eot is not None,
                "tokenizer_kind": kind,
                **({"bpe_vocab_size": bpe_vocab_size} if bpe_vocab_size is not None else {}),
                **({"bpe_sample_bytes": sample} if kind == "bpe" else {}),
                **({"tokenizer_from": str(Path(tokenizer).expanduser().resolve())} if given is not None else {}),
                "tokenizer_sha256": tokenizer_sha256(tok.spec),
                "vocab_size": tok.vocab_size,
                "eot_token": tok.eot_token,
                "tokenizer": tok.spec,
            }
            meta = writer.finish(meta)
    except KeyboardInterrupt:
        log(f"interrupted: {out_dir} is as it was (a rerun starts again from the beginning)")
        raise
    except OSError as e:  # a full disk, a folder we may not write: nothing half-written is left
        raise UserError(f"could not write {out_dir} ({e.strerror or e}); free some space or pass --out on another "
                        "disk: nothing was written there") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log(
        f"wrote {out_dir}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens, "
        f"{kind} vocab {meta['vocab_size']:,}, {meta['dtype']} ({seconds:.1f}s, {bar.done / 1e6 / seconds:,.1f} MB/s)"
    )
    return out_dir


def _check_splits(writer: DatasetWriter, corpus: Corpus, documents: int) -> None:
    """Each split needs 2 tokens or more; a corpus of documents whose draw left one split empty gives it its
    last document (a corpus of a few documents)."""
    if not corpus.one_document:
        if documents == 0:
            raise UserError(f"{corpus.path} holds no documents; pass a corpus with some text in it")
        if documents == 1:
            raise UserError(f"{corpus.path} holds one document, and a corpus of documents keeps whole ones for "
                            "validation; pass its text as a .txt file, whose end is kept instead")
        for empty, full in (("val", "train"), ("train", "val")):
            if writer.tokens[empty] == 0:
                writer.move_last_document(full, empty)
    train, val = writer.tokens["train"], writer.tokens["val"]
    if train < 2 or val < 2:
        raise UserError(f"the text is too short to split: {train} train and {val} val tokens; use more text or a "
                        "different --val-fraction")


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
        check_bpe_vocab_size(vocab_size)
    elif vocab_size is not None:
        raise UserError(f"--vocab-size applies only to --tokenizer bpe (the {kind} vocabulary is fixed); drop it or use bpe")
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}; e.g. 0.1")
    return kind, vocab_size


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


if __name__ == "__main__":
    from cli.main import app

    app(["prepare", *sys.argv[1:]], prog_name="prepare_data.py")
