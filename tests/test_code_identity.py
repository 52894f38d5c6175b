"""The code identity of a method covers the code that actually runs (issue 25, "code that runs but
the code hash does not see" and "pretraining reused across code changes").

* a plugin's helper modules (``from helpers import x`` and ``from .helpers import x``) are part of
  the method's code identity: editing one gives a new identity;
* a method class without a source file (a notebook cell, ``exec``) is hashed from its source text
  where Python keeps it (IPython puts cell sources in ``linecache``), otherwise its runs are never
  reused;
* in one process, a plugin edited since it was imported is re-imported by ``benchmark()`` (the new
  code runs) and refused in one line where the identity is computed without re-importing it;
* the pretraining cache key covers the code that builds the pretrained module (a plugin's
  ``__init__``, a plugin backbone), while the built-ins keep sharing one pretraining.
"""
from __future__ import annotations

import linecache
import os
import uuid
import warnings
from pathlib import Path

import pytest

import fewshot_nsl
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import RegistryError
from fewshot_nsl.identity import method_code_hash
from fewshot_nsl.registry import get_method_class, load_plugins
from fewshot_nsl.runner import conv_spec_of, run_identity
from fewshot_nsl.training import pretrain_cache_path

HEADER = ("import os\nimport torch\nfrom fewshot_nsl.registry import register_method\n"
          "from fewshot_nsl.methods import FewShotMethod\n")

#: A nearest-centroid plugin without training; ``{imports}`` brings ``SCALE`` (and ``VERSION``) from a helper.
CENTROID = HEADER + '''{imports}

@register_method("{name}")
class Centroid(FewShotMethod):
    training_stages = ()

    def fit_support(self, x, y):
        os.environ["{marker}"] = str(VERSION)  # which code ran
        self.means = self.class_means(self.backbone(x), y, int(y.max()) + 1)

    def forward(self, q):
        return -SCALE * torch.cdist(self.backbone(q), self.means)
'''


def _name(prefix: str = "ci") -> str:
    """A method name no other test registers (names are global to the process)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _centroid_plugin(folder: Path, name: str, style: str) -> Path:
    """A plugin folder: ``method.py`` importing ``SCALE``/``VERSION`` from ``cihelp_<name>.py`` beside it,
    with a top-level (``sibling``) or a relative (``relative``) import. Returns the helper's path."""
    folder.mkdir(parents=True, exist_ok=True)
    helper = f"cihelp_{name}"
    imports = f"from {helper} import SCALE, VERSION" if style == "sibling" else f"from .{helper} import SCALE, VERSION"
    (folder / f"{helper}.py").write_text("SCALE = 1.0\nVERSION = 1\n")
    (folder / "method.py").write_text(CENTROID.format(imports=imports, name=name, marker=f"CI_MARK_{name}"))
    return folder / f"{helper}.py"


def _cfg(tmp_path: Path, **over):
    base = {"method": "protonet", "dataset": "tiny", "image_size": 16, "profile": "smoke", "shots": 1,
            "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
            "eval": {"episodes": 2, "queries": 2}}
    return resolve_config({**base, **over})


# ----------------------------------------------------------------------------- helpers of a plugin
@pytest.mark.parametrize("style", ["sibling", "relative"])
def test_an_edited_helper_module_gives_a_new_code_identity(tmp_path, style):
    name = _name()
    folder = tmp_path / f"plugins_{style}"
    helper = _centroid_plugin(folder, name, style)
    load_plugins([folder])
    old = get_method_class(name)
    before = method_code_hash(old)
    assert method_code_hash(old) == before  # stable while nothing changes

    helper.write_text("SCALE = 2.0\nVERSION = 2\n")
    # the old class runs the old helper: its identity is refused, never recorded as the new code's
    with pytest.raises(RegistryError, match=r"changed on disk since it was imported .*; restart Python"):
        method_code_hash(old)
    load_plugins([folder])  # loading the folder again re-imports what changed
    new = get_method_class(name)
    assert new is not old
    assert method_code_hash(new) != before

    from fewshot_nsl.identity import method_code_files

    covered = {f.label: f.sha256 for f in method_code_files(new)}
    assert f"{folder.name}/{helper.name}" in covered and f"{folder.name}/method.py" in covered


def test_a_helper_imported_by_another_plugin_file_is_covered_too(tmp_path):
    """``from .shared import X`` where another plugin file of the folder imported ``shared`` first."""
    name = _name()
    folder = tmp_path / "plugins_shared"
    folder.mkdir()
    (folder / "shared.py").write_text("SCALE = 1.0\nVERSION = 1\n")
    (folder / "a_first.py").write_text("from .shared import SCALE\n")  # imports it before method.py does
    (folder / "method.py").write_text(CENTROID.format(imports="from .shared import SCALE, VERSION", name=name,
                                                      marker=f"CI_MARK_{name}"))
    load_plugins([folder])
    before = method_code_hash(get_method_class(name))
    (folder / "shared.py").write_text("SCALE = 3.0\nVERSION = 3\n")
    load_plugins([folder])
    assert method_code_hash(get_method_class(name)) != before


# ----------------------------------------------------------------------------- classes without a file
NOTEBOOK_CELL = HEADER + '''
@register_method("{name}")
class CellMethod(FewShotMethod):
    training_stages = ()
    SCALE = {scale}

    def fit_support(self, x, y):
        self.means = self.class_means(self.backbone(x), y, int(y.max()) + 1)

    def forward(self, q):
        return -self.SCALE * torch.cdist(self.backbone(q), self.means)
'''


def _exec_cell(source: str, filename: str, in_linecache: bool):
    """Define the cell's class as a notebook does (module ``__main__``, code compiled from a string);
    IPython keeps the cell's text in ``linecache`` under the cell's pseudo file name."""
    if in_linecache:
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["CellMethod"]


def test_a_notebook_class_is_hashed_from_its_cell_text():
    name = _name("cell")
    a = _exec_cell(NOTEBOOK_CELL.format(name=name, scale=1.0), "<ipython-input-1-ci>", True)
    same = _exec_cell(NOTEBOOK_CELL.format(name=name, scale=1.0), "<ipython-input-2-ci>", True)
    edited = _exec_cell(NOTEBOOK_CELL.format(name=name, scale=2.0), "<ipython-input-3-ci>", True)
    assert method_code_hash(a) == method_code_hash(same)  # the same text: reusable, whatever the cell number
    assert method_code_hash(edited) != method_code_hash(a)


def test_a_class_without_any_source_is_never_reused(tmp_path):
    name = _name("exec")
    source = NOTEBOOK_CELL.format(name=name, scale=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _exec_cell(source, "<string>", False)
        h = method_code_hash(first)
        assert method_code_hash(first) == h  # the same class object: one identity (its run resumes)
        second = _exec_cell(source, "<string>", False)
        assert method_code_hash(second) != h  # defined again: nothing proves it is the same code
    assert any("never reused" in str(w.message) for w in caught)

    # end to end: the class defined again is run again, not skipped as complete
    kw = dict(dataset="tiny", image_size=16, profile="smoke", shots=1, eval={"episodes": 2, "queries": 2},
              results_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"), threads=1)
    _exec_cell(source, "<string>", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = fewshot_nsl.benchmark(method=name, **kw)
        _exec_cell(source, "<string>", False)
        two = fewshot_nsl.benchmark(method=name, **kw)
    assert one["run_id"].iloc[0] != two["run_id"].iloc[0]
    assert len(list((tmp_path / "results" / "runs").iterdir())) == 2


# ----------------------------------------------------------------------------- edits within one process
def test_benchmark_after_an_edit_runs_the_new_code(tmp_path):
    name = _name()
    folder = tmp_path / "edited_plugins"
    helper = _centroid_plugin(folder, name, "sibling")
    kw = dict(method=name, plugins=[folder], dataset="tiny", image_size=16, profile="smoke", shots=1,
              eval={"episodes": 2, "queries": 2}, results_dir=str(tmp_path / "results"),
              cache_dir=str(tmp_path / "cache"), threads=1)
    one = fewshot_nsl.benchmark(**kw)
    assert os.environ[f"CI_MARK_{name}"] == "1"
    helper.write_text("SCALE = 2.0\nVERSION = 2\n")
    two = fewshot_nsl.benchmark(**kw)
    assert os.environ[f"CI_MARK_{name}"] == "2"  # the new helper ran, not the one imported first
    assert one["code_hash"].iloc[0] != two["code_hash"].iloc[0] and one["run_id"].iloc[0] != two["run_id"].iloc[0]

    # without re-importing (the runner used directly), the identity of the stale class is refused
    (folder / "method.py").write_text((folder / "method.py").read_text() + "\n# edited\n")
    with pytest.raises(RegistryError, match=r"plugin .*method\.py changed on disk since it was imported"):
        run_identity(_cfg(tmp_path, method=name))


def test_a_deleted_plugin_file_leaves_no_runnable_stale_class(tmp_path):
    name = _name()
    folder = tmp_path / "deleted_plugins"
    _centroid_plugin(folder, name, "relative")
    load_plugins([folder])
    old = get_method_class(name)
    (folder / "method.py").unlink()
    load_plugins([folder])  # the folder is re-imported: the method is gone
    with pytest.raises(RegistryError, match="changed on disk|re-imported"):
        method_code_hash(get_method_class(name) if name in fewshot_nsl.registry.METHODS else old)


# ----------------------------------------------------------------------------- the pretraining cache key
PRETRAIN_PLUGIN = HEADER + '''
from torch import nn


@register_method("{name}")
class Widened(FewShotMethod):
    training_stages = ("pretrain",)

{body}

    def fit_support(self, x, y):
        self.means = self.class_means(self.backbone(x), y, int(y.max()) + 1)

    def forward(self, q):
        return -torch.cdist(self.backbone(q), self.means)
'''

INIT_V1 = '''    def __init__(self, backbone, image_size=84):
        super().__init__(backbone, image_size)
        self.backbone.extra = nn.Identity()
'''
INIT_V2 = '''    def __init__(self, backbone, image_size=84):
        super().__init__(backbone, image_size)
        self.backbone.extra = nn.Dropout(0.5)
'''
PLAIN_ATTRIBUTE = '''    width = 2  # a plain class attribute: a base's __init__ may read it while building the module
'''


def _key(tmp_path, store, method: str) -> Path:
    cfg = _cfg(tmp_path, method=method)
    return pretrain_cache_path(cfg, store, conv_spec_of(cfg), get_method_class(method), tmp_path)


def test_a_plugin_init_that_changes_the_backbone_gets_its_own_pretraining(tmp_path, tiny_store):
    name = _name("pre")
    folder = tmp_path / "pretrain_plugins"
    folder.mkdir()
    src = folder / "widened.py"
    src.write_text(PRETRAIN_PLUGIN.format(name=name, body=INIT_V1))
    load_plugins([folder])
    first = _key(tmp_path, tiny_store, name)
    shared = _key(tmp_path, tiny_store, "finetune")
    assert first != shared  # its __init__ builds the module: not the built-ins' pretraining
    src.write_text(PRETRAIN_PLUGIN.format(name=name, body=INIT_V2))
    load_plugins([folder])
    assert _key(tmp_path, tiny_store, name) != first  # edited __init__: pretrained again


def test_the_built_ins_share_one_pretraining_and_an_episode_time_plugin_joins_them(tmp_path, tiny_store):
    keys = {m: _key(tmp_path, tiny_store, m) for m in ("finetune", "nearest_neighbor", "static_nsn", "meta_static_nsn")}
    assert len(set(keys.values())) == 1, keys
    name = _name("epi")
    folder = tmp_path / "episode_time_plugins"
    folder.mkdir()
    (folder / "head_only.py").write_text(PRETRAIN_PLUGIN.format(name=name, body=PLAIN_ATTRIBUTE))
    load_plugins([folder])
    # fit_support and forward run at test time only, but a plain attribute may change what is built
    assert _key(tmp_path, tiny_store, name) != keys["finetune"]
    (folder / "head_only.py").write_text(PRETRAIN_PLUGIN.format(name=name, body="    compilable = True\n"))
    load_plugins([folder])
    assert _key(tmp_path, tiny_store, name) == keys["finetune"]  # episode-time code only: shared


BACKBONE_PLUGIN = '''
from torch import nn
from fewshot_nsl.registry import register_backbone
from fewshot_nsl.backbones import cnn4


@register_backbone("{name}")
def tiny_net(conv_layer=None, **kw):
    net = cnn4(conv_layer=conv_layer, **kw)
    net.extra = nn.{layer}()
    return net
'''


def test_a_plugin_backbone_is_part_of_the_pretraining_key(tmp_path, tiny_store):
    name = _name("bb")
    folder = tmp_path / "backbone_plugins"
    folder.mkdir()
    (folder / "net.py").write_text(BACKBONE_PLUGIN.format(name=name, layer="Identity"))
    load_plugins([folder])
    cfg = _cfg(tmp_path, method="finetune", backbone=name)
    cls = get_method_class("finetune")
    first = pretrain_cache_path(cfg, tiny_store, conv_spec_of(cfg), cls, tmp_path)
    (folder / "net.py").write_text(BACKBONE_PLUGIN.format(name=name, layer="ReLU"))
    load_plugins([folder])
    assert pretrain_cache_path(cfg, tiny_store, conv_spec_of(cfg), cls, tmp_path) != first


def test_a_run_code_hash_covers_a_plugin_backbone(tmp_path):
    """For ``runner.run_identity``: the run's code hash with a plugin backbone changes with the backbone's code."""
    from fewshot_nsl.identity import run_code_hash
    from fewshot_nsl.registry import BACKBONES

    name = _name("rbb")
    folder = tmp_path / "run_backbone_plugins"
    folder.mkdir()
    (folder / "net.py").write_text(BACKBONE_PLUGIN.format(name=name, layer="Identity"))
    load_plugins([folder])
    proto = get_method_class("protonet")
    assert run_code_hash(proto, BACKBONES.get("cnn4")) == method_code_hash(proto)  # built-in backbone: unchanged
    first = run_code_hash(proto, BACKBONES.get(name))
    (folder / "net.py").write_text(BACKBONE_PLUGIN.format(name=name, layer="ReLU"))
    load_plugins([folder])
    assert run_code_hash(proto, BACKBONES.get(name)) != first
