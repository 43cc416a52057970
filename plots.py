"""Plots, written as files anyone can open: loss curves of runs (`minigpt plot`, and loss.png when a run ends).
matplotlib is imported only when a plot is drawn, on its Agg backend (no display), so nothing else pays for it.

Loss curves, from each run's metrics.jsonl: `run_curves` turns a run into arrays (what is plotted, testable
without a picture), `run_labels` names several runs by what differs between their configs, `plot_runs` draws.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset_format import atomic_write
from errors import UserError

X_AXES = ("step", "tokens", "time")  # what --x takes: optimizer steps, tokens trained on, training wall time
FORMATS = {".png": "png", ".svg": "svg"}  # --out's suffix picks the format
IGNORED_KEYS = ("run.out_dir",)  # differs between any two runs and says nothing about them


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no window, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------
# Loss curves: the data


@dataclass(frozen=True)
class Curves:
    """One run's loss curves against the chosen x: the train loss of every progress record (its `nll`, the
    cross-entropy without label smoothing, comparable with val loss; `loss` in older files), and the val loss of
    every evaluation."""

    train_x: np.ndarray
    train_loss: np.ndarray
    val_x: np.ndarray
    val_loss: np.ndarray


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """A run's progress records and evaluation records, each sorted by step with one record per step (the last
    one written: a resumed run's records replace those past its checkpoint). Lines that do not parse (the last
    line of a run killed mid-write) are skipped."""
    progress, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if "val_loss" in record:
            evals[step] = record
        elif "loss" in record:
            progress[step] = record
    return [progress[s] for s in sorted(progress)], [evals[s] for s in sorted(evals)]


def run_curves(run_dir: str | Path, x: str = "step") -> Curves:
    """The curves `plot_runs` draws for one run folder. x: "step", "tokens" (`tokens_seen`) or "time" (`elapsed_s`,
    seconds of training, summed across resumes). An evaluation takes the x of its step's progress record
    (interpolated between records when log.interval does not divide the eval interval)."""
    if x not in X_AXES:
        raise UserError(f"--x takes {' | '.join(X_AXES)}, got {x!r}")
    run_dir = Path(run_dir)
    progress, evals = read_metrics(run_dir)
    if not progress and not evals:
        raise UserError(f"{run_dir}/metrics.jsonl holds no loss records yet")
    field = {"step": "step", "tokens": "tokens_seen", "time": "elapsed_s"}[x]
    missing = [r["step"] for r in progress if r.get(field) is None]
    if missing:
        why = "written before minigpt recorded training time" if x == "time" else "an older metrics file"
        raise UserError(f"{run_dir}/metrics.jsonl has no {field} at step {missing[0]} ({why}); use --x step")
    if x != "step" and evals and not progress:
        raise UserError(f"{run_dir}/metrics.jsonl has evaluations but no progress records to place them by {x}; "
                        "use --x step")
    steps = np.array([r["step"] for r in progress], dtype=float)
    train_x = np.array([r[field] for r in progress], dtype=float)
    train_loss = np.array([_number(r.get("nll", r["loss"])) for r in progress], dtype=float)
    val_steps = np.array([r["step"] for r in evals], dtype=float)
    # step 0 is x = 0 on every axis: an evaluation before the first progress record is placed in proportion
    val_x = val_steps if x == "step" else np.interp(val_steps, np.r_[0.0, steps], np.r_[0.0, train_x])
    val_loss = np.array([_number(r["val_loss"]) for r in evals], dtype=float)
    return Curves(train_x, train_loss, val_x, val_loss)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan  # a null loss: a gap, not an error


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """The trailing moving average over `window` records (--smooth W): point i is the mean of records
    i-W+1 .. i, or of all records so far for the first W-1; window 1 is the values themselves. A non-finite
    value (a skipped step's loss) is left out of the means rather than spoiling them."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    finite = np.isfinite(values)
    sums = np.cumsum(np.r_[0.0, np.where(finite, values, 0.0)])
    counts = np.cumsum(np.r_[0, finite])
    i = np.arange(1, len(values) + 1)
    start = np.maximum(i - window, 0)
    n = counts[i] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[i] - sums[start]) / n, np.nan)


# ----------------------------------------------------------------------------------------------------
# Loss curves: naming runs


def run_config(run_dir: str | Path) -> dict | None:
    """A run's config as flat {"section.key": value}: from its ckpt.pt (the config it trained with, the vocabulary
    resolved), else from its config.toml; None when it has neither (or they do not read)."""
    run_dir = Path(run_dir)
    if (run_dir / "ckpt.pt").is_file():
        import torch  # only for naming several runs

        try:  # the config only: memory-mapped, no weight is read
            config = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True, mmap=True)["config"]
            if isinstance(config, dict):
                return flatten(config)
        except Exception:  # a damaged checkpoint: config.toml may still say
            pass
    try:
        return flatten(tomllib.loads((run_dir / "config.toml").read_text()))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def flatten(table: dict, prefix: str = "") -> dict:
    """{section: {key: value}} (nested tables too) as {"section.key": value}, None values left out."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif value is not None:  # config.toml leaves None out: a key missing and a None are the same setting
            flat[f"{prefix}{key}"] = value
    return flat


def run_labels(names: list[str], configs: list[dict | None]) -> list[str]:
    """A legend label per run: the config keys whose values differ between the runs ("model.pos_encoding=rope,
    optim.lr=0.003"), in key order; the runs' names instead when a config is missing or the labels would not
    tell the runs apart."""
    if len(names) > 1 and all(c is not None for c in configs):
        keys = sorted({k for c in configs for k in c} - set(IGNORED_KEYS))
        differing = [k for k in keys if len({value_text(c.get(k)) for c in configs}) > 1]
        labels = [", ".join(f"{k}={value_text(c.get(k))}" for k in differing) for c in configs]
        if differing and len(set(labels)) == len(labels):
            return labels
    return names


def value_text(value) -> str:
    """A config value as --set writes it (the legends', and sweep's run names and tables)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _names(runs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [r.name or str(r) for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


# ----------------------------------------------------------------------------------------------------
# Loss curves: the picture


def check_out(out: str | Path, option: str = "--out") -> str:
    """The format `option` asks for (from its suffix), or a UserError if the file cannot be written there."""
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"{option} {out}: the suffix picks the format, .png or .svg")
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder; name a file in it, e.g. {out / 'loss.png'}")
    if not out.parent.is_dir():
        what = "is a file, not a folder" if out.parent.exists() else "does not exist"
        raise UserError(f"{option} {out}: {out.parent} {what}")
    return fmt


def run_folder(run: str | Path) -> Path:
    """A run's folder from a RUN argument: the folder, or a file in it (ckpt.pt, metrics.jsonl)."""
    run = Path(run)
    folder = run.parent if run.is_file() else run
    if not (folder / "metrics.jsonl").is_file():
        why = "does not exist" if not run.exists() else "has no metrics.jsonl (is it a run folder of minigpt train?)"
        raise UserError(f"{run} {why}")
    return folder


def plot_runs(runs: list[str | Path], out: str | Path, x: str = "step", window: int = 1, log: bool = False,
              labels: list[str] | None = None) -> Path:
    """Draw the train and val loss of `runs` (run folders) into `out` (.png or .svg, written atomically), against
    x = step | tokens | time; window > 1 smooths the train loss (see `smooth`), log makes the y axis
    logarithmic. Several runs are labelled by run_labels unless `labels` are given. Everything is checked before
    anything is drawn: bad input writes nothing."""
    if not runs:
        raise UserError("pass at least one run folder")
    if window < 1:
        raise UserError(f"--smooth takes a window of >= 1 records (1 = no smoothing), got {window}")
    fmt = check_out(out)
    folders = [run_folder(r) for r in runs]
    curves = [run_curves(f, x) for f in folders]
    if labels is None:
        labels = run_labels(_names(folders), [run_config(f) for f in folders] if len(folders) > 1 else [None])
    elif len(labels) != len(folders):
        raise UserError(f"{len(labels)} labels for {len(folders)} runs")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        scale, unit = _time_unit(max((c.train_x.max() for c in curves if len(c.train_x)), default=0.0)) \
            if x == "time" else (1.0, "")
        single = len(folders) == 1
        for i, (c, label) in enumerate(zip(curves, labels)):
            color = f"C{i % 10}"
            name = "" if single else f"{label} "
            if len(c.train_x):
                if window > 1:  # the raw curve faintly behind the smoothed one
                    ax.plot(c.train_x / scale, c.train_loss, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(c.train_x / scale, smooth(c.train_loss, window), color=color, linewidth=1.5,
                        label=f"{name}train" + (f" (mean of {window})" if window > 1 else ""))
            if len(c.val_x):
                ax.plot(c.val_x / scale, c.val_loss, color=color, linestyle="--", marker="o", markersize=3,
                        linewidth=1.2, label=f"{name}val")
        ax.set_xlabel({"step": "step", "tokens": "tokens", "time": f"training time ({unit})"}[x])
        ax.set_ylabel("loss (cross-entropy)")
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{labels[0]}" if single else "loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        atomic_write(out, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        plt.close(fig)
    return Path(out)


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 2 * 3600:
        return 3600.0, "h"
    if seconds >= 120:
        return 60.0, "min"
    return 1.0, "s"


# ----------------------------------------------------------------------------------------------------
# `minigpt bench nanogpt --quality --plot`: both tools' val loss curves


def plot_quality(quality: dict, out: str | Path) -> Path:
    """The val loss curves of a --quality comparison (compare_with_nanogpt's "quality") into `out`, against
    training time (evaluations not counted) and against step, with nanoGPT's final val loss as a dotted line. Step
    0 (nanoGPT's untrained model, ln(vocabulary)) is left out: it would squeeze the curves into a corner."""
    fmt = check_out(out, "--plot")
    target = quality["target_val_loss"]
    runs = {"nanoGPT": quality["nanogpt"], **{f"minigpt {name}": r for name, r in quality["minigpt"].items()}}
    plt = pyplot()
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
    try:
        for label, run in runs.items():
            steps, seconds, val = zip(*[point for point in run["curve"] if point[0] > 0])
            reached = run["time_to_target"]
            label += f": final {val[-1]:.3f}"
            if reached:
                label += f"; <= {target:.3f} after {reached['train_s']:.0f} s"
            by_time.plot(seconds, val, marker="o", markersize=2.5, linewidth=1.2, label=label)
            by_step.plot(steps, val, marker="o", markersize=2.5, linewidth=1.2)
        for ax, xlabel in ((by_time, "training time, evaluations not counted (s)"), (by_step, "step")):
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        by_time.set_ylabel("val loss")
        fig.legend(fontsize="small", loc="lower center")  # below both panels: inside, it would hide curves
        fig.suptitle(f"val loss, {quality['steps']} steps at nanoGPT's CPU shapes (dotted: nanoGPT's final, "
                     f"{target:.4f})")
        fig.tight_layout(rect=(0, 0.04 * (len(runs) + 1), 1, 1))
        atomic_write(out, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        plt.close(fig)
    return Path(out)
