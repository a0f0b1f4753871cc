"""NumPyro distributions of the forward and reverse processes (MATH.md A1, A2, A4, B1, C2)."""

from probdiff.distributions.chains import (
    AUTO_CHUNK_ELEMENTS,
    ForwardChain,
    ReverseChain,
    map_over_t,
    resolve_chunk_size,
)
from probdiff.distributions.kernels import (
    VARIANCES,
    call_eps,
    mu_from_eps,
    p_step,
    posterior_mean,
    q_marginal,
    q_posterior,
    q_step,
    reverse_variance,
    x0_from_eps,
)

__all__ = [
    "AUTO_CHUNK_ELEMENTS",
    "VARIANCES",
    "ForwardChain",
    "ReverseChain",
    "call_eps",
    "map_over_t",
    "mu_from_eps",
    "p_step",
    "posterior_mean",
    "q_marginal",
    "q_posterior",
    "q_step",
    "resolve_chunk_size",
    "reverse_variance",
    "x0_from_eps",
]
