"""The harness's batched evaluation path (:func:`fewshot_nsl.evaluation.evaluate` with ``batch_episodes``):
the same rows as the per-episode path, resume after an interruption mid-batch, one-line errors, the setting."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List

import pytest
import torch

from fewshot_nsl import evaluation
from fewshot_nsl.config import RunConfig, resolve_config
from fewshot_nsl.data.episodes import Materialiser, episode_list_for_store
from fewshot_nsl.errors import ConfigError, MethodError
from fewshot_nsl.evaluation import evaluate, load_batch, resolve_batch_episodes
from fewshot_nsl.methods import batched

from batched_equivalence import build
from sync_free_method import NearestMean  # noqa: E402

CPU = torch.device("cpu")
COMPARE = ["episode", "accuracy", "correct", "total", "status"]


def _rows(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        return [{k: r[k] for k in COMPARE} for r in csv.DictReader(f)]


class BatchedNearestMean(NearestMean):
    """:class:`NearestMean` with a batched path; ``fail_call`` / ``interrupt_call``: the ``evaluate_episodes`` call
    (0-based) that raises a ValueError / KeyboardInterrupt; ``bad_shape``: return logits of a wrong shape."""

    def __init__(self, fail_call: int = -1, interrupt_call: int = -1, bad_shape: bool = False) -> None:
        super().__init__()
        self.batch_calls, self.sizes = 0, []
        self.fail_call, self.interrupt_call, self.bad_shape = fail_call, interrupt_call, bad_shape

    def supports_batched_evaluation(self) -> bool:
        return True

    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways):
        call, self.batch_calls = self.batch_calls, self.batch_calls + 1
        self.sizes.append(len(seeds))
        if call == self.fail_call:
            raise ValueError("broken batch")
        if call == self.interrupt_call:
            raise KeyboardInterrupt
        x = support_x.flatten(2)  # (E, S, D)
        onehot = torch.nn.functional.one_hot(support_y, ways).to(x.dtype)  # (E, S, ways)
        protos = onehot.transpose(1, 2) @ x / onehot.sum(1).unsqueeze(-1)  # (E, ways, D)
        logits = -torch.cdist(query_x.flatten(2), protos).pow(2)  # (E, Q, ways)
        return logits[:, :, :2] if self.bad_shape else logits


def test_batched_rows_equal_the_per_episode_rows_and_batches_are_as_asked(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=20, seed=0)
    evaluate(NearestMean(), tiny_store, lst, 20, CPU, 16, tmp_path / "each.csv", progress=False)
    method, info = BatchedNearestMean(), {}
    evaluate(method, tiny_store, lst, 20, CPU, 16, tmp_path / "batched.csv", progress=False, batch_episodes=7, info=info)
    assert method.sizes == [7, 7, 6] and info["batch_episodes"] == 7 and "batched_fallback" not in info
    assert _rows(tmp_path / "each.csv") == _rows(tmp_path / "batched.csv")


@pytest.mark.parametrize("name", ["dynamic_nsn", "finetune"])
def test_a_built_in_method_scores_the_same_episodes_either_way(tiny_store, tmp_path, name):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=12, seed=0)
    method = build(name, "quick", method_options={"epochs": 5}).float()
    for per_call in (1, 5):
        info = {}
        evaluate(method, tiny_store, lst, 12, CPU, 16, tmp_path / f"{per_call}.csv", progress=False,
                 batch_episodes=per_call, info=info)
        assert info["batch_episodes"] == per_call
    assert _rows(tmp_path / "1.csv") == _rows(tmp_path / "5.csv")


def test_an_interrupted_batch_loses_only_itself_and_the_run_resumes_to_the_same_rows(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=20, seed=0)
    out = tmp_path / "e.csv"
    with pytest.raises(KeyboardInterrupt):
        evaluate(BatchedNearestMean(interrupt_call=2), tiny_store, lst, 20, CPU, 16, out, progress=False,
                 batch_episodes=6)
    assert [r["episode"] for r in _rows(out)] == [str(i) for i in range(12)]  # two batches written
    resumed = BatchedNearestMean()
    evaluate(resumed, tiny_store, lst, 20, CPU, 16, out, progress=False, batch_episodes=6)
    assert resumed.sizes == [6, 2]
    evaluate(NearestMean(), tiny_store, lst, 20, CPU, 16, tmp_path / "ref.csv", progress=False)
    assert _rows(out) == _rows(tmp_path / "ref.csv")


def test_a_method_error_in_a_batch_falls_back_to_the_per_episode_path_with_one_warning(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=12, seed=0)
    out, lines, info = tmp_path / "e.csv", [], {}
    method = BatchedNearestMean(fail_call=1)
    evaluate(method, tiny_store, lst, 12, CPU, 16, out, progress=False, batch_episodes=4, info=info, log=lines.append)
    assert method.sizes == [4, 4]  # the second batch failed; the rest ran episode by episode
    assert len(lines) == 1 and lines[0].startswith("warning: batched evaluation failed on test episodes 4-7")
    assert "broken batch" in lines[0] and "\n" not in lines[0]
    assert info["batch_episodes"] == 1 and "episodes 4-7" in info["batched_fallback"]
    assert (tmp_path / "error.txt").is_file()
    evaluate(NearestMean(), tiny_store, lst, 12, CPU, 16, tmp_path / "ref.csv", progress=False)
    assert _rows(out) == _rows(tmp_path / "ref.csv")


class BrokenEverywhere(BatchedNearestMean):
    def fit_support(self, support_x, support_y):
        raise ValueError("broken episode")


def test_a_method_broken_on_its_per_episode_path_is_one_error_line(tiny_store, tmp_path):
    """The first batch's check runs episode 0 through fit_support/forward too: a method broken there is a method
    error (one line), whatever its batched path gives."""
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=12, seed=0)
    with pytest.raises(MethodError) as err:
        evaluate(BrokenEverywhere(), tiny_store, lst, 12, CPU, 16, tmp_path / "e.csv", progress=False,
                 batch_episodes=4, log=lambda line: None)
    assert "\n" not in str(err.value) and "fit_support on test episode 0" in str(err.value)
    assert _rows(tmp_path / "e.csv") == []


class OutOfMemoryAbove(BatchedNearestMean):
    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways):
        if len(seeds) > 2:
            self.sizes.append(len(seeds))
            raise torch.OutOfMemoryError("fake: out of memory")
        return super().evaluate_episodes(support_x, support_y, query_x, seeds, ways)


def test_out_of_memory_halves_the_batch_and_gives_the_same_rows(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=10, seed=0)
    lines, info, method = [], {}, OutOfMemoryAbove()
    evaluate(method, tiny_store, lst, 10, CPU, 16, tmp_path / "e.csv", progress=False, batch_episodes=8, info=info,
             log=lines.append)
    assert method.sizes == [8, 4, 2, 2, 2, 2, 2] and info["batch_episodes"] == 2
    assert [line.split(";")[0] for line in lines] == ["warning: out of memory evaluating 8 episodes at once",
                                                      "warning: out of memory evaluating 4 episodes at once"]
    evaluate(NearestMean(), tiny_store, lst, 10, CPU, 16, tmp_path / "ref.csv", progress=False)
    assert _rows(tmp_path / "e.csv") == _rows(tmp_path / "ref.csv")


def test_logits_of_the_wrong_shape_from_a_batch_are_named_and_the_episodes_run_one_by_one(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=4, seed=0)
    lines = []
    evaluate(BatchedNearestMean(bad_shape=True), tiny_store, lst, 4, CPU, 16, tmp_path / "e.csv", progress=False,
             batch_episodes=4, log=lines.append)
    assert len(lines) == 1 and "expected (n_query, ways) = (15, 5)" in lines[0]
    assert len(_rows(tmp_path / "e.csv")) == 4


def test_a_method_without_batched_support_runs_per_episode_whatever_the_setting(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=3, seed=0)
    info = {}
    evaluate(NearestMean(), tiny_store, lst, 3, CPU, 16, tmp_path / "e.csv", progress=False, batch_episodes=50,
             info=info)
    assert info == {"batch_episodes": 1}


def test_auto_batch_size_follows_the_memory_budget(monkeypatch):
    method = BatchedNearestMean()
    monkeypatch.setattr(method, "episode_bytes", lambda s, q, size: 10_000_000)
    monkeypatch.setattr(batched, "CPU_EVAL_BUDGET_BYTES", 35_000_000)
    assert resolve_batch_episodes(method, "auto", CPU, 600, 10, 15, 16) == 3
    monkeypatch.setattr(batched, "CPU_EVAL_BUDGET_BYTES", 10**15)
    assert resolve_batch_episodes(method, "auto", CPU, 600, 10, 15, 16) == batched.MAX_BATCH_EPISODES
    assert resolve_batch_episodes(method, "auto", CPU, 7, 10, 15, 16) == 7
    assert resolve_batch_episodes(method, 1, CPU, 600, 10, 15, 16) == 1


def test_load_batch_stacks_support_first_and_refuses_mixed_shapes(tiny_store):
    mat = Materialiser(tiny_store, 16, CPU)
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=3, seed=0)
    staged = [mat.stage(lst.episode(i)) for i in range(3)]
    batch = load_batch(mat, staged)
    assert batch.support_x.shape == (3, 10, 3, 16, 16) and batch.query_x.shape == (3, 15, 3, 16, 16)
    for e in range(3):
        one = mat.load(staged[e])
        assert torch.equal(batch.support_x[e], one.support_x) and torch.equal(batch.query_x[e], one.query_x)
        assert torch.equal(batch.support_y[e], one.support_y) and torch.equal(batch.query_y[e], one.query_y)
    other = episode_list_for_store(tiny_store, "test", 5, 1, 3, n=1, seed=0)
    assert load_batch(mat, staged[:1] + [mat.stage(other.episode(0))]) is None


@pytest.mark.parametrize("value", [0, -3, "many", True, 2.5])
def test_bad_batch_episodes_settings_are_one_line(value):
    with pytest.raises(ConfigError, match="eval.batch_episodes must be auto or a whole number"):
        resolve_config({"method": "protonet", "profile": "smoke", "dataset": "tiny", "eval": {"batch_episodes": value}})


def test_batch_episodes_is_not_part_of_the_config_hash():
    a, b = RunConfig(), RunConfig()
    b.eval.batch_episodes = 1
    assert a.hash() == b.hash()


class SwappedEpisodes(BatchedNearestMean):
    """A batched path with a bug: every episode gets the next episode's logits."""

    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways):
        return super().evaluate_episodes(support_x, support_y, query_x, seeds, ways).roll(1, dims=0)


def test_a_batched_path_that_disagrees_with_the_per_episode_path_is_dropped_with_one_warning(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=12, seed=0)
    lines, info = [], {}
    evaluate(SwappedEpisodes(), tiny_store, lst, 12, CPU, 16, tmp_path / "e.csv", progress=False, batch_episodes=4,
             info=info, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: batched evaluation disagrees with the per-episode path "
                                                   "on test episode 0")
    assert info["batch_episodes"] == 1 and "test episode 0" in info["batched_fallback"]
    evaluate(NearestMean(), tiny_store, lst, 12, CPU, 16, tmp_path / "ref.csv", progress=False)
    assert _rows(tmp_path / "e.csv") == _rows(tmp_path / "ref.csv")


class RoundingSensitive(BatchedNearestMean):
    """A correct batched path of a method that amplifies rounding: its logits carry ``sin(1e6 * s)`` of a sum ``s``
    over each query's pixels (times 100), which the two paths add up in different orders (in float32 the term is noise, in
    float64 it agrees to about 1e-7)."""

    def forward(self, query_x):
        return super().forward(query_x) + 100 * torch.sin(1e6 * query_x.flatten(1).sum(1))[:, None]

    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways):
        s = query_x.flatten(2).flip(-1).sum(-1)  # (E, Q): the same sum, another order
        return super().evaluate_episodes(support_x, support_y, query_x, seeds, ways) + 100 * torch.sin(1e6 * s)[..., None]


class NoFloat64(SwappedEpisodes):
    """A batched path the float64 check cannot run (and that is wrong)."""

    def double(self):
        raise RuntimeError("float64 is not supported here")


def test_a_method_that_amplifies_rounding_keeps_its_batched_path_after_the_float64_check(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=12, seed=0)
    lines, info, method = [], {}, RoundingSensitive()
    with torch.no_grad():  # the premise: in float32 the two paths are far apart
        sx = torch.rand(2, 10, 3, 16, 16)
        sy = torch.arange(5).repeat(2).expand(2, 10)
        qx = torch.rand(2, 15, 3, 16, 16)
        method.fit_support(sx[0], sy[0])
        gap, tolerance = evaluation.logits_gap(method.evaluate_episodes(sx, sy, qx, [0, 1], 5)[0], method(qx[0]))
        assert gap > tolerance
    evaluate(method, tiny_store, lst, 12, CPU, 16, tmp_path / "e.csv", progress=False, batch_episodes=4, info=info,
             log=lines.append)
    assert lines == [] and method.sizes == [2, 4, 2, 4, 4], (lines, method.sizes)  # premise, batch, float64 check
    assert info["batch_episodes"] == 4 and "batched_fallback" not in info
    assert "in float64 the paths differ by" in info["batched_check"]
    assert info["batched_check"].endswith("batched kept")


def test_a_wrong_batched_path_is_still_dropped_after_the_float64_check(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=8, seed=0)
    for method, says in ((SwappedEpisodes(), "in float64 the paths differ by"),
                         (NoFloat64(), "the float64 check could not run (float64 is not supported here)")):
        lines, info = [], {}
        evaluate(method, tiny_store, lst, 8, CPU, 16, tmp_path / f"{type(method).__name__}.csv", progress=False,
                 batch_episodes=4, info=info, log=lines.append)
        assert len(lines) == 1 and says in lines[0] and "\n" not in lines[0], lines
        assert info["batch_episodes"] == 1 and says in info["batched_fallback"]


@pytest.mark.parametrize("name, options", [("finetune", {"epochs": 2}), ("maml", {"inner_steps_test": 3})])
def test_the_float64_check_leaves_the_method_as_it_was(tiny_store, name, options):
    mat = Materialiser(tiny_store, 16, CPU)
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=3, seed=0)
    batch = load_batch(mat, [mat.stage(lst.episode(i)) for i in range(3)])
    method = build(name, "quick", method_options=options).float()
    method.batched_on_cpu = True
    with torch.no_grad():  # per-episode state left by the check episode (MAML: higher's patched module)
        method.fit_support(batch.support_x[0], batch.support_y[0])
    before = {k: v.clone() for k, v in method.state_dict().items()}
    check = evaluation.float64_check(method, batch, [0, 1, 2], 0, None, "test")
    assert check.agrees and check.gap < 1e-9 and check.reference.dtype == torch.float64
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in method.state_dict().items())


def test_a_correct_batched_path_passes_its_check_once_and_records_the_gap(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=12, seed=0)
    lines, info, method = [], {}, BatchedNearestMean()
    evaluate(method, tiny_store, lst, 12, CPU, 16, tmp_path / "e.csv", progress=False, batch_episodes=4, info=info,
             log=lines.append)
    assert lines == [] and method.sizes == [4, 4, 4] and method.calls == 1  # one per-episode check episode
    assert info["batch_episodes"] == 4 and info["batched_check"].startswith("test episode 0: max |logit difference|")


def test_logits_gap_tolerates_rounding_not_mixups():
    single = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    gap, tol = evaluation.logits_gap(single + 1e-4, single)
    assert gap <= tol
    gap, tol = evaluation.logits_gap(single.flip(0), single)
    assert gap > tol
    inf = torch.tensor([[float("-inf"), 1.0], [0.5, 2.0]])
    assert evaluation.logits_gap(inf, single)[0] == float("inf")
    assert evaluation.logits_gap(inf, inf.clone())[0] == 0.0
