r"""Inverse problems: a diffusion model as the prior of a latent in a NumPyro model.

A [GaussianDiffusion][probdiff.GaussianDiffusion] is a NumPyro distribution, so a linear
inverse problem is an ordinary model:

```python
prior = GaussianDiffusion(eps_fn, schedule, (8, 8, 1))
obs = inverse.Inpainting(mask, noise_scale=0.1)

def model(y=None):
    x = numpyro.sample("x", prior)            # x ~ p_theta(x_0), the diffusion prior
    numpyro.sample("y", obs(x), obs=y)        # y ~ N(mask * x, s^2) on the observed pixels
```

``Predictive(model, num_samples=...)`` draws from the prior and the prior predictive (the
diffusion site samples by the reverse chain). The posterior

$$ p(x_0 \mid y) \propto p_\theta(x_0)\, p(y \mid x_0) $$

is sampled by the kernels of [probdiff.infer][probdiff.infer]
([AnnealedLangevin][probdiff.infer.AnnealedLangevin] under ``numpyro.infer.MCMC``,
[TwistedSMC][probdiff.infer.TwistedSMC] and [DPS][probdiff.infer.DPS]); they need the score
of the prior and the gradient of log p(y | x_0), which [PosteriorProblem][probdiff.inverse.PosteriorProblem]
reads off the model.

The observation helpers are the linear-Gaussian family y = A x_0 + N(0, s^2 I):
[LinearObservation][probdiff.inverse.LinearObservation] (any matrix A on the flattened x_0),
[Inpainting][probdiff.inverse.Inpainting] (A keeps the pixels where a mask is true) and
[Denoising][probdiff.inverse.Denoising] (A = I). For Gaussian data with the optimal affine
eps-function the prior p_theta(x_0) is Gaussian, and [gaussian_posterior][probdiff.inverse.gaussian_posterior]
gives the posterior in closed form, the reference every sampler is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

from probdiff._checks import check_event_shape, check_positive, is_concrete
from probdiff.diffusion import GaussianDiffusion

__all__ = [
    "GaussianObservation",
    "LinearObservation",
    "Inpainting",
    "Denoising",
    "PosteriorProblem",
    "gaussian_posterior",
    "gaussian_evidence",
]


def _check_noise(noise_scale):
    return check_positive(noise_scale, "noise_scale (the observation noise s > 0)")


class GaussianObservation(dist.Distribution):
    r"""The law of an observation y = A x_0 + N(0, s^2 I), given x_0: N(y; A x_0, s^2 I).

    Made by calling an observation helper on x_0 (``obs(x)``); use it as the distribution of
    an observed site, ``numpyro.sample("y", obs(x), obs=y)``. ``log_prob(y)`` checks that
    y has the observation's shape (and, when concrete, no NaN) and names the helper when it
    does not; entries outside ``mask`` (inpainting) are ignored.

    Args:
        loc: A x_0, shape ``batch + obs_shape``.
        scale: s > 0.
        obs_shape: the shape of one observation y.
        mask: optional boolean array of shape ``obs_shape``; False entries are not observed.
        who: the helper's name, for error messages.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    pytree_data_fields = ("loc", "scale", "observed_mask")
    pytree_aux_fields = ("who",)

    def __init__(self, loc, scale, obs_shape, mask=None, who: str = "observation", *, validate_args=None):
        obs_shape = tuple(obs_shape)
        nd = len(obs_shape)
        if tuple(jnp.shape(loc)[jnp.ndim(loc) - nd :]) != obs_shape:
            raise ValueError(
                f"{who}: A x_0 must end in the observation shape {obs_shape}; got {jnp.shape(loc)}"
            )
        self.loc = loc
        self.scale = scale
        self.observed_mask = mask
        self.who = who
        batch_shape = tuple(jnp.shape(loc)[: jnp.ndim(loc) - nd])
        super().__init__(batch_shape, obs_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):  # noqa: F811
        return constraints.independent(constraints.real, len(self.event_shape))

    def _check_y(self, value):
        nd = len(self.event_shape)
        shape = tuple(jnp.shape(value))
        if len(shape) < nd or shape[len(shape) - nd :] != tuple(self.event_shape):
            raise ValueError(
                f"{self.who}: the observation y must have shape {tuple(self.event_shape)} (after any "
                f"batch dims); got {shape}"
            )
        m = self.observed_mask
        if is_concrete(value) and (m is None or is_concrete(m)):
            v = np.asarray(value)
            bad = ~np.isfinite(v) if m is None else ~np.isfinite(v) & np.broadcast_to(np.asarray(m), v.shape)
            if bad.any():
                raise ValueError(f"{self.who}: the observation y contains NaN or inf at observed entries")

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        y = self.loc + self.scale * jax.random.normal(key, shape, jnp.result_type(self.loc))
        return y if self.observed_mask is None else jnp.where(self.observed_mask, y, 0.0)

    def log_prob(self, value):
        self._check_y(value)
        z = (value - self.loc) / self.scale
        lp = -0.5 * z**2 - jnp.log(self.scale) - 0.5 * math.log(2.0 * math.pi)
        if self.observed_mask is not None:
            lp = jnp.where(self.observed_mask, lp, 0.0)
        return jnp.sum(lp, axis=tuple(range(-len(self.event_shape), 0)))

    @property
    def mean(self):
        return jnp.broadcast_to(self.loc, self.batch_shape + self.event_shape)

    @property
    def variance(self):
        return jnp.broadcast_to(self.scale**2, self.batch_shape + self.event_shape)


class LinearObservation:
    r"""y = A x_0 + eps, eps ~ N(0, s^2 I): a linear-Gaussian observation with any matrix A.

    $$ p(y \mid x_0) = \mathcal{N}\big(y;\ A\,\mathrm{vec}(x_0),\ s^2 I_m\big) $$

    A acts on x_0 flattened in C order, so it has shape (m, D) with D the number of scalars
    in one x_0. ``obs(x)`` is the [GaussianObservation][probdiff.inverse.GaussianObservation]
    of y given x (x of shape ``batch + event_shape``; y of shape ``batch + (m,)``).

    Args:
        matrix: A, shape (m, D), finite.
        noise_scale: s > 0.
        event_shape: the shape of one x_0, with prod(event_shape) = D (default ``(D,)``).

    Raises:
        ValueError: A is not 2-D or not finite, its columns do not match ``event_shape``, or
            s is not positive.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.inverse import LinearObservation
        >>> obs = LinearObservation(jnp.ones((1, 3)), 0.5)
        >>> obs(jnp.array([1.0, 2.0, 3.0])).mean
        Array([6.], dtype=float32)
    """

    who = "LinearObservation"

    def __init__(self, matrix, noise_scale, event_shape=None):
        A = jnp.asarray(matrix)
        if A.ndim != 2:
            raise ValueError(f"{self.who}: matrix A must be 2-D, (m, D); got shape {A.shape}")
        if not jnp.issubdtype(A.dtype, jnp.floating):
            A = A.astype(jnp.result_type(float))
        if is_concrete(A) and not bool(jnp.all(jnp.isfinite(A))):
            raise ValueError(f"{self.who}: matrix A contains NaN or inf")
        event_shape = (A.shape[1],) if event_shape is None else check_event_shape(event_shape)
        if math.prod(event_shape) != A.shape[1]:
            raise ValueError(
                f"{self.who}: matrix A has {A.shape[1]} columns but one x_0 of shape {event_shape} has "
                f"{math.prod(event_shape)} entries; A must be (m, {math.prod(event_shape)})"
            )
        self.A = A
        self.noise_scale = _check_noise(noise_scale)
        self.event_shape = event_shape

    @property
    def obs_shape(self) -> tuple[int, ...]:
        """The shape of one observation y."""
        return (self.A.shape[0],)

    def _check_x(self, x):
        x = jnp.asarray(x)
        nd = len(self.event_shape)
        if x.ndim < nd or tuple(x.shape[x.ndim - nd :]) != self.event_shape:
            raise ValueError(f"{self.who}: x_0 must end in the event shape {self.event_shape}; got {x.shape}")
        return x

    def forward(self, x):
        """A x_0, shape ``batch + obs_shape``."""
        x = self._check_x(x)
        nd = len(self.event_shape)
        flat = x.reshape(x.shape[: x.ndim - nd] + (-1,))
        return flat @ self.A.T.astype(x.dtype)

    def matrix(self):
        """A as a dense (m, D) matrix on the flattened x_0."""
        return self.A

    def observed(self, y):
        """The observed entries of y as a vector (all of them here)."""
        return jnp.asarray(y).reshape(-1)

    def __call__(self, x) -> GaussianObservation:
        """p(y | x_0) as a distribution over y."""
        return GaussianObservation(self.forward(x), self.noise_scale, self.obs_shape, None, self.who)

    def log_likelihood(self, x, y):
        """log p(y | x_0), summed over the observation; shape ``batch``."""
        return self(x).log_prob(y)


class Inpainting(LinearObservation):
    r"""Inpainting: y = x_0 + eps on the pixels where ``mask`` is true, nothing elsewhere.

    $$ p(y \mid x_0) = \prod_{i:\ \mathrm{mask}_i} \mathcal{N}(y_i;\ x_{0,i},\ s^2) $$

    y has the shape of x_0; its entries where ``mask`` is false are ignored (any finite value,
    e.g. 0). As a matrix, A is the rows of the identity that the mask keeps.

    Args:
        mask: boolean (or 0/1) array of shape ``event_shape``; True = observed.
        noise_scale: s > 0.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.inverse import Inpainting
        >>> obs = Inpainting(jnp.array([True, False, True]), 0.1)
        >>> obs.matrix().shape
        (2, 3)
    """

    who = "Inpainting"

    def __init__(self, mask, noise_scale):
        m = np.asarray(mask)
        if m.ndim == 0 or m.size == 0:
            raise ValueError(
                f"{self.who}: mask must be an array of the shape of one x_0; got shape {m.shape}"
            )
        if m.dtype != bool:
            if not np.all((m == 0) | (m == 1)):
                raise ValueError(f"{self.who}: mask must be boolean or 0/1; got values other than 0 and 1")
            m = m.astype(bool)
        self.mask = jnp.asarray(m)
        self.event_shape = tuple(m.shape)
        self.noise_scale = _check_noise(noise_scale)
        self.A = jnp.eye(m.size, dtype=jnp.result_type(float))[np.flatnonzero(m.reshape(-1))]

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self.event_shape

    def forward(self, x):
        """mask * x_0 (zeros where unobserved), shape ``batch + event_shape``."""
        x = self._check_x(x)
        return jnp.where(self.mask, x, 0.0)

    def observed(self, y):
        """The observed entries y[mask], as a vector in C order."""
        return jnp.asarray(y).reshape(-1)[np.flatnonzero(np.asarray(self.mask).reshape(-1))]

    def __call__(self, x) -> GaussianObservation:
        x = self._check_x(x)
        return GaussianObservation(x, self.noise_scale, self.obs_shape, self.mask, self.who)


class Denoising(LinearObservation):
    r"""Denoising: y = x_0 + eps, eps ~ N(0, s^2 I) on every entry (A = I).

    $$ p(y \mid x_0) = \mathcal{N}\big(y;\ x_0,\ s^2 I\big) $$

    Args:
        noise_scale: s > 0.
        event_shape: the shape of one x_0 (and of y).
    """

    who = "Denoising"

    def __init__(self, noise_scale, event_shape):
        self.event_shape = check_event_shape(event_shape)
        self.noise_scale = _check_noise(noise_scale)
        self.A = None

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self.event_shape

    def forward(self, x):
        """x_0 itself."""
        return self._check_x(x)

    def matrix(self):
        """A = I, (D, D)."""
        return jnp.eye(math.prod(self.event_shape), dtype=jnp.result_type(float))

    def __call__(self, x) -> GaussianObservation:
        x = self._check_x(x)
        return GaussianObservation(x, self.noise_scale, self.obs_shape, None, self.who)


# ----------------------------------------------------------------------------- closed forms
def _gaussian_inputs(prior_mean, prior_cov, obs, y):
    m = jnp.asarray(prior_mean)
    S = jnp.asarray(prior_cov)
    D = m.shape[-1] if m.ndim == 1 else None
    if m.ndim != 1 or S.shape != (D, D):
        raise ValueError(f"prior_mean must be (D,) and prior_cov (D, D); got {m.shape} and {S.shape}")
    if not isinstance(obs, LinearObservation):
        raise TypeError(f"obs must be a probdiff.inverse observation helper; got {type(obs).__name__}")
    A = obs.matrix().astype(m.dtype)
    if A.shape[1] != D:
        raise ValueError(f"obs acts on x_0 with {A.shape[1]} entries; the prior has D = {D}")
    y = jnp.asarray(y, m.dtype)
    if tuple(y.shape) != tuple(obs.obs_shape):
        raise ValueError(f"y must have the observation shape {tuple(obs.obs_shape)}; got {tuple(y.shape)}")
    return m, S, A, obs.observed(y), obs.noise_scale


def gaussian_posterior(prior_mean, prior_cov, obs: LinearObservation, y) -> dist.MultivariateNormal:
    r"""The exact posterior p(x_0 | y) for a Gaussian prior and a linear-Gaussian observation.

    With x_0 ~ N(m, S) and y = A x_0 + N(0, s^2 I), by the Kalman gain K = S A^T (A S A^T + s^2 I)^{-1},

    $$ p(x_0 \mid y) = \mathcal{N}\big(m + K(y - A m),\ S - K A S\big). $$

    The covariance is symmetrised. Tests check it against Bayes' rule in precision form,
    (S^{-1} + A^T A / s^2)^{-1}, computed separately in NumPy.

    Args:
        prior_mean: m, shape (D,).
        prior_cov: S, shape (D, D).
        obs: the observation helper (its matrix A and s).
        y: the observation, shape ``obs.obs_shape``.

    Returns:
        a NumPyro ``MultivariateNormal`` over x_0 flattened (shape (D,)).
    """
    m, S, A, yv, s = _gaussian_inputs(prior_mean, prior_cov, obs, y)
    G = A @ S @ A.T + s**2 * jnp.eye(A.shape[0], dtype=m.dtype)
    K = jnp.linalg.solve(G, A @ S).T
    mean = m + K @ (yv - A @ m)
    cov = S - K @ A @ S
    return dist.MultivariateNormal(mean, covariance_matrix=0.5 * (cov + cov.T))


def gaussian_evidence(prior_mean, prior_cov, obs: LinearObservation, y) -> jax.Array:
    r"""log p(y) = log N(y; A m, A S A^T + s^2 I) for a Gaussian prior N(m, S): the evidence.

    [TwistedSMC][probdiff.infer.TwistedSMC] estimates it (``log_evidence``); this is its
    closed form in the Gaussian case.
    """
    m, S, A, yv, s = _gaussian_inputs(prior_mean, prior_cov, obs, y)
    G = A @ S @ A.T + s**2 * jnp.eye(A.shape[0], dtype=m.dtype)
    return dist.MultivariateNormal(A @ m, covariance_matrix=0.5 * (G + G.T)).log_prob(yv)


# ----------------------------------------------------------------------------- the model
class _DropPrior(Messenger):
    """Replace the prior site's distribution by a zero log-density one, keeping its shapes."""

    def __init__(self, fn, site: str):
        self.site = site
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] == self.site:
            d = msg["fn"]
            msg["fn"] = dist.ImproperUniform(constraints.real, d.batch_shape, d.event_shape)


def _base_diffusion(fn):
    """The GaussianDiffusion inside ``fn`` (through ExpandedDistribution / Independent wrappers)."""
    while True:
        if isinstance(fn, GaussianDiffusion):
            return fn
        base = getattr(fn, "base_dist", None)
        if base is None:
            return None
        fn = base


def _placeholder(msg):
    """Zeros of the value's shape for a latent diffusion site (``substitute_fn``), else None."""
    if msg["type"] != "sample" or msg.get("is_observed") or msg.get("value") is not None:
        return None
    base = _base_diffusion(msg["fn"])
    if base is None:
        return None
    return jnp.zeros(msg["fn"].shape(msg["kwargs"].get("sample_shape", ())), base.schedule.dtype)


class PosteriorProblem(NamedTuple):
    r"""What a posterior sampler needs from a NumPyro model with a diffusion prior.

    Built by :meth:`from_model`. The posterior over the prior site's value x_0 is

    $$ p(x_0 \mid y) \propto p_\theta(x_0)\ \exp\ell(x_0),\qquad
       \ell(x_0) = \sum_{\text{other sites}} \log p(\text{site} \mid x_0), $$

    where ell is the model's log density with the diffusion site's own term left out (so it
    is log p(y | x_0) for a model with one observation).

    Attributes:
        site: the name of the diffusion prior's sample site.
        prior: its [GaussianDiffusion][probdiff.GaussianDiffusion].
        shape: the shape of the site's value (batch dims of any enclosing plates + event shape).
        log_likelihood: ``ell(x) -> scalar`` for x of ``shape``; jit, grad and vmap work.
    """

    site: str
    prior: GaussianDiffusion
    shape: tuple
    log_likelihood: Callable

    @staticmethod
    def from_model(
        model: Callable, model_args=(), model_kwargs=None, *, site: str | None = None
    ) -> PosteriorProblem:
        """Find the diffusion prior site of ``model`` and build ell(x_0) from the rest.

        Args:
            model: a NumPyro model with exactly one latent sample site whose distribution is a
                [GaussianDiffusion][probdiff.GaussianDiffusion] (possibly inside plates) and
                every other sample site observed.
            model_args, model_kwargs: the model's arguments (the data).
            site: the prior site's name, if the model has several diffusion sites.

        Raises:
            ValueError: no (or more than one) latent diffusion site, or another latent site
                that the samplers cannot move (condition it with ``numpyro.handlers.condition``).
        """
        model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model; got {type(model).__name__}")
        # the diffusion sites get a placeholder value: tracing must not run the reverse chain
        traced = substitute(seed(model, jax.random.key(0)), substitute_fn=_placeholder)
        tr = trace(traced).get_trace(*model_args, **model_kwargs)
        latent = {n: s for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
        found = [n for n, s in latent.items() if _base_diffusion(s["fn"]) is not None]
        if site is None:
            if len(found) != 1:
                raise ValueError(
                    "the model must have exactly one latent sample site with a GaussianDiffusion "
                    f"prior; found {found or 'none'}" + ("; pass site=" if found else "")
                )
            site = found[0]
        elif site not in found:
            raise ValueError(
                f"site {site!r} is not a latent GaussianDiffusion site of the model; those are {found}"
            )
        others = sorted(n for n in latent if n != site)
        if others:
            raise ValueError(
                f"the posterior samplers move the diffusion site {site!r} only; the model has other latent "
                f"sites {others}. Observe them, or fix them with numpyro.handlers.condition(model, {{...}})"
            )
        prior = _base_diffusion(tr[site]["fn"])
        shape = tuple(jnp.shape(tr[site]["value"]))
        dropped = _DropPrior(model, site)

        def log_likelihood(x):
            lp, _ = log_density(seed(dropped, jax.random.key(0)), model_args, model_kwargs, {site: x})
            return lp

        for s in tr.values():  # the observations' own checks (shape; NaN when concrete)
            if s["type"] == "sample" and s["is_observed"] and isinstance(s["fn"], GaussianObservation):
                s["fn"]._check_y(s["value"])
        return PosteriorProblem(site, prior, shape, log_likelihood)
