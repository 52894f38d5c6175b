"""The code identity of a plugin method covers what the plugin reads and imports from outside its own
``*.py`` files (plugin audit, item 1):

* a module of the user's imported from another folder on ``sys.path`` (``from mylab_scale import
  temperature``): editing it gives a new code hash (and, in one process, the stale class is refused
  until the folder is imported again);
* a data file beside the plugin (``settings.json`` read at import): editing it gives a new code hash;
* editing an unrelated file (a module nobody imports, a hidden file, a file in another folder) does not;
* a data file larger than ``DATA_FILE_LIMIT`` stands in by its size and modification time;
* the built-in methods' code files are their ``.py`` files only (their identity does not change).
"""
from __future__ import annotations

import importlib
import os
import sys
import uuid
from pathlib import Path

import pytest

import fewshot_nsl
from fewshot_nsl import identity
from fewshot_nsl.errors import RegistryError
from fewshot_nsl.identity import method_code_files, method_code_hash
from fewshot_nsl.registry import get_method_class, load_plugins

PLUGIN = '''import json
import os
from pathlib import Path

import torch
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method
{imports}

SETTINGS = json.loads((Path(__file__).parent / "settings.json").read_text()) if {reads_settings} else {{}}


@register_method("{name}")
class Centroid(FewShotMethod):
    """Nearest centroid, scaled by a helper from elsewhere (or a setting beside the plugin)."""
    training_stages = ()

    def fit_support(self, x, y):
        os.environ["{marker}"] = f"{{scale()}}:{{SETTINGS.get('scale')}}"  # which code and data ran
        self.means = self.class_means(self.backbone(x), y, int(y.max()) + 1)

    def forward(self, q):
        return -abs(scale()) * torch.cdist(self.backbone(q), self.means)
'''


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def _plugin(folder: Path, name: str, imports: str, reads_settings: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "method.py"
    src.write_text(PLUGIN.format(name=name, imports=imports, reads_settings=reads_settings, marker=f"PIS_{name}"))
    return src


def _load(tmp_path: Path, folder_name: str, imports: str):
    """A plugin folder ``tmp_path/folder_name`` with ``imports`` at its top, loaded: ``(folder, name, class)``."""
    name = f"pis_{_uid()}"
    folder = tmp_path / folder_name
    _plugin(folder, name, imports)
    load_plugins([folder])
    return folder, name, get_method_class(name)


def _labels(cls) -> dict:
    return {f.label: f.sha256 for f in method_code_files(cls)}


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A folder of the user's own modules on ``sys.path`` (like ``PYTHONPATH=labutils``), with a helper
    ``pislab_<id>.py`` and a module nobody imports; returns ``(folder, helper module name)``."""
    lib = tmp_path / "labutils"
    lib.mkdir()
    helper = f"pislab_{_uid()}"
    (lib / f"{helper}.py").write_text("def scale():\n    return 10.0\n")
    (lib / f"unused_{_uid()}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(lib))
    yield lib, helper
    for name in [n for n in sys.modules if n == helper]:
        del sys.modules[name]


def test_editing_a_helper_imported_from_another_folder_changes_the_code_hash(tmp_path, lab):
    lib, helper = lab
    folder, name, old = _load(tmp_path, "ext", f"from {helper} import scale")
    before = method_code_hash(old)
    assert _labels(old).keys() == {"ext/method.py", f"{helper}.py"}

    # unrelated edits: a module of the same folder nobody imports, a file elsewhere
    unused = next(lib.glob("unused_*.py"))
    unused.write_text("X = 2\n")
    (tmp_path / "notes.txt").write_text("unrelated\n")
    assert method_code_hash(old) == before

    (lib / f"{helper}.py").write_text("def scale():\n    return 20.0\n")
    with pytest.raises(RegistryError, match=r"module .*pislab_.*\.py \(imported by plugin folder .*ext\) changed on "
                                            r"disk since it was imported"):
        method_code_hash(old)  # the class in memory runs the old helper: never recorded under the new code
    load_plugins([folder])  # re-imports the folder and, with it, the helper it imported
    new = get_method_class(name)
    assert new is not old and method_code_hash(new) != before
    assert sys.modules[new.__module__].scale() == 20.0  # the new helper is what runs


def test_a_helper_imported_before_the_plugin_is_covered_too(tmp_path, lab):
    """The helper was imported first by other code: found from the plugin's namespace, not its import."""
    lib, helper = lab
    importlib.import_module(helper)
    _, _, cls = _load(tmp_path, "ext_late", f"import {helper} as lab_helper\nscale = lab_helper.scale")
    assert f"{helper}.py" in _labels(cls)
    (lib / f"{helper}.py").write_text("def scale():\n    return 30.0\n")
    with pytest.raises(RegistryError, match="changed on disk since it was imported"):
        method_code_hash(cls)


def test_a_module_imported_only_for_its_side_effects_is_covered(tmp_path, lab):
    lib, helper = lab
    _, _, cls = _load(tmp_path, "ext_side", f"import {helper} as _h\n_VALUE = _h.scale()\ndel _h\n\n\ndef scale():\n"
                                            f"    return _VALUE")
    # nothing of the plugin's namespace points into the helper any more: the record of its import remains
    assert f"{helper}.py" in _labels(cls)


def test_a_data_file_beside_the_plugin_is_part_of_the_code_hash(tmp_path):
    name = f"pis_{_uid()}"
    folder = tmp_path / "datafile"
    _plugin(folder, name, "def scale():\n    return SETTINGS['scale']", reads_settings=True)
    (folder / "settings.json").write_text('{"scale": -50.0}')
    (folder / ".editor_state").write_text("a")  # hidden: not the plugin's data
    (folder / "method.py~").write_text("backup")  # an editor's backup
    (folder / "__pycache__").mkdir(exist_ok=True)
    load_plugins([folder])
    old = get_method_class(name)
    before = method_code_hash(old)
    assert _labels(old).keys() == {"datafile/method.py", "datafile/settings.json"}

    for noise in (folder / ".editor_state", folder / "method.py~", folder / "__pycache__" / "x.bin"):
        noise.write_text("changed")
    load_plugins([folder])
    assert get_method_class(name) is old and method_code_hash(old) == before  # nothing the plugin reads changed

    (folder / "settings.json").write_text('{"scale": 5.0}')
    with pytest.raises(RegistryError, match=r"plugin data file .*settings\.json changed on disk since it was imported"):
        method_code_hash(old)  # read at import: the class in memory holds the old settings
    load_plugins([folder])
    new = get_method_class(name)
    assert method_code_hash(new) != before and sys.modules[new.__module__].SETTINGS == {"scale": 5.0}


def test_a_large_data_file_stands_in_by_its_size_and_modification_time(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "DATA_FILE_LIMIT", 64)
    name = f"pis_{_uid()}"
    folder = tmp_path / "weights"
    _plugin(folder, name, "def scale():\n    return 1.0")
    blob = folder / "weights.bin"
    blob.write_bytes(b"a" * 100)
    load_plugins([folder])
    cls = get_method_class(name)
    before = method_code_hash(cls)
    stat = blob.stat()
    blob.write_bytes(b"b" * 100)  # same size, modification time put back: not read, so not seen
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert method_code_hash(cls) == before
    blob.write_bytes(b"b" * 101)
    load_plugins([folder])
    assert method_code_hash(get_method_class(name)) != before


def test_a_folder_pip_installed_into_is_not_the_users_code(tmp_path, monkeypatch):
    target = tmp_path / "site"
    target.mkdir()
    (target / "somelib-1.0.dist-info").mkdir()
    (target / "somelib.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(target))
    assert not identity._user_code(str((target / "somelib.py").resolve()))
    assert not identity._user_code(os.path.realpath(importlib.import_module("torch").__file__))
    assert not identity._user_code(os.path.realpath(fewshot_nsl.__file__))
    assert identity._user_code(str((tmp_path / "mylab.py").resolve()))


@pytest.mark.parametrize("method", ["protonet", "dynamic_nsn", "maml", "l2l_metasgd"])
def test_a_built_in_method_is_its_python_files_only(method, tmp_path, lab):
    """Built-ins get nothing from the new coverage: no data file, no module of the user's, even with a user
    module loaded and a plugin folder importing it."""
    lib, helper = lab
    importlib.import_module(helper)
    files = method_code_files(get_method_class(method))
    assert files and all(f.label.endswith(".py") and f.label.split("/")[0] in ("baselines", "fewshot_nsl")
                         for f in files), [f.label for f in files]


def test_benchmark_reruns_after_an_edit_of_a_helper_elsewhere_or_of_a_data_file(tmp_path, lab):
    """End to end, as in the audit: an edit is a new run that runs the new code, not "complete ... skipped"."""
    lib, helper = lab
    name = f"pis_{_uid()}"
    folder = tmp_path / "e2e"
    _plugin(folder, name, f"from {helper} import scale", reads_settings=True)
    (folder / "settings.json").write_text('{"scale": 1}')
    kw = dict(method=name, plugins=[folder], dataset="tiny", image_size=16, profile="smoke", shots=1,
              eval={"episodes": 2, "queries": 2}, results_dir=str(tmp_path / "results"),
              cache_dir=str(tmp_path / "cache"), threads=1)
    runs = [fewshot_nsl.benchmark(**kw)["run_id"].iloc[0]]
    assert os.environ[f"PIS_{name}"] == "10.0:1"
    (lib / f"{helper}.py").write_text("def scale():\n    return 20.0\n")
    runs.append(fewshot_nsl.benchmark(**kw)["run_id"].iloc[0])
    assert os.environ[f"PIS_{name}"] == "20.0:1"
    (folder / "settings.json").write_text('{"scale": 2}')
    runs.append(fewshot_nsl.benchmark(**kw)["run_id"].iloc[0])
    assert os.environ[f"PIS_{name}"] == "20.0:2"
    assert len(set(runs)) == 3
    assert fewshot_nsl.benchmark(**kw)["run_id"].iloc[0] == runs[-1]  # nothing changed: the same run


def test_an_entry_point_plugin_covers_its_package_data_and_the_users_modules_it_imports(tmp_path, lab, monkeypatch):
    """An installed plugin package (entry point) importing a helper of the user's from elsewhere, once through
    its namespace and once only for its side effects, with a data file in the package."""
    import textwrap

    from fewshot_nsl import plugins

    lib, helper = lab
    side = f"pisside_{_uid()}"
    (lib / f"{side}.py").write_text("VALUE = 1\n")
    uid = _uid()
    name, package = f"pis_{uid}", f"pisthird_{uid}"
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(
        PLUGIN.format(name=name, imports=f"from {helper} import scale\nimport {side}\ndel {side}",
                      reads_settings=False, marker=f"PIS_{name}"))
    (site / package / "vocab.txt").write_text("a b c\n")
    dist = site / f"{package}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""
        [fewshot_nsl.methods]
        {name} = {package}
    """))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    try:
        cls = get_method_class(name)
        assert _labels(cls).keys() == {f"{package}/__init__.py", f"{package}/vocab.txt", f"{helper}.py", f"{side}.py"}
        before = method_code_hash(cls)
        (site / package / "vocab.txt").write_text("a b c d\n")
        assert method_code_hash(cls) != before  # package data: hashed (an installed package is not re-imported)
        (lib / f"{side}.py").write_text("VALUE = 2\n")
        with pytest.raises(RegistryError, match=rf"code file .*{side}\.py changed on disk since it was imported"):
            method_code_hash(cls)
    finally:
        sys.modules.pop(side, None)
        sys.modules.pop(package, None)


def test_a_log_written_beside_the_plugin_is_not_part_of_its_identity(tmp_path):
    """A plugin folder that is also the working folder (``nohup ... --plugins . &``): its growing log is no input."""
    from fewshot_nsl.identity import data_files

    (tmp_path / "settings.json").write_text("{}")
    for name in ("nohup.out", "run.log", "run.err", "leaderboard.csv.lock", "x.tmp", "job.pid"):
        (tmp_path / name).write_text("output")
    assert [Path(p).name for p in data_files(tmp_path)] == ["settings.json"]
