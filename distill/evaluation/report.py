"""``report/``: the Table-1-style table (Markdown and CSV) and the figures, from cell results.

* ``table.md`` / ``table.csv``: a row per (method, steps), for every w: FID (mean ± std over
  seeds), IS, class accuracy — or, for caption data, FID and CLIP score; precision and recall in
  the CSV;
* ``fid_vs_nfe.png``: FID against network evaluations, one curve per method, a panel per w
  (paper Fig. 2/4 style), with the teacher's reference and the real-vs-real floor;
* ``fid_is_tradeoff.png``: FID against IS as w varies (paper Fig. 6 style), or
  ``fid_clip_tradeoff.png``: FID against CLIP score as w varies (paper Fig. 10 style);
* ``side_by_side_w<w>.png``: a row per prompt (or class) of the first seed's first
  ``HEAD_SAMPLES`` samples, the teacher and each deterministic student in columns: every column
  starts from the same noise (``sample.generate`` draws sample j's noise from the seed and j).

The header of ``table.md`` states the command, config hash and git revision that produced it.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import subprocess
import sys

import numpy as np
from etils import epath

from distill import files, images, manifest

LABELS = {"teacher": "Teacher, guided DDIM", "ddim": "DDIM (teacher)",
          "dpm_solver": "DPM-Solver++ 2M (teacher)", "student": "Distilled, deterministic",
          "student_stochastic": "Distilled, stochastic"}


METRICS = ("fid", "is", "class_accuracy", "clip_score", "precision", "recall")
HEAD_SAMPLES = 6  # samples per cell kept for the side-by-side picture


def head_name(method: str, steps: int, w: float) -> str:
  """The name of a cell's grid (``grids/``) and head (``heads/``): the seed is the first one."""
  return f"{method}_steps{steps}_w{w:g}"


def save_head(out, name: str, x, *, conditions) -> None:
  """Keeps a cell's first ``HEAD_SAMPLES`` samples and their prompts or labels in
  ``out/heads/<name>.npz`` for the side-by-side picture (cells computed in another run too)."""
  buffer = io.BytesIO()
  np.savez(buffer, images=np.asarray(x[:HEAD_SAMPLES], np.float32),
           conditions=np.asarray([str(c) for c in list(conditions)[:HEAD_SAMPLES]]))
  files.write_atomic(epath.Path(out) / "heads" / f"{name}.npz", buffer.getvalue())


def git_revision() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=epath.Path(__file__).parent, timeout=10, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def aggregate(results: list[dict]) -> dict:
  """``{(method, steps, w): {metric: (mean, std)}, …}`` over seeds."""
  groups = collections.defaultdict(list)
  for r in results:
    groups[(r["method"], r["steps"], r["w"])].append(r)
  out = {}
  for key, rs in groups.items():
    out[key] = {m: (float(np.mean([_num(r.get(m)) for r in rs])),
                    float(np.std([_num(r.get(m)) for r in rs])))
                for m in METRICS}
    out[key]["nfe"] = rs[0]["nfe"]
    out[key]["seeds"] = len(rs)
  return out


def _num(value) -> float:
  return float("nan") if value is None else float(value)


def _has(agg, metric: str) -> bool:
  return any(not np.isnan(a[metric][0]) for a in agg.values())


def _percent(value: float) -> str:
  return "n/a" if np.isnan(value) else f"{100 * value:.1f}%"


def _rows(agg):
  order = {m: i for i, m in enumerate(LABELS)}
  return sorted({(m, s) for m, s, _ in agg}, key=lambda r: (order[r[0]], r[1]))


def write(out, results: list[dict], *, config, floor: dict, extractor: dict) -> None:
  out = epath.Path(out)
  agg = aggregate(results)
  w_values = sorted({w for _, _, w in agg})
  rows = _rows(agg)

  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["method", "steps", "nfe", "w", "seeds", "fid_mean", "fid_std", "is_mean",
                   "is_std", "class_accuracy_mean", "class_accuracy_std", "clip_score_mean",
                   "clip_score_std", "precision_mean", "recall_mean"])
  for m, s in rows:
    for w in w_values:
      a = agg[(m, s, w)]
      writer.writerow([m, s, a["nfe"], w, a["seeds"], f"{a['fid'][0]:.4f}", f"{a['fid'][1]:.4f}",
                       f"{a['is'][0]:.4f}", f"{a['is'][1]:.4f}", f"{a['class_accuracy'][0]:.4f}",
                       f"{a['class_accuracy'][1]:.4f}", f"{a['clip_score'][0]:.4f}",
                       f"{a['clip_score'][1]:.4f}", f"{a['precision'][0]:.4f}",
                       f"{a['recall'][0]:.4f}"])
  files.write_atomic(out / "table.csv", buffer.getvalue())

  seeds = len(config.eval.seeds)
  clip = _has(agg, "clip_score")
  shown = "FID / CLIP score" if clip else "FID / IS / class accuracy"
  lines = [
      f"# Guided distillation: {shown}",
      "",
      f"- command: `{' '.join(sys.argv)}`",
      f"- config hash {manifest.config_hash(config)}, data `{config.data.name}`, git revision "
      f"{git_revision()}",
      f"- features: {extractor['features']}"
      + (f"; classifier held-out accuracy {extractor['classifier_held_out_accuracy']:.4f}"
         if "classifier_held_out_accuracy" in extractor else "")
      + (f"; CLIP score (100·max(cos, 0), averaged) with {extractor['clip_model']}"
         if "clip_model" in extractor else ""),
      *([f"- autoencoder trained here: held-out PSNR "
         f"{extractor['autoencoder']['psnr_held_out']:.2f} dB over "
         f"{extractor['autoencoder']['held_out_images']} images"]
        if "autoencoder" in extractor else []),
      f"- {config.eval.num_samples} samples per cell and seed, "
      + (f"{seeds} seeds (mean ± std)" if seeds > 1 else
         "1 seed (no spread: --config.eval.seeds=0,1,2 gives mean ± std over 3)")
      + "; reference statistics: training split",
      f"- real-vs-real floor: held-out split ({floor['num_samples']} images) vs training split, "
      f"FID {floor['fid']:.3f} (FID grows as the sample shrinks: compare at equal sizes)",
      "",
      "| method | steps | NFE | " + " | ".join(f"w = {w:g}" for w in w_values) + " |",
      "|---|---|---|" + "---|" * len(w_values),
  ]
  for m, s in rows:
    cells = []
    for w in w_values:
      a = agg[(m, s, w)]
      spread = f" ± {a['fid'][1]:.3f}" if seeds > 1 else ""
      if clip:
        cells.append(f"{a['fid'][0]:.3f}{spread} / {a['clip_score'][0]:.2f}")
      else:
        cells.append(f"{a['fid'][0]:.3f}{spread} / {a['is'][0]:.2f} / "
                     f"{_percent(a['class_accuracy'][0])}")
    lines.append(f"| {LABELS[m]} | {s} | {agg[(m, s, w_values[0])]['nfe']} | "
                 + " | ".join(cells) + " |")
  lines += ["", "Each cell: FID" + (" (mean ± std over seeds)" if seeds > 1 else "")
            + (" / CLIP score." if clip else " / IS / class accuracy."), ""]
  files.write_atomic(out / "table.md", "\n".join(lines))
  files.write_atomic(out / "report.json", json.dumps(
      {"floor": floor, "extractor": extractor, "cells": results}, indent=1, sort_keys=True))
  _figures(out, agg, w_values, floor)
  teacher_steps = int(config.eval.teacher_steps)
  students = sorted({s for m, s, _ in agg if m == "student"}, reverse=True)
  for w in w_values:
    side_by_side(out, [("teacher", teacher_steps)] + [("student", s) for s in students], w=w)


def _figures(out, agg, w_values, floor) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(w_values), figsize=(4 * len(w_values), 3.4), squeeze=False)
  for ax, w in zip(axes[0], w_values):
    for method in ("ddim", "dpm_solver", "student", "student_stochastic"):
      pts = sorted((a["nfe"], a["fid"]) for (m, _, ww), a in agg.items() if m == method and ww == w)
      if pts:
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                    marker="o", capsize=2, label=LABELS[method])
    for (m, s, ww), a in agg.items():
      if m == "teacher" and ww == w:
        ax.axhline(a["fid"][0], color="k", linestyle="--", label=f"teacher 2×{s}")
    ax.axhline(floor["fid"], color="grey", linestyle=":", label="real vs real")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations")
    ax.set_title(f"w = {w:g}")
  axes[0][0].set_ylabel("FID")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  _save(fig, out / "fid_vs_nfe.png")

  other = "clip_score" if _has(agg, "clip_score") else "is"
  fig, ax = plt.subplots(figsize=(5, 4))
  for (m, s) in _rows(agg):
    pts = [(agg[(m, s, w)][other][0], agg[(m, s, w)]["fid"][0]) for w in w_values]
    if m in ("ddim", "dpm_solver") and s != max(ss for mm, ss in _rows(agg) if mm == m):
      continue  # a baseline's best budget only, to keep the figure readable
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{LABELS[m]}, {s} steps")
  ax.set_xlabel("CLIP score" if other == "clip_score" else "IS (classifier)")
  ax.set_ylabel("FID")
  ax.set_yscale("log")
  ax.set_title(f"FID / {'CLIP score' if other == 'clip_score' else 'IS'} trade-off as w varies")
  ax.legend(fontsize=6)
  fig.tight_layout()
  _save(fig, out / ("fid_clip_tradeoff.png" if other == "clip_score" else "fid_is_tradeoff.png"))
  plt.close("all")


def side_by_side(out, columns, *, w: float) -> epath.Path | None:
  """``out/side_by_side_w<w>.png`` from the saved heads of ``columns`` (``(method, steps)``);
  ``None`` when the teacher's head is missing."""
  out = epath.Path(out)
  heads = []
  for method, steps in columns:
    path = out / "heads" / f"{head_name(method, steps, w)}.npz"
    if path.exists():
      with np.load(io.BytesIO(path.read_bytes())) as f:
        heads.append((method, steps, f["images"], list(f["conditions"])))
  if not heads or heads[0][0] != "teacher":
    return None
  path = out / f"side_by_side_w{w:g}.png"
  draw_side_by_side(heads, w=w, path=path)
  return path


def draw_side_by_side(heads, *, w: float, path) -> None:
  """A row per prompt (or class) and a column per ``(method, steps, images, conditions)`` of
  ``heads``, the first column's conditions as row labels; written to ``path``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = min(len(h[2]) for h in heads)
  fig, axes = plt.subplots(rows, len(heads), figsize=(1.6 * len(heads) + 1.6, 1.6 * rows),
                           squeeze=False)
  for col, (method, steps, x, conditions) in enumerate(heads):
    tiles = images.to_uint8(x[:rows])
    for row in range(rows):
      ax = axes[row][col]
      ax.imshow(tiles[row][..., 0] if tiles.shape[-1] == 1 else tiles[row],
                cmap="gray" if tiles.shape[-1] == 1 else None, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if col == 0:
        ax.set_ylabel(conditions[row], fontsize=8, rotation=0, ha="right", va="center")
    title = (f"teacher 2×{steps}" if method == "teacher" else
             f"student, {steps} step{'s' * (steps > 1)}")
    axes[0][col].set_title(title, fontsize=9)
  fig.suptitle(f"w = {w:g}, the same noise in each row", fontsize=9)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _save(fig, path) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  files.write_atomic(path, buffer.getvalue())
