r"""Whole Markov chains as NumPyro distributions: q(x_{1:T} | x_0) and p_theta(x_{t_end:T}).

A chain's value stacks its states along one time axis placed just left of the event
dimensions, **in increasing time**: for a data event shape ``E`` and batch shape ``B`` a
value has shape ``B + (K,) + E``, and index ``i`` on that axis is the state at time
``t_first + i``. ``sample`` runs ``lax.scan`` over t (compile time does not grow with T);
``log_prob`` sums the transition log-densities (``ForwardChain``: all t at once, a closed
form per step; ``ReverseChain``: eps_theta in chunks of t, see ``map_over_t``). A chain's
value itself holds every state, so its memory grows with T.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probdiff.distributions.kernels import (
    PARAMETERIZATIONS,
    VARIANCES,
    check_schedule,
    p_step,
    reverse_moments,
)
from probdiff.schedules import Schedule

__all__ = ["ForwardChain", "ReverseChain", "map_over_t", "sum_over_t", "resolve_chunk_size", "AUTO_CHUNK_ELEMENTS"]


#: Scalars of x_t (t values x examples x event size) that ``chunk_size="auto"`` evaluates
#: together, per backend. On CPU larger blocks spill the network's activations out of cache
#: and into fresh pages (bench/README.md: all 999 t of 1000 2-D points at once ran 2.4x slower
#: than one t at a time); accelerators want wide blocks, bounded so that a batch of images
#: does not materialise T copies of itself.
AUTO_CHUNK_ELEMENTS = {"cpu": 2048, "default": 1 << 22}


def resolve_chunk_size(chunk_size, num_t: int, elements_per_t: int) -> int:
    """The number of t evaluated together: ``None`` -> all, ``"auto"`` -> by backend, else the int.

    Args:
        chunk_size: an int >= 1, ``None`` or ``"auto"``.
        num_t: how many t there are.
        elements_per_t: scalars of x_t that one ``fn(t)`` handles (batch size x event size).
    """
    if chunk_size is None:
        return max(num_t, 1)
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise ValueError(f'chunk_size must be a positive integer, "auto" or None; got {chunk_size!r}')
        budget = AUTO_CHUNK_ELEMENTS.get(jax.default_backend(), AUTO_CHUNK_ELEMENTS["default"])
        return int(min(max(num_t, 1), max(1, budget // max(elements_per_t, 1))))
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or int(chunk_size) < 1:
        raise ValueError(f'chunk_size must be a positive integer, "auto" or None; got {chunk_size!r}')
    return int(chunk_size)


def map_over_t(fn: Callable, ts, chunk_size="auto", *, elements_per_t: int = 1):
    """Evaluate ``fn(t)`` for every t in ``ts`` and stack the results on a leading axis.

    ``chunk_size`` t are evaluated together (``jax.vmap``) and the chunks run one after the
    other in a ``lax.scan``, so the working memory is that of one chunk, and there is never a
    Python loop over T; only the stacked results (one ``fn(t)`` per t) grow with len(ts). For a
    sum over t that keeps nothing per t use [sum_over_t][probdiff.distributions.sum_over_t]. ``None`` vectorises over all t at once; ``"auto"`` picks the
    chunk from the backend and ``elements_per_t`` (the scalars of x_t each ``fn(t)`` handles)
    so that a chunk holds about 2048 scalars on CPU and 4 million on accelerators
    ([AUTO_CHUNK_ELEMENTS][probdiff.distributions.AUTO_CHUNK_ELEMENTS]). ``ts`` is padded with
    its last value up to a whole number of chunks, so ``fn`` is traced once.
    """
    ts = jnp.asarray(ts)
    n = ts.shape[0]
    chunk = resolve_chunk_size(chunk_size, n, elements_per_t)
    if chunk >= n:
        return jax.vmap(fn)(ts)
    if chunk == 1:
        return jax.lax.map(fn, ts)
    num_chunks = -(-n // chunk)
    padded = jnp.concatenate([ts, jnp.broadcast_to(ts[-1:], (num_chunks * chunk - n,))])
    out = jax.lax.map(jax.vmap(fn), padded.reshape(num_chunks, chunk))
    return jax.tree_util.tree_map(lambda y: y.reshape((num_chunks * chunk,) + y.shape[2:])[:n], out)


def sum_over_t(fn: Callable, ts, chunk_size="auto", *, elements_per_t: int = 1):
    r"""$\sum_{t \in ts} fn(t)$, accumulated chunk by chunk so that memory does not depend on len(ts).

    Like [map_over_t][probdiff.distributions.map_over_t] (``chunk_size`` t at a time in a
    ``vmap``, the chunks in a ``lax.scan``), but each chunk's values are added into a running
    sum instead of being stacked: nothing of size len(ts) is kept, not even one scalar per t.
    The padding of the last chunk is masked out. ``fn(t)`` may return a pytree of arrays.
    """
    ts = jnp.asarray(ts)
    n = ts.shape[0]
    chunk = resolve_chunk_size(chunk_size, n, elements_per_t)
    if chunk >= n:
        return jax.tree_util.tree_map(lambda y: jnp.sum(y, axis=0), jax.vmap(fn)(ts))
    num_chunks = -(-n // chunk)
    padded = jnp.concatenate([ts, jnp.broadcast_to(ts[-1:], (num_chunks * chunk - n,))])
    keep = (jnp.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk)
    shapes = jax.eval_shape(fn, ts[0])
    init = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def body(acc, chunk_args):
        t_c, keep_c = chunk_args
        vals = jax.vmap(fn)(t_c)
        add = jax.tree_util.tree_map(
            lambda v: jnp.sum(jnp.where(keep_c.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0), axis=0), vals
        )
        return jax.tree_util.tree_map(jnp.add, acc, add), None

    total, _ = jax.lax.scan(body, init, (padded.reshape(num_chunks, chunk), keep))
    return total


def _time_axis_first(value, event_ndim: int):
    return jnp.moveaxis(value, -(event_ndim + 1), 0)


def _time_axis_back(value, event_ndim: int):
    return jnp.moveaxis(value, 0, -(event_ndim + 1))


class ForwardChain(dist.Distribution):
    r"""The forward (noising) chain q(x_{1:T} | x_0) as one distribution (MATH.md A1, B1).

    $$ q(x_{1:T}\mid x_0) = \prod_{t=1}^{T} \mathcal{N}\big(x_t;\ \sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\big) $$

    It has no learnable parameters: it is the fixed encoder (guide) of the diffusion model
    seen as a hierarchical VAE.

    A value has shape ``batch + (T,) + event``; index ``i`` on the time axis is x_{i+1}.
    ``sample`` scans t = 1..T with ``lax.scan``; ``log_prob`` sums
    log q(x_t | x_{t-1}) over t. Tested in ``tests/test_chains.py`` (moments against
    [q_marginal][probdiff.distributions.q_marginal], log_prob against a step-by-step sum).

    Args:
        schedule: the noise schedule (T steps).
        x_0: clean data, shape ``batch + event``.
        event_ndim: number of trailing event dimensions of ``x_0`` (default 1).
    """

    arg_constraints = {}
    pytree_data_fields = ("schedule", "x_0")
    pytree_aux_fields = ("event_ndim",)
    reparametrized_params = ["x_0"]

    def __init__(self, schedule: Schedule, x_0, *, event_ndim: int = 1, validate_args=None):
        check_schedule(schedule)
        x_0 = jnp.asarray(x_0)
        if x_0.ndim < event_ndim:
            raise ValueError(
                f"x_0 must have at least event_ndim = {event_ndim} dimensions; got shape {x_0.shape}"
            )
        if not jnp.issubdtype(x_0.dtype, jnp.floating):
            raise TypeError(f"x_0 must be a floating-point array; got dtype {x_0.dtype}")
        self.schedule = schedule
        self.x_0 = x_0
        self.event_ndim = event_ndim
        split = x_0.ndim - event_ndim
        batch_shape = x_0.shape[:split]
        event_shape = (schedule.num_steps,) + x_0.shape[split:]
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, self.event_ndim + 1)

    @property
    def has_rsample(self) -> bool:
        return True

    def rsample(self, key, sample_shape=()):
        return self.sample(key, sample_shape)

    def sample(self, key, sample_shape=()):
        """Draw x_{1:T} by running x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps over t."""
        s = self.schedule
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        noise = _time_axis_first(jax.random.normal(key, shape, self.x_0.dtype), self.event_ndim)
        x_0 = jnp.broadcast_to(self.x_0, tuple(sample_shape) + self.x_0.shape)
        coef = (jnp.sqrt(s.alpha[1:]).astype(x_0.dtype), jnp.sqrt(s.beta[1:]).astype(x_0.dtype))

        def step(x_tm1, inputs):
            sqrt_alpha, sqrt_beta, eps = inputs
            x_t = sqrt_alpha * x_tm1 + sqrt_beta * eps
            return x_t, x_t

        _, xs = jax.lax.scan(step, x_0, coef + (noise,))
        return _time_axis_back(xs, self.event_ndim)

    def log_prob(self, value):
        """log q(x_{1:T} | x_0) = sum_t log N(x_t; sqrt(alpha_t) x_{t-1}, beta_t I)."""
        s = self.schedule
        nd = self.event_ndim
        xs = _time_axis_first(jnp.asarray(value), nd)
        if xs.shape[0] != s.num_steps or xs.shape[xs.ndim - nd :] != self.event_shape[1:]:
            raise ValueError(
                f"value must have trailing shape (T,) + event = {self.event_shape}; got {jnp.shape(value)}"
            )
        shape = jnp.broadcast_shapes(xs.shape[1:], self.x_0.shape)
        xs = jnp.reshape(xs, (xs.shape[0],) + (1,) * (len(shape) + 1 - xs.ndim) + xs.shape[1:])
        xs = jnp.broadcast_to(xs, (xs.shape[0],) + shape)
        x_0 = jnp.broadcast_to(self.x_0, shape)
        prev = jnp.concatenate([x_0[None], xs[:-1]], axis=0)
        bshape = (s.num_steps,) + (1,) * (xs.ndim - 1)
        loc = jnp.sqrt(s.alpha[1:]).reshape(bshape) * prev
        scale = jnp.sqrt(s.beta[1:]).reshape(bshape)
        lp = dist.Normal(loc, scale).log_prob(xs)
        return jnp.sum(lp, axis=(0,) + tuple(range(lp.ndim - nd, lp.ndim)))

    @property
    def mean(self):
        """E[x_t | x_0] = sqrt(alpha_bar_t) x_0 for t = 1..T, stacked on the time axis."""
        ab = self.schedule.alpha_bar[1:].reshape((-1,) + (1,) * self.x_0.ndim)
        return _time_axis_back(jnp.sqrt(ab) * self.x_0[None], self.event_ndim)

    @property
    def variance(self):
        """Var[x_t | x_0] = 1 - alpha_bar_t for t = 1..T (marginal per coordinate)."""
        omab = self.schedule.one_minus_alpha_bar[1:].reshape((-1,) + (1,) * self.x_0.ndim)
        return _time_axis_back(jnp.broadcast_to(omab, (omab.shape[0],) + self.x_0.shape), self.event_ndim)


class ReverseChain(dist.Distribution):
    r"""The generative chain p_theta(x_{t_end:T}) as one distribution (MATH.md B1, C4).

    $$ p_\theta(x_{t_{\rm end}:T}) = \mathcal{N}(x_T; 0, I)\prod_{t=t_{\rm end}+1}^{T}
       \mathcal{N}\big(x_{t-1};\ \mu_\theta(x_t, t),\ \sigma_t^2 I\big) $$

    with mu_theta from the eps-function (MATH.md C2). ``t_end = 0`` (default) is the whole
    chain p_theta(x_{0:T}); ``t_end = 1`` is the latent part p_theta(x_{1:T}) used by
    [GaussianDiffusion.model][probdiff.GaussianDiffusion.model].

    A value has shape ``batch + (T - t_end + 1,) + event``; index ``i`` on the time axis is
    x_{t_end + i} (increasing time, the last entry is x_T). ``sample`` runs ancestral
    sampling from x_T down to x_{t_end} with ``lax.scan``, injecting noise at every step
    (a true draw of the chain; compare Algorithm 2's z = 0 at t = 1 in
    [GaussianDiffusion.sample][probdiff.GaussianDiffusion.sample]). ``log_prob`` evaluates
    eps_theta for ``chunk_size`` values of t at a time (see
    [map_over_t][probdiff.distributions.map_over_t]).

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps`` shaped like ``x_t``.
        schedule: the noise schedule (T steps).
        event_shape: shape of one data point x_0.
        variance: ``"beta"``, ``"beta_tilde"`` (see
            [reverse_variance][probdiff.distributions.reverse_variance]) or ``"learned"``
            (see [reverse_moments][probdiff.distributions.reverse_moments]).
        parameterization: what the network predicts, ``"eps"``, ``"x0"`` or ``"v"``.
        t_end: the last time kept, 0 <= t_end <= T (t_end = T: the chain is x_T alone).
        batch_shape: batch shape of the chain.
        chunk_size: how many t ``log_prob`` evaluates together: an int, ``None`` (all at once)
            or ``"auto"`` (by backend and batch size; see
            [map_over_t][probdiff.distributions.map_over_t]).
    """

    arg_constraints = {}
    pytree_data_fields = ("schedule",)
    pytree_aux_fields = ("eps_fn", "variance_kind", "parameterization", "t_end", "data_shape", "chunk_size")

    def __init__(
        self,
        eps_fn: Callable,
        schedule: Schedule,
        event_shape,
        *,
        variance: str = "beta",
        parameterization: str = "eps",
        t_end: int = 0,
        batch_shape=(),
        chunk_size="auto",
        validate_args=None,
    ):
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
        check_schedule(schedule)
        T = schedule.num_steps
        if isinstance(t_end, bool) or int(t_end) != t_end or not (0 <= int(t_end) <= T):
            raise ValueError(f"t_end must be an integer in 0..T = 0..{T}; got {t_end!r}")
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.variance_kind = variance
        self.parameterization = parameterization
        self.t_end = int(t_end)
        self.data_shape = tuple(event_shape)
        resolve_chunk_size(chunk_size, T, 1)  # validates
        self.chunk_size = chunk_size
        super().__init__(
            tuple(batch_shape), (T - self.t_end + 1,) + self.data_shape, validate_args=validate_args
        )

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, len(self.data_shape) + 1)

    @property
    def has_rsample(self) -> bool:
        return True

    def rsample(self, key, sample_shape=()):
        return self.sample(key, sample_shape)

    def sample(self, key, sample_shape=()):
        """Ancestral sampling x_T ~ N(0, I), x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I)."""
        s = self.schedule
        nd = len(self.data_shape)
        shape = tuple(sample_shape) + self.batch_shape + self.data_shape
        key_T, key_steps = jax.random.split(key)
        x_T = jax.random.normal(key_T, shape, s.dtype)
        ts = jnp.arange(s.num_steps, self.t_end, -1)

        def step(x_t, t):
            m = reverse_moments(
                self.eps_fn, s, t, x_t, variance=self.variance_kind,
                parameterization=self.parameterization, event_ndim=nd,
            )
            z = jax.random.normal(jax.random.fold_in(key_steps, t), x_t.shape, x_t.dtype)
            x_tm1 = (m.mean + jnp.sqrt(m.variance) * z).astype(x_t.dtype)  # keep the scan carry's dtype
            return x_tm1, x_tm1

        _, ys = jax.lax.scan(step, x_T, ts)  # ys[i] = x_{T-1-i}
        xs = jnp.concatenate([ys[::-1], x_T[None]], axis=0)
        return _time_axis_back(xs, nd)

    def log_prob(self, value):
        """log N(x_T; 0, I) + sum_{t > t_end} log p_theta(x_{t-1} | x_t)."""
        nd = len(self.data_shape)
        value = jnp.asarray(value)
        if value.shape[value.ndim - nd - 1 :] != self.event_shape:
            raise ValueError(
                f"value must have trailing shape (T - t_end + 1,) + event = {self.event_shape}; "
                f"got {value.shape}"
            )
        xs = _time_axis_first(value, nd)
        axes = tuple(range(-nd, 0))
        lp_T = jnp.sum(dist.Normal(0.0, 1.0).log_prob(xs[-1]), axis=axes)

        def log_p(i):
            t = self.t_end + 1 + i
            d = p_step(
                self.eps_fn, self.schedule, t, xs[i + 1], variance=self.variance_kind,
                parameterization=self.parameterization, event_ndim=nd,
            )
            return d.log_prob(xs[i])

        steps = map_over_t(log_p, jnp.arange(xs.shape[0] - 1), self.chunk_size, elements_per_t=xs[0].size)
        return lp_T + jnp.sum(steps, axis=0)
