"""cream_nb.core.stats against scipy, statsmodels or a computation by hand: Wilson, binomial, McNemar, two proportions,
percentile bootstrap, permutation test, and the minimum detectable differences (power 0.8, alpha 0.05)."""
import ast, itertools, math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import binom_test, proportion_confint, proportion_effectsize, proportions_ztest

from cream_nb.core import stats as S

def test_stats_is_a_foundation_layer():
    "cream_nb.core.stats imports nothing from cream_nb, and nothing but numpy/scipy and the standard library."
    tree = ast.parse((Path(S.__file__)).read_text())
    mods = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree))
    assert mods <= {'__future__', 'itertools', 'math', 'numpy', 'scipy'}, mods

@pytest.mark.parametrize('k,n,level', [(0, 20, .95), (3, 20, .95), (10, 20, .95), (20, 20, .95), (7, 100, .9), (3, 4, .99)])
def test_wilson_against_statsmodels(k, n, level):
    assert S.wilson_interval(k, n, level) == pytest.approx(proportion_confint(k, n, alpha=1 - level, method='wilson'), abs=1e-12)

def test_evaluate_and_compare_use_the_one_wilson_and_mcnemar():
    from cream_nb.stages import evaluate
    from cream_nb.reporting import tables
    assert evaluate.accuracy_interval is S.wilson_interval
    assert tables.mcnemar_exact is S.mcnemar_exact and tables.wilson_interval is S.wilson_interval

@pytest.mark.parametrize('k,n,p', [(14, 18, .5), (0, 10, .5), (9, 18, .5), (3, 25, .3), (17, 20, .6)])
def test_binomial_against_scipy_statsmodels_and_hand(k, n, p):
    got = S.binomial_test(k, n, p)
    assert got == pytest.approx(binom_test(k, n, p), abs=1e-12)
    if p == .5: assert got == pytest.approx(min(1., 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n), abs=1e-12)

def test_mcnemar_against_statsmodels():
    rng = np.random.default_rng(0)
    for n, pa, pb in [(40, .5, .5), (60, .7, .4), (25, .2, .3), (10, .5, .5), (100, .23, .25)]:
        a, b = rng.random(n) < pa, rng.random(n) < pb
        tab = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
        r = S.mcnemar_exact(a.tolist(), b.tolist())
        assert (r['a_only'], r['b_only'], r['n']) == (tab[0][1], tab[1][0], n)
        assert r['p_value'] == pytest.approx(mcnemar(tab, exact=True).pvalue, abs=1e-12)

@pytest.mark.parametrize('k1,n1,k2,n2', [(14, 18, 8, 18), (18, 18, 14, 18), (3, 10, 7, 12), (50, 100, 60, 90)])
def test_two_proportions_against_statsmodels_and_hand(k1, n1, k2, n2):
    assert S.two_proportion_test(k1, n1, k2, n2, 'z') == pytest.approx(proportions_ztest([k1, k2], [n1, n2])[1], abs=1e-12)
    h = st.hypergeom(n1 + n2, k1 + k2, n1); pm = h.pmf(np.arange(0, n1 + 1))       # Fisher by hand: margins fixed
    assert S.two_proportion_test(k1, n1, k2, n2) == pytest.approx(min(1., pm[pm <= h.pmf(k1) * (1 + 1e-7)].sum()), abs=1e-12)

def test_proportion_errors():
    with pytest.raises(ValueError, match='needs n >= 1'): S.wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r'k2 = 5 must be an integer in \[0, n = 4\]'): S.two_proportion_test(1, 4, 5, 4)
    with pytest.raises(ValueError, match=r'p = -0.1 must lie in \[0, 1\]'): S.binomial_test(1, 4, -0.1)

@pytest.mark.parametrize('seed,n,level', [(0, 16, .95), (3, 7, .9), (11, 40, .95)])
def test_bootstrap_matches_scipy_percentile(seed, n, level):
    x = np.random.default_rng(100 + seed).random(n)
    ref = st.bootstrap((x,), np.mean, method='percentile', n_resamples=2000, confidence_level=level, rng=np.random.default_rng(seed))
    assert S.bootstrap_mean_interval(x, level, n_resamples=2000, seed=seed) == pytest.approx(tuple(ref.confidence_interval), abs=1e-12)

def test_bootstrap_by_hand_and_errors():
    # every resample of (0, 1) has mean 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4: the 95% interval is (0, 1), the 50% one (1/2, 1/2)
    assert S.bootstrap_mean_interval([0., 1.]) == (0.0, 1.0) and S.bootstrap_mean_interval([0., 1.], level=0.5) == (0.5, 0.5)
    assert S.bootstrap_mean_interval([1., None, 3.], n_resamples=50) == S.bootstrap_mean_interval([1., 3.], n_resamples=50)  # None left out
    with pytest.raises(ValueError, match='needs n >= 2'): S.bootstrap_mean_interval([])
    with pytest.raises(ValueError, match='n_resamples = 0'): S.bootstrap_mean_interval([1., 2.], n_resamples=0)

def _diff(x, y, axis=-1): return np.mean(x, axis=axis) - np.mean(y, axis=axis)

def test_permutation_exact_against_scipy_and_hand():
    x, y = [0.5, 0.8, 0.9, 0.7], [0.2, 0.6, 0.4]
    ref = st.permutation_test((x, y), _diff, permutation_type='independent', n_resamples=np.inf)
    got = S.permutation_test(x, y)
    assert got['exact'] and got['difference'] == pytest.approx(ref.statistic) and got['p_value'] == pytest.approx(ref.pvalue, abs=1e-12)
    # by hand: all C(7, 4) = 35 splits, two-sided = twice the smaller tail
    z = np.r_[x, y]; obs = np.mean(x) - np.mean(y)
    null = [z[list(c)].mean() - np.delete(z, list(c)).mean() for c in itertools.combinations(range(7), 4)]
    assert got['p_value'] == pytest.approx(min(1, 2 * min(np.mean(np.array(null) >= obs - 1e-12), np.mean(np.array(null) <= obs + 1e-12))))

@pytest.mark.parametrize('seed', [0, 5])
def test_permutation_random_matches_scipy_with_the_same_generator(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.random(16), rng.random(14) + 0.15     # C(30, 16) splits: far more than n_resamples
    ref = st.permutation_test((x, y), _diff, permutation_type='independent', n_resamples=999, rng=np.random.default_rng(seed))
    got = S.permutation_test(x, y, n_resamples=999, seed=seed)
    assert not got['exact'] and got['p_value'] == pytest.approx(ref.pvalue, abs=1e-12)

def test_permutation_agrees_with_mann_whitney_on_a_clear_shift_and_errors():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, 30), rng.normal(1.5, 1, 30)
    assert S.permutation_test(x, y)['p_value'] < 1e-3 and st.mannwhitneyu(x, y).pvalue < 1e-3
    x, y = rng.normal(0, 1, 30), rng.normal(0, 1, 30)
    assert abs(S.permutation_test(x, y)['p_value'] - st.ttest_ind(x, y).pvalue) < 0.05   # no shift: both large, and close
    with pytest.raises(ValueError, match='second group: 1 value'): S.permutation_test([1, 2], [3])

@pytest.mark.parametrize('sd1,n1,sd2,n2', [(0.25, 16, 0.25, 16), (0.2, 16, 0.3, 14), (0.1, 100, 0.15, 60), (1.0, 5, 2.0, 8)])
def test_mdd_means_against_statsmodels_ttest_power(sd1, n1, sd2, n2):
    d = TTestIndPower().solve_power(effect_size=None, nobs1=n1, ratio=n2 / n1, alpha=0.05, power=0.8)
    sp = math.sqrt(((n1 - 1) * sd1**2 + (n2 - 1) * sd2**2) / (n1 + n2 - 2))
    got = S.mdd_means(sd1, n1, sd2, n2)
    assert got == pytest.approx(d * sp, rel=1e-4)                                                     # statsmodels' solver is looser
    assert TTestIndPower().power(got / sp, n1, alpha=0.05, ratio=n2 / n1) == pytest.approx(0.8, abs=1e-9)   # its power at ours: 0.8

def test_mdd_means_tends_to_the_normal_approximation():
    za, zb = st.norm.isf(0.025), st.norm.ppf(0.8)
    assert S.mdd_means(0.3, 5000, 0.3, 5000) == pytest.approx((za + zb) * math.sqrt(2 * 0.09 / 5000), rel=1e-3)
    assert S.mdd_means(0.3, 16, 0.3, 16) > (za + zb) * math.sqrt(2 * 0.09 / 16)   # t: larger at small n
    with pytest.raises(ValueError, match='each sample needs n >= 2'): S.mdd_means(0.1, 1, 0.1, 5)

@pytest.mark.parametrize('p,n1,n2', [(0.5, 100, None), (0.78, 18, 18), (0.3, 50, 80), (0.05, 200, 200), (0.9, 30, None)])
def test_mdd_proportions_against_statsmodels_normal_power(p, n1, n2):
    h = NormalIndPower().solve_power(effect_size=None, nobs1=n1, ratio=0 if n2 is None else n2 / n1, alpha=0.05, power=0.8)
    m = S.mdd_proportions(p, n1, n2)
    p2 = p + m if p <= 0.5 else p - m                      # towards 1/2
    assert abs(proportion_effectsize(p2, p)) == pytest.approx(h, rel=1e-4)
    assert NormalIndPower().power(abs(proportion_effectsize(p2, p)), n1, alpha=0.05, ratio=0 if n2 is None else n2 / n1) == pytest.approx(0.8, abs=1e-9)

def test_mdd_paired_proportions_by_hand():
    za, zb = st.norm.isf(0.025), st.norm.ppf(0.8)
    for psi, delta in [(0.2, 0.1), (0.1, 0.05), (0.4, 0.08)]:
        n = (za * math.sqrt(psi) + zb * math.sqrt(psi - delta**2))**2 / delta**2     # Connor (1987), eq. for n
        assert S.connor_n(delta, psi) == pytest.approx(n, rel=1e-12)
        assert S.mdd_paired_proportions(n, psi) == pytest.approx(delta, abs=1e-9)
    assert S.connor_n(0.1, 0.2) == pytest.approx(154.60, abs=0.01)
    assert S.mdd_paired_proportions(100, 0.06) is None and S.mdd_paired_proportions(100, 0.0) is None   # too few discordant questions
    # larger n: a smaller difference detectable
    assert S.mdd_paired_proportions(400, 0.2) < S.mdd_paired_proportions(100, 0.2)
    with pytest.raises(ValueError, match='needs n >= 1'): S.mdd_paired_proportions(0, 0.2)
