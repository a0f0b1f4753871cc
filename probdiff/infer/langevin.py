r"""Langevin kernels for ``numpyro.infer.MCMC``: ULA and MALA (MATH.md D1, E1).

Langevin dynamics moves x by a gradient step on log p plus Gaussian noise,

$$ x' = x + \frac{\eta}{2}\nabla_x\log p(x) + \sqrt{\eta}\,\epsilon,\qquad \epsilon\sim\mathcal N(0, I), $$

the Euler-Maruyama step of the Langevin SDE dx = 1/2 grad log p(x) dt + dw, whose stationary
law is p (E1). Only grad log p enters, so the normalising constant of p is never needed (D1).

* [ULA][probdiff.infer.ULA] takes the step as it is (the *unadjusted* Langevin algorithm). Its
  chain is stationary for a law p_eta that differs from p by O(eta): on N(0, 1) the step is
  x' = (1 - eta/2) x + sqrt(eta) eps and the stationary variance solves
  v = (1 - eta/2)^2 v + eta, i.e. v = 1 / (1 - eta/4).
* [MALA][probdiff.infer.MALA] uses the step as a Metropolis-Hastings proposal
  q(x' | x) = N(x + eta/2 grad log p(x), eta I) and accepts it with probability

  $$ a = \min\Big(1,\ \frac{p(x')\,q(x\mid x')}{p(x)\,q(x'\mid x)}\Big), $$

  which makes p exactly stationary for every eta. During warm-up, eta is tuned by Nesterov
  dual averaging (as NumPyro tunes HMC) toward a target acceptance rate, 0.574 by default,
  the optimum for MALA in high dimension (Roberts & Rosenthal 1998).

Both are ``numpyro.infer.mcmc.MCMCKernel`` subclasses: give them a NumPyro model (continuous
latent sites, any constraints: they run in NumPyro's unconstrained space) or a
``potential_fn(z) = -log p(z)`` on a pytree, run them with ``MCMC(kernel, num_warmup=...,
num_samples=..., num_chains=..., chain_method=...)``, ``"vectorized"`` included, and read the
result with ``arviz.from_numpyro``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.handlers import seed, trace
from numpyro.infer.hmc_util import dual_averaging
from numpyro.infer.mcmc import MCMCKernel
from numpyro.infer.util import init_to_uniform, initialize_model
from numpyro.util import identity, is_prng_key

from probdiff._checks import check_positive

__all__ = ["LangevinState", "ULA", "MALA", "BlackJAXState", "BlackJAXKernel"]


class LangevinState(NamedTuple):
    """The state of a [ULA][probdiff.infer.ULA] or [MALA][probdiff.infer.MALA] chain.

    Attributes:
        i: the iteration, counting warm-up.
        z: the current position, a pytree (unconstrained values of the model's latent sites).
        potential_energy: U(z) = -log p(z) (up to a constant).
        z_grad: grad U(z).
        accept_prob: the acceptance probability of the last proposal (1 for ULA).
        mean_accept_prob: its running mean, restarted when warm-up ends.
        step_size: eta.
        adapt_state: the dual-averaging state that tunes eta during warm-up.
        rng_key: the chain's key.
    """

    i: jax.Array
    z: object
    potential_energy: jax.Array
    z_grad: object
    accept_prob: jax.Array
    mean_accept_prob: jax.Array
    step_size: jax.Array
    adapt_state: tuple
    rng_key: jax.Array


def _check_step_size(step_size):
    return check_positive(step_size, "step_size (eta > 0)")


def _check_continuous(model, rng_key, model_args, model_kwargs):
    """Raise if ``model`` has discrete latent sites, which Langevin dynamics cannot move."""
    key = rng_key if is_prng_key(rng_key) else rng_key[0]
    tr = trace(seed(model, key)).get_trace(*model_args, **model_kwargs)
    for name, site in tr.items():
        if site["type"] == "sample" and not site["is_observed"] and site["fn"].support.is_discrete:
            raise ValueError(
                f"Langevin kernels need continuous latent sites; site {name!r} has the discrete "
                f"distribution {type(site['fn']).__name__}. Marginalise it out in the model, or "
                "sample it with a Gibbs kernel (e.g. numpyro.infer.MixedHMC / DiscreteHMCGibbs) instead"
            )


class _LangevinKernel(MCMCKernel):
    """Shared machinery: model initialisation, vectorised chains, the proposal."""

    _metropolis = True

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        step_size: float = 0.01,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        init_strategy: Callable = init_to_uniform,
    ):
        if (model is None) == (potential_fn is None):
            raise ValueError("give exactly one of model= and potential_fn=")
        for name, f in (("model", model), ("potential_fn", potential_fn)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be callable; got {type(f).__name__}")
        if not 0.0 < float(target_accept_prob) < 1.0:
            raise ValueError(f"target_accept_prob must lie in (0, 1); got {target_accept_prob!r}")
        self._model = model
        self._potential_fn = potential_fn
        self._step_size = _check_step_size(step_size)
        self._adapt_step_size = bool(adapt_step_size) and self._metropolis
        self._target_accept_prob = float(target_accept_prob)
        self._init_strategy = init_strategy
        self._postprocess_fn = None
        self._sample_fn = None
        self._num_warmup = 0

    # ---------------------------------------------------------------- MCMCKernel API
    @property
    def model(self):
        """The NumPyro model, or None for a kernel built from ``potential_fn``."""
        return self._model

    @property
    def sample_field(self):
        return "z"

    @property
    def default_fields(self):
        return ("z",)

    def get_diagnostics_str(self, state):
        return f"step size {float(jnp.mean(state.step_size)):.2e}. acc. prob={float(jnp.mean(state.mean_accept_prob)):.2f}"

    def postprocess_fn(self, model_args, model_kwargs):
        if self._postprocess_fn is None:
            return identity
        return self._postprocess_fn(*model_args, **model_kwargs)

    def init(self, rng_key, num_warmup, init_params=None, model_args=(), model_kwargs=None):
        model_kwargs = {} if model_kwargs is None else model_kwargs
        vectorized = not is_prng_key(rng_key)
        if vectorized:
            rng_key, key_init = jnp.swapaxes(jax.vmap(jax.random.split)(rng_key), 0, 1)
        else:
            rng_key, key_init = jax.random.split(rng_key)
        self._num_warmup = int(num_warmup)
        if self._model is not None:
            _check_continuous(self._model, key_init, model_args, model_kwargs)
            info = initialize_model(
                key_init, self._model, init_strategy=self._init_strategy, dynamic_args=True,
                model_args=model_args, model_kwargs=model_kwargs,
            )
            if init_params is None:
                init_params = info.param_info.z
            potential_gen = info.potential_fn
            self._postprocess_fn = info.postprocess_fn

            def potential(z, args, kwargs):
                return potential_gen(*args, **kwargs)(z)
        else:
            if init_params is None:
                raise ValueError("a kernel built from potential_fn needs init_params= (passed to MCMC.run)")
            pf = self._potential_fn

            def potential(z, args, kwargs):
                return pf(z)

        step = self._make_step(potential)
        warm = self._make_warmup_step(potential)

        def init_one(z, key):
            return self._init_one(potential, z, key, model_args, model_kwargs)

        if vectorized:
            state = jax.vmap(init_one)(init_params, rng_key)
            step = jax.vmap(step, in_axes=(0, None, None))
            warm = None if warm is None else jax.vmap(warm, in_axes=(0, None, None))
        else:
            state = init_one(init_params, rng_key)
        if warm is None:
            self._sample_fn = step
        else:
            # one branch per step, outside the vmap: all chains are at the same iteration
            num_warmup = self._num_warmup

            def sample_fn(state, model_args, model_kwargs):
                i = state.i[0] if vectorized else state.i
                return jax.lax.cond(
                    i < num_warmup,
                    lambda st: warm(st, model_args, model_kwargs),
                    lambda st: step(st, model_args, model_kwargs),
                    state,
                )

            self._sample_fn = sample_fn
        u0 = state.potential_energy
        if not bool(jnp.all(jnp.isfinite(u0))):
            raise ValueError(
                "the potential energy -log p(z) is not finite at the initial point; pass finite "
                "init_params inside the support of p"
            )
        return state

    def sample(self, state, model_args, model_kwargs):
        """One Langevin step from ``state`` (one per chain when vectorised)."""
        if self._sample_fn is None:
            raise RuntimeError("call init before sample")
        return self._sample_fn(state, model_args, model_kwargs)

    # ---------------------------------------------------------------- the step
    def _init_one(self, potential, z, key, model_args, model_kwargs):
        u, g = jax.value_and_grad(potential)(z, model_args, model_kwargs)
        dtype = jnp.result_type(u)
        eta = jnp.asarray(self._step_size, dtype)
        da_init, _ = dual_averaging()
        return LangevinState(
            jnp.zeros((), jnp.int32), z, u, g, jnp.ones((), dtype), jnp.zeros((), dtype), eta,
            da_init(jnp.log(10.0 * eta)), key,
        )

    def _make_warmup_step(self, potential):
        """The step used during warm-up when it differs from the sampling step (else None)."""
        if self._adapt_step_size and self._num_warmup > 0:
            return self._make_step(potential, adapt=True)
        return None

    def _make_step(self, potential, adapt: bool = False):
        metropolis = self._metropolis
        target = self._target_accept_prob
        num_warmup = self._num_warmup
        _, da_update = dual_averaging()

        def step(state, model_args, model_kwargs):
            key, key_draw = jax.random.split(state.rng_key)
            z_flat, unravel = ravel_pytree(state.z)
            g_flat, _ = ravel_pytree(state.z_grad)
            dtype = z_flat.dtype
            eta = state.step_size.astype(dtype)
            # one draw of d + 1 uniforms on (-1, 1): the noise by the inverse normal CDF (as
            # jax.random.normal makes it) and the acceptance uniform from the last one
            low = np.nextafter(np.asarray(-1.0, dtype), np.asarray(0.0, dtype))
            u01 = jax.random.uniform(key_draw, (z_flat.shape[0] + 1,), dtype, minval=low, maxval=1.0)
            noise = np.sqrt(2.0).astype(dtype) * jax.scipy.special.erfinv(u01[:-1])
            # x' = x + eta/2 grad log p(x) + sqrt(eta) eps, with grad log p = -grad U
            prop_flat = z_flat - 0.5 * eta * g_flat + jnp.sqrt(eta) * noise
            prop = unravel(prop_flat)
            u_new, g_new = jax.value_and_grad(potential)(prop, model_args, model_kwargs)
            if metropolis:
                g_new_flat, _ = ravel_pytree(g_new)
                # log q(x' | x) - log q(x | x') for q(b | a) = N(b; a - eta/2 grad U(a), eta I)
                fwd = jnp.sum(noise**2) / 2.0
                back = z_flat - prop_flat + 0.5 * eta * g_new_flat  # x - (x' - eta/2 grad U(x'))
                bwd = jnp.sum(back**2) / (2.0 * eta)
                log_ratio = state.potential_energy - u_new + fwd - bwd
                log_ratio = jnp.where(jnp.isfinite(log_ratio), log_ratio, -jnp.inf)
                accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0)).astype(state.accept_prob.dtype)
                accept = 0.5 * (u01[-1] + 1.0) < accept_prob
                z, u, g = jax.tree.map(
                    lambda new, old: jnp.where(accept, new, old),
                    (prop, u_new, g_new), (state.z, state.potential_energy, state.z_grad),
                )
            else:
                accept_prob = jnp.ones_like(state.accept_prob)
                z, u, g = prop, u_new, g_new
            i = state.i + 1
            step_size, adapt_state = state.step_size, state.adapt_state
            if adapt:  # the warm-up step: dual averaging on log eta
                adapt_state = da_update(target - accept_prob, adapt_state)
                tuned = jnp.exp(adapt_state[0]).astype(step_size.dtype)
                final = jnp.exp(adapt_state[1]).astype(step_size.dtype)  # the averaged log step size
                step_size = jnp.where(i < num_warmup, tuned, final)
            # the running mean of the acceptance probability, restarted after warm-up
            n = jnp.where(i > num_warmup, i - num_warmup, i).astype(accept_prob.dtype)
            mean_accept = state.mean_accept_prob + (accept_prob - state.mean_accept_prob) / n
            return LangevinState(i, z, u, g, accept_prob, mean_accept, step_size, adapt_state, key)

        return step


class ULA(_LangevinKernel):
    r"""The unadjusted Langevin algorithm as a NumPyro MCMC kernel (MATH.md D1).

    $$ x' = x + \frac{\eta}{2}\nabla_x\log p(x) + \sqrt{\eta}\,\epsilon,\qquad \epsilon\sim\mathcal N(0, I), $$

    every step kept. Cheap (one gradient per step) and biased: the chain's stationary law is
    p only as eta -> 0 (on N(0, 1) its variance is 1 / (1 - eta/4), checked in
    ``tests/test_langevin.py``). Use [MALA][probdiff.infer.MALA] for exact samples; ULA is the
    building block of annealed Langevin dynamics and of score-based samplers, where no
    density is available to accept or reject with.

    Args:
        model: a NumPyro model with continuous latent sites (they are moved in NumPyro's
            unconstrained space), or None when ``potential_fn`` is given.
        potential_fn: U(z) = -log p(z) up to a constant, on a pytree z; then ``MCMC.run``
            needs ``init_params``.
        step_size: eta > 0, fixed (ULA has no acceptance rate to tune it by).
        init_strategy: NumPyro's init strategy for a model's sites.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro.infer import MCMC
        >>> from probdiff.infer import ULA
        >>> mcmc = MCMC(ULA(potential_fn=lambda z: 0.5 * jnp.sum(z**2), step_size=0.1),
        ...             num_warmup=10, num_samples=100, progress_bar=False)
        >>> mcmc.run(jax.random.key(0), init_params=jnp.zeros(2))
        >>> mcmc.get_samples().shape
        (100, 2)
    """

    _metropolis = False

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        step_size: float = 0.01,
        init_strategy: Callable = init_to_uniform,
    ):
        super().__init__(model, potential_fn, step_size=step_size, adapt_step_size=False, init_strategy=init_strategy)

    def get_diagnostics_str(self, state):
        return f"step size {float(jnp.mean(state.step_size)):.2e}"


class MALA(_LangevinKernel):
    r"""The Metropolis-adjusted Langevin algorithm as a NumPyro MCMC kernel (MATH.md D1).

    Proposal x' = x + eta/2 grad log p(x) + sqrt(eta) eps, accepted with probability

    $$ a = \min\Big(1,\ \frac{p(x')\,\mathcal N(x;\,x'+\tfrac{\eta}{2}\nabla\log p(x'),\,\eta I)}
       {p(x)\,\mathcal N(x';\,x+\tfrac{\eta}{2}\nabla\log p(x),\,\eta I)}\Big), $$

    so p is exactly stationary (detailed balance) for every eta > 0. One gradient per step.

    Args:
        model: a NumPyro model with continuous latent sites, or None when ``potential_fn`` is given.
        potential_fn: U(z) = -log p(z) up to a constant, on a pytree z; then ``MCMC.run`` needs
            ``init_params``.
        step_size: eta > 0, the initial step size (the final one when ``adapt_step_size=False``).
        adapt_step_size: tune eta during warm-up by dual averaging toward ``target_accept_prob``
            (the averaged value is used from the first sample on).
        target_accept_prob: in (0, 1); 0.574 is optimal for MALA as the dimension grows.
        init_strategy: NumPyro's init strategy for a model's sites.

    The state records ``accept_prob``, ``mean_accept_prob``, ``step_size`` and
    ``potential_energy``: ask for them with ``MCMC.run(..., extra_fields=("accept_prob",))``.

    Examples:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import MCMC
        >>> from probdiff.infer import MALA
        >>> def model():
        ...     numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
        >>> mcmc = MCMC(MALA(model), num_warmup=200, num_samples=200, progress_bar=False)
        >>> mcmc.run(jax.random.key(0))
        >>> bool((mcmc.get_samples()["scale"] > 0).all())
        True
    """


class BlackJAXState(NamedTuple):
    """The state of a [BlackJAXKernel][probdiff.infer.BlackJAXKernel] chain.

    Attributes:
        i: the iteration.
        z: the position (the unconstrained values of the model's latent sites).
        potential_energy: U(z) = -log p(z).
        accept_prob: the blackjax info's ``acceptance_rate`` when it has one, else 1.
        inner: blackjax's own state.
        rng_key: the chain's key.
    """

    i: jax.Array
    z: object
    potential_energy: jax.Array
    accept_prob: jax.Array
    inner: object
    rng_key: jax.Array


class BlackJAXKernel(_LangevinKernel):
    r"""Any blackjax sampling algorithm as a NumPyro MCMC kernel.

    blackjax writes a sampler as ``algorithm = make(logdensity_fn, ...)`` with
    ``algorithm.init(position)`` and ``algorithm.step(key, state) -> (state, info)``; this kernel
    gives it a NumPyro model's log density log p(z) = -U(z) in the unconstrained space (or your
    ``potential_fn``), so that ``numpyro.infer.MCMC`` (vectorised chains, progress bar,
    ``arviz.from_numpyro``) runs it. Step sizes are fixed: blackjax's adaptation routines run
    outside a kernel.

    Args:
        make_algorithm: ``make_algorithm(logdensity_fn) -> blackjax.SamplingAlgorithm``, e.g.
            ``lambda logdensity: blackjax.mala(logdensity, step_size=0.05)`` (blackjax's MALA step
            size is eta/2 in this package's notation:
            x' = x + s grad log p + sqrt(2 s) eps).
        model: a NumPyro model with continuous latent sites, or None.
        potential_fn: U(z) = -log p(z) on a pytree z (``MCMC.run`` then needs ``init_params``).
        init_strategy: NumPyro's init strategy for a model's sites.

    Examples:
        >>> import blackjax, jax, jax.numpy as jnp
        >>> from numpyro.infer import MCMC
        >>> from probdiff.infer import BlackJAXKernel
        >>> kernel = BlackJAXKernel(lambda lp: blackjax.mala(lp, 0.1), potential_fn=lambda z: 0.5 * jnp.sum(z**2))
        >>> mcmc = MCMC(kernel, num_warmup=10, num_samples=50, progress_bar=False)
        >>> mcmc.run(jax.random.key(0), init_params=jnp.zeros(3))
        >>> mcmc.get_samples().shape
        (50, 3)
    """

    def __init__(
        self,
        make_algorithm: Callable,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        init_strategy: Callable = init_to_uniform,
    ):
        if not callable(make_algorithm):
            raise TypeError(f"make_algorithm must be callable make_algorithm(logdensity_fn); got {type(make_algorithm).__name__}")
        super().__init__(model, potential_fn, step_size=1.0, adapt_step_size=False, init_strategy=init_strategy)
        self._make_algorithm = make_algorithm

    def get_diagnostics_str(self, state):
        return f"acc. prob={float(jnp.mean(state.accept_prob)):.2f}"

    def _algorithm(self, potential, model_args, model_kwargs):
        algorithm = self._make_algorithm(lambda z: -potential(z, model_args, model_kwargs))
        if not (hasattr(algorithm, "init") and hasattr(algorithm, "step")):
            raise TypeError(
                "make_algorithm must return a blackjax SamplingAlgorithm (with init and step); "
                f"got {type(algorithm).__name__}"
            )
        return algorithm

    def _init_one(self, potential, z, key, model_args, model_kwargs):
        inner = self._algorithm(potential, model_args, model_kwargs).init(z)
        u = potential(z, model_args, model_kwargs)
        return BlackJAXState(jnp.zeros((), jnp.int32), z, u, jnp.ones((), jnp.result_type(u)), inner, key)

    def _make_step(self, potential):
        def step(state, model_args, model_kwargs):
            key, key_step = jax.random.split(state.rng_key)
            inner, info = self._algorithm(potential, model_args, model_kwargs).step(key_step, state.inner)
            z = inner.position
            u = -inner.logdensity if hasattr(inner, "logdensity") else potential(z, model_args, model_kwargs)
            acc = getattr(info, "acceptance_rate", jnp.ones_like(state.accept_prob))
            acc = jnp.asarray(acc, state.accept_prob.dtype)
            return BlackJAXState(state.i + 1, z, u.astype(state.potential_energy.dtype), acc, inner, key)

        return step
