"""The training driver: exact resume, EMA against its recursion, the NaN guard, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from numpyro.infer import SVI

from probdiff import GaussianDiffusion, schedules
from probdiff.infer import DiffusionELBO
from probdiff.training import NonFiniteLossError, fit, load_state, save_state

S = schedules.linear(50)


def model(x):
    c = numpyro.param("c", 0.0)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", GaussianDiffusion(lambda x_t, t: c * x_t, S, (2,)), obs=x)


def make_svi():
    return SVI(model, lambda x: None, optax.adam(0.05), DiffusionELBO())


DATA = jax.random.normal(jax.random.key(0), (500, 2))
KEY = jax.random.key(1)


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    # Each distinct block length compiles the scan once (seconds; the steps themselves are
    # cheap), and so does the loaded state (its optimiser step count comes back strongly typed),
    # so each leg uses one block length: three compilations. The legs use three different
    # steps_per_call and all block boundaries differ: the uninterrupted run cuts at 40, 80 and
    # 120; the first leg stops at 60, inside a block of it; the resumed leg cuts at 110.
    svi = make_svi()
    full = fit(svi, DATA, 160, batch_size=32, rng_key=KEY, steps_per_call=40, progress_bar=False)
    first = fit(svi, DATA, 60, batch_size=32, rng_key=KEY, steps_per_call=20, progress_bar=False)
    path = save_state(tmp_path / "ckpt.safetensors", first.state, metadata={"note": "half way"})
    state, meta = load_state(path, like=first.state)
    assert meta == {"note": "half way"}
    rest = fit(svi, DATA, 100, batch_size=32, rng_key=KEY, state=state, steps_per_call=50, progress_bar=False)
    np.testing.assert_array_equal(np.concatenate([first.losses, rest.losses]), full.losses)
    assert int(rest.state.step) == 160
    np.testing.assert_array_equal(np.asarray(rest.state.ema["c"]), np.asarray(full.state.ema["c"]))


def test_ema_follows_its_recursion():
    svi = make_svi()
    decay = 0.8
    state = None
    params, emas = [], []
    for _ in range(6):
        r = fit(svi, DATA, 1, batch_size=16, rng_key=KEY, state=state, ema_decay=decay, progress_bar=False)
        state = r.state
        params.append(float(svi.optim.get_params(state.svi_state.optim_state)["c"]))
        emas.append(float(state.ema["c"]))
    # ema_0 = theta_0 = 0 (the initial value), ema_k = decay ema_{k-1} + (1 - decay) theta_k.
    ref, expected = 0.0, []
    for p in params:
        ref = decay * ref + (1 - decay) * p
        expected.append(ref)
    np.testing.assert_allclose(emas, expected, rtol=1e-5)


def test_nan_in_the_data_is_refused_before_training():
    data = DATA.at[7, 1].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN or infinite entries in 1 example.*row 7"):
        fit(make_svi(), data, 10, batch_size=32, rng_key=KEY, progress_bar=False)


def poison_at(k: int):
    """An optax transformation that turns the update of step k into NaN: a stand-in for an
    overflow in the gradient (the loss of that step is still finite)."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        updates = jax.tree_util.tree_map(lambda u: jnp.where(count == k, jnp.nan, u), updates)
        return updates, count + 1

    return optax.GradientTransformation(init, update)


def nan_loss_model(x):
    # The loss turns NaN once gradient descent carries c past 1.5 (sqrt(1.5 - c) * 0 is then NaN).
    c = numpyro.param("c", 0.0)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", GaussianDiffusion(lambda x_t, t: jnp.sqrt(1.5 - c) * 0 + c * x_t, S, (2,)), obs=x)


@pytest.mark.parametrize("where", ["update", "loss"])
def test_nan_stops_with_the_last_good_state(where):
    if where == "update":
        svi = SVI(model, lambda x: None, optax.chain(optax.adam(0.05), poison_at(37)), DiffusionELBO())
        match = "parameters became NaN or infinite at step 37"
    else:
        svi = SVI(nan_loss_model, lambda x: None, optax.sgd(0.05), DiffusionELBO())
        match = "loss became nan at step"
    with pytest.raises(NonFiniteLossError, match=match) as err:
        fit(svi, DATA, 400, batch_size=32, rng_key=KEY, steps_per_call=50, progress_bar=False)
    result = err.value.result
    good = len(result.losses)
    assert good > 0 and np.all(np.isfinite(result.losses)) and int(result.state.step) == good
    if where == "update":
        assert good == 37
    # The kept state is exactly the state after `good` steps of an uninterrupted run.
    ref = fit(svi, DATA, good, batch_size=32, rng_key=KEY, steps_per_call=50, progress_bar=False)
    np.testing.assert_array_equal(ref.losses, result.losses)
    for a, b in zip(jax.tree_util.tree_leaves(ref.state), jax.tree_util.tree_leaves(result.state), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # the SVI state's key too
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(float(svi.optim.get_params(result.state.svi_state.optim_state)["c"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_steps": -1}, "num_steps"), ({"batch_size": 0}, "batch_size"), ({"ema_decay": 1.0}, "ema_decay"),
     ({"steps_per_call": 0}, "steps_per_call")],
)
def test_bad_arguments(kwargs, match):
    args = {"num_steps": 1, "batch_size": 4, "rng_key": KEY, "progress_bar": False, **kwargs}
    num_steps = args.pop("num_steps")
    with pytest.raises(ValueError, match=match):
        fit(make_svi(), DATA, num_steps, **args)
