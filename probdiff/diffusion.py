r"""The Gaussian diffusion model: a distribution over x_0, a NumPyro model and its guide.

[GaussianDiffusion][probdiff.GaussianDiffusion] ties an eps-function and a schedule into

* a NumPyro ``Distribution`` over x_0, whose ``log_prob`` is the ELBO (a lower bound on
  log p_theta(x_0)) and whose ``sample`` is ancestral sampling, so it composes with any
  other sample site of a NumPyro model;
* a generative ``model`` (the reverse chain) and its ``guide`` (the forward chain), on
  which ``numpyro.infer.Trace_ELBO``, ``SVI`` and ``Predictive`` work unchanged;
* the ELBO in nats by its two decompositions, B2 (denoising matching, analytic KLs) and
  B3 (consistency terms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.kl import kl_divergence

from probdiff._checks import check_event, check_event_shape, check_finite
from probdiff.distributions.chains import (
    ForwardChain,
    ReverseChain,
    map_over_t,
    resolve_chunk_size,
    sum_over_t,
)
from probdiff.distributions.kernels import (
    PARAMETERIZATIONS,
    VARIANCES,
    p_step,
    posterior_mean,
    prediction_target,
    q_marginal,
    q_posterior,
    q_step,
    reverse_moments,
)
from probdiff.schedules import Schedule

__all__ = ["GaussianDiffusion", "ELBOTerms", "ConsistencyTerms", "SampleResult", "StepTerms"]


class ELBOTerms(NamedTuple):
    r"""The three parts of the ELBO by MATH.md B2, in nats, one value per example.

    $$ \mathrm{ELBO} = \underbrace{\mathbb{E}_{q(x_1|x_0)}\log p_\theta(x_0|x_1)}_{\texttt{reconstruction}}
       - \underbrace{\mathrm{KL}\big(q(x_T|x_0)\,\|\,p(x_T)\big)}_{\texttt{prior\_matching}}
       - \sum_{t=2}^{T}\underbrace{\mathbb{E}_{q(x_t|x_0)}\mathrm{KL}\big(q(x_{t-1}|x_t,x_0)\,\|\,
       p_\theta(x_{t-1}|x_t)\big)}_{\texttt{denoising\_matching}[\dots,\,t-2]} $$

    Attributes:
        reconstruction: log p_theta(x_0 | x_1) at one x_1 ~ q(x_1 | x_0); shape ``batch``.
        prior_matching: KL(q(x_T | x_0) || N(0, I)), exact; shape ``batch``.
        denoising_matching: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) at one
            x_t ~ q(x_t | x_0) for each t = 2..T; shape ``batch + (T - 1,)``, entry
            ``[..., t - 2]`` belongs to t.
    """

    reconstruction: jax.Array
    prior_matching: jax.Array
    denoising_matching: jax.Array

    @property
    def total(self) -> jax.Array:
        """The ELBO: reconstruction - prior_matching - sum_t denoising_matching."""
        return self.reconstruction - self.prior_matching - jnp.sum(self.denoising_matching, axis=-1)


class ConsistencyTerms(NamedTuple):
    r"""The parts of the ELBO by MATH.md B3 (the notes' ``004_*`` appendix), in nats.

    Regrouping log p_theta(x_{0:T}) - log q(x_{1:T} | x_0) by x_t instead of by
    q(x_{t-1} | x_t, x_0) gives

    $$ \mathrm{ELBO} = \mathbb{E}\log p_\theta(x_0|x_1)
       - \mathbb{E}_{q(x_{T-1}|x_0)}\mathrm{KL}\big(q(x_T|x_{T-1})\,\|\,p(x_T)\big)
       - \sum_{t=1}^{T-1}\mathbb{E}_{q(x_{t-1},x_t,x_{t+1}|x_0)}
       \big[\log q(x_t|x_{t-1}) - \log p_\theta(x_t|x_{t+1})\big]. $$

    The notes write each consistency term as
    E_{q(x_{t-1}, x_{t+1} | x_0)} KL(q(x_t | x_{t-1}) || p_theta(x_t | x_{t+1})). That is not
    the same number: inside the expectation x_t is drawn given both neighbours, not from
    q(x_t | x_{t-1}) alone, so no closed-form KL appears. probdiff evaluates the exact
    regrouping on one forward chain; its expectation equals the B2 ELBO (checked in
    ``tests/test_diffusion.py``). Its spread differs from B2's, and which is larger depends
    on the model; ``examples/gaussian_elbo.py`` measures both.

    Attributes:
        reconstruction: log p_theta(x_0 | x_1) at the chain's x_1; shape ``batch``.
        prior_matching: KL(q(x_T | x_{T-1}) || N(0, I)) at the chain's x_{T-1}; ``batch``.
        consistency: log q(x_t | x_{t-1}) - log p_theta(x_t | x_{t+1}) for t = 1..T-1;
            shape ``batch + (T - 1,)``, entry ``[..., t - 1]`` belongs to t.
    """

    reconstruction: jax.Array
    prior_matching: jax.Array
    consistency: jax.Array

    @property
    def total(self) -> jax.Array:
        """The single-chain ELBO estimate: reconstruction - prior_matching - sum_t consistency."""
        return self.reconstruction - self.prior_matching - jnp.sum(self.consistency, axis=-1)


class SampleResult(NamedTuple):
    """What [GaussianDiffusion.sample][probdiff.GaussianDiffusion.sample] returns with a trajectory.

    Attributes:
        x_0: the samples, shape ``sample_shape + event_shape``.
        trajectory: x_T, x_{T-1}, ..., x_0 on a leading axis of length T + 1
            (``trajectory[k]`` is x_{T-k}).
    """

    x_0: jax.Array
    trajectory: jax.Array


class StepTerms(NamedTuple):
    r"""The loss of one diffusion step t at one draw x_t = sqrt(alpha_bar_t) x_0 + sqrt(1-alpha_bar_t) eps.

    Attributes:
        vlb: L_t, the step's share of the negative ELBO (MATH.md B2, C1, C3):
            KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t >= 2 and the decoder's
            -log p_theta(x_0 | x_1) for t = 1; shape ``batch``.
        simple: ||eps - eps_theta(x_t, t)||^2 summed over the event, DDPM's L_simple
            (Algorithm 1); for a network that predicts x_0 or v, the same squared error in
            that parameterization, ||x_0 - x_theta||^2 or ||v - v_theta||^2; shape ``batch``.
    """

    vlb: jax.Array
    simple: jax.Array


def _plates(batch_shape, name: str):
    """Nested ``numpyro.plate`` contexts, one per batch dimension (rightmost is dim -1)."""
    import contextlib

    stack = contextlib.ExitStack()
    for i, size in enumerate(reversed(tuple(batch_shape))):
        stack.enter_context(numpyro.plate(f"{name}_batch_{i}", size, dim=-1 - i))
    return stack


class GaussianDiffusion(dist.Distribution):
    r"""A DDPM-style Gaussian diffusion model over x_0, as a NumPyro distribution.

    Generative model (the reverse chain, MATH.md B1, C2, C4):

    $$ p_\theta(x_{0:T}) = \mathcal{N}(x_T;0,I)\prod_{t=1}^{T}\mathcal{N}\big(x_{t-1};\
       \mu_\theta(x_t,t),\ \sigma_t^2 I\big),\quad
       \mu_\theta = \frac{1}{\sqrt{\alpha_t}}\Big(x_t-\frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,
       \epsilon_\theta(x_t,t)\Big). $$

    Guide (the forward chain, no parameters): q(x_{1:T} | x_0) = prod_t N(sqrt(1-beta_t)
    x_{t-1}, beta_t I).

    As a distribution over x_0, ``log_prob(x_0)`` is **the ELBO**, a stochastic lower bound
    on log p_theta(x_0) (MATH.md B2, one x_t per t, analytic KLs), not the exact
    log-likelihood; ``sample`` is ancestral sampling. So
    ``numpyro.sample("x", diffusion, obs=x)`` adds the ELBO of ``x`` to the model's log
    density and ``numpyro.sample("x", diffusion)`` draws x_0, with other sample sites
    around it. ``log_prob`` needs randomness: a GaussianDiffusion built inside a seeded
    NumPyro model (under ``SVI``, ``Predictive``, ``seed(model, key)``) draws a fresh key
    from the seed handler each time the model runs. A fixed ``rng_key`` is for one-off
    evaluation only: under SVI it would freeze the ELBO's noise across steps. With neither,
    ``log_prob`` raises. [DiffusionELBO][probdiff.infer.DiffusionELBO] draws its own keys.
    (NumPyro's HMC/NUTS need a deterministic potential, which the ELBO is not.)

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps``, any JAX callable returning an array shaped like
            ``x_t``; ``x_t`` has shape ``batch + event_shape`` and ``t`` is an integer array
            in 1..T that broadcasts over ``batch`` (a scalar or one t per example). A network
            from ``numpyro.contrib.module``, an Equinox/Flax module or a plain function.
        schedule: the noise schedule ([probdiff.schedules][probdiff.schedules]).
        event_shape: shape of one data point x_0, e.g. ``(2,)`` or ``(8, 8, 1)``.
        variance: sigma_t^2 of the reverse kernels, ``"beta"`` (sigma_t^2 = beta_t),
            ``"beta_tilde"`` (sigma_t^2 = beta_tilde_t for t >= 2; the decoder
            p_theta(x_0 | x_1) then uses beta_1, since beta_tilde_1 = 0) or ``"learned"``
            (the network returns ``(prediction, v)`` and log sigma_t^2 interpolates between
            log beta_t and log beta_tilde_t, see
            [learned_log_variance][probdiff.distributions.learned_log_variance]).
        parameterization: what the network predicts: ``"eps"`` (default), ``"x0"`` or
            ``"v"`` = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0; every formula goes
            through the eps it implies
            ([eps_from_prediction][probdiff.distributions.eps_from_prediction]).
        rng_key: optional fixed key for ``log_prob`` outside a ``seed`` handler, for one-off
            evaluation (not for training: every call would reuse the same noise).
        chunk_size: how many t the ELBO evaluates together: ``"auto"`` (default: by backend
            and data size, about 2048 scalars of x_t at a time on CPU), ``None`` (all T at once) or an
            int; see [map_over_t][probdiff.distributions.map_over_t]. ``elbo``'s memory is
            that of one chunk whatever T; ``elbo_terms`` also keeps its T - 1 KLs per example.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff import GaussianDiffusion, schedules
        >>> d = GaussianDiffusion(lambda x, t: jnp.zeros_like(x), schedules.linear(100), (2,))
        >>> d.elbo(jax.random.key(0), jnp.zeros((5, 2))).shape
        (5,)
        >>> d.sample(jax.random.key(1), (3,)).shape
        (3, 2)
    """

    arg_constraints = {}
    pytree_data_fields = ("schedule", "rng_key")
    pytree_aux_fields = ("eps_fn", "variance_kind", "parameterization", "chunk_size")

    def __init__(
        self,
        eps_fn: Callable,
        schedule: Schedule,
        event_shape,
        variance: str = "beta",
        *,
        parameterization: str = "eps",
        rng_key=None,
        chunk_size="auto",
        validate_args=None,
    ):
        if not callable(eps_fn):
            raise TypeError(f"eps_fn must be a callable eps_fn(x_t, t); got {type(eps_fn).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be a probdiff.schedules.Schedule; got {type(schedule).__name__}"
            )
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
        event_shape = check_event_shape(event_shape)
        resolve_chunk_size(chunk_size, schedule.num_steps, 1)  # validates
        if rng_key is None and numpyro.primitives._PYRO_STACK:
            # Built inside a seeded model (SVI, Predictive, seed(...)): take this run's key now,
            # because NumPyro scores observed sites after the handlers have exited.
            rng_key = numpyro.prng_key()
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.variance_kind = variance
        self.parameterization = parameterization
        self.rng_key = rng_key
        self.chunk_size = chunk_size
        super().__init__((), event_shape, validate_args=validate_args)

    # ------------------------------------------------------------------ basics
    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.schedule.num_steps

    @property
    def event_ndim(self) -> int:
        """Number of dimensions of one data point."""
        return len(self.event_shape)

    @property
    def event_size(self) -> int:
        """D, the number of scalars in one data point (for bits per dimension)."""
        return math.prod(self.event_shape)

    def _check_x0(self, x_0, name: str = "x_0"):
        x_0 = check_event(x_0, self.event_shape, name)
        return check_finite(x_0, name)

    def _p_step(self, t, x_t):
        """p_theta(x_{t-1} | x_t) with this model's variance and parameterization."""
        return p_step(
            self.eps_fn, self.schedule, t, x_t, variance=self.variance_kind,
            parameterization=self.parameterization, event_ndim=self.event_ndim,
        )

    def _moments(self, t, x_t):
        return reverse_moments(
            self.eps_fn, self.schedule, t, x_t, variance=self.variance_kind,
            parameterization=self.parameterization, event_ndim=self.event_ndim,
        )

    # -------------------------------------------------------------- the ELBO
    def elbo_terms(self, rng_key, x_0) -> ELBOTerms:
        r"""The B2 decomposition of the ELBO, in nats (see [ELBOTerms][probdiff.ELBOTerms]).

        Each expectation over x_t uses one draw x_t = sqrt(alpha_bar_t) x_0 +
        sqrt(1 - alpha_bar_t) eps_t, independently for each t and each example; the KLs
        between Gaussians are exact (``numpyro.distributions.kl.kl_divergence``). The
        estimate is unbiased; its expectation is checked against the closed form for
        Gaussian data in ``tests/test_diffusion.py``.

        Args:
            rng_key: a JAX PRNG key.
            x_0: data, shape ``batch + event_shape``.
        """
        rec, prior, denoising, T = self._elbo_parts(rng_key, x_0)
        if T == 1:
            return ELBOTerms(rec, prior, jnp.zeros(rec.shape + (0,), rec.dtype))
        kls = map_over_t(denoising, jnp.arange(2, T + 1), self.chunk_size, elements_per_t=jnp.size(x_0))
        return ELBOTerms(rec, prior, jnp.moveaxis(kls, 0, -1))

    def _elbo_parts(self, rng_key, x_0):
        """Reconstruction, prior matching, and the per-t denoising KL as a function of t."""
        x_0 = self._check_x0(x_0)
        s = self.schedule
        nd = self.event_ndim
        T = s.num_steps
        key_rec, key_den = jax.random.split(rng_key)

        # Reconstruction: log p_theta(x_0 | x_1), x_1 ~ q(x_1 | x_0).
        x_1 = q_marginal(s, 1, x_0, event_ndim=nd).sample(key_rec)
        reconstruction = self._p_step(1, x_1).log_prob(x_0)

        # Prior matching: KL(q(x_T | x_0) || N(0, I)).
        q_T = q_marginal(s, T, x_0, event_ndim=nd)
        prior = dist.Normal(jnp.zeros_like(x_0), jnp.ones_like(x_0)).to_event(nd)
        prior_matching = kl_divergence(q_T, prior)

        # Denoising matching: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), t = 2..T.
        def denoising(t):
            x_t = q_marginal(s, t, x_0, event_ndim=nd).sample(jax.random.fold_in(key_den, t))
            q_post = q_posterior(s, t, x_t, x_0, event_ndim=nd)
            return kl_divergence(q_post, self._p_step(t, x_t))

        return reconstruction, prior_matching, denoising, T

    def elbo(self, rng_key, x_0) -> jax.Array:
        r"""The per-example ELBO in nats (MATH.md B2), a lower bound on log p_theta(x_0).

        $$ \mathrm{ELBO}(x_0) = \mathbb{E}_{q(x_1|x_0)}\log p_\theta(x_0|x_1)
           - \mathrm{KL}(q(x_T|x_0)\,\|\,p(x_T))
           - \sum_{t=2}^T \mathbb{E}_{q(x_t|x_0)}\mathrm{KL}(q(x_{t-1}|x_t,x_0)\,\|\,p_\theta(x_{t-1}|x_t)) $$

        summed over all t with one x_t ~ q(x_t | x_0) per t (an unbiased estimate).

        Args:
            rng_key: a JAX PRNG key.
            x_0: data, shape ``batch + event_shape``.

        The sum over t is accumulated chunk by chunk
        ([sum_over_t][probdiff.distributions.sum_over_t]), so memory does not grow with T; the
        draws are those of [elbo_terms][probdiff.GaussianDiffusion.elbo_terms], whose ``total``
        is the same number up to the order of the float additions.

        Returns:
            The ELBO of each example, shape ``batch``.
        """
        rec, prior, denoising, T = self._elbo_parts(rng_key, x_0)
        if T == 1:
            return rec - prior
        kl_sum = sum_over_t(denoising, jnp.arange(2, T + 1), self.chunk_size, elements_per_t=jnp.size(x_0))
        return rec - prior - kl_sum

    def step_terms(self, rng_key, x_0, t, *, stop_gradient_mean: bool = False) -> StepTerms:
        r"""The loss of step t for each example, at one draw of x_t (MATH.md C1-C3).

        $$ x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\qquad
           L_t = \begin{cases}-\log p_\theta(x_0\mid x_1) & t = 1\\
           \mathrm{KL}\big(q(x_{t-1}\mid x_t,x_0)\,\|\,p_\theta(x_{t-1}\mid x_t)\big) & t\ge 2\end{cases},
           \qquad L_{\text{simple}} = \|\epsilon-\epsilon_\theta(x_t,t)\|^2 . $$

        One call of eps_fn per example. E[L_t] over x_t is the t-th term of the negative B2
        ELBO, so ELBO = -KL(q(x_T | x_0) || p(x_T)) - sum_t E[L_t]; the KL is exact
        (``numpyro.distributions.kl.kl_divergence``). Checked against the closed form for
        Gaussian data in ``tests/test_sampled_t.py``. For a network that predicts x_0 or v,
        L_simple is the squared error of that prediction
        ([prediction_target][probdiff.distributions.prediction_target]).

        Args:
            rng_key: a JAX PRNG key (draws eps).
            x_0: data, shape ``batch + event_shape``.
            t: integer steps in 1..T, broadcasting over ``batch`` (one t per example, or one
                for all).
            stop_gradient_mean: compute L_t with ``lax.stop_gradient`` on mu_theta, so that
                L_t trains only a learned variance (improved DDPM's hybrid objective).

        Returns:
            [StepTerms][probdiff.StepTerms] with arrays of shape ``batch``.
        """
        from probdiff._checks import check_t

        x_0 = self._check_x0(x_0)
        s = self.schedule
        nd = self.event_ndim
        batch = x_0.shape[: x_0.ndim - nd]
        t = jnp.broadcast_to(check_t(t, s.num_steps), batch)
        eps = jax.random.normal(rng_key, x_0.shape, x_0.dtype)
        q_t = q_marginal(s, t, x_0, event_ndim=nd)
        x_t = q_t.mean + jnp.sqrt(q_t.variance) * eps
        m = self._moments(t, x_t)
        target = prediction_target(s, t, x_0, eps, self.parameterization, event_ndim=nd)
        simple = jnp.sum(jnp.reshape((target - m.prediction) ** 2, batch + (-1,)), axis=-1)

        mean = jax.lax.stop_gradient(m.mean) if stop_gradient_mean else m.mean
        p = dist.Normal(mean, jnp.broadcast_to(jnp.sqrt(m.variance), mean.shape)).to_event(nd)
        decoder_nll = -p.log_prob(x_0)
        # The posterior at t = 1 is a point mass; give that unused branch a unit variance so
        # that neither its value nor its gradient is NaN.
        is_first = t == 1
        beta_tilde = jnp.where(is_first, 1.0, s.beta_tilde[jnp.maximum(t, 2)]).astype(x_0.dtype)
        q_loc = posterior_mean(s, jnp.maximum(t, 2), x_t, x_0, event_ndim=nd)
        q_scale = jnp.broadcast_to(jnp.sqrt(jnp.reshape(beta_tilde, batch + (1,) * nd)), q_loc.shape)
        kl = kl_divergence(dist.Normal(q_loc, q_scale).to_event(nd), p)
        return StepTerms(jnp.where(is_first, decoder_nll, kl), simple)

    def elbo_sampled_t(self, rng_key, x_0, num_t: int = 1) -> jax.Array:
        r"""An unbiased ELBO estimate from ``num_t`` uniformly drawn steps per example (MATH.md C3).

        $$ \widehat{\mathrm{ELBO}} = -\mathrm{KL}\big(q(x_T\mid x_0)\,\|\,p(x_T)\big)
           - \frac{T}{K}\sum_{k=1}^{K} L_{t_k},\qquad t_k\sim\mathcal{U}\{1,\dots,T\}, $$

        with L_t from [step_terms][probdiff.GaussianDiffusion.step_terms] and K = ``num_t``.
        K network calls per example instead of T: the estimator of choice for training. Its
        mean is the ELBO (``tests/test_sampled_t.py``); its variance is larger than that of
        [elbo][probdiff.GaussianDiffusion.elbo].

        Args:
            rng_key: a JAX PRNG key.
            x_0: data, shape ``batch + event_shape``.
            num_t: K >= 1, steps drawn per example.
        """
        if isinstance(num_t, bool) or not isinstance(num_t, int) or num_t < 1:
            raise ValueError(f"num_t must be an integer >= 1; got {num_t!r}")
        x_0 = self._check_x0(x_0)
        s = self.schedule
        nd = self.event_ndim
        T = s.num_steps
        batch = x_0.shape[: x_0.ndim - nd]
        key_t, key_x = jax.random.split(rng_key)
        ts = jax.random.randint(key_t, (num_t,) + batch, 1, T + 1)

        def one(k, t):
            return self.step_terms(k, x_0, t).vlb

        losses = jax.vmap(one)(jax.random.split(key_x, num_t), ts)
        q_T = q_marginal(s, T, x_0, event_ndim=nd)
        prior = dist.Normal(jnp.zeros_like(x_0), jnp.ones_like(x_0)).to_event(nd)
        return -kl_divergence(q_T, prior) - T * jnp.mean(losses, axis=0)

    def bits_per_dim(self, rng_key, x_0) -> jax.Array:
        r"""The negative ELBO in bits per dimension: -ELBO(x_0) / (D log 2), D = ``event_size``.

        An upper bound on -log2 p_theta(x_0) / D. For continuous x_0 this is a density; for
        discrete data (pixels) dequantise first, so that densities and probabilities agree.
        """
        return -self.elbo(rng_key, x_0) / (self.event_size * math.log(2.0))

    def elbo_consistency_terms(self, rng_key, x_0) -> ConsistencyTerms:
        r"""The B3 decomposition of the ELBO on one forward chain (see [ConsistencyTerms][probdiff.ConsistencyTerms]).

        Draws x_{1:T} ~ q(x_{1:T} | x_0) once and regroups
        log p_theta(x_{0:T}) - log q(x_{1:T} | x_0) into the reconstruction, the prior
        matching KL(q(x_T | x_{T-1}) || p(x_T)) (exact given x_{T-1}) and the T - 1
        consistency terms. Same expectation as [elbo_terms][probdiff.GaussianDiffusion.elbo_terms],
        a different spread.
        """
        x_0 = self._check_x0(x_0)
        s = self.schedule
        nd = self.event_ndim
        T = s.num_steps
        chain = ForwardChain(s, x_0, event_ndim=nd).sample(rng_key)
        xs = jnp.moveaxis(chain, -(nd + 1), 0)  # xs[t - 1] = x_t, t = 1..T
        x_all = jnp.concatenate([x_0[None], xs], axis=0)  # x_all[t] = x_t, t = 0..T

        reconstruction = self._p_step(1, x_all[1]).log_prob(x_0)
        prior = dist.Normal(jnp.zeros_like(x_0), jnp.ones_like(x_0)).to_event(nd)
        prior_matching = kl_divergence(q_step(s, T, x_all[T - 1], event_ndim=nd), prior)

        def consistency(t):
            log_q = q_step(s, t, x_all[t - 1], event_ndim=nd).log_prob(x_all[t])
            return log_q - self._p_step(t + 1, x_all[t + 1]).log_prob(x_all[t])

        if T == 1:
            terms = jnp.zeros(x_0.shape[: x_0.ndim - nd] + (0,), x_0.dtype)
        else:
            terms = map_over_t(consistency, jnp.arange(1, T), self.chunk_size, elements_per_t=x_0.size)
            terms = jnp.moveaxis(terms, 0, -1)
        return ConsistencyTerms(reconstruction, prior_matching, terms)

    # ----------------------------------------------------- as a distribution
    def log_prob(self, value):
        """The ELBO of ``value`` (a lower bound on log p_theta(x_0)); see the class docstring."""
        key = self.rng_key
        if key is None:
            key = numpyro.prng_key() if numpyro.primitives._PYRO_STACK else None
        if key is None:
            raise RuntimeError(
                "GaussianDiffusion.log_prob is the ELBO, an estimate that needs randomness, and this "
                "GaussianDiffusion has no key: build it inside the NumPyro model (it then takes a fresh "
                "key from the seed handler that SVI and Predictive apply), train with "
                "probdiff.infer.DiffusionELBO (it draws its own keys), or for a one-off evaluation call "
                ".elbo(rng_key, x_0) or pass rng_key=... to GaussianDiffusion."
            )
        return self.elbo(key, value)

    def sample(self, key, sample_shape=(), *, return_trajectory: bool = False, final_noise: bool = False):
        r"""Ancestral sampling, Algorithm 2 of Ho et al. (MATH.md C4), by ``lax.scan``.

        $$ x_T\sim\mathcal{N}(0,I);\quad x_{t-1} = \mu_\theta(x_t,t) + \sigma_t z,\
           z\sim\mathcal{N}(0,I)\ \text{for } t>1,\ z=0 \text{ for } t=1. $$

        Args:
            key: a JAX PRNG key.
            sample_shape: leading shape of the batch of samples.
            return_trajectory: also return every x_t (memory grows with T).
            final_noise: add sigma_1 z at t = 1 as well, which makes x_0 an exact draw of
                p_theta(x_0) rather than Algorithm 2's mean of p_theta(x_0 | x_1). The two
                differ by N(0, sigma_1^2 I) noise (sigma_1^2 = beta_1 = 1e-4 for DDPM's
                linear schedule).

        Returns:
            x_0 of shape ``sample_shape + event_shape``, or a
            [SampleResult][probdiff.SampleResult] with the trajectory.
        """
        s = self.schedule
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        key_T, key_steps = jax.random.split(key)
        x_T = jax.random.normal(key_T, shape, s.dtype)
        ts = jnp.arange(s.num_steps, 0, -1)

        def step(x_t, t):
            m = self._moments(t, x_t)
            z = jax.random.normal(jax.random.fold_in(key_steps, t), x_t.shape, x_t.dtype)
            if not final_noise:
                z = jnp.where(t == 1, 0.0, z)
            x_tm1 = (m.mean + jnp.sqrt(m.variance) * z).astype(x_t.dtype)  # keep the scan carry's dtype
            return x_tm1, (x_tm1 if return_trajectory else None)

        x_0, ys = jax.lax.scan(step, x_T, ts)
        if return_trajectory:
            return SampleResult(x_0, jnp.concatenate([x_T[None], ys], axis=0))
        return x_0

    # ------------------------------------------------ NumPyro model and guide
    def model(self, x_0=None, *, batch_shape=(), name: str = "x"):
        r"""The reverse chain as a NumPyro model (MATH.md B1).

        Two sample sites: ``f"{name}_1:T"``, the latents x_{1:T} ~ p_theta(x_{1:T})
        (a [ReverseChain][probdiff.distributions.ReverseChain] with ``t_end=1``; value shape
        ``batch + (T,) + event``, index i is x_{i+1}), and ``f"{name}_0"``, the decoder
        p_theta(x_0 | x_1), observed when ``x_0`` is given. Batch dimensions sit in
        ``numpyro.plate`` s named ``f"{name}_batch_{i}"``.

        With [guide][probdiff.GaussianDiffusion.guide], ``Trace_ELBO`` estimates
        E_q[log p_theta(x_{0:T}) - log q(x_{1:T} | x_0)], the same ELBO as
        [elbo][probdiff.GaussianDiffusion.elbo] by a single log-ratio of the whole chain
        (noisy for a poor model; nearly constant when p_theta(x_{1:T} | x_0) is close to
        q(x_{1:T} | x_0)).
        The whole chain is one site, so neither of NumPyro's chain traps applies
        (``scan(reverse=True)`` under replay; ``TraceMeanField_ELBO`` with a forward guide).

        Args:
            x_0: observed data of shape ``batch + event_shape``, or None to sample.
            batch_shape: batch shape when ``x_0`` is None.
            name: prefix of the site names.

        Returns:
            x_0 (observed or sampled).
        """
        nd = self.event_ndim
        if x_0 is not None:
            x_0 = self._check_x0(x_0)
            batch_shape = x_0.shape[: x_0.ndim - nd]
        batch_shape = tuple(batch_shape)
        latent = ReverseChain(
            self.eps_fn,
            self.schedule,
            self.event_shape,
            variance=self.variance_kind,
            parameterization=self.parameterization,
            t_end=1,
            batch_shape=batch_shape,
            chunk_size=self.chunk_size,
        )
        with _plates(batch_shape, name):
            x_1T = numpyro.sample(f"{name}_1:T", latent)
            x_1 = jnp.moveaxis(x_1T, -(nd + 1), 0)[0]
            return numpyro.sample(f"{name}_0", self._p_step(1, x_1), obs=x_0)

    def guide(self, x_0, *, name: str = "x"):
        r"""The forward chain q(x_{1:T} | x_0) as a NumPyro guide (MATH.md B1).

        One sample site ``f"{name}_1:T"`` drawn from
        [ForwardChain][probdiff.distributions.ForwardChain], matching
        [model][probdiff.GaussianDiffusion.model]. It has no parameters; a model with other
        latent sites pairs it with guides of its own for those sites.
        """
        nd = self.event_ndim
        x_0 = self._check_x0(x_0)
        batch_shape = x_0.shape[: x_0.ndim - nd]
        with _plates(batch_shape, name):
            return numpyro.sample(f"{name}_1:T", ForwardChain(self.schedule, x_0, event_ndim=nd))
