r"""Posterior sampling with a diffusion prior: annealed Langevin/MALA, twisted SMC and DPS.

The model is an ordinary NumPyro model with a [GaussianDiffusion][probdiff.GaussianDiffusion]
as the prior of a latent x_0 and observed sites around it (see [probdiff.inverse][probdiff.inverse]).
Writing the model's other log-density terms as ell(x_0) (= log p(y | x_0) for one observation),
the posterior is p(x_0 | y) ∝ p_theta(x_0) exp ell(x_0). Every sampler uses the prior only
through its network, as the score of the noised prior (MATH.md D3) and Tweedie's estimate

$$ s_\theta(x_t,t) = -\frac{\epsilon_\theta(x_t,t)}{\sqrt{1-\bar\alpha_t}},\qquad
   \hat x_0(x_t,t) = \frac{x_t-\sqrt{1-\bar\alpha_t}\,\epsilon_\theta(x_t,t)}{\sqrt{\bar\alpha_t}}, $$

and the likelihood through ell and its gradient. At noise level t the likelihood of y given x_t
is approximated by ell at Tweedie's estimate, ell(x0_hat(x_t, t)) (the "twist"), which is
exact at t = 0; by default it is tempered, alpha_bar_t ell(x0_hat(x_t, t)), because x0_hat is
uncertain at high noise and its gradient carries the factor 1 / sqrt(alpha_bar_t).

* [AnnealedLangevin][probdiff.infer.AnnealedLangevin]: an MCMC kernel for ``numpyro.infer.MCMC``.
  Warm-up anneals through noise levels from T down to ``t_final`` (Langevin steps on
  log p_t(x) + ell(x0_hat(x, t)), moved between levels by a DDIM step), then the chain runs
  MALA on p_{t_final}(x) exp ell(x), a target that tends to the posterior as t_final -> 0.
* [TwistedSMC][probdiff.infer.TwistedSMC]: sequential Monte Carlo over the reverse chain with
  the twist as intermediate target (Wu et al. 2023); asymptotically exact in the number of
  particles for p_theta(x_0 | y), with effective sample sizes, resampling steps and an
  estimate of the evidence p_theta(y).
* [DPS][probdiff.infer.DPS]: diffusion posterior sampling (Chung et al. 2023), the reverse
  chain with the twist's gradient added to each step; fast, and biased.

[TwistedSMC][probdiff.infer.TwistedSMC] and [DPS][probdiff.infer.DPS] follow ``MCMC``'s
interface: ``.run(rng_key, *model_args, **model_kwargs)``, ``.get_samples(group_by_chain=...)``
keyed by the site name, ``.get_extra_fields()``, ``.print_summary()``; independent runs are
the chains, and ``arviz.from_dict(posterior=sampler.get_samples(group_by_chain=True))`` gives
arviz's diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.diagnostics import print_summary
from numpyro.infer.hmc_util import dual_averaging
from numpyro.infer.mcmc import MCMCKernel
from numpyro.util import identity, is_prng_key

from probdiff._checks import check_positive
from probdiff.inverse import PosteriorProblem

__all__ = [
    "AnnealedLangevin",
    "AnnealedLangevinState",
    "TwistedSMC",
    "DPS",
    "LOBATTO",
]

#: Gauss-Lobatto nodes and weights on [0, 1] for the line integral of the score in MALA's
#: acceptance ratio; the end points are free (the score there is already known).
LOBATTO = {
    2: ((0.0, 1.0), (0.5, 0.5)),
    3: ((0.0, 0.5, 1.0), (1 / 6, 4 / 6, 1 / 6)),
    4: ((0.0, 0.5 - math.sqrt(5) / 10, 0.5 + math.sqrt(5) / 10, 1.0), (1 / 12, 5 / 12, 5 / 12, 1 / 12)),
}


# ----------------------------------------------------------------------------- prior pieces
class _Prior:
    """The prior's network as functions of x with any leading dims (particles, chains)."""

    def __init__(self, problem: PosteriorProblem):
        self.problem = problem
        self.prior = problem.prior
        self.schedule = problem.prior.schedule
        self.event_shape = tuple(problem.prior.event_shape)
        self.shape = tuple(problem.shape)
        self.T = self.schedule.num_steps

    def moments(self, x, t):
        """(mean, variance, eps) of p_theta(x_{t-1} | x_t) at x (shape lead + site shape)."""
        flat = x.reshape((-1,) + self.event_shape)
        m = self.prior._moments(jnp.asarray(t, jnp.int32), flat)
        var = jnp.broadcast_to(m.variance, flat.shape)
        return m.mean.reshape(x.shape), var.reshape(x.shape), m.eps.reshape(x.shape)

    def coef(self, t, dtype):
        s = self.schedule
        t = jnp.asarray(t, jnp.int32)
        return s.alpha_bar[t].astype(dtype), s.one_minus_alpha_bar[t].astype(dtype)

    def tweedie(self, x, eps, t):
        ab, omab = self.coef(t, x.dtype)
        return (x - jnp.sqrt(omab) * eps) / jnp.sqrt(ab)

    def loglik(self, x0):
        """ell at each of a stack of site values: shape lead."""
        lead = x0.shape[: x0.ndim - len(self.shape)]
        flat = x0.reshape((-1,) + self.shape)
        return jax.vmap(self.problem.log_likelihood)(flat).reshape(lead)

    def twist(self, x, t, tempered: bool = False):
        """lambda_t ell(x0_hat(x, t)), its gradient in x, and the reverse moments at x (one network call).

        lambda_t = alpha_bar_t when ``tempered`` (1 at t = 0), else 1.
        """

        def f(x):
            mean, var, eps = self.moments(x, t)
            lt = self.loglik(self.tweedie(x, eps, t))
            if tempered:
                lt = lt * self.coef(t, lt.dtype)[0]
            return jnp.sum(lt), (lt, mean, var, eps)

        g, (lt, mean, var, eps) = jax.grad(f, has_aux=True)(x)
        return lt, g, mean, var, eps


def _sum_site(a, ndim):
    return jnp.sum(a, axis=tuple(range(a.ndim - ndim, a.ndim)))


def _ess(logw):
    w = jax.nn.softmax(logw)
    return 1.0 / jnp.sum(w**2)


def _systematic(key, logw):
    K = logw.shape[0]
    cdf = jnp.cumsum(jax.nn.softmax(logw))
    u = (jax.random.uniform(key, (), cdf.dtype) + jnp.arange(K, dtype=cdf.dtype)) / K
    return jnp.clip(jnp.searchsorted(cdf, u), 0, K - 1)


def _resolve_problem(model, model_args, model_kwargs, site):
    return PosteriorProblem.from_model(model, model_args, model_kwargs, site=site)


# ----------------------------------------------------------------------------- MCMC-like base
class _IndependentRuns:
    """``MCMC``-like interface for samplers whose chains are independent runs."""

    #: extra fields with one entry per draw (flattened over runs when not grouped by chain)
    _per_draw: tuple = ()

    def __init__(
        self, model: Callable, *, num_chains: int, site: str | None, final_noise: bool, tempered: bool
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model; got {type(model).__name__}")
        if int(num_chains) < 1:
            raise ValueError(f"num_chains must be >= 1; got {num_chains!r}")
        self.model = model
        self.num_chains = int(num_chains)
        self.site = site
        self.final_noise = bool(final_noise)
        self.tempered = bool(tempered)
        self._samples = None
        self._extra = None
        self._compiled = {}

    def _sweeps(self, model_args, model_kwargs):
        """The jitted ``(keys, data arrays) -> (samples, extra)``, cached by the data's structure.

        The model's array arguments are traced, everything else is part of the cache key, so a
        second run, or a new observation of the same shape, reuses the compiled sweep.
        """
        leaves, treedef = jax.tree.flatten((model_args, model_kwargs))
        where = tuple(i for i, v in enumerate(leaves) if isinstance(v, (jax.Array, np.ndarray)))
        static = tuple((i, v) for i, v in enumerate(leaves) if i not in where)
        config = tuple((k, v) for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        key = (config, treedef, where, static)
        try:
            fn = self._compiled.get(key)
        except TypeError:  # an unhashable argument: compile for this run only
            key, fn = None, None
        if fn is None:

            def sweeps(keys, arrays):
                full = list(leaves)
                for i, a in zip(where, arrays, strict=True):
                    full[i] = a
                args, kwargs = jax.tree.unflatten(treedef, full)
                prior = _Prior(_resolve_problem(self.model, args, kwargs, self.site))
                return jax.vmap(self._make_sweep(prior))(keys)

            fn = jax.jit(sweeps)
            if key is not None:
                self._compiled[key] = fn
        return fn, [leaves[i] for i in where]

    def run(self, rng_key, *model_args, **model_kwargs):
        """Run ``num_chains`` independent sweeps on the model's data; returns ``self``."""
        problem = _resolve_problem(self.model, model_args, model_kwargs, self.site)  # the checks, eagerly
        fn, arrays = self._sweeps(model_args, model_kwargs)
        samples, extra = fn(jax.random.split(rng_key, self.num_chains), arrays)
        if not bool(jnp.all(jnp.isfinite(samples))):
            raise FloatingPointError(
                f"{type(self).__name__} produced non-finite samples; lower the guidance scale or check the "
                "network and the observation"
            )
        self._site = problem.site
        self._samples = samples
        self._extra = extra
        return self

    def _check_ran(self):
        if self._samples is None:
            raise RuntimeError("call run(rng_key, *model_args) first")

    def get_samples(self, group_by_chain: bool = False) -> dict:
        """The samples keyed by the prior site's name: ``(num_chains * n, ...)`` or ``(num_chains, n, ...)``."""
        self._check_ran()
        s = self._samples
        if not group_by_chain:
            s = s.reshape((-1,) + s.shape[2:])
        return {self._site: s}

    def get_extra_fields(self, group_by_chain: bool = False) -> dict:
        """Diagnostics (see the class docstring), one row per run.

        Without ``group_by_chain`` the per-draw fields are concatenated over runs; the others
        keep their leading run axis.
        """
        self._check_ran()
        if group_by_chain:
            return dict(self._extra)
        return {
            k: (v.reshape((-1,) + v.shape[2:]) if k in self._per_draw else v) for k, v in self._extra.items()
        }

    def print_summary(self, prob: float = 0.9):
        """``numpyro.diagnostics.print_summary`` of the samples, runs as chains."""
        print_summary(self.get_samples(group_by_chain=True), prob=prob)


class TwistedSMC(_IndependentRuns):
    r"""Twisted sequential Monte Carlo over the reverse chain (Wu et al. 2023, "TDS").

    K particles start at x_T ~ N(0, I) and follow proposals tilted toward the observation by
    the twist p~_t(y | x_t) = exp(lambda_t ell(x0_hat(x_t, t))), lambda_t = alpha_bar_t
    (``tempered``, the default; 1 otherwise):

    $$ r(x_{t-1}\mid x_t) = \mathcal N\big(x_{t-1};\ \mu_\theta(x_t,t)+\sigma_t^2\nabla_{x_t}\log\tilde p_t(y\mid x_t),\
       \sigma_t^2 I\big), $$

    $$ w_{t-1} = w_t\,\frac{p_\theta(x_{t-1}\mid x_t)\,\tilde p_{t-1}(y\mid x_{t-1})}
       {\tilde p_t(y\mid x_t)\, r(x_{t-1}\mid x_t)},\qquad \tilde p_T \text{ at the start},\quad
       \tilde p_0(y\mid x_0) = e^{\ell(x_0)}. $$

    The weighted particles target p_theta(x_{0:T} | y), so x_0 is asymptotically exact (as
    K -> infinity) for p_theta(x_0 | y) ∝ p_theta(x_0) exp ell(x_0), however good the twist;
    a good twist only lowers the variance. When the effective sample size
    ESS = 1 / sum_k w_k^2 (normalised weights) falls below ``ess_threshold * K`` the
    particles are resampled (systematic resampling) and the weights reset. The product of
    the mean incremental weights estimates the evidence, E[Z_hat] = p_theta(y).
    With ``final_noise=False`` (as [GaussianDiffusion.sample][probdiff.GaussianDiffusion.sample])
    the last step is x_0 = mu_theta(x_1, 1) and the prior is the law of the chain's output.

    After the sweep the particles are resampled once more by their final weights, so
    ``get_samples`` returns K equally weighted draws per run (``get_extra_fields()`` has the
    weighted particles for lower-variance estimates).

    Args:
        model: a NumPyro model with a diffusion prior site (see
            [PosteriorProblem][probdiff.inverse.PosteriorProblem]).
        num_particles: K.
        num_chains: independent runs (vectorised).
        ess_threshold: resample when ESS < ess_threshold * K; 0 never resamples, 1 always.
        tempered: lambda_t = alpha_bar_t in the twist. x0_hat is uncertain at high noise, and
            the untempered twist's gradient grows like 1 / sqrt(alpha_bar_t) there.
        final_noise: add sigma_1 z at the last step (the model's density) or not (its sampler).
        site: the prior site's name if the model has several diffusion sites.

    ``get_extra_fields()``, one row per run: ``ess`` (T,) before each step's resampling
    decision, t = T..1; ``resampled`` (T,) booleans; ``final_ess``; ``log_evidence``;
    ``particles`` and ``log_weights``, the weighted particles before the last resampling,
    their log-weights normalised within each run (so that without ``group_by_chain``, where
    these two are concatenated over runs, ``softmax(log_weights)`` weighs every run equally).
    """

    _per_draw = ("particles", "log_weights")

    def __init__(
        self,
        model: Callable,
        num_particles: int = 64,
        *,
        num_chains: int = 1,
        ess_threshold: float = 0.5,
        tempered: bool = True,
        final_noise: bool = False,
        site: str | None = None,
    ):
        super().__init__(model, num_chains=num_chains, site=site, final_noise=final_noise, tempered=tempered)
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be >= 1; got {num_particles!r}")
        if not 0.0 <= float(ess_threshold) <= 1.0:
            raise ValueError(f"ess_threshold must lie in [0, 1]; got {ess_threshold!r}")
        self.num_particles = int(num_particles)
        self.ess_threshold = float(ess_threshold)

    def _make_sweep(self, prior: _Prior):
        K, T, nd = self.num_particles, prior.T, len(prior.shape)
        thr = self.ess_threshold * K
        tempered = self.tempered
        final_noise = self.final_noise

        def maybe_resample(key, logw, logz, carried):
            ess = _ess(logw)
            do = ess < thr
            idx = jnp.where(do, _systematic(key, logw), jnp.arange(K))
            logz = jnp.where(do, logz + jax.nn.logsumexp(logw) - math.log(K), logz)
            logw = jnp.where(do, jnp.zeros_like(logw), logw)
            carried = jax.tree.map(lambda a: a[idx], carried)
            return logw, logz, carried, ess, do

        def sweep(key):
            key, k0 = jax.random.split(key)
            x = jax.random.normal(k0, (K,) + prior.shape, prior.schedule.dtype)
            lt, g, mean, var, _ = prior.twist(x, T, tempered)
            logw = lt
            logz = jnp.zeros((), x.dtype)

            def body(carry, t):
                key, x, logw, logz, lt, g, mean, var = carry
                key, kr, kz = jax.random.split(key, 3)
                logw, logz, (x, lt, g, mean, var), ess, do = maybe_resample(
                    kr, logw, logz, (x, lt, g, mean, var)
                )
                sd = jnp.sqrt(var)
                z = jax.random.normal(kz, x.shape, x.dtype)
                x_new = mean + var * g + sd * z
                # log p(x' | x) - log r(x' | x) for x' = mu + var g + sd z: -(var g^2 / 2 + sd g z)
                incr = -_sum_site(0.5 * var * g**2 + sd * g * z, nd)
                lt_new, g_new, mean_new, var_new, _ = prior.twist(x_new, t - 1, tempered)
                logw = logw + incr + lt_new - lt
                return (key, x_new, logw, logz, lt_new, g_new, mean_new, var_new), (ess, do)

            carry = (key, x, logw, logz, lt, g, mean, var)
            carry, (ess, do) = jax.lax.scan(body, carry, jnp.arange(T, 1, -1))
            key, x, logw, logz, lt, g, mean, var = carry
            # the last step, t = 1 -> 0: the twist gives way to the likelihood itself
            key, kr, kz, kf = jax.random.split(key, 4)
            logw, logz, (x, lt, g, mean, var), ess1, do1 = maybe_resample(
                kr, logw, logz, (x, lt, g, mean, var)
            )
            if final_noise:
                sd = jnp.sqrt(var)
                z = jax.random.normal(kz, x.shape, x.dtype)
                x0 = mean + var * g + sd * z
                incr = -_sum_site(0.5 * var * g**2 + sd * g * z, nd)
            else:
                x0, incr = mean, 0.0
            logw = logw + incr + prior.loglik(x0) - lt
            logz = logz + jax.nn.logsumexp(logw) - math.log(K)
            final_ess = _ess(logw)
            idx = _systematic(kf, logw)
            extra = {
                "ess": jnp.concatenate([ess, ess1[None]]),
                "resampled": jnp.concatenate([do, do1[None]]),
                "final_ess": final_ess,
                "log_evidence": logz,
                "particles": x0,
                "log_weights": logw - jax.nn.logsumexp(logw),
            }
            return x0[idx], extra

        return sweep


class DPS(_IndependentRuns):
    r"""Diffusion posterior sampling (Chung et al. 2023): the reverse chain pushed by the twist's gradient.

    $$ x'_{t-1}\sim p_\theta(x_{t-1}\mid x_t),\qquad
       x_{t-1} = x'_{t-1} + \zeta_t\,\nabla_{x_t}\,\lambda_t\ell\big(\hat x_0(x_t,t)\big),\qquad
       \zeta_t = \texttt{scale}\cdot\frac{\beta_t}{\sqrt{\alpha_t}}, $$

    with lambda_t = alpha_bar_t (``tempered``, the default) or 1 (Chung et al.'s form).
    Untempered, the gradient near t = T carries the factor 1 / sqrt(alpha_bar_T) of Tweedie's
    estimate (160 for the linear T = 1000 schedule): on a trained digits network the first
    steps overflow at every scale tried.

    With ``scale = 1`` the step adds beta_t / sqrt(alpha_t) times the approximate conditional
    score grad log p~_t(y | x_t) to the reverse mean, which is how the score of p_t(x_t | y)
    would enter mu_theta (MATH.md C2, D3). Chung et al. tune a larger step,
    zeta_t = zeta' / ||y - A x0_hat||, for images. DPS is not exact for any step: its output
    law is not p_theta(x_0 | y), even for Gaussian data (the test suite and the benchmark
    measure the gap). It costs one network call with its gradient per step and sample.

    Args:
        model: a NumPyro model with a diffusion prior site.
        num_samples: independent samples per run.
        num_chains: independent runs (vectorised), for diagnostics.
        scale: the guidance scale (> 0).
        tempered: lambda_t = alpha_bar_t (True) or 1.
        final_noise: add sigma_1 z at the last step or not (as ``GaussianDiffusion.sample``).
        site: the prior site's name if the model has several diffusion sites.
    """

    def __init__(
        self,
        model: Callable,
        num_samples: int = 64,
        *,
        num_chains: int = 1,
        scale: float = 1.0,
        tempered: bool = True,
        final_noise: bool = False,
        site: str | None = None,
    ):
        super().__init__(model, num_chains=num_chains, site=site, final_noise=final_noise, tempered=tempered)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.scale = check_positive(scale, "scale (the DPS guidance scale > 0)")

    def _make_sweep(self, prior: _Prior):
        N, T = self.num_samples, prior.T
        s = prior.schedule
        final_noise = self.final_noise
        scale = self.scale
        tempered = self.tempered

        def sweep(key):
            key, k0 = jax.random.split(key)
            x = jax.random.normal(k0, (N,) + prior.shape, s.dtype)

            def body(carry, t):
                key, x = carry
                key, kz = jax.random.split(key)
                _, g, mean, var, _ = prior.twist(x, t, tempered)
                noise = jnp.sqrt(var) * jax.random.normal(kz, x.shape, x.dtype)
                if not final_noise:
                    noise = jnp.where(t > 1, noise, 0.0)
                zeta = scale * s.beta[t].astype(x.dtype) / jnp.sqrt(s.alpha[t].astype(x.dtype))
                return (key, mean + noise + zeta * g), None

            (key, x), _ = jax.lax.scan(body, (key, x), jnp.arange(T, 0, -1))
            return x, {}

        return sweep


# ----------------------------------------------------------------------------- annealed MALA
class AnnealedLangevinState(NamedTuple):
    """The state of an [AnnealedLangevin][probdiff.infer.AnnealedLangevin] chain.

    Attributes:
        i: the iteration, counting warm-up.
        z: ``{site: x}``, the current point (x_t at the current noise level).
        score: the prior's score s_theta(x, t) at the current level.
        loglik: ell at the current level (the twist ell(x0_hat(x, t)) while annealing, ell(x) at t_final).
        loglik_grad: its gradient in x.
        accept_prob: the acceptance probability of the last proposal.
        mean_accept_prob: its running mean, restarted when the final level starts and when warm-up ends.
        log_kappa: log of the step size in units of the level's noise variance: eta = kappa (1 - alpha_bar_t).
        adapt_state: the dual-averaging state that tunes log kappa during warm-up.
        rng_key: the chain's key.
    """

    i: jax.Array
    z: dict
    score: jax.Array
    loglik: jax.Array
    loglik_grad: jax.Array
    accept_prob: jax.Array
    mean_accept_prob: jax.Array
    log_kappa: jax.Array
    adapt_state: tuple
    rng_key: jax.Array


class AnnealedLangevin(MCMCKernel):
    r"""Annealed Langevin dynamics, then MALA, on a diffusion prior times a likelihood (MATH.md D1, D4, E1).

    A ``numpyro.infer.MCMC`` kernel for a model with a diffusion prior site. At noise level t
    it moves x by a Langevin proposal on the target pi_t(x) ∝ p_t(x) exp ell_t(x),

    $$ x' = x + \frac{\eta_t}{2}\big(s_\theta(x,t)+\nabla_x\ell_t(x)\big)+\sqrt{\eta_t}\,\epsilon,
       \qquad \eta_t = \kappa\,(1-\bar\alpha_t), $$

    accepted by Metropolis-Hastings (``metropolis=True``, MALA) or always (ULA). The prior's
    density is never evaluated: its log-ratio is the line integral of the score,

    $$ \log\frac{p_t(x')}{p_t(x)} = \int_0^1 s_\theta\big(x+u(x'-x),t\big)\cdot(x'-x)\,du, $$

    by Gauss-Lobatto quadrature (``quadrature`` = 2 points, the trapezoid, free; 3, Simpson,
    one extra network call; 4). It is exact when s_theta is a gradient field and the integrand
    a polynomial of low degree (an affine score, as for Gaussian data, is exact with any rule);
    for a learned network it is an approximation whose error shrinks with the step.

    * Warm-up, first ``anneal_steps`` iterations: x starts at x_T ~ N(0, I); iteration i is
      at level t_i, geometric from T down to ``t_final``, with ell_t(x) = alpha_bar_t ell(x0_hat(x, t))
      (the tempered twist). Between levels x is carried by a DDIM step,
      x_{t'} = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t') eps_theta(x_t, t).
    * Rest of warm-up: the final level t_final with ell_t(x) = ell(x) (x read as x_0).
    * Sampling: the final level, kappa fixed at its warm-up average. ULA (``metropolis=False``)
      warms up with MALA's steps, then samples without the accept/reject step.

    kappa is tuned throughout warm-up by dual averaging toward ``target_accept_prob``
    (restarted when the final level begins). The chain's stationary law is
    pi(x) ∝ p_{t_final}(x) exp ell(x), exactly for MALA with a gradient-field score: the
    posterior under the noised prior p_{t_final}, which tends to p(x_0 | y) as t_final -> 0
    (at t_final = 1 the prior's covariance differs from the data's by 1 - alpha_bar_1, 1e-4
    for the linear schedule).

    Args:
        model: a NumPyro model with a diffusion prior site (see
            [PosteriorProblem][probdiff.inverse.PosteriorProblem]).
        t_final: the level the chain samples at, 1..T.
        anneal_steps: warm-up iterations spent annealing (default: half of ``num_warmup``).
        step_size: the initial kappa (eta in units of 1 - alpha_bar_t).
        final_step_size: eta at the final level, in absolute units (the initial value that MALA
            tunes; ULA keeps it); default: carry on with the annealing's kappa.
        metropolis: MALA (True) or ULA (False).
        adapt_step_size: tune kappa during warm-up. The warm-up steps are MALA's for ULA too
            (the rejections guard the tuning); ULA then samples unadjusted with the tuned kappa.
        target_accept_prob: the acceptance rate dual averaging aims at.
        tempered: the annealing twist is alpha_bar_t ell(x0_hat(x, t)) (True) or ell(x0_hat(x, t)).
        quadrature: Gauss-Lobatto points for the line integral, 2, 3 or 4.
        site: the prior site's name if the model has several diffusion sites.

    Examples:
        ``mcmc = MCMC(AnnealedLangevin(model), num_warmup=1000, num_samples=1000)``, then
        ``mcmc.run(key, y=y)``, ``mcmc.get_samples()["x"]`` and ``arviz.from_numpyro(mcmc)``.
    """

    sample_field = "z"

    def __init__(
        self,
        model: Callable,
        *,
        t_final: int = 1,
        anneal_steps: int | None = None,
        step_size: float = 0.1,
        final_step_size: float | None = None,
        metropolis: bool = True,
        adapt_step_size: bool = True,
        tempered: bool = True,
        target_accept_prob: float = 0.574,
        quadrature: int = 3,
        site: str | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model; got {type(model).__name__}")
        if quadrature not in LOBATTO:
            raise ValueError(
                f"quadrature must be one of {sorted(LOBATTO)} Gauss-Lobatto points; got {quadrature!r}"
            )
        if not 0.0 < float(target_accept_prob) < 1.0:
            raise ValueError(f"target_accept_prob must lie in (0, 1); got {target_accept_prob!r}")
        if anneal_steps is not None and int(anneal_steps) < 0:
            raise ValueError(f"anneal_steps must be >= 0; got {anneal_steps!r}")
        self._model = model
        self.t_final = int(t_final)
        self.anneal_steps = None if anneal_steps is None else int(anneal_steps)
        self.step_size = check_positive(step_size, "step_size (the initial kappa > 0)")
        self.final_step_size = (
            None if final_step_size is None else check_positive(final_step_size, "final_step_size (eta > 0)")
        )
        self.metropolis = bool(metropolis)
        self.adapt_step_size = bool(adapt_step_size)
        self.tempered = bool(tempered)
        self.target_accept_prob = float(target_accept_prob)
        self.quadrature = int(quadrature)
        self.site = site
        self._sample_fn = None

    @property
    def model(self):
        """The NumPyro model."""
        return self._model

    @property
    def default_fields(self):
        return ("z",)

    def get_diagnostics_str(self, state):
        eta = jnp.exp(jnp.mean(state.log_kappa))
        return f"kappa {float(eta):.2e}. acc. prob={float(jnp.mean(state.mean_accept_prob)):.2f}"

    def postprocess_fn(self, model_args, model_kwargs):
        return identity

    # -------------------------------------------------------------------------------- init
    def init(self, rng_key, num_warmup, init_params=None, model_args=(), model_kwargs=None):
        model_kwargs = {} if model_kwargs is None else model_kwargs
        problem = _resolve_problem(self._model, model_args, model_kwargs, self.site)
        prior = _Prior(problem)
        T = prior.T
        if not 1 <= self.t_final <= T:
            raise ValueError(f"t_final must lie in 1..T = {T}; got {self.t_final}")
        W = int(num_warmup)
        A = W // 2 if self.anneal_steps is None else min(self.anneal_steps, W)
        if A > 0:
            u = np.linspace(0.0, 1.0, A)
            levels = np.round(np.exp((1 - u) * np.log(T) + u * np.log(self.t_final))).astype(np.int32)
        else:
            levels = np.array([self.t_final], np.int32)
        levels = jnp.asarray(levels)
        self._levels = levels
        site = problem.site
        metropolis, target, t_f = self.metropolis, self.target_accept_prob, self.t_final
        tempered = self.tempered
        nodes, weights = LOBATTO[self.quadrature]
        da_init, da_update = dual_averaging()
        dtype = prior.schedule.dtype

        def evaluate(x, t, final):
            """(score, ell_t, grad ell_t) at x for level t; final: ell(x) instead of the twist."""
            if final:
                _, _, eps = prior.moments(x, t)
                ll, lg = jax.value_and_grad(problem.log_likelihood)(x)
            else:
                lt, lg, _, _, eps = prior.twist(x[None], t, tempered)
                ll, lg, eps = lt[0], lg[0], eps[0]
            _, omab = prior.coef(t, x.dtype)
            return -eps / jnp.sqrt(omab), ll, lg

        def score_at(x, t):
            _, omab = prior.coef(t, x.dtype)
            return -prior.moments(x, t)[2] / jnp.sqrt(omab)

        def mala(st, t, final, adapt):
            key, kz, ku = jax.random.split(st.rng_key, 3)
            x = st.z[site]
            _, omab = prior.coef(t, x.dtype)
            eta = jnp.exp(st.log_kappa).astype(x.dtype) * omab
            drift = st.score + st.loglik_grad
            noise = jax.random.normal(kz, x.shape, x.dtype)
            xp = x + 0.5 * eta * drift + jnp.sqrt(eta) * noise
            sp, llp, lgp = evaluate(xp, t, final)
            if metropolis or adapt:  # ULA's warm-up is MALA's: kappa is tuned on a guarded chain
                d = xp - x
                integral = weights[0] * jnp.sum(st.score * d) + weights[-1] * jnp.sum(sp * d)
                for u, w in zip(nodes[1:-1], weights[1:-1], strict=True):
                    integral = integral + w * jnp.sum(score_at(x + u * d, t) * d)
                back = x - xp - 0.5 * eta * (sp + lgp)
                log_q_ratio = jnp.sum(noise**2) / 2.0 - jnp.sum(back**2) / (2.0 * eta)
                log_ratio = integral + llp - st.loglik + log_q_ratio
                log_ratio = jnp.where(jnp.isfinite(log_ratio), log_ratio, -jnp.inf)
                acc = jnp.exp(jnp.minimum(log_ratio, 0.0)).astype(dtype)
                accept = jax.random.uniform(ku, (), dtype) < acc
            else:
                acc = jnp.ones((), dtype)
                accept = jnp.all(jnp.isfinite(xp))
            new = (xp, sp, llp, lgp)
            old = (x, st.score, st.loglik, st.loglik_grad)
            x, s, ll, lg = jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)
            i = st.i + 1
            log_kappa, adapt_state = st.log_kappa, st.adapt_state
            if adapt:
                adapt_state = da_update(target - acc, adapt_state)
                log_kappa = jnp.where(i < W, adapt_state[0], adapt_state[1]).astype(log_kappa.dtype)
            n_start = jnp.where(i > W, W, jnp.where(i > A, A, 0))
            n = (i - n_start).astype(dtype)
            mean_acc = jnp.where(n <= 1, acc, st.mean_accept_prob + (acc - st.mean_accept_prob) / n)
            return AnnealedLangevinState(i, {site: x}, s, ll, lg, acc, mean_acc, log_kappa, adapt_state, key)

        def anneal(st):
            t = levels[st.i]
            t_prev = levels[jnp.maximum(st.i - 1, 0)]
            x = st.z[site]
            ab_p, omab_p = prior.coef(t_prev, x.dtype)
            ab, omab = prior.coef(t, x.dtype)
            eps = -jnp.sqrt(omab_p) * st.score
            x0 = (x - jnp.sqrt(omab_p) * eps) / jnp.sqrt(ab_p)
            x = jnp.sqrt(ab) * x0 + jnp.sqrt(omab) * eps  # DDIM from t_prev to t (identity if equal)
            s, ll, lg = evaluate(x, t, False)
            st = st._replace(z={site: x}, score=s, loglik=ll, loglik_grad=lg)
            return mala(st, t, False, self.adapt_step_size)

        def enter_final(st, adapt):
            x = st.z[site]
            s, ll, lg = evaluate(x, t_f, True)
            st = st._replace(score=s, loglik=ll, loglik_grad=lg)
            if self.final_step_size is not None:
                _, omab = prior.coef(t_f, x.dtype)
                st = st._replace(log_kappa=jnp.log(self.final_step_size / omab).astype(st.log_kappa.dtype))
            if adapt:
                st = st._replace(adapt_state=da_init(jnp.log(10.0) + st.log_kappa))
            return mala(st, t_f, True, adapt)

        branches = [
            anneal,
            lambda st: enter_final(st, self.adapt_step_size),
            lambda st: enter_final(st, False),
            lambda st: mala(st, t_f, True, self.adapt_step_size),
            lambda st: mala(st, t_f, True, False),
        ]

        def init_one(key):
            key, k0 = jax.random.split(key)
            x = jax.random.normal(k0, problem.shape, dtype)
            final = A == 0
            t0 = t_f if final else levels[0]
            s, ll, lg = evaluate(x, t0, final)
            log_kappa = jnp.log(jnp.asarray(self.step_size, dtype))
            return AnnealedLangevinState(
                jnp.zeros((), jnp.int32),
                {site: x},
                s,
                ll,
                lg,
                jnp.ones((), dtype),
                jnp.zeros((), dtype),
                log_kappa,
                da_init(jnp.log(10.0) + log_kappa),
                key,
            )

        vectorized = not is_prng_key(rng_key)
        step_fns = [jax.vmap(b) for b in branches] if vectorized else branches

        def sample_fn(state):
            i = state.i[0] if vectorized else state.i
            if A == 0:
                phase = jnp.where(i == 0, jnp.where(W > 0, 1, 2), jnp.where(i < W, 3, 4))
            else:
                phase = jnp.where(i < A, 0, jnp.where(i == A, jnp.where(A < W, 1, 2), jnp.where(i < W, 3, 4)))
            return jax.lax.switch(phase, step_fns, state)

        self._sample_fn = sample_fn
        state = jax.jit(jax.vmap(init_one) if vectorized else init_one)(rng_key)
        if not bool(jnp.all(jnp.isfinite(state.loglik))):
            raise ValueError("the log-likelihood is not finite at the initial point; check the observation")
        return state

    def sample(self, state, model_args, model_kwargs):
        """One iteration: an annealing step during the first warm-up phase, else a MALA/ULA step."""
        if self._sample_fn is None:
            raise RuntimeError("call init before sample")
        return self._sample_fn(state)
