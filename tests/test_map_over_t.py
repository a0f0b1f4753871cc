"""map_over_t and sum_over_t: every chunking evaluates fn(t) for each t exactly once (in order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from probdiff.distributions import AUTO_CHUNK_ELEMENTS, map_over_t, resolve_chunk_size, sum_over_t


def fn(t):
    return jnp.sin(t * jnp.arange(1.0, 4.0)), t**2


@pytest.mark.parametrize("chunk_size", [None, "auto", 1, 2, 3, 7, 8, 100])
def test_matches_a_python_loop(chunk_size):
    ts = jnp.arange(2, 9)
    a, b = jax.jit(lambda ts: map_over_t(fn, ts, chunk_size, elements_per_t=500))(ts)
    # The reference: a plain Python loop over t, one call each.
    ref_a = np.stack([np.sin(int(t) * np.arange(1.0, 4.0)) for t in range(2, 9)])
    np.testing.assert_allclose(np.asarray(a), ref_a, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(b), np.arange(2, 9) ** 2)


@pytest.mark.parametrize("chunk_size", [None, "auto", 1, 2, 3, 7, 8, 100])
def test_sum_over_t_matches_a_python_loop(chunk_size):
    ts = jnp.arange(2, 9)
    a, b = jax.jit(lambda ts: sum_over_t(fn, ts, chunk_size, elements_per_t=500))(ts)
    # The padding of the last chunk (t = 8 repeated) must not be counted: sum in float64.
    ref_a = sum(np.sin(t * np.arange(1.0, 4.0)) for t in range(2, 9))
    np.testing.assert_allclose(np.asarray(a), ref_a, rtol=1e-6, atol=1e-6)
    assert int(b) == sum(t**2 for t in range(2, 9))


def test_auto_chunk_follows_the_element_budget():
    budget = AUTO_CHUNK_ELEMENTS.get(jax.default_backend(), AUTO_CHUNK_ELEMENTS["default"])
    assert resolve_chunk_size("auto", 999, budget // 4) == 4
    assert resolve_chunk_size("auto", 999, 10 * budget) == 1  # never below one t
    assert resolve_chunk_size("auto", 5, 1) == 5  # never above the number of t
    assert resolve_chunk_size(None, 999, 1) == 999


@pytest.mark.parametrize("bad", [0, -3, 2.5, "fast", True])
def test_bad_chunk_size_is_named(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        resolve_chunk_size(bad, 10, 1)
