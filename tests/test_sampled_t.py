"""Sampled-t estimators (MATH.md C3): per-step losses, the unbiased ELBO, and DiffusionELBO.

Expected values come from the numpy oracle (tests/oracles/gaussian.py, route (a) of the B2
ELBO for an affine eps-function) or from an independent numpy implementation of Algorithm 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from helpers import COV, MU, assert_mc_close
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoDelta
from oracles import gaussian as g
from scipy import stats

from probdiff import GaussianDiffusion, schedules
from probdiff.analytic import optimal_eps_fn
from probdiff.infer import DiffusionELBO
from probdiff.nets import MLP

T = 30
BETAS = np.linspace(1e-3, 0.25, T)
X0 = np.array([[0.3, -1.2], [1.5, 0.2], [2.0, 0.9]])


def setup(variance, c=1.0):
    lib = schedules.from_betas(BETAS)
    opt = optimal_eps_fn(MU, COV, lib)
    d = GaussianDiffusion(lambda x, t: c * opt(x, t), lib, (2,), variance)
    o = g.schedule_from_betas(BETAS)
    W, v = g.optimal_eps_affine(MU, COV, o)
    A, b = g.affine_reverse(o, c * W, c * v)
    expected = [g.elbo_terms_route_a(o, A, b, g.reverse_sigma2(o, variance), x) for x in X0]
    return d, expected, (o, W, v)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_step_terms_mean_is_the_elbo_term(variance):
    d, expected, _ = setup(variance)
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    for t in (1, 2, T // 2, T):
        draws = jax.jit(jax.vmap(lambda k, t=t: d.step_terms(k, jnp.asarray(X0), t).vlb))(keys)
        if t == 1:
            ref = [-e["reconstruction"] for e in expected]
        else:
            ref = [e["denoising_matching"][t - 2] for e in expected]
        # 4 SE of the mean from the same draws; floor 1e-5 for float32 terms of O(1).
        assert_mc_close(np.asarray(draws), np.array(ref), floor=1e-5, what=f"L_{t}")


def test_one_t_per_example_matches_a_shared_t():
    d, _, _ = setup("beta")
    key = jax.random.key(1)
    x = jnp.asarray(X0)
    per = d.step_terms(key, x, jnp.array([4, 4, 4]))
    shared = d.step_terms(key, x, 4)
    np.testing.assert_array_equal(np.asarray(per.vlb), np.asarray(shared.vlb))  # same computation


@pytest.mark.parametrize("num_t", [1, 3])
def test_elbo_sampled_t_is_unbiased(num_t):
    d, expected, _ = setup("beta")
    n = 40_000
    draws = jax.jit(jax.vmap(lambda k: d.elbo_sampled_t(k, jnp.asarray(X0), num_t)))(
        jax.random.split(jax.random.key(2), n)
    )
    assert_mc_close(np.asarray(draws), np.array([e["total"] for e in expected]), floor=1e-4, what="ELBO")


def test_step_terms_gradients_are_finite_at_t1():
    """The unused t >= 2 branch at t = 1 must not poison gradients with NaN."""
    d, _, _ = setup("beta_tilde")
    grad = jax.grad(lambda x: d.step_terms(jax.random.key(3), x, jnp.array([1, 2, T])).vlb.sum())(jnp.asarray(X0))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_diffusion_elbo_vlb_with_another_latent_site():
    """-loss = E[ELBO of the data given c] + log p(c) for a point-mass guide on c; the oracle gives
    the ELBO at c and scipy the log-density of the LogNormal prior."""
    lib = schedules.from_betas(BETAS)
    opt = optimal_eps_fn(MU, COV, lib)

    def model(x):
        c = numpyro.sample("c", dist.LogNormal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(lambda x_t, t: c * opt(x_t, t), lib, (2,)), obs=x)

    guide = AutoDelta(model)
    c0 = 1.2
    params = {"c_auto_loc": jnp.asarray(c0)}
    loss = DiffusionELBO("vlb", num_t=2)
    n = 20_000
    draws = jax.jit(jax.vmap(lambda k: -loss.loss(k, params, model, guide, jnp.asarray(X0))))(
        jax.random.split(jax.random.key(4), n)
    )
    _, expected, _ = setup("beta", c=c0)
    ref = sum(e["total"] for e in expected) + stats.lognorm.logpdf(c0, s=1.0)
    assert_mc_close(np.asarray(draws), ref, floor=1e-4, what="-DiffusionELBO")


def test_diffusion_elbo_simple_is_algorithm_1():
    """weighting="simple" against a numpy Algorithm 1: t ~ U{1..T}, eps ~ N(0, I),
    ||eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t)||^2 with the oracle's affine eps."""
    d, _, (o, W, v) = setup("beta")

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", d, obs=x)

    loss = DiffusionELBO("simple")
    n = 20_000
    lib_draws = jax.jit(jax.vmap(lambda k: loss.loss(k, {}, model, lambda x: None, jnp.asarray(X0))))(
        jax.random.split(jax.random.key(5), n)
    )
    rng = np.random.default_rng(0)
    ref = np.zeros(n)
    for i in range(n):
        for x0 in X0:
            t = rng.integers(1, T + 1)
            eps = rng.standard_normal(2)
            ab = o.alpha_bar[t]
            x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
            ref[i] += np.sum((eps - (W[t] @ x_t + v[t])) ** 2)
    m1, m2 = np.mean(lib_draws), np.mean(ref)
    se = np.sqrt(np.var(lib_draws) / n + np.var(ref) / n)
    # Two independent Monte-Carlo means of the same expectation: 4 combined SE.
    assert abs(m1 - m2) < 4 * se, (m1, m2, se)


def test_particles_draw_independent_steps():
    d, _, _ = setup("beta")

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", d, obs=x)

    n = 4000
    keys = jax.random.split(jax.random.key(6), n)
    one = jax.jit(jax.vmap(lambda k: DiffusionELBO(num_particles=1).loss(k, {}, model, lambda x: None, jnp.asarray(X0))))(keys)
    four = jax.jit(jax.vmap(lambda k: DiffusionELBO(num_particles=4).loss(k, {}, model, lambda x: None, jnp.asarray(X0))))(keys)
    ratio = float(np.var(one) / np.var(four))
    # Independent particles divide the variance by 4. The sample-variance ratio of n = 4000 draws
    # of these heavy-tailed losses is within 4 +- 1.5 in practice; shared draws would give 1.
    assert 2.5 < ratio < 6.0, ratio


def test_diffusion_elbo_trains_an_mlp():
    sched = schedules.linear(100)
    data = jax.random.normal(jax.random.key(7), (512, 2)) * jnp.array([1.0, 0.3]) + 1.0
    net0 = MLP(2, jax.random.key(8), hidden=(64, 64))

    def model(x):
        net = eqx_module("eps_net", net0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(net, sched, (2,)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(2e-3), DiffusionELBO("simple"))
    losses = np.asarray(svi.run(jax.random.key(9), 800, data, progress_bar=False).losses)
    assert np.all(np.isfinite(losses))
    # L_simple of the untrained network (its last layer starts at 0, so eps_theta = 0) is
    # ||eps||^2 summed over 512 points x 2 dims: chi-square with 1024 dof, 1024 +- 45. After 800
    # steps the mean of the last 100 losses must sit far below (more than 7 of those sd).
    assert abs(losses[0] - 1024) < 5 * 45, losses[0]
    assert losses[-100:].mean() < 700, losses[-100:].mean()


@pytest.mark.parametrize("kwargs, match", [({"weighting": "mse"}, "weighting"), ({"num_t": 0}, "num_t"),
                                           ({"hybrid_weight": -1.0}, "hybrid_weight")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionELBO(**kwargs)
