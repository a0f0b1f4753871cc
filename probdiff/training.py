r"""A training driver around ``numpyro.infer.SVI``: minibatches, EMA, a NaN guard, checkpoints.

[fit][probdiff.training.fit] runs ``svi.update`` on random minibatches inside ``lax.scan``
(``steps_per_call`` steps per compiled call, so Python is entered once per block, not once per
step), keeps an exponential moving average of the parameters, stops at the first non-finite
loss with the last good state, and can save and resume a checkpoint exactly: the minibatch
of step k depends only on the key and k, so a resumed run repeats the uninterrupted one
step for step.

The EMA of the parameters (Ho et al. use decay 0.9999) is

$$ \bar\theta_k = \delta\,\bar\theta_{k-1} + (1-\delta)\,\theta_k,\qquad \bar\theta_0 = \theta_0 . $$
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.svi import SVIState

from probdiff.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["TrainState", "FitResult", "NonFiniteLossError", "fit", "init_state", "save_state", "load_state"]


class NonFiniteLossError(FloatingPointError):
    """A step gave a NaN or infinite loss, or NaN or infinite parameters; ``result`` holds the
    last good state."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly.

    Attributes:
        svi_state: NumPyro's ``SVIState`` (optimiser state, mutable state, PRNG key).
        ema: the exponential moving average of the unconstrained parameters.
        step: the number of completed steps (an int32 array).
    """

    svi_state: SVIState
    ema: dict
    step: jax.Array


class FitResult(NamedTuple):
    """What [fit][probdiff.training.fit] returns.

    Attributes:
        state: the final [TrainState][probdiff.training.TrainState].
        losses: the loss of every step run by this call, a numpy array.
    """

    state: TrainState
    losses: np.ndarray


def init_state(svi, rng_key, *args, **kwargs) -> TrainState:
    """A fresh [TrainState][probdiff.training.TrainState]: ``svi.init`` and EMA = the parameters."""
    svi_state = svi.init(rng_key, *args, **kwargs)
    params = svi.optim.get_params(svi_state.optim_state)
    return TrainState(svi_state, params, jnp.zeros((), jnp.int32))


def _check_data(data):
    data = jnp.asarray(data)
    if data.ndim < 1 or data.shape[0] < 1:
        raise ValueError(f"data must have a leading axis of examples; got shape {data.shape}")
    if jnp.issubdtype(data.dtype, jnp.inexact) and not bool(jnp.isfinite(data).all()):  # on device
        bad = np.flatnonzero(~np.isfinite(np.asarray(data).reshape(data.shape[0], -1)).all(axis=1))
        if bad.size:
            raise ValueError(f"data has NaN or infinite entries in {bad.size} example(s), the first at "
                             f"row {int(bad[0])}; remove or impute them before training")
    return data


def _batch_at(data, key_data, step, batch_size: int):
    """The minibatch of step ``step``: ``batch_size`` rows drawn with replacement."""
    idx = jax.random.randint(jax.random.fold_in(key_data, step), (batch_size,), 0, data.shape[0])
    return data[idx]


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@functools.lru_cache(maxsize=32)
def _block_fn(svi, batch_size: int, ema_decay: float, mesh=None):
    """The jitted block of steps for one SVI object, cached so that successive ``fit`` calls
    (checkpoint intervals, resumes) reuse one compilation. With a ``mesh`` each minibatch is
    constrained to be split over its devices (the state and data arrive replicated)."""
    if mesh is not None:
        from probdiff.parallel import batch_sharding

        split = batch_sharding(mesh)

    @jax.jit
    def block(st, data, key_data, length_marker):
        def one_step(st, _):
            batch = _batch_at(data, key_data, st.step, batch_size)
            if mesh is not None:
                batch = jax.lax.with_sharding_constraint(batch, split)
            svi_state, loss = svi.update(st.svi_state, batch)
            params = svi.optim.get_params(svi_state.optim_state)
            ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, st.ema, params)
            new = TrainState(svi_state, ema, st.step + 1)
            # A step is good when its loss and the parameters it produced are finite: an overflow
            # in the gradient (e.g. in bf16) shows in the parameters before it shows in a loss.
            ok = jnp.isfinite(loss) & _all_finite(params)
            # A non-finite step keeps the previous state: the block then runs on unchanged.
            kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, st)
            return kept, (loss, ok)

        return jax.lax.scan(one_step, st, None, length=length_marker.shape[0])

    return block


def fit(
    svi,
    data,
    num_steps: int,
    *,
    batch_size: int,
    rng_key,
    state: TrainState | None = None,
    ema_decay: float = 0.999,
    steps_per_call: int = 100,
    progress_bar=True,
    mesh=None,
) -> FitResult:
    r"""Run ``num_steps`` SVI steps on minibatches of ``data``.

    Step k (counted from the start of training, across resumes) uses the minibatch
    ``data[randint(fold_in(key_data, k), (batch_size,), 0, N)]`` (drawn with replacement;
    ``key_data, key_init = split(rng_key)``, the second seeding ``svi.init``) and
    calls ``svi.update(svi_state, batch)``: the model and guide take the minibatch as their
    only argument. The EMA follows the module docstring's equation.

    Args:
        svi: a ``numpyro.infer.SVI``.
        data: an array whose leading axis indexes the N examples.
        num_steps: steps to run in this call, >= 0.
        batch_size: examples per step, 1 <= batch_size.
        rng_key: the key of the data stream (keep it the same when resuming).
        state: a [TrainState][probdiff.training.TrainState] to continue from; ``None`` starts
            afresh with ``svi.init`` on the first minibatch.
        ema_decay: delta in [0, 1).
        steps_per_call: steps per compiled ``lax.scan`` block.
        progress_bar: show a ``tqdm`` bar with the running loss; or pass a ``tqdm`` bar to
            advance (one bar over several calls; it is left open).
        mesh: data-parallel training: a one-axis ``jax.sharding.Mesh``
            ([data_mesh][probdiff.parallel.data_mesh]). The data and the state are replicated
            on its devices and each minibatch is split over them; ``batch_size`` must be a
            multiple of the device count. The steps, losses and parameters are those of one
            device up to the order of float additions.

    Returns:
        A [FitResult][probdiff.training.FitResult].

    Raises:
        NonFiniteLossError: a step gave a NaN or infinite loss, or NaN or infinite parameters
            (a gradient overflow, seen before any loss shows it). Its ``result`` holds the state
            before that step (the last good one) and the losses of the steps before it.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0; got {num_steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1); got {ema_decay}")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an integer >= 1; got {steps_per_call!r}")
    data = _check_data(data)
    key_data, key_init = jax.random.split(rng_key)
    if mesh is not None:
        from probdiff.parallel import _check_mesh

        _check_mesh(mesh)
        if batch_size % mesh.devices.size:
            raise ValueError(f"batch_size must be a multiple of the mesh's device count ({mesh.devices.size}) "
                             f"for data-parallel training; got {batch_size}")

    block = _block_fn(svi, int(batch_size), float(ema_decay), mesh)
    if state is None:
        state = init_state(svi, key_init, _batch_at(data, key_data, 0, int(batch_size)))
    if mesh is not None:
        from probdiff.parallel import replicate

        data, state, key_data = replicate((data, state, key_data), mesh)

    losses = []
    bar, own_bar = None, False
    if hasattr(progress_bar, "update"):
        bar = progress_bar  # the caller's bar, e.g. one bar over several fit calls
    elif progress_bar:
        from tqdm.auto import tqdm

        bar, own_bar = tqdm(total=num_steps, desc="training", unit="step"), True
    done = 0
    try:
        while done < num_steps:
            size = min(steps_per_call, num_steps - done)
            new_state, (block_losses, block_ok) = block(state, data, key_data, jnp.zeros((size,)))
            block_losses = np.asarray(block_losses)
            bad = ~np.asarray(block_ok)
            if bad.any():
                first = int(np.argmax(bad))
                # The scan kept the state of the last good step; every later step of the block
                # repeated the same failing update from it, so new_state is that state.
                losses.extend(block_losses[:first].tolist())
                step = int(state.step) + first
                result = FitResult(new_state, np.asarray(losses, dtype=np.float64))
                what = (f"loss became {block_losses[first]}" if not np.isfinite(block_losses[first])
                        else "parameters became NaN or infinite")
                raise NonFiniteLossError(
                    f"{what} at step {step}; training stopped, and "
                    f"the state after step {step - 1} (the last good one) is in .result.state",
                    result,
                )
            state = new_state
            losses.extend(block_losses.tolist())
            done += size
            if bar is not None:
                bar.update(size)
                bar.set_postfix(loss=f"{float(np.mean(block_losses)):.4g}")
    finally:
        if own_bar:
            bar.close()
    return FitResult(state, np.asarray(losses, dtype=np.float64))


def save_state(path, state: TrainState, *, metadata=None, overwrite: bool = False):
    """Save a [TrainState][probdiff.training.TrainState] with [save_checkpoint][probdiff.checkpoint.save_checkpoint]."""
    return save_checkpoint(path, state, metadata=metadata, overwrite=overwrite)


def load_state(path, like: TrainState):
    """Load a [TrainState][probdiff.training.TrainState] shaped like ``like``; returns (state, metadata)."""
    return load_checkpoint(path, like=like)
