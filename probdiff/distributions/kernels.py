r"""One-step conditionals of the forward and reverse processes, as NumPyro distributions.

Each function returns a diagonal Gaussian ``Normal(loc, scale).to_event(event_ndim)``, so
the result samples, scores, and takes part in ``numpyro.distributions.kl.kl_divergence``
like any NumPyro distribution. ``t`` is an integer array in 1..T (0 is not a step) that
broadcasts against the batch dimensions of ``x`` (everything left of the last
``event_ndim`` axes): a scalar, or one t per example.

| function | distribution | MATH.md |
|---|---|---|
| [q_step][probdiff.distributions.q_step] | q(x_t \| x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I) | A1 |
| [q_marginal][probdiff.distributions.q_marginal] | q(x_t \| x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) | A2 |
| [q_posterior][probdiff.distributions.q_posterior] | q(x_{t-1} \| x_t, x_0) = N(mu_tilde_t, beta_tilde_t I) | A4 |
| [p_step][probdiff.distributions.p_step] | p_theta(x_{t-1} \| x_t) = N(mu_theta(x_t, t), sigma_t^2 I) | C1, C2 |

Out-of-range ``t`` raises when ``t`` is concrete; under ``jit`` the coefficients become
NaN instead, so the mistake cannot pass silently.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpyro.distributions as dist

from probdiff._checks import check_t, take_t
from probdiff.schedules import Schedule

__all__ = [
    "VARIANCES",
    "q_step",
    "q_marginal",
    "q_posterior",
    "p_step",
    "posterior_mean",
    "mu_from_eps",
    "x0_from_eps",
    "reverse_variance",
    "call_eps",
    "check_schedule",
]

#: The choices of the reverse-process variance sigma_t^2 (Ho et al. 2020, section 3.2).
VARIANCES = ("beta", "beta_tilde")


def _coef(array, t, x, event_ndim: int, low: int = 1):
    """``array[t]`` shaped to broadcast against ``x`` (t over the batch dims of x)."""
    c = take_t(array, jnp.asarray(t), low=low)
    c = jnp.reshape(c, c.shape + (1,) * event_ndim)
    return c.astype(jnp.result_type(x))


def _normal(loc, scale, event_ndim: int) -> dist.Distribution:
    loc, scale = jnp.broadcast_arrays(loc, scale)
    return dist.Normal(loc, scale).to_event(event_ndim)


def check_schedule(schedule):
    """Raise a TypeError unless ``schedule`` is a :class:`probdiff.schedules.Schedule`."""
    if not isinstance(schedule, Schedule):
        raise TypeError(
            "schedule must be a probdiff.schedules.Schedule (from schedules.linear, cosine, sigmoid "
            f"or from_betas); got {type(schedule).__name__}"
        )
    return schedule


def _check_x(x, name: str, event_ndim: int):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
    if x.ndim < event_ndim:
        raise ValueError(
            f"{name} must have at least event_ndim = {event_ndim} dimensions; got shape {x.shape}"
        )
    return x


def q_step(schedule: Schedule, t, x_tm1, *, event_ndim: int = 1) -> dist.Distribution:
    r"""The forward Markov kernel q(x_t | x_{t-1}) (MATH.md A1).

    $$ q(x_t \mid x_{t-1}) = \mathcal{N}\big(x_t;\ \sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\big) $$

    Checked in ``tests/test_kernels.py`` (composition of T kernels equals
    [q_marginal][probdiff.distributions.q_marginal]).

    Args:
        schedule: the noise schedule.
        t: integer step(s) in 1..T, broadcasting over the batch dims of ``x_tm1``.
        x_tm1: x_{t-1}, shape ``batch + event``.
        event_ndim: number of trailing event dimensions of ``x_tm1``.

    Returns:
        A diagonal ``Normal`` over x_t with ``event_ndim`` event dimensions.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff import schedules
        >>> from probdiff.distributions import q_step
        >>> d = q_step(schedules.linear(10), 3, jnp.ones(2))
        >>> d.event_shape
        (2,)
    """
    check_schedule(schedule)
    x_tm1 = _check_x(x_tm1, "x_tm1", event_ndim)
    t = check_t(t, schedule.num_steps)
    loc = jnp.sqrt(_coef(schedule.alpha, t, x_tm1, event_ndim)) * x_tm1
    scale = jnp.sqrt(_coef(schedule.beta, t, x_tm1, event_ndim))
    return _normal(loc, scale, event_ndim)


def q_marginal(schedule: Schedule, t, x_0, *, event_ndim: int = 1) -> dist.Distribution:
    r"""The forward marginal q(x_t | x_0) ("Statement 1", MATH.md A2).

    $$ q(x_t \mid x_0) = \mathcal{N}\big(x_t;\ \sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I\big),
       \qquad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon . $$

    One-shot sampling at any t; checked against T composed kernels in ``tests/test_kernels.py``.

    Args:
        schedule: the noise schedule.
        t: integer step(s) in 1..T, broadcasting over the batch dims of ``x_0``.
        x_0: clean data, shape ``batch + event``.
        event_ndim: number of trailing event dimensions of ``x_0``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff import schedules
        >>> from probdiff.distributions import q_marginal
        >>> s = schedules.linear(1000)
        >>> d = q_marginal(s, 1000, jnp.zeros(2))
        >>> [round(float(v), 4) for v in d.variance]   # 1 - alpha_bar_T
        [1.0, 1.0]
    """
    check_schedule(schedule)
    x_0 = _check_x(x_0, "x_0", event_ndim)
    t = check_t(t, schedule.num_steps)
    loc = jnp.sqrt(_coef(schedule.alpha_bar, t, x_0, event_ndim)) * x_0
    scale = jnp.sqrt(_coef(schedule.one_minus_alpha_bar, t, x_0, event_ndim))
    return _normal(loc, scale, event_ndim)


def posterior_mean(schedule: Schedule, t, x_t, x_0, *, event_ndim: int = 1):
    r"""mu_tilde_t(x_t, x_0), the mean of q(x_{t-1} | x_t, x_0) (MATH.md A4).

    $$ \tilde\mu_t = \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\,x_t
       + \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}\,x_0 $$

    (``004_*`` of the notes prints sqrt(alpha_bar_t) in the first coefficient; sqrt(alpha_t)
    is right, as Bayes' rule on a grid confirms in ``tests/test_kernels.py``.)
    """
    check_schedule(schedule)
    x_t = _check_x(x_t, "x_t", event_ndim)
    x_0 = _check_x(x_0, "x_0", event_ndim)
    t = check_t(t, schedule.num_steps)
    omab_t = _coef(schedule.one_minus_alpha_bar, t, x_t, event_ndim)
    omab_tm1 = _coef(schedule.one_minus_alpha_bar, t - 1, x_t, event_ndim, low=0)
    c_t = jnp.sqrt(_coef(schedule.alpha, t, x_t, event_ndim)) * omab_tm1 / omab_t
    c_0 = jnp.sqrt(_coef(schedule.alpha_bar, t - 1, x_t, event_ndim, low=0)) * _coef(
        schedule.beta, t, x_t, event_ndim
    ) / omab_t
    return c_t * x_t + c_0 * x_0


def q_posterior(schedule: Schedule, t, x_t, x_0, *, event_ndim: int = 1) -> dist.Distribution:
    r"""The forward posterior q(x_{t-1} | x_t, x_0) (MATH.md A4).

    $$ q(x_{t-1}\mid x_t, x_0) = \mathcal{N}\big(x_{t-1};\ \tilde\mu_t(x_t, x_0),\ \tilde\beta_t I\big),
       \qquad \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\,\beta_t , $$

    with mu_tilde_t from [posterior_mean][probdiff.distributions.posterior_mean].
    Checked against Gaussian conditioning of the joint q(x_{t-1}, x_t | x_0) and Bayes'
    rule on a grid in ``tests/test_kernels.py``.

    Valid for t in 2..T. At t = 1, beta_tilde_1 = 0 and the posterior is the point mass at
    x_0, which has no density; asking for it raises.

    Args:
        schedule: the noise schedule.
        t: integer step(s) in 2..T, broadcasting over the batch dims of ``x_t``.
        x_t: the noised point x_t, shape ``batch + event``.
        x_0: clean data, shape ``batch + event`` (broadcasts against ``x_t``).
        event_ndim: number of trailing event dimensions.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff import schedules
        >>> from probdiff.distributions import q_posterior
        >>> s = schedules.from_betas([0.5, 0.5])
        >>> d = q_posterior(s, 2, jnp.zeros(1), jnp.ones(1))
        >>> round(float(d.mean[0]), 5), round(float(d.variance[0]), 5)  # sqrt(.5)*.5/.75, .5*.5/.75
        (0.4714, 0.33333)
    """
    t = check_t(t, schedule.num_steps, low=2)
    loc = posterior_mean(schedule, t, x_t, x_0, event_ndim=event_ndim)
    beta_tilde = jnp.where(jnp.asarray(t) >= 2, take_t(schedule.beta_tilde, t), jnp.nan)
    scale = jnp.sqrt(jnp.reshape(beta_tilde, beta_tilde.shape + (1,) * event_ndim)).astype(loc.dtype)
    return _normal(loc, scale, event_ndim)


def mu_from_eps(schedule: Schedule, t, x_t, eps, *, event_ndim: int = 1):
    r"""The mean implied by a noise prediction (MATH.md C2).

    $$ \mu = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\epsilon\Big) $$

    With the true eps of x_t = sqrt(alpha_bar_t) x_0 + sqrt(1-alpha_bar_t) eps this is exactly
    mu_tilde_t(x_t, x_0); with eps_theta(x_t, t) it is mu_theta(x_t, t). ``t`` in 1..T.
    """
    check_schedule(schedule)
    x_t = _check_x(x_t, "x_t", event_ndim)
    t = check_t(t, schedule.num_steps)
    beta = _coef(schedule.beta, t, x_t, event_ndim)
    omab = _coef(schedule.one_minus_alpha_bar, t, x_t, event_ndim)
    alpha = _coef(schedule.alpha, t, x_t, event_ndim)
    return (x_t - beta / jnp.sqrt(omab) * eps) / jnp.sqrt(alpha)


def x0_from_eps(schedule: Schedule, t, x_t, eps, *, event_ndim: int = 1):
    r"""The clean point implied by a noise prediction, inverting q(x_t | x_0).

    $$ \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\epsilon}{\sqrt{\bar\alpha_t}} $$

    ``t`` in 1..T.
    """
    check_schedule(schedule)
    x_t = _check_x(x_t, "x_t", event_ndim)
    t = check_t(t, schedule.num_steps)
    ab = _coef(schedule.alpha_bar, t, x_t, event_ndim)
    omab = _coef(schedule.one_minus_alpha_bar, t, x_t, event_ndim)
    return (x_t - jnp.sqrt(omab) * eps) / jnp.sqrt(ab)


def reverse_variance(schedule: Schedule, variance: str = "beta"):
    r"""sigma_t^2 of the reverse kernel, as a length-(T+1) array indexed by t.

    * ``"beta"``: sigma_t^2 = beta_t (the upper bound on the reverse variance, optimal for
      x_0 ~ N(0, I));
    * ``"beta_tilde"``: sigma_t^2 = beta_tilde_t for t >= 2 (optimal for x_0 a point mass),
      and sigma_1^2 = beta_1 for the decoder p(x_0 | x_1), because beta_tilde_1 = 0 would give
      the decoder no density.

    Entry 0 is 0 and never used.
    """
    check_schedule(schedule)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    if variance == "beta":
        return schedule.beta
    return schedule.beta_tilde.at[1].set(schedule.beta[1])


def call_eps(eps_fn: Callable, x_t, t):
    """Call ``eps_fn(x_t, t)`` and check that it returns an array shaped like ``x_t``."""
    eps = eps_fn(x_t, t)
    shape = getattr(eps, "shape", None)
    if shape is None or tuple(shape) != tuple(jnp.shape(x_t)):
        got = f"an object of type {type(eps).__name__}" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(
            f"eps_fn must return an array eps with the shape of x_t, {tuple(jnp.shape(x_t))}; "
            f"got {got} for t of shape {tuple(jnp.shape(t))}"
        )
    return eps


def p_step(
    eps_fn: Callable,
    schedule: Schedule,
    t,
    x_t,
    *,
    variance: str = "beta",
    event_ndim: int = 1,
) -> dist.Distribution:
    r"""The learned reverse kernel p_theta(x_{t-1} | x_t) from an eps-function (MATH.md C1, C2).

    $$ p_\theta(x_{t-1}\mid x_t) = \mathcal{N}\big(x_{t-1};\ \mu_\theta(x_t,t),\ \sigma_t^2 I\big),
       \qquad \mu_\theta = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}
       \,\epsilon_\theta(x_t, t)\Big), $$

    with sigma_t^2 from [reverse_variance][probdiff.distributions.reverse_variance]. At t = 1
    this is the decoder p_theta(x_0 | x_1).

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps`` with the shape of ``x_t``; ``t`` an integer array
            that broadcasts over the batch dims of ``x_t``.
        schedule: the noise schedule.
        t: integer step(s) in 1..T.
        x_t: shape ``batch + event``.
        variance: ``"beta"`` or ``"beta_tilde"``.
        event_ndim: number of trailing event dimensions.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff import schedules
        >>> from probdiff.distributions import p_step
        >>> s = schedules.linear(100)
        >>> d = p_step(lambda x, t: jnp.zeros_like(x), s, 100, jnp.ones(2))
        >>> d.event_shape
        (2,)
    """
    check_schedule(schedule)
    x_t = _check_x(x_t, "x_t", event_ndim)
    t = check_t(t, schedule.num_steps)
    sigma2 = reverse_variance(schedule, variance)
    eps = call_eps(eps_fn, x_t, t)
    loc = mu_from_eps(schedule, t, x_t, eps, event_ndim=event_ndim)
    scale = jnp.sqrt(_coef(sigma2, t, x_t, event_ndim))
    return _normal(loc, scale, event_ndim)
