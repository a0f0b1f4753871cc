"""MATH.md A3 ("Statement 2"): N(0, I) is invariant under q(x_t | x_{t-1}) and is the limit of
q(x_T | x_0) for any data distribution as T grows.

Expected values come from the standard normal itself (scipy), not from probdiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from probdiff import schedules
from probdiff.distributions import ForwardChain, q_marginal, q_step


@pytest.mark.parametrize("beta", [1e-3, 0.1, 0.7])
def test_standard_normal_is_invariant_under_one_step(beta):
    s = schedules.from_betas([beta])
    n = 200_000
    k1, k2 = jax.random.split(jax.random.key(0))
    x_prev = jax.random.normal(k1, (n, 1))
    x_next = np.asarray(q_step(s, 1, x_prev).sample(k2)).ravel()
    # Variance of x_t: an unbiased sample variance of n N(0,1) draws has SE sqrt(2/n) ~ 0.0032;
    # allow 5 SE. The mean has SE 1/sqrt(n) ~ 0.0022; allow 5 SE.
    assert abs(x_next.mean()) < 5 / np.sqrt(n)
    assert abs(x_next.var(ddof=1) - 1.0) < 5 * np.sqrt(2.0 / n)
    # The whole law, not only two moments: Kolmogorov-Smirnov against N(0, 1). With a correct
    # kernel the p-value is uniform; 1e-3 fails a correct kernel once in a thousand seeds.
    assert stats.kstest(x_next, "norm").pvalue > 1e-3


def test_any_data_distribution_forgets_itself():
    """A far-from-Gaussian pi (two point masses at -4 and +4) reaches N(0, 1) after T = 1000."""
    s = schedules.linear(1000)
    n = 20_000
    k1, k2 = jax.random.split(jax.random.key(1))
    x_0 = 4.0 * jnp.sign(jax.random.normal(k1, (n, 1)))
    chain = ForwardChain(s, x_0).sample(k2)  # (n, T, 1)
    x_T = np.asarray(chain[:, -1, 0])
    assert stats.kstest(x_T, "norm").pvalue > 1e-3
    # Early in the chain the two modes are still there: x_10 is far from N(0, 1).
    x_10 = np.asarray(chain[:, 9, 0])
    assert stats.kstest(x_10, "norm").pvalue < 1e-12


@pytest.mark.parametrize("make", [schedules.linear, schedules.cosine, schedules.sigmoid])
def test_prior_matching_vanishes_as_T_grows(make):
    """KL(q(x_T | x_0) || N(0, I)) decreases to 0 as T grows, for a fixed x_0.

    The KL of N(m, v) to N(0, 1) is computed here from its definition by quadrature on a grid,
    independently of NumPyro's closed-form KL.
    """
    x_0 = jnp.array([3.0])
    grid = np.linspace(-12, 12, 200_001)
    kls = []
    for T in (10, 100, 1000):
        sched = make(T)
        q = q_marginal(sched, T, x_0)
        m, v = float(q.mean[0]), float(q.variance[0])
        p_q = stats.norm.pdf(grid, m, np.sqrt(v))
        kl = np.trapezoid(p_q * (stats.norm.logpdf(grid, m, np.sqrt(v)) - stats.norm.logpdf(grid)), grid)
        kls.append(kl)
    assert kls[0] > kls[1] > kls[2] >= -1e-9
    assert kls[2] < 1e-2
