"""Shared conformance checks for every distribution of probdiff (STYLE.md pattern 8).

Each case builds a distribution from a scalar parameter ``theta`` (the scale of the eps-function
for the reverse-process distributions, a scale on the conditioning input for the forward ones)
and a conditioning array of batch shape ``B``. For every case: sample/log_prob shapes with batch
and sample shapes, ``jit`` (same numbers as eager), ``vmap`` over a batch of values (same numbers
as a loop), finite gradients w.r.t. the value and w.r.t. ``theta``, float32 by default and
float64 under ``enable_x64`` (where the gradient w.r.t. theta is also checked against a central
finite difference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64

from probdiff import GaussianDiffusion, schedules
from probdiff.distributions import ForwardChain, ReverseChain, p_step, q_marginal, q_posterior, q_step

BETAS = np.array([0.1, 0.2, 0.15, 0.3, 0.25])
T = len(BETAS)
D = 2
B = (3,)
KEY = jax.random.key(42)


def eps_fn_of(theta):
    """A nonlinear eps-function with one scalar parameter; works for scalar or batched t."""

    def eps_fn(x, t):
        t = jnp.asarray(t)
        t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t
        return theta * jnp.tanh(x) + 0.01 * t

    return eps_fn


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable  # (schedule, theta, cond) -> Distribution with batch shape B (or () and vmapped x)
    batch_shape: tuple
    event_shape: tuple


CASES = [
    Case("q_step", lambda s, th, c: q_step(s, 3, th * c), B, (D,)),
    Case("q_marginal", lambda s, th, c: q_marginal(s, 4, th * c), B, (D,)),
    Case("q_posterior", lambda s, th, c: q_posterior(s, 3, c, th * c[::-1]), B, (D,)),
    Case("p_step", lambda s, th, c: p_step(eps_fn_of(th), s, 2, c), B, (D,)),
    Case("p_step_beta_tilde", lambda s, th, c: p_step(eps_fn_of(th), s, 1, c, variance="beta_tilde"), B, (D,)),
    Case("ForwardChain", lambda s, th, c: ForwardChain(s, th * c), B, (T, D)),
    Case("ReverseChain", lambda s, th, c: ReverseChain(eps_fn_of(th), s, (D,), batch_shape=B), B, (T + 1, D)),
    Case("ReverseChain_t_end_1",
         lambda s, th, c: ReverseChain(eps_fn_of(th), s, (D,), t_end=1, batch_shape=B, variance="beta_tilde"),
         B, (T, D)),
    # GaussianDiffusion is a distribution over one x_0 (batch shape ()); log_prob of a batch of
    # values returns one ELBO per value.
    Case("GaussianDiffusion", lambda s, th, c: GaussianDiffusion(eps_fn_of(th), s, (D,), rng_key=KEY), (), (D,)),
]
IDS = [c.name for c in CASES]


def setup(case, dtype=jnp.float32):
    s = schedules.from_betas(BETAS, dtype=dtype)
    cond = jnp.asarray(np.random.default_rng(0).standard_normal(B + (D,)), dtype)
    theta = jnp.asarray(0.7, dtype)
    return s, cond, theta


def values_for(case, S, dtype=jnp.float32):
    """Values of shape S + B + event at which to evaluate log_prob: any real array is in the
    support, and standard-normal values avoid compiling a sampler just to get test points."""
    return jax.random.normal(jax.random.key(1), S + B + case.event_shape, dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shapes(case):
    s, cond, theta = setup(case)
    d = case.build(s, theta, cond)
    assert tuple(d.batch_shape) == case.batch_shape
    assert tuple(d.event_shape) == case.event_shape
    for S in [(), (4,), (2, 3)]:
        x = jax.eval_shape(lambda k, S=S: d.sample(k, S), KEY)
        assert x.shape == S + case.batch_shape + case.event_shape
        # Values with the extra batch dims B for GaussianDiffusion score one ELBO each.
        v = jax.ShapeDtypeStruct(S + B + case.event_shape, x.dtype)
        lp = jax.eval_shape(d.log_prob, v)
        assert lp.shape == S + B


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_matches_eager_and_float32_default(case):
    """jit with the distribution as an argument (a pytree); the gradient tests below build it
    inside the traced function from a traced parameter."""
    s, cond, theta = setup(case)
    S = (4,)
    d = case.build(s, theta, cond)
    value = values_for(case, S)

    # The distribution itself crosses the jit boundary as a pytree (its arrays are leaves).
    @jax.jit
    def run(dd, key, value):
        return dd.sample(key, S), dd.log_prob(value)

    x_jit, lp_jit = run(d, KEY, value)
    x_eager, lp_eager = d.sample(KEY, S), d.log_prob(value)
    assert x_jit.dtype == lp_jit.dtype == jnp.float32
    assert x_jit.shape == S + case.batch_shape + case.event_shape and lp_jit.shape == S + B
    # Same key, same arithmetic; XLA fusion may reorder float32 operations: 1e-5 relative.
    np.testing.assert_allclose(np.asarray(x_jit), np.asarray(x_eager), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp_jit), np.asarray(lp_eager), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(lp_jit)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_over_values_matches_a_loop(case):
    s, cond, theta = setup(case)
    d = case.build(s, theta, cond)
    values = values_for(case, (4,))
    batched = jax.jit(jax.vmap(d.log_prob))(values)
    one = jax.jit(d.log_prob)
    looped = np.stack([np.asarray(one(values[i])) for i in range(values.shape[0])])
    assert batched.shape == (4,) + B
    # vmap runs the same per-example arithmetic: float32 reordering only.
    np.testing.assert_allclose(np.asarray(batched), looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_wrt_value_and_parameter_is_finite(case):
    s, cond, theta = setup(case)
    value = values_for(case, (2,))

    def f(value, theta):
        return jnp.sum(case.build(s, theta, cond).log_prob(value))

    g_value, g_theta = jax.jit(jax.grad(f, argnums=(0, 1)))(value, theta)
    assert g_value.shape == value.shape and g_value.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(g_value)))
    assert np.isfinite(float(g_theta))
    # The density depends on both, so the gradients are not identically zero.
    assert np.any(np.asarray(g_value) != 0) and float(g_theta) != 0.0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_under_enable_x64(case):
    with x64():
        s, cond, theta = setup(case, jnp.float64)
        assert s.dtype == jnp.float64

        def f(theta, value):
            return jnp.sum(case.build(s, theta, cond).log_prob(value))

        @jax.jit
        def run(key, theta, value):
            d = case.build(s, theta, cond)
            h = 1e-5
            fd = (f(theta + h, value) - f(theta - h, value)) / (2 * h)
            return d.sample(key, (2,)), d.log_prob(value), jax.grad(f)(theta, value), fd

        x, lp, grad, fd = run(KEY, theta, values_for(case, (2,), jnp.float64))
        assert x.dtype == lp.dtype == grad.dtype == jnp.float64
        assert x.shape == (2,) + case.batch_shape + case.event_shape
        assert np.all(np.isfinite(np.asarray(lp)))
        # Central difference, h = 1e-5: truncation O(h^2 f''') ~ 1e-10, round-off
        # eps64 |f| / h ~ 1e-10 for |f| ~ 10: 1e-6 relative + 1e-6 absolute is ample.
        np.testing.assert_allclose(float(grad), float(fd), rtol=1e-6, atol=1e-6)
