"""Tokenizers in and out of the Hugging Face format.

Read top to bottom:
  1. HFTokenizer: our Tokenizer protocol (prepare_data.py) over a `tokenizers.Tokenizer`, spec kind "hf"
  2. import: tokenizer_from_hf_folder(folder, config), the tokenizer of a Hugging Face model folder
  3. export: export_tokenizer(tok, out_dir, model_max_length), tokenizer.json + tokenizer_config.json that
     `AutoTokenizer.from_pretrained(out_dir)` loads with no code of ours, for every kind we have

The rule both directions keep: a prompt's ids are the ids `AutoTokenizer.from_pretrained(folder)(text)` gives
(its defaults, special tokens and all), and decoded text is `decode(ids, skip_special_tokens=True)`, what people
print. Training text is encoded without special tokens ("<|endoftext|>" in a corpus is plain text), as the
tiktoken kinds do.

`tokenizers` is needed for the hf kind and for export; `transformers`, when installed, is what reads a model
folder (so that the ids are the ones AutoTokenizer gives); neither is imported until used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dataset_format import atomic_write
from errors import UserError
from tokenization import CharTokenizer, TiktokenTokenizer, Tokenizer, gpt2_tokenizer

HF_EXTRA_HINT = "install the Hugging Face extra: pip install -e '.[hf]'"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"Hugging Face tokenizers need the `tokenizers` library; {HF_EXTRA_HINT}") from None
    return tokenizers


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# 1. HFTokenizer
# ---------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character, so that a BPE over text can run on bytes.

    Printable Latin-1 bytes stand for themselves; the rest (control characters, space, ...) take the characters
    from U+0100 on, in byte order. "Ġ" (U+0120) is the space, "Ċ" (U+010A) the newline.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _optional_id(spec: dict, name: str) -> int | None:
    value = spec.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise UserError(f"an hf tokenizer spec's {name!r} must be a token id or null, got {value!r}; "
                        "re-run `minigpt prepare`")
    return value


def _decoder_types(decoder: dict) -> set[str]:
    """The types of a tokenizer.json decoder and of the decoders a Sequence of them holds."""
    inner = decoder.get("decoders") or []
    return {decoder.get("type"), *(t for d in inner if isinstance(d, dict) for t in _decoder_types(d))}


class HFTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json) run by the `tokenizers` library.

    spec: {"kind": "hf", "json": the tokenizer.json text, "bos_token_id", "eos_token_id", "pad_token_id" (ids or
    None), "clean_up_tokenization_spaces" (transformers' decode-time clean-up, in the cases it applies)}.
    eot_token is the end-of-sequence id (generation_config.json's where the folder has one): sampling stops there.
    """

    def __init__(self, spec: dict):
        tokenizers = _tokenizers()
        text = spec.get("json")
        if not isinstance(text, str):
            raise UserError("an hf tokenizer spec needs a string field 'json' (a tokenizer.json); re-run `minigpt prepare`")
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises bare Exceptions for bad JSON
            raise UserError(f"the hf tokenizer spec holds no valid tokenizer.json ({_first_line(e)}); "
                            "re-run `minigpt prepare`") from None
        backend.no_truncation()  # a corpus or a prompt is encoded whole; the model's context is the sampler's business
        backend.no_padding()
        self.backend = backend
        ids = {name: _optional_id(spec, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        self.spec = {"kind": "hf", "json": text, **ids,
                     "clean_up_tokenization_spaces": bool(spec.get("clean_up_tokenization_spaces", False))}
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # added tokens may leave gaps: every id must fit
        for name, i in ids.items():
            if i is not None and i >= self.vocab_size:
                raise UserError(f"the hf tokenizer spec's {name} {i} is past its vocabulary of {self.vocab_size}; "
                                "re-run `minigpt prepare`")
        self.eot_token = ids["eos_token_id"]
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        # A byte-level decoder (GPT-2, Llama 3, our exports) maps each token's characters back to bytes one to one,
        # so decode_bytes is exact; any other decoder (metaspace, byte fallback, WordPiece) works on text.
        decoder = json.loads(text).get("decoder") or {}
        self._byte_of = ({c: b for b, c in bytes_to_unicode().items()} if decoder.get("type") == "ByteLevel" else None)
        # Byte-fallback tokens (<0x00>..<0xFF>) decode as a run, valid UTF-8 only as a whole, and special tokens,
        # dropped before the decoder, do not end a run: TextStream holds back a trailing run of these.
        self.stream_open_ids: frozenset[int] = frozenset()
        if "ByteFallback" in _decoder_types(decoder):
            byte_tokens = {i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
            self.stream_open_ids = frozenset(byte_tokens | self.special_ids)

    def _encode(self, text: str, special: bool) -> list[int]:
        # encode_special_tokens=True makes special-token text (e.g. "<|endoftext|>") plain text: HF's
        # split_special_tokens. Set for each call: the two encodings share one backend.
        self.backend.encode_special_tokens = not special
        return self.backend.encode(text, add_special_tokens=special).ids

    def encode(self, text: str) -> list[int]:
        """Ordinary text, no special tokens (BOS, EOS, or special-token text matched): for training data."""
        return self._encode(text, special=False)

    def encode_prompt(self, text: str) -> list[int]:
        """What AutoTokenizer(text)["input_ids"] gives: special-token text matched, BOS added where HF adds it."""
        return self._encode(text, special=True)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """The ids to decode: those past the vocabulary are left out, as HF's decode does (a model's vocabulary may
        have rows its tokenizer never produces, which its generate can still pick); a negative id is an error."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if i < 0), None)
        if bad is not None:
            raise UserError(f"token id {bad} is out of range for this tokenizer's vocabulary of {self.vocab_size}")
        return [i for i in ids if i < self.vocab_size]

    def decode(self, ids: Sequence[int]) -> str:
        """AutoTokenizer's decode(ids, skip_special_tokens=True): special tokens (BOS, EOS, pad) are not printed."""
        text = self.backend.decode(self._check_ids(ids), skip_special_tokens=True)
        return clean_up_tokenization(text) if self.spec["clean_up_tokenization_spaces"] else text

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The tokens' bytes: exact for a byte-level tokenizer (a token may end inside a UTF-8 character), else the
        UTF-8 of decode(ids). Streaming an hf tokenizer goes through TextStream's text diff instead."""
        ids = self._check_ids(ids)
        if self._byte_of is None:
            return self.decode(ids).encode("utf-8")
        out = bytearray()
        for i in ids:
            if i in self.special_ids:
                continue
            token = self.backend.id_to_token(i) or ""
            if all(c in self._byte_of for c in token):
                out.extend(self._byte_of[c] for c in token)
            else:  # an added token written as plain text, as the ByteLevel decoder passes it through
                out.extend(token.encode("utf-8"))
        return bytes(out)

    # TextStream (prepare_data.py) streams this tokenizer by diffing the decoded text of the whole sequence, as
    # HF's TextStreamer does: a metaspace token's leading space exists only after the text before it.
    stream_by_text = True


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: the spaces a WordPiece decoder leaves before punctuation, removed."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------------------------------
# 2. Import: the tokenizer of a Hugging Face model folder
# ---------------------------------------------------------------------------------------------

GPT2_VOCAB_SIZE = 50257


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({_first_line(e)}); fix it or copy it again from the model's "
                        "repository") from None
    return value if isinstance(value, dict) else {}


def _config_id(value) -> int | None:
    """A config's token id; a list (several end tokens, as Llama 3 has) gives its first."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _eos_id(folder: Path, config: dict, tokenizer_eos: int | None) -> int | None:
    """The id generation stops at: generation_config.json's, else config.json's, else the tokenizer's eos token."""
    for source in (_read_json(folder / "generation_config.json"), config):
        found = _config_id(source.get("eos_token_id"))
        if found is not None:
            return found
    return tokenizer_eos


def _transformers():
    """transformers if it is installed (and imports), else None: then tokenizer.json is read directly."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def tokenizer_from_hf_folder(folder: Path, config: dict) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder; `config` is its parsed config.json.

    With transformers installed the folder is loaded with AutoTokenizer and its backend's JSON is kept, so the
    ids are AutoTokenizer's (transformers 5 rebuilds some classes' pre-tokenizers and post-processors from
    tokenizer_config.json: the backend holds the result). Without it, tokenizer.json is read as it is. A GPT-2
    folder without tokenizer files is tiktoken's GPT-2 encoding.
    """
    folder = Path(folder)
    has = {n: (folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")}
    slow_files = has["tokenizer.model"] or (has["vocab.json"] and has["merges.txt"])
    if not has["tokenizer.json"] and not slow_files:
        if config.get("model_type") == "gpt2" and config.get("vocab_size") == GPT2_VOCAB_SIZE:
            return gpt2_tokenizer()
        raise UserError(f"{folder} holds no tokenizer (no tokenizer.json, no vocab.json + merges.txt, no tokenizer.model); "
                        "copy the tokenizer files from the model's repository into it")
    transformers = _transformers()
    if transformers is not None:
        return _from_auto_tokenizer(folder, config, transformers)
    if not has["tokenizer.json"]:
        present = " + ".join(n for n in ("vocab.json", "merges.txt", "tokenizer.model") if has[n])
        raise UserError(f"{folder} has {present} but no tokenizer.json, which only `transformers` converts; {HF_EXTRA_HINT}")
    return _from_tokenizer_json(folder, config)


def _from_auto_tokenizer(folder: Path, config: dict, transformers) -> HFTokenizer:
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # a missing converter dependency, a remote-code tokenizer, a broken file, ...
        raise UserError(f"transformers could not load the tokenizer in {folder} ({_first_line(e)}); "
                        "check that it loads with AutoTokenizer.from_pretrained") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{folder}'s tokenizer ({type(tok).__name__}) has no `tokenizers` version (no backend_tokenizer); "
                        "convert it to a tokenizer.json first")
    clean = bool(getattr(tok, "clean_up_tokenization_spaces", False))
    # transformers 5 skips the clean-up for a BPE model unless told it may corrupt the text
    if type(backend.model).__name__ == "BPE" and not getattr(
            tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False):
        clean = False
    return HFTokenizer({"kind": "hf", "json": backend.to_str(), "bos_token_id": tok.bos_token_id,
                        "eos_token_id": _eos_id(folder, config, tok.eos_token_id), "pad_token_id": tok.pad_token_id,
                        "clean_up_tokenization_spaces": clean})


def _special_token_id(backend, value) -> int | None:
    """tokenizer_config.json's bos_token / eos_token (a string, or an object with "content") as an id."""
    if isinstance(value, dict):
        value = value.get("content")
    return backend.token_to_id(value) if isinstance(value, str) else None


def _from_tokenizer_json(folder: Path, config: dict) -> HFTokenizer:
    path = folder / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
        backend = _tokenizers().Tokenizer.from_str(text)
    except Exception as e:
        raise UserError(f"{path} is not a tokenizer.json the `tokenizers` library reads ({_first_line(e)})") from None
    tc = _read_json(folder / "tokenizer_config.json")
    bos = _special_token_id(backend, tc.get("bos_token"))
    clean = bool(tc.get("clean_up_tokenization_spaces", False)) and type(backend.model).__name__ != "BPE"
    return HFTokenizer({"kind": "hf", "json": text,
                        "bos_token_id": bos if bos is not None else _config_id(config.get("bos_token_id")),
                        "eos_token_id": _eos_id(folder, config, _special_token_id(backend, tc.get("eos_token"))),
                        "pad_token_id": _special_token_id(backend, tc.get("pad_token")),
                        "clean_up_tokenization_spaces": clean})


# ---------------------------------------------------------------------------------------------
# 3. Export: tokenizer.json + tokenizer_config.json for AutoTokenizer
# ---------------------------------------------------------------------------------------------

GPT2_EOT = "<|endoftext|>"


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge makes `token`: byte-pair merging of its bytes by the tokens ranked below it,
    lowest rank first (leftmost on a tie), as tiktoken merges, until two parts are left. Inside any longer text
    tiktoken forms `token` by this same last merge, so one merge per token reproduces its encoding."""
    rank = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            raise UserError(f"BPE token {token!r} (rank {rank}) cannot be made by merging lower-ranked tokens, "
                            "so it has no Hugging Face merge; re-train the tokenizer")
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def _tiktoken_ranks(tok: TiktokenTokenizer) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken encoding (its ordinary tokens, special tokens left out)."""
    special = {tok.encoding.encode_single_token(s) for s in tok.encoding.special_tokens_set}
    return {tok.encoding.decode_single_token_bytes(i): i for i in range(tok.vocab_size) if i not in special}


def _byte_level_backend(ranks: dict[bytes, int], pattern: str | None):
    """tiktoken's BPE as a Hugging Face byte-level BPE: the vocabulary in GPT-2's byte alphabet, the merges
    recovered from the ranks, tiktoken's regex splitting the text (pattern None: GPT-2's, which ByteLevel has
    built in). ignore_merges: a piece that is a whole token is that token, as tiktoken looks it up first."""
    tokenizers = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, processors

    alphabet = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(b): r for b, r in ranks.items()}
    by_rank = sorted(ranks, key=ranks.get)
    merges = [tuple(map(spell, _merge_parts(ranks, b))) for b in by_rank if len(b) > 1]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    if pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _char_backend(tok: CharTokenizer):
    """One token per character, every character of the vocabulary (spaces and newlines too): a BPE without merges
    over unsplit text, and a decoder that joins the tokens with nothing between them."""
    tokenizers = _tokenizers()
    from tokenizers import decoders, models

    backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
    backend.decoder = decoders.Fuse()
    return backend


def export_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> dict:
    """Write tokenizer.json and tokenizer_config.json into out_dir for `AutoTokenizer.from_pretrained(out_dir)`.

    Returns the ids config.json / generation_config.json should carry: {"bos_token_id", "eos_token_id",
    "pad_token_id"}, each an id or None. The tokenizer class written is PreTrainedTokenizerFast, so transformers
    runs tokenizer.json as it is (a named class such as LlamaTokenizer would rebuild parts of it).
    """
    kind = tok.spec["kind"]
    special: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if kind == "char":
        backend = _char_backend(tok)
    elif kind in ("bpe", "gpt2"):
        backend = _byte_level_backend(_tiktoken_ranks(tok), tok.spec.get("pattern"))
        if kind == "gpt2":  # as Hugging Face's gpt2: <|endoftext|> = 50256 is bos, eos and unk, and never added
            backend.add_special_tokens([_tokenizers().AddedToken(GPT2_EOT, special=True, normalized=False)])
            special.update(bos_token_id=tok.eot_token, eos_token_id=tok.eot_token)
    elif kind == "hf":
        backend = tok.backend
        special.update({k: tok.spec[k] for k in special})
    else:
        raise UserError(f"cannot export a {kind!r} tokenizer to the Hugging Face format")
    token_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(model_max_length),
                    "clean_up_tokenization_spaces": bool(tok.spec.get("clean_up_tokenization_spaces", False))}
    for name in ("bos", "eos", "pad"):
        if special[f"{name}_token_id"] is not None:
            token_config[f"{name}_token"] = backend.id_to_token(special[f"{name}_token_id"])
    if kind == "gpt2":
        token_config["unk_token"] = GPT2_EOT
    out_dir = Path(out_dir)
    text = backend.to_str(pretty=True)
    atomic_write(out_dir / "tokenizer.json", lambda f: f.write(text.encode("utf-8")))
    atomic_write(out_dir / "tokenizer_config.json",
                 lambda f: f.write((json.dumps(token_config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))
    return special
