"""The run folder's files: checkpoints (saved atomically, CRC-checked on load, a last few kept on request),
the lock that keeps one training process per folder, and the tidying before a run continues there.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import json
import os
import shutil
import tomllib
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions

from dataset_format import atomic_write
from errors import UserError

# ----------------------------------------------------------------------------------------------------
# Checkpoints: written atomically (a temporary file, fsynced, renamed), so a crash never leaves a broken one;
# checked against the CRC-32 of every record on load (torch.load alone reads flipped bits without a word), and
# loaded with weights_only=True, so a crafted file cannot run code. Weights and optimizer state are stored
# whole (gathered from every process under FSDP), so a run resumes on any number of processes.
# Each is stamped with the minigpt release that wrote it: a checkpoint this release cannot use (another format,
# settings it does not know, weights its config does not build) is refused naming that release, not as a typo.

CHECKPOINT_VERSION = 2  # the format: bumped when a checkpoint's layout changes, and refused on load when it differs
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@functools.cache
def minigpt_version() -> str:
    """This minigpt's release: the pyproject.toml beside this file in a source checkout (an editable install's
    metadata goes stale when the version is bumped), else the installed package's metadata, else 'unknown'."""
    try:
        with open(Path(__file__).with_name("pyproject.toml"), "rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == "minigpt" and isinstance(project.get("version"), str):
            return project["version"]
    except (OSError, tomllib.TOMLDecodeError):
        pass
    try:
        return importlib.metadata.version("minigpt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def written_by(state: dict) -> str:
    """'minigpt X', the release that wrote the checkpoint, as save_checkpoint stamps it; for a checkpoint written
    before checkpoints were stamped, 'an earlier minigpt (one that did not record its version)'."""
    version = state.get("minigpt_version") if isinstance(state, dict) else None
    if isinstance(version, str) and version:
        return f"minigpt {version}"
    return "an earlier minigpt (one that did not record its version)"


def use_writer(state: dict, verb: str) -> str:
    """What to do with a checkpoint this minigpt cannot read: '{verb} it with minigpt X, which wrote it'."""
    version = state.get("minigpt_version") if isinstance(state, dict) else None
    if isinstance(version, str) and version and version != minigpt_version():
        return f"{verb} it with minigpt {version}, which wrote it"
    return f"{verb} it with the minigpt that wrote it"


def unknown_settings(path: str | Path, state: dict, what: str, names: list[str], verb: str) -> UserError:
    """The error for a checkpoint holding settings this minigpt does not have: it names the versions, not a typo.
    `what`: 'config keys' or 'model settings'; `verb`: what the user meant to do ('resume', 'sample', ...)."""
    writer, ours, listed = written_by(state), minigpt_version(), ", ".join(names)
    if writer == f"minigpt {ours}":  # the same release: edited by hand, or written by a development copy
        return UserError(f"{path} was written by this minigpt ({ours}), yet holds {what} it does not know ({listed}): "
                         f"it was edited since, or written by a development copy; {verb} an unedited copy")
    return UserError(f"{path} was written by {writer}, with {what} this minigpt ({ours}) does not know ({listed}); "
                     f"{use_writer(state, verb)}")


def weights_mismatch(expected: dict, given: dict, most: int = 3) -> str:
    """The first few differences between the weights a model has (`expected`, its state_dict) and those `given`:
    'missing a.weight; unexpected b.weight; c.weight is 65x32 where the model has 65x48', or '' when they fit."""
    def shape(t) -> str:
        return ("x".join(map(str, t.shape)) or "a scalar") if isinstance(t, torch.Tensor) else type(t).__name__

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} is {shape(given[k])} where the model has {shape(expected[k])}" for k in expected
              if k in given and (not isinstance(given[k], torch.Tensor) or given[k].shape != expected[k].shape)]
    parts = []
    for what, names in (("missing", missing), ("unexpected", unexpected), ("", shapes)):
        if names:
            more = f" (and {len(names) - most} more)" if len(names) > most else ""
            parts.append(f"{what + ' ' if what else ''}{', '.join(names[:most])}{more}")
    return "; ".join(parts)


def weights_do_not_fit(path: str | Path, state: dict, mismatch: str) -> UserError:
    """The error for a checkpoint whose weights do not fit the model its own config builds (`mismatch`, from
    weights_mismatch): the release that wrote it, and what to do."""
    writer = written_by(state)
    if writer == f"minigpt {minigpt_version()}":  # this release wrote it as it trained it: changed since
        todo = "so it was changed since: use an unchanged copy (e.g. the run's best.pt or a step-*.pt), or train again"
    else:
        todo = f"{use_writer(state, 'use')}, or train again with this one"
    return UserError(f"{path}'s weights do not fit the model its config describes ({mismatch}); it was written by "
                     f"{writer}, {todo}")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` atomically, stamped with the minigpt release that wrote it (see written_by)."""
    state = {**state, "minigpt_version": minigpt_version()}
    atomic_write(path, lambda f: torch.save(state, f))


def copy_checkpoint(src: Path, dst: Path) -> None:
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train one first with `minigpt train CONFIG`")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record and checks its CRC-32
        if damaged is not None:
            raise ValueError(f"record {damaged} fails its CRC check")
        # memory-mapped: a tensor is read from the file when used, so a process that uses none (FSDP's ranks
        # other than 0, see runtime.load_sharded) never holds the weights
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, garbage bytes, flipped bits, or a pickle that weights_only refuses
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or not a minigpt checkpoint ({reason[:200]}); "
                        "use another checkpoint (e.g. best.pt) or train again") from None
    version = state.get("version") if isinstance(state, dict) else None
    if type(version) is int and version != CHECKPOINT_VERSION:  # a whole checkpoint, in another minigpt's format
        ours = minigpt_version()
        if version < CHECKPOINT_VERSION:
            raise UserError(f"{path} is an older checkpoint (format {version}, written by {written_by(state)}); this "
                            f"minigpt ({ours}) reads format {CHECKPOINT_VERSION}: {use_writer(state, 'use')}, or "
                            "train again with this one")
        raise UserError(f"{path} is a newer checkpoint (format {version}, written by {written_by(state)}); this "
                        f"minigpt ({ours}) reads format {CHECKPOINT_VERSION}: upgrade minigpt, or "
                        f"{use_writer(state, 'use')}")
    if not isinstance(state, dict) or version != CHECKPOINT_VERSION or "model" not in state \
            or not isinstance(state.get("config"), dict):
        raise UserError(f"{path} is not a minigpt checkpoint (format {CHECKPOINT_VERSION}); train again")
    return state


def keep_last_checkpoints(out_dir: Path, step: int, keep_last: int) -> None:
    """Copy ckpt.pt to step-NNNNNNN.pt and delete all but the newest keep_last of those."""
    if keep_last == 0:
        return
    copy_checkpoint(out_dir / "ckpt.pt", out_dir / f"step-{step:07d}.pt")
    for old in sorted(out_dir.glob("step-*.pt"))[:-keep_last]:
        old.unlink()


@contextmanager
def run_lock(out_dir: Path):
    """One training process per run folder. An flock on out_dir/lock, which holds the owner's pid: the kernel
    releases it when its process dies, however it dies, so a lock left by a killed run is simply taken over."""
    with open(out_dir / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{out_dir} is in use by another training process (pid {f.read().strip() or '?'}); "
                            "wait for it to finish, or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def tidy_run_dir(out_dir: Path, step: int) -> None:
    """Before a run continues in out_dir: remove temporary files of saves that a crash interrupted, and the
    metrics past the checkpoint's step (those steps are about to be trained again)."""
    for tmp in out_dir.glob(".*.tmp"):
        tmp.unlink()
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
                pass
        atomic_write(metrics, lambda f: f.write("".join(kept).encode()))


RUN_FILES = ("config.toml", "metrics.jsonl", "lock")  # what a run writes into its folder before its first checkpoint


def new_run_files(out_dir: Path) -> list[Path]:
    """Those of out_dir's files (and out_dir itself) that a run about to start there would create."""
    return [p for p in (*(out_dir / name for name in RUN_FILES), out_dir) if not p.exists()]


def remove_run_files(paths: list[Path]) -> None:
    """Remove the files (and then the folders) from new_run_files: a run that never saved leaves nothing behind."""
    for path in paths:
        try:
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
        except OSError:  # a folder that now holds something else stays
            pass


def write_config(out_dir: Path, text: str) -> None:
    """out_dir/config.toml, the run's resolved config for people and scripts (atomically: a full disk leaves the
    old one or none)."""
    atomic_write(out_dir / "config.toml", lambda f: f.write(text.encode()))


CHECKPOINT_FILES = {"latest": "ckpt.pt", "best": "best.pt"}  # a run folder's checkpoints, by --checkpoint name


def find_checkpoint(run: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file RUN names: a run folder's ckpt.pt (or best.pt with checkpoint='best'), or a checkpoint
    file itself, e.g. a step-NNNNNNN.pt that run.keep_last kept."""
    run = Path(run)
    if checkpoint is not None and checkpoint not in CHECKPOINT_FILES:
        raise UserError(f"--checkpoint must be 'latest' or 'best', got {checkpoint!r}")
    if run.suffix == ".pt" and not run.is_dir():
        if not run.is_file():
            raise UserError(f"no checkpoint at {run}; pass a run folder or one of its .pt files")
        if checkpoint is not None and CHECKPOINT_FILES[checkpoint] != run.name:
            raise UserError(f"{run} is a checkpoint file and --checkpoint {checkpoint} names another: drop one of them")
        return run
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; train one with `minigpt train CONFIG`")
    path = run / CHECKPOINT_FILES[checkpoint or "latest"]
    if checkpoint == "best" and not path.exists() and (run / "ckpt.pt").exists():
        raise UserError(f"{run} has no best.pt yet (no evaluation has run); use --checkpoint latest")
    return path
