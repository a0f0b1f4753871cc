"""Networks (MATH.md C4): the time embedding against its formula, the MLP as an eps_fn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI, Trace_ELBO

from probdiff import GaussianDiffusion, schedules
from probdiff.nets import MLP, sinusoidal_embedding


def test_sinusoidal_embedding_against_the_formula():
    t = np.array([0, 1, 7, 999])
    d = 8
    got = np.asarray(sinusoidal_embedding(jnp.asarray(t), d))
    # Written out from the definition, one entry at a time, in float64.
    ref = np.zeros((len(t), d))
    for a, ta in enumerate(t):
        for i in range(d // 2):
            w = 10_000.0 ** (-i / (d // 2))
            ref[a, i] = np.sin(ta * w)
            ref[a, i + d // 2] = np.cos(ta * w)
    # float32 sin/cos of arguments up to 999: absolute error ~ 999 * 6e-8 ~ 6e-5.
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("dim", [0, 3, 2.0])
def test_embedding_dim_is_checked(dim):
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(jnp.arange(3), dim)


def test_mlp_broadcasts_t_and_starts_at_zero():
    net = MLP(3, jax.random.key(0), hidden=(8, 8))
    x = jax.random.normal(jax.random.key(1), (4, 5, 3))
    assert net(x, 7).shape == (4, 5, 3)
    assert net(x, jnp.arange(5)).shape == (4, 5, 3)
    # The last layer is initialised at zero: an untrained network predicts eps = 0.
    np.testing.assert_array_equal(np.asarray(net(x, 7)), 0.0)
    # One t per example equals calling example by example with a scalar t.
    moved = jax.tree_util.tree_map(lambda a: a + 0.1 if isinstance(a, jax.Array) else a, net)
    per_t = moved(x, jnp.arange(5))
    for j in range(5):
        np.testing.assert_allclose(np.asarray(per_t[:, j]), np.asarray(moved(x[:, j], j)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="x_t"):
        net(jnp.ones((4, 2)), 1)


def test_mlp_trains_under_svi_with_eqx_module():
    """The MLP registered with eqx_module: SVI on the diffusion's model/guide lowers the loss."""
    sched = schedules.from_betas(np.linspace(1e-3, 0.3, 20))
    data = jax.random.normal(jax.random.key(2), (256, 2)) * jnp.array([1.0, 0.3]) + 1.0
    net0 = MLP(2, jax.random.key(3), hidden=(32, 32))
    zero = GaussianDiffusion(lambda x, t: jnp.zeros_like(x), sched, (2,))

    def model(x):
        GaussianDiffusion(eqx_module("eps_net", net0), sched, (2,)).model(x)

    svi = SVI(model, lambda x: zero.guide(x), optax.adam(3e-3), Trace_ELBO())
    losses = np.asarray(svi.run(jax.random.key(4), 500, data, progress_bar=False).losses)
    assert np.all(np.isfinite(losses))
    # One-sample ELBO of 256 points; means of 100 steps at each end differ by far more than
    # their noise (a few nats per step).
    assert losses[-100:].mean() < losses[:100].mean() - 20.0
