"""Question-file readers and prompt construction, on fixtures in the official formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.eval.masks import DataError, rle_encode
from training.eval.prompts import (
    grefcoco_prompt, inst2seg_prompt, reasonseg_prompt, roborefit_prompt, strip_quotes, template_prompt,
)
from training.eval.grefcoco import read_grefcoco
from training.eval.inst2seg import read_inst2seg
from training.eval.readers import FormatError, resolve_path
from training.eval.reasonseg import read_reasonseg
from training.eval.roborefit import (
    detect_roborefit_format, read_plain, read_roborefit, read_roborefit_official, roborefit_official_file,
)
from training.eval.synthetic import (
    rect_mask, write_grefcoco, write_inst2seg, write_reasonseg, write_roborefit_official, write_roborefit_qa,
)



# --------------------------------------------------------------------------- prompts


def test_roborefit_prompt_follows_the_paper():
    assert roborefit_prompt('"i want to get the large yellow pear"') == (
        "I want to get the large yellow pear. Please output the segmentation mask.")
    assert roborefit_prompt("could you pass the cup") == "Could you pass the cup? Please output the segmentation mask."
    assert roborefit_prompt("Will it rain") .endswith("rain? Please output the segmentation mask.")
    assert roborefit_prompt("Canned beans please").endswith("please. Please output the segmentation mask.")


def test_prompts_are_idempotent():
    for build, text in ((roborefit_prompt, "grab the mug"), (inst2seg_prompt, "all the mugs"),
                        (grefcoco_prompt, "man left")):
        once = build(text)
        assert build(once) == once
    short = reasonseg_prompt("The mug", False)
    assert short == "Please segment the 'the mug' in the image."
    assert reasonseg_prompt(short, False) == short
    assert reasonseg_prompt("What holds coffee?", True) == "What holds coffee? Please output the segmentation mask."


def test_quotes_and_templates():
    assert strip_quotes("  '\u201cthe cup\u201d'  ") == "the cup"
    assert template_prompt("Segment {text}")("'the cup'") == "Segment the cup"
    with pytest.raises(ValueError, match="placeholder"):
        template_prompt("no placeholder")
    with pytest.raises(ValueError, match="empty expression"):
        roborefit_prompt('""')


# --------------------------------------------------------------------------- RoboRefIt


def test_windows_paths_resolve(tmp_path):
    (tmp_path / "final_dataset" / "testA").mkdir(parents=True)
    (tmp_path / "final_dataset" / "testA" / "x.png").write_bytes(b"")
    assert resolve_path(tmp_path, "final_dataset\\testA\\x.png") == tmp_path / "final_dataset" / "testA" / "x.png"
    # the user pointed at final_dataset itself
    fd = tmp_path / "final_dataset"
    assert resolve_path(fd, "final_dataset\\testA\\x.png") == fd / "testA" / "x.png"


def test_official_roborefit_layout_is_read(tmp_path):
    written = write_roborefit_official(tmp_path, "testA", n=3)
    path = roborefit_official_file(tmp_path, "testA")
    assert detect_roborefit_format(path) == "official"
    samples = read_roborefit(path, tmp_path)
    assert [s.sample_id for s in samples] == ["000000", "000001", "000002"]
    s0 = samples[0]
    assert s0.image == written[0].image and s0.image.is_file()
    assert s0.text == "I want to get the red cup"  # quotes stripped
    assert s0.instruction == "I want to get the red cup. Please output the segmentation mask."
    assert samples[1].instruction.startswith("Can you give me the blue bowl?")
    assert s0.group == "scene_0" and samples[1].group == "scene_1"
    gt = s0.load_gt()
    np.testing.assert_array_equal(gt.union, rect_mask(written[0].size, written[0].rects[0]))
    assert gt.box == tuple(float(v) for v in written[0].rects[0])


def test_official_layout_found_from_final_dataset_folder(tmp_path):
    write_roborefit_official(tmp_path, "testB", n=1)
    assert roborefit_official_file(tmp_path / "final_dataset", "testB").is_file()
    with pytest.raises(FormatError, match="no RoboRefIt annotation for split 'testA'"):
        roborefit_official_file(tmp_path, "testA")


def test_mask_folder_holds_one_png_per_instance(tmp_path):
    from PIL import Image
    write_roborefit_official(tmp_path, "testA", n=1)
    path = roborefit_official_file(tmp_path, "testA")
    recs = json.loads(path.read_text())
    folder = tmp_path / "final_dataset" / "testA" / "mask" / "0000000"
    folder.mkdir()
    for k, rect in enumerate([(0, 0, 3, 3), (10, 10, 12, 12)]):
        Image.fromarray(rect_mask((48, 64), rect).astype(np.uint8) * 255).save(folder / f"{k}.png")
    recs[0]["mask_path"] = "final_dataset\\testA\\mask\\0000000"
    path.write_text(json.dumps(recs))
    gt = read_roborefit_official(path, tmp_path)[0].load_gt()
    assert gt.instances.shape == (2, 48, 64) and gt.union.sum() == 16 + 9
    # a mask_path naming 0000000.png where only the folder 0000000/ exists means the folder
    (tmp_path / "final_dataset" / "testA" / "mask" / "0000000.png").unlink()
    recs[0]["mask_path"] = "final_dataset\\testA\\mask\\0000000.png"
    path.write_text(json.dumps(recs))
    assert read_roborefit_official(path, tmp_path)[0].load_gt().instances.shape == (2, 48, 64)


def test_official_eval_qa_form_is_read(tmp_path):
    path, written = write_roborefit_qa(tmp_path, n=2)
    assert detect_roborefit_format(path) == "qa"
    samples = read_roborefit(path, tmp_path)
    assert samples[1].image == written[1].image
    assert samples[0].instruction == "I want to get the green apple. Please output the segmentation mask."
    np.testing.assert_array_equal(samples[1].load_gt().union, rect_mask((48, 64), written[1].rects[0]))


def test_plain_jsonl_with_png_rle_and_missing_masks(tmp_path):
    from PIL import Image
    Image.fromarray(rect_mask((4, 6), (1, 1, 2, 2)).astype(np.uint8)).save(tmp_path / "m.png")
    lines = [
        {"image": "a.png", "text": "'the cup'", "mask": "m.png", "scene": "kitchen"},
        {"id": "b", "image": "b.png", "text": "the bowl", "mask": rle_encode(np.ones((4, 6), bool))},
        {"image": "c.png", "text": "the plate"},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert detect_roborefit_format(path) == "plain"
    s = read_plain(path, tmp_path)
    assert [x.sample_id for x in s] == ["000000", "b", "000002"]
    assert s[0].text == "the cup" and s[0].group == "kitchen"
    assert s[0].load_gt().union.sum() == 4
    assert s[1].load_gt().union.all()
    assert s[2].load_gt is None  # predict-only


def test_plain_duplicate_ids_are_rejected(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"id": 1, "image": "a", "text": "x"}, {"id": 1, "image": "b", "text": "y"}]))
    with pytest.raises(FormatError, match="duplicate id"):
        read_plain(path, tmp_path)


def test_bad_question_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FormatError, match="question file not found"):
        read_roborefit(tmp_path / "none.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json\n")
    with pytest.raises(FormatError, match="neither a JSON document nor JSON lines"):
        read_roborefit(bad, tmp_path)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(FormatError, match="unknown RoboRefIt question format"):
        read_roborefit(odd, tmp_path)


def test_real_example_folder_is_read_as_frames(roborefit_example):
    (s,) = read_roborefit(roborefit_example)
    assert s.sample_id == "0003000" and s.load_gt is None
    assert s.instruction == "I want to get the large yellow pear. Please output the segmentation mask."


# --------------------------------------------------------------------------- other benchmarks


def test_inst2seg_reads_one_query_per_annotation(tmp_path):
    path = write_inst2seg(tmp_path)
    s = read_inst2seg(path, tmp_path)
    assert len(s) == 6 and s[0].sample_id == "000000-0" and s[5].sample_id == "000001-2"
    assert s[0].instruction == "the top-left box Please output the segmentation mask."
    assert [len(x.load_gt().instances) for x in s[:3]] == [1, 2, 0]
    assert s[2].load_gt().size == (48, 64)


def test_reasonseg_groups_and_ignore_mask(tmp_path):
    path = write_reasonseg(tmp_path)
    long_, short = read_reasonseg(path, tmp_path)
    assert (long_.group, short.group) == ("long", "short")
    assert short.instruction == "Please segment the 'the mug' in the image."
    assert long_.load_gt().ignore is None
    assert short.load_gt().ignore.sum() == 11 * 11


def test_grefcoco_finds_coco_images_and_no_target_queries(tmp_path):
    path = write_grefcoco(tmp_path)
    two, none = read_grefcoco(path, tmp_path)
    assert two.image == tmp_path / "coco" / "val2017" / "000000000001.png"
    assert two.instruction == "Can you segment 'the two boxes' in the image?"
    assert len(two.load_gt().instances) == 2 and len(none.load_gt().instances) == 0


def test_grefcoco_mismatched_lists_are_rejected(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps([{"image": "x", "height": 2, "width": 2, "cat": ["a", "b"], "masks": [[]]}]))
    with pytest.raises(FormatError, match="2 expressions but 1 mask entries"):
        read_grefcoco(path, tmp_path)


def test_gt_size_mismatch_in_rle_is_a_data_error(tmp_path):
    path = tmp_path / "i.json"
    path.write_text(json.dumps([{"image": "x.png", "height": 5, "width": 5,
                                 "annotation": [{"text": "a", "mask": rle_encode(np.ones((4, 4), bool))}]}]))
    (s,) = read_inst2seg(path, tmp_path)
    with pytest.raises(DataError, match="GT mask is 4x4 but the image is 5x5"):
        s.load_gt()


def test_reasonseg_png_gt_ignores_255(tmp_path):
    from PIL import Image
    Image.fromarray(np.array([[0, 1, 255, 1]], np.uint8)).save(tmp_path / "m.png")
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"image": "x.png", "question": "the cup", "is_sentence": False, "mask": "m.png"}]))
    gt = read_reasonseg(path, tmp_path)[0].load_gt()
    np.testing.assert_array_equal(gt.union, [[False, True, False, True]])
    np.testing.assert_array_equal(gt.ignore, [[False, False, True, False]])


def test_reasonseg_binary_0_255_png_is_foreground_not_ignored(tmp_path):
    from PIL import Image
    Image.fromarray(np.array([[0, 255, 255, 0]], np.uint8)).save(tmp_path / "m.png")
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"image": "x.png", "question": "the cup", "is_sentence": False, "mask": "m.png"}]))
    gt = read_reasonseg(path, tmp_path)[0].load_gt()
    np.testing.assert_array_equal(gt.union, [[False, True, True, False]])
    assert gt.ignore is None or not gt.ignore.any()


def test_qa_duplicate_ids_are_rejected(tmp_path):
    path, _ = write_roborefit_qa(tmp_path, n=2)
    recs = json.loads(path.read_text())
    recs[0]["id"] = recs[1]["id"] = "same"
    path.write_text(json.dumps(recs))
    with pytest.raises(FormatError, match=r"\[1\]: duplicate id 'same'"):
        read_roborefit(path, tmp_path)


def test_plain_masks_list_of_pngs_and_rles_is_one_gt(tmp_path):
    from PIL import Image
    a, b = rect_mask((4, 6), (0, 0, 1, 1)), rect_mask((4, 6), (4, 2, 5, 3))
    Image.fromarray(a.astype(np.uint8) * 255).save(tmp_path / "a.png")
    Image.fromarray(b.astype(np.uint8) * 255).save(tmp_path / "b.png")
    recs = [
        {"image": "x.png", "text": "both", "masks": ["a.png", "b.png"]},
        {"image": "x.png", "text": "both rle", "masks": [rle_encode(a), rle_encode(b)]},
        {"image": "x.png", "text": "one", "masks": "a.png"},
        {"image": "x.png", "text": "none", "masks": [], "height": 4, "width": 6},
    ]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(recs))
    assert detect_roborefit_format(path) == "plain"
    s = read_roborefit(path, tmp_path)
    for x in s[:2]:
        assert x.load_gt is not None  # not silently predict-only
        gt = x.load_gt()
        assert gt.instances.shape == (2, 4, 6)
        np.testing.assert_array_equal(gt.union, a | b)
    np.testing.assert_array_equal(s[2].load_gt().union, a)
    none = s[3].load_gt()
    assert none.instances.shape == (0, 4, 6) and none.size == (4, 6)  # no target
    path.write_text(json.dumps([{"image": "x.png", "text": "t", "mask": "a.png", "masks": ["b.png"]}]))
    with pytest.raises(FormatError, match="both 'mask' and 'masks'"):
        read_plain(path, tmp_path)


def test_empty_expression_fails_only_its_sample_at_read_time(tmp_path):
    lines = [{"image": "a.png", "text": "the cup"}, {"image": "b.png", "text": "  ''  "}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    ok, empty = read_plain(path, tmp_path)
    assert ok.error is None and ok.instruction.startswith("The cup.")
    assert empty.error == "empty expression text" and empty.instruction == ""
    inst = tmp_path / "i.json"
    inst.write_text(json.dumps([{"image": "x.png", "height": 2, "width": 2,
                                 "annotation": [{"text": ""}, {"text": "a"}]}]))
    assert [x.error for x in read_inst2seg(inst, tmp_path)] == ["empty expression text", None]
