"""Continuous-time SDEs (probdiff.sde): closed-form marginals against the moment ODEs solved by
scipy, Monte Carlo of the SDE itself, and DDPM as the VP SDE discretised (MATH.md E1, E2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64
from scipy.integrate import solve_ivp

from probdiff import schedules
from probdiff.sde import VESDE, VPSDE, SubVPSDE

SDES = [VPSDE(), SubVPSDE(), VPSDE(0.5, 5.0), VESDE(), VESDE(0.1, 5.0)]


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_marginals_solve_the_moment_equations(sde):
    """For dx = f(t) x dt + g(t) dw: m' = f m and v' = 2 f v + g^2 with m(0) = 1, v(0) = 0
    (Fokker-Planck moments), integrated by scipy's RK45 at rtol 1e-10 in float64."""
    with x64():
        def rhs(t, y):
            f = float(sde.drift_coef(jnp.float64(t)))
            g = float(sde.diffusion(jnp.float64(t)))
            return [f * y[0], 2 * f * y[1] + g**2]

        ts = [0.01, 0.1, 0.5, 1.0]
        sol = solve_ivp(rhs, (0.0, 1.0), [1.0, 0.0], t_eval=ts, rtol=1e-10, atol=1e-12)
        m = np.array([float(sde.mean_coef(jnp.float64(t))) for t in ts])
        s = np.array([float(sde.marginal_std(jnp.float64(t))) for t in ts])
        np.testing.assert_allclose(m, sol.y[0], rtol=1e-7)
        np.testing.assert_allclose(s**2, sol.y[1], rtol=1e-7, atol=1e-10)  # the solver's atol is 1e-12 per step


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(0.1, 5.0)], ids=repr)
def test_euler_maruyama_simulation_matches_the_marginal(sde):
    """Simulate the SDE itself from x_0 = 1.5 (2000 Euler-Maruyama steps, 20000 paths): mean and
    variance at t = 0.3 and 1 within 4.5 Monte-Carlo SE plus the O(dt) discretisation (0.5%)."""
    n, steps = 20000, 2000
    dt = 1.0 / steps
    x0 = 1.5

    def step(x, inputs):
        t, key = inputs
        x = x + sde.drift(x, t) * dt + sde.diffusion(t) * jnp.sqrt(dt) * jax.random.normal(key, x.shape)
        return x, x

    ts = jnp.arange(steps) * dt
    _, path = jax.lax.scan(step, jnp.full((n, 1), x0), (ts, jax.random.split(jax.random.key(0), steps)))
    for t in (0.3, 1.0):
        x = np.asarray(path[int(round(t * steps)) - 1], np.float64)[:, 0]
        mean, std = (np.asarray(a, np.float64).ravel()[0] for a in sde.marginal(jnp.array([[x0]]), t))
        se_mean, se_var = std / np.sqrt(n), std**2 * np.sqrt(2.0 / n)
        assert abs(x.mean() - mean) < 4.5 * se_mean + 0.005 * abs(mean) + 1e-3, (t, x.mean(), mean)
        assert abs(x.var() - std**2) < 4.5 * se_var + 0.005 * std**2, (t, x.var(), std**2)


def test_ddpm_is_the_discretised_vp_sde():
    """VPSDE().discretize(1000) is DDPM's linear schedule; log alpha_bar converges to -B(t) as 1/T."""
    np.testing.assert_allclose(VPSDE().discretize(1000).beta, schedules.linear(1000).beta, rtol=1e-6)
    sde = VPSDE()
    errors = []
    for T in (100, 200, 400, 800):
        with x64():
            s = sde.discretize(T, dtype=jnp.float64)
            i = np.arange(1, T + 1)
            exact = -np.asarray(sde.integrated_beta(jnp.asarray(i / T, jnp.float64)))
            errors.append(np.max(np.abs(np.log(np.asarray(s.alpha_bar[1:])) - exact)))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    # first order: halving dt halves the error; the ratios approach 2 as the O(1/T^2) part fades
    # (measured 2.12, 2.06, 2.03)
    np.testing.assert_allclose(ratios, 2.0, rtol=0.08)
    assert np.all(np.diff(np.abs(ratios - 2.0)) < 0)
    assert errors[-1] < 0.01 * float(sde.integrated_beta(1.0))  # under 1% of B(1) = 10.05 at T = 800


def test_prior_and_bad_input():
    sde = VPSDE()
    x = jnp.ones((3, 2))
    np.testing.assert_allclose(sde.prior_log_prob(x), -1.0 - np.log(2 * np.pi), rtol=1e-6)
    assert VESDE(0.01, 50.0).prior_sample(jax.random.key(0), (4000, 1)).std() > 45
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sde.marginal(x, 1.5)
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="sigma_max must be > sigma_min"):
        VESDE(1.0, 0.5)
    with pytest.raises(ValueError, match="num_steps must be an int >= 2"):
        sde.discretize(1)
    with pytest.raises(ValueError, match="too small"):
        VPSDE(0.1, 20.0).discretize(10)
