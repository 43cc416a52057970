"""FSDP for a model too big for one process: each process builds the model on the meta device, shards it, and
allocates and fills its own shards only, from the seeded initialisation replayed one tensor at a time (a new run)
or from the checkpoint rank 0 alone reads (a resumed run); and the memory check counts a process's shards and the
activations of its micro-batch.

The torchrun tests measure each process's resident memory over the build and the load (memory.BuildMemoryLog,
asked for with MINIGPT_BUILD_MEMORY_LOG) at two depths of the model: what the extra layers add is the memory that
the parameters take, free of what torch takes once whatever the size."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import memory
import sharding
import train
from encoder_decoder import build_model
from errors import UserError
from memory import training_memory
from model import GPTConfig
from runtime import Runtime
from sharding import SeededInit, build_on_meta, parameters_on_meta
from test_distributed import env, free_port, kill_group, launch

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# The seeded initialisation, recorded on the meta device and replayed a tensor at a time, is bitwise the real one.


def seeded_build(cfg: GPTConfig, seed: int = 1337):
    torch.manual_seed(seed)
    init = SeededInit()
    with parameters_on_meta(), init:
        model = build_model(cfg)
    init.finish(model)
    return model, init


@pytest.mark.parametrize("switches", [
    {},
    {"pos_encoding": "alibi", "norm": "rmsnorm", "mlp": "swiglu", "n_experts": 3, "qk_norm": True, "bias": False},
    {"arch": "encoder_decoder", "pos_encoding": "rope", "norm_placement": "post", "n_kv_head": 2},
], ids=["gpt2", "variants", "encoder-decoder"])
def test_each_initial_weight_is_redrawn_alone_bitwise(switches):
    cfg = GPTConfig(vocab_size=65, n_layer=2, n_head=4, n_embd=32, block_size=16, **switches)
    torch.manual_seed(1337)
    real = build_model(cfg)
    after_real = torch.get_rng_state()

    model, init = seeded_build(cfg)
    assert torch.equal(torch.get_rng_state(), after_real)  # the generator moved on exactly as in the real build
    assert all(p.is_meta for p in model.parameters())  # no storage: nothing of the model was allocated
    assert init.replayable
    names = [name for name, _ in real.named_parameters()]
    assert names == [name for name, _ in model.named_parameters()]
    for name in reversed(names):  # in any order
        assert torch.equal(init.value(name), real.get_parameter(name)), name
    buffers = dict(real.named_buffers())
    assert buffers.keys() == dict(model.named_buffers()).keys()
    for name, b in model.named_buffers():  # real values, made by the constructor (ALiBi's slopes)
        assert not b.is_meta and torch.equal(b, buffers[name])
    if cfg.n_experts:
        assert not model.blocks[0].mlp.aux_loss.is_meta  # plain tensors stay where they were made


class Toy(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.ok = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.empty(5, 2))
        if how == "made random":  # the values exist only in the constructor's own tensor
            self.w = nn.Parameter(torch.randn(5, 2))
        elif how == "scaled after":
            nn.init.normal_(self.w)
            with torch.no_grad():
                self.w.mul_(2)
        elif how == "in part":
            nn.init.normal_(self.w)
            nn.init.zeros_(self.w[0])
        elif how == "copied":
            with torch.no_grad():
                self.w.copy_(torch.ones(5, 2))
        elif how == "refilled whole":  # the last write decides: replayable
            with torch.no_grad():
                self.w.mul_(2)
            nn.init.uniform_(self.w)
        elif how == "own generator":
            nn.init.normal_(self.w, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("how", ["made random", "scaled after", "in part", "copied", "refilled whole",
                                 "own generator"])
def test_an_initialisation_that_cannot_be_redrawn_is_noticed(how):
    torch.manual_seed(0)
    init = SeededInit()
    with parameters_on_meta(), init:
        toy = Toy(how)
    init.finish(toy)
    assert init.values["ok.weight"] is not None and init.values["ok.bias"] is not None
    assert init.replayable == (how == "refilled whole")
    if init.replayable:
        torch.manual_seed(0)
        real = Toy(how)
        assert torch.equal(init.value("w"), real.w)


def test_counting_the_parameters_on_the_meta_device_draws_nothing():
    """The memory check counts a single process's parameters on a meta build: the weights it then builds for real
    are the ones it always built."""
    cfg = replace(train.Config(), model=GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32, block_size=16))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model, init = build_on_meta(cfg, Runtime(CPU, torch.float32))
    assert init is None and torch.equal(torch.get_rng_state(), before)
    assert sharding.local_param_count(model) == build_model(cfg.model).num_params(non_embedding=False)


# ----------------------------------------------------------------------------------------------------
# The memory check: a process's weights, gradients and AdamW state (its shards' under FSDP), and the activations.


def config(**model) -> train.Config:
    base = dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=512)
    return replace(train.Config(), model=GPTConfig(**{**base, **model}),
                   train=replace(train.Config().train, batch_size=64))


def old_bound(cfg: train.Config, n_params: int) -> int:
    """What check_memory asked for before: the float32 logits and 16 bytes per parameter."""
    return 4 * (cfg.train.batch_size * cfg.model.block_size * cfg.model.padded_vocab_size + 4 * n_params)


def test_a_batch_whose_activations_cannot_fit_is_refused_though_weights_and_logits_would(monkeypatch):
    cfg = config()
    rt = Runtime(CPU, torch.float32)
    n = build_model(cfg.model).num_params(non_embedding=False)
    state, activations = training_memory(cfg, rt, n)
    assert state == 16 * n and activations > 10 * old_bound(cfg, n)  # the layers' activations dwarf the logits
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(memory, "free_memory", lambda device: (state + activations) // 2)
    with pytest.raises(UserError) as caught:
        memory.check_memory(cfg, rt, n)
    message = str(caught.value)
    assert "\n" not in message and "of activations" in message and "is free on cpu" in message
    assert "lower train.batch_size" in message and "model.grad_checkpointing" in message
    monkeypatch.setattr(memory, "free_memory", lambda device: state + activations)  # exactly enough
    memory.check_memory(cfg, rt, n)
    # gradient checkpointing keeps one layer's activations: the same batch fits in less
    checkpointed = replace(cfg, model=replace(cfg.model, grad_checkpointing=True))
    assert training_memory(checkpointed, rt, n)[1] < activations / 2


def test_weights_that_alone_cannot_fit_ask_for_sharding_on_a_gpu_and_processes_on_a_cpu_share_it(monkeypatch):
    cfg = config(block_size=16)
    cfg = replace(cfg, train=replace(cfg.train, batch_size=1))
    n = 10**9  # 16 GB of weights, gradients and moments
    gpu = Runtime(torch.device("cuda", 0), torch.bfloat16)
    monkeypatch.setattr(memory, "free_memory", lambda device: 8 * 10**9)
    with pytest.raises(UserError, match='run.distributed = "fsdp"'):
        memory.check_memory(cfg, gpu, n)
    memory.check_memory(cfg, gpu, n // 4)  # its shards on 4 GPUs fit
    cpu = Runtime(CPU, torch.float32, rank=0, world_size=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on one host share its memory
    memory.check_memory(cfg, cpu, n // 8)
    with pytest.raises(UserError, match=r"2 processes x 7\.5 GiB of weights"):
        memory.check_memory(cfg, cpu, n // 2)


def test_attention_scores_count_only_where_the_written_out_attention_keeps_them():
    """SDPA's fused kernels keep no T x T scores, so the bound leaves them out; a CPU training with dropout or in
    bfloat16 runs model.reference_attention, which keeps them: then inspection.py's whole estimate counts."""
    import inspection

    n = 10**6
    for cfg in (config(), config(arch="encoder_decoder", source_block_size=256),
                config(grad_checkpointing=True, dropout=0.1)):
        m, batch = cfg.model, cfg.train.batch_size
        for rt, dtype, kept in [(Runtime(CPU, torch.float32), "float32", m.dropout > 0),
                                (Runtime(CPU, torch.bfloat16), "bfloat16", True),
                                (Runtime(torch.device("cuda", 0), torch.bfloat16), "bfloat16", False)]:
            whole = (inspection.encoder_decoder_activation_bytes if m.arch == "encoder_decoder"
                     else inspection.activation_bytes)(m, batch, dtype)
            whole = whole["bytes_with_checkpointing" if m.grad_checkpointing else "bytes"]
            scores = memory.attention_scores_bytes(m, batch, dtype)
            assert 0 < scores < whole
            assert training_memory(cfg, rt, n) == (16 * n, whole if kept else whole - scores)
    # the scores as inspection.py counts them: its estimate grows by exactly theirs with twice the heads
    for cfg in (config(), config(dropout=0.1), config(arch="encoder_decoder", source_block_size=256, dropout=0.1)):
        estimate = (inspection.encoder_decoder_activation_bytes if cfg.model.arch == "encoder_decoder"
                    else inspection.activation_bytes)
        more = replace(cfg.model, n_head=2 * cfg.model.n_head)  # the same width: only the scores change
        grows = estimate(more, 64, "bfloat16")["bytes"] - estimate(cfg.model, 64, "bfloat16")["bytes"]
        assert grows == (memory.attention_scores_bytes(more, 64, "bfloat16")
                         - memory.attention_scores_bytes(cfg.model, 64, "bfloat16"))


# ----------------------------------------------------------------------------------------------------
# Under torchrun: each process's memory for the parameters is half of one process's.

WIDE = {"model.n_embd": 512, "model.n_head": 8, "model.block_size": 32, "model.dropout": 0.0, "run.device": "cpu",
        "run.dtype": "float32", "train.batch_size": 1, "train.grad_accum": 2, "train.max_iters": 1,
        "train.eval_interval": 1, "train.eval_iters": 1, "log.interval": 1, "optim.warmup_iters": 1}
DEPTHS = (1, 6)  # 512 wide: the 5 layers between are 15.8M parameters, 63 MB in float32
RUNS = {"single": 1, "fsdp": 2, "resumed-single": 1, "resumed": 2}  # processes
FOLDER = {"single": "single", "fsdp": "fsdp", "resumed-single": "single", "resumed": "fsdp"}  # whose run


def run_args(data, out_dir, **overrides) -> list[str]:
    args = ["train", Path(__file__).resolve().parents[1] / "config" / "debug.toml", "--set", f"data.dir={data}",
            "--set", f"run.out_dir={out_dir}"]
    for key, value in {**WIDE, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args


def measured(folder: Path, nproc: int) -> list[dict]:
    """Each process's record, with `own`: its peak resident memory over the build and the load above where it
    began, less the file pages it mapped meanwhile (code, and on rank 0 the checkpoint it reads: page cache)."""
    records = [json.loads((folder / f"build-rank{r}.json").read_text()) for r in range(nproc)]
    for r in records:
        r["own"] = (r["peak"] - r["rss_start"]) - (r["file_end"] - r["file_start"])
    return records


def ran(result: subprocess.CompletedProcess, nproc: int) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"| {nproc} x cpu float32 |" in result.stdout


@pytest.mark.once
def test_each_process_holds_half_of_what_one_process_holds_through_the_build_and_the_resume(char_data, tmp_path,
                                                                                            monkeypatch):
    try:  # what BuildMemoryLog resets (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs a resettable peak resident set (/proc/self/clear_refs, Linux)")
    logs = {}
    for depth in DEPTHS:
        for kind, nproc in RUNS.items():
            logs[kind, depth] = folder = tmp_path / f"log-{kind}-{depth}"
            monkeypatch.setenv(memory.BuildMemoryLog.VARIABLE, str(folder))
            run = tmp_path / f"{FOLDER[kind]}-{depth}"
            if kind.startswith("resumed"):  # the finished run again: built and loaded, nothing to train or save
                args = ["train", "--resume", run, "--set", "run.distributed=fsdp"]
            else:
                args = run_args(char_data, run, **{"model.n_layer": depth, "run.distributed": "fsdp"})
            result = launch(nproc, *args, cwd=tmp_path)
            ran(result, nproc)
            assert not kind.startswith("resumed") or "nothing to do" in result.stdout

    grown = {}  # per run, per process: what the extra layers added
    for kind, nproc in RUNS.items():
        small, large = measured(logs[kind, DEPTHS[0]], nproc), measured(logs[kind, DEPTHS[1]], nproc)
        grown[kind] = [{k: b[k] - a[k] for k in ("own", "param_bytes", "rss_start")} for a, b in zip(small, large)]
    params = grown["single"][0]["param_bytes"]  # the extra layers' weights, whole
    assert params > 60 * 2**20
    summary = {kind: [round(g["own"] / params, 2) for g in gs] for kind, gs in grown.items()}
    print(f"\nmemory the extra layers add to each process, in units of their weights: {summary}")

    # one process: the measure sees the weights, not lost in what torch takes anyway; a resume adds the gradients
    # (torch.distributed.checkpoint makes AdamW's state with a step on zero gradients) and the two moments
    # (4 units); it copies the moments out of the checkpoint's memory map and lets the map go, so that the file
    # can go once a save replaces it: the 3 units of it read through the map count then, page cache though they are
    assert 0.85 < grown["single"][0]["own"] / params < 1.3, summary
    assert 3.4 < grown["resumed-single"][0]["own"] / params < 7.6, summary
    for kind in ("fsdp", "resumed"):  # each process's shards: half the weights (every extra tensor's rows are even)
        assert [g["param_bytes"] for g in grown[kind]] == [params // 2] * 2
    # two processes: each holds about half of what the one did in a new run, and about half of the weights,
    # gradients and moments in a resumed one (where rank 1 never reads the checkpoint, and rank 0 reads it through
    # a memory map, as page cache)
    for g in grown["fsdp"]:
        assert 0.35 < g["own"] / grown["single"][0]["own"] < 0.65, summary
    for g in grown["resumed"]:
        assert 0.35 < g["own"] / (4 * params) < 0.65, summary
    # and no process read the checkpoint into its memory before the build began (load_checkpoint maps the file):
    # the weights and moments would be there already, 3 units
    for kind in ("resumed-single", "resumed"):
        for g in grown[kind]:
            assert abs(g["rss_start"]) < 0.2 * params, (kind, g["rss_start"] / params)


# ----------------------------------------------------------------------------------------------------
# An encoder-decoder: its decoder blocks' cross-attention also runs outside the block (the source's keys and
# values, EncoderDecoder.cross_cache), so it is a unit of its own with memory_kv as a forward method.


def test_an_encoder_decoder_trains_under_fsdp_exactly_as_in_one_process(tmp_path):
    from checkpoint import load_checkpoint
    from prepare_data import prepare

    data = tmp_path / "copy"
    prepare("task:copy", out=data, examples=200, seed=1, log=lambda s: None)
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"run-{nproc}"
        result = launch(nproc, *run_args(data, runs[nproc], **{
            "model.arch": "encoder_decoder", "model.pos_encoding": "alibi", "model.n_layer": 2, "model.n_embd": 32,
            "model.n_head": 2, "train.batch_size": 4, "train.max_iters": 2, "train.eval_interval": 2,
            "run.distributed": "fsdp"}), cwd=tmp_path)
        ran(result, nproc)
    one, two = load_checkpoint(runs[1]), load_checkpoint(runs[2])
    assert one["model"].keys() == two["model"].keys()
    assert max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"]) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# An initialisation that cannot be redrawn a tensor at a time: rank 0 builds the model and sends it out.

FALLBACK = """
import sys, torch, torch.nn as nn, torch.distributed as dist
from dataclasses import replace
from torch.distributed.checkpoint.state_dict import get_model_state_dict
import runtime, sharding, train
from checkpoint import FULL_STATE

class Toy(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.w = nn.Parameter(torch.randn(6, 4))  # drawn in the constructor: not replayable
        self.register_buffer("table", torch.arange(3.0), persistent=False)

sharding.build_model = Toy
cfg = train.Config()
cfg = replace(cfg, run=replace(cfg.run, device="cpu", dtype="float32", distributed="fsdp"))
rt = runtime.setup_runtime(cfg.run)
torch.manual_seed(7)
model, init = sharding.build_on_meta(cfg, rt, record_init=True)
assert not init.replayable
sharding.materialize(model, cfg, rt, init)
assert torch.equal(model.table, torch.arange(3.0))
weights = get_model_state_dict(model, options=FULL_STATE)
if rt.is_main:
    torch.manual_seed(7)
    want = Toy(cfg).state_dict()
    assert weights.keys() == want.keys()
    assert all(torch.equal(weights[k], want[k]) for k in want), "not the seeded weights"
    print("same weights")
dist.destroy_process_group()
runtime.end_torchrun_worker()
"""


@pytest.mark.once
def test_an_initialisation_that_cannot_be_redrawn_comes_from_rank_0(tmp_path):
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                             str(free_port()), str(script)], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    assert "same weights" in out
