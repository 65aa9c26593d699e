"""Recorded outputs of the tiny model: a guard against unintended numerical change.

The embedded tiny model (seed 0) answers fixed inputs with every engine setting spelled
out, so that changing a default elsewhere never changes what is compared here. The values
live in `fixtures/recorded_tiny.json` and are compared with the tolerances below.

Re-record ONLY on purpose, when a change is meant to alter the numbers, and say why in
the commit message:

    INSTRUCTSAM_RECORD_OUTPUTS=1 .venv/bin/python -m pytest tests/core/test_recorded_outputs.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from instructsam_core.engine import Segmenter
from instructsam_core.processing import encode_text
from instructsam_core.sample_images import tabletop_scene
from instructsam_core.testing import ScriptedAnswer

FIXTURE = Path(__file__).parent / "fixtures" / "recorded_tiny.json"
RECORD = os.environ.get("INSTRUCTSAM_RECORD_OUTPUTS") == "1"

# Every engine setting the outputs depend on, explicit (never the defaults).
SETTINGS = dict(score_threshold=0.0, mask_nms_iou=None, max_instances=None, max_new_tokens=12,
                max_instruction_chars=2000, system_prompt=None)
# fp32 on CPU: values move by ~1e-6 across BLAS builds and thread counts.
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)
SCORE_TOL = dict(atol=1e-5, rtol=0.0)
AREA_TOL = 3  # pixels: a logit within ~1e-6 of 0 may flip a pixel's side
BOX_TOL = 1  # pixels, for the same reason
# Mask-logit samples per slot: (row, col) at SAM3's mask resolution (32x32 for tiny).
PROBES = [(0, 0), (5, 7), (16, 16), (20, 3), (31, 31)]


def _image() -> np.ndarray:
    return tabletop_scene(96, 72, seed=1).image


def _head_record(seg: Segmenter, instruction: str, phrase: str | None, script: list[int] | None) -> dict:
    """Generation and raw SAM3-head outputs for one instruction on the encoded frame."""
    processors = [ScriptedAnswer(script)] if script else []
    generation = seg._generate(seg._frame, instruction, phrase, processors)
    record = {"generated_ids": list(generation.token_ids), "phrases": len(generation.phrases)}
    if generation.phrases:
        head = seg.backend.segment_phrases([(seg._frame, generation)])[0]
        logits = head.mask_logits.float()
        record["slot_logits"] = head.logits.float().tolist()
        record["mask_logit_probes"] = [[[float(logits[p, k, r, c]) for r, c in PROBES]
                                        for k in range(logits.shape[1])] for p in range(logits.shape[0])]
    return record


def _result_record(result) -> dict:
    return {
        "generated_text": result.generated_text,
        "target_phrases": list(result.target_phrases),
        "scores": [float(s) for s in result.scores],
        "boxes": result.boxes.tolist(),
        "areas": [int(m.sum()) for m in result.masks],
        "phrases": list(result.phrases),
        "slots": result.slots.tolist(),
    }


def _run_cases() -> dict:
    image = _image()
    out = {}
    forced = Segmenter.from_pretrained("tiny", device="cpu", dtype="float32", phrase_mode="instruction", **SETTINGS)
    forced.set_image(image)
    out["forced_phrase"] = {"head": _head_record(forced, "the red mug", "the red mug", None),
                            "result": _result_record(forced.segment("the red mug"))}

    gen = Segmenter.from_pretrained("tiny", device="cpu", dtype="float32", phrase_mode="generate", **SETTINGS)
    gen.set_image(image)
    out["free_generation"] = {"result": _result_record(gen.segment("pick up the blue cup"))}

    ids, tok = gen.model.token_ids, gen.tokenizer
    script = ([ids.ref_start] + encode_text(tok, "red mug") + [ids.ref_end, ids.ref_start]
              + encode_text(tok, "pear") + [ids.ref_end, ids.im_end])
    out["scripted_two_phrases"] = {
        "head": _head_record(gen, "the red mug and the pear", None, script),
        "result": _result_record(gen.segment("the red mug and the pear", logits_processors=[ScriptedAnswer(script)])),
    }
    return out


def test_tiny_model_outputs_match_the_recording():
    with torch.random.fork_rng():
        torch.manual_seed(1234)  # nothing below should draw randomly; this makes sure of it
        current = _run_cases()
    if RECORD:
        FIXTURE.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")
        pytest.skip(f"re-recorded {FIXTURE.name}; explain why in the commit message")
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: record it with INSTRUCTSAM_RECORD_OUTPUTS=1"
    recorded = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert sorted(current) == sorted(recorded)
    for case, want in recorded.items():
        got = current[case]
        if "head" in want:
            assert got["head"]["generated_ids"] == want["head"]["generated_ids"], case
            assert got["head"]["phrases"] == want["head"]["phrases"], case
            torch.testing.assert_close(torch.tensor(got["head"]["slot_logits"]),
                                       torch.tensor(want["head"]["slot_logits"]), **LOGIT_TOL, msg=case)
            torch.testing.assert_close(torch.tensor(got["head"]["mask_logit_probes"]),
                                       torch.tensor(want["head"]["mask_logit_probes"]), **LOGIT_TOL, msg=case)
        g, w = got["result"], want["result"]
        for field in ("generated_text", "target_phrases", "phrases", "slots"):
            assert g[field] == w[field], f"{case}: {field}"
        torch.testing.assert_close(torch.tensor(g["scores"]), torch.tensor(w["scores"]), **SCORE_TOL,
                                   msg=f"{case}: scores")
        assert np.abs(np.subtract(g["areas"], w["areas"])).max(initial=0) <= AREA_TOL, f"{case}: areas"
        assert np.abs(np.subtract(g["boxes"], w["boxes"])).max(initial=0) <= BOX_TOL, f"{case}: boxes"
