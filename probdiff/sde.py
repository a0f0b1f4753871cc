r"""Diffusion SDEs in continuous time (MATH.md E1, E2).

A forward SDE on t in [0, 1],

$$ dx = f(x, t)\,dt + g(t)\,dw, $$

with a linear drift f(x, t) = f(t) x, has Gaussian marginals given x(0) = x_0:
x(t) | x_0 ~ N(m(t) x_0, s(t)^2 I), where the mean factor and the variance solve the moment
equations m' = f m and (s^2)' = 2 f s^2 + g^2 (from the Fokker-Planck equation, E1), with
m(0) = 1, s(0) = 0. Three SDEs from Song et al. (2021):

| SDE | f(t) | g(t)^2 | m(t) | s(t)^2 |
|---|---|---|---|---|
| [VPSDE][probdiff.sde.VPSDE] (DDPM's limit) | -beta(t)/2 | beta(t) | exp(-B(t)/2) | 1 - exp(-B(t)) |
| [SubVPSDE][probdiff.sde.SubVPSDE] | -beta(t)/2 | beta(t) (1 - exp(-2 B(t))) | exp(-B(t)/2) | (1 - exp(-B(t)))^2 |
| [VESDE][probdiff.sde.VESDE] (NCSN's limit) | 0 | d sigma(t)^2 / dt | 1 | sigma(t)^2 - sigma_min^2 |

with beta(t) = beta_min + t (beta_max - beta_min), B(t) = int_0^t beta, and
sigma(t) = sigma_min (sigma_max / sigma_min)^t. ``tests/test_sde.py`` checks each closed form
against the moment equations integrated numerically by scipy.

A discrete schedule becomes a VP SDE through [ScheduleSDE][probdiff.sde.ScheduleSDE], which
passes through alpha_bar_i at t = i / T: the bridge from a trained
[GaussianDiffusion][probdiff.GaussianDiffusion] to the probability-flow ODE.

DDPM is the VP SDE discretised (E2): with beta_i = beta((i - 1)/(T - 1)) / T (DDPM's linear
schedule for T = 1000), the discrete alpha_bar_i = prod_{j <= i} (1 - beta_j) converges to
m(i / T)^2 = exp(-B(i / T)) as T grows, the error in log alpha_bar falling as 1/T (see [VPSDE.discretize][probdiff.sde.VPSDE.discretize]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from probdiff._checks import check_positive, is_concrete
from probdiff.schedules import Schedule, from_betas

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ScheduleSDE"]


def _check_time(t, name="t"):
    """t as a float array; concrete values must lie in [0, 1]."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if is_concrete(t):
        tv = np.asarray(t)
        if np.any(~np.isfinite(tv)) or np.any(tv < 0) or np.any(tv > 1):
            bad = tv[~((tv >= 0) & (tv <= 1))].ravel()[0]
            raise ValueError(f"{name} must lie in [0, 1] (the SDE's time); got {name} = {bad}")
    return t


def _expand(c, x):
    """c of shape batch (or scalar) reshaped to broadcast against x of shape batch + event."""
    c = jnp.asarray(c)
    return jnp.reshape(c, c.shape + (1,) * (jnp.ndim(x) - c.ndim))


class SDE:
    r"""A forward SDE dx = f(t) x dt + g(t) dw on t in [0, 1] with Gaussian marginals.

    Subclasses give ``drift_coef`` f(t), ``diffusion`` g(t), ``mean_coef`` m(t) and
    ``marginal_std`` s(t); the rest follows. ``t`` may be a scalar or one time per example.
    """

    def drift_coef(self, t) -> jax.Array:
        """f(t), the linear drift coefficient: f(x, t) = f(t) x."""
        raise NotImplementedError

    def diffusion(self, t) -> jax.Array:
        """g(t)."""
        raise NotImplementedError

    def mean_coef(self, t) -> jax.Array:
        """m(t): E[x(t) | x_0] = m(t) x_0."""
        raise NotImplementedError

    def marginal_std(self, t) -> jax.Array:
        """s(t): the standard deviation of x(t) | x_0."""
        raise NotImplementedError

    def drift(self, x, t) -> jax.Array:
        """f(x, t) = f(t) x for x of shape ``batch + event`` and t scalar or of shape ``batch``."""
        t = _check_time(t)
        return _expand(self.drift_coef(t), x) * x

    def marginal(self, x_0, t):
        r"""The mean m(t) x_0 and standard deviation s(t) of x(t) | x_0, shaped to broadcast with x_0."""
        t = _check_time(t)
        return _expand(self.mean_coef(t), x_0) * x_0, _expand(self.marginal_std(t), x_0)

    def perturb(self, key, x_0, t):
        """A draw of x(t) | x_0 and the standard normal eps it used: x(t) = m(t) x_0 + s(t) eps."""
        mean, std = self.marginal(x_0, t)
        eps = jax.random.normal(key, jnp.shape(x_0), jnp.result_type(x_0, float))
        return mean + std * eps, eps

    def prior_std(self) -> float:
        """The standard deviation of the prior N(0, prior_std^2 I) that x(1) is close to."""
        return 1.0

    def prior_sample(self, key, shape) -> jax.Array:
        """A draw of the prior, shape ``shape``."""
        return self.prior_std() * jax.random.normal(key, shape)

    def prior_log_prob(self, x, event_ndim: int = 1) -> jax.Array:
        """log N(x; 0, prior_std^2 I), summed over the last ``event_ndim`` axes."""
        s = self.prior_std()
        axes = tuple(range(jnp.ndim(x) - event_ndim, jnp.ndim(x)))
        d = math.prod(jnp.shape(x)[jnp.ndim(x) - event_ndim :])
        return -0.5 * jnp.sum(x**2, axis=axes) / s**2 - 0.5 * d * jnp.log(2 * jnp.pi * s**2)


class VPSDE(SDE):
    r"""The variance-preserving SDE, DDPM's continuous-time limit (MATH.md E2).

    $$ dx = -\tfrac12\beta(t)\,x\,dt + \sqrt{\beta(t)}\,dw,\qquad
       \beta(t) = \beta_{\min} + t(\beta_{\max}-\beta_{\min}), $$

    x(t) | x_0 ~ N(exp(-B(t)/2) x_0, (1 - exp(-B(t))) I), B(t) = beta_min t + (beta_max - beta_min) t^2 / 2.
    The defaults 0.1 and 20 are DDPM's linear schedule (1e-4 to 0.02 over T = 1000) times T.

    Args:
        beta_min: beta(0) > 0.
        beta_max: beta(1) >= beta_min.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = check_positive(beta_min, "beta_min")
        self.beta_max = check_positive(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min = {beta_min}; got {beta_max}")

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"

    def beta(self, t) -> jax.Array:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t) -> jax.Array:
        """B(t) = int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t))

    def mean_coef(self, t):
        return jnp.exp(-0.5 * self.integrated_beta(t))

    def marginal_std(self, t):
        return jnp.sqrt(-jnp.expm1(-self.integrated_beta(t)))

    def discretize(self, num_steps: int, *, dtype=None) -> Schedule:
        r"""DDPM's schedule as a discretisation of this SDE (MATH.md E2): beta_i = beta((i - 1)/(T - 1)) / T.

        x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z is the Euler-Maruyama step of the SDE
        over dt = 1/T to first order (sqrt(1 - beta dt) = 1 - beta dt / 2 + O(dt^2)), and
        log alpha_bar_i = sum_j log(1 - beta_j) = -B(i / T) + O(1 / T). With the defaults and
        T = 1000 this is exactly DDPM's linear schedule, beta_1 = 1e-4 to beta_T = 0.02.

        Args:
            num_steps: T >= 2.
            dtype: the schedule's float dtype.

        Returns:
            a [Schedule][probdiff.schedules.Schedule] with T steps.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 2:
            raise ValueError(f"num_steps must be an int >= 2; got {num_steps!r}")
        t = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
        betas = (self.beta_min + t * (self.beta_max - self.beta_min)) / num_steps
        if betas.max() >= 1:
            raise ValueError(
                f"num_steps = {num_steps} is too small for beta_max = {self.beta_max}: beta_T = "
                f"beta_max / T = {betas.max():.3g} must be < 1"
            )
        return from_betas(betas, dtype=dtype)


class SubVPSDE(VPSDE):
    r"""The sub-VP SDE (Song et al. 2021): VP's drift, a smaller diffusion.

    $$ dx = -\tfrac12\beta(t)\,x\,dt + \sqrt{\beta(t)\,(1-e^{-2B(t)})}\,dw, $$

    x(t) | x_0 ~ N(exp(-B(t)/2) x_0, (1 - exp(-B(t)))^2 I): the variance is at most VP's at
    every t (hence "sub"), and the likelihoods it gives were better in Song et al.'s experiments.
    """

    def __repr__(self) -> str:
        return f"SubVPSDE(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t) * -jnp.expm1(-2.0 * self.integrated_beta(t)))

    def marginal_std(self, t):
        return -jnp.expm1(-self.integrated_beta(t))


class VESDE(SDE):
    r"""The variance-exploding SDE, NCSN's continuous-time limit (MATH.md E2).

    $$ dx = \sqrt{\frac{d\sigma(t)^2}{dt}}\,dw,\qquad \sigma(t) = \sigma_{\min}\Big(\frac{\sigma_{\max}}{\sigma_{\min}}\Big)^t, $$

    so g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)), and x(t) | x_0 ~ N(x_0, (sigma(t)^2 -
    sigma_min^2) I) exactly (Song et al. write sigma(t)^2, taking x(0) to carry sigma_min of noise
    already). The prior is N(0, sigma_max^2 I).

    Args:
        sigma_min: sigma(0) > 0.
        sigma_max: sigma(1) > sigma_min.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = check_positive(sigma_min, "sigma_min")
        self.sigma_max = check_positive(sigma_max, "sigma_max")
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min = {sigma_min}; got {sigma_max}")

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"

    def sigma(self, t) -> jax.Array:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_coef(self, t):
        return jnp.zeros_like(jnp.asarray(t))

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def mean_coef(self, t):
        return jnp.ones_like(jnp.asarray(t))

    def marginal_std(self, t):
        # sigma(t)^2 - sigma_min^2 = sigma_min^2 (exp(2 t log r) - 1), kept accurate near t = 0
        log_r = math.log(self.sigma_max / self.sigma_min)
        return self.sigma_min * jnp.sqrt(jnp.expm1(2.0 * t * log_r))

    def prior_std(self) -> float:
        return self.sigma_max


def _pchip_slopes(h: float, y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson slopes of the monotone cubic Hermite interpolant on a uniform grid of spacing h."""
    delta = np.diff(y) / h
    d = np.zeros_like(y)
    both = (delta[:-1] > 0) & (delta[1:] > 0)
    d[1:-1] = np.where(both, 2.0 / (1.0 / np.where(both, delta[:-1], 1.0) + 1.0 / np.where(both, delta[1:], 1.0)), 0.0)

    def end(d0, d1):  # the three-point end slope, kept shape-preserving
        s = (3.0 * d0 - d1) / 2.0
        if np.sign(s) != np.sign(d0):
            return 0.0
        if np.sign(d0) != np.sign(d1) and abs(s) > abs(3.0 * d0):
            return 3.0 * d0
        return s

    if y.size == 2:
        d[:] = delta[0]
    else:
        d[0] = end(delta[0], delta[1])
        d[-1] = end(delta[-1], delta[-2])
    return d


class ScheduleSDE(VPSDE):
    r"""The VP SDE through a discrete schedule: alpha_bar(i / T) = alpha_bar_i at every step i.

    $$ dx = -\tfrac12\beta(t)\,x\,dt + \sqrt{\beta(t)}\,dw,\qquad
       B(t) = \int_0^t\beta,\quad B(i/T) = -\log\bar\alpha_i,\ i = 0..T, $$

    with B the monotone cubic Hermite (PCHIP, Fritsch-Carlson) interpolant of the points
    (i / T, -log alpha_bar_i), alpha_bar_0 = 1. B is increasing and continuously differentiable,
    so beta(t) = B'(t) >= 0 is continuous and the probability-flow ODE has a continuous vector
    field that an adaptive solver can follow (a piecewise-constant beta would put a jump at each
    of the T knots). This is how a discrete-time model trained at integer t becomes a
    continuous-time one ([score_from_diffusion][probdiff.ode.score_from_diffusion]): the marginal
    x(i / T) | x_0 is exactly the discrete q(x_i | x_0).

    Args:
        schedule: a [Schedule][probdiff.schedules.Schedule] with T >= 1 steps.
    """

    def __init__(self, schedule: Schedule):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a probdiff.schedules.Schedule; got {type(schedule).__name__}")
        T = schedule.num_steps
        neg_log_ab = -np.log(np.asarray(schedule.alpha_bar, np.float64))
        neg_log_ab[0] = 0.0
        self.schedule = schedule
        self.num_steps = T
        self._knots = neg_log_ab
        self._slopes = _pchip_slopes(1.0 / T, neg_log_ab)
        self.beta_min = float(self._slopes[0])
        self.beta_max = float(self._slopes[-1])

    def __repr__(self) -> str:
        return f"ScheduleSDE(T={self.num_steps})"

    def _hermite(self, t):
        T = self.num_steps
        dtype = jnp.result_type(t, float)
        knots = jnp.asarray(self._knots, dtype)
        slopes = jnp.asarray(self._slopes, dtype)
        tau = jnp.asarray(t, dtype) * T
        i = jnp.clip(jnp.floor(tau).astype(jnp.int32), 0, T - 1)
        u = tau - i
        h = 1.0 / T
        y0, y1, d0, d1 = knots[i], knots[i + 1], slopes[i] * h, slopes[i + 1] * h
        value = (2 * u**3 - 3 * u**2 + 1) * y0 + (u**3 - 2 * u**2 + u) * d0 + (-2 * u**3 + 3 * u**2) * y1 + (u**3 - u**2) * d1
        deriv = (6 * u**2 - 6 * u) * y0 + (3 * u**2 - 4 * u + 1) * d0 + (-6 * u**2 + 6 * u) * y1 + (3 * u**2 - 2 * u) * d1
        return value, deriv / h

    def integrated_beta(self, t) -> jax.Array:
        """B(t), the PCHIP interpolant of -log alpha_bar_i at t = i / T."""
        return self._hermite(t)[0]

    def beta(self, t) -> jax.Array:
        """beta(t) = B'(t) >= 0, continuous."""
        return self._hermite(t)[1]

    def alpha_bar(self, t) -> jax.Array:
        """alpha_bar(t) = exp(-B(t)) = m(t)^2; equals the schedule's alpha_bar_i at t = i / T."""
        return jnp.exp(-self.integrated_beta(t))

    def discretize(self, num_steps: int, *, dtype=None) -> Schedule:
        """Not defined: this SDE comes from a discrete schedule (its ``schedule`` attribute)."""
        raise NotImplementedError("a ScheduleSDE is already the continuous form of its .schedule")
