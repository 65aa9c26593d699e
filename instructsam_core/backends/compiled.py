"""Compiled PyTorch: torch.compile, a static KV cache, CUDA graphs and a second CUDA stream.

What it does differently from the eager backend (same weights, same math):

- torch.compile (inductor) of the Qwen3-VL vision tower and SAM3's vision encoder (in
  place, `Module.compile`), of the LLM's passes over the static KV cache
  (`static_cache.py`) and of the SAM3 head (fusion encoder, DETR decoder on the external
  queries, mask decoder, both projections). Graphs are specialised to their input shapes;
  the instruction's prefill is padded to `prefill_bucket` tokens, the head's phrase count
  to a power of two, so a stream of frames of one camera reuses a handful of graphs.
- On a GPU: the LLM's text passes (instruction prefill, one decoded token, a query block)
  and the SAM3 head are replayed as CUDA graphs (torch.compile's "reduce-overhead" mode);
  decoding a phrase then costs about one graph launch per token. The vision towers and the
  image prefill compile without CUDA graphs ("default" mode; never max-autotune).
- The query pass is fused: a phrase end runs together with its query block
  (`<ref_end><mask_start>[SEG]xK<mask_end>`, one pass, as the release lays it out), and
  a forced answer (a forced phrase, or an answer reused on a stream) runs with the
  instruction's prefill in a single pass, query blocks included (`chunk_layout` gives
  it the layout of step-by-step decoding, so the result equals the eager one).
- On a GPU, SAM3's vision encoder runs on its own CUDA stream beside the Qwen3-VL vision
  tower and the LLM's image prefill, which it does not depend on. `set_image` still
  returns only when both are done (the engine synchronises the device), so its
  `image_encode` time is about max(SAM3 vision, Qwen3-VL vision + image prefill) rather
  than their sum. A `StageTimer` synchronises around every stage and so measures the
  stages one after the other, without the overlap.
- Compiled code is cached on disk per model and machine (`compile_cache.py`), so a
  restart reads it back instead of compiling; the first call of each stage with new
  shapes is reported (WARNING while the cache is cold, INFO when it is read back).

On CPU the same graphs compile with inductor's C++ backend (a C++ compiler must be
installed) and no CUDA graphs or streams. The CUDA-graph and stream code paths are
written for the GPU and guarded by the device type; this project's CI has no GPU, so
they are exercised only by benchmarks/gpu_session.sh on a GPU machine.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.generation import (_DynamicRunner, assemble_generation, check_prefix, chunk_layout, decode_answer,
                                expand_answer, prompt_positions)
from ..model.instructsam import InstructSam, SamFeatures
from ..outputs import Generation, HeadOutput, LogitsProcessor
from .base import FrameHandle, FrameInput
from .compile_cache import CompileTracker, cache_key, default_cache_root, use_cache_dir
from .static_cache import StaticKVCache
from .torch_backend import TorchBackend

log = logging.getLogger(__name__)


@dataclass
class CompiledOptions:
    """Settings of the compiled backend (`Segmenter.from_pretrained(..., backend_options=...)`)."""

    # Root of the on-disk compile caches; None: $INSTRUCTSAM_CACHE_DIR, else ~/.cache/instructsam/compiled.
    cache_dir: str | None = None
    # Tokens the static KV cache holds (prompt prefix, instruction and answer). An answer
    # that would run past it goes on in eager mode (correct, slower; logged once).
    max_cache_len: int = 4096
    # The instruction's prefill is padded to a multiple of this many tokens: one compiled
    # graph per bucket rather than per instruction length.
    prefill_bucket: int = 32
    cuda_graphs: bool = True  # GPU: replay the LLM's text passes and the SAM3 head as CUDA graphs
    sam_stream: bool = True  # GPU: SAM3's vision encoder on its own CUDA stream beside the LLM
    # Run a forced answer (forced phrase, reused answer) in the instruction's prefill pass.
    fuse_forced_answers: bool = True

    def __post_init__(self) -> None:
        if self.max_cache_len < 64:
            raise ValueError(f"max_cache_len must be >= 64 tokens, got {self.max_cache_len}")
        if self.prefill_bucket < 1:
            raise ValueError(f"prefill_bucket must be >= 1, got {self.prefill_bucket}")


class CompiledFrame(FrameHandle):
    """What the compiled backend keeps per frame: SAM3 features and a copy of the prompt
    prefix's keys and values, loaded back into the static cache when another frame was
    there in between."""

    def __init__(self, num_image_tokens: int, prefix_ids: list[int], keys: list[torch.Tensor],
                 values: list[torch.Tensor], next_position: torch.Tensor, serial: int):
        super().__init__(num_image_tokens)
        self.prefix_ids = prefix_ids
        self.keys, self.values = keys, values  # per layer (1, kv_heads, len(prefix_ids), head_dim)
        self.next_position = next_position  # (1,) on the CPU: the position after the prefix
        self.serial = serial  # which frame the static cache holds
        self.sam: SamFeatures | None = None


def _check_cpu_compiler() -> None:
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise ValueError("the compiled backend on CPU needs a C++ compiler for torch.compile's inductor "
                         "(g++ or clang++; e.g. `apt install g++`), or use backend='eager'")


def _vision_grid_inputs(visual, grids: list[tuple[int, int, int]], device: torch.device) -> dict:
    """The keyword inputs transformers' Qwen3-VL vision tower accepts precomputed (the
    same helpers its forward calls), for these grids."""
    try:
        from transformers import vision_utils as vu

        grid = torch.tensor([list(g) for g in grids], dtype=torch.long, device=device)
        indices, weights = vu.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
        inputs = {"interp_indices": indices, "interp_weights": weights,
                  "position_ids": vu.get_vision_position_ids(grid, visual.spatial_merge_size)}
        inputs["cu_seqlens"], max_seqlen = vu.get_vision_attention_seqlens(grid, visual.config)
    except (ImportError, AttributeError, TypeError):
        return {}  # the tower computes them itself (slower: graph breaks)
    if max_seqlen is not None:
        inputs["max_seqlen"] = max_seqlen
    return inputs


def _next_power_of_two(n: int) -> int:
    """The next power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


class CompiledBackend(TorchBackend):
    """The model's stages compiled with torch.compile (see the module docstring).

    Arguments:
        model: the InstructSAM model; its vision towers are compiled in place, so give
            this backend a model of its own.
        device, dtype: where it runs (bf16 on a GPU is the intended use).
        options: `CompiledOptions`.
    """

    def __init__(self, model: InstructSam, device: torch.device, dtype: torch.dtype,
                 options: CompiledOptions | None = None):
        super().__init__(model, device, dtype)
        self.options = options or CompiledOptions()
        cuda = self.device.type == "cuda"
        if not cuda:
            _check_cpu_compiler()
        self.cuda_graphs = cuda and self.options.cuda_graphs
        settings = {"max_cache_len": self.options.max_cache_len, "prefill_bucket": self.options.prefill_bucket,
                    "cuda_graphs": self.cuda_graphs}
        key, description = cache_key(model, self.device, dtype, settings)
        self.cache_dir = Path(self.options.cache_dir or default_cache_root()) / key
        warm = use_cache_dir(self.cache_dir, description)
        self.cache_was_warm = warm  # its directory existed: compiled code is read back, not built
        self.tracker = CompileTracker(self.cache_dir, loud=not warm)
        if not warm:
            log.warning("compiled backend: no compiled code for this model and machine yet; the first calls "
                        "compile it (minutes), then it is cached under %s", self.cache_dir)

        graph_mode = "reduce-overhead" if self.cuda_graphs else "default"
        model.vlm.model.visual.compile(dynamic=False)
        model.grounding_model.vision_encoder.compile(dynamic=False)
        self._image_pass = torch.compile(self._image_pass_eager, dynamic=False)
        self._text_pass = torch.compile(self._text_pass_eager, dynamic=False, mode=graph_mode)
        self._head = torch.compile(self._head_eager, dynamic=False, mode=graph_mode)

        self.kv = StaticKVCache(model.vlm.config.text_config, self.options.max_cache_len, self.device, dtype)
        self._serials = itertools.count()
        self._kv_holds: int | None = None  # serial of the frame whose prefix is in the static cache
        self._sam_stream = torch.cuda.Stream(self.device) if cuda and self.options.sam_stream else None
        self._warned_fallback = False
        self._grid_cache: dict[tuple, dict] = {}

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent in each stage's first calls with new shapes (compiling or loading)."""
        return dict(self.tracker.seconds)

    def release(self) -> None:
        self.kv = None
        self._kv_holds = None
        super().release()

    # ---- frames -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_frames(self, frames: Sequence[FrameInput]) -> list[CompiledFrame]:
        sam, sam_done = self._sam_vision(torch.cat([f.sam_pixels for f in frames]).to(self.device, self.dtype))
        handles = self.encode_language(frames)
        if sam_done is not None:
            torch.cuda.current_stream(self.device).wait_event(sam_done)
        for i, handle in enumerate(handles):
            handle.sam = sam.take(torch.tensor([i], device=self.device))
        return handles

    @torch.no_grad()
    def encode_language(self, frames: Sequence[FrameInput]) -> list[CompiledFrame]:
        pixels = [f.vlm_pixels.to(self.device, self.dtype) for f in frames]
        grids = [f.grid_thw for f in frames]
        with self.stage("qwen_vision"), self.tracker.track("qwen_vision", pixels, grids):
            visions = self.model.encode_images_vlm(pixels, grids, **self._grid_inputs(grids))
        handles = []
        for frame, vision in zip(frames, visions):
            with self.stage("prefill_image"):
                handles.append(self._prefill_image(frame.prefix_ids, vision))
        return handles

    def _grid_inputs(self, grids: list[tuple[int, int, int]]) -> dict:
        """What the Qwen3-VL vision tower derives from the patch grids (interpolated position
        embedding taps, rotary positions, attention segments), computed once per camera
        size: on every frame these data-dependent steps would break the compiled graph
        and wait on the device. Empty where transformers has no such helpers."""
        key = tuple(grids)
        if key not in self._grid_cache:
            self._grid_cache[key] = _vision_grid_inputs(self.model.vlm.model.visual, grids, self.device)
        return self._grid_cache[key]

    def _sam_vision(self, pixels: torch.Tensor) -> tuple[SamFeatures, torch.cuda.Event | None]:
        """SAM3's vision encoder; on a GPU on its own stream, returning the event that ends it."""
        if self._sam_stream is None:
            with self.stage("sam_vision"), self.tracker.track("sam_vision", pixels):
                return self.model.encode_image_sam(pixels), None
        main = torch.cuda.current_stream(self.device)
        self._sam_stream.wait_stream(main)  # the pixels were copied on the main stream
        with torch.cuda.stream(self._sam_stream):
            with self.stage("sam_vision"), self.tracker.track("sam_vision", pixels):
                sam = self.model.encode_image_sam(pixels)
            done = torch.cuda.Event()
            done.record(self._sam_stream)
        # Cross-stream use: keep the allocator from reusing these blocks too early.
        pixels.record_stream(self._sam_stream)
        for t in (*sam.fpn_hidden_states, *sam.fpn_position_encoding):
            t.record_stream(main)
        return sam, done

    def _prefill_image(self, prefix_ids: list[int], vision) -> CompiledFrame:
        """The LLM over a frame's prompt prefix into the static cache, kept as a snapshot."""
        n, length = len(prefix_ids), self.kv.max_len
        if n >= length:
            raise ValueError(f"the frame's prompt prefix has {n} tokens, more than the static KV cache holds "
                             f"({length}); raise CompiledOptions.max_cache_len")
        ids = torch.tensor([prefix_ids])
        n_image = int((ids == self.token_ids.image).sum())
        if n_image != vision.embeds.shape[0]:
            raise ValueError(f"image features and image tokens do not match: {n_image} tokens, "
                             f"{vision.embeds.shape[0]} features")
        positions, next_pos = prompt_positions(self.model, ids, vision)
        causal = (torch.arange(length)[None, :] <= torch.arange(n)[:, None])[None, None]  # (1, 1, n, L)
        dev = [t.to(self.device) for t in (ids, positions, causal, torch.arange(n))]
        with self.tracker.track("prefill_image", ids):
            self._mark_step()
            self._image_pass(*dev, vision.embeds, vision.deepstack)
        serial = next(self._serials)
        self._kv_holds = serial
        keys, values = self.kv.snapshot(n)
        return CompiledFrame(n_image, list(prefix_ids), keys, values, next_pos, serial)

    def _image_pass_eager(self, ids, positions, mask, write_index, image_embeds, deepstack):
        """The stock text model's layer loop, with its DeepStack step written densely.

        Qwen3-VL adds the deepstack features to the image positions of the first layers'
        outputs by boolean indexing, whose data-dependent shape breaks the compiled graph
        (and then every later layer compiles on its own, past dynamo's recompile limit).
        Scattered once into full-length tensors, zero off the image, the same addition is a
        plain `+`. Everything else is the stock modules in the stock order.
        """
        lm = self.model.language_model
        embeds = lm.embed_tokens(ids)
        is_image = (ids == self.token_ids.image)[..., None]
        embeds = embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))
        dense = [torch.zeros_like(embeds).masked_scatter(is_image, d.to(embeds.dtype)) for d in deepstack]
        writer = self.kv.writer(write_index)
        position_embeddings = lm.rotary_emb(embeds, positions)
        hidden = embeds
        for i, layer in enumerate(lm.layers):
            hidden = layer(hidden, attention_mask=mask, position_ids=None, past_key_values=writer,
                           position_embeddings=position_embeddings)
            if i < len(dense):
                hidden = hidden + dense[i]
        return lm.norm(hidden)[:, -1]

    # ---- the answer -------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, frame: CompiledFrame, prompt_ids: list[int], max_new_tokens: int,
                 logits_processors: Sequence[LogitsProcessor] = (),
                 forced_answer: Sequence[int] | None = None) -> Generation:
        model = self.model
        check_prefix(model, prompt_ids, frame.prefix_ids)
        if self._kv_holds != frame.serial:
            self.kv.load(frame.keys, frame.values)
            self._kv_holds = frame.serial
        n = len(frame.prefix_ids)
        runner = _StaticRunner(self, frame.next_position, n)
        suffix = list(prompt_ids[n:])
        eos = self.token_ids.eos
        if (forced_answer and self.options.fuse_forced_answers and forced_answer[-1] in eos
                and not any(t in eos for t in forced_answer[:-1])):
            return self._forced_in_one_pass(runner, list(prompt_ids), suffix, list(forced_answer))
        with self.stage("prefill"):
            hidden, logits = runner.run(suffix)
        return decode_answer(model, runner, list(prompt_ids), hidden, logits, max_new_tokens, logits_processors,
                             forced_answer, self.stage)

    def _forced_in_one_pass(self, runner: "_StaticRunner", prompt: list[int], suffix: list[int],
                            forced: list[int]) -> Generation:
        """The instruction and a forced answer (ending in its end token, which is not run)
        in one LLM pass, every query block included."""
        ids = self.token_ids
        run = expand_answer(self.model, forced[:-1])
        with self.stage("prefill"):
            hidden, _ = runner.run(suffix + run)
        k, base = self.config.num_queries, len(suffix)
        blocks = [hidden[0, base + j + 2:base + j + 2 + k] for j in range(len(run) - 1)
                  if run[j] == ids.ref_end and run[j + 1] == ids.mask_start]
        answer = run + forced[-1:]
        return assemble_generation(self.model, prompt + answer, answer, hidden[0], len(prompt) - base, blocks,
                                   budget_cut=False)

    def pass_width(self, q: int) -> int:
        """Tokens a text pass of `q` tokens runs as: one token and a query block as they
        are, anything longer padded to the prefill bucket."""
        if q == 1 or q == self.config.num_queries + 3:
            return q
        bucket = self.options.prefill_bucket
        return -(-q // bucket) * bucket

    def text_pass(self, ids, positions, mask, write_index, last_index) -> tuple[torch.Tensor, torch.Tensor]:
        """One compiled LLM pass over the static cache (CPU inputs); returns
        `(hidden (1, W, H), logits (1, V) at last_index)`."""
        width = ids.shape[1]
        dev = [t.to(self.device) for t in (ids, positions, mask, write_index, last_index)]
        if width not in (1, self.config.num_queries + 3):
            # Prefills of every bucket share one graph with a symbolic width.
            for t, dim in zip(dev[:4], (1, 2, 2, 0)):
                torch._dynamo.mark_dynamic(t, dim)
        with self.tracker.track("text_pass", "prefill" if width > self.config.num_queries + 3 else width):
            self._mark_step()
            hidden, logits = self._text_pass(*dev)
        if self.cuda_graphs:  # a graph's outputs are overwritten by its next replay
            hidden, logits = hidden.clone(), logits.clone()
        return hidden, logits

    def _text_pass_eager(self, ids, positions, mask, write_index, last_index):
        model = self.model
        embeds = model.language_model.embed_tokens(ids)
        is_seg = ids == self.token_ids.seg
        # The i-th [SEG] of a pass is query (i mod K) of its block: blocks are K long and whole.
        slot = (is_seg.long().cumsum(-1) - 1).remainder(self.config.num_queries)
        embeds = torch.where(is_seg[..., None], model.mask_queries.to(embeds.dtype)[slot], embeds)
        hidden = model.run_language_model(embeds, mask, positions, self.kv.writer(write_index))
        return hidden, model.vlm.lm_head(hidden.index_select(1, last_index))[:, 0]

    def warn_fallback(self) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            log.warning("compiled backend: an answer outgrew the static KV cache (%d tokens); it goes on in eager "
                        "mode (raise CompiledOptions.max_cache_len to keep long answers compiled)", self.kv.max_len)

    # ---- the SAM3 head ----------------------------------------------------------------

    @torch.no_grad()
    def segment_phrases(self, answers: Sequence[tuple[CompiledFrame, Generation]]) -> list[HeadOutput]:
        with self.stage("sam_head"):
            packed = self.pack_phrases(answers, [frame.sam for frame, _ in answers])
            queries, phrase_ids, phrase_mask, hidden, sam = packed
            p = queries.shape[0]
            rows = torch.arange(_next_power_of_two(p), device=self.device).clamp(max=p - 1)  # pad by repeating the last
            args = [t[rows] for t in (queries, phrase_ids, phrase_mask, hidden)]
            args += [tuple(f[rows] for f in sam.fpn_hidden_states), tuple(f[rows] for f in sam.fpn_position_encoding)]
            with self.tracker.track("sam_head", len(rows)):
                self._mark_step()
                outputs = self._head(*args)
            head = HeadOutput(*(t[:p].clone() if t is not None else None for t in outputs))
        return head.split([len(generation.phrases) for _, generation in answers])

    def _head_eager(self, queries, phrase_ids, phrase_mask, phrase_hidden, fpn_hidden, fpn_pos):
        prompt = self.model.phrase_prompt(phrase_ids, phrase_mask, phrase_hidden)
        head = self.model.segment_blocks(queries, prompt, phrase_mask, SamFeatures(tuple(fpn_hidden), tuple(fpn_pos)))
        return head.mask_logits, head.logits, head.boxes, head.presence_logits

    def _mark_step(self) -> None:
        if self.cuda_graphs:  # a new graph run: the outputs of earlier ones are ours (cloned) now
            torch.compiler.cudagraph_mark_step_begin()


class _StaticRunner:
    """Runs an answer's text passes on the static cache (`decode_answer`'s runner).

    Positions and masks are built on the CPU by `chunk_layout` and padded to the pass's
    width; the mask spans the whole cache and hides the positions not yet written. An
    answer that would outgrow the cache goes on in an eager runner over a copy of it.
    """

    def __init__(self, backend: CompiledBackend, next_pos: torch.Tensor, past_len: int):
        self.backend, self.next_pos, self.past_len = backend, next_pos, past_len
        self.eager: _DynamicRunner | None = None

    def run(self, new: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backend
        if self.eager is None and self.past_len + b.pass_width(len(new)) > b.kv.max_len:
            b.warn_fallback()
            self.eager = _DynamicRunner(b.model, b.kv.to_dynamic(self.past_len), self.next_pos.to(b.device),
                                        self.past_len)
        if self.eager is not None:
            return self.eager.run(new)
        q, width, past, length = len(new), b.pass_width(len(new)), self.past_len, b.kv.max_len
        positions, mask, self.next_pos = chunk_layout(b.model, new, self.next_pos, past)
        full = torch.zeros(1, 1, width, length, dtype=torch.bool)
        if mask is None:
            full[..., :q, :past + q] = True
        else:
            full[..., :q, :past + q] = mask
        pad = torch.arange(q, width)
        full[0, 0, pad, past + pad] = True  # a padding row sees itself only (its output is dropped)
        ids = torch.full((1, width), b.token_ids.eos[0], dtype=torch.long)
        ids[0, :q] = torch.tensor(new)
        padded = torch.cat([positions, positions[..., -1:] + 1 + torch.arange(width - q).view(1, 1, -1)], dim=-1)
        hidden, logits = b.text_pass(ids, padded, full, torch.arange(past, past + width), torch.tensor([q - 1]))
        self.past_len += q
        return hidden[:, :q], logits
