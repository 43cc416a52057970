"""A Hugging Face model folder's files: finding the folder (a local path, or a hub id fetched with huggingface_hub),
reading its weights one tensor at a time, and writing weights the way `save_pretrained` does.

Weights are read lazily: safetensors files are opened with `safe_open` (a tensor is read when asked for), and a
`pytorch_model.bin` is memory-mapped and unpickled with `weights_only=True`, which refuses any pickle that would
run code instead of executing it. So a model is never held twice in memory while it is converted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

import torch

from errors import UserError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 1000**3  # save_pretrained's default max_shard_size, "5GB"
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "vocab.json", "merges.txt", "special_tokens_map.json"]  # what an import reads; never the .bin twins


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {what} {path} ({getattr(e, 'strerror', None) or e}); is it a Hugging Face "
                        "model folder saved with save_pretrained?") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not the object {what} should be")
    return value


def looks_like_hub_id(source: str) -> bool:
    """`gpt2`, `openai-community/gpt2`: a name, not a path (no ./, no leading /, at most one slash)."""
    return (not source.startswith((".", "/", "~")) and source.count("/") <= 1 and os.sep not in source.replace("/", "")
            and all(part and all(c.isalnum() or c in "-_." for c in part) for part in source.split("/")))


def model_folder(source: str) -> Path:
    """The local folder of SOURCE: a path, or a hub id downloaded (or found in the local hub cache) by
    huggingface_hub. A folder without config.json is refused."""
    path = Path(source).expanduser()
    if not path.exists():
        if not looks_like_hub_id(source):
            raise UserError(f"{source} does not exist; pass a Hugging Face model folder (config.json and weights) "
                            "or a hub id such as gpt2")
        path = download(source)
    if not path.is_dir():
        raise UserError(f"{source} is a file; pass the Hugging Face model folder that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json, so it is not a Hugging Face model folder; pass the folder "
                        "save_pretrained wrote (config.json and model.safetensors)")
    return path


def download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id} is not a local folder, and fetching it from the Hugging Face hub needs "
                        "huggingface_hub: pip install 'minigpt[hf]', or pass a local folder") from None
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # an old repository with pickled weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=[*HUB_FILES, "pytorch_model*.bin*"]))
        return folder
    except Exception as e:  # no network, an unknown id, a gated repository: all mean "cannot fetch"
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(f"could not fetch {repo_id} from the Hugging Face hub ({type(e).__name__}: {reason}); check "
                        "the network and the id, or pass a local folder") from None


class Weights:
    """A model folder's tensors by their Hugging Face names, each read from disk when asked for. Use as a context
    manager: the files stay open until it closes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._stack = ExitStack()
        self._where: dict[str, Callable[[str], torch.Tensor]] = {}
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "Weights":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"{self.folder} has no weight {name!r}, which its config.json needs; the weights and the "
                            "config disagree (a different model, or a partial save)")
        return self._where[name](name)

    def _open(self) -> None:
        folder = self.folder
        if (folder / SAFETENSORS_INDEX).is_file():
            self._open_shards(folder / SAFETENSORS_INDEX, self._open_safetensors)
        elif (folder / SAFETENSORS).is_file():
            self._open_safetensors(folder / SAFETENSORS)
        elif (folder / PYTORCH_BIN_INDEX).is_file():
            self._open_shards(folder / PYTORCH_BIN_INDEX, self._open_bin)
        elif (folder / PYTORCH_BIN).is_file():
            self._open_bin(folder / PYTORCH_BIN)
        else:
            raise UserError(f"{folder} has no weights: expected {SAFETENSORS} (or sharded safetensors with "
                            f"{SAFETENSORS_INDEX}) or {PYTORCH_BIN}")

    def _open_shards(self, index: Path, open_one: Callable[[Path], None]) -> None:
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map; the sharded save is incomplete")
        for shard in sorted(set(weight_map.values())):
            if not (index.parent / shard).is_file():
                raise UserError(f"{index} lists shard {shard}, which is missing from {index.parent}")
            open_one(index.parent / shard)

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            handle = self._stack.enter_context(safe_open(path, framework="pt"))
            names = list(handle.keys())  # safe_open checks that the header covers the file: a truncated one fails
        except Exception as e:
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            raise UserError(f"{path} is not a readable safetensors file ({reason}); it may be truncated: copy or "
                            "download it again") from None
        for name in names:
            self._where[name] = handle.get_tensor

    def _open_bin(self, path: Path) -> None:
        import pickle
        import zipfile

        try:
            # memory-mapped where it can be (torch's zip format), so tensors are read when used
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise UserError(f"refused to load {path}: it is a pickle that would run code or build objects other than "
                            f"tensors ({first}); convert it to safetensors with a tool you trust, or use another "
                            "copy") from None
        except Exception as e:
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            raise UserError(f"{path} is not a readable PyTorch weights file ({reason}); it may be truncated: copy "
                            "or download it again") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise UserError(f"{path} does not hold a table of tensors; pass a folder saved with save_pretrained")
        for name, tensor in state.items():
            self._where[name] = lambda _, t=tensor: t


def write_weights(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write (name, tensor) pairs as model.safetensors, or as model-0000i-of-0000n.safetensors shards with an index
    once they pass max_shard_bytes (as save_pretrained shards them); return the files written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.contiguous()
        sizes[-1] += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / SAFETENSORS, metadata={"format": "pt"})
        return [SAFETENSORS]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        files.append(f"model-{i:05d}-of-{len(shards):05d}.safetensors")
        save_file(shard, out_dir / files[-1], metadata={"format": "pt"})
        weight_map.update({name: files[-1] for name in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*files, SAFETENSORS_INDEX]


def refuse_taken(out: Path) -> None:
    """A new --out folder may not exist yet or be empty: nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; pass a new --out folder (nothing is "
                        "overwritten)")


def write_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Write a new folder `out` through `fill(tmp)` on a temporary folder beside it, renamed into place when every
    file is written: a failure leaves nothing behind. An existing non-empty `out` is refused."""
    refuse_taken(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
