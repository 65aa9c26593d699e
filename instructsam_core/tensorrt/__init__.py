"""TensorRT engines built from the exported ONNX graphs, cached, and run on torch CUDA tensors.

    from instructsam_core.tensorrt import tensorrt_status
    ok, reason = tensorrt_status()            # (False, "tensorrt is not installed") here

`profiles` (optimization profiles from the export manifest, the `trtexec` command line)
and `cache` (engine keys and the on-disk cache) need no tensorrt; `builder` (parse, build,
cache) and `runtime` (bind device pointers, enqueue on a torch stream) import it, so
import them only where `tensorrt_status()` says it is there. This project's CI has never
run TensorRT: see docs/acceleration.md for how to build and check engines.
"""

from __future__ import annotations

import importlib


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): tensorrt imports and has the Python API this package uses."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        return False, "tensorrt is not installed"
    except Exception as err:  # the index's stub wheels fail in their own ways
        return False, f"tensorrt does not import: {err}"
    if not all(hasattr(trt, name) for name in ("Builder", "OnnxParser", "Runtime")):
        return False, f"tensorrt {getattr(trt, '__version__', '?')} lacks the Builder/OnnxParser/Runtime API"
    return True, ""
