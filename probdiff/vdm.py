r"""Variational diffusion models: the continuous-time ELBO with a learnable noise schedule.

Kingma, Salimans, Poole & Ho (2021), "Variational Diffusion Models" (VDM), take the B2 bound
(MATH.md B2) to T -> infinity and learn the noise schedule with the network.

**Notation.** On t in [0, 1] the forward process is

$$ q(z_t\mid x) = \mathcal{N}\big(\alpha_t x,\ \sigma_t^2 I\big),\qquad
   \alpha_t^2 = \operatorname{sigmoid}(-\gamma(t)),\quad \sigma_t^2 = \operatorname{sigmoid}(\gamma(t)),
   \quad \mathrm{SNR}(t) = \frac{\alpha_t^2}{\sigma_t^2} = e^{-\gamma(t)}, $$

with gamma increasing (a [GammaSchedule][probdiff.vdm.GammaSchedule]). In the notes' notation
(MATH.md A2) x = x_0, z_t = x_t, alpha_t^2 = alpha_bar and sigma_t^2 = 1 - alpha_bar, so
z_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps. VDM's alpha_t is the square root of
alpha_bar, **not** the notes' alpha_t = 1 - beta_t. The network predicts the noise from z_t
and gamma_t = gamma(t) (not from t): eps_hat = eps_theta(z_t, gamma_t), and
x_hat = (z_t - sigma_t eps_hat) / alpha_t.

**The bound.** With a decoder p(x | z_0) = N(x_hat(z_0), sigma_0^2 I) and the prior
p(z_1) = N(0, I),

$$ \mathrm{ELBO}(x) = \mathbb{E}_{q(z_0|x)}\log p(x\mid z_0)
   - \mathrm{KL}\big(q(z_1\mid x)\,\|\,\mathcal{N}(0,I)\big) - \mathcal{L}(x). $$

With T steps s = (i - 1)/T, t = i/T and p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)), the
diffusion loss is the sum of the B2 KLs,

$$ \mathcal{L}_T = \frac{T}{2}\,\mathbb{E}_{\epsilon,\,i\sim U\{1..T\}}
   \big[(\mathrm{SNR}(s)-\mathrm{SNR}(t))\,\|x-\hat x(z_t;t)\|^2\big]
   = \sum_{i=1}^{T}\tfrac12\,\mathbb{E}_\epsilon\big[(e^{\gamma(t)-\gamma(s)}-1)\,
   \|\epsilon-\hat\epsilon(z_t;\gamma_t)\|^2\big], $$

and as T -> infinity ([VariationalDiffusion.elbo][probdiff.vdm.VariationalDiffusion.elbo])

$$ \mathcal{L}_\infty = \tfrac12\,\mathbb{E}_{\epsilon,\,t\sim U(0,1)}\big[\gamma'(t)\,
   \|\epsilon-\hat\epsilon(z_t;\gamma_t)\|^2\big]
   = \tfrac12\int_{\gamma_0}^{\gamma_1}\mathbb{E}_\epsilon
   \|\epsilon-\hat\epsilon(z_\gamma;\gamma)\|^2\,d\gamma . $$

The T-step model is exactly a [GaussianDiffusion][probdiff.GaussianDiffusion] with T + 1 steps
and ``variance="beta_tilde"`` on the schedule ``schedule.discretize(T)``
(alpha_bar_{i+1} = sigmoid(-gamma(i/T))), whose decoder variance beta_1 = 1 - alpha_bar_1 is
sigma_0^2; see [VariationalDiffusion.discrete_elbo][probdiff.vdm.VariationalDiffusion.discrete_elbo].
L_T decreases to L_inf as T grows (for a denoiser that is better with less noise, such as the
optimal one), the gap falling as 1/T.

**Invariance and the variance gradient.** The last integral (substitute gamma = gamma(t))
depends on the schedule only through its endpoints gamma_0, gamma_1: the interior of the
schedule does not change the expected loss, only the variance of its one-sample estimate
L = 1/2 gamma'(t) ||eps - eps_hat||^2. So VDM trains the endpoints on the ELBO and the
interior h (gamma = gamma_0 + (gamma_1 - gamma_0) h(t)) on the variance:

$$ \nabla_{\theta_h}\operatorname{Var}[\mathcal{L}] = \nabla_{\theta_h}\mathbb{E}[\mathcal{L}^2]
   = \mathbb{E}\big[2\,\mathcal{L}\,\nabla_{\theta_h}\mathcal{L}\big], $$

obtained at no extra cost by scaling the cotangents of h(t) and h'(t) by 2 L (option
``schedule_gradient="variance"`` of [VariationalDiffusion][probdiff.vdm.VariationalDiffusion]).

``tests/test_vdm.py`` checks every formula here on Gaussian data against closed forms,
scipy quadrature and Monte Carlo.

**Training** the network and the schedule together by SVI (an observed site, an empty guide):

```python
from numpyro.contrib.module import eqx_module

net0 = probdiff.nets.MLP(2, jax.random.key(1), hidden=(32, 32))  # called as net(z_t, gamma_t)
schedule0 = LearnedSchedule(jax.random.key(2))

def model(x):
    net = eqx_module("eps_net", net0)
    schedule = eqx_module("schedule", schedule0)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", VariationalDiffusion(net, schedule, (2,)), obs=x)

svi = SVI(model, lambda x: None, optax.adam(3e-3), Trace_ELBO())
result = svi.run(jax.random.key(0), 1500, data)
```
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probdiff._checks import check_event, check_event_shape, check_finite, float_dtype, is_concrete
from probdiff.distributions.chains import map_over_t
from probdiff.distributions.kernels import call_eps
from probdiff.schedules import Schedule, from_betas

__all__ = [
    "SCHEDULE_GRADIENTS",
    "GammaSchedule",
    "LinearSchedule",
    "LearnedSchedule",
    "VDMTerms",
    "VariationalDiffusion",
]

#: How the interior of a learned schedule is trained: on the variance of the diffusion-loss
#: estimator (VDM's choice) or on the ELBO like every other parameter.
SCHEDULE_GRADIENTS = ("variance", "elbo")


# ----------------------------------------------------------------------------- helpers
@jax.custom_jvp
def _scale_grad(value, c):
    """The identity on ``value`` whose derivative is multiplied by ``c`` (c gets none).

    A custom JVP rather than a custom VJP: the tangent rule value_dot * c is linear, so
    reverse mode (its transpose) multiplies the cotangent by c, and forward mode
    (``jax.jvp``, ``jax.jacfwd``) works as well.
    """
    return value


@_scale_grad.defjvp
def _scale_grad_jvp(primals, tangents):
    value, c = primals
    value_dot, _ = tangents
    return value, (value_dot * c).astype(jnp.result_type(value))


def _check_time(t, name: str = "t"):
    """t as a float array; concrete values must lie in [0, 1]."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if is_concrete(t):
        tv = np.asarray(t)
        bad = ~((tv >= 0) & (tv <= 1))
        if bad.any():
            raise ValueError(
                f"{name} must lie in [0, 1] (the diffusion time; gamma(t) is defined there); "
                f"got {name} = {tv[bad].ravel()[0]}"
            )
    return t


def _check_endpoints(gamma_min, gamma_max):
    try:
        lo, hi = float(gamma_min), float(gamma_max)
    except (TypeError, ValueError):
        raise TypeError(f"gamma_min and gamma_max must be floats; got {gamma_min!r}, {gamma_max!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"gamma_min and gamma_max must be finite; got gamma_min = {lo}, gamma_max = {hi}")
    if not lo < hi:
        raise ValueError(
            f"gamma_min must be below gamma_max (gamma increases on [0, 1]); got gamma_min = {lo}, "
            f"gamma_max = {hi}"
        )
    return lo, hi


def _check_num_steps(num_steps, name: str = "num_steps") -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"{name} must be an integer T >= 1 (the number of steps); got {num_steps!r}")
    return int(num_steps)


def _inv_softplus(y):
    """x with softplus(x) = y > 0, in float64 numpy."""
    y = np.asarray(y, np.float64)
    return y + np.log(-np.expm1(-y))


def _expand(c, x, event_ndim: int):
    """c of shape batch reshaped to broadcast against x of shape batch + event."""
    c = jnp.asarray(c)
    return jnp.reshape(c, c.shape + (1,) * event_ndim)


# --------------------------------------------------------------------------- schedules
class GammaSchedule(eqx.Module):
    r"""A monotone noise schedule gamma(t) on [0, 1]: the base of the VDM schedules.

    $$ \gamma(t) = \gamma_0 + (\gamma_1-\gamma_0)\,h(t),\qquad h(0)=0,\ h(1)=1,\ h' > 0, $$

    $$ \alpha_t^2 = \operatorname{sigmoid}(-\gamma(t)) = \bar\alpha,\qquad
       \sigma_t^2 = \operatorname{sigmoid}(\gamma(t)) = 1-\bar\alpha,\qquad
       \mathrm{SNR}(t) = e^{-\gamma(t)} . $$

    A subclass gives the endpoints (gamma_0, gamma_1) and the normalised interior h(t) with
    its derivative h'(t); the rest follows. Schedules are Equinox modules: their arrays are
    leaves, so ``numpyro.contrib.module.eqx_module("schedule", schedule)`` registers them
    as parameters and SVI trains them with the network.
    """

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        """(gamma_0, gamma_1) = (gamma(0), gamma(1)), the schedule's endpoints."""
        raise NotImplementedError

    def interior(self, t) -> tuple[jax.Array, jax.Array]:
        """(h(t), h'(t)) of the normalised interior, h(0) = 0, h(1) = 1, for t in [0, 1]."""
        raise NotImplementedError

    def gamma_and_prime(self, t, *, grad_scale=None) -> tuple[jax.Array, jax.Array]:
        r"""gamma(t) and gamma'(t) = (gamma_1 - gamma_0) h'(t) together.

        Args:
            t: times in [0, 1], any shape (checked when concrete).
            grad_scale: optional factor of the shape of ``t``; when given, the derivatives of
                h(t) and h'(t) (with respect to the interior's parameters) are multiplied by
                it, while the values and the endpoints' derivatives are unchanged. This is how
                [VariationalDiffusion][probdiff.vdm.VariationalDiffusion] turns the ELBO
                gradient of the interior into the variance gradient (grad_scale = 2 L).
        """
        t = _check_time(t)
        g0, g1 = self.endpoints()
        h, dh = self.interior(t)
        if grad_scale is not None:
            grad_scale = jax.lax.stop_gradient(jnp.broadcast_to(grad_scale, jnp.shape(h)))
            h = _scale_grad(h, grad_scale)
            dh = _scale_grad(dh, grad_scale)
        return g0 + (g1 - g0) * h, (g1 - g0) * dh

    def gamma(self, t) -> jax.Array:
        r"""gamma(t) = gamma_0 + (gamma_1 - gamma_0) h(t) = -log SNR(t), for t in [0, 1]."""
        return self.gamma_and_prime(t)[0]

    def gamma_prime(self, t) -> jax.Array:
        r"""d gamma / dt = (gamma_1 - gamma_0) h'(t) > 0, the weight of the continuous loss."""
        return self.gamma_and_prime(t)[1]

    def alpha_sigma(self, t) -> tuple[jax.Array, jax.Array]:
        r"""(alpha_t, sigma_t) = (sqrt(sigmoid(-gamma(t))), sqrt(sigmoid(gamma(t)))).

        alpha_t^2 is the notes' alpha_bar and sigma_t^2 = 1 - alpha_bar (MATH.md A2):
        z_t = alpha_t x + sigma_t eps.
        """
        g = self.gamma(t)
        return jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))

    def snr(self, t) -> jax.Array:
        r"""SNR(t) = alpha_t^2 / sigma_t^2 = exp(-gamma(t))."""
        return jnp.exp(-self.gamma(t))

    def discretize(self, num_steps: int, *, dtype=None) -> Schedule:
        r"""The T-step model's schedule: a [Schedule][probdiff.schedules.Schedule] with T + 1 steps.

        $$ \bar\alpha_{i+1} = \operatorname{sigmoid}\big(-\gamma(i/T)\big),\quad i = 0..T,
           \qquad \beta_{i+1} = 1-\frac{\bar\alpha_{i+1}}{\bar\alpha_i},\quad \bar\alpha_0 = 1 . $$

        Step 1 goes from the data x_0 = x to x_1 = z_0 (beta_1 = sigma_0^2), step i + 1 from
        z_{(i-1)/T} to z_{i/T}. With ``eps_disc(x, i) = eps_fn(x, gamma((i - 1)/T))``,
        ``GaussianDiffusion(eps_disc, schedule.discretize(T), event_shape, variance="beta_tilde")``
        is the model of [discrete_elbo][probdiff.vdm.VariationalDiffusion.discrete_elbo]
        (same ELBO, same noise for the same key). The betas are formed as
        -expm1(log alpha_bar_{i+1} - log alpha_bar_i), accurate when they are small.

        Args:
            num_steps: T >= 1.
            dtype: float dtype (default float32, float64 under ``jax_enable_x64``).
        """
        T = _check_num_steps(num_steps)
        dtype = float_dtype(dtype)
        t = jnp.arange(T + 1, dtype=dtype) / T
        log_alpha_bar = jax.nn.log_sigmoid(-self.gamma_and_prime(t)[0].astype(dtype))
        previous = jnp.concatenate([jnp.zeros((1,), dtype), log_alpha_bar[:-1]])
        return from_betas(-jnp.expm1(log_alpha_bar - previous), dtype=dtype)


class LinearSchedule(GammaSchedule):
    r"""gamma(t) = gamma_min + (gamma_max - gamma_min) t: VDM's fixed linear schedule.

    $$ \gamma(t) = \gamma_{\min} + (\gamma_{\max}-\gamma_{\min})\,t,\qquad
       \gamma'(t) = \gamma_{\max}-\gamma_{\min} . $$

    The defaults -13.3 and 5.0 are VDM's: sigma_0^2 = sigmoid(-13.3) = 1.7e-6 and
    alpha_1^2 = sigmoid(-5) = 6.7e-3. The schedule is meant to stay fixed: pass it as it
    is. Wrapped by ``numpyro.contrib.module.eqx_module`` its two fields become parameters
    and SVI moves the endpoints (nothing then keeps gamma_min < gamma_max).

    Args:
        gamma_min: gamma(0), finite.
        gamma_max: gamma(1) > gamma_min, finite.
        dtype: float dtype of the fields (default float32, float64 under ``jax_enable_x64``).

    Examples:
        >>> from probdiff.vdm import LinearSchedule
        >>> s = LinearSchedule()
        >>> round(float(s.gamma(0.5)), 4), round(float(s.gamma_prime(0.5)), 4)
        (-4.15, 18.3)
    """

    gamma_min: jax.Array
    gamma_max: jax.Array

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, *, dtype=None):
        lo, hi = _check_endpoints(gamma_min, gamma_max)
        dtype = float_dtype(dtype)
        self.gamma_min = jnp.asarray(lo, dtype)
        self.gamma_max = jnp.asarray(hi, dtype)

    def endpoints(self):
        """(gamma_min, gamma_max)."""
        return self.gamma_min, self.gamma_max

    def interior(self, t):
        """h(t) = t, h'(t) = 1."""
        t = jnp.asarray(t)
        return t, jnp.ones_like(t)


class LearnedSchedule(GammaSchedule):
    r"""A learnable monotone schedule: VDM's positive-weight network, normalised on [0, 1].

    $$ \gamma(t) = \gamma_0 + (\gamma_1-\gamma_0)\,\frac{l(t)-l(0)}{l(1)-l(0)},\qquad
       l(t) = a\,t + \sum_{k=1}^{K} c_k\,\operatorname{sigmoid}(d_k t + e_k), $$

    with a = softplus(a_raw), c_k = softplus(c_raw_k), d_k = softplus(d_raw_k) positive and
    e_k free, and gamma_1 = gamma_0 + softplus(gap_raw). So for any parameter values

    $$ l'(t) = a + \sum_k c_k d_k\,s_k(1-s_k) > 0,\qquad s_k = \operatorname{sigmoid}(d_k t+e_k), $$

    gamma is strictly increasing from gamma_0 to gamma_1 > gamma_0, h(0) = 0 and h(1) = 1
    exactly. h'(t) = l'(t) / (l(1) - l(0)) is the closed form above (checked against
    ``jax.grad``). The endpoints are (gamma_0, gap_raw), the interior h is (a_raw, c_raw,
    d_raw, e): [VariationalDiffusion][probdiff.vdm.VariationalDiffusion] trains the first
    on the ELBO and, by default, the second on the variance of the diffusion loss.

    At initialisation the endpoints are gamma_min and gamma_max and the schedule is close to
    linear: the sigmoid units (centres uniform on [0, 1], slopes log-uniform in [7.4, 13.5])
    carry a tenth of the weight of the linear term.

    Args:
        key: a JAX PRNG key for the sigmoid units.
        gamma_min: the initial gamma_0, finite.
        gamma_max: the initial gamma_1 > gamma_min, finite.
        hidden: K >= 1, the number of sigmoid units.
        dtype: float dtype (default float32, float64 under ``jax_enable_x64``).

    Examples:
        >>> import jax
        >>> from probdiff.vdm import LearnedSchedule
        >>> s = LearnedSchedule(jax.random.key(0))
        >>> [round(float(g), 4) for g in s.gamma(jax.numpy.array([0.0, 1.0]))]
        [-13.3, 5.0]
        >>> bool((s.gamma_prime(jax.numpy.linspace(0, 1, 11)) > 0).all())
        True
    """

    gamma_0: jax.Array
    gap_raw: jax.Array
    a_raw: jax.Array
    c_raw: jax.Array
    d_raw: jax.Array
    e: jax.Array

    def __init__(
        self, key, gamma_min: float = -13.3, gamma_max: float = 5.0, *, hidden: int = 16, dtype=None
    ):
        lo, hi = _check_endpoints(gamma_min, gamma_max)
        if isinstance(hidden, bool) or not isinstance(hidden, int | np.integer) or hidden < 1:
            raise ValueError(
                f"hidden must be an integer K >= 1 (the number of sigmoid units); got {hidden!r}"
            )
        dtype = float_dtype(dtype)
        # One draw for everything (the rest in numpy, so that building a schedule compiles little).
        u = np.asarray(jax.random.uniform(key, (2, hidden), jnp.float32), np.float64)
        centre, slope = u[0], 10.0 * np.exp(0.6 * (u[1] - 0.5))
        self.gamma_0 = jnp.asarray(lo, dtype)
        self.gap_raw = jnp.asarray(_inv_softplus(hi - lo), dtype)
        self.a_raw = jnp.asarray(_inv_softplus(1.0), dtype)
        self.c_raw = jnp.asarray(np.full(hidden, _inv_softplus(0.1 / hidden)), dtype)
        self.d_raw = jnp.asarray(_inv_softplus(slope), dtype)
        self.e = jnp.asarray(-slope * centre, dtype)

    @property
    def gamma_1(self) -> jax.Array:
        """gamma(1) = gamma_0 + softplus(gap_raw) > gamma_0."""
        return self.gamma_0 + jax.nn.softplus(self.gap_raw)

    def endpoints(self):
        """(gamma_0, gamma_0 + softplus(gap_raw))."""
        return self.gamma_0, self.gamma_1

    def _l(self, t):
        a = jax.nn.softplus(self.a_raw)
        c = jax.nn.softplus(self.c_raw)
        d = jax.nn.softplus(self.d_raw)
        s = jax.nn.sigmoid(d * jnp.asarray(t)[..., None] + self.e)
        return a * t + jnp.sum(c * s, -1), a + jnp.sum(c * d * s * (1.0 - s), -1)

    def interior(self, t):
        r"""(h(t), h'(t)) = ((l(t) - l(0)) / (l(1) - l(0)), l'(t) / (l(1) - l(0)))."""
        t = jnp.asarray(t)
        l_t, dl_t = self._l(t)
        l_0, _ = self._l(jnp.zeros((), t.dtype))
        l_1, _ = self._l(jnp.ones((), t.dtype))
        norm = l_1 - l_0
        return (l_t - l_0) / norm, dl_t / norm


# ------------------------------------------------------------------------------- model
class VDMTerms(NamedTuple):
    r"""The three parts of the VDM ELBO, in nats, one value per example.

    $$ \mathrm{ELBO} = \underbrace{\mathbb{E}_{q(z_0|x)}\log\mathcal{N}\big(x;\hat x(z_0;\gamma_0),
       \sigma_0^2 I\big)}_{\texttt{reconstruction}}
       - \underbrace{\mathrm{KL}\big(q(z_1|x)\,\|\,\mathcal{N}(0,I)\big)}_{\texttt{prior\_matching}}
       - \underbrace{\mathcal{L}_\infty\ \text{or}\ \mathcal{L}_T}_{\texttt{diffusion}} $$

    Attributes:
        reconstruction: log N(x; x_hat(z_0), sigma_0^2 I) at one z_0 ~ q(z_0 | x); shape ``batch``.
        prior_matching: KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)), exact; shape ``batch``.
        diffusion: the one-sample estimate of L_inf (or, from ``discrete_elbo_terms``, of
            L_T); shape ``batch``.
    """

    reconstruction: jax.Array
    prior_matching: jax.Array
    diffusion: jax.Array

    @property
    def total(self) -> jax.Array:
        """The ELBO: reconstruction - prior_matching - diffusion."""
        return self.reconstruction - self.prior_matching - self.diffusion


class VariationalDiffusion(dist.Distribution):
    r"""A variational diffusion model over x, as a NumPyro distribution whose ``log_prob`` is the ELBO.

    $$ \log p(x) \ge \mathbb{E}_{q(z_0|x)}\log\mathcal{N}\big(x;\hat x(z_0;\gamma_0),\sigma_0^2 I\big)
       - \mathrm{KL}\big(q(z_1|x)\,\|\,\mathcal{N}(0,I)\big)
       - \tfrac12\,\mathbb{E}_{t\sim U(0,1),\,\epsilon}\big[\gamma'(t)\,
       \|\epsilon-\hat\epsilon(z_t;\gamma_t)\|^2\big] $$

    with z_t = alpha_t x + sigma_t eps and x_hat = (z_t - sigma_t eps_hat) / alpha_t (module
    docstring for the notation; alpha_t^2 is the notes' alpha_bar). ``log_prob`` is a
    one-sample, unbiased estimate of this continuous-time ELBO, so
    ``numpyro.sample("x", VariationalDiffusion(...), obs=x)`` with an empty guide and
    ``Trace_ELBO`` trains the network and, through ``eqx_module``, a
    [LearnedSchedule][probdiff.vdm.LearnedSchedule] by SVI. Like
    [GaussianDiffusion][probdiff.GaussianDiffusion], one built inside a seeded NumPyro model
    takes a fresh key from the seed handler; a fixed ``rng_key`` is for one-off evaluation;
    with neither, ``log_prob`` raises.

    **Times.** Each example gets one t. With ``antithetic_time`` the B examples of a batch
    (flattened) share one u ~ U(0, 1) and take t_i = (u + i/B) mod 1: each t_i is still
    uniform (every per-example estimate stays unbiased) but together they cover [0, 1]
    evenly, which lowers the variance of the batch's sum (VDM's low-discrepancy sampler).

    **Schedule gradient.** With ``schedule_gradient="variance"`` (default) the gradient that
    reaches the interior h of the schedule is that of sum_i L_i^2, the (summed) second moment
    of the per-example diffusion losses, whose expectation is the gradient of the estimator's
    variance because E[L] does not depend on h; the endpoints and the network get the ELBO
    gradient. The values are unchanged. ``"elbo"`` gives every parameter the ELBO gradient.
    Only [elbo][probdiff.vdm.VariationalDiffusion.elbo] (the continuous bound) does this;
    ``discrete_elbo`` is differentiated plainly (L_T does depend on the interior).

    Args:
        eps_fn: ``eps_fn(z_t, gamma_t) -> eps_hat``, an array shaped like ``z_t``; ``z_t`` has
            shape ``batch + event_shape`` and ``gamma_t`` is a float array of shape ``batch``
            (the network sees gamma, not t, which makes the expected loss invariant to the
            schedule's interior). An Equinox module such as ``probdiff.nets.MLP`` accepts a
            float time input.
        schedule: a [GammaSchedule][probdiff.vdm.GammaSchedule] (fixed, or wrapped by
            ``eqx_module`` to learn it).
        event_shape: shape of one data point x.
        rng_key: optional fixed key for ``log_prob`` outside a seed handler.
        antithetic_time: low-discrepancy times across the batch (default True).
        schedule_gradient: ``"variance"`` or ``"elbo"``, see above.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from probdiff.vdm import LinearSchedule, VariationalDiffusion
        >>> vdm = VariationalDiffusion(lambda z, g: 0.5 * z, LinearSchedule(), (2,))
        >>> x = jnp.ones((3, 2))
        >>> vdm.elbo_terms(jax.random.key(0), x).diffusion.shape
        (3,)
        >>> vdm.sample(jax.random.key(1), (5,), num_steps=20).shape
        (5, 2)
    """

    arg_constraints = {}
    pytree_data_fields = ("schedule", "rng_key")
    pytree_aux_fields = ("eps_fn", "antithetic_time", "schedule_gradient")

    def __init__(
        self,
        eps_fn: Callable,
        schedule: GammaSchedule,
        event_shape,
        *,
        rng_key=None,
        antithetic_time: bool = True,
        schedule_gradient: str = "variance",
        validate_args=None,
    ):
        if not callable(eps_fn):
            raise TypeError(f"eps_fn must be a callable eps_fn(z_t, gamma_t); got {type(eps_fn).__name__}")
        if not isinstance(schedule, GammaSchedule):
            raise TypeError(
                "schedule must be a probdiff.vdm.GammaSchedule (LinearSchedule, LearnedSchedule); "
                f"got {type(schedule).__name__}"
            )
        if schedule_gradient not in SCHEDULE_GRADIENTS:
            raise ValueError(
                f"schedule_gradient must be one of {SCHEDULE_GRADIENTS}; got {schedule_gradient!r}"
            )
        g0, g1 = schedule.endpoints()
        if is_concrete(g0, g1):
            g0v, g1v = float(g0), float(g1)
            if not (math.isfinite(g0v) and math.isfinite(g1v) and g0v < g1v):
                raise ValueError(
                    "the schedule's endpoints must be finite with gamma_0 < gamma_1; got "
                    f"gamma_0 = {g0v}, gamma_1 = {g1v}"
                )
        event_shape = check_event_shape(event_shape)
        if rng_key is None and numpyro.primitives._PYRO_STACK:
            # Built inside a seeded model (SVI, Predictive, seed(...)): take this run's key now,
            # because NumPyro scores observed sites after the handlers have exited.
            rng_key = numpyro.prng_key()
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.rng_key = rng_key
        self.antithetic_time = bool(antithetic_time)
        self.schedule_gradient = schedule_gradient
        super().__init__((), event_shape, validate_args=validate_args)

    # ------------------------------------------------------------------ basics
    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def event_ndim(self) -> int:
        """Number of dimensions of one data point."""
        return len(self.event_shape)

    @property
    def event_size(self) -> int:
        """D, the number of scalars in one data point (for bits per dimension)."""
        return math.prod(self.event_shape)

    def _check_x(self, x):
        x = check_event(x, self.event_shape, "x")
        return check_finite(x, "x")

    def _sum_event(self, a):
        return jnp.sum(a, axis=tuple(range(a.ndim - self.event_ndim, a.ndim)))

    def _sq_err(self, x, eps, g):
        """||eps - eps_hat(z, g)||^2 over the event at z = alpha x + sigma eps; g of shape batch."""
        ge = _expand(g, x, self.event_ndim)
        z = jnp.sqrt(jax.nn.sigmoid(-ge)) * x + jnp.sqrt(jax.nn.sigmoid(ge)) * eps
        eps_hat = call_eps(self.eps_fn, z, g)
        return self._sum_event((eps - eps_hat) ** 2)

    def _endpoints(self, dtype):
        g0, g1 = self.schedule.endpoints()
        return jnp.asarray(g0).astype(dtype), jnp.asarray(g1).astype(dtype)

    def _reconstruction_and_prior(self, key, x):
        """log N(x; x_hat(z_0), sigma_0^2 I) at z_0 from ``key``, and KL(q(z_1|x) || N(0, I))."""
        D = self.event_size
        batch = x.shape[: x.ndim - self.event_ndim]
        g0, g1 = self._endpoints(x.dtype)
        eps_0 = jax.random.normal(key, x.shape, x.dtype)
        # ||x - x_hat||^2 / sigma_0^2 = ||eps - eps_hat||^2 / alpha_0^2: no cancellation in x - x_hat.
        sq = self._sq_err(x, eps_0, jnp.broadcast_to(g0, batch))
        log_norm = -0.5 * D * (math.log(2 * math.pi) + jax.nn.log_sigmoid(g0))  # -D/2 log(2 pi sigma_0^2)
        reconstruction = log_norm - 0.5 * sq / jax.nn.sigmoid(-g0)
        # 1/2 sum(sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2) with sigma_1^2 - 1 = -alpha_1^2.
        prior = 0.5 * jax.nn.sigmoid(-g1) * self._sum_event(x**2 - 1.0) - 0.5 * D * jax.nn.log_sigmoid(g1)
        return reconstruction, prior

    def _times(self, key, batch, dtype):
        n = math.prod(batch)
        if self.antithetic_time:
            u = jax.random.uniform(key, (), dtype)
            t = jnp.mod(u + jnp.arange(n, dtype=dtype) / n, 1.0)
        else:
            t = jax.random.uniform(key, (n,), dtype)
        return jnp.reshape(t, batch)

    # -------------------------------------------------------------- the ELBO
    def elbo_terms(self, rng_key, x) -> VDMTerms:
        r"""The continuous-time ELBO's three terms for each example (see [VDMTerms][probdiff.vdm.VDMTerms]).

        $$ \text{diffusion} = \tfrac12\,\gamma'(t)\,\|\epsilon-\hat\epsilon(z_t;\gamma_t)\|^2,
           \quad t\sim U(0,1),\ \epsilon\sim\mathcal{N}(0,I),\ z_t=\alpha_t x+\sigma_t\epsilon, $$

        an unbiased one-sample estimate of L_inf per example; the reconstruction uses one
        z_0 ~ q(z_0 | x) (the same draw as ``discrete_elbo_terms`` with the same key) and the
        prior KL is exact. Checked against scipy quadrature on Gaussian data in
        ``tests/test_vdm.py``.

        Args:
            rng_key: a JAX PRNG key.
            x: data, shape ``batch + event_shape``.
        """
        x = self._check_x(x)
        batch = x.shape[: x.ndim - self.event_ndim]
        key_rec, key_diff = jax.random.split(rng_key)
        reconstruction, prior = self._reconstruction_and_prior(key_rec, x)
        key_t, key_eps = jax.random.split(key_diff)
        t = self._times(key_t, batch, x.dtype)
        eps = jax.random.normal(key_eps, x.shape, x.dtype)

        def diffusion_loss(grad_scale):
            g_t, dg_t = self.schedule.gamma_and_prime(t, grad_scale=grad_scale)
            return 0.5 * dg_t.astype(x.dtype) * self._sq_err(x, eps, g_t.astype(x.dtype))

        if self.schedule_gradient == "variance":
            # d/dtheta_h sum_i L_i^2 = sum_i 2 L_i dL_i/dtheta_h: scale h's cotangents by 2 L_i.
            # The first evaluation only gives the values; XLA shares it with the second.
            scale = 2.0 * jax.lax.stop_gradient(diffusion_loss(None))
            diffusion = diffusion_loss(scale)
        else:
            diffusion = diffusion_loss(None)
        return VDMTerms(reconstruction, prior, diffusion)

    def elbo(self, rng_key, x) -> jax.Array:
        r"""The continuous-time ELBO per example: reconstruction - prior_matching - L_inf.

        $$ \mathrm{ELBO}(x) = \mathbb{E}\log p(x\mid z_0) - \mathrm{KL}(q(z_1|x)\,\|\,p(z_1))
           - \tfrac12\,\mathbb{E}_{t,\epsilon}\,\gamma'(t)\,\|\epsilon-\hat\epsilon(z_t;\gamma_t)\|^2 , $$

        one-sample estimate, a lower bound on log p(x) in expectation. Shape ``batch``.
        """
        return self.elbo_terms(rng_key, x).total

    def discrete_elbo_terms(self, rng_key, x, num_steps: int) -> VDMTerms:
        r"""The ELBO terms of the T-step model (VDM's L_T), same reconstruction and prior.

        $$ \mathcal{L}_T = \frac T2\,\mathbb{E}_{i\sim U\{1..T\}}\big[(\mathrm{SNR}(s)-\mathrm{SNR}(t))\,
           \|x-\hat x(z_t;t)\|^2\big]
           = \sum_{i=1}^{T}\tfrac12\,\big(e^{\gamma(t_i)-\gamma(s_i)}-1\big)\,
           \|\epsilon_i-\hat\epsilon(z_{t_i};\gamma(t_i))\|^2,\qquad s_i=\tfrac{i-1}{T},\ t_i=\tfrac iT, $$

        using ||x - x_hat||^2 = e^{gamma_t} ||eps - eps_hat||^2. Each term is the B2 KL
        KL(q(z_s | z_t, x) || p(z_s | z_t)) of the discretised
        [GaussianDiffusion][probdiff.GaussianDiffusion] (module docstring). The expectation over
        i is the exact sum over all T steps, each at one z_{t_i} with its own eps_i, drawn as
        ``GaussianDiffusion.elbo_terms`` draws the noise of its step i + 1: with the same key the
        two give the same numbers (``tests/test_vdm.py``). T network calls per example, in
        chunks ([map_over_t][probdiff.distributions.map_over_t]); for training, the continuous
        [elbo][probdiff.vdm.VariationalDiffusion.elbo] needs one.

        Args:
            rng_key: a JAX PRNG key.
            x: data, shape ``batch + event_shape``.
            num_steps: T >= 1.
        """
        T = _check_num_steps(num_steps)
        x = self._check_x(x)
        batch = x.shape[: x.ndim - self.event_ndim]
        key_rec, key_den = jax.random.split(rng_key)
        reconstruction, prior = self._reconstruction_and_prior(key_rec, x)
        schedule = self.schedule
        dtype = x.dtype

        def step_loss(i):
            # GaussianDiffusion's step i + 1 draws its x_{i+1} with fold_in(key, i + 1).
            eps = jax.random.normal(jax.random.fold_in(key_den, i + 1), x.shape, dtype)
            g_t = schedule.gamma_and_prime(i.astype(dtype) / T)[0].astype(dtype)
            g_s = schedule.gamma_and_prime((i - 1).astype(dtype) / T)[0].astype(dtype)
            # 1/2 (SNR(s) - SNR(t)) ||x - x_hat||^2 = 1/2 (e^{g_t - g_s} - 1) ||eps - eps_hat||^2
            return 0.5 * jnp.expm1(g_t - g_s) * self._sq_err(x, eps, jnp.broadcast_to(g_t, batch))

        losses = map_over_t(step_loss, jnp.arange(1, T + 1), "auto", elements_per_t=max(x.size, 1))
        return VDMTerms(reconstruction, prior, jnp.sum(losses, axis=0))

    def discrete_elbo(self, rng_key, x, num_steps: int) -> jax.Array:
        r"""The ELBO of the T-step model: reconstruction - prior_matching - L_T, per example.

        See [discrete_elbo_terms][probdiff.vdm.VariationalDiffusion.discrete_elbo_terms]. In
        expectation ELBO_T <= ELBO_2T <= ... <= the continuous ELBO, the gap falling as 1/T
        (``tests/test_vdm.py``).
        """
        return self.discrete_elbo_terms(rng_key, x, num_steps).total

    def bits_per_dim(self, rng_key, x) -> jax.Array:
        r"""-ELBO(x) / (D log 2), D = ``event_size``: an upper bound on -log2 p(x) / D (continuous ELBO)."""
        return -self.elbo(rng_key, x) / (self.event_size * math.log(2.0))

    # ----------------------------------------------------- as a distribution
    def log_prob(self, value):
        """The continuous-time ELBO of ``value`` (a lower bound on log p(x)); see the class docstring."""
        key = self.rng_key
        if key is None:
            key = numpyro.prng_key() if numpyro.primitives._PYRO_STACK else None
        if key is None:
            raise RuntimeError(
                "VariationalDiffusion.log_prob is the ELBO, an estimate that needs randomness, and this "
                "VariationalDiffusion has no key: build it inside the NumPyro model (it then takes a fresh "
                "key from the seed handler that SVI and Predictive apply), or for a one-off evaluation call "
                ".elbo(rng_key, x) or pass rng_key=... to VariationalDiffusion."
            )
        return self.elbo(key, value)

    def sample(self, key, sample_shape=(), *, num_steps: int = 1000, final_noise: bool = False):
        r"""Ancestral sampling of the T-step model, by ``lax.scan`` from z_1 ~ N(0, I).

        $$ z_s = \frac{\alpha_s}{\alpha_t}\big(z_t - c\,\sigma_t\,\hat\epsilon(z_t;\gamma_t)\big)
           + \sqrt{c\,\sigma_s^2}\;\xi,\qquad c = 1-e^{\gamma_s-\gamma_t},\quad
           t = \tfrac iT,\ s = \tfrac{i-1}T,\ i = T..1, $$

        the mean and variance of q(z_s | z_t, x = x_hat(z_t)) (the B2 reverse kernel with
        sigma^2 = beta_tilde), then x = x_hat(z_0) = (z_0 - sigma_0 eps_hat) / alpha_0
        (Algorithm 2's last step, no noise; ``final_noise=True`` adds sigma_0 xi, an exact
        draw of p(x | z_0)). The same chain as
        ``GaussianDiffusion(..., schedule.discretize(T), variance="beta_tilde").sample``.

        Args:
            key: a JAX PRNG key.
            sample_shape: leading shape of the batch of samples.
            num_steps: T >= 1.
            final_noise: draw x from p(x | z_0) instead of returning its mean.

        Returns:
            x of shape ``sample_shape + event_shape``.
        """
        T = _check_num_steps(num_steps)
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        batch = shape[: len(shape) - self.event_ndim]
        dtype = jnp.result_type(float)
        key_1, key_steps, key_x = jax.random.split(key, 3)
        z_1 = jax.random.normal(key_1, shape, dtype)
        schedule = self.schedule

        def step(z_t, i):
            g_t = schedule.gamma_and_prime(i.astype(dtype) / T)[0].astype(dtype)
            g_s = schedule.gamma_and_prime((i - 1).astype(dtype) / T)[0].astype(dtype)
            eps_hat = call_eps(self.eps_fn, z_t, jnp.broadcast_to(g_t, batch))
            c = -jnp.expm1(g_s - g_t)
            ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t)))  # alpha_s / alpha_t
            mean = ratio * (z_t - c * jnp.sqrt(jax.nn.sigmoid(g_t)) * eps_hat)
            xi = jax.random.normal(jax.random.fold_in(key_steps, i), shape, dtype)
            return (mean + jnp.sqrt(c * jax.nn.sigmoid(g_s)) * xi).astype(dtype), None

        z_0, _ = jax.lax.scan(step, z_1, jnp.arange(T, 0, -1))
        g0, _ = self._endpoints(dtype)
        eps_hat = call_eps(self.eps_fn, z_0, jnp.broadcast_to(g0, batch))
        alpha_0, sigma_0 = jnp.sqrt(jax.nn.sigmoid(-g0)), jnp.sqrt(jax.nn.sigmoid(g0))
        x = (z_0 - sigma_0 * eps_hat) / alpha_0
        if final_noise:
            x = x + sigma_0 * jax.random.normal(key_x, shape, dtype)
        return x
