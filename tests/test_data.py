"""Built-in 2-D data sets, the array loader and the two-sample distances (probdiff.data).

Every expected value comes from an independent computation: analytic moments of the mixture,
scipy's Gaussian log-density, numerical quadrature of the curves, numpy double loops for the
distances. Monte-Carlo checks use fixed seeds and tolerances of N_SE standard errors
estimated from the same draws (see helpers.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
from helpers import N_SE, assert_mc_close, covariance_draws, mc_mean_se, x64
from scipy.spatial import cKDTree

from probdiff import data
from probdiff.data import (
    DATASETS,
    eight_gaussians,
    eight_gaussians_log_prob,
    energy_distance,
    load,
    load_array,
    mmd_rbf,
    swiss_roll,
    two_moons,
)

# The standardisation constants, as stated in the docstrings (checked against quadrature below).
MOONS_CENTER = np.array([0.5, 0.25])
MOONS_SCALE = np.sqrt(21 / 32 - 1 / (2 * np.pi))
SWISS_SCALE = np.pi * np.sqrt(39 / 8)

#: One sample size for every generator call, so that each data set is compiled once for all the
#: tests (compiles dominate the run time); odd, so the two moons get unequal counts.
N = 4001


def _dense_moons(k=200_000):
    """The two noiseless moons by the midpoint rule in u: shape (2k, 2), equal weight per arc."""
    u = (np.arange(k) + 0.5) / k * np.pi
    upper = np.stack([np.cos(u), np.sin(u)], axis=1)
    lower = np.stack([1 - np.cos(u), 0.5 - np.sin(u)], axis=1)
    return upper, lower


# --------------------------------------------------------------------------------------------
# eight_gaussians
# --------------------------------------------------------------------------------------------


def test_eight_gaussians_moments_and_component_frequencies():
    radius, scale, n = 3.0, 0.2, N
    x = np.asarray(eight_gaussians(jax.random.key(0), n, radius=radius, scale=scale), np.float64)
    # The mixture's mean is 0 (the means cancel) and its covariance (r^2/2 + s^2) I: the eight
    # means have E[cos^2] = E[sin^2] = 1/2 and E[cos sin] = 0.
    assert_mc_close(x, np.zeros(2), what="mean")
    cov = (radius**2 / 2 + scale**2) * np.eye(2)
    assert_mc_close(covariance_draws(x), cov, what="covariance")

    # Component of each point: the nearest mean. Neighbouring means are 2 r sin(pi/8) = 2.3
    # apart, so a point is misassigned only beyond 1.15 = 5.7 s from its mean along one axis
    # (probability 1e-8 per point): the nearest mean is the point's component.
    means = radius * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)
    comp = np.argmin(((x[:, None, :] - means) ** 2).sum(-1), axis=1)
    counts = np.bincount(comp, minlength=8)
    chi2 = ((counts - n / 8) ** 2 / (n / 8)).sum()
    # Pearson's statistic with 7 degrees of freedom; the 1 - 1e-4 quantile is 29.9.
    assert chi2 < scipy.stats.chi2.ppf(1 - 1e-4, df=7), (counts, chi2)
    # A lopsided mixture (one component twice as likely) would be rejected by the same bound.
    lopsided = np.full(8, n / 9)
    lopsided[0] *= 2
    assert ((lopsided - n / 8) ** 2 / (n / 8)).sum() > scipy.stats.chi2.ppf(1 - 1e-4, df=7)

    # Within a component the spread is s per coordinate: residual mean 0, second moment s^2.
    resid = x - means[comp]
    assert np.abs(resid).max() < 6 * scale  # P(|z| > 6) = 2e-9 per coordinate
    assert_mc_close(resid, np.zeros(2), what="within-component mean")
    assert_mc_close(resid**2, np.full(2, scale**2), what="within-component s^2")
    # ... and Gaussian: uncorrelated coordinates, fourth moment 3 s^4 (the noise is Box-Muller).
    assert_mc_close(resid[:, 0] * resid[:, 1], 0.0, what="within-component cross moment")
    assert_mc_close(resid**4, np.full(2, 3 * scale**4), what="within-component fourth moment")


def _grid(h=0.025, half=3.5):
    g = np.linspace(-half, half, int(round(2 * half / h)) + 1)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    return g, np.stack([xx, yy], -1)


def _scipy_log_prob(pts, radius, scale):
    means = [radius * np.array([np.cos(2 * np.pi * k / 8), np.sin(2 * np.pi * k / 8)]) for k in range(8)]
    comps = [scipy.stats.multivariate_normal(m, scale**2 * np.eye(2)).logpdf(pts) for m in means]
    return scipy.special.logsumexp(np.stack(comps), axis=0) - np.log(8)


def test_eight_gaussians_log_prob_against_scipy():
    # float32, on a batch of shape (281, 281) covering the modes and the gaps between them.
    _, grid = _grid()
    got = np.asarray(eight_gaussians_log_prob(jnp.asarray(grid, jnp.float32), 2.0, 0.1))
    assert got.shape == grid.shape[:-1] and got.dtype == np.float32
    # |log p| reaches ~700 in the grid's corners; float32 round-off is ~1e-7 relative per term.
    np.testing.assert_allclose(got, _scipy_log_prob(grid, 2.0, 0.1), rtol=1e-5, atol=1e-4)
    # float64: exact to round-off, at a mean, at the centre, far in the tail and at random points.
    pts = np.random.default_rng(1).normal(size=(50, 2)) * 2.0
    pts[:3] = [[1.7, 0.0], [0.0, 0.0], [9.0, -7.0]]
    with x64():
        got64 = np.asarray(eight_gaussians_log_prob(jnp.asarray(pts), radius=1.7, scale=0.3))
        assert got64.dtype == np.float64
        np.testing.assert_allclose(got64, _scipy_log_prob(pts, 1.7, 0.3), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="last axis of size 2"):
        eight_gaussians_log_prob(jnp.zeros((5, 3)))


def test_eight_gaussians_density_integrates_to_one():
    # Trapezoid rule on [-3.5, 3.5]^2 with step h = 0.025 = s/4 (s = 0.1): for a Gaussian the
    # trapezoid error is ~exp(-2 pi^2 s^2 / h^2) ~ 1e-137, and the mass outside the square is
    # beyond 15 s of every mean (< 1e-50). What remains is float32 round-off of log p (~1e-7
    # relative per value), so the integral must be 1 to 1e-5.
    g, grid = _grid()
    dens = np.exp(np.asarray(eight_gaussians_log_prob(jnp.asarray(grid, jnp.float32), 2.0, 0.1), np.float64))
    total = scipy.integrate.trapezoid(scipy.integrate.trapezoid(dens, g, axis=1), g)
    assert abs(total - 1.0) < 1e-5, total


# --------------------------------------------------------------------------------------------
# two_moons and swiss_roll
# --------------------------------------------------------------------------------------------


def test_moons_constants_are_the_mean_and_rms_of_the_noiseless_moons():
    upper, lower = _dense_moons()
    both = np.concatenate([upper, lower])
    np.testing.assert_allclose(both.mean(0), MOONS_CENTER, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(((both - MOONS_CENTER) ** 2).mean()), MOONS_SCALE, rtol=1e-9)
    # The swiss roll's constant: E[u^2] / 2 = b^2 for u uniform on (1.5 pi, 4.5 pi).
    u = 1.5 * np.pi + (np.arange(200_000) + 0.5) / 200_000 * 3 * np.pi
    np.testing.assert_allclose(np.sqrt((u**2).mean() / 2), SWISS_SCALE, rtol=1e-9)


def test_two_moons_noiseless_points_lie_on_the_arcs():
    n = N  # odd: 2001 on the upper moon (even rows), 2000 on the lower (odd rows)
    x = np.asarray(two_moons(jax.random.key(2), n, noise=0.0), np.float64)
    y = x * MOONS_SCALE + MOONS_CENTER  # undo the standardisation
    r_upper = np.linalg.norm(y, axis=1)
    r_lower = np.linalg.norm(y - [1.0, 0.5], axis=1)
    # float32 cos/sin and standardisation: |r - 1| is a few ulp, well below 1e-5.
    on_upper = (np.abs(r_upper - 1) < 1e-5) & (y[:, 1] >= -1e-6)
    on_lower = (np.abs(r_lower - 1) < 1e-5) & (y[:, 1] <= 0.5 + 1e-6)
    assert np.all(on_upper | on_lower)
    assert np.all(on_upper[::2]) and np.all(on_lower[1::2])
    assert on_upper.sum() == n - n // 2 and on_lower.sum() == n // 2
    # Standardised: mean 0 and mean per-coordinate second moment 1 (Monte Carlo; u is uniform).
    assert_mc_close(x, np.zeros(2), what="moons mean")
    assert_mc_close((x**2).mean(1), 1.0, what="moons E|x|^2 / 2")


def test_two_moons_noisy_points_lie_within_noise_of_the_arcs():
    noise, n = 0.05, N
    x = np.asarray(two_moons(jax.random.key(3), n, noise=noise), np.float64)
    assert x.shape == (n, 2) and np.all(np.isfinite(x))
    y = x * MOONS_SCALE + MOONS_CENTER
    upper, lower = _dense_moons(20_000)  # curve points pi/20000 = 1.6e-4 apart
    dist, _ = cKDTree(np.concatenate([upper, lower])).query(y)
    # A point is its curve point plus noise of norm noise * R, R^2 ~ chi^2_2:
    # P(R > 6) = exp(-18) = 1.5e-8 per point, so 6 noise + curve spacing bounds all 4001.
    assert dist.max() < 6 * noise + 2e-4, dist.max()
    # ... and the distances are of the size of the noise (not all ~0): E|dist| ~ noise.
    assert 0.3 * noise < dist.mean() < 1.5 * noise


def test_swiss_roll_noiseless_is_the_spiral_and_noisy_is_near_it():
    n = N
    x = np.asarray(swiss_roll(jax.random.key(4), n, noise=0.0), np.float64)
    raw = x * SWISS_SCALE
    u = np.linalg.norm(raw, axis=1)  # |(u cos u, u sin u)| = u
    assert np.all((u > 1.5 * np.pi - 1e-4) & (u < 4.5 * np.pi + 1e-4))
    # The angle of each point is u itself: raw = u (cos u, sin u). In float32, u < 14.2 carries
    # an error of a few ulp (ulp = 9.5e-7) that moves the point by u * du < 14.2 * 4 ulp ~ 5e-5.
    np.testing.assert_allclose(raw, u[:, None] * np.stack([np.cos(u), np.sin(u)], 1), atol=1e-4)
    # u ~ U(1.5 pi, 4.5 pi): mean 3 pi, variance (3 pi)^2 / 12.
    assert_mc_close(u, 3 * np.pi, what="mean of u")
    assert_mc_close((u - 3 * np.pi) ** 2, (3 * np.pi) ** 2 / 12, what="variance of u")
    assert_mc_close((x**2).mean(1), 1.0, what="swiss roll E|x|^2 / 2")

    noise = 0.05
    xn = np.asarray(swiss_roll(jax.random.key(5), n, noise=noise), np.float64)
    t = 1.5 * np.pi + (np.arange(50_000) + 0.5) / 50_000 * 3 * np.pi
    curve = t[:, None] * np.stack([np.cos(t), np.sin(t)], 1) / SWISS_SCALE  # spacing < 3e-4
    dist, _ = cKDTree(curve).query(xn)
    # As for the moons: 6 noise bounds the noise of all 4001 points (P = 1.5e-8 per point).
    assert dist.max() < 6 * noise + 3e-4, dist.max()


KWARGS = {"eight_gaussians": {"radius": 1.0, "scale": 0.3}, "two_moons": {"noise": 0.1}, "swiss_roll": {"noise": 0.1}}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_datasets_shape_dtype_determinism_and_jit(name):
    f, kwargs = DATASETS[name], KWARGS[name]
    key = jax.random.key(6)
    a = f(key, N, **kwargs)
    assert a.shape == (N, 2) and a.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(a)))
    # A fixed key gives the same points, another key different ones; load() is the same call.
    np.testing.assert_array_equal(np.asarray(a), np.asarray(f(key, N, **kwargs)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(load(name, key, N, **kwargs)))
    assert not np.allclose(np.asarray(a), np.asarray(f(jax.random.key(7), N, **kwargs)))
    # jit with num static and the keyword parameters traced: the same numbers (up to fusion).
    jitted = jax.jit(f, static_argnums=1)(key, N, **kwargs)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(a), rtol=1e-6, atol=1e-6)
    # Under x64 the points are float64 (other draws: the random bits depend on the dtype).
    with x64():
        b = f(key, N, **kwargs)
        assert b.dtype == jnp.float64 and b.shape == (N, 2)
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(f(key, N, **kwargs)))


def test_load_rejects_an_unknown_name_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown data set 'moons'") as err:
        load("moons", jax.random.key(0), 10)
    for name in ("eight_gaussians", "swiss_roll", "two_moons"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda k: two_moons(k, 0), "num must be a positive integer"),
        (lambda k: swiss_roll(k, -3), "num must be a positive integer"),
        (lambda k: eight_gaussians(k, 2.5), "num must be a positive integer"),
        (lambda k: eight_gaussians(k, True), "num must be a positive integer"),
        (lambda k: two_moons(k, 10, noise=-0.1), r"noise must be finite and >= 0; got noise = -0.1"),
        (lambda k: swiss_roll(k, 10, noise=float("nan")), "noise must be finite and >= 0"),
        (lambda k: eight_gaussians(k, 10, scale=0.0), "scale must be finite and > 0"),
        (lambda k: eight_gaussians(k, 10, radius=-1.0), "radius must be finite and >= 0"),
        (lambda k: eight_gaussians_log_prob(jnp.zeros(2), scale=-1.0), "scale must be finite and > 0"),
        (lambda k: mmd_rbf(jnp.zeros((3, 2)), jnp.ones((3, 2)), 0.0), "bandwidth must be finite and > 0"),
        (lambda k: energy_distance(jnp.zeros((3, 2)), jnp.ones((3, 3))), "same shape"),
        (lambda k: energy_distance(jnp.zeros((1, 2)), jnp.ones((3, 2))), "at least 2 points"),
    ],
)
def test_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call(jax.random.key(0))


def test_traced_num_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="static_argnums"):
        jax.jit(two_moons)(jax.random.key(0), 10)


# --------------------------------------------------------------------------------------------
# Two-sample distances
# --------------------------------------------------------------------------------------------


def _energy_brute(x, y):
    n, m = len(x), len(y)
    xy = sum(np.linalg.norm(x[i] - y[j]) for i in range(n) for j in range(m)) / (n * m)
    xx = sum(np.linalg.norm(x[i] - x[k]) for i in range(n) for k in range(n) if i != k) / (n * (n - 1))
    yy = sum(np.linalg.norm(y[j] - y[k]) for j in range(m) for k in range(m) if j != k) / (m * (m - 1))
    return 2 * xy - xx - yy


def _mmd_brute(x, y, h):
    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * h**2))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_energy_distance_and_mmd_against_numpy_double_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    y = rng.normal(size=(5, 3)) + 0.5
    x[3] = x[1]  # a repeated point: a zero distance
    e_ref, m_ref = _energy_brute(x, y), _mmd_brute(x, y, 1.3)
    with x64():
        e = energy_distance(jnp.asarray(x), jnp.asarray(y))
        m = mmd_rbf(jnp.asarray(x), jnp.asarray(y), 1.3)
        assert e.dtype == jnp.float64 and m.dtype == jnp.float64
        np.testing.assert_allclose(float(e), e_ref, rtol=1e-12)
        np.testing.assert_allclose(float(m), m_ref, rtol=1e-12)
        # Points of any shape are flattened: (7, 3) as (7, 3, 1) gives the same number.
        np.testing.assert_allclose(float(energy_distance(jnp.asarray(x)[..., None], jnp.asarray(y)[..., None])), e_ref, rtol=1e-12)
    # float32: sums of ~50 terms of size ~2, round-off ~1e-6 relative.
    e32 = energy_distance(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    m32 = mmd_rbf(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1.3)
    assert e32.dtype == jnp.float32
    np.testing.assert_allclose(float(e32), e_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m32), m_ref, rtol=1e-5, atol=1e-6)
    # The gradient is finite where two points coincide.
    gx = jax.grad(energy_distance)(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    assert np.all(np.isfinite(np.asarray(gx)))


def test_distances_are_unbiased_zero_for_equal_laws_and_positive_for_different_ones():
    n, seeds = 400, 24
    # Per seed: p1, p2 ~ P = eight_gaussians(r = 2, s = 0.1), independent; q ~ Q = 1.25 P, which
    # is eight_gaussians(r = 2.5, s = 0.125): means 0.5 = 5 s further out. (Slices of one draw
    # of N points, the size compiled for the other tests.)
    draws = np.stack([np.asarray(eight_gaussians(jax.random.key(100 + i), N))[: 3 * n] for i in range(seeds)])
    p1, p2, q = draws[:, :n], draws[:, n : 2 * n], 1.25 * draws[:, 2 * n :]

    def stats(p1, p2, q):
        return (
            jnp.stack([energy_distance(p1, p2), energy_distance(p1, q)]),
            jnp.stack([mmd_rbf(p1, p2, 0.2), mmd_rbf(p1, q, 0.2)]),
        )

    # The distances under jit and vmap over the seeds.
    ed, mmd = (np.asarray(a, np.float64) for a in jax.jit(jax.vmap(stats))(p1, p2, q))
    for name, s in (("energy", ed), ("mmd", mmd)):
        same, diff = s[:, 0], s[:, 1]
        # Unbiased: over the seeds the same-law statistic averages to 0 within N_SE standard errors.
        assert_mc_close(same, 0.0, what=f"{name}, equal laws")
        # Different laws: at every seed the value exceeds the same-law mean by 6 spreads (the
        # standard deviation of the same-law statistic over the seeds; for a normal statistic
        # a same-law value passes that threshold with probability 1e-9). Here the spread is
        # 0.009 for the energy distance and 0.002 for the MMD (thresholds 0.06 and 0.01); the
        # different-law values are all >= 0.11.
        threshold = same.mean() + 6 * same.std(ddof=1)
        assert diff.min() > threshold, (name, threshold, diff)
        assert diff.min() > same.max()
    # The unbiasedness check has power: the plug-in (V-statistic) energy distance exceeds the
    # U-statistic by mean|X - X'| / n + mean|Y - Y'| / n ~ 2 E|X - X'| / n = 0.013 (7 SE here),
    # so the V-statistic would fail the assert_mc_close above.
    mean_dist = np.linalg.norm(p1[0][:, None] - p1[0][None], axis=-1).sum() / (n * (n - 1))
    mean, se = mc_mean_se(ed[:, 0])
    assert abs(mean + 2 * mean_dist / n) > N_SE * se, (mean, se, mean_dist)


# --------------------------------------------------------------------------------------------
# load_array
# --------------------------------------------------------------------------------------------


def test_load_array_reads_npy_and_npz(tmp_path):
    a = np.random.default_rng(1).normal(size=(10, 2))
    np.save(tmp_path / "a.npy", a)
    got = load_array(tmp_path / "a.npy")
    assert got.dtype == jnp.float32 and got.shape == (10, 2)
    np.testing.assert_array_equal(np.asarray(got), a.astype(np.float32))
    # Integers are numbers too; a str path works.
    np.save(tmp_path / "i.npy", np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(np.asarray(load_array(str(tmp_path / "i.npy"))), np.arange(12).reshape(4, 3))
    # .npz: the only array (whatever its name), else the one named x, else the one named data.
    np.savez(tmp_path / "one.npz", a)
    np.testing.assert_array_equal(np.asarray(load_array(tmp_path / "one.npz")), a.astype(np.float32))
    np.savez_compressed(tmp_path / "x.npz", x=a, labels=np.arange(10))
    np.testing.assert_array_equal(np.asarray(load_array(tmp_path / "x.npz")), a.astype(np.float32))
    np.savez(tmp_path / "data.npz", data=2 * a, other=a)
    np.testing.assert_array_equal(np.asarray(load_array(tmp_path / "data.npz")), (2 * a).astype(np.float32))
    # Rows of any shape, checked against event_shape when given.
    np.save(tmp_path / "img.npy", np.zeros((3, 2, 4), np.float32))
    assert load_array(tmp_path / "img.npy", event_shape=(2, 4)).shape == (3, 2, 4)
    with pytest.raises(ValueError, match=r"img.npy holds rows of shape \(2, 4\); expected event_shape = \(8,\)"):
        load_array(tmp_path / "img.npy", event_shape=(8,))
    with x64():
        got64 = load_array(tmp_path / "a.npy")
        assert got64.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(got64), a)


def test_load_array_names_the_first_non_finite_row(tmp_path):
    a = np.ones((30, 2))
    a[17, 1] = np.nan
    a[20, 0] = np.inf
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(ValueError, match=r"file .*nan.npy: row 17 holds NaN \(rows counted from 0\)"):
        load_array(tmp_path / "nan.npy")
    b = np.ones((5, 3, 2), np.float32)
    b[4, 2, 0] = -np.inf
    np.savez(tmp_path / "inf.npz", x=b)
    with pytest.raises(ValueError, match=r"inf.npz: row 4 holds -inf"):
        load_array(tmp_path / "inf.npz")
    # A float64 value beyond float32's range would become inf: refused by default, kept under x64.
    c = np.ones((4, 2))
    c[2, 0] = 1e300
    np.save(tmp_path / "big.npy", c)
    with pytest.raises(ValueError, match=r"big.npy: row 2 holds inf after conversion to float32"):
        load_array(tmp_path / "big.npy")
    with x64():
        assert float(load_array(tmp_path / "big.npy")[2, 0]) == 1e300


class _Canary:
    """Unpickling it calls open(path, "w"): the file appears if anything unpickles it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_array_refuses_object_arrays_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    obj = np.empty((2, 2), dtype=object)
    obj[:] = [[_Canary(marker), 1.0], [2.0, 3.0]]
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "obj.npz", x=obj)
    with pytest.raises(ValueError, match=r"obj.npy holds an array of Python objects .*never unpickled"):
        load_array(tmp_path / "obj.npy")
    with pytest.raises(ValueError, match=r"obj.npz: array 'x' holds an array of Python objects"):
        load_array(tmp_path / "obj.npz")
    assert not marker.exists()
    # Control: the canary works, unpickling the same file does create the marker.
    unpickled = np.load(tmp_path / "obj.npy", allow_pickle=True)
    assert marker.exists()
    unpickled[0, 0].close()  # the canary became the file object open() returned


@pytest.mark.parametrize(
    "array, match",
    [
        (np.arange(5.0), r"shape \(5,\); expected 2-D or more"),
        (np.float64(3.0), r"shape \(\); expected 2-D or more"),
        (np.zeros((0, 2)), r"holds an empty array \(shape \(0, 2\)\)"),
        (np.array([["a", "b"], ["c", "d"]]), "non-numeric dtype <U1"),
        (np.ones((3, 2), dtype=bool), "non-numeric dtype bool"),
        (np.ones((3, 2), dtype=complex), "non-numeric dtype complex128"),
    ],
)
def test_load_array_refuses_bad_arrays_naming_the_file(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=match) as err:
        load_array(tmp_path / "bad.npy")
    assert str(tmp_path / "bad.npy") in str(err.value)


def test_load_array_missing_corrupt_and_ambiguous_files(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match="nope.npy does not exist"):
        load_array(missing)

    np.save(tmp_path / "full.npy", np.ones((1000, 2)))
    raw = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(raw[: len(raw) // 2])  # header intact, data cut
    with pytest.raises(ValueError, match="trunc.npy is corrupt or truncated"):
        load_array(tmp_path / "trunc.npy")
    (tmp_path / "head.npy").write_bytes(raw[:20])  # header cut
    with pytest.raises(ValueError, match="head.npy is corrupt"):
        load_array(tmp_path / "head.npy")
    (tmp_path / "text.npy").write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match="text.npy is not a .npy or .npz file"):
        load_array(tmp_path / "text.npy")

    np.savez(tmp_path / "full.npz", x=np.ones((1000, 2)))
    raw = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.npz is corrupt or truncated"):
        load_array(tmp_path / "trunc.npz")

    np.savez(tmp_path / "two.npz", np.ones((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"two.npz holds several arrays \('arr_0', 'arr_1'\)"):
        load_array(tmp_path / "two.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="empty.npz is a .npz file that holds no array"):
        load_array(tmp_path / "empty.npz")


def test_module_lists_its_public_names():
    for name in data.__all__:
        assert hasattr(data, name), name
