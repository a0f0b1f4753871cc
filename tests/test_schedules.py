"""Schedules (MATH.md A1) against the float64 numpy oracle, plus validation and pytree behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64
from oracles import gaussian as g

from probdiff import schedules
from probdiff.schedules import Schedule

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
EPS64 = float(np.finfo(np.float64).eps)

FIELDS = ("beta", "alpha", "alpha_bar", "beta_tilde")

CASES = {
    "linear": (lambda T: schedules.linear(T), lambda T: g.linear_betas(T)),
    "linear_custom": (lambda T: schedules.linear(T, 1e-3, 0.05), lambda T: g.linear_betas(T, 1e-3, 0.05)),
    "cosine": (lambda T: schedules.cosine(T), lambda T: g.cosine_betas(T)),
    "sigmoid": (lambda T: schedules.sigmoid(T), lambda T: g.sigmoid_betas(T)),
    "sigmoid_custom": (
        lambda T: schedules.sigmoid(T, 1e-3, 0.05),
        lambda T: g.sigmoid_betas(T, 1e-3, 0.05),
    ),
    "from_betas": (
        # decreasing betas; alpha_bar_T ~ e^-26 stays inside the float32 normal range
        lambda T: schedules.from_betas(np.linspace(0.05, 1e-3, T)),
        lambda T: np.linspace(0.05, 1e-3, T),
    ),
}


def float32_tolerances(oracle: g.Schedule):
    """Per-t relative tolerances (arrays indexed by t) for a float32 schedule from float64 betas.

    * beta: one rounding of a float64 value to float32, <= eps32 / 2 relative.
    * alpha = 1 - beta: absolute error <= eps32 (rounding of beta, then of the difference).
    * L_t = log alpha_bar_t = cumsum_s log1p(-beta_s) in float32. Two error sources:
      the rounding of beta_s, amplified by |d log(1-b)/db| b = b/(1-b) (this dominates when
      beta is near 1, as the cosine schedule's clipped 0.999), and the round-off of the cumsum
      of terms of one sign, a random walk of about sqrt(t) eps32 relative to |L_t|. Together
      delta_t = eps32 sum_{s<=t} beta_s/(1-beta_s) + (sqrt(t)+2) eps32 |L_t|, doubled for margin.
    * alpha_bar = exp(L): an absolute error delta in L is a relative error delta (+ eps32 for exp).
    * 1 - alpha_bar = -expm1(L): relative error delta alpha_bar/(1 - alpha_bar) + 2 eps32.
    * beta_tilde: a ratio of two 1 - alpha_bar values times beta: the sum of their errors + 2 eps32.
    """
    T = oracle.T
    t = np.arange(T + 1)
    beta = oracle.beta
    L = np.log(oracle.alpha_bar)
    delta = 2 * (EPS32 * np.cumsum(beta / (1.0 - beta)) + (np.sqrt(t) + 2) * EPS32 * np.abs(L))
    omab = 1.0 - oracle.alpha_bar
    with np.errstate(divide="ignore", invalid="ignore"):
        r_omab = np.where(t > 0, delta * oracle.alpha_bar / omab, 0.0) + 2 * EPS32
    r_bt = np.concatenate([[0.0], r_omab[:-1] + r_omab[1:]]) + 2 * EPS32
    return {
        "beta": ("rtol", np.full(T + 1, EPS32)),
        "alpha": ("atol", np.full(T + 1, EPS32)),
        "alpha_bar": ("rtol", delta + EPS32),
        "one_minus_alpha_bar": ("rtol", r_omab),
        "beta_tilde": ("rtol", r_bt),
    }


def _compare(lib: Schedule, oracle: g.Schedule, tols):
    expected = {f: getattr(oracle, f) for f in FIELDS}
    expected["one_minus_alpha_bar"] = 1.0 - oracle.alpha_bar  # float64: exact to ~1e-12 relative
    for field, (kind, tol) in tols.items():
        got = np.asarray(getattr(lib, field), np.float64)
        want = expected[field]
        assert got.shape == want.shape == (oracle.T + 1,), field
        bound = tol * np.abs(want) if kind == "rtol" else tol
        err = np.abs(got - want)
        assert np.all(err <= bound), (field, np.argmax(err - bound), err.max(), got, want)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_schedule_matches_oracle_float32(name, T):
    make_lib, make_betas = CASES[name]
    lib = make_lib(T)
    oracle = g.schedule_from_betas(make_betas(T))
    assert lib.dtype == jnp.float32
    assert lib.num_steps == T
    _compare(lib, oracle, float32_tolerances(oracle))


def test_linear_endpoints_are_the_ddpm_values():
    # Ho et al. (2020): T = 1000, beta_1 = 1e-4, beta_T = 0.02; tolerance: float32 rounding.
    s = schedules.linear(1000)
    np.testing.assert_allclose(float(s.beta[1]), 1e-4, rtol=EPS32)
    np.testing.assert_allclose(float(s.beta[1000]), 0.02, rtol=EPS32)


def test_cosine_clips_beta_T_at_max_beta():
    # f(T) = cos^2(pi/2) = 0, so 1 - ab_T/ab_{T-1} = 1 is clipped to 0.999 (float32 rounding).
    s = schedules.cosine(50)
    np.testing.assert_allclose(float(s.beta[-1]), 0.999, rtol=EPS32)
    assert float(s.alpha_bar[-1]) > 0.0


@pytest.mark.parametrize("T", [1, 3, 50])
def test_indexing_convention(T):
    betas = np.linspace(0.05, 0.2, T)
    s = schedules.from_betas(betas)
    for field in ("beta", "alpha", "alpha_bar", "one_minus_alpha_bar", "beta_tilde"):
        assert getattr(s, field).shape == (T + 1,), field
    # Index 0 is t = 0 of a chain that has not moved: exact values, no tolerance needed.
    assert float(s.beta[0]) == 0.0
    assert float(s.alpha[0]) == 1.0
    assert float(s.alpha_bar[0]) == 1.0
    assert float(s.one_minus_alpha_bar[0]) == 0.0
    assert float(s.beta_tilde[0]) == 0.0
    # beta_tilde_1 = (1 - alpha_bar_0) beta_1 / (1 - alpha_bar_1) = 0.
    assert float(s.beta_tilde[1]) == 0.0
    # beta[t] is beta_t: the t-th input, one float32 rounding away.
    np.testing.assert_allclose(np.asarray(s.beta[1:]), betas, rtol=EPS32)
    # alpha_bar[t - 1] is alpha_bar_{t-1}: alpha_bar[t] / alpha_bar[t - 1] = alpha_t
    # (two float32 roundings of alpha_bar plus the division: 4 eps32).
    np.testing.assert_allclose(
        np.asarray(s.alpha_bar[1:]) / np.asarray(s.alpha_bar[:-1]), 1.0 - betas, rtol=4 * EPS32
    )


def test_one_minus_alpha_bar_keeps_relative_precision_at_t1():
    s = schedules.linear(1000)  # beta_1 = 1e-4, 1 - alpha_bar_1 = beta_1
    exact = 1.0 - g.schedule_from_betas(g.linear_betas(1000)).alpha_bar[1]  # float64
    got = float(s.one_minus_alpha_bar[1])
    rel = abs(got - exact) / exact
    # -expm1(log1p(-beta_1)): two correctly rounded float32 functions, <= 2 eps32 relative.
    assert rel <= 2 * EPS32, rel
    # The naive float32 1 - alpha_bar_1 loses ~ulp(1)/beta_1 relative (1.7e-4 here): the test
    # above would catch it (this shows the check has power).
    naive = float(np.float32(1.0) - s.alpha_bar[1])
    assert abs(naive - exact) / exact > 100 * 2 * EPS32


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "betas, match",
    [
        ([[0.1, 0.2]], "1-D"),
        (np.float64(0.1), "1-D"),
        ([], "T >= 1"),
        ([0.1, np.nan, 0.2], r"t = 2\)"),
        ([0.1, 0.2, np.inf], r"t = 3\)"),
        ([0.1, 0.2, -np.inf], r"t = 3\)"),
        ([0.1, 0.2, 0.3, 0.0], r"t = 4\)"),
        ([-0.1, 0.2], r"t = 1\)"),
        ([0.1, 1.0], r"t = 2\)"),
        ([0.1, 0.2, 1.5], r"t = 3\)"),
    ],
)
def test_from_betas_rejects_bad_input_naming_t(betas, match):
    with pytest.raises(ValueError, match=match):
        schedules.from_betas(betas)


def test_from_betas_names_first_offending_beta_value():
    with pytest.raises(ValueError, match=r"beta_3 = 0\.0"):
        schedules.from_betas([0.1, 0.2, 0.0, 1.0])


@pytest.mark.parametrize("make", [schedules.linear, schedules.cosine, schedules.sigmoid])
@pytest.mark.parametrize("T", [0, -3])
def test_num_steps_below_one_raises(make, T):
    with pytest.raises(ValueError, match="T >= 1"):
        make(T)


@pytest.mark.parametrize("make", [schedules.linear, schedules.cosine, schedules.sigmoid])
@pytest.mark.parametrize("T", [2.5, "10", True])
def test_num_steps_not_int_raises(make, T):
    with pytest.raises(TypeError, match="num_steps"):
        make(T)


@pytest.mark.parametrize("make", [schedules.linear, schedules.sigmoid])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_start": -1e-3}, "beta_start"),
        ({"beta_start": 1.0}, "beta_start"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"beta_end": 0.0}, "beta_end"),
        ({"beta_end": 2.0}, "beta_end"),
    ],
)
def test_bad_beta_start_end_raises_naming_it(make, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(100, **kwargs)


def test_cosine_and_sigmoid_bad_shape_parameters():
    with pytest.raises(ValueError, match="s must"):
        schedules.cosine(10, s=-0.1)
    with pytest.raises(ValueError, match="max_beta"):
        schedules.cosine(10, max_beta=1.0)
    with pytest.raises(ValueError, match="low must be below high"):
        schedules.sigmoid(10, low=1.0, high=-1.0)


def test_non_float_dtype_raises():
    with pytest.raises(TypeError, match="dtype"):
        schedules.linear(10, dtype=jnp.int32)


# ---------------------------------------------------------------- pytree, jit, vmap, grad
def test_schedule_is_a_pytree_of_arrays():
    s = schedules.linear(10)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 5 and all(leaf.shape == (11,) for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, Schedule)
    # Frozen dataclass: immutable.
    with pytest.raises(AttributeError):
        s.beta = s.alpha


def test_schedule_through_jit():
    s = schedules.cosine(20)
    out = jax.jit(lambda sc: sc)(s)
    assert isinstance(out, Schedule)
    for field in ("beta", "alpha", "alpha_bar", "one_minus_alpha_bar", "beta_tilde"):
        # jit of the identity moves arrays, no arithmetic: bitwise equal.
        np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(s, field)))
    # Built inside jit from traced betas (validation skipped, values the same as outside).
    betas = jnp.asarray(g.linear_betas(20), jnp.float32)
    inside = jax.jit(schedules.from_betas)(betas)
    oracle = g.schedule_from_betas(g.linear_betas(20))
    _compare(inside, oracle, float32_tolerances(oracle))


def test_schedule_through_vmap_matches_each_oracle():
    B, T = 4, 30
    rng = np.random.default_rng(0)
    betas = rng.uniform(0.01, 0.3, size=(B, T))
    stacked = jax.vmap(schedules.from_betas)(jnp.asarray(betas, jnp.float32))
    assert stacked.alpha_bar.shape == (B, T + 1)
    # vmap over a batch of Schedules as an input.
    last = jax.vmap(lambda sc: sc.alpha_bar[-1])(stacked)
    for i in range(B):
        oracle = g.schedule_from_betas(betas[i])
        one = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
        # The float64 betas are rounded to float32 before from_betas here, which the oracle
        # does not do: one more eps32 relative on beta, within the tolerances below.
        _compare(one, oracle, float32_tolerances(oracle))
        tol = float32_tolerances(oracle)["alpha_bar"][1][T]
        np.testing.assert_allclose(float(last[i]), oracle.alpha_bar[T], rtol=tol)


def test_grad_of_alpha_bar_T_wrt_betas():
    # alpha_bar_T = prod_s (1 - beta_s)  =>  d alpha_bar_T / d beta_s = -alpha_bar_T / (1 - beta_s).
    betas = np.linspace(0.05, 0.25, 12)
    oracle = g.schedule_from_betas(betas)
    expected = -oracle.alpha_bar[-1] / (1.0 - betas)
    grad = jax.grad(lambda b: schedules.from_betas(b).alpha_bar[-1])(jnp.asarray(betas, jnp.float32))
    # float32: alpha_bar_T to (sqrt(T)+2) eps32 (1 + |log ab_T|) relative, the chain rule through
    # exp and log1p adds a few eps32 more.
    tol = float32_tolerances(oracle)["alpha_bar"][1][-1] + 4 * EPS32
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=tol)
    # Same in float64, to float64 round-off (T terms: 100 eps64).
    with x64():
        grad64 = jax.grad(lambda b: schedules.from_betas(b).alpha_bar[-1])(jnp.asarray(betas))
        assert grad64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(grad64), expected, rtol=100 * EPS64)


def test_grad_of_beta_tilde_is_finite():
    betas = jnp.asarray(np.linspace(0.05, 0.25, 8), jnp.float32)
    grad = jax.grad(lambda b: schedules.from_betas(b).beta_tilde[2:].sum())(betas)
    assert np.all(np.isfinite(np.asarray(grad)))


# ------------------------------------------------------------------------- float64
@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_under_enable_x64(name):
    make_lib, make_betas = CASES[name]
    T = 200
    oracle = g.schedule_from_betas(make_betas(T))
    with x64():
        s = make_lib(T)
        for field in ("beta", "alpha", "alpha_bar", "one_minus_alpha_bar", "beta_tilde"):
            assert getattr(s, field).dtype == jnp.float64, field
        # float64 throughout: the cumsum random walk is sqrt(T) eps64 relative to |log ab_T|
        # (~1e-13 here); 1e-11 leaves a factor 100 and is still 10^4 below float32.
        for field in FIELDS:
            np.testing.assert_allclose(np.asarray(getattr(s, field)), getattr(oracle, field), rtol=1e-11,
                                       atol=1e-15, err_msg=field)
        np.testing.assert_allclose(np.asarray(s.one_minus_alpha_bar), 1.0 - oracle.alpha_bar, rtol=1e-11)
        # An explicit dtype wins over the default.
        assert schedules.from_betas(make_betas(T), dtype=jnp.float32).dtype == jnp.float32
