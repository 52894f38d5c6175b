"""Base-class pretraining loop (``fewshot_nsl.training``) on short runs."""
import math

import pytest
import torch

from fewshot_nsl.config import resolve_config
from fewshot_nsl.runner import build_method, conv_spec_of, load_store
from fewshot_nsl.training import pretrain, set_seed


@pytest.mark.parametrize("batch_size", [450, 50, 45, 41])
def test_pretraining_one_epoch_of_few_batches(tmp_path, batch_size):
    """One epoch of 1, 9, 10 and 11 batches: 10 (one-step OneCycle warm-up) used to raise ZeroDivisionError."""
    cfg_file = tmp_path / "pretrain.yaml"
    cfg_file.write_text(f"pretrain: {{epochs: 1, batch_size: {batch_size}, max_steps: null, lr: 0.1, augment: false}}\n")
    cli = {"method": "nearest_neighbor", "profile": "smoke", "dataset": "tiny", "image_size": 16,
           "backbone_options": {"filters": 4}, "cache_dir": str(tmp_path / "cache"), "device": "cpu"}
    cfg = resolve_config(cli, str(cfg_file))
    store = load_store(cfg)
    base_images = sum(len(store.class_members(c)) for c in store.classes_in_split("train"))
    assert base_images == 450
    assert math.ceil(base_images / batch_size) == {450: 1, 50: 9, 45: 10, 41: 11}[batch_size]
    set_seed(cfg.seed)
    method = build_method(cfg)
    initial = {k: v.clone() for k, v in method.pretrain_module().state_dict().items()}
    info = pretrain(method, store, cfg, torch.device("cpu"), conv_spec_of(cfg), tmp_path / "cache", progress=False)
    assert not info["cached"]
    trained = torch.load(info["cache_path"], weights_only=True)["module"]
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # it did train
