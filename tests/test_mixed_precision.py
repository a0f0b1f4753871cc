"""Mixed precision: the network in bf16, the ELBO and the parameters in float32.

Checks, each against a float32 computation that shares no code with the cast:
* the wrapped network's output is float32 and within bf16's rounding of the float32 network,
  and *not* equal to it (so the arithmetic did run in bf16);
* the compiled loss has its matrix products in bf16 while every reduction, log, exp, division
  and square root (the ELBO's arithmetic) is float32;
* gradients reach the float32 parameters and point where the float32 gradients point;
* a bf16 run of the training recipe stays finite and lowers the loss as the float32 run does;
* the NaN guard, which does not depend on the dtype, works through the bf16 path as well: an
  overflow injected into one update stops training with the last good float32 state
  (tests/test_training.py has the float32 cases).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer import SVI

from probdiff import GaussianDiffusion, schedules
from probdiff.infer import DiffusionELBO
from probdiff.nets import MLP, MixedPrecision
from probdiff.recipes import build
from probdiff.training import NonFiniteLossError, fit
from probdiff.unet import UNet


def _random_head(net, key):
    """MLP starts its last layer at zero (eps = 0 exactly in any dtype); give it random weights."""
    w = net.weights[-1]
    return eqx.tree_at(lambda n: n.weights[-1], net, jax.random.normal(key, w.shape) / np.sqrt(w.shape[1]))


NET = _random_head(MLP(4, jax.random.key(0), hidden=(64, 64)), jax.random.key(1))
X = jax.random.normal(jax.random.key(2), (32, 4))
T_ = jax.random.randint(jax.random.key(3), (32,), 1, 100)


def test_output_is_float32_within_bf16_rounding():
    ref = np.asarray(NET(X, T_), np.float64)
    out = MixedPrecision(NET)(X, T_)
    assert out.dtype == jnp.float32
    err = np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref))
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3); three layers of width 64 with
    # float32 accumulation give a few units of it. An error below 1e-5 would mean float32 ran.
    assert 1e-5 < err < 3e-2
    # float32 "mixed precision" is the identity.
    np.testing.assert_array_equal(np.asarray(MixedPrecision(NET, "float32")(X, T_)), np.asarray(NET(X, T_)))


def test_unet_runs_in_bf16_and_returns_float32():
    net = UNet(1, jax.random.key(4), base=8, mults=(1, 2), time_dim=16)
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    call = eqx.filter_jit(lambda n, x: n(x, 10))  # one compilation each, not op by op
    ref = np.asarray(call(net, x), np.float64)
    out = call(MixedPrecision(net), x)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    scale = max(np.max(np.abs(ref)), 1e-3)
    assert np.max(np.abs(np.asarray(out, np.float64) - ref)) / scale < 5e-2


def _primitives_by_dtype(jaxpr, acc):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            acc.setdefault(str(v.aval.dtype), set()).add(eqn.primitive.name)
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitives_by_dtype(inner, acc)
    return acc


@pytest.mark.parametrize("weighting", ["simple", "vlb"])
def test_only_the_network_runs_in_bf16(weighting):
    sched = schedules.linear(100)
    elbo = DiffusionELBO(weighting)

    def model(x, net):
        import numpyro

        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(net, sched, (4,)), obs=x)

    def loss(net):
        return elbo.loss(jax.random.key(6), {}, model, lambda x, net: None, X, net)

    jaxpr = jax.make_jaxpr(loss)(MixedPrecision(NET)).jaxpr
    prims = _primitives_by_dtype(jaxpr, {})
    assert "dot_general" in prims.get("bfloat16", set())
    elbo_ops = {"log", "log1p", "exp", "div", "sqrt", "rsqrt", "reduce_sum", "integer_pow", "pow"}
    assert not (prims.get("bfloat16", set()) & elbo_ops), prims["bfloat16"] & elbo_ops
    assert loss(MixedPrecision(NET)).dtype == jnp.float32
    # The value: within bf16's rounding of eps (relative ~1e-2 of eps, less on the loss).
    l16, l32 = float(loss(MixedPrecision(NET))), float(loss(NET))
    assert abs(l16 - l32) <= 2e-2 * abs(l32)


def test_gradients_are_float32_and_follow_the_float32_ones():
    def sq(net):
        return jnp.sum((net(X, T_) - X) ** 2)

    g32 = jax.grad(sq)(NET)
    g16 = jax.grad(lambda n: sq(MixedPrecision(n)))(NET)
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g32)])
    leaves16 = jax.tree_util.tree_leaves(g16)
    assert all(x.dtype == jnp.float32 for x in leaves16)
    b = np.concatenate([np.ravel(x) for x in leaves16])
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cos > 0.999  # bf16 rounding perturbs each entry by ~1e-2 relative, not its direction


def test_bf16_training_tracks_float32():
    data = jax.random.normal(jax.random.key(7), (2048, 2)) * jnp.array([1.0, 0.5]) + 1.0
    losses = {}
    for dtype in ("float32", "bfloat16"):
        r = build({"T": 100, "hidden": [32, 32], "batch_size": 128, "compute_dtype": dtype})
        res = fit(r.svi, data, 300, batch_size=128, rng_key=jax.random.key(8), steps_per_call=100, progress_bar=False)
        losses[dtype] = res.losses
        assert np.all(np.isfinite(res.losses))
        params = r.svi.optim.get_params(res.state.svi_state.optim_state)
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    # L_simple per example starts at D = 2 (eps_theta = 0) and both runs lower it alike: the
    # means of the last 100 steps agree within 5% (step-to-step noise of a 128-batch is ~10%,
    # averaged over 100 steps ~1%; bf16 adds its ~1% rounding).
    f32, b16 = losses["float32"], losses["bfloat16"]
    assert np.mean(f32[-100:]) < 0.8 * np.mean(f32[:10])
    assert abs(np.mean(b16[-100:]) - np.mean(f32[-100:])) <= 0.05 * np.mean(f32[-100:])


def test_nan_guard_through_the_bf16_path():
    r = build({"T": 100, "hidden": [32, 32], "batch_size": 64, "compute_dtype": "bfloat16"})

    def poison(count, updates):
        return jax.tree_util.tree_map(lambda u: jnp.where(count == 12, jnp.inf, u), updates)

    tx = optax.chain(optax.adam(1e-3),
                     optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32),
                                                  lambda u, c, p=None: (poison(c, u), c + 1)))
    svi = SVI(r.model, lambda x: None, tx, DiffusionELBO())
    data = jax.random.normal(jax.random.key(9), (512, 2))
    with pytest.raises(NonFiniteLossError, match="parameters became NaN or infinite at step 12") as err:
        fit(svi, data, 50, batch_size=64, rng_key=jax.random.key(10), steps_per_call=25, progress_bar=False)
    kept = err.value.result
    assert int(kept.state.step) == 12 and len(kept.losses) == 12
    ref = fit(svi, data, 12, batch_size=64, rng_key=jax.random.key(10), steps_per_call=25, progress_bar=False)
    for a, b in zip(jax.tree_util.tree_leaves(ref.state.ema), jax.tree_util.tree_leaves(kept.state.ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_compute_dtype():
    for bad in ("int8", "float16"):
        with pytest.raises(ValueError, match="compute_dtype must be bfloat16 or float32"):
            MixedPrecision(NET, bad)
    with pytest.raises(ValueError, match="bfloat16 needs parameterization eps or v"):
        build({"compute_dtype": "bfloat16", "parameterization": "x0"})
    with pytest.raises(ValueError, match="compute_dtype must be float32 or bfloat16"):
        build({"compute_dtype": "float16"})
