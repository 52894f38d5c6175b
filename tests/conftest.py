"""Shared fixtures: a hermetic cache, a tiny learnable dataset registered as ``tiny``, and
:func:`synthetic_episode` (a learnable in-memory episode) with its fixture ``episode_factory``."""
from __future__ import annotations

import os

from pathlib import Path

import pytest
import torch

from fewshot_nsl.data.store import ImageStore


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Every test session gets its own dataset/pretraining cache."""
    path = tmp_path_factory.mktemp("fewshot_cache")
    old = os.environ.get("FEWSHOT_NSL_CACHE")
    os.environ["FEWSHOT_NSL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEWSHOT_NSL_CACHE", None)
    else:
        os.environ["FEWSHOT_NSL_CACHE"] = old


from fewshot_nsl.registry import load_plugins, plugin_module  # noqa: E402

PLUGINS = Path(__file__).parent / "plugins"
load_plugins([PLUGINS])
make_tiny_store = plugin_module(PLUGINS / "tiny_dataset.py").make_tiny_store


@pytest.fixture
def tiny_store() -> ImageStore:
    return make_tiny_store()


def synthetic_episode(ways: int = 5, shots: int = 2, queries: int = 3, seed: int = 0, size: int = 16,
                      separation: float = 0.5, dtype: torch.dtype = torch.float32):
    """A learnable episode without a dataset: Gaussian images whose mean grows with the class.

    Returns:
        ``support_x (ways*shots, 3, size, size)``, ``support_y (ways*shots,)``,
        ``query_x (ways*queries, 3, size, size)``, ``query_y (ways*queries,)``; labels class-major.
    """
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    sx = torch.randn(len(sy), 3, size, size, generator=g, dtype=dtype) + sy[:, None, None, None] * separation
    qx = torch.randn(len(qy), 3, size, size, generator=g, dtype=dtype) + qy[:, None, None, None] * separation
    return sx, sy, qx, qy


@pytest.fixture
def episode_factory():
    """:func:`synthetic_episode`, as a fixture."""
    return synthetic_episode
