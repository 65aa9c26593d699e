"""Read pickles that hold plain data only (the refer toolkit's `refs(unc).p`), safely.

A pickle is a program: loading one with `pickle.load` may import and call anything it
names. The refer toolkit ships its referring expressions as Python 2 pickles of lists,
dicts, strings and numbers, so they are read here by an unpickler that resolves no global
at all except the builtin set types: a pickle that names any other (`os.system`,
`numpy.ndarray`, a class) is refused with an `UnsafePickleError` naming it, before
anything it names is imported. Python 2's byte strings come back as `str` (UTF-8,
Latin-1 where that fails).

Convert once to JSON, so the training never opens the pickle again:

    python -m training.datasets.plain_pickle 'data/refcoco/refs(unc).p' 'data/refcoco/refs(unc).json'
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

# The only globals a plain-data pickle may name: Python 2 and 3 pickle sets through them.
_ALLOWED = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
            ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names something other than plain builtin data."""


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafePickleError(f"{self.source}: the pickle names {module}.{name}; only plain data "
                                    "(dicts, lists, strings, numbers, sets) is read from pickles")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: the pickle refers to persistent objects; only plain data is read")


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _strings(obj: Any) -> Any:
    """Python 2 byte strings (keys included) as `str`, recursively."""
    if isinstance(obj, bytes):
        return _text(obj)
    if isinstance(obj, dict):
        return {_strings(k): _strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strings(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_strings(v) for v in obj)
    return obj


def load_plain_pickle(path: str | Path) -> Any:
    """The plain data of a pickle file.

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: the pickle names a global other than the builtin set types.
        pickle.UnpicklingError: the file is not a valid pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle not found: {path}")
    with open(path, "rb") as f:
        try:
            data = _PlainUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except (EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
            raise pickle.UnpicklingError(f"{path}: not a readable pickle: {err}") from err
    return _strings(data)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """Convert a plain-data pickle (e.g. refs(unc).p) to JSON."""
    from instructsam_core.fileio import write_text_atomic

    p = argparse.ArgumentParser(prog="python -m training.datasets.plain_pickle", description=main.__doc__)
    p.add_argument("pickle_file", type=Path)
    p.add_argument("json_file", type=Path)
    args = p.parse_args(argv)
    try:
        data = load_plain_pickle(args.pickle_file)
    except (FileNotFoundError, pickle.UnpicklingError) as err:
        print(f"error: {err}")
        return 2
    write_text_atomic(args.json_file, json.dumps(_jsonable(data)))
    print(f"{args.json_file}: {len(data) if hasattr(data, '__len__') else 1} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
