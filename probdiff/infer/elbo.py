r"""ELBOs for SVI that estimate a diffusion's term by sampling t (MATH.md C3).

``numpyro.infer.Trace_ELBO`` scores an observed ``GaussianDiffusion`` site with its
``log_prob``, the full-T ELBO: T network calls per example. [DiffusionELBO][probdiff.infer.DiffusionELBO]
scores the same site with K uniformly drawn steps per example, an unbiased estimate at K
network calls (Algorithm 1 of Ho et al. when the weighting is ``"simple"``). Every other site
of the model and guide (a global scale, a latent class, a Bayesian layer) gets the usual
Trace_ELBO terms, so the diffusion composes with the rest of the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.distribution import ExpandedDistribution, MaskedDistribution
from numpyro.distributions.kl import kl_divergence
from numpyro.infer import ELBO, Trace_ELBO
from numpyro.primitives import Messenger, mutable

from probdiff.diffusion import GaussianDiffusion
from probdiff.distributions.kernels import q_marginal

__all__ = ["DiffusionELBO", "WEIGHTINGS", "T_SAMPLINGS", "importance_probs", "with_loss_history"]

#: The objectives [DiffusionELBO][probdiff.infer.DiffusionELBO] can put on a diffusion site.
WEIGHTINGS = ("vlb", "simple", "hybrid")


#: How [DiffusionELBO][probdiff.infer.DiffusionELBO] draws t.
T_SAMPLINGS = ("uniform", "importance")

_HISTORY_SUFFIX = "$loss_history"


def _find_diffusion(fn):
    """The GaussianDiffusion inside ``fn`` (possibly wrapped by a plate's expand or a mask)."""
    while isinstance(fn, ExpandedDistribution | MaskedDistribution):
        fn = fn.base_dist
    return fn if isinstance(fn, GaussianDiffusion) else None


def importance_probs(history, *, uniform_mix: float = 1e-3) -> jax.Array:
    r"""The proposal over t of importance-sampled training (improved DDPM, Nichol & Dhariwal 2021, 3.3).

    $$ p_t \propto \sqrt{\mathbb{E}[L_t^2]},\qquad
       p_t \leftarrow (1-u)\,p_t + \frac{u}{T},\qquad t = 1..T, $$

    with E[L_t^2] the mean of the last H recorded squares of step t's loss and u =
    ``uniform_mix``. Until every t has H records the proposal is uniform. Minimising the
    variance of the estimate L_t / p_t of sum_t E[L_t] over p gives p_t proportional to
    sqrt(E[L_t^2]); the uniform part keeps every weight 1 / (T p_t) bounded by 1 / u.

    Args:
        history: the dict kept by [with_loss_history][probdiff.infer.with_loss_history]:
            ``"loss_sq"`` of shape ``(T, H)`` and ``"count"`` of shape ``(T,)``.
        uniform_mix: u in (0, 1].

    Returns:
        p_1..p_T, shape ``(T,)``; entry ``t - 1`` belongs to t.
    """
    if not 0 < uniform_mix <= 1:
        raise ValueError(f"uniform_mix must be in (0, 1]; got {uniform_mix}")
    loss_sq, count = history["loss_sq"], history["count"]
    T, H = loss_sq.shape
    rms = jnp.sqrt(jnp.mean(loss_sq, axis=-1))
    total = jnp.sum(rms)
    ready = jnp.all(count >= H) & (total > 0) & jnp.isfinite(total)
    p = rms / jnp.where(ready, total, 1.0)
    p = (1.0 - uniform_mix) * p + uniform_mix / T
    return jnp.where(ready, p, jnp.full((T,), 1.0 / T, loss_sq.dtype))


def _record(history, t, value):
    """Write value^2 into step t's ring buffer of the history (t, value: flat arrays, t in 1..T)."""
    loss_sq, count = history["loss_sq"], history["count"]
    T, H = loss_sq.shape
    idx = t - 1
    n = idx.shape[0]
    # Rank of each entry among the entries of the batch with the same t, so that repeated
    # t fill consecutive slots of the ring buffer instead of overwriting one slot.
    order = jnp.argsort(idx, stable=True)
    sorted_idx = idx[order]
    first = jnp.searchsorted(sorted_idx, sorted_idx, side="left")
    rank = jnp.zeros_like(idx).at[order].set(jnp.arange(n, dtype=idx.dtype) - first.astype(idx.dtype))
    slot = (count[idx] + rank) % H
    row = jnp.where(rank < H, idx, T)  # more than H repeats of one t in a batch: keep H
    value = jax.lax.stop_gradient(value).astype(loss_sq.dtype)
    history["loss_sq"] = loss_sq.at[row, slot].set(value**2, mode="drop")
    history["count"] = count.at[idx].add(1)


def with_loss_history(model: Callable, *, history: int = 10) -> Callable:
    r"""Give every observed diffusion site of ``model`` a history of its per-step losses.

    Importance sampling of t (``DiffusionELBO(t_sampling="importance")``) needs, for each t,
    the last H values of the step's loss, kept from one SVI step to the next. This wrapper
    adds to the model, next to each site ``numpyro.sample(name, diffusion, obs=...)``, a
    ``numpyro.mutable`` site ``name + "$loss_history"`` with

    * ``"loss_sq"``: shape ``(T, H)``, the last H squared losses of each t;
    * ``"count"``: shape ``(T,)``, how many were recorded for each t;

    which SVI carries in ``SVIState.mutable_state`` (so ``svi.run``,
    [fit][probdiff.training.fit] and checkpoints keep it), and from which
    [importance_probs][probdiff.infer.importance_probs] makes the proposal.

    Args:
        model: a NumPyro model with observed ``GaussianDiffusion`` sites.
        history: H >= 1, losses kept per t (improved DDPM uses 10).

    Returns:
        The wrapped model, same signature.
    """
    if not callable(model):
        raise TypeError(f"model must be callable; got {type(model).__name__}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"history must be an integer >= 1; got {history!r}")

    @functools.wraps(model)
    def wrapped(*args, **kwargs):
        with _AddHistory(history):
            return model(*args, **kwargs)

    return wrapped


class _AddHistory(Messenger):
    """Put a mutable loss-history site next to every observed GaussianDiffusion site."""

    def __init__(self, history: int):
        self.history = history
        super().__init__()

    def process_message(self, msg):
        if msg["type"] != "sample" or not msg["is_observed"]:
            return
        d = _find_diffusion(msg["fn"])
        if d is None:
            return
        dtype = jnp.result_type(float)
        init = {
            "loss_sq": jnp.zeros((d.num_steps, self.history), dtype),
            "count": jnp.zeros((d.num_steps,), jnp.int32),
        }
        hist = mutable(msg["name"] + _HISTORY_SUFFIX, init)
        msg["infer"] = {**(msg.get("infer") or {}), "loss_history": hist}


class _SampledT(dist.Distribution):
    """A GaussianDiffusion whose log_prob is a sampled-t objective (used by DiffusionELBO)."""

    arg_constraints = {}
    pytree_data_fields = ("diffusion", "rng_key", "probs")
    pytree_aux_fields = ("weighting", "num_t", "hybrid_weight")

    def __init__(self, diffusion, rng_key, weighting, num_t, hybrid_weight, probs=None, history=None):
        self.diffusion = diffusion
        self.rng_key = rng_key
        self.weighting = weighting
        self.num_t = num_t
        self.hybrid_weight = hybrid_weight
        self.probs = probs
        self.history = history  # a mutable site's dict, updated in place by log_prob
        super().__init__(diffusion.batch_shape, diffusion.event_shape)

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return self.diffusion.support

    def sample(self, key, sample_shape=()):
        return self.diffusion.sample(key, sample_shape)

    def log_prob(self, value):
        d = self.diffusion
        T = d.num_steps
        nd = d.event_ndim
        batch = jnp.shape(value)[: jnp.ndim(value) - nd]
        key_t, key_x = jax.random.split(self.rng_key)
        shape = (self.num_t,) + batch
        if self.probs is None:
            ts = jax.random.randint(key_t, shape, 1, T + 1)
            weight = jnp.ones(shape, jnp.result_type(float))
        else:
            # Inverse-CDF draw: one uniform per t instead of the T Gumbels of categorical.
            cdf = jnp.cumsum(self.probs)
            u = jax.random.uniform(key_t, shape, cdf.dtype) * cdf[-1]
            ts = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), T - 1) + 1
            weight = 1.0 / (T * self.probs[ts - 1])
        # With a learned variance, the hybrid objective trains the mean by L_simple only
        # and the variance by the VLB (improved DDPM, section 3.1).
        stop = self.weighting == "hybrid" and d.variance_kind == "learned"
        keys = jax.random.split(key_x, self.num_t)
        if self.num_t == 1:
            # No vmap of size 1: under it XLA lays out the network's backward products less well
            # (2-5% of a UNet training step on CPU, bench/README.md); same keys, same numbers.
            one = d.step_terms(keys[0], value, ts[0], stop_gradient_mean=stop)
            terms = jax.tree.map(lambda a: a[None], one)
        else:
            terms = jax.vmap(lambda k, t: d.step_terms(k, value, t, stop_gradient_mean=stop))(keys, ts)
        if self.weighting == "vlb":
            per_t = T * terms.vlb  # sum_t L_t estimated by T L_t under uniform t
        elif self.weighting == "simple":
            per_t = terms.simple
        else:
            per_t = terms.simple + self.hybrid_weight * T * terms.vlb
        if self.history is not None:
            _record(self.history, jnp.ravel(ts), jnp.ravel(per_t) / (T if self.weighting == "vlb" else 1))
        estimate = jnp.mean(weight.astype(per_t.dtype) * per_t, axis=0)
        if self.weighting == "vlb":
            q_T = q_marginal(d.schedule, T, value, event_ndim=nd)
            prior = dist.Normal(jnp.zeros_like(value), jnp.ones_like(value)).to_event(nd)
            return -kl_divergence(q_T, prior) - estimate
        return -estimate


class _SwapDiffusionSites(Messenger):
    """Replace the fn of every observed GaussianDiffusion site by its sampled-t objective."""

    def __init__(self, fn, rng_key, config, t_sampling, uniform_mix):
        self.rng_key = rng_key
        self.config = config
        self.t_sampling = t_sampling
        self.uniform_mix = uniform_mix
        self.count = 0
        super().__init__(fn)

    def _swap(self, fn, msg):
        if isinstance(fn, GaussianDiffusion):
            if fn.variance_kind == "learned" and self.config["weighting"] == "simple":
                raise ValueError(
                    f"site {msg['name']!r}: weighting='simple' gives a learned variance no gradient; "
                    "use weighting='hybrid' (improved DDPM) or 'vlb'"
                )
            history = (msg.get("infer") or {}).get("loss_history")
            probs = None
            if self.t_sampling == "importance":
                if history is None:
                    raise ValueError(
                        f"site {msg['name']!r}: t_sampling='importance' needs the history of the "
                        "per-step losses, kept in the model: pass "
                        "probdiff.infer.with_loss_history(model) to SVI instead of model"
                    )
                probs = importance_probs(history, uniform_mix=self.uniform_mix)
            key = jax.random.fold_in(self.rng_key, self.count)
            self.count += 1
            return _SampledT(fn, key, probs=probs, history=history, **self.config)
        if isinstance(fn, ExpandedDistribution):
            base = self._swap(fn.base_dist, msg)
            return fn if base is fn.base_dist else ExpandedDistribution(base, fn.batch_shape)
        if isinstance(fn, MaskedDistribution):
            base = self._swap(fn.base_dist, msg)
            return fn if base is fn.base_dist else MaskedDistribution(base, fn._mask)
        return fn

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["fn"] = self._swap(msg["fn"], msg)


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
      $\lambda$ = ``hybrid_weight`` (improved DDPM uses 0.001). With
      ``variance="learned"`` the L_t part sees mu_theta through ``stop_gradient``, so it
      trains only the variance and L_simple trains the mean (improved DDPM's L_hybrid).

    t is drawn uniformly, or with ``t_sampling="importance"`` from
    [importance_probs][probdiff.infer.importance_probs] (p_t proportional to the root mean
    square of step t's recent losses), each term weighted by 1 / (T p_t) so that the
    estimate keeps its mean:

    $$ \sum_{t=1}^{T} L_t = \mathbb{E}_{t\sim p}\Big[\frac{L_t}{p_t}\Big]. $$

    Importance sampling keeps its loss history in the model: pass
    ``with_loss_history(model)`` to ``SVI`` (see
    [with_loss_history][probdiff.infer.with_loss_history]).

    All other sites get the terms of ``Trace_ELBO``: log p - log q of latent sites, log p of
    other observed sites. The t and x_t draws come from the loss's own key, so the diffusion
    may be built inside or outside the model.

    Args:
        weighting: ``"vlb"``, ``"simple"`` or ``"hybrid"``.
        num_t: K >= 1, steps drawn per example and step of SVI.
        hybrid_weight: lambda of the hybrid objective, >= 0.
        t_sampling: ``"uniform"`` or ``"importance"``.
        uniform_mix: u in (0, 1], the uniform share of the importance proposal.
        num_particles: particles of the surrounding Trace_ELBO (1 with importance
            sampling, whose history is mutable state).

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

    def __init__(
        self,
        weighting: str = "vlb",
        *,
        num_t: int = 1,
        hybrid_weight: float = 1e-3,
        t_sampling: str = "uniform",
        uniform_mix: float = 1e-3,
        num_particles: int = 1,
    ):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}; got {t_sampling!r}")
        if not 0 < uniform_mix <= 1:
            raise ValueError(f"uniform_mix must be in (0, 1]; got {uniform_mix}")
        if t_sampling == "importance" and num_particles != 1:
            raise ValueError(
                "t_sampling='importance' keeps its loss history as mutable state, which NumPyro "
                f"supports with num_particles=1 only; got num_particles={num_particles}"
            )
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
        self.t_sampling = t_sampling
        self.uniform_mix = float(uniform_mix)
        self._trace_elbo = Trace_ELBO()

    def _single_particle(self, rng_key, param_map, model, guide, *args, **kwargs):
        key_elbo, key_diff = jax.random.split(rng_key)
        config = {"weighting": self.weighting, "num_t": self.num_t, "hybrid_weight": self.hybrid_weight}
        swapped = _SwapDiffusionSites(model, key_diff, config, self.t_sampling, self.uniform_mix)
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
