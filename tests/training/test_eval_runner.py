"""The benchmark runner and summaries with a fast stub predictor: resume, sharding,
limit, bad data, predict-only records, strata. (The real engine runs in test_eval_e2e.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.metrics import GRES_IOU, LISA_IOU, mask_iou
from instructsam_core.result import Result
from training.eval import inst2seg, reasonseg, roborefit
from training.eval.inst2seg import read_inst2seg
from training.eval.reasonseg import read_reasonseg
from training.eval.roborefit import read_plain, read_roborefit, roborefit_official_file
from training.eval.runner import RunConfig, parse_shard, read_log, read_split_logs, run_split, select
from training.eval.summary import latency_stats, markdown_table, run_info, summarize_split
from training.eval.synthetic import rect_mask, write_inst2seg, write_reasonseg, write_roborefit_official


class StubPredictor:
    """Predicts one fixed rectangle on any image; raises for instructions containing 'boom'."""

    device = "cpu"
    dtype = "float32"
    checkpoint = "stub"
    is_untrained = False

    def __init__(self, rect=(0, 0, 21, 16)):
        self.rect = rect
        self.calls: list[str] = []

    def segment_image(self, image, instruction, key=None, *, score_threshold=0.5, output_size=None):
        self.calls.append(instruction)
        if "boom" in instruction.lower():
            raise RuntimeError("boom")
        h, w = output_size or image.shape[:2]
        m = rect_mask((h, w), self.rect)
        return Result(masks=m[None], scores=np.array([0.9], np.float32),
                      boxes=np.array([self.rect], np.int64), phrases=["x"],
                      phrase_indices=np.zeros(1, np.int64), slots=np.zeros(1, np.int64),
                      image_size=(h, w), timings={"total": 0.001})


def _cfg(tmp_path: Path, **kw) -> RunConfig:
    return RunConfig(split_dir=tmp_path / "out" / "testA", progress=False, **kw)


def _summary(spec, cfg, samples, limit=None):
    recs = read_split_logs(cfg.split_dir)
    expected = [s.sample_id for s in select(samples, limit)]
    return summarize_split(spec, cfg.split_dir.name, recs, expected, run_info(StubPredictor()), {})


@pytest.fixture
def official(tmp_path):
    written = write_roborefit_official(tmp_path, "testA", n=4)
    samples = read_roborefit(roborefit_official_file(tmp_path, "testA"), tmp_path)
    return written, samples


def test_roborefit_summary_matches_hand_computed_ious(tmp_path, official):
    written, samples = official
    cfg = _cfg(tmp_path)
    stats = run_split(StubPredictor(), samples, cfg)
    assert (stats.selected, stats.ran, stats.failed) == (4, 4, 0)
    s = _summary(roborefit.SPEC, cfg, samples)
    pred = rect_mask((48, 64), (0, 0, 21, 16))
    ious = [mask_iou(pred, rect_mask(w.size, w.rects[0])).iou for w in written]
    assert ious[0] == pytest.approx(1.0, abs=1e-9)
    m = s["metrics"]
    assert m["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert m["p@0.5"] == np.mean(np.array(ious) >= 0.5)
    assert s["n"] == 4 and s["failures"] == 0 and s["complete"]
    assert set(s["groups"]) == {"scene_0", "scene_1"}
    assert s["groups"]["scene_0"]["metrics"]["miou"] == pytest.approx((ious[0] + ious[2]) / 2, abs=1e-12)
    assert s["paper"] == {"miou": 82.5}
    table = markdown_table([s], {"roborefit": roborefit.SPEC})
    assert "| RoboRefIt | testA | mask mIoU (%) |" in table and "| 82.5 |" in table


def test_rerun_skips_done_samples_and_limit_extends(tmp_path, official):
    _, samples = official
    cfg = _cfg(tmp_path, limit=2)
    run_split(StubPredictor(), samples, cfg)
    cfg.limit = None
    again = StubPredictor()
    stats = run_split(again, samples, cfg)
    assert (stats.skipped, stats.ran) == (2, 2) and len(again.calls) == 2
    assert [r["id"] for r in read_log(cfg.split_dir / "samples.jsonl")] == ["000000", "000001", "000002", "000003"]


def test_torn_last_line_is_dropped_and_that_sample_reruns(tmp_path, official):
    _, samples = official
    cfg = _cfg(tmp_path, limit=2)
    run_split(StubPredictor(), samples, cfg)
    log = cfg.split_dir / "samples.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # crash mid-write
    assert [r["id"] for r in read_log(log)] == ["000000"]  # reading alone leaves the file as is
    assert not log.read_text().endswith("\n")
    again = StubPredictor()
    run_split(again, samples, cfg)
    assert len(again.calls) == 1
    assert [r["id"] for r in read_log(log)] == ["000000", "000001"]


def test_corrupt_line_inside_the_log_raises(tmp_path):
    log = tmp_path / "samples.jsonl"
    log.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="samples.jsonl:2: corrupt line"):
        read_log(log)


def test_shards_partition_the_split_and_merge_into_one_summary(tmp_path, official):
    _, samples = official
    full = _cfg(tmp_path)
    run_split(StubPredictor(), samples, full)
    whole = _summary(roborefit.SPEC, full, samples)
    sharded = RunConfig(split_dir=tmp_path / "sharded" / "testA", progress=False, shard=(0, 3))
    run_split(StubPredictor(), samples, sharded)
    partial = _summary(roborefit.SPEC, sharded, samples)
    assert not partial["complete"] and partial["n_done"] == 1
    for k in (1, 2):
        sharded.shard = (k, 3)
        run_split(StubPredictor(), samples, sharded)
    merged = _summary(roborefit.SPEC, sharded, samples)
    assert merged["complete"] and merged["metrics"] == whole["metrics"]
    assert len(list(sharded.split_dir.glob("samples.shard-*-of-3.jsonl"))) == 3


def test_shard_and_limit_selection():
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError, match="0-based"):
        parse_shard("4/4")
    with pytest.raises(ValueError, match="k/n"):
        parse_shard("two")
    items = list(range(10))
    parts = [select(items, 7, (k, 3)) for k in range(3)]
    assert sum(parts, []) == list(range(7)) and [len(p) for p in parts] == [2, 2, 3]


def test_bad_data_fails_the_sample_and_the_run_goes_on(tmp_path, official):
    written, samples = official
    base = tmp_path / "final_dataset" / "testA"
    (base / "image" / "0000001.png").unlink()  # missing image
    (base / "mask" / "0000002.png").write_bytes(b"garbage")  # unreadable PNG
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(base / "mask" / "0000003.png")  # sized otherwise
    cfg = _cfg(tmp_path)
    stats = run_split(StubPredictor(), samples, cfg)
    assert (stats.ran, stats.failed) == (4, 2)
    s = _summary(roborefit.SPEC, cfg, samples)
    reasons = {f["id"]: f["reason"] for f in s["failed_samples"]}
    assert "image not found" in reasons["000001"]
    assert "unreadable mask image" in reasons["000002"]
    # a GT sized otherwise than the image: the prediction is made at the GT's size, as the
    # release does, and counted
    assert s["resized_to_gt"] == 1 and s["n"] == 4 and s["failures"] == 2
    record = read_split_logs(cfg.split_dir)["000003"]
    assert record["resized_to_gt"] == {"image": [48, 64], "gt": [10, 10]} and record["status"] == "ok"
    assert s["metrics"]["miou"] == pytest.approx(1.0 / 4, abs=1e-9)  # failures score 0 and count


def test_engine_errors_fail_the_sample_and_retry_failed_reruns_them(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "m.png")
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"image": "a.png", "text": "boom the cup", "mask": "m.png"}]))
    samples = read_plain(path, tmp_path)
    cfg = _cfg(tmp_path)
    run_split(StubPredictor(), samples, cfg)
    (rec,) = read_log(cfg.split_dir / "samples.jsonl")
    assert rec["status"] == "failed" and rec["reason"] == "engine error: RuntimeError: boom"
    again = StubPredictor()
    run_split(again, samples, cfg)
    assert again.calls == []  # a failure is done unless asked to retry
    cfg.retry_failed = True
    run_split(again, samples, cfg)
    assert len(again.calls) == 1


def test_records_without_gt_run_predict_only(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / name)
    Image.fromarray(rect_mask((24, 32), (0, 0, 21, 16)).astype(np.uint8)).save(tmp_path / "m.png")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "x", "mask": "m.png"}) + "\n"
                    + json.dumps({"image": "b.png", "text": "y"}) + "\n")
    samples = read_plain(path, tmp_path)
    cfg = _cfg(tmp_path, save_masks=True)
    run_split(StubPredictor(), samples, cfg)
    s = _summary(roborefit.SPEC, cfg, samples)
    assert s["n"] == 1 and s["n_predict_only"] == 1 and s["failures"] == 0
    assert s["metrics"]["miou"] == pytest.approx(1.0, abs=1e-9)
    recs = read_split_logs(cfg.split_dir)
    assert recs["000001"]["status"] == "predict_only" and recs["000001"]["n_pred"] == 1
    label = np.asarray(Image.open(cfg.split_dir / recs["000001"]["mask_png"]))
    assert label.shape == (24, 32) and label[0, 0] == 1


def test_only_predict_only_records_give_no_metrics(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"image": "a.png", "text": "x"}]))
    samples = read_plain(path, tmp_path)
    cfg = _cfg(tmp_path)
    run_split(StubPredictor(), samples, cfg)
    s = _summary(roborefit.SPEC, cfg, samples)
    assert s["metrics"] is None and s["n"] == 0
    assert "| n/a | 82.5 | 0 | 0 |" in markdown_table([s], {"roborefit": roborefit.SPEC})


def test_latency_excludes_warmup():
    recs = [{"latency_s": 10.0, "warmup": True}] + [{"latency_s": float(v), "warmup": False} for v in range(1, 101)]
    lat = latency_stats(recs)
    assert lat["n_timed"] == 100 and lat["mean"] == pytest.approx(50.5)
    assert lat["p50"] == pytest.approx(50.5) and lat["p99"] == pytest.approx(99.01)
    assert latency_stats([{"latency_s": 1.0, "warmup": True}]) is None


def test_inst2seg_strata_and_instance_map(tmp_path):
    path = write_inst2seg(tmp_path)
    samples = read_inst2seg(path, tmp_path)
    cfg = RunConfig(split_dir=tmp_path / "out" / "inst2seg", progress=False, iou=GRES_IOU,
                    instance_ious=True, warmup=0)
    run_split(StubPredictor(rect=(2, 2, 12, 12)), samples, cfg)
    s = _summary(inst2seg.SPEC, cfg, samples)
    m = s["metrics"]
    # every query scores 0.9 (ties keep input order): TP, TP, FP per image, 6 GT instances.
    # rec 1/6 2/6 2/6 3/6 4/6 4/6, prec 1 1 2/3 3/4 4/5 4/6 -> AP = (1 + 1 + .8 + .8) / 6 = 0.6
    # at every threshold (IoUs are 1 or 0)
    assert m["AP50"] == pytest.approx(0.6, abs=1e-12) and m["AP75"] == m["AP50"]
    assert m["mAP"] == pytest.approx(0.6, abs=1e-12)
    assert m["num_gt"] == 6 and m["num_pred"] == 6
    assert m["giou"] == pytest.approx((1 + 121 / 377 + 0) / 3, abs=1e-9)
    assert set(s["groups"]) == {"single", "multi", "no-target"}
    assert s["groups"]["single"]["metrics"]["giou"] == pytest.approx(1.0, abs=1e-9)
    assert s["groups"]["no-target"]["metrics"]["n_acc"] == 0.0
    assert s["groups"]["no-target"]["metrics"]["mAP"] == 0.0  # no GT at all
    assert s["latency_s"]["n_timed"] == 6


def test_reasonseg_reports_short_and_long(tmp_path):
    path = write_reasonseg(tmp_path)
    samples = read_reasonseg(path, tmp_path)
    cfg = RunConfig(split_dir=tmp_path / "out" / "reason_seg_val", progress=False, iou=reasonseg.SPEC.iou)
    assert cfg.iou is LISA_IOU
    run_split(StubPredictor(rect=(5, 5, 20, 20)), samples, cfg)
    s = _summary(reasonseg.SPEC, cfg, samples)
    assert set(s["groups"]) == {"long", "short"}
    assert s["metrics"]["giou"] == pytest.approx(1.0, abs=1e-6)  # I / (U + 1e-5) for a perfect mask
    assert s["paper"] == {"giou": 62.5, "ciou": 65.0}


def test_cli_reports_bad_question_files_without_loading_a_model(tmp_path, capsys):
    code = roborefit.main(["--checkpoint", "tiny", "--output-dir", str(tmp_path / "o"),
                           "--question-file", str(tmp_path / "missing.json")])
    assert code == 2
    assert "question file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        roborefit.main(["--checkpoint", "tiny", "--output-dir", str(tmp_path / "o"), "--shard", "2/2",
                        "--data-root", str(tmp_path)])
    assert "0-based" in capsys.readouterr().err


class FlakyPredictor(StubPredictor):
    """Fails every query while `failing` is set."""

    failing = True

    def segment_image(self, image, instruction, key=None, *, score_threshold=0.5, output_size=None):
        if self.failing:
            self.calls.append(instruction)
            raise RuntimeError("cuda out of memory")
        return super().segment_image(image, instruction, key, score_threshold=score_threshold,
                                     output_size=output_size)


def test_unsharded_retry_success_beats_older_failure_in_a_later_sorting_shard_log(tmp_path, official):
    _, samples = official
    cfg = _cfg(tmp_path, shard=(1, 2))
    bad = FlakyPredictor()
    stats = run_split(bad, samples, cfg)
    assert (stats.ran, stats.failed) == (2, 2)
    # samples.jsonl sorts before samples.shard-1-of-2.jsonl: file order would keep the failures
    assert sorted(p.name for p in cfg.split_dir.glob("samples*.jsonl")) == ["samples.shard-1-of-2.jsonl"]
    good = FlakyPredictor()
    good.failing = False
    cfg.shard, cfg.retry_failed = None, True
    stats = run_split(good, samples, cfg)
    assert (stats.selected, stats.skipped, stats.ran, stats.failed) == (4, 0, 4, 0)
    recs = read_split_logs(cfg.split_dir)
    assert {r["status"] for r in recs.values()} == {"ok"}
    s = _summary(roborefit.SPEC, cfg, samples)
    assert s["failures"] == 0 and s["failed_samples"] == [] and s["complete"]
    assert s["metrics"]["failures"] == 0
    again = FlakyPredictor()
    stats = run_split(again, samples, cfg)  # retry_failed still on: nothing failed is left
    assert (stats.skipped, stats.ran) == (4, 0) and again.calls == []


def test_every_logged_record_has_an_increasing_sequence_stamp(tmp_path, official):
    _, samples = official
    cfg = _cfg(tmp_path)
    run_split(StubPredictor(), samples, cfg)
    stamps = [r["logged_ns"] for r in read_log(cfg.split_dir / "samples.jsonl")]
    assert len(stamps) == 4 and all(isinstance(v, int) for v in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == 4


def test_legacy_records_without_stamp_load_ok_beats_failed_and_stamped_beats_legacy(tmp_path):
    d = tmp_path / "split"
    d.mkdir()
    (d / "samples.jsonl").write_text(
        json.dumps({"id": "a", "status": "ok"}) + "\n" + json.dumps({"id": "b", "status": "failed"}) + "\n"
        + json.dumps({"id": "c", "status": "failed"}) + "\n")
    (d / "samples.shard-1-of-2.jsonl").write_text(
        json.dumps({"id": "a", "status": "failed"}) + "\n" + json.dumps({"id": "b", "status": "ok"}) + "\n"
        + json.dumps({"id": "c", "status": "failed", "logged_ns": 5}) + "\n")
    (d / "samples.shard-0-of-2.jsonl").write_text(json.dumps({"id": "c", "status": "ok", "logged_ns": 7}) + "\n")
    recs = read_split_logs(d)
    assert {k: r["status"] for k, r in recs.items()} == {"a": "ok", "b": "ok", "c": "ok"}
    assert recs["c"]["logged_ns"] == 7
    # the newest stamp wins even when it is a failure
    (d / "samples.shard-0-of-2.jsonl").write_text(json.dumps({"id": "c", "status": "failed", "logged_ns": 9}) + "\n")
    assert read_split_logs(d)["c"]["logged_ns"] == 9


def test_failed_no_target_sample_counts_against_n_acc(tmp_path):
    path = write_inst2seg(tmp_path)
    recs = json.loads(path.read_text())
    recs[0]["annotation"][2]["text"] = "boom the purple elephant"  # a no-target query whose engine call fails
    path.write_text(json.dumps(recs))
    samples = read_inst2seg(path, tmp_path)
    cfg = RunConfig(split_dir=tmp_path / "out" / "inst2seg", progress=False, iou=GRES_IOU,
                    instance_ious=True, warmup=0)
    run_split(StubPredictor(rect=(2, 2, 12, 12)), samples, cfg)
    s = _summary(inst2seg.SPEC, cfg, samples)
    nt = s["groups"]["no-target"]["metrics"]
    assert nt["n"] == 2 and nt["failures"] == 1
    assert nt["n_acc"] == 0.0  # stub predicts a mask (FN) and the failure is FN too, not a no-target hit
    assert nt["empty_pred_rate"] == 0.0  # over the one no-target sample that ran


def test_empty_expression_fails_its_sample_and_the_run_goes_on(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / name)
    Image.fromarray(rect_mask((24, 32), (0, 0, 21, 16)).astype(np.uint8)).save(tmp_path / "m.png")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "", "mask": "m.png"}) + "\n"
                    + json.dumps({"image": "b.png", "text": "the cup", "mask": "m.png"}) + "\n")
    samples = read_plain(path, tmp_path)
    cfg = _cfg(tmp_path)
    pred = StubPredictor()
    stats = run_split(pred, samples, cfg)
    assert (stats.ran, stats.failed) == (2, 1) and len(pred.calls) == 1
    recs = read_split_logs(cfg.split_dir)
    assert recs["000000"]["status"] == "failed"
    assert recs["000000"]["reason"] == "bad data: empty expression text"
    assert recs["000000"]["scores"]["iou"] == 0.0 and recs["000000"]["scores"]["union"] == 22 * 17
    s = _summary(roborefit.SPEC, cfg, samples)
    assert s["n"] == 2 and s["failures"] == 1
    assert s["metrics"]["miou"] == pytest.approx(0.5, abs=1e-9)


def test_cli_runs_past_an_empty_expression(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"image": "a.png", "text": ""}, {"image": "a.png", "text": "x"}]))
    code = roborefit.main(["--output-dir", str(tmp_path / "o"), "--question-file", str(path),
                           "--summarize-only", "--no-progress"])
    assert code == 0  # reading the file no longer aborts on the empty expression
