"""Training checkpoints: everything a run needs to go on exactly where it stopped, with
nothing pickled.

    RUN/checkpoints/step-000120/
        trainable.safetensors   the trained parameters (LoRA, embeddings, merger, SAM3 head, ...)
        optimizer.safetensors   AdamW's per-parameter tensors (step, exp_avg, exp_avg_sq)
        rng.safetensors         torch's CPU (and CUDA) generator states
        state.json              step, sampler position, skip counts, optimizer groups,
                                Python's and numpy's generator states

The frozen weights are not stored: they are rebuilt from the run's `model.init`. A folder
appears under its final name only once complete (`fileio.atomic_directory`), so a run
killed at any moment, also during a write, resumes from the last complete checkpoint;
half-written folders (hidden names) are removed on the next start.

A distributed run writes the same files, from its first process, with the full (gathered)
tensors: a checkpoint of N processes differs from one process's only in that state.json
also holds `world_size` and, for processes 1..N-1, their sampler positions and Python and
numpy generator states (`ranks`), and rng.safetensors their torch generators
(`rank<r>.torch_cpu`, ...).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from instructsam_core.checkpoint import CheckpointError
from instructsam_core.fileio import atomic_directory

STEP_PREFIX = "step-"


@dataclass
class TrainingState:
    """What a checkpoint restores besides tensors.

    Attributes:
        step: optimizer steps done.
        sampler: this process's sampler position.
        skips: skipped samples by reason (all processes together).
        world_size: processes of the run.
        ranks: for processes 1..world_size-1, what `rank_snapshot` returned there.
    """

    step: int
    sampler: dict
    skips: dict[str, int]
    world_size: int = 1
    ranks: list[dict] = field(default_factory=list)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
                  and (p / "state.json").is_file())


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete the hidden temporary folders a killed write left behind; returns them."""
    root = Path(run_dir) / "checkpoints"
    leftovers = [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


def rank_snapshot(sampler: dict) -> dict:
    """A process's own part of a checkpoint (sampler position and generator states), as
    plain data, for the first process to gather and write."""
    tensors, plain = _rng_state()
    return {"sampler": sampler, "rng": plain, "rng_tensors": {k: v.tolist() for k, v in tensors.items()}}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's per-parameter tensors keyed `<index>.<slot>` (index: the parameter's place
    in the groups, in order) and its groups (hyperparameters and indices)."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous()
               for index, slots in state["state"].items() for key, value in slots.items()
               if isinstance(value, torch.Tensor)}
    return tensors, state["param_groups"]


def save_training_checkpoint(run_dir: Path, trainable: dict[str, torch.Tensor],
                             optimizer_state: tuple[dict[str, torch.Tensor], list[dict]],
                             state: TrainingState, keep: int) -> Path:
    """Write `RUN/checkpoints/step-NNNNNN` (NNNNNN = `state.step`) atomically, then keep only
    the newest `keep`. `optimizer_state` is what `optimizer_tensors` returns (for sharded
    runs, the same gathered in full)."""
    target = Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{state.step:06d}"
    opt_tensors, param_groups = optimizer_state
    rng_tensors, rng_plain = _rng_state()
    meta = {"step": state.step, "sampler": state.sampler, "skips": state.skips,
            "optimizer_param_groups": param_groups, "rng": rng_plain}
    if state.world_size > 1:
        meta["world_size"] = state.world_size
        meta["ranks"] = [{"sampler": r["sampler"], "rng": r["rng"]} for r in state.ranks]
        for rank, snapshot in enumerate(state.ranks, start=1):
            rng_tensors.update({f"rank{rank}.{k}": torch.tensor(v, dtype=torch.uint8)
                                for k, v in snapshot["rng_tensors"].items()})
    with atomic_directory(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for old in checkpoint_dirs(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_meta(path: Path) -> dict:
    """A checkpoint's state.json."""
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))


def read_trainable(path: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
    """The trained parameters of a checkpoint; strict: exactly the names in `wanted`."""
    path = Path(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    missing, unexpected = sorted(wanted - set(trainable)), sorted(set(trainable) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model being trained: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} (was it made with another config?)")
    return trainable


def read_optimizer(path: Path, meta: dict) -> dict:
    """The optimizer state dict of a checkpoint (`torch.optim.Optimizer.load_state_dict`'s form)."""
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(Path(path) / "optimizer.safetensors")).items():
        index, _, slot = key.partition(".")
        slots.setdefault(int(index), {})[slot] = tensor
    return {"state": slots, "param_groups": meta["optimizer_param_groups"]}


def restore_rank(path: Path, meta: dict, rank: int = 0) -> TrainingState:
    """Set this process's generators from a checkpoint; returns the state with its sampler position."""
    if rank >= int(meta.get("world_size", 1)):
        raise CheckpointError(f"checkpoint {path} was written by {meta.get('world_size', 1)} process(es); "
                              f"process {rank} has no state in it")
    tensors = load_file(str(Path(path) / "rng.safetensors"))
    if rank == 0:
        own = {k: v for k, v in tensors.items() if not k.startswith("rank")}
        sampler, plain = meta["sampler"], meta["rng"]
    else:
        prefix = f"rank{rank}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        sampler, plain = meta["ranks"][rank - 1]["sampler"], meta["ranks"][rank - 1]["rng"]
    _set_rng_state(own, plain)
    return TrainingState(step=int(meta["step"]), sampler=sampler, skips=meta["skips"] if rank == 0 else {},
                         world_size=int(meta.get("world_size", 1)))


def load_training_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                             rank: int = 0) -> TrainingState:
    """Restore trained parameters from `path`; returns the rest of its state.

    With an `optimizer` (resuming), its state and process `rank`'s generators are restored
    too; without one (merging the weights into a release), only the parameters. Strict:
    every trainable parameter must be in the file and nothing else. (Sharded models:
    `training.distributed.load_sharded`.)
    """
    path = Path(path)
    params = dict(model.named_parameters())
    trainable = read_trainable(path, {n for n, p in params.items() if p.requires_grad})
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(tensor)
    meta = read_meta(path)
    if optimizer is None:
        return TrainingState(step=int(meta["step"]), sampler=meta["sampler"], skips=meta["skips"],
                             world_size=int(meta.get("world_size", 1)))
    optimizer.load_state_dict(read_optimizer(path, meta))
    return restore_rank(path, meta, rank)
