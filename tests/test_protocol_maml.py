"""Issue 26, item 1: Finn et al.'s MAML arithmetic (cbfinn/maml) in the ``paper`` profile: the per-shot
cross-entropy (inner step ``N * lr`` on the mean loss), the +-10 element clip of the meta-gradient, BN without
a learned scale; the meta-learned static NSN inherits the first two."""
import pytest
import torch
import yaml
from torch import nn

from fewshot_nsl.backbones import cnn4
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.methods import episode_cross_entropy
from fewshot_nsl.registry import create_method
from fewshot_nsl.runner import build_method, load_store
from fewshot_nsl.training import meta_train, set_seed


def _maml(**options):
    torch.manual_seed(0)
    return create_method("maml", backbone=cnn4(filters=4), image_size=16, ways=5, **options)


def test_per_shot_loss_is_ways_times_the_mean(episode_factory):
    torch.manual_seed(0)
    logits, y = torch.randn(25, 5), torch.arange(5).repeat_interleave(5)
    mean = episode_cross_entropy(logits, y, shots=5)
    assert episode_cross_entropy(logits, y, shots=5, reduction="per_shot") == pytest.approx(5 * float(mean), rel=1e-6)


def test_per_shot_inner_step_equals_five_times_the_lr_on_the_mean(episode_factory):
    sx, sy, _, _ = episode_factory(ways=5, shots=2, size=16)
    source = _maml(inner_lr=0.01, inner_steps_test=1, loss_reduction="per_shot")
    mean = _maml(inner_lr=0.05, inner_steps_test=1)
    mean.load_state_dict(source.state_dict())
    _, fast_source = source.adapt(sx, sy, 1, track_higher_grads=False)
    _, fast_mean = mean.adapt(sx, sy, 1, track_higher_grads=False)
    moved = max(float((a - p).detach().abs().max()) for a, p in zip(fast_source, source.network().parameters()))
    assert moved > 1e-4
    for a, b in zip(fast_source, fast_mean):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the mean loss with the source's 0.01 takes a five times smaller step: not the same weights
    small = _maml(inner_lr=0.01, inner_steps_test=1)
    small.load_state_dict(source.state_dict())
    _, fast_small = small.adapt(sx, sy, 1, track_higher_grads=False)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(fast_source, fast_small))


def test_grad_clip_value_clips_each_element():
    m = _maml(grad_clip_value=10.0)
    for i, p in enumerate(m.parameters()):
        p.grad = torch.full_like(p, 50.0 if i % 2 else -50.0)
    m.clip_gradients()
    assert all(float(p.grad.abs().max()) == 10.0 for p in m.parameters())
    off = _maml()
    for p in off.parameters():
        p.grad = torch.full_like(p, 50.0)
    off.clip_gradients()
    assert all(float(p.grad.max()) == 50.0 for p in off.parameters())
    with pytest.raises(ConfigError, match="grad_clip_value"):
        _maml(grad_clip_value=0.0)
    with pytest.raises(ConfigError, match="loss_reduction"):
        _maml(loss_reduction="sum")


def test_meta_training_calls_the_methods_clip(tmp_path, monkeypatch):
    f = tmp_path / "e.yaml"
    f.write_text(yaml.safe_dump({"episodic": {"steps": 2, "queries": 2, "checkpoint_every": 100},
                                 "method_options": {"grad_clip_value": 1e-4, "inner_steps": 1, "inner_steps_test": 1}}))
    cfg = resolve_config({"method": "maml", "profile": "smoke", "dataset": "tiny", "image_size": 16, "shots": 1,
                          "backbone_options": {"filters": 4}, "device": "cpu"}, str(f))
    seen = []
    real = torch.optim.Adam.step

    def spy(self, *a, **k):  # the gradients the optimiser steps with
        seen.append(max(float(p.grad.abs().max()) for g in self.param_groups for p in g["params"] if p.grad is not None))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    set_seed(0)
    meta_train(build_method(cfg), load_store(cfg), cfg, torch.device("cpu"), tmp_path / "ck.pt", progress=False)
    assert len(seen) == 2 and all(v <= 1e-4 for v in seen)


def test_bn_scale_false_drops_gamma_keeps_beta():
    m = _maml(bn_scale=False)
    bns = [b for b in m.backbone.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns and all(b.weight is None and isinstance(b.bias, nn.Parameter) for b in bns)
    assert all(b.weight is not None for b in _maml().backbone.modules() if isinstance(b, nn.BatchNorm2d))
    x = torch.randn(4, 3, 16, 16)
    assert torch.isfinite(m.network()(x)).all()


@pytest.mark.parametrize("shots", [1, 5])
def test_paper_profile_runs_maml_with_the_sources_arithmetic(shots):
    cfg = resolve_config({"method": "maml", "profile": "paper", "shots": shots})
    o = cfg.method_options
    assert (o["inner_lr"], o["loss_reduction"], o["grad_clip_value"], o["bn_scale"]) == (0.01, "per_shot", 10.0, False)
    assert cfg.backbone_options["bn_eps"] == 1e-3
    method = build_method(resolve_config({"method": "maml", "profile": "paper", "shots": shots, "image_size": 32}))
    assert method.loss_reduction == "per_shot" and method.grad_clip_value == 10.0
    assert all(b.weight is None and b.eps == 1e-3 for b in method.backbone.modules() if isinstance(b, nn.BatchNorm2d))


def test_paper_profile_meta_static_nsn_inherits_the_maml_arithmetic():
    cfg = resolve_config({"method": "meta_static_nsn", "profile": "paper", "shots": 5})
    assert cfg.method_options["loss_reduction"] == "per_shot" and cfg.method_options["grad_clip_value"] == 10.0


# ----------------------------------------------------------------------------- issue 26, item 5: Ravi's pretraining
def test_pretrain_optimizer_choice():
    from fewshot_nsl.config import PretrainConfig
    from fewshot_nsl.training import pretrain_optimizer

    params = [nn.Parameter(torch.zeros(3))]
    opt, sched = pretrain_optimizer(params, PretrainConfig(optimizer="adam", schedule="constant", lr=1e-3,
                                                           weight_decay=0.0), total=10)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["weight_decay"] == 0.0
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-3  # constant
    opt, sched = pretrain_optimizer(params, PretrainConfig(), total=10)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)


@pytest.mark.parametrize("key, value", [("optimizer", "rmsprop"), ("schedule", "cosine")])
def test_bad_pretrain_choices_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"pretrain.{key}"):
        resolve_config({"method": "finetune", "profile": "smoke", "pretrain": {key: value}})


@pytest.mark.parametrize("method", ["finetune", "nearest_neighbor"])
def test_paper_profile_pretrains_the_ravi_rows_with_adam(method):
    p = resolve_config({"method": method, "profile": "paper"}).pretrain
    assert (p.optimizer, p.schedule, p.lr, p.weight_decay, p.batch_size, p.epochs, p.augment) == \
        ("adam", "constant", 1e-3, 0.0, 64, 50, False)
    assert resolve_config({"method": "static_nsn", "profile": "paper"}).pretrain.optimizer == "sgd"


def test_adam_pretraining_runs_and_resumes_identically(tmp_path, monkeypatch):
    """An Adam/constant pretraining killed after its first epoch resumes to the same weights."""
    from fewshot_nsl import training
    from test_gpu_readiness import _killed_after_first_epoch, _pretrain_cfg

    cfg = _pretrain_cfg(tmp_path, optimizer="adam", schedule="constant", lr=1e-3, augment=False)
    store = load_store(cfg)

    def run(cache):
        set_seed(0)
        m = build_method(cfg)
        training.pretrain(m, store, cfg, torch.device("cpu"), {}, cache, progress=False)
        return m.pretrain_module().state_dict()

    full = run(tmp_path / "a")
    assert _killed_after_first_epoch(tmp_path, cfg, monkeypatch)
    resumed = run(tmp_path / "cache")
    for k in full:
        torch.testing.assert_close(full[k], resumed[k])
