"""Tokenizers: char, GPT-2 (tiktoken), a byte-level BPE trained here (rustbpe, run by tiktoken), and a Hugging
Face tokenizer (interop/hf_tokenizer.py); their specs (JSON, stored in meta.json and checkpoints); encoding a
long text in pieces that give exactly the tokens of the whole; and TextStream, which a sampler prints through.

Only numpy at module level: tiktoken, rustbpe and `tokenizers` are imported where they are used.
"""

import base64
import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from errors import Log, UserError, log_to_stderr

TOKENIZER_KINDS = ("char", "gpt2", "bpe")
DEFAULT_BPE_VOCAB_SIZE = 1024



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

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as a uint32 array, without a Python int per token (none of its special tokens allowed, so
        "<|endoftext|>" in the text is plain text, as in encode)."""
        return self.encoding.encode_to_numpy(text, disallowed_special=())

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


def train_bpe(texts: Iterable[str], vocab_size: int, log: Log = log_to_stderr) -> TiktokenTokenizer:
    """Train a byte-level BPE with rustbpe and run it with tiktoken.

    rustbpe is the trainer nanochat uses: it emits tiktoken mergeable ranks directly (no byte-to-unicode
    remapping as HF `tokenizers` needs), trains on 1 MB in well under a second, and works offline.
    It splits text with a GPT-4-style regex, which we keep as the tiktoken pattern.
    """
    import rustbpe

    check_bpe_vocab_size(vocab_size)  # rustbpe panics (no clean exception) below 256
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


def check_bpe_vocab_size(vocab_size) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 256 <= vocab_size <= 1 << 31:
        raise UserError(
            f"--vocab-size {vocab_size} is not valid for a byte-level BPE: it must be an integer >= 256 "
            f"(the byte alphabet); try {DEFAULT_BPE_VOCAB_SIZE}"
        )


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
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Encoding a long text in pieces
# ---------------------------------------------------------------------------------------------

# A cut is safe where encoding the text on each side of it separately gives exactly the tokens of the whole: after
# a "\n", or before a " ", that sits between two printable ASCII characters. No piece of the GPT-2 or rustbpe
# (GPT-4-style) pre-tokenizer regexes holds whitespace except at its start, or within a run of whitespace, so none
# spans such a cut; the regexes look ahead (`\s+(?!\S)`) but never behind, so what follows the cut is split the
# same way with or without the text before it. ASCII neighbours keep Unicode's other spaces (U+00A0, U+3000, ...)
# out of the question. Other tokenizers (a Hugging Face tokenizer may add a prefix space to each text) encode a
# document whole.
SAFE_CUT_BYTES = re.compile(rb"[\x21-\x7e]\n(?=[\x21-\x7e])|[\x21-\x7e](?= [\x21-\x7e])")
SAFE_CUT_TEXT = re.compile(SAFE_CUT_BYTES.pattern.decode("ascii"))  # the same cuts in a str
CHUNK_CHARS = 1 << 20  # ~1 MB pieces for rustbpe's trainer


def encodes_in_pieces(tok: Tokenizer) -> bool:
    """Whether a text may be encoded in pieces cut at safe cuts (char, GPT-2, bpe), or only whole (hf)."""
    return isinstance(tok, (CharTokenizer, TiktokenTokenizer))


def split_chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """`text` in pieces of about `chunk_chars` characters, cut only at safe cuts (a piece may be longer)."""
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        m = SAFE_CUT_TEXT.search(text, start + chunk_chars)
        if m is None:
            break
        chunks.append(text[start:m.end()])
        start = m.end()
    chunks.append(text[start:])
    return chunks


def encode_ids(tok: Tokenizer, text: str) -> np.ndarray:
    """A text's token ids as a uint32 array: `tok.encode(text)`, vectorised where the tokenizer can."""
    encode_array = getattr(tok, "encode_array", None)
    ids = encode_array(text) if encode_array is not None else tok.encode(text)
    return np.asarray(ids, dtype=np.uint32)
