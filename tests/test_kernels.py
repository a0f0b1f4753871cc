"""One-step kernels (MATH.md A1, A2, A4, C1, C2) against independent computations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import affine_eps_fn, assert_mc_close, random_affine, x64
from numpyro.distributions.kl import kl_divergence
from oracles import gaussian as g
from scipy import stats

from probdiff import schedules
from probdiff.distributions import (
    mu_from_eps,
    p_step,
    posterior_mean,
    q_marginal,
    q_posterior,
    q_step,
    x0_from_eps,
)

EPS32 = float(np.finfo(np.float32).eps)

# A short schedule with large betas: T composed kernels move far from x_0, so the checks
# below compare numbers of order one instead of tiny increments.
BETAS = np.linspace(0.05, 0.3, 10)
T_SMALL = len(BETAS)


@pytest.fixture(scope="module")
def small():
    return schedules.from_betas(BETAS), g.schedule_from_betas(BETAS)


@pytest.fixture(scope="module")
def ddpm():
    return schedules.linear(1000), g.schedule_from_betas(g.linear_betas(1000))


# ------------------------------------------------------------ A2: marginal = composition
def test_q_marginal_equals_composed_kernels_gaussian_algebra(small):
    lib, oracle = small
    x_0 = np.array([1.5, -2.0, 0.25])
    for t in range(1, T_SMALL + 1):
        c, v = g.composed_marginal(oracle, t)  # T-fold composition of A1, by recursion
        d = q_marginal(lib, t, jnp.asarray(x_0, jnp.float32))
        # float32 schedule (alpha_bar to ~1e-6 relative here, see test_schedules) and one
        # float32 multiply: 1e-6 relative.
        np.testing.assert_allclose(np.asarray(d.mean), c * x_0, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(d.variance), np.full(3, v), rtol=1e-6)


def test_q_marginal_equals_composed_kernels_monte_carlo(small):
    lib, oracle = small
    N = 20_000
    x_0 = jnp.array([1.5, -2.0], jnp.float32)

    @jax.jit
    def chains(key):
        # Compose the T kernels q_step(t) by ancestral sampling; t is traced inside scan.
        def step(x, inputs):
            t, k = inputs
            x = q_step(lib, t, x).sample(k)
            return x, x

        keys = jax.random.split(key, T_SMALL)
        _, xs = jax.lax.scan(step, jnp.broadcast_to(x_0, (N, 2)), (jnp.arange(1, T_SMALL + 1), keys))
        return xs  # (T, N, 2), xs[t - 1] = x_t

    xs = np.asarray(chains(jax.random.key(0)), np.float64)
    for t in (1, 3, T_SMALL):
        d = q_marginal(lib, t, x_0)
        x_t = xs[t - 1]
        assert_mc_close(x_t, np.asarray(d.mean), what=f"mean of x_{t}")
        # Variance: mean of squared deviations from the known mean; SE from the same draws.
        assert_mc_close((x_t - np.asarray(d.mean)) ** 2, np.asarray(d.variance), what=f"var of x_{t}")


# ------------------------------------------------------------------------ A4: posterior
@pytest.mark.parametrize("t", [2, 5, T_SMALL])
def test_q_posterior_equals_gaussian_conditioning(small, t):
    lib, oracle = small
    rng = np.random.default_rng(t)
    x_t = rng.standard_normal((4, 3))
    x_0 = rng.standard_normal((4, 3))
    mean, var, _, _ = g.posterior_by_conditioning(oracle, t, x_t, x_0)
    d = q_posterior(lib, t, jnp.asarray(x_t, jnp.float32), jnp.asarray(x_0, jnp.float32))
    assert d.batch_shape == (4,) and d.event_shape == (3,)
    # float32: coefficients from a float32 schedule (~1e-6 relative) times O(1) inputs.
    np.testing.assert_allclose(np.asarray(d.mean), mean, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(d.variance), np.full((4, 3), var), rtol=2e-6)


@pytest.mark.parametrize("t", [2, 10, 500, 1000])
def test_q_posterior_ddpm_schedule_matches_conditioning(ddpm, t):
    lib, oracle = ddpm
    x_t = np.array([0.3, -1.2])
    x_0 = np.array([1.0, 0.5])
    mean, var, _, _ = g.posterior_by_conditioning(oracle, t, x_t, x_0)
    d = q_posterior(lib, t, jnp.asarray(x_t, jnp.float32), jnp.asarray(x_0, jnp.float32))
    # float32 over T = 1000 steps: 1 - alpha_bar to <= 3e-6 relative (test_schedules bounds);
    # the mean is a sum of two such coefficients times O(1) inputs.
    np.testing.assert_allclose(np.asarray(d.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d.variance), np.full(2, var), rtol=1e-5)


def _grid_posterior(oracle, t, x_t, x_0):
    """Bayes' rule on a grid: q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), 1-D.

    q(x_{t-1} | x_0) uses alpha_bar from a plain float64 cumulative product. The grid spans
    +-12 standard deviations of the prior q(x_{t-1} | x_0) (tails below e^-72), with 400k
    points: the trapezoid rule on a smooth, fast-decaying integrand is accurate to round-off.
    """
    ab = np.cumprod(1.0 - oracle.beta)  # beta_0 = 0, so ab[t] = alpha_bar_t
    m_prior, s_prior = math.sqrt(ab[t - 1]) * x_0, math.sqrt(1 - ab[t - 1])
    grid = np.linspace(m_prior - 12 * s_prior, m_prior + 12 * s_prior, 400_001)
    log_w = stats.norm.logpdf(x_t, math.sqrt(1 - oracle.beta[t]) * grid, math.sqrt(oracle.beta[t]))
    log_w += stats.norm.logpdf(grid, m_prior, s_prior)
    w = np.exp(log_w - log_w.max())
    z = np.trapezoid(w, grid)
    mean = np.trapezoid(grid * w, grid) / z
    var = np.trapezoid((grid - mean) ** 2 * w, grid) / z
    return mean, var


@pytest.mark.parametrize("t", [2, 4, T_SMALL])
def test_q_posterior_matches_bayes_rule_on_a_grid(small, t):
    lib, oracle = small
    x_t, x_0 = 0.8, -1.3
    grid_mean, grid_var = _grid_posterior(oracle, t, x_t, x_0)
    d = q_posterior(lib, t, jnp.array([x_t]), jnp.array([x_0]))
    # float32 coefficients (2e-6 relative) on O(1) values; quadrature error is far smaller.
    np.testing.assert_allclose(float(d.mean[0]), grid_mean, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(float(d.variance[0]), grid_var, rtol=2e-6)


@pytest.mark.parametrize("t", [2, 4, T_SMALL])
def test_notes_004_posterior_coefficient_is_wrong(small, t):
    """004_* prints sqrt(alpha_bar_t) where sqrt(alpha_t) belongs; that formula misses Bayes."""
    lib, oracle = small
    x_t, x_0 = 0.8, -1.3
    grid_mean, _ = _grid_posterior(oracle, t, x_t, x_0)
    ab, a, b = oracle.alpha_bar, oracle.alpha, oracle.beta
    wrong = (math.sqrt(ab[t]) * (1 - ab[t - 1]) * x_t + math.sqrt(ab[t - 1]) * b[t] * x_0) / (1 - ab[t])
    right = (math.sqrt(a[t]) * (1 - ab[t - 1]) * x_t + math.sqrt(ab[t - 1]) * b[t] * x_0) / (1 - ab[t])
    # The two differ by (sqrt(alpha_t) - sqrt(alpha_bar_t)) (1-ab_{t-1})/(1-ab_t) x_t (0.008 at
    # t = 2, more later): over 1000 times the 2e-6 tolerance the library meets, so the test
    # above tells the two formulas apart.
    assert abs(wrong - grid_mean) > 1000 * 2e-6
    assert abs(right - grid_mean) < 1e-9  # float64 formula vs float64 quadrature
    lib_mean = float(q_posterior(lib, t, jnp.array([x_t]), jnp.array([x_0])).mean[0])
    assert abs(lib_mean - wrong) > 1000 * 2e-6


def test_posterior_mean_broadcasts_one_t_per_example(small):
    lib, oracle = small
    ts = np.array([2, 3, 7, 10])
    rng = np.random.default_rng(1)
    x_t, x_0 = rng.standard_normal((4, 2)), rng.standard_normal((4, 2))
    got = posterior_mean(lib, jnp.asarray(ts), jnp.asarray(x_t, jnp.float32), jnp.asarray(x_0, jnp.float32))
    for i, t in enumerate(ts):
        want, _, _, _ = g.posterior_by_conditioning(oracle, int(t), x_t[i], x_0[i])
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=2e-6, atol=2e-6)  # float32


# ------------------------------------------------------------- C2: eps parameterisation
@pytest.mark.parametrize("t", [2, 50, 500, 1000])
def test_mu_from_eps_with_true_eps_is_posterior_mean(ddpm, t):
    lib, oracle = ddpm
    rng = np.random.default_rng(t)
    x_0 = rng.standard_normal((8, 2))
    eps = rng.standard_normal((8, 2))
    ab = oracle.alpha_bar[t]
    x_t = math.sqrt(ab) * x_0 + math.sqrt(1 - ab) * eps  # float64 reparameterisation (A2)
    want, _, _, _ = g.posterior_by_conditioning(oracle, t, x_t, x_0)
    got = mu_from_eps(lib, t, jnp.asarray(x_t, jnp.float32), jnp.asarray(eps, jnp.float32))
    # float32: mu = (x_t - k eps)/sqrt(alpha_t) with k = beta_t/sqrt(1-ab_t) <= 1. Inputs rounded
    # to float32 (eps32/2 relative) and the coefficients (<= 3e-6 relative, test_schedules):
    # 1e-5 absolute on O(1) values. At t = 2, x_t - k eps nearly cancels x_0's part, so the
    # error is absolute, not relative.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    # And the inverse map: x0_from_eps recovers x_0 (float32: same error budget divided by
    # sqrt(ab_t) >= 6e-3 at t = T, so 2e-3 absolute there).
    x0_hat = x0_from_eps(lib, t, jnp.asarray(x_t, jnp.float32), jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(np.asarray(x0_hat), x_0, atol=1e-5 / math.sqrt(ab) * 1.2)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_p_step_mean_and_scale_from_eps_fn(small, variance):
    lib, oracle = small
    D = 3
    W, v = random_affine(T_SMALL, D, seed=3)
    eps_fn = affine_eps_fn(W, v)
    sigma2 = g.reverse_sigma2(oracle, variance)
    rng = np.random.default_rng(4)
    x_t = rng.standard_normal((5, D))
    for t in (1, 2, 6, T_SMALL):
        d = p_step(eps_fn, lib, t, jnp.asarray(x_t, jnp.float32), variance=variance)
        eps = x_t @ W[t].T + v[t]
        k = oracle.beta[t] / math.sqrt(1 - oracle.alpha_bar[t])
        want = (x_t - k * eps) / math.sqrt(oracle.alpha[t])
        # float32 arithmetic on O(1) values: 1e-5 absolute.
        np.testing.assert_allclose(np.asarray(d.mean), want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(d.base_dist.scale), np.full((5, D), math.sqrt(sigma2[t])), rtol=2e-6)
    # One t per example broadcasts over the batch.
    ts = np.array([1, 2, 5, 9, 10])
    d = p_step(eps_fn, lib, jnp.asarray(ts), jnp.asarray(x_t, jnp.float32), variance=variance)
    for i, t in enumerate(ts):
        k = oracle.beta[t] / math.sqrt(1 - oracle.alpha_bar[t])
        want = (x_t[i] - k * (W[t] @ x_t[i] + v[t])) / math.sqrt(oracle.alpha[t])
        np.testing.assert_allclose(np.asarray(d.mean[i]), want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(d.base_dist.scale[i]), math.sqrt(sigma2[t]), rtol=2e-6)


def test_reverse_variance_beta_tilde_uses_beta_1_at_t1(small):
    lib, oracle = small
    d = p_step(lambda x, t: jnp.zeros_like(x), lib, 1, jnp.zeros(2), variance="beta_tilde")
    np.testing.assert_allclose(np.asarray(d.variance), oracle.beta[1], rtol=2 * EPS32)


# ---------------------------------------------------------------------- C1: KL identity
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_kl_q_posterior_p_step_matches_monte_carlo(small, variance):
    lib, _ = small
    D, t, N = 2, 4, 200_000
    W, v = random_affine(T_SMALL, D, seed=5)
    eps_fn = affine_eps_fn(W, v)
    x_t = jnp.array([0.4, -0.9])
    x_0 = jnp.array([1.1, 0.2])
    q = q_posterior(lib, t, x_t, x_0)
    p = p_step(eps_fn, lib, t, x_t, variance=variance)
    kl = float(kl_divergence(q, p))
    draws = q.sample(jax.random.key(1), (N,))
    log_ratio = np.asarray(q.log_prob(draws) - p.log_prob(draws), np.float64)
    # 4 SE of the Monte-Carlo mean; floor: float32 log-densities of O(10) size, 1e-5 each.
    assert_mc_close(log_ratio, kl, floor=1e-5, what="KL(q_posterior || p_step)")


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_kl_is_weighted_squared_mean_error_plus_const(small, variance):
    """C1: KL = ||mu_tilde - mu_theta||^2 / (2 sigma_t^2) + const, const free of mu_theta;
    C2: with the eps-parameterisation the first term is
    beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) ||eps - eps_theta||^2."""
    lib, oracle = small
    D = 3
    sigma2 = g.reverse_sigma2(oracle, variance)
    rng = np.random.default_rng(6)
    x_0 = rng.standard_normal(D)
    eps = rng.standard_normal(D)
    fns = [affine_eps_fn(*random_affine(T_SMALL, D, seed=s)) for s in (7, 8)]
    fns.append(lambda x, t: jnp.tanh(x) * 0.3)
    for t in (2, 5, T_SMALL):
        ab = oracle.alpha_bar[t]
        x_t = math.sqrt(ab) * x_0 + math.sqrt(1 - ab) * eps
        xt32, x032 = jnp.asarray(x_t, jnp.float32), jnp.asarray(x_0, jnp.float32)
        _, var, _, _ = g.posterior_by_conditioning(oracle, t, x_t, x_0)
        # const = KL between N(0, beta_tilde I) and N(0, sigma_t^2 I), general Gaussian KL.
        const = g.gaussian_kl(np.zeros(D), var * np.eye(D), np.zeros(D), sigma2[t] * np.eye(D))
        weight = oracle.beta[t] ** 2 / (2 * sigma2[t] * oracle.alpha[t] * (1 - ab))
        for eps_fn in fns:
            q = q_posterior(lib, t, xt32, x032)
            p = p_step(eps_fn, lib, t, xt32, variance=variance)
            kl = float(kl_divergence(q, p))
            sq = float(jnp.sum((q.mean - p.mean) ** 2)) / (2 * sigma2[t])
            eps_theta = np.asarray(eps_fn(xt32, t), np.float64)
            # float32: KL is a sum of O(1) terms computed in float32; ||mu_tilde - mu_theta||^2
            # is divided by sigma_t^2 >= 0.03: 1e-5 absolute covers it with margin.
            np.testing.assert_allclose(kl - sq, const, atol=1e-5)
            np.testing.assert_allclose(sq, weight * np.sum((eps - eps_theta) ** 2), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad_t", [0, T_SMALL + 1, -1])
def test_t_out_of_range_raises_naming_t(small, bad_t):
    lib, _ = small
    x = jnp.zeros(2)
    eps_fn = lambda x, t: jnp.zeros_like(x)
    for call in (
        lambda: q_step(lib, bad_t, x),
        lambda: q_marginal(lib, bad_t, x),
        lambda: q_posterior(lib, bad_t, x, x),
        lambda: p_step(eps_fn, lib, bad_t, x),
        lambda: posterior_mean(lib, bad_t, x, x),
    ):
        with pytest.raises(ValueError, match=rf"t = {bad_t}\b"):
            call()


def test_t_out_of_range_in_a_batch_names_the_first_bad_t(small):
    lib, _ = small
    with pytest.raises(ValueError, match=r"t = 11"):
        q_marginal(lib, jnp.array([1, 11, 0]), jnp.zeros((3, 2)))


def test_q_posterior_at_t1_raises(small):
    lib, _ = small
    with pytest.raises(ValueError, match=r"t = 1\b"):
        q_posterior(lib, 1, jnp.zeros(2), jnp.zeros(2))


@pytest.mark.parametrize("bad_t", [1.0, np.float32(2.0), jnp.array(3.0)])
def test_non_integer_t_raises(small, bad_t):
    lib, _ = small
    for call in (
        lambda: q_step(lib, bad_t, jnp.zeros(2)),
        lambda: q_marginal(lib, bad_t, jnp.zeros(2)),
        lambda: q_posterior(lib, bad_t, jnp.zeros(2), jnp.zeros(2)),
        lambda: p_step(lambda x, t: x, lib, bad_t, jnp.zeros(2)),
    ):
        with pytest.raises(TypeError, match="integer"):
            call()


@pytest.mark.parametrize("bad_t", [0, T_SMALL + 1])
def test_traced_out_of_range_t_gives_nan_not_a_clamp(small, bad_t):
    lib, _ = small
    x = jnp.ones(2)
    eps_fn = lambda x, t: jnp.zeros_like(x)

    @jax.jit
    def moments(t):
        out = []
        for d in (q_step(lib, t, x), q_marginal(lib, t, x), q_posterior(lib, t, x, x), p_step(eps_fn, lib, t, x)):
            out += [d.mean, d.base_dist.scale]
        return out

    for m in moments(jnp.asarray(bad_t)):
        assert np.all(np.isnan(np.asarray(m))), m
    # In range, the same jitted function gives finite numbers (so NaN is about t, not jit).
    for m in moments(jnp.asarray(3)):
        assert np.all(np.isfinite(np.asarray(m)))


def test_traced_t1_gives_nan_q_posterior_scale(small):
    lib, _ = small
    scale = jax.jit(lambda t: q_posterior(lib, t, jnp.ones(2), jnp.ones(2)).base_dist.scale)(jnp.asarray(1))
    assert np.all(np.isnan(np.asarray(scale)))


@pytest.mark.parametrize(
    "bad_eps_fn",
    [lambda x, t: x[..., :1], lambda x, t: jnp.zeros((7,)), lambda x, t: 0.0, lambda x, t: x[None]],
)
def test_eps_fn_wrong_shape_raises(small, bad_eps_fn):
    lib, _ = small
    with pytest.raises(ValueError, match="eps_fn"):
        p_step(bad_eps_fn, lib, 3, jnp.zeros((4, 2)))


def test_invalid_variance_and_bad_x(small):
    lib, _ = small
    with pytest.raises(ValueError, match="variance"):
        p_step(lambda x, t: x, lib, 2, jnp.zeros(2), variance="sigma")
    with pytest.raises(TypeError, match="x_tm1"):
        q_step(lib, 2, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="x_0"):
        q_marginal(lib, 2, jnp.zeros(()))


def test_float64_kernels(small):
    _, oracle = small
    with x64():
        lib = schedules.from_betas(BETAS)
        x_t = jnp.array([0.8, -0.3])
        x_0 = jnp.array([-1.3, 0.4])
        d = q_posterior(lib, 4, x_t, x_0)
        assert d.mean.dtype == jnp.float64
        mean, var, _, _ = g.posterior_by_conditioning(oracle, 4, np.asarray(x_t), np.asarray(x_0))
        # float64 round-off over a 10-step schedule: 1e-13.
        np.testing.assert_allclose(np.asarray(d.mean), mean, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(np.asarray(d.variance), var, rtol=1e-13)
