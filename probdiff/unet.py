r"""A small DDPM-style UNet eps-network for images, channels last (MATH.md C4).

[UNet][probdiff.unet.UNet] follows the ``eps_fn`` contract of
[GaussianDiffusion][probdiff.GaussianDiffusion] like [MLP][probdiff.nets.MLP]: ``net(x_t, t)``
with ``x_t`` of shape ``batch + (H, W, C)`` (any number of leading batch axes, none included)
and a time ``t`` (integer steps, or float in continuous time) that broadcasts over ``batch``; the batch is folded into the matrix
products, so callers need no ``vmap``. Register it in a model with
``numpyro.contrib.module.eqx_module("eps_net", net)``.

Speed on CPU (``bench/digits_unet.py``: 8 x 8 x 1 digits, batch 128, ``base=32``, 414,817
parameters, 8.1 GFLOP per training step, 2 shared AMD EPYC cores; the tables are in
``bench/README.md``). Where the time of a training step went, and what this module does:

* **XLA's CPU convolution.** ``lax.conv_general_dilated`` is fast (Eigen) only in some layouts.
  Autodiff's two backward convolutions (input gradient ``b01f_01oi->b01f``, kernel gradient
  ``f01b_i01o->01bf``) are rewritten into them when a step is jitted alone: 5.1-5.9 steps/s,
  0.52-0.60x PyTorch eager (the issue's "0.62x"). Inside the ``lax.scan`` that
  ``probdiff.training.fit`` and every scanned loop use they are not, and XLA emits naive loops:
  0.23 steps/s.
* **Convolutions as GEMMs.** Here every convolution is one matrix product (XLA hands it to
  YNNPACK, ~150 GFLOP/s on the 2 cores: ~56 of the ~95 ms of a step); the rest is memory traffic
  (patch buffers, elementwise passes). One interleaved run of the hand-written training loop (16
  rounds, steps/s relative to this module): im2col with autodiff, textbook GroupNorm,
  upsample-then-conv 0.75; + hand-written VJPs (kernel gradient one GEMM with the saved patches,
  input gradient through the narrower of two buffers) 0.81; + the row formulation for H >= 8
  ([conv2d][probdiff.unet.conv2d]: k C-wide instead of k^2 C-wide patches, made in one fused
  pass, for 25% more FLOPs at H = 8) 0.85; + GroupNorm summing per channel first (one pass for
  both moments) 0.98; + upsampling at the input resolution
  ([upsample_conv2d][probdiff.unet.upsample_conv2d]) 1.00. That is 10.2 steps/s, 1.02x PyTorch
  eager and 0.99x ``torch.compile`` in that run. In the latest full run probdiff's ``fit``
  path (SVI, ``DiffusionELBO``, EMA, NaN guard) trained at 1.14x PyTorch eager and 1.01x
  ``torch.compile``.
* **vmap.** The backward products contract the pixel axis with ``dot_general`` in place:
  written as ``a.T @ b`` they made XLA copy the patch buffers when the network runs under
  ``jax.vmap`` (up to 18% per step). [DiffusionELBO][probdiff.infer.DiffusionELBO] calls the
  network without a vmap when ``num_t = 1`` (a size-1 vmap still cost 2-5%).

Tried and dropped (interleaved runs): the batch in chunks through ``lax.map`` (0.7x); XLA
convolutions with a hand-written VJP in Eigen's layouts (fine inside ``scan``, 0.8x of im2col);
9 products summed instead of one (0.9x); shifting the outputs instead of the inputs (0.2x); a
two-level concatenation (XLA fuses a concatenation of at most 3 operands); exact 2 x 2 kernels
per phase for the upsampling (2.25x fewer FLOPs there, 0.95x overall); GroupNorm with a
hand-written VJP (no gain); ``jax.custom_batching.custom_vmap`` to fold the vmapped axis into
the batch (breaks reverse-mode autodiff).
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from probdiff.nets import sinusoidal_embedding

__all__ = ["UNet", "conv2d", "group_norm", "upsample_conv2d"]


# --------------------------------------------------------------------------- convolutions
def _patches(x, k: int, stride: int):
    """The k^2 shifted views of zero-padded x on the channel axis: (N, H', W', k^2 C), (u, v) order."""
    _, h, wd, _ = x.shape
    p = (k - 1) // 2
    ho, wo = -(-h // stride), -(-wd // stride)
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = [
        xp[:, u : u + stride * (ho - 1) + 1 : stride, v : v + stride * (wo - 1) + 1 : stride, :]
        for u in range(k)
        for v in range(k)
    ]
    return jnp.concatenate(cols, axis=-1)


def _patches_adjoint(dp, k: int, c: int):
    """The transpose of ``_patches`` at stride 1: block (u, v) of dp shifted back by (u, v), summed."""
    _, h, wd, _ = dp.shape
    p = (k - 1) // 2
    out = 0
    for u in range(k):
        for v in range(k):
            j = u * k + v
            # block (u, v) at pixel (i, j') is d/d xp[i + u, j' + v] = d/d x[i + u - p, j' + v - p]
            shifted = jnp.pad(dp[..., j * c : (j + 1) * c], ((0, 0), (u, 2 * p - u), (v, 2 * p - v), (0, 0)))
            out = out + shifted[:, p : p + h, p : p + wd, :]
    return out


@jax.custom_vjp
def _conv_patches(x, w):
    """Stride-1 'same' k x k convolution of NHWC x with an HWIO kernel as one (N H W, k^2 C) x (k^2 C, O)
    product (im2col); for small images (H < _ROWS_MIN_HEIGHT)."""
    return _conv_patches_fwd(x, w)[0]


def _conv_patches_fwd(x, w):
    k, _, c, o = w.shape
    pm = _patches(x, k, 1).reshape(-1, k * k * c)
    return (pm @ w.reshape(k * k * c, o)).reshape(x.shape[:3] + (o,)), (pm, w)


def _conv_patches_bwd(res, g):
    pm, w = res
    k, _, c, o = w.shape
    n, h, wd, _ = g.shape
    g2 = g.reshape(-1, o)
    # contract the pixel axis in place (pm.T @ g2 would transpose the 9x-wide pm under vmap)
    dw = jax.lax.dot_general(pm, g2, (((0,), (0,)), ((), ()))).reshape(w.shape)
    if o < c:
        # dx = g correlated with the flipped kernel, its in/out axes swapped: patches of g are
        # k^2 O wide, narrower than the k^2 C wide patch gradient of the other branch.
        w_rot = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)).reshape(k * k * o, c)
        dx = (_patches(g, k, 1).reshape(-1, k * k * o) @ w_rot).reshape(n, h, wd, c)
    else:
        dp = jax.lax.dot_general(g2, w.reshape(k * k * c, o), (((1,), (1,)), ((), ())))
        dx = _patches_adjoint(dp.reshape(n, h, wd, k * k * c), k, c)
    return dx, dw


_conv_patches.defvjp(_conv_patches_fwd, _conv_patches_bwd)


def _row_patches(x, k: int):
    """The k column shifts of x zero-padded by p on all sides, on the channel axis: (N, H + 2p, W, k C)."""
    _, h, wd, _ = x.shape
    p = (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return jnp.concatenate([xp[:, :, v : v + wd] for v in range(k)], axis=-1)


@jax.custom_vjp
def _conv_rows(x, w):
    r"""Stride-1 'same' k x k convolution as ONE product over padded rows, for H >= _ROWS_MIN_HEIGHT.

    With R the k column shifts of the padded input (k C wide, H + 2p rows) and W_u the kernel row
    u reshaped to (k C, O): Q = R [W_0 | ... | W_{k-1}], then y_i = sum_u Q_{i+u, u}. The product
    also runs over the 2p padding rows that no output reads ((H + 2p) / H times the FLOPs of
    im2col, 1.25 at H = 8), but R is k C wide instead of k^2 C and its concatenation of k <= 3
    operands is fused by XLA into one pass.
    """
    return _conv_rows_fwd(x, w)[0]


def _conv_rows_fwd(x, w):
    k, _, c, o = w.shape
    n, h, wd, _ = x.shape
    r = _row_patches(x, k)
    w_cat = jnp.transpose(w, (1, 2, 0, 3)).reshape(k * c, k * o)  # rows (v, c), columns (u, o)
    q = (r.reshape(-1, k * c) @ w_cat).reshape(n, h + k - 1, wd, k, o)
    y = q[:, 0:h, :, 0]
    for u in range(1, k):
        y = y + q[:, u : u + h, :, u]
    return y, (r, w)


def _conv_rows_bwd(res, g):
    r, w = res
    k, _, c, o = w.shape
    n, h, wd, _ = g.shape
    p = (k - 1) // 2
    # dQ[:, i, :, u] = g[:, i - u] for 0 <= i - u < H, else 0
    dq = jnp.stack([jnp.pad(g, ((0, 0), (u, k - 1 - u), (0, 0), (0, 0))) for u in range(k)], axis=3)
    dq = dq.reshape(-1, k * o)
    w_cat = jnp.transpose(w, (1, 2, 0, 3)).reshape(k * c, k * o)
    # both products contract in place, without transposing the big operand (also under vmap)
    dw_cat = jax.lax.dot_general(r.reshape(-1, k * c), dq, (((0,), (0,)), ((), ())))
    dw = jnp.transpose(dw_cat.reshape(k, c, k, o), (2, 0, 1, 3))
    dr = jax.lax.dot_general(dq, w_cat, (((1,), (1,)), ((), ()))).reshape(n, h + k - 1, wd, k * c)
    # dR[:, a, j, (v, c)] is d/d x_padded[a, j + v]: shift each column block back, then unpad
    dxp = 0
    for v in range(k):
        dxp = dxp + jnp.pad(dr[..., v * c : (v + 1) * c], ((0, 0), (0, 0), (v, k - 1 - v), (0, 0)))
    return dxp[:, p : p + h, p : p + wd], dw


_conv_rows.defvjp(_conv_rows_fwd, _conv_rows_bwd)

# Images with at least this many rows use the row formulation of the stride-1 convolution
# (measured faster from 8 x 8 up, slower at 4 x 4 where the padding rows add 50% FLOPs).
_ROWS_MIN_HEIGHT = 8


def _conv_same(x, w):
    """Stride-1 'same' convolution: row formulation for tall images, im2col for small ones."""
    return _conv_rows(x, w) if x.shape[1] >= _ROWS_MIN_HEIGHT else _conv_patches(x, w)


def conv2d(x, w, b=None, *, stride: int = 1):
    r"""A k x k convolution with zero 'same' padding, channels last, as matrix products.

    $$ y_{n,i,j,o} = b_o + \sum_{u,v=0}^{k-1}\sum_{c} \tilde x_{n,\,s i+u,\,s j+v,\,c}\;w_{u,v,c,o},
       \qquad \tilde x = x \text{ zero-padded by } p = (k-1)/2 \text{ on each side}, $$

    the cross-correlation ``lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`` (checked against it and against a numpy loop in
    ``tests/test_unet.py``), computed with GEMMs instead of XLA's CPU convolution (the module
    docstring says why):

    * stride 1, H >= 8: the k column shifts of the padded input (k C wide) times the k kernel rows
      side by side, (k C, k O); output row i sums block u of product row i + u;
    * stride 1, H < 8 (and stride 2): im2col, the k^2 shifted views concatenated on the channel axis
      in the (u, v) order of w's leading axes, times w reshaped (for free) to (k^2 C, O).

    At stride 1 the gradients are hand-written VJPs, also GEMMs.

    Args:
        x: input of shape (N, H, W, C).
        w: kernel of shape (k, k, C, O), k odd.
        b: bias of shape (O,), or None.
        stride: s >= 1; the output has spatial size ceil(H / s) x ceil(W / s).

    Returns:
        An array of shape (N, ceil(H / s), ceil(W / s), O) in the dtype of x.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.unet import conv2d
        >>> conv2d(jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 5)), stride=2).shape
        (2, 2, 2, 5)
        >>> float(conv2d(jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1)))[0, 1, 1, 0])  # 9 taps
        9.0
    """
    k = w.shape[0]
    c = x.shape[-1]
    if x.ndim != 4 or w.ndim != 4 or w.shape[1] != k or k % 2 == 0 or w.shape[2] != c:
        raise ValueError(f"conv2d needs x (N, H, W, C) and w (k, k, C, O) with k odd; got {x.shape}, {w.shape}")
    w = w.astype(x.dtype)
    if k == 1 and stride == 1:
        y = x @ w.reshape(c, -1)
    elif stride == 1:
        y = _conv_same(x, w)
    else:
        # the (small) downsampling convolution: plain autodiff of the strided patches
        y = _patches(x, k, stride) @ w.reshape(k * k * c, -1)
    if b is not None:
        y = y + b.astype(x.dtype)
    return y


# _PHASE_TAPS[p, d, u] = 1 when output row 2a + p of "upsample by 2, then 3x3 conv" reads kernel
# row u at input row a + d - 1: phase 0 reads rows a - 1 (u = 0) and a (u = 1, 2); phase 1 reads
# rows a (u = 0, 1) and a + 1 (u = 2). Columns likewise.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1), (0, 0, 0)), ((0, 0, 0), (1, 1, 0), (0, 0, 1)))


def upsample_conv2d(x, w, b=None):
    r"""Nearest-neighbour upsampling by 2 followed by a 3x3 'same' convolution, at x's resolution.

    With $U(x)_{2a+p,\,2b+q} = x_{a,b}$ ($p, q \in \{0, 1\}$) and $A$ the 0/1 phase table
    ``_PHASE_TAPS``,

    $$ \mathrm{conv}(U(x), w)_{2a+p,\,2b+q} = \sum_{d,e=0}^{2} \tilde x_{a+d,\,b+e}\;
       w^{(p,q)}_{d,e},\qquad w^{(p,q)}_{d,e} = \sum_{u,v} A_{p,d,u}\,A_{q,e,v}\,w_{u,v}, $$

    so one 3x3 [conv2d][probdiff.unet.conv2d] of x with the 4 phase kernels stacked on the output
    axis (4 O outputs), then a pixel shuffle, gives the result on a patch matrix 4x smaller than
    that of the upsampled image (checked against ``repeat`` + ``lax.conv_general_dilated`` in
    ``tests/test_unet.py``).

    Args:
        x: input of shape (N, H, W, C).
        w: kernel of shape (3, 3, C, O).
        b: bias of shape (O,), or None.

    Returns:
        An array of shape (N, 2 H, 2 W, O) in the dtype of x.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.unet import upsample_conv2d
        >>> upsample_conv2d(jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 5))).shape
        (2, 8, 8, 5)
    """
    n, h, wd, c = x.shape
    if w.shape[:3] != (3, 3, c):
        raise ValueError(f"upsample_conv2d needs w of shape (3, 3, C = {c}, O); got {w.shape}")
    o = w.shape[-1]
    a = jnp.asarray(_PHASE_TAPS, x.dtype)
    w_phase = jnp.einsum("pdu,qev,uvco->decpqo", a, a, w.astype(x.dtype)).reshape(3, 3, c, 4 * o)
    y = _conv_same(x, w_phase).reshape(n, h, wd, 2, 2, o)
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(n, 2 * h, 2 * wd, o)
    if b is not None:
        y = y + b.astype(x.dtype)
    return y


# --------------------------------------------------------------------------- normalisation
def group_norm(x, scale, bias, groups: int, *, eps: float = 1e-5):
    r"""Group normalisation of channels-last x (Wu & He 2018), one pass over x for both moments.

    $$ \mathrm{GN}(x)_{n,i,j,c} = \gamma_c\,\frac{x_{n,i,j,c} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)}
       + \varepsilon}} + \beta_c,\qquad \mu_{n,g} = \mathbb{E}_{i,j,\,c\in g}[x],\quad
       \sigma^2_{n,g} = \mathbb{E}_{i,j,\,c\in g}[x^2] - \mu_{n,g}^2 , $$

    the biased variance over the pixels and the C / G channels of group g, as in
    ``torch.nn.GroupNorm`` (checked against numpy in ``tests/test_unet.py``). The moments are
    accumulated in float32 at least; the sums run over the pixels first, per channel, then over
    the channels of a group.

    Args:
        x: input of shape (N, H, W, C).
        scale: gamma, shape (C,).
        bias: beta, shape (C,).
        groups: G, dividing C.
        eps: epsilon.

    Returns:
        An array shaped and typed like x.

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.unet import group_norm
        >>> y = group_norm(jnp.arange(16.0).reshape(1, 2, 2, 4), jnp.ones(4), jnp.zeros(4), 2)
        >>> y.shape, round(float(y.mean()), 6), round(float(y.var()), 3)
        ((1, 2, 2, 4), 0.0, 1.0)
    """
    n, h, w, c = x.shape
    if c % groups:
        raise ValueError(f"groups = {groups} must divide the number of channels {c}")
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.reshape(n, h * w, c).astype(acc)
    per_group = h * w * (c // groups)
    mean = jnp.sum(xf, axis=1).reshape(n, groups, -1).sum(-1) / per_group
    meansq = jnp.sum(xf * xf, axis=1).reshape(n, groups, -1).sum(-1) / per_group
    inv = jax.lax.rsqrt(jnp.maximum(meansq - mean * mean, 0.0) + eps)  # (N, G)
    a = jnp.repeat(inv, c // groups, axis=1) * scale.astype(acc)  # (N, C)
    shift = bias.astype(acc) - jnp.repeat(mean, c // groups, axis=1) * a
    return (x * a[:, None, None, :].astype(x.dtype) + shift[:, None, None, :].astype(x.dtype)).astype(x.dtype)


# --------------------------------------------------------------------------- layers
def _zeros(*shape):
    """Zeros in the default float dtype (float32, float64 under x64), without an XLA compilation."""
    return jnp.asarray(np.zeros(shape, jnp.result_type(float)))


@functools.partial(jax.jit, static_argnums=1)
def _lecun_normal(key, specs):
    """One N(0, 1 / fan_in) array per (shape, fan_in) in ``specs``, cut from a single normal draw:
    one small compilation for the whole network (a draw per array compiles for seconds)."""
    sizes = [math.prod(shape) for shape, _ in specs]
    flat = jax.random.normal(key, (sum(sizes),))
    offsets = np.cumsum([0] + sizes)
    return tuple(flat[o : o + n].reshape(shape) / math.sqrt(fan_in)
                 for o, n, (shape, fan_in) in zip(offsets[:-1].tolist(), sizes, specs, strict=True))


class _Recorder:
    """A stand-in for the weight supply that records the shapes asked for (first building pass)."""

    def __init__(self):
        self.specs = []

    def __call__(self, shape, fan_in):
        self.specs.append((tuple(shape), fan_in))


class _Supply:
    """Hands out the drawn weights in the order the recorder saw them (second building pass)."""

    def __init__(self, arrays):
        self._it = iter(arrays)

    def __call__(self, shape, fan_in):
        a = next(self._it)
        assert a.shape == tuple(shape)
        return a


class _Conv(eqx.Module):
    w: jax.Array
    b: jax.Array
    stride: int = eqx.field(static=True)

    def __init__(self, normal, c_in, c_out, k, *, stride=1, zero=False):
        # LeCun-normal initialisation, as the MLP; zero for the last conv
        self.w = _zeros(k, k, c_in, c_out) if zero else normal((k, k, c_in, c_out), k * k * c_in)
        self.b = _zeros(c_out)
        self.stride = stride

    def __call__(self, x):
        return conv2d(x, self.w, self.b, stride=self.stride)


class _GroupNorm(eqx.Module):
    scale: jax.Array
    bias: jax.Array
    groups: int = eqx.field(static=True)

    def __init__(self, c, groups):
        self.scale = jnp.asarray(np.ones(c, jnp.result_type(float)))
        self.bias = _zeros(c)
        self.groups = groups

    def __call__(self, x):
        return group_norm(x, self.scale, self.bias, self.groups)


class _ResBlock(eqx.Module):
    norm1: _GroupNorm
    conv1: _Conv
    time_w: jax.Array
    time_b: jax.Array
    norm2: _GroupNorm
    conv2: _Conv
    skip: _Conv | None

    def __init__(self, normal, c_in, c_out, emb_dim, groups):
        self.norm1 = _GroupNorm(c_in, groups)
        self.conv1 = _Conv(normal, c_in, c_out, 3)
        self.time_w = normal((emb_dim, c_out), emb_dim)
        self.time_b = _zeros(c_out)
        self.norm2 = _GroupNorm(c_out, groups)
        self.conv2 = _Conv(normal, c_out, c_out, 3)
        self.skip = _Conv(normal, c_in, c_out, 1) if c_in != c_out else None

    def __call__(self, x, emb):
        """x of shape (N, H, W, C_in); emb = SiLU(time MLP) of shape (1 or N, E)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + (emb @ self.time_w.astype(x.dtype) + self.time_b.astype(x.dtype))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


def _build(normal, channels, base, mults, time_dim, groups, learn_variance):
    """The UNet's layers, drawing every random weight from ``normal(shape, fan_in)`` in a fixed order."""
    emb_dim = 4 * base
    widths = [base * m for m in mults]
    parts = {"conv_in": _Conv(normal, channels, base, 3),
             "time_mlp": (normal((time_dim, emb_dim), time_dim), _zeros(emb_dim),
                          normal((emb_dim, emb_dim), emb_dim), _zeros(emb_dim))}
    down, downsample, up, upsample = [], [], [], []
    prev = base
    for i, wdt in enumerate(widths):
        down.append(_ResBlock(normal, prev, wdt, emb_dim, groups))
        if i < len(widths) - 1:
            downsample.append(_Conv(normal, wdt, wdt, 3, stride=2))
        prev = wdt
    parts["mid"] = _ResBlock(normal, prev, prev, emb_dim, groups)
    for i, wdt in enumerate(reversed(widths)):
        up.append(_ResBlock(normal, prev + wdt, wdt, emb_dim, groups))
        if i < len(widths) - 1:
            upsample.append(_Conv(normal, wdt, wdt, 3))
        prev = wdt
    parts.update(down=down, downsample=downsample, up=up, upsample=upsample)
    parts["norm_out"] = _GroupNorm(prev, groups)
    parts["conv_out"] = _Conv(normal, prev, (2 if learn_variance else 1) * channels, 3, zero=True)
    return parts


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


class UNet(eqx.Module):
    r"""A small DDPM-style UNet eps-network for images of shape (H, W, C), channels last.

    With $e = \mathrm{SiLU}(W_2\,\mathrm{SiLU}(W_1\,\mathrm{emb}(t) + b_1) + b_2)$ the time
    embedding ([sinusoidal_embedding][probdiff.nets.sinusoidal_embedding] of size ``time_dim``,
    then a 2-layer MLP of width 4 ``base``), every residual block is

    $$ \mathrm{Res}(h, e) = S h + \mathrm{conv}_2\big(\mathrm{SiLU}(\mathrm{GN}_2(
       \mathrm{conv}_1(\mathrm{SiLU}(\mathrm{GN}_1(h))) + V e + c))\big), $$

    with [group_norm][probdiff.unet.group_norm] GN, 3x3 [conv2d][probdiff.unet.conv2d]s, a per-block
    projection V of the embedding, and S the identity or a 1x1 conv when the width changes. The
    network: a 3x3 conv to ``base`` channels; per level l (width ``base * mults[l]``) one block,
    its output kept as a skip, then a stride-2 3x3 conv between levels; a middle block; the
    mirrored up path, each level one block on the concatenation [h, skip], then nearest
    upsampling and a 3x3 conv ([upsample_conv2d][probdiff.unet.upsample_conv2d]); finally
    GN, SiLU and a 3x3 conv to ``channels`` outputs. That last conv starts at zero, so an untrained
    network predicts eps = 0 (and p_theta(x_{t-1} | x_t) is the plain rescaling x_t / sqrt(alpha_t)).
    No BatchNorm and no mutable state. The module docstring says why the convolutions are matrix
    products and what that buys on CPU.

    Args:
        channels: C, the number of image channels (the last axis of x_t).
        key: a JAX PRNG key for the initialisation.
        base: width of the first level.
        mults: width multipliers per level; H and W must be divisible by 2**(len(mults) - 1).
        time_dim: size of the sinusoidal time embedding (even).
        groups: GroupNorm groups; must divide every normalised width (base and the level widths).
        learn_variance: if True the last conv has 2 C outputs and the network returns
            ``(eps, v)``, both shaped like x_t, v the unconstrained interpolation coefficient of a
            learned reverse variance (improved DDPM).

    Examples:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> from probdiff.unet import UNet
        >>> net = UNet(1, jax.random.key(0), base=8, mults=(1,), time_dim=16, groups=4)
        >>> x_t = jnp.ones((5, 8, 8, 1))
        >>> eps = eqx.filter_jit(net)(x_t, jnp.arange(5))  # one t per example
        >>> eps.shape, float(jnp.abs(eps).max())  # the last conv starts at zero
        ((5, 8, 8, 1), 0.0)
        >>> jax.eval_shape(net, x_t[0], 7).shape  # no batch axis, one t
        (8, 8, 1)
    """

    conv_in: _Conv
    time_mlp: tuple
    down: list
    downsample: list
    mid: _ResBlock
    up: list
    upsample: list
    norm_out: _GroupNorm
    conv_out: _Conv
    channels: int = eqx.field(static=True)
    time_dim: int = eqx.field(static=True)
    levels: int = eqx.field(static=True)
    learn_variance: bool = eqx.field(static=True)

    def __init__(self, channels: int, key, *, base: int = 32, mults=(1, 2), time_dim: int = 64,
                 groups: int = 8, learn_variance: bool = False):
        for name, value in (("channels", channels), ("base", base), ("time_dim", time_dim), ("groups", groups)):
            _check_size(name, value)
        if time_dim % 2:
            raise ValueError(f"time_dim must be even (a sin and a cos half); got {time_dim}")
        try:
            mults = tuple(mults)
        except TypeError:
            mults = None
        if not mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
            raise ValueError(f"mults must be a non-empty sequence of positive integers; got {mults!r}")
        widths = [base * m for m in mults]
        normed = {base, *widths}  # GN inputs: base, every level width, and the [h, skip] concatenations
        prev = widths[-1]
        for wdt in reversed(widths):
            normed.add(prev + wdt)
            prev = wdt
        bad = sorted(c for c in normed if c % groups)
        if bad:
            raise ValueError(f"groups = {groups} must divide every normalised width {sorted(normed)}; "
                             f"it does not divide {bad}")
        args = (channels, base, mults, time_dim, groups, learn_variance)
        recorder = _Recorder()
        _build(recorder, *args)
        parts = _build(_Supply(_lecun_normal(key, tuple(recorder.specs))), *args)
        for name, value in parts.items():
            setattr(self, name, value)
        self.channels = channels
        self.time_dim = time_dim
        self.levels = len(mults)
        self.learn_variance = bool(learn_variance)

    def __call__(self, x_t, t):
        """eps_theta(x_t, t) for x_t of shape ``batch + (H, W, C)`` and t broadcasting over ``batch``
        (integer steps; float t for the probability-flow ODE); ``(eps, v)`` when ``learn_variance``.
        Computed in x_t's floating dtype."""
        x_t = jnp.asarray(x_t)
        if x_t.ndim < 3 or x_t.shape[-1] != self.channels:
            raise ValueError(f"x_t must have shape batch + (H, W, C) with C = channels = {self.channels}; "
                             f"got shape {x_t.shape}")
        if not jnp.issubdtype(x_t.dtype, jnp.floating):
            raise ValueError(f"x_t must be a floating-point array; got dtype {x_t.dtype}")
        f = 2 ** (self.levels - 1)
        if x_t.shape[-3] % f or x_t.shape[-2] % f:
            raise ValueError(f"x_t's height and width must be divisible by 2**(len(mults) - 1) = {f}; "
                             f"got shape {x_t.shape}")
        t = jnp.asarray(t)
        if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
            raise ValueError(f"t must be an array of time steps (integers, or floats in continuous time); got dtype {t.dtype}")
        batch = x_t.shape[:-3]
        try:
            ok = jnp.broadcast_shapes(t.shape, batch) == batch
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"t of shape {t.shape} does not broadcast over x_t's batch shape {batch}")
        dtype = x_t.dtype
        x = x_t.reshape((-1,) + x_t.shape[-3:])
        # one embedding row when t is shared by the whole batch, else one per example
        tt = t.reshape(1) if t.size == 1 else jnp.broadcast_to(t, batch).reshape(-1)
        w1, b1, w2, b2 = (a.astype(dtype) for a in self.time_mlp)
        e = sinusoidal_embedding(tt, self.time_dim).astype(dtype)
        emb = jax.nn.silu(jax.nn.silu(e @ w1 + b1) @ w2 + b2)

        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb)
            if i < len(self.upsample):
                h = upsample_conv2d(h, self.upsample[i].w, self.upsample[i].b)
        out = self.conv_out(jax.nn.silu(self.norm_out(h)))
        if self.learn_variance:
            c = self.channels
            return out[..., :c].reshape(x_t.shape), out[..., c:].reshape(x_t.shape)
        return out.reshape(x_t.shape)
