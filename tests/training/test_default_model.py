"""The shipped default model: it is there, it is what the card says, and it still scores
what its card says on held-out scenes (CI never retrains it; a change that shifts these
numbers retrains the model or updates the card in the same change)."""

from __future__ import annotations

import json
import math

import pytest
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
    scene = random_scene(1_000_000, 320, 240)
    seg.set_image(scene.image)
    instruction = f"the {scene.objects[1].colour} object"  # a colour the scene shows (yellow), so it finds one
    plain, asked = seg.segment(instruction), seg.segment(trained_instruction(instruction))
    assert plain.status == "ok" and len(plain) == len(asked) > 0
    assert np.array_equal(plain.masks, asked.masks) and np.allclose(plain.scores, asked.scores)


def test_one_pass_at_many_thresholds_is_what_the_engine_answers_at_each(tmp_path):
    # The threshold sweep runs the engine once at the lowest threshold and keeps the
    # instances above each higher one; that must be exactly what the engine answers there.
    from instructsam_core.engine import Segmenter
    from training.tabletop import evaluate, evaluate_thresholds, write_split

    split = write_split(tmp_path, "heldout", range(1_000_000, 1_000_004), held_out=True)
    seg = Segmenter.from_pretrained("default", device="cpu", dtype="float32")
    thresholds = (0.003, 0.01, 0.05)
    sweep = evaluate_thresholds(seg, split, thresholds)
    assert sorted(sweep) == list(thresholds)
    for t in thresholds:
        assert sweep[t] == evaluate(seg, split, score_threshold=t), t
    assert sweep[0.003]["t_acc"] >= sweep[0.05]["t_acc"] and sweep[0.003]["n_acc"] <= sweep[0.05]["n_acc"]
    assert sweep[0.003]["t_acc"] > sweep[0.05]["t_acc"]  # the sweep spans a real trade-off
    for scores in sweep.values():  # gIoU: target kinds' IoU and no-target answers scored 1 when empty
        kinds = scores["kinds"]
        by_hand = (sum(r["n"] * r["miou"] for k, r in kinds.items() if k != "no_target")
                   + kinds["no_target"]["n"] * scores["n_acc"]) / scores["n"]
        assert abs(scores["giou"] - by_hand) < 1e-9


def test_the_threshold_is_the_validation_sweeps_best_giou_ties_to_the_higher():
    from training.default_model import choose_threshold

    def row(giou: float) -> dict:
        return {"giou": giou, "n_acc": 0.5, "t_acc": 0.5}

    assert choose_threshold({0.005: row(0.30), 0.01: row(0.35), 0.02: row(0.33)}) == 0.01
    assert choose_threshold({0.005: row(0.35), 0.01: row(0.35), 0.02: row(0.33)}) == 0.01
    with pytest.raises(ValueError, match="at least one"):
        choose_threshold({})


def test_the_shipped_threshold_is_its_validation_choice_and_the_card_shows_the_sweep():
    from training.default_model import THRESHOLD_GRID, choose_threshold
    from training.model_card import threshold_table

    record = json.loads(SCORES.read_text())
    engine = json.loads((DEFAULT_MODEL_DIR / "engine_config.json").read_text())
    sweep = record["threshold"]
    assert [float(t) for t in sweep["val_all"]] == list(THRESHOLD_GRID) == [float(t) for t in sweep["heldout"]]
    assert engine["score_threshold"] == sweep["chosen"] == choose_threshold(
        {float(t): row for t, row in sweep["val_all"].items()})
    assert record["heldout"]["n_acc"] == sweep["heldout"][str(sweep["chosen"])]["n_acc"]
    assert threshold_table(sweep) in (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()


def test_data_splits_are_written_once_and_a_changed_split_alone_again(tmp_path):
    from training.default_model import Plan, write_data

    plan = Plan(stage1_scenes=3, stage2_scenes=3, stage1_steps=1, stage2_steps=1, heldout_scenes=2, val_scenes=2)
    paths = write_data(tmp_path, plan)
    assert set(paths) == {"stage1", "stage2", "val", "val_all", "heldout", "heldout_ci"}
    assert {k for r in json.loads(paths["val"].read_text()) for k in r["kinds"]} <= {
        "category", "colour", "attribute", "no_target"}
    assert len({k for r in json.loads(paths["val_all"].read_text()) for k in r["kinds"]}) > 4  # every kind
    stamps = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    assert write_data(tmp_path, plan) == paths
    assert {name: p.stat().st_mtime_ns for name, p in paths.items()} == stamps  # nothing rewritten
    bigger = Plan(**{**plan.__dict__, "val_scenes": 3})
    write_data(tmp_path, bigger)
    rewritten = {name for name, p in paths.items() if p.stat().st_mtime_ns != stamps[name]}
    assert rewritten == {"val", "val_all"}
    assert len(json.loads(paths["val_all"].read_text())) == 3
    assert json.loads((tmp_path / "manifest.json").read_text())["val"] == {"first_seed": 500_000, "scenes": 3}


def test_an_experiments_card_names_its_overrides_not_the_shipped_make_target():
    import argparse

    from training.default_model import _command

    assert _command(argparse.Namespace(pilot=False, stage1_overrides=[])) == "make train-default"
    assert _command(argparse.Namespace(pilot=True, stage1_overrides=["model.fusion_layers=4"])) == (
        "python -m training.default_model --pilot --set model.fusion_layers=4")
