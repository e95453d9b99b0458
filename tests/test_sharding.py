"""The ``('data', 'fsdp')`` mesh (distill/sharding.py): the layout rule; fsdp 4 × data 2 against
data 8; a checkpoint written on 8 devices restored onto 4; a run resumed across a change of mesh;
the config's one-line errors.

The tiny digits U-Net has one array of 2^14 elements or more, so the tests that train lower
``MIN_SHARDED_SIZE`` to 2^10: then 38 of its arrays, 97 % of its parameters, are split.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distill import checkpoints, manifest, models, pipeline, sharding, train
from test_train import teacher_step_parts, tiny_config


def test_the_layout_rule():
  fsdp = sharding.FSDP_AXIS
  spec = sharding.param_spec
  assert spec((3, 3, 64, 128), 4) == P(None, None, None, fsdp)  # the largest dimension
  assert spec((3, 3, 128, 64), 4) == P(None, None, fsdp, None)
  assert spec((256, 256), 4) == P(None, fsdp)  # a tie: the later one
  assert spec((130, 200), 4) == P(None, fsdp)  # 130 is not divisible by 4
  assert spec((200, 130), 4) == P(fsdp, None)
  assert spec((127, 131), 4) == P()  # no dimension divisible: replicated
  assert spec((8192,), 4) == P()  # below MIN_SHARDED_SIZE
  assert spec((8192,), 4, min_size=8192) == P(fsdp)
  assert spec((3, 3, 64, 128), 1) == P()  # fsdp = 1: data parallelism
  assert spec((), 4) == P()


def test_the_mesh_shape_and_its_errors():
  mesh = sharding.make_mesh(8, fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert dict(sharding.make_mesh(4).shape) == {"data": 4, "fsdp": 1}
  with pytest.raises(ValueError, match=r"^mesh\.fsdp=3 must be >= 1 and divide the 8 devices: "
                                       r"use one of \[1, 2, 4, 8\]\.$"):
    sharding.make_mesh(8, fsdp=3)
  config = tiny_config()
  config.num_devices = 8
  config.mesh.fsdp = 3
  with pytest.raises(ValueError, match=r"^mesh\.fsdp=3 must divide the mesh's 8 devices: use one "
                                       r"of \[1, 2, 4, 8\]\.$"):
    pipeline.run(config, "/nonexistent/never-written")
  # The mesh is not part of what is trained: a run resumes on another one.
  other = tiny_config()
  assert manifest.config_hash(config) == manifest.config_hash(other)


@pytest.fixture
def small_arrays_split(monkeypatch):
  monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 2 ** 10)


def test_fsdp_gives_the_losses_of_data_parallelism(small_arrays_split):
  del small_arrays_split
  objective, tx, schedule, params, batches = teacher_step_parts()
  results = {}
  for fsdp in (1, 4):
    mesh = sharding.make_mesh(8, fsdp=fsdp)
    step = train.make_train_step(objective, tx, schedule, ema_decay=0.9, mesh=mesh)
    # Replicated at first: the step lays its outputs out by the rule whatever its inputs' layout.
    state = sharding.replicate(mesh, train.init_state(params, tx))
    losses_n = []
    for i in range(3):
      state, metrics = step(state, None, sharding.global_batch(mesh, batches[i]),
                            jax.random.key(3))
      losses_n.append(float(metrics["loss"]))
    results[fsdp] = (losses_n, jax.device_get(state))
    kernels = [x for x in jax.tree.leaves(state.opt_state) + jax.tree.leaves(state.params)
               if x.size >= 2 ** 10]
    for x in kernels:  # the step's outputs keep the layout: each device holds 1/fsdp
      assert x.addressable_shards[0].data.size == x.size // fsdp, (x.shape, x.sharding)
  assert len(kernels) > 80
  np.testing.assert_allclose(results[1][0], results[4][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results[1][1],
               results[4][1])


def test_a_run_resumes_on_another_mesh(tmp_path, small_arrays_split):
  """Steps 1–3 on 8 devices with the state split 4 ways, checkpoint at 3; steps 4–6 on 4
  devices split 2 ways. The checkpoint restores onto the new mesh exactly, and the run ends
  where 6 uninterrupted steps on one device end (tests/test_train.py's run: its compiled step
  is in the cache), to float32 rounding."""
  del small_arrays_split
  config = tiny_config(steps=3)
  config.num_devices, config.mesh.fsdp = 8, 4
  saved = jax.device_get(pipeline.train_teacher(config, tmp_path / "run",
                                                pipeline.make_mesh(config)))
  config = tiny_config(steps=6)
  config.num_devices, config.mesh.fsdp = 4, 2
  mesh4 = pipeline.make_mesh(config)
  tx, _ = train.make_optimizer(config.teacher)
  init = lambda: train.init_state(models.init_params(
      models.build_unet(config), jax.random.key(0), models.model_input_shape(config)), tx)
  ckpts = checkpoints.Checkpoints(tmp_path / "run" / "teacher" / "checkpoints")
  step, restored = ckpts.restore_latest(train.abstract_state(init, mesh4))
  ckpts.close()
  assert step == 3
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), saved,
                                          jax.device_get(restored))))
  kernel = restored.params["up_1_res_0"]["conv_0"]["kernel"]  # (3, 3, 64, 32): split along 64
  assert kernel.sharding.mesh.size == 4
  assert kernel.addressable_shards[0].data.shape == (3, 3, 32, 32)
  resumed = jax.device_get(pipeline.train_teacher(config, tmp_path / "run", mesh4))
  config = tiny_config(steps=6)  # one device
  straight = jax.device_get(pipeline.train_teacher(config, tmp_path / "straight",
                                                   pipeline.make_mesh(config)))
  assert int(resumed.step) == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), resumed.params,
               straight.params)
