"""Shared test helpers: the float64 context, Monte-Carlo assertions, affine eps-functions.

Monte-Carlo checks use fixed seeds, so every run draws the same numbers; the tolerances are
standard errors estimated from the same draws, so that a different seed would still pass
with high probability (4 SE: a two-sided false-alarm rate of 6e-5 per statistic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: The 2-D data set used throughout: a tilted, elongated Gaussian N(MU, COV).
MU = np.array([1.0, -0.5])
COV = np.array([[1.0, 0.6], [0.6, 0.5]])

#: Number of standard errors allowed between a Monte-Carlo mean and its expectation.
N_SE = 4.0


def x64():
    """Context manager turning on float64 (``jax.enable_x64``; older JAX: jax.experimental)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pragma: no cover - older JAX

    return enable_x64()


def mc_mean_se(draws, axis: int = 0):
    """The Monte-Carlo mean over ``axis`` and its standard error, from the same draws."""
    draws = np.asarray(draws, np.float64)
    n = draws.shape[axis]
    return draws.mean(axis), draws.std(axis, ddof=1) / np.sqrt(n)


def assert_mc_close(draws, expected, *, axis: int = 0, n_se: float = N_SE, floor: float = 0.0, what: str = ""):
    """Assert |mean(draws) - expected| <= n_se * SE + floor, elementwise.

    ``floor`` is an extra absolute allowance for a deterministic error of the expectation
    (e.g. float32 round-off of a closed form); it must be justified by the caller.
    Returns the z-scores, for tests that also want to show a wrong value is rejected.
    """
    mean, se = mc_mean_se(draws, axis)
    expected = np.asarray(expected, np.float64)
    err = np.abs(mean - expected)
    ok = err <= n_se * se + floor
    assert np.all(ok), (
        f"{what}: Monte-Carlo mean {mean} vs expected {expected}; |diff| {err} > "
        f"{n_se} SE ({se}) + {floor}"
    )
    return (mean - expected) / se


def covariance_draws(samples):
    """Per-draw products (x_i - mean_i)(x_j - mean_j) of samples of shape (N, K): shape (N, K, K).

    Their mean is the sample covariance (the (N-1)/N bias is below 1e-4 for the N used here)
    and their spread gives its standard error.
    """
    x = np.asarray(samples, np.float64)
    c = x - x.mean(0)
    return c[:, :, None] * c[:, None, :]


def affine_eps_fn(W, v):
    """eps(x_t, t) = W[t] x_t + v[t] as a JAX function; W (T+1, D, D), v (T+1, D) indexed by t.

    Works for a scalar t and for a t per example (t of shape ``batch``). The arrays are cast to
    the dtype of x_t.
    """
    W = jnp.asarray(W)
    v = jnp.asarray(v)

    def eps_fn(x_t, t):
        t = jnp.asarray(t)
        Wt = W[t].astype(x_t.dtype)
        vt = v[t].astype(x_t.dtype)
        if t.ndim == 0:
            return x_t @ Wt.T + vt
        return jnp.einsum("...ij,...j->...i", Wt, x_t) + vt

    return eps_fn


def random_affine(T: int, D: int, seed: int, scale: float = 0.5):
    """A random affine eps-function's W (T+1, D, D) and v (T+1, D), float64 numpy."""
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((T + 1, D, D)), scale * rng.standard_normal((T + 1, D))
