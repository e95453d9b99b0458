"""Latent-space teachers: Stable-Diffusion-family models in Flax, weight import, schedules."""
