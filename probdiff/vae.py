r"""Variational autoencoders and Markovian hierarchical VAEs as NumPyro models (MATH.md G2, B4).

A [VAE][probdiff.vae.VAE] has one latent layer, a
[MHVAE][probdiff.vae.MHVAE] a Markov chain of T of them:

$$ p_\theta(x, z_{1:T}) = p(z_T)\prod_{t=2}^{T}p_\theta(z_{t-1}\mid z_t)\;p_\theta(x\mid z_1),\qquad
   q_\phi(z_{1:T}\mid x) = q_\phi(z_1\mid x)\prod_{t=2}^{T}q_\phi(z_t\mid z_{t-1}) , $$

every conditional a diagonal Gaussian whose mean and standard deviation come from a network, and
p(z_T) = N(0, I). Each class gives a NumPyro ``model`` and ``guide`` for ``SVI`` (so ``Trace_ELBO``
estimates E_q[log p_theta(x, z) - log q_phi(z | x)], the ELBO) and, after training,
``with_params(svi.get_params(state))`` rebuilds it with the trained networks for evaluation.

A diffusion model is an MHVAE with three restrictions (MATH.md B4): the latent dimension equals
the data dimension; the encoder is fixed and linear-Gaussian,
q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I)
([LinearGaussianEncoder.from_schedule][probdiff.vae.LinearGaussianEncoder.from_schedule]);
and the schedule drives q(z_T | x) to N(0, I). With a linear-Gaussian encoder the posterior
q(z_{t-1} | z_t, x) is Gaussian, and [MHVAE.elbo_terms][probdiff.vae.MHVAE.elbo_terms] gives the
ELBO in the B2 form with exact KLs; ``examples/hierarchical_vae_equivalence.py`` imposes the
restrictions one at a time and arrives at [GaussianDiffusion][probdiff.GaussianDiffusion]'s ELBO.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module
from numpyro.distributions import constraints
from numpyro.distributions.kl import kl_divergence

from probdiff._checks import check_event, check_event_shape, check_finite
from probdiff.diffusion import ELBOTerms
from probdiff.nets import DenseNet
from probdiff.schedules import Schedule

__all__ = ["GaussianNet", "LinearGaussianEncoder", "VAE", "MHVAE", "LIKELIHOODS"]

#: The observation models p_theta(x | z) of [VAE][probdiff.vae.VAE].
LIKELIHOODS = ("gaussian", "bernoulli")


def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


class GaussianNet(eqx.Module):
    r"""A network that returns the mean and standard deviation of a diagonal Gaussian.

    $$ (m, h) = f(x, t),\qquad \mu = m,\qquad \sigma = \sigma_{\min} + \mathrm{softplus}(h + c), $$

    with f a [DenseNet][probdiff.nets.DenseNet] of 2 d_out outputs and c chosen so that an
    untrained network (f = 0) gives N(0, I).

    Args:
        in_dim: size of the input's last axis.
        out_dim: dimension of the Gaussian.
        key: a JAX PRNG key.
        hidden: widths of the hidden layers.
        time_dim: size of the embedding of t (0: no t input).
        min_std: sigma_min > 0, the smallest standard deviation.
    """

    net: DenseNet
    out_dim: int = eqx.field(static=True)
    min_std: float = eqx.field(static=True)

    def __init__(self, in_dim: int, out_dim: int, key, *, hidden=(128, 128), time_dim: int = 0, min_std: float = 1e-3):
        _check_int(out_dim, "out_dim")
        if not (isinstance(min_std, (int, float)) and 0.0 < min_std < 1.0):
            raise ValueError(f"min_std must lie in (0, 1); got {min_std!r}")
        self.net = DenseNet(in_dim, 2 * out_dim, key, hidden=hidden, time_dim=time_dim)
        self.out_dim = out_dim
        self.min_std = float(min_std)

    def __call__(self, x, t=None):
        """(mu, sigma), each of shape ``batch + (out_dim,)``."""
        h = self.net(x, t) if self.net.time_dim else self.net(x)
        offset = math.log(math.expm1(1.0 - self.min_std))
        return h[..., : self.out_dim], self.min_std + jax.nn.softplus(h[..., self.out_dim :] + offset)


def _register(name: str, fn):
    """``fn`` with its arrays as NumPyro params when it is an equinox module that has any."""
    if isinstance(fn, eqx.Module) and jax.tree_util.tree_leaves(eqx.filter(fn, eqx.is_inexact_array)):
        return eqx_module(name, fn)
    return fn


def _bind(fn, params, name: str):
    key = f"{name}$params"
    if key not in params:
        return fn
    _, static = eqx.partition(fn, eqx.is_inexact_array)
    return eqx.combine(params[key], static)


def _normal(mean, std, event_ndim: int):
    mean = jnp.asarray(mean)
    return dist.Normal(mean, jnp.broadcast_to(jnp.asarray(std, mean.dtype), mean.shape)).to_event(event_ndim)


def _check_data(x, event_shape, name="x"):
    x = check_event(x, event_shape, name)
    check_finite(x, name)
    if x.ndim != len(event_shape) + 1:
        raise ValueError(f"{name} must have shape (N,) + event_shape = (N,) + {event_shape}; got {x.shape}")
    return x


def _over_draws(fn, rng_key, num_samples: int, chunk_size: int, reduce: str):
    """Reduce fn(key, n) (shape (n,) + batch) over ``num_samples`` draws, ``chunk_size`` at a time.

    ``reduce="mean"`` averages; ``"logmeanexp"`` gives log (1/K) sum_k exp(.), by a running
    logsumexp. Memory is bounded by the chunk, never by ``num_samples``.
    """
    _check_int(num_samples, "num_samples")
    _check_int(chunk_size, "chunk_size")
    chunk = min(chunk_size, num_samples)
    n_full, rest = divmod(num_samples, chunk)
    keys = jax.random.split(rng_key, n_full + 1)
    combine = jnp.logaddexp if reduce == "logmeanexp" else jnp.add

    def part(key, n):
        v = fn(key, n)
        return jax.scipy.special.logsumexp(v, axis=0) if reduce == "logmeanexp" else jnp.sum(v, axis=0)

    first = part(keys[0], chunk)
    total, _ = jax.lax.scan(lambda c, k: (combine(c, part(k, chunk)), None), first, keys[1:n_full])
    if rest:
        total = combine(total, part(keys[-1], rest))
    return total - math.log(num_samples) if reduce == "logmeanexp" else total / num_samples


# ----------------------------------------------------------------------------- VAE
class VAE:
    r"""The variational autoencoder (MATH.md G2) as a NumPyro model and guide.

    $$ p_\theta(x, z) = \mathcal N(z; 0, I)\,p_\theta(x\mid z),\qquad
       q_\phi(z\mid x) = \mathcal N\big(z;\ \mu_\phi(x),\ \mathrm{diag}\,\sigma_\phi(x)^2\big), $$

    $$ \mathrm{ELBO}(x) = \mathbb E_{q_\phi(z|x)}\log p_\theta(x\mid z)
       - \mathrm{KL}\big(q_\phi(z\mid x)\,\|\,\mathcal N(0, I)\big) \le \log p_\theta(x), $$

    with z = mu_phi(x) + sigma_phi(x) * eps, eps ~ N(0, I) (the reparameterisation trick), so
    the gradient flows through the sample. The encoder is amortised: one network for every x.

    ``model(x)`` and ``guide(x)`` go to ``SVI`` with ``Trace_ELBO`` (the KL is then estimated
    by Monte Carlo; ``TraceMeanField_ELBO`` takes it in closed form); their networks are
    registered under ``f"{name}_encoder"`` and ``f"{name}_decoder"``.

    Args:
        encoder: x (flattened, shape ``batch + (D,)``) -> (mu, sigma) of z, e.g.
            ``GaussianNet(D, latent_dim, key)``.
        decoder: z -> (mu, sigma) of the flattened x for ``likelihood="gaussian"``, or -> the
            logits of x for ``"bernoulli"`` (x in {0, 1}).
        latent_dim: the dimension of z.
        event_shape: the shape of one x, e.g. ``(2,)`` or ``(8, 8, 1)``.
        likelihood: one of [LIKELIHOODS][probdiff.vae.LIKELIHOODS].
        name: prefix of the site and parameter names.
    """

    def __init__(self, encoder, decoder, latent_dim: int, event_shape, *, likelihood: str = "gaussian", name: str = "vae"):
        if not callable(encoder) or not callable(decoder):
            raise TypeError("encoder and decoder must be callables (networks)")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = _check_int(latent_dim, "latent_dim")
        self.event_shape = check_event_shape(event_shape)
        self.data_dim = math.prod(self.event_shape)
        self.likelihood = likelihood
        self.name = str(name)

    # ---- conditionals
    def encode(self, x, encoder=None) -> dist.Distribution:
        """q_phi(z | x) = N(mu_phi(x), diag sigma_phi(x)^2) for x of shape ``batch + event_shape``."""
        x = check_event(x, self.event_shape, "x")
        mean, std = (encoder or self.encoder)(jnp.reshape(x, x.shape[: x.ndim - len(self.event_shape)] + (-1,)))
        return _normal(mean, std, 1)

    def decode(self, z, decoder=None) -> dist.Distribution:
        """p_theta(x | z), an event of ``event_shape`` for z of shape ``batch + (latent_dim,)``."""
        out = (decoder or self.decoder)(z)
        nd = len(self.event_shape)
        if self.likelihood == "bernoulli":
            logits = jnp.reshape(out, out.shape[:-1] + self.event_shape)
            return dist.Bernoulli(logits=logits).to_event(nd)
        mean, std = out
        shape = mean.shape[:-1] + self.event_shape
        return _normal(jnp.reshape(mean, shape), jnp.reshape(jnp.broadcast_to(std, mean.shape), shape), nd)

    def prior(self, dtype=None) -> dist.Distribution:
        """p(z) = N(0, I)."""
        dtype = dtype or jnp.result_type(float)
        return _normal(jnp.zeros(self.latent_dim, dtype), 1.0, 1)

    # ---- NumPyro
    def model(self, x=None, *, num_samples: int = 1, subsample_size=None):
        r"""p_theta(x, z) = N(z; 0, I) p_theta(x | z), with x observed when given.

        Sites ``f"{name}_z"`` and ``f"{name}_x"`` inside ``numpyro.plate(f"{name}_data")``;
        ``subsample_size`` draws minibatches (the guide must get the same value).
        """
        dec = _register(f"{self.name}_decoder", self.decoder)
        n = num_samples if x is None else _check_data(x, self.event_shape).shape[0]
        with numpyro.plate(f"{self.name}_data", n, subsample_size=subsample_size) as idx:
            xb = None if x is None else x[idx]
            z = numpyro.sample(f"{self.name}_z", self.prior())
            return numpyro.sample(f"{self.name}_x", self.decode(z, dec), obs=xb)

    def guide(self, x, *, subsample_size=None):
        r"""q_phi(z | x), reparameterised, in the model's plate."""
        x = _check_data(x, self.event_shape)
        enc = _register(f"{self.name}_encoder", self.encoder)
        with numpyro.plate(f"{self.name}_data", x.shape[0], subsample_size=subsample_size) as idx:
            return numpyro.sample(f"{self.name}_z", self.encode(x[idx], enc))

    def with_params(self, params: dict) -> VAE:
        """The same VAE with the networks' arrays from ``svi.get_params(state)``."""
        return VAE(
            _bind(self.encoder, params, f"{self.name}_encoder"), _bind(self.decoder, params, f"{self.name}_decoder"),
            self.latent_dim, self.event_shape, likelihood=self.likelihood, name=self.name,
        )

    # ---- evaluation
    def elbo(self, rng_key, x, num_samples: int = 1, *, chunk_size: int = 64) -> jax.Array:
        r"""The ELBO per example, reconstruction by ``num_samples`` draws of z (``chunk_size`` at a time), the KL exact.

        $$ \mathrm{ELBO}(x) = \frac1K\sum_{k=1}^K\log p_\theta(x\mid z_k)
           - \mathrm{KL}(q_\phi(z\mid x)\,\|\,\mathcal N(0,I)),\qquad z_k\sim q_\phi(z\mid x). $$
        """
        x = check_event(x, self.event_shape, "x")
        q = self.encode(x)
        rec = _over_draws(lambda k, n: self.decode(q.rsample(k, (n,))).log_prob(x), rng_key, num_samples,
                          chunk_size, "mean")
        return rec - kl_divergence(q, self.prior(x.dtype).expand(q.batch_shape))

    def log_likelihood(self, rng_key, x, num_samples: int = 1000, *, chunk_size: int = 64) -> jax.Array:
        r"""The importance-weighted estimate of log p_theta(x) per example (Burda et al. 2016).

        $$ \log p_\theta(x) \approx \log\frac1K\sum_{k=1}^K
           \frac{p(z_k)\,p_\theta(x\mid z_k)}{q_\phi(z_k\mid x)},\qquad z_k\sim q_\phi(z\mid x), $$

        a lower bound whose expectation rises to log p_theta(x) as K grows (K = 1 is the ELBO).
        The K draws are taken ``chunk_size`` at a time, so memory does not grow with K.
        """
        x = check_event(x, self.event_shape, "x")
        q = self.encode(x)
        prior = self.prior(x.dtype)

        def log_w(key, n):
            z = q.sample(key, (n,))
            return prior.log_prob(z) + self.decode(z).log_prob(x) - q.log_prob(z)

        return _over_draws(log_w, rng_key, num_samples, chunk_size, "logmeanexp")

    def sample(self, rng_key, sample_shape=()) -> jax.Array:
        """x ~ p_theta(x) = int p(z) p_theta(x | z) dz, shape ``sample_shape + event_shape``."""
        key_z, key_x = jax.random.split(rng_key)
        z = self.prior().sample(key_z, tuple(sample_shape))
        return self.decode(z).sample(key_x)


# ---------------------------------------------------------------- linear-Gaussian encoder
class LinearGaussianEncoder:
    r"""A fixed linear-Gaussian Markov encoder, the diffusion model's (MATH.md B4, restriction 2).

    $$ q(z_t\mid z_{t-1}) = \mathcal N(z_t;\ a_t z_{t-1},\ v_t I),\quad t = 1..T,\ z_0 = x ;
       \qquad q(z_t\mid x) = \mathcal N(\bar a_t x,\ \bar v_t I),\ \bar a_t = \prod_{s\le t}a_s,\
       \bar v_t = a_t^2\bar v_{t-1} + v_t , $$

    and by Bayes' rule for Gaussians, for t >= 2,

    $$ q(z_{t-1}\mid z_t, x) = \mathcal N\Big(\frac{\bar a_{t-1}x/\bar v_{t-1} + a_t z_t/v_t}{\lambda_t},\
       \frac{1}{\lambda_t}I\Big),\qquad \lambda_t = \frac{1}{\bar v_{t-1}} + \frac{a_t^2}{v_t} . $$

    It has no parameters. ``from_schedule`` gives DDPM's a_t = sqrt(1 - beta_t), v_t = beta_t,
    for which abar_t = sqrt(alpha_bar_t), vbar_t = 1 - alpha_bar_t, and the posterior is
    q(x_{t-1} | x_t, x_0) of MATH.md A4 (computed here in the general form above).

    Args:
        a: a_1..a_T, finite, shape (T,).
        v: v_1..v_T > 0, shape (T,).
    """

    def __init__(self, a, v):
        a, v = jnp.asarray(a), jnp.asarray(v)
        if a.ndim != 1 or v.shape != a.shape or a.shape[0] < 1:
            raise ValueError(f"a and v must be 1-D of the same length T >= 1; got shapes {a.shape}, {v.shape}")
        check_finite(a, "a")
        check_finite(v, "v")
        if not bool(jnp.all(v > 0)):
            raise ValueError(f"v must be > 0 (variances of q(z_t | z_{{t-1}})); got min {float(v.min())}")
        self.a = a.astype(jnp.result_type(float))
        self.v = v.astype(jnp.result_type(float))

        def step(carry, av):
            abar, vbar = carry
            a_t, v_t = av
            out = (abar * a_t, a_t**2 * vbar + v_t)
            return out, out

        one, zero = jnp.ones((), self.a.dtype), jnp.zeros((), self.a.dtype)
        _, (abar, vbar) = jax.lax.scan(step, (one, zero), (self.a, self.v))
        #: abar_0..abar_T and vbar_0..vbar_T (abar_0 = 1, vbar_0 = 0).
        self.abar = jnp.concatenate([one[None], abar])
        self.vbar = jnp.concatenate([zero[None], vbar])

    @classmethod
    def from_schedule(cls, schedule: Schedule) -> LinearGaussianEncoder:
        """DDPM's forward chain: a_t = sqrt(1 - beta_t), v_t = beta_t, t = 1..T."""
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a probdiff.schedules.Schedule; got {type(schedule).__name__}")
        return cls(jnp.sqrt(1.0 - schedule.beta[1:]), schedule.beta[1:])

    @property
    def num_steps(self) -> int:
        """T."""
        return int(self.a.shape[0])

    def first(self, x):
        """(mean, std) of q(z_1 | x) = N(a_1 x, v_1 I)."""
        return self.a[0] * x, jnp.sqrt(self.v[0])

    def __call__(self, z, t):
        """(mean, std) of q(z_t | z_{t-1} = z), t in 2..T (an integer array broadcasting over z's batch)."""
        t = jnp.asarray(t)[..., None]
        return self.a[t - 1] * z, jnp.sqrt(self.v[t - 1])

    def marginal(self, t, x):
        """(mean, std) of q(z_t | x) = N(abar_t x, vbar_t I)."""
        return self.abar[t] * x, jnp.sqrt(self.vbar[t])

    def posterior(self, t, z_t, x):
        """(mean, std) of q(z_{t-1} | z_t, x), t in 2..T, by the Gaussian Bayes rule above."""
        a_t, v_t = self.a[t - 1], self.v[t - 1]
        abar, vbar = self.abar[t - 1], self.vbar[t - 1]
        precision = 1.0 / vbar + a_t**2 / v_t
        return (abar * x / vbar + a_t * z_t / v_t) / precision, jnp.sqrt(1.0 / precision)


# ------------------------------------------------------------------------ the chains
def _time_t(t0: int, n: int, batch_shape):
    """t0..t0+n-1 as integers shaped batch + (n,)."""
    return jnp.broadcast_to(jnp.arange(t0, t0 + n), tuple(batch_shape) + (n,))


class _EncoderChain(dist.Distribution):
    """q_phi(z_{1:T} | x) = q(z_1 | x) prod_{t>=2} q(z_t | z_{t-1}); value batch + (T, d)."""

    arg_constraints = {}
    reparametrized_params = ["x"]

    def __init__(self, first, step, x, num_latents, latent_dim):
        self.first, self.step, self.x = first, step, x
        super().__init__(x.shape[:-1], (num_latents, latent_dim))

    @constraints.dependent_property(is_discrete=False, event_dim=2)
    def support(self):
        return constraints.independent(constraints.real, 2)

    @property
    def has_rsample(self):
        return True

    def rsample(self, key, sample_shape=()):
        return self.sample(key, sample_shape)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        noise = jnp.moveaxis(jax.random.normal(key, shape, self.x.dtype), -2, 0)
        x = jnp.broadcast_to(self.x, tuple(sample_shape) + self.x.shape)
        mean, std = self.first(x)
        z_1 = mean + std * noise[0]

        def body(z, inputs):
            t, eps = inputs
            m, s = self.step(z, jnp.full(z.shape[:-1], t))
            z = m + s * eps
            return z, z

        _, zs = jax.lax.scan(body, z_1, (jnp.arange(2, self.event_shape[0] + 1), noise[1:]))
        return jnp.concatenate([z_1[..., None, :], jnp.moveaxis(zs, 0, -2)], axis=-2)

    def log_prob(self, value):
        T = self.event_shape[0]
        m1, s1 = self.first(self.x)
        lp = _normal(m1, s1, 1).log_prob(value[..., 0, :])
        if T > 1:
            prev = value[..., :-1, :]
            m, s = self.step(prev, _time_t(2, T - 1, prev.shape[:-2]))
            lp = lp + jnp.sum(_normal(m, s, 1).log_prob(value[..., 1:, :]), -1)
        return lp


class _DecoderChain(dist.Distribution):
    """p_theta(z_{1:T}) = N(z_T; 0, I) prod_{t>=2} p(z_{t-1} | z_t); value batch + (T, d)."""

    arg_constraints = {}

    def __init__(self, step, num_latents, latent_dim, batch_shape=(), dtype=None):
        self.step = step
        self.dtype = dtype or jnp.result_type(float)
        super().__init__(tuple(batch_shape), (num_latents, latent_dim))

    @constraints.dependent_property(is_discrete=False, event_dim=2)
    def support(self):
        return constraints.independent(constraints.real, 2)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        noise = jnp.moveaxis(jax.random.normal(key, shape, self.dtype), -2, 0)
        T = self.event_shape[0]
        z_T = noise[-1]

        def body(z, inputs):
            t, eps = inputs
            m, s = self.step(z, jnp.full(z.shape[:-1], t))
            z = m + s * eps
            return z, z

        _, zs = jax.lax.scan(body, z_T, (jnp.arange(T, 1, -1), noise[:-1][::-1]))
        return jnp.concatenate([jnp.moveaxis(zs[::-1], 0, -2), z_T[..., None, :]], axis=-2)

    def log_prob(self, value):
        T = self.event_shape[0]
        lp = _normal(jnp.zeros_like(value[..., -1, :]), 1.0, 1).log_prob(value[..., -1, :])
        if T > 1:
            nxt = value[..., 1:, :]
            m, s = self.step(nxt, _time_t(2, T - 1, nxt.shape[:-2]))
            lp = lp + jnp.sum(_normal(m, s, 1).log_prob(value[..., :-1, :]), -1)
        return lp


# --------------------------------------------------------------------------- MHVAE
class MHVAE:
    r"""The Markovian hierarchical VAE (MATH.md B4) as a NumPyro model and guide.

    $$ p_\theta(x, z_{1:T}) = \mathcal N(z_T; 0, I)\prod_{t=2}^{T}p_\theta(z_{t-1}\mid z_t)\;
       p_\theta(x\mid z_1),\qquad
       q_\phi(z_{1:T}\mid x) = q_\phi(z_1\mid x)\prod_{t=2}^{T}q_\phi(z_t\mid z_{t-1}), $$

    $$ \mathrm{ELBO}(x) = \mathbb E_{q_\phi(z_{1:T}|x)}\big[\log p_\theta(x, z_{1:T})
       - \log q_\phi(z_{1:T}\mid x)\big] \le \log p_\theta(x) . $$

    Every conditional is a diagonal Gaussian given by a callable returning (mean, std). The
    steps t = 2..T share one network that takes t (``GaussianNet(d, d, key, time_dim=16)``),
    so the chain runs under ``lax.scan`` whatever T is. Each chain is one sample site
    (``f"{name}_z"``, value ``batch + (T, latent_dim)``, index i is z_{i+1}), so NumPyro's
    Markov-chain traps do not apply.

    With a [LinearGaussianEncoder][probdiff.vae.LinearGaussianEncoder] (no parameters; the
    latent dimension must then equal the data dimension) the ELBO also has the B2 form with
    exact KLs, [elbo_terms][probdiff.vae.MHVAE.elbo_terms].

    Args:
        encoder: a pair ``(first, step)``: ``first(x) -> (mean, std)`` of q(z_1 | x) with x
            flattened to ``batch + (D,)``, ``step(z_{t-1}, t) -> (mean, std)`` of q(z_t | z_{t-1});
            or one module ``m`` with ``m.first(x)`` and ``m(z_{t-1}, t)``, such as a
            ``LinearGaussianEncoder``.
        decoder: a pair ``(first, step)``: ``first(z_1) -> (mean, std)`` of the flattened x,
            ``step(z_t, t) -> (mean, std)`` of p(z_{t-1} | z_t); or one module with ``.first``
            and ``__call__`` (one set of parameters for every t, as DDPM's eps-network).
        num_latents: T >= 1.
        latent_dim: the dimension of each z_t.
        event_shape: the shape of one x.
        name: prefix of the site and parameter names (networks: ``f"{name}_encoder_first"``
            and ``..._encoder_step`` for a pair, ``f"{name}_encoder"`` for one module; the same
            for the decoder). Equinox modules among them are trained; anything else is fixed.
    """

    def __init__(self, encoder, decoder, num_latents: int, latent_dim: int, event_shape, *, name: str = "mhvae"):
        self.num_latents = _check_int(num_latents, "num_latents")
        self.latent_dim = _check_int(latent_dim, "latent_dim")
        self.event_shape = check_event_shape(event_shape)
        self.data_dim = math.prod(self.event_shape)
        self.name = str(name)
        if isinstance(encoder, LinearGaussianEncoder):
            if encoder.num_steps != self.num_latents:
                raise ValueError(
                    f"the LinearGaussianEncoder has T = {encoder.num_steps} steps; num_latents = {self.num_latents}"
                )
            if self.latent_dim != self.data_dim:
                raise ValueError(
                    "a LinearGaussianEncoder needs latent_dim = the data dimension "
                    f"prod(event_shape) = {self.data_dim}; got latent_dim = {self.latent_dim}"
                )
        self.encoder = self._check_spec(encoder, "encoder")
        self.decoder = self._check_spec(decoder, "decoder")

    @staticmethod
    def _check_spec(spec, what):
        if isinstance(spec, (tuple, list)):
            if len(spec) == 2 and all(callable(f) for f in spec):
                return tuple(spec)
        elif callable(spec) and callable(getattr(spec, "first", None)):
            return spec
        raise TypeError(
            f"{what} must be a pair (first, step) of callables returning (mean, std), or one callable "
            f"module with a .first method (first(.) and module(z, t) give (mean, std))"
        )

    def _resolve(self, role, register=False):
        """(first, step) of the encoder or decoder; under ``register`` its networks become params."""
        spec = self.encoder if role == "encoder" else self.decoder
        name = f"{self.name}_{role}"
        if isinstance(spec, tuple):
            first, step = spec
            if register:
                first, step = _register(f"{name}_first", first), _register(f"{name}_step", step)
            return first, step
        module = _register(name, spec) if register else spec
        return module.first, module

    @property
    def linear_encoder(self) -> LinearGaussianEncoder | None:
        """The encoder if it is a LinearGaussianEncoder, else None."""
        return self.encoder if isinstance(self.encoder, LinearGaussianEncoder) else None

    def _flat(self, x):
        return jnp.reshape(x, x.shape[: x.ndim - len(self.event_shape)] + (self.data_dim,))

    def _x_dist(self, first, z_1):
        mean, std = first(z_1)
        shape = mean.shape[:-1] + self.event_shape
        return _normal(jnp.reshape(mean, shape), jnp.reshape(jnp.broadcast_to(std, mean.shape), shape), len(self.event_shape))

    # ---- NumPyro
    def model(self, x=None, *, num_samples: int = 1, subsample_size=None):
        r"""p_theta(x, z_{1:T}), with x observed when given (sites ``f"{name}_z"``, ``f"{name}_x"``)."""
        first, step = self._resolve("decoder", register=True)
        n = num_samples if x is None else _check_data(x, self.event_shape).shape[0]
        with numpyro.plate(f"{self.name}_data", n, subsample_size=subsample_size) as idx:
            xb = None if x is None else x[idx]
            chain = _DecoderChain(step, self.num_latents, self.latent_dim, idx.shape)
            z = numpyro.sample(f"{self.name}_z", chain)
            return numpyro.sample(f"{self.name}_x", self._x_dist(first, z[..., 0, :]), obs=xb)

    def guide(self, x, *, subsample_size=None):
        r"""q_phi(z_{1:T} | x), reparameterised, in the model's plate."""
        x = _check_data(x, self.event_shape)
        first, step = self._resolve("encoder", register=True)
        with numpyro.plate(f"{self.name}_data", x.shape[0], subsample_size=subsample_size) as idx:
            chain = _EncoderChain(first, step, self._flat(x[idx]), self.num_latents, self.latent_dim)
            return numpyro.sample(f"{self.name}_z", chain)

    def with_params(self, params: dict) -> MHVAE:
        """The same MHVAE with the networks' arrays from ``svi.get_params(state)``."""

        def bind(spec, role):
            name = f"{self.name}_{role}"
            if isinstance(spec, tuple):
                return (_bind(spec[0], params, f"{name}_first"), _bind(spec[1], params, f"{name}_step"))
            return _bind(spec, params, name) if isinstance(spec, eqx.Module) else spec

        return MHVAE(bind(self.encoder, "encoder"), bind(self.decoder, "decoder"), self.num_latents,
                     self.latent_dim, self.event_shape, name=self.name)

    # ---- evaluation
    def log_joint_ratio(self, z, x) -> jax.Array:
        r"""log p_theta(x, z_{1:T}) - log q_phi(z_{1:T} | x) for a trajectory z of shape ``batch + (T, d)``."""
        x = check_event(x, self.event_shape, "x")
        z = jnp.asarray(z)
        if z.ndim < 2 or tuple(z.shape[-2:]) != (self.num_latents, self.latent_dim):
            raise ValueError(
                f"z must have trailing shape (T, latent_dim) = ({self.num_latents}, {self.latent_dim}); got {z.shape}"
            )
        dec_first, dec_step = self._resolve("decoder")
        log_p = _DecoderChain(dec_step, self.num_latents, self.latent_dim, z.shape[:-2], z.dtype).log_prob(z)
        log_p = log_p + self._x_dist(dec_first, z[..., 0, :]).log_prob(x)
        q = _EncoderChain(*self._resolve("encoder"), self._flat(x), self.num_latents, self.latent_dim)
        return log_p - q.log_prob(z)

    def encode(self, rng_key, x, sample_shape=()) -> jax.Array:
        """z_{1:T} ~ q_phi(z_{1:T} | x), shape ``sample_shape + batch + (T, latent_dim)``."""
        x = check_event(x, self.event_shape, "x")
        q = _EncoderChain(*self._resolve("encoder"), self._flat(x), self.num_latents, self.latent_dim)
        return q.sample(rng_key, tuple(sample_shape))

    def elbo(self, rng_key, x, num_samples: int = 1, *, chunk_size: int = 64) -> jax.Array:
        r"""The ELBO per example by ``num_samples`` trajectories z_{1:T} ~ q_phi (what ``Trace_ELBO`` estimates),
        ``chunk_size`` at a time."""
        return _over_draws(lambda k, n: self.log_joint_ratio(self.encode(k, x, (n,)), x), rng_key, num_samples,
                           chunk_size, "mean")

    def log_likelihood(self, rng_key, x, num_samples: int = 1000, *, chunk_size: int = 64) -> jax.Array:
        r"""The importance-weighted estimate log (1/K) sum_k p(x, z^k) / q(z^k | x), z^k ~ q_phi, per example.

        A lower bound in expectation that rises to log p_theta(x) as K grows; the K
        trajectories are drawn ``chunk_size`` at a time.
        """
        return _over_draws(lambda k, n: self.log_joint_ratio(self.encode(k, x, (n,)), x), rng_key, num_samples,
                           chunk_size, "logmeanexp")

    def elbo_terms(self, rng_key, x) -> ELBOTerms:
        r"""The ELBO in the B2 form, for a [LinearGaussianEncoder][probdiff.vae.LinearGaussianEncoder].

        $$ \mathrm{ELBO} = \mathbb E_{q(z_1|x)}\log p_\theta(x\mid z_1) - \mathrm{KL}(q(z_T\mid x)\,\|\,\mathcal N(0,I))
           - \sum_{t=2}^{T}\mathbb E_{q(z_t|x)}\mathrm{KL}\big(q(z_{t-1}\mid z_t, x)\,\|\,p_\theta(z_{t-1}\mid z_t)\big) , $$

        one z_t ~ q(z_t | x) per t, the KLs between Gaussians exact. The draws use the key as
        [GaussianDiffusion.elbo_terms][probdiff.GaussianDiffusion.elbo_terms] does (z_1 from
        the first half of ``split(rng_key)``, z_t from ``fold_in`` of the second with t), so the
        two agree number for number on a diffusion model and its MHVAE.
        """
        enc = self.linear_encoder
        if enc is None:
            raise ValueError("elbo_terms needs a LinearGaussianEncoder (the posterior q(z_{t-1} | z_t, x) is "
                             "intractable for a learned encoder); use elbo() instead")
        x = check_event(x, self.event_shape, "x")
        xf = self._flat(x)
        T = self.num_latents
        dec_first, dec_step = self._resolve("decoder")
        key_rec, key_den = jax.random.split(rng_key)

        def draw(t, key):
            mean, std = enc.marginal(t, xf)
            return mean + std * jax.random.normal(key, xf.shape, xf.dtype)

        reconstruction = self._x_dist(dec_first, draw(1, key_rec)).log_prob(x)
        m_T, s_T = enc.marginal(T, xf)
        prior_matching = kl_divergence(_normal(m_T, s_T, 1), _normal(jnp.zeros_like(xf), 1.0, 1))
        batch = xf.shape[:-1]
        if T == 1:
            return ELBOTerms(reconstruction, prior_matching, jnp.zeros(batch + (0,), xf.dtype))

        def denoising(t):
            z_t = draw(t, jax.random.fold_in(key_den, t))
            q = _normal(*enc.posterior(t, z_t, xf), 1)
            p = _normal(*dec_step(z_t, jnp.full(batch, t)), 1)
            return kl_divergence(q, p)

        kls = jax.vmap(denoising)(jnp.arange(2, T + 1))
        return ELBOTerms(reconstruction, prior_matching, jnp.moveaxis(kls, 0, -1))

    def sample(self, rng_key, sample_shape=()) -> jax.Array:
        """x ~ p_theta(x): z_T ~ N(0, I), z_{t-1} ~ p(z_{t-1} | z_t), x ~ p(x | z_1)."""
        key_z, key_x = jax.random.split(rng_key)
        first, step = self._resolve("decoder")
        z = _DecoderChain(step, self.num_latents, self.latent_dim).sample(key_z, tuple(sample_shape))
        return self._x_dist(first, z[..., 0, :]).sample(key_x)
