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

The network behind p_theta may predict eps, x_0 or v (``parameterization``, see
[reverse_moments][probdiff.distributions.reverse_moments]), and sigma_t^2 may be fixed or
learned (``variance``, see [reverse_variance][probdiff.distributions.reverse_variance]).

Out-of-range ``t`` raises when ``t`` is concrete; under ``jit`` the coefficients become
NaN instead, so the mistake cannot pass silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
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
    "PARAMETERIZATIONS",
    "ReverseMoments",
    "reverse_moments",
    "learned_log_variance",
    "eps_from_prediction",
    "prediction_target",
]

#: The choices of the reverse-process variance sigma_t^2: fixed at either end of its range
#: (Ho et al. 2020, section 3.2) or learned between them (Nichol & Dhariwal 2021).
VARIANCES = ("beta", "beta_tilde", "learned")

#: What the network predicts: the noise eps, the clean point x_0, or
#: v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022).
PARAMETERIZATIONS = ("eps", "x0", "v")


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

    Entry 0 is 0 and never used. ``"learned"`` has no fixed sigma_t^2 (the network gives it, see
    [learned_log_variance][probdiff.distributions.learned_log_variance]) and raises here.
    """
    check_schedule(schedule)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    if variance == "learned":
        raise ValueError(
            "variance='learned' has no fixed sigma_t^2: the network predicts it; use "
            "probdiff.distributions.reverse_moments or learned_log_variance"
        )
    if variance == "beta":
        return schedule.beta
    return schedule.beta_tilde.at[1].set(schedule.beta[1])


def _check_output(out, x_t, t, what: str):
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != tuple(jnp.shape(x_t)):
        got = f"an object of type {type(out).__name__}" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(
            f"eps_fn must return {what} with the shape of x_t, {tuple(jnp.shape(x_t))}; "
            f"got {got} for t of shape {tuple(jnp.shape(t))}"
        )
    return out


def call_eps(eps_fn: Callable, x_t, t, *, learned_variance: bool = False):
    """Call ``eps_fn(x_t, t)`` and check its output.

    Returns the prediction, an array shaped like ``x_t``; with ``learned_variance=True`` the
    network must return a pair ``(prediction, v)`` of two such arrays, and the pair is returned.
    """
    out = eps_fn(x_t, t)
    if not learned_variance:
        if isinstance(out, tuple):
            raise ValueError(
                "eps_fn returned a tuple, which is the output of a network with a learned variance; "
                "build the diffusion with variance='learned' or return one array"
            )
        return _check_output(out, x_t, t, "an array")
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "with variance='learned', eps_fn must return a pair (prediction, v) of arrays shaped like "
            f"x_t (e.g. MLP(..., learn_variance=True)); got {type(out).__name__}"
        )
    return (_check_output(out[0], x_t, t, "a prediction"), _check_output(out[1], x_t, t, "v"))


def learned_log_variance(schedule: Schedule, t, v, *, event_ndim: int = 1):
    r"""log sigma_t^2 of a learned reverse variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15).

    $$ \log\sigma_t^2 = f\,\log\beta_t + (1-f)\,\log\tilde\beta_t,\qquad f = \frac{v+1}{2}, $$

    an interpolation in the log domain between the two fixed choices, so v = 1 gives beta_t,
    v = -1 gives beta_tilde_t and an untrained network (v = 0) their geometric mean. At t = 1,
    where beta_tilde_1 = 0, beta_tilde_2 stands in for it (as in improved DDPM). v is not
    clipped: values outside [-1, 1] extrapolate.

    Args:
        schedule: the noise schedule.
        t: integer step(s) in 1..T, broadcasting over the batch dims of ``v``.
        v: the network's variance output, shape ``batch + event``.
        event_ndim: number of trailing event dimensions.
    """
    check_schedule(schedule)
    t = check_t(t, schedule.num_steps)
    v = jnp.asarray(v)
    # Entry 0 (no step) is set to 1 so that no log(0) enters the graph.
    log_beta = jnp.log(schedule.beta.at[0].set(1.0))
    lower = schedule.beta_tilde.at[1].set(schedule.beta_tilde[2] if schedule.num_steps >= 2 else schedule.beta[1])
    log_lower = jnp.log(lower.at[0].set(1.0))
    frac = (v + 1.0) / 2.0
    return frac * _coef(log_beta, t, v, event_ndim) + (1.0 - frac) * _coef(log_lower, t, v, event_ndim)


def eps_from_prediction(schedule: Schedule, t, x_t, prediction, parameterization: str = "eps", *, event_ndim: int = 1):
    r"""The noise eps implied by a network's prediction of eps, x_0 or v.

    With x_t = sqrt(alpha_bar_t) x_0 + sqrt(1-alpha_bar_t) eps and
    v = sqrt(alpha_bar_t) eps - sqrt(1-alpha_bar_t) x_0:

    $$ \epsilon = \frac{x_t - \sqrt{\bar\alpha_t}\,\hat x_0}{\sqrt{1-\bar\alpha_t}}\ \ (\texttt{"x0"}),
       \qquad \epsilon = \sqrt{\bar\alpha_t}\,\hat v + \sqrt{1-\bar\alpha_t}\,x_t\ \ (\texttt{"v"}), $$

    and the prediction itself for ``"eps"``. ``t`` in 1..T.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
    if parameterization == "eps":
        return prediction
    ab = _coef(schedule.alpha_bar, t, x_t, event_ndim)
    omab = _coef(schedule.one_minus_alpha_bar, t, x_t, event_ndim)
    if parameterization == "x0":
        return (x_t - jnp.sqrt(ab) * prediction) / jnp.sqrt(omab)
    return jnp.sqrt(ab) * prediction + jnp.sqrt(omab) * x_t


def prediction_target(schedule: Schedule, t, x_0, eps, parameterization: str = "eps", *, event_ndim: int = 1):
    r"""What a network of the given parameterization should output at x_t = sqrt(alpha_bar_t) x_0 + sqrt(1-alpha_bar_t) eps.

    eps for ``"eps"``, x_0 for ``"x0"`` and
    $v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0$ for ``"v"``: the target of
    L_simple = ||target - prediction||^2 in that parameterization.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return jnp.broadcast_to(x_0, jnp.shape(eps))
    ab = _coef(schedule.alpha_bar, t, eps, event_ndim)
    omab = _coef(schedule.one_minus_alpha_bar, t, eps, event_ndim)
    return jnp.sqrt(ab) * eps - jnp.sqrt(omab) * x_0


class ReverseMoments(NamedTuple):
    r"""The mean and variance of p_theta(x_{t-1} | x_t) with what the network said.

    Attributes:
        mean: mu_theta(x_t, t), shape of x_t.
        variance: sigma_t^2, shape of x_t for a learned variance, else broadcastable to it.
        eps: the noise prediction eps_theta(x_t, t) (converted from x_0 or v if need be).
        prediction: the network's raw prediction (eps, x_0 or v), the input of L_simple.
    """

    mean: jax.Array
    variance: jax.Array
    eps: jax.Array
    prediction: jax.Array


def reverse_moments(
    eps_fn: Callable,
    schedule: Schedule,
    t,
    x_t,
    *,
    variance: str = "beta",
    parameterization: str = "eps",
    event_ndim: int = 1,
) -> ReverseMoments:
    r"""Mean and variance of the reverse kernel from one network call (MATH.md C1, C2).

    $$ \mu_\theta(x_t, t) = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}
       \,\epsilon_\theta(x_t, t)\Big), $$

    with eps_theta from the network's prediction by
    [eps_from_prediction][probdiff.distributions.eps_from_prediction], and sigma_t^2 from
    [reverse_variance][probdiff.distributions.reverse_variance] (``"beta"``,
    ``"beta_tilde"``) or from the network's second output by
    [learned_log_variance][probdiff.distributions.learned_log_variance] (``"learned"``).

    Args:
        eps_fn: the network ``eps_fn(x_t, t)``; returns ``(prediction, v)`` when
            ``variance="learned"``.
        schedule: the noise schedule.
        t: integer step(s) in 1..T, broadcasting over the batch dims of ``x_t``.
        x_t: shape ``batch + event``.
        variance: ``"beta"``, ``"beta_tilde"`` or ``"learned"``.
        parameterization: ``"eps"``, ``"x0"`` or ``"v"``.
        event_ndim: number of trailing event dimensions.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff import schedules
        >>> from probdiff.distributions import reverse_moments
        >>> s = schedules.linear(10)
        >>> m = reverse_moments(lambda x, t: (jnp.zeros_like(x), jnp.ones_like(x)), s, 4, jnp.ones(2),
        ...                     variance="learned")
        >>> bool(jnp.allclose(m.variance, s.beta[4]))   # v = 1 gives sigma_t^2 = beta_t
        True
    """
    check_schedule(schedule)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
    x_t = _check_x(x_t, "x_t", event_ndim)
    t = check_t(t, schedule.num_steps)
    learned = variance == "learned"
    out = call_eps(eps_fn, x_t, t, learned_variance=learned)
    prediction, v = out if learned else (out, None)
    eps = eps_from_prediction(schedule, t, x_t, prediction, parameterization, event_ndim=event_ndim)
    mean = mu_from_eps(schedule, t, x_t, eps, event_ndim=event_ndim)
    if learned:
        var = jnp.exp(learned_log_variance(schedule, t, v, event_ndim=event_ndim)).astype(x_t.dtype)
    else:
        var = _coef(reverse_variance(schedule, variance), t, x_t, event_ndim)
    return ReverseMoments(mean, var, eps, prediction)


def p_step(
    eps_fn: Callable,
    schedule: Schedule,
    t,
    x_t,
    *,
    variance: str = "beta",
    parameterization: str = "eps",
    event_ndim: int = 1,
) -> dist.Distribution:
    r"""The learned reverse kernel p_theta(x_{t-1} | x_t) from an eps-function (MATH.md C1, C2).

    $$ p_\theta(x_{t-1}\mid x_t) = \mathcal{N}\big(x_{t-1};\ \mu_\theta(x_t,t),\ \sigma_t^2 I\big),
       \qquad \mu_\theta = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}
       \,\epsilon_\theta(x_t, t)\Big), $$

    with sigma_t^2 fixed by [reverse_variance][probdiff.distributions.reverse_variance] or
    learned (see [reverse_moments][probdiff.distributions.reverse_moments]). At t = 1 this is
    the decoder p_theta(x_0 | x_1).

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps`` with the shape of ``x_t``; ``t`` an integer array
            that broadcasts over the batch dims of ``x_t``. It predicts x_0 or v instead with
            ``parameterization``, and returns ``(prediction, v)`` with ``variance="learned"``.
        schedule: the noise schedule.
        t: integer step(s) in 1..T.
        x_t: shape ``batch + event``.
        variance: ``"beta"``, ``"beta_tilde"`` or ``"learned"``.
        parameterization: ``"eps"``, ``"x0"`` or ``"v"``.
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
    m = reverse_moments(
        eps_fn, schedule, t, x_t, variance=variance, parameterization=parameterization, event_ndim=event_ndim
    )
    return _normal(m.mean, jnp.sqrt(m.variance), event_ndim)
