"""Registration refuses what the harness cannot run, in one line naming the class, its file and the fix
(plugin audit, items 3 and 4):

* ``@register_method`` on a class that is not a ``FewShotMethod``, that leaves ``fit_support`` or
  ``forward`` to the base class, or whose constructor does not take ``backbone`` and ``image_size``;
* two classes of one file registering one name (the second no longer silently wins);
* the unknown-option message lists only what a config may set (not ``backbone`` / ``image_size``);
* ``--plugins`` given a file says it is a file and names its folder.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from fewshot_nsl import registry
from fewshot_nsl.cli import main
from fewshot_nsl.errors import RegistryError
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import (DuplicateNameError, InvalidMethodError, check_kwargs, create_method,
                                  get_method_class, list_methods, load_plugins, register_method)

HERE = str(Path(__file__).resolve())


def _name() -> str:
    return f"rc_{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def _forget_test_methods():
    """Registrations of this module's classes end with the test (``list_methods()`` stays the suite's)."""
    yield
    for name in [n for n in registry.METHODS.names() if n.startswith("rc_")]:
        for table in (registry.METHODS._entries, registry.METHODS._sources, registry.METHODS._namespaces):
            table.pop(name, None)


class _Good(FewShotMethod):
    def fit_support(self, x, y):
        self.means = self.class_means(self.backbone(x), y, self.num_ways(y))

    def forward(self, q):
        return -torch.cdist(self.backbone(q), self.means)


def _refused(cls, *fragments):
    name = _name()
    with pytest.raises(InvalidMethodError) as info:
        register_method(name)(cls)
    msg = str(info.value)
    assert "\n" not in msg and f"method '{name}'" in msg and cls.__qualname__ in msg and HERE in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert name not in registry.METHODS


def test_a_plain_module_is_refused():
    class NotAMethod(nn.Module):
        def __init__(self, backbone, image_size=84):
            super().__init__()
            self.backbone = backbone

        def fit_support(self, x, y):
            pass

        def forward(self, q):
            return q

    _refused(NotAMethod, "not a subclass of FewShotMethod", "derive it from fewshot_nsl.methods.FewShotMethod")


def test_a_function_is_refused():
    def factory(backbone, image_size=84):
        return _Good(backbone, image_size)

    name = _name()
    with pytest.raises(InvalidMethodError, match=r"is a function, not a subclass of FewShotMethod"):
        register_method(name)(factory)


@pytest.mark.parametrize("missing", ["fit_support", "forward", "both"])
def test_a_method_without_fit_support_or_forward_is_refused(missing):
    body = {}
    if missing != "fit_support" and missing != "both":
        body["fit_support"] = _Good.fit_support
    if missing != "forward" and missing != "both":
        body["forward"] = _Good.forward
    cls = type("Half", (FewShotMethod,), {**body, "__module__": __name__, "__qualname__": "Half"})
    expected = "fit_support and forward" if missing == "both" else missing
    _refused(cls, f"does not implement {expected}")


def test_a_constructor_without_image_size_is_refused():
    class NoImageSize(_Good):
        def __init__(self, backbone):
            super().__init__(backbone)

    _refused(NoImageSize, "does not take image_size", "__init__(self, backbone, image_size=84, ...)")


def test_a_constructor_without_backbone_is_refused():
    class NoBackbone(_Good):
        def __init__(self, net, image_size=84):
            super().__init__(net, image_size)

    _refused(NoBackbone, "does not take backbone")


def test_what_the_harness_can_run_is_accepted():
    class Kwargs(_Good):  # **kwargs passed on to the base
        def __init__(self, scale=1.0, **kwargs):
            super().__init__(**kwargs)

    class KeywordOnly(_Good):
        def __init__(self, *, backbone, image_size=84, scale: float = 1.0):
            super().__init__(backbone, image_size)

    class ForwardMixin:
        def forward(self, q):
            return -torch.cdist(self.backbone(q), self.means)

    class Mixed(ForwardMixin, FewShotMethod):  # forward from a mixin, fit_support of its own
        def fit_support(self, x, y):
            self.means = self.class_means(self.backbone(x), y, self.num_ways(y))

    proto = get_method_class("protonet")

    class FromABuiltIn(proto):  # everything inherited from a registered method
        pass

    for cls in (Kwargs, KeywordOnly, Mixed, FromABuiltIn):
        name = _name()
        assert register_method(name)(cls) is cls and get_method_class(name) is cls


PLUGIN_TWO = '''
import torch
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


@register_method("{name}")
class {first}(FewShotMethod):
    def fit_support(self, x, y):
        self.means = self.class_means(self.backbone(x), y, self.num_ways(y))

    def forward(self, q):
        return -torch.cdist(self.backbone(q), self.means)
{second}'''
SECOND = '''

@register_method("{name}")   # copy-pasted, forgot to rename
class Second({first}):
    def forward(self, q):
        return 10 * torch.nn.functional.normalize(self.backbone(q), dim=1) @ self.means.T
'''


def test_two_classes_of_one_file_under_one_name_are_refused(tmp_path):
    name = _name()
    folder = tmp_path / "dup"
    folder.mkdir()
    src = folder / "two.py"
    src.write_text(PLUGIN_TWO.format(name=name, first="First", second=SECOND.format(name=name, first="First")))
    with pytest.raises(DuplicateNameError) as info:
        load_plugins([folder])
    msg = str(info.value)
    assert "\n" not in msg and f"method '{name}' is registered twice in {src.resolve()}" in msg, msg
    assert "by Second and already by First" in msg and "rename one of them" in msg


def test_the_same_file_imported_again_or_edited_still_registers(tmp_path):
    """Re-importing a file (an edit, even renaming the class) is not a duplicate."""
    name = _name()
    folder = tmp_path / "renamed"
    folder.mkdir()
    src = folder / "one.py"
    src.write_text(PLUGIN_TWO.format(name=name, first="Before", second=""))
    load_plugins([folder])
    assert get_method_class(name).__qualname__ == "Before"
    src.write_text(PLUGIN_TWO.format(name=name, first="After", second=""))
    load_plugins([folder])  # changed on disk: imported again
    assert get_method_class(name).__qualname__ == "After"


BROKEN = '''
from torch import nn
from fewshot_nsl.registry import register_method


@register_method("{name}")
class NotAMethod(nn.Module):
    """Plain nn.Module."""
    def forward(self, q):
        return q
'''


def test_a_broken_plugin_class_is_named_and_list_still_works(tmp_path, capsys):
    name = _name()
    folder = tmp_path / "broken_class"
    folder.mkdir()
    (folder / "bad.py").write_text(BROKEN.format(name=name))
    with pytest.warns(UserWarning, match="not a subclass of FewShotMethod"):
        load_plugins([folder])
    assert name not in list_methods()
    assert main(["--plugins", str(folder), "--list"]) == 0  # was: AttributeError 'training_stages'
    out = capsys.readouterr().out
    assert f"bad.py not loaded: InvalidMethodError: method '{name}': NotAMethod" in out


def test_unknown_option_lists_only_what_a_config_may_set():
    proto = get_method_class("protonet")
    with pytest.raises(RegistryError) as info:
        check_kwargs(proto, {"sclae": 3.0}, "method 'protonet'")  # as the config check calls it
    msg = str(info.value)
    assert msg == "unknown option(s) sclae for method 'protonet'; accepted: pretrained_backbone, temperature", msg
    # create_method takes backbone and image_size as keywords: there they are listed
    with pytest.raises(RegistryError, match=r"accepted: backbone, image_size, pretrained_backbone, temperature"):
        create_method("protonet", backbone=None, sclae=3.0)


def test_unknown_option_from_the_command_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("method_options:\n  sclae: 3.0\n")
    code = main(["--method", "protonet", "--config", str(cfg), "--profile", "smoke", "--results-dir",
                 str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: unknown option(s) sclae for method 'protonet'; accepted: pretrained_backbone, "
                                 "temperature"), err


def test_plugins_given_a_file_names_its_folder(tmp_path, capsys):
    plugin = tmp_path / "lab" / "my_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text("X = 1\n")
    with pytest.raises(RegistryError) as info:
        load_plugins([plugin])
    msg = str(info.value)
    assert "\n" not in msg and f"plugin folder {plugin} is a file, not a folder" in msg, msg
    assert msg.endswith(f"--plugins {plugin.parent}") and "does not exist" not in msg
    assert main(["--plugins", str(plugin), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: plugin folder") and "is a file, not a folder" in err and "\n" not in err
