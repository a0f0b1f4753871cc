"""Edge cases found in review: T = 1 model/guide, mixed dtypes, argument types, broadcasting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64
from numpyro.infer import Trace_ELBO
from scipy import stats

from probdiff import GaussianDiffusion, schedules
from probdiff.distributions import ForwardChain, ReverseChain, mu_from_eps, q_marginal, q_step, x0_from_eps


def test_model_and_guide_at_T1():
    """T = 1: the latent chain is x_1 alone, p(x_1) = N(0, I); -Trace_ELBO averages to minus
    the closed form E[log N(x_0; mu(x_1), beta_1)] - KL(N(sqrt(a) x_0, 1 - a) || N(0, 1))
    with mu(x_1) = x_1 / sqrt(a) for eps = 0, computed here by Gauss-Hermite quadrature."""
    beta = 0.3
    s = schedules.from_betas([beta])
    d = GaussianDiffusion(lambda x, t: jnp.zeros_like(x), s, (1,))
    x0 = jnp.array([[0.7]])
    n = 40_000
    draws = jax.jit(jax.vmap(lambda k: -Trace_ELBO().loss(k, {}, d.model, d.guide, x0)))(
        jax.random.split(jax.random.key(0), n)
    )
    a = 1 - beta
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    x1 = np.sqrt(a) * 0.7 + np.sqrt(1 - a) * nodes  # x_1 ~ q(x_1 | x_0)
    recon = np.sum(weights * stats.norm.logpdf(0.7, x1 / np.sqrt(a), np.sqrt(beta))) / np.sqrt(2 * np.pi)
    log_q_terms = np.sum(weights * (stats.norm.logpdf(x1) - stats.norm.logpdf(x1, np.sqrt(a) * 0.7, np.sqrt(1 - a))))
    expected = recon + log_q_terms / np.sqrt(2 * np.pi)
    mean, se = float(np.mean(draws)), float(np.std(draws) / np.sqrt(n))
    assert abs(mean - expected) < 4 * se + 1e-5, (mean, expected, se)
    # Ancestral sampling and the chain distribution work at T = 1 too.
    assert d.sample(jax.random.key(1), (4,)).shape == (4, 1)
    chain = ReverseChain(d.eps_fn, s, (1,), t_end=1)
    assert chain.sample(jax.random.key(2)).shape == (1, 1)
    np.testing.assert_allclose(float(chain.log_prob(jnp.array([[0.2]]))), stats.norm.logpdf(0.2), rtol=1e-6)


def test_sampling_with_a_float64_network_and_a_float32_schedule():
    s = schedules.linear(20)  # float32
    with x64():
        d = GaussianDiffusion(lambda x, t: x * jnp.ones(2, jnp.float64), s, (2,))
        x = d.sample(jax.random.key(0), (3,))
        assert x.shape == (3, 2) and np.all(np.isfinite(np.asarray(x)))
        y = ReverseChain(d.eps_fn, s, (2,)).sample(jax.random.key(1))
        assert y.shape == (21, 2)


def test_functions_refuse_a_non_schedule():
    betas = np.linspace(1e-3, 0.1, 5)
    for call in (lambda: q_step(betas, 1, jnp.ones(2)), lambda: q_marginal(betas, 1, jnp.ones(2)),
                 lambda: ForwardChain(betas, jnp.ones(2)), lambda: ReverseChain(lambda x, t: x, betas, (2,))):
        with pytest.raises(TypeError, match="schedule"):
            call()


@pytest.mark.parametrize("fn", [mu_from_eps, x0_from_eps])
def test_eps_conversions_check_t(fn):
    s = schedules.linear(10)
    with pytest.raises(ValueError, match="t must lie in 1..10"):
        fn(s, 0, jnp.ones(2), jnp.ones(2))
    with pytest.raises(ValueError, match="t must lie in 1..10"):
        fn(s, 11, jnp.ones(2), jnp.ones(2))


def test_reverse_chain_t_end_must_be_an_integer():
    with pytest.raises(ValueError, match="t_end"):
        ReverseChain(lambda x, t: x, schedules.linear(10), (2,), t_end=1.5)


def test_forward_chain_log_prob_broadcasts_a_smaller_value():
    """A value of batch shape () scored under a chain of batch shape (3,): numpy broadcasting,
    each entry equal to the batch-free chain's log_prob at its own x_0."""
    s = schedules.linear(20)
    x0 = jnp.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    value = ForwardChain(s, x0[0]).sample(jax.random.key(0))
    got = ForwardChain(s, x0).log_prob(value)
    assert got.shape == (3,)
    for i in range(3):
        np.testing.assert_allclose(float(got[i]), float(ForwardChain(s, x0[i]).log_prob(value)), rtol=1e-6)


def test_jit_with_a_closed_over_constant_matrix_is_right():
    """jaxlib 0.10.2 on CPU got a jitted product with a closed-over all-equal matrix wrong (its
    YNNPACK fusion); importing probdiff turns that fusion off. Eager arithmetic is the reference."""
    import probdiff  # noqa: F401

    W = jnp.full((2, 32), 0.1)
    h = jax.random.normal(jax.random.key(0), (4096, 32))
    jitted = jax.jit(lambda s: jnp.sum((h * s) @ W.T, -1))(0.7)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(jnp.sum((h * 0.7) @ W.T, -1)), rtol=1e-5, atol=1e-5)
