"""Training throughput and peak memory at a preset's real size, with random weights.

    python benchmarks/train_throughput.py --preset 2b --device cuda --out out/train_throughput_2b.json
    python benchmarks/train_throughput.py --preset tiny --steps 1 --warmup 0 --grad-accum 2   # CPU smoke run

Builds the preset's architecture with random weights directly on the device (no
checkpoint: the architecture, not the weights, sets the cost) and trains it as stage 1
does, with the training's own code: LoRA on the LLM, the release's trainable groups,
activation checkpointing on the LLM's layers, AdamW, bf16 autocast with float32 master
weights (CUDA), the release's losses. Every micro-batch is the same synthetic sample, so
the sequence length is fixed: one `--image` WxH picture (fixing the Qwen3-VL token count),
SAM3 at the preset's input size (1008 for 2b), mask targets at SAM3's mask resolution
(288 for 2b), `--phrases` phrases of `--instances` instances each. After `--warmup`
optimizer steps it times `--steps` steps of `--batch-size` x `--grad-accum` samples with
the device synchronised, and prints a Markdown table (samples/s, tokens/s, peak GiB) and
writes JSON (`--out`). With the defaults, 2b on one GPU finishes in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch

from instructsam_core.build import resolve_device
from instructsam_core.fileio import write_text_atomic
from instructsam_core.sample_images import tabletop_scene
from training.config import load_config
from training.data import PhraseTarget, TrainSample, collate
from training.parameters import apply_lora, group_counts, set_trainable
from training.train import (autocast, build_start_model, enable_activation_checkpointing, forward_losses,
                            make_optimizer, memory_gib, uses_bf16)


def synthetic_sample(width: int, height: int, phrases: int, instances: int) -> TrainSample:
    """One tabletop picture with `phrases` phrases of `instances` object masks each."""
    scene = tabletop_scene(width, height, seed=0)
    masks = [o.mask for o in scene.objects] or [np.ones((height, width), bool)]
    targets = [PhraseTarget(f"object group {p}", np.stack([masks[(p * instances + i) % len(masks)]
                                                          for i in range(instances)]))
               for p in range(phrases)]
    return TrainSample("synthetic", scene.image, "Can you segment the objects on the table in the image?", targets)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="2b", choices=["tiny", "small", "2b"])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--image", default="640x480", help="WxH of the sample image")
    parser.add_argument("--phrases", type=int, default=1)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--num-points", type=int, default=12544, help="points per matched mask (the release's)")
    parser.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    parser.add_argument("--out", default="train_throughput.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    width, height = (int(v) for v in args.image.lower().split("x"))
    cfg = load_config(None, ["model.init=preset", f"model.preset={args.preset}", "model.lora_dropout=0.05",
                             f"model.gradient_checkpointing={str(not args.no_checkpointing).lower()}",
                             f"loop.batch_size={args.batch_size}", f"loop.grad_accum={args.grad_accum}",
                             f"loss.num_points={args.num_points}"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    built = build_start_model(cfg.model, device)
    model, tokenizer = built.model, built.tokenizer
    cfg.data.mask_size = model.config.sam_image_size // 14 * 4  # SAM3's mask resolution (288 at 1008 px)
    apply_lora(model, cfg.model)
    groups = set_trainable(model)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.to(device).train()
    optimizer = make_optimizer(groups, cfg.optim)
    build_s = time.perf_counter() - t0
    amp = autocast(device, cfg.loop.amp)
    sample = synthetic_sample(width, height, args.phrases, args.instances)
    batch = collate([sample] * args.batch_size, tokenizer, model.token_ids, model.config, cfg.data.mask_size,
                    cfg.loss.text_on_queries).to(device)
    seq_len = int(batch.input_ids.shape[1])

    step_times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(args.grad_accum):
            loss, _, _ = forward_losses(model, batch, cfg, amp)
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
        optimizer.step()
        _sync(device)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)

    samples_per_step = args.batch_size * args.grad_accum
    mean_step = statistics.fmean(step_times)
    report = {
        "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "amp": "bf16" if uses_bf16(device, cfg.loop.amp) else "none",
        "activation_checkpointing": cfg.model.gradient_checkpointing,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "image": [width, height],
        "sam_image_size": model.config.sam_image_size, "mask_size": cfg.data.mask_size,
        "sequence_length": seq_len, "phrases": args.phrases, "instances": args.instances,
        "trainable_parameters": dict(group_counts(model)), "build_s": build_s,
        "step_s": step_times, "mean_step_s": mean_step,
        "samples_per_s": samples_per_step / mean_step,
        "tokens_per_s": samples_per_step * seq_len / mean_step,
        "peak_gib": memory_gib(device), "peak_kind": "max allocated (CUDA)" if device.type == "cuda" else "max RSS",
    }
    print("| preset | device | batch x accum | seq len | step (s) | samples/s | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {report['device_name']} | {args.batch_size} x {args.grad_accum} | {seq_len} | "
          f"{mean_step:.3f} | {report['samples_per_s']:.2f} | {report['tokens_per_s']:.0f} | "
          f"{report['peak_gib']:.2f} |")
    write_text_atomic(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
