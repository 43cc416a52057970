"""The run folder's files: checkpoints (saved atomically, CRC-checked on load, a last few kept on request),
the lock that keeps one training process per folder, and the tidying before a run continues there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions

from prepare_data import UserError, atomic_write


# ----------------------------------------------------------------------------------------------------
# Checkpoints: written atomically (a temporary file, fsynced, renamed), so a crash never leaves a broken one;
# checked against the CRC-32 of every record on load (torch.load alone reads flipped bits without a word), and
# loaded with weights_only=True, so a crafted file cannot run code. Weights and optimizer state are stored
# whole (gathered from every process under FSDP), so a run resumes on any number of processes.

CHECKPOINT_VERSION = 2
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(path: str | Path, state: dict) -> None:
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, flipped bits, or a pickle that weights_only refuses
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or not a minigpt checkpoint ({reason[:200]}); "
                        "use another checkpoint (e.g. best.pt) or train again") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state \
            or not isinstance(state.get("config"), dict):
        raise UserError(f"{path} is not a minigpt checkpoint (version {CHECKPOINT_VERSION}); train again")
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
