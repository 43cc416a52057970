"""FSDP without the whole model in any process: build on the meta device (shapes, no storage), shard, then let
each process allocate its own shards and fill them, from the seeded initialisation replayed one tensor at a time
(a new run, bitwise the weights of one process's build) or from the checkpoint that rank 0 alone reads and sends
out a tensor at a time (a resumed one). train.py calls `build_for_training`, then `load_state` on a resume.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoint import weights_mismatch
from encoder_decoder import build_model
from memory import check_memory
from runtime import Runtime, parallelize

if TYPE_CHECKING:
    from train import Config


def shards_model(cfg: Config, rt: Runtime) -> bool:
    """Whether this run shards its model: under torchrun with run.distributed = fsdp."""
    return rt.world_size > 1 and cfg.run.distributed == "fsdp"


@contextmanager
def parameters_on_meta():
    """Inside, every parameter a module registers goes to the meta device (its shape and dtype, no storage);
    buffers and other tensors stay where they were made, values and all (ALiBi's slopes). The CPU tensor a
    constructor allocated for a parameter is dropped before anything touches its memory."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a tied parameter, registered a second time, already is
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


_aten = torch.ops.aten
RANDOM_FILLS = {_aten.uniform_.default, _aten.normal_.default}  # what nn.init's initialisers come down to
CONSTANT_FILLS = {_aten.fill_.Scalar, _aten.zero_.default}


@dataclass
class InitialValue:
    """The last write to a parameter in its constructor: a fill of the whole tensor that determines it."""
    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    shape: torch.Size
    dtype: torch.dtype
    rng_state: torch.Tensor | None  # the CPU generator's state before a random fill


class SeededInit(TorchDispatchMode):
    """Records, while a model is built under `parameters_on_meta`, how its constructor initialises each parameter,
    so that every process can later redraw each initial value alone (`value`), bitwise the tensor the same seeded
    `build_model` would have made on the CPU, without any process holding the whole model.

    Each in-place write to a meta tensor is noted: a random fill of the whole tensor (uniform_, normal_ from the
    default generator) with the generator's state before it, also drawn on a scratch CPU tensor of that shape so
    that the generator moves on exactly as in a real build; a constant fill (fill_, zero_); or anything else (a
    copy, arithmetic, a fill of part of the tensor), which makes that parameter's value unknown (`replayable`
    is then False). The last write to a parameter's storage is its initial value. All draws go to one scratch
    buffer, grown to the largest tensor: a fresh tensor each time fragmented the heap to more than the model."""

    def __init__(self):
        super().__init__()
        self.start_state = torch.get_rng_state()  # a real build starts here ...
        self.end_state: torch.Tensor | None = None  # ... and leaves the generator here
        self.writes: dict[int, InitialValue | None] = {}  # by storage; None: a write that cannot be redrawn
        self.written: list[torch.Tensor] = []  # kept alive, so that no storage address is reused meanwhile
        self.values: dict[str, InitialValue | None] = {}  # by parameter name, after `finish`
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def scratch(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of this shape and dtype, in the scratch buffer."""
        nbytes = shape.numel() * dtype.itemsize
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # freed before the larger one is taken
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes].view(dtype).view(shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            target = args[i] if i < len(args) else kwargs.get(arg.name)
            if not isinstance(target, torch.Tensor) or not target.is_meta:
                continue
            self.written.append(target)
            whole = (i == 0 and target.storage_offset() == 0 and target.is_contiguous()
                     and target.untyped_storage().nbytes() == target.numel() * target.element_size())
            value = None
            if whole and func in RANDOM_FILLS and kwargs.get("generator") is None:
                value = InitialValue(func, args[1:], kwargs, target.shape, target.dtype, torch.get_rng_state())
                func(self.scratch(target.shape, target.dtype), *args[1:], **kwargs)  # a real build's draws
            elif whole and func in CONSTANT_FILLS:
                value = InitialValue(func, args[1:], kwargs, target.shape, target.dtype, None)
            self.writes[target.untyped_storage()._cdata] = value
        return func(*args, **kwargs)

    def finish(self, model: torch.nn.Module) -> None:
        """After the build: each parameter's initial value by name, and the generator's state a real build leaves."""
        self.end_state = torch.get_rng_state()
        for name, p in model.named_parameters():
            value = self.writes.get(p.untyped_storage()._cdata)
            fits = value is not None and (value.shape, value.dtype) == (p.shape, p.dtype)  # not a view's shape
            self.values[name] = value if fits else None
        self.writes.clear()
        self.written.clear()

    @property
    def replayable(self) -> bool:
        return all(v is not None for v in self.values.values())

    def value(self, name: str) -> torch.Tensor:
        """Parameter `name`'s initial value, whole, on the CPU, in the scratch buffer: valid until the next call
        (the generator is left wherever this draw ends; `release` frees the buffer)."""
        v = self.values[name]
        if v.rng_state is not None:
            torch.set_rng_state(v.rng_state)
        full = self.scratch(v.shape, v.dtype)
        v.op(full, *v.args, **v.kwargs)
        return full

    def release(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)


def build_for_training(cfg: Config, rt: Runtime, new_run: bool) -> torch.nn.Module:
    """The model to train, on rt.device, once the memory check (memory.check_memory) has seen what this process will
    hold. Under FSDP built on the meta device and sharded, then each process allocates and fills its own shards:
    with the seeded initial weights for a new run (`materialize`), or left for the checkpoint (`load_state`)."""
    if not shards_model(cfg, rt):
        check_memory(cfg, rt, local_param_count(build_on_meta(cfg, rt)[0]))  # counted on meta: nothing allocated
        return build_model(cfg.model).to(rt.device)
    model, init = build_on_meta(cfg, rt, record_init=new_run)
    check_memory(cfg, rt, local_param_count(model))  # this process's shards, before they are allocated
    materialize(model, cfg, rt, init)
    return model


def build_on_meta(cfg: Config, rt: Runtime, record_init: bool = False) -> tuple[torch.nn.Module, SeededInit | None]:
    """The model with its parameters on the meta device, under FSDP sharded over the processes (`parallelize`):
    shapes and no storage, so the memory check can look at this process's share before anything is allocated.
    With `record_init` (a new run) the constructor's seeded initialisation is recorded on the way (`SeededInit`);
    without, the build draws nothing from the random generator."""
    init = SeededInit() if record_init else None
    with parameters_on_meta(), init or nullcontext():
        model = build_model(cfg.model)
    if init is not None:
        init.finish(model)
        init.release()
    parallelize(model, cfg, rt)
    return model, init


def local_param_count(model: torch.nn.Module) -> int:
    """The parameters this process holds: its shards' elements under FSDP, else all of them (a tied one once)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def materialize(model: torch.nn.Module, cfg: Config, rt: Runtime, init: SeededInit | None) -> None:
    """Allocate this process's shards of a `build_on_meta` model on rt.device and fill them with the seeded
    initial weights (`init`; None leaves them for a checkpoint to fill).

    Every process redraws each parameter's initial value on the CPU, one tensor at a time, and keeps its own
    shard of it: bitwise the weights of one process's `build_model`, while no process holds more than its
    shards and one whole tensor. Should the initialisation not be replayable (see SeededInit), rank 0 builds the
    whole model on its host instead and sends it out a tensor at a time."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=rt.device)  # FSDP allocates each process's shards; buffers lose their values
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    if init is None:
        return
    if not rt.any(not init.replayable):  # the same answer in every process: each ran the same build
        with torch.no_grad():
            for name, p in model.named_parameters():
                full = init.value(name)
                if isinstance(p, DTensor):
                    shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
                    p.to_local().copy_(full[tuple(slice(o, o + n) for n, o in zip(shape, offset))])
                else:
                    p.copy_(full)
        init.release()
    else:
        whole = None
        if rt.is_main:
            torch.set_rng_state(init.start_state)
            whole = build_model(cfg.model).state_dict()
        set_model_state_dict(model, whole or {}, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
    torch.set_rng_state(init.end_state)


def load_weights(model: torch.nn.Module, weights: dict | None, rt: Runtime, sharded: bool) -> None:
    """Fill a model from whole weights (a checkpoint's, or init.from's). Weights that do not fit raise ValueError
    naming the first differences, in every process alike and before anything is loaded. Sharded (FSDP), only rank
    0's `weights` are read (the others may pass None): it sends each tensor in turn, every process keeping its shard."""
    problem = [weights_mismatch(model.state_dict(), weights) if rt.is_main or not sharded else None]
    if sharded:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ValueError(problem[0])
    options = StateDictOptions(full_state_dict=True, cpu_offload=not sharded, broadcast_from_rank0=sharded)
    set_model_state_dict(model, dict(weights) if rt.is_main or not sharded else {}, options=options)


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: dict, rt: Runtime,
               sharded: bool) -> None:
    """Fill a model and its optimizer from a whole checkpoint. Weights that do not fit the model raise ValueError
    naming the first differences, in every process alike and before anything is loaded. Sharded (FSDP), rank 0
    alone reads the checkpoint and sends each tensor in turn, every process keeping its shard (broadcast_from_rank0);
    the checkpoint is memory-mapped (load_checkpoint), so the other processes never touch its tensors."""
    load_weights(model, checkpoint["model"], rt, sharded)
    moments = checkpoint["optimizer"] if rt.is_main or not sharded else {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=not sharded, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(model, optimizer, moments, options=options)
    if not sharded:  # the optimizer keeps the checkpoint's own tensors, memory-mapped from its file: copies of its
        for state in optimizer.state.values():  # own let the file go (and its disk space, once a save replaces
            for key, value in state.items():  # it) when the caller drops the checkpoint
                if torch.is_tensor(value):
                    state[key] = value.clone()
