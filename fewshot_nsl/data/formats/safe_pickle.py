"""Pickles read without running code: :class:`SafeUnpickler` admits numpy array reconstruction only."""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path

from ...errors import DataError
from .common import _one_line, _sniff

# ----------------------------------------------------------------------------- safe pickles


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays, dtypes and scalars.

    Mini-ImageNet pickles contain dicts, lists, str/bytes, ints and numpy arrays. Dicts,
    lists and scalars are pickle opcodes; only numpy reconstruction needs ``find_class``.
    Anything else (``os.system``, ``builtins.eval``, ...) is refused with a
    :class:`DataError` naming the file, before it can run.

    Args:
        file: binary file object.
        path: the file's path, for messages.
    """

    #: ``(module, name)`` pairs that may be loaded; ``numpy.core`` and ``numpy._core``
    #: spellings are both accepted and resolved to whichever the installed numpy has.
    ALLOWED = frozenset(
        {
            ("numpy._core.multiarray", "_reconstruct"),  # ndarray, protocols 0-4
            ("numpy._core.multiarray", "scalar"),  # numpy scalars
            ("numpy._core.numeric", "_frombuffer"),  # ndarray, protocol 5
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core") else module
        if (canonical, name) not in self.ALLOWED:
            raise DataError(
                f"{self.path} asks to load {module}.{name}, which no Mini-ImageNet pickle contains; "
                f"refusing to unpickle it (the file may be malicious), re-download it from a trusted source"
            )
        for candidate in (canonical, canonical.replace("numpy._core", "numpy.core", 1)):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise DataError(f"{self.path} needs {module}.{name}, which this numpy lacks; upgrade numpy")


def read_pickle(path: Path) -> object:
    """Unpickle ``path`` with :class:`SafeUnpickler` (``encoding='latin1'`` for Python-2 pickles).

    Raises:
        DataError: HTML page, empty, truncated or corrupt file, or a forbidden global.
    """
    _sniff(path, "pickle")
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, path).load()
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"not enough memory to unpickle {path}; free memory or use another format") from None
    except Exception as exc:  # EOFError, UnpicklingError, ValueError from numpy, ...
        raise DataError(
            f"{path} is truncated or not a valid pickle ({_one_line(exc)}); re-download it"
        ) from None


def _text_keys(obj: object, path: Path, what: str) -> dict:
    """Return ``obj`` (a dict) with bytes keys decoded to str."""
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a dict ({what}); re-download it")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
