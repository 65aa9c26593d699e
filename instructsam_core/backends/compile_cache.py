"""torch.compile's caches on disk, keyed so that a changed model or machine rebuilds, and
progress reports while compiling.

Inductor keeps its FX graph cache, AOTAutograd cache, compiled C++ (CPU) and Triton
kernels (GPU) under one directory (`TORCHINDUCTOR_CACHE_DIR`, by default in /tmp, which a
robot's reboot empties). The compiled backend points it at
`<root>/<key>/`, where the root is `CompiledOptions.cache_dir`, else
`$INSTRUCTSAM_CACHE_DIR`, else `~/.cache/instructsam/compiled`, and the key hashes
everything the compiled code depends on: the model's config, token ids and a fingerprint
of its weights, the dtype, the GPU (name, compute capability, CUDA) or the CPU (machine,
vector ISA), the torch, transformers and Python versions, and the backend's own settings
and version. Any change lands in a fresh directory and compiles anew; old directories can
be deleted at will. `key.json` in each directory says what it was built for.

A restarted process with a warm directory still traces the model with dynamo (seconds),
but reads every compiled graph from disk instead of building it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ..fileio import write_text_atomic

log = logging.getLogger(__name__)

CACHE_ENV = "INSTRUCTSAM_CACHE_DIR"
# Bump when the compiled backend's graphs change shape or meaning: old caches then go unused.
COMPILED_BACKEND_VERSION = 1


def default_cache_root() -> Path:
    """`$INSTRUCTSAM_CACHE_DIR`, else `$XDG_CACHE_HOME/instructsam/compiled` (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "instructsam" / "compiled"


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: name, shape, dtype and two sums (of the values
    and of their magnitudes, in float64). One pass over the weights on their device and a
    single transfer: milliseconds on a GPU, where hashing the bytes would take seconds."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    described = [(name, list(t.shape), str(t.dtype)) for name, t in tensors]
    numeric = [t.to(torch.uint8) if t.dtype == torch.bool else t for _, t in tensors if t.numel()]
    sums = torch.stack([torch.stack([t.sum(dtype=torch.float64), t.abs().sum(dtype=torch.float64)])
                        for t in numeric]).cpu().tolist()
    return hashlib.sha256(json.dumps([described, sums]).encode()).hexdigest()


def machine_description(device: torch.device) -> dict:
    """What compiled code depends on in the machine: the GPU, or the CPU's vector ISA."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {"cpu": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()}


def cache_key(model, device: torch.device, dtype: torch.dtype, settings: dict) -> tuple[str, dict]:
    """`(key, description)`: the key names the cache directory, the description says what went into it."""
    import transformers

    description = {
        "backend_version": COMPILED_BACKEND_VERSION,
        "model_config": model.config.to_dict(),
        "token_ids": asdict(model.token_ids),
        "weights": weights_fingerprint(model),
        "dtype": str(dtype).replace("torch.", ""),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20], description


def use_cache_dir(directory: Path, description: dict) -> bool:
    """Point inductor's (and Triton's) caches at `directory`; returns whether it was
    already built (warm). Later compiles in this process, of any model, land there too."""
    warm = (directory / "key.json").is_file()
    directory.mkdir(parents=True, exist_ok=True)
    if not warm:
        write_text_atomic(directory / "key.json", json.dumps(description, indent=2, sort_keys=True, default=str))
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(directory):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
        os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
        from torch._inductor.utils import clear_caches

        clear_caches()  # in-process lookups of the previous directory
    return warm


def _inductor_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def _signature(args) -> tuple:
    """Shapes and dtypes of tensors (nested in tuples/lists), values of everything else."""
    if isinstance(args, torch.Tensor):
        return tuple(args.shape), str(args.dtype)
    if isinstance(args, (tuple, list)):
        return tuple(_signature(a) for a in args)
    return args


class CompileTracker:
    """Times and reports the first call of each compiled stage with new input shapes (when
    torch.compile builds or loads its graphs); later calls pass straight through.

    Arguments:
        directory: the cache directory (named in the reports).
        loud: report at WARNING (a cold cache: building takes minutes and the user should
            know why the first frame waits), else at INFO.
    """

    def __init__(self, directory: Path, loud: bool):
        self.directory = directory
        self.level = logging.WARNING if loud else logging.INFO
        self.seen: set[tuple] = set()
        self.seconds: dict[str, float] = {}  # stage -> total build/load time

    @contextmanager
    def track(self, stage: str, *args) -> Iterator[None]:
        key = (stage, _signature(args))
        if key in self.seen:
            yield
            return
        self.seen.add(key)
        log.log(self.level, "compiled backend: building %s (graph set %d) for inputs %s, cache %s ...", stage,
                len(self.seen), key[1], self.directory)
        hits, misses = _inductor_counts()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        new_hits, new_misses = _inductor_counts()
        how = ("compiled" if new_misses > misses else
               "read from the disk cache" if new_hits > hits else "ready")
        log.log(self.level, "compiled backend: %s %s in %.1f s", stage, how, seconds)
