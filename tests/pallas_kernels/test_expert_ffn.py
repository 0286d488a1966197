"""One parameterised suite for the grouped expert kernels, run per backend against an f32 oracle.

The oracle loops over groups with HIGHEST-precision f32 dots. Only rows < sum(group_sizes) are compared
(the rest are unspecified). CPU classes run the portable kernel in interpret mode; `gpu` classes run the
same cases, with K and N scaled up to what the GPU tiles need, on the device.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.expert_ffn import api, hopper, portable, reference, schedule
from pallas_kernels.expert_ffn.config import HopperTiles, PortableTiles

# Per-dtype tolerances: f32 is exact up to summation order; bf16 is bounded by rounding the output.
TOLERANCES = {
    jnp.float32: dict(atol=1e-4, rtol=1e-4, rel_norm=1e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=1e-2, rel_norm=6e-3),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  m: int  # rows of lhs
  k: int
  n: int
  num_experts: int
  sizes: str  # how group sizes are drawn, see `_group_sizes`
  num_groups: int | None = None  # != num_experts means rhs_index maps groups to expert slots
  permute: bool = False  # pass a random permutation as rhs_index


CPU_CASES = [
    Case("ragged_with_zeros", 37, 96, 64, 4, "random_with_zeros"),
    Case("all_rows_one_group", 40, 64, 32, 4, "one_group"),
    Case("partial_rows", 50, 32, 64, 4, "partial"),
    Case("decode_2_of_8", 2, 64, 64, 8, "decode"),
    Case("single_row", 1, 32, 32, 4, "one_group"),
    Case("many_tiles", 100, 64, 32, 8, "random_with_zeros"),
    Case("rhs_index_permutation", 45, 64, 64, 4, "random_with_zeros", permute=True),
    Case("slot_pool_g_ne_e", 30, 32, 64, 6, "random_with_zeros", num_groups=3),
]
# The Mosaic kernel's tiles switch at M = 256; these cover both sides and many row tiles.
GPU_EXTRA_CASES = [
    Case("prefill_ragged", 1000, 32, 32, 8, "random_with_zeros"),
    Case("prefill_one_group", 300, 64, 64, 4, "one_group"),
    Case("prefill_slot_pool", 700, 64, 32, 8, "random_with_zeros", num_groups=5),
]
EPILOGUES = ("none", "relu", "glu")
DTYPES = (jnp.float32, jnp.bfloat16)


def _rng(*parts) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def _group_sizes(rng, kind: str, m: int, g: int) -> np.ndarray:
  if kind == "one_group":
    sizes = np.zeros(g, np.int32)
    sizes[rng.integers(g)] = m
  elif kind == "decode":  # m rows routed to m distinct groups, the rest empty
    sizes = np.zeros(g, np.int32)
    sizes[rng.choice(g, size=m, replace=False)] = 1
  else:
    total = m if kind == "random_with_zeros" else int(rng.integers(1, m))
    weights = rng.random(g) * (rng.random(g) > 0.3)  # about a third of the groups empty
    weights[rng.integers(g)] += 0.1
    sizes = np.floor(weights / weights.sum() * total).astype(np.int32)
    sizes[np.argmax(weights)] += total - sizes.sum()
  return sizes


def _inputs(case: Case, dtype, kn_scale: int, epilogue: str):
  rng = _rng(case, str(dtype), kn_scale, epilogue)
  k, n = case.k * kn_scale, case.n * kn_scale
  g = case.num_groups or case.num_experts
  lhs = rng.standard_normal((case.m, k), np.float32)
  weights = [rng.standard_normal((case.num_experts, k, n), np.float32) / np.sqrt(k)
             for _ in range(2 if epilogue == "glu" else 1)]
  sizes = _group_sizes(rng, case.sizes, case.m, g)
  rhs_index = None
  if case.num_groups is not None:
    rhs_index = rng.choice(case.num_experts, size=g, replace=False).astype(np.int32)
  elif case.permute:
    rhs_index = rng.permutation(g).astype(np.int32)
  to = lambda x: jnp.asarray(x, dtype)
  return (to(lhs), [to(w) for w in weights], jnp.asarray(sizes),
          None if rhs_index is None else jnp.asarray(rhs_index))


def _oracle(lhs, weights, sizes, rhs_index, epilogue) -> np.ndarray:
  """Loop over groups; f32 HIGHEST-precision dots on the (already rounded) inputs."""
  lhs = jnp.asarray(lhs, jnp.float32)
  outs, start = [], 0
  for g, size in enumerate(np.asarray(sizes)):
    e = g if rhs_index is None else int(rhs_index[g])
    rows = lhs[start:start + size]
    accs = [jnp.dot(rows, jnp.asarray(w[e], jnp.float32), precision=jax.lax.Precision.HIGHEST)
            for w in weights]
    if epilogue == "glu":
      outs.append(jax.nn.silu(accs[0]) * accs[1])
    elif epilogue == "relu":
      outs.append(jnp.maximum(accs[0], 0))
    else:
      outs.append(accs[0])
    start += size
  return np.asarray(jnp.concatenate(outs, axis=0))


def _assert_close(out, expected, dtype):
  tol = TOLERANCES[dtype]
  rows = expected.shape[0]
  got = np.asarray(jnp.asarray(out[:rows], jnp.float32))
  assert np.isfinite(got).all(), "unwritten (poisoned) or non-finite rows among the routed rows"
  np.testing.assert_allclose(got, expected, atol=tol["atol"], rtol=tol["rtol"])
  rel = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
  assert rel < tol["rel_norm"], f"relative norm error {rel:.2e} >= {tol['rel_norm']:.0e}"


def _poison_device_allocator(shape, dtype):
  """Best effort for kernels that allocate their own output: free a NaN buffer of the same size so
  the allocator is likely to hand it back, making unwritten rows show up as NaN."""
  jax.block_until_ready(jnp.full(shape, jnp.nan, dtype)).delete()


class _Suite:
  """Subclasses set `run(lhs, weights, sizes, rhs_index, epilogue)` and the K/N scale."""

  kn_scale = 1

  def run(self, lhs, weights, sizes, rhs_index, epilogue):
    raise NotImplementedError

  def check(self, case, epilogue, dtype):
    lhs, weights, sizes, rhs_index = _inputs(case, dtype, self.kn_scale, epilogue)
    out = self.run(lhs, weights, sizes, rhs_index, epilogue)
    assert out.shape == (case.m, weights[0].shape[-1]) and out.dtype == lhs.dtype
    _assert_close(out, _oracle(lhs, weights, sizes, rhs_index, epilogue), dtype)


def _parametrize(cases):
  return pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])


_by_epilogue = pytest.mark.parametrize("epilogue", EPILOGUES)
_by_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)


class TestXla(_Suite):
  """The reference implementation ("xla"), itself checked against the per-group oracle."""

  @_parametrize(CPU_CASES)
  @_by_epilogue
  @_by_dtype
  def test_matches_oracle(self, case, epilogue, dtype):
    self.check(case, epilogue, dtype)

  def run(self, lhs, weights, sizes, rhs_index, epilogue):
    return jax.jit(reference.grouped_ffn, static_argnames="epilogue")(
        lhs, tuple(weights), sizes, rhs_index, epilogue=epilogue)


class TestPallasInterpret(_Suite):
  """Portable kernel in interpret mode, with small tiles so every case has several N tiles and K
  steps; the output buffer is poisoned with NaN and written in place."""

  tiles = PortableTiles(tile_m=16, tile_n=32, tile_k=32)

  # Interpret mode costs seconds per case on a CPU: bf16 everywhere, f32 on the cases whose index
  # math differs most (ragged, partial, decode, slot pool).
  @pytest.mark.parametrize("case, dtype", [(c, jnp.bfloat16) for c in CPU_CASES] + [
      (c, jnp.float32) for c in CPU_CASES
      if c.name in ("ragged_with_zeros", "partial_rows", "decode_2_of_8", "slot_pool_g_ne_e")],
      ids=lambda x: x.name if isinstance(x, Case) else jnp.dtype(x).name)
  @_by_epilogue
  def test_matches_oracle(self, case, epilogue, dtype):
    self.check(case, epilogue, dtype)

  def run(self, lhs, weights, sizes, rhs_index, epilogue):
    poison = jnp.full((lhs.shape[0], weights[0].shape[-1]), jnp.nan, lhs.dtype)
    return portable.grouped_ffn(lhs, weights, sizes, rhs_index, epilogue=epilogue,
                                tiles=self.tiles, interpret=True, out_init=poison)


@pytest.mark.gpu
class TestPallasGpu(_Suite):
  """Portable kernel lowered through Triton, default tiles, poisoned in-place output."""

  kn_scale = 8

  @_parametrize(CPU_CASES + GPU_EXTRA_CASES)
  @_by_epilogue
  @_by_dtype
  def test_matches_oracle(self, case, epilogue, dtype):
    self.check(case, epilogue, dtype)

  def run(self, lhs, weights, sizes, rhs_index, epilogue):
    poison = jnp.full((lhs.shape[0], weights[0].shape[-1]), jnp.nan, lhs.dtype)
    return jax.jit(portable.grouped_ffn, static_argnames="epilogue")(
        lhs, tuple(weights), sizes, rhs_index, epilogue=epilogue, out_init=poison)


@pytest.mark.gpu
class TestMosaicGpu(_Suite):
  """Hopper kernel called directly (no API fallback can hide a failure); bf16 only."""

  kn_scale = 8

  @_parametrize(CPU_CASES + GPU_EXTRA_CASES)
  @_by_epilogue
  def test_matches_oracle(self, case, epilogue):
    if not hopper.is_supported_device():
      pytest.skip("needs a Hopper GPU")
    self.check(case, epilogue, jnp.bfloat16)

  @pytest.mark.parametrize("tiles", [
      HopperTiles(tile_m=128, wg_tile_n=64, grid_tile_width=8),
      HopperTiles(tile_m=128, wg_tile_n=64, max_concurrent_steps=6, grid_tile_width=2),
      HopperTiles(tile_m=64, wg_tile_n=128, max_concurrent_steps=2),
  ], ids=["wide_grid_band", "deep_pipeline", "short_wide"])
  @_by_epilogue
  def test_tile_variants(self, tiles, epilogue):
    """Variants run correctly, or are declined up front when their stages overflow shared memory
    (then the API falls back instead of failing to compile)."""
    if not hopper.is_supported_device():
      pytest.skip("needs a Hopper GPU")
    lhs, weights, sizes, rhs_index = _inputs(GPU_EXTRA_CASES[0], jnp.bfloat16, 8, epilogue)
    run = lambda: jax.jit(hopper.grouped_ffn, static_argnames=("epilogue", "tiles"))(
        lhs, tuple(weights), sizes, rhs_index, epilogue=epilogue, tiles=tiles)
    if tiles.max_concurrent_steps > hopper.max_stages(tiles.tile_m, tiles.cta_tile_n,
                                                       tiles.tile_k, len(weights)):
      with pytest.raises(NotImplementedError, match="shared memory"):
        run()
      return
    _assert_close(run(), _oracle(lhs, weights, sizes, rhs_index, epilogue), jnp.bfloat16)

  def test_f32_is_declined(self):
    lhs, weights, sizes, _ = _inputs(CPU_CASES[0], jnp.float32, self.kn_scale, "none")
    with pytest.raises(NotImplementedError):
      hopper.grouped_ffn(lhs, weights, sizes)

  def run(self, lhs, weights, sizes, rhs_index, epilogue):
    fn = jax.jit(hopper.grouped_ffn, static_argnames="epilogue")
    fn.lower(lhs, tuple(weights), sizes, rhs_index, epilogue=epilogue).compile()
    _poison_device_allocator((lhs.shape[0], weights[0].shape[-1]), lhs.dtype)
    return fn(lhs, tuple(weights), sizes, rhs_index, epilogue=epilogue)


# ---------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("seed", range(5))
def test_schedule_covers_each_routed_row_once_and_skips_empty_groups(seed):
  rng = _rng("schedule", seed)
  m, g, tile_m = int(rng.integers(2, 90)), int(rng.integers(1, 9)), 16
  sizes = _group_sizes(rng, "partial" if seed % 2 else "random_with_zeros", m, g)
  rhs_index = rng.permutation(g).astype(np.int32)
  sched = schedule.make_schedule(jnp.asarray(sizes), jnp.asarray(rhs_index), m, tile_m)
  tiles, num_tiles = np.asarray(sched.tiles), int(sched.num_tiles[0])
  assert sched.max_tiles == schedule.max_row_tiles(m, g, tile_m) >= num_tiles
  covered = np.zeros(m, np.int32)
  for expert, block, lo, hi in tiles[:num_tiles]:
    assert block * tile_m <= lo < hi <= (block + 1) * tile_m
    covered[lo:hi] += 1
  assert (covered[:sizes.sum()] == 1).all() and (covered[sizes.sum():] == 0).all()
  starts = np.cumsum(sizes) - sizes
  for expert, _, lo, _ in tiles[:num_tiles]:
    group = np.searchsorted(np.cumsum(sizes), lo, side="right")
    assert sizes[group] > 0 and expert == rhs_index[group] and lo >= starts[group]
  assert set(tiles[:num_tiles, schedule.EXPERT]) == set(rhs_index[sizes > 0])


# --------------------------------------------------------------------------------------------- API


def _api_inputs(dtype=jnp.float32, m=24, k=32, n=32, e=4):
  rng = _rng("api", m, k, n, e, str(dtype))
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), dtype)
  sizes = jnp.asarray(_group_sizes(rng, "random_with_zeros", m, e))
  return lhs, w, sizes


def test_auto_is_xla_on_cpu():
  if jax.default_backend() == "cpu":
    assert api._first_impl("auto") == "xla"


@pytest.mark.parametrize("impl", api.IMPLS)
def test_every_impl_runs_under_jit_with_traced_group_sizes(impl):
  lhs, w, sizes = _api_inputs()
  matmul = jax.jit(lambda x, w, s: pallas_kernels.grouped_matmul(x, w, s, activation="relu",
                                                                 impl=impl))
  glu = jax.jit(lambda x, w, s: pallas_kernels.grouped_glu(x, w, 2 * w, s, impl=impl))
  _assert_close(matmul(lhs, w, sizes), _oracle(lhs, [w], sizes, None, "relu"), jnp.float32)
  _assert_close(glu(lhs, w, sizes), _oracle(lhs, [w, 2 * w], sizes, None, "glu"), jnp.float32)


def test_rhs_index_selects_slots_from_a_larger_pool():
  lhs, w, _ = _api_inputs(e=6)
  sizes, slots = jnp.array([10, 0, 14], jnp.int32), jnp.array([4, 1, 0], jnp.int32)
  out = pallas_kernels.grouped_matmul(lhs, w, sizes, rhs_index=slots, impl="pallas")
  _assert_close(out, _oracle(lhs, [w], sizes, slots, "none"), jnp.float32)


def test_weights_are_cast_to_the_activation_dtype():
  lhs, w, sizes = _api_inputs()
  out = pallas_kernels.grouped_matmul(lhs.astype(jnp.bfloat16), w, sizes, impl="pallas")
  assert out.dtype == jnp.bfloat16
  expected = _oracle(lhs.astype(jnp.bfloat16), [w.astype(jnp.bfloat16)], sizes, None, "none")
  _assert_close(out, expected, jnp.bfloat16)


def test_unsupported_shape_falls_back():
  lhs, w, sizes = _api_inputs(k=24, n=40)  # not divisible by 16: the kernels decline
  with pytest.raises(NotImplementedError):
    portable.grouped_ffn(lhs, (w,), sizes, interpret=True)
  out = pallas_kernels.grouped_matmul(lhs, w, sizes, impl="mosaic")
  _assert_close(out, _oracle(lhs, [w], sizes, None, "none"), jnp.float32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="cuda"), "impl"),
    (dict(activation="gelu"), "activation"),
    (dict(rhs_index=jnp.zeros(3, jnp.int32)), "rhs_index"),
])
def test_bad_arguments_are_refused(kwargs, message):
  lhs, w, sizes = _api_inputs()
  with pytest.raises(ValueError, match=message):
    pallas_kernels.grouped_matmul(lhs, w, sizes, **kwargs)


def test_group_count_must_match_experts_without_rhs_index():
  lhs, w, _ = _api_inputs()
  with pytest.raises(ValueError, match="G"):
    pallas_kernels.grouped_matmul(lhs, w, jnp.array([24, 0], jnp.int32))


@pytest.mark.gpu
def test_auto_picks_mosaic_on_hopper():
  assert api._first_impl("auto") == ("mosaic" if hopper.is_supported_device() else "pallas")

