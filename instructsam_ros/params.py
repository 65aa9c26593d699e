"""Every parameter of the perception node, declared in one place with descriptors.

`PARAMETERS` is the single table: name, default, description, and either a numeric
range (enforced by rclpy itself) or a list of allowed values (enforced by `validate`,
which the node runs at configure time and in its on-set-parameters callback).
Topic names are not parameters: remap them (`image:=/camera/color/image_raw`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

# Parameters read only when the node configures/activates (model and subscriptions are
# built from them); changing one at runtime is accepted and takes effect on the next
# deactivate -> activate (model) or cleanup -> configure (QoS, inputs).
STATIC = {"checkpoint", "device", "dtype", "backend", "image_reliability", "image_qos_depth",
          "compressed_input", "use_depth", "autostart"}

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
RELIABILITIES = ("best_effort", "reliable")


@dataclass(frozen=True)
class Spec:
    """One parameter: default, description, and its numeric range or allowed values."""

    default: Any
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    constraints: str = ""


def backends() -> tuple[str, ...]:
    """Engine backends that exist in this installation (asked from the engine)."""
    try:
        from instructsam_core.engine import Segmenter
        return tuple(Segmenter.available_backends())
    except ImportError:  # engine not importable: the node will fail at activate anyway
        return ("eager",)


def specs() -> dict[str, Spec]:
    """The parameter table (a function so the backend list is asked at declaration)."""
    return {
        "checkpoint": Spec(
            "default", "InstructSAM checkpoint directory (config.json + safetensors + tokenizer); "
            "'default' = the shipped small model (trained on the synthetic tabletop world only); "
            "'tiny' = the built-in tiny UNTRAINED test model.",
            constraints="existing directory, 'default' or 'tiny'"),
        "device": Spec("auto", "Torch device for the model: auto (cuda when available, "
                       "else cpu), cpu, cuda or cuda:N.", constraints="auto|cpu|cuda|cuda:N"),
        "dtype": Spec("auto", "Model weights/compute dtype; auto = the engine's choice "
                      "(bfloat16 on GPU, float32 on CPU).", choices=DTYPES),
        "backend": Spec("eager", "Inference backend of the engine, of those installed here: eager (plain "
                        "PyTorch); compiled (torch.compile, static KV cache, CUDA graphs on a GPU; the first "
                        "activation on a machine compiles for minutes, later ones read the compiled code back "
                        "from ~/.cache/instructsam/compiled or $INSTRUCTSAM_CACHE_DIR); tensorrt (where TensorRT "
                        "is installed, CUDA: SAM3 as fp16 TensorRT engines, the LLM compiled; the first "
                        "activation exports the graphs and builds the engines, minutes, into "
                        "~/.cache/instructsam or $INSTRUCTSAM_CACHE); onnxruntime (device cpu: SAM3's graphs on "
                        "onnxruntime, the LLM compiled).", choices=backends()),
        "score_threshold": Spec(-1.0, "Keep instances whose score (0..1) is above this "
                                "(strictly: 1.0 keeps nothing). -1 = the checkpoint's own (its "
                                "engine_config.json: 0.01 for the default model, whose agreeing "
                                "slots each score low; else 0.5, the RoboRefIt protocol and the "
                                "released model's).", range=(-1.0, 1.0)),
        "max_instances": Spec(0, "Keep at most this many instances per frame, best first; "
                              "0 = no limit.", range=(0, 1000)),
        "max_new_tokens": Spec(1024, "Generation budget per instruction, in tokens (the "
                               "released model's 1024). A lower value answers faster but cuts "
                               "long answers: phrases past the budget are never generated, and "
                               "when the budget ends right after a phrase the answer gives no "
                               "mask at all (status 'budget_cut').", range=(1, 8192)),
        "mask_nms_iou": Spec(-1.0, "Drop an instance whose mask overlaps a better one by more "
                             "than this IoU; e.g. 0.7 removes near-duplicates. 1.0 = off (as the "
                             "released model: every slot above the threshold is kept). -1 = the "
                             "checkpoint's own setting (its engine_config.json: 0.7 for the default "
                             "model, whose slots can predict the same mask; off for a checkpoint "
                             "without one, as the released model).",
                             range=(-1.0, 1.0)),
        "image_reliability": Spec("best_effort", "QoS reliability of the image (and depth, "
                                  "camera_info) subscriptions. best_effort matches camera "
                                  "drivers' sensor-data QoS.", choices=RELIABILITIES),
        "image_qos_depth": Spec(1, "QoS history depth of the image subscriptions. 1 keeps "
                                "only the newest frame.", range=(1, 100)),
        "compressed_input": Spec(False, "Subscribe to image/compressed "
                                 "(sensor_msgs/CompressedImage, jpeg or png) instead of image."),
        "use_depth": Spec(False, "Subscribe to depth and camera_info (depth aligned to the "
                          "colour image) and fill the instances' 3D centroid and extent."),
        "depth_sync_tolerance": Spec(0.02, "Largest stamp difference, in seconds, between a "
                                     "colour frame and the depth/camera_info used for it.",
                                     range=(0.0, 1.0)),
        "depth_wait_s": Spec(0.1, "How long, in seconds, a colour frame waits for its "
                             "depth/camera_info (aligned depth is often published after "
                             "the colour frame); 0 = use only what has already arrived.",
                             range=(0.0, 1.0)),
        "publish_overlay": Spec(True, "Publish ~/overlay (bgr8 image with masks, boxes, "
                                "scores, phrases and the instruction) for RViz."),
        "publish_label_image": Spec(True, "Publish ~/label_image (mono16) and fill "
                                    "InstanceSegmentation.label_image."),
        "publish_markers": Spec(True, "Publish ~/markers (visualization_msgs/MarkerArray: a box "
                                "at each instance's 3D centroid, sized by its extent, and a "
                                "label) when use_depth is on."),
        "max_rate": Spec(0.0, "Process at most this many frames per second (extra frames are "
                         "skipped and not counted as dropped); 0 = as fast as the model runs.",
                         range=(0.0, 1000.0)),
        "max_instruction_chars": Spec(2000, "Longest instruction accepted, in characters (the "
                                      "engine's limit of the same name). A longer one is rejected "
                                      "with a warning, never cut; the current instruction stays.",
                                      range=(1, 100000)),
        "autostart": Spec(True, "Configure and activate at start-up; false leaves the "
                          "lifecycle node unconfigured for a lifecycle manager."),
    }


@dataclass(frozen=True)
class Settings:
    """The node's parameter values, typed (their defaults are in `specs()`, nowhere else)."""

    checkpoint: str
    device: str
    dtype: str
    backend: str
    score_threshold: float
    max_instances: int
    max_new_tokens: int
    mask_nms_iou: float
    image_reliability: str
    image_qos_depth: int
    compressed_input: bool
    use_depth: bool
    depth_sync_tolerance: float
    depth_wait_s: float
    publish_overlay: bool
    publish_label_image: bool
    publish_markers: bool
    max_rate: float
    max_instruction_chars: int
    autostart: bool

    @classmethod
    def defaults(cls) -> "Settings":
        return cls(**{name: spec.default for name, spec in specs().items()})

    def with_values(self, values: dict[str, Any]) -> "Settings":
        """A copy with some values replaced (unknown names are ignored)."""
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in values.items() if k in names})


def engine_options(s: Settings, checkpoint_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine settings (`Segmenter.from_pretrained`, `update_config`) these parameters
    ask for. `mask_nms_iou` < 0 leaves the checkpoint's own setting: it is left out (for
    `from_pretrained`, which reads it) or, given `checkpoint_defaults` (the running
    `Segmenter.checkpoint_defaults`, for `update_config`), taken from there."""
    options: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "max_instruction_chars": s.max_instruction_chars}
    if s.mask_nms_iou >= 0:
        options["mask_nms_iou"] = None if s.mask_nms_iou >= 1.0 else s.mask_nms_iou
    elif checkpoint_defaults is not None:
        options["mask_nms_iou"] = checkpoint_defaults.get("mask_nms_iou")
    return options


def validate(s: Settings) -> str | None:
    """None when every value is acceptable, else a message naming the bad parameter."""
    if not DEVICE_RE.match(s.device):
        return f"device '{s.device}' is not one of auto, cpu, cuda, cuda:N"
    table = specs()
    for name in ("dtype", "backend", "image_reliability"):
        choices = table[name].choices or ()
        value = getattr(s, name)
        if value not in choices:
            return f"{name} '{value}' is not one of {', '.join(choices)}"
    for name, spec in table.items():
        if spec.range is not None:
            lo, hi = spec.range
            v = getattr(s, name)
            if not lo <= v <= hi:
                return f"{name} {v} is outside [{lo}, {hi}]"
    return None


def declare(node) -> Settings:
    """Declare every parameter on `node` with its descriptor; return the values."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    for name, spec in specs().items():
        d = ParameterDescriptor(name=name, description=spec.description)
        if spec.choices:
            d.additional_constraints = "one of: " + ", ".join(spec.choices)
        elif spec.constraints:
            d.additional_constraints = spec.constraints
        if spec.range is not None:
            lo, hi = spec.range
            if isinstance(spec.default, float):
                d.floating_point_range = [FloatingPointRange(from_value=float(lo),
                                                             to_value=float(hi), step=0.0)]
            else:
                d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
        node.declare_parameter(name, spec.default, d)
    return read(node)


def read(node) -> Settings:
    """Current parameter values of `node` as Settings."""
    return Settings(**{f.name: node.get_parameter(f.name).value for f in fields(Settings)})
