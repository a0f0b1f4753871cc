r"""Continuous time: the probability-flow ODE, reverse-SDE sampling, exact likelihoods, neural ODEs and CNFs (MATH.md E3-E5).

A forward SDE dx = f(t) x dt + g(t) dw ([probdiff.sde][probdiff.sde]) with marginals p_t has a
reverse-time SDE and a deterministic ODE with the same marginals (Song et al. 2021):

$$ dx = \big[f(t)x - g(t)^2\,\nabla_x\log p_t(x)\big]\,dt + g(t)\,d\bar w
   \qquad\text{(reverse SDE, E3)}, $$

$$ \frac{dx}{dt} = v(x, t) = f(t)\,x - \tfrac12 g(t)^2\,\nabla_x\log p_t(x)
   \qquad\text{(probability-flow ODE)}. $$

With a score model s_theta(x, t) in place of grad log p_t, integrating the ODE from data
(t = 0) to noise (t = 1) is a continuous normalizing flow, and the instantaneous change of
variables (E5)

$$ \frac{d}{dt}\log p_t(x(t)) = -\operatorname{tr}\frac{\partial v}{\partial x}(x(t), t)
   \quad\Longrightarrow\quad
   \log p_0(x_0) = \log \pi(x(1)) + \int_0^1 \operatorname{tr}\frac{\partial v}{\partial x}(x(t),t)\,dt $$

gives its exact log-likelihood, in nats; bits per dimension are -log p / (D log 2). The trace is
exact (D vector-Jacobian products, for small D) or Hutchinson's unbiased estimate
tr A = E[eps^T A eps] with one probe eps held fixed along the path (FFJORD; one
vector-Jacobian product). See the likelihood guide, ``docs/tutorials/likelihood.md``.

| name | what |
|---|---|
| [ProbabilityFlow][probdiff.ode.ProbabilityFlow] | the ODE of an SDE and a score model (or of a ``GaussianDiffusion``) as a NumPyro distribution: exact ``log_prob``, ODE ``sample`` |
| [CNF][probdiff.ode.CNF] | a continuous normalizing flow with a learned vector field, trained by maximum likelihood under ``SVI`` |
| [log_likelihood][probdiff.ode.log_likelihood] | log p, bits/dim, the solver's step count and network evaluations |
| [reverse_sde_sample][probdiff.ode.reverse_sde_sample] | the reverse SDE by Euler-Maruyama or a strong-order-1.5 additive-noise Runge-Kutta method |
| [odeint][probdiff.ode.odeint], [NeuralODE][probdiff.ode.NeuralODE] | an ODE block with adjoint (backsolve) or direct gradients (E4) |

All solves use diffrax (Tsit5 with a PID step-size controller for the ODEs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probdiff._checks import check_event, check_event_shape, check_finite, check_positive, is_concrete
from probdiff.sde import SDE, ScheduleSDE, _expand

__all__ = [
    "TRACE_METHODS",
    "EXACT_TRACE_MAX_DIM",
    "SDE_SOLVERS",
    "LogLikelihood",
    "ODEFlow",
    "ProbabilityFlow",
    "CNF",
    "log_likelihood",
    "probability_flow_field",
    "score_from_diffusion",
    "reverse_sde_sample",
    "odeint",
    "NeuralODE",
]

#: How the trace of the Jacobian is computed: ``"exact"``, ``"hutchinson"`` or ``"auto"``
#: (exact for D <= [EXACT_TRACE_MAX_DIM][probdiff.ode.EXACT_TRACE_MAX_DIM]).
TRACE_METHODS = ("auto", "exact", "hutchinson")

#: ``trace="auto"`` uses the exact trace up to this many dimensions and Hutchinson's estimate
#: above. ``bench/likelihood.py`` measured, on a 2-core CPU, where the exact trace stops costing
#: less than Hutchinson's with 4 Rademacher probes (half the 1-probe standard deviation): ratios
#: 0.89, 0.97, 1.02, 1.29 at D = 2, 3, 4, 6. At D = 4 the two do the same work (4 VJPs per
#: evaluation), and at a tie the noise-free answer wins.
EXACT_TRACE_MAX_DIM = 4

#: Solvers of [reverse_sde_sample][probdiff.ode.reverse_sde_sample].
SDE_SOLVERS = ("euler", "shark")

#: Tsit5 evaluates the vector field 6 times per attempted step (first-same-as-last) plus once at
#: the start (counted in tests/test_ode.py).
_TSIT5_EVALS_PER_STEP = 6
_TSIT5_START_EVALS = 1


# --------------------------------------------------------------------------- checks
def _check_time_interval(t_min, name="t_min", *, allow_zero=False):
    """t_min in (0, 1) ([0, 1) with ``allow_zero``): where the path leaves the data."""
    try:
        value = float(t_min)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float in (0, 1); got {t_min!r}") from None
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value < 1.0):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(
            f"{name} must lie in {interval} (time runs from the data at t_min to the prior at t = 1); got {t_min!r}"
        )
    return value


def _check_tolerances(rtol, atol):
    return check_positive(rtol, "rtol"), check_positive(atol, "atol")


def _check_count(value, name, low=1):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def _check_trace(trace, probe):
    if trace not in TRACE_METHODS:
        raise ValueError(f"trace must be one of {TRACE_METHODS}; got {trace!r}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian'; got {probe!r}")


def _resolve_trace(trace, event_size):
    if trace == "auto":
        return "exact" if event_size <= EXACT_TRACE_MAX_DIM else "hutchinson"
    return trace


def _single(fn):
    """A batched callable fn(x[batch + event], t[batch]) as a function of one example and a scalar t."""

    def one(x, t):
        return fn(x[None], jnp.reshape(t, (1,)).astype(x.dtype))[0]

    return one


def _sum_event(a, event_ndim):
    return jnp.sum(a, axis=tuple(range(a.ndim - event_ndim, a.ndim)))


# --------------------------------------------------------------------------- score models
def score_from_diffusion(diffusion) -> tuple[ScheduleSDE, Callable]:
    r"""A discrete-time [GaussianDiffusion][probdiff.GaussianDiffusion] as an SDE and a score s(x, t), t in [0, 1].

    The SDE is [ScheduleSDE][probdiff.sde.ScheduleSDE]: alpha_bar(i / T) = alpha_bar_i at every
    step i, smooth in between. The network is evaluated at the continuous index tau = t T and

    $$ s_\theta(x, t) = -\frac{\epsilon_\theta(x, tT)}{\sqrt{1-\bar\alpha(t)}}, $$

    with the eps that an ``"x0"`` or ``"v"`` prediction implies through alpha_bar(t) (a learned
    variance output is ignored: the ODE needs only the mean). Between the integers the network sees
    times it was never trained on. A sinusoidal embedding of tT is continuous there but oscillates
    fast in t (its highest frequency is 1 per unit of tT), so an adaptive solver takes many steps:
    ``bench/likelihood.py`` measured about 1000-1400 network evaluations per likelihood for
    trained MLPs on 2-D and 64-D data at rtol = atol = 1e-5, against 90 for an exact score. A
    model trained in continuous time on t in [0, 1] does not have this cost.

    Returns:
        ``(sde, score_fn)`` with ``score_fn(x, t)`` for x of shape ``batch + event_shape`` and float
        t of shape ``batch`` (or a scalar).
    """
    from probdiff.diffusion import GaussianDiffusion

    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a probdiff.GaussianDiffusion; got {type(diffusion).__name__}")
    sde = ScheduleSDE(diffusion.schedule)
    T = diffusion.num_steps
    nd = diffusion.event_ndim
    param = diffusion.parameterization
    eps_fn = diffusion.eps_fn

    def score_fn(x, t):
        t = jnp.asarray(t, x.dtype)
        out = eps_fn(x, t * T)
        pred = out[0] if isinstance(out, tuple) else out
        # m(t) = sqrt(alpha_bar(t)) and s(t) = sqrt(1 - alpha_bar(t)) through expm1: 1 - alpha_bar
        # computed as a difference rounds to 0 in float32 for t below ~3e-5
        m = jnp.reshape(sde.mean_coef(t), jnp.shape(t) + (1,) * nd)
        s = jnp.reshape(sde.marginal_std(t), jnp.shape(t) + (1,) * nd)
        if param == "x0":
            eps = (x - m * pred) / s
        elif param == "v":
            eps = m * pred + s * x
        else:
            eps = pred
        return -eps / s

    return sde, score_fn


def probability_flow_field(sde: SDE, score_fn: Callable) -> Callable:
    r"""The probability-flow vector field v(x, t) = f(t) x - 1/2 g(t)^2 s(x, t) (batched).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)`` ~ grad log p_t(x), x of shape ``batch + event``, float t of shape ``batch``.

    Returns:
        ``v(x, t)`` with the same signature.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a probdiff.sde.SDE; got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable score_fn(x, t); got {type(score_fn).__name__}")

    def field(x, t):
        s = score_fn(x, t)
        if getattr(s, "shape", None) != x.shape:
            raise ValueError(f"score_fn must return an array with the shape of x, {x.shape}; got {getattr(s, 'shape', type(s))}")
        g2 = _expand(sde.diffusion(t) ** 2, x)
        return _expand(sde.drift_coef(t), x) * x - 0.5 * g2 * s

    return field


# --------------------------------------------------------------------------- the flow
class LogLikelihood(NamedTuple):
    """The result of [log_likelihood][probdiff.ode.log_likelihood], one entry per example.

    Attributes:
        log_prob: log p(x) in nats = ``prior_log_prob + delta_log_prob``.
        bits_per_dim: -log p(x) / (D log 2).
        prior_log_prob: log pi(x(1)), the prior's log-density at the end of the path.
        delta_log_prob: the integral of tr dv/dx along the path.
        z: x(1), the point the data maps to.
        num_steps: steps the adaptive solver attempted (accepted plus rejected).
        nfe: evaluations of the vector field: 6 per attempted Tsit5 step plus 1 to start, for this
            example. Each is one network call and its reverse pass (D vector-Jacobian products,
            vectorised, for the exact trace; one per probe for Hutchinson's). A batch is solved
            under ``vmap``, so it runs as many steps as its slowest example.
    """

    log_prob: jax.Array
    bits_per_dim: jax.Array
    prior_log_prob: jax.Array
    delta_log_prob: jax.Array
    z: jax.Array
    num_steps: jax.Array
    nfe: jax.Array


def _adjoint(adjoint):
    if adjoint == "direct":
        return dfx.RecursiveCheckpointAdjoint()
    if adjoint == "backsolve":
        return dfx.BacksolveAdjoint(solver=dfx.Tsit5())
    raise ValueError(f"adjoint must be 'direct' or 'backsolve'; got {adjoint!r}")


def _solve_with_trace(field, x, t0, t1, probes, *, trace, rtol, atol, max_steps, adjoint):
    """Integrate (x, delta) with d delta / dt = tr dv/dx from t0 to t1 for one example."""
    event_shape = x.shape
    one = _single(field)

    def rhs(t, state, args):
        y, _ = state
        # Vector-Jacobian products (reverse mode), not JVPs: networks whose layers define only a
        # custom VJP (probdiff.unet's convolutions) have no forward mode.
        v, vjp = jax.vjp(lambda z: one(z, t), y)
        if trace == "exact":
            basis = jnp.eye(y.size, dtype=y.dtype).reshape((y.size,) + event_shape)
            tr = jnp.sum(jax.vmap(lambda e: jnp.vdot(vjp(e)[0], e))(basis))
        else:
            tr = jnp.mean(jax.vmap(lambda e: jnp.vdot(vjp(e)[0], e))(args))
        return v, tr

    sol = dfx.diffeqsolve(
        dfx.ODETerm(rhs), dfx.Tsit5(), t0, t1, None, (x, jnp.zeros((), x.dtype)), args=probes,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
        adjoint=adjoint, saveat=dfx.SaveAt(t1=True),
    )
    z, delta = sol.ys
    return z[0], delta[0], sol.stats["num_steps"]


def _solve(field, x, t0, t1, *, rtol, atol, max_steps, adjoint=None):
    """Integrate dx/dt = v(x, t) from t0 to t1 (either direction) for one example."""
    one = _single(field)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: one(y, t)), dfx.Tsit5(), t0, t1, None, x,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
        adjoint=adjoint or dfx.RecursiveCheckpointAdjoint(), saveat=dfx.SaveAt(t1=True),
    )
    return sol.ys[0], sol.stats["num_steps"]


def _draw_probes(key, probe, num_probes, shape, dtype):
    if probe == "rademacher":
        return jax.random.rademacher(key, (num_probes,) + shape, dtype)
    return jax.random.normal(key, (num_probes,) + shape, dtype)


class ODEFlow(dist.Distribution):
    r"""A continuous normalizing flow dx/dt = v(x, t) from data (t = t_min) to a Gaussian prior (t = 1).

    $$ \log p(x) = \log\mathcal N\big(x(1); 0, \sigma_\pi^2 I\big)
       + \int_{t_{\min}}^{1}\operatorname{tr}\frac{\partial v}{\partial x}(x(t), t)\,dt,
       \qquad x(t_{\min}) = x, $$

    solved by diffrax (Tsit5, adaptive steps at ``rtol``/``atol``), one solve per example so that
    an example's value never depends on the rest of its batch. ``sample`` draws x(1) from the
    prior and integrates back to t_min. [ProbabilityFlow][probdiff.ode.ProbabilityFlow] and
    [CNF][probdiff.ode.CNF] are the two kinds; both are NumPyro distributions, so
    ``numpyro.sample("x", flow, obs=x)`` adds the exact log-likelihood to a model.

    Hutchinson's trace needs randomness: like [GaussianDiffusion][probdiff.GaussianDiffusion], a
    flow built inside a seeded NumPyro model takes a fresh key from the seed handler; outside one,
    pass ``rng_key``. The exact trace needs none.

    Args:
        field: ``v(x, t)``, batched: x of shape ``batch + event_shape``, float t of shape ``batch``.
        event_shape: the shape of one data point.
        prior_std: sigma_pi, the standard deviation of the prior N(0, sigma_pi^2 I) at t = 1.
        prior: instead, any NumPyro distribution over x(1) with this event shape (e.g. the exact
            p_1 of Gaussian data, to separate the solver's error from the prior's mismatch).
        t_min: the data end of the path, in [0, 1) (a probability flow needs t_min > 0).
        trace: ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact up to
            [EXACT_TRACE_MAX_DIM][probdiff.ode.EXACT_TRACE_MAX_DIM] dimensions).
        probe: Hutchinson's probes, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        num_probes: probes averaged per example (each one vector-Jacobian product per evaluation).
        rtol, atol: the solver's relative and absolute tolerances, > 0.
        max_steps: the most solver steps per solve.
        adjoint: ``"direct"`` (differentiate through the solver's steps) or ``"backsolve"``
            (the continuous adjoint, E4; then the field's parameters must be arrays inside
            ``field`` as an equinox Module, not closed over).
        rng_key: a fixed key for Hutchinson's probes outside a seeded model.
    """

    arg_constraints = {}
    pytree_data_fields = ("rng_key", "prior")
    pytree_aux_fields = (
        "field", "prior_std", "t_min", "trace", "probe", "num_probes", "rtol", "atol", "max_steps", "adjoint",
    )

    def __init__(
        self, field: Callable, event_shape, *, prior_std: float = 1.0, t_min: float = 1e-5, trace: str = "auto",
        probe: str = "rademacher", num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
        max_steps: int = 4096, adjoint: str = "direct", prior=None, rng_key=None, validate_args=None,
    ):
        if not callable(field):
            raise TypeError(f"field must be a callable v(x, t); got {type(field).__name__}")
        event_shape = check_event_shape(event_shape)
        _check_trace(trace, probe)
        _adjoint(adjoint)  # validates
        self.field = field
        self.prior_std = check_positive(prior_std, "prior_std")
        self.t_min = _check_time_interval(t_min, allow_zero=True)
        self.rtol, self.atol = _check_tolerances(rtol, atol)
        self.trace = _resolve_trace(trace, math.prod(event_shape))
        self.probe = probe
        self.num_probes = _check_count(num_probes, "num_probes")
        self.max_steps = _check_count(max_steps, "max_steps")
        self.adjoint = adjoint
        if rng_key is None and self.trace == "hutchinson" and numpyro.primitives._PYRO_STACK:
            rng_key = numpyro.prng_key()
        self.rng_key = rng_key
        if prior is not None:
            if not isinstance(prior, dist.Distribution):
                raise TypeError(f"prior must be a numpyro Distribution over x(1); got {type(prior).__name__}")
            if tuple(prior.batch_shape + prior.event_shape) != tuple(event_shape) or len(prior.event_shape) != len(event_shape):
                raise ValueError(
                    f"prior must have event_shape {tuple(event_shape)} and no batch shape; got batch_shape "
                    f"{prior.batch_shape}, event_shape {prior.event_shape} (use .to_event())"
                )
        self.prior = prior
        super().__init__((), event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def event_size(self) -> int:
        """D, the number of scalars in one data point."""
        return math.prod(self.event_shape)

    def _prior_log_prob(self, z):
        if self.prior is not None:
            return self.prior.log_prob(z)
        s = self.prior_std
        d = self.event_size
        return -0.5 * jnp.sum(z**2) / s**2 - 0.5 * d * jnp.log(2 * jnp.pi * s**2)

    def log_likelihood(self, x, rng_key=None) -> LogLikelihood:
        r"""log p(x) by the instantaneous change of variables, with the solver's statistics.

        Args:
            x: data, shape ``batch + event_shape``, finite.
            rng_key: the key for Hutchinson's probes (default: the flow's ``rng_key``).

        Returns:
            a [LogLikelihood][probdiff.ode.LogLikelihood], each field of shape ``batch``.
        """
        x = check_finite(check_event(x, self.event_shape, "x"), "x")
        key = self.rng_key if rng_key is None else rng_key
        if self.trace == "hutchinson" and key is None:
            raise ValueError(
                "Hutchinson's trace needs a key: pass rng_key, build the flow inside a seeded NumPyro "
                "model, or use trace='exact'"
            )
        return _flow_log_likelihood(self, x, key)

    def log_prob(self, value):
        """log p(x) in nats (exact up to the solver's tolerance, or Hutchinson's unbiased estimate)."""
        return self.log_likelihood(value).log_prob

    def sample(self, key, sample_shape=()):
        """x(t_min) from x(1) ~ N(0, prior_std^2 I), integrating the ODE backwards."""
        shape = tuple(sample_shape) + self.event_shape
        if self.prior is not None:
            z = self.prior.sample(key, tuple(sample_shape))
        else:
            z = self.prior_std * jax.random.normal(key, shape, jnp.result_type(float))
        return self.transform_back(z)

    def transform_back(self, z):
        """The ODE from t = 1 back to t_min: the flow's inverse map, for z of shape ``batch + event_shape``."""
        return _flow_map(self, check_event(z, self.event_shape, "z"), False)

    def transform(self, x):
        """The ODE from t_min to 1: the map from data to the prior, for x of shape ``batch + event_shape``."""
        return _flow_map(self, check_event(x, self.event_shape, "x"), True)


def _flow_log_likelihood(flow: ODEFlow, x, key) -> LogLikelihood:
    """The body of ODEFlow.log_likelihood (jit it from outside: a field that holds arrays, such as
    an equinox module, cannot be a static argument)."""
    shape = flow.event_shape
    batch = x.shape[: x.ndim - len(shape)]
    flat = jnp.reshape(x, (-1,) + shape)
    if flow.trace == "hutchinson":
        keys = jax.random.split(key, flat.shape[0])
        probes = jax.vmap(lambda k: _draw_probes(k, flow.probe, flow.num_probes, shape, x.dtype))(keys)
    else:
        probes = jnp.zeros((flat.shape[0], 0), x.dtype)
    adjoint = _adjoint(flow.adjoint)

    def one(x1, p):
        return _solve_with_trace(
            flow.field, x1, flow.t_min, 1.0, p, trace=flow.trace, rtol=flow.rtol, atol=flow.atol,
            max_steps=flow.max_steps, adjoint=adjoint,
        )

    z, delta, steps = jax.vmap(one)(flat, probes)
    prior = jax.vmap(flow._prior_log_prob)(z)
    logp = prior + delta
    bpd = -logp / (flow.event_size * math.log(2.0))
    nfe = _TSIT5_EVALS_PER_STEP * steps + _TSIT5_START_EVALS
    r = lambda a: jnp.reshape(a, batch + a.shape[1:])  # noqa: E731
    return LogLikelihood(r(logp), r(bpd), r(prior), r(delta), r(z), r(steps), r(nfe))


def _flow_map(flow: ODEFlow, y, forward: bool):
    shape = flow.event_shape
    flat = jnp.reshape(y, (-1,) + shape)
    t0, t1 = (flow.t_min, 1.0) if forward else (1.0, flow.t_min)
    out, _ = jax.vmap(lambda y1: _solve(flow.field, y1, t0, t1, rtol=flow.rtol, atol=flow.atol, max_steps=flow.max_steps))(flat)
    return jnp.reshape(out, y.shape)


class ProbabilityFlow(ODEFlow):
    r"""The probability-flow ODE of an SDE and a score model, as a NumPyro distribution (MATH.md E5).

    $$ \frac{dx}{dt} = f(t)\,x - \tfrac12 g(t)^2\,s_\theta(x, t),\qquad
       \log p_\theta(x) = \log\pi(x(1)) + \int_{t_{\min}}^1 \Big(f(t)\,D
       - \tfrac12 g(t)^2 \operatorname{tr}\nabla_x s_\theta(x(t), t)\Big)\,dt . $$

    With the exact score of the data this is log p_{t_min}(x), which is log p_0(x) up to the
    noise the forward process adds by t_min (s(t_min)^2 ~ beta_min t_min for VP) and to the
    difference between p_1 and the prior (exp(-B(1)) ~ 4e-5 for VP's defaults);
    ``tests/test_ode.py`` checks it against log pi(x_0) for Gaussian data within 1e-3 nats. For
    a trained model it is the exact log-likelihood of the model the ODE defines, which is a
    different model from the discrete-time chain whose ELBO bounds its own likelihood.

    Build it from an SDE and ``score_fn(x, t)`` (float t in [0, 1], one per example), or from a
    trained [GaussianDiffusion][probdiff.GaussianDiffusion] with
    [from_diffusion][probdiff.ode.ProbabilityFlow.from_diffusion].

    Args:
        sde: the forward SDE ([probdiff.sde][probdiff.sde]); its prior sets ``prior_std``.
        score_fn: the score model s_theta(x, t).
        event_shape: the shape of one data point.
        **kwargs: the solver and trace options of [ODEFlow][probdiff.ode.ODEFlow].

    Examples:
        >>> import jax.numpy as jnp
        >>> from probdiff.ode import ProbabilityFlow
        >>> from probdiff.sde import VPSDE
        >>> flow = ProbabilityFlow(VPSDE(), lambda x, t: -x, (2,))   # the score of N(0, I) at every t
        >>> float(flow.log_prob(jnp.zeros(2)))                       # log N(0; 0, I) = -log(2 pi)
        -1.83787...
    """

    pytree_aux_fields = ODEFlow.pytree_aux_fields + ("sde", "score_fn")

    def __init__(self, sde: SDE, score_fn: Callable, event_shape, **kwargs):
        self.sde = sde
        self.score_fn = score_fn
        kwargs.setdefault("prior_std", sde.prior_std() if isinstance(sde, SDE) else 1.0)
        # s(t) -> 0 at t = 0: the score of the data itself, which no model learns.
        _check_time_interval(kwargs.get("t_min", 1e-5))
        super().__init__(probability_flow_field(sde, score_fn), event_shape, **kwargs)

    @classmethod
    def from_diffusion(cls, diffusion, **kwargs) -> ProbabilityFlow:
        r"""The probability-flow ODE of a discrete-time [GaussianDiffusion][probdiff.GaussianDiffusion].

        Uses [score_from_diffusion][probdiff.ode.score_from_diffusion]: the VP SDE through the
        schedule's alpha_bar_i and s(x, t) = -eps_theta(x, tT) / sqrt(1 - alpha_bar(t)).
        """
        sde, score_fn = score_from_diffusion(diffusion)
        return cls(sde, score_fn, diffusion.event_shape, **kwargs)


class CNF(ODEFlow):
    r"""A continuous normalizing flow with a learned vector field (FFJORD; MATH.md E5).

    $$ \frac{dx}{dt} = v_\theta(x, t),\qquad
       \log p_\theta(x) = \log\mathcal N(x(1); 0, I) + \int_{t_{\min}}^1
       \operatorname{tr}\frac{\partial v_\theta}{\partial x}\,dt, $$

    trained by maximum likelihood: ``numpyro.sample("x", CNF(eqx_module("v", net), (2,)), obs=x)``
    with an empty guide and ``Trace_ELBO`` maximises sum_i log p_theta(x_i). With
    ``trace="hutchinson"`` (FFJORD's choice, one probe per example held fixed along the path)
    the log-likelihood estimate, and so the gradient, is unbiased. The default path runs over
    [0, 1] with the prior at t = 1, the same convention as
    [ProbabilityFlow][probdiff.ode.ProbabilityFlow]; ``t_min`` defaults to 0 here.

    Args:
        field: ``v_theta(x, t)``, batched, e.g. [probdiff.nets.MLP][probdiff.nets.MLP] (it takes float t).
        event_shape: the shape of one data point.
        **kwargs: the options of [ODEFlow][probdiff.ode.ODEFlow]; ``trace`` defaults to ``"hutchinson"``.
    """

    def __init__(self, field: Callable, event_shape, **kwargs):
        kwargs.setdefault("trace", "hutchinson")
        kwargs.setdefault("t_min", 0.0)
        super().__init__(field, event_shape, **kwargs)


def log_likelihood(
    source, x, *, sde: SDE | None = None, rng_key=None, trace: str = "auto", probe: str = "rademacher",
    num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, t_min: float = 1e-5, max_steps: int = 4096,
) -> LogLikelihood:
    r"""The exact log-likelihood of x under a diffusion's probability-flow ODE, in nats and bits/dim (E5).

    $$ \log p_\theta(x) = \log\pi(x(1)) + \int_{t_{\min}}^{1}\operatorname{tr}\frac{\partial v}{\partial x}(x(t),t)\,dt,
       \qquad \text{bits/dim} = -\frac{\log p_\theta(x)}{D\,\log 2}. $$

    For discrete data, dequantise first ([probdiff.data.dequantize][probdiff.data.dequantize])
    and convert with [discrete_bits_per_dim][probdiff.data.discrete_bits_per_dim].

    Args:
        source: a [GaussianDiffusion][probdiff.GaussianDiffusion] (discrete time; its schedule
            becomes a [ScheduleSDE][probdiff.sde.ScheduleSDE]), or a score function
            ``score_fn(x, t)`` with float t in [0, 1], with ``sde`` given.
        x: data, shape ``batch + event_shape``.
        sde: the forward SDE, for a score function.
        rng_key: the key for Hutchinson's probes.
        trace, probe, num_probes, rtol, atol, t_min, max_steps: see [ODEFlow][probdiff.ode.ODEFlow].

    Returns:
        a [LogLikelihood][probdiff.ode.LogLikelihood].
    """
    from probdiff.diffusion import GaussianDiffusion

    opts = dict(trace=trace, probe=probe, num_probes=num_probes, rtol=rtol, atol=atol, t_min=t_min, max_steps=max_steps, rng_key=rng_key)
    if isinstance(source, GaussianDiffusion):
        if sde is not None:
            raise ValueError("a GaussianDiffusion brings its own SDE (from its schedule); do not pass sde")
        flow = ProbabilityFlow.from_diffusion(source, **opts)
    else:
        if sde is None:
            raise ValueError("a score function needs its forward SDE: pass sde=VPSDE() (or the one it was trained on)")
        x = jnp.asarray(x)
        event_shape = getattr(source, "event_shape", None) or x.shape[1:]
        if not event_shape:
            raise ValueError(f"x must have shape batch + event_shape with a batch axis; got shape {x.shape}")
        flow = ProbabilityFlow(sde, source, event_shape, **opts)
    return flow.log_likelihood(x)


# --------------------------------------------------------------------------- reverse SDE
class _GridBrownianPath(dfx.AbstractBrownianPath):
    """Brownian increments over the steps of a uniform grid, drawn from the step's index.

    Stateless and differentiable in everything but the noise, so reverse-mode gradients go
    through a fixed-step solve (diffrax's UnsafeBrownianPath is refused by its checkpointed
    adjoint). Valid only for queries on the grid's own intervals, which a constant step size
    of ``dt`` makes.
    """

    levy_area: type = eqx.field(static=True)
    shape: tuple = eqx.field(static=True)
    start: float = eqx.field(static=True)
    end: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    key: jax.Array

    @property
    def t0(self):
        return self.start

    @property
    def t1(self):
        return self.end

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        if t1 is None:
            raise ValueError("the grid Brownian path gives increments over a step, not point values")
        dtype = jnp.result_type(float)
        h = jnp.asarray(t1 - t0, dtype)
        index = jnp.round((jax.lax.stop_gradient(t0) - self.start) / self.dt).astype(jnp.int32)
        key_w, key_h = jax.random.split(jax.random.fold_in(self.key, index))
        std = jnp.sqrt(jax.lax.stop_gradient(h))
        w = std * jax.random.normal(key_w, self.shape, dtype)
        if self.levy_area is dfx.SpaceTimeLevyArea:
            val = dfx.SpaceTimeLevyArea(dt=h, W=w, H=std / math.sqrt(12.0) * jax.random.normal(key_h, self.shape, dtype))
        else:
            val = dfx.BrownianIncrement(dt=h, W=w)
        return val if use_levy else w


def reverse_sde_sample(
    sde: SDE, score_fn: Callable, rng_key, shape, *, num_steps: int = 1000, solver: str = "euler",
    t_min: float = 1e-3, denoise: bool = True,
) -> jax.Array:
    r"""Samples by solving the reverse-time SDE from the prior at t = 1 to t_min (MATH.md E3).

    $$ dx = \big[f(t)\,x - g(t)^2 s_\theta(x, t)\big]dt + g(t)\,d\bar w,\qquad x(1)\sim\pi, $$

    written in reversed time tau = 1 - t (so the Brownian motion runs forward) and solved by
    diffrax with ``num_steps`` equal steps: ``"euler"`` is Euler-Maruyama (strong order 1/2 for
    general SDEs, 1 for this additive noise), ``"shark"`` a shifted additive-noise stochastic
    Runge-Kutta method (strong order 1.5, two score evaluations per step, space-time Levy area).
    With ``denoise`` the last point is replaced by Tweedie's E[x_0 | x(t_min)] =
    (x + s(t)^2 s_theta(x, t)) / m(t), removing the noise left at t_min.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)``, batched, float t in [0, 1].
        rng_key: a JAX PRNG key.
        shape: ``batch + event_shape`` of the samples.
        num_steps: equal steps from 1 to t_min, >= 1.
        solver: one of [SDE_SOLVERS][probdiff.ode.SDE_SOLVERS].
        t_min: where the reverse SDE stops, in (0, 1).
        denoise: return Tweedie's denoised mean at t_min.

    Returns:
        samples of shape ``shape``.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a probdiff.sde.SDE; got {type(sde).__name__}")
    if solver not in SDE_SOLVERS:
        raise ValueError(f"solver must be one of {SDE_SOLVERS}; got {solver!r}")
    num_steps = _check_count(num_steps, "num_steps")
    t_min = _check_time_interval(t_min)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be batch + event_shape (at least 2 axes); got {shape}")
    dtype = jnp.result_type(float)
    key_prior, key_bm = jax.random.split(rng_key)
    x1 = sde.prior_sample(key_prior, shape).astype(dtype)
    size = math.prod(shape)
    batch = shape[0]
    t_of = lambda tau: 1.0 - tau  # noqa: E731

    def drift(tau, y, args):
        t = t_of(tau)
        x = jnp.reshape(y, shape)
        tb = jnp.full((batch,), t, dtype)
        s = score_fn(x, tb)
        if getattr(s, "shape", None) != x.shape:
            raise ValueError(f"score_fn must return an array with the shape of x, {x.shape}; got {getattr(s, 'shape', type(s))}")
        return -jnp.reshape(sde.drift_coef(t) * x - sde.diffusion(t) ** 2 * s, (size,))

    def noise(tau, y, args):
        return lx.DiagonalLinearOperator(jnp.full((size,), sde.diffusion(t_of(tau)), dtype))

    levy = dfx.SpaceTimeLevyArea if solver == "shark" else dfx.BrownianIncrement
    tau1 = 1.0 - t_min
    bm = _GridBrownianPath(levy_area=levy, shape=(size,), start=0.0, end=tau1, dt=tau1 / num_steps, key=key_bm)
    terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(noise, bm))
    sol = dfx.diffeqsolve(
        terms, dfx.Euler() if solver == "euler" else dfx.ShARK(), 0.0, tau1, tau1 / num_steps,
        jnp.reshape(x1, (size,)), saveat=dfx.SaveAt(t1=True), max_steps=num_steps + 1,
        stepsize_controller=dfx.ConstantStepSize(),
    )
    x = jnp.reshape(sol.ys[0], shape)
    if denoise:
        tb = jnp.full((batch,), t_min, dtype)
        m = sde.mean_coef(t_min)
        s2 = sde.marginal_std(t_min) ** 2
        x = (x + s2 * score_fn(x, tb)) / m
    return x


# --------------------------------------------------------------------------- neural ODEs
def odeint(
    field: Callable, y0, t0: float = 0.0, t1: float = 1.0, *, rtol: float = 1e-5, atol: float = 1e-5,
    adjoint: str = "backsolve", max_steps: int = 4096,
):
    r"""y(t1) for dy/dt = field(y, t), y(t0) = y0, with gradients by the adjoint method or through the solver (E4).

    With ``adjoint="backsolve"`` the gradient of a loss L(y(t1)) comes from the continuous
    adjoint (Pontryagin; Chen et al. 2018): a(t) = dL/dy(t) solves da/dt = -a^T df/dy backwards
    from a(t1) = dL/dy(t1), together with y itself, and

    $$ \frac{dL}{d\theta} = \int_{t_1}^{t_0} -a(t)^\top\frac{\partial f}{\partial\theta}(y(t),t,\theta)\,dt , $$

    in O(1) memory, with gradients accurate to the solver's tolerance. ``"direct"``
    differentiates through the solver's own steps (exact gradients of the discretised solve;
    memory grows with the steps, kept down by recursive checkpointing). The field's parameters
    must be arrays inside ``field`` (an equinox Module such as ``numpyro.contrib.module.eqx_module``
    returns, or any pytree): with ``"backsolve"``, parameters captured by a closure get no gradient.

    Args:
        field: ``field(y, t) -> dy/dt`` with y shaped like ``y0`` and scalar t.
        y0: the initial state, an array.
        t0, t1: the time interval (t1 may be below t0).
        rtol, atol: the solver's tolerances, > 0.
        adjoint: ``"backsolve"`` or ``"direct"``.
        max_steps: the most solver steps.
    """
    if not callable(field):
        raise TypeError(f"field must be a callable field(y, t); got {type(field).__name__}")
    rtol, atol = _check_tolerances(rtol, atol)
    max_steps = _check_count(max_steps, "max_steps")
    for name, value in (("t0", t0), ("t1", t1)):
        if is_concrete(value) and not np.isfinite(np.asarray(value)).all():
            raise ValueError(f"{name} must be finite; got {value!r}")
    params, static = eqx.partition(field, eqx.is_array)

    def rhs(t, y, p):
        return eqx.combine(p, static)(y, t)

    sol = dfx.diffeqsolve(
        dfx.ODETerm(rhs), dfx.Tsit5(), t0, t1, None, jnp.asarray(y0), args=params,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
        adjoint=_adjoint(adjoint), saveat=dfx.SaveAt(t1=True),
    )
    return sol.ys[0]


class NeuralODE(eqx.Module):
    r"""An ODE block: y -> y(t1) with dy/dt = field(y, t), y(t0) = y (MATH.md E4).

    The continuous limit of a residual network: one Euler step y + h field(y, t) is a residual
    block, and the solve replaces a stack of them with one network evaluated at every time. An
    equinox Module, so it trains inside NumPyro models via ``numpyro.contrib.module.eqx_module``.
    Gradients come from [odeint][probdiff.ode.odeint]'s adjoint.

    Args:
        field: an equinox Module ``field(y, t)``.
        t0, t1: the time interval.
        rtol, atol: the solver's tolerances.
        adjoint: ``"backsolve"`` (default) or ``"direct"``.
    """

    field: Callable
    t0: float = eqx.field(static=True, default=0.0)
    t1: float = eqx.field(static=True, default=1.0)
    rtol: float = eqx.field(static=True, default=1e-5)
    atol: float = eqx.field(static=True, default=1e-5)
    adjoint: str = eqx.field(static=True, default="backsolve")

    def __call__(self, y):
        """y(t1) from y(t0) = y."""
        return odeint(self.field, y, self.t0, self.t1, rtol=self.rtol, atol=self.atol, adjoint=self.adjoint)
