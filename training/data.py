"""Training data: samples from the benchmarks' readers, a resumable sampler over a data mix,
and collation into the model's training-consistent inputs.

A training sample is an image, an instruction, and one or more target phrases, each with
0..N instance masks (no-target allowed). The answer the model learns is the release's:

    <|object_ref_start|>phrase<|object_ref_end|><|mask_start|>[SEG]xK<|mask_end|>, ... <|im_end|>

Datasets are read by the benchmarks' own readers (RoboRefIt in all its formats, gRefCOCO's
JSON), so the files a user evaluates on are the files they can train on. A sample that
cannot be used (unreadable image, a mask of another size than the image, an empty
instruction, a missing file) is skipped with a counted reason; the run goes on.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from instructsam_core.config import InstructSamConfig
from instructsam_core.processing import build_prompt_ids, encode_text, load_rgb, preprocess_sam, preprocess_vlm
from instructsam_core.tokens import TokenIds
from training.config import DatasetSpec
from training.eval.masks import DataError
from training.eval.samples import GroundTruth, Sample

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that are no target of the text loss
DATASET_KINDS = ("roborefit", "grefcoco")


@dataclass
class PhraseTarget:
    """One target phrase and its instance masks `(N, H, W)` bool (N = 0: no target)."""

    text: str
    masks: np.ndarray


@dataclass
class TrainSample:
    """One loaded training sample."""

    sample_id: str
    image: np.ndarray  # (H, W, 3) uint8, upright
    instruction: str
    phrases: list[PhraseTarget]


@dataclass
class SampleSource:
    """A sample as a dataset lists it, loaded only when drawn."""

    sample_id: str
    image: Path
    instruction: str
    phrases: list[tuple[str, Callable[[], GroundTruth] | None]]
    error: str | None = None  # known at read time (e.g. an empty expression)


def read_dataset(spec: DatasetSpec) -> list[SampleSource]:
    """The samples of one dataset of the mix (a referring expression = one phrase)."""
    path = Path(spec.path)
    root = Path(spec.data_root) if spec.data_root else None
    if spec.kind == "roborefit":
        from training.eval.roborefit import read_roborefit, roborefit_official_file

        if path.is_dir() and (path / "final_dataset").is_dir():
            samples = read_roborefit(roborefit_official_file(path, spec.split), path, "official")
        else:
            samples = read_roborefit(path, root)
    elif spec.kind == "grefcoco":
        from training.eval.grefcoco import read_grefcoco

        samples = read_grefcoco(path, root or path.parent)
    else:
        raise ValueError(f"unknown dataset kind {spec.kind!r}; known: {', '.join(DATASET_KINDS)}")
    return [_source(spec, s) for s in samples]


def _source(spec: DatasetSpec, sample: Sample) -> SampleSource:
    return SampleSource(sample_id=f"{Path(spec.path).name}:{sample.sample_id}", image=sample.image,
                        instruction=sample.instruction, phrases=[(sample.text, sample.load_gt)], error=sample.error)


class SkipLog:
    """Counts what was skipped or changed, by reason; logs each reason the first time."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, detail: str) -> None:
        if not self.counts[reason]:
            log.warning("%s (%s); counted, reported at the end of the run", detail, reason)
        self.counts[reason] += 1


def load_sample(source: SampleSource, max_instances: int, skips: SkipLog) -> TrainSample:
    """Read a sample's image and masks. Raises DataError (with a short reason as its
    first word) when the sample cannot be used; more than `max_instances` instances of a
    phrase keeps the largest ones and is counted."""
    if source.error:
        raise DataError(f"bad_text: {source.error}")
    if not source.instruction.strip():
        raise DataError("bad_text: empty instruction")
    try:
        image = load_rgb(source.image)
    except FileNotFoundError as err:
        raise DataError(f"missing_file: {err}") from err
    except ValueError as err:
        raise DataError(f"bad_image: {err}") from err
    phrases = []
    for text, load_gt in source.phrases:
        if not text.strip():
            raise DataError("bad_text: empty phrase")
        if load_gt is None:
            raise DataError("no_gt: the sample has no ground-truth masks")
        try:
            gt = load_gt()
        except DataError as err:
            raise DataError(f"bad_mask: {err}") from err
        if tuple(gt.size) != image.shape[:2]:
            raise DataError(f"bad_mask: GT mask is {gt.size[0]}x{gt.size[1]} but the image is "
                            f"{image.shape[0]}x{image.shape[1]}")
        masks = gt.instances
        if len(masks) > max_instances:
            skips.add("instances_over_k", f"{source.sample_id}: '{text}' has {len(masks)} instances, more than "
                      f"the {max_instances} query slots; the {max_instances} largest are kept")
            masks = masks[np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")[:max_instances]]
        phrases.append(PhraseTarget(text=text.strip(), masks=masks))
    return TrainSample(source.sample_id, image, source.instruction, phrases)


# ---- sampling ---------------------------------------------------------------------------

class MixSampler:
    """Draws the sources of a data mix in a seeded order, one epoch after another, and can
    say (and restore) exactly where it is, so a resumed run sees what it would have seen.

    Each dataset appears `repeat` times per epoch; with `shuffle`, epoch e's order is a
    permutation drawn from `seed + e`.
    """

    def __init__(self, datasets: list[tuple[list[SampleSource], int]], seed: int, shuffle: bool = True):
        self.sources = [s for sources, repeat in datasets for _ in range(repeat) for s in sources]
        if not self.sources:
            raise ValueError("the training mix is empty: no dataset listed any sample")
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order()

    def __len__(self) -> int:
        return len(self.sources)

    def _epoch_order(self) -> np.ndarray:
        n = len(self.sources)
        return np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)

    def next(self) -> SampleSource:
        if self.position >= len(self.sources):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order()
        source = self.sources[int(self._order[self.position])]
        self.position += 1
        return source

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


def next_samples(sampler: MixSampler, count: int, max_instances: int, skips: SkipLog,
                 max_tries: int = 1000) -> list[TrainSample]:
    """The next `count` usable samples; unusable ones are skipped and counted."""
    out: list[TrainSample] = []
    tries = 0
    while len(out) < count:
        source = sampler.next()
        try:
            out.append(load_sample(source, max_instances, skips))
            tries = 0
        except DataError as err:
            reason, _, _ = str(err).partition(":")
            skips.add(reason, f"sample {source.sample_id} skipped: {err}")
            tries += 1
            if tries >= max_tries:
                raise RuntimeError(f"{max_tries} samples in a row could not be used; "
                                   f"reasons so far: {dict(skips.counts)}") from err
    return out


# ---- collation ----------------------------------------------------------------------------

@dataclass
class Batch:
    """Model inputs and targets of a batch of samples.

    Attributes:
        input_ids, attention_mask, labels: `(B, L)`, right-padded; labels are the token
            ids to predict (-100 where nothing is), aligned with `input_ids`.
        vlm_pixels, grids: per sample, Qwen3-VL patches and their grid.
        sam_pixels: `(B, 3, S, S)` SAM3 inputs.
        targets: per phrase, in the order of the query blocks, `(N, m, m)` bool masks.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    vlm_pixels: list[torch.Tensor]
    grids: list[tuple[int, int, int]]
    sam_pixels: torch.Tensor
    targets: list[torch.Tensor]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     [p.to(device) for p in self.vlm_pixels], self.grids, self.sam_pixels.to(device),
                     [t.to(device) for t in self.targets])


def answer_ids(tokenizer, ids: TokenIds, phrases: list[str], num_queries: int) -> list[int]:
    """The answer tokens: each phrase with its query block, ", " between them, then <|im_end|>."""
    out: list[int] = []
    for i, text in enumerate(phrases):
        if i:
            out += encode_text(tokenizer, ", ")
        out += ([ids.ref_start] + encode_text(tokenizer, text, literal=True) + [ids.ref_end, ids.mask_start]
                + [ids.seg] * num_queries + [ids.mask_end])
    return out + [ids.im_end]


def resize_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    """`(N, size, size)` bool: `(N, H, W)` masks resized with nearest neighbours."""
    t = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    if t.shape[0] == 0:
        return torch.zeros(0, size, size, dtype=torch.bool)
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0] > 0.5


def collate(samples: list[TrainSample], tokenizer, ids: TokenIds, config: InstructSamConfig, mask_size: int,
            text_on_queries: bool = False) -> Batch:
    """Tokenise, preprocess and pad a list of samples (the training-consistent layout)."""
    rows, labels, vlm_pixels, grids, sam, targets = [], [], [], [], [], []
    for sample in samples:
        vlm = preprocess_vlm(sample.image, min_pixels=config.vlm_min_pixels, max_pixels=config.vlm_max_pixels)
        prompt = build_prompt_ids(tokenizer, sample.instruction, vlm.num_tokens, ids)
        answer = answer_ids(tokenizer, ids, [p.text for p in sample.phrases], config.num_queries)
        row_labels = [IGNORE] * len(prompt) + [
            IGNORE if (t == ids.seg and not text_on_queries) else t for t in answer]
        rows.append(prompt + answer)
        labels.append(row_labels)
        vlm_pixels.append(vlm.pixel_values)
        grids.append(vlm.grid_thw)
        sam.append(preprocess_sam(sample.image, config.sam_image_size))
        targets += [resize_masks(p.masks, mask_size) for p in sample.phrases]
    length = max(len(r) for r in rows)
    pad = ids.eos[-1]
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    label_ids = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (row, row_labels) in enumerate(zip(rows, labels)):
        input_ids[b, :len(row)] = torch.tensor(row)
        label_ids[b, :len(row)] = torch.tensor(row_labels)
        attention[b, :len(row)] = 1
    return Batch(input_ids, attention, label_ids, vlm_pixels, grids, torch.cat(sam), targets)
