"""Input checks shared by the package.

Every check runs on concrete values only. Under ``jit``, ``vmap`` or ``grad`` the values
are tracers and cannot be inspected; shapes still are, so shape checks always run, and
the value checks are skipped (the kernels then return NaN for an out-of-range ``t``
instead of silently clamping the index, see :func:`take_t`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*xs) -> bool:
    """True when none of ``xs`` is a JAX tracer, so its values can be read."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_t(t, num_steps: int, *, low: int = 1, name: str = "t"):
    """Check that the integer time index ``t`` lies in ``low..num_steps``.

    Returns ``t`` as an integer array. Values are checked only when concrete.
    """
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer time index in {low}..{num_steps}; got dtype {t.dtype}"
        )
    if is_concrete(t):
        tv = np.asarray(t)
        bad = (tv < low) | (tv > num_steps)
        if bad.any():
            first = tv[bad].ravel()[0]
            raise ValueError(
                f"{name} must lie in {low}..{num_steps} (T = {num_steps}); got {name} = {first}"
            )
    return t


def take_t(array, t, low: int = 1):
    """``array[t]`` for a time index ``t`` with NaN where ``t`` is outside ``low..T``.

    ``array`` has length T + 1 and is indexed by t directly. A traced ``t`` cannot be
    checked, and plain indexing would clamp it silently; NaN makes the mistake visible.
    """
    num_steps = array.shape[0] - 1
    valid = (t >= low) & (t <= num_steps)
    value = array[jnp.clip(t, 0, num_steps)]
    return jnp.where(valid, value, jnp.nan)


def check_event(x, event_shape: tuple[int, ...], name: str):
    """Check that the trailing dimensions of ``x`` equal ``event_shape``; return ``x``."""
    x = jnp.asarray(x)
    nd = len(event_shape)
    if x.ndim < nd or tuple(x.shape[x.ndim - nd :]) != tuple(event_shape):
        raise ValueError(
            f"{name} must have trailing shape event_shape = {tuple(event_shape)}; "
            f"got shape {tuple(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
    return x


def check_finite(x, name: str):
    """Raise if a concrete ``x`` holds NaN or infinity, naming the first bad index."""
    if is_concrete(x):
        xv = np.asarray(x)
        bad = ~np.isfinite(xv)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} must be finite; found {xv[index]} at index {index}"
            )
    return x


def float_dtype(dtype=None):
    """The requested float dtype, or JAX's default (float64 under ``jax_enable_x64``)."""
    if dtype is None:
        return jnp.result_type(float)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
    return dtype


def check_ladder(sigmas, name: str = "sigmas"):
    """Check a noise ladder sigma_1 < ... < sigma_L: 1-D, positive, finite, strictly increasing.

    Returns it as a float array. Values are checked only when concrete.
    """
    sigmas = jnp.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(
            f"{name} must be a 1-D array of noise levels sigma_1 < ... < sigma_L; got shape {sigmas.shape}"
        )
    if not jnp.issubdtype(sigmas.dtype, jnp.floating):
        sigmas = sigmas.astype(jnp.result_type(float))
    if is_concrete(sigmas):
        s = np.asarray(sigmas)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"{name} must be positive and finite; got {s}")
        if np.any(np.diff(s) <= 0):
            i = int(np.argmax(np.diff(s) <= 0))
            raise ValueError(
                f"{name} must increase strictly, sigma_1 < sigma_2 < ... < sigma_L (samplers run them "
                f"from the largest down); got sigma_{i + 1} = {s[i]:.4g} >= sigma_{i + 2} = {s[i + 1]:.4g}"
            )
    return sigmas


def check_positive(value, name: str) -> float:
    """Check that ``value`` is a positive finite number; return it as a Python float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive float; got {value!r}") from None
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite float; got {value!r}")
    return v


def check_event_shape(event_shape) -> tuple[int, ...]:
    """Check that ``event_shape`` is a non-empty tuple of positive ints; return it as a tuple."""
    try:
        event_shape = tuple(int(n) for n in event_shape)
    except TypeError:
        raise TypeError(f"event_shape must be a tuple of ints; got {event_shape!r}") from None
    if len(event_shape) == 0 or any(n < 1 for n in event_shape):
        raise ValueError(f"event_shape must be a non-empty tuple of positive ints; got {event_shape}")
    return event_shape
