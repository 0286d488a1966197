"""Device views of host memory: a process holding views to the end exits cleanly."""

import os
import subprocess
import sys

SCRIPT = """
import jax.numpy as jnp, numpy as np
from jaxmoe.offload.hostview import device_view
owner = jnp.arange(1024, dtype=jnp.float32)
view = device_view(owner, (16, 64), np.float32, 0)
assert float(view.sum()) == float(owner.sum())
"""  # `view` and `owner` are still alive when the interpreter is torn down


def test_views_alive_at_exit_do_not_crash_the_process():
  done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  # before views were freed at exit, their deleters ran during teardown: "Exception ignored on calling
  # ctypes callback function", and at times a segfault (exit status 139)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "Exception ignored" not in done.stderr, done.stderr[-2000:]
