"""Under a Python audit hook, a smoke benchmark cell of a plugin method imports no module from its
plugin folder that is outside the code identity recorded in the run's ``identity.json`` (issue 25).

The plugin imports a helper beside it (``from helper import x``), one relative to it
(``from .helper import x``), one from a sub-package and one lazily, inside ``fit_support``, while
the cell runs. The hook records ``import`` events (module names) and ``open`` events of Python
sources and bytecode (the files an import reads); every such file under the plugin folder must be
listed, with the hash of its content, in the recorded ``code_files``.

Audit hooks cannot be removed: the hook is installed once per process and records only while
:func:`recording` is active.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Set, Tuple

import fewshot_nsl

_lock = threading.Lock()
_events: Optional[List[Tuple[str, object]]] = None


def _hook(event: str, args: tuple) -> None:
    """Record ``import`` module names and ``open``ed paths (no I/O inside a hook)."""
    if _events is None:
        return
    if event == "import" and args:
        _events.append(("import", args[0]))
    elif event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _events.append(("open", args[0]))


if not getattr(sys, "_fewshot_nsl_import_audit", False):  # one hook per process
    sys.addaudithook(_hook)
    sys._fewshot_nsl_import_audit = True  # type: ignore[attr-defined]


@contextmanager
def recording() -> Iterator[List[Tuple[str, object]]]:
    """The ``import`` and ``open`` events raised inside the ``with`` block."""
    global _events
    with _lock:
        events: List[Tuple[str, object]] = []
        _events = events
    try:
        yield events
    finally:
        with _lock:
            _events = None


def _source_of(path: str) -> Optional[str]:
    """The Python source an opened file stands for (a ``.py`` itself, or the source of a ``.pyc``)."""
    if path.endswith(".py"):
        return path
    if path.endswith(".pyc"):
        try:
            return importlib.util.source_from_cache(path)
        except ValueError:
            return None
    return None


def imported_from(folder: Path, events: List[Tuple[str, object]]) -> Set[Path]:
    """The Python files under ``folder`` that the recorded events read as code: opened sources /
    bytecode, and the files of the modules imported by name (where they are still loaded)."""
    root = Path(os.path.realpath(folder))
    out: Set[Path] = set()
    for kind, value in events:
        if kind == "open":
            src = _source_of(os.path.realpath(os.fsdecode(value)))  # type: ignore[arg-type]
        else:
            src = getattr(sys.modules.get(str(value)), "__file__", None)
        if src and Path(os.path.realpath(src)).is_relative_to(root):
            out.add(Path(os.path.realpath(src)))
    return out


PLUGIN = '''
import torch
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method
from audit_helper import SCALE            # a module beside this file
from .audit_relative import OFFSET        # the same, relative
from audit_sub.deep import DEPTH          # a sub-package beside it


@register_method("{name}")
class Audited(FewShotMethod):
    training_stages = ()

    def fit_support(self, x, y):
        from . import _audit_lazy         # imported while the cell runs, not when the plugin loads
        self.bias = _audit_lazy.BIAS
        self.means = self.class_means(self.backbone(x), y, int(y.max()) + 1)

    def forward(self, q):
        return -(SCALE + OFFSET + DEPTH + self.bias) * torch.cdist(self.backbone(q), self.means)
'''


def _plugin_folder(folder: Path, name: str) -> None:
    (folder / "audit_sub").mkdir(parents=True)
    (folder / "audited.py").write_text(PLUGIN.format(name=name))
    (folder / "audit_helper.py").write_text("SCALE = 1.0\n")
    (folder / "audit_relative.py").write_text("OFFSET = 0.5\n")
    (folder / "audit_sub" / "__init__.py").write_text("")
    (folder / "audit_sub" / "deep.py").write_text("DEPTH = 0.25\n")
    (folder / "_audit_lazy.py").write_text("BIAS = 0.125\n")


def test_a_plugin_cell_imports_nothing_outside_its_recorded_code_identity(tmp_path):
    name = f"audited_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "audited_plugins"
    _plugin_folder(folder, name)
    results = tmp_path / "results"
    with recording() as events:
        rows = fewshot_nsl.benchmark(method=name, plugins=[folder], profile="smoke", dataset="tiny", image_size=16,
                                     shots=1, eval={"episodes": 4, "queries": 2}, results_dir=str(results),
                                     cache_dir=str(tmp_path / "cache"), threads=1)
    used = imported_from(folder, events)
    expected = {"audited.py", "audit_helper.py", "audit_relative.py", "audit_sub/__init__.py", "audit_sub/deep.py",
                "_audit_lazy.py"}
    assert {p.relative_to(os.path.realpath(folder)).as_posix() for p in used} == expected  # the hook saw them all

    record = json.loads((results / "runs" / rows["run_id"].iloc[0] / "identity.json").read_text())
    covered = {entry["path"]: entry["sha256"] for entry in record["code_files"]}
    for path in sorted(used):
        label = f"{folder.name}/{path.relative_to(os.path.realpath(folder)).as_posix()}"
        assert label in covered, f"{label} was imported by the run but is not in its code identity {sorted(covered)}"
        assert covered[label] == hashlib.sha256(path.read_bytes()).hexdigest()[:16], label
