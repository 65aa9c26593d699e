"""instructsam_core: the InstructSAM model and its inference engine (no ROS).

    from instructsam_core import Segmenter
    seg = Segmenter.from_pretrained("/path/to/checkpoint", device="cuda")
    result = seg.segment_image(rgb, "the red mug")
"""

from .result import Result

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing the package for `Result` should not pull in torch and transformers.
    if name == "Segmenter":
        from .engine import Segmenter

        return Segmenter
    raise AttributeError(name)


__all__ = ["Result", "Segmenter", "__version__"]
