"""The one training loop: teacher, stage one and stage two differ only in their objective.

* ``TrainState``: step, params, EMA params, optimiser state, and the counts of skipped updates.
* ``make_optimizer``: Adam with linear warm-up, optional cosine/linear decay, global-norm clipping.
* ``make_train_step``: one ``jax.jit`` step, state donated, the state laid out by
  ``sharding.param_spec`` (replicated, or split along ``fsdp``) and the batch split over every
  device of the ``('data', 'fsdp')`` mesh. Its key is ``fold_in(base_key, step)``, so a resumed
  run is bit-identical. A non-finite loss or gradient leaves params, EMA and optimiser state
  unchanged and is counted.
* ``train``: restores the newest readable checkpoint (or initialises), iterates the data from the
  restored step, writes clu metrics and progress, sample grids and checkpoints; a SIGTERM
  saves the current step and raises ``preemption.Preempted``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Hashable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from distill import checkpoints, images, input_pipeline, preemption, sharding

Objective = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  skipped_total: jax.Array
  skipped_in_row: jax.Array


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warm-up to ``cfg.lr`` over ``cfg.warmup_steps``, then ``cfg.lr_decay``.

  ``lr_decay``: ``"constant"``, ``"cosine"`` or ``"linear"`` (to 0 at ``num_train_steps``).
  """
  warmup = int(cfg.warmup_steps)
  rest = max(int(cfg.num_train_steps) - warmup, 1)
  if cfg.lr_decay == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.lr_decay == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, rest)
  elif cfg.lr_decay == "linear":
    after = optax.linear_schedule(cfg.lr, 0.0, rest)
  else:
    raise ValueError(f"lr_decay={cfg.lr_decay!r} is not one of 'constant', 'cosine', 'linear'.")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg)
  parts = []
  if cfg.grad_clip and cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps))
  return optax.chain(*parts), schedule


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.array, params), opt_state=tx.init(params),
                    skipped_total=jnp.zeros((), jnp.int32),
                    skipped_in_row=jnp.zeros((), jnp.int32))


def make_train_step(objective: Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, ema_decay: float, mesh):
  """``step(state, frozen, batch, base_key) -> (state, metrics)``, jitted and sharded."""

  def gathered_objective(params, frozen, batch, key):  # FSDP: whole arrays where they are used
    return objective(sharding.gather_params(mesh, params), sharding.gather_params(mesh, frozen),
                     batch, key)

  def step(state: TrainState, frozen, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    (loss, metrics), grads = jax.value_and_grad(gathered_objective, has_aux=True)(
        state.params, frozen, batch, key)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                       state.ema_params, params)

    def keep_if_ok(new, old):
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    skipped = (~ok).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_ok(params, state.params),
        ema_params=keep_if_ok(ema, state.ema_params),
        opt_state=keep_if_ok(opt_state, state.opt_state),
        skipped_total=state.skipped_total + skipped,
        skipped_in_row=(state.skipped_in_row + 1) * skipped)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   learning_rate=schedule(state.step), skipped=skipped,
                   skipped_total=new_state.skipped_total,
                   skipped_in_row=new_state.skipped_in_row)
    return (sharding.constrain_params(mesh, new_state),
            jax.lax.with_sharding_constraint(metrics, sharding.replicated(mesh)))

  return jax.jit(step, donate_argnums=(0,))


def abstract_state(init_fn: Callable[[], TrainState], mesh):
  """Shapes, dtypes and shardings (``sharding.param_spec``) of the state ``init_fn`` would
  make."""
  return sharding.abstract_params(mesh, jax.eval_shape(init_fn))


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  host = jax.device_get(pending)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  for k in ("skipped_total", "skipped_in_row"):
    out[k] = float(host[-1][k])
  out["skipped"] = float(np.sum([m["skipped"] for m in host]))
  return out


def train(*, name: str, stage_cfg, objective: Objective, init_params: Callable[[], Any],
          frozen, batches, mesh, workdir, config, base_key, writer=None, section: str | None = None,
          sample_fn: Callable[[TrainState], tuple[np.ndarray, int]] | None = None,
          progress=None, step_cache: dict | None = None,
          step_key: Hashable = None) -> TrainState:
  """Trains one stage to ``stage_cfg.num_train_steps``, resuming from its checkpoints.

  ``name`` labels logs; ``section`` (default ``name``) is the config section that error
  messages point to.

  ``step_cache`` (a dict the caller keeps) and ``step_key``: calls with the same key on the same
  mesh train with one jitted step, its optimiser and schedule, traced and compiled once. The
  caller vouches that equal keys mean equal objectives and ``stage_cfg``s: a chain's halvings of
  one length differ only in what ``frozen`` holds (docs/pipeline.md).

  ``workdir`` is the stage's directory (checkpoints in ``workdir/checkpoints``, sample grids in
  ``workdir/samples``); ``batches[step]`` is the process-local batch of ``step``;
  ``sample_fn(state)`` returns ``(images, rows)`` for a grid. ``progress`` (a
  ``progress.RunProgress``) adds the run's position and ETA to each log line.
  """
  workdir = epath.Path(workdir)
  num_steps = int(stage_cfg.num_train_steps)
  cache_key = None if step_cache is None else (step_key, mesh)
  if cache_key in (step_cache or {}):
    tx, schedule, step_fn = step_cache[cache_key]
  else:
    tx, schedule = make_optimizer(stage_cfg)
    step_fn = make_train_step(objective, tx, schedule, ema_decay=stage_cfg.ema_decay, mesh=mesh)
    if step_cache is not None:
      step_cache[cache_key] = tx, schedule, step_fn
  make_state = lambda: init_state(init_params(), tx)
  ckpts = checkpoints.Checkpoints(workdir / "checkpoints", max_to_keep=stage_cfg.max_to_keep)
  restored_step, state = ckpts.restore_latest(abstract_state(make_state, mesh))
  if state is None:
    # A copy: the step donates the state, and init_params may return the caller's arrays
    # (a halving's student starts as its frozen teacher).
    state = sharding.shard_params(mesh, make_state(), may_alias=False)
    logging.info("%s: starting from step 0", name)
  else:
    logging.info("%s: resuming from checkpoint at step %d", name, restored_step)
  start = int(state.step)
  if progress is not None:
    progress.begin(name, start)
  if start >= num_steps:
    ckpts.close()
    return state

  # clu's writers import TensorFlow (about 4 s): only a process that trains pays for it.
  from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel
  if writer is None:
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
  is_main = jax.process_index() == 0
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=stage_cfg.log_every)
  frozen = None if frozen is None else sharding.shard_params(mesh, frozen)
  data = input_pipeline.iterate(batches, start)
  max_in_row = int(stage_cfg.max_consecutive_nonfinite)

  def check(metrics, step):
    if int(metrics["skipped_in_row"]) >= max_in_row:
      ckpts.wait()
      raise NonFiniteError(
          f"{name}: {max_in_row} consecutive steps (up to step {step}) had a non-finite loss or "
          f"gradient and were skipped; the last checkpoint holds the state before them. Lower "
          f"the learning rate or raise {section or name}.max_consecutive_nonfinite.")

  pending, previous = [], None
  # A failed background save stops the run at the next step; with several processes it is
  # found at the next (collective) save or wait instead, so that every process stops together.
  poll = jax.process_count() == 1
  t0 = time.time()
  t_log, step_log = t0, start
  t_aside = 0.0  # time in progress grids since the last log line: not training steps
  with metric_writers.ensure_flushes(writer), preemption.Watcher() as watcher:
    for step in range(start, num_steps):
      batch = sharding.global_batch(mesh, next(data))
      state, metrics = step_fn(state, frozen, batch, base_key)
      if previous is not None:  # read one step late so the host never stalls the device
        check(*previous)
      previous = (metrics, step + 1)
      pending.append(metrics)
      done = step + 1
      report(done)
      if done % stage_cfg.log_every == 0 or done == num_steps:
        scalars = _mean_metrics(pending)
        pending = []
        writer.write_scalars(done, scalars)
        now = time.time()
        rate = (done - step_log) / max(now - t_log - t_aside, 1e-9)
        t_aside = 0.0
        # The first interval holds the compiles: the run's ETA keeps the rate measured before.
        eta_rate = rate if step_log > start else 0.0
        t_log, step_log = now, done
        logging.info("%s step %d/%d: loss %.5f, grad norm %.3f, lr %.2e, skipped %d, %.1f s, "
                     "%.1f steps/s%s", name, done, num_steps, scalars["loss"],
                     scalars["grad_norm"], scalars["learning_rate"], scalars["skipped_total"],
                     now - t0, rate, progress.describe(name, done, eta_rate) if progress else "")
      if sample_fn is not None and stage_cfg.sample_every and (
          done % stage_cfg.sample_every == 0 or done == num_steps):
        t_grid = time.time()
        samples, rows = sample_fn(state)
        if is_main:
          image = images.grid(np.asarray(samples), rows=rows)
          writer.write_images(done, {"samples": image[None]})
          images.save_png(image, workdir / "samples" / f"step_{done:08d}.png", scale=4)
        t_aside += time.time() - t_grid
      if poll:
        ckpts.poll()
      preempted = watcher.reached(done)
      if done % stage_cfg.checkpoint_every == 0 or done == num_steps or preempted:
        check(metrics, done)
        ckpts.save(done, state, config)
      if preempted:
        ckpts.wait()
        ckpts.close()
        raise preemption.Preempted(name, done)
    check(*previous)
  ckpts.wait()
  ckpts.close()
  return state
