"""Training configs: YAML, typed key=value overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, DatasetSpec, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


@pytest.mark.parametrize("name", ["stage1.yaml", "stage2.yaml", "small_stage1.yaml", "small_stage2.yaml",
                                  "small_slots_warm.yaml", "tiny_stage1.yaml", "tiny_stage2.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.stage in ("stage1", "stage2")


def test_stage_files_hold_the_release_recipe():
    s1, s2 = load_config(CONFIGS / "stage1.yaml"), load_config(CONFIGS / "stage2.yaml")
    assert (s1.optim.llm_lr, s1.optim.mask_decoder_lr, s1.loop.batch_size * s1.loop.grad_accum) == (5e-6, 1e-5, 128)
    assert (s2.optim.llm_lr, s2.optim.mask_decoder_lr, s2.loop.batch_size * s2.loop.grad_accum) == (2e-6, 5e-6, 64)
    assert (s1.model.lora_r, s1.model.lora_alpha, s1.model.lora_dropout) == (64, 16, 0.05)
    assert s1.model.init == "base" and s2.model.init == "checkpoint"
    assert (s1.optim.warmup_ratio, s1.optim.schedule, s1.optim.weight_decay) == (0.03, "cosine", 0.0)
    assert (s1.data.mask_size, s1.loss.num_points) == (288, 12544)


def test_overrides_are_typed_and_reach_nested_lists(tmp_path):
    cfg = load_config(CONFIGS / "tiny_stage1.yaml", [
        "optim.llm_lr=1e-5", "loop.batch_size=2", "data.train=[{kind: roborefit, path: /data/rr}]",
        "data.train.0.repeat=3", "model.lora_targets=[q_proj, v_proj]", "loop.tensorboard=false"])
    assert cfg.optim.llm_lr == 1e-5 and cfg.loop.batch_size == 2 and cfg.loop.tensorboard is False
    assert cfg.data.train == [DatasetSpec(kind="roborefit", path="/data/rr", repeat=3)]
    assert cfg.model.lora_targets == ["q_proj", "v_proj"]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg  # the resolved config rebuilds the run


@pytest.mark.parametrize("override, message", [
    ("optim.lr=1e-5", "optim: unknown key\\(s\\) \\['lr'\\]"),
    ("loop.batch_size=two", "loop.batch_size: expected an integer, got 'two'"),
    ("loop.progress=1", "loop.progress: expected true or false"),
    ("data.train=[{kind: roborefit}]", "data.train\\[0\\]"),
    ("nothing", "is not key=value"),
    ("loop.out_dir=[unclosed", "not valid YAML"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_stage1.yaml", [override])


def test_values_are_never_evaluated(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump({"stage": "!!python/object/apply:os.system ['true']"}))
    assert load_config(path).stage.startswith("!!python")  # a plain string, nothing run
    (tmp_path / "tagged.yaml").write_text("stage: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "tagged.yaml")
