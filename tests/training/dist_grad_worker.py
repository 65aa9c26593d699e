"""Worker of test_distributed.py's gradient test, run by torchrun on two CPU processes.

    torchrun --nproc-per-node 2 tests/training/dist_grad_worker.py DATA_DIR OUT_DIR

Each process takes one of the two samples, the tiny model (identical on both) is wrapped
for DDP and, separately, sharded with FSDP2, each with and without activation
checkpointing (the stage files train with it), and one backward pass runs through the
training's own loss code; the first process writes the resulting (averaged, gathered)
gradients to OUT_DIR/<strategy>[-checkpointed].safetensors. The test compares them with
one process's gradients on both samples as one batch, computed with the same helpers.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch

import training.losses
from training.config import load_config
from training.data import MixSampler, SkipLog, collate, next_samples, read_dataset
from training.parameters import apply_lora, set_trainable
from training.train import build_start_model, enable_activation_checkpointing, forward_losses

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny_stage1.yaml"
RUNS = ("ddp", "fsdp", "ddp-checkpointed", "fsdp-checkpointed")


def fixed_points(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                 importance_sample_ratio: float) -> torch.Tensor:
    """The same points for every mask (a grid), in place of the random draw: a batch split
    over processes then sees the same loss function as the batch in one piece."""
    side = int(num_points ** 0.5)
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    return grid.to(mask_logits.device)[None].expand(mask_logits.shape[0], -1, -1)


def setup(data_dir: Path):
    """(model in eval mode, tokenizer, config, the two samples): the same in every process."""
    training.losses.uncertain_points = fixed_points
    cfg = load_config(CONFIG, [f"data.train=[{{kind: roborefit, path: {data_dir}}}]", "loss.num_points=64",
                               "model.lora_dropout=0.0"])
    torch.manual_seed(cfg.loop.seed)
    built = build_start_model(cfg.model)
    model = built.model
    apply_lora(model, cfg.model)
    set_trainable(model)
    model.eval()  # no dropout: both runs compute exactly the same function
    sources = read_dataset(cfg.data.train[0])
    samples = next_samples(MixSampler([(sources, 1)], 0, shuffle=False), 2, model.config.num_queries, SkipLog())
    return model, built.tokenizer, cfg, samples


def gradients(model, losses, tokenizer, cfg, samples) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients after one backward pass of `losses` (the
    training's loss code, as `distributed.wrap` returns it) on `samples`, in full."""
    batch = collate(samples, tokenizer, model.token_ids, model.config, cfg.data.mask_size)
    loss, _, _ = losses(batch, cfg, contextlib.nullcontext())
    loss.backward()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = grad.detach().clone()
    return out


def main(data_dir: str, out_dir: str) -> None:
    from safetensors.torch import save_file

    from training import distributed

    procs, device = distributed.setup("cpu")
    base, tokenizer, cfg, samples = setup(Path(data_dir))
    for name in RUNS:
        model = copy.deepcopy(base)
        if name.endswith("-checkpointed"):
            enable_activation_checkpointing(model)
        model, losses = distributed.wrap(model, name.split("-")[0], procs, device, False, forward_losses)
        grads = gradients(model, losses, tokenizer, cfg, [samples[procs.rank]])
        if procs.is_main:
            save_file(grads, str(Path(out_dir) / f"{name}.safetensors"))
        distributed.barrier(procs)
    distributed.shutdown(procs)


if __name__ == "__main__":
    main(*sys.argv[1:])
