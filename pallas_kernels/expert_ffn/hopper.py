"""Hopper grouped matmul in Mosaic GPU: persistent CTAs, a warp-specialized TMA pipeline, wgmma.

Each CTA loops over (row tile, N tile) pairs from `schedule.make_schedule` (empty groups own no
tile, so they read no weights). One memory warpgroup streams lhs and weight tiles through a multi-stage
shared-memory ring; two compute warpgroups each own half of the CTA's columns and accumulate with
wgmma in registers. The epilogue (ReLU or SiLU-gated product) runs on the accumulators; rows that
belong to the tile's group are stored with TMA, a binary ladder of row counts covering ragged edges.
Mosaic GPU does not run on the CPU: this module is exercised by the `gpu` tests only.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.expert_ffn import schedule
from pallas_kernels.expert_ffn.config import HopperTiles

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MEMORY_REGISTERS = 40  # the TMA-issuing warpgroup needs few registers; compute gets the rest
_DEFAULT_NUM_SMS = 132  # H100/H200 SXM
_SMEM_BYTES = 232448  # per-block shared memory limit on the H100/H200
_SMEM_SLACK = 2048  # barriers and alignment


@functools.cache
def is_supported_device() -> bool:
  """True on a Hopper GPU (compute capability 9.x) where Mosaic GPU is importable."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return False
  try:
    importlib.import_module("jax.experimental.pallas.mosaic_gpu")
  except ImportError:
    return False
  return str(getattr(device, "compute_capability", "")).startswith("9")


def _num_sms() -> int:
  return getattr(jax.devices()[0], "core_count", None) or _DEFAULT_NUM_SMS


def max_stages(tm: int, cta_n: int, tk: int, num_weights: int, epi_n: int = 64) -> int:
  """Pipeline stages that fit in shared memory next to the epilogue buffers (bf16)."""
  stage = 2 * tk * (tm + num_weights * cta_n)
  return (_SMEM_BYTES - 2 * (2 * tm * epi_n) - _SMEM_SLACK) // stage


def default_tiles(m: int, k: int, n: int, glu: bool, num_groups: int) -> HopperTiles:
  """Prefill: 128 x 256 CTA tiles (GLU: 128 x 128 per matrix), 4 stages (all that fit).

  Decode: 64-row tiles, N tiles narrow enough to give every SM work, and as many stages as fit
  (up to 8) so each SM keeps enough weight bytes in flight to stream at HBM bandwidth.
  """
  del k
  num_weights = 2 if glu else 1
  if m > 256:
    wg_n = 64 if glu else 128
    return HopperTiles(tile_m=128, wg_tile_n=wg_n, max_concurrent_steps=4, grid_tile_width=4)
  busy_tiles = max(1, min(m, num_groups))  # at most one row tile per non-empty group
  wg_n = 128 if (n // 256) * busy_tiles >= _num_sms() and not glu else 64
  stages = min(8, max_stages(64, 2 * wg_n, 64, num_weights))
  return HopperTiles(tile_m=64, wg_tile_n=wg_n, max_concurrent_steps=stages, grid_tile_width=1)


def _check(lhs, weights, tiles: HopperTiles):
  if len(weights) * tiles.tile_m * tiles.wg_tile_n > 128 * 128:
    raise NotImplementedError(f"{len(weights)} accumulators of {tiles.tile_m}x{tiles.wg_tile_n} "
                              "f32 do not fit in a warpgroup's registers")
  k, n = lhs.shape[1], weights[0].shape[-1]
  if tiles.max_concurrent_steps > max_stages(tiles.tile_m, tiles.cta_tile_n, tiles.tile_k,
                                             len(weights), tiles.epi_tile_n):
    raise NotImplementedError(f"{tiles} needs more shared memory than a block has")
  if lhs.dtype not in _DTYPES or any(w.dtype != lhs.dtype for w in weights):
    raise NotImplementedError(f"Mosaic kernel takes bf16/f16 weights and activations, got "
                              f"{lhs.dtype}")
  if k % tiles.tile_k or k < 2 * tiles.tile_k:
    # The pipeline releases each stage one step late, so it needs at least two K steps.
    raise NotImplementedError(f"K={k} is not a multiple >= 2 of tile_k={tiles.tile_k}")
  if n % tiles.cta_tile_n:
    raise NotImplementedError(f"N={n} is not a multiple of the CTA tile width {tiles.cta_tile_n}")


def _epilogue(accs, epilogue):
  if epilogue == "glu":
    gate, up = accs
    return gate / (1.0 + jnp.exp(-gate)) * up
  if epilogue == "relu":
    return jnp.maximum(accs[0], 0.0)
  return accs[0]


def _store_rows(src_smem, out_gmem, *, row0, start, size, col0, max_rows, width):
  """Copies rows [start, start + size) of src_smem to out rows from row0 + start; size <= max_rows.

  TMA copies have static shapes, so a ragged row count is written as a sum of powers of two, largest
  first; each piece is predicated on its bit of `size`. The output has exactly M rows and no piece
  ever crosses a row that is not this tile's, so nothing past M or in another group is written.
  """
  import jax.experimental.pallas.mosaic_gpu as plgpu

  offset = start
  piece = 1 << (max_rows.bit_length() - 1)
  while piece >= 1:
    rows = piece

    @pl.when((size & rows) != 0)
    def _():
      plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(offset, rows)],
                              out_gmem.at[pl.ds(row0 + offset, rows), pl.ds(col0, width)])

    offset = offset + (size & rows)
    piece //= 2


def _kernel_body(count_ref, tiles_ref, lhs_ref, *refs, tiles: HopperTiles, epilogue: str, m: int,
                 n: int, k: int):
  """Loops this CTA over its share of the (row tile, N tile) pairs of the schedule."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  weight_refs, out_ref = refs[:-1], refs[-1]
  dtype = lhs_ref.dtype
  tm, wg_n, tk, epi_n = tiles.tile_m, tiles.wg_tile_n, tiles.tile_k, tiles.epi_tile_n
  cta_n = tiles.cta_tile_n
  n_iters = n // cta_n
  swizzle = plgpu.find_swizzle(tk * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))

  def make_pipeline(body, compute_context):
    specs = [plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=transforms, delay_release=1)]
    specs += [plgpu.BlockSpec((tk, cta_n), lambda kk: (kk, 0), transforms=transforms,
                              delay_release=1) for _ in weight_refs]
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k // tk,), memory_registers=_MEMORY_REGISTERS, in_specs=specs, wg_axis="wg",
        num_compute_wgs=2, max_concurrent_steps=tiles.max_concurrent_steps,
        compute_context=compute_context)

  ignore = lambda *_, **__: None
  allocations = make_pipeline(ignore, ignore).get_allocations(
      lhs_ref.at[pl.ds(0, tm), :], *[w.at[0, :, pl.ds(0, cta_n)] for w in weight_refs])

  @functools.partial(pl.run_scoped, allocs=allocations,
                     out_smem=plgpu.SMEM((2, tm, epi_n), dtype), collective_axes="wg")
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")
    num_tiles = count_ref[0]

    @plgpu.nd_loop((num_tiles * n_iters,), collective_axes="sm")
    def _tile_loop(info):
      (lin,) = info.index
      mi, ni = plgpu.planar_snake(lin, (num_tiles, n_iters), 1, tiles.grid_tile_width)
      expert = tiles_ref[mi, schedule.EXPERT]
      row0 = tiles_ref[mi, schedule.ROW_BLOCK] * tm
      lo = tiles_ref[mi, schedule.ROW_LO]
      hi = tiles_ref[mi, schedule.ROW_HI]
      wg_cols = pl.ds(wg * wg_n, wg_n)

      def mma(_, a_smem, *rest):
        *w_smems, accs = rest
        for acc, w_smem in zip(accs, w_smems):
          plgpu.wgmma(acc, a_smem, w_smem.at[:, wg_cols])
        plgpu.wgmma_wait(1)  # the previous step's operands may now be released
        return accs

      def compute_context(run_pipeline):
        def with_accs(*accs):
          run_pipeline(accs)
          y = _epilogue([acc[...] for acc in accs], epilogue)
          for c in range(wg_n // epi_n):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # out_smem free again
            out_smem[wg] = y[:, c * epi_n:(c + 1) * epi_n].astype(dtype)
            plgpu.commit_smem()
            _store_rows(out_smem.at[wg], out_ref, row0=row0, start=lo - row0, size=hi - lo,
                        col0=ni * cta_n + wg * wg_n + c * epi_n, max_rows=min(tm, m),
                        width=epi_n)

        pl.run_scoped(with_accs, *[plgpu.ACC((tm, wg_n), jnp.float32) for _ in weight_refs])

      make_pipeline(mma, compute_context)(
          lhs_ref.at[pl.ds(row0, tm), :],
          *[w.at[expert, :, pl.ds(ni * cta_n, cta_n)] for w in weight_refs],
          allocations=allocs)

    plgpu.wait_smem_to_gmem(0)


def grouped_ffn(lhs, weights, group_sizes, rhs_index=None, *, epilogue="none",
                tiles: HopperTiles | None = None):
  """lhs [M, K] bf16/f16, weights: 1 or 2 (gate, up) arrays [E, K, N] -> [M, N] in lhs.dtype."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  weights = schedule.check_epilogue(epilogue, weights)
  m, k = lhs.shape
  n = weights[0].shape[-1]
  if tiles is None:
    tiles = default_tiles(m, k, n, epilogue == "glu", group_sizes.shape[0])
  _check(lhs, weights, tiles)
  tm = tiles.tile_m
  m_pad = schedule.cdiv(m, tm) * tm  # lhs tiles are read whole; the output is stored row-exact
  sched = schedule.make_schedule(group_sizes, rhs_index, m, tm)
  lhs_p = lhs if m_pad == m else jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
  kernel = plgpu.kernel(
      functools.partial(_kernel_body, tiles=tiles, epilogue=epilogue, m=m, n=n, k=k),
      out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype),
      grid=(_num_sms(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  return kernel(sched.num_tiles, sched.tiles, lhs_p, *weights)
