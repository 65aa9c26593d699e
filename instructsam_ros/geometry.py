"""3D position of instance masks from an aligned depth image (pinhole back-projection)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Intrinsics:
    """Pinhole intrinsics in pixels (from sensor_msgs/CameraInfo.k).

    K describes the image as published. The depth is assumed undistorted (distortion
    coefficients are ignored), as aligned depth from RGB-D drivers is; see docs/ros.md
    for K versus P.
    """

    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_camera_info(cls, info) -> "Intrinsics":
        """Read K = [fx 0 cx; 0 fy cy; 0 0 1]; raises ValueError when fx or fy is 0."""
        k = [float(v) for v in info.k]
        fx, fy, cx, cy = k[0], k[4], k[2], k[5]
        if fx <= 0 or fy <= 0:
            raise ValueError(f"camera_info has invalid focal lengths fx={fx} fy={fy}")
        return cls(fx, fy, cx, cy)


def check_camera_info_size(info, height: int, width: int) -> None:
    """Raise ValueError when camera_info's size differs from the depth image's.

    A camera_info with width = height = 0 (size not filled in, as hand-made ones often
    are) is accepted. Intrinsics of another resolution would put every point in the
    wrong place, so a mismatch is refused rather than silently used.
    """
    iw, ih = int(info.width), int(info.height)
    if (iw or ih) and (iw, ih) != (int(width), int(height)):
        raise ValueError(f"camera_info is {iw}x{ih} but the depth image is {width}x{height}: "
                         "the intrinsics must describe the depth image")


@dataclass
class Position:
    """Robust 3D summary of one mask, metres, in the depth image's optical frame."""

    centroid: tuple[float, float, float]  # per-axis median
    extent: tuple[float, float, float]  # per-axis 2nd..98th percentile range
    points: int  # valid depth pixels used


def mask_position(mask: np.ndarray, depth_m: np.ndarray, k: Intrinsics) -> Position | None:
    """Back-project the valid depth pixels under `mask` and summarise them.

    Args:
        mask: `(H, W)` bool instance mask.
        depth_m: `(H, W)` float32 depth in metres, NaN where invalid.
        k: intrinsics of the depth image.
    Returns:
        None when the mask covers no valid depth pixel.
    """
    ys, xs = np.nonzero(mask)
    z = depth_m[ys, xs]
    ok = np.isfinite(z)
    if not ok.any():
        return None
    z = z[ok].astype(np.float64)
    x = (xs[ok] - k.cx) * z / k.fx
    y = (ys[ok] - k.cy) * z / k.fy
    pts = np.stack([x, y, z], axis=1)  # (P, 3)
    centroid = np.median(pts, axis=0)
    lo, hi = np.percentile(pts, [2.0, 98.0], axis=0)
    return Position(tuple(centroid.tolist()), tuple((hi - lo).tolist()), int(z.size))
