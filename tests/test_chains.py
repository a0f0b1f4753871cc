"""Whole chains q(x_{1:T} | x_0) and p_theta(x_{t_end:T}) (MATH.md A1, A2, B1, C4)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import COV, MU, affine_eps_fn, assert_mc_close, covariance_draws, x64
from oracles import gaussian as g
from scipy import stats

from probdiff import schedules
from probdiff.analytic import optimal_eps_fn
from probdiff.distributions import ForwardChain, ReverseChain

BETAS = np.array([0.1, 0.2, 0.15, 0.3, 0.25, 0.4])
T = len(BETAS)


@pytest.fixture(scope="module")
def sched():
    return schedules.from_betas(BETAS), g.schedule_from_betas(BETAS)


def nonlinear_eps_jax(x, t):
    return 0.5 * jnp.tanh(x) + 0.01 * t


def nonlinear_eps_np(x, t):
    return 0.5 * np.tanh(x) + 0.01 * t


# ---------------------------------------------------------------------------- ForwardChain
def test_forward_chain_mean_and_variance_properties(sched):
    lib, oracle = sched
    x_0 = np.array([[1.5, -2.0], [0.0, 0.3]])
    d = ForwardChain(lib, jnp.asarray(x_0, jnp.float32))
    ab = np.cumprod(1.0 - oracle.beta)[1:]  # alpha_bar_1..T by a plain float64 product
    # float32 schedule of 6 steps: a few eps32 relative (1e-6 is a generous bound).
    np.testing.assert_allclose(np.asarray(d.mean), np.sqrt(ab)[None, :, None] * x_0[:, None, :], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d.variance), np.broadcast_to((1 - ab)[None, :, None], (2, T, 2)),
                               rtol=1e-6)


def test_forward_chain_sample_moments_and_cross_time_covariance(sched):
    r"""Moments of simulated chains against the closed forms.

    Mean and variance: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) (MATH.md A2).
    Cross-time covariance, s < t: unrolling the kernel from s to t,
    x_t = sqrt(ab_t / ab_s) x_s + sum_{r=s+1}^{t} sqrt(ab_t / ab_r) sqrt(beta_r) e_r, and the e_r
    (r > s) are independent of x_s, so Cov(x_s, x_t) = sqrt(ab_t / ab_s) Var(x_s)
    = sqrt(ab_t / ab_s) (1 - ab_s) per coordinate; different coordinates are independent.
    """
    lib, oracle = sched
    N, D = 40_000, 2
    x_0 = np.array([1.5, -2.0])
    xs = jax.jit(lambda k: ForwardChain(lib, jnp.asarray(x_0, jnp.float32)).sample(k, (N,)))(jax.random.key(0))
    xs = np.asarray(xs, np.float64)
    assert xs.shape == (N, T, D)
    ab = np.cumprod(1.0 - oracle.beta)  # indexed by t
    assert_mc_close(xs, np.sqrt(ab[1:])[:, None] * x_0, what="E x_t")

    closed = np.zeros((T, D, T, D))
    for s in range(1, T + 1):
        for t in range(1, T + 1):
            lo, hi = min(s, t), max(s, t)
            closed[s - 1, :, t - 1, :] = math.sqrt(ab[hi] / ab[lo]) * (1 - ab[lo]) * np.eye(D)
    closed = closed.reshape(T * D, T * D)
    # The recursion of the oracle's joint and the unrolled closed form agree (float64 exact).
    _, recursion = g.forward_joint(oracle, x_0)
    np.testing.assert_allclose(recursion, closed, rtol=1e-12, atol=1e-15)
    # Sample covariance of the flattened (x_1..x_T), every entry within 4 SE.
    assert_mc_close(covariance_draws(xs.reshape(N, T * D)), closed, what="Cov(x_s, x_t)")


def test_forward_chain_log_prob_is_sum_of_step_log_densities(sched):
    lib, oracle = sched
    rng = np.random.default_rng(0)
    x_0 = rng.standard_normal((3, 2))
    values = rng.standard_normal((5, 3, T, 2))
    d = ForwardChain(lib, jnp.asarray(x_0, jnp.float32))
    got = np.asarray(jax.jit(d.log_prob)(jnp.asarray(values, jnp.float32)))
    assert got.shape == (5, 3)
    want = np.zeros((5, 3))
    for t in range(1, T + 1):
        prev = x_0 if t == 1 else values[:, :, t - 2]
        want += stats.norm.logpdf(values[:, :, t - 1], math.sqrt(oracle.alpha[t]) * prev,
                                  math.sqrt(oracle.beta[t])).sum(-1)
    # float32 log-densities: each of the 2T terms is O(10) with ~1e-6 relative error.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # And on its own samples.
    sample = jax.jit(d.sample)(jax.random.key(3))
    want_s = np.zeros(3)
    sv = np.asarray(sample, np.float64)
    for t in range(1, T + 1):
        prev = x_0 if t == 1 else sv[:, t - 2]
        want_s += stats.norm.logpdf(sv[:, t - 1], math.sqrt(oracle.alpha[t]) * prev,
                                    math.sqrt(oracle.beta[t])).sum(-1)
    np.testing.assert_allclose(np.asarray(jax.jit(d.log_prob)(sample)), want_s, rtol=1e-5, atol=1e-4)


def test_forward_chain_bad_value_shape(sched):
    lib, _ = sched
    d = ForwardChain(lib, jnp.zeros(2))
    with pytest.raises(ValueError, match="value"):
        d.log_prob(jnp.zeros((T + 1, 2)))
    with pytest.raises(ValueError, match="x_0"):
        ForwardChain(lib, jnp.zeros(()))
    with pytest.raises(TypeError, match="x_0"):
        ForwardChain(lib, jnp.zeros(2, jnp.int32))


# ---------------------------------------------------------------------------- ReverseChain
def _reverse_log_prob_np(oracle, values, t_end, variance):
    """log N(x_T; 0, I) + sum_{t>t_end} log N(x_{t-1}; mu_theta(x_t, t), sigma_t^2 I), numpy."""
    s2 = g.reverse_sigma2(oracle, variance)
    lp = stats.norm.logpdf(values[..., -1, :], 0.0, 1.0).sum(-1)
    for t in range(t_end + 1, T + 1):
        x_t = values[..., t - t_end, :]
        x_tm1 = values[..., t - 1 - t_end, :]
        k = oracle.beta[t] / math.sqrt(1 - oracle.alpha_bar[t])
        mu = (x_t - k * nonlinear_eps_np(x_t, t)) / math.sqrt(oracle.alpha[t])
        lp = lp + stats.norm.logpdf(x_tm1, mu, math.sqrt(s2[t])).sum(-1)
    return lp


@pytest.mark.parametrize("t_end", [0, 1])
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_reverse_chain_log_prob_is_sum_of_step_log_densities(sched, t_end, variance):
    lib, oracle = sched
    rng = np.random.default_rng(1)
    K = T - t_end + 1
    values = rng.standard_normal((4, K, 2))
    d = ReverseChain(nonlinear_eps_jax, lib, (2,), variance=variance, t_end=t_end)
    assert d.event_shape == (K, 2)
    got = np.asarray(jax.jit(d.log_prob)(jnp.asarray(values, jnp.float32)))
    want = _reverse_log_prob_np(oracle, values, t_end, variance)
    # float32 log-densities, O(10) terms with sigma_t^2 >= 0.06: 1e-5 relative + 1e-4 absolute.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # chunked evaluation (lax.map, 2 values of t at a time) gives the same numbers.
    chunked = ReverseChain(nonlinear_eps_jax, lib, (2,), variance=variance, t_end=t_end, chunk_size=2)
    got_chunked = jax.jit(chunked.log_prob)(jnp.asarray(values, jnp.float32))
    np.testing.assert_allclose(np.asarray(got_chunked), got, rtol=1e-6)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_reverse_chain_samples_match_exact_linear_gaussian_law(sched, variance):
    """For the optimal (affine) eps the reverse chain is linear-Gaussian; compare the samples'
    mean and covariance of the whole x_{0:T}, and of x_0 alone, with the oracle."""
    lib, oracle = sched
    N, D = 40_000, 2
    W, v = g.optimal_eps_affine(MU, COV, oracle)
    A, b = g.affine_reverse(oracle, W, v)
    s2 = g.reverse_sigma2(oracle, variance)
    m_joint, S_joint = g.reverse_joint(A, b, s2)
    m0, S0 = g.reverse_marginal(A, b, s2)

    eps_fn = optimal_eps_fn(jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32), lib)
    d = ReverseChain(eps_fn, lib, (D,), variance=variance)
    xs = np.asarray(jax.jit(lambda k: d.sample(k, (N,)))(jax.random.key(7)), np.float64)
    assert xs.shape == (N, T + 1, D)
    # float32 coefficients of a 6-step chain: ~1e-6 relative; floor 1e-5 on O(1) moments.
    assert_mc_close(xs[:, 0], m0, floor=1e-5, what="E x_0")
    assert_mc_close(covariance_draws(xs[:, 0]), S0, floor=1e-5, what="Cov x_0")
    flat = xs.reshape(N, (T + 1) * D)
    assert_mc_close(flat, m_joint, floor=1e-5, what="E x_{0:T}")
    assert_mc_close(covariance_draws(flat), S_joint, floor=1e-5, what="Cov x_{0:T}")

    # t_end = 1: the value is x_{1:T}, the same law without the x_0 block.
    d1 = ReverseChain(eps_fn, lib, (D,), variance=variance, t_end=1)
    xs1 = np.asarray(jax.jit(lambda k: d1.sample(k, (N,)))(jax.random.key(8)), np.float64)
    assert xs1.shape == (N, T, D)
    flat1 = xs1.reshape(N, T * D)
    assert_mc_close(flat1, m_joint[D:], floor=1e-5, what="E x_{1:T}")
    assert_mc_close(covariance_draws(flat1), S_joint[D:, D:], floor=1e-5, what="Cov x_{1:T}")


def test_reverse_chain_with_affine_eps_matches_oracle_marginal_for_a_random_affine_eps(sched):
    """The same for an arbitrary (non-optimal) affine eps: the oracle's marginal is exact for it."""
    lib, oracle = sched
    N, D = 40_000, 2
    rng = np.random.default_rng(11)
    W, v = 0.3 * rng.standard_normal((T + 1, D, D)), 0.3 * rng.standard_normal((T + 1, D))
    A, b = g.affine_reverse(oracle, W, v)
    m0, S0 = g.reverse_marginal(A, b, g.reverse_sigma2(oracle, "beta"))
    d = ReverseChain(affine_eps_fn(W, v), lib, (D,))
    xs = np.asarray(jax.jit(lambda k: d.sample(k, (N,)))(jax.random.key(12)), np.float64)
    assert_mc_close(xs[:, 0], m0, floor=1e-5, what="E x_0")
    assert_mc_close(covariance_draws(xs[:, 0]), S0, floor=1e-5, what="Cov x_0")


# ------------------------------------------------------------------------------- shapes
def _shapes(d, key, sample_shape):
    """(sample shape, log_prob shape) by tracing only (jax.eval_shape): no compile, no run."""
    x = jax.eval_shape(lambda k: d.sample(k, sample_shape), key)
    lp = jax.eval_shape(d.log_prob, x)
    return x.shape, lp.shape


def test_chain_shapes_with_batch_and_sample_shape(sched):
    lib, _ = sched
    key = jax.random.key(0)
    # ForwardChain: batch from x_0.
    f = ForwardChain(lib, jnp.zeros((3, 2)))
    assert f.batch_shape == (3,) and f.event_shape == (T, 2)
    assert _shapes(f, key, (5, 4)) == ((5, 4, 3, T, 2), (5, 4, 3))
    assert _shapes(f, key, ()) == ((3, T, 2), (3,))
    # image-like events, event_ndim = 2
    f2 = ForwardChain(lib, jnp.zeros((3, 4, 4)), event_ndim=2)
    assert f2.batch_shape == (3,) and f2.event_shape == (T, 4, 4)
    assert _shapes(f2, key, (5,)) == ((5, 3, T, 4, 4), (5, 3))

    eps_fn = lambda x, t: 0.1 * x
    for t_end in (0, 1):
        r = ReverseChain(eps_fn, lib, (2,), t_end=t_end, batch_shape=(3,))
        K = T - t_end + 1
        assert r.batch_shape == (3,) and r.event_shape == (K, 2)
        assert _shapes(r, key, (5,)) == ((5, 3, K, 2), (5, 3))
    r2 = ReverseChain(eps_fn, lib, (4, 4), batch_shape=(2,))
    assert r2.event_shape == (T + 1, 4, 4)
    assert _shapes(r2, key, (3,)) == ((3, 2, T + 1, 4, 4), (3, 2))
    # Concrete values agree with the traced shapes and are finite (one compiled run).
    y, lp = jax.jit(lambda k: (lambda y: (y, r2.log_prob(y)))(r2.sample(k, (3,))))(key)
    assert y.shape == (3, 2, T + 1, 4, 4) and lp.shape == (3, 2)
    assert np.all(np.isfinite(np.asarray(lp)))


def test_reverse_chain_bad_arguments(sched):
    lib, _ = sched
    eps_fn = lambda x, t: 0.1 * x
    with pytest.raises(ValueError, match="variance"):
        ReverseChain(eps_fn, lib, (2,), variance="bogus")
    with pytest.raises(ValueError, match="t_end"):
        ReverseChain(eps_fn, lib, (2,), t_end=T + 1)  # t_end = T (x_T alone) is allowed
    with pytest.raises(ValueError, match="t_end"):
        ReverseChain(eps_fn, lib, (2,), t_end=-1)
    with pytest.raises(ValueError, match="value"):
        ReverseChain(eps_fn, lib, (2,)).log_prob(jnp.zeros((T, 2)))
    with pytest.raises(ValueError, match="eps_fn"):
        ReverseChain(lambda x, t: x[..., :1], lib, (2,)).sample(jax.random.key(0))
    with pytest.raises(ValueError, match="eps_fn"):
        ReverseChain(lambda x, t: x[..., :1], lib, (2,)).log_prob(jnp.zeros((T + 1, 2)))


@pytest.mark.parametrize("bad_output", [0.0, [0.0, 0.0]], ids=["float", "list"])
def test_reverse_chain_sample_non_array_eps_raises_value_error(sched, bad_output):
    lib, _ = sched
    with pytest.raises(ValueError, match="eps_fn"):
        ReverseChain(lambda x, t: bad_output, lib, (2,)).sample(jax.random.key(0))


def test_non_array_eps_raises_value_error_elsewhere(sched):
    """The same eps_fn is caught with a ValueError on the log_prob path too."""
    lib, _ = sched
    bad = ReverseChain(lambda x, t: 0.0, lib, (2,))
    with pytest.raises(ValueError, match="eps_fn"):
        bad.log_prob(jnp.zeros((T + 1, 2)))


def test_chains_float64(sched):
    _, oracle = sched
    with x64():
        lib = schedules.from_betas(BETAS)
        f = ForwardChain(lib, jnp.ones(2))
        x = jax.jit(f.sample)(jax.random.key(0))
        assert x.dtype == jnp.float64 and jax.jit(f.log_prob)(x).dtype == jnp.float64
        r = ReverseChain(nonlinear_eps_jax, lib, (2,))
        y = jax.jit(r.sample)(jax.random.key(1))
        assert y.dtype == jnp.float64
        lp = jax.jit(r.log_prob)(y)
        assert lp.dtype == jnp.float64
        # float64 against the numpy sum: round-off only.
        np.testing.assert_allclose(float(lp), _reverse_log_prob_np(oracle, np.asarray(y), 0, "beta"), rtol=1e-12)
