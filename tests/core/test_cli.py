"""The `instructsam segment` command and the procedural sample scenes."""

import json

import numpy as np
import pytest
from PIL import Image

from instructsam_core.cli import main
from instructsam_core.sample_images import tabletop_scene


def test_segment_writes_overlay_and_prints_instances(tiny_checkpoint, tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    Image.fromarray(tabletop_scene(seed=4).image).save(image_path)
    out = tmp_path / "out" / "overlay.png"
    rc = main(["segment", "--checkpoint", str(tiny_checkpoint), "--image", str(image_path),
               "--instruction", "the red mug", "--out", str(out), "--score-threshold", "0",
               "--max-new-tokens", "8"])  # random weights generate freely: keep the budget small
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["untrained"] is False and report["overlay"] == str(out)
    assert report["image_size"] == [240, 320]
    overlay = np.asarray(Image.open(out))
    assert overlay.shape == (240, 320, 3)
    assert not np.array_equal(overlay, tabletop_scene(seed=4).image)


def test_default_is_the_shipped_model_and_says_what_it_knows(tmp_path, capsys):
    rc = main(["segment", "--instruction", "the red mug", "--out", str(tmp_path / "o.png")])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["checkpoint"] == "default" and report["untrained"] is False
    assert "synthetic tabletop world only" in captured.err


def test_the_tiny_model_says_it_is_untrained(tmp_path, capsys):
    rc = main(["segment", "--checkpoint", "tiny", "--instruction", "the pear", "--out", str(tmp_path / "o.png")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["untrained"] is True


def test_bad_image_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["segment", "--image", str(tmp_path / "nope.png"), "--instruction", "x"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["segment", "--image", str(bad), "--instruction", "x"])


def test_empty_instruction_is_a_clear_error():
    with pytest.raises(SystemExit, match="instruction is empty"):
        main(["segment", "--instruction", " "])


def test_sample_scene_is_deterministic_with_exact_object_masks():
    a, b = tabletop_scene(seed=7), tabletop_scene(seed=7)
    np.testing.assert_array_equal(a.image, b.image)
    names = [o.name for o in a.objects]
    assert "tray" in names and "yellow pear" in names and any(n.endswith("mug") for n in names)
    union = np.zeros(a.image.shape[:2], dtype=int)
    for o in a.objects:
        assert o.mask.any()
        union += o.mask
    assert union.max() == 1  # occlusion leaves each pixel to one object


def test_exif_tagged_jpeg_gives_the_same_result_as_its_upright_pixels(tmp_path, capsys):
    from instructsam_core.processing import load_rgb
    from instructsam_core.testing import sideways_jpeg_with_exif

    data, upright = sideways_jpeg_with_exif(tabletop_scene(64, 48, seed=2).image)
    tagged, plain = tmp_path / "portrait.jpg", tmp_path / "upright.png"
    tagged.write_bytes(data)
    Image.fromarray(upright).save(plain)
    np.testing.assert_array_equal(load_rgb(tagged), upright)  # the one image-file reader turns it upright
    reports = []
    for path in (tagged, plain):
        # The untrained fixture: every slot gives a mask at threshold 0, so there is much to compare.
        assert main(["segment", "--checkpoint", "tiny", "--image", str(path), "--instruction", "the red mug",
                     "--score-threshold", "0"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["image_size"] == [48, 64] and reports[0]["instances"]
    assert reports[0]["instances"] == reports[1]["instances"]
