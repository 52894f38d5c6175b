"""Accuracy statistics: mean with 95% confidence intervals, and paired comparisons.

Two intervals are reported. ``ci95`` is the one the NSL paper and its peers print,
``1.96 * std / sqrt(n)`` (population std, as ``np.std``); ``ci95_t`` is the Student-t
interval ``t_{0.975, n-1} * sem`` (sample std), from :mod:`scipy.stats`.

Failed episodes. A NaN accuracy marks an episode that failed (its logits were not finite). It
counts as wrong, accuracy 0, in every statistic here, and is counted (``Summary.failed``): it is
never dropped, since dropping would let a method raise its mean by abstaining on hard episodes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import numpy as np
from scipy import stats as sps


@dataclass
class Summary:
    """Mean accuracy (in %) with its two 95% half-widths, over ``n`` episodes, ``failed`` of
    which failed and count as wrong (accuracy 0)."""

    mean: float
    ci95: float
    ci95_t: float
    std: float
    n: int
    failed: int = 0

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.mean:.2f} +- {self.ci95:.2f} (n={self.n}{failed})"


def failed_as_wrong(accuracies: Sequence[float]) -> np.ndarray:
    """Accuracies as float64 with NaN (a failed episode) replaced by 0 (wrong): ``(n,)`` -> ``(n,)``."""
    a = np.asarray(accuracies, dtype=np.float64)
    return np.where(np.isnan(a), 0.0, a)


def summarize(accuracies: Sequence[float]) -> Summary:
    """Summarise per-episode accuracies (fractions in [0, 1] or percentages; reported as given).

    NaN entries are failed episodes: they count as wrong (accuracy 0) in the mean, std and both
    intervals, and their number is ``Summary.failed``; ``n`` counts every episode.
    """
    raw = np.asarray(accuracies, dtype=np.float64)
    failed = int(np.isnan(raw).sum())
    a = failed_as_wrong(raw)
    n = len(a)
    if n == 0:
        return Summary(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    mean = float(a.mean())
    std = float(a.std())
    ci = 1.96 * std / np.sqrt(n)
    if n > 1:
        sem = float(sps.sem(a))
        ci_t = float(sps.t.ppf(0.975, n - 1) * sem) if sem > 0 else 0.0
    else:
        ci_t = float("nan")
    return Summary(mean, float(ci), ci_t, std, n, failed)


@dataclass
class PairedComparison:
    """Difference ``a - b`` of two methods on the same episodes (in the units given)."""

    mean_diff: float
    ci95: float
    t_stat: float
    p_value: float
    wilcoxon_p: float
    n: int


def paired_compare(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    """Paired t-test (and Wilcoxon signed-rank) of per-episode accuracies on the same episodes.

    A NaN (failed episode) on either side counts as accuracy 0 there, as in :func:`summarize`.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same episodes: got {a.shape} and {b.shape}")
    a, b = failed_as_wrong(a), failed_as_wrong(b)
    d = a - b
    n = len(d)
    s = summarize(d)
    if n > 1 and np.any(d != 0):
        t = sps.ttest_rel(a, b)
        w = sps.wilcoxon(d).pvalue
        t_stat, p = float(t.statistic), float(t.pvalue)
    else:
        t_stat, p, w = 0.0, 1.0, 1.0
    return PairedComparison(s.mean, s.ci95, t_stat, p, float(w), n)
