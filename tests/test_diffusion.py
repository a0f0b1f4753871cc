"""GaussianDiffusion and the Gaussian closed forms (MATH.md B1, B2, B3, C4) on Gaussian data.

For data N(MU, COV) and the optimal eps-function every ELBO term has a closed form; the oracle
computes it in float64 by the per-term route (a) and, for small T, by the joint-Gaussian
route (b). The library's ``affine_elbo_terms`` and the Monte-Carlo ``elbo``, ``Trace_ELBO`` and
B3 estimates must all agree with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from helpers import COV, MU, N_SE, assert_mc_close, covariance_draws, mc_mean_se, x64
from numpyro import handlers
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.util import log_density
from oracles import gaussian as g

from probdiff import GaussianDiffusion, schedules
from probdiff.analytic import affine_elbo_terms, affine_reverse_marginal, optimal_eps_fn

EPS32 = float(np.finfo(np.float32).eps)
VARIANCES = ["beta", "beta_tilde"]
X0 = np.array([0.3, 0.7])  # one data point, inside the bulk of N(MU, COV)

BETAS_T4 = np.array([0.1, 0.2, 0.3, 0.4])
BETAS_T10 = np.linspace(0.05, 0.3, 10)
BETAS_T20 = g.linear_betas(20, 1e-3, 0.3)  # short chain: low Monte-Carlo variance, alpha_bar_T = 0.04


def make(betas, variance, dtype=jnp.float32):
    """(library diffusion with the optimal eps, oracle schedule, oracle A, b, sigma^2)."""
    lib = schedules.from_betas(betas, dtype=dtype)
    eps_fn = optimal_eps_fn(jnp.asarray(MU, dtype), jnp.asarray(COV, dtype), lib)
    d = GaussianDiffusion(eps_fn, lib, (2,), variance)
    oracle = g.schedule_from_betas(betas)
    W, v = g.optimal_eps_affine(MU, COV, oracle)
    A, b = g.affine_reverse(oracle, W, v)
    return d, oracle, A, b, g.reverse_sigma2(oracle, variance)


def float32_term_tolerances(oracle, A, x_0, expected):
    """Tolerances of the float32 closed form at T = 1000.

    Denoising term t: mu_tilde - mu_theta = M_t x_t + ..., M_t = c_t I - A_t, a difference of
    O(1) float32 coefficients (||M_t|| is 1e-7..0.5 on these schedules), so M_t carries an
    absolute error of a few eps32 and a relative one of a few eps32 / ||M_t||, doubled by the
    square in the KL. The measured errors stay below 8 eps32 / ||M_t|| relative (c_t and A_t
    each collect several roundings); the tolerance is twice that, rtol_t = 16 eps32 / ||M_t||.
    Reconstruction: ~10 float32 roundings of terms of size <= |recon|: rtol 8 eps32.
    Prior: 1/2 sum (s + m^2 - 1 - log s) with s = 1 - ab_T ~ 1; the cancellation leaves an
    absolute error ~eps32 ab_T D, far below 1e-10.
    """
    marginals = g.composed_marginals(oracle)
    M_norm = np.array(
        [np.linalg.norm(g.posterior_by_conditioning(oracle, t, np.zeros(2), x_0, marginals)[2] * np.eye(2) - A[t], 2)
         for t in range(2, oracle.T + 1)]
    )
    den = 16 * EPS32 / M_norm * np.abs(expected["denoising_matching"])
    rec = 8 * EPS32 * abs(expected["reconstruction"])
    pri = 1e-10
    return {"reconstruction": rec, "prior_matching": pri, "denoising_matching": den, "total": rec + pri + den.sum()}


# ------------------------------------------------ (i) closed form vs oracle routes (a), (b)
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("betas_name", ["linear", "cosine"])
def test_affine_elbo_terms_vs_oracle_route_a_T1000(variance, betas_name):
    betas = g.linear_betas(1000) if betas_name == "linear" else g.cosine_betas(1000)
    d, oracle, A, b, s2 = make(betas, variance)
    expected = g.elbo_terms_route_a(oracle, A, b, s2, X0)
    tol = float32_term_tolerances(oracle, A, X0, expected)
    got = jax.jit(lambda x: affine_elbo_terms(d, x))(jnp.asarray(X0, jnp.float32))
    assert got.denoising_matching.shape == (999,)
    for name in ("reconstruction", "prior_matching", "denoising_matching"):
        err = np.abs(np.asarray(getattr(got, name), np.float64) - expected[name])
        assert np.all(err <= tol[name]), (name, err.max())
    assert abs(float(got.total) - expected["total"]) <= tol["total"]


@pytest.mark.parametrize("variance", VARIANCES)
def test_affine_elbo_terms_vs_oracle_route_a_T1000_float64(variance):
    betas = g.linear_betas(1000)
    with x64():
        d, oracle, A, b, s2 = make(betas, variance, jnp.float64)
        expected = g.elbo_terms_route_a(oracle, A, b, s2, X0)
        got = jax.jit(lambda x: affine_elbo_terms(d, x))(jnp.asarray(X0))
        # float64: the same cancellation as in float32 (eps64 / ||M_t|| >= eps64 / 1e-6),
        # so 1e-8 relative per term, 1e-10 on the total of size 10.
        np.testing.assert_allclose(np.asarray(got.denoising_matching), expected["denoising_matching"],
                                   rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(float(got.reconstruction), expected["reconstruction"], rtol=1e-12)
        np.testing.assert_allclose(float(got.prior_matching), expected["prior_matching"], rtol=1e-9)
        np.testing.assert_allclose(float(got.total), expected["total"], rtol=1e-10)


@pytest.mark.parametrize("variance", VARIANCES)
def test_affine_elbo_total_vs_oracle_joint_gaussian_route_b_T4(variance):
    with x64():
        d, oracle, A, b, s2 = make(BETAS_T4, variance, jnp.float64)
        got = jax.jit(lambda x: affine_elbo_terms(d, x))(jnp.asarray(X0))
        route_b = g.elbo_route_b(oracle, A, b, s2, X0)
        # Both float64, T = 4, 10 x 10 joint covariances: round-off ~1e-14; 1e-10 relative.
        np.testing.assert_allclose(float(got.total), route_b, rtol=1e-10)
        # ... and for an arbitrary affine eps too (no optimality used): eps = 0.7 eps* + 0.2.
        eps_opt = optimal_eps_fn(jnp.asarray(MU), jnp.asarray(COV), d.schedule)
        d2 = GaussianDiffusion(lambda x, t: 0.7 * eps_opt(x, t) + 0.2, d.schedule, (2,), variance)
        W, v = g.optimal_eps_affine(MU, COV, oracle)
        A2, b2 = g.affine_reverse(oracle, 0.7 * W, 0.7 * v + 0.2)
        np.testing.assert_allclose(float(jax.jit(lambda x: affine_elbo_terms(d2, x).total)(jnp.asarray(X0))),
                                   g.elbo_route_b(oracle, A2, b2, s2, X0), rtol=1e-10)


# ------------------------------------------------------- (iii) ELBO <= log p_theta(x_0)
@pytest.mark.parametrize("variance", VARIANCES)
def test_elbo_below_exact_log_likelihood(variance):
    d, oracle, A, b, s2 = make(g.linear_betas(1000), variance)
    m0, S0 = g.reverse_marginal(A, b, s2)
    log_p = g.mvn_logpdf(X0, m0, S0)
    expected = g.elbo_terms_route_a(oracle, A, b, s2, X0)
    tol = float32_term_tolerances(oracle, A, X0, expected)["total"]
    elbo = float(jax.jit(lambda x: affine_elbo_terms(d, x).total)(jnp.asarray(X0, jnp.float32)))
    gap = log_p - elbo
    # The gap is KL(q(x_{1:T}|x_0) || p_theta(x_{1:T}|x_0)) >= 0; it must exceed the float32
    # error bound of the ELBO (float32_term_tolerances), else the sign would be noise.
    assert gap > tol, (gap, tol)
    if variance == "beta":
        # Optimal eps, sigma_t^2 = beta_t, T = 1000: the model posterior is close to q; the
        # oracle puts the gap at 0.0035 nats (float64), which the float32 value must reproduce.
        assert gap < 0.01
        np.testing.assert_allclose(gap, log_p - expected["total"], atol=tol)
    # The library's exact marginal p_theta(x_0) agrees with the oracle's recursion (float32,
    # 1000 steps of A S A^T: 1e-4 relative).
    marg, marg_alg2 = jax.jit(lambda: (affine_reverse_marginal(d), affine_reverse_marginal(d, final_noise=False)))()
    np.testing.assert_allclose(np.asarray(marg.loc), m0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(marg.covariance_matrix), S0, rtol=1e-4, atol=1e-5)
    _, S0_alg2 = g.reverse_marginal(A, b, s2, final_noise=False)
    np.testing.assert_allclose(np.asarray(marg_alg2.covariance_matrix), S0_alg2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variance", VARIANCES)
def test_elbo_gap_is_the_posterior_kl_T4(variance):
    """log p_theta(x_0) - ELBO = KL(q(x_{1:T}|x_0) || p_theta(x_{1:T}|x_0)), three float64 routes."""
    with x64():
        d, oracle, A, b, s2 = make(BETAS_T4, variance, jnp.float64)
        elbo, log_p = jax.jit(
            lambda x: (affine_elbo_terms(d, x).total, affine_reverse_marginal(d).log_prob(x))
        )(jnp.asarray(X0))
        elbo, log_p = float(elbo), float(log_p)
        m0, S0 = g.reverse_marginal(A, b, s2)
        np.testing.assert_allclose(log_p, g.mvn_logpdf(X0, m0, S0), rtol=1e-12)  # float64 round-off
        gap = g.posterior_gap_route_b(oracle, A, b, s2, X0)
        assert gap > 0
        np.testing.assert_allclose(log_p - elbo, gap, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------- (ii) Monte-Carlo .elbo
@pytest.mark.parametrize("variance", VARIANCES)
def test_elbo_monte_carlo_mean_T1000(variance):
    d, oracle, A, b, s2 = make(g.linear_betas(1000), variance)
    expected = g.elbo_terms_route_a(oracle, A, b, s2, X0)
    N = 2000
    keys = jax.random.split(jax.random.key(0), N)
    draws = jax.jit(jax.vmap(lambda k: d.elbo(k, jnp.asarray(X0, jnp.float32))))(keys)
    # 4 SE of the Monte-Carlo mean; floor: float32 error of each draw, bounded like the closed
    # form's (the same arithmetic at a random x_t), 1e-4 on a total of 10.
    assert_mc_close(np.asarray(draws), expected["total"], floor=1e-4, what="E ELBO")


def test_elbo_batch_of_data_and_bits_per_dim():
    d, oracle, A, b, s2 = make(BETAS_T20, "beta")
    rng = np.random.default_rng(3)
    X = rng.multivariate_normal(MU, COV, size=3)
    N = 5_000
    keys = jax.random.split(jax.random.key(2), N)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: d.elbo(k, jnp.asarray(X, jnp.float32))))(keys))
    assert draws.shape == (N, 3)
    expected = [g.elbo_terms_route_a(oracle, A, b, s2, x)["total"] for x in X]
    assert_mc_close(draws, expected, floor=1e-4, what="E ELBO per example")
    # bits/dim is -ELBO / (D log 2) of the same estimate (same key): float32 division.
    bpd, elbo = jax.jit(lambda k, x: (d.bits_per_dim(k, x), d.elbo(k, x)))(jax.random.key(5), jnp.asarray(X, jnp.float32))
    np.testing.assert_allclose(np.asarray(bpd), -np.asarray(elbo, np.float64) / (2 * np.log(2.0)), rtol=4 * EPS32)


# ---------------------------------------------------------------- (iv) Trace_ELBO loss
@pytest.mark.parametrize("variance", VARIANCES)
def test_trace_elbo_on_model_and_guide_equals_closed_form(variance):
    d, oracle, A, b, s2 = make(BETAS_T20, variance)
    expected = g.elbo_terms_route_a(oracle, A, b, s2, X0)["total"]
    N = 20_000
    x = jnp.asarray(X0, jnp.float32)
    loss = jax.jit(jax.vmap(lambda k: Trace_ELBO().loss(k, {}, d.model, d.guide, x)))
    draws = -np.asarray(loss(jax.random.split(jax.random.key(3), N)), np.float64)
    # 4 SE; floor: float32 log-densities of a 20-step chain (40 terms of O(10)): 1e-4.
    assert_mc_close(draws, expected, floor=1e-4, what="-Trace_ELBO loss")


# ------------------------------------------- (ii, v) B2 and B3 terms by Monte Carlo
@pytest.mark.parametrize("variance", VARIANCES)
def test_b2_and_b3_terms_monte_carlo_means(variance):
    d, oracle, A, b, s2 = make(BETAS_T20, variance)
    expected = g.elbo_terms_route_a(oracle, A, b, s2, X0)
    expected3 = g.consistency_terms_expected(oracle, A, b, s2, X0)
    np.testing.assert_allclose(expected3["total"], expected["total"], rtol=1e-12)  # oracle: B3 == B2
    N = 20_000
    x = jnp.asarray(X0, jnp.float32)
    keys = jax.random.split(jax.random.key(1), N)
    t2, t3 = jax.jit(jax.vmap(lambda k: (d.elbo_terms(k, x), d.elbo_consistency_terms(k, x))))(keys)
    assert t2.denoising_matching.shape == (N, 19) and t3.consistency.shape == (N, 19)

    # B2. floor 1e-5: float32 evaluation of O(1) terms with sigma_t^2 >= 1e-3.
    assert_mc_close(np.asarray(t2.reconstruction), expected["reconstruction"], floor=1e-5, what="recon")
    # The prior term is exact (no randomness): every draw equals the closed form (float32).
    np.testing.assert_allclose(np.asarray(t2.prior_matching), expected["prior_matching"], rtol=1e-5)
    # 19 denoising terms: 5 SE (two-sided 6e-7 per term) keeps the family-wise false-alarm
    # rate of the vector near 1e-5.
    assert_mc_close(np.asarray(t2.denoising_matching), expected["denoising_matching"], n_se=5,
                    floor=1e-5, what="B2 denoising")
    assert_mc_close(np.asarray(t2.total), expected["total"], floor=1e-4, what="B2 total")

    # B3, term by term and in total.
    assert_mc_close(np.asarray(t3.total), expected["total"], floor=1e-4, what="B3 total")
    assert_mc_close(np.asarray(t3.reconstruction), expected3["reconstruction"], floor=1e-5, what="B3 recon")
    assert_mc_close(np.asarray(t3.prior_matching), expected3["prior_matching"], floor=1e-5, what="B3 prior")
    assert_mc_close(np.asarray(t3.consistency), expected3["consistency"], n_se=5, floor=1e-5, what="B3 terms")

    # MATH.md B3: two random variables per term make each B3 term noisier than its B2
    # counterpart. B3 term k (x_t, t = k + 1, given x_{t-1} and x_{t+1}) pairs with B2 term k
    # (the KL over x_{t-1} = x_{k+1} given x_{k+2}). The difference of variances is the mean of
    # the per-draw difference of squared deviations; it must be positive by more than 4 SE.
    sq2 = (np.asarray(t2.denoising_matching, np.float64) - np.asarray(t2.denoising_matching).mean(0)) ** 2
    sq3 = (np.asarray(t3.consistency, np.float64) - np.asarray(t3.consistency).mean(0)) ** 2
    mean, se = mc_mean_se(sq3 - sq2)
    assert np.all(mean > N_SE * se), (mean, se)
    # The B3 prior term is random (it depends on x_{T-1}); the B2 one is exact.
    assert np.var(np.asarray(t3.prior_matching)) > 0 and np.var(np.asarray(t2.prior_matching)) < 1e-10


# ------------------------------------------------------------------- (vi) sampling
@pytest.mark.parametrize("variance", VARIANCES)
def test_sample_moments_vs_exact_marginal(variance):
    d, oracle, A, b, s2 = make(BETAS_T10, variance)
    N = 100_000
    with_noise = g.reverse_marginal(A, b, s2, final_noise=True)
    without = g.reverse_marginal(A, b, s2, final_noise=False)
    sample = jax.jit(lambda k, fn: d.sample(k, (N,), final_noise=fn), static_argnums=1)
    for final_noise, (m, S), (_, S_other) in ((True, with_noise, without), (False, without, with_noise)):
        x = np.asarray(sample(jax.random.key(int(final_noise)), final_noise), np.float64)
        assert x.shape == (N, 2)
        # float32 coefficients over 10 steps: 1e-5 absolute floor on O(1) moments.
        assert_mc_close(x, m, floor=1e-5, what=f"mean, final_noise={final_noise}")
        assert_mc_close(covariance_draws(x), S, floor=1e-5, what=f"cov, final_noise={final_noise}")
        # Power: the two laws differ by sigma_1^2 I (0.05) on the diagonal, > 10 SE here, so the
        # check above could tell final_noise=True from False.
        cov, se = mc_mean_se(covariance_draws(x))
        assert np.all(np.abs(np.diag(cov) - np.diag(S_other)) > N_SE * np.diag(se))


def test_sample_trajectory_follows_the_reverse_joint_law():
    """return_trajectory: trajectory[k] is x_{T-k}; with final noise the whole trajectory is a
    draw of p_theta(x_{0:T}), whose joint Gaussian the oracle builds by its own recursion."""
    d, oracle, A, b, s2 = make(BETAS_T10, "beta")
    N, T, D = 20_000, 10, 2
    res = jax.jit(lambda k: d.sample(k, (N,), return_trajectory=True, final_noise=True))(jax.random.key(9))
    assert res.x_0.shape == (N, D) and res.trajectory.shape == (T + 1, N, D)
    np.testing.assert_array_equal(np.asarray(res.trajectory[-1]), np.asarray(res.x_0))
    # Reorder to increasing time (x_0, ..., x_T) and flatten, as the oracle stacks its blocks.
    flat = np.asarray(res.trajectory, np.float64)[::-1].transpose(1, 0, 2).reshape(N, (T + 1) * D)
    m, S = g.reverse_joint(A, b, s2)
    # float32 coefficients over 10 steps: 1e-5 absolute floor on O(1) moments.
    assert_mc_close(flat, m, floor=1e-5, what="E x_{0:T}")
    assert_mc_close(covariance_draws(flat), S, floor=1e-5, what="Cov x_{0:T}")


def test_trace_elbo_with_a_batch_of_data_is_the_sum_of_elbos():
    d, oracle, A, b, s2 = make(BETAS_T20, "beta")
    X = np.random.default_rng(5).multivariate_normal(MU, COV, size=3)
    expected = sum(g.elbo_terms_route_a(oracle, A, b, s2, x)["total"] for x in X)
    N = 10_000
    x = jnp.asarray(X, jnp.float32)
    loss = jax.jit(jax.vmap(lambda k: Trace_ELBO().loss(k, {}, d.model, d.guide, x)))
    draws = -np.asarray(loss(jax.random.split(jax.random.key(6), N)), np.float64)
    # Plates over the batch: the loss is minus the sum of the three ELBOs. 4 SE; floor as above x 3.
    assert_mc_close(draws, expected, floor=3e-4, what="-Trace_ELBO loss, batch of 3")


@pytest.mark.parametrize("T", [1, 2])
def test_shortest_chains(T):
    """T = 1 (no denoising term; B3 has no consistency term) and T = 2 against both oracle routes."""
    betas = np.array([0.3, 0.5])[:T]
    with x64():
        d64, oracle, A, b, s2 = make(betas, "beta", jnp.float64)
        closed = jax.jit(lambda x: affine_elbo_terms(d64, x))(jnp.asarray(X0))
        assert closed.denoising_matching.shape == (T - 1,)
        # float64, tiny joint Gaussians: round-off only.
        np.testing.assert_allclose(float(closed.total), g.elbo_route_b(oracle, A, b, s2, X0), rtol=1e-12)
    expected = g.elbo_terms_route_a(oracle, A, b, s2, X0)["total"]
    d, *_ = make(betas, "beta")
    N = 20_000
    x = jnp.asarray(X0, jnp.float32)
    draws = jax.jit(jax.vmap(lambda k: (d.elbo(k, x), d.elbo_consistency_terms(k, x).total)))(
        jax.random.split(jax.random.key(7), N)
    )
    # 4 SE; float32 floor 1e-5 on O(1) terms.
    assert_mc_close(np.asarray(draws[0]), expected, floor=1e-5, what=f"B2, T={T}")
    assert_mc_close(np.asarray(draws[1]), expected, floor=1e-5, what=f"B3, T={T}")


def test_matrix_event_shape_matches_the_flattened_oracle():
    """event_shape (2, 2) with an elementwise affine eps is the D = 4 problem with W_t = w_t I:
    the ELBO must sum over both event axes, and samples must follow the D = 4 marginal."""
    oracle = g.schedule_from_betas(BETAS_T10)
    lib = schedules.from_betas(BETAS_T10)
    rng = np.random.default_rng(8)
    w = 0.5 * rng.standard_normal(11)
    c = 0.3 * rng.standard_normal(11)
    w_j, c_j = jnp.asarray(w, jnp.float32), jnp.asarray(c, jnp.float32)
    d = GaussianDiffusion(lambda x, t: w_j[t] * x + c_j[t], lib, (2, 2))
    D = 4
    W = w[:, None, None] * np.eye(D)
    v = c[:, None] * np.ones(D)
    A, b = g.affine_reverse(oracle, W, v)
    s2 = g.reverse_sigma2(oracle, "beta")
    x0 = np.array([[0.3, -1.0], [0.5, 2.0]])
    expected = g.elbo_terms_route_a(oracle, A, b, s2, x0.reshape(-1))["total"]
    N = 20_000
    draws = jax.jit(jax.vmap(lambda k: d.elbo(k, jnp.asarray(x0, jnp.float32))))(jax.random.split(jax.random.key(9), N))
    assert draws.shape == (N,)
    assert_mc_close(np.asarray(draws), expected, floor=1e-4, what="ELBO, event (2, 2)")
    m0, S0 = g.reverse_marginal(A, b, s2, final_noise=True)
    xs = np.asarray(jax.jit(lambda k: d.sample(k, (N,), final_noise=True))(jax.random.key(10)), np.float64)
    assert xs.shape == (N, 2, 2)
    flat = xs.reshape(N, D)
    assert_mc_close(flat, m0, floor=1e-5, what="mean, event (2, 2)")
    assert_mc_close(covariance_draws(flat), S0, floor=1e-5, what="cov, event (2, 2)")


# ------------------------------------------------------- (viii) inside NumPyro programs
def test_log_density_of_observed_site_is_the_elbo_with_the_captured_key():
    d0, oracle, A, b, s2 = make(BETAS_T20, "beta")
    x = jnp.asarray(X0, jnp.float32)

    def model(x):
        d = GaussianDiffusion(d0.eps_fn, d0.schedule, (2,))
        numpyro.sample("x", d, obs=x)

    @jax.jit
    def run(key):
        lp, tr = log_density(handlers.seed(model, rng_seed=key), (x,), {}, {})
        fn = tr["x"]["fn"]
        assert isinstance(fn, GaussianDiffusion) and fn.rng_key is not None
        return lp, fn.elbo(fn.rng_key, x)

    values = []
    for seed in (0, 1):
        lp, elbo = run(jax.random.key(seed))
        # The same key path: .elbo with the key the distribution captured (float32, same ops).
        np.testing.assert_allclose(float(lp), float(elbo), rtol=1e-6)
        values.append(float(lp))
    # A different seed gives a different estimate: the key does come from the seed handler.
    assert values[0] != values[1]


def test_log_prob_without_key_raises_and_with_key_is_elbo():
    d, *_ = make(BETAS_T4, "beta")
    with pytest.raises(RuntimeError, match="rng_key"):
        d.log_prob(jnp.asarray(X0, jnp.float32))
    key = jax.random.key(3)
    dk = GaussianDiffusion(d.eps_fn, d.schedule, (2,), rng_key=key)
    lp, elbo = jax.jit(lambda x: (dk.log_prob(x), d.elbo(key, x)))(jnp.asarray(X0, jnp.float32))
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(elbo))  # identical computation


def test_svi_recovers_scale_of_optimal_eps():
    """eps_theta = c eps*: the expected ELBO summed over a data sample is a quadratic in c (mu_theta
    is affine in c and every term is quadratic in mu_theta), so its maximiser c* is exact from
    three oracle evaluations. SVI on the Monte-Carlo ELBO must land on c* (which is near 1)."""
    lib = schedules.from_betas(BETAS_T20)
    oracle = g.schedule_from_betas(BETAS_T20)
    X = np.random.default_rng(0).multivariate_normal(MU, COV, size=256)
    eps_opt = optimal_eps_fn(jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32), lib)

    def model(x):
        c = numpyro.param("c", 0.5)
        d = GaussianDiffusion(lambda x_t, t: c * eps_opt(x_t, t), lib, (2,))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", d, obs=x)

    def guide(x):
        pass

    W, v = g.optimal_eps_affine(MU, COV, oracle)
    s2 = g.reverse_sigma2(oracle, "beta")

    def expected_elbo(c):
        A, b = g.affine_reverse(oracle, c * W, c * v)
        return sum(g.elbo_terms_route_a(oracle, A, b, s2, x)["total"] for x in X)

    f0, f1, f2 = expected_elbo(0.0), expected_elbo(1.0), expected_elbo(2.0)
    curv = (f2 - 2 * f1 + f0) / 2  # f(c) = curv c^2 + lin c + f0
    lin = f1 - f0 - curv
    c_star = -lin / (2 * curv)
    assert curv < 0
    # 256 draws of N(MU, COV): c* differs from 1 only by the sampling noise of the data.
    assert abs(c_star - 1.0) < 0.05

    optim = numpyro.optim.optax_to_numpyro(optax.adam(optax.exponential_decay(0.05, 100, 0.3)))
    svi = SVI(model, guide, optim, Trace_ELBO())
    result = svi.run(jax.random.key(0), 400, jnp.asarray(X, jnp.float32), progress_bar=False)
    c = float(result.params["c"])
    # Tolerance: one stochastic gradient at c* has a standard deviation of about 12 (measured
    # over 200 keys when this test was written) against a curvature 2|curv| ~ 2400, so a single
    # noisy Newton step lands ~0.005 from c*; Adam's momentum and the decayed step size (4e-4 at
    # the end) average further. 0.02 is 4 single-step noise scales.
    assert abs(c - c_star) < 0.02, (c, c_star)


def test_predictive_on_model_gives_shapes():
    d, *_ = make(BETAS_T4, "beta")
    out = Predictive(d.model, num_samples=5)(jax.random.key(0), batch_shape=(3,))
    assert out["x_1:T"].shape == (5, 3, 4, 2)
    assert out["x_0"].shape == (5, 3, 2)
    # The guide too, given data of batch (3,).
    g_out = Predictive(d.guide, num_samples=2)(jax.random.key(2), jnp.zeros((3, 2)))
    assert g_out["x_1:T"].shape == (2, 3, 4, 2)


def test_sample_site_without_obs_draws_from_the_model():
    d0, *_ = make(BETAS_T4, "beta")

    def model():
        d = GaussianDiffusion(d0.eps_fn, d0.schedule, (2,))
        loc = numpyro.sample("loc", dist.Normal(0.0, 1.0))
        x = numpyro.sample("x", d)
        return loc + x

    tr = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace()
    assert tr["x"]["value"].shape == (2,)
    assert np.all(np.isfinite(np.asarray(tr["x"]["value"])))


# ------------------------------------------------------------------- (ix) bad input
def test_bad_inputs_raise_naming_the_parameter():
    d, *_ = make(BETAS_T4, "beta")
    key = jax.random.key(0)
    lib = d.schedule
    with pytest.raises(ValueError, match=r"x_0 must have trailing shape"):
        d.elbo(key, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"x_0"):
        d.elbo_consistency_terms(key, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"x_0"):
        d.model(jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"x_0"):
        d.guide(jnp.zeros((2, 5)))
    x_nan = jnp.zeros((3, 2)).at[1, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"x_0 must be finite.*index \(1, 0\)"):
        d.elbo(key, x_nan)
    x_inf = jnp.zeros((3, 2)).at[2, 1].set(jnp.inf)
    with pytest.raises(ValueError, match=r"x_0 must be finite.*index \(2, 1\)"):
        d.elbo(key, x_inf)
    bad_eps = GaussianDiffusion(lambda x, t: x[..., :1], lib, (2,))
    with pytest.raises(ValueError, match="eps_fn"):
        bad_eps.elbo(key, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="eps_fn"):
        bad_eps.sample(key, (3,))
    with pytest.raises(ValueError, match="variance"):
        GaussianDiffusion(d.eps_fn, lib, (2,), "sigma")
    with pytest.raises(TypeError, match="eps_fn"):
        GaussianDiffusion(None, lib, (2,))
    with pytest.raises(TypeError, match="eps_fn"):
        GaussianDiffusion(jnp.zeros(2), lib, (2,))
    with pytest.raises(TypeError, match="schedule"):
        GaussianDiffusion(d.eps_fn, np.asarray(lib.beta), (2,))
    with pytest.raises(TypeError, match="event_shape"):
        GaussianDiffusion(d.eps_fn, lib, 2)
    with pytest.raises(ValueError, match="event_shape"):
        GaussianDiffusion(d.eps_fn, lib, ())
    with pytest.raises(ValueError, match="chunk_size"):
        GaussianDiffusion(d.eps_fn, lib, (2,), chunk_size=0)


def test_chunked_elbo_matches_unchunked():
    d, *_ = make(BETAS_T20, "beta")
    dc = GaussianDiffusion(d.eps_fn, d.schedule, (2,), chunk_size=3)
    key = jax.random.key(0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 2)), jnp.float32)

    e, e_chunked = jax.jit(lambda k, x: (d.elbo(k, x), dc.elbo(k, x)))(key, x)
    # Same key path (fold_in(key, t) per t), lax.map instead of vmap: float32 round-off only.
    np.testing.assert_allclose(np.asarray(e_chunked), np.asarray(e), rtol=1e-6)
