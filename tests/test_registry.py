import sys
import textwrap

import pytest

from fewshot_nsl import plugins, registry
from fewshot_nsl.errors import RegistryError
from fewshot_nsl.registry import create_method, list_methods, load_plugins


PLUGIN = '''
import torch
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method

@register_method("{name}")
class Centroid(FewShotMethod):
    """Third-party test plugin: cosine to class centroids."""
    training_stages = ()
    def __init__(self, backbone, image_size=84, scale: float = 10.0):
        super().__init__(backbone, image_size)
        self.scale = scale
    def fit_support(self, x, y):
        f = torch.nn.functional.normalize(self.backbone(x), dim=1)
        self.c = torch.stack([f[y == k].mean(0) for k in range(int(y.max()) + 1)])
    def forward(self, x):
        return self.scale * torch.nn.functional.normalize(self.backbone(x), dim=1) @ self.c.T
'''


def test_builtin_plugins_are_listed():
    names = list_methods()
    assert {"protonet", "nearest_neighbor"} <= set(names)


def test_unknown_method_lists_available():
    with pytest.raises(RegistryError, match="unknown method 'protonett'; available methods: .*protonet"):
        create_method("protonett", backbone=None)


def test_unknown_option_lists_accepted():
    from fewshot_nsl.backbones import cnn4

    with pytest.raises(RegistryError, match="unknown option.*tempreature.*accepted: .*temperature"):
        create_method("protonet", backbone=cnn4(), tempreature=2.0)


def test_plugin_folder_registers_and_runs(tmp_path, tiny_store):
    import torch
    from fewshot_nsl.backbones import cnn4

    (tmp_path / "my_centroid.py").write_text(PLUGIN.format(name="test_centroid"))
    load_plugins([tmp_path])
    assert "test_centroid" in list_methods()
    m = create_method("test_centroid", backbone=cnn4(filters=8), scale=5.0)
    x = torch.randn(10, 3, 16, 16)
    y = torch.arange(5).repeat_interleave(2)
    with torch.no_grad():
        m.fit_support(x, y)
        assert m(x).shape == (10, 5)


def test_broken_plugin_is_named_and_others_keep_working(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "fine.py").write_text(PLUGIN.format(name="test_fine"))
    with pytest.warns(UserWarning, match="broken.py failed to import"):
        load_plugins([tmp_path])
    assert "test_fine" in list_methods()
    assert any("broken.py" in k and "boom" in v for k, v in registry.PLUGIN_ERRORS.items())


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A third-party package exposing the ``fewshot_nsl.methods`` entry-point group."""
    pkg = tmp_path / "thirdparty_fsl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN.format(name="test_entry_point"))
    dist = tmp_path / "thirdparty_fsl-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-fsl\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [fewshot_nsl.methods]
        centroid = thirdparty_fsl
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    assert "test_entry_point" in list_methods()


def test_missing_plugin_folder(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_plugins([tmp_path / "nope"])


# ----------------------------------------------------------------------------- issue 11 item 4, issue 12


def test_builtin_baselines_come_from_the_entry_point_group():
    """The baselines register through ``fewshot_nsl.methods`` like any third-party package (the
    checkout's editable install maps ``baselines/`` to ``fewshot_nsl.baselines``)."""
    import importlib.metadata

    list_methods()
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    if "protonet" not in eps:
        pytest.skip("not installed (a bare checkout): baselines/ is loaded as a plugin folder")
    assert eps["protonet"] == "fewshot_nsl.baselines.protonet"
    assert "fewshot_nsl.baselines.protonet" in sys.modules
    assert registry.METHODS.source("protonet") == str((registry.BASELINES_DIR / "protonet.py").resolve())


@pytest.mark.parametrize("file_name", ["protonet.py", "my_protonet.py"])
def test_a_taken_name_is_refused_whatever_the_file_is_called(tmp_path, file_name):
    list_methods()
    (tmp_path / file_name).write_text(PLUGIN.format(name="protonet"))
    builtin = registry.METHODS.get("protonet")
    with pytest.raises(registry.DuplicateNameError) as err:
        load_plugins([tmp_path])
    msg = str(err.value)
    assert "\n" not in msg and "method 'protonet' is registered twice" in msg
    assert str(tmp_path / file_name) in msg and str(registry.BASELINES_DIR / "protonet.py") in msg
    assert registry.METHODS.get("protonet") is builtin  # the built-in is kept


def test_importing_the_same_file_again_is_harmless(tmp_path):
    path = tmp_path / "again.py"
    path.write_text(PLUGIN.format(name="test_again"))
    registry.load_plugin_file(path)
    first = registry.METHODS.get("test_again")
    del sys.modules[registry.plugin_module_name(path)]  # a fresh import of the very same file
    registry.load_plugin_file(path)
    assert registry.METHODS.get("test_again") is not first
    assert registry.METHODS.source("test_again") == str(path.resolve())


def test_plugin_folders_with_the_same_name_are_kept_apart(tmp_path):
    a, b = tmp_path / "a" / "plugins", tmp_path / "b" / "plugins"
    for folder, name in ((a, "test_same_folder_a"), (b, "test_same_folder_b")):
        folder.mkdir(parents=True)
        (folder / "method.py").write_text(PLUGIN.format(name=name))
    load_plugins([a, b])
    assert {"test_same_folder_a", "test_same_folder_b"} <= set(list_methods())
    assert registry.plugin_module_name(a / "method.py") != registry.plugin_module_name(b / "method.py")


SIBLING_PLUGIN = '''
from helpers import SCALE          # a module beside this file
from .consts import OFFSET          # the same, relative
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method

@register_method("{name}")
class Scaled(FewShotMethod):
    """Uses its sibling modules."""
    training_stages = ()
    scale = SCALE + OFFSET
    def fit_support(self, x, y):
        pass
    def forward(self, x):
        return x.new_zeros(len(x), 2)
'''


def test_a_plugin_imports_the_modules_beside_it(tmp_path):
    """Two folders with a ``helpers.py`` each: every plugin gets its own (no name clash)."""
    for i, name in enumerate(["test_sibling_one", "test_sibling_two"]):
        folder = tmp_path / f"lab{i}"
        folder.mkdir()
        (folder / "helpers.py").write_text(f"SCALE = {10 * (i + 1)}\n")
        (folder / "consts.py").write_text("OFFSET = 1\n")
        (folder / "scaled.py").write_text(SIBLING_PLUGIN.format(name=name))
        load_plugins([folder])
    assert registry.METHODS.get("test_sibling_one").scale == 11
    assert registry.METHODS.get("test_sibling_two").scale == 21
    assert "helpers" not in sys.modules  # siblings do not leak as top-level modules
    assert not registry.PLUGIN_ERRORS.get(str((tmp_path / "lab0" / "helpers.py").resolve()))


def test_every_baseline_file_has_its_entry_point():
    """``baselines/*.py`` and the ``fewshot_nsl.methods`` entry points of pyproject.toml list the same
    modules (an unlisted file still registers in a checkout, but an installed wheel would then rely
    on that fallback rather than on the entry-point group)."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    listed = set(pyproject["project"]["entry-points"][registry.ENTRY_POINT_GROUP].values())
    files = {f"fewshot_nsl.baselines.{p.stem}" for p in registry.BASELINES_DIR.glob("*.py") if not p.name.startswith("_")}
    assert listed == files
