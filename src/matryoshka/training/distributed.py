"""Process-group setup for torchrun, model wrapping (DDP or FSDP2) and full state dicts.

Launched with `torchrun --nproc_per_node N -m matryoshka.cli train ...`, every process reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment and joins a process group (NCCL on CUDA, gloo on CPU).
Without those variables training runs in a single process and none of this costs anything.

FSDP uses torch's FSDP2 `fully_shard` (torch >= 2.4), which also runs on CPU with gloo: every
ResNet/attention block is its own shard unit and the root holds the rest. The older
FullyShardedDataParallel class needs an accelerator and is not used.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from matryoshka.models.layers import ResNetBlock


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # setup() created the process group (and cleanup() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda") or preference == "auto":
        if not torch.cuda.is_available():
            if preference == "auto":
                return torch.device("cpu")
            raise RuntimeError(f"device {preference!r} was asked for but CUDA is not available")
        if preference.startswith("cuda:"):
            return torch.device(preference)
        return torch.device("cuda", local_rank)
    raise ValueError(f"unknown device {preference!r}")


def setup(device_preference: str = "auto") -> Runtime:
    """Join the torchrun process group if the environment describes one (and none is joined yet)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=30))
        owns_group = True
    return Runtime(rank, world_size, local_rank, device, owns_group)


def cleanup(runtime: Runtime) -> None:
    """Leave the process group if setup() joined it (a caller's own group stays)."""
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def gather_objects(runtime: Runtime, value: object) -> list[object]:
    """Every rank's `value`, in rank order (a list of one without a process group)."""
    if not runtime.distributed:
        return [value]
    values: list[object] = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(runtime: Runtime, value: object) -> object:
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(runtime: Runtime, values: torch.Tensor) -> torch.Tensor:
    if runtime.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= runtime.world_size
    return values


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
    return fully_shard


def wrap(model: nn.Module, strategy: str, runtime: Runtime) -> nn.Module:
    """DDP or FSDP2 around `model` (already on runtime.device); the model itself when single-process."""
    if not runtime.distributed:
        return model
    if strategy == "ddp":
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        shard(model)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}")


def shard(model: nn.Module) -> None:
    """fully_shard every block, then the root (the model is modified in place)."""
    fully_shard = _fully_shard()
    for module in model.modules():
        if isinstance(module, ResNetBlock):
            fully_shard(module)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """A context in which backward does (or, for accumulation micro-steps, does not) reduce gradients."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU, on every rank (collective for sharded models)."""
    model = unwrap(model)
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in state.items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a (possibly sharded) model; every rank passes the same one."""
    model = unwrap(model)
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the indices of its state dict)."""
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, unsharded, on the CPU (collective when sharded).

    The layout is torch.distributed.checkpoint's: {"state": {name: {...}}, "param_groups": [{..., "params":
    [names]}]}. Unsharded models skip that (slow to import) module and rename the indices directly.
    """
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True))
    else:
        names = _parameter_names(model, optimizer)
        raw = optimizer.state_dict()
        state = {
            "state": {names[index]: dict(entries) for index, entries in raw["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in raw["param_groups"]],
        }
    for entries in state["state"].values():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                entries[name] = value.detach().cpu()
    return state


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state`; every rank passes the same full state."""
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise ValueError(f"the saved optimizer state names parameters the model does not have: {unknown[:3]}")
    optimizer.load_state_dict(
        {
            "state": {index[name]: entries for name, entries in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
        }
    )


__all__ = [
    "Runtime",
    "barrier",
    "broadcast_object",
    "cleanup",
    "full_optimizer_state",
    "full_state_dict",
    "gather_objects",
    "gradient_sync",
    "is_sharded",
    "load_full_state_dict",
    "load_optimizer_state",
    "mean_over_ranks",
    "pick_device",
    "setup",
    "shard",
    "unwrap",
    "wrap",
]
