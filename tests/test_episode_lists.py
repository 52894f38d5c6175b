"""The committed episode lists are valid, checksummed, and regenerate byte-identically."""
import pytest

from fewshot_nsl.data.episode_lists import QUERIES, SETTINGS, SOURCES, SPLITS
from fewshot_nsl.data.episodes import EpisodeList, default_episode_path, generate_episode_list


@pytest.mark.parametrize("dataset", sorted(SOURCES))
def test_committed_lists_load_and_regenerate_identically(dataset):
    for split in SPLITS:
        names, sizes = SOURCES[dataset](split)
        assert len(names) == {"test": 20, "val": 16}[split]
        for ways, shots in SETTINGS:
            path = default_episode_path(dataset, split, ways, shots, QUERIES)
            lst = EpisodeList.load(path)  # verifies the recorded checksum
            assert (lst.ways, lst.shots, lst.queries, len(lst)) == (ways, shots, QUERIES, 600)
            assert set(c for e in lst.episodes for c in e.classes) <= set(names)
            again = generate_episode_list(dataset, names, sizes, split, ways, shots, QUERIES, 600, 0)
            assert again.sha256 == lst.sha256


def test_miniimagenet_lists_use_canonical_test_wnids():
    lst = EpisodeList.load(default_episode_path("miniimagenet", "test", 5, 5, 15))
    assert lst.episodes[0].classes[0].startswith("n0")
    assert max(r for e in lst.episodes for s in e.query for r in s) < 600
