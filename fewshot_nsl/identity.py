"""What a run *is*: everything that determines its numbers, hashed into its run id.

A run's identity (:class:`RunIdentity`) is

* ``config_hash``: the resolved config without output paths, device and the training
  sections the method does not use (:func:`fewshot_nsl.runner.config_hash`); it holds the
  seed, the split, ways/shots/queries, image size, every option;
* ``dataset_fingerprint``: sha256 of the dataset *content* (class names, splits, labels and
  every image byte, :meth:`fewshot_nsl.data.store.ImageStore.fingerprint`), not its path;
* ``episode_hash`` and ``split``: the content hash of the fixed episode list and its split;
* ``code_hash``: the package's source (every ``.py`` file of :mod:`fewshot_nsl`) and the
  source files of the method's own classes (built-in baseline or plugin, wherever it lives);
* ``world_size``: the number of processes of the pretraining the run uses (``torchrun``).

The run folder is named after :meth:`RunIdentity.digest`, and ``identity.json`` in it records
the components, so a run is resumed, reused or written into only under the same identity;
anything else gets a folder of its own.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent


def _hash_files(paths: List[Path], root: Optional[Path] = None) -> str:
    h = hashlib.sha256()
    for p in paths:
        name = p.relative_to(root).as_posix() if root else p.as_posix()
        data = p.read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def package_code_hash() -> str:
    """sha256 (16 hex) of every ``.py`` file of the installed/checked-out ``fewshot_nsl`` package."""
    files = sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    return _hash_files(files, PACKAGE_DIR)


def own_source_files(cls: type) -> List[Path]:
    """Source files of ``cls`` and of its bases up to (not including) ``FewShotMethod``: the
    method's own code, wherever it lives (``baselines/``, a ``--plugins`` folder, a package)."""
    from .methods.base import FewShotMethod

    files: List[Path] = []
    for klass in inspect.getmro(cls):
        if klass is FewShotMethod or klass is object:
            break
        try:
            src = inspect.getsourcefile(klass)
        except TypeError:  # built-in class
            continue
        if src and Path(src).is_file() and Path(src).resolve() not in files:
            files.append(Path(src).resolve())
    return files


def method_code_hash(cls: type) -> str:
    """sha256 (16 hex) of the package source plus the method's own source files."""
    h = hashlib.sha256(package_code_hash().encode())
    for f in own_source_files(cls):
        h.update(_hash_files([f]).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    """Everything that determines a run's numbers (see the module docstring)."""

    config_hash: str
    dataset_fingerprint: str
    episode_hash: str
    split: str
    code_hash: str
    world_size: int = 1

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """sha256 (16 hex) of all components; the last part of the run id is its first 8."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, recorded: Dict[str, Any]) -> List[str]:
        """Names of the components in which ``recorded`` (an ``identity.json``) differs."""
        mine = self.to_dict()
        return [k for k in mine if recorded.get(k) != mine[k]]
