"""The colour-confusion report: an answer's pixels split by the colour of what lies under
them, by hand on a rendered scene and end to end on the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.colour_confusion import TABLE, format_report, main, pixel_shares
from training.tabletop import make_scene


def test_an_answers_pixels_are_split_by_the_colour_under_them():
    scene = make_scene(3, held_out=False)
    first, second = scene.objects[0], scene.objects[1]
    table = ~np.any([o.mask for o in scene.objects], axis=0)
    table_pixels = np.argwhere(table)[:7]  # seven pixels of bare table
    mask = first.mask | second.mask
    mask[tuple(table_pixels.T)] = True
    shares = pixel_shares(mask, scene)
    expected = {first.colour: 0, second.colour: 0}
    expected[first.colour] += int(first.mask.sum())
    expected[second.colour] += int(second.mask.sum())
    assert {k: v for k, v in shares.items() if v} == {**expected, TABLE: 7}
    assert sum(pixel_shares(np.zeros_like(mask), scene).values()) == 0


def test_the_report_runs_the_shipped_model_on_a_written_split(tmp_path, capsys):
    from training.tabletop import write_split

    split = write_split(tmp_path, "heldout", seeds=range(1_000_000, 1_000_006), held_out=True)
    colour_instructions = sum(k == "colour" for r in json.loads(split.read_text()) for k in r["kinds"])
    out = tmp_path / "report.json"
    assert main(["default", str(split), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sum(row["n"] for row in report.values()) == colour_instructions > 0
    for colour, row in report.items():
        assert abs(sum(row["shares"].values()) - 1.0) < 1e-9 and row["pixels"] > 0
        assert list(row["shares"].values()) == sorted(row["shares"].values(), reverse=True)
    printed = capsys.readouterr().out
    assert printed.strip() == format_report(report)
    with pytest.raises(SystemExit):
        main(["default", str(tmp_path / "none.json")])
    assert "none.json not found" in capsys.readouterr().err
