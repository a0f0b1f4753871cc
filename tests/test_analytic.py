"""probdiff.analytic against the numpy oracle: the optimal eps-function, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import COV, MU
from oracles import gaussian as g

from probdiff import schedules
from probdiff.analytic import GaussianData, optimal_eps_fn

BETAS = np.linspace(1e-3, 0.3, 10)


@pytest.mark.parametrize("t", [1, 4, 10])
def test_optimal_eps_matches_gaussian_conditioning(t):
    """E[eps | x_t] by np.linalg.solve on the joint of (eps, x_t) (oracle) vs the eigen route."""
    eps_fn = optimal_eps_fn(MU, COV, schedules.from_betas(BETAS))
    o = g.schedule_from_betas(BETAS)
    x = np.random.default_rng(t).normal(size=(5, 2)) * 2.0
    got = np.asarray(eps_fn(jnp.asarray(x, jnp.float32), t))
    ref = np.stack([g.optimal_eps(MU, COV, o, t, xi) for xi in x])
    # float32 eigen-decomposition and products of O(1) numbers: 1e-5 absolute.
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_optimal_eps_per_example_t_and_out_of_range():
    eps_fn = optimal_eps_fn(MU, COV, schedules.from_betas(BETAS))
    x = jnp.ones((3, 2))
    per = eps_fn(x, jnp.array([1, 5, 10]))
    for i, t in enumerate([1, 5, 10]):
        np.testing.assert_allclose(np.asarray(per[i]), np.asarray(eps_fn(x[i], t)), rtol=1e-6)
    # Outside 1..T the coefficients are NaN, never a silently clamped t.
    assert np.all(np.isnan(np.asarray(jax.jit(eps_fn)(x, jnp.array([0, 11, 3]))[:2])))


@pytest.mark.parametrize(
    "cov, match",
    [([[1.0, 0.5], [0.0, 1.0]], "symmetric"), ([[1.0, 2.0], [2.0, 1.0]], "positive semi-definite"),
     ([[1.0, 0.0, 0.0]] * 3, "shape"), ([[np.nan, 0.0], [0.0, 1.0]], "finite")],
)
def test_bad_covariances_are_refused(cov, match):
    with pytest.raises(ValueError, match=match):
        optimal_eps_fn(MU, np.asarray(cov), schedules.from_betas(BETAS))


def test_default_data_log_prob_matches_scipy():
    from scipy import stats

    data = GaussianData.default_2d()
    x = np.array([[0.0, 0.0], [1.0, -0.5], [2.5, 1.0]])
    ref = stats.multivariate_normal(np.asarray(data.mu), np.asarray(data.cov)).logpdf(x)
    np.testing.assert_allclose(np.asarray(data.log_prob(jnp.asarray(x))), ref, rtol=1e-5)
