"""VAEs and Markovian hierarchical VAEs (probdiff.vae, MATH.md G2, B4): the ELBO and the
importance-weighted likelihood against closed forms of linear-Gaussian models computed by Gaussian
algebra in numpy, the linear-Gaussian encoder against the joint covariance of the forward chain,
and the diffusion model as a restricted MHVAE against GaussianDiffusion."""

import json
import math
import runpy
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import x64
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO

from probdiff import GaussianDiffusion, schedules
from probdiff.distributions import q_posterior
from probdiff.nets import MLP, DenseNet
from probdiff.vae import MHVAE, VAE, GaussianNet, LinearGaussianEncoder

N_SE = 4.5  # standard errors allowed in Monte-Carlo comparisons (a 1-in-150000 two-sided miss)


# ------------------------------------------------------------------ a linear-Gaussian VAE
# p(z) = N(0, I_2), p(x | z) = N(W z + b, s^2 I_3): p(x) = N(b, W W^T + s^2 I). W has orthogonal
# columns, so the exact posterior N(S W^T (x - b) / s^2, S), S = (I + W^T W / s^2)^{-1}, is diagonal
# and a diagonal-Gaussian encoder can represent it.
W = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
B = np.array([0.5, -1.0, 0.3])
S_NOISE = 0.7
POST_VAR = 1.0 / (1.0 + np.sum(W**2, 0) / S_NOISE**2)


def linear_vae(shift=0.0, scale=1.0):
    def encoder(x):
        mean = (x - B) @ W * POST_VAR / S_NOISE**2 + shift
        return mean, jnp.broadcast_to(scale * jnp.sqrt(POST_VAR), mean.shape)

    def decoder(z):
        return z @ W.T + B, S_NOISE

    return VAE(encoder, decoder, 2, (3,))


def linear_log_px(x):
    cov = W @ W.T + S_NOISE**2 * np.eye(3)
    d = np.asarray(x) - B
    return -0.5 * (np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) + np.linalg.slogdet(2 * np.pi * cov)[1])


def gauss_kl_diag(m_q, v_q, m_p, v_p):
    return 0.5 * np.sum(v_q / v_p + (m_q - m_p) ** 2 / v_p - 1 + np.log(v_p / v_q), -1)


def test_vae_elbo_is_the_log_likelihood_with_the_exact_posterior_and_less_by_the_kl_otherwise():
    """With q = p(z | x) the ratio p(x, z) / q(z | x) is p(x) for every z, so the importance-
    weighted estimate is log p(x) exactly (1e-10, any number of draws) and the ELBO's
    expectation is log p(x); with a shifted, widened encoder the expected ELBO is
    log p(x) - KL(q || p(z | x)), closed form. 4000 draws per point: within 4.5 SE. The
    importance-weighted estimate with 2000 draws closes most of the gap (a bound that rises to
    log p(x))."""
    with x64():
        x = jax.random.normal(jax.random.key(0), (6, 3)) * 2.0
        truth = linear_log_px(x)
        m_post = (np.asarray(x) - B) @ W * POST_VAR / S_NOISE**2
        exact = linear_vae()
        np.testing.assert_allclose(np.asarray(exact.log_likelihood(jax.random.key(2), x, 7)), truth, rtol=0, atol=1e-10)
        off = linear_vae(shift=0.4, scale=1.5)
        kl = gauss_kl_diag(m_post + 0.4, 1.5**2 * POST_VAR, m_post, POST_VAR)
        for vae, target in ((exact, truth), (off, truth - kl)):
            draws = np.asarray(jax.jit(jax.vmap(lambda k, v=vae: v.elbo(k, x)))(jax.random.split(jax.random.key(3), 4000)))
            se = draws.std(0, ddof=1) / math.sqrt(draws.shape[0])
            assert np.all(np.abs(draws.mean(0) - target) < N_SE * se), (draws.mean(0), target, se)
        iw = np.asarray(off.log_likelihood(jax.random.key(4), x, 2000))
        assert np.all(np.abs(iw - truth) < 0.25 * kl), (iw, truth, kl)


def test_vae_model_and_guide_give_trace_elbo_minus_the_elbo():
    """Trace_ELBO over the VAE's model and guide (MC KL) has the expectation -sum_i ELBO(x_i),
    the closed form of the test above: 20000 particles, within 4.5 SE (SE from 20 batches)."""
    with x64():
        x = jax.random.normal(jax.random.key(5), (4, 3))
        off = linear_vae(shift=-0.3, scale=0.8)
        m_post = (np.asarray(x) - B) @ W * POST_VAR / S_NOISE**2
        target = -np.sum(linear_log_px(x) - gauss_kl_diag(m_post - 0.3, 0.64 * POST_VAR, m_post, POST_VAR))
        loss = Trace_ELBO(num_particles=1000, vectorize_particles=True)
        loss_fn = jax.jit(lambda k: loss.loss(k, {}, off.model, off.guide, x))
        vals = np.array([float(loss_fn(jax.random.key(10 + i))) for i in range(20)])
        assert abs(vals.mean() - target) < N_SE * vals.std(ddof=1) / math.sqrt(len(vals)) + 1e-9, (vals.mean(), target)


@pytest.mark.slow  # 20-30 s on 2 cores
def test_vae_trains_by_svi_towards_the_true_likelihood():
    """A VAE with GaussianNet encoder and decoder on data from the linear model above: 600 Adam
    steps raise the held-out ELBO by more than 1 nat per point and bring it within 0.25 nats of
    the true log-likelihood (a diagonal decoder can represent the model exactly; the margin is
    the training's shortfall at this budget, measured 0.1)."""
    k = jax.random.split(jax.random.key(6), 4)
    z = jax.random.normal(k[0], (3000, 2))
    x = z @ W.T + B + S_NOISE * jax.random.normal(k[1], (3000, 3))
    x_train, x_test = x[:2500], x[2500:]
    vae = VAE(GaussianNet(3, 2, k[2], hidden=(32,)), GaussianNet(2, 3, k[3], hidden=(32,)), 2, (3,))
    svi = SVI(vae.model, vae.guide, optax.adam(1e-2), Trace_ELBO())
    res = svi.run(jax.random.key(7), 600, x_train, progress_bar=False)
    before = float(jnp.mean(vae.elbo(jax.random.key(8), x_test, 16)))
    after_vae = vae.with_params(res.params)
    after = float(jnp.mean(after_vae.elbo(jax.random.key(8), x_test, 16)))
    truth = float(np.mean(linear_log_px(x_test)))
    assert after > before + 1.0 and after > truth - 0.25, (before, after, truth)


# ------------------------------------------------------------- the linear-Gaussian encoder
def joint_forward_cov(a, v):
    """Cov and mean map of (z_1..z_T) given x for z_t = a_t z_{t-1} + sqrt(v_t) e_t: z = M x + L e."""
    T = len(a)
    M = np.cumprod(a)
    L = np.zeros((T, T))
    for t in range(T):
        for s in range(t + 1):
            L[t, s] = np.prod(a[s + 1 : t + 1]) * math.sqrt(v[s])
    return M, L @ L.T


def test_linear_gaussian_encoder_marginals_and_posterior_against_the_joint_covariance():
    """q(z_t | x) and q(z_{t-1} | z_t, x) against the joint Gaussian of the whole chain built
    from its noise map (numpy), conditioned by the Schur complement; float64, to 1e-10."""
    with x64():
        a = np.array([0.9, 1.1, 0.7, 1.0])
        v = np.array([0.2, 0.05, 0.3, 0.1])
        enc = LinearGaussianEncoder(a, v)
        M, C = joint_forward_cov(a, v)
        x, z_t = 0.8, -0.4
        for t in range(1, 5):
            m, s = enc.marginal(t, jnp.array([x]))
            np.testing.assert_allclose([float(m[0]), float(s) ** 2], [M[t - 1] * x, C[t - 1, t - 1]], rtol=1e-10)
        for t in range(2, 5):
            i, j = t - 2, t - 1  # z_{t-1}, z_t
            mean = M[i] * x + C[i, j] / C[j, j] * (z_t - M[j] * x)
            var = C[i, i] - C[i, j] ** 2 / C[j, j]
            m, s = enc.posterior(t, jnp.array([z_t]), jnp.array([x]))
            np.testing.assert_allclose([float(m[0]), float(s) ** 2], [mean, var], rtol=1e-10)


def test_from_schedule_is_ddpm_forward_chain_and_its_posterior_is_a4():
    """abar_t = sqrt(alpha_bar_t), vbar_t = 1 - alpha_bar_t, and the generic Gaussian posterior
    equals q_posterior's closed-form mu_tilde_t, beta_tilde_t (MATH.md A4) to 1e-9."""
    with x64():
        s = schedules.cosine(12)
        enc = LinearGaussianEncoder.from_schedule(s)
        np.testing.assert_allclose(np.asarray(enc.abar), np.sqrt(np.asarray(s.alpha_bar)), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(enc.vbar), 1 - np.asarray(s.alpha_bar), rtol=1e-9, atol=1e-12)
        x0 = jnp.array([[0.3, -1.2]])
        x_t = jnp.array([[0.5, 0.1]])
        for t in (2, 7, 12):
            m, sd = enc.posterior(t, x_t, x0)
            ref = q_posterior(s, t, x_t, x0)
            np.testing.assert_allclose(np.asarray(m), np.asarray(ref.mean), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(float(sd) ** 2, np.asarray(ref.variance)[0, 0], rtol=1e-9)


# ------------------------------------------------------------- a linear-Gaussian MHVAE
# T = 3, 1-D: decoder z_{t-1} = c_t z_t + sqrt(w_t) n_t, x = c_1 z_1 + sqrt(w_1) n; the model's
# joint over (x, z_1, z_2, z_3) and q(z | x) are Gaussian, so ELBO = E_q log p(x, z) + H(q) and
# log p(x) are closed forms (numpy, below).
C_DEC = np.array([1.3, 0.8, 1.1])  # c_1 (x | z_1), c_2 (z_1 | z_2), c_3 (z_2 | z_3)
W_DEC = np.array([0.3, 0.4, 0.2])
A_ENC, V_ENC = np.array([0.9, 0.7, 0.6]), np.array([0.3, 0.5, 0.6])


class LinearDecoder(eqx.Module):
    c: jax.Array
    w: jax.Array

    def first(self, z_1):
        return self.c[0] * z_1, jnp.sqrt(self.w[0])

    def __call__(self, z_t, t):
        t = jnp.asarray(t)[..., None]
        return self.c[t - 1] * z_t, jnp.sqrt(self.w[t - 1])


def linear_mhvae():
    return MHVAE(LinearGaussianEncoder(A_ENC, V_ENC), LinearDecoder(jnp.asarray(C_DEC), jnp.asarray(W_DEC)), 3, 1, (1,))


def model_joint_cov():
    """Cov of (x, z_1, z_2, z_3) under p: z_3 = u_3, z_2 = c_3 z_3 + ..., x = c_1 z_1 + ..."""
    L = np.zeros((4, 4))  # rows x, z1, z2, z3; columns the noises of x, z1, z2, z3
    L[3, 3] = 1.0
    L[2] = C_DEC[2] * L[3]
    L[2, 2] += math.sqrt(W_DEC[2])
    L[1] = C_DEC[1] * L[2]
    L[1, 1] += math.sqrt(W_DEC[1])
    L[0] = C_DEC[0] * L[1]
    L[0, 0] += math.sqrt(W_DEC[0])
    return L @ L.T


def closed_form_elbo(x):
    cov_p = model_joint_cov()
    M, S_q = joint_forward_cov(A_ENC, V_ENC)
    m_y = np.concatenate([[x], M * x])
    S_y = np.zeros((4, 4))
    S_y[1:, 1:] = S_q
    P = np.linalg.inv(cov_p)
    e_log_p = -0.5 * (np.linalg.slogdet(2 * np.pi * cov_p)[1] + m_y @ P @ m_y + np.trace(P @ S_y))
    entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * S_q)[1]
    log_px = -0.5 * (math.log(2 * np.pi * cov_p[0, 0]) + x**2 / cov_p[0, 0])
    return e_log_p + entropy, log_px


def test_mhvae_elbo_both_forms_and_iw_likelihood_against_gaussian_algebra():
    """On the linear-Gaussian MHVAE: the plain Monte-Carlo ELBO (elbo, 10000 trajectories) and
    the B2 form (elbo_terms, 2000 keys) both match E_q log p(x, z) + H(q) from the joint
    covariances within 4.5 SE; B2 has the smaller spread; the IW estimate with 4000 trajectories
    is within 0.1 of log p(x)."""
    with x64():
        m = linear_mhvae()
        xs = (0.7, -2.0)
        xa = jnp.array([[v] for v in xs])
        mc = np.asarray(jax.jit(jax.vmap(lambda k: m.elbo(k, xa, 20)))(jax.random.split(jax.random.key(20), 500)))
        b2 = np.asarray(jax.jit(jax.vmap(lambda k: m.elbo_terms(k, xa).total))(jax.random.split(jax.random.key(21), 2000)))
        iw = np.asarray(m.log_likelihood(jax.random.key(22), xa, 4000))
        for i, x in enumerate(xs):
            elbo_true, log_px = closed_form_elbo(x)
            assert elbo_true < log_px
            for name, d in (("mc", mc[:, i]), ("b2", b2[:, i])):
                se = d.std(ddof=1) / math.sqrt(d.size)
                assert abs(d.mean() - elbo_true) < N_SE * se, (name, x, d.mean(), elbo_true, se)
            assert b2[:, i].std() < mc[:, i].std() * math.sqrt(20)  # per trajectory: B2's analytic KLs remove noise
            # log w has SD ~3 here, so one 4000-draw IW estimate has SD 0.014 / 0.025 (measured
            # over 20 keys, means -1.4734 / -2.1747 against -1.4753 / -2.1770): 0.1 is 4 SD, and
            # still closes over 90% of the 1.2-2 nat gap between the ELBO and log p(x)
            assert abs(iw[i] - log_px) < 0.1 and log_px - iw[i] < 0.1 * (log_px - elbo_true), (iw[i], log_px)


def test_mhvae_model_and_guide_log_ratio_is_log_joint_ratio():
    """One run of the MHVAE's guide and model under numpyro's trace: sum of model log-densities
    minus the guide's equals log_joint_ratio on that trajectory (1e-10, float64), and the
    Trace_ELBO loss's mean over 4000 particles is -ELBO within 4.5 SE of the closed form."""
    with x64():
        m = linear_mhvae()
        x = jnp.array([[0.7], [-2.0]])
        key = jax.random.key(23)
        g = handlers.trace(handlers.seed(m.guide, key)).get_trace(x)
        mt = handlers.trace(handlers.replay(handlers.seed(m.model, key), g)).get_trace(x)
        lp = sum(s["fn"].log_prob(s["value"]) for s in mt.values() if s["type"] == "sample")
        lq = g["mhvae_z"]["fn"].log_prob(g["mhvae_z"]["value"])
        np.testing.assert_allclose(np.asarray(lp - lq), np.asarray(m.log_joint_ratio(g["mhvae_z"]["value"], x)), atol=1e-10)
        target = -sum(closed_form_elbo(v)[0] for v in (0.7, -2.0))
        loss = Trace_ELBO(num_particles=200, vectorize_particles=True)
        loss_fn = jax.jit(lambda k: loss.loss(k, {}, m.model, m.guide, x))
        vals = np.array([float(loss_fn(jax.random.key(30 + i))) for i in range(20)])
        assert abs(vals.mean() - target) < N_SE * vals.std(ddof=1) / math.sqrt(len(vals)), (vals.mean(), target)


# ---------------------------------------------------------------- the diffusion as an MHVAE
class EpsDecoder(eqx.Module):
    """DDPM's p(z_{t-1} | z_t) = N((z_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t), beta_t I), written out."""

    eps_net: MLP
    betas: tuple = eqx.field(static=True)

    def __call__(self, z_t, t):
        beta = jnp.asarray(self.betas, z_t.dtype)
        ab = jnp.cumprod(1.0 - beta)
        b, abt = beta[t - 1][..., None], ab[t - 1][..., None]
        return (z_t - b / jnp.sqrt(1.0 - abt) * self.eps_net(z_t, t)) / jnp.sqrt(1.0 - b), jnp.sqrt(b)

    def first(self, z_1):
        return self(z_1, jnp.ones(z_1.shape[:-1], jnp.int32))


@pytest.mark.parametrize("T", [9])
def test_restricted_mhvae_is_gaussian_diffusion_number_for_number(T):
    """A diffusion model is an MHVAE with latent dim = data dim, the fixed encoder
    LinearGaussianEncoder.from_schedule and a schedule with z_T ~ N(0, I): with DDPM's decoder
    written out from an (untrained, random) eps-network, MHVAE.elbo_terms equals
    GaussianDiffusion.elbo_terms term by term on the same key (1e-9, float64), and the MHVAE's
    log_joint_ratio on a trajectory equals the diffusion's model-minus-guide log-density on it."""
    with x64():
        s = schedules.cosine(T)
        net = MLP(2, jax.random.key(40), hidden=(16,))
        net = jax.tree_util.tree_map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(41), w.shape)
                                     if eqx.is_inexact_array(w) else w, net)  # a non-zero eps-network
        dec = EpsDecoder(net, tuple(float(b) for b in np.asarray(s.beta[1:])))
        m = MHVAE(LinearGaussianEncoder.from_schedule(s), dec, T, 2, (2,))
        d = GaussianDiffusion(net, s, (2,), variance="beta", chunk_size=None)
        x = jax.random.normal(jax.random.key(42), (5, 2))
        tm, td = m.elbo_terms(jax.random.key(43), x), d.elbo_terms(jax.random.key(43), x)
        for name in ("reconstruction", "prior_matching", "denoising_matching"):
            np.testing.assert_allclose(np.asarray(getattr(tm, name)), np.asarray(getattr(td, name)), rtol=1e-9, atol=1e-9)

        z = m.encode(jax.random.key(44), x)
        g = handlers.trace(handlers.seed(handlers.substitute(d.guide, data={"x_1:T": z}), 0)).get_trace(x)
        mt = handlers.trace(handlers.replay(handlers.seed(d.model, 0), g)).get_trace(x)
        lp = sum(v["fn"].log_prob(v["value"]) for v in mt.values() if v["type"] == "sample")
        ratio_d = lp - g["x_1:T"]["fn"].log_prob(z)
        np.testing.assert_allclose(np.asarray(m.log_joint_ratio(z, x)), np.asarray(ratio_d), rtol=1e-10, atol=1e-9)


@pytest.mark.slow
def test_mhvae_with_learned_networks_trains_jits_and_differentiates():
    """An MHVAE with GaussianNet encoder and decoder (T = 4, latent dim 3 on 2-D data): model and
    guide train under SVI (loss falls), elbo is jit- and grad-compatible, sample has the event
    shape, and with_params changes the networks."""
    k = jax.random.split(jax.random.key(50), 4)
    m = MHVAE((GaussianNet(2, 3, k[0], hidden=(16,)), GaussianNet(3, 3, k[1], hidden=(16,), time_dim=8)),
              (GaussianNet(3, 2, k[2], hidden=(16,)), GaussianNet(3, 3, k[3], hidden=(16,), time_dim=8)), 4, 3, (2,))
    x = jax.random.normal(jax.random.key(51), (256, 2)) * jnp.array([2.0, 0.5]) + 1.0
    svi = SVI(m.model, m.guide, optax.adam(1e-2), Trace_ELBO())
    res = svi.run(jax.random.key(52), 150, x, progress_bar=False)
    assert np.mean(res.losses[-30:]) < np.mean(res.losses[:30]) - 50.0
    trained = m.with_params(res.params)
    elbo = jax.jit(lambda model, k_, x_: model.elbo(k_, x_, 8), static_argnums=0)
    e0, e1 = float(jnp.mean(elbo(m, jax.random.key(53), x))), float(jnp.mean(elbo(trained, jax.random.key(53), x)))
    assert e1 > e0 + 0.2, (e0, e1)
    g = jax.jit(jax.grad(lambda xx: jnp.sum(trained.elbo(jax.random.key(54), xx))))(x[:4])
    assert g.shape == (4, 2) and np.all(np.isfinite(np.asarray(g)))
    assert jax.jit(lambda k_: trained.sample(k_, (7,)))(jax.random.key(55)).shape == (7, 2)


def test_bad_inputs_raise_naming_the_parameter():
    with pytest.raises(ValueError, match="v must be > 0"):
        LinearGaussianEncoder([1.0, 1.0], [0.1, 0.0])
    with pytest.raises(ValueError, match="same length"):
        LinearGaussianEncoder([1.0, 1.0], [0.1])
    with pytest.raises(ValueError, match="latent_dim = the data dimension"):
        MHVAE(LinearGaussianEncoder([1.0], [0.1]), LinearDecoder(jnp.ones(1), jnp.ones(1)), 1, 3, (2,))
    with pytest.raises(ValueError, match="num_latents"):
        MHVAE(LinearGaussianEncoder([1.0], [0.1]), LinearDecoder(jnp.ones(1), jnp.ones(1)), 2, 2, (2,))
    with pytest.raises(TypeError, match="pair"):
        MHVAE(lambda x: x, LinearDecoder(jnp.ones(1), jnp.ones(1)), 1, 2, (2,))
    learned = MHVAE((GaussianNet(2, 2, jax.random.key(0)), GaussianNet(2, 2, jax.random.key(1), time_dim=8)),
                    LinearDecoder(jnp.ones(2), jnp.ones(2)), 2, 2, (2,))
    with pytest.raises(ValueError, match="LinearGaussianEncoder"):
        learned.elbo_terms(jax.random.key(0), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="z must have trailing shape"):
        learned.log_joint_ratio(jnp.zeros((1, 3, 2)), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="likelihood"):
        VAE(lambda x: x, lambda z: z, 2, (3,), likelihood="poisson")
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(lambda x: x, lambda z: z, 0, (3,))
    with pytest.raises(ValueError, match="x must be finite"):
        linear_vae().guide(jnp.array([[0.0, jnp.nan, 0.0]]))
    with pytest.raises(ValueError, match="trailing shape"):
        linear_vae().elbo(jax.random.key(0), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="time_dim"):
        DenseNet(2, 2, jax.random.key(0), time_dim=3)
    with pytest.raises(ValueError, match="net\\(x, t\\)"):
        DenseNet(2, 2, jax.random.key(0), time_dim=4)(jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="min_std"):
        GaussianNet(2, 2, jax.random.key(0), min_std=0.0)


def test_mhvae_with_learned_networks_jits_differentiates_and_samples():
    """The cheap half of the slow test above: with GaussianNet encoder and decoder (T = 3,
    latent dim 3 on 2-D data) the ELBO is finite under jit, its gradient with respect to the
    networks' arrays is finite and non-zero, and sample has the event shape."""
    k = jax.random.split(jax.random.key(60), 4)
    m = MHVAE((GaussianNet(2, 3, k[0], hidden=(8,)), GaussianNet(3, 3, k[1], hidden=(8,), time_dim=4)),
              (GaussianNet(3, 2, k[2], hidden=(8,)), GaussianNet(3, 3, k[3], hidden=(8,), time_dim=4)), 3, 3, (2,))
    x = jax.random.normal(jax.random.key(61), (16, 2))

    def neg_elbo(dec_first, key):
        mm = MHVAE(m.encoder, (dec_first, m.decoder[1]), 3, 3, (2,))
        return -jnp.mean(mm.elbo(key, x))

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(neg_elbo))(m.decoder[0], jax.random.key(62))
    leaves = jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    assert jax.jit(lambda k_: m.sample(k_, (5,)))(jax.random.key(63)).shape == (5, 2)


# ------------------------------------------------------------------------ the examples, tiny
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 25-45 s on 2 cores; the VAE itself is tested above
def test_example_vae_digits_tiny(tmp_path):
    """examples/vae_digits.py trains with svi.run and reports finite bits/dim; the IW bound is at
    least as tight as the ELBO up to its noise, and both beat nothing absurd (< 30 bits/dim)."""
    res = runpy.run_path(str(ROOT / "examples" / "vae_digits.py"))["main"](["--tiny", "--out", str(tmp_path)])
    for name in ("training.png", "samples.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    for key in ("elbo_bits_per_dim", "iw_bits_per_dim"):
        assert np.isfinite(res[key]["mean"]) and res[key]["mean"] < 30, (key, res[key])
    assert json.loads((tmp_path / "metrics.json").read_text())["results"]["elbo_nats"]["mean"] == pytest.approx(
        res["elbo_nats"]["mean"])


@pytest.mark.slow  # five models compiled: 1-3 minutes on 2 cores
def test_example_hierarchical_vae_equivalence_tiny(tmp_path):
    """Even untrained (tiny), stage E equals GaussianDiffusion: the B2 ELBOs agree to float32
    rounding relative to their size, and the model/guide log-ratios likewise."""
    res = runpy.run_path(str(ROOT / "examples" / "hierarchical_vae_equivalence.py"))["main"](
        ["--tiny", "--out", str(tmp_path)])
    for name in ("elbo_by_stage.png", "samples.png", "terms.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    e = res["equivalence"]
    assert e["b2_max_abs_diff"] < 1e-5 * max(1.0, e["relative_to"])
    assert e["trace_elbo_max_abs_diff"] < 1e-5 * max(1.0, abs(e["trace_elbo_mean"]))
    for stage in "ABCDE":
        assert np.isfinite(res[stage]["elbo"]) and np.isfinite(res[stage]["iw_log_likelihood"])
