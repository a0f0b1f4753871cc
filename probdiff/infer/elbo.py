r"""ELBOs for SVI that estimate a diffusion's term by sampling t (MATH.md C3).

``numpyro.infer.Trace_ELBO`` scores an observed ``GaussianDiffusion`` site with its
``log_prob``, the full-T ELBO: T network calls per example. [DiffusionELBO][probdiff.infer.DiffusionELBO]
scores the same site with K uniformly drawn steps per example, an unbiased estimate at K
network calls (Algorithm 1 of Ho et al. when the weighting is ``"simple"``). Every other site
of the model and guide (a global scale, a latent class, a Bayesian layer) gets the usual
Trace_ELBO terms, so the diffusion composes with the rest of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.distribution import ExpandedDistribution, MaskedDistribution
from numpyro.infer import ELBO, Trace_ELBO
from numpyro.primitives import Messenger

from probdiff.diffusion import GaussianDiffusion

__all__ = ["DiffusionELBO", "WEIGHTINGS"]

#: The objectives [DiffusionELBO][probdiff.infer.DiffusionELBO] can put on a diffusion site.
WEIGHTINGS = ("vlb", "simple", "hybrid")


class _SampledT(dist.Distribution):
    """A GaussianDiffusion whose log_prob is a sampled-t objective (used by DiffusionELBO)."""

    arg_constraints = {}
    pytree_data_fields = ("diffusion", "rng_key")
    pytree_aux_fields = ("weighting", "num_t", "hybrid_weight")

    def __init__(self, diffusion, rng_key, weighting, num_t, hybrid_weight):
        self.diffusion = diffusion
        self.rng_key = rng_key
        self.weighting = weighting
        self.num_t = num_t
        self.hybrid_weight = hybrid_weight
        super().__init__(diffusion.batch_shape, diffusion.event_shape)

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return self.diffusion.support

    def sample(self, key, sample_shape=()):
        return self.diffusion.sample(key, sample_shape)

    def log_prob(self, value):
        d = self.diffusion
        if self.weighting == "vlb":
            return d.elbo_sampled_t(self.rng_key, value, self.num_t)
        nd = d.event_ndim
        batch = jnp.shape(value)[: jnp.ndim(value) - nd]
        key_t, key_x = jax.random.split(self.rng_key)
        ts = jax.random.randint(key_t, (self.num_t,) + batch, 1, d.num_steps + 1)
        terms = jax.vmap(lambda k, t: d.step_terms(k, value, t))(jax.random.split(key_x, self.num_t), ts)
        simple = jnp.mean(terms.simple, axis=0)
        if self.weighting == "simple":
            return -simple
        return -(simple + self.hybrid_weight * d.num_steps * jnp.mean(terms.vlb, axis=0))


class _SwapDiffusionSites(Messenger):
    """Replace the fn of every observed GaussianDiffusion site by its sampled-t objective."""

    def __init__(self, fn, rng_key, config):
        self.rng_key = rng_key
        self.config = config
        self.count = 0
        super().__init__(fn)

    def _swap(self, fn):
        if isinstance(fn, GaussianDiffusion):
            key = jax.random.fold_in(self.rng_key, self.count)
            self.count += 1
            return _SampledT(fn, key, **self.config)
        if isinstance(fn, ExpandedDistribution):
            base = self._swap(fn.base_dist)
            return fn if base is fn.base_dist else ExpandedDistribution(base, fn.batch_shape)
        if isinstance(fn, MaskedDistribution):
            base = self._swap(fn.base_dist)
            return fn if base is fn.base_dist else MaskedDistribution(base, fn._mask)
        return fn

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["fn"] = self._swap(msg["fn"])


class DiffusionELBO(ELBO):
    r"""-ELBO for ``SVI`` with every observed diffusion site estimated by sampling t (MATH.md C3).

    For an observed site ``numpyro.sample("x", diffusion, obs=x_0)`` the log-density is
    replaced by one of

    * ``"vlb"``: the unbiased ELBO estimate
      $$ -\mathrm{KL}(q(x_T|x_0)\,\|\,p(x_T)) - \frac{T}{K}\sum_{k} L_{t_k},\quad
         t_k\sim\mathcal{U}\{1..T\}, $$
      with the exact per-step KLs L_t of
      [step_terms][probdiff.GaussianDiffusion.step_terms] (Rao-Blackwellised: no Monte-Carlo
      log-ratio over the chain). The loss is then an unbiased estimate of -ELBO;
    * ``"simple"``: $-\frac1K\sum_k\|\epsilon-\epsilon_\theta(x_{t_k},t_k)\|^2$, DDPM's
      L_simple (Algorithm 1). Not a bound: the loss is the L_simple objective;
    * ``"hybrid"``: $-\big(L_{\text{simple}} + \lambda\,\frac{T}{K}\sum_k L_{t_k}\big)$ with
      $\lambda$ = ``hybrid_weight`` (improved DDPM uses 0.001).

    All other sites get the terms of ``Trace_ELBO``: log p - log q of latent sites, log p of
    other observed sites. The t and x_t draws come from the loss's own key, so the diffusion
    may be built inside or outside the model.

    Args:
        weighting: ``"vlb"``, ``"simple"`` or ``"hybrid"``.
        num_t: K >= 1, steps drawn per example and step of SVI.
        hybrid_weight: lambda of the hybrid objective, >= 0.
        num_particles: particles of the surrounding Trace_ELBO.

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, optax
        >>> from numpyro.infer import SVI
        >>> from probdiff import GaussianDiffusion, schedules
        >>> from probdiff.infer import DiffusionELBO
        >>> s = schedules.linear(100)
        >>> def model(x):
        ...     c = numpyro.param("c", 0.0)
        ...     d = GaussianDiffusion(lambda x_t, t: c * x_t, s, (2,))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", d, obs=x)
        >>> svi = SVI(model, lambda x: None, optax.adam(0.05), DiffusionELBO())
        >>> result = svi.run(jax.random.key(0), 200, jnp.zeros((64, 2)), progress_bar=False)
        >>> bool(result.losses[-20:].mean() < result.losses[:20].mean())
        True
    """

    can_infer_discrete = False

    def __init__(self, weighting: str = "vlb", *, num_t: int = 1, hybrid_weight: float = 1e-3, num_particles: int = 1):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
        if isinstance(num_t, bool) or not isinstance(num_t, int) or num_t < 1:
            raise ValueError(f"num_t must be an integer >= 1; got {num_t!r}")
        if not hybrid_weight >= 0:
            raise ValueError(f"hybrid_weight must be >= 0; got {hybrid_weight}")
        super().__init__(num_particles=num_particles)
        self.weighting = weighting
        self.num_t = num_t
        self.hybrid_weight = float(hybrid_weight)
        self._trace_elbo = Trace_ELBO()

    def _single_particle(self, rng_key, param_map, model, guide, *args, **kwargs):
        key_elbo, key_diff = jax.random.split(rng_key)
        config = {"weighting": self.weighting, "num_t": self.num_t, "hybrid_weight": self.hybrid_weight}
        swapped = _SwapDiffusionSites(model, key_diff, config)
        return self._trace_elbo.loss_with_mutable_state(key_elbo, param_map, swapped, guide, *args, **kwargs)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """-ELBO (or the chosen surrogate) as ``{"loss": ..., "mutable_state": ...}``.

        With several particles each draws its own t, x_t and guide sample; the loss is their
        mean (mutable state is not supported then, as in ``Trace_ELBO``).
        """
        if self.num_particles == 1:
            return self._single_particle(rng_key, param_map, model, guide, *args, **kwargs)

        def one(key):
            return self._single_particle(key, param_map, model, guide, *args, **kwargs)["loss"]

        losses = jax.vmap(one)(jax.random.split(rng_key, self.num_particles))
        return {"loss": jnp.mean(losses), "mutable_state": None}
