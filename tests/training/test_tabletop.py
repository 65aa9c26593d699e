"""The synthetic tabletop world: scenes, instructions and their targets, held-out
combinations, the world's tokenizer and the small preset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instructsam_core.sample_images import COLOURS, KINDS, SIZES, Scene, SceneObject, random_scene
from instructsam_core.world import INSTRUCTION_KINDS, expressions
from training.tabletop import (HELD_OUT_COMBINATIONS, STAGE1_KINDS, make_scene,
                               write_split)


def test_scenes_are_deterministic_with_exact_disjoint_masks():
    a, b = random_scene(11), random_scene(11)
    np.testing.assert_array_equal(a.image, b.image)
    assert [o.name for o in a.objects] == [o.name for o in b.objects]
    for seed in range(20):
        scene = random_scene(seed)
        assert 1 <= len(scene.objects) <= 8  # 2..8 drawn; an occluded sliver (< 12 px) is no object
        stacked = np.stack([o.mask for o in scene.objects]).astype(int)
        assert stacked.sum(0).max() <= 1  # the visible pixels of an object belong to it alone
        for o in scene.objects:
            assert o.kind in KINDS and o.colour in COLOURS and o.size in SIZES and o.mask.sum() >= 12
    assert random_scene(3, view="top").image.shape == (120, 160, 3)


def _scene() -> Scene:
    """Hand-made: a small red mug (left), a large blue mug (right), a red ball."""
    def obj(kind, colour, size, x1, x2, y1=10, y2=20):
        mask = np.zeros((40, 100), bool)
        mask[y1:y2, x1:x2] = True
        return SceneObject(f"{colour} {kind}", mask, kind, colour, size)

    return Scene(np.zeros((40, 100, 3), np.uint8),
                 [obj("mug", "red", "small", 5, 12), obj("mug", "blue", "large", 60, 80), obj("ball", "red", "small", 30, 36)],
                 "the red mug")


@pytest.mark.parametrize("seed", range(12))
def test_every_expression_names_exactly_its_targets(seed):
    scene = _scene()
    for e in expressions(scene, np.random.default_rng(seed)):
        t = sorted(e.targets)
        if e.kind == "category":
            assert (e.text, t) in [("the mugs", [0, 1]), ("the ball", [2])]
        elif e.kind == "colour":
            assert t == ([0, 2] if "red" in e.text else [1])
        elif e.kind == "attribute":
            assert (e.text, t) in [("the small red mug", [0]), ("the large blue mug", [1]), ("the small red ball", [2])]
        elif e.kind == "spatial":
            assert (e.text, t) in [("the leftmost mug", [0]), ("the rightmost mug", [1]), ("the mugs left of the ball", [0]),
                                   ("the mug left of the ball", [0]), ("the mug right of the ball", [1])]
        elif e.kind == "superlative":
            assert (e.text, t) in [("the largest mug", [1]), ("the smallest mug", [0])]
        elif e.kind == "exclusion":
            assert (e.text, t) in [("every mug except the red one", [1]), ("every mug except the blue one", [0])]
        elif e.kind == "intent":
            assert (e.text, t) in [("something to drink from", [0, 1]), ("something to pour water into", [0, 1]),
                                   ("something to roll", [2])]
        elif e.kind == "multi":
            assert set(t) == {0, 1, 2} and e.text in ("the mug and the ball", "the ball and the mug")
        else:
            assert e.kind == "no_target" and t == []
            colour, kind = e.text.split()[1:]
            assert (colour, kind) not in {("red", "mug"), ("blue", "mug"), ("red", "ball")}


def test_training_scenes_never_show_a_held_out_combination_and_the_held_out_split_does(tmp_path):
    for seed in range(60):
        assert not {(o.colour, o.kind) for o in make_scene(seed, held_out=False).objects} & HELD_OUT_COMBINATIONS
    path = write_split(tmp_path, "train", range(200), kinds=STAGE1_KINDS)
    records = json.loads(path.read_text())
    assert records and not any((o["colour"], o["kind"]) in HELD_OUT_COMBINATIONS for r in records for o in r["objects"])
    held_out_phrases = {f"the {c} {k}" for c, k in HELD_OUT_COMBINATIONS}
    assert not held_out_phrases & {t for r in records for t in r["cat"]}  # not even as a no-target phrase
    assert {k for r in records for k in r["kinds"]} == set(STAGE1_KINDS)
    held = json.loads(write_split(tmp_path, "heldout", range(1_000_000, 1_000_010), held_out=True).read_text())
    assert any((o["colour"], o["kind"]) in HELD_OUT_COMBINATIONS for r in held for o in r["objects"])
    again = json.loads(write_split(tmp_path / "again", "train", range(200), kinds=STAGE1_KINDS).read_text())
    assert again == records  # deterministic from the seeds


def test_the_world_tokenizer_knows_every_word_of_the_world():
    from instructsam_core.processing import encode_text
    from instructsam_core.world import UNKNOWN, world_tokenizer
    from training.eval.prompts import grefcoco_prompt

    tok = world_tokenizer()
    unk = tok.convert_tokens_to_ids(UNKNOWN)
    for seed in range(40):
        for e in expressions(random_scene(seed), np.random.default_rng(seed), INSTRUCTION_KINDS):
            text = grefcoco_prompt(e.text)
            ids = encode_text(tok, text, literal=True)
            assert unk not in ids, text
            assert tok.decode(ids) == text


def test_the_small_preset_is_the_real_architecture_over_the_world_tokenizer():
    from instructsam_core.build import build_model
    from instructsam_core.world import world_tokenizer

    built = build_model("small", device="cpu")
    assert built.tokenizer is world_tokenizer()
    assert 2.0e6 < sum(p.numel() for p in built.model.parameters()) < 2.3e6  # ~4 MB in bf16
    assert built.model.vlm.config.text_config.vocab_size >= len(built.tokenizer)
    assert built.model.config.num_queries == 10


def test_the_demo_asks_as_the_training_data_ask():
    from instructsam_core.world import trained_instruction
    from training.eval.prompts import grefcoco_prompt

    for text in ("the red one", "every cup except the blue one", "the two largest balls"):
        assert trained_instruction(text) == grefcoco_prompt(text)
