"""ε→v fine-tuning alone (paper §4.2): the chain's ``teacher_v`` link, then its teacher exported.

    python -m distill.latent.finetune --config=configs/ldm_cin256.py \
        --config.teacher.pretrained=path/to/ldm-cin256 --workdir=runs/cin256

The paper distils v-prediction teachers; the public SD and LDM teachers predict ε, so the latent
chain fine-tunes them first (its ``teacher_v`` link: the teacher's objective with condition
dropout, ``teacher_v.weighting``). This command is ``distill.main`` with
``--config.stages=teacher,teacher_v`` (the same checkpoints, resume and manifest), followed by
an export: ``workdir/teacher_v/diffusers/`` is the imported folder with the fine-tuned U-Net
(same keys and layout as the source file, float32) and ``prediction_type = "v_prediction"`` in
its scheduler, so diffusers and ``load_pretrained`` read it as a v-teacher. ``distill.main``
with the same config and workdir then goes on with stage one.
"""

from __future__ import annotations

import json
import logging
import shutil

import jax
import numpy as np
from etils import epath

from distill import cli, family, layout, paths, pipeline
from distill.latent import export as export_lib
from distill.latent import pretrained as pretrained_lib
from distill.latent import weights

LINK = "teacher_v"
EXPORT = "diffusers"


def export(models: pretrained_lib.LatentModels, unet_params, out: epath.Path) -> epath.Path:
  """Writes the fine-tuned teacher folder: the source folder with the new U-Net and
  ``prediction_type = "v_prediction"``; assembled beside ``out`` and renamed into place."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  src = epath.Path(models.path)

  def fill(staging):
    shutil.copytree(str(src), str(staging), ignore=shutil.ignore_patterns("unet"),
                    dirs_exist_ok=True)
    (staging / "unet").mkdir()
    shutil.copy2(str(src / "unet" / "config.json"), str(staging / "unet" / "config.json"))
    source_files = weights.safetensors_files(src / "unet")
    tensors = weights.export_like(jax.device_get(unet_params), source_files, what="unet")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(staging / "unet" / export_lib.DIFFUSERS_FILE))
    sched_path = staging / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text())
    sched["prediction_type"] = "v_prediction"
    sched_path.write_text(json.dumps(sched, indent=2))
  return export_lib.write_atomically(out, fill)


def run(config, workdir) -> epath.Path:
  """Trains the chain through ``teacher_v`` (finished links are skipped) and writes
  ``workdir/teacher_v/diffusers``; returns that folder."""
  if config.get("family") != "latent" or not layout.has_teacher_v(config):
    raise ValueError("--config must be a latent config with a teacher_v section "
                     "(teacher_v.num_train_steps > 0), e.g. configs/ldm_cin256.py or "
                     "configs/sd15.py.")
  config = config.copy_and_resolve_references()
  config.stages = "teacher,teacher_v"
  pipeline.run(config, workdir)
  workdir = epath.Path(paths.resolve(workdir))
  config = paths.resolve_config(config)
  link = next(link for link in layout.chain(config) if link.name == LINK)
  out = link.directory(workdir) / EXPORT
  if jax.process_index() == 0:
    params = layout.read_final_params(config, workdir, link, pipeline.make_mesh(config))
    export(family.of(config).models, params, out)
    logging.info("%s: v-prediction teacher written to %s", LINK, out)
  return out


def main() -> None:
  """``python -m distill.latent.finetune --config=… --workdir=…``."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config = config_flags.DEFINE_config_file("config", None,
                                           "a latent config, e.g. configs/ldm_cin256.py")
  workdir = flags.DEFINE_string("workdir", None, "Where the chain's links and the export go.")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_cli(run, config.value, workdir.value)
  app.run(_main)


if __name__ == "__main__":
  main()
