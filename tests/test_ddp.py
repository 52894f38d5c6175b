"""Data-parallel pretraining (torchrun, 2 gloo processes on CPU) equals single-process full-batch training."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from fewshot_nsl.config import resolve_config
from fewshot_nsl.registry import load_plugins
from fewshot_nsl.runner import build_method, conv_spec_of, load_store
from fewshot_nsl.training import pretrain, pretrain_key, set_seed

REPO = Path(__file__).resolve().parent.parent
DDP_PLUGINS = REPO / "tests" / "ddp_plugins"


def _cfg(tmp_path, cache):
    cfg_file = tmp_path / "pretrain.yaml"
    # 450 base images, batches of 25 split 13/12 across 2 processes, with augmentation; 3 SGD steps
    cfg_file.write_text("pretrain: {epochs: 1, batch_size: 25, max_steps: 3, lr: 0.1, augment: true}\n")
    cli = {"method": "nearest_neighbor", "backbone": "nobn4", "profile": "smoke", "dataset": "tiny",
           "image_size": 16, "cache_dir": str(cache), "device": "cpu"}
    return resolve_config(cli, str(cfg_file)), cfg_file


def test_two_process_gloo_pretraining_equals_single_process_full_batch(tmp_path):
    load_plugins([DDP_PLUGINS])
    cfg, cfg_file = _cfg(tmp_path, tmp_path / "single")
    # single process, full batches
    store = load_store(cfg)
    set_seed(cfg.seed)
    method = build_method(cfg)
    initial = {k: v.clone() for k, v in method.pretrain_module().state_dict().items()}
    info = pretrain(method, store, cfg, torch.device("cpu"), conv_spec_of(cfg), tmp_path / "single", progress=False)
    assert not info["cached"] and info["world_size"] == 1
    single = torch.load(info["cache_path"], weights_only=True)["module"]
    assert any(not torch.equal(single[k], initial[k]) for k in single)  # it did train

    # two processes with torchrun (gloo), same flags
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fewshot_nsl.distributed", "pretrain", "--plugins", str(REPO / "tests" / "plugins"),
           "--plugins", str(DDP_PLUGINS), "--dataset", "tiny", "--image-size", "16", "--backbone", "nobn4",
           "--method", "nearest_neighbor", "--profile", "smoke", "--device", "cpu", "--cache-dir", str(tmp_path / "ddp"),
           "--config", str(cfg_file), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    key = pretrain_key(cfg, store, conv_spec_of(cfg))
    ddp_ckpt = torch.load(tmp_path / "ddp" / "pretrain" / f"{key}.pt", weights_only=True)  # same cache key
    assert ddp_ckpt["world_size"] == 2
    ddp = ddp_ckpt["module"]
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=k)


def test_distributed_entry_point_refuses_bad_use(tmp_path):
    from fewshot_nsl.distributed import main

    assert main([]) == 2
    assert main(["pretrain", "--method", "protonet"]) == 2  # not under torchrun


def test_distributed_launch_refuses_bad_input_in_one_line(tmp_path):
    """``launch`` checks flags and data before any worker starts: one ``error:`` line, status 2."""
    base = [sys.executable, "-m", "fewshot_nsl.distributed", "launch"]
    cases = [
        (["--method", "nearest_neighbor"], "needs --nproc-per-node"),
        (["--nproc-per-node", "0", "--method", "nearest_neighbor"], "at least 1"),
        (["--nproc-per-node", "2", "--method", "nearest_neighbor", "--dataset", "custom",
          "--data-root", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for extra, fragment in cases:
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env=dict(os.environ, FEWSHOT_NSL_CACHE=str(tmp_path / "cache")))
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
