"""The ``eval`` stage: every (method, steps, w, seed) cell of a Table-1-style comparison.

Methods (paper Table 1, Fig. 2 and 6):

* ``teacher``: the guided teacher with DDIM at ``eval.teacher_steps`` steps (two network
  evaluations per step, batched) — the reference;
* ``ddim``: the same teacher with DDIM at each of ``eval.ddim_steps`` — the baseline at a
  budget of ``2·steps`` evaluations;
* ``dpm_solver``: the same teacher with DPM-Solver++ (2M) at each of ``eval.dpm_solver_steps``
  (``2·steps`` evaluations) — the few-step solver a user would pick instead (paper Table 2);
* ``student``: the stage-two student with N steps, ``N`` in ``eval.student_steps`` (those that
  were trained), deterministic sampler (N evaluations);
* ``student_stochastic``: the same student with the stochastic sampler (2N evaluations).

Every cell draws ``eval.num_samples`` samples per seed, class-balanced (or, for caption data,
of the prompts of ``eval.captions_file`` or else of the held-out captions, in turn), and writes
its metrics to ``report/cells/<cell>.json`` (atomically): a rerun computes only the missing
cells. Metrics: FID against the training split's features, Inception Score (or its digits
analogue; not with CLIP features), class accuracy (the share classified as the conditioning
label; digits only), improved precision and recall, and for caption data the CLIP score of
each sample with its prompt (``evaluation/clip_score.py``). The real-vs-real floor is the
held-out split's FID against the training split. Latent families' samples are decoded first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import numpy as np
from etils import epath

from distill import (files, images, input_pipeline, layout, paths, processes, progress, sample,
                     sharding)
from distill.evaluation import clip_score, features, metrics, report
from distill.latent import clip_loader

METHODS = ("teacher", "ddim", "dpm_solver", "student", "student_stochastic")
GRID_SAMPLES = 100  # the first seed's grid per cell: 10 × 10


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str
  steps: int  # the model's/sampler's step count (a student: its trained N)
  w: float
  seed: int

  @property
  def nfe(self) -> int:
    """Network evaluations per sample."""
    return {"teacher": 2, "ddim": 2, "dpm_solver": 2, "student": 1,
            "student_stochastic": 2}[self.method] * self.steps

  @property
  def key(self) -> str:
    return f"{self.method}_steps{self.steps}_w{self.w:g}_seed{self.seed}"


def plan(config, workdir=None, *, trained=None) -> list[Cell]:
  """The cells of ``config.eval`` for the students in ``workdir`` (or with ``trained`` steps)."""
  cfg = config.eval
  trained = set(layout.available_students(workdir) if trained is None else trained)
  rows = [("teacher", int(cfg.teacher_steps))]
  rows += [("ddim", int(s)) for s in cfg.ddim_steps]
  rows += [("dpm_solver", int(s)) for s in cfg.dpm_solver_steps]
  for n in cfg.student_steps:
    if int(n) not in trained:
      if workdir is not None:
        logging.warning("eval: no stage-two student with %d steps in %s; skipped.", n, workdir)
      continue
    rows.append(("student", int(n)))
    if "stochastic" in cfg.samplers:
      rows.append(("student_stochastic", int(n)))
  return [Cell(m, s, float(w), int(seed)) for m, s in rows for w in cfg.w_values
          for seed in cfg.seeds]


def eval_prompts(config) -> list[str]:
  """The prompts of caption data's cells: ``eval.captions_file`` (one per line), else the
  held-out split's captions; repeated in turn up to ``eval.num_samples``."""
  e = config.eval
  if e.get("captions_file"):
    path = epath.Path(e.captions_file)
    captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    where = f"eval.captions_file={e.captions_file}"
  else:
    source = input_pipeline.source(config.data, "held_out")
    captions = [source[i]["caption"] for i in range(min(len(source), int(e.num_samples)))]
    where = f"the held-out split of data.name={config.data.name!r}"
  if not captions:
    raise ValueError(f"{where} holds no caption: the eval stage needs prompts.")
  return [captions[i % len(captions)] for i in range(int(e.num_samples))]


def _cell_samples(loaded, cell: Cell, config, extract, *, prompts=None, clip=None,
                  keep_images: int = 0) -> dict:
  """Draws one cell's samples and returns their per-sample arrays, in example order, on every
  process: ``features``, ``probs`` (or None), ``clip_image`` (CLIP image embeddings, with
  ``clip``), the first ``keep_images`` ``images``, the ``labels`` and the count of samples this
  process ``drawn``. Each process draws and measures its devices' rows of every batch
  (``sample.generate_rows``); the rows are then gathered."""
  n = int(config.eval.num_samples)
  labels = None if prompts is not None else np.arange(n) % config.data.num_classes
  sampler = {"student_stochastic": "stochastic",
             "dpm_solver": "dpm_solver"}.get(cell.method, "deterministic")
  num_steps = None if cell.method.startswith("student") else cell.steps
  rows, parts, head_rows, head = [], [], [], []
  drawn = 0  # this process's samples
  batch_size = int(config.eval.batch_size)
  for i, (batch_rows, x) in enumerate(sample.generate_rows(
      loaded, sampler=sampler, num_steps=num_steps, labels=labels, prompts=prompts,
      w=np.full(n, cell.w), seed=cell.seed, batch_size=batch_size)):
    # Gathered batch by batch: a cell's features never sit on a device at once.
    arrays = {k: v for k, v in sample_arrays(extract, x, clip=clip).items() if v is not None}
    drawn += int(np.sum(batch_rows != processes.PADDING))
    got_rows, got = processes.gather(batch_rows, arrays)
    rows.append(got_rows)
    parts.append(got)
    if i * batch_size < keep_images:  # a collective: every process decides alike
      first = (batch_rows != processes.PADDING) & (batch_rows < keep_images)
      got_rows, got = processes.gather(batch_rows[first], x[first])
      head_rows.append(got_rows)
      head.append(got)
  out = dict.fromkeys(("features", "probs", "clip_image"))
  out.update(processes.place_rows(
      np.concatenate(rows), {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, n))
  out.update(labels=labels, drawn=drawn)
  if keep_images:
    out["images"] = processes.place_rows(np.concatenate(head_rows), np.concatenate(head),
                                         min(keep_images, n))
  return out


def sample_arrays(extract, x, *, clip=None) -> dict:
  """The per-sample arrays of images ``x`` that the metrics need: ``features`` and ``probs``
  of ``extract``, and with ``clip`` the CLIP image embeddings (``clip_image``)."""
  feats, probs = [], []
  for i in range(0, len(x), 1000):
    f, p = extract(x[i:i + 1000])
    feats.append(f)
    probs.append(p)
  return {"features": np.concatenate(feats),
          "probs": None if probs[0] is None else np.concatenate(probs),
          "clip_image": (None if clip is None else
                         clip_score.image_embeddings(clip, x))}


def metrics_of(arrays: dict, labels, reference: metrics.Reference, *, pr_samples: int,
               class_accuracy: bool = True, text_embeddings=None) -> dict:
  """The metrics of one cell from its per-sample ``arrays`` (``sample_arrays``) against the
  real data's ``reference`` (``features.real_reference``); ``text_embeddings`` of the samples'
  prompts add the CLIP score."""
  feats, probs = arrays["features"], arrays["probs"]
  stats = metrics.FeatureStats(feats.shape[1])
  stats.update(feats)
  is_mean = (None if probs is None else
             metrics.inception_score(probs, num_splits=min(10, len(probs)))[0])
  precision, recall = metrics.precision_recall_to(reference, feats[:pr_samples])
  accuracy = (float(np.mean(np.argmax(probs, axis=1) == labels))
              if class_accuracy and probs is not None else None)
  score = (float(np.mean(clip_score.score_from_embeddings(arrays["clip_image"], text_embeddings)))
           if arrays.get("clip_image") is not None and text_embeddings is not None else None)
  return {"fid": metrics.frechet_distance_to(reference, stats.mean, stats.cov, features=feats),
          "is": is_mean, "class_accuracy": accuracy, "clip_score": score,
          "precision": precision, "recall": recall, "num_samples": int(len(feats))}


def cell_metrics(extract, x, labels, reference: metrics.Reference, *, pr_samples: int,
                 class_accuracy: bool = True, clip=None, prompts=None) -> dict:
  """The metrics of one cell's samples ``x`` against ``reference``; ``clip`` and ``prompts``
  add the CLIP score."""
  with_score = clip is not None and prompts is not None
  text = clip_score.text_embeddings(clip, prompts) if with_score else None
  return metrics_of(sample_arrays(extract, x, clip=clip if with_score else None), labels,
                    reference, pr_samples=pr_samples,
                    class_accuracy=class_accuracy, text_embeddings=text)


def run(config, workdir, *, mesh=None) -> epath.Path:
  """Computes the missing cells, then writes ``workdir/report/`` (table, figures, grids).

  The samplers split each batch over ``mesh`` (default: one device); the cells are those of one
  device, to float32 rounding. On several processes every one calls it with the global mesh:
  each draws and measures its devices' rows of every batch, the per-sample features are
  gathered, and process 0 computes the metrics and writes the files."""
  workdir = epath.Path(paths.resolve(workdir))
  out = workdir / "report"
  mesh = mesh or sharding.make_mesh(1)
  writer = processes.is_writer()
  extract, info = features.make_extractor(config, workdir)
  reference = features.real_reference(config, extract, out)  # every cell's, computed once
  held_out = features.real_stats(config, extract, "held_out", out)
  floor = {"fid": metrics.frechet_distance_to(reference, held_out[0], held_out[1]),
           "num_samples": held_out[2]}
  captioned = input_pipeline.captioned(config.data)
  prompts = eval_prompts(config) if captioned else None
  clip = clip_loader.load(config.eval.clip_model) if config.eval.get("clip_model") else None
  text = clip_score.text_embeddings(clip, prompts) if clip is not None and captioned else None
  cells = plan(config, workdir)
  tracker = progress.EvalProgress(cells, int(config.eval.num_samples))
  # Every process takes the same cells: process 0's view of which are done.
  done = processes.agree([(out / "cells" / f"{c.key}.json").exists() for c in cells])
  loaded, drawn, total = {}, 0, 0
  for cell, is_done in zip(cells, done):
    path = out / "cells" / f"{cell.key}.json"
    if is_done:
      tracker.skip(cell.key)
      continue
    kind = "teacher" if cell.method in ("teacher", "ddim", "dpm_solver") else "student"
    model_key = (kind, None if kind == "teacher" else cell.steps)
    if model_key not in loaded:
      loaded.clear()  # one model in memory at a time
      loaded[model_key] = sample.load_model(workdir, kind, num_steps=model_key[1],
                                            config=config, mesh=mesh)
    t0 = time.time()
    first_seed = cell.seed == config.eval.seeds[0]
    arrays = _cell_samples(loaded[model_key], cell, config, extract, prompts=prompts,
                           clip=clip if text is not None else None,
                           keep_images=GRID_SAMPLES if first_seed else 0)
    drawn, total = drawn + arrays["drawn"], total + len(arrays["features"])
    if not writer:
      continue
    result = metrics_of(arrays, arrays["labels"], reference,
                        pr_samples=int(config.eval.pr_samples),
                        class_accuracy=info["class_accuracy"], text_embeddings=text)
    result.update(dataclasses.asdict(cell), nfe=cell.nfe, seconds=round(time.time() - t0, 1))
    shown = [f"FID {result['fid']:.3f}"] + [
        f"{label} {result[key]:.{digits}f}" for key, label, digits in (
            ("is", "IS", 2), ("class_accuracy", "class accuracy", 3),
            ("clip_score", "CLIP score", 2)) if result.get(key) is not None]
    logging.info("eval %s: %s (%.0f s; %s)", cell.key, ", ".join(shown), result["seconds"],
                 tracker.done(cell.key, result["seconds"]))
    if first_seed:
      x = arrays["images"]
      name = report.head_name(cell.method, cell.steps, cell.w)
      grid = images.grid(x, rows=10) if len(x) >= GRID_SAMPLES else images.grid(x, rows=1)
      images.save_png(grid, out / "grids" / f"{name}.png", scale=4)
      report.save_head(out, name, x, conditions=prompts if captioned else
                       [f"class {label}" for label in arrays["labels"]])
    files.write_atomic(path, json.dumps(result, indent=1, sort_keys=True) + "\n")
  if writer:
    results = [json.loads((out / "cells" / f"{c.key}.json").read_text()) for c in cells]
    if clip is not None:
      info = dict(info, clip_model=str(config.eval.clip_model))
    autoencoder = workdir / "autoencoder" / "metrics.json"  # a first stage trained here
    if layout.trains_parts(config) and autoencoder.exists():
      info = dict(info, autoencoder=json.loads(autoencoder.read_text()))
    report.write(out, results, config=config, floor=floor, extractor=info)
  if total:
    logging.info("eval: process %d/%d drew %d of the %d samples (its %d of %d devices)",
                 jax.process_index(), jax.process_count(), drawn, total,
                 len(mesh.local_devices), mesh.size)
  processes.barrier("eval")  # the report is there when any process returns
  return out


def summary(out, config, *, student_steps: int = 4) -> list[str]:
  """The run's closing lines: where the report is, and the ``student_steps``-step student's
  FID against the teacher's at every w (means over the seeds of ``config.eval``)."""
  out = epath.Path(out)
  results = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
  seeds = {int(s) for s in config.eval.seeds}
  agg = report.aggregate([r for r in results if r["seed"] in seeds])
  teacher_steps = int(config.eval.teacher_steps)
  lines = [f"report: {out / 'table.md'} (figures and grids beside it)"]
  pairs = []
  for w in config.eval.w_values:
    teacher = agg.get(("teacher", teacher_steps, float(w)))
    student = agg.get(("student", student_steps, float(w)))
    if teacher and student:
      t, s = teacher["fid"][0], student["fid"][0]
      pairs.append(f"w={float(w):g}: {s:.2f} vs {t:.2f} ({s / t:.2f}x)")
  if pairs:
    lines.append(f"FID, {student_steps}-step student vs teacher (guided DDIM at {teacher_steps} "
                 f"steps, 2 evaluations each), {len(seeds)} seed(s): " + "; ".join(pairs))
  return lines
