"""Tile sizes of the grouped expert kernels, one small frozen dataclass per kernel family.

Defaults are chosen per shape by `portable.default_tiles` and `hopper.default_tiles`; callers (the
benchmark, tuning) may pass their own.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PortableTiles:
  """Tiles of the portable Pallas kernel (Triton on GPU, interpret mode on CPU)."""

  tile_m: int = 64  # rows per tile; shrunk to the next power of two >= M (at least 16) for decode
  tile_n: int = 128  # output columns per program; must divide N (shrunk to a power-of-two divisor)
  tile_k: int = 64  # reduction chunk of the in-kernel K loop; must divide K
  num_warps: int = 4  # Triton warps per program
  num_stages: int = 3  # Triton software-pipelining depth of the K loop

  def __post_init__(self):
    for name in ("tile_m", "tile_n", "tile_k"):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


@dataclasses.dataclass(frozen=True)
class HopperTiles:
  """Tiles of the Mosaic GPU kernel: two compute warpgroups split a CTA tile along N."""

  tile_m: int = 128  # rows per CTA tile (64 or 128: one wgmma M per warpgroup)
  wg_tile_n: int = 128  # columns per compute warpgroup (per matrix for GLU); CTA tile is 2x this
  tile_k: int = 64  # K step of the TMA pipeline (64 bf16 = one 128-byte swizzle row)
  max_concurrent_steps: int = 4  # pipeline stages in shared memory
  grid_tile_width: int = 4  # CTA-tile columns visited before moving down the rows (L2 reuse)
  epi_tile_n: int = 64  # columns per epilogue store (64 bf16 = 128-byte rows, TMA-aligned at any row)

  def __post_init__(self):
    if self.tile_m not in (64, 128):
      raise ValueError(f"tile_m must be 64 or 128, got {self.tile_m}")
    if self.wg_tile_n % self.epi_tile_n or self.wg_tile_n % 64:
      raise ValueError(f"wg_tile_n ({self.wg_tile_n}) must be a multiple of 64 and of epi_tile_n")
    if self.max_concurrent_steps < 2:
      raise ValueError("max_concurrent_steps must be >= 2 (one stage is released a step late)")

  @property
  def cta_tile_n(self) -> int:
    return 2 * self.wg_tile_n
