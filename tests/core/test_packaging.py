"""The pip entry (setup.py over pyproject.toml) installs the ROS-free packages only, the
shipped default model with them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_setup_py_builds_core_and_training_and_never_instructsam_ros(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for package in ("instructsam_core", "training", "instructsam_ros"):  # ros too: it must be left out
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("instructsam-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {"instructsam_core", "training"} <= top
    shipped = {f"instructsam_core/default_model/{f.name}" for f in (REPO / "instructsam_core" / "default_model").iterdir()}
    assert shipped and shipped <= set(names)  # the default model travels with the package
    assert "instructsam_ros" not in top
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in zipfile.ZipFile(wheel).namelist()
                                                    if n.endswith("entry_points.txt"))).decode()
    assert "instructsam = instructsam_core.cli:main" in entry_points
