"""fewshot-nsl: a few-shot benchmark suite around Neural Similarity Learning (NeurIPS 2019).

``import fewshot_nsl`` is light (no torch): the functions below import the harness on first use
(see :mod:`fewshot_nsl.api`, where they are documented).

* :func:`benchmark`: run (or resume, or reuse) benchmark cells; one row per cell as a DataFrame (``on_leaderboard``
  False where the leaderboard kept a row with more evidence).
* :func:`load_results`: the leaderboard of a results folder as a DataFrame.
* :func:`compare`: paired statistics of two finished runs on their common episodes, as a DataFrame.
* :func:`load_method`: a trained method from a run folder, ready to classify new images.
* :func:`method_options`: a method's options with defaults and one-line docs.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "benchmark", "load_results", "compare", "load_method", "method_options"]


def benchmark(*args: Any, **kwargs: Any) -> Any:
    """Run benchmark cells and return one row per cell (a DataFrame); see :func:`fewshot_nsl.api.benchmark`."""
    from .api import benchmark as _benchmark

    return _benchmark(*args, **kwargs)


def load_results(*args: Any, **kwargs: Any) -> Any:
    """The leaderboard of a results folder as a DataFrame; see :func:`fewshot_nsl.api.load_results`."""
    from .api import load_results as _load_results

    return _load_results(*args, **kwargs)


def compare(*args: Any, **kwargs: Any) -> Any:
    """Paired statistics of two finished runs (one-row DataFrame); see :func:`fewshot_nsl.api.compare`."""
    from .api import compare as _compare

    return _compare(*args, **kwargs)


def load_method(*args: Any, **kwargs: Any) -> Any:
    """A trained method from a run folder, with ``.predict(support_images, support_labels, query_images)``;
    see :func:`fewshot_nsl.api.load_method`."""
    from .api import load_method as _load_method

    return _load_method(*args, **kwargs)


def method_options(*args: Any, **kwargs: Any) -> Any:
    """A method's options with defaults and docs (list of dicts); see :func:`fewshot_nsl.api.method_options`."""
    from .api import method_options as _method_options

    return _method_options(*args, **kwargs)
