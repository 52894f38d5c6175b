"""``load_method`` refuses a run whose method's code changed since the run (plugin audit, item 2): the
run's weights would silently run under other code. ``allow_changed_code=True`` loads them anyway."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

import fewshot_nsl
from fewshot_nsl.errors import ConfigError, RegistryError

PLUGIN = '''import torch
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method
from lmc_helper_{uid} import SCALE


@register_method("{name}")
class ScaledCentroid(FewShotMethod):
    """Nearest centroid with a learnt temperature."""
    training_stages = ("episodic",)

    def __init__(self, backbone, image_size=84):
        super().__init__(backbone, image_size)
        self.log_scale = torch.nn.Parameter(torch.zeros(()))

    def fit_support(self, x, y):
        self.means = self.class_means(self.backbone(x), y, self.num_ways(y))

    def forward(self, q):
        return -SCALE * self.log_scale.exp() * torch.cdist(self.backbone(q), self.means)
'''


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A finished run of a plugin method whose helper lives in another folder on ``sys.path``:
    ``(run folder, plugin folder, helper file)``."""
    uid = uuid.uuid4().hex[:10]
    name = f"lmc_{uid}"
    lib = tmp_path / "lib"
    lib.mkdir()
    helper = lib / f"lmc_helper_{uid}.py"
    helper.write_text("SCALE = 1.0\n")
    monkeypatch.syspath_prepend(str(lib))
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "scaled.py").write_text(PLUGIN.format(uid=uid, name=name))
    rows = fewshot_nsl.benchmark(method=name, plugins=[folder], dataset="tiny", image_size=16, profile="smoke",
                                 shots=1, episodic={"steps": 2}, eval={"episodes": 2, "queries": 2},
                                 results_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"), threads=1)
    run = tmp_path / "results" / "runs" / rows["run_id"].iloc[0]
    assert (run / "method.pt").is_file()
    return run, folder, helper


def _predict(model):
    from conftest import make_tiny_store

    store = make_tiny_store()
    test = store.classes_in_split("test")[:2]
    sup = np.concatenate([np.flatnonzero(store.labels == c)[:1] for c in test])
    qry = np.concatenate([np.flatnonzero(store.labels == c)[1:3] for c in test])
    return model.predict(store.images[sup], np.array(["a", "b"]), store.images[qry])


def test_an_unchanged_run_loads(trained):
    run, folder, _ = trained
    assert _predict(fewshot_nsl.load_method(run, plugins=folder)).shape == (4,)


@pytest.mark.parametrize("edit", ["plugin", "helper"])
def test_a_run_whose_method_code_changed_is_refused_in_one_line(trained, edit):
    run, folder, helper = trained
    if edit == "plugin":
        src = folder / "scaled.py"
        src.write_text(src.read_text().replace("-SCALE *", "-2 * SCALE *"))
        changed = "plugins/scaled.py (edited)"
    else:
        helper.write_text("SCALE = 5.0\n")
        changed = f"{helper.name} (edited)"
    with pytest.raises(RegistryError) as info:
        fewshot_nsl.load_method(run, plugins=folder)
    msg = str(info.value)
    assert "\n" not in msg and run.name in msg and "changed since run" in msg and changed in msg, msg
    assert "allow_changed_code=True" in msg

    lines = []
    model = fewshot_nsl.load_method(run, plugins=folder, allow_changed_code=True, log=lines.append)
    assert _predict(model).shape == (4,)
    assert any(line.startswith("warning:") and changed in line for line in lines), lines


def test_allow_changed_code_must_be_a_bool(trained):
    run, folder, _ = trained
    with pytest.raises(ConfigError, match="allow_changed_code must be True or False"):
        fewshot_nsl.load_method(run, plugins=folder, allow_changed_code="yes")
