"""A plugin whose pretraining is the built-ins' shares their pretraining cache; one that changes what
pretraining runs keeps its own (``identity.pretraining_code_hash``, ``identity.pretraining_neutral``).

Before, any plugin class defining ``__init__`` (the README's template does) got a pretraining of its own, and
editing only its ``forward`` trained it again: plugin and built-in rows were then not compared on one pretraining
(on a GPU in fast mode two trainings need not give the same weights).
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fewshot_nsl import identity
from fewshot_nsl.config import resolve_config
from fewshot_nsl.registry import get_method_class, load_plugins
from fewshot_nsl.runner import conv_spec_of
from fewshot_nsl.training_state import pretrain_key

REPO = Path(__file__).resolve().parent.parent

HEADER = '''import torch
from torch import nn
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method
from fewshot_nsl.registry import get_method_class

'''

#: The README's template (``pretrained_backbone`` accepted), ``{forward}`` and the class line replaceable.
TEMPLATE = HEADER + '''
@register_method("{name}")
class {cls}:
    """Cosine similarity to class means."""
    training_stages = ("episodic",)

    def __init__(self, backbone, image_size=84, scale: float = 10.0, pretrained_backbone: bool = False):
        super().__init__(backbone, image_size)
        self.scale = scale

    def fit_support(self, support_x, support_y):
        f = torch.nn.functional.normalize(self.backbone(support_x), dim=1)
        ways = self.num_ways(support_y)
        self.means = torch.stack([f[support_y == k].mean(0) for k in range(ways)])

    def forward(self, query_x):
        q = torch.nn.functional.normalize(self.backbone(query_x), dim=1)
        return {forward}
'''

#: A plugin of which only ``__init__`` (or one more member) varies: ``{init}`` is the body after the signature.
VARIANT = HEADER + '''
def freeze(module):
    module.requires_grad_(False)
    return module


@register_method("{name}")
class Variant({base}):
    """A variant."""
    training_stages = ("pretrain",)

    def __init__(self, backbone, image_size=84, scale: float = 10.0, pretrained_backbone: bool = False):
{init}

{extra}
    def fit_support(self, x, y):
        self.means = self.class_means(self.backbone(x), y, int(y.max()) + 1)

    def forward(self, q):
        return -torch.cdist(self.backbone(q), self.means)
'''

SUPER = "        super().__init__(backbone, image_size)\n"

#: ``__init__`` bodies that only store options: the built-ins' pretraining.
SHARING_INITS = {
    "template": SUPER + "        self.scale = scale\n",
    "keywords_and_two_argument_super": ("        super(Variant, self).__init__(backbone=backbone, image_size=image_size)\n"
                                        "        self.scale, self.temperature = float(scale), 2.0\n"),
    "simpleshot_like": (SUPER + '        self.check_choice("norm", "cl2n", ("cl2n", "un"))\n'
                        '        if scale <= 0:\n            raise ValueError(f"scale must be positive, got {scale}")\n'
                        "        assert isinstance(scale, float)\n"
                        '        self.register_buffer("base_mean", torch.zeros(backbone.feature_dim(image_size)))\n'
                        "        self.dim = self.backbone.feature_dim(image_size)\n"
                        "        self.head = nn.Linear(self.dim, 5)  # a module of the method, not of its backbone\n"
                        "        self.centroids: torch.Tensor | None = None\n"),
    "docstring_and_options_first": ('        """Options."""\n        width = int(scale)\n        self.width = width\n'
                                    + SUPER),
}

#: Plugins that change what pretraining runs: ``(init body, extra members)``.
OWN_PRETRAINING = {
    "overrides_pretrain_module": (SUPER + "        self.proj = nn.Linear(backbone.feature_dim(image_size), 8)\n",
                                  "    def pretrain_module(self):\n"
                                  "        return nn.Sequential(self.backbone, self.proj)\n"),
    "overrides_regularization": (SUPER, "    def regularization(self):\n"
                                        "        return 1e-3 * sum(p.pow(2).sum() for p in self.backbone.parameters())\n"),
    "adds_a_module_to_the_backbone": (SUPER + "        self.backbone.extra = nn.Dropout(0.5)\n", ""),
    "wraps_the_backbone": ("        super().__init__(freeze(backbone), image_size)\n", ""),
    "rebinds_the_backbone": ("        backbone = freeze(backbone)\n" + SUPER, ""),
    "freezes_through_self": (SUPER + "        self.backbone.requires_grad_(False)\n", ""),
    "reinitialises_a_weight": (SUPER + "        nn.init.zeros_(backbone.blocks[0][0].weight)\n", ""),
    "passes_self_to_a_helper": (SUPER + "        self.frozen = freeze(self)\n", ""),
    "calls_its_own_helper": (SUPER + "        self.setup()\n", "    def setup(self):\n        self.backbone.eval()\n"),
    "loops_over_the_backbone": (SUPER + "        for m in backbone.modules():\n            m.momentum = 0.5\n", ""),
    "sets_pretrain_module_on_the_instance": (SUPER + "        self.pretrain_module = lambda: self.backbone\n", ""),
    "registers_a_backbone": (SUPER + '        self.add_module("backbone", nn.Sequential())\n', ""),
    "overrides_train": (SUPER, "    def train(self, mode=True):\n        return super().train(mode)\n"),
    "backbone_property": (SUPER, "    @property\n    def backbone(self):\n        return self._modules['x']\n"),
    "plain_class_attribute": (SUPER, "    width = 2\n"),
    "overrides_check_choice_it_calls": (SUPER + '        self.check_choice("a", "a", ("a",))\n',
                                        "    @classmethod\n    def check_choice(cls, option, value, choices):\n"
                                        "        pass\n"),
    "no_super_call": ("        nn.Module.__init__(self)\n        self.backbone = backbone\n", ""),
}


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _cfg(method: str, **options):
    return resolve_config({"method": method, "dataset": "tiny", "image_size": 16, "profile": "smoke", "shots": 1,
                           "device": "cpu", "method_options": options})


def _key(store, method: str, **options) -> str:
    cfg = _cfg(method, **options)
    return pretrain_key(cfg, store, conv_spec_of(cfg), get_method_class(method))


def _write(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plugin.py").write_text(text)
    load_plugins([folder])


def _variant(tmp_path: Path, case: str, init: str, extra: str = "", base: str = "FewShotMethod") -> str:
    name = _name("var")
    _write(tmp_path / f"{case}_{name}", VARIANT.format(name=name, init=init, extra=extra, base=base))
    return name


@pytest.fixture(scope="module")
def protonet_key(tmp_path_factory):
    from tiny_dataset_access import make_tiny_store

    store = make_tiny_store()
    return store, _key(store, "protonet", pretrained_backbone=True)


def test_the_template_plugin_shares_protonets_pretraining_and_editing_forward_keeps_it(tmp_path, protonet_key):
    store, proto = protonet_key
    name = _name("tmpl")
    folder = tmp_path / "template"
    _write(folder, TEMPLATE.format(name=name, cls="CosPB(FewShotMethod)", forward="self.scale * q @ self.means.T"))
    first = _key(store, name, pretrained_backbone=True)
    assert first == proto  # same backbone config, same pretraining settings: the built-ins' pretraining
    assert _key(store, "finetune") == proto
    _write(folder, TEMPLATE.format(name=name, cls="CosPB(FewShotMethod)", forward="(2 * self.scale * q) @ self.means.T"))
    assert _key(store, name, pretrained_backbone=True) == first  # forward runs at episode time only


def test_the_simpleshot_example_shares_the_built_ins_pretraining(protonet_key):
    store, proto = protonet_key
    load_plugins([REPO / "examples" / "simpleshot"])
    assert not identity.builds_pretrained_module(get_method_class("simpleshot"))
    assert _key(store, "simpleshot") == proto


@pytest.mark.parametrize("case", sorted(SHARING_INITS))
def test_an_init_that_only_stores_options_shares_the_pretraining(tmp_path, protonet_key, case):
    store, proto = protonet_key
    name = _variant(tmp_path, case, SHARING_INITS[case])
    assert _key(store, name) == proto


@pytest.mark.parametrize("case", sorted(OWN_PRETRAINING))
def test_a_plugin_that_changes_what_pretraining_runs_gets_its_own(tmp_path, protonet_key, case):
    store, proto = protonet_key
    init, extra = OWN_PRETRAINING[case]
    name = _variant(tmp_path, case, init, extra)
    assert identity.builds_pretrained_module(get_method_class(name))
    assert _key(store, name) != proto


def test_an_edited_pretrain_module_gives_a_new_key(tmp_path, protonet_key):
    store, proto = protonet_key
    name = _name("pm")
    folder = tmp_path / "pretrain_module"
    init = SUPER + "        self.proj = nn.Linear(backbone.feature_dim(image_size), 8)\n"
    extra = "    def pretrain_module(self):\n        return nn.Sequential(self.backbone, {layer})\n"
    _write(folder, VARIANT.format(name=name, init=init, extra=extra.format(layer="self.proj"), base="FewShotMethod"))
    first = _key(store, name)
    _write(folder, VARIANT.format(name=name, init=init, extra=extra.format(layer="nn.ReLU(), self.proj"),
                                  base="FewShotMethod"))
    assert first != proto and _key(store, name) not in (first, proto)


def test_an_init_edited_to_change_the_backbone_leaves_the_shared_pretraining(tmp_path, protonet_key):
    store, proto = protonet_key
    name = _name("edit")
    folder = tmp_path / "edited_init"
    _write(folder, VARIANT.format(name=name, init=SHARING_INITS["template"], extra="", base="FewShotMethod"))
    assert _key(store, name) == proto
    _write(folder, VARIANT.format(name=name, init=SUPER + "        self.backbone.requires_grad_(False)\n", extra="",
                                  base="FewShotMethod"))
    assert _key(store, name) != proto


def test_a_subclass_of_a_built_in(tmp_path, protonet_key):
    """Storing options and passing them on to the built-in's ``__init__`` shares; overriding a member the built-in's
    ``__init__`` calls (RelationNet's ``_map_side``) does not."""
    store, proto = protonet_key
    init = ("        super().__init__(backbone, image_size, temperature=scale, pretrained_backbone=pretrained_backbone)\n"
            "        self.extra_scale = scale\n")
    name = _variant(tmp_path, "proto_sub", init, base='get_method_class("protonet")')
    assert _key(store, name, pretrained_backbone=True) == proto
    init = SUPER + "        self.extra_scale = scale\n"
    extra = "    @staticmethod\n    def _map_side(backbone, image_size):\n        return 1\n"
    name = _variant(tmp_path, "relation_sub", init, extra, base='get_method_class("relationnet")')
    assert _key(store, name, pretrained_backbone=True) != proto


def test_a_decorated_or_sourceless_init_is_not_trusted(tmp_path):
    name = _name("deco")
    init = SUPER + "        self.scale = scale\n"
    text = VARIANT.format(name=name, init=init, extra="", base="FewShotMethod").replace(
        "    def __init__(self, backbone", "    @staticmethod\n    def _unused():\n        pass\n\n"
                                          "    @(lambda f: f)\n    def __init__(self, backbone")
    _write(tmp_path / "decorated", text)
    assert identity.builds_pretrained_module(get_method_class(name))

    namespace: dict = {}
    exec(compile("from fewshot_nsl.methods import FewShotMethod\n"
                 "class NoSource(FewShotMethod):\n"
                 "    training_stages = ('pretrain',)\n"
                 "    def __init__(self, backbone, image_size=84):\n"
                 "        super().__init__(backbone, image_size)\n"
                 "    def fit_support(self, x, y):\n        pass\n"
                 "    def forward(self, q):\n        return q\n", "<no file>", "exec"), namespace)
    assert not identity._init_stores_options(vars(namespace["NoSource"])["__init__"], frozenset())


def test_built_ins_keep_the_shared_rule():
    for m in ("finetune", "nearest_neighbor", "static_nsn", "meta_static_nsn", "dynamic_nsn", "protonet",
              "relationnet"):
        cls = get_method_class(m)
        assert not identity.builds_pretrained_module(cls), m
        assert identity.pretraining_code_hash(cls) == identity.shared_pretraining_code_hash(), m


def test_end_to_end_the_template_plugin_reuses_protonets_pretraining(tmp_path):
    """Through the harness: protonet (``pretrained_backbone``) trains the pretraining, the template plugin reuses
    it (the audit's repro: before, both said ``pretraining: trained``)."""
    import fewshot_nsl

    name = _name("e2e")
    folder = tmp_path / "e2e_plugins"
    folder.mkdir()
    (folder / "cos.py").write_text(TEMPLATE.format(name=name, cls="CosPB(FewShotMethod)",
                                                   forward="self.scale * q @ self.means.T"))
    common = dict(dataset="tiny", profile="smoke", image_size=16, results_dir=str(tmp_path / "results"),
                  cache_dir=str(tmp_path / "cache"), plugins=[REPO / "tests" / "plugins", folder], threads=1,
                  method_options={"pretrained_backbone": True}, eval={"episodes": 2, "queries": 2})
    lines: list = []
    fewshot_nsl.benchmark("protonet", log=lines.append, **common)
    assert [line for line in lines if line.startswith("pretraining:")][0].startswith("pretraining: trained")
    lines.clear()
    fewshot_nsl.benchmark(name, log=lines.append, **common)
    assert [line for line in lines if line.startswith("pretraining:")][0].startswith("pretraining: reused cache")
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.pt"))) == 1


def test_options_that_change_what_is_pretrained_join_the_key(tmp_path, protonet_key):
    """RelationNet's ``encoder_init: sung`` re-initialises the backbone pretraining starts from: its own key (at its
    default it shares the built-ins'); a plugin with a pretraining of its own gets one key per option value."""
    store, proto = protonet_key
    assert _key(store, "relationnet", pretrained_backbone=True) == proto
    sung = _key(store, "relationnet", pretrained_backbone=True, encoder_init="sung")
    assert sung != proto



def test_a_method_with_its_own_pretraining_keys_on_all_its_options(monkeypatch):
    from fewshot_nsl.training_state import pretraining_options

    cfg = _cfg("protonet", pretrained_backbone=True, temperature=5.0)
    assert pretraining_options(cfg, get_method_class("protonet")) == {}  # the shared pretraining: options left out
    monkeypatch.setattr(identity, "builds_pretrained_module", lambda cls: True)  # as for a plugin's own module
    assert pretraining_options(cfg, get_method_class("protonet")) == {"pretrained_backbone": True, "temperature": 5.0}
