"""Diffusion samplers (probdiff.samplers) against exact distributions.

Truths used: the exact score of a Gaussian mixture convolved with N(0, sigma^2 I) (jax.grad of
its log density, written here from the mixture formula); exact samples of that mixture; the data
moments of Gaussian data with the optimal eps-function (analytic.optimal_eps_fn, itself checked
against Gaussian conditioning in test_analytic.py); and the closed-form marginal of the affine
reverse chain (analytic.affine_reverse_marginal, checked against brute force in test_analytic.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from helpers import x64
from jax.scipy.special import logsumexp

from probdiff import GaussianDiffusion, analytic, schedules
from probdiff import samplers as S
from probdiff.data import mmd_rbf
from probdiff.score import eps_from_score, score_from_eps

# ------------------------------------------------------------------- a separated 2-D mixture
MU = jnp.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
W = jnp.array([0.2, 0.3, 0.5])
SD = 0.5


def mixture_log_density(x, sigma):
    """log of sum_k w_k N(x; mu_k, (SD^2 + sigma^2) I): the mixture noised at sigma."""
    v = SD**2 + sigma**2
    d = -0.5 * jnp.sum((x[..., None, :] - MU) ** 2, -1) / v - jnp.log(2 * jnp.pi * v)
    return logsumexp(d + jnp.log(W), -1)


def mixture_score(x, sigma):
    return jax.vmap(jax.grad(mixture_log_density), (0, None))(x, sigma)


def mixture_samples(key, n):
    k1, k2 = jax.random.split(key)
    c = jax.random.choice(k1, 3, (n,), p=W)
    return MU[c] + SD * jax.random.normal(k2, (n, 2))


def mode_weights(x):
    nearest = np.asarray(jnp.argmin(jnp.sum((x[:, None] - MU) ** 2, -1), 1))
    return np.bincount(nearest, minlength=3) / len(x)


N_MIX = 2000
BANDWIDTH = 1.0  # the scale of one component (SD = 0.5) to the gaps between modes (8)


def _null_mmd_threshold():
    """MMD^2 of pairs of exact sample sets: its spread sets what 'reproduces the mixture' means."""
    null = np.array([
        float(mmd_rbf(mixture_samples(jax.random.key(100 + i), N_MIX), mixture_samples(jax.random.key(200 + i), N_MIX), BANDWIDTH))
        for i in range(8)
    ])
    # the null MMD^2 is centred at 0 (unbiased U-statistic) with sd ~4e-4 at n = 2000; 5 null sd
    # plus the largest null value keeps the chance of a false alarm negligible
    return float(np.max(np.abs(null)) + 5 * np.std(null))


def test_annealed_langevin_reproduces_a_separated_mixture_and_plain_langevin_does_not():
    threshold = _null_mmd_threshold()
    sigmas = jnp.geomspace(0.01, 10.0, 10)
    sampler = S.annealed_langevin(mixture_score, sigmas, step_size=5e-5, steps_per_level=100, denoise=True)
    x = jax.jit(lambda k: S.run(sampler, k, (N_MIX, 2)))(jax.random.key(0))
    exact = mixture_samples(jax.random.key(1), N_MIX)
    m_annealed = float(mmd_rbf(x, exact, BANDWIDTH))
    assert m_annealed < threshold, (m_annealed, threshold)
    # mode weights: binomial SE sqrt(w (1 - w) / n) <= 0.011; 4 SE
    np.testing.assert_allclose(mode_weights(x), W, atol=0.045)

    # plain Langevin on the data score alone, the same number of steps from the same spread-out
    # start: the chains stay in the basin they start in, so the mode weights stay wrong
    plain = S.annealed_langevin(mixture_score, jnp.array([0.01]), step_size=0.05, steps_per_level=1000)
    x0 = 10.0 * jax.random.normal(jax.random.key(9), (N_MIX, 2))
    xp = jax.jit(lambda k: S.run(plain, k, (N_MIX, 2), x_init=x0))(jax.random.key(0))
    m_plain = float(mmd_rbf(xp, exact, BANDWIDTH))
    assert m_plain > 10 * threshold, (m_plain, threshold)


# ------------------------------------------------------------------- Gaussian data, optimal eps
MU_G = jnp.array([1.0, -0.5])
COV_G = 0.5 * jnp.array([[1.0, 0.8], [0.8, 1.0]])
SCHED = schedules.linear(1000)
EPS_OPT = analytic.optimal_eps_fn(MU_G, COV_G, SCHED)
N_G = 20000


def _check_gaussian_moments(x, mean, cov, *, extra_rel=0.0, what=""):
    """Sample mean and covariance against (mean, cov) within 4.5 Monte-Carlo SE (+ extra_rel of cov).

    SE of a mean: sqrt(cov_ii / n); SE of a covariance entry for Gaussian x:
    sqrt((cov_ii cov_jj + cov_ij^2) / n).
    """
    x = np.asarray(x, np.float64)
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    n = x.shape[0]
    se_mean = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4.5 * se_mean, err_msg=f"{what} mean")
    d = np.diag(cov)
    se_cov = np.sqrt((np.outer(d, d) + cov**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 4.5 * se_cov + extra_rel * np.abs(cov), err_msg=f"{what} cov")


def test_score_from_eps_is_the_exact_score_of_q_xt():
    """D3: -eps*/sqrt(1 - alpha_bar_t) equals grad log N(x_t; sqrt(ab) mu, ab Sigma + (1 - ab) I)."""
    score = score_from_eps(EPS_OPT, SCHED)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    for t in (1, 10, 500, 1000):
        ab = SCHED.alpha_bar[t]
        q = dist.MultivariateNormal(jnp.sqrt(ab) * MU_G, ab * COV_G + (1 - ab) * jnp.eye(2))
        exact = jax.vmap(jax.grad(q.log_prob))(x)
        # float32: the score reaches ~1e2 at t = 1 (1 - alpha_bar_1 = 1e-4): relative 1e-4
        np.testing.assert_allclose(score(x, t), exact, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(eps_from_score(score, SCHED)(x, t), EPS_OPT(x, t), rtol=1e-4, atol=1e-5)


def test_ddim_eta0_reproduces_the_data_moments():
    """DDIM with eta = 0 and the optimal eps maps N(0, I) to (nearly) the data: a discretised
    probability-flow ODE. On all 1000 steps its discretisation error is ~1% of the covariance
    here (measured 0.504 vs 0.5 at 1000 steps; 3% at 100), allowed as 2% on top of 4.5 SE."""
    x = jax.jit(lambda k: S.run(S.ddim(SCHED, eps_fn=EPS_OPT, num_steps=1000, eta=0.0), k, (N_G, 2)))(jax.random.key(0))
    _check_gaussian_moments(x, MU_G, COV_G, extra_rel=0.02, what="DDIM eta=0")
    # and it is deterministic: the same x_T gives the same x_0 whatever the key
    xT = jax.random.normal(jax.random.key(3), (4, 2))
    sampler = S.ddim(SCHED, eps_fn=EPS_OPT, num_steps=50)
    np.testing.assert_array_equal(S.run(sampler, jax.random.key(1), (4, 2), x_init=xT), S.run(sampler, jax.random.key(2), (4, 2), x_init=xT))


def test_ddim_eta1_on_the_full_timeline_is_ddpm_with_beta_tilde():
    """eta = 1, S = T: x' = mu_tilde(x, x0_hat) + sqrt(beta_tilde) z, the ancestral chain with
    sigma_t^2 = beta_tilde_t, whose exact marginal for an affine eps is known in closed form."""
    x = jax.jit(lambda k: S.run(S.ddim(SCHED, eps_fn=EPS_OPT, num_steps=1000, eta=1.0), k, (N_G, 2)))(jax.random.key(1))
    d = GaussianDiffusion(EPS_OPT, SCHED, (2,), variance="beta_tilde")
    m = analytic.affine_reverse_marginal(d, final_noise=False)
    _check_gaussian_moments(x, m.loc, m.covariance_matrix, what="DDIM eta=1")


@pytest.mark.parametrize("predictor", ["ancestral", "reverse_diffusion"])
def test_predictor_only_matches_the_affine_reverse_marginal(predictor):
    """The ancestral predictor is Algorithm 2: its marginal is the affine chain's closed form. The
    reverse-diffusion predictor agrees with it to O(beta_t^2) per step (allowed 1% of cov)."""
    sampler = S.predictor_corrector(SCHED, eps_fn=EPS_OPT, predictor=predictor, corrector_steps=0)
    x = jax.jit(lambda k: S.run(sampler, k, (N_G, 2)))(jax.random.key(2))
    m = analytic.affine_reverse_marginal(GaussianDiffusion(EPS_OPT, SCHED, (2,)), final_noise=False)
    _check_gaussian_moments(x, m.loc, m.covariance_matrix, extra_rel=0.0 if predictor == "ancestral" else 0.01, what=predictor)


def test_predictor_corrector_and_score_input_keep_the_data_moments():
    """Ancestral predictor + one Langevin corrector step per t, given the score instead of eps.
    The corrector is an unadjusted Langevin step, biased by O(its step): measured +3% on the
    variances at snr = 0.16, allowed 5% on top of 4.5 SE."""
    score = score_from_eps(EPS_OPT, SCHED)
    sampler = S.predictor_corrector(SCHED, score_fn=score, corrector_steps=1, snr=0.16)
    x = jax.jit(lambda k: S.run(sampler, k, (N_G, 2)))(jax.random.key(3))
    _check_gaussian_moments(x, MU_G, COV_G, extra_rel=0.05, what="PC")


def test_samplers_accept_a_gaussian_diffusion_and_return_trajectories():
    s100 = schedules.linear(100)
    eps100 = analytic.optimal_eps_fn(MU_G, COV_G, s100)
    d = GaussianDiffusion(eps100, s100, (2,))
    for sampler in (S.ancestral(d), S.ddim(d, num_steps=10), S.predictor_corrector(d, predictor="reverse_diffusion")):
        out = S.run(sampler, jax.random.key(0), (7, 2), return_trajectory=True)
        assert out.trajectory.shape == (sampler.num_steps + 1, 7, 2)
        np.testing.assert_array_equal(out.trajectory[-1], out.x)
    # the x_0-parameterised twin of the same model gives the same DDIM samples

    def x0_fn(x, t):
        ab = d.schedule.alpha_bar[t]
        return (x - jnp.sqrt(1 - ab) * eps100(x, t)) / jnp.sqrt(ab)

    d_x0 = GaussianDiffusion(x0_fn, d.schedule, (2,), parameterization="x0")
    a = S.run(S.ddim(d, num_steps=10), jax.random.key(4), (7, 2))
    b = S.run(S.ddim(d_x0, num_steps=10), jax.random.key(4), (7, 2))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_jit_vmap_grad_through_run():
    sampler = S.ddim(SCHED, eps_fn=EPS_OPT, num_steps=20)
    f = lambda xT: jnp.sum(S.run(sampler, jax.random.key(0), (3, 2), x_init=xT))  # noqa: E731
    xT = jnp.ones((3, 2))
    g = jax.grad(f)(xT)
    # the deterministic DDIM map is affine in x_T for an affine eps: its gradient is a constant,
    # so a central finite difference is exact up to float32 rounding
    h = 0.5
    f_jit = jax.jit(f)  # one compilation for both points (each eager call of run compiles its scan)
    fd = (f_jit(xT.at[0, 0].add(h)) - f_jit(xT.at[0, 0].add(-h))) / (2 * h)
    np.testing.assert_allclose(g[0, 0], fd, rtol=1e-3)
    batched = jax.vmap(lambda k: S.run(sampler, k, (3, 2)))(jax.random.split(jax.random.key(1), 4))
    assert batched.shape == (4, 3, 2)


def test_float64_under_x64():
    with x64():
        s = schedules.linear(50, dtype=jnp.float64)
        eps = analytic.optimal_eps_fn(MU_G.astype(jnp.float64), COV_G.astype(jnp.float64), s)
        for sampler in (S.ddim(s, eps_fn=eps, num_steps=10, eta=0.5), S.predictor_corrector(s, eps_fn=eps)):
            assert S.run(sampler, jax.random.key(0), (3, 2)).dtype == jnp.float64
        al = S.annealed_langevin(mixture_score, jnp.array([0.1, 1.0], jnp.float64), steps_per_level=3)
        assert S.run(al, jax.random.key(0), (3, 2)).dtype == jnp.float64


def test_respace():
    np.testing.assert_array_equal(S.respace(1000, 4), [250, 500, 750, 1000])
    np.testing.assert_array_equal(S.respace(10, 10), np.arange(1, 11))
    taus = S.respace(1000, 7)
    assert len(np.unique(taus)) == 7 and taus[-1] == 1000 and taus[0] >= 1


# ------------------------------------------------------------------- errors
def test_bad_noise_ladders_and_steps():
    with pytest.raises(ValueError, match="increase strictly.*sigma_2 = 1 >= sigma_3 = 0.5"):
        S.annealed_langevin(mixture_score, [0.1, 1.0, 0.5])
    with pytest.raises(ValueError, match="positive"):
        S.annealed_langevin(mixture_score, [-0.1, 1.0])
    with pytest.raises(ValueError, match="step_size"):
        S.annealed_langevin(mixture_score, [0.1, 1.0], step_size=0.0)
    with pytest.raises(ValueError, match="steps_per_level"):
        S.annealed_langevin(mixture_score, [0.1, 1.0], steps_per_level=0)
    with pytest.raises(ValueError, match="eta must lie in"):
        S.ddim(SCHED, eps_fn=EPS_OPT, eta=1.5)
    with pytest.raises(ValueError, match="timesteps must lie in 1..T = 1000"):
        S.ddim(SCHED, eps_fn=EPS_OPT, timesteps=[0, 10])
    with pytest.raises(ValueError, match="at most T"):
        S.ddim(SCHED, eps_fn=EPS_OPT, num_steps=2000)
    with pytest.raises(ValueError, match="snr"):
        S.predictor_corrector(SCHED, eps_fn=EPS_OPT, snr=-1.0)
    with pytest.raises(ValueError, match="predictor must be one of"):
        S.predictor_corrector(SCHED, eps_fn=EPS_OPT, predictor="euler")


def test_wrong_model_functions():
    with pytest.raises(ValueError, match="exactly one of eps_fn= and score_fn="):
        S.ddim(SCHED)
    with pytest.raises(ValueError, match="exactly one"):
        S.ddim(SCHED, eps_fn=EPS_OPT, score_fn=EPS_OPT)
    with pytest.raises(TypeError, match="Schedule or a GaussianDiffusion"):
        S.ddim("linear", eps_fn=EPS_OPT)
    bad_score = lambda x, sigma: x[..., :1]  # noqa: E731
    with pytest.raises(ValueError, match="score_fn must return an array with the shape of x"):
        S.run(S.annealed_langevin(bad_score, [0.1, 1.0], steps_per_level=2), jax.random.key(0), (4, 2))
    with pytest.raises(ValueError, match="shape of x"):
        S.run(S.ddim(SCHED, score_fn=bad_score, num_steps=5), jax.random.key(0), (4, 2))
    with pytest.raises(ValueError, match="x_init must have shape"):
        S.run(S.ddim(SCHED, eps_fn=EPS_OPT, num_steps=5), jax.random.key(0), (4, 2), x_init=jnp.zeros((3, 2)))
