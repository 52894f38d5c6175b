"""Each distinct image of an evaluation embedded once (:class:`fewshot_nsl.embedding_cache.EmbeddingCache`, used by
the batched path of methods with an :meth:`~FewShotMethod.image_embedding`): the rows it serves are the images' own
embeddings whatever the batches, the budget and the restarts, and the harness's rows stay the per-episode path's."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fewshot_nsl.data.episodes import Materialiser, episode_list_for_store
from fewshot_nsl.embedding_cache import EmbeddingCache
from fewshot_nsl.evaluation import evaluate, load_batch

from batched_equivalence import build

CPU = torch.device("cpu")


class Counting:
    """``(N, 3, H, W) -> (N, 4)``: a fixed function of each image alone; counts the images it embeds."""

    def __init__(self):
        self.images = 0

    def __call__(self, x):
        self.images += len(x)
        return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3)), x[:, 0, 0, 0], x[:, 1].std((1, 2))], 1)


def _batch(ids_s, ids_q, size=4):
    """Images made from their store index (so equal indices are equal images): ``(E, S, 3, s, s)``, ``(E, Q, ...)``."""
    def imgs(ids):
        g = torch.Generator()
        return torch.stack([torch.stack([torch.randn(3, size, size, generator=g.manual_seed(int(i))) for i in row])
                            for row in ids])
    return imgs(ids_s), imgs(ids_q)


@pytest.mark.parametrize("chunk", [64, 5])
@pytest.mark.parametrize("budget_rows", [10_000, 40, 13])
def test_the_cache_serves_each_image_its_own_embedding_across_batches_growth_and_restarts(budget_rows, chunk,
                                                                                         monkeypatch):
    import fewshot_nsl.embedding_cache as module

    monkeypatch.setattr(module, "feature_chunk_images", lambda device: chunk)  # 5: chunks across support and query
    rng = np.random.default_rng(0)
    embed = Counting()
    cache = EmbeddingCache(embed, n_images=60, device=CPU, budget_bytes=budget_rows * 4 * 4)
    for _ in range(12):
        ids_s, ids_q = rng.integers(0, 60, (3, 4)), rng.integers(0, 60, (3, 5))
        sx, qx = _batch(ids_s, ids_q)
        sf, qf = cache.features(sx, qx, ids_s, ids_q)
        assert sf.shape == (3, 4, 4) and qf.shape == (3, 5, 4)
        ref = Counting()
        torch.testing.assert_close(sf, ref(sx.flatten(0, 1)).unflatten(0, (3, 4)), rtol=0, atol=0)
        torch.testing.assert_close(qf, ref(qx.flatten(0, 1)).unflatten(0, (3, 5)), rtol=0, atol=0)
        assert cache.rows.shape[0] <= max(budget_rows, 27)  # never past the budget but for one batch's images
    assert cache.served == 12 * 27 and embed.images == cache.embedded
    if budget_rows == 10_000:
        assert cache.embedded <= 60 and cache.restarts == 0  # each of the 60 images at most once
    else:
        assert cache.restarts > 0


def test_an_embedding_that_changes_shape_between_calls_is_refused():
    calls = []

    def embed(x):
        calls.append(1)
        return x.flatten(1)[:, : 2 + len(calls)]

    cache = EmbeddingCache(embed, n_images=10, device=CPU)
    sx, qx = _batch(np.array([[0, 1]]), np.array([[2]]))
    cache.features(sx, qx, np.array([[0, 1]]), np.array([[2]]))
    sx, qx = _batch(np.array([[3, 4]]), np.array([[5]]))
    with pytest.raises(RuntimeError, match="must not depend on the call"):
        cache.features(sx, qx, np.array([[3, 4]]), np.array([[5]]))


def _accuracies(path):
    with open(path, newline="") as f:
        return [(r["episode"], r["accuracy"], r["status"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("name, options", [("protonet", {}), ("nearest_neighbor", {}), ("matchingnet", {}),
                                           ("finetune", {"epochs": 3}), ("dynamic_nsn", {"epochs": 3})])
def test_the_harness_embeds_each_image_once_and_scores_as_the_per_episode_path(tiny_store, tmp_path, name, options):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=16, seed=0)
    method = build(name, "quick", method_options=options).float()
    assert method.image_embedding() is not None
    calls = {"images": 0}
    handle = method.backbone.register_forward_pre_hook(lambda m, args: calls.__setitem__("images",
                                                                                         calls["images"] + len(args[0])))
    info = {}
    evaluate(method, tiny_store, lst, 16, CPU, 16, tmp_path / "batched.csv", progress=False, batch_episodes=8, info=info)
    batched_images = calls["images"]
    handle.remove()
    evaluate(method, tiny_store, lst, 16, CPU, 16, tmp_path / "each.csv", progress=False, batch_episodes=1)
    assert _accuracies(tmp_path / "batched.csv") == _accuracies(tmp_path / "each.csv")
    mat = Materialiser(tiny_store, 16, CPU)
    distinct = len({int(i) for e in range(16) for i in mat.stage(lst.episode(e)).image_ids})
    # every distinct image once, plus the first episode's 25 for the per-episode check
    assert batched_images == distinct + 25, (batched_images, distinct)
    assert info["embedded_images"] == f"{distinct} images embedded for {16 * 25} image draws"


def test_load_batch_carries_the_store_indices(tiny_store):
    mat = Materialiser(tiny_store, 16, CPU)
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 3, n=2, seed=0)
    staged = [mat.stage(lst.episode(i)) for i in range(2)]
    batch = load_batch(mat, staged)
    for e, st in enumerate(staged):
        assert np.array_equal(np.concatenate([batch.support_ids[e], batch.query_ids[e]]), st.image_ids)
        raw = torch.as_tensor(tiny_store.images[st.image_ids])
        assert torch.equal(mat.to_device(raw)[:10], batch.support_x[e])


def test_the_simpleshot_example_plugins_batched_path_equals_its_per_episode_path():
    from pathlib import Path

    from fewshot_nsl.registry import get_method_class, load_plugins
    from batched_equivalence import assert_same_logits, both_paths

    load_plugins([Path(__file__).resolve().parent.parent / "examples" / "simpleshot"])
    torch.manual_seed(0)
    from fewshot_nsl.backbones import CNN4

    for norm in ("cl2n", "l2n", "un"):
        method = get_method_class("simpleshot")(CNN4(filters=8), image_size=16, norm=norm)
        method.base_mean.normal_()
        method = method.double().eval()
        ref, got = both_paths(method, n=3)
        assert_same_logits(ref, got)
