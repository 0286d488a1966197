"""Shared test setup: a compilation cache for the session, and `gpu` tests skipped where JAX sees no
CUDA device."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

# The tests build many engines and trainers whose jitted closures compile the same programs again; a
# compilation cache for the session turns those repeats into loads. A fresh directory, so that no run
# depends on an earlier one (set JAX_COMPILATION_CACHE_DIR to keep one); exported for child processes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxmoe-tests-jit-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
for _name, _type in (("JAX_COMPILATION_CACHE_DIR", str),
                     ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", float),
                     ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", int)):
  jax.config.update(_name.lower(), _type(os.environ[_name]))  # jax may have read the environment already


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
