"""Checkpoints: released key layout, save -> load, strict errors, base models."""

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from instructsam_core.build import build_model
from instructsam_core.checkpoint import (CheckpointError, config_from_json, from_released_key, released_state_dict,
                                         save_checkpoint, to_released_key)
from instructsam_core.config import preset
from instructsam_core.model.instructsam import InstructSam
from instructsam_core.tokens import TokenIds

FIXTURE = Path(__file__).parent / "fixtures" / "released_key_patterns.txt"


def load_checkpoint(path, **kwargs):
    built = build_model(path, device="cpu", **kwargs)
    assert not built.untrained
    return built.model, built.tokenizer


def _patterns(keys):
    return {re.sub(r"\.\d+\.", ".{N}.", re.sub(r"\.\d+\.", ".{N}.", k)) for k in keys}


def _golden():
    return {line.strip() for line in FIXTURE.read_text().splitlines() if line.strip() and not line.startswith("#")}


def test_tiny_key_set_maps_one_to_one_onto_the_released_layout(tiny_model):
    model, _ = tiny_model
    keys = set(released_state_dict(model))
    # The tiny model ties lm_head to the embeddings, so the file leaves it out.
    assert _patterns(keys) | {"lm_head.weight"} == _golden()
    assert all(from_released_key(to_released_key(k)) == k for k in model.state_dict())


def test_real_size_2b_key_set_matches_the_release():
    with torch.device("meta"):
        model = InstructSam(preset("2b"), TokenIds(seg=151670, mask_start=151671, mask_end=151672))
    keys = set(released_state_dict(model)) | {"lm_head.weight"}
    assert len(keys) == 1705
    assert _patterns(keys) == _golden()
    assert model.mask_queries.shape == (10, 2048)
    assert model.grounding_model.detr_decoder.query_embed.weight.shape == (10, 256)


def test_save_then_load_gives_identical_outputs(tiny_segmenter, tiny_checkpoint, tmp_path):
    from instructsam_core.engine import Segmenter

    image = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    before = tiny_segmenter.segment_image(image, "the mug", score_threshold=0.0)
    out = save_checkpoint(tiny_segmenter.model, tiny_segmenter.tokenizer, tmp_path / "copy")
    after = Segmenter.from_pretrained(str(out), phrase_mode="instruction").segment_image(
        image, "the mug", score_threshold=0.0)
    assert len(before) > 0
    np.testing.assert_array_equal(before.masks, after.masks)
    np.testing.assert_array_equal(before.scores, after.scores)
    a = load_file(str(tiny_checkpoint / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_loads(tiny_model, tmp_path):
    model, tok = tiny_model
    out = save_checkpoint(model, tok, tmp_path / "sharded", max_shard_bytes=4 * 1024 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded, _ = load_checkpoint(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_config_json_is_the_released_layout(tiny_checkpoint):
    data = json.loads((tiny_checkpoint / "config.json").read_text())
    assert data["max_seg_nums"] == 4 and data["out_dim"] == 32
    assert data["seg_encoder"] == data["seg_decoder"] == "sam3"
    assert data["seg_token_index"] == 151670
    assert data["model_type"] == "qwen3_vl" and "text_config" in data and "vision_config" in data


def test_released_config_reads_sam3_config_from_mask_decoder_model(tiny_checkpoint, tmp_path):
    data = json.loads((tiny_checkpoint / "config.json").read_text())
    sam3 = data.pop("sam3_config")
    data.pop("instructsam")
    sam_dir = tmp_path / "sam3"
    sam_dir.mkdir()
    (sam_dir / "config.json").write_text(json.dumps({"model_type": "sam3_video", "detector_config": sam3}))
    data["mask_decoder_model"] = str(sam_dir)
    config = config_from_json(data, "config.json")
    assert config.sam3 == sam3 and config.num_queries == 4
    data["mask_decoder_model"] = "/nonexistent/sam3"  # the author's path: fall back to SAM3's default
    assert config_from_json(data, "config.json").sam3 == {}


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(ckpt: Path, edit) -> None:
    state = load_file(str(ckpt / "model.safetensors"))
    edit(state)
    save_file(state, str(ckpt / "model.safetensors"))


def test_missing_key_is_named(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    _rewrite_weights(ckpt, lambda s: s.pop("model.mask_queries"))
    with pytest.raises(CheckpointError, match="1 missing keys.*model.mask_queries"):
        load_checkpoint(ckpt)


def test_unexpected_key_is_named(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    _rewrite_weights(ckpt, lambda s: s.update({"model.grounding_model.model.detr_decoder.presence_token.weight":
                                                torch.zeros(1, 32)}))
    with pytest.raises(CheckpointError, match="unexpected keys.*model.safetensors:model.grounding_model.model."
                                              "detr_decoder.presence_token.weight"):
        load_checkpoint(ckpt)


def test_shape_mismatch_names_file_and_key(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    _rewrite_weights(ckpt, lambda s: s.update({"model.mask_queries": torch.zeros(5, 32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.mask_queries has shape \(5, 32\)"):
        load_checkpoint(ckpt)


def test_missing_files_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are refused"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(ckpt)


def test_a_plain_qwen_config_is_not_taken_for_instructsam(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(CheckpointError, match="not an InstructSAM checkpoint"):
        load_checkpoint(tmp_path)


def test_separately_trained_lm_head_is_untied_on_load(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    head = torch.randn(preset("tiny").vlm["text_config"]["vocab_size"], 32)
    _rewrite_weights(ckpt, lambda s: s.update({"lm_head.weight": head}))
    model, _ = load_checkpoint(ckpt)
    assert torch.equal(model.vlm.lm_head.weight, head)
    assert not torch.equal(model.vlm.model.language_model.embed_tokens.weight, head)


def test_save_is_atomic_over_an_existing_checkpoint(tiny_model, tmp_path):
    model, tok = tiny_model
    target = save_checkpoint(model, tok, tmp_path / "ck")
    save_checkpoint(model, tok, target)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or backup folders left
    with safe_open(str(target / "model.safetensors"), framework="pt") as f:
        assert "model.mask_queries" in f.keys()


def test_saved_checkpoint_has_the_umasks_modes_not_owner_only_ones(tiny_model, tmp_path):
    # mkdtemp makes 0700 folders and safetensors writes 0600 files: a checkpoint installed
    # as a package's data would be unreadable by other users.
    model, tok = tiny_model
    old = os.umask(0o022)
    try:
        target = save_checkpoint(model, tok, tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_start_from_base_qwen_and_sam3_directories(tmp_path):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Sam3Config, Sam3Model

    from instructsam_core.build import from_base_models
    from instructsam_core.processing import build_offline_qwen_tokenizer

    config = preset("tiny")
    torch.manual_seed(0)
    qwen = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config.vlm))
    qwen.save_pretrained(tmp_path / "qwen")
    # A Qwen tokenizer as released: Qwen's specials only, none of InstructSAM's tokens.
    base_tok = build_offline_qwen_tokenizer(instructsam_tokens=False)
    assert "[SEG]" not in base_tok.get_vocab()
    base_tok.save_pretrained(tmp_path / "qwen")
    sam_config = Sam3Config(**config.sam3)
    sam_config.detr_decoder_config.num_queries = 7  # SAM3 has more queries than K
    sam = Sam3Model(sam_config)
    sam.save_pretrained(tmp_path / "sam3")

    built = from_base_models(tmp_path / "qwen", tmp_path / "sam3", num_queries=4, out_dim=32, sam_image_size=112)
    model, tok = built.model, built.tokenizer
    assert built.untrained and built.dtype == torch.float32
    assert tok.convert_tokens_to_ids("[SEG]") == 151670
    assert torch.equal(model.vlm.model.language_model.layers[0].mlp.up_proj.weight,
                       qwen.model.language_model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.grounding_model.detr_decoder.query_embed.weight,
                       sam.detr_decoder.query_embed.weight[:4])
    assert torch.equal(model.grounding_model.mask_decoder.instance_projection.weight,
                       sam.mask_decoder.instance_projection.weight)
    assert torch.count_nonzero(model.mask_queries) == 0
    assert not hasattr(model.grounding_model, "text_encoder")


def test_released_preprocessor_config_sets_the_resize_bounds(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    data = json.loads((ckpt / "config.json").read_text())
    data.pop("instructsam")  # as released: no embedded inference fields
    (ckpt / "config.json").write_text(json.dumps(data))
    (ckpt / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 4096, "longest_edge": 65536}, "patch_size": 16}))
    model, _ = load_checkpoint(ckpt)
    assert (model.config.vlm_min_pixels, model.config.vlm_max_pixels) == (4096, 65536)


def test_load_in_bfloat16_builds_without_a_float32_copy(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = load_file(str(tiny_checkpoint / "model.safetensors"))["model.mask_queries"]
    assert torch.equal(model.mask_queries, reference.to(torch.bfloat16))
    assert torch.get_default_dtype() == torch.float32  # restored


def test_engine_config_json_gives_the_checkpoints_engine_defaults_and_options_win(tiny_checkpoint, tmp_path):
    from instructsam_core.checkpoint import ENGINE_CONFIG_NAME, read_engine_defaults
    from instructsam_core.engine import Segmenter

    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    assert read_engine_defaults(ckpt) == {}  # none: EngineConfig's defaults, as released checkpoints
    (ckpt / ENGINE_CONFIG_NAME).write_text(json.dumps({"mask_nms_iou": 0.7, "max_new_tokens": 64}))
    seg = Segmenter.from_pretrained(str(ckpt), device="cpu")
    assert (seg.config.mask_nms_iou, seg.config.max_new_tokens) == (0.7, 64)
    assert seg.checkpoint_defaults == {"mask_nms_iou": 0.7, "max_new_tokens": 64}
    given = Segmenter.from_pretrained(str(ckpt), device="cpu", mask_nms_iou=None)
    assert given.config.mask_nms_iou is None and given.config.max_new_tokens == 64
    (ckpt / ENGINE_CONFIG_NAME).write_text(json.dumps({"mask_nms": 0.7}))
    with pytest.raises(CheckpointError, match=r"engine_config.json: unknown engine settings \['mask_nms'\]"):
        Segmenter.from_pretrained(str(ckpt), device="cpu")
    (ckpt / ENGINE_CONFIG_NAME).write_text("[0.7]")
    with pytest.raises(CheckpointError, match="expected an object"):
        read_engine_defaults(ckpt)
