"""Shared fixtures: a hermetic cache, and a tiny learnable dataset registered as ``tiny``."""
from __future__ import annotations

import os

from pathlib import Path

import pytest

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
