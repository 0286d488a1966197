"""Conditional expert fetch: copy the rows `ids` of a source into rows `slots` of a destination, only
where `flags` is set, decided on the device (XLA's own conditional reads its predicate on the host).

The offload engine uses it to read missed experts from pinned host memory (a device view) into its
cache slots inside a compiled step. `fetch_rows` picks the implementation: the Pallas kernel (Triton
lowering; interpret mode on the CPU for tests) or the pure-jnp reference (`lax.cond` per row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

CHUNK = 1 << 14  # elements one program copies


def reference(src, dst, ids, slots, flags, src_offset: int):
  """dst[slots[j]] = src[ids[j], src_offset : src_offset + dst.shape[1]] where flags[j]."""
  width = dst.shape[1]
  for j in range(ids.shape[0]):
    def copy(d, j=j):
      row = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(src, ids[j], keepdims=False),
                                         src_offset, width)
      return jax.lax.dynamic_update_index_in_dim(d, row.astype(d.dtype), slots[j], 0)
    dst = jax.lax.cond(flags[j] != 0, copy, lambda d: d, dst)
  return dst


def _kernel(ids_ref, slots_ref, flags_ref, src_ref, dst_in_ref, dst_ref, *, src_offset: int):
  del dst_in_ref  # aliased with dst_ref
  j, c = pl.program_id(0), pl.program_id(1)

  @pl.when(flags_ref[j] != 0)
  def _():
    start = pl.multiple_of(c * CHUNK, CHUNK)
    dst_ref[slots_ref[j], pl.ds(start, CHUNK)] = (
        src_ref[ids_ref[j], pl.ds(src_offset + start, CHUNK)].astype(dst_ref.dtype))


def portable(src, dst, ids, slots, flags, src_offset: int, interpret: bool = False):
  """The Pallas kernel: a program per (row, chunk of CHUNK elements); rows not flagged return at once."""
  width = dst.shape[1]
  if width % CHUNK or src_offset % CHUNK:
    raise NotImplementedError(f"the fetch kernel copies {CHUNK}-element chunks; got a row of {width} "
                              f"at offset {src_offset}")
  kernel = functools.partial(_kernel, src_offset=src_offset)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(dst.shape, dst.dtype),
      grid=(ids.shape[0], width // CHUNK),
      input_output_aliases={4: 0},
      interpret=interpret,
      name="expert_fetch",
  )(ids.astype(jnp.int32), slots.astype(jnp.int32), flags.astype(jnp.int32), src, dst)


def fetch_rows(src, dst, ids, slots, flags, *, src_offset: int = 0, impl: str = "auto"):
  """src [R, P], dst [S, W] -> dst with dst[slots[j]] = src[ids[j], src_offset:src_offset + W] for
  every j with flags[j] (ids, slots, flags: [U]). impl: "auto" (the kernel on a GPU, the reference
  elsewhere), "pallas", "mosaic" (the same kernel: a copy needs no Hopper instructions) or "xla"."""
  if impl == "auto":
    impl = "pallas" if jax.default_backend() == "gpu" else "xla"
  if impl in ("pallas", "mosaic"):
    try:
      return portable(src, dst, ids, slots, flags, src_offset, interpret=jax.default_backend() != "gpu")
    except NotImplementedError:
      pass
  return reference(src, dst, ids, slots, flags, src_offset)
