"""Issue 13: per-shot profile sections, the paper profile's per-row protocols, and the options they need
(episodic lr step schedule and gradient clipping, Sung et al.'s RelationNet, first-order MAML, Ravi's
full-batch finetuning). The end-to-end check of every paper cell at 84 px is ``test_paper_cells_run`` (slow).
"""
from pathlib import Path

import pytest
import torch
import yaml

from fewshot_nsl import config as config_module
from fewshot_nsl.backbones import cnn4
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.registry import create_method
from fewshot_nsl.runner import build_method, load_store
from fewshot_nsl.training import meta_train, set_seed


# ----------------------------------------------------------------------------- per-shot sections
@pytest.mark.parametrize("shots, ways", [(1, 30), (5, 20), (3, None)])
def test_paper_protonet_trains_with_snell_ways_per_shot(shots, ways):
    cfg = resolve_config({"method": "protonet", "profile": "paper", "shots": shots})
    assert cfg.episodic.ways == ways  # 3 shots: no per-shot section, the method section's value (None)
    assert cfg.backbone_options == {"filters": 64} and cfg.episodic.lr_step == 2000


@pytest.mark.parametrize("shots, meta_batch, queries", [(1, 4, 15), (5, 2, 15)])
def test_paper_maml_meta_batch_per_shot_and_first_order(shots, meta_batch, queries):
    cfg = resolve_config({"method": "maml", "profile": "paper", "shots": shots})
    assert cfg.episodic.meta_batch == meta_batch and cfg.episodic.queries == queries
    assert cfg.method_options["first_order"] is True


@pytest.mark.parametrize("shots, queries", [(1, 15), (5, 10)])
def test_paper_relationnet_queries_per_shot(shots, queries):
    cfg = resolve_config({"method": "relationnet", "profile": "paper", "shots": shots})
    assert cfg.episodic.queries == queries and cfg.episodic.grad_clip == 0.5 and cfg.episodic.lr_step == 100000


def test_config_file_per_shot_section_wins_over_the_profile_and_loses_to_the_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("methods:\n  protonet:\n    episodic: {lr: 0.01}\n    shots:\n      1: {episodic: {ways: 7, queries: 3}}\n")
    cfg = resolve_config({"method": "protonet", "profile": "paper", "shots": 1}, str(f))
    assert (cfg.episodic.ways, cfg.episodic.queries, cfg.episodic.lr) == (7, 3, 0.01)
    cfg = resolve_config({"method": "protonet", "profile": "paper", "shots": 5}, str(f))
    assert (cfg.episodic.ways, cfg.episodic.queries) == (20, 15)  # the profile's 5-shot section
    cfg = resolve_config({"method": "protonet", "profile": "paper", "shots": 1,
                          "episodic": {"ways": 9}}, str(f))
    assert cfg.episodic.ways == 9


@pytest.mark.parametrize("body, match", [
    ("shots: 5", "must map shot counts to settings"),
    ("shots: {one: {episodic: {ways: 3}}}", "keys must be positive shot counts"),
    ("shots: {1: 30}", r"shots.1 in .* must be a mapping"),
    ("shots: {1: {shots: 5}}", "may not set shots"),
    ("shots: {1: {episodic: {wayz: 3}}}", "unknown config key.*wayz"),
])
def test_bad_per_shot_sections_are_refused(tmp_path, body, match):
    f = tmp_path / "c.yaml"
    f.write_text(f"methods:\n  protonet:\n    {body}\n")
    with pytest.raises(ConfigError, match=match):
        resolve_config({"method": "protonet", "profile": "smoke", "shots": 1}, str(f))


def test_every_table6_cell_resolves_and_builds_under_the_paper_profile():
    rows = yaml.safe_load((config_module.CONFIG_DIR / "table6.yaml").read_text())["rows"]
    for r in rows:
        cfg = resolve_config({"method": r["method"], "backbone": r["backbone"], "shots": r["shots"],
                              "profile": "paper", "image_size": 84, "device": "cpu"})
        method = build_method(cfg)
        assert method.backbone.feature_dim(84) > 0


def test_paper_meta_static_nsn_adapts_similarity_and_head_with_batch_statistics():
    # M_s-only adaptation (the method's literal-Eq.-7 default) measured at chance on glyphs: docs/protocols.md
    cfg = resolve_config({"method": "meta_static_nsn", "profile": "paper", "shots": 5})
    assert cfg.method_options["adapt_head"] is True and cfg.method_options["batch_norm"] == "batch"
    quick = resolve_config({"method": "meta_static_nsn", "profile": "quick", "shots": 5})
    assert quick.method_options["adapt_head"] is True and quick.method_options["batch_norm"] == "running"


def test_paper_dynamic_nsn_uses_the_authors_predictor_width_and_eps():
    cfg = resolve_config({"method": "dynamic_nsn", "profile": "paper"})
    assert cfg.conv["hidden"] == 64 and cfg.conv["predictor_bn_eps"] == 1e-3 and cfg.backbone_options["bn_eps"] == 1e-3
    assert cfg.conv["zero_init_residual"] is False  # authors' M_s = I + predictor(x), no gate (and the ablation)
    method = build_method(resolve_config({"method": "dynamic_nsn", "profile": "paper", "image_size": 32}))
    widths = {m.out_channels for n, m in method.named_modules() if n.endswith("conv1") and hasattr(m, "out_channels")}
    assert widths == {64}


# ----------------------------------------------------------------------------- lr schedule, clipping
def _episodic_cfg(tmp_path, method, episodic):
    f = tmp_path / "e.yaml"
    f.write_text(yaml.safe_dump({"episodic": {"steps": 5, "queries": 2, "checkpoint_every": 100, **episodic}}))
    return resolve_config({"method": method, "profile": "smoke", "dataset": "tiny", "image_size": 16, "shots": 1,
                           "backbone_options": {"filters": 4}, "device": "cpu"}, str(f))


def test_lr_step_schedule(tmp_path):
    cfg = _episodic_cfg(tmp_path, "protonet", {"lr": 0.01, "lr_step": 2, "lr_gamma": 0.5})
    set_seed(0)
    method = build_method(cfg)
    meta_train(method, load_store(cfg), cfg, torch.device("cpu"), tmp_path / "ck.pt", progress=False)
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.25)  # last step (index 4)
    # without a schedule the lr stays
    cfg = _episodic_cfg(tmp_path, "protonet", {"lr": 0.01})
    meta_train(build_method(cfg), load_store(cfg), cfg, torch.device("cpu"), tmp_path / "ck2.pt", progress=False)
    assert torch.load(tmp_path / "ck2.pt", weights_only=False)["optimizer"]["param_groups"][0]["lr"] == 0.01


def test_grad_clip_clips_each_group(tmp_path, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        out = real(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        calls.append((len(params), max_norm, float(before), float(after)))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = _episodic_cfg(tmp_path, "relationnet", {"grad_clip": 1e-3, "steps": 2})
    set_seed(0)
    method = build_method(cfg)
    meta_train(method, load_store(cfg), cfg, torch.device("cpu"), tmp_path / "ck.pt", progress=False)
    n_backbone = len(list(method.backbone.parameters()))
    assert [c[0] for c in calls] == [n_backbone, len(list(method.parameters())) - n_backbone] * 2
    assert all(c[1] == 1e-3 and c[3] <= 1e-3 * 1.01 for c in calls) and any(c[2] > 1e-3 for c in calls)
    calls.clear()
    cfg = _episodic_cfg(tmp_path, "relationnet", {"steps": 2})
    meta_train(build_method(cfg), load_store(cfg), cfg, torch.device("cpu"), tmp_path / "ck2.pt", progress=False)
    assert calls == []  # off by default


@pytest.mark.parametrize("bad, match", [({"lr_step": 0}, "lr_step must be at least 1"),
                                        ({"grad_clip": 0.0}, "grad_clip must be positive")])
def test_bad_schedule_options_are_refused(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        _episodic_cfg(tmp_path, "protonet", bad)


# ----------------------------------------------------------------------------- Sung et al.'s RelationNet
def test_relationnet_sung_network_shapes_and_gradients():
    torch.manual_seed(0)
    backbone = cnn4(filters=64, pool=[True, True, False, False], padding=[0, 0, 1, 1])
    method = create_method("relationnet", backbone=backbone, image_size=84, relation_padding=0, relation_ceil=False)
    assert method.fc[0].in_features == 64 * 3 * 3  # Sung et al.'s fc1: 19 -> 17 -> 8 -> 6 -> 3
    sy, qy = torch.arange(5), torch.arange(5)
    sx, qx = torch.randn(5, 3, 84, 84), torch.randn(5, 3, 84, 84)
    loss = method.loss(sx, sy, qx, qy)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    scores = method(qx)
    assert scores.shape == (5, 5) and ((scores >= 0) & (scores <= 1)).all()
    default = create_method("relationnet", backbone=cnn4(), image_size=84)
    assert default.fc[0].in_features == 32 * 2 * 2  # the suite's fully pooled CNN-4 (5x5 maps), unchanged


# ----------------------------------------------------------------------------- Ravi's finetuning
def test_finetune_full_batch_whole_network(monkeypatch):
    torch.manual_seed(0)
    method = create_method("finetune", backbone=cnn4(filters=4), image_size=16, finetune_backbone=True,
                           batch_size=None, epochs=3, momentum=0.0, dampening=0.0, weight_decay=0.0)
    sx, sy = torch.randn(10, 3, 16, 16), torch.arange(5).repeat(2)
    steps = []
    real_step = torch.optim.SGD.step

    def count(self, *a, **k):
        steps.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", count)
    with torch.no_grad():
        method.eval().fit_support(sx, sy)
    assert len(steps) == 3  # one full-batch step per pass
    backbone, _ = method._episode
    assert any(not torch.equal(a, b) for a, b in zip(backbone.parameters(), method.backbone.parameters()))


# ----------------------------------------------------------------------------- every paper cell, end to end
def _table6_cells():
    return [(r["method"], r["backbone"], r["shots"])
            for r in yaml.safe_load((config_module.CONFIG_DIR / "table6.yaml").read_text())["rows"]]


@pytest.mark.slow
@pytest.mark.parametrize("method, backbone, shots", _table6_cells())
def test_paper_cells_run_at_84px_with_cut_budgets(tmp_path, method, backbone, shots):
    """Every Table-6 cell under the paper profile on glyphs at 84 px, only the budgets cut
    (benchmarks/paper_cut_budget.yaml); timings: benchmarks/paper_cells.py."""
    from fewshot_nsl.runner import run

    cut = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_cut_budget.yaml"
    cfg = resolve_config({"method": method, "backbone": backbone, "shots": shots, "profile": "paper",
                          "dataset": "glyphs", "image_size": 84, "device": "cpu",
                          "results_dir": str(tmp_path / "results")}, str(cut))
    assert cfg.image_size == 84 and cfg.eval.episodes == 1
    row = run(cfg, progress=False, log=lambda *a: None)
    assert row["episodes"] == 1 and row["episodes_failed"] == 0 and 0.0 <= row["accuracy"] <= 100.0
