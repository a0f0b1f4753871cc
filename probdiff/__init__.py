"""probdiff: diffusion models as probabilistic programs in NumPyro and JAX.

The forward chain q(x_{1:T} | x_0) is a NumPyro guide, the reverse chain p_theta(x_{0:T}) the
generative model, and [GaussianDiffusion][probdiff.GaussianDiffusion] a distribution over x_0
that composes with any other sample site.
"""

import os as _os

# jaxlib 0.10.2's CPU backend miscomputes a jitted matrix product with a closed-over constant
# whose entries are all equal (e.g. jnp.full((2, 32), 0.1)): its experimental YNNPACK fusion
# returns wrong, even non-finite, numbers, while the same product eager or with the matrix passed
# as an argument is right. Closed-over networks and observation operators are everyday JAX, so
# probdiff turns that fusion off unless the user chose a setting. This takes effect when the
# backend starts, at the first computation; tests/test_edge_cases.py checks the product.
if "xla_cpu_experimental_ynn_fusion_type" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

from probdiff import (  # noqa: E402
    analytic,
    checkpoint,
    data,
    distributions,
    divergences,
    em,
    flows,
    infer,
    inverse,
    nets,
    ode,
    samplers,
    schedules,
    score,
    sde,
    training,
    vae,
    vdm,
)
from probdiff.diffusion import ConsistencyTerms, ELBOTerms, GaussianDiffusion, SampleResult, StepTerms  # noqa: E402

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
    "divergences",
    "em",
    "flows",
    "infer",
    "inverse",
    "nets",
    "ode",
    "samplers",
    "schedules",
    "score",
    "sde",
    "training",
    "vae",
    "vdm",
    "__version__",
]
