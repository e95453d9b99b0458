"""The pipeline: teacher → stage one → every halving of stage two, each resuming on a rerun.

Workdir layout (``distill/layout.py`` has the links and reads what they hold)::

    manifest.json         the run's config (hash) and the stages completed, with steps and times
    latent_cache/         with latent.cache: the training split encoded once (a latent family)
    teacher/              checkpoints/, samples/, TensorBoard events
    teacher_v/            a latent teacher fine-tuned from ε- to v-prediction (paper §4.2), when
                          the config has a teacher_v section
    stage_one/            the w-conditioned student of paper §3.1 (Algorithm 1)
    stage_two/N=<n>/      the student with n sampling steps (Algorithm 2), one per halving
    encoder/N=<n>/        with "encoder" in stages: the distilled encoder with n steps (§4.3)
    report/               the eval stage: table.md/.csv, figures, grids, cells/ (one JSON each)

Each link of the chain trains with the one loop of ``distill/train.py``; only its objective and
its frozen teacher differ. A link hands its EMA parameters on (equal to its parameters when
``ema_decay = 0``). Rerunning the same command resumes: a finished link, like a link whose stage
is not in ``config.stages``, is read from the workdir (its EMA parameters) only when a later link
needs it; an interrupted one continues from its newest readable checkpoint.
"""

from __future__ import annotations

import logging
import time
import zlib

import jax
import jax.numpy as jnp

from distill import (config_validation, family, input_pipeline, layout, losses, manifest, paths,
                     progress, sample, sharding, train)
from distill.evaluation import evaluate
from distill.latent import cache as latent_cache
from distill.latent import parts as latent_parts


def stage_key(config, name: str) -> jax.Array:
  """Base key of a stage: the run's seed folded with a fixed id of the stage's name."""
  return jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def make_mesh(config):
  """The run's ``('data', 'fsdp')`` mesh: ``num_devices`` devices, ``mesh.fsdp`` of them per
  split of the state."""
  return sharding.make_mesh(None if config.num_devices == -1 else config.num_devices,
                            fsdp=fsdp_size(config))


def fsdp_size(config) -> int:
  """``config.mesh.fsdp``; 1 for a config recorded before the field existed."""
  return int(config.get("mesh", {}).get("fsdp", 1))


def sample_fn(fam, config, *, w_values, num_steps: int, guided: bool, per_row: int | None = None):
  """``sample_fn(state)`` for progress grids: DDIM of the EMA params, a row per ``w``, decoded.

  ``guided``: the teacher, two network evaluations per step; otherwise a w-conditioned student.
  """
  rows = len(w_values)
  if config.data.num_classes:
    per_row = per_row or min(config.data.num_classes, 10)
    cond = fam.cond_from_labels(jnp.tile(jnp.arange(per_row) % config.data.num_classes, rows))
  else:  # image–caption data: the config's grid prompts
    prompts = list(config.latent.sample_prompts)
    per_row = per_row or len(prompts)
    cond = fam.cond_from_prompts([prompts[i % len(prompts)] for i in range(per_row)] * rows)
  w = jnp.repeat(jnp.asarray(w_values, jnp.float32), per_row)
  z1 = jax.random.normal(jax.random.key(1234), (rows * per_row,) + fam.x_shape)
  # The evaluation's DDIM program (the step count an argument): the grids of stage one and of
  # every halving, and the eval cells of the same batch shape, are one compiled sampler.
  run, steps = sample.sampler_program(fam, guided=guided, sampler="deterministic",
                                      steps=num_steps)
  return lambda state: (fam.decode(run(state.ema_params, z1, cond, w, None, None, steps)), rows)


def train_link(config, workdir, link: layout.Link, mesh, teacher_params, *,
               progress=None, step_cache: dict | None = None) -> train.TrainState:
  """Trains one link of the chain; ``teacher_params`` are the previous link's (None for it).

  ``step_cache``: a dict kept over the links of one run of ``config``, in which the halvings of
  one stage and length share their jitted train step (``train.train``)."""
  section = layout.section_of(config, link)
  key = stage_key(config, link.name)
  fam = family.of_link(config, link.name)
  items = latent_cache.CachedSource(workdir) if latent_cache.is_enabled(config) else None
  batches = fam.prepare_batches(input_pipeline.train_batches(
      config.data, global_batch_size=section.batch_size, seed=config.seed + link.index,
      items=items), seed=config.seed + link.index)
  if link.name in ("teacher", "teacher_v"):
    # teacher: its network read as its folder's scheduler says (ε for SD; latent.scheduler's
    # prediction_type for a teacher trained here). teacher_v: that network, now read as v (the
    # family's teacher predicts v when the chain has this link), trained with the teacher's
    # objective (paper §4.2).
    objective = losses.teacher_objective(fam, p_uncond=section.p_uncond,
                                         weighting=section.get("weighting", "snr_trunc"))
    init = ((lambda: fam.init_teacher(jax.random.fold_in(key, 0))) if teacher_params is None
            else (lambda: teacher_params))
    frozen = None
    grids = dict(w_values=section.sample_w, num_steps=section.sample_steps, guided=True)
  else:
    w_range = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max,
                   dropout=section.dropout)
    w_args = dict(w_weighting=section.w_loss_weight, w_power=section.w_sample_power, **w_range)
    if link.name == "stage_one":
      objective = losses.stage_one_objective(fam, **w_args)
      init = lambda: fam.student_from_teacher(teacher_params, jax.random.fold_in(key, 0))
      frozen = teacher_params
      sample_steps = section.sample_steps
    else:
      objective = (losses.encoder_objective(fam, **w_args) if link.stage == "encoder" else
                   losses.stage_two_objective(fam, for_stochastic=section.train_for_stochastic,
                                              **w_args))
      init = lambda: teacher_params  # the new student starts as its teacher
      frozen = {"params": teacher_params,
                "num_student_steps": jnp.asarray(link.num_steps, jnp.int32)}
      sample_steps = link.num_steps
    grids = dict(w_values=section.get("sample_w", ()), num_steps=sample_steps, guided=False)
  return train.train(
      name=link.name, section=link.stage, stage_cfg=section, objective=objective,
      init_params=init, frozen=frozen, batches=batches, mesh=mesh,
      workdir=link.directory(workdir), config=config, base_key=jax.random.fold_in(key, 1),
      sample_fn=sample_fn(fam, config, **grids) if section.sample_every else None,
      progress=progress, step_cache=step_cache,
      # The objective, the optimiser and the schedule are functions of the run's config, the
      # link's stage and its section (a long halving's length gives another schedule); a
      # halving's N is an array in ``frozen``.
      step_key=(link.stage, section.to_json_best_effort(sort_keys=True)))


def train_part(config, workdir, link: layout.Link, mesh, *, progress=None) -> train.TrainState:
  """Trains one part of a text-to-image teacher (``distill/latent/parts.py``) and writes its
  folder once it is complete."""
  section = layout.section_of(config, link)
  key = stage_key(config, link.name)
  objective, init, prepare = latent_parts.link_parts(config, workdir, link.name)
  batches = prepare(input_pipeline.train_batches(
      config.data, global_batch_size=section.batch_size, seed=config.seed + link.index))
  state = train.train(
      name=link.name, section=link.stage, stage_cfg=section, objective=objective,
      init_params=lambda: init(jax.random.fold_in(key, 0)), frozen=None, batches=batches,
      mesh=mesh, workdir=link.directory(workdir), config=config,
      base_key=jax.random.fold_in(key, 1), progress=progress)
  if jax.process_index() == 0 and not latent_parts.is_exported(workdir, link.name):
    out = latent_parts.write_part(config, workdir, link.name, state.ema_params)
    logging.info("%s: written to %s", link.name, out)
  return state


def _teacher_from_parts(config, workdir):
  """``config`` reading the teacher folder assembled from the trained parts (written once)."""
  if jax.process_index() == 0 and not latent_parts.parts_dir(workdir).exists():
    for name in ("autoencoder", "clip"):
      if not latent_parts.is_exported(workdir, name):
        raise ValueError(f"{name} is not complete in {str(workdir)!r}: add "
                         f"{layout.PART_STAGES[name]} to --config.stages to train it.")
    out = latent_parts.assemble(config, workdir, jax.random.fold_in(stage_key(config, "teacher"),
                                                                    0))
    logging.info("teacher: its folder (the trained parts, the U-Net at initialisation) is %s",
                 out)
  latent_parts.sync("assemble")
  return layout.fill_trained_parts(config, workdir)


def train_teacher(config, workdir, mesh) -> train.TrainState:
  """Trains the classifier-free-guided teacher (label dropout, v-prediction)."""
  link = next(link for link in layout.chain(config) if link.name == "teacher")
  return train_link(config, workdir, link, mesh, None)


def run(config, workdir) -> None:
  """Runs ``config.stages`` in order; finished links are skipped, so reruns resume.

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
  links = layout.chain(config)
  last = max((i for i, link in enumerate(links) if link.stage in stages), default=-1)
  trained = [link for link in links[:last + 1]
             if link.stage in stages and not layout.is_imported(config, link)]
  tracker = progress.RunProgress(
      [(link.name, link.stage, int(layout.section_of(config, link).num_train_steps),
        int(layout.section_of(config, link).batch_size)) for link in trained],
      eval_work=_eval_work(config) if "eval" in stages else 0)

  for link in links[:last + 1]:
    if not layout.is_part(link) or link.stage not in stages:
      continue
    if _skipped_as_complete(record, tracker, link, latent_parts.is_exported(workdir, link.name)):
      continue
    _recorded(record, tracker, link,
              lambda link=link: train_part(config, workdir, link, mesh, progress=tracker))
  if layout.trains_parts(config) and (any(not layout.is_part(link) for link in links[:last + 1])
                                      or "eval" in stages):
    config = _teacher_from_parts(config, workdir)

  if trained and latent_cache.is_enabled(config) and not record.is_complete("latent_cache"):
    start = time.time()
    latent_cache.build(config, workdir, family.of(config))
    record.complete("latent_cache", step=0, seconds=time.time() - start)
    logging.info("latent_cache: %s", latent_cache.directory(workdir))

  params = {}  # link name -> a function giving its EMA parameters (read only when needed)
  steps = {}  # the train steps of this run's links, shared by the halvings (train_link)
  for link in links[:last + 1]:
    if layout.is_part(link):
      continue
    imported = layout.is_imported(config, link)
    if imported and "teacher" in stages:
      logging.info("teacher: not trained, %s is used instead",
                   config.teacher.checkpoint or config.teacher.pretrained)
    if imported or link.stage not in stages or _skipped_as_complete(record, tracker, link):
      params[link.name] = lambda link=link: layout.read_final_params(config, workdir, link, mesh)
      continue
    parent = layout.teacher_of(links, link)
    teacher_params = params[parent]() if parent in params else None
    state = _recorded(record, tracker, link, lambda link=link: train_link(
        config, workdir, link, mesh, teacher_params, progress=tracker, step_cache=steps))
    params[link.name] = lambda state=state: state.ema_params

  if "eval" in stages:
    start = time.time()
    # Every process draws its devices' share of each cell on the run's mesh; process 0 writes.
    out = evaluate.run(config, workdir, mesh=mesh)
    record.complete("eval", step=0, seconds=time.time() - start)
    if jax.process_index() == 0:
      logging.info("eval: report written to %s", out)
      for line in evaluate.summary(out, config):
        logging.info("%s", line)
  logging.info("run finished in %s (%s)", progress.format_seconds(time.time() - tracker.started),
               ", ".join(stages))


def _skipped_as_complete(record, tracker, link: layout.Link, written: bool = True) -> bool:
  """Whether ``link`` finished in an earlier run (the manifest records it only after its final
  checkpoint is written, and ``written``: a part's folder too). Such a link is not restored: its
  EMA parameters are read from the final checkpoint if, and when, a later link needs them (a
  whole train state is four times the parameters, and Orbax reads it array by array)."""
  if not (written and record.is_complete(link.name)):
    return False
  tracker.begin(link.name, record.final_step(link.name))
  logging.info("%s (%s): complete", link.name, tracker.position(link.name))
  return True


def _recorded(record, tracker, link: layout.Link, train_fn) -> train.TrainState:
  """Runs ``train_fn()`` for ``link``, logged with its position, and records the finished link
  in the manifest."""
  start = time.time()
  logging.info("%s (%s): training", link.name, tracker.position(link.name))
  state = train_fn()
  record.complete(link.name, step=int(state.step), seconds=time.time() - start)
  return state


def _eval_work(config) -> int:
  """Network evaluations of the eval stage's cells, for the run's ETA (before it starts)."""
  cells = evaluate.plan(config, trained=layout.halvings(config))
  return sum(cell.nfe for cell in cells) * int(config.eval.num_samples)


def _mesh_size(config) -> int:
  return jax.device_count() if config.num_devices == -1 else config.num_devices
