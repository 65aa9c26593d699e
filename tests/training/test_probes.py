"""The feature probes: the fits, the pooling, the scene lookup and the CLI on the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.probes import (COLOUR_NAMES, MIN_OBJECT_TOKENS, PROBES, bilinear_probe, grouped_auc, linear_probe,
                             main, named_colour, pool_over_mask, scene_of)


def test_linear_probe_reads_a_linear_class_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12))
    y = np.argmax(x[:, :3], axis=1)  # the class is which of three features is largest
    logits = linear_probe(x[:400], y[:400], x[400:], classes=3)
    assert (logits.argmax(1) == y[400:]).mean() > 0.9
    noise = rng.integers(0, 3, size=600)
    logits = linear_probe(x[:400], noise[:400], x[400:], classes=3)
    assert (logits.argmax(1) == noise[400:]).mean() < 0.5


def test_the_bilinear_probe_reads_what_needs_both_inputs():
    # "on target" = the slot's colour matches the phrase's: no function of either alone
    rng = np.random.default_rng(1)
    n = 2000
    slot, phrase = rng.integers(0, 4, n), rng.integers(0, 4, n)
    a = np.eye(4)[slot] + 0.1 * rng.normal(size=(n, 4))
    b = np.eye(4)[phrase] + 0.1 * rng.normal(size=(n, 4))
    y = slot == phrase
    groups = np.arange(n) // 10
    fit, test = slice(0, 1500), slice(1500, n)
    both = bilinear_probe(a[fit], b[fit], y[fit], a[test], b[test])
    auc, samples = grouped_auc(both, y[test], groups[test])
    assert auc > 0.95 and samples > 0
    alone = linear_probe(a[fit], y[fit].astype(np.int64), a[test], 2)
    auc_alone, _ = grouped_auc(alone[:, 1] - alone[:, 0], y[test], groups[test])
    assert auc_alone < 0.7


def test_grouped_auc_averages_groups_with_both_labels():
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.5])
    labels = np.array([True, False, True, False, True])
    groups = np.array([0, 0, 1, 1, 2])  # group 2 has no negative: not counted
    auc, samples = grouped_auc(scores, labels, groups)
    assert samples == 2 and auc == 0.5


def test_named_colour_is_the_one_colour_word_of_the_instruction():
    assert named_colour("Can you segment 'the red one' in the image?") == COLOUR_NAMES.index("red")
    assert named_colour("every cup except the blue one") == COLOUR_NAMES.index("blue")
    assert named_colour("the bowls") == -1 and named_colour("the red and the blue block") == -1
    assert named_colour("the reddish thing") == -1  # whole words only


def test_pool_over_mask_weighs_tokens_by_their_share_of_the_mask():
    tokens = torch.arange(16, dtype=torch.float32).reshape(16, 1)  # a 4 x 4 grid, value = index
    mask = np.zeros((40, 40), bool)
    mask[:, :20] = True  # the left half: columns 0 and 1 of the grid
    pooled = pool_over_mask(tokens, mask, (4, 4))
    assert pooled[0] == pytest.approx(np.mean([0, 1, 4, 5, 8, 9, 12, 13]))
    speck = np.zeros((40, 40), bool)
    speck[0, 0] = True  # 1/100 of a token, under MIN_OBJECT_TOKENS
    assert 1 / 100 < MIN_OBJECT_TOKENS and pool_over_mask(tokens, speck, (4, 4)) is None


def test_scene_of_finds_a_written_scene_and_its_objects(tmp_path):
    from instructsam_core.processing import load_rgb
    from training.tabletop import write_split

    for name, held_out in (("stage1", False), ("heldout", True)):
        split = write_split(tmp_path, name, seeds=[900004], held_out=held_out)
        record = json.loads(split.read_text())[0]
        image = tmp_path / "coco" / "train2017" / record["image"].split("_")[-1]
        scene = scene_of(image, load_rgb(image))
        assert [o.colour for o in scene.objects] == [o["colour"] for o in record["objects"]]
    with pytest.raises(ValueError, match="no seed"):
        scene_of(tmp_path / "photo.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="match no scene"):
        scene_of(image, np.zeros((2, 2, 3), np.uint8))


def test_the_probes_run_the_shipped_model_on_written_splits(tmp_path, capsys):
    from training.tabletop import STAGE1_KINDS, write_split

    fit = write_split(tmp_path, "fit", seeds=range(900010, 900016), kinds=STAGE1_KINDS)
    test = write_split(tmp_path, "test", seeds=range(900020, 900024), held_out=True)
    out = tmp_path / "probes.json"
    assert main(["default", str(fit), str(test), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["probe"]: r for r in report["probes"]}
    assert len(rows) == len(PROBES) + 2 and report["fit_instructions"] > 0 and report["test_instructions"] > 0
    colour = rows["object colour from image tokens"]
    assert colour["fit_n"] > 0 and colour["test_n"] > 0 and 0.0 <= colour["value"] <= 1.0
    for row in rows.values():
        assert row["value"] is None or 0.0 <= row["value"] <= 1.0, row  # JSON null: nothing to measure
    assert "colour instr.: object is target, image x named" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["default", str(fit), str(tmp_path / "none.json")])
    assert "none.json not found" in capsys.readouterr().err
