"""Scoring a trained run on a split of a dataset: `minigpt eval`.

On source/target pairs, every source (or the first --max-examples) is decoded, greedily or keeping the best
hypothesis of a beam search, and the texts are scored: exact match, and BLEU and chrF as sacrebleu computes them
(the implementation papers report, so the numbers compare with theirs). Teacher-forced, in batches: the token
accuracy (the argmax among the ids a target may hold) and the loss, over every target token and the end token.
On a token stream: the loss over consecutive windows of block_size + 1 tokens, its perplexity, and bits per byte
(the same nats per UTF-8 byte of the predicted text, which compares models across tokenizers). With lengths
(`--lengths`), the same tokens scored with a context of each length, past block_size too: how a model extrapolates.

Read top to bottom:
  1. metrics: of texts, and of logits against targets (pure functions)
  2. what is evaluated: the run, its data and the options, every one checked before any work is done
  3. the two evaluations, and evaluate_run, which the CLI calls
  4. length extrapolation: one token stream scored with contexts of several lengths
  5. the tables
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError

PAIRS_PER_BATCH = 64  # pairs per teacher-forced forward pass,
WINDOWS_PER_BATCH = 64  # and token-stream windows: at most this many,
LOGITS_PER_BATCH = 1 << 28  # and fewer when the batch's logits (B x T x V) would pass this many values (1 GiB fp32)
PROGRESS_AFTER_S = 2.0  # an evaluation shows its progress on stderr once it has run this long

PAIR_METRICS = ("examples", "exact_match", "token_accuracy", "loss", "bleu", "chrf")
STREAM_METRICS = ("tokens", "loss", "perplexity", "bits_per_byte")
ROPE_SCALINGS = ("linear", "ntk", "yarn")


# ----------------------------------------------------------------------------------------------------
# 1. Metrics


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """exact_match (the share of predictions equal to their reference, 0-1), and sacrebleu's corpus BLEU and chrF
    (0-100, its default settings: BLEU on 13a-tokenized words, chrF on character 6-grams)."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references, at least one: got {len(predictions)} and "
                         f"{len(references)}")
    try:
        import sacrebleu
    except ImportError:
        raise UserError("BLEU and chrF come from sacrebleu, which is not installed: pip install 'sacrebleu>=2.4' "
                        "(or pip install -e . again)") from None
    return {
        "exact_match": sum(p == r for p, r in zip(predictions, references)) / len(references),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }


def target_sums(logits: torch.Tensor, targets: torch.Tensor,
                allowed: torch.Tensor | None = None) -> tuple[float, int, int]:
    """(summed cross-entropy in nats, correct argmax predictions, targets) of logits (B, T, V) against targets
    (B, T), -1 where there is none. The cross-entropy is over every logit, as the training loss is; the argmax only
    among the ids `allowed` ((V',) bool, V' <= V) marks, when given. One host sync."""
    mask = targets != -1
    chosen, y = logits[mask].float(), targets[mask]  # (N, V), (N,)
    nll = F.cross_entropy(chosen, y, reduction="sum")
    if allowed is not None:
        chosen = chosen[:, :len(allowed)].masked_fill(~allowed, float("-inf"))
    correct = (chosen.argmax(dim=-1) == y).sum()
    nll, correct = torch.stack([nll, correct.float()]).tolist()
    return nll, int(correct), int(y.numel())


def finite(x: float) -> float | None:
    """x, or None where it is not finite: JSON has no NaN or infinity."""
    return x if math.isfinite(x) else None


class Progress:
    """`label: done/total unit  rate unit/s  ETA` as one `\\r` line on stderr, shown only once the work has taken
    PROGRESS_AFTER_S (a short evaluation prints nothing) and redrawn at most ten times a second.
    (prepare_data.Progress, a corpus's MB and tokens/s, is rich's bar on a terminal.)"""

    def __init__(self, total: int, label: str, unit: str, enabled: bool = True):
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.done, self.t0, self.drawn, self.shown = 0, time.perf_counter(), 0.0, False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        elapsed = now - self.t0
        if not self.enabled or elapsed < PROGRESS_AFTER_S or (now - self.drawn < 0.1 and self.done < self.total):
            return
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        sys.stderr.write(f"\r{self.label}: {self.done:,}/{self.total:,} {self.unit}  {rate:,.1f} {self.unit}/s  "
                         f"ETA {eta:4.0f}s ")
        sys.stderr.flush()
        self.drawn, self.shown = now, True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def per_batch(limit: int, length: int, vocab: int) -> int:
    """Examples per forward pass: `limit`, or fewer where their logits would be too many."""
    return max(1, min(limit, LOGITS_PER_BATCH // max(1, length * vocab)))


# ----------------------------------------------------------------------------------------------------
# 2. What is evaluated: checked before anything is decoded, so that bad input costs no time and writes nothing



@dataclass(frozen=True)
class EvalPlan:
    run_dir: Path
    checkpoint: Path  # the checkpoint file
    data_dir: Path
    meta: dict  # the dataset's meta.json
    pairs: bool  # a pairs dataset (else a token stream)
    split: str
    model: dict  # the run's [model] config, as its checkpoint holds it


def describe_tokenizer(spec: dict) -> str:
    kind = spec.get("kind")
    if kind == "char" and isinstance(spec.get("chars"), str):
        return f"char, {len(spec['chars'])} characters"
    return str(kind)


def check_plan(run: Path, data: Path | None, split: str, beams: int | None, out: Path | None,
               checkpoint: str | None) -> EvalPlan:
    """The run's checkpoint and the dataset, checked against each other and against the options."""
    from checkpoint import find_checkpoint, load_checkpoint
    from pairs import PAIR_SPLITS, check_pairs_meta, is_pairs
    from dataset_format import SPLITS, read_meta

    checkpoint = find_checkpoint(run, checkpoint)
    state = load_checkpoint(checkpoint)
    config, tokenizer = state["config"], state.get("tokenizer") or {}
    run_kind = (state.get("data") or {}).get("kind", "tokens")
    special = (state.get("data") or {}).get("special_tokens")
    del state  # the weights are loaded again, for inference, once everything here is known to be right
    model = config.get("model", {})

    if data is None:
        trained_on = str((config.get("data") or {}).get("dir", ""))
        if not trained_on:  # an imported model: no data of its own
            raise UserError(f"{run} was imported and has no dataset of its own; pass the data to evaluate on with "
                            f"--data DIR (prepared with `minigpt prepare SOURCE --tokenizer {run}`)")
        data = Path(trained_on)
        if not (data / "meta.json").is_file():
            raise UserError(f"{run} trained on {data}, which is not a prepared dataset here; pass the data to "
                            "evaluate on with --data DIR")
    meta = read_meta(data)
    pairs = is_pairs(meta)
    if pairs:
        check_pairs_meta(meta, data)
    if run_kind != "pairs" and special is not None:
        raise UserError(f"{run} is an encoder-decoder pre-trained with span corruption: fine-tune it on pairs "
                        "(minigpt prepare task:NAME), then evaluate that run")
    if pairs and run_kind != "pairs":
        raise UserError(f"{run} was trained on a token stream; evaluate it on token-stream data (--data DIR)")
    if not pairs and run_kind == "pairs":
        raise UserError(f"{run} was trained on source/target pairs; evaluate it on a pairs dataset (--data DIR, "
                        "e.g. one written by `minigpt prepare task:NAME`)")
    if meta["tokenizer"] != tokenizer:
        raise UserError(f"{data} was prepared with another tokenizer ({describe_tokenizer(meta['tokenizer'])}) than "
                        f"{run} was trained with ({describe_tokenizer(tokenizer)}); prepare the data with the run's "
                        "tokenizer, or evaluate a run trained on it")
    have = [s for s in PAIR_SPLITS if s in meta["splits"]] if pairs else list(SPLITS)
    if split not in have:
        raise UserError(f"{data} has no {split!r} split; it holds: {', '.join(have)}")
    if not pairs:
        if beams is not None:
            raise UserError(f"--beams decodes targets for sources: {data} is a token stream, which eval scores by its "
                            "loss; drop --beams")
        if out is not None:
            raise UserError(f"--out writes each pair's prediction: {data} is a token stream, which has none; drop --out")
        if model.get("attn_mask") == "bidirectional":
            raise UserError(f"{run} is a masked language model (attn_mask = bidirectional): it has no next-token "
                            "loss to evaluate")
    vocab = model.get("vocab_size", 0)
    if beams is not None and beams > vocab:
        raise UserError(f"--beams ({beams}) is larger than the vocabulary ({vocab} ids); use fewer")
    return EvalPlan(checkpoint.parent, checkpoint, data, meta, pairs, split, model)


def check_options(beams: int | None, length_penalty: float | None, max_examples: int | None,
                  out: Path | None) -> None:
    """The options that need no file to be read."""
    from sample import check_beam_options

    check_beam_options(beams, length_penalty)
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples must be >= 1, got {max_examples}")
    if out is not None:
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'predictions.jsonl'}")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it first")


@dataclass(frozen=True)
class LengthOptions:
    """What --lengths asks for, checked: see evaluate_lengths."""

    lengths: tuple[int, ...]  # contexts to score with, ascending, each once
    stride: int | None  # windows advance by this many tokens; None: by their length (non-overlapping)
    per_position: bool  # also the loss by position in the window
    max_tokens: int | None  # score only this many tokens


def parse_lengths(lengths: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """`64,128,256` (or a list of ints) -> (64, 128, 256): each >= 1, ascending, each once."""
    parts = lengths.split(",") if isinstance(lengths, str) else list(lengths)
    try:
        values = [int(p.strip()) if isinstance(p, str) else p for p in parts]
    except ValueError:
        values = []
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise UserError(f"--lengths takes context lengths >= 1 separated by commas, e.g. 64,128,256; got {lengths!r}")
    return tuple(sorted(set(values)))


def check_length_options(lengths, stride: int | None, per_position: bool, max_tokens: int | None,
                         max_examples: int | None) -> LengthOptions | None:
    """--lengths and the options that only apply with it; None without --lengths."""
    if lengths is None:
        for name, given in (("--stride", stride is not None), ("--per-position", per_position),
                            ("--max-tokens", max_tokens is not None)):
            if given:
                raise UserError(f"{name} applies to scoring with several context lengths: add --lengths, e.g. "
                                "--lengths 64,128,256")
        return None
    values = parse_lengths(lengths)
    if max_examples is not None:
        raise UserError("--max-examples counts block_size windows; with --lengths, limit the tokens scored with "
                        "--max-tokens")
    if stride is not None and not 1 <= stride <= values[0]:
        raise UserError(f"--stride must be between 1 and the shortest length ({values[0]}): each window scores its "
                        f"last STRIDE positions; got {stride}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    return LengthOptions(values, stride, per_position, max_tokens)


def check_rope_options(rope_scaling: str | None, rope_factor: float | None):
    """(kind, factor) of --rope-scaling and --rope-factor, or None without them."""
    if rope_scaling is None and rope_factor is None:
        return None
    if rope_scaling is None:
        raise UserError("--rope-factor goes with --rope-scaling linear|ntk|yarn")
    if rope_scaling not in ROPE_SCALINGS:
        raise UserError(f"--rope-scaling takes {' | '.join(ROPE_SCALINGS)}, got {rope_scaling!r}")
    if rope_factor is None:
        raise UserError(f"--rope-scaling {rope_scaling} needs --rope-factor S (>= 1): how many times the trained "
                        "context to stretch RoPE over")
    if not (math.isfinite(rope_factor) and rope_factor >= 1):
        raise UserError(f"--rope-factor must be >= 1 (1 = unscaled), got {rope_factor}")
    return rope_scaling, float(rope_factor)


def check_extrapolation(plan: EvalPlan, run: Path, wanted: LengthOptions | None, rope) -> None:
    """--lengths and --rope-scaling against the run and its data."""
    model = plan.model
    if rope is not None:
        if model.get("pos_encoding", "learned") != "rope":
            raise UserError(f"--rope-scaling rescales rotary positions: {run} has pos_encoding = "
                            f"{model.get('pos_encoding', 'learned')!r}, not 'rope'; drop --rope-scaling")
        if model.get("arch", "decoder") != "decoder":
            raise UserError(f"--rope-scaling applies to decoder-only models; {run} is an encoder-decoder")
        if rope[0] == "yarn" and not model.get("rope_theta", 10000.0) > 1:
            raise UserError(f"--rope-scaling yarn ranks RoPE's pairs by wavelength, which needs rope_theta > 1; "
                            f"{run} has {model.get('rope_theta')}")
    if wanted is None:
        return
    if plan.pairs:
        raise UserError(f"--lengths scores a token stream with contexts of several lengths; {plan.data_dir} holds "
                        "source/target pairs: drop --lengths")
    if model.get("attn_mask", "causal") != "causal":
        raise UserError(f"--lengths scores a causal language model; {run} has attn_mask = {model['attn_mask']!r}, "
                        "whose prefix would move with every window")
    have, longest = plan.meta.get(f"{plan.split}_tokens", 0), wanted.lengths[-1]
    if have <= longest:
        raise UserError(f"the {plan.split} split of {plan.data_dir} has {have:,} tokens: scoring tokens after a "
                        f"context of {longest:,} needs more than {longest:,}; use shorter --lengths")


# ----------------------------------------------------------------------------------------------------
# 3. The evaluations


@torch.no_grad()
def evaluate_pairs(run, plan: EvalPlan, beams: int | None, length_penalty: float, max_examples: int | None,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """The metrics of a pairs split, and each example's {source, reference, prediction, correct}."""
    import sample
    import train
    from batches import check_pairs_fit, collate_pairs, to_device
    from pairs import open_pairs

    split = open_pairs(plan.data_dir, plan.split, plan.meta)
    n = min(split.n, max_examples or split.n)
    if n == 0:
        raise UserError(f"the {plan.split} split of {plan.data_dir} holds no pairs")
    cfg, special, tok = run.model.config, run.special, run.tokenizer
    check_pairs_fit((split.source_lengths[:n], split.target_lengths[:n]), cfg, f"{plan.data_dir} ({plan.split})",
                    fix="evaluate a split that fits, or a run trained with --set model.{option}={need}")
    examples = [split.pair(i) for i in range(n)]

    # teacher-forced: the loss and the token accuracy, a batch of pairs per forward pass
    nll, correct, count = 0.0, 0, 0
    batch = per_batch(PAIRS_PER_BATCH, cfg.block_size, cfg.padded_vocab_size)
    for start in range(0, n, batch):
        x, y = to_device(collate_pairs(examples[start:start + batch], cfg, special), run.rt.device)
        with run.rt.autocast():
            logits = train.forward(run.model, x, y)[0]
        sums = target_sums(logits, y, run.allowed)
        nll, correct, count = nll + sums[0], correct + sums[1], count + sums[2]

    # decoded: one source at a time, greedy or the best of a beam search
    sc = sample.SampleConfig(temperature=0.0)
    bar = Progress(n, "decoding", "examples", progress)
    rows = []
    for source, reference in examples:
        ids = sample.target_ids(run, source.tolist(), sc, 1, beams or 0, length_penalty)[0]
        prediction, reference_text = sample.decode_target(run, ids), tok.decode(reference.tolist())
        rows.append({"source": tok.decode(source.tolist()), "reference": reference_text, "prediction": prediction,
                     "correct": prediction == reference_text})
        bar.update()
    bar.close()

    texts = text_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    metrics = {"examples": n, "exact_match": texts["exact_match"], "token_accuracy": correct / count,
               "loss": nll / count, "bleu": texts["bleu"], "chrf": texts["chrf"]}
    if "baseline" in plan.meta:  # a task whose targets are edits of the source (modernize): what copying scores
        copied = text_metrics([r["source"] for r in rows], [r["reference"] for r in rows])
        metrics.update({f"copy_{k}": v for k, v in copied.items()})
    return metrics, rows


def stream_windows(n_tokens: int, block_size: int, max_windows: int | None) -> list[tuple[int, int]]:
    """(start, length) of consecutive, non-overlapping windows of block_size + 1 tokens that cover n_tokens: each
    predicts its tokens after the first; a last, shorter window takes what is left (if it holds a prediction)."""
    w = block_size + 1
    full, rest = divmod(n_tokens, w)
    windows = [(k * w, w) for k in range(full)] + ([(full * w, rest)] if rest >= 2 else [])
    return windows[:max_windows] if max_windows is not None else windows


@torch.no_grad()
def evaluate_stream(run, plan: EvalPlan, max_examples: int | None, progress: bool = True) -> dict:
    """loss, perplexity and bits per byte of a token-stream split."""
    import train
    from dataset_format import open_split

    cfg = run.model.config
    data = open_split(plan.data_dir, plan.split, plan.meta)
    windows = stream_windows(len(data), cfg.block_size, max_examples)
    if not windows:
        raise UserError(f"the {plan.split} split of {plan.data_dir} has {len(data)} tokens: too few to predict one")
    batch = per_batch(WINDOWS_PER_BATCH, cfg.block_size, cfg.padded_vocab_size)
    full = [w for w in windows if w[1] == cfg.block_size + 1]
    short = [w for w in windows if w[1] != cfg.block_size + 1]  # the last one, alone in its batch
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + ([short] if short else [])
    nll, count, n_bytes = 0.0, 0, 0
    bar = Progress(len(windows), "scoring", "windows", progress)
    for group in groups:
        start, length = group[0][0], group[0][1]
        xy = torch.from_numpy(np.asarray(data[start:start + len(group) * length], dtype=np.int64))
        xy = xy.view(len(group), length).to(run.rt.device)
        x, y = xy[:, :-1], xy[:, 1:]
        if cfg.attn_mask == "prefix" and cfg.prefix_len > 1:  # as in training: no targets inside the prefix
            y = y.clone()
            y[:, :cfg.prefix_len - 1] = -1
        with run.rt.autocast():
            logits = train.forward(run.model, x, y)[0]
        sums = target_sums(logits, y)
        nll, count = nll + sums[0], count + sums[2]
        n_bytes += len(run.tokenizer.decode_bytes(y[y != -1].tolist()))
        bar.update(len(group))
    bar.close()
    if count == 0:  # a split shorter than a prefix-LM's prefix
        raise UserError(f"the {plan.split} split of {plan.data_dir} has no token past the model's prefix to predict")
    loss = nll / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else math.inf}


def evaluate_run(run: str | Path, data: str | Path | None = None, split: str = "val", beams: int | None = None,
                 length_penalty: float | None = None, max_examples: int | None = None, out: str | Path | None = None,
                 checkpoint: str | None = None, device: str = "auto", progress: bool = True,
                 lengths: str | list[int] | None = None, stride: int | None = None, per_position: bool = False,
                 max_tokens: int | None = None, rope_scaling: str | None = None,
                 rope_factor: float | None = None) -> dict:
    """Evaluate a run (its folder, or one of its checkpoint files) on a split of a dataset (by default the one it
    trained on). Pairs: {examples, exact_match, token_accuracy, loss, bleu, chrf}; greedy decoding, or the best of a beam
    search with `beams`; `out` receives one JSON line per example. Token stream: {tokens, loss, perplexity,
    bits_per_byte}; with `lengths` ("64,128" or [64, 128]) the same tokens scored with each context length instead
    (evaluate_lengths). `rope_scaling` (linear | ntk | yarn) with `rope_factor` stretches a RoPE model's positions
    (model.RopeScaling). All also carry split, data and checkpoint_step (and beams, for pairs; 1 = greedy). Non-finite
    values come back as None. Raises UserError for bad input before any work is done, and writes nothing then."""
    import sample
    from model import RopeScaling
    from runtime import resolve_device

    run, out = Path(run), (Path(out) if out is not None else None)
    check_options(beams, length_penalty, max_examples, out)
    wanted = check_length_options(lengths, stride, per_position, max_tokens, max_examples)
    rope = check_rope_options(rope_scaling, rope_factor)
    resolve_device(device)  # a bad --device is a one-line error before anything is read
    plan = check_plan(run, Path(data) if data is not None else None, split, beams, out, checkpoint)
    check_extrapolation(plan, run, wanted, rope)
    loaded = sample.load_for_inference(plan.checkpoint, device=device)
    if rope is not None:  # for this evaluation only: the checkpoint is not touched
        if loaded.model.config.rope_scaling != "none":  # one stretch at a time: the trained one stays
            raise UserError(f"{run} was trained with {loaded.model.config.rope_scaling} RoPE scaling, which "
                            "--rope-scaling would replace; drop --rope-scaling")
        loaded.model.rope_scaling = RopeScaling(*rope, original=loaded.model.config.block_size)
    if wanted is not None:
        metrics, rows = evaluate_lengths(loaded, plan, wanted, progress), []
    elif plan.pairs:
        metrics, rows = evaluate_pairs(loaded, plan, beams, 1.0 if length_penalty is None else length_penalty,
                                       max_examples, progress)
        metrics["beams"] = beams or 1
    else:
        metrics, rows = evaluate_stream(loaded, plan, max_examples, progress), []
    if out is not None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        from dataset_format import atomic_write

        atomic_write(out, lambda f: f.write(text))
    result = {k: finite(v) if isinstance(v, float) else v for k, v in metrics.items()}
    if rope is not None:
        result.update(rope_scaling=rope[0], rope_factor=rope[1])
    return {**result, "split": plan.split, "data": str(plan.data_dir), "checkpoint_step": loaded.step}


# ----------------------------------------------------------------------------------------------------
# 4. Length extrapolation
#
# One set of targets, scored with a context of each length: the tokens data[first:first + n] of the split, with
# first = the longest length, so that every length (and every stride) has room for its whole context before the
# first target. Targets are cut into consecutive chunks of `stride` tokens (by default the length itself); the
# chunk data[t0:t1] is scored by one forward pass over a window of size = L - stride + (t1 - t0) tokens,
# data[t1 - 1 - size:t1 - 1], whose last t1 - t0 positions predict it (the others are context only). The target
# at position p of its window is predicted from the window's first p + 1 tokens. Non-overlapping windows (stride =
# L): windows start one token before their first target, so a target sees 1 to L tokens, few at a window's start,
# as in training. Sliding windows (stride S): every target is scored once, seeing L - S + 1 to L tokens. A window
# that scores fewer than `stride` targets (the last) is as much shorter. Past block_size a query attends to every
# position before it in the window (a model's own attn_window still limits it); learned positions have no
# embedding there, and such lengths are reported as not applicable.


def length_windows(first: int, n: int, length: int, stride: int | None) -> list[tuple[int, int, int]]:
    """(start, size, scored) of the windows that score the targets data[first:first + n] with contexts of `length`:
    the model reads data[start:start + size], and its last `scored` positions predict their targets."""
    step = stride or length
    windows = []
    for t0 in range(first, first + n, step):
        t1 = min(t0 + step, first + n)
        size = length - step + (t1 - t0)
        windows.append((t1 - 1 - size, size, t1 - t0))
    return windows


def position_buckets(lengths: tuple[int, ...], block_size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of positions in a window: 0, 1, 2-3, 4-7, ... doubling, also cut at block_size (so that
    positions past the training context are never mixed with those inside it) and at every length."""
    longest = max(lengths)
    edges = {0, longest, *lengths, *(1 << i for i in range(longest.bit_length()))}
    edges = sorted(e for e in edges | {block_size} if e <= longest)
    return list(zip(edges[:-1], edges[1:]))


@contextmanager
def context_of(model, length: int):
    """The model reading windows of `length` tokens: block_size bounds the positions a query sees (GPTConfig.window),
    so past it the model is given a block_size of `length`, and every query sees all the positions before it (or its
    attn_window). Learned positions end at block_size whatever it says: evaluate_lengths never runs them past it."""
    cfg = model.config
    if length > cfg.block_size:
        model.config = replace(cfg, block_size=length)
    try:
        yield model
    finally:
        model.config = cfg


def score_windows(run, data, windows: list[tuple[int, int, int]], length: int,
                  bar: Progress) -> tuple[np.ndarray, np.ndarray]:
    """Summed nats and target counts by position in the window (length,) over these windows (length_windows)."""
    cfg = run.model.config
    nats, counts = np.zeros(length), np.zeros(length, dtype=np.int64)
    batch = per_batch(WINDOWS_PER_BATCH, length, cfg.padded_vocab_size)
    full = [w for w in windows if w[1] == length]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if w[1] != length]
    for group in groups:
        size = group[0][1]
        xy = np.stack([np.asarray(data[start:start + size + 1], dtype=np.int64) for start, _, _ in group])
        xy = torch.from_numpy(xy).to(run.rt.device)
        x, y = xy[:, :-1], xy[:, 1:].clone()
        for row, (_, _, scored) in enumerate(group):
            y[row, :size - scored] = -1  # context only: scored by the window before
        with context_of(run.model, size), run.rt.autocast():
            logits = run.model(x)[0]
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
        sums = torch.stack([nll.view(y.shape).sum(0), (y != -1).sum(0).float()]).double().cpu().numpy()
        nats[:size] += sums[0]
        counts[:size] += sums[1].astype(np.int64)
        bar.update(len(group))
    return nats, counts


def stream_metrics(nats: float, count: int, n_bytes: int) -> dict:
    """tokens, loss, perplexity and bits per byte of `count` targets of `n_bytes` UTF-8 bytes scored `nats` in all."""
    loss = nats / count
    return {"tokens": count, "loss": finite(loss), "perplexity": finite(math.exp(loss) if loss < 700 else math.inf),
            "bits_per_byte": finite(nats / math.log(2) / n_bytes) if n_bytes else None}


@torch.no_grad()
def evaluate_lengths(run, plan: EvalPlan, wanted: LengthOptions, progress: bool = True) -> dict:
    """{lengths: [{length, tokens, loss, perplexity, bits_per_byte[, per_position]}, ...], scored_tokens,
    first_target, stride, block_size, attn_window, pos_encoding}: the same tokens scored with each context length
    (see the section's comment). A length past a learned-position model's block_size has None for its numbers;
    per_position is [{first, last, tokens, loss}] over position_buckets (positions first..last of the window)."""
    from dataset_format import open_split

    cfg = run.model.config
    data = open_split(plan.data_dir, plan.split, plan.meta)
    first = wanted.lengths[-1]
    n = min(len(data) - first, wanted.max_tokens or len(data))
    n_bytes = len(run.tokenizer.decode_bytes(np.asarray(data[first:first + n]).tolist()))
    runs = [L for L in wanted.lengths if cfg.pos_encoding != "learned" or L <= cfg.block_size]
    plans = {L: length_windows(first, n, L, wanted.stride) for L in runs}
    bar = Progress(sum(len(w) for w in plans.values()), "scoring", "windows", progress)
    buckets = position_buckets(wanted.lengths, cfg.block_size)
    rows = []
    for L in wanted.lengths:
        if L not in plans:  # learned positions end at block_size: nothing to score, nothing made up
            row = {"length": L, "tokens": None, "loss": None, "perplexity": None, "bits_per_byte": None}
            if wanted.per_position:
                row["per_position"] = None
            rows.append(row)
            continue
        nats, counts = score_windows(run, data, plans[L], L, bar)
        row = {"length": L, **stream_metrics(float(nats.sum()), int(counts.sum()), n_bytes)}
        if wanted.per_position:
            row["per_position"] = [
                {"first": a, "last": b - 1, "tokens": int(counts[a:b].sum()),
                 "loss": finite(float(nats[a:b].sum() / counts[a:b].sum())) if counts[a:b].sum() else None}
                for a, b in buckets if b <= L]
        rows.append(row)
    bar.close()
    return {"lengths": rows, "scored_tokens": n, "first_target": first, "stride": wanted.stride,
            "block_size": cfg.block_size, "attn_window": cfg.attn_window, "pos_encoding": cfg.pos_encoding}


# ----------------------------------------------------------------------------------------------------
# 5. The tables


def format_result(result: dict, run: str | Path) -> str:
    """The metrics as an aligned table (bench's), titled with what was evaluated."""
    from bench import format_table

    if "lengths" in result:
        return format_lengths(result, run)
    names = PAIR_METRICS if "exact_match" in result else STREAM_METRICS
    names += tuple(k for k in result if k.startswith("copy_"))  # the copy-the-source baseline, where reported
    decoding = ""
    if "beams" in result:
        decoding = ", greedy" if result["beams"] == 1 else f", beam search ({result['beams']} beams)"
    if "rope_scaling" in result:
        decoding += f", RoPE {result['rope_scaling']} x{result['rope_factor']:g}"
    title = (f"eval {run} (step {result['checkpoint_step']:,}) on {result['data']} "
             f"({result['split']}{decoding})")
    return format_table(title, {k: result[k] for k in names})


def columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns, the first left-aligned, indented by two."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [header, *rows]]


def format_lengths(result: dict, run: str | Path) -> str:
    """One row per length; with per_position, a second table of the loss by position in the window."""
    def num(v, digits=3):
        return "n/a" if v is None else f"{v:,.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"

    windows = (f"windows sliding by {result['stride']}" if result["stride"] else "non-overlapping windows")
    rope = f", RoPE {result['rope_scaling']} x{result['rope_factor']:g}" if "rope_scaling" in result else ""
    lines = [f"eval {run} (step {result['checkpoint_step']:,}) on {result['data']} ({result['split']}: "
             f"{result['scored_tokens']:,} tokens from token {result['first_target']:,}, {windows}{rope})"]
    rows = [[f"{r['length']:,}", "-" if r["tokens"] is None else f"{r['tokens']:,}", num(r["loss"]),
             num(r["perplexity"], 2), num(r["bits_per_byte"])] for r in result["lengths"]]
    lines += columns(["length", "tokens", "loss", "perplexity", "bits_per_byte"], rows)
    if any(r["loss"] is None and r["tokens"] is None for r in result["lengths"]):
        lines.append(f"  n/a: learned positions end at block_size {result['block_size']:,}")
    by_length = {r["length"]: r["per_position"] for r in result["lengths"] if r.get("per_position")}
    if by_length:
        spans = sorted({(b["first"], b["last"]) for buckets in by_length.values() for b in buckets})
        table = []
        for a, b in spans:
            cells = []
            for r in result["lengths"]:
                hit = [x for x in r.get("per_position") or [] if (x["first"], x["last"]) == (a, b)]
                cells.append(num(hit[0]["loss"]) if hit and hit[0]["loss"] is not None else "-")
            if any(c != "-" for c in cells):  # with --stride the first positions of every window are context only
                table.append([str(a) if a == b else f"{a}-{b}", *cells])
        lines.append("loss by position in the window (position p predicts from p + 1 tokens)")
        lines += columns(["position", *(f"{r['length']:,}" for r in result["lengths"])], table)
    return "\n".join(lines)
