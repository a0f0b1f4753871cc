r"""Samplers for diffusion and score models: pure ``(init, step)`` pairs run by ``lax.scan``.

Every sampler here is a [Sampler][probdiff.samplers.Sampler]: ``prior(key, shape)`` draws the
starting point, ``step(state, i)`` takes step ``i = 0 .. num_steps - 1`` and returns the new
state and the new x, and [run][probdiff.samplers.run] drives the steps with ``lax.scan``
(optionally keeping the trajectory). They are plain functions of arrays, so ``jit``, ``vmap``
and ``grad`` go through them.

The model enters as an eps-network ``eps_fn(x_t, t)`` or as a score function; the two are the
same thing up to a scale (MATH.md D3): for q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0,
(1 - alpha_bar_t) I),

$$ \nabla_{x_t}\log q(x_t\mid x_0) = -\frac{x_t-\sqrt{\bar\alpha_t}\,x_0}{1-\bar\alpha_t}
   = -\frac{\epsilon}{\sqrt{1-\bar\alpha_t}},\qquad
   s_\theta(x_t, t) = -\frac{\epsilon_\theta(x_t,t)}{\sqrt{1-\bar\alpha_t}} $$

([score_from_eps][probdiff.score.score_from_eps], [eps_from_score][probdiff.score.eps_from_score]).

* [annealed_langevin][probdiff.samplers.annealed_langevin]: NCSN's annealed Langevin dynamics
  over a noise ladder sigma_1 < ... < sigma_L (MATH.md D4).
* [ancestral][probdiff.samplers.ancestral]: DDPM's Algorithm 2 (MATH.md C4).
* [predictor_corrector][probdiff.samplers.predictor_corrector]: an ancestral or
  reverse-diffusion predictor followed by Langevin corrector steps (Song et al. 2021).
* [ddim][probdiff.samplers.ddim]: DDIM with eta in [0, 1] on respaced timesteps (Song, Meng &
  Ermon 2021); eta = 0 is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from probdiff._checks import check_ladder, check_positive
from probdiff.distributions.kernels import (
    VARIANCES,
    call_eps,
    check_schedule,
    eps_from_prediction,
    reverse_moments,
)
from probdiff.schedules import Schedule
from probdiff.score import _coef_t, check_score_output, eps_from_score

__all__ = [
    "Sampler",
    "SamplerState",
    "SampleTrajectory",
    "run",
    "annealed_langevin",
    "ancestral",
    "predictor_corrector",
    "ddim",
    "respace",
    "PREDICTORS",
]

#: The predictors of [predictor_corrector][probdiff.samplers.predictor_corrector].
PREDICTORS = ("ancestral", "reverse_diffusion", "none")


class SamplerState(NamedTuple):
    """The carry of a sampler's ``lax.scan``: the current x and a key."""

    x: jax.Array
    rng_key: jax.Array


class SampleTrajectory(NamedTuple):
    """What [run][probdiff.samplers.run] returns with ``return_trajectory=True``.

    Attributes:
        x: the final sample, shape ``shape``.
        trajectory: the starting point and the x after every step, shape
            ``(num_steps + 1,) + shape``.
    """

    x: jax.Array
    trajectory: jax.Array


class Sampler(NamedTuple):
    """A sampler as pure functions.

    Attributes:
        prior: ``prior(key, shape) -> x`` draws the starting point (e.g. x_T ~ N(0, I)).
        step: ``step(state, i) -> (state, x)`` takes step ``i`` in ``0 .. num_steps - 1``.
        num_steps: how many steps [run][probdiff.samplers.run] takes.
    """

    prior: Callable
    step: Callable
    num_steps: int


def run(sampler: Sampler, rng_key, shape, *, x_init=None, return_trajectory: bool = False):
    """Run a [Sampler][probdiff.samplers.Sampler] with ``lax.scan``.

    Args:
        sampler: the sampler.
        rng_key: a JAX PRNG key.
        shape: the shape of the batch of samples, e.g. ``(1000, 2)`` or ``(64, 8, 8, 1)``.
        x_init: start here instead of a draw from ``sampler.prior`` (shape ``shape``).
        return_trajectory: also return x after every step (memory grows with ``num_steps``).

    Returns:
        the samples, or a [SampleTrajectory][probdiff.samplers.SampleTrajectory].
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a probdiff.samplers.Sampler; got {type(sampler).__name__}")
    shape = tuple(int(n) for n in shape)
    key_prior, key_steps = jax.random.split(rng_key)
    if x_init is None:
        x = sampler.prior(key_prior, shape)
    else:
        x = jnp.asarray(x_init)
        if x.shape != shape:
            raise ValueError(f"x_init must have shape {shape}; got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x_init must be a floating-point array; got dtype {x.dtype}")

    def body(state, i):
        state, x = sampler.step(state, i)
        return state, (x if return_trajectory else None)

    state, ys = jax.lax.scan(body, SamplerState(x, key_steps), jnp.arange(sampler.num_steps))
    if return_trajectory:
        return SampleTrajectory(state.x, jnp.concatenate([x[None], ys], axis=0))
    return state.x


def _model_fns(source, eps_fn, score_fn, who):
    """(schedule, eps_fn, diffusion or None) from a Schedule + a function, or a GaussianDiffusion."""
    from probdiff.diffusion import GaussianDiffusion

    if isinstance(source, GaussianDiffusion):
        if eps_fn is not None or score_fn is not None:
            raise ValueError(f"{who}: a GaussianDiffusion brings its own network; do not pass eps_fn or score_fn")
        d = source
        learned = d.variance_kind == "learned"

        def eps_d(x_t, t):
            pred = call_eps(d.eps_fn, x_t, t, learned_variance=learned)
            pred = pred[0] if learned else pred
            tb = jnp.broadcast_to(jnp.asarray(t), x_t.shape[: x_t.ndim - d.event_ndim])
            return eps_from_prediction(d.schedule, tb, x_t, pred, d.parameterization, event_ndim=d.event_ndim)

        return d.schedule, eps_d, d
    if not isinstance(source, Schedule):
        raise TypeError(f"{who}: the first argument must be a Schedule or a GaussianDiffusion; got {type(source).__name__}")
    check_schedule(source)
    if (eps_fn is None) == (score_fn is None):
        raise ValueError(f"{who}: give exactly one of eps_fn= and score_fn=")
    if eps_fn is not None:
        if not callable(eps_fn):
            raise TypeError(f"eps_fn must be callable; got {type(eps_fn).__name__}")
        return source, (lambda x, t: call_eps(eps_fn, x, t)), None
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable; got {type(score_fn).__name__}")
    return source, eps_from_score(score_fn, source), None


def _normal_prior(scale=1.0):
    def prior(key, shape):
        return scale * jax.random.normal(key, shape)

    return prior


# ----------------------------------------------------------------------------- annealed Langevin
def _check_count(value, name, low=1):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def annealed_langevin(
    score_fn: Callable,
    sigmas,
    *,
    step_size: float = 2e-5,
    steps_per_level: int = 100,
    denoise: bool = False,
) -> Sampler:
    r"""Annealed Langevin dynamics (NCSN, Song & Ermon 2019, Algorithm 1; MATH.md D4).

    Start from x ~ N(0, sigma_L^2 I) and, for the levels i = L, ..., 1 in turn, take
    ``steps_per_level`` Langevin steps on the score of the data noised at sigma_i,

    $$ x \leftarrow x + \frac{\alpha_i}{2}\,s(x,\sigma_i) + \sqrt{\alpha_i}\,z,\qquad
       \alpha_i = \epsilon\,\frac{\sigma_i^2}{\sigma_1^2},\quad z\sim\mathcal N(0, I), $$

    with epsilon = ``step_size``: the step shrinks with the noise so that the signal-to-noise
    ratio of a step is the same at every level. Measured in units of each level's variance,
    the Langevin time spent per level is ``steps_per_level`` x epsilon / sigma_1^2, the same at
    every level, so **choose epsilon in proportion to sigma_1^2**: epsilon / sigma_1^2 of 0.2-0.5
    with 100 steps per level sampled 2-D mixtures well here (5e-5 at sigma_1 = 0.01, 1e-3 at
    sigma_1 = 0.05); 25 times less time per level left the mode weights wrong even with the
    exact score. Large sigma mixes between modes, small sigma
    refines; plain Langevin on sigma_1 alone gets stuck in modes and gets their weights wrong.

    Args:
        score_fn: ``score_fn(x, sigma) -> s``, the score of the data convolved with
            N(0, sigma^2 I), shaped like ``x``; ``sigma`` is a scalar array.
        sigmas: the noise ladder sigma_1 < sigma_2 < ... < sigma_L, positive and strictly increasing.
        step_size: epsilon > 0, the step at the smallest level.
        steps_per_level: Langevin steps per level (T in the paper).
        denoise: end with one Tweedie step x + sigma_1^2 s(x, sigma_1) (the posterior mean of the
            clean x given the noisy one; Song & Ermon 2020), which removes the last sigma_1 noise.

    Returns:
        a [Sampler][probdiff.samplers.Sampler] with ``L * steps_per_level`` steps (plus one
        with ``denoise``).

    Examples:
        Data N(0, 1) noised at sigma is N(0, 1 + sigma^2), with score -x / (1 + sigma^2):

        >>> import jax, jax.numpy as jnp
        >>> from probdiff import samplers
        >>> sampler = samplers.annealed_langevin(lambda x, sigma: -x / (1 + sigma**2),
        ...                                      jnp.array([0.1, 0.5, 2.0]), step_size=0.02,
        ...                                      steps_per_level=300)
        >>> x = samplers.run(sampler, jax.random.key(0), (4000, 1))
        >>> bool(abs(float(jnp.var(x)) - 1.01) < 0.1)   # N(0, 1 + sigma_1^2), SE 0.02
        True
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable score_fn(x, sigma); got {type(score_fn).__name__}")
    sigmas = check_ladder(sigmas)
    eps = check_positive(step_size, "step_size")
    n = _check_count(steps_per_level, "steps_per_level")
    num_levels = sigmas.shape[0]
    num_langevin = num_levels * n

    def step(state, i):
        key, key_z = jax.random.split(state.rng_key)
        x = state.x
        level = jnp.clip(num_levels - 1 - i // n, 0, num_levels - 1)  # from sigma_L down to sigma_1
        sigma = sigmas[level].astype(x.dtype)
        s = check_score_output(score_fn(x, sigma), x)
        if denoise:
            is_final = i >= num_langevin
            alpha = jnp.where(is_final, 0.0, eps * (sigma / sigmas[0]) ** 2).astype(x.dtype)
            z = jax.random.normal(key_z, x.shape, x.dtype)
            langevin = x + 0.5 * alpha * s + jnp.sqrt(alpha) * z
            x_new = jnp.where(is_final, x + sigma**2 * s, langevin)
        else:
            alpha = (eps * (sigma / sigmas[0]) ** 2).astype(x.dtype)
            z = jax.random.normal(key_z, x.shape, x.dtype)
            x_new = x + 0.5 * alpha * s + jnp.sqrt(alpha) * z
        return SamplerState(x_new, key), x_new

    def prior(key, shape):
        return sigmas[-1] * jax.random.normal(key, shape, sigmas.dtype)

    return Sampler(prior, step, num_langevin + (1 if denoise else 0))


# ----------------------------------------------------------------------------- DDPM family
def _reverse_stats(schedule, eps_fn, diffusion, variance, event_ndim, t, x):
    """mu_theta(x_t, t), sigma_t^2 and the score s_theta(x_t, t), from one network call."""
    if diffusion is not None:
        m = diffusion._moments(t, x)
    else:
        m = reverse_moments(eps_fn, schedule, t, x, variance=variance, event_ndim=event_ndim)
    score = -m.eps / jnp.sqrt(_coef_t(schedule.one_minus_alpha_bar, t, x))
    return m.mean, m.variance, score


def ancestral(
    source,
    *,
    eps_fn: Callable | None = None,
    score_fn: Callable | None = None,
    variance: str = "beta",
    event_ndim: int = 1,
) -> Sampler:
    r"""DDPM ancestral sampling, Algorithm 2 of Ho et al. (MATH.md C4).

    $$ x_T\sim\mathcal N(0,I);\quad x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}
       \epsilon_\theta(x_t,t)\Big) + \sigma_t z,\quad z=0 \text{ at } t=1. $$

    The same as ``GaussianDiffusion.sample`` but as a [Sampler][probdiff.samplers.Sampler]
    (the predictor-corrector sampler with no corrector).

    Args:
        source: a [Schedule][probdiff.schedules.Schedule] (then give ``eps_fn`` or ``score_fn(x_t, t)``)
            or a [GaussianDiffusion][probdiff.GaussianDiffusion] (its network, parameterisation and
            variance).
        eps_fn: ``eps_fn(x_t, t)`` with integer t in 1..T.
        score_fn: ``score_fn(x_t, t)``, the score of q(x_t), used as eps = -sqrt(1-alpha_bar_t) s.
        variance: sigma_t^2, ``"beta"`` or ``"beta_tilde"`` (with a Schedule).
        event_ndim: with a Schedule, how many trailing axes of x make one example.
    """
    return predictor_corrector(
        source, eps_fn=eps_fn, score_fn=score_fn, predictor="ancestral", corrector_steps=0,
        variance=variance, event_ndim=event_ndim,
    )


def predictor_corrector(
    source,
    *,
    eps_fn: Callable | None = None,
    score_fn: Callable | None = None,
    predictor: str = "ancestral",
    corrector_steps: int = 1,
    snr: float = 0.16,
    variance: str = "beta",
    event_ndim: int = 1,
) -> Sampler:
    r"""A predictor-corrector sampler on DDPM's timeline t = T, ..., 1 (Song et al. 2021, Algorithm 1-3).

    At every t, from x_t: ``corrector_steps`` Langevin steps on the score s = s_theta(x, t)
    of q(x_t), with the step size set from a target signal-to-noise ratio r = ``snr``,

    $$ x \leftarrow x + \epsilon\,s + \sqrt{2\epsilon}\,z,\qquad
       \epsilon = 2\,\alpha_t\Big(\frac{r\,\lVert z\rVert}{\lVert s\rVert}\Big)^2 $$

    (the norms of z and s per example, averaged over the batch as in Song et al.'s code; this is
    x + eta/2 s + sqrt(eta) z with eta = 2 epsilon), then a
    predictor step to x_{t-1}:

    * ``"ancestral"``: x_{t-1} = mu_theta(x_t, t) + sigma_t z (Algorithm 2 of DDPM, C4);
    * ``"reverse_diffusion"``: the reverse SDE of the discretised VP SDE
      x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z,
      x_{t-1} = (2 - sqrt(alpha_t)) x_t + beta_t s + sqrt(beta_t) z;
    * ``"none"``: only correct (x_{t-1} = x_t), corrector-only sampling.

    The last predictor step (t = 1) adds no noise.

    Args:
        source: a Schedule (with ``eps_fn`` or ``score_fn(x_t, t)``) or a GaussianDiffusion.
        eps_fn: ``eps_fn(x_t, t)``, integer t in 1..T broadcasting over the batch.
        score_fn: ``score_fn(x_t, t)``.
        predictor: one of ``"ancestral"``, ``"reverse_diffusion"``, ``"none"``.
        corrector_steps: Langevin steps per t (0: predictor only).
        snr: r > 0, the corrector's signal-to-noise ratio (0.16 in Song et al. for VP models).
        variance: sigma_t^2 of the ancestral predictor with a Schedule, ``"beta"`` or ``"beta_tilde"``.
        event_ndim: with a Schedule, how many trailing axes of x make one example (1 for
            vectors, 3 for images); a GaussianDiffusion knows its own.

    Returns:
        a [Sampler][probdiff.samplers.Sampler] with T steps, each one t.
    """
    schedule, eps_m, diffusion = _model_fns(source, eps_fn, score_fn, "predictor_corrector")
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}; got {predictor!r}")
    if variance not in VARIANCES or variance == "learned":
        raise ValueError(f"variance must be 'beta' or 'beta_tilde'; got {variance!r}")
    n_corr = _check_count(corrector_steps, "corrector_steps", low=0)
    r = check_positive(snr, "snr")
    if predictor == "none" and n_corr == 0:
        raise ValueError("predictor='none' with corrector_steps=0 would not move x; give corrector_steps >= 1")
    T = schedule.num_steps
    nd = diffusion.event_ndim if diffusion is not None else _check_count(event_ndim, "event_ndim")

    def per_example_norm(a):
        axes = tuple(range(a.ndim - nd, a.ndim))
        return jnp.sqrt(jnp.sum(a**2, axis=axes, keepdims=True))

    def step(state, i):
        t = T - i
        key = state.rng_key
        x = state.x

        def correct(carry, _):
            x, key = carry
            key, key_z = jax.random.split(key)
            _, _, s = _reverse_stats(schedule, eps_m, diffusion, variance, nd, t, x)
            z = jax.random.normal(key_z, x.shape, x.dtype)
            alpha_t = schedule.alpha[t].astype(x.dtype)
            # Song et al.'s step: the norms averaged over the batch (per example, a score near 0
            # at a mode would give a huge step in low dimension)
            ratio = r * jnp.mean(per_example_norm(z)) / jnp.maximum(jnp.mean(per_example_norm(s)), jnp.finfo(x.dtype).tiny)
            e = 2.0 * alpha_t * ratio**2
            return (x + e * s + jnp.sqrt(2.0 * e) * z, key), None

        if n_corr > 0:
            (x, key), _ = jax.lax.scan(correct, (x, key), None, length=n_corr)
        key, key_z = jax.random.split(key)
        if predictor == "none":
            x_new = x
        else:
            z = jax.random.normal(key_z, x.shape, x.dtype)
            z = jnp.where(t == 1, 0.0, z).astype(x.dtype)
            mean, var, s = _reverse_stats(schedule, eps_m, diffusion, variance, nd, t, x)
            if predictor == "ancestral":
                x_new = mean + jnp.sqrt(var) * z
            else:
                beta = schedule.beta[t].astype(x.dtype)
                x_new = (2.0 - jnp.sqrt(1.0 - beta)) * x + beta * s + jnp.sqrt(beta) * z
        x_new = x_new.astype(x.dtype)
        return SamplerState(x_new, key), x_new

    return Sampler(_normal_prior(), step, T)


def respace(num_steps_total: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps tau_1 < ... < tau_S in 1..T for DDIM, with tau_S = T.

    Args:
        num_steps_total: T.
        num_steps: S, 1 <= S <= T.

    Returns:
        an int numpy array of S distinct increasing timesteps, ``round(linspace(T/S, T, S))``.
    """
    T = _check_count(num_steps_total, "num_steps_total")
    S = _check_count(num_steps, "num_steps")
    if S > T:
        raise ValueError(f"num_steps must be at most T = {T}; got {S}")
    taus = np.round(np.linspace(T / S, T, S)).astype(np.int64)
    return taus


def ddim(
    source,
    *,
    eps_fn: Callable | None = None,
    score_fn: Callable | None = None,
    num_steps: int = 50,
    eta: float = 0.0,
    timesteps=None,
    clip_x0: tuple[float, float] | None = None,
) -> Sampler:
    r"""DDIM sampling on respaced timesteps (Song, Meng & Ermon 2021, eq. 12 and 16).

    With timesteps tau_S > ... > tau_1 (alpha_bar at tau_0 = 0 is 1), from x at tau_i to
    tau_{i-1}, writing a = alpha_bar_{tau_i}, a' = alpha_bar_{tau_{i-1}}:

    $$ \hat x_0 = \frac{x - \sqrt{1-a}\,\epsilon_\theta(x, \tau_i)}{\sqrt a},\qquad
       \sigma = \eta\,\sqrt{\frac{1-a'}{1-a}}\sqrt{1-\frac{a}{a'}}, $$
    $$ x' = \sqrt{a'}\,\hat x_0 + \sqrt{1-a'-\sigma^2}\;\epsilon_\theta(x, \tau_i) + \sigma z . $$

    eta = 0 is the deterministic DDIM (a discretisation of the probability-flow ODE); eta = 1
    on the full timeline (``num_steps = T``) is DDPM's ancestral sampler with sigma_t^2 =
    beta_tilde_t. The last step returns x_0-hat itself.

    Args:
        source: a Schedule (with ``eps_fn`` or ``score_fn(x_t, t)``) or a GaussianDiffusion.
        eps_fn: ``eps_fn(x_t, t)``, integer t in 1..T.
        score_fn: ``score_fn(x_t, t)``.
        num_steps: S, the number of respaced steps ([respace][probdiff.samplers.respace]);
            ignored when ``timesteps`` is given.
        eta: in [0, 1], the fraction of the DDPM posterior noise.
        timesteps: optional strictly increasing integers in 1..T to use instead.
        clip_x0: optional (low, high) to clip x_0-hat to (e.g. (-1, 1) for images in that range).

    Returns:
        a [Sampler][probdiff.samplers.Sampler] with S steps.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff import schedules, samplers
        >>> sampler = samplers.ddim(schedules.linear(100), eps_fn=lambda x, t: jnp.zeros_like(x), num_steps=10)
        >>> samplers.run(sampler, jax.random.key(0), (5, 2)).shape
        (5, 2)
    """
    schedule, eps_m, _ = _model_fns(source, eps_fn, score_fn, "ddim")
    T = schedule.num_steps
    try:
        eta_v = float(eta)
    except (TypeError, ValueError):
        raise TypeError(f"eta must be a float in [0, 1]; got {eta!r}") from None
    if not 0.0 <= eta_v <= 1.0:
        raise ValueError(f"eta must lie in [0, 1]; got {eta!r}")
    if timesteps is None:
        taus = respace(T, num_steps)
    else:
        taus = np.asarray(timesteps)
        if taus.ndim != 1 or taus.size < 1 or not np.issubdtype(taus.dtype, np.integer):
            raise ValueError(f"timesteps must be a 1-D array of ints in 1..T = {T}; got {timesteps!r}")
        if taus.min() < 1 or taus.max() > T:
            raise ValueError(f"timesteps must lie in 1..T = {T}; got values from {taus.min()} to {taus.max()}")
        if np.any(np.diff(taus) <= 0):
            raise ValueError("timesteps must increase strictly")
    if clip_x0 is not None:
        lo, hi = (float(c) for c in clip_x0)
        if not lo < hi:
            raise ValueError(f"clip_x0 must be (low, high) with low < high; got {clip_x0!r}")
    S = len(taus)
    t_seq = jnp.asarray(taus[::-1].copy())  # tau_S, ..., tau_1
    prev_seq = jnp.asarray(np.concatenate([taus[::-1][1:], [0]]))  # tau_{S-1}, ..., tau_0 = 0

    def step(state, i):
        key, key_z = jax.random.split(state.rng_key)
        x = state.x
        t, t_prev = t_seq[i], prev_seq[i]
        a = schedule.alpha_bar[t].astype(x.dtype)
        a_prev = schedule.alpha_bar[t_prev].astype(x.dtype)
        om_a = schedule.one_minus_alpha_bar[t].astype(x.dtype)
        om_prev = schedule.one_minus_alpha_bar[t_prev].astype(x.dtype)
        eps = eps_m(x, t)
        x0 = (x - jnp.sqrt(om_a) * eps) / jnp.sqrt(a)
        if clip_x0 is not None:
            x0 = jnp.clip(x0, lo, hi)
            eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(om_a)
        # 1 - a / a' = 1 - alpha_bar_t / alpha_bar_t' (the product of alpha_s over t' < s <= t)
        sigma2 = eta_v**2 * (om_prev / om_a) * (-jnp.expm1(jnp.log(a) - jnp.log(a_prev)))
        z = jax.random.normal(key_z, x.shape, x.dtype)
        x_new = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(om_prev - sigma2, 0.0)) * eps + jnp.sqrt(sigma2) * z
        x_new = x_new.astype(x.dtype)
        return SamplerState(x_new, key), x_new

    return Sampler(_normal_prior(), step, S)
