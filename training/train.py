"""Two-stage InstructSAM training on one process; `train(cfg)` reads top to bottom.

    instructsam-train --config training/configs/stage1.yaml loop.out_dir=runs/stage1
    instructsam-train merge runs/stage1 runs/stage1-merged         # LoRA into the weights
    instructsam-train --config training/configs/stage2.yaml model.checkpoint=runs/stage1/final
    instructsam-train params --config training/configs/stage1.yaml # trainable parameters

Stage 1 starts from Qwen3-VL-2B + SAM3 and aligns the query bank with SAM3 on referring
data; stage 2 starts from stage 1 with LoRA merged. A finished run leaves `RUN/final`, a
checkpoint in the released layout (LoRA merged) that the engine, the node and the
benchmarks load as it is. A stopped or killed run resumes from `RUN/checkpoints` when
started again with the same configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import resource
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from instructsam_core.build import BuiltModel, build_model, from_base_models, resolve_device
from instructsam_core.checkpoint import CheckpointError, save_checkpoint
from instructsam_core.fileio import write_text_atomic
from training.checkpoints import (TrainingState, checkpoint_dirs, load_training_checkpoint, remove_partial,
                                  save_training_checkpoint)
from training.config import ConfigError, LoopConfig, ModelConfig, OptimConfig, TrainConfig, load_config, save_config
from training.data import Batch, MixSampler, SkipLog, collate, next_samples, read_dataset
from training.eval.readers import FormatError
from training.initialization import INIT_SCHEMES, fan_in_init
from training.losses import mask_losses, semantic_losses, text_loss
from training.parameters import GROUPS, apply_lora, detailed_counts, group_counts, merge_lora, set_trainable

log = logging.getLogger("instructsam.train")
# What must not change between a run and its resume: the recipe, and the loop settings that
# set the data order and the schedule (the others, e.g. stop_after or logging, may).
RESUMABLE_SECTIONS = ("data", "model", "loss", "optim")
RESUMABLE_LOOP_KEYS = ("seed", "batch_size", "grad_accum", "max_steps", "epochs")


# ---- pieces ---------------------------------------------------------------------------------

def build_start_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> BuiltModel:
    """The weights a stage starts from (float32; the loop autocasts on GPUs)."""
    if cfg.init == "base":
        if not cfg.qwen:
            raise ConfigError("model.init 'base' needs model.qwen (a Qwen3-VL directory) and model.sam3")
        if not cfg.sam3:
            log.warning("model.sam3 is empty: SAM3 starts from random weights (an ablation, not the release)")
        return from_base_models(cfg.qwen, cfg.sam3 or None, device=device, dtype="float32")
    if cfg.init == "checkpoint":
        if not cfg.checkpoint:
            raise ConfigError("model.init 'checkpoint' needs model.checkpoint (e.g. the stage-1 result)")
        return build_model(cfg.checkpoint, device=device, dtype="float32")
    if cfg.init == "preset":
        if cfg.init_weights not in INIT_SCHEMES:
            raise ConfigError(f"model.init_weights must be one of {INIT_SCHEMES}, got {cfg.init_weights!r}")
        built = build_model(cfg.preset, device=device, dtype="float32", seed=cfg.seed)
        if cfg.init_weights == "fan_in":
            fan_in_init(built.model, torch.Generator(device=built.device).manual_seed(cfg.seed))
        return built
    raise ConfigError(f"model.init must be base, checkpoint or preset, got {cfg.init!r}")


def make_optimizer(groups: dict, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with one learning rate per group; no weight decay on biases and norms."""
    lrs = {"llm": cfg.llm_lr, "projector": cfg.projector_lr, "mask_decoder": cfg.mask_decoder_lr,
           "vision": cfg.vision_lr}
    param_groups = []
    for name in GROUPS:
        params = [p for _, p in groups[name]]
        if not params:
            continue  # e.g. the vision towers, frozen as in the release
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        param_groups.append({"name": name, "params": decay, "lr": lrs[name], "weight_decay": cfg.weight_decay})
        param_groups.append({"name": f"{name}_nodecay", "params": no_decay, "lr": lrs[name], "weight_decay": 0.0})
    return torch.optim.AdamW(param_groups, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of the base learning rates at `step` (0-based): linear warm-up, then decay."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "constant":
        return 1.0
    raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")


def autocast(device: torch.device, amp: str):
    """bf16 autocast on GPUs ("auto"/"bf16"), nothing on the CPU."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if amp not in ("auto", "bf16", "none"):
        raise ConfigError(f"loop.amp must be auto, bf16 or none, got {amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def forward_losses(model, batch: Batch, cfg: TrainConfig, amp_context) -> tuple[torch.Tensor, dict, list[float]]:
    """The weighted loss of one micro-batch, its unweighted parts, and the matched IoUs."""
    loss_cfg = cfg.loss
    with amp_context:
        dtype = next(model.vlm.model.visual.parameters()).dtype
        visions = model.encode_images_vlm([p.to(dtype) for p in batch.vlm_pixels], batch.grids)
        with torch.set_grad_enabled(cfg.optim.vision_lr > 0 and model.training):  # frozen unless trained
            sam = model.encode_image_sam(batch.sam_pixels)
        out = model(batch.input_ids, batch.attention_mask, visions, sam)
    parts = {"text": text_loss(out.text_logits, batch.labels)}
    use_boxes = bool(loss_cfg.box_l1 or loss_cfg.box_giou or loss_cfg.match_box_l1 or loss_cfg.match_box_giou)
    masks = mask_losses(out.head.mask_logits, out.head.logits, batch.targets,
                        (loss_cfg.match_bce, loss_cfg.match_dice, loss_cfg.match_score), loss_cfg.num_points,
                        loss_cfg.oversample_ratio, loss_cfg.importance_sample_ratio,
                        out.head.layer_boxes if use_boxes else None,
                        (loss_cfg.match_box_l1, loss_cfg.match_box_giou))
    parts.update(mask_bce=masks.bce, mask_dice=masks.dice, score=masks.score)
    if use_boxes:
        parts.update(box_l1=masks.box_l1, box_giou=masks.box_giou)
    total = (loss_cfg.text * parts["text"] + loss_cfg.mask_bce * parts["mask_bce"]
             + loss_cfg.mask_dice * parts["mask_dice"] + loss_cfg.score * parts["score"])
    if use_boxes:
        total = total + loss_cfg.box_l1 * parts["box_l1"] + loss_cfg.box_giou * parts["box_giou"]
    if loss_cfg.semantic_bce or loss_cfg.semantic_dice:
        parts["semantic_bce"], parts["semantic_dice"] = semantic_losses(out.head.semantic_logits, batch.targets)
        total = total + loss_cfg.semantic_bce * parts["semantic_bce"] + loss_cfg.semantic_dice * parts["semantic_dice"]
    return total, {k: float(v.detach()) for k, v in parts.items()}, masks.matched_ious


@torch.no_grad()
def evaluate(model, sampler: MixSampler, cfg: TrainConfig, tokenizer, device, amp_context) -> dict:
    """Mean loss parts and matched-mask IoU over `loop.eval_batches` validation batches."""
    model.eval()
    sampler.load_state_dict({"epoch": 0, "position": 0})
    sums: Counter[str] = Counter()
    ious: list[float] = []
    batches = min(cfg.loop.eval_batches, math.ceil(len(sampler) / cfg.loop.batch_size))
    for _ in range(batches):
        samples = next_samples(sampler, cfg.loop.batch_size, model.config.num_queries, SkipLog())
        batch = collate(samples, tokenizer, model.token_ids, model.config, cfg.data.mask_size,
                        cfg.loss.text_on_queries).to(device)
        total, parts, batch_ious = forward_losses(model, batch, cfg, amp_context)
        sums.update(parts)
        sums["loss"] += float(total)
        ious += batch_ious
    model.train()
    out = {k: v / batches for k, v in sums.items()}
    out["mask_iou"] = float(np.mean(ious)) if ious else float("nan")
    return out


def enable_activation_checkpointing(model) -> None:
    """Recompute the LLM layers' activations in the backward pass (transformers' own
    switch, renamed in 5.22; the older name is used where the newer is missing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model.vlm, "activation_checkpointing_enable"):
        model.vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the per-step log up to `step` (what a resumed run continues from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopSignal:
    """SIGTERM / SIGINT ask the loop to finish its step, save a checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): finishing this step and saving a checkpoint", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    import yaml

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    now = cfg.to_dict()
    changed = [f"{s}.{k}" for s in RESUMABLE_SECTIONS for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
    changed += [f"loop.{k}" for k in RESUMABLE_LOOP_KEYS if saved.get("loop", {}).get(k) != now["loop"][k]]
    if changed:
        raise ConfigError(f"{run_dir} holds a run made with another configuration ({', '.join(changed[:5])} "
                          "differ); resume with the same settings or choose another loop.out_dir")


# ---- the loop -------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training stage; returns a summary (also in RUN/summary.json)."""
    loop: LoopConfig = cfg.loop
    run_dir = Path(loop.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        device = resolve_device(loop.device)
    except ValueError as err:
        raise ConfigError(f"loop.device: {err}") from err
    amp_context = autocast(device, loop.amp)
    seed_everything(loop.seed)

    # data
    train_sampler = MixSampler([(read_dataset(d), d.repeat) for d in cfg.data.train], loop.seed, cfg.data.shuffle)
    val_sampler = (MixSampler([(read_dataset(d), 1) for d in cfg.data.val], loop.seed, shuffle=False)
                   if cfg.data.val else None)
    samples_per_step = loop.batch_size * loop.grad_accum
    total_steps = loop.max_steps or max(1, math.ceil(loop.epochs * len(train_sampler) / samples_per_step))

    # model: the stage's start, LoRA, the release's trainable groups
    built = build_start_model(cfg.model, device)
    model, tokenizer = built.model, built.tokenizer
    apply_lora(model, cfg.model)
    groups = set_trainable(model, vision=cfg.optim.vision_lr > 0)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.to(device).train()
    counts = group_counts(model, vision=cfg.optim.vision_lr > 0)
    log.info("trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    # optimizer and schedule
    optimizer = make_optimizer(groups, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule))

    # resume from the last complete checkpoint, if any
    skips = SkipLog()
    step = 0
    for leftover in remove_partial(run_dir):
        log.warning("removed %s, left by a checkpoint write that did not finish", leftover.name)
    existing = checkpoint_dirs(run_dir)
    if existing:
        _check_resume_config(run_dir, cfg)
        state = load_training_checkpoint(existing[-1], model, optimizer)
        step, skips.counts = state.step, Counter(state.skips)
        train_sampler.load_state_dict(state.sampler)
        scheduler.last_epoch = step  # the groups' lrs came back with the optimizer state
        _truncate_metrics(run_dir / "metrics.jsonl", step)  # steps after the checkpoint run again
        log.info("resumed from %s (step %d of %d)", existing[-1], step, total_steps)
    else:
        save_config(cfg, run_dir / "config.yaml")
    writer = _tensorboard(run_dir) if loop.tensorboard else None
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    # the loop: one optimizer step per `grad_accum` micro-batches
    last: dict = {}
    stopped_early = False
    bar = tqdm(total=total_steps, initial=step, desc=cfg.stage, unit="step", disable=not loop.progress,
               dynamic_ncols=True)
    with StopSignal() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sums: Counter[str] = Counter()
            ious: list[float] = []
            for _ in range(loop.grad_accum):
                samples = next_samples(train_sampler, loop.batch_size, model.config.num_queries, skips)
                batch = collate(samples, tokenizer, model.token_ids, model.config, cfg.data.mask_size,
                                cfg.loss.text_on_queries).to(device)
                loss, parts, batch_ious = forward_losses(model, batch, cfg, amp_context)
                (loss / loop.grad_accum).backward()
                sums.update({k: v / loop.grad_accum for k, v in parts.items()})
                sums["loss"] += float(loss.detach()) / loop.grad_accum
                ious += batch_ious
            if cfg.optim.grad_clip > 0:
                sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip))
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups if not g["name"].endswith("_nodecay")}
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - t0
            last = {"step": step, **{k: round(v, 6) for k, v in sums.items()},
                    "mask_iou": float(np.mean(ious)) if ious else None, "lr": lrs,
                    "samples_per_s": samples_per_step / seconds, "memory_gib": memory_gib(device)}
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            if writer is not None:
                for key in ("loss", "text", "mask_bce", "mask_dice", "score", "mask_iou", "samples_per_s"):
                    if last.get(key) is not None:
                        writer.add_scalar(f"train/{key}", last[key], step)
                writer.add_scalar("train/lr_llm", last["lr"]["llm"], step)
            bar.update(1)
            if step % loop.log_every == 0 or step == total_steps:
                bar.write(_console_line(cfg.stage, last, total_steps))
            if val_sampler is not None and ((loop.eval_every and step % loop.eval_every == 0) or step == total_steps):
                scores = evaluate(model, val_sampler, cfg, tokenizer, device, amp_context)
                bar.write(f"[{cfg.stage}] eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                metrics_file.write(json.dumps({"step": step, "eval": scores}) + "\n")
                if writer is not None:
                    for key, value in scores.items():
                        writer.add_scalar(f"eval/{key}", value, step)
            stop_now = stop.requested or (loop.stop_after and step >= loop.stop_after)
            if step % loop.checkpoint_every == 0 or step == total_steps or stop_now:
                save_training_checkpoint(run_dir, trainable_state(model), optimizer,
                                         TrainingState(step, train_sampler.state_dict(), dict(skips.counts)),
                                         loop.keep_checkpoints)
            if stop_now and step < total_steps:
                stopped_early = True
                bar.write(f"[{cfg.stage}] stopped after step {step}; start again to resume")
                break
    bar.close()
    metrics_file.close()
    if writer is not None:
        writer.close()

    final_dir = None
    if not stopped_early:
        merge_lora(model)
        model.eval()
        final_dir = save_checkpoint(model, tokenizer, run_dir / "final")
    summary = {"stage": cfg.stage, "step": step, "total_steps": total_steps, "finished": not stopped_early,
               "final": str(final_dir) if final_dir else None, "last": last, "skipped": dict(skips.counts),
               "trainable_parameters": dict(counts)}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    if skips.counts:
        log.warning("samples skipped or changed, by reason: %s", dict(skips.counts))
    return summary


def _console_line(stage: str, m: dict, total: int) -> str:
    return (f"[{stage}] step {m['step']}/{total} | loss {m['loss']:.4f} (text {m['text']:.3f}, "
            f"bce {m['mask_bce']:.3f}, dice {m['mask_dice']:.3f}, score {m['score']:.3f}) | "
            f"mask IoU {m['mask_iou'] if m['mask_iou'] is not None else float('nan'):.3f} | "
            f"lr {m['lr']['llm']:.2e} | {m['samples_per_s']:.1f} samples/s | {m['memory_gib']:.2f} GiB")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard is in the `training` extra
        raise ConfigError("loop.tensorboard needs the tensorboard package (pip install '.[training]'), "
                          "or set loop.tensorboard=false") from err
    return SummaryWriter(str(run_dir / "tensorboard"))


# ---- between the stages ---------------------------------------------------------------------

def merge_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """A released-layout checkpoint (LoRA merged) from a run's training checkpoint (its
    newest unless `checkpoint` names one): what stage 2 starts from, what the engine loads."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    source = Path(checkpoint) if checkpoint else (checkpoint_dirs(run_dir) or [None])[-1]
    if source is None:
        raise FileNotFoundError(f"{run_dir} has no complete training checkpoint")
    built = build_start_model(cfg.model, "cpu")
    model = built.model
    apply_lora(model, cfg.model)
    set_trainable(model, vision=cfg.optim.vision_lr > 0)
    load_training_checkpoint(source, model)  # weights only: no optimizer state, generators untouched
    merged = merge_lora(model)
    log.info("merged %d LoRA layers from %s", merged, source)
    return save_checkpoint(model.eval(), built.tokenizer, out_dir)


# ---- command line ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`instructsam-train` (train, `merge`, `params`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "merge":
            p = argparse.ArgumentParser(prog="instructsam-train merge", description=merge_run.__doc__)
            p.add_argument("run_dir", help="a training run folder (with config.yaml and checkpoints/)")
            p.add_argument("out_dir", help="where the merged checkpoint (released layout) goes")
            p.add_argument("--checkpoint", default=None, help="a checkpoints/step-N folder (default: the newest)")
            args = p.parse_args(argv[1:])
            print(merge_run(args.run_dir, args.out_dir, args.checkpoint))
            return 0
        if argv and argv[0] == "params":
            p = argparse.ArgumentParser(prog="instructsam-train params",
                                        description="trainable parameters per group (model built on the meta device)")
            p.add_argument("--config", default=None)
            p.add_argument("overrides", nargs="*")
            args = p.parse_args(argv[1:])
            cfg = load_config(args.config, args.overrides)
            for name, count in parameter_counts(cfg).items():
                print(f"{name:40s} {count:>15,}")
            return 0
        p = argparse.ArgumentParser(prog="instructsam-train", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", default=None, help="a YAML file (training/configs/stage1.yaml, ...)")
        p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.llm_lr=1e-5 loop.batch_size=2")
        args = p.parse_args(argv)
        summary = train(load_config(args.config, args.overrides))
        print(json.dumps({k: summary[k] for k in ("stage", "step", "finished", "final", "skipped")}))
        return 0
    except (ConfigError, FileNotFoundError, CheckpointError, FormatError) as err:  # the user's input, not a bug
        print(f"error: {err}", file=sys.stderr)
        return 2


def parameter_counts(cfg: TrainConfig) -> dict[str, int]:
    """Trainable parameters per group and part for a training config, counted on the meta
    device (no weights are read or allocated): the preset or base architecture."""
    from instructsam_core.build import base_architecture, preset_tokenizer
    from instructsam_core.processing import load_tokenizer

    m = cfg.model
    config = base_architecture(m.init, m.preset, m.qwen, m.sam3, m.checkpoint)
    tokenizer = (preset_tokenizer(m.preset) if m.init == "preset"
                 else load_tokenizer(m.checkpoint) if m.init == "checkpoint" else None)
    model = build_model(config, device="meta", tokenizer=tokenizer).model
    apply_lora(model, m)
    vision = cfg.optim.vision_lr > 0
    return {**group_counts(model, vision), **detailed_counts(model, vision)}


if __name__ == "__main__":
    sys.exit(main())
