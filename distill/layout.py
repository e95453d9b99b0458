"""The workdir's layout: the chain's links, their directories, and what a finished link holds.

A workdir holds one directory per link of the chain (``teacher/``, for a latent teacher the
optional ε→v fine-tuning ``teacher_v/``, ``stage_one/``, ``stage_two/N=<n>/``, the distilled
encoders ``encoder/N=<n>/``), each with its Orbax checkpoints; ``pipeline`` trains them,
``sample`` and ``evaluation`` read them, and all three read this module (never each other's
internals).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import ml_collections
from etils import epath

from distill import checkpoints, family, paths, sharding


@dataclasses.dataclass(frozen=True)
class Link:
  """One trained model of the chain: ``teacher``, ``teacher_v``, ``stage_one``, a halving
  ``stage_two/N=n`` or a distilled encoder ``encoder/N=n``."""
  name: str
  stage: str  # the entry of config.stages that trains it
  index: int  # position in the chain (varies the data order between links)
  num_steps: int | None = None  # sampling (or encoding) steps of a stage-two student (encoder)

  def directory(self, workdir) -> epath.Path:
    return epath.Path(workdir) / self.name


def halvings(config, stage: str = "stage_two") -> list[int]:
  """Student step counts of stage two (or of the encoder): ``start/2, start/4, …, end``."""
  n, out = int(config[stage].start_num_steps), []
  while n > int(config[stage].end_num_steps):
    n //= 2
    out.append(n)
  return out


def has_encoder(config) -> bool:
  """Whether the chain has distilled-encoder links (``encoder.start_num_steps > 0``)."""
  section = config.get("encoder")
  return section is not None and int(section.get("start_num_steps", 0)) > 0


def has_teacher_v(config) -> bool:
  """Whether the chain has the ε→v fine-tuning link (``teacher_v.num_train_steps > 0``)."""
  section = config.get("teacher_v")
  return section is not None and int(section.get("num_train_steps", 0)) > 0


def trains_parts(config) -> bool:
  """Whether the chain trains its text-to-image teacher's parts first (an ``autoencoder``
  section with ``num_train_steps > 0``; ``distill/latent/parts.py``)."""
  section = config.get("autoencoder")
  return section is not None and int(section.get("num_train_steps", 0)) > 0


PART_STAGES = {"autoencoder": "autoencoder", "clip": "clip", "clip_eval": "clip"}


def chain(config) -> list[Link]:
  """[autoencoder → clip → clip_eval] → teacher → [teacher_v] → stage_one → the halvings
  [→ the encoder's halvings], in training order."""
  names = list(PART_STAGES) if trains_parts(config) else []
  names += ["teacher"] + (["teacher_v"] if has_teacher_v(config) else []) + ["stage_one"]
  links = [Link(name, PART_STAGES.get(name, name), i) for i, name in enumerate(names)]
  stages = ("stage_two", "encoder") if has_encoder(config) else ("stage_two",)
  for stage in stages:
    links += [Link(f"{stage}/N={n}", stage, len(links) + i, n)
              for i, n in enumerate(halvings(config, stage))]
  return links


def teacher_of(links: list[Link], link: Link) -> str | None:
  """The link whose parameters ``link`` learns from (and, past stage one, starts as): the one
  before it in the chain, except that the first encoder learns from stage one. None for the
  first link."""
  i = links.index(link)
  if link.stage == "encoder" and (i == 0 or links[i - 1].stage != "encoder"):
    return "stage_one"
  return links[i - 1].name if i else None


def is_part(link: Link) -> bool:
  return link.name in PART_STAGES


def fill_trained_parts(config, workdir):
  """``config`` with the folders the chain trains filled in (a chain with ``trains_parts``):
  ``teacher.pretrained`` is ``workdir/parts`` and an empty ``eval.clip_model`` the evaluator
  CLIP ``workdir/clip_eval/model``. Other configs are returned as they are."""
  if not trains_parts(config):
    return config
  from distill.latent import parts  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(config.to_dict())
  config.teacher.pretrained = str(parts.parts_dir(workdir))
  if not config.eval.get("clip_model"):
    config.eval.clip_model = str(parts.export_dir(workdir, "clip_eval"))
  return config


def is_imported(config, link: Link) -> bool:
  """The teacher is read, not trained, when ``teacher.checkpoint`` (a distill checkpoint) or
  ``teacher.pretrained`` (a diffusers-layout folder, for the latent family) is set, unless the
  chain trained that folder's parts (then the teacher trains from it)."""
  return link.name == "teacher" and not trains_parts(config) and bool(
      config.teacher.checkpoint or config.teacher.get("pretrained"))


def halving_section(config, num_steps: int,
                    stage: str = "stage_two") -> ml_collections.ConfigDict:
  """``config.stage_two`` (or ``config.encoder``) with ``num_train_steps`` of the halving to
  ``num_steps`` steps."""
  cfg = config[stage]
  long = 0 < num_steps <= cfg.long_halving_max_steps
  section = ml_collections.ConfigDict(cfg.to_dict())
  section.num_train_steps = int(cfg.long_halving_train_steps if long else
                                cfg.train_steps_per_halving)
  return section


def section_of(config, link: Link):
  if link.stage in ("stage_two", "encoder"):
    return halving_section(config, link.num_steps, link.stage)
  return config[link.stage]


def abstract_params(fam, link_name: str, mesh):
  """Shapes, dtypes and shardings (``sharding.param_spec``) of a link's parameters: the
  teacher's or, for any other link, a student's."""
  if link_name in ("teacher", "teacher_v"):
    init = lambda: fam.init_teacher(jax.random.key(0))
  else:
    init = lambda: fam.student_from_teacher(fam.init_teacher(jax.random.key(0)),
                                            jax.random.key(0))
  return sharding.abstract_params(mesh, jax.eval_shape(init))


def read_final_params(config, workdir, link: Link, mesh):
  """The EMA parameters of a link that finished in an earlier run, or a clear error.

  The teacher is ``config.teacher.checkpoint`` when that is set (an imported teacher is never
  written to the workdir), so sampling and evaluation see the teacher the students learned from.
  """
  if link.name == "teacher" and config.teacher.checkpoint:
    return read_teacher_checkpoint(config, mesh)
  config = fill_trained_parts(config, workdir)
  if is_imported(config, link):
    return sharding.shard_params(mesh, family.of(config).init_teacher(None))
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
  if is_part(link):
    from distill.latent import parts  # pylint: disable=import-outside-toplevel
    abstract = sharding.abstract_params(mesh, parts.abstract_params(config, workdir, link.name))
  else:
    abstract = abstract_params(family.of(config), link.name, mesh)
  return checkpoints.read_params(directory / "checkpoints" / str(want), abstract,
                                 what=link.name)[1]


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


def workdir_config(workdir) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (the JSON saved with its first stage's checkpoints);
  for a workdir whose encoder links were added later, with the encoder section they saved."""
  workdir = epath.Path(paths.resolve(workdir))
  config = None
  for link in ("teacher", "teacher_v", "stage_one"):
    config = _saved_config(workdir / link)
    if config is not None:
      break
  if config is None:
    raise ValueError(f"workdir {str(workdir)!r} holds no trained stage (no teacher/, teacher_v/ "
                     "or stage_one/ checkpoints): run python -m distill.main --workdir=... first.")
  if not has_encoder(config) and (workdir / "encoder").is_dir():
    for directory in sorted((workdir / "encoder").iterdir()):
      encoder = _saved_config(directory)
      if encoder is not None and has_encoder(encoder):
        config.encoder = encoder.encoder
        break
  return fill_trained_parts(config, workdir)


def _saved_config(directory) -> ml_collections.ConfigDict | None:
  """The config saved with the newest checkpoint of a link's directory, or None."""
  try:
    _, step = checkpoints.state_dir(directory)
  except ValueError:
    return None
  saved = checkpoints.Checkpoints(directory / "checkpoints", max_to_keep=None, writable=False)
  try:
    return ml_collections.ConfigDict(saved.restore_config(step))
  finally:
    saved.close()


def available_students(workdir, stage: str = "stage_two") -> list[int]:
  """Step counts of the trained students (or, with ``stage="encoder"``, encoders) in a workdir."""
  root = epath.Path(workdir) / stage
  found = []
  if root.is_dir():
    for d in root.iterdir():
      if d.name.startswith("N=") and (d / "checkpoints").is_dir():
        found.append(int(d.name[2:]))
  return sorted(found)
