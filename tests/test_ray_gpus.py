"""Ray executor: whether tasks get a GPU is decided from the cluster's resources and the requested device, not
from the driver's own CUDA (a CPU-only head or login node); a worker that was given a GPU it cannot see fails in
one line instead of running on the CPU. Ray is replaced by a fake that runs each task in this process."""
from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch

from fewshot_nsl.errors import ConfigError
from fewshot_nsl.grid import Cell, run_grid


class _Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class _Task:
    def __init__(self, ray, fn, opts):
        self.ray, self.fn, self.opts = ray, fn, opts

    def remote(self, *args):
        self.ray.calls.append((self.fn.__name__, dict(self.opts)))
        args = list(args)
        for i, a in enumerate(args):  # Ray passes a dependency's value (and fails with a failed dependency)
            if isinstance(a, _Ref):
                if a.error is not None:
                    return _Ref(error=a.error)
                args[i] = a.value
        try:
            return _Ref(self.fn(*args))
        except Exception as exc:  # noqa: BLE001 - delivered by get(), as Ray does
            return _Ref(error=exc)


class _Remote:
    def __init__(self, ray, fn):
        self.ray, self.fn = ray, fn

    def options(self, **opts):
        return _Task(self.ray, self.fn, opts)


def fake_ray(resources):
    ray = ModuleType("ray")
    ray.calls = []
    ray.is_initialized = lambda: True
    ray.cluster_resources = lambda: dict(resources)
    ray.remote = lambda fn: _Remote(ray, fn)
    ray.wait = lambda refs, num_returns=1: (refs[:num_returns], refs[num_returns:])

    def get(ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    ray.get = get
    return ray


def cli(results, device):
    return {"profile": "smoke", "dataset": "tiny", "ways": 5, "image_size": 16, "results_dir": str(results),
            "device": device, "eval": {"episodes": 4, "queries": 5}}


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tmp_path, monkeypatch, resources, device, method="protonet"):
    from fewshot_nsl.executors import RayExecutor

    ray = fake_ray(resources)
    monkeypatch.setitem(sys.modules, "ray", ray)
    log = []
    res = run_grid([Cell(method, "cnn4", 2)], cli(tmp_path, device),
                   executor=RayExecutor(threads=1, shard_size=2), progress=False, log=log.append)
    return ray, res, log


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a driver without CUDA")
def test_cpu_head_on_a_gpu_cluster_gives_tasks_a_gpu(tmp_path, monkeypatch, threads):
    """The driver sees no GPU, the cluster has one: ``--device auto`` tasks ask Ray for a GPU (before, every task
    got ``num_gpus=0``, Ray hid the GPUs and the workers silently ran on the CPU). In this process (a worker
    without a GPU) the task then refuses in one line naming the cause."""
    ray, res, log = _run(tmp_path, monkeypatch, {"CPU": 4.0, "GPU": 2.0}, "auto")
    assert ray.calls and all(opts["num_gpus"] == 1 for _, opts in ray.calls), ray.calls
    (failed,) = res.failed
    assert "GPU" in failed.error and "sees none" in failed.error and "--device cpu" in failed.error, failed.error
    assert len(failed.error.splitlines()) == 1


def test_cluster_without_gpus_runs_auto_on_cpu(tmp_path, monkeypatch, threads):
    ray, res, log = _run(tmp_path, monkeypatch, {"CPU": 4.0}, "auto")
    assert ray.calls and all(opts["num_gpus"] == 0 for _, opts in ray.calls), ray.calls
    assert res.count("ran") == 1, log


def test_cpu_device_never_asks_for_a_gpu(tmp_path, monkeypatch, threads):
    ray, res, log = _run(tmp_path, monkeypatch, {"CPU": 4.0, "GPU": 1.0}, "cpu")
    assert ray.calls and all(opts["num_gpus"] == 0 for _, opts in ray.calls), ray.calls
    assert res.count("ran") == 1, log


def test_cuda_on_a_cluster_without_gpus_is_one_error_before_any_task(tmp_path, monkeypatch, threads):
    with pytest.raises(ConfigError, match=r"--device cuda .*Ray cluster has no GPU"):
        ray, _, _ = _run(tmp_path, monkeypatch, {"CPU": 4.0}, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a worker without CUDA")
def test_a_worker_given_a_gpu_it_cannot_see_refuses(monkeypatch):
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.executors import _worker_context

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cfg = resolve_config({"method": "protonet", "profile": "smoke", "dataset": "tiny", "image_size": 16})
    with pytest.raises(ConfigError, match=r"given 1 GPU .*sees none.*CUDA_VISIBLE_DEVICES=''"):
        _worker_context(cfg, [], 1, gpus=1)


def test_task_gpus():
    from fewshot_nsl.executors import task_gpus

    assert task_gpus("auto", 0) == 0 and task_gpus("auto", 0.5) == 0 and task_gpus("auto", 4) == 1
    assert task_gpus("cuda", 1) == 1 and task_gpus("cuda:3", 8) == 1 and task_gpus("cpu", 8) == 0
    with pytest.raises(ConfigError, match="has no GPU"):
        task_gpus("cuda:0", 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a driver without CUDA")
def test_device_cuda_from_a_cpu_head_reaches_the_gpu_tasks(tmp_path, monkeypatch, threads):
    """``--device cuda`` on a GPU cluster driven from a CPU-only head node: the driver prepares folders without a
    GPU (before, its own device check refused the run there); the tasks ask for a GPU, and this process, a worker
    without one, refuses in the task's line."""
    ray, res, log = _run(tmp_path, monkeypatch, {"CPU": 4.0, "GPU": 1.0}, "cuda")
    assert ray.calls and all(opts["num_gpus"] == 1 for _, opts in ray.calls), ray.calls
    (failed,) = res.failed
    assert "sees none" in failed.error and "no CUDA GPU is available" not in failed.error, failed.error
