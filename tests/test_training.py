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


def _nn_cfg(tmp_path, epochs):
    cfg_file = tmp_path / f"pretrain{epochs}.yaml"
    cfg_file.write_text(f"pretrain: {{epochs: {epochs}, batch_size: 64, max_steps: null, lr: 0.1, augment: true}}\n")
    cli = {"method": "nearest_neighbor", "profile": "smoke", "dataset": "tiny", "image_size": 16,
           "backbone_options": {"filters": 4}, "device": "cpu"}
    return resolve_config(cli, str(cfg_file))


def test_pretraining_killed_after_an_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """An epoch-end checkpoint (``<cache file>.partial``) lets a killed pretraining resume; the final
    weights equal an uninterrupted run's bit for bit, and the partial file is removed at the end."""
    from fewshot_nsl import training

    cfg = _nn_cfg(tmp_path, 3)
    store = load_store(cfg)

    def run_pretraining(cache):
        set_seed(cfg.seed)
        method = build_method(cfg)
        info = pretrain(method, store, cfg, torch.device("cpu"), conv_spec_of(cfg), cache, progress=False)
        return torch.load(info["cache_path"], weights_only=True)["module"], info

    reference, _ = run_pretraining(tmp_path / "uninterrupted")

    # Kill (simulated) during the second epoch: the optimiser step after the first epoch's checkpoint raises.
    saves = []
    real_save = training.atomic_torch_save

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(path)
        if str(path).endswith(".partial"):
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(tmp_path / "killed")
    monkeypatch.setattr(training, "atomic_torch_save", real_save)
    (partial,) = (tmp_path / "killed" / "pretrain").glob("*.partial")
    assert torch.load(partial, weights_only=True)["step"] == math.ceil(450 / 64)  # one epoch done

    batches = []
    real_augment = training._augment
    monkeypatch.setattr(training, "_augment", lambda x, *a: batches.append(1) or real_augment(x, *a))
    resumed, info = run_pretraining(tmp_path / "killed")
    assert len(batches) == 2 * math.ceil(450 / 64)  # only the two remaining epochs were trained
    assert not info["cached"] and not partial.exists()
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_damaged_cached_pretraining_is_one_clear_error_naming_the_file(tmp_path, damage):
    import os
    import pickle

    from fewshot_nsl.errors import DataError

    cfg = _nn_cfg(tmp_path, 1)
    store = load_store(cfg)
    set_seed(cfg.seed)
    info = pretrain(build_method(cfg), store, cfg, torch.device("cpu"), conv_spec_of(cfg), tmp_path, progress=False)
    path = info["cache_path"]
    if damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        class Payload:
            def __reduce__(self):
                return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
        torch.save({"module": Payload()}, path, pickle_module=pickle)
    with pytest.raises(DataError, match="delete it and rerun") as err:
        pretrain(build_method(cfg), store, cfg, torch.device("cpu"), conv_spec_of(cfg), tmp_path, progress=False)
    assert path in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_concurrent_identical_pretrainings_train_once(tmp_path):
    """Two processes asking for the same uncached pretraining: one trains it, the other waits for the
    cache lock and loads the result (same weights, no second training)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "pretrain_once.py"
    script.write_text(f'''
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import conftest  # registers the tiny dataset
from fewshot_nsl.config import resolve_config
from fewshot_nsl.runner import build_method, conv_spec_of, load_store
from fewshot_nsl.training import pretrain, set_seed
cfg_file = Path({str(tmp_path)!r}) / "p.yaml"
cli = {{"method": "nearest_neighbor", "profile": "smoke", "dataset": "tiny", "image_size": 16,
       "backbone_options": {{"filters": 4}}, "device": "cpu"}}
cfg = resolve_config(cli, str(cfg_file))
store = load_store(cfg)
set_seed(cfg.seed)
info = pretrain(build_method(cfg), store, cfg, torch.device("cpu"), conv_spec_of(cfg), Path({str(tmp_path / "cache")!r}), progress=False)
print(json.dumps(info["cached"]))
''')
    (tmp_path / "p.yaml").write_text("pretrain: {epochs: 40, batch_size: 64, max_steps: null, lr: 0.1}\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    cached = sorted(json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    assert cached == [False, True]  # trained once, loaded once
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.pt"))) == 1
