"""Training configuration: one dataclass per component, composed into `TrainConfig`.

    cfg = load_config("training/configs/stage1.yaml", ["optim.llm_lr=1e-5", "loop.batch_size=2"])

YAML files and `key=value` overrides are parsed with `yaml.safe_load` (nothing is exec'd
or eval'd) and checked against the dataclasses' field types: an unknown key or a value of
the wrong type is a `ConfigError` naming it. Defaults are the released InstructSAM-2B's
stage-1 recipe (paper Table 11, the official stage scripts).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the key."""


@dataclass
class DatasetSpec:
    """One training or validation dataset of a data mix.

    Attributes:
        kind: the file format (`training.datasets`): "roborefit" (the benchmark's formats:
            official layout, QA, plain, frames), "grefcoco" (the release's gRefCOCO JSON:
            per image, expressions with 0..N instances each), "instructsam" (the release's
            training annotation JSONs), "refer" (refs(unc).p + instances.json: RefCOCO,
            RefCOCO+, RefCOCOg, RefCLEF), "grefer" (gRefCOCO's grefs(unc).json +
            instances.json) or "reasonseg" (LISA's ReasonSeg split folder).
        path: the file (or folder) to read; for "roborefit" also the data root holding
            final_dataset/.
        data_root: root of the relative image paths in `path` (default: the kind's own,
            e.g. the file's folder).
        split: the split to read where a file or layout holds several (RoboRefIt's
            official layout, refer/grefer refs).
        repeat: how many times the dataset appears in one epoch (the release's factor).
    """

    kind: str
    path: str
    data_root: str = ""
    split: str = "train"
    repeat: int = 1


@dataclass
class MixFile:
    """A data mix file (`training/configs/mixes/`): a stage's datasets and repeat factors,
    like the release's stage lists."""

    datasets: list[DatasetSpec] = field(default_factory=list)


@dataclass
class DataConfig:
    """What the model sees."""

    train: list[DatasetSpec] = field(default_factory=list)
    val: list[DatasetSpec] = field(default_factory=list)
    # A mix file whose datasets are added to `train` when the configuration is loaded (a
    # relative path: from the folder of the config file that names it, or of the working
    # directory when given as an override); the resolved configuration lists them itself.
    mix: str = ""
    # Folder the datasets' relative `path`s and `data_root`s are below ("": the working directory).
    root: str = ""
    # Questions about one image asked as the turns of one conversation (the release: up to
    # 10; one image encode serves them all); 1: one sample per question.
    max_turns: int = 1
    # Ground-truth masks are resized (nearest) to SAM3's mask resolution: 288 at 1008 px.
    mask_size: int = 288
    shuffle: bool = True


@dataclass
class ModelConfig:
    """Where the weights start and what is trained.

    `init`: "base" (Qwen3-VL `qwen` + SAM3 `sam3` directories: stage 1), "checkpoint"
    (an InstructSAM checkpoint directory `checkpoint`, e.g. stage 1 merged: stage 2), or
    "preset" (random weights of `preset`, seeded by `seed`: tests, the default model).
    `init_weights` (preset only): "transformers" (as built) or "fan_in" (redrawn for
    training from scratch, see training/initialization.py). `box_prior`: start SAM3's box
    relative-position bias as "attend inside your box" with this strength (0 = as
    initialised or trained; see `training.initialization.box_attention_prior`).

    The head options (`box_prior`, `fusion_output_norm`, `fusion_norm_scope`,
    `fusion_image_skip`, `head_dropout`, `phrase_source`) apply to every start: to a
    preset's random weights, or to a trained checkpoint's (a warm start, e.g. the slot
    recipe from the shipped model; unset, the checkpoint keeps its own).
    """

    init: str = "base"
    qwen: str = ""
    sam3: str = ""
    checkpoint: str = ""
    preset: str = "tiny"
    seed: int = 0
    init_weights: str = "transformers"
    box_prior: float = 0.0
    # `InstructSamConfig.fusion_output_norm` (the fusion encoder's image and prompt tokens
    # layer-normalised before the decoder reads them; None: the start's own, off in the
    # presets); the checkpoints keep it in their config.json, so inference applies it too.
    fusion_output_norm: bool | None = None
    # `InstructSamConfig.phrase_source` (what the SAM3 prompt is made from; None: the
    # start's own). The checkpoints keep it in their config.json, so inference uses it too.
    phrase_source: str | None = None
    # `InstructSamConfig.fusion_norm_scope` ("all", or "decoder": the mask decoder reads the
    # encoder's own image tokens, at their own scale; None: the start's own).
    fusion_norm_scope: str | None = None
    # `InstructSamConfig.fusion_image_skip` (the decoders read the fusion encoder's image
    # tokens plus its input; None: the start's own).
    fusion_image_skip: bool | None = None
    # The dropout of SAM3's fusion encoder, DETR decoder and scoring MLP (None: the start's
    # own; Sam3Config's 0.1 in the presets). Training from scratch, the slots' own content is
    # small beside what the attentions return, and dropout noise on those outputs is
    # what tells the slots apart in training, never at inference (docs/training.md).
    head_dropout: float | None = None
    # The fusion encoder's depth (SAM3's detr_encoder_config.num_layers; preset only, an
    # architecture change: None keeps the preset's, 2 in `small`). A checkpoint start keeps
    # the depth it was trained with.
    fusion_layers: int | None = None
    # The fusion encoder's width: the feed-forward size of each of its layers (SAM3's
    # detr_encoder_config.intermediate_size; preset only, an architecture change: None keeps
    # the preset's, 128 in `small`). Wider, not deeper: the tenth round's four layers
    # learned worse in the plan's budget.
    fusion_ffn: int | None = None
    # LoRA on the LLM's attention projections (the release: r 64, alpha 16, dropout 0.05).
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = True


@dataclass
class LossConfig:
    """Loss weights and the matcher's cost weights, defaults as the release trains.

    The official code multiplies its mask BCE and Dice by 2.0 and 0.5 twice (once in the
    loss modules, once in the model), so their effective weights are 4.0 and 0.25.
    """

    text: float = 1.0
    mask_bce: float = 4.0
    mask_dice: float = 0.25
    score: float = 1.0
    match_bce: float = 2.0
    match_dice: float = 0.5
    match_score: float = 1.0
    num_points: int = 12544  # points sampled per matched mask (Mask2Former style)
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # DETR's box terms (L1, generalized IoU) on every decoder layer against the matched
    # masks' boxes, and in the matching cost. Off in the release's recipe (SAM3 starts
    # pretrained); a SAM3 head from random weights needs them (see training/losses.py).
    box_l1: float = 0.0
    box_giou: float = 0.0
    match_box_l1: float = 0.0
    match_box_giou: float = 0.0
    # The slot scores' target: "dice" (the release: a matched slot's max(its mask's Dice,
    # 0.1)), "one" (DETR's class target) or "quality" (every slot's best Dice with any
    # instance; see training/losses.py).
    score_target: str = "dice"
    # SAM3's semantic head (one mask of all a phrase names): BCE and Dice weights; off in
    # the release's recipe, a dense signal for a head trained from random weights.
    semantic_bce: float = 0.0
    semantic_dice: float = 0.0
    # The slots' query states held apart after every decoder layer (training/losses.py,
    # `slot_spread_loss`): its weight, 0 = off as in the release.
    slot_spread: float = 0.0
    # The unmatched slots' masks pushed off the phrase's instances (training/losses.py,
    # `unmatched_bce`): its weight, 0 = off as in the release.
    unmatched_mask: float = 0.0
    # Denoising queries (training/denoising.py): weight of their mask and box losses (each
    # term weighted as the matched slots' are), 0 = off as in the release; and DN-DETR's
    # box noise scale.
    denoise: float = 0.0
    denoise_noise: float = 0.4
    # Each object's colour from the image tokens pooled over it (training/object_colour.py;
    # gRefCOCO data that training/tabletop.py wrote): its weight (0 = off, as in the
    # release), which tokens ("fusion": what the DETR decoder reads, "image": the fusion
    # encoder's input) and the prototype classifier's temperature.
    object_colour: float = 0.0
    object_colour_tokens: str = "fusion"
    object_colour_temperature: float = 0.1
    # The release also trains the LLM to predict the [SEG] tokens; we leave them out of the
    # text loss (their embeddings are the query bank, never predicted at inference).
    text_on_queries: bool = False


@dataclass
class OptimConfig:
    """AdamW per parameter group, warm-up then decay (stage 1 of Table 11)."""

    llm_lr: float = 5e-6  # LoRA, embed_tokens, lm_head
    projector_lr: float = 5e-6  # the Qwen3-VL vision merger
    mask_decoder_lr: float = 1e-5  # SAM3 without its vision encoder, both MLPs, the query bank
    # 0: the vision towers stay frozen (the release). A model from random weights (the
    # small default model) trains them too: the Qwen3-VL vision blocks and SAM3's encoder.
    vision_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    grad_clip: float = 1.0  # max gradient norm; 0 = off


@dataclass
class LoopConfig:
    """The loop: sizes, evaluation, checkpoints, logging, devices."""

    out_dir: str = "runs/stage1"
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0 = `epochs` over the training mix
    batch_size: int = 4  # samples per micro-batch
    grad_accum: int = 32  # micro-batches per optimizer step (4 x 32 = the paper's 128)
    eval_every: int = 0  # steps; 0 = only at the end (when there is validation data)
    eval_batches: int = 16
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 42
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 autocast on CUDA, none on CPU) | bf16 | none
    stop_after: int = 0  # stop (with a checkpoint) after this step, schedule unchanged; 0 = never
    progress: bool = True
    tensorboard: bool = True
    # How several processes (torchrun) share the work: "ddp" (each holds the whole model,
    # gradients averaged) or "fsdp" (FSDP2: parameters, gradients and optimizer state
    # sharded, for memory at 2B). One process ignores it.
    strategy: str = "ddp"


@dataclass
class TrainConfig:
    """The whole training configuration (`stage` names the run in logs)."""

    stage: str = "stage1"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- parsing --------------------------------------------------------------------------

def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (from YAML) as the type `hint`, or ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(hints)}")
    values = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists (created as needed for dicts)."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if parts[i + 1].isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        index = int(last)
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    else:
        node[last] = value


def config_from_dict(data: dict) -> TrainConfig:
    """A `TrainConfig` from plain data (as read from YAML)."""
    return _build(TrainConfig, data or {}, "")


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_mix(path: str | Path) -> list[DatasetSpec]:
    """The datasets of a mix file, typed and checked like the configuration."""
    path = Path(path)
    try:
        return _build(MixFile, _read_yaml(path, "mix file"), "").datasets
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A YAML file (or the defaults) with `key=value` overrides applied, typed and checked;
    a `data.mix` file's datasets are added to `data.train`."""
    data: dict = _read_yaml(Path(path), "config file") if path is not None else {}
    merged = config_from_dict(data).to_dict()  # defaults filled in, so overrides reach them
    mix_base = Path(path).parent if path is not None else Path()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.llm_lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        try:
            _set_path(merged, key, value)
        except (IndexError, ValueError, AttributeError, TypeError) as err:
            raise ConfigError(f"override {item!r}: no such key") from err
        if key == "data.mix":
            mix_base = Path()
    cfg = config_from_dict(merged)
    if cfg.data.mix:
        cfg.data.train = load_mix(mix_base / cfg.data.mix) + cfg.data.train
        cfg.data.mix = ""
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved configuration (what the run really used) as YAML."""
    from instructsam_core.fileio import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
