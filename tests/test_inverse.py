"""Diffusion priors in NumPyro models: observation helpers, closed forms, and the posterior samplers.

The exact check (issue: inverse problems): Gaussian data N(mu, Sigma) with the optimal affine
eps-function make every law in sight Gaussian. The prior each sampler targets and the posterior
under a linear-Gaussian observation are computed here in NumPy, by formulas derived separately
from the library's code (precision-form Bayes, the affine recursion of each sampler), and each
sampler's mean and covariance must match within Monte-Carlo error (helpers.N_SE = 4 standard
errors, estimated from the same draws: independent runs for SMC and DPS, the effective sample
size for the Markov chains).
"""

from __future__ import annotations

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.stats
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, Predictive

from probdiff import GaussianDiffusion, analytic, inverse, schedules
from probdiff.infer import DPS, AnnealedLangevin, TwistedSMC
from tests.helpers import N_SE, assert_mc_close, x64

D = 3
RNG = np.random.default_rng(0)
_L = RNG.normal(size=(D, D))
SIGMA = _L @ _L.T / D + 0.1 * np.eye(D)
MU = RNG.normal(size=D)
A_MAT = RNG.normal(size=(2, D))
S_OBS = 0.5
Y = A_MAT @ MU + 0.3


def _setup(T=100, s=S_OBS):
    sch = schedules.linear(T)
    prior = GaussianDiffusion(analytic.optimal_eps_fn(MU, SIGMA, sch), sch, (D,))
    obs = inverse.LinearObservation(A_MAT, s)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", obs(x), obs=y)

    return sch, prior, obs, model


def _bayes(m, S, A, y, s):
    """Posterior of x ~ N(m, S), y = A x + N(0, s^2 I), in precision form (float64 NumPy)."""
    P = np.linalg.inv(S) + A.T @ A / s**2
    cov = np.linalg.inv(P)
    return cov @ (np.linalg.solve(S, m) + A.T @ y / s**2), cov


def _np_coefs(sch, t):
    """Tweedie x0_hat = P x_t + c and reverse mean M x_t + b for N(MU, SIGMA) data, from Gaussian conditioning."""
    ab = float(sch.alpha_bar[t])
    beta, alpha = float(sch.beta[t]), float(sch.alpha[t])
    # E[x_0 | x_t] with x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps: gain K = sqrt(ab) Sigma C^{-1}
    C = ab * SIGMA + (1 - ab) * np.eye(D)
    K = np.sqrt(ab) * SIGMA @ np.linalg.inv(C)
    P, c = K, MU - K @ (np.sqrt(ab) * MU)
    # eps_hat = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab); mu = (x_t - beta / sqrt(1 - ab) eps_hat) / sqrt(alpha)
    E = (np.eye(D) - np.sqrt(ab) * P) / np.sqrt(1 - ab)
    e = -np.sqrt(ab) * c / np.sqrt(1 - ab)
    M = (np.eye(D) - beta / np.sqrt(1 - ab) * E) / np.sqrt(alpha)
    b = -beta / np.sqrt(1 - ab) * e / np.sqrt(alpha)
    return P, c, M, b, beta, alpha


def _chain_law(sch, A=None, y=None, s=None, scale=0.0):
    """Law of the reverse chain's output (z = 0 at t = 1), with DPS's push when scale > 0.

    DPS's default twist is tempered, alpha_bar_t ell(x0_hat), so its step is
    zeta_t alpha_bar_t grad ell with zeta_t = scale beta_t / sqrt(alpha_t).
    """
    m, S = np.zeros(D), np.eye(D)
    for t in range(sch.num_steps, 0, -1):
        P, c, M, b, beta, alpha = _np_coefs(sch, t)
        if scale:
            zeta = scale * beta / np.sqrt(alpha) * float(sch.alpha_bar[t])
            # grad_x ell(P x + c) = P^T A^T (y - A (P x + c)) / s^2, affine in x
            M = M - zeta * P.T @ A.T @ A @ P / s**2
            b = b + zeta * P.T @ A.T @ (y - A @ c) / s**2
        m, S = M @ m + b, M @ S @ M.T + (beta * np.eye(D) if t > 1 else 0.0)
    return m, S


# ----------------------------------------------------------------------------- closed forms
def test_gaussian_posterior_and_evidence_match_bayes_rule():
    with x64():
        obs = inverse.LinearObservation(A_MAT, S_OBS)
        post = inverse.gaussian_posterior(MU, SIGMA, obs, Y)
        m, S = _bayes(MU, SIGMA, A_MAT, Y, S_OBS)
        np.testing.assert_allclose(post.loc, m, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(post.covariance_matrix, S, rtol=1e-10, atol=1e-12)
        # Bayes' rule at any x: log p(y) = log p(y | x) + log p(x) - log p(x | y)
        x = np.array([0.3, -0.2, 1.1])
        logpy = (
            scipy.stats.multivariate_normal(A_MAT @ x, S_OBS**2 * np.eye(2)).logpdf(Y)
            + scipy.stats.multivariate_normal(MU, SIGMA).logpdf(x)
            - scipy.stats.multivariate_normal(m, S).logpdf(x)
        )
        np.testing.assert_allclose(inverse.gaussian_evidence(MU, SIGMA, obs, Y), logpy, rtol=1e-10)


def test_reverse_chain_law_oracle_matches_library_marginal():
    # the NumPy recursion used as the oracle below agrees with analytic.affine_reverse_marginal
    with x64():
        sch, prior, _, _ = _setup(T=50)
        pm = analytic.affine_reverse_marginal(prior, final_noise=False)
        m, S = _chain_law(sch)
        np.testing.assert_allclose(pm.loc, m, atol=1e-9)
        np.testing.assert_allclose(pm.covariance_matrix, S, atol=1e-9)


# ----------------------------------------------------------------------------- observations
def test_inpainting_denoising_linear_log_likelihoods():
    x = np.array([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3]])
    y = np.array([0.4, 99.0, 1.5])  # the unobserved entry is ignored
    mask = np.array([True, False, True])
    ip = inverse.Inpainting(mask, 0.2)
    want = scipy.stats.norm(x[:, mask], 0.2).logpdf(y[mask]).sum(-1)
    np.testing.assert_allclose(ip.log_likelihood(x, y), want, rtol=1e-5)
    # the matrix form: A keeps the observed rows of the identity
    np.testing.assert_allclose(ip.matrix() @ x[0], x[0, mask])
    np.testing.assert_allclose(ip.observed(y), y[mask])
    dn = inverse.Denoising(0.3, (3,))
    np.testing.assert_allclose(dn.log_likelihood(x, y), scipy.stats.norm(x, 0.3).logpdf(y).sum(-1), rtol=1e-5)
    lo = inverse.LinearObservation(A_MAT, 0.7)
    want = [scipy.stats.multivariate_normal(A_MAT @ xi, 0.49 * np.eye(2)).logpdf(Y) for xi in x]
    np.testing.assert_allclose(lo.log_likelihood(x, Y), want, rtol=1e-5)
    # images: A acts on x flattened in C order
    img = np.arange(4.0).reshape(2, 2, 1)
    lo2 = inverse.LinearObservation(np.eye(4)[[0, 3]], 1.0, (2, 2, 1))
    np.testing.assert_allclose(lo2.forward(img), [0.0, 3.0])
    draws = ip(jnp.asarray(x[0])).sample(jax.random.key(0), (20000,))
    assert_mc_close(draws[:, mask], x[0, mask], what="inpainting draws")  # E[y] = x on observed entries
    assert np.all(np.asarray(draws[:, ~mask]) == 0.0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: inverse.LinearObservation(np.ones(3), 0.1), "2-D"),
        (lambda: inverse.LinearObservation(np.ones((2, 3)), 0.1, (2, 2)), "columns"),
        (lambda: inverse.LinearObservation(np.full((2, 3), np.nan), 0.1), "NaN"),
        (lambda: inverse.LinearObservation(np.ones((2, 3)), 0.0), "noise_scale"),
        (lambda: inverse.Denoising(-1.0, (3,)), "noise_scale"),
        (lambda: inverse.Inpainting(np.array([0, 2, 1]), 0.1), "0/1"),
        (lambda: inverse.Inpainting(np.array(True), 0.1), "mask"),
    ],
)
def test_bad_observation_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_observations_and_shapes_name_the_helper():
    ip = inverse.Inpainting(np.array([True, False, True]), 0.1)
    with pytest.raises(ValueError, match="Inpainting: x_0 must end in the event shape"):
        ip(jnp.zeros((4,)))  # a mask of the wrong shape for x
    with pytest.raises(ValueError, match=r"Inpainting: the observation y must have shape \(3,\)"):
        ip(jnp.zeros(3)).log_prob(jnp.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        ip(jnp.zeros(3)).log_prob(jnp.array([0.0, 1.0, np.nan]))
    ip(jnp.zeros(3)).log_prob(jnp.array([0.0, np.nan, 1.0]))  # NaN where unobserved is fine
    lo = inverse.LinearObservation(A_MAT, 0.1)
    with pytest.raises(ValueError, match=r"LinearObservation: the observation y must have shape \(2,\)"):
        lo(jnp.zeros(3)).log_prob(jnp.zeros(3))
    with pytest.raises(ValueError, match="y must have the observation shape"):
        inverse.gaussian_posterior(MU, SIGMA, lo, np.zeros(3))


# ----------------------------------------------------------------------------- the model
def test_model_under_predictive_draws_prior_and_prior_predictive():
    with x64():
        sch, prior, obs, model = _setup(T=50)
        draws = Predictive(model, num_samples=4000)(jax.random.key(1))
        x, y = np.asarray(draws["x"]), np.asarray(draws["y"])
        assert x.shape == (4000, D) and y.shape == (4000, 2)
        m, _ = _chain_law(sch)  # GaussianDiffusion.sample's law (z = 0 at t = 1)
        assert_mc_close(x, m, what="prior draws")
        assert_mc_close(y - x @ A_MAT.T, np.zeros(2), what="y - A x")
        r = y - x @ A_MAT.T
        assert_mc_close(r**2, np.full(2, S_OBS**2), what="observation noise variance")


def test_posterior_problem_log_likelihood_and_errors():
    with x64():
        _, prior, obs, model = _setup(T=20)
        pb = inverse.PosteriorProblem.from_model(model, (), {"y": Y})
        assert pb.site == "x" and pb.shape == (D,) and pb.prior is prior
        x = np.array([0.2, -0.4, 0.9])
        want = scipy.stats.multivariate_normal(A_MAT @ x, S_OBS**2 * np.eye(2)).logpdf(Y)
        np.testing.assert_allclose(jax.jit(pb.log_likelihood)(x), want, rtol=1e-10)
        g = jax.grad(pb.log_likelihood)(jnp.asarray(x))
        np.testing.assert_allclose(g, A_MAT.T @ (Y - A_MAT @ x) / S_OBS**2, rtol=1e-9)
        assert jax.vmap(pb.log_likelihood)(jnp.zeros((5, D))).shape == (5,)

        def two_latents(y=None):
            numpyro.sample("x", prior)
            numpyro.sample("noise", dist.HalfNormal(1.0))

        with pytest.raises(ValueError, match=r"other latent sites \['noise'\]"):
            inverse.PosteriorProblem.from_model(two_latents)

        def no_prior(y=None):
            numpyro.sample("x", dist.Normal(0, 1))

        with pytest.raises(ValueError, match="exactly one latent sample site with a GaussianDiffusion"):
            TwistedSMC(no_prior).run(jax.random.key(0))


def test_prior_inside_a_plate_image_shapes():
    # a batch of 2 images of shape (2, 2, 1): the site's value is (2, 2, 2, 1) and every sampler keeps it
    sch = schedules.linear(10)
    prior = GaussianDiffusion(lambda x, t: 0.1 * x, sch, (2, 2, 1))
    mask = np.array([[1, 0], [1, 1]], bool)[..., None]
    obs = inverse.Inpainting(mask, 0.1)
    y = jnp.ones((2, 2, 2, 1))

    def model(y=None):
        with numpyro.plate("images", 2):
            x = numpyro.sample("x", prior)
            numpyro.sample("y", obs(x), obs=y)

    smc = TwistedSMC(model, 8, num_chains=2).run(jax.random.key(0), y=y)
    assert smc.get_samples()["x"].shape == (16, 2, 2, 2, 1)
    assert smc.get_extra_fields()["ess"].shape == (2, 10)  # one row per run
    lw = smc.get_extra_fields()["log_weights"]  # concatenated, normalised within each run
    w = np.asarray(jax.nn.softmax(lw)).reshape(2, 8)
    np.testing.assert_allclose(w.sum(1), [0.5, 0.5], rtol=1e-5)
    dps = DPS(model, 3).run(jax.random.key(1), y=y)
    assert dps.get_samples(group_by_chain=True)["x"].shape == (1, 3, 2, 2, 2, 1)
    mcmc = MCMC(
        AnnealedLangevin(model),
        num_warmup=10,
        num_samples=5,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(2), y=y)
    x = mcmc.get_samples()["x"]
    assert x.shape == (10, 2, 2, 2, 1) and bool(jnp.all(jnp.isfinite(x)))


# ----------------------------------------------------------------------------- the exact check
def _weighted_moments(particles, log_weights):
    w = np.asarray(jax.nn.softmax(log_weights, axis=-1))
    p = np.asarray(particles)
    mean = np.einsum("rk,rkd->rd", w, p)
    c = p - mean[:, None]
    cov = np.einsum("rk,rkd,rke->rde", w, c, c)
    return mean, cov


def test_twisted_smc_matches_the_exact_posterior_and_evidence():
    with x64():
        sch, prior, obs, model = _setup(T=100)
        m0, S0 = _chain_law(sch)
        m, S = _bayes(m0, S0, A_MAT, Y, S_OBS)
        R, K = 24, 512
        smc = TwistedSMC(model, K, num_chains=R).run(jax.random.key(3), y=Y)
        ex = smc.get_extra_fields(group_by_chain=True)
        mean, cov = _weighted_moments(ex["particles"], ex["log_weights"])
        # one estimate per independent run; the self-normalised estimate's O(1/K) bias is far
        # below the run-to-run SE at K = 512 (checked: the z-scores do not drift with K)
        assert_mc_close(mean, m, what="SMC posterior mean")
        assert_mc_close(cov.reshape(R, -1), S.reshape(-1), what="SMC posterior covariance")
        # Z_hat is unbiased for p_theta(y); its log is biased low, so compare the mean of Z_hat
        logz = np.asarray(ex["log_evidence"], np.float64)
        z = np.exp(logz - logz.max())
        true = scipy.stats.multivariate_normal(
            A_MAT @ m0, A_MAT @ S0 @ A_MAT.T + S_OBS**2 * np.eye(2)
        ).logpdf(Y)
        assert_mc_close(z, np.exp(true - logz.max()), what="SMC evidence")
        assert ex["ess"].shape == (R, 100) and ex["resampled"].dtype == bool
        assert np.all(np.asarray(ex["final_ess"]) <= K + 1e-6)
        # the equally weighted draws: K per run, and a different (wrong) posterior is rejected
        x = smc.get_samples()["x"]
        assert x.shape == (R * K, D)
        with pytest.raises(AssertionError):
            assert_mc_close(mean, m + 0.15, what="shifted")


def test_dps_matches_its_own_affine_law_and_not_the_posterior():
    with x64():
        sch, prior, obs, model = _setup(T=100)
        m_dps, S_dps = _chain_law(sch, A_MAT, Y, S_OBS, scale=1.0)
        dps = DPS(model, 4000, scale=1.0).run(jax.random.key(4), y=Y)
        x = np.asarray(dps.get_samples()["x"])
        assert_mc_close(x, m_dps, what="DPS mean")
        c = x - m_dps
        assert_mc_close(
            np.einsum("nd,ne->nde", c, c).reshape(len(x), -1), S_dps.reshape(-1), what="DPS covariance"
        )
        # a second observation reuses the compiled sweep and gets its own law (the data are traced)
        y2 = Y - 1.0
        x2 = np.asarray(dps.run(jax.random.key(5), y=y2).get_samples()["x"])
        assert_mc_close(x2, _chain_law(sch, A_MAT, y2, S_OBS, scale=1.0)[0], what="DPS mean, second y")
        assert len(dps._compiled) == 1
        # DPS is biased: its law is measurably not the posterior
        m, S = _bayes(*_chain_law(sch), A_MAT, Y, S_OBS)
        gap = np.linalg.norm(m_dps - m) / np.sqrt(np.trace(S)) + np.linalg.norm(S_dps - S) / np.linalg.norm(S)
        assert gap > 0.05


ETA_ULA = 0.03


@pytest.mark.parametrize("metropolis", [True, False])
def test_annealed_langevin_matches_the_noised_prior_posterior(metropolis):
    with x64():
        sch, prior, obs, model = _setup(T=100)
        ab = float(sch.alpha_bar[1])
        m, S = _bayes(np.sqrt(ab) * MU, ab * SIGMA + (1 - ab) * np.eye(D), A_MAT, Y, S_OBS)
        kernel = AnnealedLangevin(
            model,
            metropolis=metropolis,
            adapt_step_size=metropolis,
            final_step_size=None if metropolis else ETA_ULA,
        )
        mcmc = MCMC(
            kernel,
            num_warmup=600,
            num_samples=3000,
            num_chains=4,
            chain_method="vectorized",
            progress_bar=False,
        )
        mcmc.run(jax.random.key(5), y=Y)
        x = np.asarray(mcmc.get_samples(group_by_chain=True)["x"])
        ess = np.asarray(effective_sample_size(x))
        assert np.all(ess > 100)
        flat = x.reshape(-1, D)
        if not metropolis:
            # ULA on N(m, S) is the AR(1) x' - m = (I - eta H / 2)(x - m) + sqrt(eta) z, H = S^-1,
            # whose stationary covariance solves V = B V B + eta I: V = (H - eta H^2 / 4)^-1
            H = np.linalg.inv(S)
            S = np.linalg.inv(H - ETA_ULA * H @ H / 4)
        se = np.sqrt(np.diag(S) / ess)
        assert np.all(np.abs(flat.mean(0) - m) < N_SE * se), (flat.mean(0), m, se)
        cov = np.cov(flat.T)
        se_cov = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S**2) / ess.min())
        assert np.all(np.abs(cov - S) < N_SE * se_cov)
        idata = az.from_numpyro(mcmc)
        assert float(az.rhat(idata)["x"].max()) < 1.05


def test_smc_and_dps_work_with_arviz_and_jit_free_reruns():
    with x64():
        _, _, _, model = _setup(T=20)
        smc = TwistedSMC(model, 16, num_chains=3).run(jax.random.key(0), y=Y)
        idata = az.from_dict(posterior=smc.get_samples(group_by_chain=True))
        assert idata.posterior["x"].shape == (3, 16, D)
        smc.print_summary()
        with pytest.raises(RuntimeError, match="run"):
            DPS(model).get_samples()
        with pytest.raises(ValueError, match="ess_threshold"):
            TwistedSMC(model, ess_threshold=1.5)
        with pytest.raises(ValueError, match="t_final"):
            MCMC(AnnealedLangevin(model, t_final=50), num_warmup=2, num_samples=2, progress_bar=False).run(
                jax.random.key(0), y=Y
            )
        with pytest.raises(ValueError, match="scale"):
            DPS(model, scale=0.0)
        with pytest.raises(ValueError, match="NaN"):
            TwistedSMC(model, 4).run(jax.random.key(0), y=np.array([np.nan, 1.0]))
        with pytest.raises(ValueError, match=r"observation y must have shape \(2,\)"):
            DPS(model, 4).run(jax.random.key(0), y=np.zeros(3))
