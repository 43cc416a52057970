"""Sweeps: `minigpt sweep`. Train every combination of a few config values, a few seeds each, evaluate every run,
and put the mean and spread over seeds in one table (OUT/results.md, OUT/results.json) and two pictures (loss.png,
and with lengths lengths.png).

A sweep folder holds sweep.json (what is swept: the base config, the varied values, the seeds) and runs/<name>/, one
ordinary run folder per combination and seed (name: the varied values and the seed), trained in this process one
after another with train.train. A run is done when its eval.json is there (written atomically after its checkpoint
reached train.max_iters), so a sweep killed at any moment continues where it stopped when the same command runs
again: done runs are skipped, a run with a checkpoint is resumed from it (train's own resume), a run without one
starts again. Everything is checked, every combination's config built, before anything is written: a bad --vary is
one error line and an untouched disk.

Read top to bottom:
  1. the plan: the config file (and its [sweep] table), --vary, seeds and evaluation settings, checked
  2. running it: train, resume or skip each run, then evaluate it
  3. the results: mean and spread over seeds, the Markdown table, the pictures
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from dataset_format import atomic_write
from errors import UserError
from plots import flatten, value_text as text

SWEEP_KEYS = ("vary", "seeds", "lengths", "rope_scalings", "rope_factor", "max_tokens")  # a [sweep] table's keys
SET_BY_THE_SWEEP = {  # config keys --vary may not take, and why
    "run.out_dir": "every run trains in OUT/runs/<name>",
    "run.seed": "the runs of a combination take run.seed, run.seed + 1, ...: use --seeds N (and --set run.seed=BASE)",
}


# ----------------------------------------------------------------------------------------------------
# 1. The plan


@dataclass(frozen=True)
class EvalSettings:
    """How every run is evaluated: the whole val split always; with lengths, also at each context length, and a RoPE
    run also with each of rope_scalings at rope_factor (evaluation.evaluate_run)."""

    lengths: tuple[int, ...] | None
    rope_scalings: tuple[str, ...]
    rope_factor: float | None
    max_tokens: int | None  # score only this many tokens in each evaluation

    def to_dict(self) -> dict:
        return {"lengths": list(self.lengths) if self.lengths else None, "rope_scalings": list(self.rope_scalings),
                "rope_factor": self.rope_factor, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Run:
    values: tuple[tuple[str, Any], ...]  # (config key, value) of each varied key, in --vary order
    seed: int
    name: str  # its folder in OUT/runs
    cfg: Any  # the train.Config it trains with

    @property
    def label(self) -> str:
        return " ".join(f"{k}={text(v)}" for k, v in self.values)


@dataclass(frozen=True)
class Plan:
    out: Path
    config_path: Path
    vary: dict[str, tuple]  # config key -> its values (typed), in the order given
    seeds: int
    base: Any  # the train.Config without the varied values
    runs: list[Run]  # combination by combination, seed by seed
    evals: EvalSettings

    def record(self) -> dict:
        """What sweep.json keeps: what the runs train with. A sweep folder continues only the same sweep."""
        from cli.config_loader import config_to_dict

        base = replace(self.base, run=replace(self.base.run, out_dir=str(self.out / "runs")))
        record = {"config": config_to_dict(base), "vary": {k: list(v) for k, v in self.vary.items()},
                  "seeds": self.seeds}
        return json.loads(json.dumps(record))


def read_config_file(path: Path) -> tuple[dict, dict | None]:
    """The config file's tables without [sweep], and its [sweep] table (None when it has none)."""
    import train as trainer
    from cli.config_loader import load_config

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        load_config(trainer.Config, path)  # says what is wrong with the file in the loader's words
        raise
    return data, data.pop("sweep", None)


def read_sweep_table(table) -> dict:
    """A [sweep] table's settings, checked: {vary: {key: [value texts]}, seeds, lengths, rope_scalings, rope_factor,
    max_tokens}, each present only where the table sets it."""
    from cli.config_loader import ConfigError, coerce, format_choices, suggest

    if not isinstance(table, dict):
        raise ConfigError(f"sweep must be a [sweep] table, e.g. [sweep] seeds = 2; got {table!r}")
    for key in table:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"unknown key 'sweep.{key}'{suggest(key, SWEEP_KEYS)}; keys in [sweep] are: "
                              f"{format_choices(SWEEP_KEYS)}")
    out: dict[str, Any] = {}
    if "vary" in table:
        if not isinstance(table["vary"], dict):
            raise ConfigError('sweep.vary must be a table of key = [values], e.g. vary = { "model.n_layer" = [2, 4] }')
        out["vary"] = {}
        for key, values in flatten(table["vary"]).items():
            if not isinstance(values, list) or not values or any(isinstance(v, (list, dict)) for v in values):
                raise ConfigError(f"sweep.vary.{key} must be a list of values, e.g. {key} = [1, 2]; got {values!r}")
            out["vary"][key] = [text(v) for v in values]
    if "seeds" in table:
        out["seeds"] = coerce(table["seeds"], int, "sweep.seeds")
    if "lengths" in table:
        out["lengths"] = table["lengths"]  # a list of ints or "64,128": evaluation.parse_lengths says if not
    if "rope_scalings" in table:
        scalings = table["rope_scalings"]
        if isinstance(scalings, list) and all(isinstance(s, str) for s in scalings):
            scalings = ",".join(scalings)
        out["rope_scalings"] = coerce(scalings, str, "sweep.rope_scalings")
    if "rope_factor" in table:
        out["rope_factor"] = coerce(table["rope_factor"], float, "sweep.rope_factor")
    if "max_tokens" in table:
        out["max_tokens"] = coerce(table["max_tokens"], int, "sweep.max_tokens")
    return out


def parse_vary(texts: list[str]) -> dict[str, list[str]]:
    """--vary KEY=V1,V2,... (repeatable) -> {KEY: [V1, V2, ...]}."""
    vary: dict[str, list[str]] = {}
    for item in texts:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise UserError(f"--vary takes KEY=V1,V2,... (e.g. --vary model.pos_encoding=rope,alibi); got {item!r}")
        if key in vary:
            raise UserError(f"--vary {key} is given twice; put all its values in one: --vary {key}=V1,V2,...")
        vary[key] = parts
    return vary


def check_out(out: Path, record: dict) -> None:
    """OUT is new, empty, or a sweep folder of this very sweep."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the sweep's runs and results")
    saved = out / "sweep.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{saved} does not read ({e}); choose another --out") from None
        if old != record:
            was, now = flatten(old), flatten(record)
            differ = sorted(k for k in {*was, *now} if was.get(k) != now.get(k))
            raise UserError(f"{out} holds another sweep (it differs in {', '.join(differ)}); run the command that "
                            "started it to continue it, or choose another --out")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is a folder that holds something else than a sweep (no sweep.json); choose a new "
                        "or empty folder")


def run_name(values: tuple[tuple[str, Any], ...], seed: int) -> str:
    """pos_encoding-rope_n_layer-4_seed1337: each varied key by its last part (the whole key where two share one)."""
    last = [k.rsplit(".", 1)[-1] for k, _ in values]
    parts = [f"{k if last.count(short) > 1 else short}-{text(v)}" for (k, v), short in zip(values, last)]
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", "_".join([*parts, f"seed{seed}"]))


def plan_sweep(config: Path, overrides: list[str], vary: list[str], out: Path, seeds: int | None = None,
               lengths: str | None = None, rope_scaling: str | None = None, rope_factor: float | None = None,
               max_tokens: int | None = None) -> Plan:
    """Every run of the sweep, its config built and checked; the command line wins over the [sweep] table (its vary
    keys are added to the table's, replacing the same keys). Raises UserError before anything is written."""
    import evaluation
    import train as trainer
    from cli.config_loader import ConfigError, build_config
    from dataset_format import read_meta

    config = Path(config)
    if config.is_dir() or config.suffix == ".pt":
        raise UserError(f"{config} is a run; a sweep starts from a TOML config (e.g. {config / 'config.toml'})")
    data, table = read_config_file(config)
    table = read_sweep_table(table) if table is not None else {}
    wanted = {**table.get("vary", {}), **parse_vary(vary)}
    if not wanted:
        raise UserError("nothing to sweep: pass --vary KEY=V1,V2,... (or a [sweep] table with vary = {KEY = [...]})")
    seeds = seeds if seeds is not None else table.get("seeds", 1)
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1 (runs per combination), got {seeds}")

    base = build_config(trainer.Config, data, overrides)
    typed: dict[str, tuple] = {}
    for key, values in wanted.items():
        if key in SET_BY_THE_SWEEP:
            raise UserError(f"--vary {key}: {SET_BY_THE_SWEEP[key]}")
        got = []
        for value in values:
            try:
                cfg = build_config(trainer.Config, data, [*overrides, f"{key}={value}"])
            except ConfigError as e:
                raise ConfigError(f"--vary {key}={','.join(values)}: {e}") from None
            section, name = key.split(".", 1)
            got.append(getattr(getattr(cfg, section.strip()), name.strip()))
        if len(set(map(text, got))) < len(got):
            raise UserError(f"--vary {key}={','.join(values)} gives a value twice")
        typed[key] = tuple(got)

    lengths = lengths if lengths is not None else table.get("lengths")
    rope_scaling = rope_scaling if rope_scaling is not None else table.get("rope_scalings")
    rope_factor = rope_factor if rope_factor is not None else table.get("rope_factor")
    max_tokens = max_tokens if max_tokens is not None else table.get("max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    wanted_lengths = evaluation.check_length_options(lengths, None, False, None, None)
    scalings = tuple(s.strip() for s in rope_scaling.split(",")) if rope_scaling is not None else ()
    for kind in scalings or ((None,) if rope_factor is not None else ()):
        evaluation.check_rope_options(kind, rope_factor)
    if scalings and wanted_lengths is None:
        raise UserError("--rope-scaling adds rows of RoPE runs scored at --lengths: add --lengths, e.g. 64,128,256,512")
    evals = EvalSettings(wanted_lengths.lengths if wanted_lengths else None, scalings,
                         float(rope_factor) if scalings else None, max_tokens)

    runs = []
    for combo in itertools.product(*([(k, v) for v in vs] for k, vs in typed.items())):
        overrides_of = [*overrides, *(f"{k}={text(v)}" for k, v in combo)]
        try:
            cfg = build_config(trainer.Config, data, overrides_of)
        except ConfigError as e:
            raise ConfigError(f"--vary: the combination {' '.join(overrides_of[len(overrides):])} is not a valid "
                              f"config: {e}") from None
        for i in range(seeds):
            name = run_name(combo, cfg.run.seed + i)
            try:
                run_cfg = replace(cfg, run=replace(cfg.run, seed=cfg.run.seed + i, out_dir=str(out / "runs" / name)))
            except ValueError as e:
                raise UserError(f"--seeds {seeds}: {e}") from None
            runs.append(Run(tuple(combo), cfg.run.seed + i, name, run_cfg))
    if len({r.name for r in runs}) < len(runs):
        raise UserError("two runs would share a folder name; vary values that differ in letters or digits")

    for cfg in {r.cfg.data.dir: r.cfg for r in runs}.values():  # the data is there (and long enough) for every run
        meta = read_meta(cfg.data.dir)
        if evals.lengths and meta.get("val_tokens", 0) <= evals.lengths[-1]:
            raise UserError(f"the val split of {cfg.data.dir} has {meta.get('val_tokens', 0):,} tokens: scoring "
                            f"after a context of {evals.lengths[-1]:,} needs more; use shorter --lengths")
    for r in runs:
        if evals.lengths and r.cfg.model.attn_mask != "causal":
            raise UserError(f"--lengths scores causal language models; {r.label} has attn_mask = "
                            f"{r.cfg.model.attn_mask!r}")
        if "yarn" in scalings and r.cfg.model.pos_encoding == "rope" and not r.cfg.model.rope_theta > 1:
            raise UserError(f"--rope-scaling yarn needs rope_theta > 1; {r.label} has {r.cfg.model.rope_theta}")
    plan = Plan(Path(out), config, typed, seeds, base, runs, evals)
    check_out(plan.out, plan.record())
    return plan


# ----------------------------------------------------------------------------------------------------
# 2. Running it


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def evaluate(folder: Path, cfg, evals: EvalSettings) -> dict:
    """eval.json's content: the whole val split, and the lengths (with each RoPE scaling, for a RoPE run)."""
    import evaluation

    windows = -(-evals.max_tokens // cfg.model.block_size) if evals.max_tokens else None  # block_size windows
    result: dict[str, Any] = {"settings": evals.to_dict(),
                              "val": evaluation.evaluate_run(folder, device=cfg.run.device, max_examples=windows)}
    if evals.lengths:
        kw = dict(device=cfg.run.device, lengths=list(evals.lengths), max_tokens=evals.max_tokens)
        result["lengths"] = evaluation.evaluate_run(folder, **kw)
        if cfg.model.pos_encoding == "rope":
            result["rope"] = {kind: evaluation.evaluate_run(folder, rope_scaling=kind, rope_factor=evals.rope_factor,
                                                            **kw) for kind in evals.rope_scalings}
    return result


def run_sweep(plan: Plan, log: Callable[[str], None] = print) -> dict | None:
    """Train (or resume, or skip) and evaluate every run, then write the results; None when a signal stopped a run
    (its checkpoint is saved: the same command continues)."""
    import train as trainer
    from checkpoint import load_checkpoint
    from cli.config_loader import build_config, config_to_toml

    atomic_write(plan.out / "sweep.json", lambda f: f.write(json.dumps(plan.record(), indent=2).encode()))
    settings = plan.evals.to_dict()
    for i, run in enumerate(plan.runs, 1):
        folder = Path(run.cfg.run.out_dir)
        head = f"run {i}/{len(plan.runs)}: {run.label} seed={run.seed}"
        done = read_json(folder / "eval.json")
        if done is not None and done.get("settings") == settings:
            log(f"{head}: done, skipped")
            continue
        cfg, checkpoint = run.cfg, None
        if (folder / "ckpt.pt").is_file():
            checkpoint = load_checkpoint(folder)
            cfg = build_config(trainer.Config, checkpoint["config"])
            cfg = replace(cfg, run=replace(cfg.run, out_dir=str(folder)))  # where the run lies now
        if checkpoint is None or checkpoint["step"] < cfg.train.max_iters:
            if checkpoint is None:
                cfg = trainer.fix_schedule(cfg)
            log(f"{head}: " + (f"resuming at step {checkpoint['step']}" if checkpoint else "training"))
            result = trainer.train(cfg, checkpoint=checkpoint, config_text=config_to_toml(cfg))
            if result.stopped_by:
                log(f"sweep stopped by {result.stopped_by} in run {i}/{len(plan.runs)} ({folder}); run the same "
                    "command again to continue it")
                return None
        else:
            log(f"{head}: trained" + (", evaluating again (other evaluation settings)" if done else ", evaluating"))
        checkpoint = None  # lets go of the memory-mapped file
        try:
            result = evaluate(folder, cfg, plan.evals)
        except KeyboardInterrupt:  # Ctrl-C while evaluating: the run is trained and saved, only its scores are lost
            log(f"sweep stopped by SIGINT while evaluating run {i}/{len(plan.runs)} ({folder}); run the same command "
                "again to evaluate it and continue")
            return None
        atomic_write(folder / "eval.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    results = summarize(plan)
    write_results(plan, results, log)
    return results


# ----------------------------------------------------------------------------------------------------
# 3. The results


def spread(values: list) -> dict | None:
    """{mean, std (the sample's; 0 for one value), min, max, n}; None when a value is missing (n/a)."""
    if not values or any(v is None for v in values):
        return None
    n, mean = len(values), sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _length_rows(results: list[dict]) -> list[dict]:
    lengths = [r["length"] for r in results[0]["lengths"]]
    return [{"length": L, **{m: spread([r["lengths"][j][m] for r in results]) for m in ("loss", "perplexity")}}
            for j, L in enumerate(lengths)]


def summarize(plan: Plan) -> dict:
    """results.json: a row per combination (and per RoPE scaling of a RoPE combination), mean and spread over seeds."""
    evals = {r.name: json.loads((Path(r.cfg.run.out_dir) / "eval.json").read_text()) for r in plan.runs}
    rows = []
    for values, group in itertools.groupby(plan.runs, key=lambda r: r.values):
        group = list(group)
        got = [evals[r.name] for r in group]
        row = {"values": {k: v for k, v in values}, "rope_scaling": None, "runs": [r.name for r in group],
               "seeds": [r.seed for r in group], "val_loss": spread([g["val"]["loss"] for g in got])}
        if plan.evals.lengths:
            row["lengths"] = _length_rows([g["lengths"] for g in got])
        rows.append(row)
        for kind in plan.evals.rope_scalings if "rope" in got[0] else ():
            rows.append({**row, "rope_scaling": kind, "rope_factor": plan.evals.rope_factor, "val_loss": None,
                         "lengths": _length_rows([g["rope"][kind] for g in got])})
    block = sorted({r.cfg.model.block_size for r in plan.runs})
    return {"config": str(plan.config_path), "vary": {k: list(v) for k, v in plan.vary.items()},
            "seeds": plan.seeds, "block_size": block, "max_iters": sorted({r.cfg.train.max_iters for r in plan.runs}),
            **plan.evals.to_dict(), "rows": rows}


def row_label(row: dict) -> str:
    label = " ".join(f"{k}={text(v)}" for k, v in row["values"].items())
    return label + (f" + {row['rope_scaling']} x{row['rope_factor']:g}" if row["rope_scaling"] else "")


def _cell(s: dict | None, digits: int = 4) -> str:
    if s is None:
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def format_markdown(results: dict, out: Path) -> str:
    keys = list(results["vary"])
    seeds = results["seeds"]
    lines = [f"# Sweep {out}", "",
             f"`{results['config']}`, {seeds} seed{'s' if seeds > 1 else ''} per row, "
             f"{'/'.join(map(str, results['max_iters']))} steps. "
             + ("Mean ± sample standard deviation over seeds. " if seeds > 1 else "")
             + "val loss: the whole val split (`minigpt eval`)"
             + ("; loss @ L: the same tokens scored with a context of L tokens (`minigpt eval --lengths`)."
                if results["lengths"] else "."), ""]

    def table(metric: str, digits: int, val: bool) -> list[str]:
        head = [*keys, "RoPE scaling", *(["val loss"] if val else []),
                *(f"{metric} @ {L}" for L in results["lengths"] or [])]
        body = []
        for row in results["rows"]:
            cells = [text(row["values"][k]) for k in keys]
            cells.append(f"{row['rope_scaling']} x{row['rope_factor']:g}" if row["rope_scaling"] else "-")
            if val:
                cells.append(_cell(row["val_loss"]) if row["val_loss"] is not None or not row["rope_scaling"] else "-")
            cells += [_cell(r[metric], digits) for r in row.get("lengths") or []]
            body.append(cells)
        align = ["---"] * len(keys) + ["---:"] * (len(head) - len(keys))
        return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|",
                *("| " + " | ".join(c) + " |" for c in body)]

    lines += table("loss", 4, True)
    if results["lengths"]:
        lines += ["", "Perplexity at each length:", "", *table("perplexity", 2, False)]
        na = any(r["loss"] is None for row in results["rows"] for r in row["lengths"])
        lines += ["", f"Trained with a context of {', '.join(map(str, results['block_size']))} tokens"
                  + ("; n/a: learned positions end there." if na else ".")
                  + (" RoPE scaling rows: the same RoPE runs, their positions stretched for the evaluation only."
                     if results["rope_scalings"] else "")]
    lines += ["", "Runs: " + ", ".join(f"`runs/{n}`" for row in results["rows"] if not row["rope_scaling"]
                                         for n in row["runs"]), ""]
    return "\n".join(lines)


def plot_lengths(results: dict, out: Path) -> Path:
    """Loss against context length, a line per row (mean, error bars: the spread over seeds)."""
    from plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for i, row in enumerate(results["rows"]):
            points = [(r["length"], r["loss"]) for r in row["lengths"] if r["loss"] is not None]
            if not points:
                continue
            xs, ss = zip(*points)
            ax.errorbar(xs, [s["mean"] for s in ss], yerr=[s["std"] for s in ss], marker="o", markersize=3,
                        capsize=2, color=f"C{i % 10}", linestyle="--" if row["rope_scaling"] else "-",
                        label=row_label(row))
        for block in results["block_size"]:
            ax.axvline(block, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens); dotted: the training context")
        ax.set_ylabel("loss (cross-entropy)")
        ax.set_title("loss by context length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return out


def write_results(plan: Plan, results: dict, log: Callable[[str], None]) -> None:
    from plots import plot_runs

    out = plan.out
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    atomic_write(out / "results.md", lambda f: f.write(format_markdown(results, out).encode()))
    written = [out / "results.md", out / "results.json"]
    labels = [f"{r.label} seed={r.seed}" for r in plan.runs]
    written.append(plot_runs([Path(r.cfg.run.out_dir) for r in plan.runs], out / "loss.png", labels=labels))
    if results["lengths"]:
        written.append(plot_lengths(results, out / "lengths.png"))
    log(f"wrote {', '.join(map(str, written))}")
