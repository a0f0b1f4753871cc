"""GaussianDiffusion inside ordinary NumPyro programs: as a prior next to an observation, as a
likelihood next to another latent, and with a registered network trained by SVI.

Expected values come from the numpy oracle (tests/oracles/gaussian.py) or from the
construction of the test itself (the true scale is 1 by design).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta
from oracles import gaussian as oracle

from probdiff import GaussianDiffusion, schedules
from probdiff.analytic import optimal_eps_fn

MU = np.array([1.0, -0.5])
SIGMA = np.array([[1.0, 0.6], [0.6, 0.5]])


def test_diffusion_prior_with_linear_observation_under_predictive():
    """x ~ diffusion prior, y ~ N(A_obs x, s^2 I): prior draws of x have the law of Algorithm 2
    (the oracle's reverse marginal without the final noise), and y = A_obs x + noise."""
    T = 30
    betas = np.linspace(1e-3, 0.2, T)
    sched = schedules.from_betas(betas)
    eps_fn = optimal_eps_fn(MU, SIGMA, sched)
    A_obs = jnp.array([[1.0, 1.0]])
    s = 0.3

    def model(y=None):
        x = numpyro.sample("x", GaussianDiffusion(eps_fn, sched, (2,)))
        return numpyro.sample("y", dist.Normal(x @ A_obs.T, s).to_event(1), obs=y)

    n = 40_000
    draws = Predictive(model, num_samples=n)(jax.random.key(0))
    x, y = np.asarray(draws["x"]), np.asarray(draws["y"])
    assert x.shape == (n, 2) and y.shape == (n, 1)

    o = oracle.schedule_from_betas(betas)
    W, v = oracle.optimal_eps_affine(MU, SIGMA, o)
    A, b = oracle.affine_reverse(o, W, v)
    m0, S0 = oracle.reverse_marginal(A, b, oracle.reverse_sigma2(o, "beta"), final_noise=False)
    # Mean: SE of each coordinate is sqrt(S0_ii / n) <= 0.005; allow 5 SE.
    assert np.all(np.abs(x.mean(0) - m0) < 5 * np.sqrt(np.diag(S0) / n))
    # Covariance entries: SE of a sample covariance is about sqrt((S_ii S_jj + S_ij^2) / n);
    # allow 5 SE.
    se = np.sqrt((np.outer(np.diag(S0), np.diag(S0)) + S0**2) / n)
    assert np.all(np.abs(np.cov(x.T) - S0) < 5 * se)
    # y: variance A S0 A^T + s^2 by construction of the observation.
    var_y = float((np.asarray(A_obs) @ S0 @ np.asarray(A_obs).T)[0, 0]) + s**2
    assert abs(y.var() - var_y) < 5 * np.sqrt(2 * var_y**2 / n)


def test_diffusion_likelihood_next_to_a_global_latent():
    """c ~ LogNormal(0, 1) scales the optimal eps-function; data come from the diffusion with
    c = 1. SVI with a point-mass guide on c (MAP) recovers c close to 1."""
    T = 20
    sched = schedules.from_betas(np.linspace(1e-3, 0.3, T))
    eps_opt = optimal_eps_fn(MU, SIGMA, sched)
    x = GaussianDiffusion(eps_opt, sched, (2,)).sample(jax.random.key(1), (500,), final_noise=True)

    def model(x):
        c = numpyro.sample("c", dist.LogNormal(0.0, 1.0))
        d = GaussianDiffusion(lambda x_t, t: c * eps_opt(x_t, t), sched, (2,))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", d, obs=x)

    guide = AutoDelta(model)
    svi = SVI(model, guide, optax.adam(0.02), Trace_ELBO())
    result = svi.run(jax.random.key(2), 300, x, progress_bar=False)
    c_hat = float(guide.median(result.params)["c"])
    # With 500 points the posterior of c is sharp (the summed ELBO falls by tens of nats when c
    # moves 0.1 away from 1), so 0.1 is far wider than its spread yet excludes c = 0.5 or 1.5.
    assert abs(c_hat - 1.0) < 0.1, c_hat
    assert np.all(np.isfinite(result.losses))


class _MLP(eqx.Module):
    layers: list

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = [eqx.nn.Linear(3, 32, key=k1), eqx.nn.Linear(32, 2, key=k2)]

    def __call__(self, x_t, t):
        t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:-1])[..., None] / 20.0
        h = jnp.concatenate([x_t, t], axis=-1)
        h = jax.nn.silu(h @ self.layers[0].weight.T + self.layers[0].bias)
        return h @ self.layers[1].weight.T + self.layers[1].bias


def test_registered_network_trains_on_model_and_guide():
    """An Equinox network registered with eqx_module inside the model, the diffusion's own
    model/guide pair, Trace_ELBO and SVI: the loss falls and the parameters move."""
    T = 20
    sched = schedules.from_betas(np.linspace(1e-3, 0.3, T))
    data = jax.random.multivariate_normal(jax.random.key(3), jnp.asarray(MU), jnp.asarray(SIGMA), (256,))
    net0 = _MLP(jax.random.key(4))
    guide_diffusion = GaussianDiffusion(lambda x_t, t: jnp.zeros_like(x_t), sched, (2,))

    def model(x):
        net = eqx_module("eps_net", net0)
        GaussianDiffusion(net, sched, (2,)).model(x)

    def guide(x):
        guide_diffusion.guide(x)

    svi = SVI(model, guide, optax.adam(3e-3), Trace_ELBO())
    result = svi.run(jax.random.key(5), 600, data, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses))
    # The loss is a one-sample ELBO of 256 points; averaging 100 steps at each end makes the
    # fall from the untrained network (eps = noise of a random MLP) unmistakable.
    assert losses[-100:].mean() < losses[:100].mean() - 50.0
    assert "eps_net$params" in result.params
