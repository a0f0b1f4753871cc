r"""Normalizing flows as NumPyro distributions, built on distrax bijectors (MATH.md F1-F3).

A flow is a bijection f between the data x and a latent z with a simple density p_z, written as
a composition of layers f = f_K o ... o f_1, with h_0 = x, h_k = f_k(h_{k-1}) and z = h_K. The
change of variables (F1) gives the exact log-density

$$ \log p_x(x) = \log p_z\big(f(x)\big) + \log\Big|\det\frac{\partial f}{\partial x}(x)\Big|
   = \log p_z(z) + \sum_{k=1}^{K}\log\Big|\det\frac{\partial f_k}{\partial h_{k-1}}(h_{k-1})\Big| , $$

and samples are x = g(z) = f^{-1}(z) = f_1^{-1}(... f_K^{-1}(z)), z ~ p_z. Each layer is a
[distrax](https://github.com/google-deepmind/distrax) ``Bijector`` whose ``forward_and_log_det``
returns h_k and its log-determinant in one pass.

**Direction.** As in NICE, RealNVP and Glow (and in MATH.md F1), every layer's *forward* map
goes from the data side to the latent side, and [Flow][probdiff.flows.Flow] takes the layers
in that order (f_1 first): ``log_prob`` runs only forward passes, ``sample`` only inverses. The
generator g = f^{-1} (z to x), the direction that ``distrax.Transformed`` and NumPyro's
``TransformedDistribution`` expect of their bijector, is [Flow.bijector][probdiff.flows.Flow.bijector];
``distrax.Transformed(base, flow.bijector)`` is the same distribution.

| name | what | log-determinant of one layer |
|---|---|---|
| [Flow][probdiff.flows.Flow] | the flow as a NumPyro distribution (``sample``, ``log_prob``, an observed site under ``SVI``) | the sum over layers (F1) |
| [BijectorTransform][probdiff.flows.BijectorTransform] | any distrax bijector as a ``numpyro.distributions.transforms.Transform`` | the bijector's |
| [AdditiveCoupling][probdiff.flows.AdditiveCoupling] | NICE: y_B = x_B + t(x_A), y_A = x_A | 0 (volume preserving) |
| [AffineCoupling][probdiff.flows.AffineCoupling] | RealNVP: y_B = x_B exp(s(x_A)) + t(x_A), s bounded by c tanh(./c) | sum s(x_A) |
| [Permute][probdiff.flows.Permute], [Reverse][probdiff.flows.Reverse] | a fixed permutation of the last axis between couplings | 0 |
| [ActNorm][probdiff.flows.ActNorm] | Glow's per-channel y = s x + b with a data-dependent initialisation | (pixels) sum log abs(s) |
| [Conv1x1][probdiff.flows.Conv1x1], [Conv1x1LU][probdiff.flows.Conv1x1LU] | Glow's invertible 1x1 convolution y[h,w] = W x[h,w], W free or W = P L (U + diag s) | H W log abs(det W) |
| [Squeeze][probdiff.flows.Squeeze] | space-to-depth (H, W, C) -> (H/2, W/2, 4C) | 0 |
| [MultiscaleSplit][probdiff.flows.MultiscaleSplit] | half of the channels leave for the latent, the rest go through more layers | the inner layers' |

A coupling layer's Jacobian is triangular: with x split into a conditioning part x_A and a
transformed part x_B, dy_A/dx_A = I, dy_A/dx_B = 0 and dy_B/dx_B is diagonal, so its
determinant is the product of the diagonal, whatever the networks s and t compute (F2). The
networks ("conditioners") are any callables: a plain function, an equinox module such as
[probdiff.nets.MLP][probdiff.nets.MLP] (called with t = 0: its time input is unused here),
registered in a NumPyro model with ``numpyro.contrib.module.eqx_module``.

A flow is a distribution like any other in a model; with the data observed and no latent sites,
``Trace_ELBO`` is minus the log-likelihood and ``SVI`` fits the flow by maximum likelihood:

    def model(x):
        nets = [eqx_module(f"net{k}", net) for k, net in enumerate(nets0)]
        layers = [AffineCoupling(n, mask=checkerboard_mask((2,), k % 2)) for k, n in enumerate(nets)]
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Flow(layers, (2,)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(1e-3), Trace_ELBO())

Parameters that are plain arrays (ActNorm's scale, a 1x1 kernel) come from ``numpyro.param``
and the layer is built inside the model; [initialize_actnorms][probdiff.flows.initialize_actnorms]
gives their data-dependent starting values. ``examples/flow_2d.py`` trains RealNVP and NICE on a
2-D mixture; ``tests/test_flows.py`` checks every layer and composed flows against ``jax.jacfwd``
and ``slogdet``.

Layers check what can be checked: shapes always (they are static under ``jit``), values (a zero
scale, a singular kernel) when they are concrete, as in the rest of probdiff.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform
from numpyro.distributions.util import validate_sample

from probdiff._checks import check_event, check_event_shape, is_concrete
from probdiff.nets import MLP

__all__ = [
    "Flow",
    "BijectorTransform",
    "AdditiveCoupling",
    "AffineCoupling",
    "Permute",
    "Reverse",
    "ActNorm",
    "Conv1x1",
    "Conv1x1LU",
    "Squeeze",
    "MultiscaleSplit",
    "checkerboard_mask",
    "random_rotation",
    "initialize_actnorms",
]


# --------------------------------------------------------------------------- helpers
def _check_rank(x, event_ndims: int, who: str, axes: str = ""):
    """The batch shape of x (all axes before the last ``event_ndims``); a clear error for too few axes."""
    shape = jnp.shape(x)
    if len(shape) < event_ndims:
        what = f" {axes}" if axes else ""
        raise ValueError(
            f"{who} acts on events with {event_ndims} axes{what} (event_ndims = {event_ndims}); "
            f"got an input of shape {tuple(shape)}"
        )
    return tuple(shape[: len(shape) - event_ndims])


def _sum_last(a, n: int):
    return jnp.sum(a, axis=tuple(range(a.ndim - n, a.ndim))) if n else a


def _check_event_ndims(event_ndims, low: int = 1) -> int:
    if isinstance(event_ndims, bool) or not isinstance(event_ndims, int | np.integer) or event_ndims < low:
        raise ValueError(f"event_ndims must be an int >= {low}; got {event_ndims!r}")
    return int(event_ndims)


def _finite_or_raise(a, name: str, who: str):
    """Raise if a concrete ``a`` holds NaN or infinity (skipped under jit/vmap/grad)."""
    if a is not None and is_concrete(a):
        v = np.asarray(a)
        bad = ~np.isfinite(v)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{who}: {name} must be finite; found {v[index]} at index {index}")


def _call_conditioner(conditioner, x_a):
    """conditioner(x_A); a probdiff.nets.MLP (an eps-network with a time input) is called with t = 0."""
    if isinstance(conditioner, MLP):
        return conditioner(x_a, 0)
    return conditioner(x_a)


def _pixels(event_shape) -> int:
    """The number of positions a per-channel layer acts on: the product of all event axes but the last."""
    return math.prod(event_shape[:-1])


# --------------------------------------------------------------------------- the adapter
class BijectorTransform(Transform):
    r"""A distrax bijector as a NumPyro ``Transform``: y = f(x) and log|det df/dx|.

    $$ \texttt{t(x)} = f(x),\qquad \texttt{t.inv(y)} = f^{-1}(y),\qquad
       \texttt{t.log\_abs\_det\_jacobian(x, y)} = \log\Big|\det\frac{\partial f}{\partial x}(x)\Big| , $$

    computed by the bijector's own ``forward``, ``inverse`` and ``forward_log_det_jacobian``.
    The domain and codomain are ``independent(real, n)`` with n the bijector's
    ``event_ndims_in`` and ``event_ndims_out``, so ``TransformedDistribution(base,
    BijectorTransform(g))`` is ``distrax.Transformed(base, g)`` as a NumPyro distribution. A
    shape-changing bijector (such as [Squeeze][probdiff.flows.Squeeze]) reports its shapes
    through ``forward_shape``/``inverse_shape``, found by ``jax.eval_shape`` (no computation).
    ``call_with_intermediates`` returns the log-determinant with the output, so
    ``TransformedDistribution.sample_with_intermediates`` and ``log_prob(y, intermediates)``
    reuse it instead of a second pass.

    The transform is a pytree whose one leaf is the bijector (itself a pytree: distrax
    bijectors are ``Jittable``, and an equinox conditioner inside contributes its arrays), so it
    passes through ``jit``, ``vmap`` and ``grad``, and NumPyro can flatten the distributions
    that hold it.

    Args:
        bijector: a ``distrax.Bijector``.
        event_shapes: optionally the known pair ``(event_shape_in, event_shape_out)``, which
            spares ``forward_shape``/``inverse_shape`` their abstract evaluation.

    Examples:
        >>> import distrax, jax.numpy as jnp
        >>> from probdiff.flows import BijectorTransform
        >>> t = BijectorTransform(distrax.Block(distrax.ScalarAffine(0.0, 2.0), 1))
        >>> x = jnp.ones(3)
        >>> t(x).tolist(), float(t.log_abs_det_jacobian(x, t(x)))   # 3 log 2
        ([2.0, 2.0, 2.0], 2.0794...)
    """

    def __init__(self, bijector: distrax.Bijector, *, event_shapes=None):
        if not isinstance(bijector, distrax.Bijector):
            raise TypeError(f"bijector must be a distrax.Bijector; got {type(bijector).__name__}")
        self.bijector = bijector
        if event_shapes is not None:
            event_shapes = (tuple(int(n) for n in event_shapes[0]), tuple(int(n) for n in event_shapes[1]))
        self.event_shapes = event_shapes

    # pytree: the bijector is the one child; the static shapes are auxiliary data (a tuple, hashable)
    def tree_flatten(self):
        return (self.bijector,), (self.event_shapes,)

    @classmethod
    def tree_unflatten(cls, aux_data, params):
        self = cls.__new__(cls)
        self.bijector = params[0]
        self.event_shapes = aux_data[0]
        return self

    @property
    def domain(self):
        n = self.bijector.event_ndims_in
        return constraints.independent(constraints.real, n) if n else constraints.real

    @property
    def codomain(self):
        n = self.bijector.event_ndims_out
        return constraints.independent(constraints.real, n) if n else constraints.real

    def __call__(self, x):
        return self.bijector.forward(x)

    def _inverse(self, y):
        return self.bijector.inverse(y)

    def call_with_intermediates(self, x):
        return self.bijector.forward_and_log_det(x)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        if intermediates is not None:
            return intermediates
        return self.bijector.forward_log_det_jacobian(x)

    def _shape(self, shape, forward: bool):
        shape = tuple(shape)
        n_from = self.bijector.event_ndims_in if forward else self.bijector.event_ndims_out
        if len(shape) < n_from:
            raise ValueError(
                f"{type(self.bijector).__name__} acts on events with {n_from} axes; got shape {shape}"
            )
        batch, event = shape[: len(shape) - n_from], shape[len(shape) - n_from:]
        if self.event_shapes is not None:
            known_from, known_to = self.event_shapes if forward else self.event_shapes[::-1]
            if event == known_from:
                return batch + known_to
        fn = self.bijector.forward if forward else self.bijector.inverse
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(event, jnp.result_type(float)))
        return batch + tuple(out.shape)

    def forward_shape(self, shape):
        return self._shape(shape, True)

    def inverse_shape(self, shape):
        return self._shape(shape, False)

    def eq(self, other, static: bool = False):
        return self is other


# --------------------------------------------------------------------------- couplings
def checkerboard_mask(event_shape, parity: int = 0) -> np.ndarray:
    r"""A boolean coupling mask that alternates along the event: True marks x_A (kept), False x_B.

    $$ m_i = \big[(i_1 + \dots + i_{n-1}) \bmod 2 = \text{parity}\big] $$

    over the event axes but the last (the channels), broadcast across the channels; for a vector
    event (D,) it alternates along the vector itself, m_i = [i mod 2 = parity]. Two couplings
    with parities 0 and 1 transform every coordinate once (RealNVP's checkerboard).

    Args:
        event_shape: the event shape, e.g. ``(D,)`` or ``(H, W, C)``.
        parity: 0 or 1.

    Returns:
        a numpy bool array of shape ``event_shape``.

    Examples:
        >>> from probdiff.flows import checkerboard_mask
        >>> checkerboard_mask((4,)).tolist()
        [True, False, True, False]
    """
    event_shape = check_event_shape(event_shape)
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1; got {parity!r}")
    if len(event_shape) == 1:
        return (np.arange(event_shape[0]) % 2) == parity
    grids = np.indices(event_shape[:-1]).sum(0)
    m = (grids % 2) == parity
    return np.broadcast_to(m[..., None], event_shape).copy()


class _Coupling(distrax.Bijector):
    """The partition x = (x_A, x_B) shared by the couplings: by a mask, or by a split of the last axis."""

    _n_params = 1
    _what = "t(x_A)"

    def __init__(self, conditioner, *, mask=None, split=None, swap=False, event_ndims=None, log_det_constant=False):
        name = type(self).__name__
        if not callable(conditioner):
            raise TypeError(f"{name}: conditioner must be a callable x_A -> parameters; got {type(conditioner).__name__}")
        if (mask is None) == (split is None):
            raise ValueError(f"{name}: give exactly one of mask (an event-shaped boolean array) or split (an int)")
        if mask is not None:
            m = np.asarray(mask)
            if m.ndim == 0 or not (m.dtype == bool or np.isin(m, (0, 1)).all()):
                raise ValueError(
                    f"{name}: mask must be an array of booleans (True = x_A, kept; False = x_B, transformed) "
                    f"with the event's shape; got {mask!r}"
                )
            m = m.astype(bool)
            if m.all() or not m.any():
                raise ValueError(
                    f"{name}: mask must mark some entries True (x_A, kept) and some False (x_B, transformed); "
                    f"got all {bool(m.flat[0])}"
                )
            event_ndims = m.ndim if event_ndims is None else _check_event_ndims(event_ndims)
            if event_ndims < m.ndim:
                raise ValueError(f"{name}: event_ndims ({event_ndims}) must be at least mask.ndim ({m.ndim})")
            # stored as static Python values, so the mask is a compile-time constant under jit
            self.mask_shape = tuple(m.shape)
            self.mask_bits = tuple(bool(b) for b in m.ravel())
            self.split = None
        else:
            if isinstance(split, bool) or not isinstance(split, int | np.integer) or split < 1:
                raise ValueError(f"{name}: split must be an int >= 1 (x_A = x[..., :split]); got {split!r}")
            self.split = int(split)
            self.mask_shape = self.mask_bits = None
            event_ndims = 1 if event_ndims is None else _check_event_ndims(event_ndims)
        self.swap = bool(swap)
        self.conditioner = conditioner
        super().__init__(event_ndims_in=event_ndims, is_constant_log_det=log_det_constant)

    @property
    def mask(self):
        """The boolean mask (True: x_A, kept), or None for a split coupling."""
        if self.mask_bits is None:
            return None
        return np.array(self.mask_bits, dtype=bool).reshape(self.mask_shape)

    def _partition(self, x):
        name = type(self).__name__
        _check_rank(x, self.event_ndims_in, name)
        shape = jnp.shape(x)
        if self.split is None:
            m = self.mask
            if tuple(shape[len(shape) - m.ndim:]) != m.shape:
                raise ValueError(
                    f"{name}: the mask has shape {m.shape} but the event's trailing axes are "
                    f"{tuple(shape[len(shape) - m.ndim:])} (input shape {tuple(shape)}); they must match"
                )
            keep = ~m if self.swap else m
            return jnp.where(keep, x, jnp.zeros((), x.dtype)), x, keep
        c = shape[-1]
        if not self.split < c:
            raise ValueError(
                f"{name}: split must lie in 1..C-1 for events whose last axis has C = {c} entries; got split = {self.split}"
            )
        x1, x2 = x[..., : self.split], x[..., self.split:]
        return (x2, x1, None) if self.swap else (x1, x2, None)

    def _join(self, x, x_a, y_b, keep):
        if keep is not None:
            return jnp.where(keep, x, y_b)
        return jnp.concatenate([y_b, x_a] if self.swap else [x_a, y_b], axis=-1)

    def _sum_log_det(self, ld, keep):
        if keep is not None:
            ld = jnp.where(keep, jnp.zeros((), ld.dtype), ld)
        return _sum_last(ld, self.event_ndims_in)

    def _params(self, x_a, b_shape):
        """The conditioner's output as ``_n_params`` arrays of x_B's shape (one array with a last
        axis _n_params times x_B's is split along it)."""
        name = type(self).__name__
        out = _call_conditioner(self.conditioner, x_a)
        if isinstance(out, tuple | list):
            parts = [jnp.asarray(p) for p in out]
        else:
            out = jnp.asarray(out)
            k = self._n_params
            if k > 1 and out.shape == b_shape[:-1] + (k * b_shape[-1],):
                parts = list(jnp.split(out, k, axis=-1))
            else:
                parts = [out]
        if len(parts) != self._n_params or any(p.shape != b_shape for p in parts):
            expected = (f"{self._n_params} arrays of shape {b_shape} (x_B's shape), or one array of shape "
                        f"{b_shape[:-1] + (self._n_params * b_shape[-1],)}") if self._n_params > 1 else f"an array of shape {b_shape} (x_B's shape)"
            got = [tuple(p.shape) for p in parts]
            raise ValueError(f"{name}: the conditioner must return {self._what}: {expected}; got shapes {got}")
        return parts

    def _inner(self, x_a, b_shape) -> distrax.Bijector:
        raise NotImplementedError

    def forward_and_log_det(self, x):
        x_a, x_b, keep = self._partition(x)
        y_b, ld = self._inner(x_a, x_b.shape).forward_and_log_det(x_b)
        return self._join(x, x_a, y_b, keep), self._sum_log_det(ld, keep)

    def inverse_and_log_det(self, y):
        y_a, y_b, keep = self._partition(y)
        x_b, ld = self._inner(y_a, y_b.shape).inverse_and_log_det(y_b)
        return self._join(y, y_a, x_b, keep), self._sum_log_det(ld, keep)


class AdditiveCoupling(_Coupling):
    r"""NICE's additive coupling layer (Dinh et al. 2015; MATH.md F2).

    $$ y_A = x_A,\qquad y_B = x_B + t(x_A),\qquad
       \frac{\partial y}{\partial x} = \begin{pmatrix} I & 0\\ \partial t/\partial x_A & I\end{pmatrix},
       \qquad \log|\det J| = 0 , $$

    inverse x_B = y_B - t(y_A). Volume preserving: NICE ends its stack with a diagonal scaling,
    an [ActNorm][probdiff.flows.ActNorm] on vectors. The partition is a ``mask`` (True: x_A,
    kept) or a ``split`` of the last axis (x_A = x[..., :split], or the rest with ``swap``).

    Args:
        conditioner: t, a callable on x_A with its batch axes. With a mask it receives the whole
            event with x_B zeroed (``where(mask, x, 0)``) and returns an event-shaped array (its
            x_A entries are ignored); with a split it receives x_A and returns an array shaped
            like x_B. A [probdiff.nets.MLP][probdiff.nets.MLP] is called with t = 0.
        mask: a boolean array whose shape is the event's trailing axes, e.g. from
            [checkerboard_mask][probdiff.flows.checkerboard_mask].
        split: instead, the size of x_A along the last axis (1 <= split < C).
        swap: condition on the other part (x_B := x[..., :split] with a split, or ~mask).
        event_ndims: the event's number of axes (default ``mask.ndim``, or 1 with a split).
    """

    _n_params = 1
    _what = "the shift t(x_A)"

    def __init__(self, conditioner: Callable, *, mask=None, split=None, swap: bool = False, event_ndims=None):
        super().__init__(conditioner, mask=mask, split=split, swap=swap, event_ndims=event_ndims, log_det_constant=True)

    def _inner(self, x_a, b_shape):
        (t,) = self._params(x_a, b_shape)
        _finite_or_raise(t, "the shift t(x_A)", "AdditiveCoupling")
        return distrax.Shift(t)


class AffineCoupling(_Coupling):
    r"""RealNVP's affine coupling layer with a bounded log-scale (Dinh et al. 2017; MATH.md F2).

    $$ y_A = x_A,\qquad y_B = x_B \odot \exp\big(s(x_A)\big) + t(x_A),\qquad
       \log|\det J| = \sum_{i\in B} s_i(x_A), $$

    inverse x_B = (y_B - t(y_A)) exp(-s(y_A)). The Jacobian is block triangular with diagonal
    exp(s) on B, so the log-determinant is the sum of s over x_B, whatever the networks
    compute. The conditioner's raw log-scale r is bounded as s = c tanh(r / c), c =
    ``max_log_scale`` (identity near 0; the scale stays in (e^-c, e^c), which keeps training
    stable); ``max_log_scale=None`` takes s = r. The inner map is ``distrax.ScalarAffine``.

    Args:
        conditioner: (t, r) as a callable on x_A with its batch axes: it returns a pair of
            arrays shaped like x_B (with a mask: like the event, x_A entries ignored), or one
            array whose last axis is twice x_B's, split as [t, r]. A
            [probdiff.nets.MLP][probdiff.nets.MLP] built with ``learn_variance=True`` returns
            such a pair (and starts at t = r = 0, the identity).
        mask: a boolean array (True: x_A, kept) whose shape is the event's trailing axes.
        split: instead, the size of x_A along the last axis.
        swap: condition on the other part.
        event_ndims: the event's number of axes (default ``mask.ndim``, or 1 with a split); the
            partition works as in [AdditiveCoupling][probdiff.flows.AdditiveCoupling].
        max_log_scale: c > 0, or None for an unbounded s.

    Raises:
        ValueError: (on concrete values) a non-finite log-scale or one whose scale exp(s)
            underflows to 0.
    """

    _n_params = 2
    _what = "(shift t(x_A), log-scale r(x_A))"

    def __init__(self, conditioner: Callable, *, mask=None, split=None, swap: bool = False, event_ndims=None,
                 max_log_scale: float | None = 3.0):
        if max_log_scale is not None:
            try:
                c = float(max_log_scale)
            except (TypeError, ValueError):
                raise TypeError(f"AffineCoupling: max_log_scale must be a positive float or None; got {max_log_scale!r}") from None
            if not (c > 0 and math.isfinite(c)):
                raise ValueError(f"AffineCoupling: max_log_scale must be a positive finite float or None; got {max_log_scale!r}")
            max_log_scale = c
        self.max_log_scale = max_log_scale
        super().__init__(conditioner, mask=mask, split=split, swap=swap, event_ndims=event_ndims)

    def _inner(self, x_a, b_shape):
        shift, raw = self._params(x_a, b_shape)
        c = self.max_log_scale
        s = raw if c is None else c * jnp.tanh(raw / c)
        if is_concrete(s):
            sv = np.asarray(s)
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                scale = np.exp(sv)
            bad = ~np.isfinite(sv) | ~np.isfinite(scale) | (scale == 0)
            if bad.any():
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"AffineCoupling: the scale exp(s(x_A)) must be positive and finite in {sv.dtype} "
                    f"(bound s with max_log_scale); got s = {sv[index]} at index {index}"
                )
        _finite_or_raise(shift, "the shift t(x_A)", "AffineCoupling")
        return distrax.ScalarAffine(shift, log_scale=s)


# --------------------------------------------------------------------------- permutations
class Permute(distrax.Bijector):
    r"""A fixed permutation of the last axis: y_i = x_{pi(i)} (between couplings; MATH.md F2).

    $$ y = P x,\qquad |\det P| = 1,\qquad \log|\det J| = 0 , $$

    inverse x_{pi(i)} = y_i. With ``event_ndims = 3`` on (H, W, C) images it permutes the
    channels of every pixel (Glow's fixed "shuffle").

    Args:
        permutation: pi, a rearrangement of 0..n-1 (n = the size of the last axis).
        event_ndims: the event's number of axes (1 for vectors, 3 for images).
    """

    def __init__(self, permutation, *, event_ndims: int = 1):
        p = np.asarray(permutation)
        if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer) or not np.array_equal(np.sort(p), np.arange(p.size)):
            raise ValueError(f"Permute: permutation must be a rearrangement of 0..n-1 (a 1-D int array); got {permutation!r}")
        self.permutation = tuple(int(i) for i in p)  # static: a compile-time gather
        super().__init__(event_ndims_in=_check_event_ndims(event_ndims), is_constant_jacobian=True)

    def _check(self, x):
        batch = _check_rank(x, self.event_ndims_in, "Permute")
        n = len(self.permutation)
        if x.shape[-1] != n:
            raise ValueError(
                f"Permute: the permutation has length {n} but the events' last axis has {x.shape[-1]} entries "
                f"(input shape {tuple(x.shape)}); they must match"
            )
        return batch

    def forward_and_log_det(self, x):
        batch = self._check(x)
        return x[..., np.asarray(self.permutation)], jnp.zeros(batch, x.dtype)

    def inverse_and_log_det(self, y):
        batch = self._check(y)
        return y[..., np.argsort(self.permutation)], jnp.zeros(batch, y.dtype)


class Reverse(distrax.Bijector):
    r"""Reverses the last axis, y_i = x_{n-1-i}: the permutation NICE and RealNVP put between couplings.

    $$ \log|\det J| = 0 . $$

    Args:
        event_ndims: the event's number of axes.
    """

    def __init__(self, *, event_ndims: int = 1):
        super().__init__(event_ndims_in=_check_event_ndims(event_ndims), is_constant_jacobian=True)

    def forward_and_log_det(self, x):
        batch = _check_rank(x, self.event_ndims_in, "Reverse")
        return jnp.flip(x, -1), jnp.zeros(batch, x.dtype)

    def inverse_and_log_det(self, y):
        return self.forward_and_log_det(y)


# --------------------------------------------------------------------------- Glow
class ActNorm(distrax.Bijector):
    r"""Glow's activation normalisation: a per-channel affine map (Kingma & Dhariwal 2018; MATH.md F3).

    $$ y_{\ldots,c} = s_c\,x_{\ldots,c} + b_c,\qquad
       \log|\det J| = N_{\text{pix}}\sum_c \log|s_c| , $$

    with c the last (channel) axis and N_pix the product of the other event axes (H W for
    images, 1 for vectors, where it is NICE's diagonal scaling layer). Inverse x = (y - b) / s.
    The data-dependent initialisation [initialize][probdiff.flows.ActNorm.initialize] sets
    s = 1 / std and b = -mean / std per channel over a batch, so that the batch leaves the layer
    with zero mean and unit variance per channel; [initialize_actnorms][probdiff.flows.initialize_actnorms]
    does it for every ActNorm of a flow.

    Args:
        shift: b, shape (C,).
        scale: s, shape (C,), nonzero; or instead
        log_scale: log s (s = exp(log_scale) > 0), shape (C,): the unconstrained choice for a
            ``numpyro.param``.
        event_ndims: the event's number of axes (1 for vectors, 3 for (H, W, C) images).

    Raises:
        ValueError: a zero or non-finite scale, or a non-finite shift or log-scale (when concrete).
    """

    def __init__(self, shift, scale=None, *, log_scale=None, event_ndims: int = 1):
        if (scale is None) == (log_scale is None):
            raise ValueError("ActNorm: give exactly one of scale (s, nonzero) or log_scale (log s)")
        shift = jnp.asarray(shift)
        par = jnp.asarray(scale if log_scale is None else log_scale)
        pname = "scale" if log_scale is None else "log_scale"
        if shift.ndim != 1 or par.shape != shift.shape:
            raise ValueError(
                f"ActNorm: shift and {pname} must both have shape (C,), one entry per channel; "
                f"got {tuple(shift.shape)} and {tuple(par.shape)}"
            )
        _finite_or_raise(shift, "shift", "ActNorm")
        _finite_or_raise(par, pname, "ActNorm")
        if log_scale is None and is_concrete(par) and (np.asarray(par) == 0).any():
            c = int(np.argwhere(np.asarray(par) == 0)[0, 0])
            raise ValueError(f"ActNorm: scale must be nonzero (the layer is y = s x + b); got s = 0 in channel {c}")
        self.shift = shift
        self.scale_param = par
        self.log_parameterized = log_scale is not None
        super().__init__(event_ndims_in=_check_event_ndims(event_ndims), is_constant_jacobian=True)

    @property
    def scale(self):
        """s, one per channel."""
        return jnp.exp(self.scale_param) if self.log_parameterized else self.scale_param

    @property
    def log_abs_scale(self):
        """log|s|, one per channel."""
        return self.scale_param if self.log_parameterized else jnp.log(jnp.abs(self.scale_param))

    @classmethod
    def initialize(cls, x, *, event_ndims: int = 1, eps: float = 1e-6) -> ActNorm:
        r"""An ActNorm whose outputs on the batch ``x`` have zero mean and unit variance per channel.

        $$ \log s_c = -\log(\sigma_c + \epsilon),\qquad b_c = -\mu_c\,s_c , $$

        mu_c and sigma_c the mean and standard deviation of channel c over every other axis of
        ``x`` (batch and spatial). Returned in the ``log_scale`` parameterisation.

        Args:
            x: the activations that reach the layer, shape ``batch + event``.
            event_ndims: the event's number of axes.
            eps: added to sigma_c, so a constant channel gets a finite scale.
        """
        x = jnp.asarray(x)
        _check_rank(x, _check_event_ndims(event_ndims), "ActNorm.initialize")
        axes = tuple(range(x.ndim - 1))
        log_scale = -jnp.log(jnp.std(x, axis=axes) + eps)
        shift = -jnp.mean(x, axis=axes) * jnp.exp(log_scale)
        return cls(shift, log_scale=log_scale, event_ndims=event_ndims)

    def _check(self, x):
        batch = _check_rank(x, self.event_ndims_in, "ActNorm")
        if x.shape[-1] != self.shift.shape[0]:
            raise ValueError(
                f"ActNorm: shift and scale have C = {self.shift.shape[0]} channels but the events' last axis has "
                f"{x.shape[-1]} (input shape {tuple(x.shape)})"
            )
        return batch

    def _log_det(self, x, batch):
        n_pix = _pixels(x.shape[x.ndim - self.event_ndims_in:])
        return jnp.broadcast_to(n_pix * jnp.sum(self.log_abs_scale).astype(x.dtype), batch)

    def forward_and_log_det(self, x):
        batch = self._check(x)
        return (x * self.scale + self.shift).astype(x.dtype), self._log_det(x, batch)

    def inverse_and_log_det(self, y):
        batch = self._check(y)
        return ((y - self.shift) / self.scale).astype(y.dtype), -self._log_det(y, batch)


def random_rotation(key, channels: int, dtype=None) -> jax.Array:
    r"""A random orthogonal C x C matrix (Haar measure): Glow's initial 1x1 kernel, log|det W| = 0.

    Q from the QR decomposition of a standard normal matrix, with the signs of R's diagonal
    moved into Q so that the distribution is uniform over the orthogonal group.

    Args:
        key: a JAX PRNG key.
        channels: C >= 1.
        dtype: the float dtype (JAX's default float if None).
    """
    if isinstance(channels, bool) or not isinstance(channels, int | np.integer) or channels < 1:
        raise ValueError(f"channels must be an int >= 1; got {channels!r}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    q, r = jnp.linalg.qr(jax.random.normal(key, (channels, channels), dtype))
    return q * jnp.sign(jnp.diagonal(r))


class _Conv1x1Base(distrax.Bijector):
    def __init__(self, event_ndims):
        super().__init__(event_ndims_in=_check_event_ndims(event_ndims), is_constant_jacobian=True)

    def _check(self, x, c):
        name = type(self).__name__
        batch = _check_rank(x, self.event_ndims_in, name, "(H, W, C)" if self.event_ndims_in == 3 else "")
        if x.shape[-1] != c:
            raise ValueError(
                f"{name}: the kernel is {c} x {c} but the events' last axis (channels) has {x.shape[-1]} entries "
                f"(input shape {tuple(x.shape)})"
            )
        return batch, _pixels(x.shape[x.ndim - self.event_ndims_in:])

    def _apply(self, m, x):
        return jnp.einsum("ij,...j->...i", m.astype(x.dtype), x)


class Conv1x1(_Conv1x1Base):
    r"""Glow's invertible 1x1 convolution: the same C x C matrix at every pixel (MATH.md F3).

    $$ y_{h,w} = W x_{h,w},\qquad \log|\det J| = H\,W\,\log|\det W| , $$

    inverse x_{h,w} = W^{-1} y_{h,w}: a learned generalisation of a channel permutation. With
    ``event_ndims=1`` it is a dense invertible linear map of a vector (log|det J| = log|det W|).
    Costs O(C^3) per call for the determinant; [Conv1x1LU][probdiff.flows.Conv1x1LU] gets it in O(C).

    Args:
        kernel: W, shape (C, C), invertible; e.g. [random_rotation][probdiff.flows.random_rotation].
        event_ndims: 3 for (H, W, C) images (default), 1 for vectors.

    Raises:
        ValueError: a kernel that is not square, or (when concrete) singular or non-finite.
    """

    def __init__(self, kernel, *, event_ndims: int = 3):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"Conv1x1: kernel must be a square C x C matrix; got shape {tuple(kernel.shape)}")
        _finite_or_raise(kernel, "kernel", "Conv1x1")
        if is_concrete(kernel):
            w = np.asarray(kernel, np.float64)
            sign, logdet = np.linalg.slogdet(w)
            if sign == 0 or not np.isfinite(logdet) or np.linalg.cond(w) * np.finfo(kernel.dtype).eps > 1:
                raise ValueError(
                    f"Conv1x1: kernel W must be invertible (log|det W| enters the log-density H W times); got a "
                    f"matrix that is singular in {kernel.dtype} (det W = {np.linalg.det(w):g}, condition number "
                    f"{np.linalg.cond(w):.3g})"
                )
        self.kernel = kernel
        super().__init__(event_ndims)

    def forward_and_log_det(self, x):
        batch, n_pix = self._check(x, self.kernel.shape[0])
        logdet = jnp.linalg.slogdet(self.kernel.astype(x.dtype))[1]
        return self._apply(self.kernel, x), jnp.broadcast_to(n_pix * logdet, batch)

    def inverse_and_log_det(self, y):
        batch, n_pix = self._check(y, self.kernel.shape[0])
        w = self.kernel.astype(y.dtype)
        return self._apply(jnp.linalg.inv(w), y), jnp.broadcast_to(-n_pix * jnp.linalg.slogdet(w)[1], batch)


class Conv1x1LU(_Conv1x1Base):
    r"""The invertible 1x1 convolution with an LU-parameterised kernel (Glow, MATH.md F3).

    $$ W = P\,L\,\big(U + \operatorname{diag}(\operatorname{sign}_s \odot e^{\log|s|})\big),\qquad
       \log|\det J| = H\,W \sum_c \log|s_c| , $$

    with P a fixed permutation matrix, L unit lower triangular (only the strictly lower part of
    ``lower`` is used), U strictly upper triangular (only the strictly upper part of ``upper``)
    and fixed signs sign_s. The determinant costs O(C) and W stays invertible for every
    finite log|s|. [from_kernel][probdiff.flows.Conv1x1LU.from_kernel] factors a given W (e.g.
    a [random_rotation][probdiff.flows.random_rotation]) into these parameters. Learn ``lower``,
    ``upper`` and ``log_s``; keep ``permutation`` and ``sign_s`` fixed.

    Args:
        permutation: P, a C x C permutation matrix.
        lower: L's parameters, shape (C, C).
        upper: U's parameters, shape (C, C).
        log_s: log|s|, shape (C,).
        sign_s: the signs of s, shape (C,), entries +-1 (default all +1).
        event_ndims: 3 for (H, W, C) images (default), 1 for vectors.
    """

    def __init__(self, permutation, lower, upper, log_s, sign_s=None, *, event_ndims: int = 3):
        log_s = jnp.asarray(log_s)
        if log_s.ndim != 1:
            raise ValueError(f"Conv1x1LU: log_s must have shape (C,); got {tuple(log_s.shape)}")
        c = log_s.shape[0]
        permutation, lower, upper = jnp.asarray(permutation), jnp.asarray(lower), jnp.asarray(upper)
        sign_s = jnp.ones((c,), log_s.dtype) if sign_s is None else jnp.asarray(sign_s)
        for name, a, shape in (("permutation", permutation, (c, c)), ("lower", lower, (c, c)),
                               ("upper", upper, (c, c)), ("sign_s", sign_s, (c,))):
            if tuple(a.shape) != shape:
                raise ValueError(f"Conv1x1LU: {name} must have shape {shape} (C = {c} from log_s); got {tuple(a.shape)}")
        for name, a in (("lower", lower), ("upper", upper), ("log_s", log_s)):
            _finite_or_raise(a, name, "Conv1x1LU")
        if is_concrete(permutation):
            p = np.asarray(permutation)
            if not (np.isin(p, (0, 1)).all() and (p.sum(0) == 1).all() and (p.sum(1) == 1).all()):
                raise ValueError(f"Conv1x1LU: permutation must be a C x C permutation matrix (one 1 per row and column); got {p.tolist()}")
        if is_concrete(sign_s) and not np.isin(np.asarray(sign_s), (-1, 1)).all():
            raise ValueError(f"Conv1x1LU: sign_s must hold only +1 and -1; got {np.asarray(sign_s).tolist()}")
        self.permutation, self.lower, self.upper, self.log_s, self.sign_s = permutation, lower, upper, log_s, sign_s
        super().__init__(event_ndims)

    @classmethod
    def from_kernel(cls, kernel, *, event_ndims: int = 3) -> Conv1x1LU:
        """The LU parameters of an invertible kernel W = P L U (``jax.scipy.linalg.lu``), s = diag(U)."""
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"Conv1x1LU.from_kernel: kernel must be a square C x C matrix; got shape {tuple(kernel.shape)}")
        p, lo, up = jax.scipy.linalg.lu(kernel)
        s = jnp.diagonal(up)
        if is_concrete(s) and (np.asarray(s) == 0).any():
            raise ValueError("Conv1x1LU.from_kernel: kernel W must be invertible; its LU factor U has a zero on the diagonal")
        return cls(p, lo, up, jnp.log(jnp.abs(s)), jnp.sign(s), event_ndims=event_ndims)

    @property
    def kernel(self):
        """W = P L (U + diag(s))."""
        c = self.log_s.shape[0]
        lo = jnp.tril(self.lower, -1) + jnp.eye(c, dtype=self.lower.dtype)
        up = jnp.triu(self.upper, 1) + jnp.diag(self.sign_s * jnp.exp(self.log_s))
        return self.permutation @ lo @ up

    def forward_and_log_det(self, x):
        batch, n_pix = self._check(x, self.log_s.shape[0])
        return self._apply(self.kernel, x), jnp.broadcast_to(n_pix * jnp.sum(self.log_s).astype(x.dtype), batch)

    def inverse_and_log_det(self, y):
        c = self.log_s.shape[0]
        batch, n_pix = self._check(y, c)
        dt = y.dtype
        lo = jnp.tril(self.lower, -1).astype(dt) + jnp.eye(c, dtype=dt)
        up = (jnp.triu(self.upper, 1) + jnp.diag(self.sign_s * jnp.exp(self.log_s))).astype(dt)
        # W^{-1} = (U + diag s)^{-1} L^{-1} P^T by two triangular solves
        a = jax.scipy.linalg.solve_triangular(lo, self.permutation.T.astype(dt), lower=True, unit_diagonal=True)
        w_inv = jax.scipy.linalg.solve_triangular(up, a, lower=False)
        return self._apply(w_inv, y), jnp.broadcast_to(-n_pix * jnp.sum(self.log_s).astype(dt), batch)


class Squeeze(distrax.Bijector):
    r"""Space-to-depth: each 2 x 2 block of pixels becomes one pixel with 4C channels (RealNVP, Glow; F3).

    $$ y_{i,j,(2a+b)C+c} = x_{2i+a,\,2j+b,\,c},\qquad a, b \in\{0, 1\},\qquad
       (H, W, C)\to(H/2, W/2, 4C),\qquad \log|\det J| = 0 , $$

    a permutation of the entries, so volume preserving; the inverse is depth-to-space. It trades
    spatial size for channels, so that couplings and 1x1 convolutions on the channels mix
    neighbouring pixels.

    Raises:
        ValueError: an input with fewer than 3 axes, or an odd H or W.
    """

    def __init__(self):
        super().__init__(event_ndims_in=3, is_constant_jacobian=True)

    def forward_and_log_det(self, x):
        batch = _check_rank(x, 3, "Squeeze", "(H, W, C)")
        h, w, c = x.shape[-3:]
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even H and W to fold 2 x 2 blocks into channels; got (H, W) = ({h}, {w})")
        y = jnp.reshape(x, batch + (h // 2, 2, w // 2, 2, c))
        n = len(batch)
        y = jnp.transpose(y, tuple(range(n)) + (n, n + 2, n + 1, n + 3, n + 4))
        return jnp.reshape(y, batch + (h // 2, w // 2, 4 * c)), jnp.zeros(batch, x.dtype)

    def inverse_and_log_det(self, y):
        batch = _check_rank(y, 3, "Squeeze (inverse)", "(H/2, W/2, 4C)")
        h2, w2, c4 = y.shape[-3:]
        if c4 % 4:
            raise ValueError(f"Squeeze's inverse needs a channel count divisible by 4; got C = {c4}")
        x = jnp.reshape(y, batch + (h2, w2, 2, 2, c4 // 4))
        n = len(batch)
        x = jnp.transpose(x, tuple(range(n)) + (n, n + 2, n + 1, n + 3, n + 4))
        return jnp.reshape(x, batch + (2 * h2, 2 * w2, c4 // 4)), jnp.zeros(batch, y.dtype)


def _as_layers(bijectors, who: str) -> tuple:
    if isinstance(bijectors, distrax.Bijector):
        bijectors = (bijectors,)
    try:
        layers = tuple(bijectors)
    except TypeError:
        raise TypeError(f"{who}: bijectors must be a distrax.Bijector or a sequence of them; got {type(bijectors).__name__}") from None
    if not layers:
        raise ValueError(f"{who}: bijectors must not be empty")
    for k, b in enumerate(layers):
        if not isinstance(b, distrax.Bijector):
            raise TypeError(f"{who}: bijectors[{k}] must be a distrax.Bijector; got {type(b).__name__}")
    return layers


def _walk_shapes(layers, event_shape, who: str) -> tuple:
    """The event shape after every layer, by abstract evaluation, with errors that name the layer."""
    shape = tuple(event_shape)
    dtype = jnp.result_type(float)
    for k, b in enumerate(layers):
        name = f"{who}: bijectors[{k}] ({type(b).__name__})"
        if b.event_ndims_in != len(shape):
            raise ValueError(
                f"{name} has event_ndims = {b.event_ndims_in} but receives events of shape {shape} "
                f"({len(shape)} axes); build it with event_ndims={len(shape)}"
            )
        try:
            out, ld = jax.eval_shape(b.forward_and_log_det, jax.ShapeDtypeStruct(shape, dtype))
        except ValueError as err:
            raise ValueError(f"{name} cannot take events of shape {shape}: {err}") from err
        if ld.shape != ():
            raise ValueError(f"{name} returns a log-determinant of shape {ld.shape} for one event of shape {shape}; expected a scalar")
        shape = tuple(out.shape)
    return shape


def _forward_layers(layers, x):
    ld_total = jnp.zeros((), x.dtype)
    for b in layers:
        x, ld = b.forward_and_log_det(x)
        ld_total = ld_total + ld
    return x, ld_total


def _inverse_layers(layers, z):
    ld_total = jnp.zeros((), z.dtype)
    for b in reversed(layers):
        z, ld = b.inverse_and_log_det(z)
        ld_total = ld_total + ld
    return z, ld_total


class MultiscaleSplit(distrax.Bijector):
    r"""Glow's multiscale split ("factor out"): half of the channels leave for the latent, the rest go on (F3).

    $$ x = (x_{\text{keep}}, x_{\text{out}})\ \text{(first and last } C/2 \text{ channels)},\qquad
       y = \big(\operatorname{reshape}(f_{\text{inner}}(x_{\text{keep}})),\ x_{\text{out}}\big),\qquad
       \log|\det J| = \log\Big|\det\frac{\partial f_{\text{inner}}}{\partial x_{\text{keep}}}\Big| . $$

    x_out is already a latent: it goes unchanged to the base distribution (a standard normal
    there, as in RealNVP), while x_keep passes through the inner layers (e.g. a further
    [Squeeze][probdiff.flows.Squeeze] and steps of flow at half the resolution). The Jacobian
    is block diagonal, so the log-determinant is the inner one. The inner output is reshaped
    back to x_keep's shape (a fixed rearrangement of the entries, volume preserving), so the
    layer keeps the shape of its input and splits nest: a three-level Glow on (H, W, C) images is

        [Squeeze(), *steps(4C), MultiscaleSplit([Squeeze(), *steps(8C), MultiscaleSplit([Squeeze(), *steps(16C)])])]

    Args:
        bijectors: the inner layers, a sequence of distrax bijectors in data-to-latent order,
            acting on x_keep (same event rank as the input).

    Raises:
        ValueError: an odd number of channels, or inner layers that cannot take x_keep.
    """

    def __init__(self, bijectors: Sequence[distrax.Bijector]):
        self.bijectors = _as_layers(bijectors, "MultiscaleSplit")
        n = self.bijectors[0].event_ndims_in
        for k, (a, b) in enumerate(zip(self.bijectors[:-1], self.bijectors[1:], strict=True)):
            if a.event_ndims_out != b.event_ndims_in:
                raise ValueError(
                    f"MultiscaleSplit: bijectors[{k + 1}] takes events with {b.event_ndims_in} axes but bijectors[{k}] "
                    f"returns {a.event_ndims_out}"
                )
        if self.bijectors[-1].event_ndims_out != n:
            raise ValueError("MultiscaleSplit: the inner layers must return events with as many axes as they take")
        super().__init__(event_ndims_in=n)

    def _halves(self, x):
        batch = _check_rank(x, self.event_ndims_in, "MultiscaleSplit")
        c = x.shape[-1]
        if c % 2:
            raise ValueError(f"MultiscaleSplit needs an even number of channels to factor out half; got C = {c}")
        return batch, x[..., : c // 2], x[..., c // 2:]

    def forward_and_log_det(self, x):
        batch, keep, out = self._halves(x)
        h, ld = _forward_layers(self.bijectors, keep)
        return jnp.concatenate([jnp.reshape(h, keep.shape), out], -1), jnp.broadcast_to(ld, batch)

    def inverse_and_log_det(self, y):
        batch, keep, out = self._halves(y)
        event = keep.shape[len(batch):]
        inner = jax.eval_shape(lambda a: _forward_layers(self.bijectors, a)[0], jax.ShapeDtypeStruct(event, y.dtype))
        h, ld = _inverse_layers(self.bijectors, jnp.reshape(keep, batch + tuple(inner.shape)))
        return jnp.concatenate([jnp.reshape(h, keep.shape), out], -1), jnp.broadcast_to(ld, batch)


def initialize_actnorms(bijectors, x) -> list:
    r"""Data-dependent initialisation of every [ActNorm][probdiff.flows.ActNorm] in a flow (Glow).

    Pushes the batch ``x`` through the layers in order (data to latent); each ActNorm met,
    including those inside a [MultiscaleSplit][probdiff.flows.MultiscaleSplit] or a
    ``distrax.Chain``, is replaced by ``ActNorm.initialize`` of the activations that reach it,
    so that its outputs on this batch have zero mean and unit variance per channel. Read the
    returned layers' ``shift`` and ``log_abs_scale`` as the initial values of ``numpyro.param``.

    Args:
        bijectors: the layers, data-to-latent order.
        x: a batch of data, shape ``batch + event``.

    Returns:
        a list of the layers, with initialised ActNorms.
    """
    layers = _as_layers(bijectors, "initialize_actnorms")
    h = jnp.asarray(x)
    out = []
    for b in layers:
        if isinstance(b, ActNorm):
            b = ActNorm.initialize(h, event_ndims=b.event_ndims_in)
        elif isinstance(b, MultiscaleSplit):
            c = h.shape[-1]
            b = MultiscaleSplit(initialize_actnorms(b.bijectors, h[..., : c // 2]))
        elif isinstance(b, distrax.Chain):
            b = distrax.Chain(list(reversed(initialize_actnorms(list(reversed(b.bijectors)), h))))
        h = b.forward(h)
        out.append(b)
    return out


# --------------------------------------------------------------------------- the distribution
class Flow(dist.TransformedDistribution):
    r"""A normalizing flow as a NumPyro distribution: x = g(z), z ~ p_z, g = f^{-1} (MATH.md F1).

    $$ \log p_x(x) = \log p_z\big(f(x)\big) + \sum_{k=1}^{K}
       \log\Big|\det\frac{\partial f_k}{\partial h_{k-1}}(h_{k-1})\Big|,\qquad
       h_0 = x,\ h_k = f_k(h_{k-1}),\ z = h_K , $$

    with the layers f_1, ..., f_K given in that order (data to latent; each one's *forward* map
    points to the latent). ``log_prob`` runs each layer's ``forward_and_log_det`` once (one
    call of each network); ``sample`` draws z ~ p_z and applies the inverses f_K^{-1} first.
    By default p_z = N(0, I) on the latent shape, which the layers determine from
    ``event_shape`` (the same shape unless a [Squeeze][probdiff.flows.Squeeze] is among them).

    A ``TransformedDistribution`` whose one transform is ``BijectorTransform(self.bijector)``,
    so the parts of NumPyro that work with transformed distributions work with it; it is a
    pytree (the layers are its leaves) and passes through ``jit``/``vmap``/``grad``. In a model,
    ``numpyro.sample("x", Flow(layers, event_shape), obs=x)`` under a plate adds sum_i
    log p(x_i): with no latent sites, ``Trace_ELBO`` is minus the log-likelihood and ``SVI``
    fits the flow by maximum likelihood.

    Args:
        bijectors: the layers f_1, ..., f_K (distrax bijectors; a single one is fine), in
            data-to-latent order.
        event_shape: the shape of one data point x.
        base: p_z, a NumPyro distribution with no batch shape and the latent event shape
            (default N(0, I)).

    Raises:
        ValueError: layers that do not fit the event shape (the message names the layer and
            the shape that reached it), a base whose event shape is not the latent shape.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.flows import ActNorm, Flow
        >>> flow = Flow([ActNorm(jnp.zeros(2), log_scale=jnp.log(jnp.array([2.0, 0.5])))], (2,))
        >>> float(flow.log_prob(jnp.zeros(2)))    # log N(0; 0, I) + log 2 + log 0.5
        -1.83787...
        >>> flow.sample(jax.random.key(0), (3,)).shape
        (3, 2)
    """

    pytree_data_fields = ("bijectors",)
    pytree_aux_fields = ("latent_shape",)

    def __init__(self, bijectors, event_shape, *, base: dist.Distribution | None = None, validate_args=None):
        layers = _as_layers(bijectors, "Flow")
        event_shape = check_event_shape(event_shape)
        latent = _walk_shapes(layers, event_shape, "Flow")
        if base is None:
            base = dist.Normal(jnp.zeros(latent, jnp.result_type(float)), 1.0).to_event(len(latent))
        else:
            if not isinstance(base, dist.Distribution):
                raise TypeError(f"Flow: base must be a numpyro Distribution over z; got {type(base).__name__}")
            if tuple(base.batch_shape) != () or tuple(base.event_shape) != latent:
                raise ValueError(
                    f"Flow: the bijectors map events of shape {event_shape} to latents of shape {latent}, so base must "
                    f"have event_shape {latent} and no batch shape; got batch_shape {tuple(base.batch_shape)}, "
                    f"event_shape {tuple(base.event_shape)} (use .to_event())"
                )
        self.bijectors = layers
        self.latent_shape = latent
        g = distrax.Inverse(_chain(layers))
        super().__init__(base, [BijectorTransform(g, event_shapes=(latent, event_shape))], validate_args=validate_args)

    @property
    def bijector(self) -> distrax.Bijector:
        """g = f^{-1}, z to x, as one distrax bijector: ``distrax.Transformed(base, flow.bijector)`` is this flow."""
        return self.transforms[0].bijector

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def transform(self, x):
        """z = f(x) and log|det df/dx|, for x of shape ``batch + event_shape``."""
        return _forward_layers(self.bijectors, check_event(x, self.event_shape, "x"))

    def transform_back(self, z):
        """x = g(z) = f^{-1}(z) and log|det dg/dz| (= -log|det df/dx| at x), for z of shape ``batch + latent_shape``."""
        return _inverse_layers(self.bijectors, check_event(z, self.latent_shape, "z"))

    @validate_sample
    def log_prob(self, value, intermediates=None):
        """log p_x(x) by the change of variables, one forward pass through the layers.

        With ``intermediates`` from ``sample_with_intermediates`` (NumPyro passes them for a
        latent site) it reuses the z and log|det dg/dz| of the sampling pass instead:
        log p_x(x) = log p_z(z) - log|det dg/dz|.
        """
        if intermediates is not None:
            z, log_det_g = intermediates[0]
            return self.base_dist.log_prob(z) - log_det_g
        z, ld = self.transform(value)
        return self.base_dist.log_prob(z) + ld


def _chain(layers):
    """f = f_K o ... o f_1 as one distrax bijector (distrax.Chain applies its last entry first)."""
    return layers[0] if len(layers) == 1 else distrax.Chain(list(reversed(layers)))
