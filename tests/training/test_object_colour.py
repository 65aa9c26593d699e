"""The object-colour target: its prototype classifier, the objects' labels read beside
the tabletop world's expressions, collated per sample, and trained end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import ConfigError, DatasetSpec, load_config
from training.data import MixSampler, SkipLog, collate, next_samples, read_dataset
from training.eval.readers import FormatError
from training.object_colour import OBJECT_COLOURS, object_colour_loss, pooled_objects, read_object_labels
from training.tabletop import make_scene, write_split

REPO = Path(__file__).resolve().parents[2]
GRID = (4, 4)


def _quadrant_masks(size: int = 8) -> torch.Tensor:
    """Four objects, one per quadrant of a `size` x `size` mask (2x2 tokens each on GRID)."""
    masks = torch.zeros(4, size, size, dtype=torch.bool)
    half = size // 2
    for i, (y, x) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        masks[i, y:y + half, x:x + half] = True
    return masks


def _tokens_of(objects: torch.Tensor) -> torch.Tensor:
    """`(h*w, D)` tokens: each quadrant's four tokens hold its object's feature."""
    tokens = torch.zeros(GRID[0], GRID[1], objects.shape[-1])
    for i, (y, x) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        tokens[y:y + 2, x:x + 2] = objects[i]
    return tokens.flatten(0, 1)


def test_pooling_averages_each_objects_tokens_and_drops_slivers():
    tokens = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    masks = _quadrant_masks()
    sliver = torch.zeros(1, 8, 8, dtype=torch.bool)
    sliver[0, 0, 0] = True  # a quarter of one token: under MIN_OBJECT_TOKENS
    pooled, keep = pooled_objects(tokens, GRID, torch.cat([masks, sliver]))
    assert keep.tolist() == [True, True, True, True, False]
    grid = tokens.reshape(4, 4, 3)
    torch.testing.assert_close(pooled[0], grid[:2, :2].reshape(4, 3).mean(0))
    torch.testing.assert_close(pooled[3], grid[2:, 2:].reshape(4, 3).mean(0))


def test_the_loss_is_low_when_colours_are_apart_and_high_when_they_are_not():
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(len(OBJECT_COLOURS), 16), dim=-1)
    colours = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), torch.tensor([0, 0, 1, 1])]
    masks = [_quadrant_masks()] * 3

    apart = torch.stack([_tokens_of(directions[c]) for c in colours])
    loss, accuracy = object_colour_loss(apart, GRID, colours, masks, temperature=0.1)
    assert float(accuracy) == 1.0 and float(loss) < 0.01

    merged = torch.stack([_tokens_of(torch.ones(4, 16)) for _ in colours])  # every object the same
    loss, _ = object_colour_loss(merged, GRID, colours, masks, temperature=0.1)
    assert float(loss) == pytest.approx(math.log(4), abs=1e-4)  # chance among the four colours present

    learnable = (merged + 0.1 * torch.randn_like(merged)).requires_grad_(True)  # the gradient reaches the tokens
    object_colour_loss(learnable, GRID, colours, masks, temperature=0.1)[0].backward()
    assert learnable.grad.abs().sum() > 0


def test_an_object_alone_in_its_colour_is_not_scored_but_still_a_class():
    directions = torch.eye(len(OBJECT_COLOURS))
    colours = [torch.tensor([0, 0, 1, 2])]  # colours 1 and 2 have one object each
    tokens = _tokens_of(directions[colours[0]])[None]
    loss, accuracy = object_colour_loss(tokens, GRID, colours, [_quadrant_masks()], temperature=1.0)
    # only the two colour-0 objects are scored, each among colours 0, 1 and 2: cos 1 vs 0 and 0
    expected = -math.log(math.e / (math.e + 2))
    assert float(loss) == pytest.approx(expected, abs=1e-5) and float(accuracy) == 1.0
    nothing = object_colour_loss(tokens, GRID, [torch.tensor([0, 1, 2, 3])], [_quadrant_masks()], 1.0)
    assert float(nothing[0]) == 0.0 and float(nothing[1]) == 0.0  # no colour has two objects
    empty = object_colour_loss(tokens, GRID, [torch.zeros(0, dtype=torch.long)],
                               [torch.zeros(0, 8, 8, dtype=torch.bool)], 1.0)
    assert float(empty[0]) == 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return write_split(root, "train", seeds=range(4), kinds=("colour", "category"))


def test_the_objects_colours_and_masks_are_read_beside_the_expressions(world):
    labels = read_object_labels(world)
    records = json.loads(world.read_text())
    assert len(labels) == len(records) == 4
    for seed, (image, objects) in zip(range(4), labels.items()):
        scene = make_scene(seed, held_out=False)
        assert image.is_file()
        colours, masks = objects.load(scene.image.shape[:2])
        assert [OBJECT_COLOURS[c] for c in colours] == [o.colour for o in scene.objects]
        np.testing.assert_array_equal(masks, np.stack([o.mask for o in scene.objects]))
        with pytest.raises(ValueError, match="object mask is 120x160 but the image is 60x80"):
            objects.load((60, 80))


def test_a_file_without_object_masks_is_refused_with_what_it_needs(world, tmp_path):
    records = json.loads(world.read_text())
    for o in records[1]["objects"]:
        del o["mask"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(records))
    with pytest.raises(FormatError, match=r"bare.json\[1\]: the object-colour target needs each image's objects"):
        read_object_labels(bare, world.parent)
    records[1]["objects"] = [{"colour": "teal", "mask": {"size": [1, 1], "counts": "1"}}]
    bare.write_text(json.dumps(records))
    with pytest.raises(FormatError, match="'teal'"):
        read_object_labels(bare, world.parent)


def test_samples_carry_their_images_objects_into_the_batch(world, tiny_model):
    model, tok = tiny_model
    spec = DatasetSpec(kind="grefcoco", path=str(world))
    assert all(s.objects is None for s in read_dataset(spec))  # only when asked
    sources = read_dataset(spec, objects=True)
    samples = next_samples(MixSampler([(sources, 1)], 0, False), 3, 4, SkipLog())
    batch = collate(samples, tok, model.token_ids, model.config, mask_size=32)
    for sample, colours, masks in zip(samples, batch.object_colours, batch.object_masks):
        n = len(sample.objects[0])
        assert n >= 1 and colours.tolist() == sample.objects[0].tolist() and masks.shape == (n, 32, 32)
        assert masks.any(dim=(1, 2)).all()
    with pytest.raises(ValueError, match="a 'roborefit' dataset has none"):
        read_dataset(DatasetSpec(kind="roborefit", path=str(world)), objects=True)


def _short(world: Path, out: Path, *extra: str):
    return load_config(REPO / "training" / "configs" / "tiny_stage1.yaml", [
        f"data.train=[{{kind: grefcoco, path: {world}}}]", f"data.val=[{{kind: grefcoco, path: {world}}}]",
        f"loop.out_dir={out}", "loop.max_steps=3", "loop.batch_size=4", "loop.eval_every=3", "loop.eval_batches=1",
        "loop.log_every=1", "loop.progress=false", "loop.tensorboard=false", "loss.num_points=64", *extra])


@pytest.mark.parametrize("tokens", ["fusion", "image"])
def test_the_target_trains_and_is_logged(world, tmp_path, tokens):
    from training.train import train

    run = tmp_path / "run"
    assert train(_short(world, run, "loss.object_colour=1.0", f"loss.object_colour_tokens={tokens}"))["finished"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(r["object_colour"] > 0 and 0 <= r["object_colour_acc"] <= 1 for r in steps)
    assert "object_colour" in next(r["eval"] for r in rows if "eval" in r)


@pytest.mark.parametrize("override, message", [
    (["loss.object_colour_tokens=slots"], "object_colour_tokens must be one of"),
    (["loss.object_colour_temperature=0"], "temperature must be above 0"),
    (["data.val=[{kind: roborefit, path: somewhere}]"], "of another kind: \\['somewhere'\\]"),
])
def test_bad_settings_are_refused_before_training(world, tmp_path, override, message):
    from training.train import train

    with pytest.raises(ConfigError, match=message):
        train(_short(world, tmp_path / "run", "loss.object_colour=1.0", *override))
