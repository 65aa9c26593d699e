"""The compiled backend (torch.compile with inductor, on CPU) answers as the eager one does,
and its compiled code survives a restart.

One compiled engine serves every test here (`compiled_segmenter`, session-wide: compiling
costs minutes on CPU). All frames are 640x480 and all instructions short, so the graphs
the first test compiles serve the rest.

Tolerances, fp32 on CPU: inductor fuses and reorders float operations, so values agree to
rounding, not bit for bit. Slot scores within 1e-5 (absolute) and LLM states within 1e-4;
a mask pixel whose upsampled logit lies within rounding of 0 may flip, so each mask may
differ in at most MASK_PIXELS pixels; generated tokens, phrases and slots are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from instructsam_core.backends import StageTimer
from instructsam_core.backends.compile_cache import cache_key
from instructsam_core.processing import build_prompt_ids, encode_text
from instructsam_core.sample_images import tabletop_scene
from instructsam_core.testing import ScriptedAnswer

SCORE_TOL = dict(atol=1e-5, rtol=0.0)
STATE_TOL = dict(atol=1e-4, rtol=1e-4)
MASK_PIXELS = 3


def _frame(seed: int) -> np.ndarray:
    return tabletop_scene(640, 480, seed=seed).image


def _phrase_answer(seg, *phrases: str) -> list[int]:
    """A scripted answer naming `phrases`, each as `<ref_start> phrase <ref_end>`, then the end."""
    ids, tok = seg.model.token_ids, seg.tokenizer
    answer = []
    for i, phrase in enumerate(phrases):
        answer += (encode_text(tok, " and") if i else []) + [ids.ref_start] + encode_text(tok, phrase) + [ids.ref_end]
    return answer + [ids.im_end]


def assert_same_result(compiled, eager) -> None:
    assert compiled.generated_text == eager.generated_text
    assert (compiled.status, compiled.target_phrases) == (eager.status, eager.target_phrases)
    assert len(eager) > 0 and compiled.slots.tolist() == eager.slots.tolist()
    assert compiled.phrase_indices.tolist() == eager.phrase_indices.tolist()
    np.testing.assert_allclose(compiled.scores, eager.scores, **SCORE_TOL)
    differing = (compiled.masks != eager.masks).reshape(len(eager), -1).sum(axis=1)
    assert differing.max() <= MASK_PIXELS, differing


def test_compiled_equals_eager_with_a_forced_phrase(compiled_segmenter, eager_twin):
    frame = _frame(1)
    for instruction in ("the red mug on the left", "a pear"):
        compiled = compiled_segmenter.segment_image(frame, instruction, phrase=instruction, score_threshold=0.0)
        eager = eager_twin.segment_image(frame, instruction, phrase=instruction, score_threshold=0.0)
        assert_same_result(compiled, eager)
    # Every stage compiled once and was timed doing it.
    assert set(compiled_segmenter.backend.compile_seconds) == {"qwen_vision", "sam_vision", "prefill_image",
                                                               "text_pass", "sam_head"}


def test_compiled_equals_eager_decoding_token_by_token(compiled_segmenter, eager_twin):
    """The benchmark's answer: a phrase decoded token by token, then its query pass (the
    passes CUDA graphs replay on a GPU)."""
    frame = _frame(2)
    answer = _phrase_answer(eager_twin, "the red mug")
    results = [seg.segment_image(frame, "the red mug on the left", score_threshold=0.0,
                                 logits_processors=[ScriptedAnswer(answer)])
               for seg in (compiled_segmenter, eager_twin)]
    assert results[1].target_phrases == ["the red mug"]
    assert_same_result(*results)


def test_compiled_equals_eager_across_frames_and_batches(compiled_segmenter, eager_twin):
    """Frames taking turns in the static KV cache: a batch over other frames, then the frame
    set before it (its prompt prefix is loaded back)."""
    a, b = _frame(3), _frame(4)
    results = {}
    for name, seg in (("compiled", compiled_segmenter), ("eager", eager_twin)):
        seg.set_image(a)
        seg.phrase_mode = "instruction"  # each pair's instruction is its phrase
        try:
            batch = seg.segment_batch([b, a], ["the mug", "a pear"], score_threshold=0.0, batch_size=1)
        finally:
            seg.phrase_mode = "generate"
        back = seg.segment("the tray", phrase="the tray", score_threshold=0.0)
        results[name] = batch + [back]
    for compiled, eager in zip(results["compiled"], results["eager"]):
        assert_same_result(compiled, eager)


def test_two_phrases_forced_in_one_pass_or_decoded_equal_eager(compiled_segmenter, eager_twin):
    """An answer with two phrases (two query blocks): forced, as a reused answer is, it runs
    with the instruction's prefill in a single compiled pass; decoded, it runs token by
    token and block by block. The eager backend feeds it step by step either way."""
    frame = _frame(5)
    answer = _phrase_answer(eager_twin, "red mug", "blue cup")
    runs = {}
    for name, seg in (("compiled", compiled_segmenter), ("eager", eager_twin)):
        seg.set_image(frame)
        handle = seg._frame
        prompt = build_prompt_ids(seg.tokenizer, "the mug and the cup", handle.num_image_tokens, seg.model.token_ids)
        timer = StageTimer(seg.backend.synchronize)
        seg.backend.stage_timer = timer
        try:
            forced = seg.backend.generate(handle, prompt, 64, forced_answer=answer)
        finally:
            seg.backend.stage_timer = None
        decoded = seg.backend.generate(handle, prompt, 64, [ScriptedAnswer(answer)])
        runs[name] = (forced, decoded, timer)
    assert {k: len(v) for k, v in runs["compiled"][2].seconds.items()} == {"prefill": 1}  # one pass
    assert len(runs["eager"][2].seconds["query_pass"]) == 2  # a pass per block (and per token)
    for compiled, eager in zip(runs["compiled"][:2], runs["eager"][:2]):
        assert compiled.token_ids == eager.token_ids and compiled.status == eager.status == "ok"
        assert len(compiled.phrases) == 2
        for c, e in zip(compiled.phrases, eager.phrases):
            assert c.token_ids == e.token_ids
            torch.testing.assert_close(c.query_states, e.query_states, **STATE_TOL)
            torch.testing.assert_close(c.phrase_states, e.phrase_states, **STATE_TOL)


class _FillTheCacheAfter:
    """A logits processor that, after `steps` decoded tokens, declares the static KV cache
    full at the current length (its buffers stay as they are)."""

    def __init__(self, kv, steps: int):
        self.kv, self.steps, self.calls = kv, steps, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.steps + 1:
            self.kv.max_len = input_ids.shape[1]
        return scores


def test_an_answer_past_the_static_cache_goes_on_in_eager_mode(compiled_segmenter, eager_twin, monkeypatch, caplog):
    frame = _frame(2)
    answer = _phrase_answer(eager_twin, "the red mug")
    kv = compiled_segmenter.backend.kv
    monkeypatch.setattr(kv, "max_len", kv.max_len)  # restored after the test
    with caplog.at_level("WARNING"):
        compiled = compiled_segmenter.segment_image(frame, "the red mug on the left", score_threshold=0.0,
                                                    logits_processors=[ScriptedAnswer(answer), _FillTheCacheAfter(kv, 2)])
    assert "outgrew the static KV cache" in caplog.text
    eager = eager_twin.segment_image(frame, "the red mug on the left", score_threshold=0.0,
                                     logits_processors=[ScriptedAnswer(answer)])
    assert_same_result(compiled, eager)


RESTART = textwrap.dedent("""
    import json, logging, sys, time
    t0 = time.perf_counter()
    logging.basicConfig(level=logging.INFO)  # the backend's progress reports
    from torch._dynamo.utils import counters
    from instructsam_core.engine import Segmenter
    from instructsam_core.sample_images import tabletop_scene
    checkpoint, cache = sys.argv[1], sys.argv[2]
    seg = Segmenter.from_pretrained(checkpoint, device="cpu", dtype="float32", backend="compiled",
                                    backend_options={"cache_dir": cache})
    result = seg.segment_image(tabletop_scene(640, 480, seed=1).image, "a pear", phrase="a pear", score_threshold=0.0)
    print(json.dumps({"seconds": time.perf_counter() - t0, "scores": result.scores.tolist(),
                      "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]}))
""")


def test_a_restarted_process_reads_the_compiled_code_back(tiny_checkpoint, compiled_cache_dir, compiled_segmenter):
    here = compiled_segmenter.segment_image(_frame(1), "a pear", phrase="a pear", score_threshold=0.0)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-c", RESTART, str(tiny_checkpoint), str(compiled_cache_dir)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["misses"] == 0 and report["hits"] > 0  # nothing compiled anew
    assert "read from the disk cache" in run.stderr  # and it said so
    np.testing.assert_allclose(report["scores"], here.scores, **SCORE_TOL)


def test_the_cache_key_follows_model_weights_dtype_and_versions(tiny_model, monkeypatch):
    import transformers

    from instructsam_core.build import build_model

    model, _ = tiny_model
    cpu = torch.device("cpu")
    base, description = cache_key(model, cpu, torch.float32, {})
    assert cache_key(model, cpu, torch.float32, {})[0] == base  # stable
    assert description["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    reseeded = build_model("tiny", device="cpu", seed=1).model
    assert cache_key(reseeded, cpu, torch.float32, {})[0] != base  # other weights
    assert cache_key(model, cpu, torch.bfloat16, {})[0] != base
    assert cache_key(model, cpu, torch.float32, {"max_cache_len": 1})[0] != base
    monkeypatch.setattr(model.config, "max_phrase_tokens", 16)
    assert cache_key(model, cpu, torch.float32, {})[0] != base  # another config
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cache_key(model, cpu, torch.float32, {})[0] != base
    monkeypatch.undo()
    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    assert cache_key(model, cpu, torch.float32, {})[0] != base


def test_without_a_cpp_compiler_the_cpu_backend_is_refused(tiny_checkpoint, monkeypatch, tmp_path):
    from instructsam_core.engine import Segmenter

    monkeypatch.setattr("instructsam_core.backends.compiled.shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", backend="compiled",
                                  backend_options={"cache_dir": str(tmp_path)})
