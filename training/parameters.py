"""What trains, and how fast: LoRA on the LLM (peft), the release's parameter groups, and
the merge of LoRA into the weights between the stages.

The release (its stage scripts and trainer) trains three groups and freezes the rest:

    llm            LoRA on the LLM's q/k/v/o, embed_tokens, lm_head   (llm_lr)
    projector      the Qwen3-VL vision merger                         (projector_lr)
    mask_decoder   SAM3 without its vision encoder, both MLPs, the
                   query bank                                         (mask_decoder_lr)
    frozen         the LLM's own weights, the Qwen3-VL vision blocks (and its deepstack
                   mergers), SAM3's vision encoder

A model that starts from random weights (the `small` default model) also needs its vision
towers to learn: with `vision=True` they form a fourth group, `vision`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from instructsam_core.model.instructsam import InstructSam
from training.config import ModelConfig

GROUPS = ("llm", "projector", "mask_decoder", "vision")


def apply_lora(model: InstructSam, cfg: ModelConfig) -> None:
    """Add LoRA adapters to the LLM's attention projections (in place, with peft)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_targets), bias="none")
    inject_adapter_in_model(config, model.language_model)


def lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, LoRA layer) for every LoRA-wrapped layer of `model`."""
    from peft.tuners.lora import LoraLayer

    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, LoraLayer):
                found.append((parent, name, child))
    return found


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its layer's weight and put the plain layer back, so the
    model has the released key layout again. Returns the number of layers merged."""
    layers = lora_layers(model)
    for parent, name, layer in layers:
        layer.merge(safe_merge=True)
        setattr(parent, name, layer.get_base_layer())
    return len(layers)


def parameter_groups(model: InstructSam, vision: bool = False) -> "OrderedDict[str, list[tuple[str, nn.Parameter]]]":
    """The release's groups (and, with `vision`, the vision towers), by parameter name; a
    tied lm_head appears once (as the embedding). Every parameter not in a group is frozen."""
    groups: OrderedDict[str, list[tuple[str, nn.Parameter]]] = OrderedDict((g, []) for g in GROUPS)
    for name, param in model.named_parameters():  # named_parameters skips tied duplicates
        group = _group_of(name)
        if group == "vision" and not vision:
            group = None
        if group is not None:
            groups[group].append((name, param))
    return groups


def _group_of(name: str) -> str | None:
    if ".lora_" in name or name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return "llm"
    if name.startswith("vlm.model.visual.merger."):
        return "projector"
    if name.startswith("grounding_model.") and not name.startswith("grounding_model.vision_encoder."):
        return "mask_decoder"
    if name.startswith(("mask_hidden_fcs.", "text_hidden_fcs.")) or name == "mask_queries":
        return "mask_decoder"
    if name.startswith(("vlm.model.visual.", "grounding_model.vision_encoder.")):
        return "vision"
    return None


def set_trainable(model: InstructSam, vision: bool = False) -> "OrderedDict[str, list[tuple[str, nn.Parameter]]]":
    """Freeze everything, then unfreeze the groups; returns them."""
    for param in model.parameters():
        param.requires_grad_(False)
    groups = parameter_groups(model, vision)
    for members in groups.values():
        for _, param in members:
            param.requires_grad_(True)
    return groups


def group_counts(model: InstructSam, vision: bool = False) -> "OrderedDict[str, int]":
    """Trainable parameters per group (and the frozen rest), counted once each."""
    groups = parameter_groups(model, vision)
    counts: OrderedDict[str, int] = OrderedDict((g, sum(p.numel() for _, p in m)) for g, m in groups.items())
    in_groups = {id(p) for members in groups.values() for _, p in members}
    counts["frozen"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                           if id(p) not in in_groups)
    return counts


def detailed_counts(model: InstructSam, vision: bool = False) -> "OrderedDict[str, int]":
    """The groups split into their parts (LoRA, embeddings, each MLP, the bank, ...)."""
    parts: OrderedDict[str, int] = OrderedDict()
    for group, members in parameter_groups(model, vision).items():
        for name, param in members:
            if ".lora_" in name:
                part = "llm: LoRA"
            elif name.endswith("embed_tokens.weight"):
                part = "llm: embed_tokens"
            elif name.endswith("lm_head.weight"):
                part = "llm: lm_head (untied)"
            elif group == "mask_decoder" and not name.startswith("grounding_model."):
                part = f"mask_decoder: {name.split('.')[0]}"
            elif group == "mask_decoder":
                part = f"mask_decoder: SAM3 {name.split('.')[1]}"
            elif group == "vision":
                part = "vision: SAM3 vision encoder" if name.startswith("grounding_model.") else "vision: Qwen3-VL blocks"
            else:
                part = f"{group}: {name.split('.')[3]}"
            parts[part] = parts.get(part, 0) + param.numel()
    return parts
