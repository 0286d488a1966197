"""Portable Pallas grouped matmul: Triton lowering on any recent NVIDIA GPU, interpret mode on CPU.

Grid = (row tile, N tile). Row tiles come from `schedule.make_schedule`, so empty groups own no tile
and read no weights; the K loop runs inside the kernel so a tile never holds all of K in shared memory.
Rows of a tile that belong to another group are masked out on store.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.expert_ffn import schedule
from pallas_kernels.expert_ffn.config import PortableTiles



def _pow2_divisor(n: int, cap: int) -> int:
  """Largest power of two <= cap that divides n."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def default_tiles(m: int, k: int, n: int, glu: bool) -> PortableTiles:
  """Small-M tiles for decode (weights streamed once), larger ones for prefill."""
  del k
  if m <= 64:
    return PortableTiles(tile_m=16, tile_n=64 if glu else 128, tile_k=128, num_warps=4, num_stages=4)
  return PortableTiles(tile_m=64, tile_n=64 if glu else 128, tile_k=64, num_warps=4, num_stages=3)


def _fit_tiles(tiles: PortableTiles, m: int, k: int, n: int) -> tuple[int, int, int]:
  tm = max(16, min(tiles.tile_m, pl.next_power_of_2(m)))
  tn = _pow2_divisor(n, tiles.tile_n)
  tk = _pow2_divisor(k, tiles.tile_k)
  if tn < 16 or tk < 16:
    raise NotImplementedError(f"portable kernel needs K and N divisible by 16, got K={k}, N={n}")
  return tm, tn, tk


def _kernel(num_tiles_ref, tiles_ref, lhs_ref, *refs, num_weights, epilogue, tm, tn, tk, num_k,
            precision):
  weight_refs, out_ref = refs[:num_weights], refs[-1]
  t, j = pl.program_id(0), pl.program_id(1)

  @pl.when(t < num_tiles_ref[0])
  def _():
    expert = tiles_ref[t, schedule.EXPERT]
    row0 = pl.multiple_of(tiles_ref[t, schedule.ROW_BLOCK] * tm, tm)
    col0 = pl.multiple_of(j * tn, tn)

    def k_step(kk, accs):
      k0 = pl.multiple_of(kk * tk, tk)
      a = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]
      return tuple(
          acc + jnp.dot(a, w[expert, pl.ds(k0, tk), pl.ds(col0, tn)].astype(a.dtype),
                        preferred_element_type=jnp.float32, precision=precision)
          for acc, w in zip(accs, weight_refs))

    zeros = tuple(jnp.zeros((tm, tn), jnp.float32) for _ in weight_refs)
    accs = lax.fori_loop(0, num_k, k_step, zeros)
    if epilogue == "glu":
      gate, up = accs
      y = gate / (1.0 + jnp.exp(-gate)) * up
    elif epilogue == "relu":
      y = jnp.maximum(accs[0], 0.0)
    else:
      y = accs[0]
    rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    keep = (rows >= tiles_ref[t, schedule.ROW_LO]) & (rows < tiles_ref[t, schedule.ROW_HI])
    pl_triton.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], y.astype(out_ref.dtype), mask=keep)


def grouped_ffn(lhs, weights, group_sizes, rhs_index=None, *, epilogue="none",
                tiles: PortableTiles | None = None, interpret=False, out_init=None):
  """lhs [M, K], weights: tuple of 1 ([E, K, N]) or 2 (gate, up) arrays -> [M, N] in lhs.dtype.

  `out_init` ([M, N], optional) is the buffer the kernel writes into in place; tests pass a poisoned
  one to prove every routed row is written.
  """
  weights = schedule.check_epilogue(epilogue, weights)
  m, k = lhs.shape
  n = weights[0].shape[-1]
  if tiles is None:
    tiles = default_tiles(m, k, n, epilogue == "glu")
  tm, tn, tk = _fit_tiles(tiles, m, k, n)
  m_pad = schedule.cdiv(m, tm) * tm
  sched = schedule.make_schedule(group_sizes, rhs_index, m, tm)
  lhs_p = lhs if m_pad == m else jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
  precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
  kernel = functools.partial(_kernel, num_weights=len(weights), epilogue=epilogue, tm=tm, tn=tn,
                             tk=tk, num_k=k // tk, precision=precision)
  args = [sched.num_tiles, sched.tiles, lhs_p, *weights]
  aliases = {}
  if out_init is not None:
    out_p = out_init.astype(lhs.dtype)
    out_p = out_p if m_pad == m else jnp.pad(out_p, ((0, m_pad - m), (0, 0)))
    aliases = {len(args): 0}
    args.append(out_p)
    kernel = _drop_aliased_input(kernel, len(args))
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, n), lhs.dtype),
      grid=(sched.max_tiles, n // tn),
      input_output_aliases=aliases,
      compiler_params=pl_triton.CompilerParams(num_warps=tiles.num_warps,
                                               num_stages=tiles.num_stages),
      interpret=interpret,
      name=f"grouped_{epilogue}",
  )(*args)
  return out if m_pad == m else out[:m]


def _drop_aliased_input(kernel, num_inputs):
  """The aliased input ref is the output ref too; the kernel body only needs the output."""
  def wrapped(*refs):
    return kernel(*refs[:num_inputs - 1], refs[-1])
  return wrapped
