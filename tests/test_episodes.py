import json

import numpy as np
import pytest
import torch

from fewshot_nsl.data.episodes import (
    MEAN,
    STD,
    EpisodeList,
    EpisodeSampler,
    Materialiser,
    check_episodes_match_store,
    episode_list_for_store,
)
from fewshot_nsl.errors import DataError


def test_sampler_is_seeded_disjoint_and_in_split(tiny_store):
    a = EpisodeSampler(tiny_store, "train", 5, 3, 4, seed=7)
    b = EpisodeSampler(tiny_store, "train", 5, 3, 4, seed=7)
    train_names = {tiny_store.class_names[c] for c in tiny_store.classes_in_split("train")}
    for _ in range(20):
        ea, eb = next(a), next(b)
        assert ea == eb
        assert len(set(ea.classes)) == 5 and set(ea.classes) <= train_names
        for s, q in zip(ea.support, ea.query):
            assert len(s) == 3 and len(q) == 4 and not set(s) & set(q)
    assert next(EpisodeSampler(tiny_store, "train", 5, 3, 4, seed=8)) != next(a)


def test_impossible_ways_and_shots_are_refused(tiny_store):
    with pytest.raises(DataError, match="lower --ways"):
        EpisodeSampler(tiny_store, "test", 6, 1, 1, seed=0)  # only 5 test classes
    with pytest.raises(DataError, match="lower --shots"):
        EpisodeSampler(tiny_store, "train", 5, 20, 15, seed=0)  # 30 images per class


def test_episode_list_roundtrip_hash_and_tamper_detection(tiny_store, tmp_path):
    lst = episode_list_for_store(tiny_store, "train", 5, 2, 3, n=25, seed=0)
    path = tmp_path / "list.json"
    lst.save(path)
    again = EpisodeList.load(path)
    assert again.sha256 == lst.sha256 and again.episodes == lst.episodes
    assert episode_list_for_store(tiny_store, "train", 5, 2, 3, n=25, seed=0).sha256 == lst.sha256
    assert episode_list_for_store(tiny_store, "train", 5, 2, 3, n=25, seed=1).sha256 != lst.sha256
    obj = json.loads(path.read_text())
    obj["episodes"][0][1][0][0] = (obj["episodes"][0][1][0][0] + 1) % 30
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match="checksum"):
        EpisodeList.load(path)


def test_episode_list_for_another_dataset_is_refused(tiny_store):
    lst = episode_list_for_store(tiny_store, "test", 3, 1, 1, n=3, seed=0)
    object.__setattr__(lst.episodes[0], "classes", ("n01532829",) + lst.episodes[0].classes[1:])
    with pytest.raises(DataError, match="does not have"):
        check_episodes_match_store(lst, tiny_store)


def test_materialiser_gathers_the_right_images_normalised(tiny_store):
    lst = episode_list_for_store(tiny_store, "test", 4, 2, 3, n=1, seed=0)
    ep = lst.episodes[0]
    t = Materialiser(tiny_store, 16, torch.device("cpu"))(ep)
    assert t.support_x.shape == (8, 3, 16, 16) and t.query_x.shape == (12, 3, 16, 16)
    # shown in the episode's shuffled order: position k holds item order.support[k] of the class-major layout
    class_major_support = [k for k in range(4) for _ in range(2)]
    class_major_query = [k for k in range(4) for _ in range(3)]
    assert t.support_y.tolist() == [class_major_support[i] for i in ep.order.support]
    assert t.query_y.tolist() == [class_major_query[i] for i in ep.order.query]
    assert sorted(ep.order.support) == list(range(8)) and list(ep.order.support) != list(range(8))
    idx = tiny_store.class_index()[ep.classes[2]]
    raw = tiny_store.images[tiny_store.index_of(idx, [ep.support[2][1]])[0]]  # class-major item 5
    expect = (torch.from_numpy(raw.astype(np.float32)).permute(2, 0, 1) / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(t.support_x[list(ep.order.support).index(5)], expect, atol=1e-5)
    # resizing to another image size keeps the layout
    assert Materialiser(tiny_store, 8, torch.device("cpu"))(ep).query_x.shape == (12, 3, 8, 8)
