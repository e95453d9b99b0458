"""Host-side work shared by the processes of a multi-host run (outside the compiled steps).

Every process runs the same program. A compiled step over the global mesh needs all of them;
what comes back to the host is split by device, so each process holds the rows of its own
devices. The evaluation works on those rows and then joins them:

* ``local_rows(x)``: the rows of a global batch array that this process holds, and where they
  sit in the batch;
* ``share(n)``: the rows of an ``n``-row host batch that this process takes (for work every
  process could do alone, such as the features of reference images);
* ``gather(rows, tree)``: every process's rows on every process (the values travel bit for bit,
  float64 too), and ``gather_rows(rows, tree, count)`` puts them in order;
* ``agree(value)``: process 0's value on every process, so that all take the same branch (which
  cached files exist, for instance: on a shared ``gs://`` workdir two hosts' listings may differ
  for a moment);
* ``barrier(name)``, and ``is_writer()``: process 0 writes the files.

With one process each is the plain operation (no collective).
"""

from __future__ import annotations

import jax
import numpy as np

PADDING = -1  # the row index of a padding row: computed alongside, dropped by gather_rows


def is_writer() -> bool:
  """Whether this process writes the shared files (process 0)."""
  return jax.process_index() == 0


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """``(positions, rows)``: the distinct rows (first axis) of ``x`` that this process's devices
  hold, as one host array, and their positions in ``x``, ascending."""
  blocks = {}
  for shard in x.addressable_shards:
    start = (shard.index[0].start or 0) if shard.index else 0
    if start not in blocks:
      blocks[start] = np.asarray(shard.data)
  starts = sorted(blocks)
  positions = np.concatenate([np.arange(s, s + len(blocks[s])) for s in starts])
  return positions, np.concatenate([blocks[s] for s in starts])


def share(n: int) -> np.ndarray:
  """This process's rows of an ``n``-row batch: rows ``p, p + P, …`` for process ``p`` of ``P``,
  padded with ``PADDING`` so that every process takes ``ceil(n / P)``."""
  count = jax.process_count()
  rows = np.arange(jax.process_index(), n, count)
  return np.concatenate([rows, np.full(-(-n // count) - len(rows), PADDING)])


def _as_words(a: np.ndarray) -> np.ndarray:
  """8-byte values viewed as pairs of uint32 (JAX transfers them without 64-bit types)."""
  a = np.asarray(a, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
  if a.dtype.itemsize != 8:
    return a
  return a.reshape(a.shape + (1,)).view(np.uint32)


def _from_words(a: np.ndarray, dtype) -> np.ndarray:
  if np.dtype(dtype).itemsize != 8:
    return a
  return np.asarray(a, order="C").view(dtype)[..., 0]


def gather(rows, tree):
  """``(rows, tree)`` of every process, concatenated on every process, ``PADDING`` rows dropped:
  ``tree``'s arrays have a first axis that matches ``rows`` (lengths may differ by process)."""
  rows = np.asarray(rows, np.int64)
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [np.asarray(a) for a in leaves]
  if any(len(a) != len(rows) for a in leaves):
    raise ValueError(f"gather: {len(rows)} rows but arrays of {[len(a) for a in leaves]}.")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    longest = int(np.max(multihost_utils.process_allgather(np.int32(len(rows)))))
    pad = longest - len(rows)
    padded_rows = np.concatenate([rows, np.full(pad, PADDING)]).astype(np.int32)
    padded = [_as_words(np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]))
              for a in leaves]
    got_rows, got = multihost_utils.process_allgather((padded_rows, padded), tiled=True)
    leaves = [_from_words(np.asarray(g), a.dtype) for g, a in zip(got, leaves)]
    rows = np.asarray(got_rows, np.int64)
  keep = rows != PADDING
  return rows[keep], jax.tree.unflatten(treedef, [a[keep] for a in leaves])


def place_rows(rows, tree, count: int):
  """``tree``'s rows put at ``rows`` of ``count``-row arrays. Rows not given stay zero; a row
  given twice takes either copy (the same computation on two devices)."""
  rows = np.asarray(rows, np.int64)
  if np.any(rows < 0) or np.any(rows >= count):
    raise ValueError(f"place_rows: row indices outside [0, {count}).")

  def place(a):
    full = np.zeros((count,) + a.shape[1:], a.dtype)
    full[rows] = a
    return full

  return jax.tree.map(place, tree)


def gather_rows(rows, tree, count: int):
  """Every process's rows (``gather``) placed in order in ``count``-row arrays (``place_rows``),
  on every process."""
  return place_rows(*gather(rows, tree), count)


def agree(value):
  """Process 0's ``value`` (a pytree of numbers, bools or arrays) on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  leaves, treedef = jax.tree.flatten(value)
  arrays = [_as_words(np.asarray(a)) for a in leaves]
  got = multihost_utils.broadcast_one_to_all(arrays)
  out = [_from_words(np.asarray(g), np.asarray(a).dtype) for g, a in zip(got, leaves)]
  out = [o.item() if np.ndim(a) == 0 and not isinstance(a, np.ndarray) else o
         for o, a in zip(out, leaves)]
  return jax.tree.unflatten(treedef, out)


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
