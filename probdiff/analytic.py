r"""Closed forms for Gaussian data: the optimal eps-function, exact p_theta(x_0), exact ELBO terms.

For data x_0 ~ N(mu, Sigma) the forward marginal is Gaussian,
x_t ~ N(sqrt(alpha_bar_t) mu, C_t) with C_t = alpha_bar_t Sigma + (1 - alpha_bar_t) I, and the
minimum-mean-squared-error noise prediction is affine in x_t:

$$ \epsilon^\star(x_t, t) = \mathbb{E}[\epsilon\mid x_t]
   = \sqrt{1-\bar\alpha_t}\;C_t^{-1}\big(x_t-\sqrt{\bar\alpha_t}\,\mu\big). $$

With any affine eps-function the reverse means mu_theta(x_t, t) = A_t x_t + b_t are affine,
the reverse chain is linear-Gaussian and everything about it is Gaussian algebra:
its marginal p_theta(x_0) = N(m_0, S_0) (so the exact log-likelihood), and the expected value
of every term of the ELBO. These power the demo, the Gaussian example and the tests.
A_t and b_t are read off any affine eps-function with ``jax.jacfwd`` at x_t = 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import logsumexp

from probdiff._checks import check_finite, is_concrete, take_t
from probdiff.distributions.kernels import posterior_mean, reverse_variance
from probdiff.schedules import Schedule

__all__ = [
    "GaussianData",
    "GaussianMixture",
    "optimal_eps_fn",
    "affine_reverse_coefficients",
    "affine_reverse_marginal",
    "affine_elbo_terms",
]


class GaussianData(NamedTuple):
    r"""Data distribution pi(x_0) = N(mu, Sigma) on R^D.

    Attributes:
        mu: mean, shape (D,).
        cov: covariance Sigma, shape (D, D), symmetric positive definite.
    """

    mu: jax.Array
    cov: jax.Array

    @classmethod
    def default_2d(cls) -> GaussianData:
        """The built-in 2-D data set of the demo: a tilted, elongated Gaussian."""
        mu = jnp.array([1.0, -0.5])
        cov = jnp.array([[1.0, 0.6], [0.6, 0.5]])
        return cls(mu, cov)

    def distribution(self) -> dist.MultivariateNormal:
        """pi(x_0) as a NumPyro ``MultivariateNormal``."""
        return dist.MultivariateNormal(self.mu, covariance_matrix=self.cov)

    def sample(self, key, num: int) -> jax.Array:
        """``num`` draws from pi(x_0), shape (num, D)."""
        return self.distribution().sample(key, (num,))

    def log_prob(self, x_0) -> jax.Array:
        """log pi(x_0), the true data log-density."""
        return self.distribution().log_prob(x_0)


class GaussianMixture(NamedTuple):
    r"""An isotropic Gaussian mixture and its exact noised scores (MATH.md D3, D4).

    $$ p_\sigma(x) = \sum_k w_k\,\mathcal N\big(x;\ \mu_k,\ (s^2+\sigma^2) I\big),\qquad
       s(x,\sigma) = \nabla_x \log p_\sigma(x), $$

    the data p_0 convolved with N(0, sigma^2 I): the density that a noise-conditional score
    network s_theta(x, sigma) learns and annealed Langevin dynamics samples. With a diffusion
    schedule, q(x_t) is the mixture scaled by sqrt(alpha_bar_t) with variance
    alpha_bar_t s^2 + 1 - alpha_bar_t (see [score_t][probdiff.analytic.GaussianMixture.score_t]).

    Attributes:
        means: mu_k, shape (K, D).
        weights: w_k, shape (K,), positive, summing to 1.
        scale: s > 0, the standard deviation of every component.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.analytic import GaussianMixture
        >>> m = GaussianMixture(jnp.array([[-2.0], [2.0]]), jnp.array([0.5, 0.5]), 0.5)
        >>> float(m.score(jnp.zeros((1, 1)), 1.0)[0, 0])   # symmetric: no pull at 0
        0.0
    """

    means: jax.Array
    weights: jax.Array
    scale: float

    @classmethod
    def three_modes(cls) -> GaussianMixture:
        """Three well separated modes in 2-D with unequal weights 0.2, 0.3, 0.5 (scale 0.5)."""
        return cls(jnp.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]]), jnp.array([0.2, 0.3, 0.5]), 0.5)

    @classmethod
    def ring(cls, num_modes: int = 6, radius: float = 2.5, scale: float = 0.45) -> GaussianMixture:
        """``num_modes`` modes evenly spaced on a circle in 2-D, weights proportional to 1, 2, ..., num_modes."""
        angle = 2 * np.pi * np.arange(num_modes) / num_modes
        means = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        w = np.arange(1, num_modes + 1, dtype=np.float64)
        return cls(jnp.asarray(means, jnp.float32), jnp.asarray(w / w.sum(), jnp.float32), scale)

    def log_prob(self, x, sigma=0.0) -> jax.Array:
        """log p_sigma(x) for x of shape ``batch + (D,)``."""
        mu = jnp.asarray(self.means)
        v = self.scale**2 + jnp.asarray(sigma) ** 2
        d = mu.shape[-1]
        sq = jnp.sum((jnp.asarray(x)[..., None, :] - mu) ** 2, -1)
        comp = -0.5 * sq / v - 0.5 * d * jnp.log(2 * jnp.pi * v)
        return logsumexp(comp + jnp.log(jnp.asarray(self.weights)), -1)

    def score(self, x, sigma=0.0) -> jax.Array:
        r"""s(x, sigma) = sum_k r_k(x) (mu_k - x) / (s^2 + sigma^2), r_k the posterior responsibility."""
        v = self.scale**2 + jnp.asarray(sigma) ** 2
        return _mixture_score(jnp.asarray(x), jnp.asarray(self.means), v, self.weights)

    def score_t(self, x_t, t, schedule: Schedule) -> jax.Array:
        r"""The score of q(x_t) = sum_k w_k N(sqrt(ab_t) mu_k, (ab_t s^2 + 1 - ab_t) I).

        ``t`` is a scalar integer in 0..T or one per example (shape ``x_t.shape[:-1]``).
        """
        x_t = jnp.asarray(x_t)
        ab = jnp.asarray(schedule.alpha_bar[t], x_t.dtype)[..., None]  # batch + (1,)
        omab = jnp.asarray(schedule.one_minus_alpha_bar[t], x_t.dtype)[..., None]
        mu = jnp.sqrt(ab)[..., None] * jnp.asarray(self.means)  # batch + (K, D)
        return _mixture_score(x_t, mu, ab * self.scale**2 + omab, self.weights)

    def sample(self, key, n: int) -> jax.Array:
        """n exact draws of p_0, shape (n, D)."""
        k1, k2 = jax.random.split(key)
        c = jax.random.choice(k1, len(self.weights), (n,), p=jnp.asarray(self.weights))
        mu = jnp.asarray(self.means)
        return mu[c] + self.scale * jax.random.normal(k2, (n, mu.shape[-1]))

    def mode_weights(self, x) -> np.ndarray:
        """The share of the points x (shape (n, D)) nearest to each mean mu_k."""
        x = jnp.asarray(x)
        nearest = np.asarray(jnp.argmin(jnp.sum((x[:, None] - jnp.asarray(self.means)) ** 2, -1), 1))
        return np.bincount(nearest, minlength=len(self.weights)) / len(x)


def _mixture_score(x, mu, v, weights):
    """Score of sum_k w_k N(mu_k, v I) at x: mu of shape (..., K, D), v broadcasting to x[..., :1]."""
    sq = jnp.sum((x[..., None, :] - mu) ** 2, -1)  # (..., K)
    r = jax.nn.softmax(-0.5 * sq / v + jnp.log(jnp.asarray(weights)), axis=-1)
    return (jnp.sum(r[..., None] * mu, -2) - x) / v


def _check_gaussian(mu, cov):
    mu = jnp.asarray(mu)
    cov = jnp.asarray(cov, dtype=mu.dtype)
    if mu.ndim != 1:
        raise ValueError(f"mu must be a vector of shape (D,); got shape {mu.shape}")
    D = mu.shape[0]
    if cov.shape != (D, D):
        raise ValueError(f"cov must have shape (D, D) = {(D, D)}; got {cov.shape}")
    check_finite(mu, "mu")
    check_finite(cov, "cov")
    if is_concrete(cov):
        c = np.asarray(cov, np.float64)
        if not np.allclose(c, c.T, rtol=1e-6, atol=1e-8 * max(1.0, np.abs(c).max())):
            raise ValueError("cov must be symmetric; got cov != cov.T")
        low = np.linalg.eigvalsh(c).min()
        if low < -1e-6 * max(1.0, np.abs(c).max()):
            raise ValueError(f"cov must be positive semi-definite; its smallest eigenvalue is {low:.3g}")
    return mu, cov


def optimal_eps_fn(mu, cov, schedule: Schedule):
    r"""The exact E[eps | x_t] for data N(mu, cov): the optimal eps-network.

    $$ \epsilon^\star(x_t,t) = \sqrt{1-\bar\alpha_t}\,C_t^{-1}\big(x_t-\sqrt{\bar\alpha_t}\,\mu\big),
       \qquad C_t = \bar\alpha_t\,\Sigma + (1-\bar\alpha_t) I . $$

    C_t^{-1} is applied through the eigendecomposition Sigma = U diag(lambda) U^T, so
    C_t^{-1} = U diag(1 / (alpha_bar_t lambda + 1 - alpha_bar_t)) U^T and no D x D inverse is
    formed per t. Checked against E[eps | x_t] by Gaussian conditioning in
    ``tests/test_analytic.py``. ``cov`` is checked for symmetry and positive
    semi-definiteness when its values are concrete.

    Args:
        mu: data mean, shape (D,).
        cov: data covariance, shape (D, D), symmetric positive semi-definite.
        schedule: the noise schedule.

    Returns:
        ``eps_fn(x_t, t)`` for x_t of shape ``batch + (D,)`` and integer t broadcasting over batch.
    """
    mu, cov = _check_gaussian(mu, cov)
    lam, U = jnp.linalg.eigh(cov)

    def eps_fn(x_t, t):
        t = jnp.asarray(t)[..., None]
        ab = take_t(schedule.alpha_bar, t).astype(x_t.dtype)  # NaN outside 1..T, never clamped
        omab = take_t(schedule.one_minus_alpha_bar, t).astype(x_t.dtype)
        r = (x_t - jnp.sqrt(ab) * mu) @ U
        return jnp.sqrt(omab) * (r / (ab * lam + omab)) @ U.T

    return eps_fn


class AffineReverse(NamedTuple):
    """mu_theta(x_t, t) = A[t] x_t + b[t] and sigma2[t], stacked for t = 1..T (index t - 1)."""

    A: jax.Array
    b: jax.Array
    sigma2: jax.Array


def affine_reverse_coefficients(diffusion) -> AffineReverse:
    r"""Read mu_theta(x_t, t) = A_t x_t + b_t off a diffusion whose eps-function is affine.

    $$ A_t = \frac{\partial\mu_\theta(x_t,t)}{\partial x_t},\qquad b_t = \mu_\theta(0, t) $$

    by ``jax.jacfwd`` at x_t = 0, for all t at once. Only meaningful when eps_fn is affine in
    x_t (e.g. [optimal_eps_fn][probdiff.analytic.optimal_eps_fn]); the event must be a vector.

    Args:
        diffusion: a [GaussianDiffusion][probdiff.GaussianDiffusion] with ``event_shape == (D,)``.
    """
    if diffusion.event_ndim != 1:
        raise ValueError(f"affine closed forms need a vector event_shape (D,); got {diffusion.event_shape}")
    if diffusion.variance_kind == "learned":
        raise ValueError("affine closed forms need a fixed variance ('beta' or 'beta_tilde'); got 'learned'")
    s = diffusion.schedule
    D = diffusion.event_shape[0]
    zero = jnp.zeros((D,), s.dtype)

    def mean(x, t):
        return diffusion._moments(t, x).mean

    ts = jnp.arange(1, s.num_steps + 1)
    A = jax.vmap(lambda t: jax.jacfwd(mean)(zero, t))(ts)
    b = jax.vmap(lambda t: mean(zero, t))(ts)
    sigma2 = reverse_variance(s, diffusion.variance_kind)[1:]
    return AffineReverse(A, b, sigma2)


def affine_reverse_marginal(diffusion, *, final_noise: bool = True) -> dist.MultivariateNormal:
    r"""The exact p_theta(x_0) of a linear-Gaussian reverse chain.

    From x_T ~ N(0, I) and x_{t-1} = A_t x_t + b_t + sigma_t z the marginals stay Gaussian:

    $$ m_{t-1} = A_t m_t + b_t,\qquad S_{t-1} = A_t S_t A_t^\top + \sigma_t^2 I,
       \qquad m_T = 0,\ S_T = I, $$

    run by ``lax.scan`` from t = T to 1. ``final_noise=False`` drops sigma_1^2 I at t = 1,
    giving the law of Algorithm 2's output (z = 0 at t = 1).

    Returns:
        N(m_0, S_0) as a NumPyro ``MultivariateNormal``; its ``log_prob`` is the exact
        log p_theta(x_0), which the ELBO bounds from below.
    """
    A, b, sigma2 = affine_reverse_coefficients(diffusion)
    if not final_noise:
        sigma2 = sigma2.at[0].set(0.0)
    D = b.shape[-1]
    eye = jnp.eye(D, dtype=b.dtype)

    def step(carry, inputs):
        m, S = carry
        A_t, b_t, s2 = inputs
        return (A_t @ m + b_t, A_t @ S @ A_t.T + s2 * eye), None

    (m0, S0), _ = jax.lax.scan(step, (jnp.zeros(D, b.dtype), eye), (A, b, sigma2), reverse=True)
    S0 = 0.5 * (S0 + S0.T)
    return dist.MultivariateNormal(m0, covariance_matrix=S0)


def affine_elbo_terms(diffusion, x_0):
    r"""The expected ELBO terms (MATH.md B2) for an affine eps-function, in closed form.

    With x_t ~ N(m_t, s_t I), m_t = sqrt(alpha_bar_t) x_0, s_t = 1 - alpha_bar_t, and
    mu_theta = A_t x_t + b_t, mu_tilde_t = c_t x_t + c_0 x_0, every expectation is Gaussian:

    $$ \mathbb{E}\log p_\theta(x_0|x_1) = -\tfrac{D}{2}\log(2\pi\sigma_1^2)
       - \frac{\|x_0 - A_1 m_1 - b_1\|^2 + s_1\|A_1\|_F^2}{2\sigma_1^2}, $$

    $$ \mathbb{E}\,\mathrm{KL}_t = \tfrac12\Big[D\big(\tfrac{\tilde\beta_t}{\sigma_t^2}-1
       -\log\tfrac{\tilde\beta_t}{\sigma_t^2}\big)
       + \frac{\|(c_tI-A_t)m_t + c_0x_0 - b_t\|^2 + s_t\|c_tI-A_t\|_F^2}{\sigma_t^2}\Big], $$

    and the prior term KL(N(m_T, s_T I) || N(0, I)) = 1/2 sum(s_T + m_T^2 - 1 - log s_T).

    Args:
        diffusion: a [GaussianDiffusion][probdiff.GaussianDiffusion] with an affine eps_fn
            and ``event_shape == (D,)``.
        x_0: data, shape ``batch + (D,)``.

    Returns:
        [ELBOTerms][probdiff.ELBOTerms] holding the expectations (no randomness).
    """
    from probdiff.diffusion import ELBOTerms

    x_0 = diffusion._check_x0(x_0)
    s = diffusion.schedule
    T = s.num_steps
    D = x_0.shape[-1]
    A, b, sigma2 = affine_reverse_coefficients(diffusion)
    eye = jnp.eye(D, dtype=x_0.dtype)

    # Reconstruction, t = 1.
    m1 = jnp.sqrt(s.alpha_bar[1]) * x_0
    r = x_0 - m1 @ A[0].T - b[0]
    recon = -0.5 * D * jnp.log(2 * jnp.pi * sigma2[0]) - (
        jnp.sum(r**2, -1) + s.one_minus_alpha_bar[1] * jnp.sum(A[0] ** 2)
    ) / (2 * sigma2[0])

    # Prior matching, exact.
    mT2 = s.alpha_bar[T] * x_0**2
    sT = s.one_minus_alpha_bar[T]
    prior = 0.5 * jnp.sum(sT + mT2 - 1.0 - jnp.log(sT), axis=-1)

    # Denoising matching, t = 2..T: mu_tilde = c_t x_t + c_0 x_0 read off posterior_mean.
    def kl_t(t):
        c_t = posterior_mean(s, t, jnp.ones(()), jnp.zeros(()), event_ndim=0)
        c_0 = posterior_mean(s, t, jnp.zeros(()), jnp.ones(()), event_ndim=0)
        M = c_t * eye - A[t - 1]
        m_t = jnp.sqrt(s.alpha_bar[t]) * x_0
        r = m_t @ M.T + c_0 * x_0 - b[t - 1]
        sq = jnp.sum(r**2, -1) + s.one_minus_alpha_bar[t] * jnp.sum(M**2)
        ratio = s.beta_tilde[t] / sigma2[t - 1]
        return 0.5 * (D * (ratio - 1.0 - jnp.log(ratio)) + sq / sigma2[t - 1])

    if T == 1:
        den = jnp.zeros(x_0.shape[:-1] + (0,), x_0.dtype)
    else:
        den = jnp.moveaxis(jax.vmap(kl_t)(jnp.arange(2, T + 1)), 0, -1)
    return ELBOTerms(recon, prior, den)
