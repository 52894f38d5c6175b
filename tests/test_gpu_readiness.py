"""Issue 27: the paper profile ready for a GPU, checked on the CPU: resume with checkpoint tensors off the CPU (the
``meta`` device standing in for CUDA), host synchronisations per training step."""
import pytest
import torch
import yaml
from torch import nn

from fewshot_nsl import training
from fewshot_nsl.config import resolve_config
from fewshot_nsl.runner import build_method, load_store
from fewshot_nsl.training import set_seed
from fewshot_nsl.validation import StageValidator, ValidationSettings

CPU = torch.device("cpu")


def _pretrain_cfg(tmp_path, **pretrain):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"pretrain": {"epochs": 2, "batch_size": 32, "augment": True, "max_steps": None,
                                              **pretrain}}))
    return resolve_config({"method": "finetune", "profile": "smoke", "dataset": "tiny", "image_size": 16,
                           "backbone_options": {"filters": 4}, "device": "cpu"}, str(f))


def _killed_after_first_epoch(tmp_path, cfg, monkeypatch):
    """Run a pretraining that is killed right after writing its first ``.partial``; return that file."""
    real = training.atomic_torch_save
    written = []

    def kill(obj, path):
        real(obj, path)
        if str(path).endswith(".partial"):
            written.append(path)
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "atomic_torch_save", kill)
    set_seed(0)
    with pytest.raises(KeyboardInterrupt):
        training.pretrain(build_method(cfg), load_store(cfg), cfg, CPU, {}, tmp_path / "cache", progress=False)
    monkeypatch.setattr(training, "atomic_torch_save", real)
    return written[0]


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_pretraining_resumes_onto_a_non_cpu_device(tmp_path, monkeypatch):
    """A ``.partial`` checkpoint restores onto modules living on another device (``meta`` stands in for CUDA):
    the RNG states stay CPU byte tensors. Reading the file with ``map_location=device``, as before, puts the
    generator state on that device, which ``Generator.set_state`` refuses."""
    cfg = _pretrain_cfg(tmp_path)
    partial = _killed_after_first_epoch(tmp_path, cfg, monkeypatch)
    saved = torch.load(partial, map_location="cpu", weights_only=True)
    with pytest.raises(TypeError):  # the defect: a device-mapped generator state
        torch.Generator().set_state(torch.load(partial, map_location="meta", weights_only=True)["generator"])

    meta = torch.device("meta")
    method = build_method(cfg)
    module = method.pretrain_module().to(meta)
    head = nn.Linear(method.backbone.feature_dim(cfg.image_size), 15).to(meta)
    opt, sched = training.pretrain_optimizer(list(module.parameters()) + list(head.parameters()), cfg.pretrain, 100)
    gen = torch.Generator()
    validator = StageValidator("pretrain", ValidationSettings.of(cfg.pretrain), cfg, load_store(cfg), meta,
                               lambda t, i: None, module)
    step, rows = training.restore_pretraining(partial, module, head, opt, sched, gen, validator)
    assert step == saved["step"] and torch.equal(gen.get_state(), saved["generator"])
    assert all(p.device.type == "meta" for p in module.parameters())


def test_resumed_pretraining_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = _pretrain_cfg(tmp_path)
    set_seed(0)
    full = build_method(cfg)
    training.pretrain(full, load_store(cfg), cfg, CPU, {}, tmp_path / "full", progress=False)
    _killed_after_first_epoch(tmp_path, cfg, monkeypatch)
    set_seed(0)
    resumed = build_method(cfg)
    training.pretrain(resumed, load_store(cfg), cfg, CPU, {}, tmp_path / "cache", progress=False)
    for (k, a), b in zip(full.pretrain_module().state_dict().items(), resumed.pretrain_module().state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_no_host_synchronisation_to_count_an_episodes_ways(method, tiny_store, monkeypatch):
    """``num_ways`` reads the class count the Materialiser attached from the host copy of the labels, not
    ``support_y.max().item()`` on the device (one synchronisation per episode, twice in MAML)."""
    from fewshot_nsl.data.episodes import Materialiser, episode_list_for_store
    from fewshot_nsl.registry import create_backbone, create_method

    ep = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=1, seed=0).episodes[0]
    t = Materialiser(tiny_store, 16, CPU)(ep)
    m = create_method(method, backbone=create_backbone("cnn4", filters=4), image_size=16).eval()
    calls = []
    real = torch.Tensor.item

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    assert m.num_ways(t.support_y) == 5
    with torch.no_grad():
        m.fit_support(t.support_x, t.support_y)
        m(t.query_x)
    assert calls == []
    assert m.num_ways(t.support_y.clone()) == 5 and len(calls) == 1  # any other tensor is read on the device
