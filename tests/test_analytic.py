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


# ------------------------------------------------------------------- Gaussian mixture
def test_gaussian_mixture_density_and_scores_against_scipy_and_autodiff():
    from scipy.stats import multivariate_normal

    from probdiff.analytic import GaussianMixture

    m = GaussianMixture.three_modes()
    x = np.random.default_rng(0).normal(size=(6, 2)) * 3.0
    w, mus = np.asarray(m.weights, np.float64), np.asarray(m.means, np.float64)
    s = schedules.linear(1000)
    for sigma in (0.0, 0.7, 3.0):
        v = 0.25 + sigma**2
        ref = np.log(sum(wk * multivariate_normal(mk, v * np.eye(2)).pdf(x) for wk, mk in zip(w, mus, strict=True)))
        np.testing.assert_allclose(m.log_prob(x, sigma), ref, rtol=1e-5, atol=1e-5)
        # the closed-form score against jax.grad of the scipy-checked log density
        g = jax.vmap(jax.grad(m.log_prob), (0, None))(jnp.asarray(x, jnp.float32), sigma)
        np.testing.assert_allclose(m.score(x, sigma), g, rtol=1e-5, atol=1e-5)
    for t in (1, 250, 1000):
        # q(x_t) by its definition: x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps, a mixture of
        # N(sqrt(ab) mu_k, (ab s^2 + 1 - ab) I); its log density in scipy, differentiated numerically
        ab = float(s.alpha_bar[t])
        var = ab * 0.25 + (1 - ab)

        def logq(y, ab=ab, var=var):
            return np.log(sum(wk * multivariate_normal(np.sqrt(ab) * mk, var * np.eye(2)).pdf(y) for wk, mk in zip(w, mus, strict=True)))

        h = 1e-5
        fd = np.stack([(logq(x + h * e) - logq(x - h * e)) / (2 * h) for e in np.eye(2)], -1)
        np.testing.assert_allclose(m.score_t(x, t, s), fd, rtol=1e-3, atol=1e-3)
    # one t per example equals the scalar-t calls
    ts = jnp.array([1, 10, 100, 500, 1000, 7])
    per = jnp.stack([m.score_t(x[i], int(ts[i]), s) for i in range(6)])
    np.testing.assert_allclose(m.score_t(x, ts, s), per, rtol=1e-6, atol=1e-6)
    # samples: component counts against the weights (binomial, 4.5 SE at n = 20000)
    counts = m.mode_weights(m.sample(jax.random.key(0), 20000))
    np.testing.assert_array_less(np.abs(counts - w), 4.5 * np.sqrt(w * (1 - w) / 20000))
