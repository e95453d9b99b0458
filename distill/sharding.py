"""Device mesh and shardings for data parallelism over a ``('data',)`` axis.

Parameters are replicated; batches are split along their first axis. ``global_batch`` builds
one global array from the data each process holds (``jax.make_array_from_process_local_data``),
so the same code serves one CPU, eight forced CPU devices and a multi-host TPU pod.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, *, devices=None) -> jax.sharding.Mesh:
  """A 1-D ``('data',)`` mesh over the first ``num_devices`` of ``devices`` (default: all of
  ``jax.devices()``)."""
  devices = jax.devices() if devices is None else list(devices)
  if num_devices is None:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"mesh num_devices={num_devices} must be in [1, {len(devices)}] "
                     "(the devices JAX sees).")
  return jax.make_mesh((num_devices,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices[:num_devices])


def cpu_devices_for(batch_sizes, cores: int) -> int:
  """The CPU devices to split a host into: the most, up to one per core, that divide every
  batch size (so that each batch splits evenly over them)."""
  return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in batch_sizes))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Split the leading (batch) axis over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(mesh, local_batch):
  """A pytree of process-local numpy arrays → global arrays split over ``data``."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(mesh, tree):
  """Places a pytree (e.g. parameters) replicated on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))
