r"""Score models: a score network as a NumPyro site, and conversions between parameterisations.

A score network s_theta(x) approximates grad_x log p(x) and defines no normalised density, so
it cannot be scored by ``log_prob``. [ScoreModel][probdiff.score.ScoreModel] marks an observed
site as "data for this score network"; the score-matching losses of
[probdiff.infer][probdiff.infer] (``ImplicitScoreMatching``, ``SlicedScoreMatching``,
``DenoisingScoreMatching``, ``NCSNScoreMatching``, ``TimeConditionalScoreMatching``) replace the
site's log-density by minus the score-matching objective, and every other site of the model
keeps its ELBO terms:

```python
def model(x):
    s = eqx_module("score_net", net)
    with numpyro.plate("data", x.shape[0], subsample_size=256):
        numpyro.sample("x", ScoreModel(s, (2,)), obs=numpyro.subsample(x, event_dim=1))

svi = SVI(model, lambda x: None, optax.adam(1e-3), SlicedScoreMatching(num_probes=1))
```

For diffusion, noise prediction, score and clean-data prediction are one model written three
ways (MATH.md D3): with x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,

$$ s(x_t,t) = -\frac{\epsilon(x_t,t)}{\sqrt{1-\bar\alpha_t}},\qquad
   \hat x_0(x_t,t) = \frac{x_t + (1-\bar\alpha_t)\,s(x_t,t)}{\sqrt{\bar\alpha_t}} $$

(the second is Tweedie's formula, E[x_0 | x_t]). The converters here turn any one into the
others, so a score network trained by score matching drives the samplers and
[GaussianDiffusion][probdiff.GaussianDiffusion] (``GaussianDiffusion(eps_from_score(s, schedule), schedule, ...)``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from probdiff._checks import check_event_shape
from probdiff.distributions.kernels import call_eps, check_schedule
from probdiff.schedules import Schedule

__all__ = [
    "ScoreModel",
    "score_from_eps",
    "eps_from_score",
    "score_from_x0",
    "x0_from_score",
    "check_score_output",
]


def check_score_output(s, x, what: str = "score_fn"):
    """Check that a score function's output ``s`` has the shape of its input ``x``; return ``s``."""
    shape = getattr(s, "shape", None)
    if shape is None or tuple(shape) != tuple(jnp.shape(x)):
        got = f"an object of type {type(s).__name__}" if shape is None else f"shape {tuple(shape)}"
        raise ValueError(f"{what} must return an array with the shape of x, {tuple(jnp.shape(x))}; got {got}")
    return s


def _coef_t(array, t, x):
    """array[t] for integer t broadcasting over x's leading (batch) axes, shaped to broadcast with x."""
    t = jnp.asarray(t)
    c = array[jnp.clip(t, 0, array.shape[0] - 1)].astype(x.dtype)
    return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


def score_from_eps(eps_fn: Callable, schedule: Schedule) -> Callable:
    r"""The score of an eps-network (MATH.md D3).

    $$ s_\theta(x_t, t) = -\frac{\epsilon_\theta(x_t, t)}{\sqrt{1-\bar\alpha_t}}. $$

    ``t`` is an integer in 1..T that broadcasts over the batch axes of ``x_t``.
    """
    check_schedule(schedule)

    def score_fn(x_t, t):
        eps = call_eps(eps_fn, x_t, t)
        return -eps / jnp.sqrt(_coef_t(schedule.one_minus_alpha_bar, t, x_t))

    return score_fn


def eps_from_score(score_fn: Callable, schedule: Schedule) -> Callable:
    r"""The eps-network of a score function (MATH.md D3): eps = -sqrt(1 - alpha_bar_t) s(x_t, t)."""
    check_schedule(schedule)

    def eps_fn(x_t, t):
        s = check_score_output(score_fn(x_t, t), x_t)
        return -jnp.sqrt(_coef_t(schedule.one_minus_alpha_bar, t, x_t)) * s

    return eps_fn


def x0_from_score(score_fn: Callable, schedule: Schedule) -> Callable:
    r"""Tweedie's denoiser of a score function: x0_hat = (x_t + (1 - alpha_bar_t) s(x_t, t)) / sqrt(alpha_bar_t)."""
    check_schedule(schedule)

    def x0_fn(x_t, t):
        s = check_score_output(score_fn(x_t, t), x_t)
        omab = _coef_t(schedule.one_minus_alpha_bar, t, x_t)
        return (x_t + omab * s) / jnp.sqrt(_coef_t(schedule.alpha_bar, t, x_t))

    return x0_fn


def score_from_x0(x0_fn: Callable, schedule: Schedule) -> Callable:
    r"""The score of a clean-data predictor: s = -(x_t - sqrt(alpha_bar_t) x0_hat) / (1 - alpha_bar_t)."""
    check_schedule(schedule)

    def score_fn(x_t, t):
        x0 = check_score_output(x0_fn(x_t, t), x_t, "x0_fn")
        ab = _coef_t(schedule.alpha_bar, t, x_t)
        return -(x_t - jnp.sqrt(ab) * x0) / _coef_t(schedule.one_minus_alpha_bar, t, x_t)

    return score_fn


class ScoreModel(dist.Distribution):
    r"""An observed site whose data train a score network s_theta(x) ~ grad_x log p(x).

    A score network defines p only up to its normalising constant (if at all: nothing forces a
    network's output to be a gradient field), so there is no ``log_prob``: the site is for the
    score-matching losses of [probdiff.infer][probdiff.infer], which replace its log-density by
    minus their objective, for example the implicit one (Hyvaerinen 2005, MATH.md D2)

    $$ J(\theta) = \mathbb{E}_{p}\Big[\tfrac12\lVert s_\theta(x)\rVert^2 + \operatorname{tr}\nabla_x s_\theta(x)\Big]
       = \tfrac12\,\mathbb{E}_p\lVert s_\theta(x) - \nabla_x\log p(x)\rVert^2 + \text{const}. $$

    Sample it with [probdiff.samplers][probdiff.samplers] (e.g. annealed Langevin dynamics).

    Args:
        score_fn: the score network. Its signature depends on the loss: ``s(x)`` for implicit,
            sliced and single-sigma denoising score matching; ``s(x, sigma)`` with one sigma per
            example for NCSN; ``s(x_t, t)`` with integer t for the time-conditional loss. It takes
            a batch of shape ``batch + event_shape`` and returns an array of that shape.
        event_shape: the shape of one data point.
    """

    arg_constraints = {}
    pytree_aux_fields = ("score_fn",)

    def __init__(self, score_fn: Callable, event_shape, *, validate_args=None):
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable; got {type(score_fn).__name__}")
        event_shape = check_event_shape(event_shape)
        self.score_fn = score_fn
        super().__init__((), event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def log_prob(self, value):
        raise NotImplementedError(
            "a ScoreModel has no normalised log-density; train it with a score-matching loss "
            "(probdiff.infer.ImplicitScoreMatching, SlicedScoreMatching, DenoisingScoreMatching, "
            "NCSNScoreMatching or TimeConditionalScoreMatching), which replaces this site's log_prob"
        )

    def sample(self, key, sample_shape=()):
        raise NotImplementedError(
            "a ScoreModel is sampled by Langevin dynamics, not drawn directly: use "
            "probdiff.samplers.annealed_langevin (NCSN) or the diffusion samplers"
        )

