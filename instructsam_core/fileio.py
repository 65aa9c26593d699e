"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything is written to a temporary name beside the target (same filesystem), then
moved into place with one rename, so a crash or a concurrent reader never sees a torn
file. Temporary names carry the process id, so shards finishing together do not collide.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (parents are made).

    Writers that pick a format from the suffix must name it (`image.save(tmp, format="PNG")`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder `path`.

    An existing folder is moved aside first and deleted after the swap, so the name
    always holds a complete folder (the old one until the new one is in). The folder and
    its files get the modes of a plain mkdir and open (the umask's), not the owner-only
    ones of the temporary folder and of safetensors' writer, so a checkpoint installed
    for other users (a package's data) stays readable.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _plain_modes(tmp)
        if target.exists():
            backup = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_modes(folder: Path) -> None:
    """Folders 0o777 and files 0o666, less the umask (what mkdir and open give)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for item in folder.rglob("*"):
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
