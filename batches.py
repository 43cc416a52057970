"""Micro-batches, each a pure function of (seed, step, micro-step): a resumed run, or one spread over any number of
processes, sees exactly the same data, and no sampler state needs saving.

    Batches                  windows of a token stream: the next token (causal), no targets in the prefix
                             (prefix-LM), or hidden tokens to recover (bidirectional: BERT's masked LM)
    PairBatches              (source, target) pairs, laid out for the architecture: an encoder-decoder reads the
                             source in its encoder; a decoder-only model reads `source <sep> target`, with the loss
                             on the target only (a prefix-LM with each example's source as its prefix)
    SpanCorruptionBatches    T5's denoising objective on a token stream, for an encoder-decoder

A batch is (x, y): x the token ids (B, T) of a stream, or a dict of the model's keyword inputs for pairs (the
model is called as model(**x, targets=y)); y the targets (B, T), -1 where there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dataset_format import open_split, token_id_error
from errors import UserError
from model import GPTConfig
from pairs import SpecialTokens, open_pairs, special_tokens

Batch = tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]

MLM_MASK_RATE = 0.15  # BERT's share of hidden tokens for a bidirectional model
NOISE_DENSITY = 0.15  # T5's span corruption: the share of tokens hidden,
MEAN_SPAN = 3.0  # in spans of this mean length, one sentinel per span


def derived_seed(*keys: int) -> int:
    """A 64-bit seed mixed from the keys: neighbouring keys give unrelated streams."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on the device; on a GPU through pinned host memory, so that the copy overlaps with compute."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

    x, y = batch
    return ({k: move(v) for k, v in x.items()} if isinstance(x, dict) else move(x)), move(y)


class BatchSource:
    """Micro-batches as a pure function of (step, micro-step), one of them built ahead of time."""

    ready: tuple[tuple[int, int], Batch] | None = None

    def make(self, step: int, micro: int) -> Batch:
        raise NotImplementedError

    def prefetch(self, step: int, micro: int = 0) -> None:
        """Build that batch now and start its copy to the device, for the `get` that asks for it next: called
        while the GPU still computes the current step, so the host's work and the copy overlap with it."""
        self.ready = ((step, micro), self.make(step, micro))

    def get(self, step: int, micro: int = 0) -> Batch:
        """x, y for micro-batch `micro` of step `step`, on the device."""
        ready, self.ready = self.ready, None
        if ready is not None and ready[0] == (step, micro):
            return ready[1]
        return self.make(step, micro)


class Batches(BatchSource):
    option = "block_size"  # the model option that sets the window one example reads

    def __init__(self, data_dir: str | Path, meta: dict, split: str, batch_size: int, model: GPTConfig,
                 device: torch.device, seed: int):
        self.data_dir, self.meta, self.split = Path(data_dir), meta, split
        self.batch_size, self.model, self.device, self.seed = batch_size, model, device, seed
        self.n_tokens = meta[f"{split}_tokens"]
        if self.n_tokens < self.window:
            raise UserError(
                f"{split} split of {data_dir} has {self.n_tokens} tokens, fewer than the {self.window} one example "
                f"reads; use a smaller model.{self.option} or more data"
            )

    @property
    def window(self) -> int:
        """Tokens read per example: a context, and the target of its last position."""
        return self.model.block_size + 1

    def windows(self, generator: torch.Generator) -> torch.Tensor:
        """batch_size random windows (B, window) of the split, as int64."""
        data = open_split(self.data_dir, self.split, self.meta)  # a fresh memmap each batch: no leak over long runs
        starts = torch.randint(self.n_tokens - self.window + 1, (self.batch_size,), generator=generator).tolist()
        ids = np.stack([data[i:i + self.window] for i in starts])
        self.check_ids(ids, starts)
        return torch.from_numpy(ids.astype(np.int64))

    def check_ids(self, ids: np.ndarray, starts: list[int]) -> None:
        """Every id of the batch (B, window), cut at `starts`, below vocab_size: what keeps a corrupt or foreign
        .bin from indexing past the embedding. A run's start reads only a small split whole (check_token_ids),
        so this is where a large one's bad id is found, when a batch first reaches it. One max over the batch
        on the host: ~2 us, under 1% of cutting the batch from the memmap."""
        vocab_size = self.meta["vocab_size"]
        if ids.size and int(ids.max()) >= vocab_size:
            b, col = np.unravel_index(int(np.argmax(ids >= vocab_size)), ids.shape)
            raise token_id_error(self.data_dir / f"{self.split}.bin", int(ids[b, col]), starts[b] + int(col), vocab_size)

    def make(self, step: int, micro: int) -> Batch:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step, micro))
        xy = self.windows(generator)  # (B, T + 1)
        return to_device(self.objective(xy[:, :-1], xy[:, 1:], generator), self.device)

    def objective(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (-1 = no target) for the model's attention mask. Causal: the next token.
        Prefix-LM: no targets inside the prefix, where each token sees the one it would predict. Bidirectional:
        every token sees every other, so predict hidden ones instead (BERT's masked LM; always [MASK], no 80/10/10)."""
        if self.model.attn_mask == "prefix":
            return x, y.index_fill(1, torch.arange(self.model.prefix_len - 1), -1)
        if self.model.attn_mask == "bidirectional":
            hidden = torch.rand(x.shape, generator=generator) < MLM_MASK_RATE
            hidden[:, 0] |= ~hidden.any(dim=1)  # at least one target per row
            return x.masked_fill(hidden, self.model.mask_token), x.masked_fill(~hidden, -1)
        return x, y


# ----------------------------------------------------------------------------------------------------
# Pairs


def pair_lengths(model: GPTConfig, source_len: int, target_len: int) -> tuple[int, int]:
    """The (encoder, decoder) positions one pair takes: an encoder-decoder reads the source in its encoder and
    `<start> target` in its decoder; a decoder-only model reads `source <sep> target` (the end token is only
    predicted, never read)."""
    if model.arch == "encoder_decoder":
        return source_len, target_len + 1
    return 0, source_len + 1 + target_len


def collate_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], model: GPTConfig, special: SpecialTokens) -> Batch:
    """A batch of (source ids, target ids) pairs for the model's architecture, padded to its longest example."""
    B = len(pairs)
    if model.arch == "encoder_decoder":
        S = max(len(s) for s, _ in pairs)
        T = max(len(t) for _, t in pairs) + 1
        source = torch.full((B, S), special.pad, dtype=torch.long)
        target = torch.full((B, T), special.pad, dtype=torch.long)
        y = torch.full((B, T), -1, dtype=torch.long)
        for b, (s, t) in enumerate(pairs):
            source[b, :len(s)] = torch.from_numpy(s.astype(np.int64))
            target[b, 0] = special.bos  # teacher forcing: the decoder reads <start> target, predicts target <end>
            target[b, 1:len(t) + 1] = torch.from_numpy(t.astype(np.int64))
            y[b, :len(t)] = target[b, 1:len(t) + 1]
            y[b, len(t)] = special.eos
        return {"source": source, "target": target, "source_mask": source != special.pad}, y
    T = max(len(s) + 1 + len(t) for s, t in pairs)
    idx = torch.full((B, T), special.pad, dtype=torch.long)
    y = torch.full((B, T), -1, dtype=torch.long)
    prefix = torch.zeros(B, dtype=torch.long)
    for b, (s, t) in enumerate(pairs):
        seq = torch.from_numpy(np.concatenate([s, [special.sep], t, [special.eos]]).astype(np.int64))
        idx[b, :len(seq) - 1] = seq[:-1]
        y[b, len(s):len(seq) - 1] = seq[len(s) + 1:]  # the target and its end: the source is given, not predicted
        prefix[b] = len(s) + 1  # a prefix-LM's prefix: the source and the separator see each other
    x = {"idx": idx}
    if model.attn_mask == "prefix":
        x["prefix_len"] = prefix
    return x, y


def check_pairs_fit(lengths: tuple[np.ndarray, np.ndarray], model: GPTConfig, where: str,
                    fix: str = "raise it with --set model.{option}={need}") -> None:
    """Refuse pairs longer than the model's context, saying how many and which option to raise (`fix`)."""
    enc, dec = pair_lengths(model, lengths[0], lengths[1])
    limits = [(dec, model.block_size, "block_size")]
    if model.arch == "encoder_decoder":
        limits.insert(0, (enc, model.source_size, "source_block_size"))
    for need, have, option in limits:
        over = need > have
        if over.any():
            raise UserError(f"{int(over.sum())} of the {len(need)} pairs of {where} are longer than the model's "
                            f"context: the longest needs model.{option} = {int(need.max())} (it is {have}); "
                            + fix.format(option=option, need=int(need.max())))


class PairBatches(BatchSource):
    def __init__(self, data_dir: str | Path, meta: dict, split: str, batch_size: int, model: GPTConfig,
                 device: torch.device, seed: int):
        if model.attn_mask == "bidirectional":
            raise UserError("a bidirectional (masked-LM) model does not train on pairs: use model.attn_mask=causal "
                            "or prefix, or model.arch=encoder_decoder")
        self.pairs = open_pairs(data_dir, split, meta)  # read whole: every id is checked here, at the run's start
        self.pairs.check_ids(meta["tokenizer_vocab_size"])
        if self.pairs.n == 0:
            raise UserError(f"the {split} split of {data_dir} holds no pairs; prepare it again with more examples")
        check_pairs_fit((self.pairs.source_lengths, self.pairs.target_lengths), model, f"{data_dir} ({split})")
        self.special = special_tokens(meta["tokenizer_vocab_size"])
        self.batch_size, self.model, self.device, self.seed = batch_size, model, device, seed

    def make(self, step: int, micro: int) -> Batch:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step, micro))
        chosen = torch.randint(self.pairs.n, (self.batch_size,), generator=generator).tolist()
        return to_device(collate_pairs([self.pairs.pair(i) for i in chosen], self.model, self.special), self.device)


# ----------------------------------------------------------------------------------------------------
# Span corruption (T5, Raffel 2020): hide ~15% of a window's tokens in spans of mean length 3; the encoder reads the
# window with one sentinel in place of each span, the decoder writes each sentinel followed by the span it hid.


def random_partition(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """n split into `parts` positive lengths at random (parts - 1 distinct cuts among the n - 1 gaps)."""
    cuts = (torch.randperm(n - 1, generator=generator)[:parts - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:])]


def span_corruption(tokens: list[int], special: SpecialTokens, generator: torch.Generator,
                    noise_density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[list[int], list[int]]:
    """(source, target) of T5's objective for a window of tokens: spans alternate with kept text, starting with
    kept text; the source keeps the text and puts sentinel i where span i was; the target is sentinel i then span
    i, for every span, then the end token."""
    n = len(tokens)
    noise = min(max(round(n * noise_density), 1), n - 1)
    spans = min(max(round(noise / mean_span), 1), len(special.sentinels), n - noise)
    noise_lengths = random_partition(noise, spans, generator)
    kept_lengths = random_partition(n - noise, spans, generator)
    source, target, at = [], [], 0
    for i, (kept, hidden) in enumerate(zip(kept_lengths, noise_lengths)):
        source += tokens[at:at + kept] + [special.sentinels[i]]
        at += kept
        target += [special.sentinels[i]] + tokens[at:at + hidden]
        at += hidden
    return source, target + [special.eos]


def span_corruption_lengths(model: GPTConfig) -> tuple[int, int]:
    """The window an encoder-decoder's source takes, and the longest decoder input its targets make."""
    n = model.source_size
    noise = min(max(round(n * NOISE_DENSITY), 1), n - 1)
    spans = min(max(round(noise / MEAN_SPAN), 1), n - noise)
    return n, noise + spans + 1  # <start>, then each span's sentinel and tokens


class SpanCorruptionBatches(Batches):
    option = "source_block_size"

    def __init__(self, data_dir: str | Path, meta: dict, split: str, batch_size: int, model: GPTConfig,
                 device: torch.device, seed: int):
        if model.arch != "encoder_decoder":
            raise UserError("train.objective = span_corruption trains an encoder-decoder: set model.arch=encoder_decoder")
        window, decoder_len = span_corruption_lengths(model)
        if decoder_len > model.block_size:
            raise UserError(f"span corruption of {window}-token sources makes targets of {decoder_len} tokens: set "
                            f"model.block_size >= {decoder_len} (or a smaller model.source_block_size)")
        super().__init__(data_dir, meta, split, batch_size, model, device, seed)
        self.special = special_tokens(meta["vocab_size"])

    @property
    def window(self) -> int:
        return self.model.source_size  # the source: one window of the stream, before its spans are hidden

    def make(self, step: int, micro: int) -> Batch:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step, micro))
        examples = [span_corruption(w, self.special, generator) for w in self.windows(generator).tolist()]
        pairs = [(np.array(s), np.array(t[:-1])) for s, t in examples]  # collate_pairs adds the end token back
        return to_device(collate_pairs(pairs, self.model, self.special), self.device)


def positions_per_example(meta: dict, model: GPTConfig, objective: str) -> tuple[float, float]:
    """The mean (decoder, encoder) positions one training example takes: what a step's tokens/s, MFU and FLOPs count.
    A token stream fills block_size; pairs take their own lengths (from meta.json's statistics of the train split)."""
    from pairs import is_pairs

    if objective == "span_corruption":
        window, decoder_len = span_corruption_lengths(model)
        return float(decoder_len), float(window)
    if not is_pairs(meta):
        return float(model.block_size), 0.0
    stats = meta["length_stats"]["train"]
    encoder, decoder = pair_lengths(model, stats["source"]["mean"], stats["target"]["mean"])
    return float(decoder), float(encoder)


def batch_source(data_dir: str | Path, meta: dict, split: str, batch_size: int, model: GPTConfig,
                 objective: str, device: torch.device, seed: int) -> BatchSource:
    """The batches of a dataset for a model and a training objective."""
    from pairs import is_pairs

    if is_pairs(meta):
        if objective == "span_corruption":
            raise UserError(f"{data_dir} holds pairs: span corruption needs a token-stream dataset "
                            "(leave train.objective at lm to train on the pairs)")
        return PairBatches(data_dir, meta, split, batch_size, model, device, seed)
    if objective == "span_corruption":
        return SpanCorruptionBatches(data_dir, meta, split, batch_size, model, device, seed)
    if model.arch == "encoder_decoder":
        raise UserError(f"an encoder-decoder trains on a pairs dataset (minigpt prepare task:... or FILE.tsv), or on "
                        f"the token stream in {data_dir} with --set train.objective=span_corruption")
    if model.attn_mask == "prefix" and model.prefix_len == 0:
        raise UserError(f"attn_mask = 'prefix' on a token stream ({data_dir}) needs model.prefix_len > 0 "
                        "(0 means each example's source, on a pairs dataset)")
    return Batches(data_dir, meta, split, batch_size, model, device, seed)
