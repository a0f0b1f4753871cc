"""ULA and MALA as numpyro MCMC kernels, against exact moments and closed-form stationary laws.

Monte-Carlo tolerances use the effective sample size from ``numpyro.diagnostics`` (an
independent estimator of the autocorrelation time): a moment estimate m_hat of E[f] has a
standard error sd(f) / sqrt(ESS(f)), and every check allows 4.5 of those (a two-sided
4.5-sigma band fails by chance with probability 7e-6 per check).
"""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.linalg
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC

from probdiff.infer import MALA, ULA

SIGMA = np.array([[1.0, 0.8], [0.8, 1.0]])  # correlated 2-D Gaussian, eigenvalues 1.8 and 0.2
PREC = np.linalg.inv(SIGMA)
Z_SE = 4.5


def gaussian_potential(z):
    return 0.5 * z @ jnp.asarray(PREC, z.dtype) @ z


A_BANANA, B_BANANA = 1.0, 0.5


def banana_model():
    """x1 ~ N(0, a^2), x2 | x1 ~ N(b (x1^2 - a^2), 1): E = (0, 0), Var x1 = a^2, Var x2 = 1 + 2 b^2 a^4."""
    x1 = numpyro.sample("x1", dist.Normal(0.0, A_BANANA))
    numpyro.sample("x2", dist.Normal(B_BANANA * (x1**2 - A_BANANA**2), 1.0))


def _run(kernel, *, chains=32, warmup=1000, samples=3000, seed=0, init_params=None, extra_fields=()):
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=samples, num_chains=chains,
                chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.key(seed), init_params=init_params, extra_fields=extra_fields)
    return mcmc


def _check_moment(f_chains, exact, what):
    """f_chains: (chains, draws) values of f; assert the mean is within Z_SE standard errors of exact."""
    f = np.asarray(f_chains, np.float64)
    ess = float(effective_sample_size(f))
    se = f.std() / np.sqrt(ess)
    assert abs(f.mean() - exact) < Z_SE * se, f"{what}: {f.mean():.4f} vs {exact:.4f} (SE {se:.4f}, ESS {ess:.0f})"
    return se


def _init(chains, dim=2, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(chains, dim)) * 2.0, jnp.float32)


# ------------------------------------------------------------------------------- ULA
def test_ula_stationary_variance_on_standard_normal():
    """On N(0, 1), ULA is x' = (1 - eta/2) x + sqrt(eta) eps: stationary variance 1 / (1 - eta/4)."""
    eta = 0.5
    mcmc = _run(ULA(potential_fn=lambda z: 0.5 * jnp.sum(z**2), step_size=eta), chains=64,
                warmup=200, samples=4000, init_params=_init(64, 1))
    x = np.asarray(mcmc.get_samples(group_by_chain=True))[..., 0]
    exact = 1.0 / (1.0 - eta / 4.0)  # 1.1429, 14% above p's variance
    se = _check_moment(x**2, exact, "ULA E[x^2]")
    # and the bias is real: the chain's variance is many standard errors away from p's
    assert (np.mean(x**2) - 1.0) > 10 * se


def test_ula_on_correlated_gaussian_matches_the_discrete_lyapunov_solution():
    """x' = A x + sqrt(eta) eps with A = I - eta/2 Sigma^{-1}: stationary V solves V = A V A^T + eta I."""
    eta = 0.2
    a = np.eye(2) - 0.5 * eta * PREC
    v_exact = scipy.linalg.solve_discrete_lyapunov(a, eta * np.eye(2))
    mcmc = _run(ULA(potential_fn=gaussian_potential, step_size=eta), chains=64, warmup=500,
                samples=4000, init_params=_init(64))
    x = np.asarray(mcmc.get_samples(group_by_chain=True), np.float64)
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        _check_moment(x[..., i] * x[..., j], v_exact[i, j], f"ULA E[x{i} x{j}]")
    # the Lyapunov covariance is visibly not Sigma at this eta (so the test can tell them apart)
    assert abs(v_exact[0, 0] - SIGMA[0, 0]) > 0.05


def test_ula_with_small_step_matches_banana_moments():
    """ULA's bias is O(eta); at eta = 0.01 it is far below the Monte-Carlo error of these runs."""
    mcmc = _run(ULA(banana_model, step_size=0.01), chains=64, warmup=2000, samples=6000, seed=3)
    s = mcmc.get_samples(group_by_chain=True)
    x1, x2 = np.asarray(s["x1"], np.float64), np.asarray(s["x2"], np.float64)
    _check_moment(x1, 0.0, "E x1")
    _check_moment(x2, 0.0, "E x2")
    _check_moment(x1**2, A_BANANA**2, "E x1^2")
    _check_moment(x2**2, 1 + 2 * B_BANANA**2 * A_BANANA**4, "E x2^2")


# ------------------------------------------------------------------------------- MALA
def test_mala_on_correlated_gaussian_exact_moments_and_adapted_acceptance():
    mcmc = _run(MALA(potential_fn=gaussian_potential, step_size=1.0), init_params=_init(32),
                extra_fields=("accept_prob", "step_size"))
    x = np.asarray(mcmc.get_samples(group_by_chain=True), np.float64)
    for i in range(2):
        _check_moment(x[..., i], 0.0, f"E x{i}")
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        _check_moment(x[..., i] * x[..., j], SIGMA[i, j], f"E[x{i} x{j}]")
    extra = mcmc.get_extra_fields(group_by_chain=True)
    # dual averaging targets 0.574 during warm-up; the averaged step then gives a rate near it
    # (the mean over 96000 accept probabilities: its noise is < 0.01, the 0.08 allows for the
    # averaged step differing from the last tuned one)
    assert abs(float(np.mean(extra["accept_prob"])) - 0.574) < 0.08
    steps = np.asarray(extra["step_size"])
    assert (np.ptp(steps, axis=1) == 0).all()  # eta is fixed after warm-up


def test_mala_is_exact_where_ula_is_biased():
    """At a step where ULA's variance is 1/(1 - eta/4) = 1.6, MALA still samples N(0, 1)."""
    eta = 1.5
    pot = lambda z: 0.5 * jnp.sum(z**2)  # noqa: E731
    mcmc = _run(MALA(potential_fn=pot, step_size=eta, adapt_step_size=False), chains=64, warmup=100,
                samples=3000, init_params=_init(64, 1))
    x = np.asarray(mcmc.get_samples(group_by_chain=True), np.float64)[..., 0]
    _check_moment(x**2, 1.0, "MALA E[x^2] at a large step")


def test_mala_on_banana_model_with_arviz_diagnostics():
    mcmc = _run(MALA(banana_model), chains=8, warmup=2000, samples=6000, seed=5)
    s = mcmc.get_samples(group_by_chain=True)
    x1, x2 = np.asarray(s["x1"], np.float64), np.asarray(s["x2"], np.float64)
    _check_moment(x1, 0.0, "E x1")
    _check_moment(x2, 0.0, "E x2")
    _check_moment(x1**2, A_BANANA**2, "E x1^2")
    _check_moment(x2**2, 1 + 2 * B_BANANA**2 * A_BANANA**4, "E x2^2")
    idata = az.from_numpyro(mcmc)
    summary = az.summary(idata)
    assert set(summary.index) == {"x1", "x2"}
    assert (summary["r_hat"] < 1.01).all(), summary
    assert (az.ess(idata).to_array().values > 1000).all()


def test_constrained_site_is_sampled_in_unconstrained_space():
    """A LogNormal(0, 0.5) site: E[x] = exp(0.125), and every draw is positive."""
    def model():
        numpyro.sample("scale", dist.LogNormal(0.0, 0.5))

    mcmc = _run(MALA(model), chains=16, warmup=1000, samples=3000, seed=7)
    x = np.asarray(mcmc.get_samples(group_by_chain=True)["scale"], np.float64)
    assert (x > 0).all()
    _check_moment(x, np.exp(0.125), "E scale")


def test_vectorized_and_sequential_chains_agree():
    """The vectorised kernel runs each chain as the sequential one does (same keys).

    Without step-size adaptation, which would amplify float32 rounding differences between the
    vmapped and the plain gradient (~1e-7) into different step sizes.
    """
    kw = dict(num_warmup=50, num_samples=100, num_chains=3, progress_bar=False)
    out = {}
    for method in ("sequential", "vectorized"):
        mcmc = MCMC(MALA(banana_model, step_size=0.5, adapt_step_size=False), chain_method=method, **kw)
        mcmc.run(jax.random.key(11))
        out[method] = mcmc.get_samples(group_by_chain=True)
    for k in ("x1", "x2"):
        np.testing.assert_allclose(out["sequential"][k], out["vectorized"][k], rtol=1e-4, atol=1e-4)


def test_energy_based_model_needs_no_normalising_constant():
    """Adding a constant to U (log Z) changes nothing: the kernels see only grad U and differences of U.

    (A fixed step: float32 rounding of U + 100 is ~1e-5, which dual averaging would amplify.)
    """
    runs = []
    for c in (0.0, 100.0):
        mcmc = MCMC(MALA(potential_fn=lambda z, c=c: gaussian_potential(z) + c, step_size=0.5, adapt_step_size=False),
                    num_warmup=100, num_samples=200, progress_bar=False)
        mcmc.run(jax.random.key(2), init_params=jnp.zeros(2))
        runs.append(np.asarray(mcmc.get_samples()))
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_step_size(bad):
    with pytest.raises(ValueError, match="step_size"):
        MALA(potential_fn=gaussian_potential, step_size=bad)
    with pytest.raises(ValueError, match="step_size"):
        ULA(potential_fn=gaussian_potential, step_size=bad)


def test_discrete_latent_site_is_refused():
    def model():
        k = numpyro.sample("k", dist.Categorical(probs=jnp.array([0.5, 0.5])))
        numpyro.sample("x", dist.Normal(k, 1.0))

    mcmc = MCMC(MALA(model), num_warmup=5, num_samples=5, progress_bar=False)
    with pytest.raises(ValueError, match="'k'.*discrete"):
        mcmc.run(jax.random.key(0))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        MALA()
    with pytest.raises(ValueError, match="exactly one"):
        MALA(banana_model, potential_fn=gaussian_potential)
    with pytest.raises(ValueError, match="target_accept_prob"):
        MALA(banana_model, target_accept_prob=1.2)
    mcmc = MCMC(MALA(potential_fn=gaussian_potential), num_warmup=5, num_samples=5, progress_bar=False)
    with pytest.raises(ValueError, match="init_params"):
        mcmc.run(jax.random.key(0))
    mcmc = MCMC(MALA(potential_fn=lambda z: jnp.sum(jnp.log(z))), num_warmup=5, num_samples=5, progress_bar=False)
    with pytest.raises(ValueError, match="not finite"):
        mcmc.run(jax.random.key(0), init_params=-jnp.ones(2))


# ------------------------------------------------------------------------------- blackjax adapter
blackjax = pytest.importorskip("blackjax")


def test_blackjax_mala_under_numpyro_mcmc_samples_the_banana():
    from probdiff.infer import BlackJAXKernel

    kernel = BlackJAXKernel(lambda logdensity: blackjax.mala(logdensity, 0.2), banana_model)
    mcmc = _run(kernel, chains=8, warmup=500, samples=6000, seed=13)
    s = mcmc.get_samples(group_by_chain=True)
    x1, x2 = np.asarray(s["x1"], np.float64), np.asarray(s["x2"], np.float64)
    _check_moment(x1**2, A_BANANA**2, "E x1^2")
    _check_moment(x2**2, 1 + 2 * B_BANANA**2 * A_BANANA**4, "E x2^2")
    # 8 chains of 6000 correlated draws: R-hat within 2% of 1 (arviz's rank-normalised R-hat)
    assert (az.rhat(az.from_numpyro(mcmc)).to_array().values < 1.02).all()


def test_blackjax_step_size_is_half_of_eta():
    """blackjax's MALA moves x + s grad log p + sqrt(2 s) eps: the same chain law as MALA with eta = 2 s.

    Check through the mean acceptance probability on N(0, I_10) (a function of the chain law
    only): both estimates average 32 x 2000 correlated values, SE < 0.005 each; allowed 0.02.
    """
    from probdiff.infer import BlackJAXKernel

    pot = lambda z: 0.5 * jnp.sum(z**2)  # noqa: E731
    s = 0.4
    rates = []
    for kernel in (MALA(potential_fn=pot, step_size=2 * s, adapt_step_size=False),
                   BlackJAXKernel(lambda lp: blackjax.mala(lp, s), potential_fn=pot)):
        mcmc = _run(kernel, chains=32, warmup=200, samples=2000, init_params=_init(32, 10), extra_fields=("accept_prob",))
        rates.append(float(np.mean(mcmc.get_extra_fields()["accept_prob"])))
    assert abs(rates[0] - rates[1]) < 0.02, rates
    assert 0.2 < rates[0] < 0.95  # a step where acceptance is informative
