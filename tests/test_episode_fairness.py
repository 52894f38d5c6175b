"""Episodes no method can game (issue 25, part 2; part 8 for the logits dtype).

* Support and query order are shuffled per episode, deterministically from the list's seed and
  the episode index (and, for training episodes, from the sampler's seeded generator); the
  shuffling scheme and the seed are part of the list's content hash.
* The harness hands a method support images, support labels and query images only.
* An episode with non-finite logits counts as wrong (accuracy 0) in the mean, and is counted.
* Logits of a complex, boolean or integer dtype are refused in one line naming method and episode.
"""
from __future__ import annotations

import csv
import hashlib
import json
from typing import List

import pytest
import torch

from fewshot_nsl.data import episodes as episodes_mod
from fewshot_nsl.data.episodes import (
    Episode,
    EpisodeList,
    EpisodeSampler,
    Materialiser,
    episode_list_for_store,
)
from fewshot_nsl.episode_log import episode_accuracies
from fewshot_nsl.errors import MethodError
from fewshot_nsl.evaluation import evaluate, read_episode_results
from fewshot_nsl.methods.base import FewShotMethod
from fewshot_nsl.stats import paired_compare, summarize

CPU = torch.device("cpu")
WAYS, SHOTS, QUERIES = 5, 1, 3


class _PixelBlind(FewShotMethod):
    """A plugin-style method that never looks at a pixel: it guesses the layout the harness used
    to give (query ``i`` belongs to class ``i // queries``)."""

    training_stages = ()

    def __init__(self, backbone: torch.nn.Module, image_size: int = 8) -> None:
        super().__init__(backbone, image_size)
        self.ways = 0

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        self.ways = self.num_ways(support_y)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        n = len(query_x)
        guess = torch.arange(n) // (n // self.ways)  # (n_query,) class-major guess
        return torch.nn.functional.one_hot(guess, self.ways).float()  # (n_query, ways)


class _Prototypes(FewShotMethod):
    """Nearest class mean of the raw pixels: a real (if weak) method, above chance on ``tiny``."""

    training_stages = ()

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        self.protos = self.class_means(support_x.flatten(1), support_y, self.num_ways(support_y))  # (ways, D)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        return -self.squared_distances(query_x.flatten(1), self.protos)  # (n_query, ways)


class _AbstainsOnOdd(_Prototypes):
    """Returns NaN logits on every second episode it is shown (abstaining)."""

    def __init__(self, backbone: torch.nn.Module, image_size: int = 8) -> None:
        super().__init__(backbone, image_size)
        self.calls = 0

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = super().forward(query_x)
        return logits * float("nan") if self.calls % 2 == 0 else logits


class _Dtype(_Prototypes):
    """Returns its logits cast to ``dtype``."""

    def __init__(self, backbone: torch.nn.Module, image_size: int = 8, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(backbone, image_size)
        self.dtype = dtype

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(query_x)
        return logits > logits.mean() if self.dtype == torch.bool else logits.to(self.dtype)


class _Spy(_Prototypes):
    """Records the arguments of every call the harness makes."""

    def __init__(self, backbone: torch.nn.Module, image_size: int = 8) -> None:
        super().__init__(backbone, image_size)
        self.calls: List[tuple] = []

    def fit_support(self, *args, **kwargs) -> None:  # type: ignore[override]
        self.calls.append(("fit_support", args, kwargs))
        super().fit_support(*args, **kwargs)

    def forward(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        self.calls.append(("forward", args, kwargs))
        return super().forward(*args, **kwargs)


def _method(cls, **kwargs) -> FewShotMethod:
    return cls(torch.nn.Identity(), 8, **kwargs)


def _evaluate(method, store, lst, tmp_path, n=None, name="episodes.csv") -> List[float]:
    return evaluate(method, store, lst, n or len(lst), CPU, 8, tmp_path / name, progress=False)


@pytest.fixture
def test_list(tiny_store) -> EpisodeList:
    return episode_list_for_store(tiny_store, "test", WAYS, SHOTS, QUERIES, n=24, seed=0)


# ----------------------------------------------------------------------------- shuffled layout
def test_a_pixel_blind_method_scores_chance_not_100(tiny_store, test_list, tmp_path):
    accs = _evaluate(_method(_PixelBlind), tiny_store, test_list, tmp_path)
    mean = summarize(accs).mean
    assert mean < 40.0, f"a method that ignores the images scores {mean:.1f}% (chance is {100 / WAYS:.0f}%)"
    # while a method that looks at the images is well above it on the same episodes
    assert summarize(_evaluate(_method(_Prototypes), tiny_store, test_list, tmp_path, name="p.csv")).mean > mean + 15


def test_materialised_labels_follow_their_images_after_shuffling(tiny_store, test_list):
    ep = test_list.episodes[3]
    t = Materialiser(tiny_store, 16, CPU)(ep)
    ordered = Materialiser(tiny_store, 16, CPU)(Episode(ep.classes, ep.support, ep.query))  # class-major, no order
    assert ordered.query_y.tolist() == [k for k in range(WAYS) for _ in range(QUERIES)]
    assert t.query_y.tolist() != ordered.query_y.tolist() and sorted(t.query_y.tolist()) == ordered.query_y.tolist()
    # every shuffled (image, label) pair is a class-major (image, label) pair
    for x, y, ox, oy in ((t.support_x, t.support_y, ordered.support_x, ordered.support_y),
                         (t.query_x, t.query_y, ordered.query_x, ordered.query_y)):
        perm = torch.tensor(ep.order.support if x is t.support_x else ep.order.query)
        assert torch.equal(x, ox[perm]) and torch.equal(y, oy[perm])


def test_the_shuffle_is_deterministic_and_differs_between_episodes(tiny_store, tmp_path):
    a = episode_list_for_store(tiny_store, "test", WAYS, 2, QUERIES, n=12, seed=0)
    path = tmp_path / "list.json"
    a.save(path)
    b = EpisodeList.load(path)  # the permutation is derived again from (seed, index), not read from the file
    mat = Materialiser(tiny_store, 8, CPU)
    orders = []
    for i in range(len(a)):
        ta, tb = mat(a.episodes[i]), mat(b.episodes[i])
        assert torch.equal(ta.query_y, tb.query_y) and torch.equal(ta.support_y, tb.support_y)
        assert torch.equal(ta.query_x, tb.query_x)
        orders.append((tuple(ta.support_y.tolist()), tuple(ta.query_y.tolist())))
    assert len({q for _, q in orders}) == len(orders)  # every episode its own query order
    assert len({s for s, _ in orders}) > 1
    assert b.episode(5) == a.episodes[5] and b.episode(5).order == a.episodes[5].order


def test_the_order_survives_rebuilding_the_list_object(test_list):
    """Orders are attached from (seed, index) whatever Episode objects the list is built from."""
    plain = [Episode(e.classes, e.support, e.query) for e in test_list.episodes]
    again = EpisodeList(test_list.dataset, test_list.split, WAYS, SHOTS, QUERIES, test_list.seed, plain)
    assert [e.order for e in again.episodes] == [e.order for e in test_list.episodes]
    assert again.sha256 == test_list.sha256


def test_training_episodes_are_shuffled_and_reproducible_from_the_seed(tiny_store):
    mat = Materialiser(tiny_store, 8, CPU)
    a, b = (EpisodeSampler(tiny_store, "train", WAYS, 2, 4, seed=7) for _ in range(2))
    class_major = [k for k in range(WAYS) for _ in range(4)]
    queries = []
    for _ in range(6):
        ta, tb = mat(next(a)), mat(next(b))
        assert torch.equal(ta.query_y, tb.query_y) and torch.equal(ta.support_y, tb.support_y)
        queries.append(ta.query_y.tolist())
    assert all(q != class_major for q in queries) and len({tuple(q) for q in queries}) == len(queries)
    # resuming from a saved generator state (as meta_train's checkpoints do) continues identically
    c = EpisodeSampler(tiny_store, "train", WAYS, 2, 4, seed=7)
    c.rng.bit_generator.state = json.loads(json.dumps(a.rng.bit_generator.state))
    assert next(c) == next(a)


# ----------------------------------------------------------------------------- hash
def _legacy_sha256(lst: EpisodeList) -> str:
    """The hash of the unshuffled (class-major) layout, as lists recorded it before shuffling."""
    payload = json.dumps([lst.split, lst.ways, lst.shots, lst.queries, [e.to_json() for e in lst.episodes]],
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_the_hash_covers_the_shuffle_scheme_and_the_seed(test_list, monkeypatch):
    assert test_list.sha256 != _legacy_sha256(test_list)  # results of the old layout are never reused
    same_episodes_other_seed = EpisodeList(test_list.dataset, "test", WAYS, SHOTS, QUERIES, 1, list(test_list.episodes))
    assert same_episodes_other_seed.sha256 != test_list.sha256  # other seed, other permutations
    before = test_list.sha256
    monkeypatch.setattr(episodes_mod, "ORDER_SCHEME", episodes_mod.ORDER_SCHEME + "-next")
    assert test_list.sha256 != before


def test_saved_lists_record_the_scheme_and_an_old_list_is_evaluated_shuffled(test_list, tmp_path):
    path = tmp_path / "list.json"
    test_list.save(path)
    obj = json.loads(path.read_text())
    assert obj["order"] == episodes_mod.ORDER_SCHEME and obj["sha256"] == test_list.sha256
    # a list written before shuffling (no "order", the old hash) still loads, under the new hash
    legacy = {k: v for k, v in obj.items() if k != "order"}
    legacy["sha256"] = _legacy_sha256(test_list)
    path.write_text(json.dumps(legacy))
    loaded = EpisodeList.load(path)
    assert loaded.sha256 == test_list.sha256 != legacy["sha256"]
    assert [e.order for e in loaded.episodes] == [e.order for e in test_list.episodes]
    # an order scheme this version does not know is refused in one line
    obj["order"] = "class-major"
    path.write_text(json.dumps(obj))
    with pytest.raises(Exception) as err:
        EpisodeList.load(path)
    assert "class-major" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the harness
def test_a_method_gets_support_images_support_labels_and_query_images_only(tiny_store, test_list, tmp_path):
    spy = _method(_Spy)
    _evaluate(spy, tiny_store, test_list, tmp_path, n=4)
    assert [c[0] for c in spy.calls] == ["fit_support", "forward"] * 4
    for i, (fit, fwd) in enumerate(zip(spy.calls[0::2], spy.calls[1::2])):
        assert not fit[2] and not fwd[2] and len(fit[1]) == 2 and len(fwd[1]) == 1
        sx, sy = fit[1]
        (qx,) = fwd[1]
        t = Materialiser(tiny_store, 8, CPU)(test_list.episodes[i])
        assert torch.equal(sx, t.support_x) and torch.equal(sy, t.support_y) and torch.equal(qx, t.query_x)
        assert sy.dtype == torch.int64 and sorted(sy.tolist()) == [k for k in range(WAYS) for _ in range(SHOTS)]


# ----------------------------------------------------------------------------- failed episodes
def test_nonfinite_episodes_count_as_wrong_in_the_mean(tiny_store, test_list, tmp_path):
    n = 8
    accs = _evaluate(_method(_AbstainsOnOdd), tiny_store, test_list, tmp_path, n=n)
    ok = _evaluate(_method(_Prototypes), tiny_store, test_list, tmp_path, n=n, name="ok.csv")
    assert accs[1::2] == [0.0] * (n // 2)  # abstained: wrong, not dropped
    assert accs[0::2] == ok[0::2]
    rows = read_episode_results(tmp_path / "episodes.csv")
    assert [rows[i]["status"] for i in range(n)] == ["ok", "nonfinite"] * (n // 2)
    assert all(float(rows[i]["accuracy"]) == 0.0 for i in range(1, n, 2))
    s = summarize(accs)
    dropped = sum(ok[0::2]) / (n // 2)
    assert s.n == n and s.mean == pytest.approx(sum(accs) / n) and s.mean < dropped
    # the per-episode log of a run says the same (0 for the failed episodes)
    assert episode_accuracies(tmp_path, n).tolist() == accs


def test_summarize_counts_nan_as_a_failed_wrong_episode():
    s = summarize([50.0, float("nan"), 70.0])
    assert (s.n, s.failed) == (3, 1) and s.mean == pytest.approx(40.0)
    assert summarize([50.0, 70.0]).failed == 0
    c = paired_compare([50.0, float("nan"), 70.0], [40.0, 40.0, 40.0])
    assert c.n == 3 and c.mean_diff == pytest.approx((10 - 40 + 30) / 3)


def test_episode_accuracies_marks_only_missing_episodes_nan(tmp_path):
    with (tmp_path / "episodes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["episode", "accuracy", "correct", "total", "seconds", "status"])
        w.writerow([0, "60.0", 9, 15, "0.1", "ok"])
        w.writerow([1, "nan", 0, 15, "0.1", "nonfinite"])  # as older versions wrote it
    out = episode_accuracies(tmp_path, 3)
    assert out[:2].tolist() == [60.0, 0.0] and out[2] != out[2]


# ----------------------------------------------------------------------------- logits dtype
@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64])
def test_complex_boolean_or_integer_logits_are_one_line_method_errors(tiny_store, test_list, tmp_path, dtype):
    with pytest.raises(MethodError) as err:
        _evaluate(_method(_Dtype, dtype=dtype), tiny_store, test_list, tmp_path, n=2)
    msg = str(err.value)
    assert "\n" not in msg and "_Dtype" in msg and "episode 0" in msg and str(dtype) in msg


def test_training_loss_refuses_non_float_logits_in_one_line(episode_factory):
    sx, sy, qx, qy = episode_factory(ways=WAYS, shots=2, queries=3, size=8)
    with pytest.raises(MethodError, match=r"^method _Dtype returned logits of dtype torch.bool from forward in training; "):
        _method(_Dtype, dtype=torch.bool).loss(sx, sy, qx, qy)
    assert torch.isfinite(_method(_Prototypes).loss(sx, sy, qx, qy))
