"""GPU-path set-up checked on the CPU (issue: CUDA-only paths).

* Every entry point that trains a network (``runner.train``, the Ray pretraining task, the torchrun pretraining
  process) sets the process up the same way before building it: seed, cuDNN / TF32 switches (the fast mode, or
  off with ``--deterministic``), channels-last, compile. The TF32 switches can be set without a GPU, so a
  deterministic set-up for a CUDA device is checked here with the network build and the pretraining mocked.
* ``--device cuda:N``: reading or resetting the CUDA peak-memory counters before CUDA is initialised does not
  raise, and the set-up makes GPU N the current device (so no context is opened on GPU 0).
* A killed multi-process pretraining says it starts again from the beginning (it keeps no checkpoint).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewshot_nsl.config import resolve_config

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


@pytest.fixture
def backend_flags(monkeypatch):
    """The TF32 / cuDNN / determinism switches as a previous task might have left them (fast mode on), restored
    afterwards; ``CUBLAS_WORKSPACE_CONFIG`` restored too."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


class _Net(nn.Module):
    """Stands in for a method on CUDA: no parameters, so ``.to(cuda)`` needs no GPU; records its memory format."""

    def __init__(self) -> None:
        super().__init__()
        self.formats = []

    def to(self, *args, **kwargs):  # noqa: D401 - records, then behaves as nn.Module.to
        if "memory_format" in kwargs:
            self.formats.append(kwargs["memory_format"])
        return super().to(*args, **kwargs)


def _mock_build_and_pretrain(monkeypatch):
    """Build returns a :class:`_Net`; ``pretrain`` records the backend switches in force when it is called."""
    import fewshot_nsl.inputs
    import fewshot_nsl.runner
    import fewshot_nsl.training

    seen = {}
    net = _Net()
    for mod in (fewshot_nsl.inputs, fewshot_nsl.runner):
        monkeypatch.setattr(mod, "build_method", lambda cfg: net)

    def pretrain(method, store, cfg, device, conv_spec, cache, progress=True, distributed=False, curve=None,
                 compiled=False, status=None):
        seen.update(cudnn_tf32=torch.backends.cudnn.allow_tf32, matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                    benchmark=torch.backends.cudnn.benchmark, deterministic=torch.backends.cudnn.deterministic,
                    algorithms=torch.are_deterministic_algorithms_enabled(), device=device, compiled=compiled,
                    distributed=distributed, formats=list(net.formats))
        return {"cache_path": str(cache / "pretrain" / "x.pt"), "cached": False, "train_accuracy": 0.5, "world_size": 1}

    monkeypatch.setattr(fewshot_nsl.training, "pretrain", pretrain)
    return seen


def _cfg(deterministic: bool, device: str = "cuda"):
    return resolve_config({"method": "finetune", "profile": "smoke", "dataset": "tiny", "image_size": 16,
                           "device": device, "deterministic": deterministic, "compile": "off"})


@pytest.mark.parametrize("deterministic", [True, False])
def test_ray_pretrain_task_sets_the_backends_like_a_run(monkeypatch, tmp_path, backend_flags, deterministic):
    """The Ray pretraining task (a reused worker: TF32 left on by an earlier task) turns TF32 off with
    ``--deterministic`` and on in the fast mode, with channels-last, before it builds the network."""
    from fewshot_nsl import executors

    seen = _mock_build_and_pretrain(monkeypatch)
    monkeypatch.setattr(executors, "_worker_context",
                        lambda *a, **k: SimpleNamespace(device=CUDA, store=None))
    cfg = _cfg(deterministic)
    cfg.cache_dir = str(tmp_path)
    out = executors.pretrain_task(cfg, [], 1)
    assert out["cached"] is False and seen["device"] == CUDA
    if deterministic:
        assert seen["cudnn_tf32"] is False and seen["matmul_tf32"] is False
        assert seen["benchmark"] is False and seen["deterministic"] is True and seen["algorithms"] is True
        assert seen["formats"] == []
    else:
        assert seen["cudnn_tf32"] is True and seen["matmul_tf32"] is True and seen["benchmark"] is True
        assert seen["formats"] == [torch.channels_last]  # as runner.train lays the network out


@pytest.mark.parametrize("deterministic", [True, False])
def test_torchrun_pretraining_sets_the_backends_like_a_run(monkeypatch, tmp_path, backend_flags, deterministic):
    """``fewshot_nsl.distributed pretrain`` on a CUDA device (the process group and the GPU mocked)."""
    import torch.distributed as dist

    from fewshot_nsl import distributed

    seen = _mock_build_and_pretrain(monkeypatch)
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.append(d))
    for name in ("init_process_group", "barrier", "destroy_process_group"):
        monkeypatch.setattr(dist, name, lambda *a, **k: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    argv = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16",
            "--method", "finetune", "--profile", "smoke", "--device", "cuda", "--compile", "off",
            "--cache-dir", str(tmp_path), "--no-progress", *(["--deterministic"] if deterministic else [])]
    assert distributed.pretrain_main(argv) == 0
    assert seen["device"] == torch.device("cuda", 0) and seen["distributed"] is True
    assert devices and all(d in (0, torch.device("cuda", 0)) for d in devices)
    if deterministic:
        assert seen["cudnn_tf32"] is False and seen["matmul_tf32"] is False
        assert seen["benchmark"] is False and seen["deterministic"] is True and seen["formats"] == []
    else:
        assert seen["cudnn_tf32"] is True and seen["matmul_tf32"] is True
        assert seen["formats"] == [torch.channels_last]


def test_one_set_up_function_for_every_entry_point(monkeypatch, backend_flags):
    """``process_setup.build_for_device`` is the set-up; for ``cuda:N`` it makes GPU N the current device."""
    from fewshot_nsl import process_setup

    from fewshot_nsl.errors import ConfigError

    _mock_build_and_pretrain(monkeypatch)
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.append(d))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    built = process_setup.build_for_device(_cfg(True, "cuda:1"), torch.device("cuda:1"), log=lambda *a: None)
    assert devices == [1]
    assert isinstance(built.method, _Net) and built.compiled is False
    assert built.fast == {"cudnn_benchmark": False, "tf32": False, "channels_last": False}
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    devices.clear()
    process_setup.setup_process(_cfg(True, "cuda"), CUDA)  # no index: the current device is left alone
    process_setup.setup_process(_cfg(True, "cpu"), torch.device("cpu"))
    assert devices == []
    with pytest.raises(ConfigError, match=r"--device cuda:2 was asked for but torch sees 2 GPU\(s\) \(cuda:0 to "):
        process_setup.setup_process(_cfg(True, "cuda:2"), torch.device("cuda:2"))


def test_peak_memory_of_cuda_n_before_cuda_is_initialised():
    """``--device cuda:N``: resetting the peak counters before CUDA is initialised raised "Invalid device
    argument"; the peak is zero then, so there is nothing to reset."""
    from fewshot_nsl.provenance import peak_memory_mb, reset_peak_memory

    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process")
    for dev in (torch.device("cuda:0"), torch.device("cuda"), torch.device("cuda:3")):
        reset_peak_memory(dev)
        assert peak_memory_mb(dev) == 0.0


def test_killed_multi_process_pretraining_says_it_starts_again(monkeypatch, capsys):
    """``launch --nproc-per-node 2`` interrupted: the message no longer promises a resume (only a
    single-process pretraining writes ``.partial`` checkpoints)."""
    import torch.distributed.run as trun

    from fewshot_nsl import distributed

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trun, "run", interrupted)
    base = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16",
            "--method", "finetune", "--profile", "smoke", "--device", "cpu"]
    assert distributed.launch_main(["--nproc-per-node", "2", *base]) == 130
    err = capsys.readouterr().err
    assert "resume" not in err.replace("does not resume", "") and "from the beginning" in err, err
    assert distributed.launch_main(["--nproc-per-node", "1", *base]) == 130
    err = capsys.readouterr().err
    assert "resume" in err, err  # one process writes .partial checkpoints: a rerun resumes


def test_a_reused_pretraining_says_how_it_was_trained(tmp_path, capsys):
    """The pretraining cache key leaves the fast mode out: the cache records it, and a run reusing a pretraining
    trained with other switches says so and records ``pretrain_fast_mode``."""
    import json
    from pathlib import Path

    from fewshot_nsl.cli import main

    repo = Path(__file__).resolve().parent.parent
    args = ["--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--plugins", str(repo / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16",
            "--profile", "smoke", "--queries", "3", "--n-episodes", "2", "--shots", "1", "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--method", "finetune"]) == 0
        (cache,) = [p for p in (tmp_path / "cache").rglob("*.pt") if "pretrain" in p.name or "pretrain" in str(p.parent)]
        ckpt = torch.load(cache, weights_only=False)
        assert ckpt["trained_with"]["fast_mode"] == "off" and ckpt["trained_with"]["device"] == "cpu"
        ckpt["trained_with"]["fast_mode"] = "cudnn.benchmark+tf32+channels_last"  # as a GPU run would have left it
        torch.save(ckpt, cache)
        capsys.readouterr()
        assert main([*args, "--method", "nearest_neighbor"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert "note: the cached pretraining was trained with fast mode cudnn.benchmark+tf32+channels_last" in out.out + out.err
    (summary,) = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*nearest*/summary.json")]
    assert summary["pretrain_fast_mode"] == "cudnn.benchmark+tf32+channels_last" and summary["fast_mode"] == "off"


def test_the_summary_names_the_device_training_ran_on_not_the_drivers(tmp_path):
    """With Ray from a CPU head node the driver's device is the CPU while workers train on GPUs: the row's
    ``device`` / ``device_name`` come from ``train.json``, which the process that trained wrote."""
    import json
    from pathlib import Path

    from fewshot_nsl.cli import main

    repo = Path(__file__).resolve().parent.parent
    args = ["--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--plugins", str(repo / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16",
            "--profile", "smoke", "--queries", "3", "--n-episodes", "2", "--shots", "1", "--no-progress",
            "--method", "nearest_neighbor"]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
        (run,) = (tmp_path / "results" / "runs").iterdir()
        record = json.loads((run / "train.json").read_text())
        assert record["device"] == "cpu" and record["device_name"]
        record.update(device="cuda:0", device_name="NVIDIA H100 80GB HBM3")  # as a Ray GPU worker writes it
        (run / "train.json").write_text(json.dumps(record))
        (run / "summary.json").unlink()  # finished again by this (CPU) process, as the Ray driver finishes it
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["device"], summary["device_name"]) == ("cuda:0", "NVIDIA H100 80GB HBM3")
