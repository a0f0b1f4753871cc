r"""Noise-prediction networks eps_theta(x_t, t) as Equinox modules (MATH.md C4).

Every network here is called as ``net(x_t, t)`` with ``x_t`` of shape ``batch + event`` and an
integer ``t`` that broadcasts over ``batch`` (a scalar or one t per example), which is the
``eps_fn`` contract of [GaussianDiffusion][probdiff.GaussianDiffusion]. The batch dimensions
are handled by matrix products, not by ``vmap``, so one call evaluates a whole batch. Register
one inside a NumPyro model with ``numpyro.contrib.module.eqx_module("eps_net", net)`` to train
its parameters with ``SVI``.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["sinusoidal_embedding", "MLP", "DenseNet", "MixedPrecision"]


def sinusoidal_embedding(t, dim: int, *, max_period: float = 10_000.0):
    r"""The sinusoidal encoding of the time step t (Vaswani et al. 2017; DDPM's time input, C4).

    $$ e(t)_{i} = \sin\!\big(t\,\omega_i\big),\quad e(t)_{i + d/2} = \cos\!\big(t\,\omega_i\big),
       \qquad \omega_i = \text{max\_period}^{-i/(d/2)},\quad i = 0..d/2-1 . $$

    Args:
        t: time steps, any shape (integers or floats).
        dim: embedding size d, even and >= 2.
        max_period: the longest period, 10000 by default.

    Returns:
        An array of shape ``t.shape + (dim,)``, float32 (float64 under ``jax_enable_x64``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.nets import sinusoidal_embedding
        >>> sinusoidal_embedding(jnp.array([0, 5]), 4).shape
        (2, 4)
    """
    if not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2; got {dim!r}")
    if not max_period > 1:
        raise ValueError(f"max_period must be > 1; got {max_period}")
    half = dim // 2
    t = jnp.asarray(t)
    dtype = jnp.result_type(float)
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dtype) / half)
    angles = t.astype(dtype)[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class MLP(eqx.Module):
    r"""An eps-network for vector data: an MLP on x_t with a sinusoidal embedding of t.

    $$ h_0 = W_0 x_t + b_0 + U\,e(t),\qquad h_{k} = W_k\,\mathrm{SiLU}(h_{k-1}) + b_k,\qquad
       \epsilon_\theta(x_t, t) = h_L , $$

    with e(t) from [sinusoidal_embedding][probdiff.nets.sinusoidal_embedding] and U a learned
    projection. The last layer starts at zero, so an untrained network predicts eps = 0 and
    its p_theta(x_{t-1} | x_t) is the plain rescaling x_t / sqrt(alpha_t).

    With ``learn_variance=True`` the last layer has 2D outputs and the network returns the
    pair ``(eps, v)``: v sets a learned sigma_t^2 for ``GaussianDiffusion(...,
    variance="learned")`` (see [learned_log_variance][probdiff.distributions.learned_log_variance]);
    it starts at v = 0, the geometric mean of beta_t and beta_tilde_t.

    Args:
        data_dim: D, the size of x_t's last axis.
        key: a JAX PRNG key for the initialisation.
        hidden: widths of the hidden layers.
        time_dim: size of the time embedding.
        learn_variance: also output v (the network then returns ``(eps, v)``).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.nets import MLP
        >>> net = MLP(2, jax.random.key(0), hidden=(16, 16))
        >>> net(jnp.ones((5, 2)), 3).shape
        (5, 2)
    """

    weights: list
    biases: list
    time_proj: jax.Array
    time_dim: int = eqx.field(static=True)
    learn_variance: bool = eqx.field(static=True)

    def __init__(
        self, data_dim: int, key, *, hidden=(256, 256, 256), time_dim: int = 32, learn_variance: bool = False
    ):
        if not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer; got {data_dim!r}")
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty sequence of positive widths; got {hidden}")
        sizes = (data_dim,) + hidden + (data_dim * (2 if learn_variance else 1),)
        keys = jax.random.split(key, len(sizes))
        weights, biases = [], []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if i == len(sizes) - 2:
                w = jnp.zeros((n_out, n_in))
            else:  # LeCun-normal initialisation, suited to SiLU
                w = jax.random.normal(keys[i], (n_out, n_in)) / math.sqrt(n_in)
            weights.append(w)
            biases.append(jnp.zeros((n_out,)))
        self.weights = weights
        self.biases = biases
        self.time_proj = jax.random.normal(keys[-1], (hidden[0], time_dim)) / math.sqrt(time_dim)
        self.time_dim = time_dim
        self.learn_variance = bool(learn_variance)

    def __call__(self, x_t, t):
        """eps_theta(x_t, t) for x_t of shape ``batch + (D,)`` and t broadcasting over ``batch``.

        Returns eps, or ``(eps, v)`` when built with ``learn_variance=True``.
        """
        x_t = jnp.asarray(x_t)
        if x_t.ndim < 1 or x_t.shape[-1] != self.weights[0].shape[1]:
            raise ValueError(
                f"x_t must have last axis D = {self.weights[0].shape[1]}; got shape {x_t.shape}"
            )
        emb = sinusoidal_embedding(jnp.broadcast_to(jnp.asarray(t), x_t.shape[:-1]), self.time_dim)
        h = x_t @ self.weights[0].T + self.biases[0] + emb.astype(x_t.dtype) @ self.time_proj.T
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = jax.nn.silu(h) @ w.T + b
        if self.learn_variance:
            D = x_t.shape[-1]
            return h[..., :D], h[..., D:]
        return h


class DenseNet(eqx.Module):
    r"""A fully connected network from R^{d_in} to R^{d_out}, optionally conditioned on a step t.

    $$ h_0 = W_0 x + b_0\;[+\,U\,e(t)],\qquad h_k = W_k\,\mathrm{SiLU}(h_{k-1}) + b_k,\qquad
       f(x, t) = h_L , $$

    with e(t) from [sinusoidal_embedding][probdiff.nets.sinusoidal_embedding] when
    ``time_dim > 0``. The encoders and decoders of [probdiff.vae][probdiff.vae] are built on
    it. The last layer starts at zero, so an untrained network outputs 0.

    Args:
        in_dim: d_in, the size of x's last axis.
        out_dim: d_out.
        key: a JAX PRNG key for the initialisation.
        hidden: widths of the hidden layers.
        time_dim: size of the time embedding; 0 (default) for a network of x alone.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.nets import DenseNet
        >>> DenseNet(3, 5, jax.random.key(0), hidden=(8,))(jnp.ones((4, 3))).shape
        (4, 5)
    """

    weights: list
    biases: list
    time_proj: jax.Array | None
    time_dim: int = eqx.field(static=True)

    def __init__(self, in_dim: int, out_dim: int, key, *, hidden=(128, 128), time_dim: int = 0):
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(time_dim, bool) or not isinstance(time_dim, int) or time_dim < 0 or time_dim % 2:
            raise ValueError(f"time_dim must be a non-negative even integer; got {time_dim!r}")
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty sequence of positive widths; got {hidden}")
        sizes = (in_dim,) + hidden + (out_dim,)
        keys = jax.random.split(key, len(sizes))
        weights, biases = [], []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == len(sizes) - 2
            weights.append(jnp.zeros((n_out, n_in)) if last else jax.random.normal(keys[i], (n_out, n_in)) / math.sqrt(n_in))
            biases.append(jnp.zeros((n_out,)))
        self.weights = weights
        self.biases = biases
        self.time_dim = time_dim
        self.time_proj = jax.random.normal(keys[-1], (hidden[0], time_dim)) / math.sqrt(time_dim) if time_dim else None

    def __call__(self, x, t=None):
        """f(x, t) for x of shape ``batch + (d_in,)``; t (needed iff ``time_dim > 0``) broadcasts over batch."""
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.weights[0].shape[1]:
            raise ValueError(f"x must have last axis d_in = {self.weights[0].shape[1]}; got shape {x.shape}")
        h = x @ self.weights[0].T + self.biases[0]
        if self.time_dim:
            if t is None:
                raise ValueError("this DenseNet was built with time_dim > 0: call it as net(x, t)")
            emb = sinusoidal_embedding(jnp.broadcast_to(jnp.asarray(t), x.shape[:-1]), self.time_dim)
            h = h + emb.astype(x.dtype) @ self.time_proj.T
        elif t is not None:
            raise ValueError("this DenseNet takes no t (time_dim = 0); build it with time_dim > 0")
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = jax.nn.silu(h) @ w.T + b
        return h


class MixedPrecision(eqx.Module):
    r"""Run an eps-network in a low-precision dtype (bf16) while everything around it stays float32.

    $$ \hat\epsilon = \mathrm{cast}_{\,x_t.\mathrm{dtype}}\Big(\epsilon_{\mathrm{cast}_c(\theta)}
       \big(\mathrm{cast}_c(x_t),\, t\big)\Big), $$

    with c the compute dtype. The parameters theta stay in float32 (the optimiser updates a float32
    master copy; their gradients arrive in float32 through the casts), and so do x_t and eps-hat
    outside the network: the ELBO's KL terms, the posterior means mu_tilde_t and the samplers'
    updates are float32 arithmetic. bf16 has float32's exponent range, so no loss scaling is
    needed; its 8-bit mantissa gives eps-hat a relative rounding of about 2^-8. That is harmless
    for eps- and v-prediction; an x_0-predicting network's rounding is multiplied by up to
    1/sqrt(1 - alpha_bar_1) ~ 100 in the eps it implies (on Gaussian data with the exact network,
    0.23 nats of ELBO lost at T = 1000), so the recipes refuse bf16 with ``x0``.

    Wrap the registered network, not the one you register, so that the parameters (and the
    checkpoints) are those of the float32 network::

        net = MixedPrecision(eqx_module("eps_net", net0))

    Args:
        net: any network of this module or [UNet][probdiff.unet.UNet] (``net(x_t, t)``).
        compute_dtype: ``"bfloat16"`` (default) or ``"float32"`` (the identity, unless
            ``jax_enable_x64`` made the network float64: it is then computed in float32).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.nets import MLP, MixedPrecision
        >>> net = MixedPrecision(MLP(2, jax.random.key(0), hidden=(16, 16)))
        >>> net(jnp.ones((5, 2)), 3).dtype
        dtype('float32')
    """

    net: eqx.Module
    compute_dtype: str = eqx.field(static=True)

    def __init__(self, net, compute_dtype: str = "bfloat16"):
        name = jnp.dtype(compute_dtype).name if _is_dtype(compute_dtype) else None
        if name not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16 or float32; got {compute_dtype!r}")
        if not callable(net):
            raise ValueError(f"net must be a callable eps-network net(x_t, t); got {type(net).__name__}")
        self.net = net
        self.compute_dtype = name

    def __call__(self, x_t, t):
        """eps_theta(x_t, t) computed in ``compute_dtype``, returned in x_t's dtype."""
        x_t = jnp.asarray(x_t)
        if not jnp.issubdtype(x_t.dtype, jnp.floating):
            raise ValueError(f"x_t must be a floating-point array; got dtype {x_t.dtype}")
        low = jnp.dtype(self.compute_dtype)
        net = jax.tree_util.tree_map(
            lambda a: a.astype(low) if eqx.is_inexact_array(a) else a, self.net
        )
        t = jnp.asarray(t)
        out = net(x_t.astype(low), t)
        return jax.tree_util.tree_map(lambda o: o.astype(x_t.dtype), out)


def _is_dtype(d) -> bool:
    try:
        jnp.dtype(d)
    except TypeError:
        return False
    return True
