"""Positional encodings as pictures (`minigpt positions`): what each of model.py's encodings tells attention
about where a token is. Every array comes from model.py's own code, so the pictures show what the model uses:

    sinusoidal_table      model.sinusoidal_encoding: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(...)
    cosine_similarity     how alike two positions' encodings are (the sinusoidal table's, or a run's learned wpe)
    rope_offset_scores    model.rope_angles + model.apply_rope: the score of a query and a key with the same content
                          at positions m and n, (2/hs)·Σ_i cos((m-n)·θ_i): one value per diagonal (only the offset
                          m-n counts), largest at offset 0 and decaying, with ripples, as the offset grows
    alibi_biases          model.alibi_slopes + model.attention_inputs: the bias each head adds to its scores,
                          -slope_h·|m-n| (-inf where the mask hides the key)

`position_arrays(cfg, checkpoint)` computes the arrays a config (or a run) calls for; `write_position_plots` draws
them as PNGs. matplotlib is imported only to draw (plots.pyplot, on the Agg backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from errors import UserError
from model import GPTConfig, alibi_slopes, apply_rope, attention_inputs, rope_angles, sinusoidal_encoding

MAX_POSITIONS = 1024  # the plots stop here: a 1024 x 1024 picture already has more cells than a screen has pixels

# a run's learned position tables, by their name in the checkpoint's state dict (model.GPT; encoder_decoder.py's
# encoder has its own)
LEARNED_TABLES = {"wpe.weight": "learned_similarity", "encoder_wpe.weight": "encoder_learned_similarity"}


def sinusoidal_table(T: int, C: int) -> np.ndarray:
    """The sinusoidal encodings of positions 0..T-1, (T, C): model.sinusoidal_encoding, the table model.py adds."""
    return sinusoidal_encoding(torch.arange(T), C).numpy()


def cosine_similarity(table: np.ndarray) -> np.ndarray:
    """(T, T): the cosine of the angle between row m's and row n's encodings (1 on the diagonal)."""
    table = np.asarray(table, dtype=np.float64)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def rope_offset_scores(head_size: int, base: float, T: int) -> np.ndarray:
    """(T, T): the dot product of a query at position m and a key at position n after model.apply_rope rotates
    both, for q = k = (1, ..., 1)/√hs (a unit vector whose hs/2 rotated pairs all hold 2/hs of its length²).

    Rotating a pair by mθ_i and its copy by nθ_i leaves their dot product |pair|²·cos((m-n)θ_i), so the score is
    (2/hs)·Σ_i cos((m-n)·θ_i), θ_i = base^(-2i/hs): the closed form, and also the mean over random unit q = k.
    Attention divides it by √hs on top; this is the plain cosine (1 at offset 0)."""
    if head_size % 2:
        raise ValueError(f"rope rotates pairs of dimensions: the head size ({head_size}) must be even")
    cos, sin = rope_angles(torch.arange(T), head_size, base)
    q = torch.full((1, 1, T, head_size), 1 / math.sqrt(head_size))
    rotated = apply_rope(q, cos, sin)[0, 0].double()  # (T, hs): the same content at each position
    return (rotated @ rotated.T).numpy()


def alibi_biases(n_head: int, T: int, bidirectional: bool = False) -> np.ndarray:
    """(n_head, T, T): the bias head h adds to the score of query m for key n, as model.attention_inputs builds it
    from model.alibi_slopes: -slope_h·|m-n|, -inf for the keys a causal mask hides (n > m)."""
    cfg = GPTConfig(block_size=T, n_head=n_head, n_embd=n_head, pos_encoding="alibi",
                    attn_mask="bidirectional" if bidirectional else "causal")
    inputs = attention_inputs(cfg, torch.arange(T), None, 0, alibi=alibi_slopes(n_head))
    return inputs.mask.numpy()


@dataclass
class PositionArrays:
    """What `minigpt positions` draws: arrays by plot name, and notes on what it could not draw and why."""
    positions: int  # T: positions 0..T-1 in each plot (a learned table's own rows)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    slopes: list[float] = field(default_factory=list)  # ALiBi's, per head
    steps: int | None = None  # the run's training steps, when a learned table is drawn


def position_arrays(cfg: GPTConfig, checkpoint: dict | None) -> PositionArrays:
    """The arrays of every plot this model config (and, for a trained run, its checkpoint) calls for: the
    sinusoidal table and its similarity, RoPE's scores and ALiBi's biases at the config's shapes, and each
    learned position table's similarity when the run has one."""
    T = min(cfg.block_size, MAX_POSITIONS)
    out = PositionArrays(T)
    if cfg.block_size > MAX_POSITIONS:
        out.notes.append(f"block_size is {cfg.block_size}: plotting the first {MAX_POSITIONS} positions")
    table = sinusoidal_table(T, cfg.n_embd)
    out.arrays["sinusoidal_table"] = table
    out.arrays["sinusoidal_similarity"] = cosine_similarity(table)
    if cfg.head_size % 2:
        out.notes.append(f"rope_scores: skipped, rope rotates pairs of dimensions and the head size "
                         f"({cfg.head_size}) is odd")
    else:
        out.arrays["rope_scores"] = rope_offset_scores(cfg.head_size, cfg.rope_theta, T)
    out.arrays["alibi_biases"] = alibi_biases(cfg.n_head, T, bidirectional=cfg.attn_mask == "bidirectional")
    out.slopes = alibi_slopes(cfg.n_head).tolist()
    weights = checkpoint.get("model") if checkpoint is not None else None
    found = [key for key in LEARNED_TABLES if isinstance(weights, dict) and key in weights]
    for key in found:
        learned = weights[key]
        if not isinstance(learned, torch.Tensor) or learned.dim() != 2 or learned.shape[1] != cfg.n_embd:
            raise UserError(f"the checkpoint's {key} is not a position table of width {cfg.n_embd} "
                            f"(got {tuple(getattr(learned, 'shape', ()))}); is it a minigpt checkpoint?")
        out.arrays[LEARNED_TABLES[key]] = cosine_similarity(learned[:MAX_POSITIONS].float().numpy())
        out.steps = checkpoint.get("step")
    if found:
        return out
    if checkpoint is None:
        out.notes.append("learned_similarity: needs a trained run (pass its folder or .pt) with "
                         "model.pos_encoding = \"learned\"")
    elif cfg.pos_encoding == "learned":
        raise UserError("the checkpoint holds no wpe.weight although its model learns positions; is it a minigpt "
                        "checkpoint?")
    else:
        out.notes.append(f"learned_similarity: this run uses {cfg.pos_encoding} positions; it needs a run trained "
                         "with model.pos_encoding = \"learned\"")
    return out


def check_out_dir(out_dir: Path) -> None:
    """A bad --out is an error before anything is computed or written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a folder (it is created if missing)")
    parent = next((p for p in [out_dir, *out_dir.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out_dir}: {parent} is a file, not a folder")


def write_position_plots(cfg: GPTConfig, checkpoint: dict | None, out_dir: Path) -> tuple[list[str], list[str]]:
    """Draw every plot of `position_arrays` as out_dir/<name>.png; return a line per file written and the notes."""
    check_out_dir(out_dir)
    data = position_arrays(cfg, checkpoint)
    figures = draw(cfg, data)  # all drawn before the first file is written
    plt = _pyplot()
    lines = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, (fig, what) in figures.items():
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            lines.append(f"wrote {path}: {what}")
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    finally:
        for fig, _ in figures.values():
            plt.close(fig)
    return lines, data.notes


def _pyplot():
    from plots import pyplot

    return pyplot()


def draw(cfg: GPTConfig, data: PositionArrays) -> dict:
    """name -> (figure, a line saying what it shows)."""
    plt = _pyplot()
    T, a, figures = data.positions, data.arrays, {}

    def heatmap(name, array, title, what, xlabel="key position n", ylabel="query position m", **kwargs):
        fig, ax = plt.subplots(figsize=(6.4, 5.2), layout="constrained")
        image = ax.imshow(array, aspect="auto", interpolation="nearest", **kwargs)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        fig.colorbar(image, ax=ax)
        figures[name] = (fig, what)

    heatmap("sinusoidal_table", a["sinusoidal_table"], f"sinusoidal encoding: {T} positions x {cfg.n_embd} dims\n"
            "dim 2i: sin(p / 10000^(2i/C)), 2i+1: cos; slower to the right",
            f"the sinusoidal table, {T} positions x {cfg.n_embd} dimensions",
            xlabel="dimension", ylabel="position p", cmap="RdBu_r", vmin=-1, vmax=1)
    heatmap("sinusoidal_similarity", a["sinusoidal_similarity"],
            "sinusoidal encodings: cosine similarity of positions m and n\nnear positions look alike, far ones less",
            f"cosine similarity of the sinusoidal encodings of {T} x {T} positions",
            xlabel="position n", ylabel="position m", cmap="viridis")
    for name in LEARNED_TABLES.values():
        if name in a:
            n = len(a[name])
            which = "encoder's learned" if name.startswith("encoder") else "learned"
            trained = f" after {data.steps} steps" if data.steps is not None else ""
            heatmap(name, a[name], f"{which} position table{trained}: cosine similarity of positions",
                    f"cosine similarity of the run's {which} position table, {n} x {n} positions",
                    xlabel="position n", ylabel="position m", cmap="viridis")
    if "rope_scores" in a:
        scores = a["rope_scores"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
        image = left.imshow(scores, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-1, vmax=1)
        left.set(title="q·k of the same unit vector at m and n:\nequal along each diagonal (only m - n counts)",
                 xlabel="key position n", ylabel="query position m")
        fig.colorbar(image, ax=left)
        right.plot(np.arange(T), scores[:, 0])
        right.axhline(0, color="grey", linewidth=0.5)
        right.set(title=f"by offset: 1 at 0, decaying with distance\n(2/hs)·Σ cos((m-n)·θ_i), head size "
                  f"{cfg.head_size}, base {cfg.rope_theta:g}", xlabel="offset m - n", ylabel="score")
        figures["rope_scores"] = (fig, f"RoPE's score by relative offset, head size {cfg.head_size}, "
                                       f"base {cfg.rope_theta:g}, {T} positions")
    biases = np.where(np.isfinite(a["alibi_biases"]), a["alibi_biases"], np.nan)  # -inf (masked) left blank
    n_head = len(biases)
    cols = min(n_head, 4)
    rows = math.ceil(n_head / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.0 * rows + 0.8), layout="constrained",
                             squeeze=False)
    low = float(np.nanmin(biases)) if np.isfinite(biases).any() else -1.0
    for h, ax in enumerate(axes.flat):
        if h >= n_head:
            ax.axis("off")
            continue
        image = ax.imshow(biases[h], aspect="auto", interpolation="nearest", cmap="magma", vmin=low, vmax=0)
        ax.set_title(f"head {h}: slope {data.slopes[h]:.4g}", fontsize=9)
        if h % cols == 0:
            ax.set_ylabel("query position m")
        if h >= n_head - cols:
            ax.set_xlabel("key position n")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle("ALiBi: each head adds -slope·|m - n| to its scores (blank: masked)")
    figures["alibi_biases"] = (fig, f"ALiBi's bias for each of {n_head} heads, {T} x {T} positions")
    return figures
