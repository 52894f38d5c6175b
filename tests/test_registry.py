import sys
import textwrap

import pytest

from fewshot_nsl import registry
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
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "test_entry_point" in list_methods()


def test_missing_plugin_folder(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_plugins([tmp_path / "nope"])
