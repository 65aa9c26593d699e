"""Training on several processes started by torchrun: PyTorch's DistributedDataParallel
or FSDP2 (`torch.distributed.fsdp.fully_shard`), and what the loop's processes agree on.

    torchrun --nproc-per-node 8 -m training.train --config training/configs/stage1.yaml \
        loop.grad_accum=4 loop.strategy=fsdp

Without torchrun (WORLD_SIZE unset or 1) every function here is the identity or a no-op,
and training runs exactly as on one process. Under torchrun each process takes its own
share of the data mix (`MixSampler`'s rank), the model's gradients are averaged by the
engine, and only the first process logs, shows progress and writes checkpoints; those
hold the full tensors, gathered from the shards with `torch.distributed.checkpoint`'s
state-dict functions, in the same safetensors + JSON layout as one process writes (no
distributed-checkpoint files, nothing pickled). What processes exchange besides tensors
(sampler positions, skip counts) travels as JSON in byte tensors, never pickled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from instructsam_core.build import resolve_device
from instructsam_core.checkpoint import CheckpointError

STRATEGIES = ("ddp", "fsdp")
# Blocks FSDP2 shards one at a time (each all-gathered only while it runs): the LLM's
# decoder layers, the Qwen3-VL vision blocks, SAM3's ViT layers.
SHARDED_BLOCKS = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock", "Sam3ViTLayer")
# The model's methods that run before its forward on the same parameters (the loss code
# encodes the images first); FSDP2 must unshard for them as for `forward`.
ENCODE_METHODS = ("encode_images_vlm", "encode_image_sam")


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the run's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> tuple[Processes, torch.device]:
    """This process's place (from torchrun's environment) and device; joins the process
    group (NCCL on GPUs, gloo on CPUs) when there are several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Processes(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":  # one GPU per process, by its rank on the machine
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Processes(rank, world_size, local_rank), device


TEARDOWN_PAUSE_S = 1.0  # far longer than a worker needs to free a finished collective


def shutdown(procs: Processes) -> None:
    """Leave the process group. The barrier first, then a pause: gloo's worker threads free
    the tensors of the last collectives (the barrier's work holds the ones before it) only
    once they get the GIL, and tearing the group down while one still waits for it
    deadlocks: its destructor, run here or when the DDP reducer that holds the group is
    freed, joins them holding the GIL (seen as a hang at the end of a run on a loaded
    2-core machine, every file written). Sleeping releases the GIL to them."""
    if procs.distributed and dist.is_initialized():
        dist.barrier()
        time.sleep(TEARDOWN_PAUSE_S)
        dist.destroy_process_group()


# ---- the model ----------------------------------------------------------------------------

class LossStep(nn.Module):
    """The model with the loss computation as its forward: DDP must see every use of the
    parameters inside its one forward call (the loss code runs the image encoders before
    the model's forward; DDP would not average the gradients of what runs outside it)."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args):
        return self.loss_fn(self.model, *args)


def wrap(model: nn.Module, strategy: str, procs: Processes, device: torch.device, bf16: bool,
         loss_fn: Callable) -> tuple[nn.Module, Callable]:
    """`(model, losses)`: the model as the loop holds it (itself; under FSDP2 sharded in
    place, mixed precision in bf16 with float32 gradient reduction when `bf16`) and
    `losses(*args)`, which is `loss_fn(model, *args)` (under DDP run through
    DistributedDataParallel, which averages the gradients in the backward pass)."""
    if strategy not in STRATEGIES:
        from training.config import ConfigError

        raise ConfigError(f"loop.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not procs.distributed:
        return model, functools.partial(loss_fn, model)
    if strategy == "ddp":
        # find_unused_parameters: the release trains SAM3's geometry encoder, which no forward uses
        ddp = nn.parallel.DistributedDataParallel(LossStep(model, loss_fn), find_unused_parameters=True,
                                                  device_ids=[device] if device.type == "cuda" else None)
        return model, ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (procs.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for module in model.modules():
        if type(module).__name__ in SHARDED_BLOCKS:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in ENCODE_METHODS:
        register_fsdp_forward_method(model, name)
    # The encoders return per-image views of one output; nothing writes to them in place,
    # which is what FSDP2's warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model, functools.partial(loss_fn, model)


def no_sync(losses: Callable, last: bool):
    """Gradient accumulation: DDP reduces only on the last micro-batch of a step (FSDP2
    reduce-scatters every micro-batch, which keeps its gradients sharded)."""
    if isinstance(losses, nn.parallel.DistributedDataParallel) and not last:
        return losses.no_sync()
    return contextlib.nullcontext()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---- agreeing across processes ------------------------------------------------------------

def gather_json(obj: Any, procs: Processes) -> list[Any]:
    """Every process's `obj` (plain data), in rank order, on every process."""
    if not procs.distributed:
        return [obj]
    device = _comm_device()
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(procs.world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    chunks = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(procs.world_size)]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(c[:int(s.item())].tolist()).decode("utf-8")) for c, s in zip(chunks, sizes)]


def mean_over(values: dict[str, float], procs: Processes) -> dict[str, float]:
    """The mean of each value over the processes (the same keys on each)."""
    if not procs.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: float(v) / procs.world_size for k, v in zip(keys, t.tolist())}


def any_over(flag: bool, procs: Processes) -> bool:
    """True on every process when it is True on any (e.g. a stop request)."""
    if not procs.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_json(obj: Any, procs: Processes) -> Any:
    """The first process's `obj` on every process."""
    return gather_json(obj, procs)[0]


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()


def _comm_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


# ---- checkpoints ----------------------------------------------------------------------------

def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters in full, on the CPU of the first process ({} elsewhere);
    every process must call it (FSDP2 gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    wanted = [n for n, p in model.named_parameters() if p.requires_grad]
    full = get_model_state_dict(model, options=_state_options(cpu_offload=True, ignore_frozen_params=True))
    return {n: full[n] for n in wanted} if full else {}


def gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's state in full, keyed as `checkpoints.optimizer_tensors` keys one
    process's (`<index>.<slot>`), on the first process (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
    if not full:
        return {}, []
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    tensors = {f"{index[name]}.{slot}": value.detach().cpu().contiguous()
               for name, slots in full["state"].items() for slot, value in slots.items()
               if isinstance(value, torch.Tensor)}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]
    return tensors, groups


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int):
    """Restore a checkpoint into an FSDP2-sharded model and its optimizer (every process
    reads the full tensors and keeps its shards); returns this process's `TrainingState`."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from training.checkpoints import read_meta, read_optimizer, read_trainable, restore_rank

    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable = read_trainable(path, wanted)
    set_model_state_dict(model, trainable, options=_state_options(strict=False))
    meta = read_meta(path)
    saved = read_optimizer(path, meta)
    names = _optimizer_names(model, optimizer)
    if len(saved["state"]) > len(names):
        raise CheckpointError(f"checkpoint {path} has optimizer state for {len(saved['state'])} parameters, "
                              f"the model trains {len(names)}")
    by_name = {"state": {names[i]: slots for i, slots in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    # strict=False: parameters no forward uses (SAM3's geometry encoder) never get AdamW state
    set_optimizer_state_dict(model, optimizer, by_name, options=_state_options(strict=False))
    return restore_rank(path, meta, rank)
