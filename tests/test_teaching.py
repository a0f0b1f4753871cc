"""The teaching modules (MATH.md A5, B2/B3, B5, G1, G3) against independent computations, and their examples.

probdiff.divergences, probdiff.em and the A5 functions of probdiff.analytic: every formula is
checked against a different route (scipy quadrature, Monte Carlo, Gaussian conditioning in numpy,
Bayes' rule on a grid). Monte-Carlo checks use fixed seeds and 4 standard errors from the same
draws (helpers.N_SE: two-sided false-alarm rate 6e-5 per statistic). Deterministic checks run in
float64 with tolerances set by the quadrature rule, stated where they are used.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from helpers import COV, MU, N_SE, assert_mc_close, mc_mean_se, x64

from probdiff import GaussianDiffusion, schedules
from probdiff.analytic import (
    GaussianData,
    affine_elbo_terms,
    noised_mixture_1d,
    optimal_eps_fn,
    reverse_kernel_mixture_1d,
    reverse_kernel_on_grid,
)
from probdiff.divergences import (
    AffineGaussianEncoder,
    LinearGaussianModel,
    MixtureOfGaussians,
    elbo_estimates,
    fit_reverse_kl,
    gaussian_entropy,
    gaussian_kl,
    joint_kl_bound,
    kl_gaussian_mixture,
    kl_mixture_gaussian,
    kl_mixtures,
    kl_on_grid,
    kl_to_best_gaussian_on_grid,
    mixture_joint_kl,
    moment_match,
)
from probdiff.em import e_step, em_bound, em_gmm, init_gmm, log_likelihood, m_step

ROOT = Path(__file__).resolve().parents[1]

W1, M1, S1 = np.array([0.35, 0.65]), np.array([-2.5, 2.0]), np.array([0.7, 0.9])  # the G1 example's p


def np_mixture_pdf(x, w=W1, m=M1, s=S1):
    return np.sum(w * scipy.stats.norm.pdf(np.asarray(x)[..., None], m, s), -1)


def np_log_mixture(x, w=W1, m=M1, s=S1):
    return np.log(np_mixture_pdf(x, w, m, s))


def quad(f, lo=-15.0, hi=15.0):
    # adaptive Gauss-Kronrod to 1e-12 with break points at the modes: |error| ~ 1e-11 here
    return scipy.integrate.quad(f, lo, hi, points=[-2.5, 2.0], epsabs=1e-12, epsrel=1e-12, limit=400)[0]


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


# ----------------------------------------------------------------------------- Gaussians
def test_gaussian_kl_against_numpy_formula_and_monte_carlo():
    rng = np.random.default_rng(0)
    mp, mq = rng.normal(size=3), rng.normal(size=3)
    Sp, Sq = random_spd(rng, 3), random_spd(rng, 3)
    with x64():
        got = float(gaussian_kl(jnp.asarray(mp), jnp.asarray(Sp), jnp.asarray(mq), jnp.asarray(Sq)))
    # the textbook formula with explicit inverses and slogdet (float64 round-off only)
    iq = np.linalg.inv(Sq)
    ref = 0.5 * (np.trace(iq @ Sp) + (mq - mp) @ iq @ (mq - mp) - 3 + np.linalg.slogdet(Sq)[1] - np.linalg.slogdet(Sp)[1])
    assert got == pytest.approx(ref, rel=1e-10)
    # and Monte Carlo of log p - log q under p, with scipy's densities
    x = rng.multivariate_normal(mp, Sp, size=200_000)
    draws = scipy.stats.multivariate_normal(mp, Sp).logpdf(x) - scipy.stats.multivariate_normal(mq, Sq).logpdf(x)
    assert_mc_close(draws, got, what="KL of Gaussians")
    # entropy against scipy
    with x64():
        assert float(gaussian_entropy(jnp.asarray(Sp))) == pytest.approx(
            scipy.stats.multivariate_normal(mp, Sp).entropy(), rel=1e-10)


# ----------------------------------------------------------------------------- G1
def test_forward_kl_fit_is_the_mixture_moments():
    """moment_match against scipy quadrature of the mixture's moments; and a stationary point of
    the quadrature KL(p||q) with a positive-definite Hessian (a minimum)."""
    with x64():
        p = MixtureOfGaussians.from_stds(W1, M1, S1)
        mean, cov = moment_match(p)
        m_ref = quad(lambda x: x * np_mixture_pdf(x))
        v_ref = quad(lambda x: (x - m_ref) ** 2 * np_mixture_pdf(x))
        # adaptive quadrature to 1e-12 against an exact formula: 1e-9 relative
        assert float(mean[0]) == pytest.approx(m_ref, rel=1e-9)
        assert float(cov[0, 0]) == pytest.approx(v_ref, rel=1e-9)

        def kl(theta):
            return kl_mixture_gaussian(p, theta[:1], jnp.exp(2 * theta[1:]).reshape(1, 1))

        theta = jnp.array([mean[0], 0.5 * jnp.log(cov[0, 0])])
        # the quadrature grid integrates to ~1e-13 here (see the next test): gradient < 1e-8 is safe
        assert float(jnp.max(jnp.abs(jax.jit(jax.grad(kl))(theta)))) < 1e-8
        assert np.all(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(kl))(theta))) > 0)

    # 2-D: against the sample moments of 200000 draws (4 SE)
    p2 = MixtureOfGaussians.create([0.3, 0.7], [[-2.0, 1.0], [1.5, -0.5]],
                                   [[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]]])
    x = np.asarray(p2.sample(jax.random.key(0), 200_000), np.float64)
    m2, c2 = moment_match(p2)
    assert_mc_close(x, np.asarray(m2), floor=1e-6, what="2-D mean")
    d = x - x.mean(0)
    assert_mc_close((d[:, :, None] * d[:, None, :]).reshape(-1, 4), np.asarray(c2).ravel(), floor=1e-5, what="2-D cov")


def test_both_kl_directions_against_scipy_quadrature():
    with x64():
        p = MixtureOfGaussians.from_stds(W1, M1, S1)
        # (0.3, 2.4) straddles both modes: log p has a sharp corner under q, where 60-node
        # Gauss-Hermite is off by 1e-2 nats
        for m, s in ((0.3, 2.4), (2.0, 0.9), (-2.4, 0.6)):
            fwd = float(kl_mixture_gaussian(p, jnp.array([m]), jnp.array([[s**2]])))
            rev = float(kl_gaussian_mixture(jnp.array([m]), jnp.array([[s**2]]), p))
            ref_fwd = quad(lambda x, m=m, s=s: np_mixture_pdf(x) * (np_log_mixture(x) - scipy.stats.norm.logpdf(x, m, s)))
            ref_rev = quad(lambda x, m=m, s=s: scipy.stats.norm.pdf(x, m, s)
                           * (scipy.stats.norm.logpdf(x, m, s) - np_log_mixture(x)), m - 12 * s, m + 12 * s)
            # the 801-node grid against adaptive quadrature: both within ~1e-13 (measured); 1e-9 absolute
            assert fwd == pytest.approx(ref_fwd, abs=1e-9), (m, s)
            assert rev == pytest.approx(ref_rev, abs=1e-9), (m, s)
            assert fwd >= 0 and rev >= 0


def test_kl_directions_in_2d_against_monte_carlo():
    p = MixtureOfGaussians.create([0.5, 0.5], [[-2.0, -1.0], [2.0, 1.5]],
                                  [[[0.6, 0.25], [0.25, 0.5]], [[0.5, -0.2], [-0.2, 0.8]]])
    mean, cov = jnp.array([0.5, 0.0]), jnp.array([[2.0, 0.5], [0.5, 1.5]])
    n = 200_000
    x = p.sample(jax.random.key(1), n)
    q = scipy.stats.multivariate_normal(np.asarray(mean), np.asarray(cov))
    fwd_draws = np.asarray(p.log_prob(x), np.float64) - q.logpdf(np.asarray(x, np.float64))
    # float32 log-densities of O(10) numbers: 1e-5 floor
    assert_mc_close(fwd_draws, float(kl_mixture_gaussian(p, mean, cov)), floor=1e-5, what="KL(p||q) 2-D")
    y = q.rvs(size=n, random_state=2)
    rev_draws = q.logpdf(y) - np.asarray(p.log_prob(jnp.asarray(y, jnp.float32)), np.float64)
    assert_mc_close(rev_draws, float(kl_gaussian_mixture(mean, cov, p)), floor=1e-5, what="KL(q||p) 2-D")


def test_reverse_kl_fits_are_stationary_at_each_mode():
    """Two starts, two local minima of KL(q||p), one per mode. At each, the fixed-point
    conditions of a Gaussian variational fit hold by scipy quadrature (an independent route to the
    gradient): E_q[d log p/dx] = 0 and E_q[d^2 log p/dx^2] = -1/s^2."""
    with x64():
        p = MixtureOfGaussians.from_stds(W1, M1, S1)
        fits = jax.jit(jax.vmap(lambda m: fit_reverse_kl(p, m, jnp.eye(1), steps=1500)))(jnp.array([[-3.0], [3.0]]))
    means = np.asarray(fits.mean)[:, 0]
    stds = np.sqrt(np.asarray(fits.cov)[:, 0, 0])
    assert abs(means[0] - M1[0]) < 0.05 and abs(means[1] - M1[1]) < 0.05  # one per mode

    def dlogp(x):
        r = W1 * scipy.stats.norm.pdf(x, M1, S1)
        return np.sum(r * (M1 - x) / S1**2) / np.sum(r)

    def d2logp(x, h=1e-5):
        return (dlogp(x + h) - dlogp(x - h)) / (2 * h)

    for m, s, kl, g in zip(means, stds, np.asarray(fits.kl), np.asarray(fits.grad_norm), strict=True):
        e1 = quad(lambda x, m=m, s=s: scipy.stats.norm.pdf(x, m, s) * dlogp(x), m - 10 * s, m + 10 * s)
        e2 = quad(lambda x, m=m, s=s: scipy.stats.norm.pdf(x, m, s) * d2logp(x), m - 10 * s, m + 10 * s)
        # Adam with a decayed learning rate stops within ~1e-6 of the optimum; a gradient of 1e-4 on
        # parameters of size 1 is far below the O(1) gradient 0.1 away from it
        assert abs(e1) < 1e-4, (m, e1)
        assert e2 == pytest.approx(-1 / s**2, rel=1e-4), (m, e2)
        assert g < 1e-4
        # p >= w_k N_k gives KL(N_k || p) <= -log w_k, and the optimum is lower still; the other
        # mode's overlap lowers it by ~1% for these well-separated modes
        k = int(np.argmin(np.abs(M1 - m)))
        assert -np.log(W1[k]) - 0.03 < kl <= -np.log(W1[k]), (k, kl)
    # the heavier mode is the global minimum
    assert np.argmin(np.asarray(fits.kl)) == 1


# ----------------------------------------------------------------------------- grids
def test_kl_on_grid_against_closed_forms():
    with x64():
        grid = jnp.linspace(-12.0, 12.0, 2001)
        lp = scipy.stats.norm.logpdf(np.asarray(grid), 0.3, 1.1)
        lq = scipy.stats.norm.logpdf(np.asarray(grid), -0.5, 1.7)
        # trapezoidal rule on a smooth density vanishing at the ends: error far below 1e-10
        got = float(kl_on_grid(jnp.asarray(lp), jnp.asarray(lq), grid))
        ref = float(gaussian_kl(jnp.array([0.3]), jnp.array([[1.21]]), jnp.array([-0.5]), jnp.array([[1.7**2]])))
        assert got == pytest.approx(ref, abs=1e-10)
        # unnormalised log-densities give the same number
        assert float(kl_on_grid(jnp.asarray(lp + 3.0), jnp.asarray(lq - 7.0), grid)) == pytest.approx(got, abs=1e-12)
        # a Gaussian is its own best Gaussian
        best = kl_to_best_gaussian_on_grid(jnp.asarray(lp), grid)
        assert abs(float(best.kl)) < 1e-12
        assert float(best.mean) == pytest.approx(0.3, abs=1e-12) and float(best.var) == pytest.approx(1.21, rel=1e-12)
        # a mixture: the grid's min KL equals KL(p || moment_match(p)) by kl_mixture_gaussian's quadrature
        p = MixtureOfGaussians.from_stds(W1, M1, S1)
        best = kl_to_best_gaussian_on_grid(jnp.asarray(np_log_mixture(np.asarray(grid))), grid)
        m, c = moment_match(p)
        assert float(best.kl) == pytest.approx(float(kl_mixture_gaussian(p, m, c)), abs=1e-9)


@pytest.mark.parametrize(
    "grid, log_p, match",
    [
        (np.linspace(-5, 5, 8), None, "at least 16 points"),
        (np.linspace(-5, 5, 41), lambda g: -0.5 * g**2 / 0.01, "too coarse"),
        (np.linspace(-1, 1, 101), lambda g: -0.5 * g**2, "does not cover"),
        (np.concatenate([np.linspace(-5, 0, 50), np.linspace(0.5, 5, 50)]), None, "evenly spaced"),
    ],
)
def test_grid_checks(grid, log_p, match):
    lp = jnp.asarray(log_p(grid) if log_p else -0.5 * grid**2)
    with pytest.raises(ValueError, match=match):
        kl_on_grid(lp, lp, jnp.asarray(grid))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MixtureOfGaussians.from_stds([0.5, 0.6], [0.0, 1.0], [1.0, 1.0]), "sum to 1"),
        (lambda: MixtureOfGaussians.from_stds([1.2, -0.2], [0.0, 1.0], [1.0, 1.0]), "positive"),
        (lambda: MixtureOfGaussians.from_stds([0.5, 0.5], [0.0, 1.0], [1.0, 0.0]), r"stds must be positive, in \(0, inf\)"),
        (lambda: MixtureOfGaussians.from_stds([0.5, 0.5], [0.0, np.nan], [1.0, 1.0]), "finite"),
        (lambda: MixtureOfGaussians.create(np.zeros(0), np.zeros((0, 1)), np.zeros((0, 1, 1))), "K >= 1"),
        (lambda: MixtureOfGaussians.create([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
        (lambda: gaussian_kl(jnp.zeros(1), -jnp.eye(1), jnp.zeros(1), jnp.eye(1)), "cov_p must be positive definite"),
        (lambda: fit_reverse_kl(MixtureOfGaussians.from_stds([1.0], [0.0], [1.0]), jnp.zeros(1), jnp.eye(1), steps=0), "steps"),
    ],
)
def test_divergence_input_checks(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ----------------------------------------------------------------------------- A5
@pytest.mark.parametrize("beta", [1e-3, 0.3, 0.95])
def test_reverse_kernel_of_gaussian_data_is_gaussian_conditioning(beta):
    """K = 1: Bayes' rule on the grid equals Gaussian conditioning of the joint (x_{t-1}, x_t),
    built in numpy from scratch, for every beta, and its KL to the best Gaussian is ~0."""
    m0, s0, ab, x_t = 0.7, 0.8, 0.6, -0.4
    # joint of (x_{t-1}, x_t): x_{t-1} ~ N(a, v), x_t = sqrt(1 - beta) x_{t-1} + sqrt(beta) eps
    a, v = np.sqrt(ab) * m0, ab * s0**2 + 1 - ab
    c = np.sqrt(1 - beta) * v
    var_t = (1 - beta) * v + beta
    mean_ref = a + c / var_t * (x_t - np.sqrt(1 - beta) * a)
    var_ref = v - c**2 / var_t
    with x64():
        sd = np.sqrt(var_ref)
        grid = jnp.linspace(mean_ref - 12 * sd, mean_ref + 12 * sd, 1601)
        k = reverse_kernel_on_grid(x_t, grid, [1.0], [m0], [s0], ab, beta)
        ref = scipy.stats.norm.logpdf(np.asarray(grid), mean_ref, sd)
        # trapezoid normaliser of a Gaussian resolved by ~67 points per sd: round-off only
        center = np.abs(np.asarray(grid) - mean_ref) < 6 * sd
        np.testing.assert_allclose(np.asarray(k.log_prob)[center], ref[center], atol=1e-9)
        assert float(k.log_evidence) == pytest.approx(scipy.stats.norm.logpdf(x_t, np.sqrt(1 - beta) * a, np.sqrt(var_t)),
                                                      abs=1e-9)
        assert abs(float(kl_to_best_gaussian_on_grid(k.log_prob, grid).kl)) < 1e-9


def test_reverse_kernel_on_grid_matches_the_closed_form_mixture():
    with x64():
        w, m, s = [0.3, 0.7], [-2.0, 1.5], [0.4, 0.6]
        grid = jnp.linspace(-10.0, 10.0, 8001)
        for ab, beta, x_t in ((1.0, 0.01, 0.3), (1.0, 0.9, 0.0), (0.5, 0.3, -1.0)):
            k = reverse_kernel_on_grid(x_t, grid, w, m, s, ab, beta)
            mix = reverse_kernel_mixture_1d(x_t, w, m, s, ab, beta)
            np.testing.assert_allclose(np.exp(np.asarray(k.log_prob)), np.exp(np.asarray(mix.log_prob(grid))), atol=1e-9)
            # Bayes' denominator on the grid against the exact noised mixture at alpha_bar_{t-1} (1 - beta_t)
            exact = float(noised_mixture_1d(w, m, s, ab * (1 - beta)).log_prob(jnp.asarray(x_t)))
            assert float(k.log_evidence) == pytest.approx(exact, abs=1e-10)
            # the kernel's KL to its best Gaussian: the grid against kl_mixture_gaussian on the closed-form mixture
            pm = MixtureOfGaussians.from_stds(mix.weights, mix.means, mix.stds)
            mm, cc = moment_match(pm)
            gh = float(kl_mixture_gaussian(pm, mm, cc))
            assert float(kl_to_best_gaussian_on_grid(k.log_prob, grid).kl) == pytest.approx(gh, abs=1e-8)


def test_noised_mixture_against_simulation():
    w, m, s, ab = np.array([0.3, 0.7]), np.array([-2.0, 1.5]), np.array([0.4, 0.6]), 0.35
    rng = np.random.default_rng(3)
    n = 400_000
    z = rng.choice(2, n, p=w)
    x_t = np.sqrt(ab) * (m[z] + s[z] * rng.normal(size=n)) + np.sqrt(1 - ab) * rng.normal(size=n)
    q = noised_mixture_1d(w, m, s, ab)
    cdf = np.sum(np.asarray(q.weights) * scipy.stats.norm.cdf(np.array([-1.0, 0.0, 1.0])[:, None],
                                                              np.asarray(q.means), np.asarray(q.stds)), -1)
    # indicator means against the exact CDF: 4 binomial SE
    assert_mc_close((x_t[:, None] <= np.array([-1.0, 0.0, 1.0])).astype(float), cdf, floor=1e-6, what="CDF")


def test_feller_kernel_is_gaussian_for_small_beta_only():
    with x64():
        grid = jnp.linspace(-10.0, 10.0, 8001)
        x_ts = jnp.linspace(-4.0, 4.0, 81)

        def mean_kl(beta):
            kls = jax.vmap(lambda x: kl_to_best_gaussian_on_grid(
                reverse_kernel_on_grid(x, grid, [0.3, 0.7], [-2.0, 1.5], [0.4, 0.6], 1.0, beta).log_prob, grid).kl)(x_ts)
            return float(jnp.max(kls))

        kls = [mean_kl(b) for b in (1e-3, 1e-2, 0.1, 0.9)]
    # max over x_t in [-4, 4]: ~6e-6 at beta = 1e-3, ~0.7 at beta = 0.9
    assert kls[0] < 1e-4 and kls[-1] > 0.1, kls
    assert all(a < b for a, b in zip(kls, kls[1:], strict=False)), kls


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 1.0}, r"beta \(beta_t\) must lie in \(0, 1\)"),
        ({"beta": 0.0}, r"must lie in \(0, 1\)"),
        ({"alpha_bar_prev": 1.5}, r"alpha_bar must lie in \(0, 1\]"),
        ({"grid": np.linspace(-10, 10, 101), "beta": 1e-3}, "too coarse"),
        ({"grid": np.linspace(-1, 1, 2001)}, "does not cover"),
        ({"stds": [0.4, -0.6]}, "stds must be positive"),
        ({"weights": [0.3, 0.6]}, "sum to 1"),
    ],
)
def test_reverse_kernel_checks(kwargs, match):
    args = {"x_t": 0.0, "grid": np.linspace(-10, 10, 2001), "weights": [0.3, 0.7], "means": [-2.0, 1.5],
            "stds": [0.4, 0.6], "alpha_bar_prev": 1.0, "beta": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        reverse_kernel_on_grid(**args)


# ----------------------------------------------------------------------------- B5
def test_joint_kl_bound_linear_gaussian():
    """joint = marginal + gap (three separate closed forms); each against Monte Carlo; the
    model's posterior against numpy Gaussian conditioning; equality iff q = p_theta(z|x)."""
    rng = np.random.default_rng(4)
    W, c, Psi = rng.normal(size=(2, 1)), rng.normal(size=2), np.diag([0.3, 0.5])
    enc = AffineGaussianEncoder(jnp.asarray(rng.normal(size=(1, 2))), jnp.asarray([0.2]), jnp.asarray([[0.4]]))
    with x64():
        model = LinearGaussianModel(jnp.asarray(W), jnp.asarray(c), jnp.asarray(Psi))
        enc64 = AffineGaussianEncoder(*(jnp.asarray(np.asarray(a), jnp.float64) for a in enc))
        r = joint_kl_bound(jnp.asarray(MU), jnp.asarray(COV), enc64, model)
        assert float(r.joint) == pytest.approx(float(r.marginal + r.gap), abs=1e-10)
        assert float(r.gap) > 0.01
        post = model.posterior()
        # Gaussian conditioning of the joint (x, z) in numpy
        S = W @ W.T + Psi
        M_ref = W.T @ np.linalg.inv(S)
        np.testing.assert_allclose(np.asarray(post.C), M_ref, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(post.Lambda), np.eye(1) - W.T @ np.linalg.inv(S) @ W, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(post.d), -M_ref @ c, rtol=1e-10, atol=1e-12)
        tight = joint_kl_bound(jnp.asarray(MU), jnp.asarray(COV), post, model)
        assert abs(float(tight.gap)) < 1e-12 and float(tight.joint) == pytest.approx(float(tight.marginal), abs=1e-12)
        # Monte Carlo over (x, z) ~ p(x) q(z|x)
        n = 200_000
        kx, kz = jax.random.split(jax.random.key(5))
        data = GaussianData(jnp.asarray(MU), jnp.asarray(COV))
        x = data.sample(kx, n)
        z = enc64.sample(kz, x)
        log_p = data.log_prob(x)
        assert_mc_close(np.asarray(log_p - model.log_marginal(x)), float(r.marginal), what="marginal KL")
        assert_mc_close(np.asarray(log_p + enc64.log_prob(z, x) - model.log_joint(x, z)), float(r.joint), what="joint KL")
        # MLE == min KL: the average NLL is KL + H(p), H(p) independent of theta
        nll = -np.asarray(model.log_marginal(x))
        assert_mc_close(nll, float(r.marginal + gaussian_entropy(jnp.asarray(COV))), what="NLL = KL + H")


def test_mixture_joint_kl_against_monte_carlo_and_quadrature():
    p = MixtureOfGaussians.from_stds([0.4, 0.6], [-2.0, 1.5], [0.6, 0.8])
    q = MixtureOfGaussians.from_stds([0.5, 0.5], [-1.8, 1.7], [0.7, 0.7])
    swap = MixtureOfGaussians(q.weights[::-1], q.means[::-1], q.covs[::-1])
    r, rs = mixture_joint_kl(p, q), mixture_joint_kl(p, swap)
    x, z = p.sample(jax.random.key(6), 400_000, return_labels=True)

    def log_joint(m, x, z):
        return np.take_along_axis(np.asarray(m.component_log_prob(x), np.float64), np.asarray(z)[:, None], 1)[:, 0]

    # float32 log-densities: 1e-5 floor
    assert_mc_close(log_joint(p, x, z) - log_joint(q, x, z), float(r.joint), floor=1e-5, what="joint KL")
    assert_mc_close(log_joint(p, x, z) - log_joint(swap, x, z), float(rs.joint), floor=1e-5, what="joint KL, swapped")
    ref = quad(lambda t: np_mixture_pdf(t, [0.4, 0.6], [-2.0, 1.5], [0.6, 0.8])
               * (np_log_mixture(t, [0.4, 0.6], [-2.0, 1.5], [0.6, 0.8]) - np_log_mixture(t, [0.5, 0.5], [-1.8, 1.7], [0.7, 0.7])))
    # float32 sums over the quadrature grid against float64 quadrature: 1e-5
    assert float(r.marginal) == pytest.approx(ref, abs=1e-5)
    assert float(rs.marginal) == pytest.approx(ref, abs=1e-5)  # labels do not change p_theta(x)
    assert float(kl_mixtures(p, q)) == pytest.approx(ref, abs=1e-5)
    for res in (r, rs):
        assert float(res.joint) >= float(res.marginal)
        assert float(res.joint) == pytest.approx(float(res.marginal + res.gap), abs=1e-4)
    assert float(rs.joint) > 10 * float(r.joint)


# ----------------------------------------------------------------------------- G3
def _gmm_data(n=400, seed=0):
    truth = MixtureOfGaussians.create(jnp.asarray([0.5, 0.3, 0.2]), jnp.asarray([[-2.0, 0.0], [2.0, 1.0], [0.5, 3.5]]),
                                      jnp.asarray([[[1.0, 0.5], [0.5, 0.8]], [[0.6, -0.3], [-0.3, 0.9]],
                                                   [[0.4, 0.0], [0.0, 0.3]]]))
    return truth, truth.sample(jax.random.key(seed), n)


def test_em_log_likelihood_never_decreases_and_the_bound_touches_after_e_steps():
    with x64():
        truth, x = _gmm_data()
        x = jnp.asarray(x, jnp.float64)
        init = init_gmm(jax.random.key(1), x, 3)
        tr = em_gmm(x, init, 40)
        ll, bound = (np.asarray(a) for a in tr.half_steps)
        # float64: the E-step makes the bound equal to the log-likelihood up to round-off
        np.testing.assert_allclose(bound[0::2], ll[0::2], atol=1e-12)
        # never decreasing (1e-12: round-off of sums of 400 O(1) terms); the bound below after M-steps
        assert np.all(np.diff(ll) >= -1e-12) and np.all(np.diff(bound) >= -1e-12)
        assert np.all(bound[1::2] <= ll[1::2] + 1e-12)
        assert ll[-1] > ll[0] + 0.1  # it moved
        # the recorded log-likelihood is that of the recorded theta (recomputed independently with scipy)
        fit = tr.mixture
        ref = np.mean(np.log(sum(float(fit.weights[k]) * scipy.stats.multivariate_normal(
            np.asarray(fit.means[k]), np.asarray(fit.covs[k])).pdf(np.asarray(x)) for k in range(3))))
        assert ll[-1] == pytest.approx(ref, abs=1e-10)
        assert float(log_likelihood(x, fit)) == pytest.approx(ref, abs=1e-10)


def test_e_and_m_steps_against_numpy():
    with x64():
        truth, x = _gmm_data(200, seed=2)
        x = jnp.asarray(x, jnp.float64)
        theta = init_gmm(jax.random.key(3), x, 3)
        r = np.asarray(e_step(x, theta))
        dens = np.stack([float(theta.weights[k]) * scipy.stats.multivariate_normal(
            np.asarray(theta.means[k]), np.asarray(theta.covs[k])).pdf(np.asarray(x)) for k in range(3)], 1)
        np.testing.assert_allclose(r, dens / dens.sum(1, keepdims=True), rtol=1e-9)
        new = m_step(x, r)
        xn = np.asarray(x)
        for k in range(3):
            nk = r[:, k].sum()
            mk = (r[:, k:k + 1] * xn).sum(0) / nk
            ck = ((r[:, k:k + 1] * (xn - mk)).T @ (xn - mk)) / nk
            np.testing.assert_allclose(np.asarray(new.means[k]), mk, rtol=1e-10)
            np.testing.assert_allclose(np.asarray(new.covs[k]), ck, rtol=1e-10)
            assert float(new.weights[k]) == pytest.approx(nk / len(xn), rel=1e-12)

        # the M-step maximises the bound with q fixed: its gradient in the means and the
        # (unconstrained) weights vanishes there, and it is below log p only by E KL(q || p_theta(z|x))
        def bound_of(means, logits):
            return em_bound(x, new._replace(means=means, weights=jax.nn.softmax(logits)), r)

        g_m, g_w = jax.grad(bound_of, argnums=(0, 1))(new.means, jnp.log(new.weights))
        assert float(jnp.max(jnp.abs(g_m))) < 1e-10 and float(jnp.max(jnp.abs(g_w))) < 1e-10
        post = np.asarray(new.responsibilities(x))
        gap = np.mean(np.sum(r * (np.log(r) - np.log(post)), 1))
        assert float(log_likelihood(x, new) - em_bound(x, new, r)) == pytest.approx(gap, abs=1e-10)


def test_m_step_with_one_component_is_the_gaussian_mle():
    with x64():
        x = jnp.asarray(np.random.default_rng(4).normal(size=(300, 2)) @ np.array([[1.0, 0.3], [0.0, 0.5]]))
        theta = m_step(x, jnp.ones((300, 1)))
        np.testing.assert_allclose(np.asarray(theta.means[0]), np.asarray(x).mean(0), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(theta.covs[0]), np.cov(np.asarray(x), rowvar=False, bias=True), rtol=1e-10)
        assert float(theta.weights[0]) == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, th: init_gmm(jax.random.key(0), x, 0), "K >= 1"),
        (lambda x, th: em_gmm(x.at[3, 1].set(jnp.nan), th, 2), r"x must be finite; found nan at index \(3, 1\)"),
        (lambda x, th: em_gmm(x, th._replace(weights=jnp.array([0.5, 0.2, 0.2])), 2), "sum to 1"),
        (lambda x, th: em_gmm(x, th._replace(covs=th.covs.at[1].set(-jnp.eye(2))), 2), "covs"),
        (lambda x, th: em_gmm(x, th, 0), "num_iters"),
        (lambda x, th: em_gmm(x[:, :1], th, 2), "D = 2"),
    ],
)
def test_em_input_checks(call, match):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(50, 2)), jnp.float32)
    theta = MixtureOfGaussians(jnp.full((3,), 1 / 3), x[:3], jnp.broadcast_to(jnp.eye(2), (3, 2, 2)))
    with pytest.raises(ValueError, match=match):
        call(x, theta)


# ----------------------------------------------------------------------------- jit, vmap, grad
def test_traceable_under_jit_vmap_grad():
    with x64():
        p = MixtureOfGaussians.from_stds(W1, M1, S1)

        def f(m):
            return kl_gaussian_mixture(jnp.reshape(m, (1,)), jnp.array([[1.3]]), p)

        # reverse-mode gradient against central differences (float64, h = 1e-5: error ~1e-10)
        fd = (float(f(0.7 + 1e-5)) - float(f(0.7 - 1e-5))) / 2e-5
        assert float(jax.grad(f)(0.7)) == pytest.approx(fd, rel=1e-6)
        # the A5 kernel: jit + vmap over x_t equals the eager calls (which also run the grid checks)
        grid = jnp.linspace(-10.0, 10.0, 2001)
        xs = jnp.array([-1.0, 0.0, 2.0])
        args = ([0.3, 0.7], [-2.0, 1.5], [0.4, 0.6], 1.0, 0.3)
        eager = np.stack([np.asarray(reverse_kernel_on_grid(float(x), grid, *args).log_prob) for x in xs])
        batched = jax.jit(jax.vmap(lambda x: reverse_kernel_on_grid(x, grid, *args).log_prob))(xs)
        np.testing.assert_allclose(np.asarray(batched), eager, atol=1e-12)
        # the E-step vmapped over two parameter sets equals the two calls
        x = jnp.asarray(np.random.default_rng(5).normal(size=(50, 2)))
        thetas = [MixtureOfGaussians(jnp.array([0.4, 0.6]), x[2 * k:2 * k + 2], jnp.broadcast_to(jnp.eye(2), (2, 2, 2)))
                  for k in (0, 1)]
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *thetas)
        both = jax.vmap(lambda th: e_step(x, th))(stacked)
        for k in (0, 1):
            np.testing.assert_allclose(np.asarray(both[k]), np.asarray(e_step(x, thetas[k])), rtol=1e-12)


# ----------------------------------------------------------------------------- B2 against B3
def test_elbo_estimates_summary_bookkeeping():
    """summary() against numpy on synthetic draws (no model, nothing to compile)."""
    from probdiff.divergences import ELBOEstimates

    rng = np.random.default_rng(7)
    n, b, m = 500, 3, 4
    t2, t3 = rng.normal(size=(n, b, m)), 3.0 * rng.normal(size=(n, b, m))
    est = ELBOEstimates(t2.sum(-1) + rng.normal(size=(n, b)), t3.sum(-1), t2, t3)
    s = est.summary()
    for name, total, terms in (("b2", est.b2_total, t2), ("b3", est.b3_total, t3)):
        assert s[name]["mean"] == pytest.approx(total.mean())
        assert s[name]["var"] == pytest.approx(total.var(0, ddof=1).mean())
        assert s[name]["se"] == pytest.approx(np.sqrt(total.var(0, ddof=1).mean() / (n * b)))
        np.testing.assert_allclose(s[name]["var_by_latent"], terms.var(0, ddof=1).mean(0))
        assert s[name]["sum_var_terms"] == pytest.approx(terms.var(0, ddof=1).mean(0).sum())
    assert s["var_ratio_b3_over_b2"] == pytest.approx(s["b3"]["var"] / s["b2"]["var"])


# Compiling both estimators takes 15-30 s on 2 shared cores. The default suite checks the same
# statistics on GaussianDiffusion directly (test_diffusion.py: B2 and B3 means against the closed
# form, every B3 term noisier than its B2 counterpart); this checks elbo_estimates end to end.
@pytest.mark.slow
def test_b2_and_b3_have_the_same_mean_and_b3_spreads_more():
    schedule = schedules.linear(10, 1e-3, 0.3)
    d = GaussianDiffusion(optimal_eps_fn(MU, COV, schedule), schedule, (2,))
    x_0 = jnp.asarray([[1.0, -0.5], [0.0, 0.3]], jnp.float32)
    exact = np.asarray(affine_elbo_terms(d, x_0).total, np.float64)
    est = elbo_estimates(d, x_0, jax.random.key(0), 8000)
    assert est.b2_terms.shape == est.b3_terms.shape == (8000, 2, 9)
    # both unbiased for the exact ELBO (4 SE; float32 floor 1e-4 on O(1) sums)
    assert_mc_close(np.asarray(est.b2_total), exact, floor=1e-4, what="B2")
    assert_mc_close(np.asarray(est.b3_total), exact, floor=1e-4, what="B3")
    s = est.summary()
    assert s["draws"] == 8000
    # every B3 term varies more than the B2 term of the same latent: the ratio is large compared
    # with its sampling error (the variance of 8000 draws is known to a few per cent)
    ratio = np.asarray(s["b3"]["var_by_latent"]) / np.asarray(s["b2"]["var_by_latent"])
    assert np.all(ratio > 1.2), ratio
    assert s["b3"]["sum_var_terms"] > 4 * s["b2"]["sum_var_terms"]
    # but the B3 terms of one chain are negatively correlated: their total varies far less than
    # the sum of their variances (here ~1.1 against ~18), while B2's independent terms add up
    assert s["b3"]["var"] < 0.2 * s["b3"]["sum_var_terms"]
    assert s["b2"]["var"] > s["b2"]["sum_var_terms"]
    mean, se = mc_mean_se(np.asarray(est.b3_total, np.float64).mean(1))
    assert s["b3"]["mean"] == pytest.approx(mean) and s["b3"]["se"] == pytest.approx(se, rel=0.2)
    assert N_SE > 0


# ----------------------------------------------------------------------------- examples, run tiny
def run_example(name, tmp_path, *extra):
    mod = runpy.run_path(str(ROOT / "examples" / f"{name}.py"))
    res = mod["main"](["--tiny", *extra, "--out", str(tmp_path)])
    for f in mod["FILES"]:
        assert (tmp_path / f).stat().st_size > 0, f
    return res, mod


def test_example_kl_directions_tiny(tmp_path):
    res, mod = run_example("kl_directions", tmp_path, "--no-2d")
    one = res["one_d"]
    m, v = moment_match(mod["P_1D"])
    assert one["forward"]["mean"][0] == pytest.approx(float(m[0]), rel=1e-5)
    assert one["forward"]["cov"][0][0] == pytest.approx(float(v[0, 0]), rel=1e-5)
    rev = one["reverse"]
    assert len(rev) == 2 and {r["nearest_mode"] for r in rev} == {0, 1}  # one local minimum per mode
    # the forward fit is the global minimum of KL(p||q); the best reverse fit that of KL(q||p)
    assert all(r["kl_p_q"] > one["forward"]["kl_p_q"] for r in rev)
    assert rev[0]["kl_q_p"] < one["forward"]["kl_q_p"] and rev[0]["nearest_mode"] == 1
    assert all(r["hessian_min_eig"] > 0 for r in rev)
    saved = json.loads((tmp_path / "kl_directions.json").read_text())
    assert saved["one_d"]["forward"]["kl_p_q"] == pytest.approx(one["forward"]["kl_p_q"])


@pytest.mark.slow  # the 2-D part compiles its own fits and Hessians: ~15 s more on 2 cores
def test_example_kl_directions_tiny_2d(tmp_path):
    res, mod = run_example("kl_directions", tmp_path)
    two = res["two_d"]
    m, c = moment_match(mod["P_2D"])
    np.testing.assert_allclose(two["forward"]["mean"], np.asarray(m), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["forward"]["cov"], np.asarray(c), rtol=1e-5)
    # both modes are local minima (a start between them may find a third, broad one)
    assert {0, 1} <= {r["nearest_mode"] for r in two["reverse"]}
    assert all(r["hessian_min_eig"] > 0 for r in two["reverse"])
    assert all(r["kl_p_q"] > two["forward"]["kl_p_q"] for r in two["reverse"])


# compiling the two estimators of two models takes ~25 s on 2 cores; the default suite checks the
# same properties on the library function (test_b2_and_b3_have_the_same_mean_and_b3_spreads_more)
@pytest.mark.slow
def test_example_elbo_decompositions_tiny(tmp_path):
    res, _ = run_example("elbo_decompositions", tmp_path)
    for name, s in res["models"].items():
        for b in ("b2", "b3"):
            assert abs(s[b]["z_vs_exact"]) < 5, (name, b, s[b])
        assert s["var_ratio_by_latent"]["all_above_1"], name
        assert s["b3"]["sum_var_terms"] > s["b2"]["sum_var_terms"]
    assert len(res["models"]["optimal"]["b2"]["var_by_latent"]) == 19


def test_example_feller_tiny(tmp_path):
    res, _ = run_example("feller", tmp_path)
    for curve in res["curves"].values():
        kl = np.asarray(curve["mean_kl"])
        assert np.all(np.diff(kl) > 0), kl  # less Gaussian as beta grows
        assert kl[-1] > 100 * kl[0]
        assert curve["max_log_evidence_error"] < 1e-4  # float32 grid sums against the exact q(x_t)


# ~15 s on 2 shared cores (a dozen separate compilations); the default suite checks the same
# identities on the library (test_joint_kl_bound_linear_gaussian, test_mixture_joint_kl_...)
@pytest.mark.slow
def test_example_kl_joint_bound_tiny(tmp_path):
    res, _ = run_example("kl_joint_bound", tmp_path)
    assert res["max_gap_identity_error"] < 1e-4 and res["max_own_posterior_gap"] < 1e-4
    for row in res["checks"]:
        assert row["joint"] >= row["marginal"] - 1e-6
        assert abs(row["z_marginal"]) < 5 and abs(row["z_joint"]) < 5
    # q fixed at s0: the joint's minimiser lies between s0 and the marginal's (an M-step moves toward the MLE)
    assert 0.5 < res["argmin_joint_fixed_q"] < res["argmin_marginal"]
    m = res["mixtures"]
    assert m["matched labels"]["marginal"] == pytest.approx(m["swapped labels"]["marginal"], abs=1e-5)
    assert m["swapped labels"]["joint"] > m["matched labels"]["joint"]


def test_example_em_gmm_tiny(tmp_path):
    res, _ = run_example("em_gmm", tmp_path)
    assert res["max_touch_error_after_e"] < 1e-10
    assert res["min_ll_change"] >= -1e-10 and res["min_bound_change"] >= -1e-10
    assert res["max_bound_minus_ll_after_m"] <= 1e-10
    assert res["log_likelihood"][-1] > res["log_likelihood_init"]
