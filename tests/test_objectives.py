"""Training objectives of issue 3 (MATH.md C1-C3): parameterisations, the learned variance,
improved DDPM's hybrid loss and importance sampling of t.

Expected values come from the numpy oracle (tests/oracles/gaussian.py: the B2 terms of an
affine reverse chain with any per-t sigma_t^2), from the forward-process algebra written out
in numpy here, and from a plain-Python ring buffer for the loss history.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from helpers import COV, MU, assert_mc_close
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI
from oracles import gaussian as g

from probdiff import GaussianDiffusion, schedules
from probdiff.analytic import optimal_eps_fn
from probdiff.distributions import (
    eps_from_prediction,
    learned_log_variance,
    p_step,
    prediction_target,
    reverse_moments,
)
from probdiff.infer import DiffusionELBO, importance_probs, with_loss_history
from probdiff.infer.elbo import _record
from probdiff.nets import MLP

T = 30
BETAS = np.linspace(1e-3, 0.25, T)
X0 = np.array([[0.3, -1.2], [1.5, 0.2], [2.0, 0.9]])


def _oracle_lower(o):
    """The lower end of the learned range: beta_tilde_t, with beta_tilde_2 at t = 1."""
    lower = o.beta_tilde.copy()
    lower[1] = o.beta_tilde[2]
    return lower


# ------------------------------------------------------------------ parameterisations
def test_prediction_targets_and_their_eps_follow_the_forward_process():
    """x_t = a x_0 + s eps and v = a eps - s x_0, written out in numpy."""
    o = g.schedule_from_betas(BETAS)
    lib = schedules.from_betas(BETAS)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(4, 3))
    eps = rng.normal(size=(4, 3))
    t = np.array([1, 7, 19, 30])
    a = np.sqrt(o.alpha_bar[t])[:, None]
    s = np.sqrt(1 - o.alpha_bar[t])[:, None]
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    args = (lib, jnp.asarray(t))
    np.testing.assert_allclose(prediction_target(*args, x0, eps, "v"), v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prediction_target(*args, x0, eps, "x0"), x0, rtol=1e-6)
    np.testing.assert_allclose(prediction_target(*args, x0, eps, "eps"), eps, rtol=1e-6)
    # Each exact prediction maps back to the true eps (float32: 1e-4 absolute at t = 1,
    # where x0 -> eps divides by sqrt(1 - alpha_bar_1) = 0.03).
    for kind, pred in (("eps", eps), ("x0", x0), ("v", v)):
        np.testing.assert_allclose(eps_from_prediction(*args, x_t, pred, kind), eps, atol=1e-4, err_msg=kind)


def _nets_for(eps_net, o):
    """The same reverse model written as an eps-, an x_0- and a v-network (numpy algebra)."""
    ab = jnp.asarray(o.alpha_bar)

    def coefs(t):
        return jnp.sqrt(ab[t])[..., None], jnp.sqrt(1 - ab[t])[..., None]

    def x0_net(x, t):
        a, s = coefs(jnp.broadcast_to(t, x.shape[:-1]))
        return (x - s * eps_net(x, t)) / a

    def v_net(x, t):
        a, s = coefs(jnp.broadcast_to(t, x.shape[:-1]))
        e = eps_net(x, t)
        return a * e - s * (x - s * e) / a

    return {"eps": eps_net, "x0": x0_net, "v": v_net}


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_the_elbo_does_not_depend_on_the_parameterisation(kind):
    o = g.schedule_from_betas(BETAS)
    lib = schedules.from_betas(BETAS)
    nets = _nets_for(optimal_eps_fn(MU, COV, lib), o)
    key, x = jax.random.key(0), jnp.asarray(X0)
    ref = GaussianDiffusion(nets["eps"], lib, (2,)).elbo_terms(key, x)
    got = GaussianDiffusion(nets[kind], lib, (2,), parameterization=kind).elbo_terms(key, x)
    for name in ref._fields:  # same draws, same model: float32 round-off only
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_l_simple_is_the_squared_error_in_the_networks_own_terms(kind):
    """Recompute x_t from the same eps draw (jax.random.normal with the key), then the error."""
    o = g.schedule_from_betas(BETAS)
    lib = schedules.from_betas(BETAS)
    net = _nets_for(lambda x, t: 0.3 * x, o)[kind]
    d = GaussianDiffusion(net, lib, (2,), parameterization=kind)
    key, t = jax.random.key(5), np.array([1, 12, 30])
    got = d.step_terms(key, jnp.asarray(X0), jnp.asarray(t)).simple
    eps = np.asarray(jax.random.normal(key, X0.shape, jnp.float32), np.float64)
    a, s = np.sqrt(o.alpha_bar[t])[:, None], np.sqrt(1 - o.alpha_bar[t])[:, None]
    x_t = a * X0 + s * eps
    target = {"eps": eps, "x0": X0, "v": a * eps - s * X0}[kind]
    pred = np.asarray(net(jnp.asarray(x_t, jnp.float32), jnp.asarray(t)), np.float64)
    np.testing.assert_allclose(got, ((target - pred) ** 2).sum(-1), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ learned variance
def test_learned_log_variance_interpolates_between_beta_tilde_and_beta():
    o = g.schedule_from_betas(BETAS)
    lib = schedules.from_betas(BETAS)
    lower = _oracle_lower(o)
    t = np.arange(1, T + 1)
    for v in (-1.0, 0.0, 0.4, 1.0):
        got = learned_log_variance(lib, jnp.asarray(t), jnp.full((T, 2), v))
        f = (v + 1) / 2
        want = f * np.log(o.beta[t]) + (1 - f) * np.log(lower[t])
        np.testing.assert_allclose(got, np.repeat(want[:, None], 2, 1), rtol=1e-5, atol=1e-5, err_msg=f"v={v}")


@pytest.mark.parametrize("v", [-1.0, 0.0, 0.7])
def test_learned_variance_elbo_matches_the_closed_form(v):
    """An eps-network with a constant v gives sigma_t^2 = exp(interpolation): oracle route (a)."""
    o = g.schedule_from_betas(BETAS)
    lib = schedules.from_betas(BETAS)
    opt = optimal_eps_fn(MU, COV, lib)
    d = GaussianDiffusion(lambda x, t: (opt(x, t), jnp.full_like(x, v)), lib, (2,), "learned")
    W, b = g.optimal_eps_affine(MU, COV, o)
    A, bb = g.affine_reverse(o, W, b)
    f = (v + 1) / 2
    lower = _oracle_lower(o)
    sigma2 = np.exp(f * np.log(np.maximum(o.beta, 1e-300)) + (1 - f) * np.log(np.maximum(lower, 1e-300)))
    expected = [g.elbo_terms_route_a(o, A, bb, sigma2, x)["total"] for x in X0]
    draws = jax.jit(jax.vmap(lambda k: d.elbo(k, jnp.asarray(X0))))(jax.random.split(jax.random.key(1), 4000))
    # 4 SE of the mean; floor 1e-3 nats for float32 sums of 30 terms of size up to ~10.
    assert_mc_close(np.asarray(draws), np.array(expected), floor=1e-3, what=f"ELBO, v={v}")


def test_learned_variance_samples_and_model_run():
    lib = schedules.linear(20)
    d = GaussianDiffusion(lambda x, t: (0.1 * x, jnp.zeros_like(x)), lib, (2,), "learned")
    x = d.sample(jax.random.key(0), (7,))
    assert x.shape == (7, 2) and np.all(np.isfinite(np.asarray(x)))
    tr = numpyro.handlers.trace(numpyro.handlers.seed(d.model, 0)).get_trace(jnp.asarray(X0))
    assert np.isfinite(float(tr["x_0"]["fn"].log_prob(tr["x_0"]["value"]).sum()))


def test_fixed_variance_network_must_not_return_a_pair_and_learned_must():
    lib = schedules.linear(10)
    with pytest.raises(ValueError, match="variance='learned'"):
        p_step(lambda x, t: (x, x), lib, 3, jnp.ones(2))
    with pytest.raises(ValueError, match="pair"):
        reverse_moments(lambda x, t: x, lib, 3, jnp.ones(2), variance="learned")
    with pytest.raises(ValueError, match="parameterization"):
        GaussianDiffusion(lambda x, t: x, lib, (2,), parameterization="score")


def _learned_model(net, lib):
    def model(x):
        n = eqx_module("eps_net", net)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(n, lib, (2,), "learned"), obs=x)

    return model


def test_hybrid_trains_the_mean_by_l_simple_and_the_variance_by_the_vlb():
    """Gradient of the hybrid loss on the eps outputs equals that of L_simple alone."""
    lib = schedules.linear(50)
    net = MLP(2, jax.random.key(0), hidden=(16,), learn_variance=True)
    # Non-zero last layer, so that both outputs depend on the weights.
    last = jax.random.normal(jax.random.key(1), net.weights[-1].shape) * 0.3
    net = eqx_set_last(net, last)
    model = _learned_model(net, lib)
    x = jnp.asarray(X0)
    svi_h = SVI(model, lambda x: None, optax.sgd(0.0), DiffusionELBO("hybrid", hybrid_weight=0.5))
    svi_s = SVI(model, lambda x: None, optax.sgd(0.0), DiffusionELBO("hybrid", hybrid_weight=0.0))
    state = svi_h.init(jax.random.key(2), x)
    params = svi_h.get_params(state)

    def grads(svi):  # jitted: one compilation each instead of op-by-op dispatch of the whole loss
        return jax.jit(jax.grad(lambda p: svi.loss.loss(jax.random.key(3), p, model, lambda x: None, x)))(params)

    gh, gs = grads(svi_h)["eps_net$params"], grads(svi_s)["eps_net$params"]
    # Rows 0..1 of the last layer produce eps, rows 2..3 produce v.
    np.testing.assert_allclose(gh.weights[-1][:2], gs.weights[-1][:2], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(gs.weights[-1][2:]) == 0)  # L_simple does not see v
    assert np.any(np.abs(np.asarray(gh.weights[-1][2:])) > 1e-6)  # the VLB trains v
    with pytest.raises(ValueError, match="learned variance no gradient"):
        DiffusionELBO("simple").loss(jax.random.key(0), params, model, lambda x: None, x)


def eqx_set_last(net, last):
    import equinox as eqx

    return eqx.tree_at(lambda n: n.weights[-1], net, last)


# ------------------------------------------------------------------ importance sampling
def _ring_reference(T, H, batches):
    """Plain-Python last-H buffers of squared losses, filled in order."""
    bufs = [collections.deque(maxlen=H) for _ in range(T)]
    counts = np.zeros(T, int)
    for ts, vals in batches:
        for t, val in zip(ts, vals, strict=True):
            bufs[t - 1].append(val**2)
            counts[t - 1] += 1
    return bufs, counts


def test_the_loss_history_keeps_the_last_h_squares_of_each_t():
    T_, H = 6, 4
    rng = np.random.default_rng(0)
    hist = {"loss_sq": jnp.zeros((T_, H)), "count": jnp.zeros(T_, jnp.int32)}
    batches = []
    for _ in range(5):
        ts = rng.integers(1, T_ + 1, size=7)  # repeats of one t inside a batch
        vals = rng.normal(size=7)
        batches.append((ts, vals))
        _record(hist, jnp.asarray(ts), jnp.asarray(vals, jnp.float32))
    bufs, counts = _ring_reference(T_, H, batches)
    np.testing.assert_array_equal(hist["count"], counts)
    for t in range(T_):
        # Order inside a step is arbitrary; the multiset of the last H matters (mean of squares),
        # and it is exact whenever one batch holds at most H copies of t.
        got = np.sort(np.asarray(hist["loss_sq"][t])[: min(counts[t], H)])
        np.testing.assert_allclose(got, np.sort(np.array(bufs[t])), rtol=1e-6, err_msg=f"t={t + 1}")


def test_importance_probs_are_uniform_until_every_t_has_h_losses():
    T_, H = 5, 3
    loss_sq = np.arange(1.0, T_ * H + 1).reshape(T_, H)
    count = np.full(T_, H)
    count[2] = H - 1
    p = importance_probs({"loss_sq": jnp.asarray(loss_sq), "count": jnp.asarray(count)}, uniform_mix=0.1)
    np.testing.assert_allclose(p, np.full(T_, 1 / T_), rtol=1e-6)
    count[2] = H
    p = importance_probs({"loss_sq": jnp.asarray(loss_sq), "count": jnp.asarray(count)}, uniform_mix=0.1)
    rms = np.sqrt(loss_sq.mean(-1))
    np.testing.assert_allclose(p, 0.9 * rms / rms.sum() + 0.1 / T_, rtol=1e-5)
    assert abs(float(p.sum()) - 1) < 1e-6


def _gaussian_model(lib):
    opt = optimal_eps_fn(MU, COV, lib)

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(opt, lib, (2,)), obs=x)

    return model


def _filled_history(lib, x, key, n_steps=400):
    """Run the ELBO's own history update for n_steps losses at fixed parameters."""
    model = with_loss_history(_gaussian_model(lib))
    elbo = DiffusionELBO("vlb", t_sampling="importance")
    hist = {"loss_sq": jnp.zeros((T, 10)), "count": jnp.zeros(T, jnp.int32)}

    def step(h, k):
        out = elbo.loss_with_mutable_state(k, {"x$loss_history": h}, model, lambda x: None, x)
        return out["mutable_state"]["x$loss_history"], None

    hist, _ = jax.lax.scan(step, hist, jax.random.split(key, n_steps))
    return model, elbo, hist


@pytest.mark.slow  # a statistical run (~13 s on 2 cores); importance_probs is checked in the default suite
def test_importance_sampled_vlb_is_unbiased_and_has_lower_variance():
    lib = schedules.from_betas(BETAS)
    x = jnp.asarray(X0)
    model, elbo, hist = _filled_history(lib, x, jax.random.key(0))
    assert int(hist["count"].min()) >= 10
    p = np.asarray(importance_probs(hist))
    assert p.max() / p.min() > 3  # the proposal is far from uniform for this model

    o = g.schedule_from_betas(BETAS)
    W, b = g.optimal_eps_affine(MU, COV, o)
    A, bb = g.affine_reverse(o, W, b)
    expected = -sum(g.elbo_terms_route_a(o, A, bb, g.reverse_sigma2(o, "beta"), xi)["total"] for xi in X0)

    uniform = DiffusionELBO("vlb")
    keys = jax.random.split(jax.random.key(1), 20_000)
    imp = jax.jit(jax.vmap(lambda k: elbo.loss(k, {"x$loss_history": hist}, model, lambda x: None, x)))(keys)
    uni = jax.jit(jax.vmap(lambda k: uniform.loss(k, {}, _gaussian_model(lib), lambda x: None, x)))(keys)
    # Both estimate -sum ELBO (4 SE; floor 1e-3 nats for float32 sums of order 10).
    assert_mc_close(np.asarray(imp), expected, floor=1e-3, what="importance-sampled -ELBO")
    assert_mc_close(np.asarray(uni), expected, floor=1e-3, what="uniform -ELBO")
    # The point of the proposal: a smaller spread (measured variance ratio about 6x; ask for 2x).
    assert np.var(np.asarray(uni)) > 2 * np.var(np.asarray(imp))


def _small_mlp_model():
    lib = schedules.linear(20)
    net = MLP(2, jax.random.key(0), hidden=(16,))

    def model(x):
        n = eqx_module("eps_net", net)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(n, lib, (2,)), obs=x)

    return model


def test_importance_sampling_under_svi_run_keeps_its_history_in_the_state():
    model = _small_mlp_model()
    svi = SVI(with_loss_history(model, history=5), lambda x: None, optax.adam(1e-3),
              DiffusionELBO("hybrid", num_t=2, t_sampling="importance"))
    r = svi.run(jax.random.key(1), 30, jnp.asarray(X0), progress_bar=False)
    h = r.state.mutable_state["x$loss_history"]
    assert int(h["count"].sum()) == 30 * 2 * len(X0)  # steps x num_t x batch
    assert np.all(np.isfinite(np.asarray(r.losses)))
    with pytest.raises(ValueError, match="with_loss_history"):
        SVI(model, lambda x: None, optax.adam(1e-3), DiffusionELBO(t_sampling="importance")).run(
            jax.random.key(1), 2, jnp.asarray(X0), progress_bar=False
        )
    with pytest.raises(ValueError, match="num_particles"):
        DiffusionELBO(t_sampling="importance", num_particles=2)
    with pytest.raises(ValueError, match="t_sampling"):
        DiffusionELBO(t_sampling="sorted")


def test_the_history_survives_a_checkpoint_and_resume_is_exact(tmp_path):
    from probdiff.training import fit, init_state, load_state, save_state

    model = _small_mlp_model()
    svi = SVI(with_loss_history(model), lambda x: None, optax.adam(1e-3), DiffusionELBO(t_sampling="importance"))
    data = jax.random.normal(jax.random.key(3), (200, 2))
    kw = {"batch_size": 16, "rng_key": jax.random.key(1), "progress_bar": False, "steps_per_call": 20}
    first = fit(svi, data, 40, **kw)
    save_state(tmp_path / "c.safetensors", first.state)
    state, _ = load_state(tmp_path / "c.safetensors", init_state(svi, jax.random.key(1), data[:16]))
    h0 = first.state.svi_state.mutable_state["x$loss_history"]
    h1 = state.svi_state.mutable_state["x$loss_history"]
    np.testing.assert_array_equal(h1["loss_sq"], h0["loss_sq"])
    np.testing.assert_array_equal(h1["count"], h0["count"])
    resumed = fit(svi, data, 40, state=state, **kw)
    straight = fit(svi, data, 80, **kw)
    np.testing.assert_array_equal(resumed.losses, straight.losses[40:])  # bit for bit
