"""Sampling from a workdir: ``python -m distill.sample --workdir=DIR [options]``.

Picks a model of the chain — ``teacher`` (guided DDIM, two network evaluations per step, in one
batched pass), ``stage_one`` (the w-conditioned student, DDIM with any step count) or
``student`` (the stage-two student with ``--num_steps`` steps) — a sampler (``deterministic``:
Eq. 2; ``stochastic``: Eq. 4–7, which asks a student with N steps for 2N evaluations;
``dpm_solver``: DPM-Solver++ (2M) at any step count, for the teacher and stage one), guidance
weights, class labels (or, for a text-conditioned latent teacher, ``--prompt``s or a
``--prompts_file``), a count and a seed, and writes a PNG grid (a row per w) and an ``.npz`` of
the decoded samples (``images`` in [−1, 1], ``labels`` or ``prompts``, ``w``).

Editing (``distill/editing.py``, docs/editing.md): ``--init_image=PATH --strength=s`` is
image-to-image (SDEdit: the image noised to ``t0 = s``, then the deterministic steps from there;
a student starts on its grid), ``--mask=PATH`` (white: fill) inpaints, keeping the rest of the
image, and ``--source_label=A`` (or ``--source_prompt``) is style transfer (paper §4.3): the image
is encoded under its class A (a student by its distilled encoder) and decoded under ``--labels``.
Each grid row then starts with the source.

The library functions (``load_model``, ``generate``) serve the evaluation stage and notebooks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from distill import (cli, compilation_cache, denoiser, diffusion, editing, family, images, layout,
                     paths, processes, sharding)

MODELS = ("teacher", "stage_one", "student")
ENCODER = "encoder"  # a distilled encoder (paper §4.3): load_model(workdir, ENCODER, num_steps=N)
SAMPLERS = ("deterministic", "stochastic", "dpm_solver")


@dataclasses.dataclass
class LoadedModel:
  """A model of the chain with its EMA parameters and how it samples."""
  kind: str  # teacher | stage_one | student | encoder
  family: Any  # the denoiser family (distill/family.py) whose network this is
  params: Any
  config: ml_collections.ConfigDict
  num_steps: int | None = None  # a student's trained step count
  mesh: jax.sharding.Mesh | None = None  # params laid out on it; batches split over it


def load_model(workdir, kind: str, *, num_steps: int | None = None, config=None,
               mesh=None) -> LoadedModel:
  """Reads a finished model of the chain from ``workdir``; clear errors for what is missing.

  The parameters are laid out on ``mesh`` by ``sharding.param_spec`` (default: one device), and
  ``generate`` splits each batch over it."""
  if kind not in MODELS + (ENCODER,):
    raise ValueError(f"model={kind!r} is not one of {list(MODELS)}.")
  workdir = paths.resolve(workdir)
  config = paths.resolve_config(config or layout.workdir_config(workdir))
  mesh = mesh or sharding.make_mesh(1)
  links = {link.name: link for link in layout.chain(config)}
  if kind in ("student", ENCODER):
    stage, what, train_it = ("stage_two", "stage-two student", "") if kind == "student" else (
        "encoder", "distilled encoder", ", or train it: --config.stages=encoder of distill.main")
    have = layout.available_students(workdir, stage)
    if num_steps not in have or f"{stage}/N={num_steps}" not in links:
      raise ValueError(f"no {what} with num_steps={num_steps} in {str(workdir)!r}: "
                       f"available {have or 'none'} (pass --num_steps=one of them{train_it}).")
    link = links[f"{stage}/N={num_steps}"]
  else:
    link = links[kind]
  params = layout.read_final_params(config, workdir, link, mesh)
  return LoadedModel(kind, family.of_link(config, link.name), params, config,
                     num_steps if kind in ("student", ENCODER) else None, mesh)


def load_exported(folder, *, mesh=None) -> LoadedModel:
  """A student folder written by ``distill.export`` (``distill.json`` beside its parts), as the
  model it was exported from."""
  import json  # pylint: disable=import-outside-toplevel
  from distill.latent import family as latent_family  # pylint: disable=import-outside-toplevel
  folder = epath.Path(paths.resolve(folder))
  info_path = folder / "distill.json"
  if not info_path.exists():
    raise ValueError(f"--pretrained={folder}: no distill.json; pass a folder written by "
                     "python -m distill.export (or --workdir for a training run).")
  info = json.loads(info_path.read_text())
  mesh = mesh or sharding.make_mesh(1)
  if info.get("family") == "pixel":  # Flax parameters and the run's config
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    from distill import export  # pylint: disable=import-outside-toplevel
    config = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
    fam = family.of(config)
    params = export.unflatten(load_file(str(folder / export.PIXEL_FILE)))
  else:
    fam = latent_family.from_exported(str(folder), conditioning=info["conditioning"],
                                      num_classes=info["num_classes"],
                                      prompt_template=info["prompt_template"],
                                      class_names=tuple(info["class_names"]))
    config = ml_collections.ConfigDict({
        "stage_one": {"w_min": info["w_min"], "w_max": info["w_max"]},
        "stage_two": {"train_for_stochastic": info["train_for_stochastic"]},
        "data": {"num_classes": info["num_classes"]}})
    params = fam.models.unet_params
  params = sharding.shard_params(mesh, params)
  return LoadedModel(info["model"], fam, params, config, info["num_steps"], mesh)


def check_w(loaded: LoadedModel, w_values) -> None:
  if loaded.kind == "teacher":
    return
  lo, hi = loaded.config.stage_one.w_min, loaded.config.stage_one.w_max
  outside = [w for w in w_values if not lo <= w <= hi]
  if outside:
    logging.warning("w=%s is outside the trained range [%s, %s]: the student extrapolates.",
                    outside, lo, hi)


def evaluations(loaded: LoadedModel, sampler: str, num_steps: int) -> int:
  """Network evaluations per sample (the teacher's two branches count twice)."""
  return 2 * num_steps if loaded.kind == "teacher" else num_steps


def sampler_steps(loaded: LoadedModel, sampler: str, num_steps: int | None) -> int:
  """The sampler's step count: a student's own count (×2 for the stochastic sampler)."""
  if loaded.kind == "student" and sampler == "dpm_solver":
    raise ValueError("--sampler=dpm_solver solves the teacher's (or stage one's) ODE at any step "
                     "count; a stage-two student takes its own steps: use --sampler="
                     "deterministic or stochastic.")
  if loaded.kind == "student":
    n = loaded.num_steps
    if sampler == "stochastic":
      if not loaded.config.stage_two.train_for_stochastic:
        logging.warning("this student was trained without stage_two.train_for_stochastic: the "
                        "stochastic sampler asks it for jumps it has not learned.")
      return 2 * n
    return n
  if not num_steps or num_steps < 1:
    raise ValueError(f"--num_steps is required for model={loaded.kind} (its DDIM step count).")
  return int(num_steps)


STEPS_AS_ARGUMENT = ("deterministic", "stochastic")  # one compiled program for every N


@functools.lru_cache(maxsize=32)
def _compiled_sampler(fam, guided: bool, sampler: str, steps: int | None):
  """One jitted ``run(params, z1, cond, w, key, edit, num_steps)`` per (family, sampler, steps):
  every cell and batch of the same shape reuses its compilation. Returns the sampler's ``x``
  (not decoded). ``edit`` (``distill/editing.py``), None or a dict: ``x`` (the source,
  encoded), ``t_start`` and ``keep`` (the kept region, or None): the run starts from ``x`` noised
  to ``t_start`` with ``z1`` as the noise, and with ``keep`` it inpaints.

  The deterministic and stochastic samplers take their step count as an argument (``steps``
  None, ``num_steps`` an int32 scalar): one program serves every step count of a model (the
  teacher's DDIM cells of an evaluation, or the students of one chain). DPM-Solver++'s steps are
  part of its program (its first and last steps are first-order; ``num_steps`` is ignored).
  Called through ``sampler_program``."""
  make_fn = denoiser.guided_denoise_fn if guided else denoiser.denoise_fn

  @jax.jit
  def run(params, z1, cond, w, key, edit, num_steps):
    fn = make_fn(fam, params, cond, w)
    start = dict(logsnr_fn=fam.logsnr_fn)
    if edit is not None:
      start["t_start"] = edit["t_start"]
      if edit["keep"] is not None:
        start["known_fn"] = editing.known_region(edit["x"], edit["keep"], z1)
      z1 = editing.stochastic_encoding(edit["x"], z1, edit["t_start"], logsnr_fn=fam.logsnr_fn)
    if sampler == "deterministic":
      return diffusion.sample_deterministic(fn, z1, num_steps, **start)
    if sampler == "dpm_solver":
      return diffusion.sample_dpm_solver(fn, z1, steps, **start)
    return diffusion.sample_stochastic(fn, z1, num_steps, key, **start)

  return run


def sampler_program(fam, *, guided: bool, sampler: str, steps: int):
  """``(run, num_steps)``: the jitted sampler of ``steps`` steps (``_compiled_sampler``) and the
  step-count argument to call it with, ``run(params, z1, cond, w, key, edit, num_steps)``."""
  steps = diffusion.check_num_steps(steps)
  program = _compiled_sampler(fam, guided, sampler,
                              None if sampler in STEPS_AS_ARGUMENT else steps)
  return program, np.int32(steps)


@functools.lru_cache(maxsize=8)
def _compiled_encoder(fam, guided: bool, steps: int):
  """One jitted ``run(params, x, cond, w) -> z_1`` per (family, steps): DDIM encoding (paper
  §4.3) of the guided teacher, of stage one or of a distilled encoder."""
  make_fn = denoiser.guided_v_fn if guided else denoiser.v_fn

  @jax.jit
  def run(params, x, cond, w):
    return diffusion.encode_deterministic(make_fn(fam, params, cond, w), x, steps,
                                          logsnr_fn=fam.logsnr_fn)

  return run


def encoder_steps(encoder: LoadedModel, num_steps: int | None) -> int:
  """The encoder's step count: a distilled encoder's own count; the teacher and stage one encode
  with DDIM at ``num_steps``."""
  if encoder.kind == "student":
    raise ValueError("a stage-two student samples; it does not encode: load the distilled "
                     f"encoder (model={ENCODER!r}) of the same step count.")
  if encoder.kind == ENCODER:
    return encoder.num_steps
  if not num_steps or num_steps < 1:
    raise ValueError(f"--num_steps is required for model={encoder.kind} (its DDIM step count).")
  return int(num_steps)


def make_sampler(loaded: LoadedModel, sampler: str, steps: int):
  """``fn(z1, cond, w, key, edit=None) -> images`` for one batch: the jitted sampler, then the
  family's decoder (the identity for pixels, the first stage's decoder for latents)."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {list(SAMPLERS)}.")
  run, num_steps = sampler_program(loaded.family, guided=loaded.kind == "teacher",
                                   sampler=sampler, steps=steps)
  return lambda z1, cond, w, key, edit=None: loaded.family.decode(
      run(loaded.params, z1, cond, w, key, edit, num_steps))


def edit_start(loaded: LoadedModel, sampler: str, num_steps: int | None,
               strength: float) -> tuple[int, float]:
  """``(steps, t_start)`` of an edit at ``strength`` (``distill/editing.py``): a stage-two
  student starts at the nearest point of its grid and takes its own steps from there; the
  teacher and stage one start at ``t_start = strength`` and take ``num_steps``."""
  steps = sampler_steps(loaded, sampler, num_steps)
  if loaded.kind == "student":
    return editing.start_on_grid(strength, steps)
  return steps, editing.check_strength(strength)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _noise(base, indices, shape, sharding):
  """``z_1`` of examples ``indices``: example ``j`` gets ``normal(fold_in(base, j))``, drawn
  where ``sharding`` (the batch split over the mesh) places it."""
  z = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(base, j), shape))(indices)
  return jax.lax.with_sharding_constraint(z, sharding)


def generate(loaded: LoadedModel, **kwargs) -> np.ndarray:
  """Samples for per-example ``labels`` (or ``prompts``, for a text-conditioned latent teacher)
  and ``w`` (arrays of one length), in batches; decoded images in about [−1, 1]. The arguments
  are those of ``generate_rows``.

  On several processes each one calls it: each draws its devices' rows of every batch, and
  every process returns all the samples."""
  rows, parts = [], []
  for batch_rows, x in generate_rows(loaded, **kwargs):
    rows.append(batch_rows)
    parts.append(x)
  count = len(kwargs["prompts"] if kwargs.get("prompts") is not None else kwargs["labels"])
  return processes.gather_rows(np.concatenate(rows), np.concatenate(parts), count)


def generate_rows(loaded: LoadedModel, *, sampler: str, num_steps: int | None, labels=None, w,
                  seed: int, batch_size: int = 500, prompts=None, source=None, fill_mask=None,
                  strength: float = 1.0, source_labels=None, source_prompts=None,
                  encoder: LoadedModel | None = None):
  """Yields ``(rows, images)`` per batch: the samples this process's devices drew, and their
  example indices (``processes.PADDING`` for a batch's padding rows, drawn alongside).

  Example ``j`` starts from ``z_1 = normal(fold_in(key(seed), j))``, so a deterministic sample
  does not depend on the batch size or on which other samples are drawn (the stochastic
  sampler's re-noising draws one key per batch). Each batch is split over ``loaded.mesh``
  (padded to a multiple of its size), which may span several processes; the samples are those
  of one device, to float32 rounding.

  Editing (``distill/editing.py``): with a ``source`` image (``[H, W, C]`` of
  ``family.image_shape``, in [−1, 1], for every example, or ``[count, H, W, C]``, one each) the
  examples edit it. ``strength`` is the start time (image-to-image; ``edit_start``), and ``z_1``
  is the noise of its stochastic encoding. With a ``fill_mask`` (``[H, W]`` or ``[count, H, W]``,
  1 = fill) the rest of the source is kept (inpainting by replacement), and the returned images
  take the source's pixels there. A 9-channel inpainting U-Net (``family.inpainting``) is given
  the mask and the masked source as its condition instead (``distill/latent/inpainting.py``), and
  its samples are returned as decoded; without a mask it fills the whole image (it generates).

  Style transfer (paper §4.3): with ``source_labels`` (or ``source_prompts``), the condition of
  each source, the source is encoded by ``encoder`` under it (DDIM encoding, Eq. 2 from the data
  to ``t = 1``; by default ``loaded`` itself, for the teacher and stage one) and the code is
  decoded from ``t = 1`` under ``labels`` (or ``prompts``), both at each example's ``w``.
  """
  fam = loaded.family
  if fill_mask is not None and source is None:
    raise ValueError("a mask needs the source image it applies to (--init_image).")
  conds, count = _conditions(fam, labels, prompts)
  w = np.broadcast_to(np.asarray(w, np.float32), (count,))
  edit = encode = None
  if source_labels is not None or source_prompts is not None:
    if source is None or fill_mask is not None:
      raise ValueError("style transfer encodes a source image (--init_image) as a whole: pass "
                       "one, without --mask.")
    encoder = loaded if encoder is None else encoder
    source_conds, source_count = _conditions(encoder.family, source_labels, source_prompts)
    if source_count != count:
      raise ValueError(f"{source_count} source conditions for {count} examples: pass one per "
                       "example.")
    encode = (_compiled_encoder(encoder.family, encoder.kind == "teacher",
                                encoder_steps(encoder, num_steps)), source_conds)
  if source is None or encode is not None:
    steps = sampler_steps(loaded, sampler, num_steps)
  else:
    steps, t_start = edit_start(loaded, sampler, num_steps, strength)
    if fill_mask is not None:
      fill_mask = np.asarray(fill_mask, np.float32)
      fill_mask = np.broadcast_to(fill_mask, (count,) + tuple(fam.image_shape)[:2])
    # An inpainting U-Net at t0 = 1 starts from pure noise, as diffusers' pipeline does: the
    # source reaches it through the condition only.
    if not (fam.inpainting and t_start >= 1.0):
      edit = {"t_start": jnp.float32(t_start)}
  if source is not None:
    image = tuple(fam.image_shape)
    source = np.asarray(source, np.float32)
    source = np.broadcast_to(source, (count,) + image) if source.shape == image else source
    if source.shape != (count,) + image:
      raise ValueError(f"the source images have shape {source.shape}; the model's images are "
                       f"{image}: pass one, or one per example ({count}).")
  if fam.inpainting:  # the mask and the masked image are part of the condition
    conds = _inpainting_conds(fam, conds, source, fill_mask)
  if encode is not None and encoder.family.inpainting:
    encode = (encode[0], _inpainting_conds(encoder.family, encode[1], None, None))
  run = make_sampler(loaded, sampler, steps)
  shape = loaded.family.x_shape
  base = jax.random.key(seed)
  mesh = loaded.mesh or sharding.make_mesh(1)
  size = min(batch_size, count)
  size = -(-size // mesh.size) * mesh.size  # every batch the same shape: one compiled sampler
  for start in range(0, count, batch_size):
    idx = np.arange(start, min(start + batch_size, count))
    idx_p = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
    # Every process computes the whole batch's conditions (cheap) and its devices take their
    # rows; the noise is drawn in place.
    inputs = (_noise(base, idx_p, shape, sharding.batch_sharded(mesh)), conds(idx_p), w[idx_p])
    if encode is not None:  # z_1: each source encoded under its own condition
      encode_run, source_conds = encode
      enc_inputs = (fam.encode_images(source[idx_p]), source_conds(idx_p), inputs[2])
      inputs = (encode_run(encoder.params, *sharding.batch_from_host(mesh, enc_inputs)),
                ) + inputs[1:]
    if edit is not None:  # each example's source, encoded, and its kept region
      x_source = fam.encode_images(source[idx_p])
      keep = (None if fill_mask is None or fam.inpainting else
              editing.keep_at(fill_mask[idx_p], x_source.shape))
      inputs += ({"x": x_source, "keep": keep},)
    inputs = sharding.batch_from_host(mesh, inputs)
    if edit is not None:
      inputs = inputs[:3] + (dict(inputs[3], t_start=edit["t_start"]),)
    positions, x = processes.local_rows(
        run(*inputs[:3], jax.random.fold_in(base, 2**30 + start), *inputs[3:]))
    rows = np.where(positions < len(idx), idx_p[positions], processes.PADDING)
    if fill_mask is not None and not fam.inpainting:
      x = np.asarray(editing.composite(x, source[idx_p[positions]], fill_mask[idx_p[positions]]))
    yield rows, x


def _inpainting_conds(fam, conds, source, fill_mask):
  """``conds`` of an inpainting U-Net's family: each example's context with its mask and masked
  source (``family.inpainting_cond``); without a mask, the whole image is filled."""
  def fn(idx):
    if fill_mask is None:
      return fam.inpainting_cond(conds(idx))
    return fam.inpainting_cond(conds(idx), source[idx], fill_mask[idx])
  return fn


def _conditions(fam, labels, prompts):
  """``(conds(idx), count)`` of per-example ``labels`` or ``prompts``."""
  if prompts is not None:
    prompts = list(prompts)
    return (lambda idx: fam.cond_from_prompts([prompts[i] for i in idx])), len(prompts)
  labels = np.asarray(labels, np.int32)
  return (lambda idx: fam.cond_from_labels(labels[idx])), len(labels)


def main(argv=None):
  cli.run_cli(_main, argv)  # bad input: one line, no traceback


def _main(argv):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m distill.sample", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("--workdir", default="", help="a distill.main workdir")
  parser.add_argument("--pretrained", default="",
                      help="instead of --workdir: a student folder written by distill.export")
  parser.add_argument("--model", default="student", choices=MODELS)
  parser.add_argument("--num_steps", type=int, default=None,
                      help="student: which student; teacher/stage_one: the sampler's steps")
  parser.add_argument("--sampler", default="deterministic", choices=SAMPLERS)
  parser.add_argument("--w", default="0,1,4", help="guidance weights, one grid row each")
  parser.add_argument("--labels", default="", help="class labels (default 0..9 cycling)")
  parser.add_argument("--prompt", action="append", default=[],
                      help="a text prompt (text-conditioned latent teachers); repeat for several")
  parser.add_argument("--prompts_file", default="", help="a text file of prompts, one per line")
  parser.add_argument("--per_row", type=int, default=None,
                      help="samples per w (default 10, or the number of prompts, at least 4)")
  parser.add_argument("--init_image", default="",
                      help="edit this image (any size; resized): image-to-image from --strength, "
                      "or inpainting with --mask")
  parser.add_argument("--strength", type=float, default=None,
                      help="the edit's start time t0 in (0, 1]: near 0 close to the source, 1 a "
                      "new sample (default 0.75, or 1 with --mask); a student rounds it to its "
                      "grid k/N and takes k steps")
  parser.add_argument("--mask", default="",
                      help="an image: white where --init_image is to be filled, black where kept")
  parser.add_argument("--source_label", type=int, default=None,
                      help="style transfer (paper §4.3): --init_image's class; it is encoded under "
                      "this class and decoded under --labels (a student encodes with the distilled "
                      "encoder of its step count)")
  parser.add_argument("--source_prompt", default=None,
                      help="style transfer for a text-conditioned model: --init_image's caption, "
                      "decoded under --prompt")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="", help="output directory (default WORKDIR/samples)")
  parser.add_argument("--compilation_cache_dir", default=None,
                      help="JAX's persistent compilation cache (default: "
                      "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/distill/jax); '' turns it off")
  args = parser.parse_args(argv)
  compilation_cache.enable(compilation_cache.default_directory()
                           if args.compilation_cache_dir is None else args.compilation_cache_dir)
  if bool(args.workdir) == bool(args.pretrained):
    raise ValueError("pass --workdir=DIR (a training run) or --pretrained=FOLDER (an exported "
                     "student), one of them.")
  args.workdir, args.out = paths.resolve(args.workdir), paths.resolve(args.out)
  prompts = _prompts(args)
  if prompts and args.labels:
    raise ValueError("--labels and --prompt/--prompts_file exclude each other: pass one.")
  if args.per_row is not None and args.per_row < 1:
    raise ValueError(f"--per_row={args.per_row} must be >= 1.")

  # The image files before the model is read, so a typo costs nothing (a --mask without
  # --init_image is refused below, with the other editing arguments).
  for image in ((args.init_image, args.mask) if args.init_image else ()):
    if image:
      editing.check_image_file(image)

  w_values = [float(v) for v in args.w.split(",") if v.strip()]
  if args.pretrained:
    loaded = load_exported(args.pretrained)
    args.workdir, args.model = paths.resolve(args.pretrained), loaded.kind
    args.num_steps = args.num_steps if loaded.num_steps is None else loaded.num_steps
  else:
    loaded = load_model(args.workdir, args.model, num_steps=args.num_steps)
  if prompts and not hasattr(loaded.family, "cond_from_prompts"):
    raise ValueError(f"--prompt: the model in {args.workdir} is class-conditional "
                     f"({loaded.family.name} family); pass --labels instead.")
  check_w(loaded, w_values)
  extra = {}
  if prompts:
    per_row = args.per_row or max(len(prompts), 4)
    row = [prompts[i % len(prompts)] for i in range(per_row)]
    extra["prompts"] = row * len(w_values)
    loaded.family.cond_from_prompts(prompts[:1])  # a class-conditional model fails here
  else:
    per_row = args.per_row or 10
    classes = loaded.config.data.num_classes
    if not classes:
      raise ValueError(f"the model in {args.workdir} was trained on image–caption data: pass "
                       "--prompt=TEXT (or --prompts_file).")
    row_labels = ([int(v) for v in args.labels.split(",") if v.strip()] if args.labels
                  else list(range(per_row)))
    bad = [c for c in row_labels if not 0 <= c < classes] if args.labels else []
    if bad:
      raise ValueError(f"--labels {bad} are outside [0, {classes}): pass class indices.")
    row_labels = [row_labels[i % len(row_labels)] % classes for i in range(per_row)]
    extra["labels"] = np.tile(row_labels, len(w_values))
  w = np.repeat(w_values, per_row)
  edit, kind = _edit_inputs(args, loaded, len(w))
  if kind == "transfer":
    steps = sampler_steps(loaded, args.sampler, args.num_steps)
    logging.info("style transfer: encoded in %d steps, decoded in %d",
                 encoder_steps(edit.get("encoder", loaded), args.num_steps), steps)
  elif edit:
    steps, t_start = edit_start(loaded, args.sampler, args.num_steps, edit["strength"])
    logging.info("%s from t0 = %.4g (strength %s): %d steps", kind, t_start, edit["strength"],
                 steps)
  else:
    steps = sampler_steps(loaded, args.sampler, args.num_steps)
  x = generate(loaded, sampler=args.sampler, num_steps=args.num_steps, w=w, seed=args.seed,
               **extra, **edit)
  out = epath.Path(args.out or epath.Path(args.workdir) / "samples")
  name = f"{args.model}{loaded.num_steps or ''}_{args.sampler}_{steps}steps"
  tiles = x
  if edit:  # each row starts with the source (its filled region grey)
    name += (f"_{kind}{args.source_label if args.source_prompt is None else ''}"
             if kind == "transfer" else f"_{kind}{edit['strength']:g}")
    shown = edit["source"]
    if "fill_mask" in edit:
      shown = shown * (1.0 - edit["fill_mask"][..., None])  # 0: mid-grey in [−1, 1]
    rows = x.reshape((len(w_values), per_row) + x.shape[1:])
    tiles = np.concatenate([np.broadcast_to(shown, (len(w_values), 1) + shown.shape), rows],
                           axis=1).reshape((-1,) + x.shape[1:])
    extra.update(source=edit["source"], **({"mask": edit["fill_mask"]}
                                           if "fill_mask" in edit else {}),
                 **{k: edit[k] for k in ("source_labels", "source_prompts") if k in edit})
  name += f"_seed{args.seed}"
  images.save_png(images.grid(tiles, rows=len(w_values)), out / f"{name}.png", scale=4)
  out.mkdir(parents=True, exist_ok=True)
  with (out / f"{name}.npz").open("wb") as f:
    np.savez(f, images=x, w=w, **{k: np.asarray(v) for k, v in extra.items()})
  evals = evaluations(loaded, args.sampler, steps)
  if kind == "transfer":  # and the encoder's
    encoder = edit.get("encoder", loaded)
    evals += evaluations(encoder, "deterministic", encoder_steps(encoder, args.num_steps))
  print(f"wrote {out / name}.png and .npz ({len(x)} samples, {evals} network evaluations each)")


def _edit_inputs(args, loaded: LoadedModel, count: int) -> tuple[dict, str]:
  """``generate``'s editing arguments from ``--init_image``, ``--mask``, ``--strength`` and
  ``--source_label``/``--source_prompt`` (for ``count`` examples), and the edit's name
  (``img2img``, ``inpaint`` or ``transfer``); nothing without ``--init_image``."""
  transfer = args.source_label is not None or args.source_prompt is not None
  if not args.init_image:
    if args.mask or args.strength is not None or transfer:
      raise ValueError("--mask, --strength and --source_label/--source_prompt edit an image: "
                       "pass --init_image=PATH as well.")
    return {}, ""
  h, w, c = loaded.family.image_shape
  edit = {"source": editing.read_image(args.init_image, size=(h, w), channels=c)}
  if transfer:
    if args.mask or args.strength is not None:
      raise ValueError("style transfer encodes the whole image to t = 1: drop --mask and "
                       "--strength.")
    if args.source_prompt is not None:
      edit["source_prompts"] = [args.source_prompt] * count
    else:
      classes = loaded.config.data.num_classes
      if not classes or not 0 <= args.source_label < classes:
        raise ValueError(f"--source_label={args.source_label} is not a class of this model "
                         f"(classes: {classes or 'none, it takes --source_prompt'}).")
      edit["source_labels"] = np.full((count,), args.source_label, np.int32)
    if loaded.kind == "student":
      if args.pretrained:
        raise ValueError("--pretrained: an exported student has no distilled encoder; pass the "
                         "training run's --workdir for style transfer.")
      edit["encoder"] = load_model(args.workdir, ENCODER, num_steps=loaded.num_steps,
                                   mesh=loaded.mesh)
    return edit, "transfer"
  if args.mask:
    edit["fill_mask"] = editing.read_mask(args.mask, size=(h, w))
  edit["strength"] = (args.strength if args.strength is not None
                      else 1.0 if args.mask else 0.75)
  editing.check_strength(edit["strength"])  # before anything compiles
  return edit, "inpaint" if args.mask else "img2img"


def _prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    path = epath.Path(paths.resolve(args.prompts_file))
    if not path.is_file():
      raise ValueError(f"--prompts_file={args.prompts_file}: no such file (one prompt per line).")
    prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
      raise ValueError(f"--prompts_file={args.prompts_file} holds no prompt (one per line).")
  return prompts


if __name__ == "__main__":
  main()
