"""A discrete-time teacher's noise schedule in our continuous time ``t ∈ [0, 1]``.

Stable Diffusion and the LDM teachers are trained on ``T = 1000`` discrete steps with
``ᾱ_i = ∏_{j≤i} (1 − β_j)``, ``i = 0 … T−1`` (``scaled_linear``: ``β_i = (√β_0 + i/(T−1)·(√β_{T−1}
− √β_0))²``). Our samplers and losses work in continuous time with a log-SNR function
``λ(t)`` (docs/design.md §1.1 and §1.11), so this module maps between the two:

* step ``i`` sits at ``t = (i + 1)/T``, so ``t = 1`` is the teacher's noisiest step and the
  student grid points ``t = k/N`` are diffusers' "trailing" timesteps;
* ``λ(t)`` interpolates the table ``λ_i = log(ᾱ_i / (1 − ᾱ_i))`` linearly in ``t`` (as
  k-diffusion's ``DiscreteSchedule`` does); below ``t = 1/T`` it runs linearly from ``λ_0`` up
  to ``logsnr_max`` at ``t = 0`` (the data), which is finite so that ``α``, ``σ`` stay finite;
* ``timestep(t) = T·t − 1`` (clipped to ``[0, T−1]``) is the fractional timestep the U-Net is
  fed, and ``time_from_logsnr`` inverts ``λ(t)``.

Because ``α² = sigmoid(λ)`` reproduces ``ᾱ_i`` at the grid points exactly, a teacher step of the
deterministic sampler between grid points is the teacher's own DDIM step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")


def betas(beta_start: float, beta_end: float, num_train_timesteps: int,
          beta_schedule: str = "scaled_linear") -> np.ndarray:
  """The teacher's ``β_i`` in float64 (diffusers' ``scaled_linear`` = LDM's ``linear``)."""
  if beta_schedule == "scaled_linear":
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                       dtype=np.float64) ** 2
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use one of "
                   f"{BETA_SCHEDULES}.")


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
  """``λ(t)``, ``timestep(t)`` and their inverses for a teacher with ``alphas_cumprod`` ``ᾱ_i``.

  ``logsnr_max`` is λ at ``t = 0``; it must exceed ``λ_0`` (SD: 7.07, cin256: 6.50).
  """
  alphas_cumprod: np.ndarray
  logsnr_max: float = 20.0

  def __post_init__(self):
    abar = np.asarray(self.alphas_cumprod, np.float64)
    if abar.ndim != 1 or abar.size < 2:
      raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 steps, got shape "
                       f"{abar.shape}.")
    if not (np.all(abar > 0) and np.all(abar < 1) and np.all(np.diff(abar) < 0)):
      raise ValueError("alphas_cumprod must decrease strictly inside (0, 1); a zero-terminal-"
                       "SNR table (ᾱ_T = 0) has λ = −inf at t = 1 and is not supported.")
    object.__setattr__(self, "alphas_cumprod", abar)
    if not self.logsnr_max > self.logsnr_table[0]:
      raise ValueError(f"logsnr_max ({self.logsnr_max}) must exceed the teacher's λ_0 "
                       f"({self.logsnr_table[0]:.3f}).")

  @classmethod
  def from_betas(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                 num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 **kwargs) -> "DiscreteSchedule":
    """Defaults are Stable Diffusion 1.x's; the LDM cin256 teacher uses 0.0015 → 0.0195."""
    return cls(np.cumprod(1.0 - betas(beta_start, beta_end, num_train_timesteps,
                                      beta_schedule)), **kwargs)

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | str, **kwargs) -> "DiscreteSchedule":
    """From a diffusers ``scheduler_config.json`` (a dict or the file's path)."""
    if not isinstance(config, Mapping):
      with open(config, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("trained_betas") is not None:
      return cls(np.cumprod(1.0 - np.asarray(config["trained_betas"], np.float64)), **kwargs)
    if config.get("rescale_betas_zero_snr", False):
      raise ValueError("scheduler config: rescale_betas_zero_snr=true gives ᾱ_T = 0 (λ = −inf "
                       "at t = 1), which the continuous-time samplers cannot represent; use a "
                       "teacher without zero-terminal SNR.")
    return cls.from_betas(float(config.get("beta_start", 0.0001)),
                          float(config.get("beta_end", 0.02)),
                          int(config.get("num_train_timesteps", 1000)),
                          str(config.get("beta_schedule", "linear")), **kwargs)

  @property
  def num_timesteps(self) -> int:
    return int(self.alphas_cumprod.size)

  @property
  def logsnr_table(self) -> np.ndarray:
    """``λ_i = log(ᾱ_i / (1 − ᾱ_i))`` in float64, decreasing in ``i``."""
    abar = self.alphas_cumprod
    return np.log(abar) - np.log1p(-abar)

  def _knots(self):
    """Times ``[0, 1/T, …, 1]`` and log-SNRs ``[λ_max, λ_0, …, λ_{T−1}]`` (float32)."""
    n = self.num_timesteps
    times = np.arange(n + 1, dtype=np.float64) / n
    lams = np.concatenate([[self.logsnr_max], self.logsnr_table])
    return jnp.asarray(times, jnp.float32), jnp.asarray(lams, jnp.float32)

  def logsnr(self, t):
    """``λ(t)``: the table interpolated linearly in ``t``; a valid ``logsnr_fn``."""
    times, lams = self._knots()
    return jnp.interp(jnp.asarray(t, jnp.float32), times, lams)

  def timestep(self, t):
    """The fractional timestep ``clip(T·t − 1, 0, T − 1)`` the teacher's U-Net is fed."""
    n = self.num_timesteps
    return jnp.clip(n * jnp.asarray(t, jnp.float32) - 1.0, 0.0, n - 1.0)

  def time_from_timestep(self, timestep):
    """``t = (i + 1)/T``: the continuous time of (fractional) timestep ``i``."""
    return (jnp.asarray(timestep, jnp.float32) + 1.0) / self.num_timesteps

  def time_from_logsnr(self, logsnr):
    """The inverse of ``logsnr`` (clipped to ``[0, 1]`` outside the table's range)."""
    times, lams = self._knots()
    return jnp.interp(jnp.asarray(logsnr, jnp.float32), lams[::-1], times[::-1])
