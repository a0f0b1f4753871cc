"""Inference for diffusion models: ELBOs for SVI (MATH.md C3)."""

from probdiff.infer.elbo import WEIGHTINGS, DiffusionELBO

__all__ = ["DiffusionELBO", "WEIGHTINGS"]
