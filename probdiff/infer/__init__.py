"""Inference: ELBOs for SVI (MATH.md C3) and Langevin MCMC kernels (MATH.md D1)."""

from probdiff.infer.elbo import T_SAMPLINGS, WEIGHTINGS, DiffusionELBO, importance_probs, with_loss_history
from probdiff.infer.langevin import MALA, ULA, BlackJAXKernel, BlackJAXState, LangevinState

__all__ = [
    "DiffusionELBO",
    "WEIGHTINGS",
    "T_SAMPLINGS",
    "importance_probs",
    "with_loss_history",
    "ULA",
    "MALA",
    "LangevinState",
    "BlackJAXKernel",
    "BlackJAXState",
]
