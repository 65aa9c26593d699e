"""Training data: samples from the benchmarks' readers, bad samples skipped and counted,
the resumable sampler, and collation into the training-consistent layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DatasetSpec
from training.data import (IGNORE, MixSampler, SkipLog, answer_ids, collate, next_samples, read_dataset,
                           resize_masks)
from training.eval.synthetic import rect_mask, write_grefcoco_scenes, write_roborefit_scenes


@pytest.fixture()
def roborefit(tmp_path):
    write_roborefit_scenes(tmp_path / "rr", n=4, size=(48, 64))
    return tmp_path / "rr"


def test_roborefit_and_grefcoco_datasets_give_phrases_with_instances(roborefit, tmp_path):
    (rr,) = read_dataset(DatasetSpec(kind="roborefit", path=str(roborefit)))[:1]
    assert rr.phrases[0][0].endswith("mug") and rr.instruction.endswith("Please output the segmentation mask.")
    path = write_grefcoco_scenes(tmp_path / "gr", n=1, size=(48, 64))
    sources = read_dataset(DatasetSpec(kind="grefcoco", path=str(path)))
    skips = SkipLog()
    loaded = {s.phrases[0].text: s for s in next_samples(MixSampler([(sources, 1)], 0, False), 3, 4, skips)}
    assert len(loaded["the mugs"].phrases[0].masks) in (2, 3)
    assert len(loaded["the tray"].phrases[0].masks) == 1
    assert loaded["the purple elephant"].phrases[0].masks.shape == (0, 48, 64)  # no target
    assert not skips.counts
    with pytest.raises(ValueError, match="unknown dataset kind 'coco'"):
        read_dataset(DatasetSpec(kind="coco", path=str(path)))


def test_bad_samples_are_skipped_with_counted_reasons(roborefit, caplog):
    base = roborefit / "final_dataset" / "train"
    (base / "image" / "0000000.png").write_bytes(b"not a png")  # corrupt image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(base / "mask" / "0000001.png")  # mask of another size
    (base / "image" / "0000002.png").unlink()  # missing file
    records = json.loads((base / "roborefit_train.json").read_text())
    records.append(dict(records[3], num=4, text='""'))  # empty expression
    (base / "roborefit_train.json").write_text(json.dumps(records))
    sampler = MixSampler([(read_dataset(DatasetSpec(kind="roborefit", path=str(roborefit))), 1)], 0, False)
    skips = SkipLog()
    with caplog.at_level("WARNING"):
        (good,) = next_samples(sampler, 1, 4, skips)
    assert good.sample_id == "rr:000003"
    assert dict(skips.counts) == {"bad_image": 1, "bad_mask": 1, "missing_file": 1}
    next_samples(sampler, 1, 4, skips)  # the empty expression is next, then the epoch wraps
    assert skips.counts["bad_text"] == 1
    assert "GT mask is 10x10 but the image is 48x64" in caplog.text


def test_more_instances_than_slots_keeps_the_largest(tmp_path):
    from training.eval.masks import rle_encode

    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "coco" / "train2017" / "1.png")
    rects = [(0, 0, 1, 1), (5, 5, 12, 12), (0, 15, 3, 18), (14, 0, 19, 9)]  # areas 4, 64, 16, 60
    (tmp_path / "g.json").write_text(json.dumps([{"image": "x_1.png", "height": 20, "width": 20, "cat": ["boxes"],
                                                  "masks": [[rle_encode(rect_mask((20, 20), r)) for r in rects]]}]))
    sampler = MixSampler([(read_dataset(DatasetSpec(kind="grefcoco", path=str(tmp_path / "g.json"))), 1)], 0, False)
    skips = SkipLog()
    (sample,) = next_samples(sampler, 1, 2, skips)
    assert [int(m.sum()) for m in sample.phrases[0].masks] == [64, 60]
    assert skips.counts == {"instances_over_k": 1}


def test_sampler_order_is_seeded_and_resumes_exactly(roborefit):
    sources = read_dataset(DatasetSpec(kind="roborefit", path=str(roborefit)))
    a = MixSampler([(sources, 2)], seed=5)
    assert len(a) == 8
    first = [a.next().sample_id for _ in range(11)]  # into the second epoch
    b = MixSampler([(sources, 2)], seed=5)
    b.load_state_dict({"epoch": 0, "position": 6})
    assert [b.next().sample_id for _ in range(5)] == first[6:]
    assert sorted(first[:8]) == sorted(s.sample_id for s in sources * 2)  # each source twice per epoch
    assert first[:8] != [s.sample_id for s in sources * 2]  # shuffled


def test_collation_labels_the_answer_but_not_the_prompt_or_the_query_slots(roborefit, tiny_model):
    model, tok = tiny_model
    ids = model.token_ids
    sampler = MixSampler([(read_dataset(DatasetSpec(kind="roborefit", path=str(roborefit))), 1)], 0, False)
    samples = next_samples(sampler, 2, 4, SkipLog())
    samples[1].phrases.append(type(samples[1].phrases[0])("the tray", np.zeros((0, 48, 64), bool)))
    batch = collate(samples, tok, ids, model.config, mask_size=32)
    assert batch.input_ids.shape[0] == 2 and batch.sam_pixels.shape == (2, 3, 112, 112)
    assert [t.shape for t in batch.targets] == [(1, 32, 32), (1, 32, 32), (0, 32, 32)]
    row = batch.input_ids[1][batch.attention_mask[1].bool()].tolist()
    labels = batch.labels[1][batch.attention_mask[1].bool()].tolist()
    answer = answer_ids(tok, ids, [p.text for p in samples[1].phrases], 4)
    assert row[-len(answer):] == answer and row.count(ids.seg) == 8
    assert all(label == IGNORE for label in labels[:-len(answer)])  # the prompt is no target
    assert [t for t, label in zip(row, labels) if label != IGNORE] == [t for t in answer if t != ids.seg]
    assert batch.labels[0][~batch.attention_mask[0].bool()].eq(IGNORE).all()  # padding is no target
    with_queries = collate(samples, tok, ids, model.config, mask_size=32, text_on_queries=True)
    assert int((with_queries.labels == ids.seg).sum()) == 12


def test_masks_are_resized_with_nearest_neighbours():
    mask = np.zeros((1, 4, 8), bool)
    mask[0, :, :4] = True
    out = resize_masks(mask, 2)
    assert out.dtype == torch.bool and out[0].tolist() == [[True, False], [True, False]]
    assert resize_masks(np.zeros((0, 4, 8), bool), 2).shape == (0, 2, 2)
