"""Where the suite's own files are: built-in baselines, configs, episode lists; version and checkout.

The repository keeps ``baselines/``, ``configs/`` and ``episodes/`` at its top level (the design
card's layout); ``pyproject.toml`` maps them into the installed package as the sub-packages
``fewshot_nsl.baselines``, ``fewshot_nsl.configs`` and ``fewshot_nsl.episodes`` (setuptools
``package-dir``), so a wheel carries them and an editable install finds the checkout's folders.
They are located with :mod:`importlib.resources`, never relative to the source tree.

Results and caches never go here: they go to the working folder (``results/``) and the user
cache (``$FEWSHOT_NSL_CACHE`` or ``~/.cache/fewshot_nsl``).
"""
from __future__ import annotations

import functools
import importlib.resources
import subprocess
from pathlib import Path
from typing import Dict, Optional

from . import __version__

#: Folders of the suite mapped into the package, by name.
RESOURCE_DIRS = ("baselines", "configs", "episodes")


def resource_dir(name: str) -> Path:
    """The folder of the resource sub-package ``fewshot_nsl.<name>`` (``baselines``, ``configs``, ``episodes``).

    Installed (wheel or editable): found through :func:`importlib.resources.files`. A checkout
    put on ``sys.path`` without being installed has no package mapping; its top-level folder
    of that name is used.
    """
    if name not in RESOURCE_DIRS:
        raise ValueError(f"unknown resource folder {name!r}; one of {', '.join(RESOURCE_DIRS)}")
    try:
        return Path(str(importlib.resources.files(f"{__package__}.{name}")))
    except ModuleNotFoundError:  # not installed: a bare checkout on sys.path
        return Path(__file__).resolve().parent.parent / name


@functools.lru_cache(maxsize=1)
def checkout_root() -> Optional[Path]:
    """The git work tree the running ``fewshot_nsl`` package is tracked in, or None (installed copy).

    A wheel installed into a virtual environment that happens to sit inside some git repository
    is not a checkout: its files are not tracked there.
    """
    here = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=here,
                                 capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0:
            return None
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(top) if top else None


def git_info() -> Dict[str, object]:
    """``{"git_commit": sha, "git_dirty": bool}`` when running from a checkout, else
    ``{"git_commit": None, "git_dirty": None}`` (an installed copy is identified by its version)."""
    root = checkout_root()
    if root is None:
        return {"git_commit": None, "git_dirty": None}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": sha or None, "git_dirty": bool(dirty)}


def version() -> str:
    """The package version (``fewshot_nsl.__version__``, also the wheel's version)."""
    return __version__
