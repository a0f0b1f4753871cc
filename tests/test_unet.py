"""The UNet eps-network: its convolutions against XLA's and a numpy loop, GroupNorm against numpy,
the eps_fn contract (batch shapes, t per example, jit, vmap, grad, float64), errors, and SVI training.

Networks here are tiny (base 8, time_dim 16) so that every compilation takes a second or two.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from helpers import x64
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI

from probdiff import GaussianDiffusion, schedules
from probdiff.infer import DiffusionELBO
from probdiff.unet import UNet, conv2d, group_norm, upsample_conv2d

TINY = {"base": 8, "mults": (1, 2), "time_dim": 16, "groups": 4}


def _lax_conv(x, w, stride=1):
    k = w.shape[0]
    p = (k - 1) // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _randn(seed, *shape, dtype=np.float32):
    """Standard normal test inputs from numpy (an eager jax.random draw compiles for each shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _perturbed(net, seed, scale=0.3):
    """The net with its zero-initialised last conv replaced by random weights."""
    w = net.conv_out.w
    return eqx.tree_at(lambda n: n.conv_out.w, net, scale * _randn(seed, *w.shape, dtype=w.dtype))


# --------------------------------------------------------------------------- convolutions
@pytest.mark.parametrize("shape, k, stride", [
    ((3, 8, 8, 5, 7), 3, 1),   # H >= 8: the row formulation
    ((3, 4, 4, 5, 7), 3, 1),   # H < 8: im2col, C < O (dx from the patch gradient)
    ((3, 4, 6, 7, 5), 3, 1),   # im2col, C > O (dx from the patches of the output gradient)
    ((2, 8, 6, 4, 4), 3, 2),   # the stride-2 downsampling conv (odd sizes: the numpy loop below)
    ((2, 4, 4, 6, 3), 1, 1),   # the 1x1 skip conv
])
def test_conv2d_matches_lax_value_and_gradients(shape, k, stride):
    n, h, w_, c, o = shape
    x = _randn(0, n, h, w_, c)
    w = _randn(1, k, k, c, o)
    r = _randn(2, n, -(-h // stride), -(-w_ // stride), o)

    @jax.jit
    def both(x, w):
        ref = jax.value_and_grad(lambda x, w: jnp.sum(_lax_conv(x, w, stride) * r), (0, 1))
        got = jax.value_and_grad(lambda x, w: jnp.sum(conv2d(x, w, stride=stride) * r), (0, 1))
        return _lax_conv(x, w, stride), conv2d(x, w, stride=stride), ref(x, w)[1], got(x, w)[1]

    ref, got, g_ref, g_got = both(x, w)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    # Each output sums k*k*C products of N(0,1) terms (size ~ sqrt(9*7) ~ 8); float32 summation
    # in a different order differs by a few ulps of that, ~1e-6 relative: 1e-5 leaves a margin.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the kernel gradient sums N*H*W ~ 200-400 products: the same ulp argument at 1e-5 of its size
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("h, w_", [(5, 4), (9, 7)])  # im2col and row formulation at stride 1
def test_conv2d_bias_and_against_a_numpy_loop(h, w_):
    """The definition itself, as loops over float64 numpy arrays, stride 1 and 2."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, h, w_, 3))
    w = rng.standard_normal((3, 3, 3, 2))
    b = rng.standard_normal(2)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for s in (1, 2):
        ho, wo = -(-h // s), -(-w_ // s)
        ref = np.zeros((2, ho, wo, 2))
        for n in range(2):
            for i in range(ho):
                for j in range(wo):
                    for o in range(2):
                        ref[n, i, j, o] = b[o] + np.sum(xp[n, s * i : s * i + 3, s * j : s * j + 3, :] * w[..., o])
        got = jax.jit(conv2d, static_argnames="stride")(*(jnp.asarray(a, jnp.float32) for a in (x, w, b)), stride=s)
        # float32 inputs (rounded at 6e-8 relative) times 27 terms of size ~1: 1e-5 absolute
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_upsample_conv2d_is_upsample_then_conv():
    x = _randn(3, 2, 4, 3, 5)
    w = _randn(4, 3, 3, 5, 6)
    b = _randn(5, 6)

    def ref_fn(x, w, b):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour, independent of unet.py
        return _lax_conv(up, w) + b

    r = _randn(6, 2, 8, 6, 6)

    @jax.jit
    def both(x, w, b):
        g_ref = jax.grad(lambda *a: jnp.sum(ref_fn(*a) * r), (0, 1, 2))(x, w, b)
        g_got = jax.grad(lambda *a: jnp.sum(upsample_conv2d(*a) * r), (0, 1, 2))(x, w, b)
        return ref_fn(x, w, b), upsample_conv2d(x, w, b), g_ref, g_got

    ref, got, g_ref, g_got = both(x, w, b)
    assert got.shape == (2, 8, 6, 6)
    # the kernel taps are pre-summed (at most 4 at a time) before the products: a few ulps more
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)
    for a, c in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.max(np.abs(np.asarray(c))))


# --------------------------------------------------------------------------- GroupNorm
def test_group_norm_against_numpy_and_its_gradient():
    rng = np.random.default_rng(2)
    x = 3.0 * rng.standard_normal((3, 4, 5, 8)) + 2.0  # a mean far from 0 tests the one-pass variance
    scale = rng.standard_normal(8)
    bias = rng.standard_normal(8)
    g = 4
    xg = x.reshape(3, 4, 5, g, 2)
    mu = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    ref = ((xg - mu) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
    args32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    got = jax.jit(group_norm, static_argnums=3)(*args32, g)
    # E[x^2] - E[x]^2 in float32 with |mean| ~ 2, var ~ 9: cancellation loses ~ (4 + 9) / 9 of a
    # few ulps, so ~1e-6 relative on normalised values of size ~3: 1e-5 absolute.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    # the gradient against autodiff of a plain two-pass version
    def two_pass(x, s, b):
        xg = x.reshape(3, 4, 5, g, 2)
        m = xg.mean(axis=(1, 2, 4), keepdims=True)
        v = ((xg - m) ** 2).mean(axis=(1, 2, 4), keepdims=True)
        return ((xg - m) * jax.lax.rsqrt(v + 1e-5)).reshape(x.shape) * s + b

    r = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(two_pass(*a) * r), (0, 1, 2)))(*args32)
    g_got = jax.jit(jax.grad(lambda *a: jnp.sum(group_norm(*a, g) * r), (0, 1, 2)))(*args32)
    for a, c in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * np.max(np.abs(np.asarray(c))))


# --------------------------------------------------------------------------- the network
# Each distinct input shape compiles the network once (a second or two): the tests share these
# jitted functions and shapes, and check the other batch shapes by tracing only (eval_shape).
_apply = jax.jit(lambda net, x, t: net(x, t))


@pytest.fixture(scope="module")
def net():
    return UNet(1, jax.random.key(0), **TINY)


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_output_shapes_for_batch_shapes(net, batch):
    x = jax.ShapeDtypeStruct(batch + (8, 8, 1), jnp.float32)
    for t in (jnp.asarray(7), jnp.arange(1, 1 + int(np.prod(batch))).reshape(batch)):
        out = jax.eval_shape(net, x, t)
        assert out.shape == x.shape and out.dtype == jnp.float32
    if len(batch) == 2:  # t broadcasting over the leading batch axis only
        assert jax.eval_shape(net, x, jnp.arange(3)).shape == x.shape


def test_learn_variance_returns_eps_and_v():
    net = UNet(3, jax.random.key(0), **TINY, learn_variance=True)
    x = jnp.ones((2, 8, 8, 3))
    eps, v = _apply(net, x, jnp.array([3, 4]))
    assert eps.shape == v.shape == x.shape
    np.testing.assert_array_equal(np.asarray(eps), 0.0)
    np.testing.assert_array_equal(np.asarray(v), 0.0)
    eps, v = _apply(_perturbed(net, 1), x, jnp.array([3, 4]))
    # eps and v come from different output channels of the last conv
    assert np.max(np.abs(np.asarray(eps) - np.asarray(v))) > 1e-3


@pytest.mark.parametrize("size, mults", [((16, 16, 3), (1, 2, 2)), ((28, 28, 1), (1, 2))])
def test_other_image_sizes(size, mults):
    # traced, not compiled (a compilation per size would double this file's run time); the
    # convolutions themselves are checked at odd sizes above
    net = UNet(size[-1], jax.random.key(0), **{**TINY, "mults": mults})
    assert jax.eval_shape(net, jnp.ones((2,) + size), 10).shape == (2,) + size


def test_zero_at_start_t_per_example_vmap_and_time_dependence(net):
    x = _randn(8, 5, 8, 8, 1)
    t = jnp.array([1, 10, 100, 500, 1000])
    # the last conv starts at zero: an untrained network predicts eps = 0 exactly
    np.testing.assert_array_equal(np.asarray(_apply(net, x, t)), 0.0)
    moved = _perturbed(net, 2)  # same structure: no new compilation of _apply
    batched = _apply(moved, x, t)
    # vmap over examples (x_t of shape (8, 8, 1) and a scalar t each, the batch-free call) gives
    # the batched call. Different GEMM shapes sum in a different order: ~1e-6 relative through
    # ~15 layers on outputs of size ~1, so 1e-5 absolute.
    vmapped = jax.jit(jax.vmap(lambda x, t: moved(x, t)))(x, t)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-5, atol=1e-5)
    # t matters: the time embedding reaches the output
    # (t of dtype int32 as above: jnp.full of a Python int is weakly typed, which would compile
    # _apply anew, seconds for nothing)
    early = _apply(moved, x, jnp.full((5,), 3, jnp.int32))
    late = _apply(moved, x, jnp.full((5,), 500, jnp.int32))
    assert np.max(np.abs(np.asarray(early) - np.asarray(late))) > 1e-3


def test_gradients_finite_and_reach_the_network(net):
    x = _randn(9, 3, 8, 8, 1)
    eps = _randn(10, 3, 8, 8, 1)
    t = jnp.array([2, 50, 700])
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def loss(p):
        return jnp.sum((eps - eqx.combine(p, static)(x, t)) ** 2)

    grad = jax.jit(jax.grad(loss))
    g = grad(params)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(g))
    # at initialisation only the last conv gets a gradient (everything else is multiplied by it)
    assert np.max(np.abs(np.asarray(g.conv_out.w))) > 0
    np.testing.assert_array_equal(np.asarray(g.down[0].conv1.w), 0.0)
    # after one gradient step the first layers receive a gradient too
    params1 = jax.tree_util.tree_map(lambda p, d: jnp.asarray(np.asarray(p) - 1e-2 * np.asarray(d)), params, g)
    g1 = grad(params1)
    assert np.max(np.abs(np.asarray(g1.down[0].conv1.w))) > 0
    assert np.max(np.abs(np.asarray(g1.time_mlp[0]))) > 0


def test_float64_under_x64():
    with x64():
        net = _perturbed(UNet(1, jax.random.key(0), **TINY), 1)
        assert net.conv_in.w.dtype == jnp.float64
        x = _randn(11, 2, 8, 8, 1, dtype=np.float64)
        out = _apply(net, x, 5)
        assert out.dtype == jnp.float64 and np.isfinite(np.asarray(out)).all()
        # a float32 input: the network follows the input dtype
        assert jax.eval_shape(net, x.astype(jnp.float32), 5).dtype == jnp.float32
        # the float64 convolutions (both formulations) against XLA's at float64 precision
        w = _randn(12, 3, 3, 4, 5, dtype=np.float64)
        for h in (6, 8):
            xc = _randn(13, 2, h, 6, 4, dtype=np.float64)
            np.testing.assert_allclose(jax.jit(conv2d)(xc, w), _lax_conv(xc, w), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- errors
def test_bad_inputs_and_arguments_raise(net):
    with pytest.raises(ValueError, match="channels"):
        net(jnp.ones((2, 8, 8, 3)), 1)
    with pytest.raises(ValueError, match="x_t"):
        net(jnp.ones((8, 8)), 1)
    with pytest.raises(ValueError, match="divisible"):
        net(jnp.ones((2, 7, 8, 1)), 1)
    with pytest.raises(ValueError, match="t"):
        net(jnp.ones((2, 8, 8, 1)), jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="time steps"):
        net(jnp.ones((2, 8, 8, 1)), jnp.array([True, False]))
    with pytest.raises(ValueError, match="floating"):
        net(jnp.ones((2, 8, 8, 1), jnp.int32), 1)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="groups"):
        UNet(1, key, base=12, groups=8)
    with pytest.raises(ValueError, match="groups"):
        UNet(1, key, base=8, time_dim=16, groups=3)
    for kw in ({"base": 0}, {"base": 8.0}, {"time_dim": 7}, {"groups": -1}, {"mults": ()}, {"mults": (1, 0)}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            UNet(1, key, **{**TINY, **kw})
    with pytest.raises(ValueError, match="channels"):
        UNet(0, key, **TINY)


# --------------------------------------------------------------------------- training
def test_trains_under_svi_with_diffusion_elbo():
    """30 steps of SVI with DiffusionELBO("simple") on 32 digit-like images lower the loss."""
    schedule = schedules.linear(100)
    net0 = UNet(1, jax.random.key(0), **{**TINY, "mults": (1,)})  # one level: half the compile time
    # digit-like images in [-1, 1]: a bright stroke (a random vertical or horizontal bar) on a
    # dark background, so that eps is partly predictable from x_t
    rng = np.random.default_rng(0)
    imgs = -np.ones((32, 8, 8, 1), np.float32)
    for i in range(32):
        j = rng.integers(1, 7)
        if i % 2:
            imgs[i, 1:7, j] = 1.0
        else:
            imgs[i, j, 1:7] = 1.0
    data = jnp.asarray(imgs)

    def model(x):
        net = eqx_module("eps_net", net0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(net, schedule, (8, 8, 1)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(1e-3), DiffusionELBO("simple"))
    state = svi.init(jax.random.key(1), data)
    update = jax.jit(svi.update)
    losses = []
    for _ in range(30):
        state, loss = update(state, data)
        losses.append(float(loss))
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    # The loss is sum_i ||eps_i - eps_theta||^2 over 32 x 64 pixels: ~2048 at the start (eps_theta
    # = 0, a chi^2 with 2048 degrees of freedom), so its step-to-step noise is ~sqrt(2 * 2048) = 64
    # and the difference of two means of 5 steps has a standard error of ~40. Without learning the
    # drop would be 0 +- 40; 200 is 5 SE. (Observed here: 2014 -> 1557.)
    assert losses[-5:].mean() < losses[:5].mean() - 200.0, losses
