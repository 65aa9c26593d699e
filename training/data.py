"""Training data: questions from the datasets' readers, grouped into conversations, a
resumable (and rank-aware) sampler over a data mix, and collation into the model's
training-consistent inputs.

A training sample is an image and one or more questions about it (the turns of one
conversation), each with one or more target phrases, each phrase with 0..N instance
masks (no-target allowed). The answer the model learns to each question is the release's:

    <|object_ref_start|>phrase<|object_ref_end|><|mask_start|>[SEG]xK<|mask_end|>, ... <|im_end|>

Datasets are read by `training.datasets` (the benchmarks' own readers where they
overlap), so the files a user evaluates on are the files they can train on. With
`data.max_turns` above 1, the questions about one image become the turns of one
conversation (the release asks up to 10 per sequence: one image encode serves them all).
A sample that cannot be used (unreadable image, a mask of another size than the image, an
empty instruction, a missing file) is skipped with a counted reason; the run goes on.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instructsam_core.config import InstructSamConfig
from instructsam_core.processing import build_prompt_ids, encode_text, load_rgb, preprocess_sam, preprocess_vlm
from instructsam_core.tokens import TokenIds
from training.config import DatasetSpec
from training.datasets import GtLoader, Question, read_questions, resolve
from training.eval.masks import DataError
from training.object_colour import ObjectLabels, read_object_labels

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that are no target of the text loss


@dataclass
class PhraseTarget:
    """One target phrase and its instance masks `(N, H, W)` bool (N = 0: no target)."""

    text: str
    masks: np.ndarray


@dataclass
class Turn:
    """A later question of a conversation and the phrases its answer names."""

    instruction: str
    phrases: list[PhraseTarget]


@dataclass
class TrainSample:
    """One loaded training sample: the first question, then `followups` on the same image."""

    sample_id: str
    image: np.ndarray  # (H, W, 3) uint8, upright
    instruction: str
    phrases: list[PhraseTarget]
    followups: list[Turn] = field(default_factory=list)
    # The image's objects, where the dataset has them (`training.object_colour`): `(n,)`
    # colour ids and `(n, H, W)` bool masks.
    objects: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class SampleSource:
    """A sample as a dataset lists it, loaded only when drawn: its first question (and
    `followups`, the later turns of its conversation)."""

    sample_id: str
    image: Path
    instruction: str
    phrases: list[tuple[str, GtLoader | None]]
    error: str | None = None  # "reason: detail", known at read time (e.g. an empty expression)
    followups: list[Question] = field(default_factory=list)
    objects: ObjectLabels | None = None  # the image's objects, where the dataset has them


def read_dataset(spec: DatasetSpec, root: str | Path = "", max_turns: int = 1,
                 objects: bool = False) -> list[SampleSource]:
    """The samples of one dataset of the mix: its questions, those about one image grouped
    into conversations of up to `max_turns` turns (1: one sample per question). Relative
    paths of `spec` are below `root` when one is given. `objects`: with each image's
    objects (colours and masks, `training.object_colour`; gRefCOCO files that
    `training.tabletop` wrote)."""
    if max_turns < 1:
        raise ValueError(f"data.max_turns must be at least 1, got {max_turns}")
    path = resolve(root, spec.path)
    data_root = resolve(root, spec.data_root) if spec.data_root else None
    if objects and spec.kind != "grefcoco":
        raise ValueError(f"{spec.path}: the object-colour target reads the objects of gRefCOCO files that "
                         f"training.tabletop writes; a {spec.kind!r} dataset has none")
    questions = read_questions(spec.kind, path, data_root, spec.split)
    labels = read_object_labels(path, data_root) if objects else {}
    name = Path(spec.path).name
    if max_turns == 1:
        return [_source(name, [q], labels) for q in questions]
    by_image: dict[str, list[Question]] = {}
    for q in questions:
        by_image.setdefault(q.key, []).append(q)
    return [_source(name, group[i:i + max_turns], labels) for group in by_image.values()
            for i in range(0, len(group), max_turns)]


def _source(name: str, turns: list[Question], labels: dict[Path, ObjectLabels]) -> SampleSource:
    first = turns[0]
    sample_id = f"{name}:{first.question_id}" + (f"+{len(turns) - 1}" if len(turns) > 1 else "")
    return SampleSource(sample_id=sample_id, image=first.image, instruction=first.instruction,
                        phrases=first.phrases, error=first.error, followups=turns[1:],
                        objects=labels.get(first.image))


class SkipLog:
    """Counts what was skipped or changed, by reason; logs each reason the first time."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, detail: str) -> None:
        if not self.counts[reason]:
            log.warning("%s (%s); counted, reported at the end of the run", detail, reason)
        self.counts[reason] += 1


def _text_error(instruction: str, phrases: list, error: str | None) -> str | None:
    if error:
        return error
    if not instruction.strip():
        return "bad_text: empty instruction"
    if any(not text.strip() for text, _ in phrases):
        return "bad_text: empty phrase"
    return None


def _load_phrases(phrases: list[tuple[str, GtLoader | None]], image_shape: tuple[int, int], sample_id: str,
                  max_instances: int, skips: SkipLog) -> list[PhraseTarget]:
    out = []
    for text, load_gt in phrases:
        if load_gt is None:
            raise DataError("no_gt: the sample has no ground-truth masks")
        try:
            gt = load_gt()
        except DataError as err:
            raise DataError(f"bad_mask: {err}") from err
        if tuple(gt.size) != image_shape:
            raise DataError(f"bad_mask: GT mask is {gt.size[0]}x{gt.size[1]} but the image is "
                            f"{image_shape[0]}x{image_shape[1]}")
        masks = gt.instances
        if len(masks) > max_instances:
            skips.add("instances_over_k", f"{sample_id}: '{text}' has {len(masks)} instances, more than "
                      f"the {max_instances} query slots; the {max_instances} largest are kept")
            masks = masks[np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")[:max_instances]]
        out.append(PhraseTarget(text=text.strip(), masks=masks))
    return out


def load_sample(source: SampleSource, max_instances: int, skips: SkipLog) -> TrainSample:
    """Read a sample's image and masks. Raises DataError (with a short reason as its
    first word) when the sample cannot be used; more than `max_instances` instances of a
    phrase keeps the largest ones and is counted. A later turn that cannot be used is
    dropped and counted; the first one fails the sample."""
    error = _text_error(source.instruction, source.phrases, source.error)
    if error:
        raise DataError(error)
    try:
        image = load_rgb(source.image)
    except FileNotFoundError as err:
        raise DataError(f"missing_file: {err}") from err
    except ValueError as err:
        raise DataError(f"bad_image: {err}") from err
    shape = image.shape[:2]
    phrases = _load_phrases(source.phrases, shape, source.sample_id, max_instances, skips)
    turns = []
    for q in source.followups:
        if _drop(q, _text_error(q.instruction, q.phrases, q.error), skips):
            continue
        try:
            turns.append(Turn(q.instruction, _load_phrases(q.phrases, shape, source.sample_id, max_instances, skips)))
        except DataError as err:
            _drop(q, str(err), skips)
    objects = None
    if source.objects is not None:
        try:
            objects = source.objects.load(shape)
        except ValueError as err:
            raise DataError(f"bad_mask: {err}") from err
    return TrainSample(source.sample_id, image, source.instruction, phrases, turns, objects)


def _drop(question: Question, error: str | None, skips: SkipLog) -> bool:
    """Count a later turn that cannot be used (True: drop it)."""
    if error:
        reason, _, _ = error.partition(":")
        skips.add(reason, f"a question of {question.image.name} dropped: {error}")
    return bool(error)


# ---- sampling ---------------------------------------------------------------------------

class MixSampler:
    """Draws the sources of a data mix in a seeded order, one epoch after another, and can
    say (and restore) exactly where it is, so a resumed run sees what it would have seen.

    Each dataset appears `repeat` times per epoch; with `shuffle`, epoch e's order is a
    permutation drawn from `seed + e`. Under distributed training every process holds the
    same order and process `rank` of `world_size` draws its positions rank, rank +
    world_size, ... (one process: every position, as before); each process's position is
    its own, and a checkpoint keeps them all.
    """

    def __init__(self, datasets: list[tuple[list[SampleSource], int]], seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.sources = [s for sources, repeat in datasets for _ in range(repeat) for s in sources]
        if not self.sources:
            raise ValueError("the training mix is empty: no dataset listed any sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = rank
        self._order = self._epoch_order()

    def __len__(self) -> int:
        return len(self.sources)

    def _epoch_order(self) -> np.ndarray:
        n = len(self.sources)
        return np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)

    def next(self) -> SampleSource:
        n = len(self.sources)
        if self.position >= n:  # past the epoch's end: on into the next one(s)
            self.epoch += self.position // n
            self.position %= n
            self._order = self._epoch_order()
        source = self.sources[int(self._order[self.position])]
        self.position += self.world_size
        return source

    def restart(self) -> None:
        """Back to this process's first position of epoch 0 (validation passes)."""
        self.load_state_dict({"epoch": 0, "position": self.rank})

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
        object_colours, object_masks: per sample, its image's objects (`training.object_colour`):
            `(n,)` colour ids and `(n, m, m)` bool masks (n = 0 where its dataset has none).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    vlm_pixels: list[torch.Tensor]
    grids: list[tuple[int, int, int]]
    sam_pixels: torch.Tensor
    targets: list[torch.Tensor]
    object_colours: list[torch.Tensor] = field(default_factory=list)
    object_masks: list[torch.Tensor] = field(default_factory=list)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     [p.to(device) for p in self.vlm_pixels], self.grids, self.sam_pixels.to(device),
                     [t.to(device) for t in self.targets], [c.to(device) for c in self.object_colours],
                     [m.to(device) for m in self.object_masks])


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


def _question_ids(tokenizer, instruction: str) -> list[int]:
    """A later user turn of the conversation, and the assistant's turn opened."""
    return (encode_text(tokenizer, "\n<|im_start|>user\n") + encode_text(tokenizer, instruction, literal=True)
            + encode_text(tokenizer, "<|im_end|>\n<|im_start|>assistant\n"))


def collate(samples: list[TrainSample], tokenizer, ids: TokenIds, config: InstructSamConfig, mask_size: int,
            text_on_queries: bool = False) -> Batch:
    """Tokenise, preprocess and pad a list of samples (the training-consistent layout).
    A sample's later turns follow its first answer in the same row, the image only in the
    first; every answer is labelled."""

    def answer_labels(answer: list[int]) -> list[int]:
        return [IGNORE if (t == ids.seg and not text_on_queries) else t for t in answer]

    rows, labels, vlm_pixels, grids, sam, targets = [], [], [], [], [], []
    object_colours, object_masks = [], []
    for sample in samples:
        vlm = preprocess_vlm(sample.image, min_pixels=config.vlm_min_pixels, max_pixels=config.vlm_max_pixels)
        prompt = build_prompt_ids(tokenizer, sample.instruction, vlm.num_tokens, ids)
        answer = answer_ids(tokenizer, ids, [p.text for p in sample.phrases], config.num_queries)
        row, row_labels = prompt + answer, [IGNORE] * len(prompt) + answer_labels(answer)
        targets += [resize_masks(p.masks, mask_size) for p in sample.phrases]
        for turn in sample.followups:
            question = _question_ids(tokenizer, turn.instruction)
            answer = answer_ids(tokenizer, ids, [p.text for p in turn.phrases], config.num_queries)
            row += question + answer
            row_labels += [IGNORE] * len(question) + answer_labels(answer)
            targets += [resize_masks(p.masks, mask_size) for p in turn.phrases]
        rows.append(row)
        labels.append(row_labels)
        vlm_pixels.append(vlm.pixel_values)
        grids.append(vlm.grid_thw)
        sam.append(preprocess_sam(sample.image, config.sam_image_size))
        colours, masks = sample.objects if sample.objects is not None else (
            np.zeros(0, dtype=np.int64), np.zeros((0, *sample.image.shape[:2]), dtype=bool))
        object_colours.append(torch.from_numpy(colours))
        object_masks.append(resize_masks(masks, mask_size))
    length = max(len(r) for r in rows)
    pad = ids.eos[-1]
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    label_ids = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (row, row_labels) in enumerate(zip(rows, labels)):
        input_ids[b, :len(row)] = torch.tensor(row)
        label_ids[b, :len(row)] = torch.tensor(row_labels)
        attention[b, :len(row)] = 1
    return Batch(input_ids, attention, label_ids, vlm_pixels, grids, torch.cat(sam), targets, object_colours,
                 object_masks)
