"""Behaviour of the Table-6 baselines in baselines/: finetune, matchingnet, maml, relationnet (+ l2l_metasgd)."""
import copy
import importlib.util

import pytest
import torch

from fewshot_nsl.backbones import cnn4
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.registry import create_method
from fewshot_nsl.runner import run

from conftest import synthetic_episode  # noqa: E402

SIZE = 16


def episode(ways=5, shots=2, queries=3, seed=0):
    return synthetic_episode(ways, shots, queries, seed, SIZE)


def make(name, **options):
    torch.manual_seed(0)
    return create_method(name, backbone=cnn4(filters=8), image_size=SIZE, **options)


@pytest.mark.parametrize("finetune_backbone", [False, True])
def test_finetune_never_changes_the_pretrained_backbone(finetune_backbone):
    method = make("finetune", finetune_backbone=finetune_backbone, epochs=5).eval()
    before = copy.deepcopy(method.backbone.state_dict())
    sx, sy, qx, _ = episode()
    with torch.no_grad():  # as the harness calls it
        method.fit_support(sx, sy)
        logits = method(qx)
    assert logits.shape == (15, 5) and torch.isfinite(logits).all()
    for k, v in method.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    adapted, head = method._episode
    assert head.weight.shape == (5, method.feature_dim)
    changed = any(not torch.equal(p, q) for p, q in zip(adapted.parameters(), method.backbone.parameters()))
    assert changed == finetune_backbone  # the episode copy is trained only when asked
    assert sum(p.numel() for p in method.parameters()) == sum(p.numel() for p in method.backbone.parameters())


def test_maml_first_and_second_order_meta_gradients_differ():
    grads = {}
    for first_order in (False, True):
        method = make("maml", first_order=first_order, inner_steps=2).train()
        method.loss(*episode()).backward()
        grads[first_order] = torch.cat([p.grad.flatten() for p in method.parameters()])
        assert torch.isfinite(grads[first_order]).all()
    assert not torch.allclose(grads[False], grads[True], rtol=1e-3, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0)
    assert cos > 0.5  # first order approximates the same direction


def test_maml_uses_batch_statistics_in_eval_mode_and_checks_ways():
    method = make("maml", inner_steps_test=3).eval()
    bns = [m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.running_mean is None and not bn.track_running_stats for bn in bns)
    sx, sy, qx, _ = episode(ways=3)
    with torch.no_grad():
        method.fit_support(sx, sy)
        assert method(qx).shape == (9, 3)  # fewer ways than the head: logits are sliced
    with pytest.raises(ConfigError, match="5-way head but the episode has 7 ways"):
        method.fit_support(*episode(ways=7)[:2])


def test_relationnet_scores_are_in_unit_interval_and_sum_support_maps():
    method = make("relationnet").train()
    sx, sy, qx, qy = episode(shots=3)
    loss = method.loss(sx, sy, qx, qy)
    assert 0 < loss.item() < 1
    method.eval()
    with torch.no_grad():
        method.fit_support(sx, sy)
        scores = method(qx)
        maps = method.backbone.forward_map(sx)
    assert scores.shape == (15, 5) and (scores >= 0).all() and (scores <= 1).all()
    torch.testing.assert_close(method.prototypes[2], maps[sy == 2].sum(0))


@pytest.mark.parametrize("size", [16, 21, 42, 84])
def test_relationnet_handles_small_and_large_maps(size):
    torch.manual_seed(0)
    method = create_method("relationnet", backbone=cnn4(filters=4), image_size=size).eval()
    with torch.no_grad():
        method.fit_support(torch.randn(5, 3, size, size), torch.arange(5))
        assert method(torch.randn(4, 3, size, size)).shape == (4, 5)


def test_matchingnet_fce_adds_lstms_and_gives_log_probabilities():
    with_fce, without = make("matchingnet", fce=True, processing_steps=3), make("matchingnet", fce=False)
    n_fce = sum(p.numel() for p in with_fce.parameters())
    n_plain = sum(p.numel() for p in without.parameters())
    d = with_fce.backbone.feature_dim(SIZE)
    assert n_fce - n_plain == 2 * 4 * (2 * d * d + 2 * d) + 4 * (2 * d * d + 2 * d)  # bi-LSTM + LSTM cell
    sx, sy, qx, _ = episode()
    for method in (with_fce, without):
        method.eval()
        with torch.no_grad():
            method.fit_support(sx, sy)
            logits = method(qx)
        torch.testing.assert_close(logits.exp().sum(1), torch.ones(15))


def quick_tiny_run(tmp_path, method, **extra):
    cli = {
        "method": method, "profile": "smoke", "dataset": "tiny", "ways": 5, "shots": 2, "image_size": SIZE,
        "results_dir": str(tmp_path / "results"),
        "cache_dir": str(tmp_path / "cache"), "device": "cpu", "eval": {"episodes": 12, "queries": 5},
    }
    cli.update(extra)
    return run(resolve_config(cli), progress=False, log=lambda *a: None)


BEAT_CHANCE = [  # a few training steps suffice on the tiny dataset (chance: 20%)
    ("finetune", {"pretrain": {"max_steps": 30}, "method_options": {"epochs": 100}}),
    ("matchingnet", {"episodic": {"steps": 10}}),
    ("maml", {"episodic": {"steps": 10}}),
    ("relationnet", {"episodic": {"steps": 30, "lr": 0.003}}),
]
if importlib.util.find_spec("learn2learn") and importlib.util.find_spec("gym"):
    BEAT_CHANCE.append(("l2l_metasgd", {"episodic": {"steps": 10}}))


@pytest.mark.parametrize("method,extra", BEAT_CHANCE, ids=[m for m, _ in BEAT_CHANCE])
def test_baseline_beats_chance_after_a_short_run(tmp_path, method, extra):
    row = quick_tiny_run(tmp_path, method, **extra)
    assert row["episodes"] == 12 and row["episodes_failed"] == 0
    assert row["accuracy"] > 30.0, row["accuracy"]  # chance is 20%


def test_l2l_plugin_without_learn2learn_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import importlib.util
    import shutil

    from fewshot_nsl import registry
    from fewshot_nsl.cli import _list

    plugin = tmp_path / "l2l_missing" / "l2l_metasgd.py"
    plugin.parent.mkdir()
    shutil.copy(registry.BASELINES_DIR / "l2l_metasgd.py", plugin)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "learn2learn" else real(name, *a))
    monkeypatch.setattr(registry, "PLUGIN_ERRORS", {})
    with pytest.warns(UserWarning, match="l2l_metasgd.py failed to import"):
        registry.load_plugin_file(plugin)
    assert registry.PLUGIN_ERRORS == {
        str(plugin): "ImportError: the optional package learn2learn is not installed; install it with "
        "`pip install \"gym>=0.26\" && pip install --no-deps --config-settings=--build-option=build_ext "
        "learn2learn==0.2.0` (in a checkout: `make install`)"
    }
    _list(print)
    lines = [l for l in capsys.readouterr().out.splitlines() if "not loaded" in l]
    assert lines == [f"  (plugin {plugin} not loaded: {registry.PLUGIN_ERRORS[str(plugin)]})"]


@pytest.mark.parametrize("method", ["protonet", "relationnet"])
def test_pretrained_backbone_option_adds_the_cached_pretraining_stage(tmp_path, method):
    """``pretrained_backbone: true`` runs (or reuses) the shared base-class pretraining before the
    episodic stage; the default trains from scratch with no pretraining."""
    from fewshot_nsl.runner import run_dir_of, stages_of

    cli = {"method": method, "profile": "smoke", "dataset": "tiny", "ways": 5, "shots": 2, "image_size": SIZE,
           "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"), "device": "cpu",
           "eval": {"episodes": 4, "queries": 5}, "episodic": {"steps": 2}, "pretrain": {"max_steps": 3}}
    assert stages_of(resolve_config(cli)) == ("episodic",)
    cfg = resolve_config({**cli, "method_options": {"pretrained_backbone": True}})
    assert stages_of(cfg) == ("pretrain", "episodic")
    run(cfg, progress=False, log=lambda *a: None)
    import json

    training = json.loads((run_dir_of(cfg) / "train.json").read_text())["training"]
    assert set(training) == {"pretrain", "episodic"} and training["episodic"]["steps"] == 2
    assert list((tmp_path / "cache" / "pretrain").glob("*.pt")), "the pretraining was not cached"
