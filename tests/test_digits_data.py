"""Images for the digits example: the bundled data, dequantisation and bits per dimension."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from probdiff import data


def test_digits_are_the_bundled_images_channels_last():
    images, labels = data.digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.int32
    assert images.min() == 0 and images.max() == data.DIGITS_LEVELS - 1
    assert sorted(np.unique(labels)) == list(range(10))


def test_dequantised_values_fill_their_cell_uniformly():
    L = 17
    k = jnp.asarray(np.repeat(np.arange(L), 4000))
    y = np.asarray(data.dequantize(jax.random.key(0), k, L), np.float64)
    lo = 2 * np.asarray(k) / L - 1
    assert np.all(y >= lo) and np.all(y < lo + 2 / L)
    # Position inside the cell is U[0, 1): Kolmogorov-Smirnov at the 1e-3 level (seeded).
    frac = (y - lo) * L / 2
    assert stats.kstest(frac, "uniform").pvalue > 1e-3


def test_bits_per_dim_of_the_uniform_density_is_log2_levels():
    """p(y) = 2^-D on [-1, 1]^D puts 1/L on each level: -log2 P = D log2 L."""
    D, L = 64, 17
    got = float(data.discrete_bits_per_dim(-D * math.log(2.0), D, L))
    assert abs(got - math.log2(L)) < 1e-6  # float32 arithmetic on numbers of size ~4


def test_bits_per_dim_matches_the_probability_of_a_discretised_gaussian():
    """For a 1-D Gaussian density the bound E_u[log p(y)] + log(2/L) is below log P(cell)
    (exact cell probability from the normal CDF), and close for a wide density."""
    L, sd = 17, 0.8
    k = np.arange(L)
    edges = 2 * np.arange(L + 1) / L - 1
    p_cell = stats.norm.cdf(edges[1:], scale=sd) - stats.norm.cdf(edges[:-1], scale=sd)
    u = (np.arange(20000) + 0.5) / 20000  # midpoint rule for E_u
    y = 2 * (k[:, None] + u[None]) / L - 1
    e_log_p = stats.norm.logpdf(y, scale=sd).mean(-1)
    bits = np.asarray(data.discrete_bits_per_dim(e_log_p, 1, L))
    exact = -np.log2(p_cell)
    assert np.all(bits >= exact - 1e-9)  # a bound
    assert np.all(bits - exact < 0.01)  # tight: the density barely changes within a cell


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="levels"):
        data.dequantize(jax.random.key(0), jnp.array([1, 2]), 1)
    with pytest.raises(ValueError, match="0..16"):
        data.dequantize(jax.random.key(0), jnp.array([1, 17]), 17)
    with pytest.raises(TypeError, match="integers"):
        data.dequantize(jax.random.key(0), jnp.array([0.5]), 17)
    with pytest.raises(ValueError, match="num_dims"):
        data.discrete_bits_per_dim(0.0, 0, 17)
