"""The Segmenter: API shape, caching, bad input, results."""

import numpy as np
import pytest
import torch

from instructsam_core.engine import Segmenter
from instructsam_core.sample_images import tabletop_scene


@pytest.fixture()
def image():
    return tabletop_scene(96, 72, seed=1).image


def test_segment_before_set_image_raises(tiny_checkpoint):
    seg = Segmenter.from_pretrained(str(tiny_checkpoint))
    with pytest.raises(RuntimeError, match="call set_image"):
        seg.segment("the mug")


def test_result_is_consistent(tiny_segmenter, image):
    r = tiny_segmenter.segment_image(image, "the red mug", score_threshold=0.0)
    assert len(r) > 0
    assert r.masks.shape == (len(r), 72, 96) and r.masks.dtype == bool
    assert np.all(np.diff(r.scores) <= 0) and np.all((r.scores >= 0) & (r.scores <= 1))
    from instructsam_core.postprocess import masks_to_boxes
    np.testing.assert_array_equal(r.boxes, masks_to_boxes(r.masks))
    assert set(r.phrases) == {"the red mug"} and set(r.phrase_indices) == {0}
    assert set(r.timings) == {"image_encode", "generate", "mask_head", "postprocess", "total"}
    assert r.timings["image_encode"] > 0
    assert r.to_json()["instances"][0]["box_xyxy"] == r.boxes[0].tolist()


def test_cached_frame_matches_fresh_encoding(tiny_checkpoint, image, device):
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device=device, dtype="float32", phrase_mode="instruction")
    fresh = seg.segment_image(image, "the blue mug", key=(1, 0), score_threshold=0.0)
    cached = seg.segment_image(image, "the blue mug", key=(1, 0), score_threshold=0.0)
    assert cached.timings["image_encode"] == 0.0
    np.testing.assert_array_equal(fresh.masks, cached.masks)
    np.testing.assert_array_equal(fresh.scores, cached.scores)


def test_new_key_reencodes(tiny_segmenter, image):
    tiny_segmenter.set_image(image, key="a")
    other = tabletop_scene(96, 72, seed=2).image
    a = tiny_segmenter.segment("the mug", score_threshold=0.0)
    tiny_segmenter.set_image(other, key="b")
    b = tiny_segmenter.segment("the mug", score_threshold=0.0)
    assert b.timings["image_encode"] > 0
    assert not np.array_equal(a.union_mask(), b.union_mask())


def test_threshold_one_gives_no_target(tiny_segmenter, image):
    r = tiny_segmenter.segment_image(image, "the mug", score_threshold=1.0)
    assert len(r) == 0 and r.masks.shape == (0, 72, 96)
    assert r.target_phrases == ["the mug"]  # what was looked for survives an empty answer


@pytest.mark.parametrize("instruction, message", [
    ("", "empty"), ("   ", "empty"), ("x" * 5000, "more than the limit"), (None, "must be a str"),
    ("mug\ud800", "not valid UTF-8"), ("mug\x00", "NUL"),
])
def test_bad_instructions_are_rejected(tiny_segmenter, image, instruction, message):
    tiny_segmenter.set_image(image)
    with pytest.raises(ValueError, match=message):
        tiny_segmenter.segment(instruction)


def test_bad_images_and_thresholds_are_rejected(tiny_segmenter, image):
    with pytest.raises(ValueError, match="uint8"):
        tiny_segmenter.set_image(image.astype(np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        tiny_segmenter.set_image(image[..., 0])
    tiny_segmenter.set_image(image)
    with pytest.raises(ValueError, match="score_threshold"):
        tiny_segmenter.segment("mug", score_threshold=float("nan"))


def test_segment_batch_matches_single_calls(tiny_segmenter, image):
    images = [image, tabletop_scene(64, 48, seed=3).image]
    batch = tiny_segmenter.segment_batch(images, ["the mug", "a pear"], score_threshold=0.0)
    single = [tiny_segmenter.segment_image(im, t, score_threshold=0.0) for im, t in zip(images, ["the mug", "a pear"])]
    for a, b in zip(batch, single):
        np.testing.assert_array_equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="pair 1: instruction is empty"):
        tiny_segmenter.segment_batch(images, ["mug", ""])


def test_segment_batch_encodes_frames_together_and_runs_the_head_once_per_chunk(tiny_checkpoint, monkeypatch):
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), phrase_mode="instruction")
    calls = {"encode": [], "head": []}
    encode, head = seg.backend.encode_frames, seg.backend.segment_phrases
    monkeypatch.setattr(seg.backend, "encode_frames", lambda frames: calls["encode"].append(len(frames)) or encode(frames))
    monkeypatch.setattr(seg.backend, "segment_phrases", lambda answers: calls["head"].append(len(answers)) or head(answers))
    images = [tabletop_scene(64, 48, seed=s).image for s in range(3)]
    results = seg.segment_batch(images, ["the mug", "a pear", "the tray"], score_threshold=0.0, batch_size=2)
    assert calls == {"encode": [2, 1], "head": [2, 1]}
    assert [r.target_phrases for r in results] == [["the mug"], ["a pear"], ["the tray"]]
    assert all(r.timings["image_encode"] > 0 and r.timings["mask_head"] > 0 for r in results)


def test_generate_mode_with_a_scripted_answer(tiny_checkpoint, image):
    from instructsam_core.processing import encode_text
    from instructsam_core.testing import ScriptedAnswer

    seg = Segmenter.from_pretrained(str(tiny_checkpoint))  # phrase_mode "generate"
    ids, tok = seg.model.token_ids, seg.tokenizer
    script = ([ids.ref_start] + encode_text(tok, "red mug") + [ids.ref_end, ids.ref_start]
              + encode_text(tok, "pear") + [ids.ref_end, ids.im_end])
    seg.set_image(image)
    r = seg.segment("the red mug and the pear", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
    assert set(r.phrases) <= {"red mug", "pear"} and len(r) > 0
    assert r.target_phrases == ["red mug", "pear"]
    assert all(r.target_phrases[i] == p for i, p in zip(r.phrase_indices, r.phrases))
    assert "<|object_ref_start|>red mug<|object_ref_end|>" in r.generated_text


def test_untrained_preset_says_so(caplog):
    with caplog.at_level("WARNING"):
        seg = Segmenter.from_pretrained("tiny")
    assert seg.is_untrained and seg.phrase_mode == "instruction"
    assert "UNTRAINED" in caplog.text


def test_unknown_backend_device_and_dtype_are_named(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown backend 'openvino'; available: \\['compiled', 'eager'"):
        Segmenter.from_pretrained(str(tiny_checkpoint), backend="openvino")
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['max_cache'\\] of backend 'compiled'"):
        Segmenter.from_pretrained(str(tiny_checkpoint), backend="compiled", backend_options={"max_cache": 8})
    with pytest.raises(ValueError, match="backend 'eager' takes no options"):
        Segmenter.from_pretrained(str(tiny_checkpoint), backend_options={"cache_dir": "/tmp"})
    with pytest.raises(ValueError, match="unknown dtype"):
        Segmenter.from_pretrained(str(tiny_checkpoint), dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Segmenter.from_pretrained(str(tiny_checkpoint), device="cuda")


def test_bfloat16_on_cpu_runs(tiny_checkpoint, image):
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="bfloat16", phrase_mode="instruction")
    r = seg.segment_image(image, "the mug", score_threshold=0.0)
    assert seg.dtype == torch.bfloat16 and r.masks.shape[1:] == (72, 96)


def test_unknown_engine_option_and_bad_cap_are_named(tiny_checkpoint, image):
    with pytest.raises(ValueError, match="unknown engine option in \\['score_treshold'\\]"):
        Segmenter.from_pretrained(str(tiny_checkpoint), score_treshold=0.3)
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), phrase_mode="instruction", max_new_tokens=8)
    seg.set_image(image)
    with pytest.raises(ValueError, match="max_instances must be >= 1"):
        seg.segment("mug", max_instances=0)
    seg.release()
    with pytest.raises(RuntimeError, match="call set_image"):
        seg.segment("mug")
    with pytest.raises(RuntimeError, match="was released"):
        seg.set_image(image)


def test_an_answer_the_release_cannot_pair_gives_no_instance_and_says_why(tiny_checkpoint, image):
    from instructsam_core.processing import encode_text
    from instructsam_core.testing import ScriptedAnswer

    seg = Segmenter.from_pretrained(str(tiny_checkpoint))
    ids, tok = seg.model.token_ids, seg.tokenizer
    script = [ids.ref_start] + encode_text(tok, "red mug") + [ids.ref_end]
    seg.set_image(image)
    seg.update_config(max_new_tokens=len(script))  # the budget ends on the phrase end
    r = seg.segment("the red mug", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
    assert (r.status, len(r), r.target_phrases) == ("budget_cut", 0, ["red mug"])
    assert r.to_json()["status"] == "budget_cut"
    seg.update_config(max_new_tokens=len(script) + 1)  # one more step runs its query block
    r = seg.segment("the red mug", score_threshold=0.0, logits_processors=[ScriptedAnswer(script + [ids.im_end])])
    assert r.status == "ok" and len(r) > 0
    with pytest.raises(ValueError, match="unknown engine option"):
        seg.update_config(max_new_token=3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        seg.update_config(max_new_tokens=0)


def test_an_answer_is_reused_for_a_fixed_instruction_then_generated_again(tiny_checkpoint, image):
    """Stream mode (phrase_reuse_frames=2): the next two calls with the same instruction
    replay the generated answer on their own frame; the third generates again."""
    from instructsam_core.processing import encode_text
    from instructsam_core.testing import ScriptedAnswer

    plain = Segmenter.from_pretrained(str(tiny_checkpoint), max_new_tokens=6)
    ids, tok = plain.model.token_ids, plain.tokenizer
    script = [ids.ref_start] + encode_text(tok, "red mug") + [ids.ref_end, ids.im_end]
    frames = [image, tabletop_scene(96, 72, seed=2).image]
    expected = [plain.segment_image(f, "the mug", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
                for f in frames]

    seg = Segmenter.from_pretrained(str(tiny_checkpoint), max_new_tokens=6, phrase_reuse_frames=2)
    forced = []
    generate = seg.backend.generate
    seg.backend.generate = lambda *args, **kw: forced.append(args[4] if len(args) > 4 else kw.get("forced_answer")) \
        or generate(*args, **kw)
    first = seg.segment_image(frames[0], "the mug", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
    replays = [seg.segment_image(f, "the mug", score_threshold=0.0) for f in frames]
    seg.segment_image(frames[1], "the mug", score_threshold=0.0)  # uses spent: generated again
    assert forced == [None, script, script, None]  # the answer's choices; the block is re-opened by ref_end
    for result, reference in zip([first, *replays], [expected[0], *expected]):
        assert result.generated_text == reference.generated_text and result.status == "ok"
        np.testing.assert_array_equal(result.masks, reference.masks)
        np.testing.assert_array_equal(result.scores, reference.scores)
    seg.segment_image(frames[0], "the mug", score_threshold=0.0, logits_processors=[ScriptedAnswer(script)])
    seg.update_config(mask_nms_iou=0.7)  # other settings: the remembered answer is dropped
    seg.segment_image(frames[0], "the mug", score_threshold=0.0)
    assert forced[-2:] == [None, None]
    with pytest.raises(ValueError, match="phrase_reuse_frames must be >= 0"):
        seg.update_config(phrase_reuse_frames=-1)


def test_only_whole_query_blocks_fold_into_a_replayable_answer():
    from instructsam_core.engine import _answer_choices
    from instructsam_core.tokens import TokenIds

    ids = TokenIds(seg=9, mask_start=8, mask_end=7, ref_start=5, ref_end=6, im_end=3, eos=(3, 4))
    answer = [5, 1, 6, 8, 9, 9, 7, 2, 5, 1, 6, 8, 9, 9, 7, 3]  # two phrases with K=2 blocks, then the end
    assert _answer_choices(answer, ids, num_queries=2) == [5, 1, 6, 2, 5, 1, 6, 3]
    assert _answer_choices([5, 1, 6, 8, 9, 7, 3], ids, num_queries=2) is None  # a block cut short


def test_instruction_template_puts_a_plain_instruction_in_the_trained_form_once(tiny_checkpoint, image):
    from instructsam_core.engine import apply_template

    template = "Can you segment '{instruction}' in the image?"
    assert apply_template(template, "the red mug") == "Can you segment 'the red mug' in the image?"
    assert apply_template(template, "Can you segment 'the red mug' in the image?") == \
        "Can you segment 'the red mug' in the image?"  # already in the form: as it is
    assert apply_template(None, "the red mug") == "the red mug"  # the release: as given
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), phrase_mode="instruction", instruction_template=template)
    asked = []
    generate = seg._generate
    seg._generate = lambda frame, text, phrase, *rest: asked.append((text, phrase)) or generate(frame, text, phrase, *rest)
    seg.set_image(image)
    seg.segment("  the red mug ")
    assert asked == [("Can you segment 'the red mug' in the image?", "the red mug")]  # the phrase stays the words
    seg.release()
    for bad in ("no slot", "{instruction} and {instruction}"):
        with pytest.raises(ValueError, match="instruction_template must be a str with \\{instruction\\} once"):
            Segmenter.from_pretrained(str(tiny_checkpoint), instruction_template=bad)
