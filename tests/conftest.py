"""Shared pytest fixtures: tiny InstructSAM models built once per session, an RNG guard,
a central skip for tests that need CUDA, and the real sample data from ../shared/data.

Layout: tests/core (instructsam_core), tests/training (training: metrics, benchmarks),
tests/ros (the node over real DDS).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA, which this machine lacks")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # CI places ../shared beside the checkout


def shared_data(name: str) -> Path:
    """A folder of ../shared/data. Missing: the test fails under CI (where it must be
    present) and is skipped elsewhere, saying so."""
    path = SHARED_DATA / name
    if not path.is_dir():
        message = f"{path} is not present (the real sample data beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def roborefit_example() -> Path:
    """The real RoboRefIt frame (RGB, depth, expression; no GT mask)."""
    return shared_data("roborefit_example")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def device(request) -> torch.device:
    """Run a test on the CPU and, where CUDA exists, on the GPU (skipped centrally otherwise)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def prevent_leaking_rng():
    # A test that reseeds must not change what the next test draws.
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    yield
    torch.set_rng_state(torch_state)
    random.setstate(py_state)
    np.random.set_state(np_state)


@pytest.fixture(scope="session")
def tiny_tester():
    from instructsam_core.testing import InstructSamModelTester

    return InstructSamModelTester()


@pytest.fixture(scope="session")
def tiny_model(tiny_tester):
    """(model, tokenizer) of the tiny config; read-only for tests."""
    return tiny_tester.get_model()


@pytest.fixture(scope="session")
def consistent_model():
    """(model, tokenizer) whose cached generation follows the training layout exactly."""
    from instructsam_core.testing import InstructSamModelTester

    return InstructSamModelTester(generation_compat="consistent").get_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from instructsam_core.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-instructsam")


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_checkpoint):
    """A Segmenter over the tiny checkpoint, the instruction forced as the phrase."""
    from instructsam_core.engine import Segmenter

    return Segmenter.from_pretrained(str(tiny_checkpoint), phrase_mode="instruction")


# The compiled backend: compiling on CPU takes minutes, so one engine serves the whole run
# (its caches in a directory of the run's own, cold at the start, as on a fresh machine).
# Its tests feed it one frame size (COMPILED_FRAME_SIZE) and short instructions, so the
# few graphs compiled for the first test serve the others.
COMPILED_FRAME_SIZE = (480, 640)  # (H, W): the latency benchmark's frame


@pytest.fixture(scope="session")
def compiled_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session")
def compiled_segmenter(tiny_checkpoint, compiled_cache_dir):
    """The tiny checkpoint on the compiled backend (CPU, float32). Shared: restore any
    setting you change."""
    from instructsam_core.engine import Segmenter

    return Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32", backend="compiled",
                                     backend_options={"cache_dir": str(compiled_cache_dir)})


@pytest.fixture(scope="session")
def eager_twin(tiny_checkpoint):
    """The same checkpoint on the eager backend, to compare the compiled one with."""
    from instructsam_core.engine import Segmenter

    return Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32")
