r"""Noise schedules of the forward process (MATH.md A1).

A schedule fixes the variances beta_1, ..., beta_T of the Markov kernel

$$ q(x_t \mid x_{t-1}) = \mathcal{N}\big(\sqrt{1-\beta_t}\, x_{t-1},\ \beta_t I\big), $$

and carries the quantities derived from them:

* alpha_t = 1 - beta_t,
* alpha_bar_t = prod_{s<=t} alpha_s (so q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)),
* beta_tilde_t = (1 - alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) (variance of q(x_{t-1} | x_t, x_0)).

**Indexing by t (used everywhere in probdiff).** Every per-step array has length T + 1 and
is indexed by t itself: ``schedule.beta[t]`` is beta_t for t = 1..T. Entry 0 holds the
values at t = 0 of a chain that has not moved yet: beta_0 = 0, alpha_0 = 1,
alpha_bar_0 = 1, 1 - alpha_bar_0 = 0, beta_tilde_0 = 0. So ``alpha_bar[t - 1]`` is
alpha_bar_{t-1} with no off-by-one, also at t = 1.

A :class:`Schedule` is an immutable pytree whose arrays are leaves: it passes through
``jit``, ``vmap`` and ``grad`` (a schedule can be learned or vmapped over).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from probdiff._checks import float_dtype, is_concrete

__all__ = ["Schedule", "from_betas", "linear", "cosine", "sigmoid"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    r"""A variance schedule beta_1..beta_T and the quantities derived from it.

    All fields are arrays of length T + 1 indexed by t (see the module docstring):

    Attributes:
        beta: beta_t, the variance of q(x_t | x_{t-1}); ``beta[0] = 0``.
        alpha: alpha_t = 1 - beta_t; ``alpha[0] = 1``.
        alpha_bar: $\bar\alpha_t = \prod_{s \le t} \alpha_s$; ``alpha_bar[0] = 1``.
        one_minus_alpha_bar: $1 - \bar\alpha_t$, computed as ``-expm1(sum log alpha_s)``
            so that it keeps full relative precision when it is small (t near 1).
        beta_tilde: $\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$;
            ``beta_tilde[0] = beta_tilde[1] = 0``.

    Build one with :func:`linear`, :func:`cosine`, :func:`sigmoid` or :func:`from_betas`,
    which validate their input; the bare constructor does not.

    Examples:
        >>> from probdiff import schedules
        >>> s = schedules.linear(1000)
        >>> s.num_steps
        1000
        >>> round(float(s.beta[1]), 6), round(float(s.beta[1000]), 6)
        (0.0001, 0.02)
    """

    beta: jax.Array
    alpha: jax.Array
    alpha_bar: jax.Array
    one_minus_alpha_bar: jax.Array
    beta_tilde: jax.Array

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.beta.shape[-1] - 1

    @property
    def dtype(self):
        """The float dtype of the schedule's arrays."""
        return self.beta.dtype

    def __repr__(self) -> str:
        if is_concrete(self.beta) and self.beta.ndim > 1:
            return f"Schedule(T={self.num_steps}, batch of {self.beta.shape[:-1]}, dtype={self.dtype})"
        if is_concrete(self.beta) and self.beta.ndim == 1:
            b = np.asarray(self.beta)
            return (
                f"Schedule(T={self.num_steps}, beta_1={b[1]:.4g}, beta_T={b[-1]:.4g}, "
                f"alpha_bar_T={float(self.alpha_bar[-1]):.4g}, dtype={self.dtype})"
            )
        return f"Schedule(T={self.num_steps}, traced)"


def from_betas(betas, *, dtype=None) -> Schedule:
    r"""A schedule from any array of betas (beta_1, ..., beta_T).

    $$ \alpha_t = 1-\beta_t,\quad \bar\alpha_t = \prod_{s\le t}\alpha_s,\quad
       \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\,\beta_t .$$

    ``1 - alpha_bar_t`` is computed as ``-expm1(cumsum(log1p(-beta)))``, which keeps its
    relative precision near t = 1, where a plain ``1 - cumprod(alpha)`` in float32 loses
    three to four digits.

    Args:
        betas: length-T array of beta_1..beta_T, each in the open interval (0, 1).
            May be traced (for a learned schedule); values are validated when concrete.
        dtype: float dtype of the schedule; default float32, or float64 when
            ``jax_enable_x64`` is on.

    Returns:
        A :class:`Schedule` with arrays of length T + 1 indexed by t.

    Raises:
        ValueError: ``betas`` is not 1-D, is empty (T < 1), or holds a value that is not
            finite or not in (0, 1); the message names the first offending t.

    Examples:
        >>> from probdiff.schedules import from_betas
        >>> s = from_betas([0.1, 0.2])
        >>> [round(float(a), 6) for a in s.alpha_bar]
        [1.0, 0.9, 0.72]
    """
    dtype = float_dtype(dtype)
    if is_concrete(betas):
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1:
            raise ValueError(f"betas must be a 1-D array (beta_1..beta_T); got shape {b.shape}")
        if b.shape[0] < 1:
            raise ValueError("betas must hold at least one step (T >= 1); got an empty array")
        bad = ~np.isfinite(b)
        if bad.any():
            t = int(np.argmax(bad)) + 1
            raise ValueError(f"beta_t must be finite; got beta_{t} = {b[t - 1]} (t = {t})")
        bad = (b <= 0) | (b >= 1)
        if bad.any():
            t = int(np.argmax(bad)) + 1
            raise ValueError(
                f"beta_t must lie in the open interval (0, 1); got beta_{t} = {b[t - 1]} (t = {t})"
            )
    beta_1T = jnp.asarray(betas, dtype=dtype)
    if beta_1T.ndim != 1 or beta_1T.shape[0] < 1:
        raise ValueError(
            f"betas must be a non-empty 1-D array (beta_1..beta_T); got shape {beta_1T.shape}"
        )
    zero = jnp.zeros((1,), dtype)
    beta = jnp.concatenate([zero, beta_1T])
    alpha = 1.0 - beta
    log_alpha_bar = jnp.cumsum(jnp.log1p(-beta))
    alpha_bar = jnp.exp(log_alpha_bar)
    one_minus_alpha_bar = -jnp.expm1(log_alpha_bar) + 0.0  # + 0.0 turns -0.0 at t = 0 into 0.0
    # beta_tilde_t = (1 - alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), t >= 1; 0 at t = 0.
    ratio = one_minus_alpha_bar[:-1] / one_minus_alpha_bar[1:]
    beta_tilde = jnp.concatenate([zero, ratio * beta_1T])
    return Schedule(beta, alpha, alpha_bar, one_minus_alpha_bar, beta_tilde)


def _check_num_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int T >= 1; got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be T >= 1; got {num_steps}")
    return int(num_steps)


def linear(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02, *, dtype=None) -> Schedule:
    r"""DDPM's linear schedule: beta_t rises linearly from ``beta_start`` to ``beta_end``.

    $$ \beta_t = \beta_{\text{start}} + \frac{t-1}{T-1}(\beta_{\text{end}}-\beta_{\text{start}}),
       \quad t = 1..T $$

    (Ho et al. 2020 use T = 1000, 1e-4 .. 0.02; alpha_bar_T is then about 4e-5.)

    Args:
        num_steps: T >= 1. With T = 1 the single beta is ``beta_start``.
        beta_start: beta_1, in (0, 1).
        beta_end: beta_T, in (0, 1).
        dtype: float dtype (default float32, float64 under ``jax_enable_x64``).

    Examples:
        >>> from probdiff import schedules
        >>> round(float(schedules.linear(1000).alpha_bar[-1]), 7)
        4.04e-05
    """
    num_steps = _check_num_steps(num_steps)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (0.0 < float(value) < 1.0):
            raise ValueError(f"{name} must lie in the open interval (0, 1); got {value}")
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return from_betas(betas, dtype=dtype)


def cosine(num_steps: int, s: float = 0.008, max_beta: float = 0.999, *, dtype=None) -> Schedule:
    r"""The cosine schedule of improved DDPM (Nichol & Dhariwal 2021), with its clipping.

    $$ \bar\alpha(t) = \frac{f(t)}{f(0)},\quad f(t) = \cos^2\!\Big(\frac{t/T + s}{1+s}\,\frac{\pi}{2}\Big),
       \qquad \beta_t = \min\Big(1 - \frac{\bar\alpha(t)}{\bar\alpha(t-1)},\ \beta_{\max}\Big). $$

    The clip at ``max_beta`` (0.999) stops beta_T = 1 at t = T, where f(T) = 0; as a
    result the stored alpha_bar_T is tiny but positive. The offset ``s`` keeps beta_1
    from being too small near t = 0.

    Args:
        num_steps: T >= 1.
        s: the offset, >= 0.
        max_beta: the clip on beta_t, in (0, 1).
        dtype: float dtype (default float32, float64 under ``jax_enable_x64``).

    Examples:
        >>> from probdiff import schedules
        >>> sc = schedules.cosine(1000)
        >>> round(float(sc.beta[-1]), 6)   # clipped at max_beta
        0.999
    """
    num_steps = _check_num_steps(num_steps)
    if not (s >= 0.0 and math.isfinite(s)):
        raise ValueError(f"s must be a finite offset >= 0; got {s}")
    if not (0.0 < max_beta < 1.0):
        raise ValueError(f"max_beta must lie in the open interval (0, 1); got {max_beta}")
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((t + s) / (1.0 + s) * np.pi / 2.0) ** 2
    alpha_bar = f / f[0]
    betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    return from_betas(betas, dtype=dtype)


def sigmoid(
    num_steps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    low: float = -6.0,
    high: float = 6.0,
    *,
    dtype=None,
) -> Schedule:
    r"""A sigmoid-shaped rise of beta_t from ``beta_start`` to ``beta_end``.

    $$ \beta_t = \beta_{\text{start}} + (\beta_{\text{end}}-\beta_{\text{start}})\,
       \operatorname{sigmoid}\!\Big(\text{low} + \frac{t-1}{T-1}(\text{high}-\text{low})\Big) $$

    (the form used by GeoDiff, Xu et al. 2022): slow at both ends, fastest in the middle.
    ``beta_start`` and ``beta_end`` are asymptotes: with the defaults beta_1 and beta_T lie
    within 0.25% of (beta_end - beta_start) of them (beta_1 = 1.49e-4 for 1e-4 .. 0.02).

    Args:
        num_steps: T >= 1.
        beta_start: the lower asymptote, in (0, 1).
        beta_end: the upper asymptote, in (0, 1).
        low: the sigmoid's argument at t = 1.
        high: the sigmoid's argument at t = T, ``low < high``.
        dtype: float dtype (default float32, float64 under ``jax_enable_x64``).

    Examples:
        >>> from probdiff import schedules
        >>> sc = schedules.sigmoid(1000)
        >>> bool((sc.beta[2:] > sc.beta[1:-1]).all())
        True
    """
    num_steps = _check_num_steps(num_steps)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (0.0 < float(value) < 1.0):
            raise ValueError(f"{name} must lie in the open interval (0, 1); got {value}")
    if not low < high:
        raise ValueError(f"low must be below high; got low = {low}, high = {high}")
    u = np.linspace(low, high, num_steps, dtype=np.float64)
    betas = beta_start + (beta_end - beta_start) / (1.0 + np.exp(-u))
    return from_betas(betas, dtype=dtype)
