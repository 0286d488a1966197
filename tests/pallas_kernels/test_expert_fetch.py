"""The conditional fetch kernel copies exactly the flagged rows, as its reference does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import expert_fetch


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_copies_flagged_rows_only(dtype):
  chunk = expert_fetch.CHUNK
  rng = np.random.default_rng(7)
  src = jnp.asarray(rng.standard_normal((5, 3 * chunk)), dtype)
  dst = jnp.asarray(rng.standard_normal((4, 2 * chunk)), dtype)
  ids, slots, flags = jnp.array([3, 1, 4]), jnp.array([0, 2, 3]), jnp.array([1, 0, 1])
  got = jax.jit(lambda *a: expert_fetch.portable(*a, src_offset=chunk, interpret=True))(
      src, dst, ids, slots, flags)
  want = np.asarray(dst).copy()
  want[0], want[3] = np.asarray(src[3, chunk:]), np.asarray(src[4, chunk:])
  np.testing.assert_array_equal(np.asarray(got), want)
  ref = jax.jit(lambda *a: expert_fetch.reference(*a, src_offset=chunk))(src, dst, ids, slots, flags)
  np.testing.assert_array_equal(np.asarray(ref), want)


def test_shapes_the_kernel_cannot_take_fall_back_to_the_reference():
  src, dst = jnp.arange(12.0).reshape(3, 4), jnp.zeros((2, 4))
  got = expert_fetch.fetch_rows(src, dst, jnp.array([2]), jnp.array([1]), jnp.array([1]), impl="pallas")
  np.testing.assert_array_equal(np.asarray(got), [[0, 0, 0, 0], [8, 9, 10, 11]])


@pytest.mark.gpu
def test_kernel_on_gpu_reads_a_host_view():
  from jaxmoe.offload.hostview import device_view
  from jaxmoe.offload.store import host_sharding
  chunk = expert_fetch.CHUNK
  host = np.random.default_rng(2).standard_normal((4, 2 * chunk)).astype(np.float32)
  view = device_view(jax.device_put(host, host_sharding()), host.shape, host.dtype)
  got = expert_fetch.fetch_rows(view, jnp.zeros((2, 2 * chunk)), jnp.array([3, 0]), jnp.array([1, 0]),
                                jnp.array([1, 1]), impl="pallas")
  np.testing.assert_array_equal(np.asarray(got), host[[0, 3]])
