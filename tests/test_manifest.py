import json

import pytest

from distill import manifest
from distill.config_utils import load_config


def _workdir_started_before_w_sample_power(tmp_path):
  """A manifest as written before the ``w_sample_power`` fields existed."""
  config = load_config("digits:runlocal")
  for section in ("stage_one", "stage_two"):
    config[section].w_sample_power = 1.0  # uniform draws: what every run did then
  recorded = manifest.relevant_config(config)
  for section in ("stage_one", "stage_two"):
    del recorded[section]["w_sample_power"]
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"config_hash": "0123456789abcdef", "config": recorded, "stages": {"teacher": {}}}))
  return config


def test_workdir_from_before_a_field_existed_resumes_with_its_old_value(tmp_path):
  config = _workdir_started_before_w_sample_power(tmp_path)
  record = manifest.Manifest(tmp_path)
  record.check_config(config)
  assert record.is_complete("teacher")


def test_workdir_refuses_a_changed_value_of_a_field_added_later(tmp_path):
  config = _workdir_started_before_w_sample_power(tmp_path)
  config.stage_one.w_sample_power = 2.0
  with pytest.raises(ValueError, match="stage_one.w_sample_power: 1.0 -> 2.0"):
    manifest.Manifest(tmp_path).check_config(config)


def test_workdir_refuses_a_changed_field(tmp_path):
  config = load_config("digits:runlocal")
  manifest.Manifest(tmp_path).check_config(config)
  before = config.stage_one.lr
  config.stage_one.lr = 0.5
  with pytest.raises(ValueError, match=f"stage_one.lr: {before!r} -> 0.5"):
    manifest.Manifest(tmp_path).check_config(config)


def test_an_encoder_section_without_links_is_adopted_then_held(tmp_path):
  """A workdir recorded with no encoder links (``encoder.start_num_steps = 0``, as every config
  but digits and emoji) takes an encoder later: the section is adopted and recorded; then a
  change to it, or to its links, is refused as any other change."""
  config = load_config("cifar10:runlocal")
  config.encoder.start_num_steps = 0
  manifest.Manifest(tmp_path).check_config(config)
  config.encoder.start_num_steps = 8
  config.encoder.lr = 3e-4
  manifest.Manifest(tmp_path).check_config(config)
  recorded = json.loads((tmp_path / "manifest.json").read_text())
  assert recorded["config"]["encoder"]["start_num_steps"] == 8
  assert recorded["config_hash"] == manifest.config_hash(config)
  config.encoder.start_num_steps = 16
  with pytest.raises(ValueError, match=r"encoder.start_num_steps: 8 -> 16"):
    manifest.Manifest(tmp_path).check_config(config)
  config.encoder.start_num_steps = 8
  config.stage_one.lr = 0.5  # adoption never hides a change elsewhere
  with pytest.raises(ValueError, match=r"stage_one.lr"):
    manifest.Manifest(tmp_path).check_config(config)
