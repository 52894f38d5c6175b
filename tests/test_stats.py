import numpy as np
import pytest
from scipy import stats as sps

from fewshot_nsl.stats import paired_compare, summarize


def test_ci_matches_formula_and_scipy():
    rng = np.random.default_rng(0)
    acc = rng.uniform(40, 90, size=600)
    s = summarize(acc)
    assert s.n == 600
    assert s.mean == pytest.approx(acc.mean())
    assert s.ci95 == pytest.approx(1.96 * acc.std() / np.sqrt(600))
    lo, hi = sps.t.interval(0.95, 599, loc=acc.mean(), scale=sps.sem(acc))
    assert s.ci95_t == pytest.approx((hi - lo) / 2)
    # the t interval is slightly wider than the normal one with the sample std
    assert s.ci95_t > 1.96 * acc.std(ddof=1) / np.sqrt(600)


def test_nan_episodes_count_as_wrong_not_excluded():
    """A failed (NaN) episode is an episode the method got wrong: 0 in the mean, counted in n and in failed
    (dropping it would let a method raise its score by abstaining on hard episodes)."""
    s = summarize([50.0, float("nan"), 70.0])
    assert s.n == 3 and s.failed == 1 and s.mean == pytest.approx(40.0)


def test_paired_compare_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.uniform(40, 90, size=100)
    b = a - 2 + rng.normal(0, 3, size=100)
    c = paired_compare(a, b)
    ref = sps.ttest_rel(a, b)
    assert c.mean_diff == pytest.approx((a - b).mean())
    assert c.p_value == pytest.approx(ref.pvalue)
    assert c.t_stat == pytest.approx(ref.statistic)
    assert c.wilcoxon_p == pytest.approx(sps.wilcoxon(a - b).pvalue)
    with pytest.raises(ValueError):
        paired_compare(a, b[:10])
