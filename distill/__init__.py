"""distill: classifier-free-guided diffusion models distilled into 1–4-step models.

Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023). See README.md and
docs/design.md.
"""

from distill import xla_cpu as _xla_cpu

# Before JAX starts a backend: XLA:CPU options that make our U-Nets about 2x faster on CPU.
_xla_cpu.apply()

__version__ = "0.1.0"
