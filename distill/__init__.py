"""distill: classifier-free-guided diffusion models distilled into 1–4-step models.

Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023). See README.md.
"""

__version__ = "0.1.0"
