"""The host-side helpers of multi-process runs (``distill/processes.py``) within one process; the
two-process eval in test_multihost.py runs them across processes."""

import jax
import numpy as np
import pytest

from distill import processes, sharding


def test_local_rows_of_a_split_and_of_a_replicated_batch():
  mesh = sharding.make_mesh(8, fsdp=2)
  x = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
  split = sharding.batch_from_host(mesh, x)
  assert split.sharding.is_equivalent_to(sharding.batch_sharded(mesh), 2)
  positions, rows = processes.local_rows(split)
  np.testing.assert_array_equal(positions, np.arange(24))
  np.testing.assert_array_equal(rows, x)
  # Replicated: every device holds every row; each row is returned once.
  positions, rows = processes.local_rows(sharding.replicate(mesh, x))
  np.testing.assert_array_equal(positions, np.arange(24))
  np.testing.assert_array_equal(rows, x)


def test_gather_rows_places_rows_and_drops_padding():
  rows = np.array([3, 0, processes.PADDING, 2, 1])
  tree = {"a": np.array([30.0, 0.0, -9.0, 20.0, 10.0]), "b": np.arange(10).reshape(5, 2)}
  got = processes.gather_rows(rows, tree, 4)
  np.testing.assert_array_equal(got["a"], [0.0, 10.0, 20.0, 30.0])
  np.testing.assert_array_equal(got["b"], [[2, 3], [8, 9], [6, 7], [0, 1]])
  assert got["b"].dtype == tree["b"].dtype
  with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
    processes.gather_rows(rows, tree, 3)
  with pytest.raises(ValueError, match="5 rows but arrays of"):
    processes.gather_rows(rows, np.zeros(4), 4)


def test_share_of_one_process_is_every_row():
  np.testing.assert_array_equal(processes.share(7), np.arange(7))


@pytest.mark.parametrize("value", [
    np.array([1 / 3, -2.0 ** -1070, np.pi]),  # float64 beyond float32's precision and range
    np.arange(6, dtype=np.int64).reshape(2, 3) * 2 ** 40,
    np.array(np.e),  # a 0-d float64
])
def test_64_bit_values_travel_as_words_bit_for_bit(value):
  words = processes._as_words(value)  # pylint: disable=protected-access
  assert words.dtype == np.uint32 and words.shape == value.shape + (2,)
  back = processes._from_words(words, value.dtype)  # pylint: disable=protected-access
  assert back.dtype == value.dtype and back.shape == value.shape
  assert back.tobytes() == value.tobytes()
  small = np.arange(3, dtype=np.float32)
  assert processes._as_words(small).dtype == np.float32  # other sizes travel as they are


def test_agree_and_barrier_are_plain_with_one_process():
  assert processes.agree([True, False]) == [True, False]
  processes.barrier("test")
  assert processes.is_writer() == (jax.process_index() == 0)
