"""Readers of the training datasets' own files, one module per format.

Each reader turns a dataset's files into `Question`s: one question about one image and
the phrase(s) its answer names, with lazy loaders of their ground truth. `training.data`
groups the questions of one image into conversations and samples them.

    kind          files                                              module
    roborefit     RoboRefIt (official layout, QA, plain, frames)     training.eval.roborefit
    grefcoco      the release's gRefCOCO evaluation JSON             training.eval.grefcoco
    instructsam   the release's training annotation JSONs            training.datasets.instructsam
                  (refcoco.json, ..., roborefit.json, inst2seg.json)
    refer         the refer toolkit: refs(unc).p + instances.json    training.datasets.refer
                  (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF)
    grefer        gRefCOCO: grefs(unc).json + instances.json          training.datasets.refer
    reasonseg     LISA's ReasonSeg folders (jpg + json polygons)      training.datasets.reasonseg

The benchmarks' readers (`training.eval`) return `Sample`s, one per expression; the same
readers serve training here, so a file a user evaluates on is a file they can train on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from training.eval.samples import GroundTruth, Sample

DATASET_KINDS = ("roborefit", "grefcoco", "instructsam", "refer", "grefer", "reasonseg")

GtLoader = Callable[[], GroundTruth]


@dataclass
class Question:
    """One question about an image, as a dataset lists it (nothing loaded yet).

    Attributes:
        key: what groups questions into one conversation (questions of one image share it).
        image: path of the RGB image.
        question_id: stable id within its file.
        instruction: the user's turn (the dataset's prompt construction).
        phrases: the target phrases the answer names, each with its GT loader (None: no GT).
        error: `"reason: detail"` when the question is known to be unusable at read time.
    """

    key: str
    image: Path
    question_id: str
    instruction: str
    phrases: list[tuple[str, GtLoader | None]]
    error: str | None = None


def from_sample(sample: Sample) -> Question:
    """A benchmark sample (one expression) as a training question."""
    return Question(key=str(sample.image), image=sample.image, question_id=sample.sample_id,
                    instruction=sample.instruction, phrases=[(sample.text, sample.load_gt)],
                    error=f"bad_text: {sample.error}" if sample.error else None)


def resolve(root: str | Path, path: str | Path) -> Path:
    """`path`, below `root` when it is relative and a root is given."""
    path = Path(path)
    return path if path.is_absolute() or not str(root) else Path(root) / path


def read_questions(kind: str, path: Path, data_root: Path | None, split: str) -> list[Question]:
    """The questions of one dataset file (or folder), in the file's order.

    Raises:
        ValueError: an unknown `kind`.
        FormatError: the file is missing or not in the kind's format.
    """
    if kind == "roborefit":
        from training.eval.roborefit import read_roborefit, roborefit_official_file

        if path.is_dir() and (path / "final_dataset").is_dir():
            samples = read_roborefit(roborefit_official_file(path, split), path, "official")
        else:
            samples = read_roborefit(path, data_root)
        return [from_sample(s) for s in samples]
    if kind == "grefcoco":
        from training.eval.grefcoco import read_grefcoco

        return [from_sample(s) for s in read_grefcoco(path, data_root or path.parent)]
    if kind == "instructsam":
        from training.datasets.instructsam import read_instructsam

        return read_instructsam(path, data_root or path.parent)
    if kind in ("refer", "grefer"):
        from training.datasets.refer import read_refer

        return [from_sample(s) for s in read_refer(path, split, data_root, multi=kind == "grefer")]
    if kind == "reasonseg":
        from training.datasets.reasonseg import read_reasonseg_folder

        return [from_sample(s) for s in read_reasonseg_folder(path)]
    raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(DATASET_KINDS)}")
