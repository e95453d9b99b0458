"""The pipeline: teacher → stage one → every halving of stage two, each resuming on a rerun.

Workdir layout::

    manifest.json         the run's config (hash) and the stages completed, with steps and times
    teacher/              checkpoints/, samples/, TensorBoard events
    stage_one/            the w-conditioned student of paper §3.1 (Algorithm 1)
    stage_two/N=<n>/      the student with n sampling steps (Algorithm 2), one per halving
    report/               the eval stage: table.md/.csv, figures, grids, cells/ (one JSON each)

Each link of the chain trains with the one loop of ``distill/train.py``; only its objective and
its frozen teacher differ. A link hands its EMA parameters on (equal to its parameters when
``ema_decay = 0``). Rerunning the same command resumes: a finished link returns at once from its
final checkpoint, an interrupted one continues from its newest readable checkpoint, and a link
whose stage is not in ``config.stages`` is read from the workdir when a later link needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from distill import (checkpoints, config_validation, denoiser, diffusion, family, input_pipeline,
                     losses, manifest, paths, progress, sharding, train)


def stage_key(config, name: str) -> jax.Array:
  """Base key of a stage: the run's seed folded with a fixed id of the stage's name."""
  return jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def make_mesh(config):
  return sharding.make_mesh(None if config.num_devices == -1 else config.num_devices)


@dataclasses.dataclass(frozen=True)
class Link:
  """One trained model of the chain: ``teacher``, ``stage_one`` or a halving ``stage_two/N=n``."""
  name: str
  stage: str  # the entry of config.stages that trains it
  index: int  # position in the chain (varies the data order between links)
  num_steps: int | None = None  # sampling steps of a stage-two student

  def directory(self, workdir) -> epath.Path:
    return epath.Path(workdir) / self.name


def halvings(config) -> list[int]:
  """Student step counts of stage two: ``start/2, start/4, …, end``."""
  n, out = int(config.stage_two.start_num_steps), []
  while n > int(config.stage_two.end_num_steps):
    n //= 2
    out.append(n)
  return out


def chain(config) -> list[Link]:
  links = [Link("teacher", "teacher", 0), Link("stage_one", "stage_one", 1)]
  links += [Link(f"stage_two/N={n}", "stage_two", 2 + i, n)
            for i, n in enumerate(halvings(config))]
  return links


def halving_section(config, num_steps: int) -> ml_collections.ConfigDict:
  """``config.stage_two`` with ``num_train_steps`` of the halving to ``num_steps`` steps."""
  cfg = config.stage_two
  long = 0 < num_steps <= cfg.long_halving_max_steps
  section = ml_collections.ConfigDict(cfg.to_dict())
  section.num_train_steps = int(cfg.long_halving_train_steps if long else
                                cfg.train_steps_per_halving)
  return section


def section_of(config, link: Link):
  return halving_section(config, link.num_steps) if link.stage == "stage_two" else config[link.name]


def sample_fn(fam, config, *, w_values, num_steps: int, guided: bool, per_row: int | None = None):
  """``sample_fn(state)`` for progress grids: DDIM of the EMA params, a row per ``w``, decoded.

  ``guided``: the teacher, two network evaluations per step; otherwise a w-conditioned student.
  """
  per_row = per_row or min(config.data.num_classes, 10)
  rows = len(w_values)
  cond = fam.cond_from_labels(jnp.tile(jnp.arange(per_row) % config.data.num_classes, rows))
  w = jnp.repeat(jnp.asarray(w_values, jnp.float32), per_row)
  z1 = jax.random.normal(jax.random.key(1234), (rows * per_row,) + fam.x_shape)
  make_fn = denoiser.guided_denoise_fn if guided else denoiser.denoise_fn

  @jax.jit
  def sample(params):
    return fam.decode(diffusion.sample_deterministic(make_fn(fam, params, cond, w), z1,
                                                     num_steps))

  return lambda state: (sample(state.ema_params), rows)


def abstract_params(fam, link_name: str, mesh):
  if link_name == "teacher":
    init = lambda: fam.init_teacher(jax.random.key(0))
  else:
    init = lambda: fam.student_from_teacher(fam.init_teacher(jax.random.key(0)),
                                            jax.random.key(0))
  shapes = jax.eval_shape(init)
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      shapes)


def read_final_params(config, workdir, link: Link, mesh):
  """The EMA parameters of a link that finished in an earlier run, or a clear error.

  The teacher is ``config.teacher.checkpoint`` when that is set (an imported teacher is never
  written to the workdir), so sampling and evaluation see the teacher the students learned from.
  """
  if link.name == "teacher" and config.teacher.checkpoint:
    return read_teacher_checkpoint(config, mesh)
  fam = family.of(config)
  directory = link.directory(workdir)
  want = int(section_of(config, link).num_train_steps)
  try:
    _, step = checkpoints.state_dir(directory)
  except ValueError:
    step = 0
  if step < want:
    raise ValueError(f"{link.name} is not complete in {str(directory)!r} (step {step} of "
                     f"{want}): add {link.stage} to --config.stages to train it, or start from "
                     "an existing teacher with --config.teacher.checkpoint=PATH.")
  return checkpoints.read_params(directory / "checkpoints" / str(want),
                                 abstract_params(fam, link.name, mesh), what=link.name)[1]


def read_teacher_checkpoint(config, mesh):
  """The EMA parameters of ``config.teacher.checkpoint`` after an architecture check."""
  path = config.teacher.checkpoint
  step, params = checkpoints.read_params(
      path, abstract_params(family.of(config), "teacher", mesh), what="teacher")
  if not checkpoints.is_finite(params):
    raise ValueError(f"teacher.checkpoint={path!r}: the teacher's EMA parameters (step {step}) "
                     "hold NaN or infinite values; pass a checkpoint of a healthy teacher.")
  logging.info("teacher: read EMA parameters of step %d from %s", step, path)
  return params


def train_link(config, workdir, link: Link, mesh, teacher_params, *,
               progress=None) -> train.TrainState:
  """Trains one link of the chain; ``teacher_params`` are the previous link's (None for it)."""
  section = section_of(config, link)
  key = stage_key(config, link.name)
  batches = input_pipeline.train_batches(config.data, global_batch_size=section.batch_size,
                                         seed=config.seed + link.index)
  fam = family.of(config)
  if link.name == "teacher":
    objective = losses.teacher_objective(fam, p_uncond=section.p_uncond)
    init = lambda: fam.init_teacher(jax.random.fold_in(key, 0))
    frozen = None
    grids = dict(w_values=section.sample_w, num_steps=section.sample_steps, guided=True)
  else:
    w_range = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max,
                   dropout=section.dropout)
    if link.name == "stage_one":
      objective = losses.stage_one_objective(fam, **w_range, w_weighting=section.w_loss_weight,
                                             w_power=section.w_sample_power)
      init = lambda: fam.student_from_teacher(teacher_params, jax.random.fold_in(key, 0))
      frozen = teacher_params
      sample_steps = section.sample_steps
    else:
      objective = losses.stage_two_objective(fam, for_stochastic=section.train_for_stochastic,
                                             w_weighting=section.w_loss_weight,
                                             w_power=section.w_sample_power, **w_range)
      init = lambda: teacher_params  # the new student starts as its teacher
      frozen = {"params": teacher_params,
                "num_student_steps": jnp.asarray(link.num_steps, jnp.int32)}
      sample_steps = link.num_steps
    grids = dict(w_values=section.sample_w, num_steps=sample_steps, guided=False)
  return train.train(
      name=link.name, section=link.stage, stage_cfg=section, objective=objective,
      init_params=init, frozen=frozen, batches=batches, mesh=mesh,
      workdir=link.directory(workdir), config=config, base_key=jax.random.fold_in(key, 1),
      sample_fn=sample_fn(fam, config, **grids) if section.sample_every else None,
      progress=progress)


def train_teacher(config, workdir, mesh) -> train.TrainState:
  """Trains the classifier-free-guided teacher (label dropout, v-prediction)."""
  return train_link(config, workdir, chain(config)[0], mesh, None)


def run(config, workdir) -> None:
  """Runs ``config.stages`` in order; finished links return at once, so reruns resume.

  Local paths (``workdir`` and the config's path fields) are made absolute here, against the
  current directory; URLs such as ``gs://…`` are left as they are.
  """
  if workdir:
    workdir = paths.resolve(workdir)
  config = paths.resolve_config(config)
  config_validation.validate(config, workdir, num_devices=_mesh_size(config),
                             process_count=jax.process_count())
  stages = config_validation.stages_of(config)
  if jax.process_index() == 0:
    paths.check_writable(workdir)
  record = manifest.Manifest(workdir)
  record.check_config(config)
  mesh = make_mesh(config)
  links = chain(config)
  last = max((i for i, link in enumerate(links) if link.stage in stages), default=-1)
  trained = [link for link in links[:last + 1] if link.stage in stages and not (
      link.name == "teacher" and config.teacher.checkpoint)]
  tracker = progress.RunProgress(
      [(link.name, link.stage, int(section_of(config, link).num_train_steps),
        int(section_of(config, link).batch_size)) for link in trained],
      eval_work=_eval_work(config) if "eval" in stages else 0)

  params = None  # a function giving the previous link's EMA parameters
  for link in links[:last + 1]:
    imported = link.name == "teacher" and bool(config.teacher.checkpoint)
    if imported and "teacher" in stages:
      logging.info("teacher: not trained, --config.teacher.checkpoint=%s is used instead",
                   config.teacher.checkpoint)
    if imported or link.stage not in stages:
      params = lambda link=link: read_final_params(config, workdir, link, mesh)
      continue
    teacher_params = params() if params is not None else None
    start = time.time()
    was_complete = record.is_complete(link.name)
    logging.info("%s (%s): %s", link.name, tracker.position(link.name),
                 "complete, read from its final checkpoint" if was_complete else "training")
    state = train_link(config, workdir, link, mesh, teacher_params, progress=tracker)
    if not was_complete:
      record.complete(link.name, step=int(state.step), seconds=time.time() - start)
    params = lambda state=state: state.ema_params

  if "eval" in stages and jax.process_index() == 0:
    from distill.evaluation import evaluate  # pylint: disable=import-outside-toplevel
    start = time.time()
    out = evaluate.run(config, workdir)
    record.complete("eval", step=0, seconds=time.time() - start)
    logging.info("eval: report written to %s", out)
    for line in evaluate.summary(out, config):
      logging.info("%s", line)
  logging.info("run finished in %s (%s)", progress.format_seconds(time.time() - tracker.started),
               ", ".join(stages))


def _eval_work(config) -> int:
  """Network evaluations of the eval stage's cells, for the run's ETA (before it starts)."""
  from distill.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  cells = evaluate.plan(config, trained=halvings(config))
  return sum(cell.nfe for cell in cells) * int(config.eval.num_samples)


def _mesh_size(config) -> int:
  return jax.device_count() if config.num_devices == -1 else config.num_devices
