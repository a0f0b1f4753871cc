"""Inference: ELBOs for SVI (MATH.md C3), score-matching losses (D2-D4, E3), Langevin MCMC kernels (D1) and posterior samplers for diffusion priors."""

from probdiff.infer.elbo import T_SAMPLINGS, WEIGHTINGS, DiffusionELBO, importance_probs, with_loss_history
from probdiff.infer.langevin import MALA, ULA, BlackJAXKernel, BlackJAXState, LangevinState
from probdiff.infer.posterior import DPS, LOBATTO, AnnealedLangevin, AnnealedLangevinState, TwistedSMC
from probdiff.infer.score_matching import (
    PROBES,
    SCORE_WEIGHTINGS,
    ContinuousScoreMatching,
    DenoisingScoreMatching,
    ImplicitScoreMatching,
    NCSNScoreMatching,
    SlicedScoreMatching,
    TimeConditionalScoreMatching,
)

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
    "ImplicitScoreMatching",
    "SlicedScoreMatching",
    "DenoisingScoreMatching",
    "NCSNScoreMatching",
    "TimeConditionalScoreMatching",
    "ContinuousScoreMatching",
    "SCORE_WEIGHTINGS",
    "PROBES",
    "AnnealedLangevin",
    "AnnealedLangevinState",
    "TwistedSMC",
    "DPS",
    "LOBATTO",
]
