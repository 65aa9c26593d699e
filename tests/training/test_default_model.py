"""The shipped default model: it is there, it is what the card says, and it still scores
what its card says on held-out scenes (CI never retrains it; a change that shifts these
numbers retrains the model or updates the card in the same change)."""

from __future__ import annotations

import json
import math

from safetensors import safe_open

from instructsam_core.build import DEFAULT_MODEL_DIR, build_model

SCORES = DEFAULT_MODEL_DIR / "scores.json"


def _close(a: float, b: float, tol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def test_the_default_model_ships_small_bf16_tied_and_with_its_tokenizer_and_card():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md",
                 "scores.json", "curves.png", "engine_config.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir() if f.is_file())
    assert total <= 20e6, f"the shipped model folder is {total / 1e6:.1f} MB, more than 20 MB"
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert not any(k.endswith("lm_head.weight") for k in keys)  # tied to the embeddings
    built = build_model("default", device="cpu")
    assert not built.untrained and built.model.config.num_queries == 10
    assert len(built.tokenizer) < 1000  # the world's tokenizer, read from the checkpoint itself


def test_the_default_model_scores_what_its_card_says_on_held_out_scenes(tmp_path):
    from instructsam_core.engine import Segmenter
    from training.default_model import write_ci_split
    from training.tabletop import evaluate

    recorded = json.loads(SCORES.read_text())["ci_subset"]
    seg = Segmenter.from_pretrained("default", device="cpu", dtype="float32")
    scores = evaluate(seg, write_ci_split(tmp_path))
    assert scores["n"] == recorded["n"]
    differ = {key: (scores[key], recorded[key]) for key in ("n_acc", "t_acc", "multi_map")
              if not _close(scores[key], recorded[key], 0.01)}
    for kind, row in recorded["kinds"].items():
        for metric, value in row.items():
            if not _close(scores["kinds"][kind][metric], value, 0.01):
                differ[f"{kind}.{metric}"] = (scores["kinds"][kind][metric], value)
    assert not differ, f"scores moved from the card's (now, card): {differ}"


def test_the_card_says_which_targets_are_met_as_its_scores_do():
    from training.model_card import target_rows, targets_table

    record = json.loads(SCORES.read_text())
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    rows = target_rows(record)
    assert [name for name, *_ in rows] == ["colour mIoU", "attribute mIoU", "N-acc", "T-acc", "multi-instance mAP",
                                           "multi-instance mAP / untrained"]
    for name, value, goal, met in rows:  # "met" is the goal's own comparison, NaN never meets it
        assert met == (value >= float(goal.removeprefix(">= "))), name
    assert targets_table(record) in card  # the card shows these rows, from its own scores


def test_the_readme_shows_the_cards_tables():
    from pathlib import Path

    from training.model_card import heldout_table, targets_table

    record = json.loads(SCORES.read_text())
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert heldout_table(record["heldout"], record["untrained"]) in readme
    assert targets_table(record) in readme


def test_the_default_model_answers_a_plain_instruction_as_its_trained_question():
    # Its data ask every instruction in one form; its engine_config.json has the engine ask
    # a plain one that way, so the README's "the red object" works as typed.
    import numpy as np

    from instructsam_core.engine import Segmenter
    from instructsam_core.sample_images import random_scene
    from instructsam_core.world import trained_instruction

    seg = Segmenter.from_pretrained("default", device="cpu", dtype="float32")
    seg.set_image(random_scene(1_000_000, 320, 240).image)
    plain, asked = seg.segment("the red object"), seg.segment(trained_instruction("the red object"))
    assert plain.status == "ok" and len(plain) == len(asked) > 0
    assert np.array_equal(plain.masks, asked.masks) and np.allclose(plain.scores, asked.scores)
