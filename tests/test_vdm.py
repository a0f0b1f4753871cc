"""Variational diffusion models (probdiff.vdm): the continuous-time ELBO, its discretisation and
the learned schedule, on Gaussian data x ~ N(MU, diag(V)).

The oracle (numpy, float64, below) is written from the math, per coordinate. With
z = alpha x + sigma eps, alpha^2 = sigmoid(-g), sigma^2 = sigmoid(g), s = SNR = e^{-g}, the
optimal noise prediction is E[eps | z] = sigma (z - alpha MU) / (alpha^2 V + sigma^2), affine in
z, and for a fixed x the residual is r = eps - E[eps | z] = a eps + b with

    a = s V / (1 + s V),   b = -sqrt(s) (x - MU) / (1 + s V),

so E||r||^2 = sum(a^2 + b^2) =: m2(g, x) and E||r||^4 = (sum(a^2 + b^2))^2 + sum(2 a^4 + 4 a^2 b^2).
L_inf = 1/2 int gamma'(t) m2(gamma(t)) dt = 1/2 int_{g0}^{g1} m2(g) dg, and substituting s,
int m2 dg = [F(s)]_{s1}^{s0} with F(s) = sum(log(1 + s V) + 1/(1 + s V) - (x - MU)^2 / (V (1 + s V))).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from helpers import assert_mc_close, mc_mean_se, x64
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.util import log_density
from scipy.integrate import quad
from scipy.special import expit, log_expit
from scipy.stats import norm

from probdiff import GaussianDiffusion, schedules
from probdiff.analytic import affine_elbo_terms, affine_reverse_marginal
from probdiff.nets import MLP
from probdiff.vdm import (
    GammaSchedule,
    LearnedSchedule,
    LinearSchedule,
    VariationalDiffusion,
)

MU = np.array([1.0, -0.5])
V = np.array([1.0, 0.25])
XS = np.array([[0.3, 0.7], [1.5, -0.9], [-0.8, 0.1]])  # three data points in the bulk of N(MU, V)
G0, G1 = -13.3, 5.0
N_SE = 4.5  # standard errors allowed for a Monte-Carlo mean (two-sided false alarm 7e-6)
CURVE_AT = 0.96  # where curved_schedule() turns steep


# ------------------------------------------------------------------ numpy oracle (float64)
def oracle_a_b(g, x):
    s = np.exp(-g)
    return s * V / (1 + s * V), -np.sqrt(s) * (x - MU) / (1 + s * V)


def oracle_m2(g, x):
    """E ||eps - eps*(z_g)||^2 for a fixed x."""
    a, b = oracle_a_b(g, x)
    return np.sum(a * a + b * b, -1)


def oracle_m4(g, x):
    """E ||eps - eps*(z_g)||^4 for a fixed x (independent coordinates, r_d ~ N(b_d, a_d^2))."""
    a, b = oracle_a_b(g, x)
    return np.sum(a * a + b * b, -1) ** 2 + np.sum(2 * a**4 + 4 * a * a * b * b, -1)


def oracle_reconstruction(g0, x):
    """E log N(x; x_hat(z_0), sigma_0^2 I) = -D/2 log(2 pi sigma_0^2) - m2(g0) / (2 alpha_0^2)."""
    return -0.5 * len(x) * np.log(2 * np.pi * expit(g0)) - oracle_m2(g0, x) / (2 * expit(-g0))


def oracle_prior(g1, x):
    """KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) summed: 1/2 sum(sigma^2 + alpha^2 x^2 - 1 - log sigma^2)."""
    return 0.5 * np.sum(expit(g1) + expit(-g1) * x**2 - 1 - log_expit(g1))


def oracle_L_inf(g0, g1, x):
    """1/2 int_{g0}^{g1} m2(g) dg by the antiderivative F in s = e^{-g}."""
    def F(s):
        return np.sum(np.log1p(s * V) + 1 / (1 + s * V) - (x - MU) ** 2 / (V * (1 + s * V)))

    return 0.5 * (F(np.exp(-g0)) - F(np.exp(-g1)))


def oracle_L_T(gammas, x):
    """sum_i 1/2 (e^{g_i - g_{i-1}} - 1) m2(g_i): the expected T-step loss on the grid gammas[0..T]."""
    return sum(0.5 * np.expm1(gammas[i] - gammas[i - 1]) * oracle_m2(gammas[i], x) for i in range(1, len(gammas)))


def oracle_elbo_inf(x, g0=G0, g1=G1):
    return oracle_reconstruction(g0, x) - oracle_prior(g1, x) - oracle_L_inf(g0, g1, x)


def linear_grid(T, g0=G0, g1=G1):
    return g0 + (g1 - g0) * np.arange(T + 1) / T


def oracle_T_step_marginal(gammas, final_noise=True):
    """Mean and variance (per coordinate) of x under the T-step model with the optimal eps.

    z_1 ~ N(0, 1); z_s = (alpha_s/alpha_t)(z_t - c sigma_t eps*(z_t)) + sqrt(c sigma_s^2) xi, c = 1 - e^{g_s - g_t};
    x = (z_0 - sigma_0 eps*(z_0)) / alpha_0 (+ sigma_0 xi). With eps* = w z + u all steps are affine.
    """
    m, S = np.zeros_like(MU), np.ones_like(MU)

    def affine_eps(g):
        al, si = np.sqrt(expit(-g)), np.sqrt(expit(g))
        C = al**2 * V + si**2
        return al, si, si / C, -si * al * MU / C

    for i in range(len(gammas) - 1, 0, -1):
        a_t, s_t, w, u = affine_eps(gammas[i])
        a_s, s_s = np.sqrt(expit(-gammas[i - 1])), np.sqrt(expit(gammas[i - 1]))
        c = -np.expm1(gammas[i - 1] - gammas[i])
        A = (a_s / a_t) * (1 - c * s_t * w)
        b = -(a_s / a_t) * c * s_t * u
        m, S = A * m + b, A * A * S + c * s_s**2
    a0, s0, w, u = affine_eps(gammas[0])
    A0, b0 = (1 - s0 * w) / a0, -s0 * u / a0
    return A0 * m + b0, A0 * A0 * S + (s0**2 if final_noise else 0.0)


# ---------------------------------------------------------------- library-side helpers
def optimal_eps(z, g):
    """E[eps | z_g] for x ~ N(MU, diag V), a function of (z, gamma) as VariationalDiffusion wants."""
    g = jnp.asarray(g)[..., None]
    a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
    mu, v = jnp.asarray(MU, z.dtype), jnp.asarray(V, z.dtype)
    return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * mu) / (a2 * v + s2)


def inv_softplus(y):
    return np.log(np.expm1(y))


def curved_schedule():
    """A LearnedSchedule with endpoints G0, G1 and one steep sigmoid unit at t = 0.96: gamma rises
    evenly to about 0 at t = 0.9 and then quickly to 5, close to the variance-optimal shape for this data
    (gamma' proportional to E||r||^4^(-1/2)); its estimator variance is ~2/3 of the linear one's."""
    s = LearnedSchedule(jax.random.key(0), G0, G1, hidden=1)
    d = 60.0
    return eqx.tree_at(
        lambda m: (m.c_raw, m.d_raw, m.e),
        s,
        tuple(jnp.asarray(np.full(1, v), s.e.dtype) for v in (inv_softplus(0.3), inv_softplus(d), -d * CURVE_AT)),
    )


class TinyNet(eqx.Module):
    """A small nonlinear eps-network of (z, gamma): tanh(W z + u gamma / 10) + b (cheap to compile)."""

    W: jax.Array
    u: jax.Array
    b: jax.Array

    def __init__(self, seed):
        rng = np.random.default_rng(seed)  # numpy draws: building it compiles nothing
        dtype = jnp.result_type(float)
        self.W = jnp.asarray(0.5 * rng.standard_normal((2, 2)), dtype)
        self.u = jnp.asarray(rng.standard_normal(2), dtype)
        self.b = jnp.asarray(0.1 * rng.standard_normal(2), dtype)

    def __call__(self, z, g):
        return jnp.tanh(z @ self.W.T + self.u * jnp.asarray(g)[..., None] / 10) + self.b


# Module-level jitted helpers, so that tests share their compilations (one per schedule type/dtype).
_gamma_and_prime = jax.jit(lambda s, t: s.gamma_and_prime(t))
_discretize = jax.jit(lambda s, T: s.discretize(T), static_argnums=1)


def perturbed(module, seed, scale=0.3):
    """Every float array of an Equinox module plus scale * N(0, 1) noise (numpy draws, no compile)."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten(module)
    out = [
        jnp.asarray(np.asarray(leaf) + scale * rng.standard_normal(leaf.shape), leaf.dtype)
        if eqx.is_inexact_array(leaf) else leaf
        for leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(tree, out)


def quad_moments(schedule, x):
    """(E L, E L^2) of the one-sample diffusion loss L = 1/2 gamma'(t) ||r||^2 by scipy quadrature
    over t, with the library's gamma(t), gamma'(t) (float64; call inside x64)."""
    def gp(t):
        g, d = _gamma_and_prime(schedule, jnp.float64(t))
        return float(g), float(d)

    kw = dict(limit=400, epsabs=1e-11, epsrel=1e-11, points=[CURVE_AT])
    m1 = quad(lambda t: 0.5 * gp(t)[1] * oracle_m2(gp(t)[0], x), 0.0, 1.0, **kw)[0]
    m2 = quad(lambda t: 0.25 * gp(t)[1] ** 2 * oracle_m4(gp(t)[0], x), 0.0, 1.0, **kw)[0]
    return m1, m2


# ------------------------------------------------------------------------------ schedules
def test_linear_schedule_against_its_formulas():
    s = LinearSchedule()
    t = np.linspace(0.0, 1.0, 11)
    g = G0 + (G1 - G0) * t
    gamma, gamma_prime, (alpha, sigma), snr = jax.jit(
        lambda s, t: (s.gamma(t), s.gamma_prime(t), s.alpha_sigma(t), s.snr(t)))(s, jnp.asarray(t, jnp.float32))
    # float32 evaluation of an O(10) affine function: absolute 1e-5.
    np.testing.assert_allclose(np.asarray(gamma), g, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gamma_prime), G1 - G0, rtol=1e-6)
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    np.testing.assert_allclose(alpha**2, expit(-g), rtol=1e-5)
    np.testing.assert_allclose(sigma**2, expit(g), rtol=1e-5)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(snr), np.exp(-g), rtol=2e-5)  # exp of a 1e-5 error


def test_learned_schedule_is_monotone_for_any_parameters():
    """Raw parameters drawn with scale 3 (any sign, including gap_raw < 0): gamma(0) = gamma_0,
    gamma(1) = gamma_1 > gamma_0, gamma strictly increasing on a fine grid, and the closed-form
    gamma'(t) equals jax.grad of gamma(t) and a central difference of it."""
    t = np.linspace(0.0, 1.0, 401)
    h = 1e-5

    @jax.jit
    def evaluate(s, t):
        g, dg = s.gamma_and_prime(t)
        autodiff = jax.vmap(jax.grad(lambda u: s.gamma_and_prime(u)[0]))(t)
        inner = t[1:-1]
        central = (s.gamma_and_prime(inner + h)[0] - s.gamma_and_prime(inner - h)[0]) / (2 * h)
        return g, dg, autodiff, central, jnp.stack(s.endpoints())

    with x64():
        for seed in range(5):
            s = perturbed(LearnedSchedule(jax.random.key(seed), hidden=4), 100 + seed, scale=3.0)
            g, dg, autodiff, central, (g0, g1) = (np.asarray(a) for a in evaluate(s, jnp.asarray(t)))
            assert g1 > g0
            # h(0) = 0 and h(1) = 1 are exact up to float64 round-off of the normalisation.
            np.testing.assert_allclose([g[0], g[-1]], [g0, g1], rtol=1e-12, atol=1e-12)
            assert np.all(np.diff(g) > 0), seed
            assert np.all(dg > 0), seed
            np.testing.assert_allclose(dg, autodiff, rtol=1e-10)  # two float64 routes to one derivative
            # central difference: O(h^2) truncation plus eps64 |gamma| / h round-off
            np.testing.assert_allclose(dg[1:-1], central, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [LinearSchedule, curved_schedule], ids=["linear", "curved"])
def test_discretize_gives_alpha_bar_from_gamma(make):
    T = 50
    with x64():
        s = make()
        sched = _discretize(s, T)
        assert sched.num_steps == T + 1 and sched.dtype == jnp.float64
        i = np.arange(T + 1)
        g = np.asarray(_gamma_and_prime(s, jnp.asarray(i / T))[0])
        # alpha_bar_{i+1} = sigmoid(-gamma(i/T)); beta_1 = sigma_0^2 to full relative precision.
        np.testing.assert_allclose(np.asarray(sched.alpha_bar[1:]), expit(-g), rtol=1e-12)
        np.testing.assert_allclose(float(sched.beta[1]), expit(G0), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(sched.one_minus_alpha_bar[1:]), expit(g), rtol=1e-12)
        assert float(sched.alpha_bar[0]) == 1.0


# ------------------------------------------------- the continuous ELBO against quadrature
@pytest.fixture(scope="module")
def mc_terms():
    """20000 independent draws of elbo_terms at XS for the linear and the curved schedule (float32,
    antithetic_time=False so that draws of one example are i.i.d.)."""
    x = jnp.asarray(XS, jnp.float32)
    out = {}
    for name, schedule in (("linear", LinearSchedule()), ("curved", curved_schedule())):
        d = VariationalDiffusion(optimal_eps, schedule, (2,), antithetic_time=False)
        terms = jax.jit(jax.vmap(lambda k, d=d: d.elbo_terms(k, x)))(jax.random.split(jax.random.key(1), 20_000))
        out[name] = {f: np.asarray(getattr(terms, f), np.float64) for f in terms._fields}
    return out


@pytest.mark.parametrize("name", ["linear", "curved"])
def test_elbo_monte_carlo_matches_quadrature(mc_terms, name):
    draws = mc_terms[name]
    with x64():
        schedule = LinearSchedule() if name == "linear" else curved_schedule()
        quad_L = np.array([quad_moments(schedule, x)[0] for x in XS])
    # The quadrature over t (with the library's gamma, gamma') and the closed form in gamma agree:
    # both in float64, quad's tolerance 1e-11.
    np.testing.assert_allclose(quad_L, [oracle_L_inf(G0, G1, x) for x in XS], rtol=1e-9)
    assert_mc_close(draws["diffusion"], quad_L, n_se=N_SE, what=f"L_inf, {name}")
    # reconstruction: the float32 eps - eps_hat at gamma_0 (eps_hat within 1e-6 of eps) divided by
    # alpha_0^2 ~ 1: absolute 1e-5 per draw on top of the Monte-Carlo error.
    assert_mc_close(draws["reconstruction"], [oracle_reconstruction(G0, x) for x in XS], n_se=N_SE, floor=1e-5,
                    what="reconstruction")
    # prior matching is exact: float32 arithmetic on O(1e-2) terms.
    np.testing.assert_allclose(draws["prior_matching"][0], [oracle_prior(G1, x) for x in XS], rtol=1e-4, atol=1e-7)
    total = draws["reconstruction"] - draws["prior_matching"] - draws["diffusion"]
    assert_mc_close(total, [oracle_elbo_inf(x) for x in XS], n_se=N_SE, floor=1e-5, what="ELBO")


def test_expected_loss_is_invariant_to_the_schedule_interior_but_its_variance_is_not(mc_terms):
    """Same endpoints: E[L] is the same (quadrature over t of two different gamma(t)); Var[L] by
    quadrature differs, and the Monte-Carlo variances of the library's estimates match each."""
    with x64():
        lin = [quad_moments(LinearSchedule(), x) for x in XS]
        cur = [quad_moments(curved_schedule(), x) for x in XS]
    for (m_lin, _), (m_cur, _), x in zip(lin, cur, XS, strict=True):
        np.testing.assert_allclose(m_cur, m_lin, rtol=1e-9)  # quad tolerance 1e-11
        np.testing.assert_allclose(m_lin, oracle_L_inf(G0, G1, x), rtol=1e-9)
    var_lin = np.array([m2 - m1**2 for m1, m2 in lin])
    var_cur = np.array([m2 - m1**2 for m1, m2 in cur])
    # quadrature: 293.2, 259.8, 268.7 (linear) against 196.4, 174.7, 190.3 (curved), ratios 0.67-0.71;
    # Monte Carlo (20000 draws): 299 +- 6, 267 +- 6, 270 +- 6 against 195 +- 4, 182 +- 4, 193 +- 4
    assert np.all(var_cur < 0.75 * var_lin), (var_lin, var_cur)
    mc = {}
    for name, exact in (("linear", var_lin), ("curved", var_cur)):
        L = mc_terms[name]["diffusion"]
        dev2 = (L - L.mean(0)) ** 2  # its mean is the sample variance, its spread gives the SE
        assert_mc_close(dev2, exact, n_se=N_SE, what=f"Var L, {name}")
        mc[name] = mc_mean_se(dev2)
    (v_lin, se_lin), (v_cur, se_cur) = mc["linear"], mc["curved"]
    assert np.all(v_lin - v_cur > N_SE * np.hypot(se_lin, se_cur)), (v_lin, v_cur)


# --------------------------------------------------------- L_T -> L_inf, and the B2 identity
def test_discrete_elbo_approaches_the_continuous_one_as_one_over_T():
    """Expected L_T - L_inf (closed-form sums, float64) is positive, halves when T doubles, and the
    library's discretised GaussianDiffusion has exactly the closed-form ELBO_T (affine_elbo_terms)."""
    Ts = (100, 200, 400, 800)
    for x in XS:
        gaps = np.array([oracle_L_T(linear_grid(T), x) - oracle_L_inf(G0, G1, x) for T in Ts])
        assert np.all(gaps > 0) and np.all(np.diff(gaps) < 0)
        ratios = gaps[:-1] / gaps[1:]
        # first order; measured 2.06, 2.03, 2.015 at x = (0.3, 0.7): the O(1/T^2) part fades
        np.testing.assert_allclose(ratios, 2.0, rtol=0.05)
        assert np.all(np.diff(np.abs(ratios - 2.0)) < 0)
    with x64():
        s = LinearSchedule()
        x = jnp.asarray(XS)
        T = 200
        gd = GaussianDiffusion(lambda z, i: optimal_eps(z, s.gamma((i - 1) / T)), _discretize(s, T), (2,), "beta_tilde")
        got = np.asarray(jax.jit(lambda x: affine_elbo_terms(gd, x).total)(x))
        expected = [oracle_reconstruction(G0, xi) - oracle_prior(G1, xi) - oracle_L_T(linear_grid(T), xi) for xi in XS]
        # float64; the KLs of steps with tiny beta cancel to ~1e-16 / beta relative: 1e-8.
        np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_discrete_elbo_is_the_discretised_gaussian_diffusion_with_the_same_noise():
    """discrete_elbo_terms(key, x, T) and GaussianDiffusion(eps(., gamma((i-1)/T)), discretize(T),
    variance="beta_tilde").elbo_terms(key, x) draw the same noise: equal number for number, for the
    nonlinear network and the curved schedule (the identity holds for any eps_fn and schedule; the
    optimal eps on the linear schedule is checked in expectation by the 1/T test above)."""
    T = 8
    with x64():
        x = jnp.asarray(XS)
        eps_fn, schedule = TinyNet(3), curved_schedule()
        vdm = VariationalDiffusion(eps_fn, schedule, (2,))
        gd = GaussianDiffusion(lambda z, i: eps_fn(z, schedule.gamma((i - 1) / T)), _discretize(schedule, T), (2,),
                               "beta_tilde")
        a, b = jax.jit(lambda k, x: (vdm.discrete_elbo_terms(k, x, T), gd.elbo_terms(k, x)))(jax.random.key(5), x)
        # float64: alpha_bar reaches the two models by different routes (sigmoid vs cumsum of
        # log1p), 1e-15 relative, amplified by 1/beta_1 ~ 6e5 in the decoder: 1e-9.
        np.testing.assert_allclose(np.asarray(a.reconstruction), np.asarray(b.reconstruction), rtol=1e-9)
        np.testing.assert_allclose(np.asarray(a.prior_matching), np.asarray(b.prior_matching), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(a.diffusion), np.asarray(b.denoising_matching.sum(-1)), rtol=1e-9)
        assert a.diffusion.dtype == jnp.float64


def test_elbo_is_below_the_exact_log_likelihood():
    """Per example, E ELBO_T(x) <= log p_T(x), the exact marginal of the T-step model (a linear-
    Gaussian chain, numpy recursion), and E ELBO_T increases with T toward E ELBO_inf; averaged
    over the data, E ELBO_inf <= E log N(x; MU, V) (closed forms; the library's ELBO has the closed
    form's mean by test_elbo_monte_carlo_matches_quadrature)."""
    for x in XS:
        elbos, log_ps = [], []
        for T in (10, 100, 1000):
            gammas = linear_grid(T)
            m, S = oracle_T_step_marginal(gammas)
            log_ps.append(norm.logpdf(x, m, np.sqrt(S)).sum())
            elbos.append(oracle_reconstruction(G0, x) - oracle_prior(G1, x) - oracle_L_T(gammas, x))
        gaps = np.array(log_ps) - np.array(elbos)
        assert np.all(gaps > 1e-4), gaps  # the gap is KL(q(z|x) || p(z|x)) > 0; float64 sums ~1e-12
        assert np.all(np.diff(elbos) > 0) and elbos[-1] < oracle_elbo_inf(x)
    # The library's T-step chain has the oracle's marginal (GaussianDiffusion on discretize(T)).
    with x64():
        s = LinearSchedule()
        T = 100
        gd = GaussianDiffusion(lambda z, i: optimal_eps(z, s.gamma((i - 1) / T)), _discretize(s, T), (2,),
                               "beta_tilde")
        marg = jax.jit(lambda: affine_reverse_marginal(gd))()
        m, S = oracle_T_step_marginal(linear_grid(T))
        np.testing.assert_allclose(np.asarray(marg.loc), m, rtol=1e-9)  # float64 recursions
        np.testing.assert_allclose(np.asarray(marg.covariance_matrix), np.diag(S), rtol=1e-9, atol=1e-12)
    # Averaged over x ~ N(MU, V): E (x - MU)^2 = V and E x^2 = MU^2 + V enter linearly.
    r2, x2 = V, MU**2 + V
    s0, s1 = np.exp(-G0), np.exp(-G1)
    recon = -np.log(2 * np.pi * expit(G0)) - np.sum(((s0 * V) ** 2 + s0 * r2) / (1 + s0 * V) ** 2) / (2 * expit(-G0))
    prior = 0.5 * np.sum(expit(G1) + expit(-G1) * x2 - 1 - log_expit(G1))

    def F(s):
        return np.sum(np.log1p(s * V) + 1 / (1 + s * V) - r2 / (V * (1 + s * V)))

    elbo_avg = recon - prior - 0.5 * (F(s0) - F(s1))
    entropy_bound = -0.5 * np.sum(np.log(2 * np.pi * np.e * V))
    assert elbo_avg < entropy_bound - 1e-3  # measured gap 0.0042 nats


def test_sample_follows_the_T_step_chain():
    """Ancestral samples (T = 20, optimal eps): mean and variance per coordinate against the oracle's
    linear-Gaussian recursion, within 4.5 SE."""
    T, N = 20, 40_000
    d = VariationalDiffusion(optimal_eps, LinearSchedule(), (2,))
    xs, xf = jax.jit(lambda k: (d.sample(k, (N,), num_steps=T), d.sample(k, (3,), num_steps=T, final_noise=True)))(
        jax.random.key(8))
    xs = np.asarray(xs, np.float64)
    assert xs.shape == (N, 2) and xf.shape == (3, 2) and np.all(np.isfinite(np.asarray(xf)))
    m, S = oracle_T_step_marginal(linear_grid(T), final_noise=False)
    # float32 chain of 20 affine steps: 1e-5 absolute on O(1) moments.
    assert_mc_close(xs, m, n_se=N_SE, floor=1e-5, what="sample mean")
    assert_mc_close((xs - xs.mean(0)) ** 2, S, n_se=N_SE, floor=1e-5, what="sample variance")


# --------------------------------------------------------------- the variance gradient
def _split_schedule_grad(g):
    """(endpoint fields, interior fields) of a LearnedSchedule-shaped gradient, as float64 arrays."""
    ends = [np.asarray(g.gamma_0), np.asarray(g.gap_raw)]
    interior = [np.asarray(a) for a in (g.a_raw, g.c_raw, g.d_raw, g.e)]
    return ends, interior


def test_variance_gradient_is_the_gradient_of_the_summed_squared_loss():
    """With schedule_gradient="variance" the gradient of -sum_i ELBO_i reaching the interior
    h = (a_raw, c_raw, d_raw, e) is exactly jax.grad of sum_i L_i^2 (the factor: c = 2 L_i and
    L_i enters -ELBO with +1); the network and the endpoints get exactly the ELBO gradient; the
    value is unchanged."""
    with x64():
        net = TinyNet(10)
        sched = perturbed(LearnedSchedule(jax.random.key(12), hidden=3), 13)
        x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 2)))
        key = jax.random.key(14)

        def neg_elbo(mode):
            return lambda n, s: -jnp.sum(VariationalDiffusion(n, s, (2,), schedule_gradient=mode).elbo(key, x))

        def sum_sq(n, s):
            return jnp.sum(VariationalDiffusion(n, s, (2,), schedule_gradient="elbo").elbo_terms(key, x).diffusion ** 2)

        @jax.jit
        def all_gradients(n, s):
            return (jax.value_and_grad(neg_elbo("variance"), argnums=(0, 1))(n, s),
                    jax.value_and_grad(neg_elbo("elbo"), argnums=(0, 1))(n, s),
                    jax.grad(sum_sq, argnums=1)(n, s))

        (v_var, (gn_var, gs_var)), (v_elbo, (gn_elbo, gs_elbo)), gs_sq = all_gradients(net, sched)
    np.testing.assert_allclose(float(v_var), float(v_elbo), rtol=1e-14)
    for a, b in zip(jax.tree_util.tree_leaves(gn_var), jax.tree_util.tree_leaves(gn_elbo), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    ends_var, int_var = _split_schedule_grad(gs_var)
    ends_elbo, int_elbo = _split_schedule_grad(gs_elbo)
    _, int_sq = _split_schedule_grad(gs_sq)
    for a, b in zip(ends_var, ends_elbo, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # Different graphs (scaled tangents vs d(L^2) = 2 L dL): float64 round-off, 1e-10.
    for a, b in zip(int_var, int_sq, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # ... and it is not the ELBO gradient (which it would be with a factor 1).
    assert not np.allclose(np.concatenate([a.ravel() for a in int_var]),
                           np.concatenate([a.ravel() for a in int_elbo]), rtol=0.1)


def test_variance_gradient_is_unbiased_and_lowers_the_variance():
    """Optimal eps, a learned schedule with a random interior, one x: the Monte-Carlo mean of the
    surrogate gradient on the interior equals d E[L^2] / d theta_h computed by Gauss-Legendre
    quadrature (E[L^2] = 1/4 int gamma'(t)^2 E||r||^4 dt, oracle_m4 in jnp), while d E[L] / d theta_h
    is 0 (invariance); a step against the surrogate gradient lowers the exact variance."""
    x_np = XS[0]
    nodes, weights = np.polynomial.legendre.leggauss(400)
    N = 20_000
    with x64():
        sched = perturbed(LearnedSchedule(jax.random.key(20), hidden=2), 21, scale=0.5)
        x = jnp.asarray(x_np)
        tq, wq = jnp.asarray((nodes + 1) / 2), jnp.asarray(weights / 2)

        def residual_moments(g):  # E||r||^2 and E||r||^4 at gamma g for this x (the oracle, in jnp)
            s = jnp.exp(-g)[..., None]
            a = s * V / (1 + s * V)
            b = -jnp.sqrt(s) * (x_np - MU) / (1 + s * V)
            m2 = jnp.sum(a * a + b * b, -1)
            return m2, m2**2 + jnp.sum(2 * a**4 + 4 * a * a * b * b, -1)

        def moments(s):
            g, dg = s.gamma_and_prime(tq)
            m2, m4 = residual_moments(g)
            return jnp.sum(wq * 0.5 * dg * m2), jnp.sum(wq * 0.25 * dg**2 * m4)

        def interior_grad(mode):
            def f(k):
                loss = lambda s: VariationalDiffusion(optimal_eps, s, (2,), schedule_gradient=mode).elbo_terms(k, x).diffusion
                return _interior_leaves(jax.grad(loss)(sched))
            return f

        @jax.jit
        def run(s, keys):
            exact_first = _interior_leaves(jax.grad(lambda s: moments(s)[0])(s))
            exact_second = _interior_leaves(jax.grad(lambda s: moments(s)[1])(s))
            return exact_first, exact_second, jax.vmap(interior_grad("variance"))(keys)

        exact_first, exact, g_var = (np.asarray(a, np.float64) for a in run(sched, jax.random.split(jax.random.key(22), N)))
        # invariance at the level of gradients: d E[L] / d theta_h = 0 (quadrature, float64); the
        # second moment's gradient is O(100)
        assert np.max(np.abs(exact_first)) < 1e-8 * np.max(np.abs(exact)), (exact_first, exact)
        assert_mc_close(g_var, exact, n_se=N_SE, what="variance gradient")
        mean, se = mc_mean_se(g_var)
        assert np.max(np.abs(exact) / se) > 10  # the test has power: the gradient is far from 0
        variance = jax.jit(lambda s: moments(s)[1] - moments(s)[0] ** 2)
        v0 = float(variance(sched))
        v1 = float(variance(_step_interior(sched, -0.05 * mean / np.max(np.abs(mean)))))
        assert v1 < v0, (v0, v1)


def _interior_leaves(g):
    return jnp.concatenate([jnp.ravel(a) for a in (g.a_raw, g.c_raw, g.d_raw, g.e)])


def _step_interior(s, delta):
    sizes = [a.size for a in (s.a_raw, s.c_raw, s.d_raw, s.e)]
    parts = np.split(np.asarray(delta), np.cumsum(sizes)[:-1])
    return eqx.tree_at(
        lambda m: (m.a_raw, m.c_raw, m.d_raw, m.e),
        s,
        tuple(a + jnp.asarray(p).reshape(a.shape) for a, p in zip((s.a_raw, s.c_raw, s.d_raw, s.e), parts,
                                                                    strict=True)),
    )


# ------------------------------------------------------------------- inside NumPyro programs
def test_inside_numpyro_log_prob_takes_the_seed_handlers_key_and_trace_elbo_is_minus_the_elbo():
    """log_prob without a key raises; inside a seeded model the observed site scores the ELBO with
    the key it captured (a fixed key is used as given); Trace_ELBO on that model and an empty guide,
    averaged over 20000 seeds, equals minus the closed-form ELBO summed over the data (4.5 SE)."""
    x = jnp.asarray(XS, jnp.float32)
    with pytest.raises(RuntimeError, match="rng_key"):
        VariationalDiffusion(optimal_eps, LinearSchedule(), (2,)).log_prob(x)

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", VariationalDiffusion(optimal_eps, LinearSchedule(), (2,)), obs=x)

    def guide(x):
        pass

    def one(key):
        lp, tr = log_density(handlers.seed(model, rng_seed=key), (x,), {}, {})
        fn = tr["x"]["fn"].base_dist  # the plate expanded the distribution
        fixed = VariationalDiffusion(optimal_eps, LinearSchedule(), (2,), rng_key=key)
        return (lp, jnp.sum(fn.elbo(fn.rng_key, x)), jnp.sum(fixed.log_prob(x)), jnp.sum(fixed.elbo(key, x)),
                Trace_ELBO().loss(key, {}, model, guide, x))

    lp, elbo, lp_fixed, elbo_fixed, loss = (np.asarray(a, np.float64) for a in
                                            jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(4), 20_000)))
    np.testing.assert_allclose(lp, elbo, rtol=1e-6)  # the same computation with the captured key
    np.testing.assert_allclose(lp_fixed, elbo_fixed, rtol=1e-6)
    assert np.unique(lp).size > 19_000  # a fresh key from the seed handler each time
    assert_mc_close(-loss, sum(oracle_elbo_inf(xi) for xi in XS), n_se=N_SE, floor=3e-5, what="-Trace_ELBO loss")


@pytest.mark.slow
def test_svi_trains_network_and_schedule_and_the_schedule_lowers_the_variance():
    """A small MLP and a LearnedSchedule trained together by SVI (eqx_module, Trace_ELBO, svi.run)
    on 2-D Gaussian data: the held-out ELBO improves, and at the trained network the learned
    schedule's diffusion-loss estimator has lower variance than the linear schedule with the same
    endpoints, while both have the same mean (invariance)."""
    from numpyro.contrib.module import eqx_module

    rng = np.random.default_rng(0)
    data = jnp.asarray(MU + np.sqrt(V) * rng.standard_normal((512, 2)), jnp.float32)
    test = jnp.asarray(MU + np.sqrt(V) * rng.standard_normal((4096, 2)), jnp.float32)
    net0 = MLP(2, jax.random.key(1), hidden=(32, 32), time_dim=16)
    sched0 = LearnedSchedule(jax.random.key(2), hidden=8)

    def model(x):
        net = eqx_module("eps_net", net0)
        sched = eqx_module("schedule", sched0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", VariationalDiffusion(net, sched, (2,)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(3e-3), Trace_ELBO())
    result = svi.run(jax.random.key(3), 1500, data, progress_bar=False)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    net = eqx.combine(result.params["eps_net$params"], eqx.partition(net0, eqx.is_inexact_array)[1])
    sched = eqx.combine(result.params["schedule$params"], eqx.partition(sched0, eqx.is_inexact_array)[1])
    g0, g1 = (float(g) for g in sched.endpoints())

    # Networks and schedules go into jit as arguments, never as closed-over constants: jaxlib 0.10.2's
    # CPU backend miscompiles some dots with a closed-over all-equal array (such as the untrained
    # MLP's zero last layer) into garbage.
    @jax.jit
    def held_out(net, sched, key):
        d = VariationalDiffusion(net, sched, (2,), antithetic_time=False)
        return jax.vmap(lambda k: d.elbo_terms(k, test))(jax.random.split(key, 8))

    before = held_out(net0, sched0, jax.random.key(4))
    after = held_out(net, sched, jax.random.key(4))
    elbo_before = np.asarray(before.total, np.float64).ravel()
    elbo_after = np.asarray(after.total, np.float64).ravel()
    (m0, se0), (m1, se1) = mc_mean_se(elbo_before), mc_mean_se(elbo_after)
    assert m1 - m0 > N_SE * np.hypot(se0, se1), (m0, m1)
    L_learned = np.asarray(after.diffusion, np.float64).ravel()
    L_linear = np.asarray(held_out(net, LinearSchedule(g0, g1), jax.random.key(4)).diffusion, np.float64).ravel()
    (ml, sel), (mlin, selin) = mc_mean_se(L_learned), mc_mean_se(L_linear)
    assert abs(ml - mlin) < N_SE * np.hypot(sel, selin)  # same network, same endpoints: same E[L]
    v_learned, se_v_learned = mc_mean_se((L_learned - ml) ** 2)
    v_linear, se_v_linear = mc_mean_se((L_linear - mlin) ** 2)
    assert v_linear - v_learned > N_SE * np.hypot(se_v_learned, se_v_linear), (v_learned, v_linear)
    # measured: variance 183 (learned) against 256 (linear), ratio 0.71
    assert v_learned / v_linear < 0.85


# -------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_naming_the_parameter():
    s = LinearSchedule()
    d = VariationalDiffusion(optimal_eps, s, (2,))
    key = jax.random.key(0)
    x = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\].*got t = 1.5"):
        s.gamma(1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        curved_schedule().gamma_prime(jnp.array([0.5, -0.1]))
    with pytest.raises(ValueError, match="gamma_min must be below gamma_max"):
        LinearSchedule(5.0, 5.0)
    with pytest.raises(ValueError, match="gamma_min must be below gamma_max"):
        LearnedSchedule(key, 1.0, -1.0)
    with pytest.raises(ValueError, match="must be finite"):
        LinearSchedule(-np.inf, 5.0)
    with pytest.raises(ValueError, match="hidden must be an integer K >= 1"):
        LearnedSchedule(key, hidden=0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_steps must be an integer T >= 1"):
            s.discretize(bad)
        with pytest.raises(ValueError, match="num_steps must be an integer T >= 1"):
            d.discrete_elbo(key, x, bad)
        with pytest.raises(ValueError, match="num_steps must be an integer T >= 1"):
            d.sample(key, (2,), num_steps=bad)
    with pytest.raises(ValueError, match=r"x must have trailing shape event_shape = \(2,\)"):
        d.elbo(key, jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"x must be finite.*index \(1, 0\)"):
        d.elbo(key, jnp.asarray(np.where(np.arange(6).reshape(3, 2) == 2, np.nan, 0.0)))
    with pytest.raises(ValueError, match=r"x must be finite"):
        d.discrete_elbo(key, jnp.asarray(np.where(np.arange(6).reshape(3, 2) == 5, np.inf, 0.0)), 4)
    with pytest.raises(ValueError, match="schedule_gradient must be one of"):
        VariationalDiffusion(optimal_eps, s, (2,), schedule_gradient="none")
    with pytest.raises(TypeError, match="schedule must be a probdiff.vdm.GammaSchedule"):
        VariationalDiffusion(optimal_eps, schedules.linear(10), (2,))
    with pytest.raises(TypeError, match="eps_fn"):
        VariationalDiffusion(None, s, (2,))
    with pytest.raises(ValueError, match="event_shape"):
        VariationalDiffusion(optimal_eps, s, ())
    with pytest.raises(ValueError, match="eps_fn must return an array with the shape of x_t"):
        jax.eval_shape(VariationalDiffusion(lambda z, g: z[..., :1], s, (2,)).elbo, key, x)
    swapped = eqx.tree_at(lambda m: (m.gamma_min, m.gamma_max), s, (jnp.float32(5.0), jnp.float32(-13.3)))
    with pytest.raises(ValueError, match="gamma_0 < gamma_1"):
        VariationalDiffusion(optimal_eps, swapped, (2,))
    assert isinstance(s, GammaSchedule)


# -------------------------------------------------------------- transformations, float64
def test_jit_vmap_forward_mode_and_float64():
    """jit and vmap go through elbo (grad is exercised by the variance-gradient tests); forward mode
    goes through the variance surrogate, scaling the interior's tangents by c; float64 throughout
    under x64."""
    keys = jax.random.split(jax.random.key(33), 4)
    # forward mode: with grad_scale c the tangent of (gamma, gamma') along the interior is c times
    # the plain one, and the endpoints' tangent is untouched.
    sched = LearnedSchedule(jax.random.key(34), hidden=2)
    t = jnp.linspace(0.0, 1.0, 5)
    c = jnp.arange(1.0, 6.0)
    zeros = jax.tree_util.tree_map(lambda a: jnp.asarray(np.zeros(a.shape), a.dtype), sched)
    fields_h = lambda m: (m.a_raw, m.c_raw, m.d_raw, m.e)
    interior = eqx.tree_at(fields_h, zeros, tuple(jnp.asarray(np.ones(a.shape), a.dtype) for a in fields_h(sched)))
    ends = eqx.tree_at(lambda m: (m.gamma_0, m.gap_raw), zeros, (jnp.asarray(1.0), jnp.asarray(1.0)))

    @jax.jit
    def tangents(sched, direction):
        plain = jax.jvp(lambda s: s.gamma_and_prime(t), (sched,), (direction,))[1]
        scaled = jax.jvp(lambda s: s.gamma_and_prime(t, grad_scale=c), (sched,), (direction,))[1]
        return plain, scaled

    (pg, pd), (sg, sd) = tangents(sched, interior)
    np.testing.assert_allclose(np.asarray(sg), np.asarray(c * pg), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sd), np.asarray(c * pd), rtol=1e-6, atol=1e-6)
    (pg, pd), (sg, sd) = tangents(sched, ends)
    np.testing.assert_allclose(np.asarray(sg), np.asarray(pg), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sd), np.asarray(pd), rtol=1e-6)
    with x64():
        d = VariationalDiffusion(TinyNet(30), LearnedSchedule(jax.random.key(32), hidden=2), (2,))
        outputs = jax.jit(lambda keys, x: (d.schedule.gamma(0.5), jax.vmap(lambda k: d.elbo(k, x))(keys),
                                           d.bits_per_dim(keys[1], x), d.sample(keys[0], (2,), num_steps=5),
                                           d.schedule.discretize(5).alpha_bar))(keys, jnp.asarray(XS))
        for out in outputs:
            assert out.dtype == jnp.float64
        _, many, bpd, _, _ = outputs
    assert many.shape == (4, 3) and np.all(np.isfinite(np.asarray(many))) and np.unique(np.asarray(many[:, 0])).size == 4
    # bits/dim of key 1 is -ELBO / (D log 2) of the vmapped row 1: vmap agrees with the plain call
    np.testing.assert_allclose(np.asarray(bpd), -np.asarray(many[1]) / (2 * np.log(2.0)), rtol=1e-12)
