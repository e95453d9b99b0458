"""A distilled student as a folder other code loads:
``python -m distill.export --workdir=DIR --model=student --num_steps=N --out=FOLDER``.

A pixel student's folder holds its Flax parameters (``student.safetensors``), the run's config
(``config.json``) and ``distill.json``. A latent student's is a diffusers folder: the teacher's
(``teacher.pretrained``: its first stage, text encoder and tokenizer or class embedder, copied)
with

- ``unet/``: the student, a ``UNet2DConditionModel`` with ``time_cond_proj_dim`` (the
  w-embedding's width), float32, under diffusers' keys;
- ``scheduler/scheduler_config.json``: a ``DDIMScheduler`` of the teacher's schedule with
  ``prediction_type: v_prediction``, ``timestep_spacing: trailing`` (N steps land on the
  student's grid ``t = k/N``: timesteps ``1000·k/N − 1``; ``steps_offset`` does not apply to
  this spacing) and ``set_alpha_to_one: true`` (the last step returns the x-prediction, as our
  sampler does);
- ``distill.json``: the step count, the w range, the embedding's formula and the timesteps.

``python -m distill.sample --pretrained=FOLDER`` samples either as from the workdir. diffusers'
``StableDiffusionPipeline`` samples a latent student's folder as it is: for a U-Net with
``time_cond_proj_dim`` it embeds ``w = guidance_scale − 1`` with ``get_guidance_scale_embedding``
(our ``guidance_embedding``) and evaluates the U-Net once per step, so
``pipe(prompt, num_inference_steps=N, guidance_scale=1 + w)`` draws the student's samples
(docs/latent.md, "Export to diffusers").
"""

from __future__ import annotations

import json
import logging
import shutil

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from distill import cli, paths, sample
from distill.latent import export as export_lib

INFO = "distill.json"


def student_info(loaded: sample.LoadedModel) -> dict:
  """``distill.json``: what a user of the folder needs to sample the student as trained."""
  fam, cfg = loaded.family, loaded.config
  n = loaded.num_steps
  grid = None if n is None else [k / n for k in range(n, 0, -1)]
  if fam.name != "latent":
    return {"family": fam.name, "model": loaded.kind, "num_steps": n,
            "w_min": float(cfg.stage_one.w_min), "w_max": float(cfg.stage_one.w_max),
            "guidance": "x = (1 + w) x_cond - w x_uncond", "t_grid": grid,
            "train_for_stochastic": bool(cfg.stage_two.train_for_stochastic)}
  return {
      "family": fam.name,
      "model": loaded.kind,
      "num_steps": n,
      "w_min": float(cfg.stage_one.w_min), "w_max": float(cfg.stage_one.w_max),
      "guidance": "x = (1 + w) x_cond - w x_uncond; diffusers' guidance_scale = w + 1",
      "w_embedding": {
          "timestep_cond": "get_guidance_scale_embedding(w, embedding_dim=time_cond_proj_dim)",
          "formula": "[sin, cos] of 1000 w at frequencies exp(-ln(1e4) k / (dim/2 - 1))",
          "dim": int(fam.w_dim)},
      "prediction_type": "v_prediction",
      "t_grid": grid,
      "timesteps": None if grid is None else [
          float(np.asarray(fam.schedule.timestep(t))) for t in grid],
      "conditioning": fam.conditioning,
      "num_classes": int(cfg.data.num_classes),
      "prompt_template": str(cfg.latent.prompt_template),
      "class_names": [str(n) for n in (cfg.latent.get("class_names") or ())],
      "train_for_stochastic": bool(cfg.stage_two.train_for_stochastic),
  }


PIXEL_FILE = "student.safetensors"


def unflatten(tensors: dict) -> dict:
  """``{"a/b/c": x}`` → ``{"a": {"b": {"c": x}}}``: the Flax tree of ``PIXEL_FILE``."""
  return traverse_util.unflatten_dict(tensors, sep="/")


def export_pixel_student(loaded: sample.LoadedModel, out) -> epath.Path:
  """A pixel student: ``student.safetensors`` (its Flax parameters, keys joined by ``/``),
  ``config.json`` (the run's config, which builds the network) and ``distill.json``."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  def fill(staging):
    tensors = {k: np.ascontiguousarray(np.asarray(v))
               for k, v in traverse_util.flatten_dict(jax.device_get(loaded.params),
                                                      sep="/").items()}
    save_file(tensors, str(staging / PIXEL_FILE))
    (staging / "config.json").write_text(loaded.config.to_json_best_effort(indent=2) + "\n")
    (staging / INFO).write_text(json.dumps(student_info(loaded), indent=2) + "\n")

  return export_lib.write_atomically(out, fill)


def export_student(loaded: sample.LoadedModel, out) -> epath.Path:
  """Writes the folder (assembled beside ``out`` and renamed into place); a pixel student's
  goes to ``export_pixel_student``."""
  fam = loaded.family
  if getattr(fam, "name", "") != "latent":
    return export_pixel_student(loaded, out)
  src = epath.Path(fam.models.path)

  def fill(staging):
    shutil.copytree(str(src), str(staging), ignore=shutil.ignore_patterns("unet"),
                    dirs_exist_ok=True)
    export_lib.write_model(staging / "unet", export_lib.unet_config(fam.student.config),
                           jax.device_get(loaded.params))
    sched_path = staging / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text()) if sched_path.exists() else {}
    sched.update({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                  "timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 1,
                  "clip_sample": False, "num_train_timesteps": fam.schedule.num_timesteps})
    sched_path.parent.mkdir(parents=True, exist_ok=True)
    sched_path.write_text(json.dumps(sched, indent=2))
    index = staging / "model_index.json"
    if index.exists():
      data = json.loads(index.read_text())
      if "scheduler" in data:
        data["scheduler"] = ["diffusers", "DDIMScheduler"]
        index.write_text(json.dumps(data, indent=2))
    (staging / INFO).write_text(json.dumps(student_info(loaded), indent=2) + "\n")

  return export_lib.write_atomically(out, fill)


def main(argv=None):
  cli.run_cli(_main, argv)


def _main(argv):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m distill.export",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a distill.main workdir")
  parser.add_argument("--model", default="student", choices=("student", "stage_one"))
  parser.add_argument("--num_steps", type=int, default=None, help="which student")
  parser.add_argument("--out", required=True, help="the folder to write")
  args = parser.parse_args(argv)
  out = epath.Path(paths.resolve(args.out))
  loaded = sample.load_model(paths.resolve(args.workdir), args.model, num_steps=args.num_steps)
  export_student(loaded, out)
  logging.info("wrote %s", out)
  print(f"wrote {out} ({args.model}{'' if loaded.num_steps is None else loaded.num_steps}; "
        f"diffusers: StableDiffusionPipeline.from_pretrained, guidance_scale = 1 + w)")


if __name__ == "__main__":
  main()
