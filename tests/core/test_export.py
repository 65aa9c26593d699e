"""ONNX export of the vision encoder and the head: the command, onnx.checker, and parity
with the PyTorch path on onnxruntime (CPU), at sizes other than the traced ones.

The tiny model is exported once per module (float32) through the CLI; the float16 export
adds the head only (the part with masked attention, where fp16 goes wrong first).
"""

import contextlib
import copy
import io
import json
import shutil

import onnx
import pytest
import torch

from instructsam_core.cli import main
from instructsam_core.export import commands
from instructsam_core.export.graphs import HEAD, PARTS, VISION, ExportLimits, define_graphs
from instructsam_core.export.manifest import MANIFEST_NAME, Manifest, model_hash
from instructsam_core.export.onnx_export import export_onnx
from instructsam_core.export.onnxruntime_runner import OnnxRuntimeRunner
from instructsam_core.export.parity import TOLERANCES, check_parity, parity_cases


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(folder, rc, stdout, stderr) of `instructsam export --checkpoint tiny --check`."""
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    rc, out, err = _run_cli(["export", "--checkpoint", "tiny", "--out", str(folder), "--check"])
    return folder, rc, out, err


def test_export_command_writes_graphs_and_manifest_and_its_check_passes(exported, tiny_model):
    folder, rc, out, err = exported
    assert rc == 0, out + err
    assert sorted(p.name for p in folder.iterdir()) == ["head.onnx", "head.onnx.data", MANIFEST_NAME,
                                                        "vision.onnx", "vision.onnx.data"]
    assert "[1/2] vision: tracing" in err and "[2/2] head: head.onnx written" in err  # progress
    assert "parity passed: 12/12 outputs within tolerance" in out
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["model_hash"] == model_hash(tiny_model[0])  # the fixture's model is the preset's
    assert manifest["source"] == "tiny" and manifest["opset"] == 18 and manifest["dtype"] == "float32"
    assert manifest["exporter"] == "torch.onnx.export(dynamo=True)"
    assert manifest["versions"]["torch"] == torch.__version__
    vision, head = manifest["graphs"]["vision"], manifest["graphs"]["head"]
    assert vision["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 112, 112]}]
    assert [o["shape"] for o in vision["outputs"]] == [["batch", 32, 32, 32], ["batch", 32, 16, 16],
                                                       ["batch", 32, 8, 8]]
    assert {i["name"]: i["shape"] for i in head["inputs"]} == {
        "query_states": ["blocks", 4, 32], "prompt": ["blocks", "prompt_len", 32],
        "prompt_mask": ["blocks", "prompt_len"], "frame_index": ["blocks"],
        "fpn_hidden_states_0": ["frames", 32, 32, 32], "fpn_hidden_states_1": ["frames", 32, 16, 16],
        "fpn_hidden_states_2": ["frames", 32, 8, 8]}
    assert [o["name"] for o in head["outputs"]] == ["mask_logits", "logits", "boxes"]
    assert head["outputs"][0]["shape"] == ["blocks", 4, 32, 32]
    assert head["axes"] == {"frames": {"min": 1, "opt": 1, "max": 8}, "blocks": {"min": 1, "opt": 1, "max": 16},
                            "prompt_len": {"min": 1, "opt": 32, "max": 32}}
    assert head["export_sizes"] == {"frames": 2, "blocks": 3, "prompt_len": 5}


def test_every_graph_passes_onnx_checker_with_its_axes_dynamic(exported):
    folder = exported[0]
    for part in PARTS:
        path = folder / f"{part}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path), load_external_data=False).graph
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        if part == VISION:
            assert dims == {"pixel_values": ["batch", 3, 112, 112]}
        else:
            assert dims["prompt"] == ["blocks", "prompt_len", 32] and dims["fpn_hidden_states_0"][0] == "frames"


def test_graphs_match_pytorch_on_onnxruntime_at_sizes_not_traced(exported, tiny_model):
    folder = exported[0]
    manifest = Manifest.read(folder)
    sizes = {VISION: [{"batch": 1}, {"batch": 5}],
             HEAD: [{"frames": 1, "blocks": 1, "prompt_len": 1}, {"frames": 2, "blocks": 6, "prompt_len": 9}]}
    for part, chosen in sizes.items():  # none of them is what torch.export traced with
        assert manifest.graph(part).export_sizes not in chosen
    report = check_parity(OnnxRuntimeRunner(folder), parity_cases(tiny_model[0], manifest, sizes=sizes, seed=3))
    assert report.passed, report.table()
    assert len(report.rows) == 2 * 3 + 2 * 3
    # Measured on the tiny model: fp32 graphs agree to ~1e-6 of each output's scale.
    assert max(r.max_rel for r in report.rows) < 1e-5, report.table()
    assert all(r.mask_agreement == 1.0 for r in report.rows if r.output == "mask_logits")


def test_parity_fails_when_the_weights_differ(exported, tiny_model):
    """The check can fail: a 2 % change of the query projector's weights fails the head's
    slot logits, and leaves the vision graph passing."""
    folder = exported[0]
    changed = copy.deepcopy(tiny_model[0])
    with torch.no_grad():
        changed.mask_hidden_fcs[0][2].weight.mul_(1.02)
    report = check_parity(OnnxRuntimeRunner(folder), parity_cases(changed, Manifest.read(folder)))
    assert not report.passed
    failed = {(r.part, r.output) for r in report.rows if not r.passed}
    assert ("head", "logits") in failed and not [p for p, _ in failed if p == "vision"]
    assert "FAIL" in report.table() and "parity FAILED" in report.table()


def test_parity_command_compares_the_export_and_writes_json(exported, tiny_checkpoint, tmp_path):
    folder = exported[0]
    report_path = tmp_path / "parity.json"
    # The tiny checkpoint holds the preset's weights: the same model, loaded from files.
    rc, out, err = _run_cli(["parity", "--onnx", str(folder), "--checkpoint", str(tiny_checkpoint),
                             "--parts", "head", "--json", str(report_path)])
    assert rc == 0, out + err
    assert "parity passed: 6/6 outputs within tolerance" in out
    report = json.loads(report_path.read_text())
    assert report["passed"] and {r["part"] for r in report["rows"]} == {"head"}
    assert report["runner"].startswith("onnxruntime") and report["precision"] == "float32"


def test_parity_command_refuses_another_model(exported, tmp_path):
    from instructsam_core.testing import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(SystemExit, match="is not the model .* was exported from"):
        _run_cli(["parity", "--onnx", str(exported[0]), "--checkpoint", str(other)])


def test_a_changed_graph_file_is_refused(exported, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported[0], folder)
    data = folder / "head.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(SystemExit, match="head.onnx.data changed since it was exported"):
        _run_cli(["parity", "--onnx", str(folder)])
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(SystemExit, match="does not exist: export the graphs first"):
        _run_cli(["parity", "--onnx", str(folder)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_parity_on_a_missing_gpu_is_a_clear_error(exported):
    with pytest.raises(SystemExit, match="CUDA is not available on this machine"):
        _run_cli(["parity", "--onnx", str(exported[0]), "--device", "cuda"])


def test_manifest_round_trips_and_names_what_is_missing(exported):
    manifest = Manifest.read(exported[0])
    data = manifest.to_dict()
    assert Manifest.from_dict(json.loads(json.dumps(data))) == manifest
    del data["graphs"]["head"]["axes"]
    with pytest.raises(ValueError, match="missing the field 'axes'"):
        Manifest.from_dict(data)
    with pytest.raises(ValueError, match="holds no 'vision' graph"):
        Manifest.from_dict({**manifest.to_dict(), "graphs": {}}).graph("vision")


def test_float16_head_matches_the_float32_model_within_half_precision(tmp_path, tiny_model):
    folder = tmp_path / "fp16"
    rc, out, err = _run_cli(["export", "--checkpoint", "tiny", "--out", str(folder), "--dtype", "float16",
                             "--parts", "head", "--check"])
    assert rc == 0, out + err
    manifest = Manifest.read(folder)
    assert manifest.dtype == "float16" and list(manifest.graphs) == ["head"]
    assert {i.dtype for i in manifest.graph("head").inputs if i.name != "frame_index"} == {"float16", "bool"}
    assert "tolerances for float16" in out and "parity passed: 6/6" in out
    # Measured: ~1e-3 of scale on the tiny model, well inside the fp16 tolerance.
    report = check_parity(OnnxRuntimeRunner(folder), parity_cases(tiny_model[0], manifest))
    assert max(r.max_rel for r in report.rows) < TOLERANCES["float16"].scale / 4, report.table()


def test_a_model_with_the_presence_token_exports_its_presence_logits(tmp_path):
    from instructsam_core.testing import InstructSamModelTester

    model, _ = InstructSamModelTester(use_presence=True).get_model()
    manifest = export_onnx(model, tmp_path / "presence", parts=[HEAD])
    outputs = manifest.graph(HEAD).outputs
    assert [o.name for o in outputs] == ["mask_logits", "logits", "boxes", "presence_logits"]
    assert outputs[-1].shape == ("blocks", 1)
    report = check_parity(OnnxRuntimeRunner(tmp_path / "presence"), parity_cases(model, manifest))
    assert report.passed and {r.output for r in report.rows} >= {"presence_logits"}, report.table()


def test_a_model_with_the_fusion_options_keeps_them_in_its_checkpoint_and_its_graphs(tmp_path):
    from instructsam_core.build import build_model
    from instructsam_core.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "normed", fusion_output_norm=True, fusion_norm_scope="decoder",
                                fusion_image_skip=True)
    model = build_model(path, device="cpu").model
    assert model.config.fusion_output_norm and model.config.fusion_norm_scope == "decoder"
    assert model.config.fusion_image_skip
    manifest = export_onnx(model, tmp_path / "onnx", parts=[HEAD])
    # The parity cases run the eager head (which applies the norm): a graph without it fails.
    report = check_parity(OnnxRuntimeRunner(tmp_path / "onnx"), parity_cases(model, manifest))
    assert report.passed, report.table()
    plain = copy.deepcopy(model)
    plain.config.fusion_output_norm = False
    assert not check_parity(OnnxRuntimeRunner(tmp_path / "onnx"), parity_cases(plain, manifest)).passed
    every_part = copy.deepcopy(model)  # the norm's scope is in the graph too
    every_part.config.fusion_norm_scope = "all"
    assert not check_parity(OnnxRuntimeRunner(tmp_path / "onnx"), parity_cases(every_part, manifest)).passed
    no_skip = copy.deepcopy(model)  # and the image skip
    no_skip.config.fusion_image_skip = False
    assert not check_parity(OnnxRuntimeRunner(tmp_path / "onnx"), parity_cases(no_skip, manifest)).passed


def test_bad_export_requests_are_clear_errors(exported, tiny_model, tmp_path):
    with pytest.raises(SystemExit, match="opset 17 is too old"):
        _run_cli(["export", "--checkpoint", "tiny", "--out", str(tmp_path / "a"), "--opset", "17"])
    with pytest.raises(SystemExit, match="max_batch must be at least 2"):
        _run_cli(["export", "--checkpoint", "tiny", "--out", str(tmp_path / "a"), "--max-batch", "1"])
    with pytest.raises(SystemExit, match="cannot load checkpoint"):
        _run_cli(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit):  # argparse: exit status 2 with the message on stderr
        _run_cli(["export", "--checkpoint", "tiny", "--out", str(tmp_path / "a"), "--parts", "vision,mask"])
    with pytest.raises(ValueError, match="float32 or float16"):
        export_onnx(copy.deepcopy(tiny_model[0]).to(torch.bfloat16), tmp_path / "b")
    with pytest.raises(ValueError, match="unknown graph part"):
        export_onnx(tiny_model[0], tmp_path / "b", parts=["mask"])
    too_many = {HEAD: [{"frames": 1, "blocks": 17, "prompt_len": 4}]}
    with pytest.raises(ValueError, match="blocks=17 is outside the exported range 1..16"):
        parity_cases(tiny_model[0], Manifest.read(exported[0]), parts=[HEAD], sizes=too_many)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_export_sizes_keep_every_axis_its_own_symbol(tiny_model):
    graphs = define_graphs(tiny_model[0], ExportLimits(max_batch=3, max_blocks=4))
    sizes = graphs[HEAD].export_sizes
    fixed = {d for spec in graphs[HEAD].inputs for d in spec.shape if isinstance(d, int)}
    assert len(set(sizes.values())) == len(sizes) and not set(sizes.values()) & fixed
    assert all(2 <= sizes[name] <= axis.max for name, axis in graphs[HEAD].axes.items())
    with pytest.raises(ValueError, match="cannot pick an example size for axis 'blocks'"):
        define_graphs(tiny_model[0], ExportLimits(max_batch=2, max_blocks=2))


def test_the_cli_names_the_parts_the_graphs_define():
    assert commands.PARTS == PARTS  # the CLI keeps its own copy so that it starts without transformers
