"""``workdir/manifest.json``: the run's config (and its hash) and the links completed.

A rerun with a config whose result-relevant fields differ from the recorded ones is refused
with the fields that changed, rather than silently mixing two runs. Fields that do not change
what is trained are left out of the hash: which stages run now, the device count, logging,
checkpoint and sample-grid intervals, the data directory and the evaluation settings. The mesh
(device count and ``mesh.fsdp``) and the attention implementation (``model.attention``, equal
to float32 rounding) are among them: a run resumes on another mesh or backend.
"""

from __future__ import annotations

import hashlib
import json
import time

import jax
from etils import epath

from distill import files

IGNORED_TOP = ("stages", "num_devices", "mesh", "eval")
IGNORED_IN_SECTION = ("log_every", "checkpoint_every", "sample_every", "max_to_keep",
                      "max_consecutive_nonfinite", "sample_w", "sample_steps", "data_dir",
                      "attention")
# Fields added after workdirs were started: absent from a recorded config, they had this value
# (the behaviour before the field existed), so a workdir started earlier still resumes.
ADDED_LATER = {"stage_one.w_sample_power": 1.0, "stage_two.w_sample_power": 1.0,
               "teacher_v.weighting": "snr_trunc", "data.tfds_name": "",
               "data.tfds_caption": "captions/text", "data.tfds_train_split": "train",
               "data.tfds_held_out_split": "val", "latent.cache": False,
               "latent.dtype": "float32", "latent.remat": False, "latent.inpainting": False,
               "latent.kept_loss_weight": 1.0}
# Sections that configure optional links of their own only, each with the test of whether a
# recorded section has links: absent from a recorded config (a workdir started before the section
# existed) or recorded without links, none of theirs can have been trained, so the section is
# adopted from the current config (and recorded, so a later change to it is refused).
OPTIONAL_SECTIONS = {"encoder": lambda section: int(section.get("start_num_steps", 0)) > 0}


def relevant_config(config) -> dict:
  """The config as JSON-able nested dicts, without the fields listed above."""
  tree = json.loads(config.to_json_best_effort())
  out = {}
  for key, value in tree.items():
    if key in IGNORED_TOP:
      continue
    if isinstance(value, dict):
      value = {k: v for k, v in value.items() if k not in IGNORED_IN_SECTION}
    out[key] = value
  return out


def config_hash(config) -> str:
  blob = json.dumps(relevant_config(config), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


class Manifest:
  """Reads and (on process 0, atomically) writes ``workdir/manifest.json``."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / "manifest.json"
    self.data = None
    if self.path.exists():
      try:
        self.data = json.loads(self.path.read_text())
        if not isinstance(self.data, dict) or "config_hash" not in self.data:
          raise ValueError("no config_hash")
      except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"{self.path} is damaged ({type(e).__name__}: {e}): it is written atomically, so it "
            "was edited or truncated by hand. Restore it, or move it away to resume from the "
            "checkpoints with the current config recorded afresh.") from None

  def check_config(self, config) -> None:
    """Records the config on a new workdir; refuses a changed one on an existing workdir."""
    digest = config_hash(config)
    if self.data is None:
      self.data = {"config_hash": digest, "config": relevant_config(config), "stages": {}}
      self._write()
      return
    if self.data["config_hash"] != digest:
      current = relevant_config(config)
      recorded = self.data["config"]
      adopted = [k for k, has_links in OPTIONAL_SECTIONS.items()
                 if k in current and not (k in recorded and has_links(recorded[k]))]
      for k in adopted:
        self.data["config"][k] = current[k]
      old, new = _flatten(self.data["config"]), _flatten(current)
      old = {**{k: v for k, v in ADDED_LATER.items() if k in new}, **old}
      changed = [f"{k}: {old.get(k, 'absent')!r} -> {new.get(k, 'absent')!r}"
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
      if not changed:
        if adopted:
          self.data["config_hash"] = digest
          self._write()
        return
      raise ValueError(
          f"the config differs from the one this workdir was started with ({self.path}): "
          f"{'; '.join(changed[:5])}{' …' if len(changed) > 5 else ''}; rerun with the "
          "original settings or use a new --workdir.")

  def is_complete(self, name: str) -> bool:
    return name in self.data["stages"]

  def final_step(self, name: str) -> int:
    """The step a completed stage finished at (``complete``'s ``step``)."""
    return int(self.data["stages"][name]["final_step"])

  def complete(self, name: str, *, step: int, seconds: float) -> None:
    self.data["stages"][name] = {"final_step": step, "seconds": round(seconds, 1),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    self._write()

  def _write(self) -> None:
    if jax.process_index() != 0:
      return
    files.write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")
