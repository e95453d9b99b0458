"""Latent-space teachers: Stable-Diffusion-family models in Flax, weight import, schedules."""

from distill.latent.pretrained import LatentModels, load_pretrained

__all__ = ["LatentModels", "load_pretrained"]
