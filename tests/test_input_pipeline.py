"""The overlapped input pipeline and the evaluation's batched result rows (issue 27, item 4).

* :class:`~fewshot_nsl.data.prefetch.Prefetcher`: items in order, prepared in a worker thread, the
  source pulled in the caller's thread, failures raised when their item is reached, a switch off.
* Prefetching on or off gives bit-identical pretraining weights, the same training episodes in the
  same order, the same meta-trained weights, and a meta-training killed after a checkpoint resumes
  to the uninterrupted weights (the sampler state saved is the one before the episode drawn ahead).
* Evaluation: the same ``episodes.csv`` either way; no host synchronisation per episode, one per
  batch of rows; finished rows survive Ctrl-C and, up to the last batch written, SIGKILL; a killed
  evaluation resumes to the uninterrupted file.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest
import torch

from fewshot_nsl import evaluation, training
from fewshot_nsl.config import resolve_config
from fewshot_nsl.data.episodes import Materialiser, episode_list_for_store
from fewshot_nsl.data.prefetch import ENV_SWITCH, Prefetcher, stages
from fewshot_nsl.evaluation import evaluate
from fewshot_nsl.runner import build_method, conv_spec_of, load_store
from fewshot_nsl.training import meta_train, pretrain, set_seed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_host_syncs import SyncCounter, classify  # noqa: E402
from sync_free_method import NearestMean as _NearestMean  # noqa: E402

CPU = torch.device("cpu")
COMPARE = ["episode", "accuracy", "correct", "total", "status"]


def _in_worker() -> bool:
    return threading.current_thread().name.startswith("fewshot-prefetch")


# ----------------------------------------------------------------------------- Prefetcher
def test_prefetcher_returns_items_in_order_prepared_in_a_worker_while_the_caller_pulls_the_source():
    pulled, prepared_in = [], []

    def source():
        for i in range(8):
            pulled.append(threading.current_thread() is threading.main_thread())
            yield i

    def prepare(i):
        prepared_in.append(_in_worker())
        return 10 * i

    with Prefetcher(source(), prepare, lambda p: p + 1, enabled=True) as items:
        assert next(items) == 1
        assert items.pending() == [1]  # the next item is pulled (and being prepared) while the caller computes
        assert list(items) == [10 * i + 1 for i in range(1, 8)]
    assert all(pulled) and all(prepared_in) and len(prepared_in) == 8


@pytest.mark.parametrize("where", ["prepare", "source"])
def test_prefetcher_raises_a_failure_when_its_item_is_reached_not_before(where):
    def source():
        for i in range(6):
            if where == "source" and i == 3:
                raise ValueError("bad item 3")
            yield i

    def prepare(i):
        if where == "prepare" and i == 3:
            raise ValueError("bad item 3")
        return i

    got: List[int] = []
    with Prefetcher(source(), prepare, enabled=True) as items:
        with pytest.raises(ValueError, match="bad item 3"):
            for i in items:
                got.append(i)
    assert got == [0, 1, 2]


def test_switch_off_prepares_on_demand_in_the_caller_thread(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    threads = []
    with Prefetcher(range(4), lambda i: threads.append(_in_worker()) or i) as items:
        assert not items.enabled
        assert next(items) == 0 and items.pending() == []
        assert list(items) == [1, 2, 3]
    assert threads == [False] * 4


def test_stages_run_the_device_part_in_the_caller_thread_on_every_device():
    """On a CPU too: torch's parallel kernels in the worker thread start a second thread team beside the caller's
    (at --threads 2 on 2 cores the per-episode evaluation ran 1.8-3.7x slower)."""
    where = {}

    def host(i):
        where["host"] = _in_worker()
        return i

    def to_device(i):
        where["device"] = _in_worker()
        return i

    with Prefetcher([1], *stages(host, to_device), enabled=True) as items:  # the same split on every device
        assert list(items) == [1]
    assert where == {"host": True, "device": False}


def test_materialiser_stages_compose_to_the_same_episode(tiny_store):
    mat = Materialiser(tiny_store, 12, CPU)  # resized: the antialiased path too
    assert not mat.pin_memory  # pinned host buffers only for a CUDA device
    for e in episode_list_for_store(tiny_store, "test", 5, 2, 3, n=3, seed=0).episodes:
        a, b = mat(e), mat.load(mat.stage(e))
        for x, y in ((a.support_x, b.support_x), (a.support_y, b.support_y), (a.query_x, b.query_x), (a.query_y, b.query_y)):
            assert torch.equal(x, y) and x.stride() == y.stride()


# ----------------------------------------------------------------------------- training
def _cfg(tmp_path, method, **sections):
    return resolve_config({"method": method, "profile": "smoke", "dataset": "tiny", "image_size": 16, "shots": 2,
                           "backbone_options": {"filters": 4}, "device": "cpu", "cache_dir": str(tmp_path / "cache"),
                           **sections})


@pytest.fixture
def gather_threads(monkeypatch):
    """Whether each ``Materialiser.gather`` call ran in the prefetch worker."""
    calls: List[bool] = []
    real = Materialiser.gather
    monkeypatch.setattr(Materialiser, "gather", lambda self, idx: calls.append(_in_worker()) or real(self, idx))
    return calls


def test_pretraining_with_prefetch_on_or_off_gives_bit_identical_weights(tmp_path, monkeypatch, gather_threads):
    """Two epochs of 8 batches with augmentation (the generator draws crops and jitter for every batch)."""
    cfg = _cfg(tmp_path, "nearest_neighbor", pretrain={"epochs": 2, "batch_size": 64, "max_steps": None, "augment": True})
    store = load_store(cfg)
    weights = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        gather_threads.clear()
        set_seed(cfg.seed)
        info = pretrain(build_method(cfg), store, cfg, CPU, conv_spec_of(cfg), tmp_path / f"cache{switch}", progress=False)
        weights[switch] = torch.load(info["cache_path"], weights_only=True)["module"]
        assert len(gather_threads) == 16 and all(t == (switch == "1") for t in gather_threads)
    assert weights["0"].keys() == weights["1"].keys()
    assert all(torch.equal(weights["0"][k], weights["1"][k]) for k in weights["0"])


def _meta_cfg(tmp_path):
    return _cfg(tmp_path, "protonet", episodic={"steps": 6, "checkpoint_every": 2, "queries": 3, "meta_batch": 2})


def _meta_train(cfg, store, checkpoint, episodes=None):
    """Meta-train a fresh method; ``episodes`` collects the training episodes' tensors in order."""
    with pytest.MonkeyPatch.context() as mp:
        if episodes is not None:
            real = Materialiser.load

            def load(self, staged):
                episodes.append(real(self, staged))
                return episodes[-1]

            mp.setattr(Materialiser, "load", load)
        set_seed(cfg.seed)
        method = build_method(cfg)
        meta_train(method, store, cfg, CPU, checkpoint, progress=False)
    return method.state_dict()


def test_meta_training_with_prefetch_on_or_off_sees_the_same_episodes_and_trains_the_same(
        tmp_path, monkeypatch, gather_threads):
    cfg = _meta_cfg(tmp_path)
    store = load_store(cfg)
    runs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        gather_threads.clear()
        episodes: list = []
        runs[switch] = (_meta_train(cfg, store, tmp_path / f"ckpt{switch}.pt", episodes), episodes)
        assert len(gather_threads) == 12 and all(t == (switch == "1") for t in gather_threads)
    (w0, e0), (w1, e1) = runs["0"], runs["1"]
    assert len(e0) == len(e1) == 12  # 6 steps x meta-batch 2, none drawn ahead past the end
    for a, b in zip(e0, e1):
        assert all(torch.equal(x, y) for x, y in zip((a.support_x, a.support_y, a.query_x, a.query_y),
                                                       (b.support_x, b.support_y, b.query_x, b.query_y)))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_meta_training_killed_after_a_checkpoint_resumes_with_the_episode_drawn_ahead(tmp_path, monkeypatch):
    """The pipeline has drawn the next step's first episode when a checkpoint is written: the checkpoint must hold
    the sampler state before it, or the resumed run would skip it."""
    monkeypatch.setenv(ENV_SWITCH, "1")
    cfg = _meta_cfg(tmp_path)
    store = load_store(cfg)
    ref_episodes: list = []
    reference = _meta_train(cfg, store, tmp_path / "ref.pt", ref_episodes)

    real_save = training.atomic_torch_save

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _meta_train(cfg, store, tmp_path / "killed.pt")
    monkeypatch.setattr(training, "atomic_torch_save", real_save)
    resumed_episodes: list = []
    resumed = _meta_train(cfg, store, tmp_path / "killed.pt", resumed_episodes)
    assert len(resumed_episodes) == 4  # steps 5 and 6
    for a, b in zip(resumed_episodes, ref_episodes[8:]):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


# ----------------------------------------------------------------------------- evaluation
def _rows(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return [{k: r[k] for k in COMPARE} for r in csv.DictReader(f)]


def test_evaluation_with_prefetch_on_or_off_writes_the_same_rows(tiny_store, tmp_path, monkeypatch, gather_threads):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=40, seed=0)
    for switch in ("0", "1"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        gather_threads.clear()
        evaluate(_NearestMean(), tiny_store, lst, 40, CPU, 16, tmp_path / f"{switch}.csv", progress=False)
        assert len(gather_threads) == 40 and all(t == (switch == "1") for t in gather_threads)
    assert _rows(tmp_path / "0.csv") == _rows(tmp_path / "1.csv")
    assert [r["episode"] for r in _rows(tmp_path / "1.csv")] == [str(i) for i in range(40)]


def test_evaluation_synchronises_once_per_batch_of_rows_not_per_episode(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "FSYNC_EVERY_S", 1e9)  # batches by count only: 16 + 16 + 8 rows
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=40, seed=0)
    with SyncCounter() as counter:
        evaluate(_NearestMean(), tiny_store, lst, 40, CPU, 16, tmp_path / "e.csv", progress=False)
    per_episode = {s: n for s, n in counter.counts.items() if classify(s) != "logging"}
    assert per_episode == {}, per_episode
    assert sum(counter.counts.values()) == 3  # one read of the device per batch of rows written
    assert len(_rows(tmp_path / "e.csv")) == 40


def test_ctrl_c_during_evaluation_keeps_every_finished_episode(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=30, seed=0)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_NearestMean(interrupt_at=21), tiny_store, lst, 30, CPU, 16, tmp_path / "e.csv", progress=False)
    assert [r["episode"] for r in _rows(tmp_path / "e.csv")] == [str(i) for i in range(21)]  # 16 written + 5 pending


KILLED_RUN = """
import sys, time
import torch
from pathlib import Path
from fewshot_nsl import evaluation
from fewshot_nsl.data.episodes import episode_list_for_store
from fewshot_nsl.registry import plugin_module
sys.path.insert(0, {tests!r})
from sync_free_method import NearestMean
evaluation.FSYNC_EVERY_S = 1e9  # batches of ROWS_PER_FLUSH rows only
store = plugin_module(Path({tests!r}) / "plugins" / "tiny_dataset.py").make_tiny_store()
lst = episode_list_for_store(store, "test", 5, 2, 3, n=64, seed=0)
evaluation.evaluate(NearestMean(delay=float(sys.argv[2])), store, lst, 64, torch.device("cpu"), 16, Path(sys.argv[1]),
                    progress=False)
"""


def test_sigkill_during_evaluation_loses_at_most_the_unwritten_batch_and_resumes(tiny_store, tmp_path, monkeypatch):
    script = tmp_path / "run_eval.py"
    script.write_text(KILLED_RUN.format(tests=str(REPO / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1", FEWSHOT_NSL_CACHE=str(tmp_path / "cache"))

    def run(csv_path, delay, kill_at=None):
        proc = subprocess.Popen([sys.executable, str(script), str(csv_path), str(delay)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kill_at is None:
            assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
            return
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if csv_path.is_file() and csv_path.read_text().count("\n") - 1 >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the evaluation finished before it could be killed"

    monkeypatch.setattr(evaluation, "FSYNC_EVERY_S", 1e9)
    evaluate(_NearestMean(), tiny_store, episode_list_for_store(tiny_store, "test", 5, 2, 3, n=64, seed=0), 64, CPU, 16,
             tmp_path / "ref.csv", progress=False)  # the uninterrupted reference, in this process
    killed = tmp_path / "killed.csv"
    run(killed, 0.02, kill_at=16)
    written = len(_rows(killed))
    assert 16 <= written < 64 and written % evaluation.ROWS_PER_FLUSH == 0  # whole batches only
    run(killed, 0.0)  # resumes: only the missing episodes, same values
    assert _rows(killed) == _rows(tmp_path / "ref.csv")
