r"""EM for a Gaussian mixture as alternating minimisation of KL(p(x,z) || p_theta(x,z)) (MATH.md G3).

The notes (``003_*``, "EM Algorithm") start from the joint divergence, with p(x) the empirical
distribution of the data and q(z|x) an encoder,

$$ \mathrm{KL}\big(p(x)q(z|x)\,\|\,p_\theta(x,z)\big)
   = \mathbb E_{p(x)}\big[\mathrm{KL}\big(q(z|x)\,\|\,p_\theta(z|x)\big) - \log p_\theta(x)\big] - H(p), $$

and minimise it in turn over the two arguments. Up to the constant H(p) this is minus the bound

$$ \mathcal L(q,\theta) = \mathbb E_{p(x)}\sum_z q(z|x)\log\frac{p_\theta(x,z)}{q(z|x)}
   = \mathbb E_{p(x)}\log p_\theta(x) - \mathbb E_{p(x)}\mathrm{KL}\big(q(z|x)\,\|\,p_\theta(z|x)\big) . $$

* **E-step** (eq. 17-18): with theta fixed, q(z|x) = p_theta(z|x) = p_theta(x|z) q(z) / p_theta(x):
  the KL term vanishes and the bound *touches* the log-likelihood, L(q, theta) = E log p_theta(x).
* **M-step** (eq. 15): with q fixed, theta = argmax E_{p(x)} sum_z q(z|x) log p_theta(x, z); for
  a Gaussian mixture in closed form (weighted counts, means and covariances).

Neither step can lower L, and after each E-step L equals the log-likelihood, so the
log-likelihood never decreases: E log p_theta_{n+1}(x) = L(q_{n+1}, theta_{n+1}) >=
L(q_{n+1}, theta_n) = E log p_theta_n(x) (in exact arithmetic). [em_gmm][probdiff.em.em_gmm] records
both quantities after each half-step; ``tests/test_teaching.py`` checks both facts.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from probdiff._checks import check_finite, is_concrete
from probdiff.divergences import MixtureOfGaussians, _check_mixture

__all__ = ["EMTrace", "e_step", "m_step", "log_likelihood", "em_bound", "em_gmm", "init_gmm"]


def _check_data(x, dim: int | None = None):
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be data of shape (N, D) with N >= 1; got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"x must have D = {dim} columns, the mixture's dimension; got shape {x.shape}")
    check_finite(x, "x")
    return x


def e_step(x, mixture: MixtureOfGaussians) -> jax.Array:
    r"""The E-step: q(z=k | x_n) = p_theta(z=k | x_n) (``003_*`` eq. 18).

    $$ q(z=k\mid x_n) = \frac{w_k\,\mathcal N(x_n;\mu_k,\Sigma_k)}{\sum_j w_j\,\mathcal N(x_n;\mu_j,\Sigma_j)} $$

    Args:
        x: data, shape (N, D).
        mixture: theta.

    Returns:
        The responsibilities, shape (N, K); each row sums to 1.
    """
    mixture = _check_mixture(mixture)
    x = _check_data(x, mixture.dim)
    return mixture.responsibilities(x)


def m_step(x, resp, *, reg: float = 0.0) -> MixtureOfGaussians:
    r"""The M-step: theta = argmax_theta E_{p(x)} sum_k q(z=k|x) log p_theta(x, z=k) (``003_*`` eq. 15).

    With N_k = sum_n q(z=k | x_n), the maximiser is

    $$ w_k = \frac{N_k}{N},\qquad \mu_k = \frac1{N_k}\sum_n q(z=k|x_n)\,x_n,\qquad
       \Sigma_k = \frac1{N_k}\sum_n q(z=k|x_n)\,(x_n-\mu_k)(x_n-\mu_k)^\top + \rho I, $$

    exact for ``reg`` rho = 0; rho > 0 keeps a component that owns (almost) one point from
    collapsing, at the price of an M-step that is no longer the exact maximiser.

    Args:
        x: data, shape (N, D).
        resp: q(z | x_n), shape (N, K), rows summing to 1.
        reg: rho >= 0, added to every covariance.

    Returns:
        The new [MixtureOfGaussians][probdiff.divergences.MixtureOfGaussians].
    """
    x = _check_data(x)
    resp = jnp.asarray(resp, x.dtype)
    if resp.ndim != 2 or resp.shape[0] != x.shape[0]:
        raise ValueError(f"resp must have shape (N, K) with N = {x.shape[0]}; got {resp.shape}")
    if not (isinstance(reg, (int, float)) and reg >= 0):
        raise ValueError(f"reg must be a float >= 0; got {reg!r}")
    return _m_step(x, resp, float(reg))


@partial(jax.jit, static_argnums=2)
def _m_step(x, resp, reg):
    D = x.shape[1]
    nk = jnp.sum(resp, 0)
    means = (resp.T @ x) / nk[:, None]
    diff = x[None, :, :] - means[:, None, :]  # (K, N, D)
    covs = jnp.einsum("nk,kni,knj->kij", resp, diff, diff) / nk[:, None, None]
    covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2)) + reg * jnp.eye(D, dtype=x.dtype)
    return MixtureOfGaussians(nk / x.shape[0], means, covs)


def log_likelihood(x, mixture: MixtureOfGaussians) -> jax.Array:
    r"""The average log-likelihood (1/N) sum_n log p_theta(x_n) = E_{p(x)} log p_theta(x), a scalar."""
    mixture = _check_mixture(mixture)
    x = _check_data(x, mixture.dim)
    return jnp.mean(mixture.log_prob(x))


@jax.jit
def _bound(x, mixture, resp):
    joint = mixture.component_log_prob(x)  # log p_theta(x, z=k), (N, K)
    return jnp.mean(jnp.sum(resp * joint - jax.scipy.special.xlogy(resp, resp), -1))


def em_bound(x, mixture: MixtureOfGaussians, resp) -> jax.Array:
    r"""The bound L(q, theta), averaged over the data (``003_*`` eq. 17 with the sign turned).

    $$ \mathcal L(q,\theta) = \frac1N\sum_n\sum_k q(z=k|x_n)\big[\log p_\theta(x_n,z=k) - \log q(z=k|x_n)\big]
       \;\le\; \frac1N\sum_n\log p_\theta(x_n), $$

    with equality iff q(z|x_n) = p_theta(z|x_n) (then the gap,
    E KL(q(z|x) || p_theta(z|x)), is zero). 0 log 0 = 0.

    Args:
        x: data, shape (N, D).
        mixture: theta.
        resp: q(z | x_n), shape (N, K).
    """
    mixture = _check_mixture(mixture)
    x = _check_data(x, mixture.dim)
    resp = jnp.asarray(resp, x.dtype)
    if resp.shape != (x.shape[0], mixture.num_components):
        raise ValueError(f"resp must have shape (N, K) = {(x.shape[0], mixture.num_components)}; got {resp.shape}")
    return _bound(x, mixture, resp)


class EMTrace(NamedTuple):
    r"""What [em_gmm][probdiff.em.em_gmm] returns.

    Row n of ``log_likelihood`` and ``bound`` is iteration n + 1; column 0 is after its E-step
    (theta_n, q_{n+1} = p_{theta_n}(z|x)) and column 1 after its M-step (theta_{n+1}, q_{n+1}).
    Both are averages over the data points.

    Attributes:
        mixture: the final theta.
        resp: the final q(z | x_n), shape (N, K) (from the last E-step).
        log_likelihood: E_{p(x)} log p_theta(x), shape (num_iters, 2).
        bound: L(q, theta), shape (num_iters, 2); equal to ``log_likelihood[:, 0]`` after every
            E-step, below ``log_likelihood[:, 1]`` after every M-step.
    """

    mixture: MixtureOfGaussians
    resp: jax.Array
    log_likelihood: jax.Array
    bound: jax.Array

    @property
    def half_steps(self):
        """``(log_likelihood, bound)`` flattened in time order, shape (2 num_iters,) each."""
        return self.log_likelihood.reshape(-1), self.bound.reshape(-1)


def em_gmm(x, init: MixtureOfGaussians, num_iters: int, *, reg: float = 0.0) -> EMTrace:
    r"""EM for a Gaussian mixture, ``num_iters`` E/M iterations run by ``lax.scan`` (MATH.md G3).

    Each iteration: E-step q(z|x) = p_theta(z|x) ([e_step][probdiff.em.e_step]), record
    (log-likelihood, bound); M-step theta = argmax L(q, theta) ([m_step][probdiff.em.m_step]),
    record again. See the module docstring for why the log-likelihood never decreases.

    Args:
        x: data, shape (N, D), finite.
        init: the starting theta, K >= 1 components (e.g. [init_gmm][probdiff.em.init_gmm]).
        num_iters: iterations (>= 1).
        reg: rho >= 0 added to each covariance in the M-step (0: exact EM).

    Returns:
        [EMTrace][probdiff.em.EMTrace].

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.divergences import MixtureOfGaussians
        >>> from probdiff.em import em_gmm, init_gmm
        >>> truth = MixtureOfGaussians.from_stds([0.5, 0.5], [-2.0, 2.0], [0.5, 0.5])
        >>> x = truth.sample(jax.random.key(0), 500)
        >>> tr = em_gmm(x, init_gmm(jax.random.key(1), x, 2), 60)
        >>> bool(jnp.all(jnp.diff(tr.log_likelihood.reshape(-1)) >= -1e-5))
        True
        >>> sorted(round(float(m), 1) for m in tr.mixture.means[:, 0])
        [-2.0, 1.9]
    """
    init = _check_mixture(init, "init")
    x = _check_data(x, init.dim)
    if not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
        raise ValueError(f"num_iters must be an integer >= 1; got {num_iters!r}")
    if not (isinstance(reg, (int, float)) and reg >= 0):
        raise ValueError(f"reg must be a float >= 0; got {reg!r}")
    theta0 = MixtureOfGaussians(*(jnp.asarray(a, x.dtype) for a in init))
    return _em_gmm(x, theta0, int(num_iters), float(reg))


@partial(jax.jit, static_argnums=(2, 3))
def _em_gmm(x, theta0, num_iters, reg):
    def iteration(theta, _):
        log_joint = theta.component_log_prob(x)
        ll_e = jnp.mean(jax.scipy.special.logsumexp(log_joint, -1))
        resp = jax.nn.softmax(log_joint, -1)  # E-step
        bound_e = _bound(x, theta, resp)
        new = _m_step(x, resp, reg)  # M-step
        ll_m = jnp.mean(new.log_prob(x))
        bound_m = _bound(x, new, resp)
        return new, (resp, jnp.stack([ll_e, ll_m]), jnp.stack([bound_e, bound_m]))

    theta, (resps, ll, bound) = jax.lax.scan(iteration, theta0, None, length=num_iters)
    return EMTrace(theta, resps[-1], ll, bound)


def init_gmm(key, x, num_components: int) -> MixtureOfGaussians:
    r"""A starting theta for EM: K distinct data points as means, the data covariance for every
    component, equal weights 1/K.

    Args:
        key: a JAX PRNG key.
        x: data, shape (N, D), N >= K.
        num_components: K >= 1.
    """
    x = _check_data(x)
    if not isinstance(num_components, (int, np.integer)) or num_components < 1:
        raise ValueError(f"num_components must be an integer K >= 1; got {num_components!r}")
    N, D = x.shape
    if num_components > N:
        raise ValueError(f"num_components must be <= N = {N} data points; got {num_components}")
    idx = jax.random.choice(key, N, (num_components,), replace=False)
    cov = jnp.cov(x, rowvar=False).reshape(D, D) + 1e-6 * jnp.eye(D, dtype=x.dtype)
    if is_concrete(cov):
        c = np.asarray(cov, np.float64)
        if N < 2 or not np.all(np.linalg.eigvalsh(c) > 0):
            raise ValueError("x must have N >= 2 points not all on a lower-dimensional subspace: "
                             "its covariance is singular")
    K = int(num_components)
    return MixtureOfGaussians(jnp.full((K,), 1.0 / K, x.dtype), x[idx], jnp.broadcast_to(cov, (K, D, D)))
