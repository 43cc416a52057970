"""A Hugging Face model folder -> a minigpt run folder (`minigpt import`, and `init.from` for fine-tuning), and a run
-> a folder `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load with no code of ours
(`minigpt export`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from interop.hf_files import (MAX_SHARD_BYTES, Weights, model_folder, read_json, refuse_taken, write_folder,
                              write_weights)
from errors import UserError
from interop.hf_models import IGNORED_SUFFIXES, architecture, config_from_hf, export_class, hf_config, hf_weights, links
from model import GPT, GPTConfig
from tokenization import Tokenizer, load_tokenizer

IMPORT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Pretrained:
    """A model read from a Hugging Face folder: what computes it in minigpt, its weights under our names, and its
    tokenizer."""
    config: GPTConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: dict  # where it came from: the source as given, the folder, the HF class


def expected_shapes(cfg: GPTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {name: t.shape for name, t in GPT(cfg).state_dict().items()}


def read_pretrained(source: str, dtype: str = "auto") -> Pretrained:
    """Read SOURCE (a HF model folder or a hub id) one tensor at a time: each HF tensor is read, stacked or
    transposed into ours, and let go, so the model is held once. Weights keep their dtype unless `dtype` says."""
    if dtype not in IMPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(IMPORT_DTYPES)}, got {dtype!r}")
    from interop.hf_tokenizer import tokenizer_from_hf_folder

    folder, hf, cfg = hf_model_config(source)
    tokenizer = tokenizer_from_hf_folder(folder, hf)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                        f"{cfg.vocab_size}; the tokenizer belongs to another model")
    state = read_weights(folder, hf, cfg, IMPORT_DTYPES[dtype])
    return Pretrained(cfg, state, tokenizer, {"source": str(source), "folder": str(folder),
                                              "architecture": hf.get("architectures", [hf["model_type"]])[0]})


def hf_model_config(source: str) -> tuple[Path, dict, GPTConfig]:
    """SOURCE's folder (fetched if a hub id), its config.json, and the GPTConfig that computes it."""
    folder = model_folder(source)
    hf = read_json(folder / "config.json", "the model config")
    return folder, hf, config_from_hf(hf, str(folder))


def read_weights(folder: Path, hf: dict, cfg: GPTConfig, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    with Weights(folder) as weights:
        return read_state(weights, architecture(hf, str(folder)), cfg, dtype, str(folder))


def read_state(weights: Weights, model_type: str, cfg: GPTConfig, dtype: torch.dtype | None,
               where: str) -> dict[str, torch.Tensor]:
    names = set(weights.names())
    # GPT-2's original files name the transformer's weights without the "transformer." of GPT2LMHeadModel
    bare = model_type == "gpt2" and "transformer.wte.weight" not in names and "wte.weight" in names

    def hf_name(name: str) -> str:
        return name.removeprefix("transformer.") if bare else name

    shapes, state, used = expected_shapes(cfg), {}, set()
    for link in links(model_type, cfg):
        parts = [weights.get(hf_name(name)) for name in link.theirs]
        used.update(hf_name(name) for name in link.theirs)
        t = parts[0] if len(parts) == 1 else torch.cat(parts)  # q, k, v stacked into one matmul
        if link.conv1d:
            t = t.t()
        t = (t if dtype is None else t.to(dtype)).contiguous()
        if t.shape != shapes[link.ours]:
            got = " + ".join(str(tuple(p.shape)) for p in parts)
            raise UserError(f"{where}: weight {hf_name(link.theirs[0])} is {got} but config.json makes it "
                            f"{tuple(shapes[link.ours] if not link.conv1d else shapes[link.ours][::-1])}; the weights "
                            "and config.json belong to different models")
        state[link.ours] = t
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]  # tied: one tensor, saved once
        used.add("lm_head.weight")  # some saves write the tied copy too
    left = sorted(n for n in names - used if not n.endswith(IGNORED_SUFFIXES))
    if left:
        raise UserError(f"{where}: weights config.json does not account for ({', '.join(left[:3])}"
                        f"{', ...' if len(left) > 3 else ''}); the weights and config.json belong to different models")
    return state


def import_model(source: str, out: Path, dtype: str = "auto", log=print) -> Path:
    """`minigpt import`: SOURCE -> a run folder (ckpt.pt and config.toml) that sample, attention, inspect, eval and
    bench sample use like a trained run's, and init.from fine-tunes."""
    import train as trainer
    from checkpoint import CHECKPOINT_VERSION, save_checkpoint, write_config
    from cli.config_loader import config_to_dict, config_to_toml

    out = Path(out)
    refuse_taken(out)  # before the (long) read; write_folder checks again as it writes
    pre = read_pretrained(source, dtype)
    cfg = trainer.Config(model=pre.config, data=trainer.DataConfig(dir=""), run=trainer.RunConfig(out_dir=str(out)))
    state = {"version": CHECKPOINT_VERSION, "model": pre.state, "optimizer": None, "scaler": None, "step": 0,
             "tokens_seen": 0, "best_val_loss": math.inf, "config": config_to_dict(cfg), "tokenizer": pre.tokenizer.spec,
             "data": None, "sampler": None, "wandb_run_id": None, "elapsed_s": 0.0, "imported_from": pre.source}

    def fill(tmp: Path) -> None:
        save_checkpoint(tmp / "ckpt.pt", state)
        write_config(tmp, config_to_toml(cfg))

    write_folder(out, fill)
    n = sum(t.numel() for name, t in pre.state.items() if not (name == "lm_head.weight" and cfg.model.tie_embeddings))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in pre.state.values()})
    log(f"imported {pre.source['architecture']} from {source}: {n / 1e6:.2f}M parameters ({', '.join(dtypes)}), "
        f"{pre.tokenizer.spec.get('kind')} tokenizer of {pre.tokenizer.vocab_size:,} ids -> {out}")
    return out


def export_run(run: Path, out: Path, checkpoint: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
               log=print) -> Path:
    """`minigpt export`: a run's checkpoint -> a Hugging Face folder (model.safetensors, config.json,
    generation_config.json, tokenizer.json and tokenizer_config.json). A model no HF class computes is refused
    before anything is written."""
    from checkpoint import find_checkpoint, load_checkpoint, weights_do_not_fit, weights_mismatch
    from interop.hf_tokenizer import export_tokenizer
    from sample import model_config

    path = find_checkpoint(run, checkpoint)
    state = load_checkpoint(path)
    cfg = model_config(path, state)
    model_type = export_class(cfg)
    data = state.get("data") or {}
    if data.get("special_tokens"):
        raise UserError(f"{path} was trained on pairs: its separator and end tokens are not in any tokenizer Hugging "
                        "Face loads, so it has no HF equivalent; nothing was written")
    weights = state["model"]
    mismatch = weights_mismatch({n: torch.empty(s, device="meta") for n, s in expected_shapes(cfg).items()}, weights)
    if mismatch:
        raise weights_do_not_fit(path, state, mismatch)
    tokenizer = load_tokenizer(state["tokenizer"])
    dtype = weights["wte.weight"].dtype

    def fill(tmp: Path) -> None:
        write_weights(tmp, hf_weights(model_type, cfg, weights), max_shard_bytes)
        ids = export_tokenizer(tokenizer, tmp, model_max_length=cfg.block_size)
        (tmp / "config.json").write_text(json.dumps(hf_config(model_type, cfg, ids, dtype), indent=2) + "\n")
        generation = {k: v for k, v in ids.items() if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    write_folder(Path(out), fill)
    log(f"exported {path} as {hf_config(model_type, cfg, {}, dtype)['architectures'][0]} "
        f"({str(dtype).removeprefix('torch.')}) -> {out}")
    return Path(out)


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: init.from = a minigpt run or a Hugging Face model


def is_minigpt_run(path: Path) -> bool:
    return path.suffix == ".pt" or (path / "ckpt.pt").is_file()


@functools.lru_cache(maxsize=4)  # the config is resolved by the command line and again by train(): read once
def pretrained_config(source: str) -> tuple[GPTConfig, dict]:
    """The model config and tokenizer spec of init.from's SOURCE (no weights are read)."""
    path = Path(source).expanduser()
    if is_minigpt_run(path):
        from checkpoint import find_checkpoint, load_checkpoint
        from sample import model_config

        file = find_checkpoint(path)
        state = load_checkpoint(file)
        return model_config(file, state), state["tokenizer"]
    from interop.hf_tokenizer import tokenizer_from_hf_folder

    folder, hf, cfg = hf_model_config(source)
    return cfg, tokenizer_from_hf_folder(folder, hf).spec


def finetune_model_config(source: str, ours: GPTConfig) -> tuple[GPTConfig, list[str]]:
    """The model a run fine-tuning SOURCE trains: SOURCE's, but for the config's dropout and gradient checkpointing,
    and its block_size where that is smaller (learned positions are cropped to it, as nanoGPT's crop_block_size).
    Also notes naming the config's [model] keys that do not apply (set to neither the default nor SOURCE's value)."""
    try:
        theirs = pretrained_config(source)[0]
    except UserError as e:  # said where the path came from: a config key, not an argument
        raise UserError(f"init.from: {e}") from None
    model = replace(theirs, dropout=ours.dropout, grad_checkpointing=ours.grad_checkpointing,
                    block_size=min(ours.block_size, theirs.block_size))
    default, notes = GPTConfig(), []
    ignored = [f"{f.name} = {getattr(ours, f.name)!r}" for f in fields(GPTConfig)
               if f.name not in ("dropout", "grad_checkpointing", "block_size", "vocab_size")
               and getattr(ours, f.name) not in (getattr(default, f.name), getattr(theirs, f.name))]
    if ignored:
        notes.append(f"note: init.from {source} sets the model; not used from the config: {', '.join(ignored)}")
    if ours.block_size > theirs.block_size:
        notes.append(f"note: model.block_size {ours.block_size} is more than {source}'s {theirs.block_size}; "
                     f"training with {theirs.block_size}")
    return model, notes


def check_finetune_data(source: str, tokenizer_spec: dict, data_dir: str) -> None:
    if pretrained_config(source)[1] != tokenizer_spec:
        raise UserError(f"{data_dir} was prepared with another tokenizer than init.from {source} uses; prepare the "
                        f"text with its tokenizer: minigpt prepare SOURCE --tokenizer {source} --out DIR, then "
                        "--set data.dir=DIR")


def pretrained_weights(source: str, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """init.from's weights under our names, for the model cfg (learned positions cropped to its block_size)."""
    path = Path(source).expanduser()
    if is_minigpt_run(path):
        from checkpoint import find_checkpoint, load_checkpoint

        state = dict(load_checkpoint(find_checkpoint(path))["model"])
    else:  # the weights alone: the tokenizer was checked against the data already (check_finetune_data)
        folder, hf, theirs = hf_model_config(source)
        state = read_weights(folder, hf, theirs, None)
    if "wpe.weight" in state and state["wpe.weight"].size(0) > cfg.block_size:
        state["wpe.weight"] = state["wpe.weight"][:cfg.block_size]
    return state
