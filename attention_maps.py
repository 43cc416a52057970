"""Looking inside a trained run: `minigpt attention`. What every head of every layer attends to, for a prompt or an
induction probe, as pictures (attention.png/.svg), an interactive page (attention.html), a score card per head
(heads.json and a table), and the logit lens (lens.png and a table: what each layer would predict next).

The maps come from the model's own pieces run one block at a time through the reference (written-out softmax)
attention, which tests hold equal to the fast path; the mask each query had (causal, window, prefix, bidirectional,
source padding) is read from the same AttentionInputs the model used, so a masked key is told apart from a key given
zero weight. An encoder-decoder gives three stacks: the encoder's self-attention, the decoder's self-attention and the
decoder's cross-attention (target queries x source keys).

Read top to bottom:
  1. head metrics, rollout and aggregates: pure numpy on (T, S) maps and masks
  2. capture: the maps and each layer's hidden states, from a GPT or an encoder-decoder
  3. what is looked at: the inputs, every one checked before any work is done
  4. pictures: the map grid and the logit lens
  5. tables, and attention_run, which the CLI calls
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from errors import UserError

# A head is labelled with the first of these types whose score reaches its threshold (README: "minigpt attention").
LABEL_RULES = (("induction", "induction", 0.3), ("previous_token", "previous-token", 0.5), ("sink", "sink", 0.5),
               ("entropy", "broad", 0.9))
AGGREGATES = ("mean", "max", "rollout")
PROBES = ("induction",)
PROBE_SEED = 0  # the probe's random tokens: the same every time, so runs compare
LENS_TOP = 5  # guesses per layer in the logit-lens table
LENS_COLUMNS = 48  # positions the lens picture shows (the last ones)


# ----------------------------------------------------------------------------------------------------
# 1. Head metrics, rollout and aggregates


def head_metrics(weights: np.ndarray, allowed: np.ndarray, period: int | None = None,
                 self_attention: bool = True) -> dict:
    """Scores of one head's map `weights` (T, S) (rows: queries, each a distribution over the keys it may see)
    under the mask `allowed` (T, S) bool. For self-attention query t and key t sit at the same position.

    entropy         the row's entropy over log(keys the query may see): 0 = one key, 1 = uniform over all it may see
    mean_distance   the mean |query - key| the weight goes to (self-attention)
    previous_token  the weight on the key just before the query (self-attention)
    sink            the weight on the first key
    induction       on the induction probe (`period` random tokens, then the same again): the weight a token of the
                    repeat puts on the token that followed its first occurrence (key t - period + 1)
    entropy, mean_distance and sink are averaged over the queries that may see at least two keys (a query with one
    choice says nothing about the head), previous_token over the queries that may see the key before them,
    induction over the repeat's queries that may see their key. None where no query qualifies."""
    w = np.asarray(weights, dtype=np.float64)
    allowed = np.asarray(allowed, dtype=bool)
    T, S = w.shape
    n_keys = allowed.sum(axis=1)
    choosing = n_keys >= 2
    out: dict = {"entropy": None, "mean_distance": None, "previous_token": None, "sink": None, "induction": None}
    if choosing.any():
        p = w[choosing]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        out["entropy"] = float(np.mean(-plogp.sum(axis=1) / np.log(n_keys[choosing])))
        out["sink"] = float(np.mean(p[:, 0]))
        if self_attention:
            distance = np.abs(np.arange(T)[:, None] - np.arange(S)[None, :])[choosing]
            out["mean_distance"] = float(np.mean((p * distance).sum(axis=1)))
    if not self_attention:
        return out
    t = np.arange(1, T)
    before = t[allowed[t, t - 1]]
    if before.size:
        out["previous_token"] = float(np.mean(w[before, before - 1]))
    if period is not None:
        t = np.arange(period, min(2 * period, T))
        t = t[allowed[t, t - period + 1]]
        if t.size:
            out["induction"] = float(np.mean(w[t, t - period + 1]))
    return out


def head_label(metrics: dict) -> str | None:
    """The head's type: the first rule of LABEL_RULES whose score reaches its threshold, or None."""
    for key, label, threshold in LABEL_RULES:
        if metrics.get(key) is not None and metrics[key] >= threshold:
            return label
    return None


def rollout(weights: np.ndarray) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) of self-attention maps (L, nh, T, T): with each layer's heads averaged,
    A' = 0.5 A + 0.5 I (the residual stream), rows renormalised, multiplied through the layers. Returns the rollout
    through each layer, (L, T, T); the last is the whole stack's. Every row sums to 1."""
    w = np.asarray(weights, dtype=np.float64)
    T = w.shape[-1]
    out, total = [], np.eye(T)
    for layer in w.mean(axis=1):
        step = 0.5 * layer + 0.5 * np.eye(T)
        step /= step.sum(axis=-1, keepdims=True)
        total = step @ total
        out.append(total)
    return np.stack(out)


def aggregate(weights: np.ndarray, how: str) -> np.ndarray:
    """Each layer's heads combined, (L, nh, T, S) -> (L, T, S): their mean, their max, or the rollout through it."""
    if how == "mean":
        return weights.mean(axis=1)
    if how == "max":
        return weights.max(axis=1)
    return rollout(weights)


# ----------------------------------------------------------------------------------------------------
# 2. Capture


@dataclass
class Stack:
    """The attention maps of one stack of layers for one sequence."""

    name: str  # decoder | encoder | cross
    weights: np.ndarray  # (L, nh, T, S) float32
    allowed: np.ndarray  # (T, S) bool: the keys each query may see (the same for every layer and head)
    queries: list[int]  # token ids at the query positions (T,)
    keys: list[int]  # token ids at the key positions (S,)
    kv_heads: int  # key/value heads: query head h reads key/value head h // (nh // kv_heads)
    self_attention: bool = True
    prefix: int = 0  # a prefix-LM's prefix (drawn on the maps)
    window: int = 0  # a sliding window (drawn by its mask)

    @property
    def n_layer(self) -> int:
        return self.weights.shape[0]

    @property
    def n_head(self) -> int:
        return self.weights.shape[1]

    def kv_group(self, head: int) -> int:
        return head // (self.n_head // self.kv_heads)


def allowed_keys(inputs, T: int, S: int) -> np.ndarray:
    """(T, S) bool: the keys each query may see, read from the AttentionInputs the model attends with."""
    import torch

    from model import causal_mask

    if inputs.is_causal:
        return causal_mask(T, S).numpy()
    if inputs.mask is None:
        return np.ones((T, S), dtype=bool)
    mask = inputs.mask
    if mask.dtype != torch.bool:  # ALiBi's float bias: -inf where masked
        mask = torch.isfinite(mask)
    while mask.dim() > 2:  # (nh, T, S), (B, 1, T, S): the same for every head of our one sequence
        mask = mask[0]
    return mask.expand(T, S).cpu().numpy().copy()


def maps_array(maps: list) -> np.ndarray:
    """Each layer's (1, nh, T, S) weights -> (L, nh, T, S) float32 on the host."""
    import torch

    return torch.stack([m[0] for m in maps]).float().cpu().numpy()


def capture_decoder(model, ids: list[int], prefix_len: int | None = None) -> tuple[Stack, list]:
    """A GPT run block by block over ids: its maps, and the hidden state (1, T, C) after the embedding and after each
    block (the logit lens reads them). The same steps as GPT.trunk, each block with reference attention."""
    import torch

    from model import embed

    cfg = model.config
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    prefix_len = cfg.prefix_len if prefix_len is None else prefix_len
    positions = torch.arange(len(ids), device=device)
    inputs = model.attention_inputs(positions, None, prefix_len)
    with torch.no_grad():
        x = model.drop(embed(cfg, model.wte, model.wpe, idx, positions))
        hidden, maps = [x], []
        for i, block in enumerate(model.blocks):
            x, w = block(x, inputs, None, i, True)
            hidden.append(x)
            maps.append(w)
    stack = Stack("decoder", maps_array(maps), allowed_keys(inputs, len(ids), len(ids)), list(ids), list(ids),
                  cfg.kv_heads, True, prefix_len if cfg.attn_mask == "prefix" else 0, cfg.attn_window)
    return stack, hidden


def capture_encoder_decoder(model, source: list[int], target: list[int]) -> tuple[list[Stack], list]:
    """An encoder-decoder run block by block: the encoder's self-attention over the source, and the decoder's
    self-attention and cross-attention over `target` (what the decoder reads: <start> and the target), and the
    decoder's hidden states. The same steps as EncoderDecoder.encode and DecoderBlock, with reference attention."""
    import torch

    from model import attention_inputs, embed, residual

    cfg, enc = model.config, model.encoder_config
    device = next(model.parameters()).device
    slopes = getattr(model, "alibi_slopes", None)
    src = torch.tensor([source], dtype=torch.long, device=device)
    tgt = torch.tensor([target], dtype=torch.long, device=device)
    spos, tpos = torch.arange(len(source), device=device), torch.arange(len(target), device=device)
    enc_inputs = attention_inputs(enc, spos, None, 0, slopes)
    dec_inputs = attention_inputs(cfg, tpos, None, 0, slopes)
    with torch.no_grad():
        x = model.drop(embed(enc, model.wte, model.encoder_wpe, src, spos))
        enc_maps = []
        for block in model.encoder:
            x, w = block(x, enc_inputs, None, 0, True)
            enc_maps.append(w)
        cross = model.cross_cache(model.encoder_ln_f(x))
        y = model.drop(embed(cfg, model.wte, model.wpe, tgt, tpos))
        hidden, self_maps, cross_maps = [y], [], []
        for i, block in enumerate(model.blocks):
            post = block.post_norm
            y, w = residual(y, block.ln_1, lambda h: block.attn(h, dec_inputs, None, i, True), post)
            self_maps.append(w)
            y, w = residual(y, block.ln_2, lambda h: block.cross(h, cross.kv[i], cross.inputs, True), post)
            cross_maps.append(w)
            y, _ = residual(y, block.ln_3, lambda h: (block.mlp(h), None), post)
            hidden.append(y)
    S, T = len(source), len(target)
    stacks = [
        Stack("encoder", maps_array(enc_maps), allowed_keys(enc_inputs, S, S), list(source), list(source),
              cfg.kv_heads),
        Stack("decoder", maps_array(self_maps), allowed_keys(dec_inputs, T, T), list(target), list(target),
              cfg.kv_heads, window=cfg.attn_window),
        Stack("cross", maps_array(cross_maps), np.ones((T, S), dtype=bool), list(target), list(source),
              cfg.kv_heads, self_attention=False),
    ]
    return stacks, hidden


def logit_lens(model, hidden: list, allowed_ids) -> np.ndarray:
    """Each hidden state (1, T, C) read through the final norm and the output layer: next-token probabilities
    (L + 1, T, V') over the ids `allowed_ids` ((V',) long) may hold. The last row is the model's own prediction."""
    import torch

    with torch.no_grad():
        rows = [torch.softmax(model.lm_head(model.ln_f(h))[0][:, allowed_ids].float(), dim=-1) for h in hidden]
    return torch.stack(rows).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# 3. What is looked at: checked before anything is computed or written


def induction_probe(vocab_size: int, length: int, seed: int = PROBE_SEED) -> list[int]:
    """`length` // 2 random tokens, then the same tokens again: an induction head, at each token of the repeat,
    attends to the token that followed it the first time. Drawn without repeats where the vocabulary allows."""
    n = length // 2
    if n < 2:
        raise UserError(f"the induction probe needs a context of at least 4 tokens; the model attends to {length}")
    rng = np.random.default_rng(seed)
    half = rng.choice(vocab_size, size=n, replace=vocab_size < n).tolist()
    return half + half


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass a folder to write the maps into")


def read_prompt(prompt: str | None, prompt_file: Path | None, probe: str | None) -> str | None:
    """The prompt text, or None for the probe; exactly one source of tokens must be given."""
    given = [name for name, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--probe", probe))
             if v is not None]
    if len(given) != 1:
        raise UserError("pass one of --prompt TEXT, --prompt-file F or --probe induction"
                        + (f", not {' and '.join(given)}" if given else ""))
    if probe is not None:
        if probe not in PROBES:
            raise UserError(f"--probe takes {' | '.join(PROBES)}, got {probe!r}")
        return None
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if not prompt:
        raise UserError("the prompt is empty: pass some text with --prompt or --prompt-file, or --probe induction")
    return prompt


def check_options(layer: int | None, head: int | None, aggregate_how: str | None, stack: str | None) -> None:
    if aggregate_how is not None and aggregate_how not in AGGREGATES:
        raise UserError(f"--aggregate takes {' | '.join(AGGREGATES)}, got {aggregate_how!r}")
    if aggregate_how is not None and head is not None:
        raise UserError("--head picks one head and --aggregate combines a layer's heads: drop one of them")
    if stack is not None and stack not in ("decoder", "encoder", "cross"):
        raise UserError(f"--stack takes decoder | encoder | cross, got {stack!r}")


def too_long(what: str, n: int, limit: int, option: str) -> UserError:
    return UserError(f"{what} is {n} tokens, longer than the {limit} the model can attend to at once "
                     f"(model.{option}); shorten it")


@dataclass
class Sequence:
    """The tokens the maps are drawn for."""

    ids: list[int]  # a decoder-only model's sequence, or an encoder-decoder's decoder input (<start> target)
    source: list[int] | None = None  # an encoder-decoder's source
    prefix_len: int | None = None  # a prefix-LM's prefix (None: the model's own prefix_len)
    period: int | None = None  # the induction probe: its random tokens, repeated once after them
    notes: list[str] = field(default_factory=list)


def sequence_for(run, prompt: str | None, target: str | None) -> Sequence:
    """The sequence to look at: the prompt (a token stream's run), `source <sep> target` (a decoder-only run trained
    on pairs) or source and `<start> target` (an encoder-decoder), the target decoded greedily unless given; or the
    induction probe, sized to the context, when prompt is None."""
    import sample as sampler

    cfg, tok, special = run.model.config, run.tokenizer, run.special
    mask = cfg.mask_token
    room = cfg.block_size - (mask is not None)  # a masked LM reads a [MASK] after the prompt, as `sample` does
    if target is not None and special is None:
        raise UserError("--target is the target of a source: this run was trained on a token stream, not pairs; "
                        "drop --target")
    if prompt is None:
        if cfg.arch == "encoder_decoder":
            raise UserError("the induction probe repeats tokens within one sequence; an encoder-decoder reads a "
                            "source: pass --prompt SOURCE (and --target TEXT with repeats to see its decoder's heads)")
        if target is not None:
            raise UserError("--probe induction replaces the whole sequence: drop --target")
        # sized to the context; under a sliding window, so that the repeat still sees the first occurrence
        ids = induction_probe(tok.vocab_size, min(room, 2 * cfg.window))
        return Sequence(ids + ([mask] if mask is not None else []), period=len(ids) // 2)
    ids = tok.encode_prompt(prompt)  # as sampling encodes it: a BOS where the tokenizer adds one
    if special is None:
        if len(ids) > room:
            raise too_long("the prompt", len(ids), room, "block_size" + (", less the [MASK] read after it"
                                                                          if mask is not None else ""))
        return Sequence(ids + ([mask] if mask is not None else []))
    # pairs: the prompt is a source
    encoder_decoder = cfg.arch == "encoder_decoder"
    limit, option = (cfg.source_size, "source_block_size") if encoder_decoder else (cfg.block_size - 1, "block_size")
    if len(ids) > limit:
        raise too_long("the source", len(ids), limit, option)
    room = cfg.block_size - 1 if encoder_decoder else cfg.block_size - len(ids) - 1  # for the target
    notes = []
    if target is not None:
        target_ids = tok.encode(target)
        if len(target_ids) > room:
            raise too_long("--target", len(target_ids), room, "block_size, with "
                           + ("<start>" if encoder_decoder else "the source and <sep>"))
    elif room < 1:
        target_ids = []
    else:
        sc = sampler.SampleConfig(temperature=0.0, max_new_tokens=room)
        target_ids = sampler.target_ids(run, ids, sc, 1, 0)[0]
        notes.append(f"target (greedy): {sampler.decode_target(run, target_ids)!r}")
    if encoder_decoder:
        return Sequence([special.bos, *target_ids], source=ids, notes=notes)
    return Sequence([*ids, special.sep, *target_ids], prefix_len=len(ids) + 1, notes=notes)


def token_label(run, t: int) -> str:
    """A token's text as the tokenizer writes it; special tokens by name."""
    tok, special, cfg = run.tokenizer, run.special, run.model.config
    if t < tok.vocab_size:
        return tok.decode_bytes([t]).decode("utf-8", errors="replace")
    if t == cfg.mask_token:
        return "[MASK]"
    if special is not None:
        names = {special.eos: "<end>", special.pad: "<pad>", special.bos: "<start>", special.sep: "<sep>"}
        if t in names:
            return names[t]
        if t in special.sentinels:
            return f"<extra_id_{special.sentinels.index(t)}>"
    return f"<{t}>"


def shown(label: str) -> str:
    """A label for a picture: whitespace made visible."""
    return label.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣") or "∅"


# ----------------------------------------------------------------------------------------------------
# 4. Pictures


@dataclass
class Panel:
    title: str
    values: np.ndarray  # (T, S)
    allowed: np.ndarray  # (T, S) bool
    queries: list[str]
    keys: list[str]
    prefix: int = 0


def panels_for(stacks: list[Stack], labels: Callable[[list[int]], list[str]], layer: int | None, head: int | None,
               how: str | None) -> tuple[list[list[Panel]], list[str]]:
    """The rows of panels to draw, and notes: per stack, a row per layer of its heads (or of the heads selected), or
    with `how` one row of each layer's aggregate (rollout: through that layer; self-attention stacks only)."""
    rows, notes = [], []
    for s in stacks:
        q, k = labels(s.queries), labels(s.keys)
        layers = range(s.n_layer) if layer is None else [layer]
        heads = range(s.n_head) if head is None else [head]
        gqa = s.kv_heads != s.n_head
        if how is None:
            for i in layers:
                rows.append([Panel(f"{s.name} L{i} H{h}" + (f" kv{s.kv_group(h)}" if gqa else ""), s.weights[i, h],
                                   s.allowed, q, k, s.prefix) for h in heads])
            continue
        if how == "rollout" and not s.self_attention:
            notes.append(f"rollout follows the residual stream of one sequence: the {s.name} stack is left out")
            continue
        combined = aggregate(s.weights, how)
        word = "rollout through" if how == "rollout" else how + " of"
        rows.append([Panel(f"{s.name}: {word} L{i}", combined[i], s.allowed, q, k, s.prefix) for i in layers])
    return rows, notes


def tick_step(n: int, most: int) -> int:
    return max(1, math.ceil(n / most))


def draw_maps(rows: list[list[Panel]], path_stem: Path) -> list[Path]:
    """The panels as a grid (or one map at full size), written as PNG and SVG. Colour is the weight (square-root
    scale, so that small weights show); masked keys are hatched grey, apart from keys given zero weight (white)."""
    from matplotlib.colors import PowerNorm

    from plots import pyplot

    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    single = n_rows == 1 and n_cols == 1
    T, S = rows[0][0].values.shape
    if single:
        side = min(16.0, max(6.0, 0.12 * max(T, S)))
        fig, axes = plt.subplots(1, 1, figsize=(side * min(1.6, max(0.6, S / T)) + 1.5, side), squeeze=False)
        most = 160
    else:
        cell = 2.4
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1.2, cell * n_rows + 0.8), squeeze=False)
        most = 24
    cmap = plt.get_cmap("Blues").with_extremes(bad=(0, 0, 0, 0))  # masked cells show the hatched background
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    image = None
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            p = row[c]
            ax.patch.set_facecolor("#dddddd")
            ax.patch.set_hatch("////")
            ax.patch.set_edgecolor("#aaaaaa")
            image = ax.imshow(np.ma.masked_array(p.values, ~p.allowed), cmap=cmap, norm=norm, interpolation="nearest",
                              aspect="auto")
            if p.prefix:
                for line in (ax.axvline, ax.axhline):
                    line(p.prefix - 0.5, color="#d62728", linestyle="--", linewidth=0.8)
            ax.set_title(p.title, fontsize=10 if single else 7)
            qn, kn = len(p.queries), len(p.keys)
            ys, xs = tick_step(qn, most), tick_step(kn, most)
            size = 7 if single else 5
            last_of_stack = r == n_rows - 1 or rows[r + 1][0].title.split()[0] != p.title.split()[0]
            if single or c == 0:
                ax.set_yticks(range(0, qn, ys), [shown(t) for t in p.queries[::ys]], fontsize=size)
            else:
                ax.set_yticks([])
            if single or last_of_stack:
                ticks = [shown(t) for t in p.keys[::xs]]
                ax.set_xticks(range(0, kn, xs), ticks, fontsize=size, rotation=90 if max(map(len, ticks)) > 1 else 0)
            else:
                ax.set_xticks([])
    if single:
        fig.colorbar(image, ax=axes[0][0], fraction=0.04, pad=0.02, label="attention weight (hatched: masked)")
        axes[0][0].set_xlabel("key")
        axes[0][0].set_ylabel("query")
    else:
        fig.suptitle("attention: rows are queries, columns keys; hatched = masked, white = zero weight", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title above the grid
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=110 if not single else 100)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def draw_lens(probs: np.ndarray, vocab: list[int], inputs: list[str], label: Callable[[int], str],
              path: Path) -> Path:
    """The logit lens as a picture: rows are layers (the embedding at the bottom), columns the last positions, each
    cell the top next-token guess written in it, coloured by its probability."""
    from plots import pyplot

    plt = pyplot()
    L1, T, _ = probs.shape
    first = max(0, T - LENS_COLUMNS)
    p = probs[:, first:]
    top = p.argmax(axis=-1)
    top_p = np.take_along_axis(p, top[..., None], axis=-1)[..., 0]
    cols = T - first
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * cols + 2), max(3.0, 0.4 * L1 + 1.5)))
    image = ax.imshow(top_p, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    size = 7 if cols <= 24 else 5
    for layer in range(L1):
        for j in range(cols):
            ax.text(j, layer, shown(label(vocab[top[layer, j]]))[:6], ha="center", va="center", fontsize=size,
                    color="white" if top_p[layer, j] < 0.6 else "black")
    ax.set_yticks(range(L1), ["embed"] + [f"L{i}" for i in range(L1 - 1)], fontsize=7)
    ticks = [shown(t) for t in inputs[first:]]
    ax.set_xticks(range(cols), ticks, fontsize=size, rotation=90 if max(map(len, ticks)) > 1 else 0)
    ax.set_xlabel("input token (each column: the guess for the token after it)")
    ax.set_title("logit lens: each layer's top next-token guess, read through the final norm and output layer",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="probability of the top guess")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# 5. Tables, and the command


def heads_table(heads: list[dict]) -> str:
    def num(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"{'stack':<8} {'layer':>5} {'head':>4} {'kv':>3} {'entropy':>7} {'dist':>6} {'prev':>6} {'sink':>6} "
             f"{'induct':>6}  label"]
    for h in heads:
        lines.append(f"{h['stack']:<8} {h['layer']:>5} {h['head']:>4} {h['kv_group']:>3} {num(h['entropy']):>7} "
                     f"{num(h['mean_distance'], '{:.2f}'):>6} {num(h['previous_token']):>6} {num(h['sink']):>6} "
                     f"{num(h['induction']):>6}  {h['label'] or '-'}")
    return "\n".join(lines)


def lens_table(probs: np.ndarray, vocab: list[int], label: Callable[[int], str], after: str) -> str:
    """Each layer's top guesses for the token after the last position."""
    lines = [f"logit lens: each layer's top {LENS_TOP} guesses for the token after {after}"]
    last = probs[:, -1]
    for layer, row in enumerate(last):
        order = np.argsort(-row)[:LENS_TOP]
        name = "embed" if layer == 0 else f"L{layer - 1}"
        guesses = "  ".join(f"{shown(label(vocab[i]))!s:>8} {row[i]:.3f}" for i in order)
        lines.append(f"{name:>6}  {guesses}")
    return "\n".join(lines)


def check_range(stacks: list[Stack], layer: int | None, head: int | None) -> None:
    for s in stacks:
        if layer is not None and not 0 <= layer < s.n_layer:
            raise UserError(f"--layer {layer} is out of range: the {s.name} has {s.n_layer} layers (0-{s.n_layer - 1})")
        if head is not None and not 0 <= head < s.n_head:
            raise UserError(f"--head {head} is out of range: the model has {s.n_head} heads (0-{s.n_head - 1})")


@dataclass
class Analysis:
    """Everything `minigpt attention` shows for one sequence."""

    seq: Sequence
    stacks: list[Stack]
    heads: list[dict]  # heads.json: one object per (stack, layer, head)
    lens: np.ndarray  # (L + 1, T, V') next-token probabilities of each layer, over the ids in `vocab`
    vocab: list[int]
    label: Callable[[int], str]  # a token's text

    def labels(self, ids: list[int]) -> list[str]:
        return [self.label(t) for t in ids]


def analyse(loaded, text: str | None, target: str | None = None) -> Analysis:
    """The maps, head scores and logit lens of a loaded run (sample.load_for_inference) for a prompt, or for the
    induction probe when text is None; a pairs run's target decoded greedily unless given."""
    import torch

    model = loaded.model
    seq = sequence_for(loaded, text, target)
    if seq.source is not None:
        stacks, hidden = capture_encoder_decoder(model, seq.source, seq.ids)
    else:
        one, hidden = capture_decoder(model, seq.ids, seq.prefix_len)
        stacks = [one]
    heads = []
    for s in stacks:
        for i in range(s.n_layer):
            for h in range(s.n_head):
                m = head_metrics(s.weights[i, h], s.allowed, seq.period if s.self_attention else None,
                                 s.self_attention)
                heads.append({"stack": s.name, "layer": i, "head": h, "kv_group": s.kv_group(h),
                              **{k: None if v is None else round(v, 6) for k, v in m.items()},
                              "label": head_label(m)})
    device = next(model.parameters()).device
    allowed_ids = (loaded.allowed.nonzero()[:, 0].to(device) if loaded.allowed is not None
                   else torch.arange(loaded.tokenizer.vocab_size, device=device))
    cache: dict[int, str] = {}

    def label(t: int) -> str:
        if t not in cache:
            cache[t] = token_label(loaded, t)
        return cache[t]

    return Analysis(seq, stacks, heads, logit_lens(model, hidden, allowed_ids), allowed_ids.cpu().tolist(), label)


def attention_run(run: str | Path, out: str | Path, prompt: str | None = None, prompt_file: Path | None = None,
                  probe: str | None = None, target: str | None = None, checkpoint: str | None = None,
                  device: str = "auto", layer: int | None = None, head: int | None = None,
                  how: str | None = None, stack: str | None = None,
                  write: Callable[[str], None] = print) -> Analysis:
    """`minigpt attention`: load the run, capture its maps for the prompt (or probe), write attention.png/.svg,
    attention.html, heads.json and lens.png into `out`, and print the head table and the logit-lens table. Every
    input is checked before anything is written."""
    import attention_html
    import sample as sampler

    out = Path(out)
    check_out(out)
    check_options(layer, head, how, stack)
    text = read_prompt(prompt, None if prompt_file is None else Path(prompt_file), probe)
    loaded = sampler.load_for_inference(run, checkpoint=checkpoint, device=device)
    loaded.model.float()  # maps and scores in float32, whatever dtype decoding would use
    if stack is not None and loaded.model.config.arch == "decoder" and stack != "decoder":
        raise UserError(f"--stack {stack} is a stack of an encoder-decoder; this model has one stack: decoder")
    a = analyse(loaded, text, target)
    shown_stacks = [s for s in a.stacks if stack is None or s.name == stack]
    check_range(shown_stacks, layer, head)
    rows, notes = panels_for(shown_stacks, a.labels, layer, head, how)
    if not rows:
        raise UserError(f"--aggregate rollout follows self-attention: the {stack} stack has none")

    out.mkdir(parents=True, exist_ok=True)
    files = draw_maps(rows, out / "attention")
    files.append(draw_lens(a.lens, a.vocab, a.labels(a.seq.ids), a.label, out / "lens.png"))
    title = f"{run}: {'the induction probe' if text is None else 'a prompt'}"
    (out / "attention.html").write_text(attention_html.render(a.stacks, a.heads, a.labels, title), encoding="utf-8")
    (out / "heads.json").write_text(json.dumps(a.heads, indent=1) + "\n", encoding="utf-8")
    files += [out / "attention.html", out / "heads.json"]

    for note in a.seq.notes + notes:
        write(f"note: {note}")
    write(heads_table(a.heads))
    write("")
    tail = "".join(a.labels(a.seq.ids[-12:]))
    write(lens_table(a.lens, a.vocab, a.label, f"…{tail!r}" if len(a.seq.ids) > 12 else repr(tail)))
    write("")
    write(f"wrote {', '.join(str(f) for f in files)}")
    return a


if __name__ == "__main__":
    from cli.main import app

    app(["attention", *sys.argv[1:]], prog_name="attention_maps.py")
