"""Inference for diffusion models: ELBOs for SVI (MATH.md C3)."""

from probdiff.infer.elbo import T_SAMPLINGS, WEIGHTINGS, DiffusionELBO, importance_probs, with_loss_history

__all__ = ["DiffusionELBO", "WEIGHTINGS", "T_SAMPLINGS", "importance_probs", "with_loss_history"]
