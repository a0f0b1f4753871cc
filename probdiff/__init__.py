"""probdiff: diffusion models as probabilistic programs in NumPyro and JAX.

The forward chain q(x_{1:T} | x_0) is a NumPyro guide, the reverse chain p_theta(x_{0:T}) the
generative model, and [GaussianDiffusion][probdiff.GaussianDiffusion] a distribution over x_0
that composes with any other sample site.
"""

from probdiff import (
    analytic,
    checkpoint,
    data,
    distributions,
    infer,
    nets,
    ode,
    samplers,
    schedules,
    score,
    sde,
    training,
)
from probdiff.diffusion import ConsistencyTerms, ELBOTerms, GaussianDiffusion, SampleResult, StepTerms

__version__ = "0.1.0"

__all__ = [
    "ConsistencyTerms",
    "ELBOTerms",
    "GaussianDiffusion",
    "SampleResult",
    "StepTerms",
    "analytic",
    "checkpoint",
    "data",
    "distributions",
    "infer",
    "nets",
    "ode",
    "samplers",
    "schedules",
    "score",
    "sde",
    "training",
    "__version__",
]
