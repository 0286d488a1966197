"""Row-tile schedule shared by the grouped kernels: which (group, row block) each tile computes.

Computed with jnp outside the kernels so it is jittable and costs nothing on the host. Tiles are laid
out group by group; an empty group owns no tile, so it reads no weights (decode costs what it reads).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Columns of `TileSchedule.tiles`.
EXPERT, ROW_BLOCK, ROW_LO, ROW_HI = range(4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileSchedule:
  """Per-tile metadata for a grid of `max_tiles` row tiles; tiles >= num_tiles do nothing.

  Row tiles are aligned to multiples of `tile_m` in the global row order: a block that straddles a
  group boundary appears once per group, each copy writing only its own rows [lo, hi).
  """

  tiles: jax.Array  # [max_tiles, 4] int32: expert, row block, first row, one past the last row
  num_tiles: jax.Array  # [1] int32: tiles actually in use (the rest are padding)

  @property
  def max_tiles(self) -> int:
    return self.tiles.shape[0]


EPILOGUES = ("none", "relu", "glu")  # what the kernels fuse after the matmul


def check_epilogue(epilogue: str, weights) -> tuple:
  """The kernels' shared argument check: a known epilogue, and (gate, up) for glu, one array else."""
  if epilogue not in EPILOGUES:
    raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
  weights = tuple(weights)
  if len(weights) != (2 if epilogue == "glu" else 1):
    raise ValueError("glu takes (gate, up); other epilogues take one weight array")
  return weights


def max_row_tiles(num_rows: int, num_groups: int, tile_m: int) -> int:
  """Static bound: every group boundary can split one row block into one more tile."""
  return cdiv(num_rows, tile_m) + num_groups - 1


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def make_schedule(group_sizes, rhs_index, num_rows: int, tile_m: int) -> TileSchedule:
  """group_sizes [G] (rows sorted by group), rhs_index [G] or None -> TileSchedule."""
  num_groups = group_sizes.shape[0]
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  cumulative = jnp.cumsum(sizes)
  ends = jnp.minimum(cumulative, num_rows)  # rows past num_rows do not exist
  starts = jnp.minimum(cumulative - sizes, num_rows)
  sizes = ends - starts
  first_block = starts // tile_m
  last_block = jnp.maximum(ends - 1, 0) // tile_m
  counts = jnp.where(sizes > 0, last_block - first_block + 1, 0)
  tile_ends = jnp.cumsum(counts)  # tiles of group g are [tile_ends[g] - counts[g], tile_ends[g])
  num_tiles = tile_ends[-1]

  max_tiles = max_row_tiles(num_rows, num_groups, tile_m)
  t = jnp.arange(max_tiles, dtype=jnp.int32)
  group = jnp.searchsorted(tile_ends, t, side="right", method="compare_all")
  group = jnp.minimum(group, num_groups - 1)
  block = first_block[group] + t - (tile_ends[group] - counts[group])
  lo = jnp.maximum(starts[group], block * tile_m)
  hi = jnp.minimum(ends[group], block * tile_m + tile_m)
  expert = group if rhs_index is None else rhs_index.astype(jnp.int32)[group]
  live = t < num_tiles
  tiles = jnp.stack([jnp.where(live, expert, 0), jnp.where(live, block, 0),
                     jnp.where(live, lo, 0), jnp.where(live, hi, 0)], axis=1)
  return TileSchedule(tiles=tiles.astype(jnp.int32),
                      num_tiles=num_tiles.reshape(1).astype(jnp.int32))
