"""The command-line entries' persistent compilation cache (distill/compilation_cache.py)."""

import os

import jax
import pytest

from distill import compilation_cache


@pytest.fixture
def restore_jax_cache_config():
  saved = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  yield
  jax.config.update("jax_enable_compilation_cache", saved[0])
  jax.config.update("jax_compilation_cache_dir", saved[1])


def test_default_directory():
  assert compilation_cache.default_directory({"JAX_COMPILATION_CACHE_DIR": "/c"}) == "/c"
  assert compilation_cache.default_directory({"XDG_CACHE_HOME": "/x"}) == "/x/distill/jax"
  assert compilation_cache.default_directory({}) == os.path.join("~", ".cache", "distill", "jax")


def test_enable_resolves_and_empty_turns_off(tmp_path, monkeypatch, restore_jax_cache_config):
  monkeypatch.chdir(tmp_path)
  assert compilation_cache.enable("cache") == str(tmp_path / "cache")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
  assert jax.config.jax_enable_compilation_cache
  assert (tmp_path / "cache").is_dir()
  assert compilation_cache.enable("") == ""
  assert not jax.config.jax_enable_compilation_cache


def test_unwritable_directory_is_one_line(tmp_path, restore_jax_cache_config):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"^--compilation_cache_dir='.*file/jax' is not a "
                                       r"writable directory") as info:
    compilation_cache.enable(str(blocker / "jax"))
  assert "\n" not in str(info.value)


def test_processes_checking_one_directory_at_once_do_not_collide(tmp_path):
  """The processes of a multi-host run check the same cache directory at the same moment: each
  probe file is its own, so one process never removes another's (here: threads, many times)."""
  import threading  # pylint: disable=import-outside-toplevel
  from distill import paths  # pylint: disable=import-outside-toplevel
  errors = []

  def check():
    for _ in range(300):
      try:
        paths.check_writable(tmp_path / "shared", what="--compilation_cache_dir")
      except ValueError as e:
        errors.append(str(e))

  threads = [threading.Thread(target=check) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[0]
  assert not list((tmp_path / "shared").iterdir())  # every probe removed
