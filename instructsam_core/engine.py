"""The inference engine: `Segmenter`, shaped like SAM2's image predictor.

    seg = Segmenter.from_pretrained("/path/to/InstructSAM-2B", device="cuda")
    seg.set_image(rgb)                      # encode the frame once
    result = seg.segment("the two largest mugs")
    result = seg.segment("everything on the tray except the knife")   # same frame, reused

Public methods speak numpy in original-image pixels; the backend speaks tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .backends import Backend, FrameHandle, FrameInput, available_backends, check_backend_options, create_backend
from .build import DEFAULT_MODEL, BuiltModel, build_model, checkpoint_dir
from .checkpoint import ENGINE_CONFIG_NAME, read_engine_defaults
from .config import PRESETS, EngineConfig, InstructSamConfig
from .outputs import Generation, HeadOutput, LogitsProcessor
from .postprocess import slots_to_result
from .processing import build_prompt_ids, build_prompt_prefix_ids, preprocess_sam, preprocess_vlm, validate_rgb
from .result import STATUS_OK, Result

log = logging.getLogger(__name__)

UNTRAINED_WARNING = ("the '{name}' model is UNTRAINED (random weights): its masks and scores are "
                     "meaningless. Pass a trained checkpoint directory for real results.")
DEFAULT_MODEL_NOTE = ("model: the shipped default model (InstructSAM 'small', trained on the synthetic "
                      "tabletop world only: ten object kinds in eight colours; see "
                      "instructsam_core/default_model/MODEL_CARD.md); pass a checkpoint directory for real scenes")
PHRASE_MODES = ("generate", "instruction")


def _checked_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"output_size must be a positive (H, W), got {size}")
    return h, w


INSTRUCTION_SLOT = "{instruction}"


def checkpoint_engine_defaults(path: str) -> dict:
    """The engine settings checkpoint `path` ("default", a preset or a directory) recommends
    (its `engine_config.json`; {} for none, for a preset and for a directory that is not
    there, which `build_model` then reports)."""
    directory = checkpoint_dir(path)
    return read_engine_defaults(directory) if directory is not None and directory.is_dir() else {}


def _engine_setup(backend: str, backend_options: dict | None, options: dict) -> EngineConfig:
    """Check the backend, its options and the engine options before anything is built."""
    check_backend_options(backend, backend_options or {})
    return _with_options(EngineConfig(), options)


def _with_options(config: EngineConfig, options: dict) -> EngineConfig:
    """`config` with `options` replaced; a ValueError names unknown or impossible ones."""
    try:
        updated = replace(config, **options)
    except TypeError as err:
        known = sorted(EngineConfig.__dataclass_fields__)
        raise ValueError(f"unknown engine option in {sorted(options)}; known: {known}") from err
    if updated.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {updated.max_new_tokens}")
    if updated.phrase_reuse_frames < 0:
        raise ValueError(f"phrase_reuse_frames must be >= 0, got {updated.phrase_reuse_frames}")
    template = updated.instruction_template
    if template is not None and (not isinstance(template, str) or template.count(INSTRUCTION_SLOT) != 1):
        raise ValueError(f"instruction_template must be a str with {INSTRUCTION_SLOT} once, got {template!r}")
    return updated


def apply_template(template: str | None, instruction: str) -> str:
    """`instruction` put in `template`'s form (see `EngineConfig.instruction_template`):
    unchanged when there is no template or it is in that form already."""
    if template is None:
        return instruction
    prefix, suffix = template.split(INSTRUCTION_SLOT)
    if len(instruction) >= len(prefix) + len(suffix) and instruction.startswith(prefix) and instruction.endswith(suffix):
        return instruction
    return prefix + instruction + suffix


class Segmenter:
    """Segments every instance an instruction names, on frames encoded once.

    Build it with `Segmenter.from_pretrained`. Not thread-safe: use one per thread. It
    talks to its backend only through the backend door (`backends.base`).
    """

    def __init__(self, backend: Backend, tokenizer, config: EngineConfig | None = None, checkpoint: str = "",
                 is_untrained: bool = False, phrase_mode: str = "generate"):
        if phrase_mode not in PHRASE_MODES:
            raise ValueError(f"phrase_mode must be one of {PHRASE_MODES}, got {phrase_mode!r}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.checkpoint = checkpoint
        self.is_untrained = is_untrained
        self.phrase_mode = phrase_mode
        # The engine settings the checkpoint recommends (its engine_config.json), for a
        # caller that wants to go back to them (the node, when a parameter is reset).
        self.checkpoint_defaults: dict = {}
        self._frame: FrameHandle | None = None
        self._frame_key: Hashable | None = None
        self._image_size: tuple[int, int] | None = None
        self._encode_seconds = 0.0
        self._released = False
        self._reused: _ReusedAnswer | None = None

    # ---- construction -----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str = "default", device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = None, backend: str = "eager",
                        phrase_mode: str | None = None, backend_options: dict | None = None,
                        **engine_options) -> "Segmenter":
        """Load a checkpoint directory, the shipped default model, or the tiny test model.

        Arguments:
            path: an InstructSAM checkpoint directory (config.json + safetensors + tokenizer);
                `"default"`, the small model this package ships, trained on the synthetic
                tabletop world only (instructsam_core/default_model/MODEL_CARD.md); or
                `"tiny"`, the embedded tiny UNTRAINED model (seeded, for tests).
            device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
            dtype: "float32", "bfloat16", "float16", or None/"auto" (fp32 on CPU, bf16 on CUDA).
            backend: one of `Segmenter.available_backends()`: "eager" (plain PyTorch),
                "compiled" (torch.compile, a static KV cache, CUDA graphs on a GPU; its
                compiled code is cached on disk, see `backends.compiled`), and where
                installed "tensorrt" (SAM3 as TensorRT engines) and "onnxruntime" (SAM3
                on onnxruntime, CPU); see `backends.graph_backend`.
            phrase_mode: "generate" (the model writes the target phrases) or "instruction"
                (the instruction itself is the one phrase, no generation). Default:
                "generate" for checkpoints, "instruction" for untrained weights, whose
                random answers would never name a target.
            backend_options: the backend's own settings (for "compiled":
                `backends.compiled.CompiledOptions` fields, e.g. `{"cache_dir": ...}`; for
                "tensorrt": `backends.tensorrt_backend.TensorRtOptions`).
            engine_options: fields of `EngineConfig` (score_threshold, max_new_tokens, ...);
                they override the checkpoint's own recommendations (`engine_config.json`
                in its directory, e.g. the default model's `mask_nms_iou`), which override
                `EngineConfig`'s defaults.
        """
        if path in PRESETS and path != "tiny":
            raise ValueError(f"preset {path!r} has no embedded weights; pass its checkpoint directory "
                             f"(or Segmenter.from_config({path!r}) for random weights)")
        defaults = checkpoint_engine_defaults(path)
        engine_config = _engine_setup(backend, backend_options, {**defaults, **engine_options})
        if path == DEFAULT_MODEL:
            log.info(DEFAULT_MODEL_NOTE)
        seg = cls._serve(build_model(path, device, dtype), path, backend, backend_options, phrase_mode,
                         engine_config)
        seg.checkpoint_defaults = defaults
        if defaults:
            log.info("engine settings from the checkpoint's %s: %s", ENGINE_CONFIG_NAME, defaults)
        return seg

    @classmethod
    def from_config(cls, config: str | InstructSamConfig, device: str | torch.device = "auto",
                    dtype: str | torch.dtype | None = None, backend: str = "eager", phrase_mode: str | None = None,
                    seed: int = 0, backend_options: dict | None = None, **engine_options) -> "Segmenter":
        """A Segmenter over random (seeded) weights of a preset name or a config: latency
        and memory benchmarks at real size, tests. Its masks mean nothing."""
        engine_config = _engine_setup(backend, backend_options, engine_options)
        label = config if isinstance(config, str) else "config"
        return cls._serve(build_model(config, device, dtype, seed=seed), f"random:{label}", backend,
                          backend_options, phrase_mode, engine_config)

    @classmethod
    def _serve(cls, built: BuiltModel, name: str, backend: str, backend_options: dict | None,
               phrase_mode: str | None, engine_config: EngineConfig) -> "Segmenter":
        if built.untrained:
            log.warning(UNTRAINED_WARNING.format(name=name))
        engine = create_backend(backend, built.model, built.device, built.dtype, backend_options)
        default_mode = "instruction" if built.untrained else "generate"
        return cls(engine, built.tokenizer, engine_config, checkpoint=str(name), is_untrained=built.untrained,
                   phrase_mode=phrase_mode or default_mode)

    def update_config(self, **engine_options) -> None:
        """Change engine settings (fields of `EngineConfig`) for the next calls, e.g.
        `seg.update_config(max_new_tokens=256, mask_nms_iou=0.7)`; unknown names raise.
        A new `system_prompt` forgets the encoded frame (its cached prompt prefix holds the old one)."""
        updated = _with_options(self.config, engine_options)
        if updated.system_prompt != self.config.system_prompt:
            self.reset()
        self._reused = None  # an answer reused under other settings could differ
        self.config = updated

    @staticmethod
    def available_backends() -> list[str]:
        return available_backends()

    @property
    def model(self):
        """The PyTorch model of a PyTorch backend (eager, compiled); not part of the
        backend door, so a backend without one (TensorRT) raises AttributeError."""
        model = getattr(self.backend, "model", None)
        if model is None:
            raise AttributeError(f"the {type(self.backend).__name__} backend has no PyTorch model")
        return model

    @property
    def device(self) -> str:
        return str(self.backend.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    # ---- frames -----------------------------------------------------------------

    def set_image(self, image: np.ndarray, key: Hashable | None = None) -> None:
        """Encode a frame once for any number of `segment` calls.

        Arguments:
            image: `(H, W, 3)` uint8 RGB.
            key: the caller's identity for the frame (e.g. its stamp). When it equals the
                key of the frame already encoded, nothing is recomputed. Never `id(image)`.
        """
        if self._released:
            raise RuntimeError("this Segmenter was released; load a new one with Segmenter.from_pretrained")
        image = validate_rgb(image)
        if key is not None and key == self._frame_key and self._frame is not None:
            self._encode_seconds = 0.0
            return
        start = time.perf_counter()
        self._frame = self.backend.encode_frames([self._frame_input(image)])[0]
        self.backend.synchronize()
        self._encode_seconds = time.perf_counter() - start
        self._frame_key = key
        self._image_size = image.shape[:2]

    def _frame_input(self, image: np.ndarray) -> FrameInput:
        """Preprocess a validated RGB frame for both encoders, with its prompt prefix."""
        cfg = self.backend.config
        vlm = preprocess_vlm(image, min_pixels=cfg.vlm_min_pixels, max_pixels=cfg.vlm_max_pixels)
        prefix = build_prompt_prefix_ids(self.tokenizer, vlm.num_tokens, self.backend.token_ids,
                                         self.config.system_prompt)
        return FrameInput(vlm.pixel_values, vlm.grid_thw, preprocess_sam(image, cfg.sam_image_size), prefix)

    def reset(self) -> None:
        """Forget the encoded frame."""
        self._frame = self._frame_key = self._image_size = None

    def release(self) -> None:
        """Forget the frame and free device memory. The Segmenter cannot be used after
        this; load a new one (as a lifecycle node does on re-activation)."""
        self.reset()
        self.backend.release()
        self._released = True

    # ---- instructions -----------------------------------------------------------

    def validate_instruction(self, instruction: str) -> str:
        """The stripped instruction, or ValueError saying what is wrong with it."""
        if not isinstance(instruction, str):
            raise ValueError(f"instruction must be a str, got {type(instruction).__name__}")
        text = instruction.strip()
        if not text:
            raise ValueError("instruction is empty: say what to segment, e.g. 'the red mug'")
        limit = self.config.max_instruction_chars
        if len(text) > limit:
            raise ValueError(f"instruction has {len(text)} characters, more than the limit of {limit}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"instruction is not valid UTF-8 text: {err.reason} at position {err.start}") from err
        if "\x00" in text:
            raise ValueError("instruction contains a NUL character")
        return text

    def segment(self, instruction: str, score_threshold: float | None = None, max_instances: int | None = None,
                phrase: str | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                output_size: tuple[int, int] | None = None) -> Result:
        """Segment every instance `instruction` names on the frame given to `set_image`.

        Arguments:
            instruction: free-form text ("the two largest mugs").
            score_threshold: keep slots scoring above this (default: the engine config's).
            max_instances: at most this many instances, best first.
            phrase: force the target phrase instead of generating it (one phrase).
            logits_processors: applied to each generation step's scores (tests, constraints).
            output_size: `(H, W)` of the masks and boxes, if not the image's: the mask
                logits are upsampled straight to it (benchmarks whose ground truth is
                sized otherwise than the image, as the release evaluates them).

        Returns a `Result`; zero instances means "no target" (its `status` says why).
        """
        if self._frame is None:
            raise RuntimeError("no image is set: call set_image(rgb) before segment(), or use segment_image()")
        text, phrase = self._texts(instruction, phrase)
        threshold, max_instances = self._limits(score_threshold, max_instances)
        size = self._image_size if output_size is None else _checked_size(output_size)
        t0 = time.perf_counter()
        reused = self._reusable_answer(text) if phrase is None and not logits_processors else None
        generation = self._generate(self._frame, text, phrase, logits_processors, reused)
        if phrase is None and reused is None:
            self._remember_answer(text, generation)
        t1 = time.perf_counter()
        timings = {"image_encode": self._encode_seconds, "generate": t1 - t0}
        self._encode_seconds = 0.0  # the encode is charged to the first instruction only
        head = self.backend.segment_phrases([(self._frame, generation)])[0] if generation.phrases else None
        self.backend.synchronize()
        timings["mask_head"] = time.perf_counter() - t1
        return self._to_result(generation, head, size, threshold, max_instances, timings)

    def _texts(self, instruction: str, phrase: str | None) -> tuple[str, str | None]:
        """The validated instruction as put to the model (in the checkpoint's
        `instruction_template`, if it has one) and the phrase to force (None: generate it)."""
        text = self.validate_instruction(instruction)
        if phrase is None and self.phrase_mode == "instruction":
            phrase = text
        text = apply_template(self.config.instruction_template, text)
        return text, None if phrase is None else self.validate_instruction(phrase)

    def _limits(self, score_threshold: float | None, max_instances: int | None) -> tuple[float, int | None]:
        threshold = self.config.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= threshold <= 1.0 or np.isnan(threshold):
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        max_instances = self.config.max_instances if max_instances is None else max_instances
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be >= 1 or None, got {max_instances}")
        return threshold, max_instances

    def _generate(self, frame: FrameHandle, text: str, phrase: str | None,
                  logits_processors: Sequence[LogitsProcessor] = (), answer: list[int] | None = None) -> Generation:
        """The backend's answer; with `phrase`, forced to close it at once; with `answer`,
        forced to those tokens (a reused answer)."""
        ids = self.backend.token_ids
        prompt = build_prompt_ids(self.tokenizer, text, frame.num_image_tokens, ids, self.config.system_prompt, phrase)
        if phrase is not None:
            answer = [ids.ref_end, ids.eos[0]]
        generation = self.backend.generate(frame, prompt, self.config.max_new_tokens, logits_processors, answer)
        self.backend.synchronize()
        return generation

    # ---- answer reuse on a stream (EngineConfig.phrase_reuse_frames) -------------------

    def _reusable_answer(self, text: str) -> list[int] | None:
        """The remembered answer to force for `text`, counting the use; None to generate."""
        reused = self._reused
        if self.config.phrase_reuse_frames < 1 or reused is None or reused.instruction != text or reused.uses_left < 1:
            return None
        reused.uses_left -= 1
        return reused.answer

    def _remember_answer(self, text: str, generation: Generation) -> None:
        """Keep a freshly generated answer for the next calls with the same instruction."""
        self._reused = None
        if self.config.phrase_reuse_frames < 1 or generation.status != STATUS_OK:
            return
        answer = _answer_choices(generation.token_ids, self.backend.token_ids, self.backend.config.num_queries)
        if answer is not None:
            self._reused = _ReusedAnswer(text, answer, self.config.phrase_reuse_frames)

    def _to_result(self, generation: Generation, head: HeadOutput | None, image_size: tuple[int, int],
                   threshold: float, max_instances: int | None, timings: dict[str, float]) -> Result:
        """Post-process one answer; `timings` gets `postprocess` and `total`."""
        start = time.perf_counter()
        ref = (self.backend.token_ids.ref_start, self.backend.token_ids.ref_end)
        phrases = [self.tokenizer.decode([t for t in ids if t not in ref]).strip() for ids in generation.phrase_token_ids]
        if head is None:
            result = Result.empty(image_size)
        else:
            result = slots_to_result(head.mask_logits, head.scores(), phrases, image_size, threshold,
                                     self.config.mask_nms_iou, max_instances)
        timings["postprocess"] = time.perf_counter() - start
        timings["total"] = sum(timings.values())
        result.timings = timings
        result.generated_text = self.tokenizer.decode(generation.token_ids, skip_special_tokens=False)
        result.target_phrases = phrases
        result.status = generation.status
        return result

    def segment_image(self, image: np.ndarray, instruction: str, key: Hashable | None = None, **kwargs) -> Result:
        """One-shot form: `set_image(image, key)` then `segment(instruction, **kwargs)`."""
        self.set_image(image, key)
        return self.segment(instruction, **kwargs)

    def segment_batch(self, images: Sequence[np.ndarray], instructions: Sequence[str],
                      score_threshold: float | None = None, max_instances: int | None = None,
                      batch_size: int | None = None) -> list[Result]:
        """Many (image, instruction) pairs, for benchmarks.

        Frames are encoded `batch_size` at a time (both image encoders in one call) and the
        SAM3 head runs once over every phrase of the batch; the LLM answers each pair on its
        own (query blocks enter at different steps per answer). Each result's
        `image_encode` and `mask_head` timings are its share of the batch's. Inputs are all
        checked first: a bad pair raises ValueError naming its index, before any work.
        Does not touch the frame of `set_image`.
        """
        if self._released:
            raise RuntimeError("this Segmenter was released; load a new one with Segmenter.from_pretrained")
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        threshold, max_instances = self._limits(score_threshold, max_instances)
        checked = []
        for i, (image, instruction) in enumerate(zip(images, instructions)):
            try:
                checked.append((validate_rgb(image), *self._texts(instruction, None)))
            except ValueError as err:
                raise ValueError(f"pair {i}: {err}") from err
        size = batch_size or self.config.batch_size
        results: list[Result] = []
        for start in range(0, len(checked), size):
            chunk = checked[start:start + size]
            t0 = time.perf_counter()
            frames = self.backend.encode_frames([self._frame_input(image) for image, _, _ in chunk])
            self.backend.synchronize()
            encode_share = (time.perf_counter() - t0) / len(chunk)
            generations, generate_times = [], []
            for frame, (_, text, phrase) in zip(frames, chunk):
                t1 = time.perf_counter()
                generations.append(self._generate(frame, text, phrase))
                generate_times.append(time.perf_counter() - t1)
            answered = [i for i, g in enumerate(generations) if g.phrases]
            t2 = time.perf_counter()
            heads = self.backend.segment_phrases([(frames[i], generations[i]) for i in answered]) if answered else []
            self.backend.synchronize()
            head_share = (time.perf_counter() - t2) / max(1, len(answered))
            head_of = dict(zip(answered, heads))
            for i, ((image, _, _), generation) in enumerate(zip(chunk, generations)):
                timings = {"image_encode": encode_share, "generate": generate_times[i],
                           "mask_head": head_share if i in head_of else 0.0}
                results.append(self._to_result(generation, head_of.get(i), image.shape[:2], threshold,
                                               max_instances, timings))
        return results


@dataclass
class _ReusedAnswer:
    instruction: str
    answer: list[int]  # the answer's chosen tokens (each phrase end stands for its query block)
    uses_left: int


def _answer_choices(token_ids: list[int], ids, num_queries: int) -> list[int] | None:
    """The tokens an answer chose, each query block folded into the phrase end that opened
    it; None when the answer holds block tokens outside a whole block (not replayable)."""
    block_tail = [ids.mask_start] + [ids.seg] * num_queries + [ids.mask_end]
    choices, i = [], 0
    while i < len(token_ids):
        token = token_ids[i]
        choices.append(token)
        if token == ids.ref_end and token_ids[i + 1:i + 1 + len(block_tail)] == block_tail:
            i += 1 + len(block_tail)
            continue
        if token in (ids.mask_start, ids.seg, ids.mask_end):
            return None
        i += 1
    return choices
