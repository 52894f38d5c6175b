"""fewshot-nsl: a few-shot benchmark suite around Neural Similarity Learning (NeurIPS 2019).

``import fewshot_nsl`` is light (no torch): :func:`benchmark` and :func:`load_results` import
the harness on first use (see :mod:`fewshot_nsl.api`).
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "benchmark", "load_results"]


def benchmark(*args: Any, **kwargs: Any) -> Any:
    """Run benchmark cells and return their leaderboard rows (a DataFrame); see :func:`fewshot_nsl.api.benchmark`."""
    from .api import benchmark as _benchmark

    return _benchmark(*args, **kwargs)


def load_results(*args: Any, **kwargs: Any) -> Any:
    """The leaderboard of a results folder as a DataFrame; see :func:`fewshot_nsl.api.load_results`."""
    from .api import load_results as _load_results

    return _load_results(*args, **kwargs)
