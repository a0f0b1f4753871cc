r"""Divergences of the notes: KL in both directions, KL on a grid, and the joint-KL bound.

MATH.md G1, B5 and the estimators of B2/B3. Every KL here is

$$ \mathrm{KL}(p\,\|\,q) = \int p(x)\log\frac{p(x)}{q(x)}\,dx \;\ge 0, $$

computed in closed form where both sides are Gaussian, by quadrature on a grid of the standardised
variable where one side is a Gaussian mixture (see [kl_gaussian_mixture][probdiff.divergences.kl_gaussian_mixture]),
and by the trapezoidal rule where the densities live on a 1-D grid.

* **G1, the two directions** (``004_*``, opening question). Fitting one Gaussian
  q = N(m, S) to a mixture p:
  KL(p || q) is minimised by moment matching (mode covering,
  [moment_match][probdiff.divergences.moment_match]); KL(q || p) has no closed-form minimiser
  and, for well-separated modes, a local minimum at each mode (mode seeking,
  [fit_reverse_kl][probdiff.divergences.fit_reverse_kl]).
* **B5, the joint bound** (``003_*`` eq. 10): for any encoder q(z|x),
  KL(p(x) || p_theta(x)) <= KL(p(x) q(z|x) || p_theta(x, z)), the difference being
  E_{p(x)} KL(q(z|x) || p_theta(z|x)); all three in closed form for linear-Gaussian models
  ([joint_kl_bound][probdiff.divergences.joint_kl_bound]) and for mixtures with their labels
  ([mixture_joint_kl][probdiff.divergences.mixture_joint_kl]).
* **B2 against B3**: the two unbiased ELBO estimators of a diffusion model, drawn many times
  ([elbo_estimates][probdiff.divergences.elbo_estimates]).

Values are checked only when concrete (see ``probdiff._checks``); under ``jit``/``vmap``/``grad``
every function here is traceable.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

from probdiff._checks import check_finite, is_concrete

__all__ = [
    "MixtureOfGaussians",
    "gaussian_kl",
    "gaussian_entropy",
    "moment_match",
    "kl_mixture_gaussian",
    "kl_gaussian_mixture",
    "kl_mixtures",
    "ReverseKLFit",
    "fit_reverse_kl",
    "kl_on_grid",
    "BestGaussianKL",
    "kl_to_best_gaussian_on_grid",
    "MIN_GRID_POINTS",
    "DEFAULT_NODES",
    "LinearGaussianModel",
    "AffineGaussianEncoder",
    "JointKL",
    "joint_kl_bound",
    "mixture_joint_kl",
    "ELBOEstimates",
    "elbo_estimates",
]

#: The fewest points a 1-D grid may have for the grid integrals of this module.
MIN_GRID_POINTS = 16

_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- input checks
def _check_weights(weights, name: str = "weights"):
    weights = jnp.asarray(weights)
    if weights.ndim != 1 or weights.shape[0] < 1:
        raise ValueError(
            f"{name} must be a vector of K >= 1 mixture weights, shape (K,); got shape {weights.shape}"
        )
    check_finite(weights, name)
    if is_concrete(weights):
        w = np.asarray(weights, np.float64)
        if np.any(w <= 0):
            k = int(np.argmax(w <= 0))
            raise ValueError(f"{name} must be positive, each in (0, 1]; got {name}[{k}] = {w[k]:.4g}")
        tol = 1e-5 if weights.dtype == jnp.float32 else 1e-10
        if abs(w.sum() - 1.0) > tol * max(1, len(w)):
            raise ValueError(f"{name} must sum to 1 (within {tol * max(1, len(w)):.0e}); got sum {w.sum():.8g}")
    return weights


def _check_spd(cov, name: str):
    """Shape (..., D, D), finite, symmetric, positive definite (values only when concrete)."""
    cov = jnp.asarray(cov)
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{name} must be square matrices of shape (..., D, D); got shape {cov.shape}")
    check_finite(cov, name)
    if is_concrete(cov):
        c = np.asarray(cov, np.float64).reshape((-1,) + cov.shape[-2:])
        scale = max(1.0, float(np.abs(c).max()))
        for i, ci in enumerate(c):
            where = f"{name}[{i}]" if cov.ndim > 2 else name
            if not np.allclose(ci, ci.T, rtol=1e-5, atol=1e-7 * scale):
                raise ValueError(f"{where} must be symmetric; got {where} != {where}.T")
            low = np.linalg.eigvalsh(ci).min()
            if not low > 0:
                raise ValueError(
                    f"{where} must be positive definite (every variance > 0); its smallest eigenvalue is {low:.4g}"
                )
    return cov


def _check_positive_array(x, name: str):
    x = jnp.asarray(x)
    check_finite(x, name)
    if is_concrete(x):
        v = np.asarray(x)
        if np.any(v <= 0):
            i = tuple(int(j) for j in np.argwhere(v <= 0)[0])
            raise ValueError(f"{name} must be positive, in (0, inf); got {name}[{i}] = {v[i]:.4g}")
    return x


#: Default quadrature nodes per dimension, by dimension D (about 2^15 nodes or fewer in all).
DEFAULT_NODES = {1: 801, 2: 161, 3: 31}


def _check_num_nodes(num_nodes, dim: int) -> int:
    if num_nodes is None:
        return DEFAULT_NODES.get(dim, max(8, int(2 ** (15 / dim))))
    if not isinstance(num_nodes, (int, np.integer)) or num_nodes < 8:
        raise ValueError(
            f"num_nodes must be an integer >= 8 (quadrature nodes per dimension; fewer is too coarse); got {num_nodes!r}"
        )
    if num_nodes**dim > 2**20:
        raise ValueError(
            f"num_nodes ** D must be <= {2**20} (a tensor-product rule in D = {dim} dimensions); "
            f"got {num_nodes} ** {dim}"
        )
    return int(num_nodes)


def _check_grid(grid, name: str = "grid"):
    grid = jnp.asarray(grid)
    if grid.ndim != 1 or grid.shape[0] < MIN_GRID_POINTS:
        raise ValueError(
            f"{name} must be a 1-D array of at least {MIN_GRID_POINTS} points (too coarse otherwise); "
            f"got shape {grid.shape}"
        )
    if not jnp.issubdtype(grid.dtype, jnp.floating):
        grid = grid.astype(jnp.result_type(float))
    check_finite(grid, name)
    if is_concrete(grid):
        g = np.asarray(grid, np.float64)
        h = np.diff(g)
        if np.any(h <= 0):
            raise ValueError(f"{name} must increase strictly; got {name}[{int(np.argmax(h <= 0)) + 1}] <= its predecessor")
        if np.abs(h - h.mean()).max() > 1e-3 * h.mean():
            raise ValueError(f"{name} must be evenly spaced (np.linspace); spacings range from {h.min():.4g} to {h.max():.4g}")
    return grid


# ----------------------------------------------------------------------------- Gaussians
def _chol(cov):
    return jnp.linalg.cholesky(cov)


def _mvn_log_prob(x, mean, chol):
    """log N(x; mean, chol chol^T) for x of shape batch + (D,), one (mean, chol)."""
    D = mean.shape[-1]
    inv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(D, dtype=chol.dtype), lower=True)
    z = (x - mean) @ inv.T
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (jnp.sum(z**2, -1) + D * _LOG_2PI + logdet)


def gaussian_kl(mean_p, cov_p, mean_q, cov_q) -> jax.Array:
    r"""KL between two Gaussians in closed form.

    $$ \mathrm{KL}\big(\mathcal N(m_p,S_p)\,\|\,\mathcal N(m_q,S_q)\big) = \tfrac12\Big[
       \operatorname{tr}(S_q^{-1}S_p) + (m_q-m_p)^\top S_q^{-1}(m_q-m_p) - D
       + \log\frac{\det S_q}{\det S_p}\Big]. $$

    Checked against the textbook formula and a Monte-Carlo log-density ratio in ``tests/test_teaching.py``.

    Args:
        mean_p: m_p, shape (D,).
        cov_p: S_p, shape (D, D), positive definite.
        mean_q: m_q, shape (D,).
        cov_q: S_q, shape (D, D), positive definite.

    Returns:
        The KL in nats, a scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.divergences import gaussian_kl
        >>> round(float(gaussian_kl(jnp.zeros(1), jnp.eye(1), jnp.ones(1), jnp.eye(1))), 6)
        0.5
    """
    cov_p, cov_q = _check_spd(cov_p, "cov_p"), _check_spd(cov_q, "cov_q")
    mean_p, mean_q = jnp.asarray(mean_p, cov_p.dtype), jnp.asarray(mean_q, cov_q.dtype)
    return _gaussian_kl(mean_p, cov_p, mean_q, cov_q)


@jax.jit
def _gaussian_kl(mean_p, cov_p, mean_q, cov_q):
    D = mean_p.shape[-1]
    Lp, Lq = _chol(cov_p), _chol(cov_q)
    inv_q = jax.scipy.linalg.solve_triangular(Lq, jnp.eye(D, dtype=Lq.dtype), lower=True)
    A = inv_q @ Lp  # Lq^{-1} Lp: tr(S_q^{-1} S_p) = ||A||_F^2
    d = inv_q @ (mean_q - mean_p)
    logdet = 2.0 * (jnp.sum(jnp.log(jnp.diagonal(Lq))) - jnp.sum(jnp.log(jnp.diagonal(Lp))))
    return 0.5 * (jnp.sum(A**2) + jnp.sum(d**2) - D + logdet)


def gaussian_entropy(cov) -> jax.Array:
    r"""The differential entropy of N(m, S): H = D/2 log(2 pi e) + 1/2 log det S (nats).

    Used for B5: the average negative log-likelihood -E_p log p_theta(x) equals
    KL(p || p_theta) + H(p), and H(p) does not depend on theta.
    """
    cov = _check_spd(cov, "cov")
    D = cov.shape[-1]
    return 0.5 * D * (_LOG_2PI + 1.0) + jnp.sum(jnp.log(jnp.diagonal(_chol(cov), axis1=-2, axis2=-1)), -1)


# ----------------------------------------------------------------------------- mixtures
class MixtureOfGaussians(NamedTuple):
    r"""A Gaussian mixture with a full covariance per component.

    $$ p(x) = \sum_{k=1}^K w_k\,\mathcal N(x;\ \mu_k,\ \Sigma_k),\qquad
       p(x, z=k) = w_k\,\mathcal N(x;\mu_k,\Sigma_k). $$

    Unlike [GaussianMixture][probdiff.analytic.GaussianMixture] (one shared isotropic scale, for
    noised scores), each component has its own covariance: the form that EM fits
    ([probdiff.em][probdiff.em]) and that the G1 example approximates by one Gaussian. A NamedTuple,
    so it passes through ``jit`` and ``vmap``; build it with ``create`` or ``from_stds`` to have
    the values checked.

    Attributes:
        weights: w_k, shape (K,), positive, summing to 1.
        means: mu_k, shape (K, D).
        covs: Sigma_k, shape (K, D, D), symmetric positive definite.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.divergences import MixtureOfGaussians
        >>> p = MixtureOfGaussians.from_stds([0.5, 0.5], [-2.0, 2.0], [1.0, 1.0])
        >>> p.means.shape, p.covs.shape
        ((2, 1), (2, 1, 1))
        >>> float(p.mean()[0]), float(p.covariance()[0, 0])   # moments: 0 and 1 + 4
        (0.0, 5.0)
    """

    weights: jax.Array
    means: jax.Array
    covs: jax.Array

    @classmethod
    def create(cls, weights, means, covs) -> MixtureOfGaussians:
        """A checked mixture: weights (K,) positive summing to 1, means (K, D), covs (K, D, D) SPD."""
        return _check_mixture(cls(jnp.asarray(weights), jnp.asarray(means), jnp.asarray(covs)))

    @classmethod
    def from_stds(cls, weights, means, stds) -> MixtureOfGaussians:
        """A 1-D mixture sum_k w_k N(m_k, s_k^2) from vectors of weights, means and stds (all (K,))."""
        weights = jnp.asarray(weights, dtype=jnp.result_type(float))
        means = jnp.asarray(means, dtype=weights.dtype)
        stds = _check_positive_array(jnp.asarray(stds, dtype=weights.dtype), "stds")
        if means.ndim != 1 or stds.shape != means.shape or weights.shape != means.shape:
            raise ValueError(
                f"weights, means and stds must be vectors of the same length K; got shapes "
                f"{weights.shape}, {means.shape}, {stds.shape}"
            )
        return cls.create(weights, means[:, None], (stds**2)[:, None, None])

    @classmethod
    def from_isotropic(cls, mixture) -> MixtureOfGaussians:
        """The same law as an [analytic.GaussianMixture][probdiff.analytic.GaussianMixture] (scale s: Sigma_k = s^2 I)."""
        means = jnp.asarray(mixture.means)
        K, D = means.shape
        covs = jnp.broadcast_to(jnp.asarray(mixture.scale, means.dtype) ** 2 * jnp.eye(D, dtype=means.dtype), (K, D, D))
        return cls.create(jnp.asarray(mixture.weights, means.dtype), means, covs)

    @property
    def num_components(self) -> int:
        """K."""
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        """D."""
        return self.means.shape[-1]

    def component_log_prob(self, x) -> jax.Array:
        """log w_k + log N(x; mu_k, Sigma_k) = log p(x, z=k), shape batch + (K,)."""
        return _component_log_prob(self, jnp.asarray(x))

    def log_prob(self, x) -> jax.Array:
        """log p(x) = logsumexp_k log p(x, z=k), for x of shape batch + (D,)."""
        return _mixture_log_prob(self, jnp.asarray(x))

    def responsibilities(self, x) -> jax.Array:
        r"""The posterior p(z=k | x) = w_k N(x; mu_k, Sigma_k) / p(x), shape batch + (K,)."""
        return jax.nn.softmax(self.component_log_prob(x), axis=-1)

    def mean(self) -> jax.Array:
        """E[x] = sum_k w_k mu_k, shape (D,)."""
        return self.weights @ self.means

    def covariance(self) -> jax.Array:
        """Cov[x] = sum_k w_k (Sigma_k + mu_k mu_k^T) - E[x] E[x]^T, shape (D, D)."""
        m = self.mean()
        second = jnp.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - jnp.outer(m, m)

    def sample(self, key, n: int, *, return_labels: bool = False):
        """n draws of p(x), shape (n, D); with ``return_labels`` also the components z, shape (n,)."""
        x, z = _mixture_sample(self, key, int(n))
        return (x, z) if return_labels else x


@jax.jit
def _component_log_prob(mixture, x):
    chol = _chol(mixture.covs)
    comp = jax.vmap(lambda m, L: _mvn_log_prob(x, m, L), out_axes=-1)(mixture.means, chol)
    return comp + jnp.log(mixture.weights)


@jax.jit
def _mixture_log_prob(mixture, x):
    return logsumexp(_component_log_prob(mixture, x), axis=-1)


@partial(jax.jit, static_argnums=2)
def _mixture_sample(mixture, key, n):
    k1, k2 = jax.random.split(key)
    z = jax.random.choice(k1, mixture.weights.shape[0], (n,), p=mixture.weights)
    eps = jax.random.normal(k2, (n, mixture.means.shape[-1]), mixture.means.dtype)
    return mixture.means[z] + jnp.einsum("nij,nj->ni", _chol(mixture.covs)[z], eps), z


def _check_mixture(m, name: str = "mixture") -> MixtureOfGaussians:
    if not isinstance(m, MixtureOfGaussians):
        if hasattr(m, "scale") and hasattr(m, "means"):  # analytic.GaussianMixture
            return MixtureOfGaussians.from_isotropic(m)
        raise TypeError(f"{name} must be a probdiff.divergences.MixtureOfGaussians; got {type(m).__name__}")
    weights = _check_weights(m.weights, f"{name}.weights")
    K = weights.shape[0]
    if m.means.ndim != 2 or m.means.shape[0] != K:
        raise ValueError(f"{name}.means must have shape (K, D) with K = {K}; got {m.means.shape}")
    D = m.means.shape[1]
    if m.covs.shape != (K, D, D):
        raise ValueError(f"{name}.covs must have shape (K, D, D) = {(K, D, D)}; got {m.covs.shape}")
    check_finite(m.means, f"{name}.means")
    _check_spd(m.covs, f"{name}.covs")
    return m


def moment_match(mixture: MixtureOfGaussians):
    r"""The forward-KL (mode-covering) fit of one Gaussian to a mixture: its moments.

    $$ \arg\min_{m,S}\mathrm{KL}\big(p\,\|\,\mathcal N(m,S)\big) = \big(\mathbb E_p[x],\ \mathrm{Cov}_p[x]\big),
       \quad \mathbb E_p[x]=\sum_k w_k\mu_k,\quad
       \mathrm{Cov}_p[x]=\sum_k w_k(\Sigma_k+\mu_k\mu_k^\top)-\mathbb E_p[x]\mathbb E_p[x]^\top, $$

    because KL(p || q) = -H(p) - E_p log q and E_p log N(x; m, S) depends on p only through its
    first two moments (MATH.md G1). Checked in ``tests/test_teaching.py``: the gradient of the
    quadrature KL vanishes there, and the moments match scipy's quadrature.

    Returns:
        ``(mean, cov)``, shapes (D,) and (D, D).
    """
    mixture = _check_mixture(mixture)
    return mixture.mean(), mixture.covariance()


_Z_MAX = 8.0  # the standardised grid spans [-8, 8]^D: phi(8) / phi(0) = 1.3e-14


def _normal_rule(num_nodes: int, dim: int, dtype):
    """E_{N(0, I_D)} f(z) ~ sum_i w_i f(z_i): z on an even grid over [-8, 8]^D, w_i ~ phi(z_i), sum w_i = 1.

    The trapezoidal rule with the Gaussian weight (renormalised on the grid). Its error falls like
    exp(-2 pi a / h) for an integrand analytic in a strip |Im z| < a, h the spacing. Gauss-Hermite
    would need far fewer nodes for smooth integrands but converges slowly here: log p of a mixture
    has singularities close to the real axis where its components cross (a corner of width
    ~ 1 / |d log(p_1/p_2)/dx|), which a uniform grid of small h resolves.
    """
    z = np.linspace(-_Z_MAX, _Z_MAX, num_nodes)
    w = np.exp(-0.5 * z**2)
    w = w / w.sum()
    grids = np.meshgrid(*([z] * dim), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], -1)
    weights = np.prod(np.stack(np.meshgrid(*([w] * dim), indexing="ij"), -1).reshape(-1, dim), -1)
    return jnp.asarray(nodes, dtype), jnp.asarray(weights, dtype)


def _expect_gaussian(f, mean, chol, num_nodes):
    """E_{N(mean, chol chol^T)} f(x) on the standardised grid, f vectorised over a leading axis."""
    z, w = _normal_rule(num_nodes, mean.shape[-1], mean.dtype)
    return jnp.sum(w * f(mean + z @ chol.T))


def kl_mixture_gaussian(mixture: MixtureOfGaussians, mean, cov, *, num_nodes: int | None = None) -> jax.Array:
    r"""KL(p || q) from a Gaussian mixture p to a Gaussian q = N(m, S) (mode covering), by quadrature.

    $$ \mathrm{KL}(p\,\|\,q) = \sum_k w_k\,\mathbb E_{\mathcal N(\mu_k,\Sigma_k)}\big[\log p(x)-\log q(x)\big], $$

    each expectation on x = mu_k + L_k z with z on an even grid over [-8, 8]^D, weighted by the
    standard normal density (the trapezoidal rule; accurate to ~1e-9 with the default nodes for the
    mixtures of the examples). Checked against scipy's adaptive quadrature in ``tests/test_teaching.py``.

    Args:
        mixture: p, a [MixtureOfGaussians][probdiff.divergences.MixtureOfGaussians].
        mean: m, shape (D,).
        cov: S, shape (D, D), positive definite.
        num_nodes: quadrature nodes per dimension (num_nodes ** D in all; default 801, 161, 31
            for D = 1, 2, 3).

    Returns:
        The KL in nats, a scalar; differentiable in m, S and the mixture's parameters.
    """
    mixture = _check_mixture(mixture)
    cov = _check_spd(cov, "cov")
    mean = jnp.asarray(mean, cov.dtype)
    num_nodes = _check_num_nodes(num_nodes, mixture.dim)
    return _kl_mixture_gaussian(mixture, mean, cov, num_nodes)


@partial(jax.jit, static_argnums=3)
def _kl_mixture_gaussian(mixture, mean, cov, num_nodes):
    Lq = _chol(cov)

    def integrand(x):
        return _mixture_log_prob(mixture, x) - _mvn_log_prob(x, mean, Lq)

    per = jax.vmap(lambda m, L: _expect_gaussian(integrand, m, L, num_nodes))(mixture.means, _chol(mixture.covs))
    return jnp.sum(mixture.weights * per)


def kl_gaussian_mixture(mean, cov, mixture: MixtureOfGaussians, *, num_nodes: int | None = None) -> jax.Array:
    r"""KL(q || p) from a Gaussian q = N(m, S) to a Gaussian mixture p (mode seeking), by quadrature.

    $$ \mathrm{KL}(q\,\|\,p) = -H(q) - \mathbb E_q\log p(x),\qquad
       H(q) = \tfrac D2\log(2\pi e)+\tfrac12\log\det S, $$

    with E_q log p on x = m + L z, S = L L^T, z on an even grid over [-8, 8]^D weighted by the
    standard normal density (so it is differentiable in m and L: the reparameterisation of the
    notes). A uniform grid, not Gauss-Hermite: when q straddles two modes, log p has a sharp
    corner where the components cross, and Gauss-Hermite with 60 nodes is then off by 1e-2 nats
    while the default 801-node grid is within 1e-9. Checked against scipy's quadrature in
    ``tests/test_teaching.py``.

    Args:
        mean: m, shape (D,).
        cov: S, shape (D, D), positive definite.
        mixture: p.
        num_nodes: quadrature nodes per dimension (default 801, 161, 31 for D = 1, 2, 3).

    Returns:
        The KL in nats, a scalar.
    """
    mixture = _check_mixture(mixture)
    cov = _check_spd(cov, "cov")
    mean = jnp.asarray(mean, cov.dtype)
    num_nodes = _check_num_nodes(num_nodes, mixture.dim)
    return _kl_gaussian_mixture(mean, cov, mixture, num_nodes)


@partial(jax.jit, static_argnums=3)
def _kl_gaussian_mixture(mean, cov, mixture, num_nodes):
    return _reverse_kl_chol(mean, _chol(cov), mixture, num_nodes)


def _reverse_kl_chol(mean, chol, mixture, num_nodes):
    D = mean.shape[-1]
    entropy = 0.5 * D * (_LOG_2PI + 1.0) + jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol))))
    return -entropy - _expect_gaussian(lambda x: _mixture_log_prob(mixture, x), mean, chol, num_nodes)


def kl_mixtures(p: MixtureOfGaussians, q: MixtureOfGaussians, *, num_nodes: int | None = None) -> jax.Array:
    r"""KL(p || q) between two Gaussian mixtures of the same dimension, by quadrature.

    $$ \mathrm{KL}(p\,\|\,q) = \sum_k w_k\,\mathbb E_{\mathcal N(\mu_k,\Sigma_k)}\big[\log p(x)-\log q(x)\big]. $$

    The marginal side of [mixture_joint_kl][probdiff.divergences.mixture_joint_kl] (MATH.md B5).
    """
    p, q = _check_mixture(p, "p"), _check_mixture(q, "q")
    if p.dim != q.dim:
        raise ValueError(f"p and q must have the same dimension D; got {p.dim} and {q.dim}")
    num_nodes = _check_num_nodes(num_nodes, p.dim)
    return _kl_mixtures(p, q, num_nodes)


@partial(jax.jit, static_argnums=2)
def _kl_mixtures(p, q, num_nodes):
    def integrand(x):
        return _mixture_log_prob(p, x) - _mixture_log_prob(q, x)

    per = jax.vmap(lambda m, L: _expect_gaussian(integrand, m, L, num_nodes))(p.means, _chol(p.covs))
    return jnp.sum(p.weights * per)


class ReverseKLFit(NamedTuple):
    """What [fit_reverse_kl][probdiff.divergences.fit_reverse_kl] returns.

    Attributes:
        mean: the fitted m, shape (D,).
        cov: the fitted S, shape (D, D).
        kl: KL(q || p) at the fit (nats).
        grad_norm: the Euclidean norm of the gradient of KL(q || p) with respect to
            (m, the Cholesky factor of S with its diagonal on the log scale) at the fit; ~ 0 at a
            stationary point.
        trace: KL(q || p) before each optimisation step, shape (steps,).
    """

    mean: jax.Array
    cov: jax.Array
    kl: jax.Array
    grad_norm: jax.Array
    trace: jax.Array


def _chol_to_raw(L):
    return jnp.tril(L, -1) + jnp.diag(jnp.log(jnp.diagonal(L)))


def _raw_to_chol(raw):
    return jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diagonal(raw)))


def fit_reverse_kl(
    mixture: MixtureOfGaussians,
    init_mean,
    init_cov,
    *,
    steps: int = 1000,
    learning_rate: float = 0.05,
    num_nodes: int | None = None,
) -> ReverseKLFit:
    r"""The reverse-KL (mode-seeking) fit of one Gaussian to a mixture, by gradient descent.

    $$ (m^\star, S^\star) = \arg\min_{m,S}\ \mathrm{KL}\big(\mathcal N(m,S)\,\|\,p\big)
       = \arg\min_{m,S}\ -H(\mathcal N(m,S)) - \mathbb E_{\mathcal N(m,S)}\log p(x) . $$

    No closed form: ``steps`` Adam steps (``optax``, learning rate cosine-decayed to 0, run by
    ``lax.scan``) on m and on the Cholesky factor L of S (diagonal on the log scale, so S stays
    positive definite; in 1-D that is the log-std), with the KL evaluated by
    [kl_gaussian_mixture][probdiff.divergences.kl_gaussian_mixture]'s quadrature grid. The objective
    is not convex: for well-separated modes each mode is a local minimum (KL ~ -log w_k there), so
    the start decides the answer. ``vmap`` over starts to find them all. At a stationary point
    E_q[grad log p] = 0 and S^{-1} = -E_q[hess log p] (checked in ``tests/test_teaching.py``
    with scipy quadrature).

    Args:
        mixture: p.
        init_mean: starting m, shape (D,).
        init_cov: starting S, shape (D, D), positive definite.
        steps: number of optimisation steps (>= 1).
        learning_rate: Adam's initial learning rate (> 0).
        num_nodes: quadrature nodes per dimension (default 801, 161, 31 for D = 1, 2, 3).

    Returns:
        A [ReverseKLFit][probdiff.divergences.ReverseKLFit].

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.divergences import MixtureOfGaussians, fit_reverse_kl
        >>> p = MixtureOfGaussians.from_stds([0.3, 0.7], [-3.0, 3.0], [1.0, 1.0])
        >>> fit = fit_reverse_kl(p, jnp.array([2.0]), jnp.eye(1), steps=300, num_nodes=101)
        >>> round(float(fit.mean[0]), 1), round(float(fit.kl), 2)   # the heavier mode, KL ~ -log 0.7
        (3.0, 0.35)
    """
    mixture = _check_mixture(mixture)
    init_cov = _check_spd(init_cov, "init_cov")
    init_mean = jnp.asarray(init_mean, init_cov.dtype)
    check_finite(init_mean, "init_mean")
    if init_mean.shape != (mixture.dim,) or init_cov.shape != (mixture.dim, mixture.dim):
        raise ValueError(
            f"init_mean and init_cov must have shapes (D,) and (D, D) with D = {mixture.dim}; "
            f"got {init_mean.shape} and {init_cov.shape}"
        )
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive float; got {learning_rate!r}")
    num_nodes = _check_num_nodes(num_nodes, mixture.dim)
    return _fit_reverse_kl(mixture, init_mean, init_cov, int(steps), float(learning_rate), num_nodes)


@partial(jax.jit, static_argnums=(3, 4, 5))
def _fit_reverse_kl(mixture, init_mean, init_cov, steps, learning_rate, num_nodes):
    def loss(params):
        m, raw = params
        return _reverse_kl_chol(m, _raw_to_chol(raw), mixture, num_nodes)

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    params = (init_mean, _chol_to_raw(_chol(init_cov)))
    value_and_grad = jax.value_and_grad(loss)

    def step(carry, _):
        params, state = carry
        value, grads = value_and_grad(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    (params, _), trace = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    kl, grads = value_and_grad(params)
    m, raw = params
    L = _raw_to_chol(raw)
    g_m, g_raw = grads
    grad_norm = jnp.sqrt(jnp.sum(g_m**2) + jnp.sum(jnp.tril(g_raw) ** 2))
    return ReverseKLFit(m, L @ L.T, kl, grad_norm, trace)


# ----------------------------------------------------------------------------- 1-D grids
def _log_normalise_on_grid(log_f, grid):
    """log f - log int f dx by the trapezoidal rule (done on the log scale, no overflow)."""
    h = (grid[-1] - grid[0]) / (grid.shape[0] - 1)
    w = jnp.ones_like(grid).at[0].set(0.5).at[-1].set(0.5)
    log_z = logsumexp(log_f + jnp.log(w)) + jnp.log(h)
    return log_f - log_z, w * h


def _check_resolved(log_p, grid, name: str):
    """A concrete density must span >= 4 grid spacings (standard deviation) and vanish at both ends."""
    if not is_concrete(log_p, grid):
        return
    g = np.asarray(grid, np.float64)
    lp = np.asarray(log_p, np.float64)
    if not np.any(np.isfinite(lp)):
        raise ValueError(f"{name} must hold finite log-densities on the grid; got none")
    p = np.exp(lp - lp.max())
    p = p / p.sum()
    mean = np.sum(p * g)
    sd = math.sqrt(max(np.sum(p * (g - mean) ** 2), 0.0))
    h = g[1] - g[0]
    if sd < 4 * h:
        raise ValueError(
            f"grid is too coarse for {name}: the density's standard deviation {sd:.3g} spans fewer than 4 "
            f"spacings h = {h:.3g}; use a spacing <= {sd / 4:.3g}"
        )
    if max(p[0], p[-1]) > 1e-6 * p.max():
        raise ValueError(
            f"grid [{g[0]:.3g}, {g[-1]:.3g}] does not cover {name}: its density at an end is "
            f"{max(p[0], p[-1]) / p.max():.2g} of its peak (allowed <= 1e-6); widen the grid"
        )


def kl_on_grid(log_p, log_q, grid) -> jax.Array:
    r"""KL(p || q) of two 1-D densities given on an evenly spaced grid, by the trapezoidal rule.

    $$ \mathrm{KL}(p\,\|\,q) \approx \sum_i c_i\,h\; p(x_i)\big(\log p(x_i)-\log q(x_i)\big), $$

    c_i = 1/2 at both ends and 1 inside, after normalising each density on the grid (so
    unnormalised log-densities are fine). The trapezoidal rule converges faster than any power of
    h for smooth densities that vanish at the ends. For a concrete p the grid is checked: at least
    [MIN_GRID_POINTS][probdiff.divergences.MIN_GRID_POINTS] points, p's standard deviation at
    least 4 spacings, and p at both ends below 1e-6 of its peak.

    Args:
        log_p: log p (up to a constant) at the grid points, shape (n,).
        log_q: log q (up to a constant), shape (n,).
        grid: x_1 < ... < x_n, evenly spaced.

    Returns:
        The KL in nats, a scalar.
    """
    grid = _check_grid(grid)
    log_p, log_q = jnp.asarray(log_p, grid.dtype), jnp.asarray(log_q, grid.dtype)
    if log_p.shape != grid.shape or log_q.shape != grid.shape:
        raise ValueError(f"log_p and log_q must have the grid's shape {grid.shape}; got {log_p.shape} and {log_q.shape}")
    _check_resolved(log_p, grid, "log_p")
    return _kl_on_grid(log_p, log_q, grid)


@jax.jit
def _kl_on_grid(log_p, log_q, grid):
    lp, c = _log_normalise_on_grid(log_p, grid)
    lq, _ = _log_normalise_on_grid(log_q, grid)
    p = jnp.exp(lp)
    return jnp.sum(c * jnp.where(p > 0, p * (lp - lq), 0.0))


class BestGaussianKL(NamedTuple):
    """What [kl_to_best_gaussian_on_grid][probdiff.divergences.kl_to_best_gaussian_on_grid] returns.

    Attributes:
        kl: KL(p || N(mean, var)), nats.
        mean: E_p[x] on the grid.
        var: Var_p[x] on the grid.
    """

    kl: jax.Array
    mean: jax.Array
    var: jax.Array


def kl_to_best_gaussian_on_grid(log_p, grid) -> BestGaussianKL:
    r"""How far a 1-D density is from Gaussian: KL to its moment-matched Gaussian, on a grid.

    $$ \min_{m,v}\mathrm{KL}\big(p\,\|\,\mathcal N(m,v)\big) = \mathrm{KL}\big(p\,\|\,\mathcal N(\mathbb E_p x,\mathrm{Var}_p x)\big)
       = H\big(\mathcal N(\mathbb E_p x,\mathrm{Var}_p x)\big) - H(p) \;\ge 0, $$

    zero exactly when p is Gaussian (the forward-KL fit of G1 is moment matching). The
    measure of MATH.md A5: how far the true reverse kernel q(x_{t-1}|x_t) is from the Gaussian
    that p_theta(x_{t-1}|x_t) can be. Moments and KL by the trapezoidal rule of
    [kl_on_grid][probdiff.divergences.kl_on_grid], with its checks of the grid.

    Args:
        log_p: log p (up to a constant) at the grid points, shape (n,).
        grid: evenly spaced points, shape (n,).
    """
    grid = _check_grid(grid)
    log_p = jnp.asarray(log_p, grid.dtype)
    if log_p.shape != grid.shape:
        raise ValueError(f"log_p must have the grid's shape {grid.shape}; got {log_p.shape}")
    _check_resolved(log_p, grid, "log_p")
    return _kl_to_best_gaussian_on_grid(log_p, grid)


@jax.jit
def _kl_to_best_gaussian_on_grid(log_p, grid):
    lp, c = _log_normalise_on_grid(log_p, grid)
    p = jnp.exp(lp)
    mean = jnp.sum(c * p * grid)
    var = jnp.sum(c * p * (grid - mean) ** 2)
    lq = -0.5 * (grid - mean) ** 2 / var - 0.5 * jnp.log(2 * jnp.pi * var)
    kl = jnp.sum(c * jnp.where(p > 0, p * (lp - lq), 0.0))
    return BestGaussianKL(kl, mean, var)


# ----------------------------------------------------------------------------- B5: joint vs marginal
class LinearGaussianModel(NamedTuple):
    r"""A linear-Gaussian latent-variable model (factor analysis / probabilistic PCA).

    $$ p_\theta(x, z) = \mathcal N(z;\,0,\,I_k)\ \mathcal N(x;\,Wz+c,\,\Psi),\qquad
       p_\theta(x) = \mathcal N(x;\,c,\,WW^\top+\Psi), $$

    $$ p_\theta(z\mid x) = \mathcal N\big(z;\ M(x-c),\ \Lambda\big),\quad
       \Lambda = (I+W^\top\Psi^{-1}W)^{-1},\quad M = \Lambda W^\top\Psi^{-1}. $$

    Attributes:
        W: loading matrix, shape (D, k).
        c: offset, shape (D,).
        Psi: observation covariance, shape (D, D), positive definite.
    """

    W: jax.Array
    c: jax.Array
    Psi: jax.Array

    def marginal(self):
        """``(mean, cov)`` of p_theta(x) = N(c, W W^T + Psi)."""
        return self.c, self.W @ self.W.T + self.Psi

    def joint(self):
        """``(mean, cov)`` of p_theta(x, z) on the stacked vector (x, z), shapes (D + k,) and (D + k, D + k)."""
        D, k = self.W.shape
        mean = jnp.concatenate([self.c, jnp.zeros(k, self.c.dtype)])
        cov = jnp.block([[self.W @ self.W.T + self.Psi, self.W], [self.W.T, jnp.eye(k, dtype=self.W.dtype)]])
        return mean, cov

    def posterior(self) -> AffineGaussianEncoder:
        """p_theta(z | x) as an encoder N(C x + d, Lambda): C = M, d = -M c (Gaussian conditioning)."""
        k = self.W.shape[1]
        Pinv_W = jnp.linalg.solve(self.Psi, self.W)
        Lam = jnp.linalg.inv(jnp.eye(k, dtype=self.W.dtype) + self.W.T @ Pinv_W)
        Lam = 0.5 * (Lam + Lam.T)
        M = Lam @ Pinv_W.T
        return AffineGaussianEncoder(M, -M @ self.c, Lam)

    def log_joint(self, x, z) -> jax.Array:
        """log p_theta(x, z) for x of shape batch + (D,) and z of shape batch + (k,)."""
        return _lg_log_joint(self, jnp.asarray(x), jnp.asarray(z))

    def log_marginal(self, x) -> jax.Array:
        """log p_theta(x), shape batch."""
        return _lg_log_marginal(self, jnp.asarray(x))


@jax.jit
def _lg_log_joint(model, x, z):
    k = model.W.shape[1]
    log_pz = _mvn_log_prob(z, jnp.zeros(k, model.W.dtype), jnp.eye(k, dtype=model.W.dtype))
    return log_pz + _mvn_log_prob(x - z @ model.W.T, model.c, _chol(model.Psi))


@jax.jit
def _lg_log_marginal(model, x):
    m, S = model.marginal()
    return _mvn_log_prob(x, m, _chol(S))


class AffineGaussianEncoder(NamedTuple):
    r"""An encoder q(z | x) = N(z; C x + d, Lambda), linear in x.

    Attributes:
        C: shape (k, D).
        d: shape (k,).
        Lambda: shape (k, k), positive definite.
    """

    C: jax.Array
    d: jax.Array
    Lambda: jax.Array

    def log_prob(self, z, x) -> jax.Array:
        """log q(z | x), shape batch."""
        return _enc_log_prob(self, jnp.asarray(z), jnp.asarray(x))

    def sample(self, key, x) -> jax.Array:
        """One z ~ q(z | x) per row of x (shape batch + (D,)), shape batch + (k,)."""
        return _enc_sample(self, key, jnp.asarray(x))

    def joint(self, mean, cov):
        """``(mean, cov)`` of p(x) q(z | x) on (x, z) for data x ~ N(mean, cov)."""
        mz = self.C @ mean + self.d
        cxz = cov @ self.C.T
        return (jnp.concatenate([mean, mz]),
                jnp.block([[cov, cxz], [cxz.T, self.C @ cov @ self.C.T + self.Lambda]]))


@jax.jit
def _enc_log_prob(encoder, z, x):
    return _mvn_log_prob(z - x @ encoder.C.T, encoder.d, _chol(encoder.Lambda))


@jax.jit
def _enc_sample(encoder, key, x):
    eps = jax.random.normal(key, x.shape[:-1] + encoder.d.shape, encoder.d.dtype)
    return x @ encoder.C.T + encoder.d + eps @ _chol(encoder.Lambda).T


class JointKL(NamedTuple):
    r"""The three sides of MATH.md B5 (``003_*`` eq. 10), in nats.

    Attributes:
        marginal: KL(p(x) || p_theta(x)).
        joint: KL(p(x) q(z|x) || p_theta(x, z)), never below ``marginal``.
        gap: E_{p(x)} KL(q(z|x) || p_theta(z|x)) = joint - marginal (computed on its own).
    """

    marginal: jax.Array
    joint: jax.Array
    gap: jax.Array


def joint_kl_bound(data_mean, data_cov, encoder: AffineGaussianEncoder, model: LinearGaussianModel) -> JointKL:
    r"""KL(p(x) || p_theta(x)) <= KL(p(x,z) || p_theta(x,z)) for Gaussian data and a linear-Gaussian model.

    With p(x) = N(mu, Sigma) and p(x, z) = p(x) q(z | x) (``003_*`` eq. 10, 12), the chain rule of
    KL splits the joint divergence:

    $$ \mathrm{KL}\big(p(x)q(z|x)\,\|\,p_\theta(x,z)\big) = \mathrm{KL}\big(p(x)\,\|\,p_\theta(x)\big)
       + \mathbb E_{p(x)}\mathrm{KL}\big(q(z|x)\,\|\,p_\theta(z|x)\big)
       \;\ge\; \mathrm{KL}\big(p(x)\,\|\,p_\theta(x)\big), $$

    with equality iff q(z|x) = p_theta(z|x) (the E-step of EM, MATH.md G3). All three are
    computed here separately in closed form: the two KLs between (D + k)- and D-dimensional
    Gaussians by [gaussian_kl][probdiff.divergences.gaussian_kl], and the gap as the expectation
    over x of a KL between Gaussians whose means are affine in x,

    $$ \mathbb E_x\mathrm{KL} = \tfrac12\Big[\operatorname{tr}(\Lambda_\theta^{-1}\Lambda) - k
       + \log\tfrac{\det\Lambda_\theta}{\det\Lambda} + \delta^\top\Lambda_\theta^{-1}\delta
       + \operatorname{tr}\big(\Lambda_\theta^{-1}(C-M)\Sigma(C-M)^\top\big)\Big],
       \quad \delta = (C-M)\mu + d - d_\theta . $$

    ``tests/test_teaching.py`` checks joint = marginal + gap and each side against Monte Carlo.
    """
    data_cov = _check_spd(data_cov, "data_cov")
    data_mean = jnp.asarray(data_mean, data_cov.dtype)
    _check_spd(model.Psi, "model.Psi")
    _check_spd(encoder.Lambda, "encoder.Lambda")
    D, k = model.W.shape
    if data_mean.shape != (D,) or encoder.C.shape != (k, D) or encoder.d.shape != (k,):
        raise ValueError(
            f"shapes must agree: data_mean (D,) = ({D},), encoder.C (k, D) = ({k}, {D}), encoder.d (k,); "
            f"got {data_mean.shape}, {encoder.C.shape}, {encoder.d.shape}"
        )
    return _joint_kl_bound(data_mean, data_cov, encoder, model)


@jax.jit
def _joint_kl_bound(data_mean, data_cov, encoder, model):
    D, k = model.W.shape
    m_p, S_p = model.marginal()
    marginal = _gaussian_kl(data_mean, data_cov, m_p, S_p)
    jm, jS = encoder.joint(data_mean, data_cov)
    tm, tS = model.joint()
    joint = _gaussian_kl(jm, jS, tm, tS)
    post = model.posterior()
    dC = encoder.C - post.C
    delta = dC @ data_mean + encoder.d - post.d
    L_post = _chol(post.Lambda)
    inv = jax.scipy.linalg.solve_triangular(L_post, jnp.eye(k, dtype=L_post.dtype), lower=True)
    P = inv.T @ inv  # Lambda_theta^{-1}
    logdet = 2.0 * (jnp.sum(jnp.log(jnp.diagonal(L_post))) - jnp.sum(jnp.log(jnp.diagonal(_chol(encoder.Lambda)))))
    gap = 0.5 * (jnp.trace(P @ encoder.Lambda) - k + logdet + delta @ P @ delta + jnp.trace(P @ dC @ data_cov @ dC.T))
    return JointKL(marginal, joint, gap)


def mixture_joint_kl(p: MixtureOfGaussians, q: MixtureOfGaussians, *, num_nodes: int | None = None) -> JointKL:
    r"""B5 for mixtures with their labels: the joint KL in closed form, the marginal by quadrature.

    With p(x, z=k) = w_k N(x; mu_k, Sigma_k) and p_theta(x, z=k) = v_k N(x; nu_k, Gamma_k),

    $$ \mathrm{KL}\big(p(x,z)\,\|\,p_\theta(x,z)\big) = \sum_k w_k\log\frac{w_k}{v_k}
       + \sum_k w_k\,\mathrm{KL}\big(\mathcal N(\mu_k,\Sigma_k)\,\|\,\mathcal N(\nu_k,\Gamma_k)\big)
       \;\ge\; \mathrm{KL}\big(p(x)\,\|\,p_\theta(x)\big). $$

    The joint KL sees the labels, the marginal does not: relabelling p_theta's components leaves
    the marginal KL unchanged and can make the joint KL large. Here q(z|x) = p(z|x), so the gap
    is E_{p(x)} KL(p(z|x) || p_theta(z|x)), computed on its own by the same quadrature.
    """
    p, q = _check_mixture(p, "p"), _check_mixture(q, "q")
    if p.num_components != q.num_components or p.dim != q.dim:
        raise ValueError(
            f"p and q must have the same K and D; got (K, D) = {(p.num_components, p.dim)} and "
            f"{(q.num_components, q.dim)}"
        )
    num_nodes = _check_num_nodes(num_nodes, p.dim)
    return _mixture_joint_kl(p, q, num_nodes)


@partial(jax.jit, static_argnums=2)
def _mixture_joint_kl(p, q, num_nodes):
    comp = jax.vmap(_gaussian_kl)(p.means, p.covs, q.means, q.covs)
    joint = jnp.sum(p.weights * (jnp.log(p.weights) - jnp.log(q.weights))) + jnp.sum(p.weights * comp)
    marginal = _kl_mixtures(p, q, num_nodes)

    def post_kl(x):
        lp = jax.nn.log_softmax(_component_log_prob(p, x), -1)
        lq = jax.nn.log_softmax(_component_log_prob(q, x), -1)
        return jnp.sum(jnp.exp(lp) * (lp - lq), -1)

    per = jax.vmap(lambda m, L: _expect_gaussian(post_kl, m, L, num_nodes))(p.means, _chol(p.covs))
    return JointKL(marginal, joint, jnp.sum(p.weights * per))


# ----------------------------------------------------------------------------- B2 against B3
class ELBOEstimates(NamedTuple):
    r"""Repeated draws of the two ELBO estimators of a diffusion model (MATH.md B2, B3).

    Axis 0 of every array is the draw. Entry ``[..., s - 1]`` of ``b2_terms`` and ``b3_terms``
    concerns the same latent x_s (s = 1..T-1): the B2 denoising term of t = s + 1,
    KL(q(x_s | x_{s+1}, x_0) || p_theta(x_s | x_{s+1})) at one x_{s+1}, and the B3 consistency term
    of t = s, log q(x_s | x_{s-1}) - log p_theta(x_s | x_{s+1}) on one chain.

    Attributes:
        b2_total: ELBO by B2 ([elbo_terms][probdiff.GaussianDiffusion.elbo_terms]), shape (draws,) + batch.
        b3_total: ELBO by B3 ([elbo_consistency_terms][probdiff.GaussianDiffusion.elbo_consistency_terms]).
        b2_terms: denoising-matching terms, shape (draws,) + batch + (T - 1,).
        b3_terms: consistency terms, the same shape.
    """

    b2_total: jax.Array
    b3_total: jax.Array
    b2_terms: jax.Array
    b3_terms: jax.Array

    def summary(self) -> dict:
        """Means, standard errors, variances and the variance ratio B3/B2, as floats.

        Variances are over draws, averaged over the batch of x_0. For each estimator: ``var`` of
        the total, ``var_by_latent`` of each term (T - 1 values) and their sum
        ``sum_var_terms``; ``var`` differs from ``sum_var_terms`` by the covariances between
        terms (and the reconstruction and prior terms): B2's terms are independent, B3's share
        their chain and are strongly negatively correlated.
        """
        n = self.b2_total.shape[0]
        out = {"draws": int(n)}
        for name, total, terms in (("b2", self.b2_total, self.b2_terms), ("b3", self.b3_total, self.b3_terms)):
            tot = np.asarray(total, np.float64).reshape(n, -1)
            var = tot.var(0, ddof=1)
            by_latent = np.asarray(terms, np.float64).reshape(n, -1, terms.shape[-1]).var(0, ddof=1).mean(0)
            out[name] = {
                "mean": float(tot.mean()),
                "se": float(math.sqrt(var.mean() / (n * tot.shape[1]))),
                "var": float(var.mean()),
                "var_by_latent": by_latent.tolist(),
                "sum_var_terms": float(by_latent.sum()),
            }
        out["var_ratio_b3_over_b2"] = out["b3"]["var"] / out["b2"]["var"]
        return out


def elbo_estimates(diffusion, x_0, rng_key, num_draws: int, *, batch_size: int = 64) -> ELBOEstimates:
    r"""Draw the B2 and the B3 ELBO estimators ``num_draws`` times each, independently.

    B2 (``004_*`` main text): reconstruction - KL(q(x_T|x_0) || p(x_T)) -
    sum_{t>=2} KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)), one x_t per t and analytic KLs.
    B3 (``004_*`` appendix): reconstruction - KL(q(x_T|x_{T-1}) || p(x_T)) -
    sum_{t=1}^{T-1} [log q(x_t|x_{t-1}) - log p_theta(x_t|x_{t+1})] on one forward chain.
    Both have expectation the ELBO; each B3 term depends on two random neighbours, so it spreads
    more than the B2 term of the same latent (MATH.md B3). The B3 terms of one chain are
    negatively correlated (x_t appears in two neighbouring terms with opposite signs), so the
    variance of the B3 *total* can be smaller than B2's: for a model whose reverse chain matches
    the forward posterior it approaches that of log p_theta(x_0) alone. ``summary()`` reports
    both. The draws run through ``lax.map`` in chunks of ``batch_size`` draws, all under one ``jit``.

    Args:
        diffusion: a [GaussianDiffusion][probdiff.GaussianDiffusion].
        x_0: data, shape batch + event_shape.
        rng_key: a JAX PRNG key.
        num_draws: number of draws of each estimator (>= 2).
        batch_size: draws evaluated together.

    Returns:
        [ELBOEstimates][probdiff.divergences.ELBOEstimates].
    """
    if not isinstance(num_draws, (int, np.integer)) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2; got {num_draws!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    x_0 = diffusion._check_x0(x_0)
    return _elbo_estimates(diffusion, x_0, rng_key, int(num_draws), min(int(batch_size), int(num_draws)))


@partial(jax.jit, static_argnums=(3, 4))
def _elbo_estimates(diffusion, x_0, rng_key, num_draws, batch_size):
    k2, k3 = jax.random.split(rng_key)

    def one(keys):
        t2 = diffusion.elbo_terms(keys[0], x_0)
        t3 = diffusion.elbo_consistency_terms(keys[1], x_0)
        return t2.total, t3.total, t2.denoising_matching, t3.consistency

    keys = jnp.stack([jax.random.split(k2, num_draws), jax.random.split(k3, num_draws)], axis=1)
    out = jax.lax.map(one, keys, batch_size=batch_size)
    return ELBOEstimates(*out)
