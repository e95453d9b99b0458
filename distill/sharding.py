"""Device mesh and shardings: a 2-D ``('data', 'fsdp')`` mesh.

* **Batches** are split along their first axis over both mesh axes, so every device holds
  ``batch / num_devices`` examples whatever the mesh's shape.
* **Train state** (parameters, EMA, optimiser moments) and the **frozen teacher** are split along
  ``fsdp`` by one rule (``param_spec``): each array of at least ``MIN_SHARDED_SIZE`` elements is
  split along its largest dimension that the ``fsdp`` size divides (the later one on a tie);
  smaller arrays, and arrays with no such dimension, are replicated. With ``fsdp = 1`` (the
  default) everything is replicated: plain data parallelism. XLA inserts the all-gathers of
  the parameters in the forward and backward passes and the reduce-scatters of the gradients.

``global_batch`` builds one global array from the data each process holds
(``jax.make_array_from_process_local_data``), so the same code serves one CPU, eight forced CPU
devices and a multi-host pod. docs/tpu.md has the mesh from a user's side.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays with fewer elements are replicated: biases, norms' scales and scalars cost little memory,
# and splitting them would add a collective for each.
MIN_SHARDED_SIZE = 2 ** 14


def make_mesh(num_devices: int | None = None, *, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ``('data', 'fsdp')`` mesh of shape ``(num_devices // fsdp, fsdp)`` over the first
  ``num_devices`` of ``devices`` (default: all of ``jax.devices()``)."""
  devices = jax.devices() if devices is None else list(devices)
  if num_devices is None:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"mesh num_devices={num_devices} must be in [1, {len(devices)}] "
                     "(the devices JAX sees).")
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {num_devices} devices: "
                     f"use one of {[n for n in range(1, num_devices + 1) if num_devices % n == 0]}.")
  return jax.make_mesh((num_devices // fsdp, fsdp), BATCH_AXES,
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[:num_devices])


def cpu_devices_for(batch_sizes, cores: int) -> int:
  """The CPU devices to split a host into: the most, up to one per core, that divide every
  batch size (so that each batch splits evenly over them)."""
  return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in batch_sizes))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Split the leading (batch) axis over every device: ``data`` × ``fsdp``."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(mesh, local_batch):
  """A pytree of process-local numpy arrays → global arrays split over the batch axes."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def batch_from_host(mesh, tree):
  """A pytree of whole batches that every process holds alike (numpy or single-device arrays)
  → global arrays split over the batch axes, each device taking its rows (a sampler's inputs).
  Arrays already split so, or spanning processes, are passed through."""
  target = batch_sharded(mesh)

  def place(a):
    if isinstance(a, jax.Array) and (not a.is_fully_addressable
                                     or a.sharding.is_equivalent_to(target, a.ndim)):
      return a
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, target, lambda index: a[index])

  return jax.tree.map(place, tree)


def replicate(mesh, tree):
  """Places a pytree replicated on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def param_spec(shape, fsdp: int, *, min_size: int | None = None) -> P:
  """The ``PartitionSpec`` of a parameter (or moment) of ``shape`` on an ``fsdp``-way axis;
  ``min_size`` defaults to ``MIN_SHARDED_SIZE``."""
  if fsdp == 1 or math.prod(shape) < (MIN_SHARDED_SIZE if min_size is None else min_size):
    return P()
  dims = [d for d, n in enumerate(shape) if n % fsdp == 0]
  if not dims:
    return P()
  split = max(dims, key=lambda d: (shape[d], d))
  return P(*[FSDP_AXIS if d == split else None for d in range(len(shape))])


def param_shardings(mesh, tree):
  """``NamedSharding`` for each leaf of ``tree`` (arrays or shape structs) by ``param_spec``."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), tree)


def shard_params(mesh, tree, *, may_alias: bool | None = None):
  """Places a pytree of parameters (or a train state) on ``mesh`` by ``param_spec``."""
  return jax.device_put(tree, param_shardings(mesh, tree), may_alias=may_alias)


def constrain_params(mesh, tree):
  """Inside a jitted function: ``tree``'s values laid out by ``param_spec``."""
  return jax.lax.with_sharding_constraint(tree, param_shardings(mesh, tree))


def gather_params(mesh, tree):
  """Inside a jitted function: ``tree`` whole on every device, for the network to use.

  With ``fsdp > 1`` the parameters the objective reads are constrained to be replicated, so
  that XLA all-gathers each array where it is used (and reduce-scatters its gradient) while
  activations stay split over the batch. Left to itself, the partitioner may instead split
  activations along a parameter's split dimension and reshard them back ("involuntary full
  rematerialization"). With ``fsdp = 1`` the tree is returned as it is.
  """
  if mesh.shape[FSDP_AXIS] == 1:
    return tree
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def abstract_params(mesh, shapes):
  """Shape structs of ``shapes`` (from ``jax.eval_shape``) with the shardings of
  ``param_spec``, the target of a checkpoint restore onto ``mesh``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, param_shardings(mesh, shapes))
