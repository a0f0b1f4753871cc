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
    "Mixture1D",
    "noised_mixture_1d",
    "reverse_kernel_mixture_1d",
    "ReverseKernelGrid",
    "reverse_kernel_on_grid",
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


# ----------------------------------------------------------------------------- A5: the true reverse kernel
class Mixture1D(NamedTuple):
    r"""A 1-D Gaussian mixture sum_k w_k N(m_k, s_k^2), the data of the A5 (Feller) example.

    Attributes:
        weights: w_k, shape ``batch + (K,)``, positive, summing to 1 over the last axis.
        means: m_k, the same shape.
        stds: s_k > 0, the same shape.
    """

    weights: jax.Array
    means: jax.Array
    stds: jax.Array

    def log_prob(self, x) -> jax.Array:
        """log sum_k w_k N(x; m_k, s_k^2) for x broadcasting against ``batch``."""
        x = jnp.asarray(x)[..., None]
        comp = -0.5 * ((x - self.means) / self.stds) ** 2 - jnp.log(self.stds) - 0.5 * jnp.log(2 * jnp.pi)
        return logsumexp(comp + jnp.log(self.weights), -1)


def _check_unit_interval(value, name: str, *, closed_right: bool = False, what: str = ""):
    value = jnp.asarray(value)
    check_finite(value, name)
    if is_concrete(value):
        v = np.asarray(value, np.float64)
        bad = (v <= 0) | ((v > 1) if closed_right else (v >= 1))
        if bad.any():
            interval = "(0, 1]" if closed_right else "(0, 1)"
            raise ValueError(f"{name}{what} must lie in {interval}; got {name} = {v[bad].ravel()[0]:.4g}")
    return value


def _check_mixture_1d(weights, means, stds) -> Mixture1D:
    weights = jnp.asarray(weights)
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        weights = weights.astype(jnp.result_type(float))
    means = jnp.asarray(means, weights.dtype)
    stds = jnp.asarray(stds, weights.dtype)
    if weights.ndim != 1 or weights.shape[0] < 1 or means.shape != weights.shape or stds.shape != weights.shape:
        raise ValueError(
            "weights, means and stds must be vectors of the same length K >= 1; got shapes "
            f"{weights.shape}, {means.shape}, {stds.shape}"
        )
    for arr, name in ((weights, "weights"), (means, "means"), (stds, "stds")):
        check_finite(arr, name)
    if is_concrete(weights, stds):
        w, s = np.asarray(weights, np.float64), np.asarray(stds, np.float64)
        if np.any(w <= 0):
            raise ValueError(f"weights must be positive, each in (0, 1]; got weights = {w}")
        tol = 1e-5 * len(w)
        if abs(w.sum() - 1.0) > tol:
            raise ValueError(f"weights must sum to 1 (within {tol:.0e}); got sum {w.sum():.8g}")
        if np.any(s <= 0):
            raise ValueError(f"stds must be positive, in (0, inf); got stds = {s}")
    return Mixture1D(weights, means, stds)


def noised_mixture_1d(weights, means, stds, alpha_bar) -> Mixture1D:
    r"""The exact marginal q(x_t) of 1-D mixture data under the forward process (MATH.md A2).

    $$ x_0\sim\sum_k w_k\,\mathcal N(m_k, s_k^2)\ \Rightarrow\
       q(x_t) = \sum_k w_k\,\mathcal N\big(\sqrt{\bar\alpha_t}\,m_k,\ \bar\alpha_t s_k^2 + 1-\bar\alpha_t\big), $$

    since x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps adds independent Gaussian noise
    to each component.

    Args:
        weights: w_k, a vector of length K, positive, summing to 1.
        means: m_k, length K.
        stds: s_k > 0, length K.
        alpha_bar: alpha_bar_t in (0, 1] (1 gives the data).
    """
    m = _check_mixture_1d(weights, means, stds)
    ab = _check_unit_interval(alpha_bar, "alpha_bar", closed_right=True).astype(m.means.dtype)
    return Mixture1D(m.weights, jnp.sqrt(ab) * m.means, jnp.sqrt(ab * m.stds**2 + 1 - ab))


def reverse_kernel_mixture_1d(x_t, weights, means, stds, alpha_bar_prev, beta) -> Mixture1D:
    r"""The true reverse kernel q(x_{t-1} | x_t) of 1-D mixture data, in closed form (MATH.md A5).

    With q(x_{t-1}) = sum_k w_k N(a_k, v_k) ([noised_mixture_1d][probdiff.analytic.noised_mixture_1d]
    at alpha_bar_{t-1}) and q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t), Bayes' rule
    keeps the mixture form, with each component conditioned by the Gaussian algebra of A4:

    $$ q(x_{t-1}\mid x_t) = \sum_k r_k(x_t)\,\mathcal N\Big(x_{t-1};\
       \sigma_k^2\big(\tfrac{a_k}{v_k}+\tfrac{\sqrt{\alpha_t}\,x_t}{\beta_t}\big),\ \sigma_k^2\Big),
       \quad \frac1{\sigma_k^2} = \frac1{v_k}+\frac{\alpha_t}{\beta_t},\quad
       r_k \propto w_k\,\mathcal N\big(x_t;\ \sqrt{\alpha_t}\,a_k,\ \alpha_t v_k+\beta_t\big). $$

    A mixture, so not Gaussian in general; but as beta_t -> 0 the likelihood term alpha_t/beta_t
    dominates every component, all sigma_k^2 -> beta_t and all means -> x_t / sqrt(alpha_t): the
    kernel becomes one Gaussian (Feller). ``tests/test_teaching.py`` checks it against Bayes' rule
    on a grid ([reverse_kernel_on_grid][probdiff.analytic.reverse_kernel_on_grid]).

    Args:
        x_t: the conditioning value(s), any shape ``batch``.
        weights: w_k of the data mixture q(x_0), a vector of length K, positive, summing to 1.
        means: m_k, length K.
        stds: s_k > 0, length K.
        alpha_bar_prev: alpha_bar_{t-1} in (0, 1] (1 when t = 1).
        beta: beta_t in (0, 1).

    Returns:
        [Mixture1D][probdiff.analytic.Mixture1D] with arrays of shape ``batch + (K,)``.
    """
    m = _check_mixture_1d(weights, means, stds)
    ab = _check_unit_interval(alpha_bar_prev, "alpha_bar", closed_right=True).astype(m.means.dtype)
    beta = _check_unit_interval(beta, "beta", what=" (beta_t)").astype(m.means.dtype)
    return _reverse_kernel_mixture_1d(jnp.asarray(x_t, m.means.dtype), m, ab, beta)


@jax.jit
def _noised(m, ab):
    return Mixture1D(m.weights, jnp.sqrt(ab) * m.means, jnp.sqrt(ab * m.stds**2 + 1 - ab))


@jax.jit
def _reverse_kernel_mixture_1d(x_t, m, ab, beta):
    prior = _noised(m, ab)
    x_t = x_t[..., None]
    alpha = 1.0 - beta
    v = prior.stds**2
    post_var = 1.0 / (1.0 / v + alpha / beta)
    post_mean = post_var * (prior.means / v + jnp.sqrt(alpha) * x_t / beta)
    ev_var = alpha * v + beta
    log_r = jnp.log(prior.weights) - 0.5 * (x_t - jnp.sqrt(alpha) * prior.means) ** 2 / ev_var - 0.5 * jnp.log(ev_var)
    r = jax.nn.softmax(log_r, axis=-1)
    return Mixture1D(r, post_mean, jnp.broadcast_to(jnp.sqrt(post_var), post_mean.shape))


class ReverseKernelGrid(NamedTuple):
    """What [reverse_kernel_on_grid][probdiff.analytic.reverse_kernel_on_grid] returns.

    Attributes:
        log_prob: log q(x_{t-1} = grid_i | x_t), normalised on the grid; shape (n,).
        log_evidence: log q(x_t) = log int q(x_{t-1}) q(x_t | x_{t-1}) dx_{t-1} by the trapezoidal
            rule on the grid: Bayes' denominator (compare with the exact
            ``noised_mixture_1d(..., alpha_bar_prev * (1 - beta)).log_prob(x_t)``).
    """

    log_prob: jax.Array
    log_evidence: jax.Array


def reverse_kernel_on_grid(x_t, grid, weights, means, stds, alpha_bar_prev, beta) -> ReverseKernelGrid:
    r"""The true reverse kernel q(x_{t-1} | x_t) of 1-D mixture data by Bayes' rule on a grid (MATH.md A5).

    $$ q(x_{t-1}\mid x_t) = \frac{q(x_{t-1})\,q(x_t\mid x_{t-1})}{q(x_t)},\qquad
       q(x_t) = \int q(x_{t-1})\,q(x_t\mid x_{t-1})\,dx_{t-1}, $$

    with q(x_{t-1}) the exact noised mixture at alpha_bar_{t-1}
    ([noised_mixture_1d][probdiff.analytic.noised_mixture_1d]), q(x_t | x_{t-1}) =
    N(sqrt(1 - beta_t) x_{t-1}, beta_t) (A1) and the integral by the trapezoidal rule. No
    Gaussian assumption enters: the brute-force counterpart of
    [reverse_kernel_mixture_1d][probdiff.analytic.reverse_kernel_mixture_1d], and for Gaussian
    data (K = 1) of Gaussian conditioning. The grid is checked when its values are concrete: evenly
    spaced, at least 16 points, a spacing at most a quarter of the narrowest component's posterior
    standard deviation sigma_k = (1/v_k + alpha_t/beta_t)^{-1/2}, and, for a concrete x_t, wide
    enough that every component of the kernel lies within it (6 sigma_k).

    Args:
        x_t: the conditioning value, a scalar (``vmap`` for many).
        grid: evenly spaced values of x_{t-1}, shape (n,).
        weights: w_k of the data mixture q(x_0), a vector of length K, positive, summing to 1.
        means: m_k, length K.
        stds: s_k > 0, length K.
        alpha_bar_prev: alpha_bar_{t-1} in (0, 1] (1 when t = 1).
        beta: beta_t in (0, 1).

    Returns:
        [ReverseKernelGrid][probdiff.analytic.ReverseKernelGrid].

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.analytic import reverse_kernel_on_grid
        >>> grid = jnp.linspace(-6.0, 6.0, 2001)
        >>> k = reverse_kernel_on_grid(0.0, grid, [0.5, 0.5], [-2.0, 2.0], [0.5, 0.5], 1.0, 0.01)
        >>> round(float(jnp.exp(k.log_prob).sum() * (grid[1] - grid[0])), 4)
        1.0
    """
    mix = _check_mixture_1d(weights, means, stds)
    ab = _check_unit_interval(alpha_bar_prev, "alpha_bar", closed_right=True).astype(mix.means.dtype)
    prior = _noised(mix, ab)
    beta = _check_unit_interval(beta, "beta", what=" (beta_t)").astype(prior.means.dtype)
    grid = jnp.asarray(grid, prior.means.dtype)
    x_t = jnp.asarray(x_t, prior.means.dtype)
    if grid.ndim != 1 or grid.shape[0] < 16:
        raise ValueError(f"grid must be a 1-D array of at least 16 points (too coarse otherwise); got shape {grid.shape}")
    if x_t.ndim != 0:
        raise ValueError(f"x_t must be a scalar (vmap over many); got shape {x_t.shape}")
    check_finite(grid, "grid")
    if is_concrete(grid, beta, prior.stds):
        g = np.asarray(grid, np.float64)
        h = np.diff(g)
        if np.any(h <= 0) or np.abs(h - h.mean()).max() > 1e-3 * h.mean():
            raise ValueError("grid must be evenly spaced and increasing (np.linspace)")
        b = float(beta)
        v = np.asarray(prior.stds, np.float64) ** 2
        sig = np.sqrt(1.0 / (1.0 / v + (1.0 - b) / b))
        if h.mean() > sig.min() / 4:
            raise ValueError(
                f"grid is too coarse: spacing {h.mean():.3g} must be <= {sig.min() / 4:.3g}, a quarter of the "
                f"narrowest posterior standard deviation at beta = {b:.3g}"
            )
        if is_concrete(x_t, ab):
            post = _reverse_kernel_mixture_1d(x_t, mix, ab, beta)
            keep = np.asarray(post.weights) > 1e-12
            lo = float(np.min(np.asarray(post.means - 6 * post.stds)[keep]))
            hi = float(np.max(np.asarray(post.means + 6 * post.stds)[keep]))
            if g[0] > lo or g[-1] < hi:
                raise ValueError(
                    f"grid [{g[0]:.3g}, {g[-1]:.3g}] does not cover the reverse kernel at x_t = {float(x_t):.3g}; "
                    f"it needs at least [{lo:.3g}, {hi:.3g}]"
                )
    return _reverse_kernel_on_grid(x_t, grid, prior, beta)


@jax.jit
def _reverse_kernel_on_grid(x_t, grid, prior, beta):
    alpha = 1.0 - beta
    log_prior = prior.log_prob(grid)
    log_lik = -0.5 * (x_t - jnp.sqrt(alpha) * grid) ** 2 / beta - 0.5 * jnp.log(2 * jnp.pi * beta)
    log_joint = log_prior + log_lik
    h = (grid[-1] - grid[0]) / (grid.shape[0] - 1)
    c = jnp.ones_like(grid).at[0].set(0.5).at[-1].set(0.5)
    log_evidence = logsumexp(log_joint + jnp.log(c)) + jnp.log(h)
    return ReverseKernelGrid(log_joint - log_evidence, log_evidence)
