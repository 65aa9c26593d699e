"""The training datasets' readers, each on small files written in its official format: the
release's training JSONs, the refer toolkit's pickles (read only through the plain-data
unpickler), gRefCOCO's own files and LISA's ReasonSeg folders; conversations of several
questions per image; the stage mixes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from training.config import ConfigError, DatasetSpec, load_config, load_mix
from training.data import IGNORE, MixSampler, SkipLog, collate, next_samples, read_dataset
from training.datasets.instructsam import clean_phrase, read_instructsam
from training.datasets.plain_pickle import UnsafePickleError, load_plain_pickle
from training.datasets.plain_pickle import main as convert_pickle
from training.datasets.reasonseg import read_reasonseg_folder
from training.datasets.refer import read_refer
from training.eval.masks import DataError, decode_instances
from training.eval.readers import FormatError
from training.eval.synthetic import (rect_polygon, rect_mask, write_grefcoco_official, write_instructsam,
                                     write_reasonseg_lisa, write_refer)

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
SIZE = (48, 64)


# ---- the release's training JSONs ------------------------------------------------------------

def test_release_json_gives_one_question_per_annotation(tmp_path, caplog):
    path = write_instructsam(tmp_path)
    with caplog.at_level("WARNING"):
        questions = read_instructsam(path, tmp_path)
    by_phrase = {q.phrases[0][0]: q for q in questions if len(q.phrases) == 1}
    assert by_phrase["the red mug"].instruction == "Can you segment 'the red mug' in the image?"
    assert by_phrase["vase"].instruction == "What holds the flowers?"  # a sentence is asked as it is
    assert by_phrase["EXIT"].instruction == "Can you segment the text 'EXIT' in the image?"
    assert "the door handle" not in by_phrase  # a point annotation has no mask to train on
    assert "1 'point' annotations" in caplog.text and "1 records without an image" in caplog.text
    assert {q.key for q in questions if q.image.name == "0.png"} == {"0"}  # one image, one conversation

    def gt(phrase):
        return by_phrase[phrase].phrases[0][1]()

    a, b, c = (2, 2, 12, 12), (30, 20, 45, 35), (50, 5, 60, 15)
    assert np.array_equal(gt("the red mug").instances, rect_mask(SIZE, a)[None])
    vase = gt("vase").instances  # two polygon instances, as JSON strings
    assert vase.shape == (2, *SIZE)
    assert np.array_equal(vase[0], decode_instances([rect_polygon(b)], *SIZE)[0])
    box = gt("EXIT").instances  # [x, y, w, h], clipped to the image
    assert np.array_equal(box[0], rect_mask(SIZE, (50, 40, 63, 47)))
    assert gt("the purple elephant").instances.shape == (0, *SIZE)  # no target
    assert np.array_equal(gt("the box").instances, rect_mask(SIZE, a)[None])  # annotation stored as a JSON string


def test_inst2seg_records_also_ask_for_all_their_phrases_at_once(tmp_path):
    questions = read_instructsam(write_instructsam(tmp_path), tmp_path)
    (together,) = [q for q in questions if len(q.phrases) > 1]
    assert together.instruction == "Can you segment 'cup and plate' in the image?"
    assert [p for p, _ in together.phrases] == ["cup", "plate"]
    assert [len(load().instances) for _, load in together.phrases] == [1, 2]
    assert together.key != questions[-2].key  # its own conversation, not a turn of the others


def test_release_phrases_are_cleaned_as_the_release_does():
    assert clean_phrase("  The red mug. ") == "the red mug"
    assert clean_phrase("USB stick") == "uSB stick"  # only the first letter, as the release


def test_release_json_format_errors_name_the_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"image": "x.png", "annotation": [{"type": "caption", "text": "a", "ann": None}]}]))
    with pytest.raises(FormatError, match=r"bad.json\[0\].annotation\[0\]: annotation type 'caption'"):
        read_instructsam(path, tmp_path)


# ---- the refer toolkit (pickles, safely) and gRefCOCO -----------------------------------------

def test_refer_reads_the_toolkit_pickle_one_sample_per_sentence(tmp_path):
    refs = write_refer(tmp_path)
    samples = read_refer(refs, "train")
    assert [s.text for s in samples] == ["left box", "the box on the left", "caf\u00e9 sign"]  # Python 2 bytes decoded
    assert samples[0].instruction == "Can you segment 'left box' in the image?"
    assert samples[0].image == tmp_path / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"
    gt = samples[0].load_gt()
    assert np.array_equal(gt.instances, np.stack(decode_instances([rect_polygon((2, 2, 12, 12))], *SIZE)))
    assert [s.text for s in read_refer(refs, "val")] == ["top right box"]
    with pytest.raises(FormatError, match="no refs of split 'testA'; it has train, val"):
        read_refer(refs, "testA")


def test_refs_pickle_converts_once_to_json_that_reads_the_same(tmp_path, capsys):
    refs = write_refer(tmp_path)
    converted = refs.with_suffix(".json")
    assert convert_pickle([str(refs), str(converted)]) == 0
    assert json.loads(converted.read_text())[0]["sentences"][0]["sent"] == "left box"
    a, b = read_refer(refs, "train"), read_refer(converted, "train")
    assert [(s.sample_id, s.text, s.image) for s in a] == [(s.sample_id, s.text, s.image) for s in b]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_any_other_global_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0}, _Exploit(marker)], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"names (posix|os)\.system; only plain data"):
        load_plain_pickle(evil)
    assert not marker.exists()
    (tmp_path / "instances.json").write_text("{}")
    with pytest.raises(FormatError, match="only plain data"):  # the reader says so too
        read_refer(evil, "train")
    array = tmp_path / "array.p"
    array.write_bytes(pickle.dumps({"mask": np.zeros(3)}, protocol=2))
    with pytest.raises(UnsafePickleError, match="numpy"):
        load_plain_pickle(array)
    plain = tmp_path / "plain.p"
    plain.write_bytes(pickle.dumps({"ids": {1, 2}, "name": "x", "pairs": (1, 2.5)}, protocol=2))  # builtins.set
    assert load_plain_pickle(plain) == {"ids": {1, 2}, "name": "x", "pairs": (1, 2.5)}


def test_grefcoco_official_files_give_multi_and_no_target_expressions(tmp_path):
    grefs = write_grefcoco_official(tmp_path)
    samples = {s.text: s for s in read_refer(grefs, "train", multi=True)}
    assert samples["both boxes"].image == tmp_path / "images/train2014/COCO_train2014_000000000009.jpg"
    both = samples["both boxes"].load_gt().instances
    assert np.array_equal(both, np.stack([rect_mask(SIZE, (2, 2, 12, 12)), rect_mask(SIZE, (30, 20, 45, 35))]))
    assert samples["the giraffe"].load_gt().instances.shape == (0, *SIZE)
    with pytest.raises(DataError, match="all crowd annotations"):
        samples["the crowd"].load_gt()
    # through the training data: the crowd-only expression is skipped with its reason
    sources = read_dataset(DatasetSpec(kind="grefer", path=str(grefs)))
    skips = SkipLog()
    loaded = next_samples(MixSampler([(sources, 1)], 0, shuffle=False), 2, 4, skips)
    assert [s.phrases[0].text for s in loaded] == ["both boxes", "the giraffe"]
    next_samples(MixSampler([(sources, 1)], 0, shuffle=False), 3, 4, skips)
    assert skips.counts["bad_mask"] == 1


# ---- ReasonSeg (LISA) -------------------------------------------------------------------------

def test_reasonseg_lisa_polygons_fill_largest_first_with_ignore_and_flags(tmp_path):
    folder = write_reasonseg_lisa(tmp_path)
    samples = read_reasonseg_folder(folder)
    assert [s.sample_id for s in samples] == ["a-0", "a-1", "b-0"]
    assert samples[0].instruction == "What can hold hot coffee? Please output the segmentation mask."
    assert samples[2].instruction == "Please segment the 'the mug' in the image."
    assert [s.group for s in samples] == ["long", "long", "short"]
    gt = samples[0].load_gt()
    hole = rect_mask(SIZE, (10, 10, 14, 14))
    assert np.array_equal(gt.instances[0], rect_mask(SIZE, (5, 5, 30, 30)) & ~hole)  # the smaller polygon wins
    assert np.array_equal(gt.ignore, hole)
    assert not gt.instances[0][0:11, 40:61].any()  # the 'flag' polygon is dropped
    short = samples[2].load_gt()  # no imageHeight/Width: the size comes from the image
    assert np.array_equal(short.instances[0], rect_mask(SIZE, (40, 20, 50, 40)))
    with pytest.raises(FormatError, match="no <name>.jpg images"):
        read_reasonseg_folder(tmp_path)


# ---- conversations: several questions about one image in one sequence ----------------------

def test_questions_about_one_image_become_the_turns_of_one_conversation(tmp_path, tiny_model):
    model, tok = tiny_model
    refs = write_refer(tmp_path)
    spec = DatasetSpec(kind="refer", path=str(refs))
    assert len(read_dataset(spec)) == 3  # one sample per sentence
    grouped = read_dataset(spec, max_turns=2)
    assert [s.sample_id for s in grouped] == ["refs(unc).p:0-0+1", "refs(unc).p:1-2"]
    (sample,) = next_samples(MixSampler([(grouped[:1], 1)], 0, shuffle=False), 1, 4, SkipLog())
    assert sample.instruction.endswith("'left box' in the image?")
    assert [t.instruction for t in sample.followups] == ["Can you segment 'the box on the left' in the image?"]
    batch = collate([sample], tok, model.token_ids, model.config, mask_size=32)
    ids = model.token_ids
    row = batch.input_ids[0].tolist()
    assert row.count(ids.seg) == 2 * model.config.num_queries and row.count(ids.image) > 0
    assert len(batch.targets) == 2  # one per phrase, in the order of the query blocks
    labelled = [t for t, label in zip(row, batch.labels[0].tolist()) if label != IGNORE]
    assert labelled.count(ids.im_end) == 2 and labelled.count(ids.ref_start) == 2  # both answers, no question
    out = model(batch.input_ids, batch.attention_mask,
                model.encode_images_vlm(batch.vlm_pixels, batch.grids), model.encode_image_sam(batch.sam_pixels))
    assert out.head.mask_logits.shape[0] == 2  # the model finds both query blocks


def test_an_unusable_later_turn_is_dropped_and_counted(tmp_path):
    path = write_instructsam(tmp_path)
    records = json.loads(path.read_text())
    records[0]["annotation"][1]["text"] = "   "  # the sentence question, now empty
    path.write_text(json.dumps(records))
    sources = read_dataset(DatasetSpec(kind="instructsam", path=str(path), data_root=str(tmp_path)), max_turns=10)
    first = sources[0]
    assert len(first.followups) == 3
    skips = SkipLog()
    (sample,) = next_samples(MixSampler([([first], 1)], 0, shuffle=False), 1, 4, skips)
    assert len(sample.followups) == 2 and skips.counts == {"bad_text": 1}


# ---- mixes ------------------------------------------------------------------------------------

def test_stage_files_point_at_the_release_mixes():
    s1, s2 = load_config(CONFIGS / "stage1.yaml"), load_config(CONFIGS / "stage2.yaml")
    assert s1.data.mix == "" and s1.data.root == "data" and s1.data.max_turns == 10
    repeats = {Path(d.path).name: d.repeat for d in s1.data.train}
    assert len(s1.data.train) == 48 and {d.kind for d in s1.data.train} == {"instructsam"}
    assert (repeats["refcoco.json"], repeats["roborefit.json"], repeats["coco_instances.json"]) == (10, 10, 1)
    repeats = {Path(d.path).name: d.repeat for d in s2.data.train}
    assert repeats == {"reason_seg_cat.json": 10, "roboafford_paco.json": 1, "refcoco.json": 2, "refcoco+.json": 2,
                       "refcocog.json": 2, "grefcoco_single.json": 2, "refclef.json": 2, "lisa_plus_cot.json": 2,
                       "lisa_plus_instance.json": 2, "inst2seg.json": 1}


def test_a_mix_is_read_below_the_data_root(tmp_path):
    write_instructsam(tmp_path / "data")
    (tmp_path / "mix.yaml").write_text("datasets:\n  - {kind: instructsam, path: training/refcoco.json, "
                                       "data_root: ., repeat: 3}\n")
    (tmp_path / "run.yaml").write_text("data: {mix: mix.yaml, root: data}\n")  # relative to the config file
    cfg = load_config(tmp_path / "run.yaml", [f"data.root={tmp_path / 'data'}"])
    (spec,) = cfg.data.train
    sources = read_dataset(spec, cfg.data.root)
    assert spec.repeat == 3 and sources[0].image == tmp_path / "data" / "images" / "0.png"
    assert len(MixSampler([(sources, spec.repeat)], 0)) == 3 * len(sources)


def test_mix_files_are_typed_and_checked(tmp_path):
    bad = tmp_path / "mix.yaml"
    bad.write_text("datasets:\n  - {kind: instructsam, path: a.json, weight: 2}\n")
    with pytest.raises(ConfigError, match=r"mix.yaml: datasets\[0\]: unknown key\(s\) \['weight'\]"):
        load_mix(bad)
    with pytest.raises(ConfigError, match="mix file not found"):
        load_config(CONFIGS / "tiny_stage1.yaml", [f"data.mix={tmp_path / 'none.yaml'}"])


# ---- the sampler under several processes --------------------------------------------------------

def test_processes_share_the_single_process_order_and_resume_each_on_its_own(tmp_path):
    sources = read_dataset(DatasetSpec(kind="instructsam", path=str(write_instructsam(tmp_path)),
                                       data_root=str(tmp_path)))
    n = len(sources)
    single = MixSampler([(sources, 1)], seed=3)
    order = [single.next().sample_id for _ in range(3 * n)]  # three epochs
    ranks = [MixSampler([(sources, 1)], seed=3, rank=r, world_size=2) for r in range(2)]
    drawn = [[s.next().sample_id for _ in range(n)] for s in ranks]  # two epochs between them
    assert drawn[0] == order[0:2 * n:2] and drawn[1] == order[1:2 * n:2]  # every other position, across epochs
    resumed = MixSampler([(sources, 1)], seed=3, rank=1, world_size=2)
    resumed.load_state_dict(ranks[1].state_dict())
    assert [resumed.next().sample_id for _ in range(3)] == order[2 * n + 1:2 * n + 7:2]
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        MixSampler([(sources, 1)], seed=3, rank=2, world_size=2)
