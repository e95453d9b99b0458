"""Image-to-image and inpainting with the students of a finished workdir, measured.

    python bench/editing.py --workdir=runs/emoji --strength=0.75 --w=2 --students=4,2 \\
        --teacher_steps=64

The sources are the held-out images (up to ``eval.num_samples``), each with its caption or class.

- **Image-to-image** (SDEdit, ``distill/editing.py``): source ``j`` is edited toward the condition
  of source ``j + 1`` (another caption; for classes, the next class), from the strength's point
  on each student's grid. The teacher starts from the same ``t0`` with guided DDIM at
  ``--teacher_steps`` steps (two evaluations each). Measured: FID against the training images
  (the report's features), the CLIP score to the target caption with the evaluator CLIP (for
  classes: the share classified as the target), and the RMS distance to the source in [−1, 1].
  The unedited sources are the first row.
- **Inpainting**: the centre square (``--mask_fraction`` of the side) is filled for the source's
  own condition from ``t0 = 1``: by replacement, or, for a 9-channel inpainting U-Net
  (``configs/emoji.py:inpaint``), through its condition (mask and masked image). Measured: FID,
  the CLIP score to the own caption (or the share classified as the own class), the largest
  change and the RMS change in the kept region (by replacement 0: the source's pixels are kept),
  and the RMS distance to the source in the filled square. For a latent model, two references
  for the inpainting U-Net's RMS in the kept region: the autoencoder's reconstruction of the
  sources (decode(encode(source))), and, per method, each sample decoded with the source's own
  latents wherever the latent mask keeps them (the sample's filled latents, re-encoded, in the
  hole): the error the autoencoder leaves even when the kept latents are exact, including what
  its decoder carries across the hole's edge. For a 9-channel inpainting U-Net, a third: the
  same with the latents of the masked image, the network's own input, in the kept cells (what a
  network that copied its input there would give).

Every method of a task starts from the same noise per example; ``editing.json`` also has each
method's seconds. Writes ``editing.json``,
``editing.md`` and ``editing.png`` (rows: source, image-to-image by the first student and by the
teacher, the masked source, inpainting by the first student and by the teacher) to ``--out``
(default ``WORKDIR/report/editing``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import editing, images, input_pipeline, layout, paths, sample  # noqa: E402  pylint: disable=wrong-import-position
from distill.evaluation import evaluate, features  # noqa: E402  pylint: disable=wrong-import-position
from distill.latent import clip_loader, inpainting  # noqa: E402  pylint: disable=wrong-import-position


def _centre_mask(shape, fraction: float) -> np.ndarray:
  h, w = shape
  mh, mw = max(1, round(h * fraction)), max(1, round(w * fraction))
  mask = np.zeros((h, w), np.float32)
  mask[(h - mh) // 2:(h - mh) // 2 + mh, (w - mw) // 2:(w - mw) // 2 + mw] = 1.0
  return mask


def _batched(fn, x, size: int = 100) -> np.ndarray:
  """``fn`` (a family's ``encode_images`` or ``decode``) over ``x`` in batches of ``size``."""
  return np.concatenate([np.asarray(fn(x[i:i + size])) for i in range(0, len(x), size)])


def exact_kept_latents(fam, x, z_src, mask):
  """Latents of the samples ``x`` (a latent family's decoded images) with the source's latents
  ``z_src`` wherever the latent mask of ``mask`` (``[H, W]``, 1 = fill) keeps them, and ``x``'s
  own, re-encoded, in the hole."""
  hole = np.asarray(inpainting.latent_mask(mask[None], fam.x_shape[0]))  # [1, h, w, 1]
  return np.where(hole > 0, _batched(fam.encode_images, x), z_src)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--strength", type=float, default=0.75,
                      help="image-to-image's start time (a 4-step student: 3 steps from 3/4)")
  parser.add_argument("--w", type=float, default=2.0, help="the guidance weight")
  parser.add_argument("--students", default="4,2", help="the students' step counts")
  parser.add_argument("--teacher_steps", type=int, default=64)
  parser.add_argument("--num_sources", type=int, default=None,
                      help="held-out sources (default eval.num_samples)")
  parser.add_argument("--mask_fraction", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  workdir = paths.resolve(args.workdir)
  config = paths.resolve_config(layout.workdir_config(workdir))
  w = float(args.w)
  out = pathlib.Path(paths.resolve(args.out) if args.out else
                     pathlib.Path(workdir) / "report" / "editing")
  out.mkdir(parents=True, exist_ok=True)

  extract, info = features.make_extractor(config, workdir)
  ref = features.real_reference(config, extract, pathlib.Path(workdir) / "report")
  captioned = input_pipeline.captioned(config.data)
  clip = clip_loader.load(config.eval.clip_model) if captioned else None
  teacher = sample.load_model(workdir, "teacher", config=config)
  fam = teacher.family
  x_src, conds = common.held_out_sources(config,
                                         args.num_sources or int(config.eval.num_samples))
  if x_src.shape[1:] != tuple(fam.image_shape):
    raise SystemExit(f"held-out images {x_src.shape[1:]} are not the model's "
                     f"{tuple(fam.image_shape)}.")
  n = len(x_src)
  targets = ([conds[(j + 1) % n] for j in range(n)] if captioned
             else (conds + 1) % config.data.num_classes)
  mask = _centre_mask(x_src.shape[1:3], args.mask_fraction)

  def scores(x, cond):
    """The eval stage's metrics of a cell (``evaluate.cell_metrics``), toward ``cond``."""
    m = evaluate.cell_metrics(extract, x, None if captioned else cond, ref,
                              pr_samples=int(config.eval.pr_samples),
                              class_accuracy=not captioned, clip=clip,
                              prompts=cond if captioned else None)
    if captioned:
      return {"fid": m["fid"], "clip_score": m["clip_score"]}
    return {"fid": m["fid"], "class_share": m["class_accuracy"]}

  def run(loaded, steps, cond, **edit):
    key = "prompts" if captioned else "labels"
    t0 = time.time()
    x = sample.generate(loaded, sampler="deterministic", num_steps=steps, w=np.full(n, w),
                        seed=args.seed, batch_size=int(config.eval.batch_size),
                        **{key: cond}, **edit)
    return x, time.time() - t0

  students = [int(s) for s in args.students.split(",") if s.strip()]
  if not students:
    raise SystemExit("--students: name at least one student's step count.")
  models = [(f"student {k}", sample.load_model(workdir, "student", num_steps=k, config=config))
            for k in students]
  results = {"img2img": [], "inpaint": []}
  mechanism = ("the inpainting U-Net's condition" if fam.inpainting
               else "replacement")
  if fam.name == "latent":  # the first stage's own error in the kept region
    z_src = _batched(fam.encode_images, x_src)
    results["autoencoder_rms_kept"] = float(np.sqrt(np.mean((_batched(fam.decode, z_src) - x_src)
                                                            [:, mask == 0] ** 2)))

    def exact_kept_latents_rms(x, z_kept=z_src):
      """The kept region's RMS of the sample decoded from ``exact_kept_latents``: the
      autoencoder's error for this sample, with what its decoder carries across the hole's
      edge (``z_kept``: the source's latents, or the masked image's)."""
      return float(np.sqrt(np.mean((_batched(fam.decode, exact_kept_latents(fam, x, z_kept, mask))
                                    - x_src)[:, mask == 0] ** 2)))
    if fam.inpainting:  # the network's input: the masked image's latents
      z_masked = _batched(lambda xs: fam.encode_images(
          xs, fill_mask=np.broadcast_to(mask, (len(xs),) + mask.shape)), x_src)
  shown = {}
  # The teacher starts where the first student does (its grid point nearest the strength).
  _, t_start = editing.start_on_grid(args.strength, students[0])
  results["img2img"].append(dict(method="source (unedited)", steps=0, t_start=None,
                                 rms_to_source=0.0, seconds=0.0, **scores(x_src, targets)))
  kept = mask == 0

  def img2img(name, loaded, steps, strength):
    k, t0 = sample.edit_start(loaded, "deterministic", steps, strength)
    x, seconds = run(loaded, steps, targets, source=x_src, strength=strength)
    results["img2img"].append(dict(
        method=name, steps=k, t_start=t0, rms_to_source=float(np.sqrt(np.mean((x - x_src) ** 2))),
        seconds=round(seconds, 1), **scores(x, targets)))
    return x, k, t0

  def inpaint(name, loaded, steps):
    x, seconds = run(loaded, steps, conds, source=x_src, fill_mask=mask)
    results["inpaint"].append(dict(
        method=name, steps=sample.sampler_steps(loaded, "deterministic", steps),
        kept_max_change=float(np.abs(x - x_src)[:, kept].max()),
        rms_kept=float(np.sqrt(np.mean((x - x_src)[:, kept] ** 2))),
        rms_filled=float(np.sqrt(np.mean((x - x_src)[:, ~kept] ** 2))),
        **({"rms_kept_exact_latents": exact_kept_latents_rms(x)} if fam.name == "latent"
           else {}),
        **({"rms_kept_input_latents": exact_kept_latents_rms(x, z_masked)} if fam.inpainting
           else {}),
        seconds=round(seconds, 1), **scores(x, conds)))
    return x

  # Each student next to the teacher's guided DDIM at the same step count from the same t0: the
  # sampler a user has without distillation, at twice the network evaluations.
  for name, student in models:
    x, k, t0 = img2img(name, student, None, args.strength)
    img2img(f"DDIM 2x{k}", teacher, k, t0)
    shown.setdefault("img2img", []).append(x[:8])
    shown.setdefault("inpaint", []).append(inpaint(name, student, None)[:8])
    inpaint(f"DDIM 2x{student.num_steps}", teacher, student.num_steps)
    print(f"{name}: done", flush=True)
  name = f"teacher 2x{args.teacher_steps}"
  shown["img2img"].append(img2img(name, teacher, args.teacher_steps, t_start)[0][:8])
  shown["inpaint"].append(inpaint(name, teacher, args.teacher_steps)[:8])

  score = "clip_score" if captioned else "class_share"
  score_name = ("CLIP score" if captioned else "share classified as")
  lines = [f"Editing on {config.data.name}, w = {w:g}, {n} held-out sources, "
           f"features: {info['features']}", "",
           f"Image-to-image toward the next source's {'caption' if captioned else 'class'}, "
           f"strength {args.strength:g}:", "",
           f"| method | steps | t0 | FID | {score_name} target | RMS to source |",
           "|---|---|---|---|---|---|"]
  for r in results["img2img"]:
    t0 = "" if r["t_start"] is None else f"{r['t_start']:.3g}"
    lines.append(f"| {r['method']} | {r['steps']} | {t0} | {r['fid']:.2f} | {r[score]:.3f} | "
                 f"{r['rms_to_source']:.3f} |")
  lines += ["", f"Inpainting of the centre {args.mask_fraction:g} x {args.mask_fraction:g} "
            f"square for the source's own condition, by {mechanism}:", "",
            f"| method | steps | FID | {score_name} own | largest change kept | RMS kept | "
            + ("RMS kept, exact kept latents | " if fam.name == "latent" else "")
            + ("RMS kept, input's latents kept | " if fam.inpainting else "")
            + "RMS filled to source |",
            "|---|---|---|---|---|---|---|" + ("---|" if fam.name == "latent" else "")
            + ("---|" if fam.inpainting else "")]
  for r in results["inpaint"]:
    exact = "".join(f"{r[k]:.3f} | " for k in ("rms_kept_exact_latents", "rms_kept_input_latents")
                    if k in r)
    lines.append(f"| {r['method']} | {r['steps']} | {r['fid']:.2f} | {r[score]:.3f} | "
                 f"{r['kept_max_change']:.2g} | {r['rms_kept']:.3f} | {exact}"
                 f"{r['rms_filled']:.3f} |")
  if "autoencoder_rms_kept" in results:
    lines += ["", "The autoencoder's reconstruction of the sources: RMS "
              f"{results['autoencoder_rms_kept']:.3f} in the kept region. \"RMS kept, exact kept "
              "latents\": each sample decoded with the source's latents wherever the mask keeps "
              "them (its own filled latents, re-encoded, in the hole): the autoencoder's error "
              "for that sample."
              + (" \"Input's latents kept\": the same with the masked image's latents, the "
                 "network's input, in those cells." if fam.inpainting else "")]
  table = "\n".join(lines) + "\n"
  (out / "editing.md").write_text(table)
  (out / "editing.json").write_text(json.dumps(dict(
      results, w=w, strength=args.strength, num_sources=n, teacher_steps=args.teacher_steps,
      mask_fraction=args.mask_fraction, features=info["features"], mechanism=mechanism),
      indent=1) + "\n")
  masked = x_src[:8] * (1.0 - mask[None, ..., None])
  rows = [x_src[:8], shown["img2img"][0], shown["img2img"][-1], masked, shown["inpaint"][0],
          shown["inpaint"][-1]]
  images.save_png(images.grid(np.concatenate(rows), rows=len(rows)), out / "editing.png",
                  scale=4)
  print(table)
  print(f"wrote {out}/editing.md, editing.json, editing.png (rows: source, image-to-image by "
        f"{models[0][0] if models else 'teacher'} and the teacher, masked source, inpainting by "
        "the same two)")
  return results


if __name__ == "__main__":
  main()
