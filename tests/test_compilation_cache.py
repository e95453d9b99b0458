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
