"""Two-stage InstructSAM training, on one process or on several under torchrun;
`train(cfg)` reads top to bottom.

    instructsam-train --config training/configs/stage1.yaml loop.out_dir=runs/stage1
    torchrun --nproc-per-node 8 -m training.train --config training/configs/stage1.yaml loop.grad_accum=4
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

from instructsam_core.build import BuiltModel, build_model, from_base_models, preset_tokenizer
from instructsam_core.checkpoint import CheckpointError, save_checkpoint
from instructsam_core.config import FUSION_NORM_SCOPES, PHRASE_SOURCES, InstructSamConfig, preset
from instructsam_core.fileio import write_text_atomic
from instructsam_core.model.instructsam import InstructSam
from training import distributed
from training.checkpoints import (TrainingState, checkpoint_dirs, load_training_checkpoint, optimizer_tensors,
                                  rank_snapshot, read_meta, remove_partial, save_training_checkpoint)
from training.config import ConfigError, LoopConfig, ModelConfig, OptimConfig, TrainConfig, load_config, save_config
from training.data import Batch, MixSampler, SkipLog, collate, next_samples, read_dataset
from training.denoising import denoising_losses
from training.distributed import Processes
from training.eval.readers import FormatError
from training.initialization import INIT_SCHEMES, box_attention_prior, fan_in_init
from training.losses import mask_losses, semantic_losses, slot_spread_loss, text_loss
from training.object_colour import TOKEN_SOURCES, object_colour_loss
from training.parameters import (GROUPS, apply_lora, detailed_counts, group_counts, merge_lora, parameter_groups,
                                 set_trainable)

log = logging.getLogger("instructsam.train")
# What must not change between a run and its resume: the recipe, and the loop settings that
# set the data order and the schedule (the others, e.g. stop_after or logging, may).
RESUMABLE_SECTIONS = ("data", "model", "loss", "optim")
RESUMABLE_LOOP_KEYS = ("seed", "batch_size", "grad_accum", "max_steps", "epochs")


# ---- pieces ---------------------------------------------------------------------------------

# SAM3's parts whose dropout `model.head_dropout` sets (the decoder's config sets the scoring's too).
HEAD_DROPOUT_PARTS = ("detr_encoder", "detr_decoder", "dot_product_scoring")

# The architecture options (preset only): ModelConfig field -> the key of SAM3's
# detr_encoder_config it sets.
FUSION_ARCHITECTURE_OPTIONS = {"fusion_layers": "num_layers", "fusion_ffn": "intermediate_size"}


def check_head_options(cfg: ModelConfig) -> None:
    """Refuse model options (the head options, the architecture options) that the start
    cannot take, before any weights are built."""
    if cfg.fusion_norm_scope is not None and cfg.fusion_norm_scope not in FUSION_NORM_SCOPES:
        raise ConfigError(f"model.fusion_norm_scope must be one of {FUSION_NORM_SCOPES}, got {cfg.fusion_norm_scope!r}")
    if cfg.phrase_source is not None and cfg.phrase_source not in PHRASE_SOURCES:
        raise ConfigError(f"model.phrase_source must be one of {PHRASE_SOURCES}, got {cfg.phrase_source!r}")
    if cfg.head_dropout is not None and not 0.0 <= cfg.head_dropout < 1.0:
        raise ConfigError(f"model.head_dropout must be in [0, 1), got {cfg.head_dropout}")
    for name in FUSION_ARCHITECTURE_OPTIONS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if cfg.init != "preset":
            raise ConfigError(f"model.{name} changes the architecture: it applies to model.init 'preset' "
                              f"only, not {cfg.init!r} (a checkpoint keeps its own architecture)")
        if value < 1:
            raise ConfigError(f"model.{name} must be at least 1, got {value}")
    if cfg.init != "preset" and cfg.init_weights != "transformers":
        raise ConfigError(f"model.init_weights {cfg.init_weights!r} redraws random weights: it applies to "
                          f"model.init 'preset' only, not {cfg.init!r}")


def apply_head_options(model: InstructSam, cfg: ModelConfig) -> None:
    """Set the head options `cfg` gives on a built model (preset or trained), in its
    modules and in its config, so its checkpoints and inference keep them; an option left
    unset keeps the model's own."""
    config = model.config
    if cfg.fusion_output_norm is not None:
        config.fusion_output_norm = cfg.fusion_output_norm
    if cfg.fusion_norm_scope is not None:
        config.fusion_norm_scope = cfg.fusion_norm_scope
    if cfg.fusion_image_skip is not None:
        config.fusion_image_skip = cfg.fusion_image_skip
    if cfg.phrase_source is not None:
        config.phrase_source = cfg.phrase_source
    if cfg.head_dropout is not None:
        for part in ("detr_encoder_config", "detr_decoder_config"):
            config.sam3.setdefault(part, {})["dropout"] = cfg.head_dropout
        head = model.grounding_model
        for part in HEAD_DROPOUT_PARTS:
            for module in getattr(head, part).modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = cfg.head_dropout
    if cfg.box_prior:
        box_attention_prior(model, cfg.box_prior)


def preset_architecture(cfg: ModelConfig) -> InstructSamConfig:
    """The configuration of `cfg.preset` with the architecture options of `cfg` applied
    (`FUSION_ARCHITECTURE_OPTIONS`)."""
    try:
        config = preset(cfg.preset)
    except ValueError as err:
        raise ConfigError(f"model.preset: {err}") from None
    for name, key in FUSION_ARCHITECTURE_OPTIONS.items():
        if getattr(cfg, name) is not None:
            config.sam3.setdefault("detr_encoder_config", {})[key] = getattr(cfg, name)
    return config


def check_object_colour(cfg: TrainConfig) -> None:
    """The object-colour target's settings, before anything is read or built."""
    loss = cfg.loss
    if not loss.object_colour:
        return
    if loss.object_colour_tokens not in TOKEN_SOURCES:
        raise ConfigError(f"loss.object_colour_tokens must be one of {TOKEN_SOURCES}, "
                          f"got {loss.object_colour_tokens!r}")
    if loss.object_colour_temperature <= 0:
        raise ConfigError(f"loss.object_colour_temperature must be above 0, got {loss.object_colour_temperature}")
    others = [d.path for d in cfg.data.train + cfg.data.val if d.kind != "grefcoco"]
    if others:
        raise ConfigError(f"loss.object_colour reads each image's objects from gRefCOCO files that "
                          f"training/tabletop.py writes; these datasets are of another kind: {others}")


def colour_tokens(out, sam, source: str) -> tuple[torch.Tensor, tuple[int, int], list[int]]:
    """The image tokens the object-colour target reads, `(R, h*w, D)`, their grid, and the
    batch row of each: "image", the fusion encoder's input (one per image); "fusion", what
    the DETR decoder reads, from each image's first query block (later blocks of one image
    see the same objects through other phrases, and would be their own positives)."""
    level = sam.fpn_hidden_states[-2]  # the level the fusion encoder reads (the coarsest is dropped)
    grid = tuple(level.shape[-2:])
    if source == "image":
        return level.flatten(2).transpose(1, 2), grid, list(range(level.shape[0]))
    rows = out.blocks.batch_index.tolist()
    first = {}
    for block, row in enumerate(rows):
        first.setdefault(row, block)
    return out.head.fusion_tokens[list(first.values())], grid, list(first)


def build_start_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> BuiltModel:
    """The weights a stage starts from (float32; the loop autocasts on GPUs), with the
    head options of `cfg` applied."""
    check_head_options(cfg)
    if cfg.init == "base":
        if not cfg.qwen:
            raise ConfigError("model.init 'base' needs model.qwen (a Qwen3-VL directory) and model.sam3")
        if not cfg.sam3:
            log.warning("model.sam3 is empty: SAM3 starts from random weights (an ablation, not the release)")
        built = from_base_models(cfg.qwen, cfg.sam3 or None, device=device, dtype="float32")
    elif cfg.init == "checkpoint":
        if not cfg.checkpoint:
            raise ConfigError("model.init 'checkpoint' needs model.checkpoint (e.g. the stage-1 result)")
        built = build_model(cfg.checkpoint, device=device, dtype="float32")
    elif cfg.init == "preset":
        if cfg.init_weights not in INIT_SCHEMES:
            raise ConfigError(f"model.init_weights must be one of {INIT_SCHEMES}, got {cfg.init_weights!r}")
        config = preset_architecture(cfg)
        built = build_model(config, device=device, dtype="float32", seed=cfg.seed,
                            tokenizer=preset_tokenizer(cfg.preset))
        if cfg.init_weights == "fan_in":
            fan_in_init(built.model, torch.Generator(device=built.device).manual_seed(cfg.seed))
    else:
        raise ConfigError(f"model.init must be base, checkpoint or preset, got {cfg.init!r}")
    apply_head_options(built.model, cfg)
    return built


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


def uses_bf16(device: torch.device, amp: str) -> bool:
    """Whether `loop.amp` computes in bf16 on `device` ("auto": on GPUs)."""
    if amp not in ("auto", "bf16", "none"):
        raise ConfigError(f"loop.amp must be auto, bf16 or none, got {amp!r}")
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def autocast(device: torch.device, amp: str):
    """bf16 autocast on GPUs ("auto"/"bf16"), nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, amp) else contextlib.nullcontext()


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
                        (loss_cfg.match_box_l1, loss_cfg.match_box_giou), loss_cfg.score_target)
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
    if loss_cfg.slot_spread:
        parts["slot_spread"] = slot_spread_loss(out.head.layer_states)
        total = total + loss_cfg.slot_spread * parts["slot_spread"]
    if loss_cfg.unmatched_mask:
        parts["unmatched_mask"] = masks.unmatched
        total = total + loss_cfg.unmatched_mask * parts["unmatched_mask"]
    if loss_cfg.object_colour:
        tokens, grid, rows = colour_tokens(out, sam, loss_cfg.object_colour_tokens)
        parts["object_colour"], parts["object_colour_acc"] = object_colour_loss(
            tokens, grid, [batch.object_colours[r] for r in rows], [batch.object_masks[r] for r in rows],
            loss_cfg.object_colour_temperature)
        total = total + loss_cfg.object_colour * parts["object_colour"]
    if loss_cfg.denoise:
        with amp_context:
            dn = denoising_losses(model, out, batch.input_ids, sam, batch.targets, loss_cfg.denoise_noise,
                                  loss_cfg.num_points, loss_cfg.oversample_ratio, loss_cfg.importance_sample_ratio)
        parts.update(dn_mask_bce=dn.bce, dn_mask_dice=dn.dice, dn_box_l1=dn.box_l1, dn_box_giou=dn.box_giou)
        total = total + loss_cfg.denoise * (loss_cfg.mask_bce * dn.bce + loss_cfg.mask_dice * dn.dice
                                            + loss_cfg.box_l1 * dn.box_l1 + loss_cfg.box_giou * dn.box_giou)
    return total, {k: float(v.detach()) for k, v in parts.items()}, masks.matched_ious


@torch.no_grad()
def evaluate(model, sampler: MixSampler, cfg: TrainConfig, tokenizer, device, amp_context,
             procs: Processes = Processes()) -> dict:
    """Mean loss parts and matched-mask IoU over `loop.eval_batches` validation batches
    (shared among the processes, each taking every world_size-th sample)."""
    model.eval()
    sampler.restart()
    sums: Counter[str] = Counter()
    ious: list[float] = []
    batches = min(cfg.loop.eval_batches, math.ceil(len(sampler) / cfg.loop.batch_size))
    batches = math.ceil(batches / procs.world_size)  # per process; all run as many (FSDP2 gathers together)
    for _ in range(batches):
        samples = next_samples(sampler, cfg.loop.batch_size, model.config.num_queries, SkipLog())
        batch = collate(samples, tokenizer, model.token_ids, model.config, cfg.data.mask_size,
                        cfg.loss.text_on_queries).to(device)
        total, parts, batch_ious = forward_losses(model, batch, cfg, amp_context)
        sums.update(parts)
        sums["loss"] += float(total)
        ious += batch_ious
    model.train()
    out = distributed.mean_over({k: v / batches for k, v in sums.items()}, procs)
    iou = pooled_mean(ious, procs)
    out["mask_iou"] = float("nan") if iou is None else iou
    return out


def pooled_mean(values: list[float], procs: Processes) -> float | None:
    """The mean of all processes' values together (None when there are none)."""
    if not procs.distributed:
        return float(np.mean(values)) if values else None
    pooled = distributed.mean_over({"sum": float(sum(values)), "count": float(len(values))}, procs)
    return pooled["sum"] / pooled["count"] if pooled["count"] else None


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
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    # Read through load_config, so a setting added since the run started takes its default
    # and does not count as a change.
    saved = load_config(saved_file).to_dict()
    # Runs saved before the head options became "unset: the start's own" wrote false and
    # "all" for them, which meant just that (the presets' own; ignored on other starts).
    for key, old_default in (("fusion_output_norm", False), ("fusion_norm_scope", "all")):
        if saved["model"].get(key) == old_default:
            saved["model"][key] = None
    now = cfg.to_dict()
    changed = [f"{s}.{k}" for s in RESUMABLE_SECTIONS for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
    changed += [f"loop.{k}" for k in RESUMABLE_LOOP_KEYS if saved.get("loop", {}).get(k) != now["loop"][k]]
    if changed:
        raise ConfigError(f"{run_dir} holds a run made with another configuration ({', '.join(changed[:5])} "
                          "differ); resume with the same settings or choose another loop.out_dir")


# ---- the loop -------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training stage; returns a summary (also in RUN/summary.json).
    Under torchrun, each process runs this and they share the work (`loop.strategy`)."""
    loop: LoopConfig = cfg.loop
    run_dir = Path(loop.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        procs, device = distributed.setup(loop.device)
    except ValueError as err:
        raise ConfigError(f"loop.device: {err}") from err
    main = procs.is_main  # the one process that logs and writes
    if not main:
        for name in ("instructsam", "training"):
            logging.getLogger(name).setLevel(logging.WARNING)
    amp_context = autocast(device, loop.amp)
    seed_everything(loop.seed)

    # data: every process the same mix, each its own share of it
    check_object_colour(cfg)
    objects = bool(cfg.loss.object_colour)

    def mix(specs, repeats: bool):
        return [(read_dataset(d, cfg.data.root, cfg.data.max_turns, objects), d.repeat if repeats else 1)
                for d in specs]

    train_sampler = MixSampler(mix(cfg.data.train, True), loop.seed, cfg.data.shuffle, procs.rank, procs.world_size)
    val_sampler = (MixSampler(mix(cfg.data.val, False), loop.seed, False, procs.rank, procs.world_size)
                   if cfg.data.val else None)
    samples_per_step = loop.batch_size * loop.grad_accum * procs.world_size
    total_steps = loop.max_steps or max(1, math.ceil(loop.epochs * len(train_sampler) / samples_per_step))

    # model: the stage's start, LoRA, the release's trainable groups
    built = build_start_model(cfg.model, device)
    model, tokenizer = built.model, built.tokenizer
    apply_lora(model, cfg.model)
    set_trainable(model, vision=cfg.optim.vision_lr > 0)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.to(device).train()
    counts = group_counts(model, vision=cfg.optim.vision_lr > 0)
    log.info("trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if procs.distributed:  # the same weights on every process, then each its own random draws
        seed_everything(loop.seed + procs.rank)
        log.info("%d processes, %s; %d samples per step", procs.world_size, loop.strategy, samples_per_step)
    model, losses = distributed.wrap(model, loop.strategy, procs, device, uses_bf16(device, loop.amp), forward_losses)
    groups = parameter_groups(model, vision=cfg.optim.vision_lr > 0)  # FSDP2 holds its shards now

    # optimizer and schedule
    optimizer = make_optimizer(groups, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule))

    # resume from the last complete checkpoint, if any
    skips = SkipLog()
    step = 0
    resume = _resume_point(run_dir, procs)
    if resume is not None:
        _check_resume_config(run_dir, cfg)
        state = _load_checkpoint(resume, model, optimizer, procs)
        step, skips.counts = state.step, Counter(state.skips)
        train_sampler.load_state_dict(state.sampler)
        scheduler.last_epoch = step  # the groups' lrs came back with the optimizer state
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)  # steps after the checkpoint run again
        log.info("resumed from %s (step %d of %d)", resume, step, total_steps)
    elif main:
        save_config(cfg, run_dir / "config.yaml")
    writer = _tensorboard(run_dir) if loop.tensorboard and main else None
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if main else None

    # the loop: one optimizer step per `grad_accum` micro-batches (on each process)
    last: dict = {}
    stopped_early = False
    bar = tqdm(total=total_steps, initial=step, desc=cfg.stage, unit="step", disable=not (loop.progress and main),
               dynamic_ncols=True)
    say = bar.write if main else (lambda line: None)
    with StopSignal() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sums: Counter[str] = Counter()
            ious: list[float] = []
            for micro in range(loop.grad_accum):
                samples = next_samples(train_sampler, loop.batch_size, model.config.num_queries, skips)
                batch = collate(samples, tokenizer, model.token_ids, model.config, cfg.data.mask_size,
                                cfg.loss.text_on_queries).to(device)
                with distributed.no_sync(losses, last=micro == loop.grad_accum - 1):
                    loss, parts, batch_ious = losses(batch, cfg, amp_context)
                    (loss / loop.grad_accum).backward()
                sums.update({k: v / loop.grad_accum for k, v in parts.items()})
                sums["loss"] += float(loss.detach()) / loop.grad_accum
                ious += batch_ious
            sums = Counter(distributed.mean_over(dict(sums), procs))  # over the global batch
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
                sums["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups if not g["name"].endswith("_nodecay")}
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - t0
            last = {"step": step, **{k: round(v, 6) for k, v in sums.items()},
                    "mask_iou": pooled_mean(ious, procs), "lr": lrs,
                    "samples_per_s": samples_per_step / seconds, "memory_gib": memory_gib(device)}
            if main:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
            if writer is not None:
                for key in ("loss", "text", "mask_bce", "mask_dice", "score", "mask_iou", "samples_per_s"):
                    if last.get(key) is not None:
                        writer.add_scalar(f"train/{key}", last[key], step)
                writer.add_scalar("train/lr_llm", last["lr"]["llm"], step)
            bar.update(1)
            if step % loop.log_every == 0 or step == total_steps:
                say(_console_line(cfg.stage, last, total_steps))
            if val_sampler is not None and ((loop.eval_every and step % loop.eval_every == 0) or step == total_steps):
                scores = evaluate(model, val_sampler, cfg, tokenizer, device, amp_context, procs)
                say(f"[{cfg.stage}] eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                if main:
                    metrics_file.write(json.dumps({"step": step, "eval": scores}) + "\n")
                if writer is not None:
                    for key, value in scores.items():
                        writer.add_scalar(f"eval/{key}", value, step)
            stop_now = distributed.any_over(stop.requested, procs) or (loop.stop_after and step >= loop.stop_after)
            if step % loop.checkpoint_every == 0 or step == total_steps or stop_now:
                _save_checkpoint(run_dir, model, optimizer, step, train_sampler, skips, procs, loop.keep_checkpoints)
            if stop_now and step < total_steps:
                stopped_early = True
                say(f"[{cfg.stage}] stopped after step {step}; start again to resume")
                break
    bar.close()
    if main:
        metrics_file.close()
    if writer is not None:
        writer.close()

    final_dir = None
    if not stopped_early:
        final_dir = _write_final(run_dir, model, tokenizer, procs)
    skipped = _total_skips(skips, procs)
    summary = {"stage": cfg.stage, "step": step, "total_steps": total_steps, "finished": not stopped_early,
               "final": str(final_dir) if final_dir else None, "last": last, "skipped": skipped,
               "trainable_parameters": dict(counts)}
    if main:
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
        if skipped:
            log.warning("samples skipped or changed, by reason: %s", skipped)
    distributed.shutdown(procs)
    return summary


# ---- what the processes do together -------------------------------------------------------

def _resume_point(run_dir: Path, procs: Processes) -> Path | None:
    """The newest complete checkpoint (the first process's choice), after its leftovers
    from an interrupted write are removed; every process must see it (one file system)."""
    if procs.is_main:
        for leftover in remove_partial(run_dir):
            log.warning("removed %s, left by a checkpoint write that did not finish", leftover.name)
    existing = checkpoint_dirs(run_dir) if procs.is_main else []
    chosen = distributed.broadcast_json(existing[-1].name if existing else None, procs)
    if chosen is None:
        return None
    path = run_dir / "checkpoints" / chosen
    if not (path / "state.json").is_file():
        raise CheckpointError(f"process {procs.rank} cannot read {path}: the run folder must be on a file "
                              "system every process (every machine) sees")
    return path


def _load_checkpoint(path: Path, model, optimizer, procs: Processes) -> TrainingState:
    saved_world = int(read_meta(path).get("world_size", 1))
    if saved_world != procs.world_size:
        raise ConfigError(f"{path} was written by a run on {saved_world} process(es), this one has "
                          f"{procs.world_size}: resume it on {saved_world} (the data order and the "
                          "schedule depend on it), or choose another loop.out_dir")
    if distributed.is_sharded(model):
        return distributed.load_sharded(path, model, optimizer, procs.rank)
    return load_training_checkpoint(path, model, optimizer, procs.rank)


def _save_checkpoint(run_dir: Path, model, optimizer, step: int, sampler: MixSampler, skips: SkipLog,
                     procs: Processes, keep: int) -> None:
    """Every process takes part (the shards are gathered); the first writes."""
    if distributed.is_sharded(model):
        trainable, optimizer_state = distributed.gather_trainable(model), distributed.gather_optimizer(model, optimizer)
    elif procs.is_main:  # one process, or DDP's identical replicas
        trainable, optimizer_state = trainable_state(model), optimizer_tensors(optimizer)
    snapshots = distributed.gather_json(rank_snapshot(sampler.state_dict()), procs) if procs.distributed else []
    total = _total_skips(skips, procs)
    if procs.is_main:
        save_training_checkpoint(run_dir, trainable, optimizer_state,
                                 TrainingState(step, sampler.state_dict(), total, procs.world_size, snapshots[1:]),
                                 keep)
    distributed.barrier(procs)


def _total_skips(skips: SkipLog, procs: Processes) -> dict[str, int]:
    if not procs.distributed:
        return dict(skips.counts)
    total: Counter[str] = Counter()
    for counts in distributed.gather_json(dict(skips.counts), procs):
        total.update(counts)
    return dict(total)


def _write_final(run_dir: Path, model, tokenizer, procs: Processes) -> Path:
    """RUN/final: the stage's result, LoRA merged (by the first process)."""
    final = run_dir / "final"
    if procs.is_main:
        if distributed.is_sharded(model):  # the full weights: the start's, with the last checkpoint's trained ones
            merge_run(run_dir, final)
        else:  # one process, or DDP's replica
            merge_lora(model)
            model.eval()
            save_checkpoint(model, tokenizer, final)
    distributed.barrier(procs)
    return final


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
    check_head_options(m)
    config = (preset_architecture(m) if m.init == "preset"
              else base_architecture(m.init, m.preset, m.qwen, m.sam3, m.checkpoint))
    tokenizer = (preset_tokenizer(m.preset) if m.init == "preset"
                 else load_tokenizer(m.checkpoint) if m.init == "checkpoint" else None)
    model = build_model(config, device="meta", tokenizer=tokenizer).model
    apply_lora(model, m)
    vision = cfg.optim.vision_lr > 0
    return {**group_counts(model, vision), **detailed_counts(model, vision)}


if __name__ == "__main__":
    sys.exit(main())
