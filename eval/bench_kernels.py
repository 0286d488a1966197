"""Benchmark of the grouped expert kernels on the GPU: time, TFLOP/s, TB/s, share of the ceilings.

Compares every implementation of `pallas_kernels` with XLA's ragged_dot and with JAX's own Mosaic GPU
ragged_dot (plus the activation in XLA) at MoE layer shapes.

  python3 -m eval.bench_kernels                         # full table (GPU)
  python3 eval/bench_kernels.py                         # the same
  python3 -m eval.bench_kernels --quick --sweep         # a few shapes, plus Mosaic tile variants
  python3 -m eval.bench_kernels --family olmoe --impls xla,mosaic
  python3 -m eval.bench_kernels --family tiny --iterations 2   # CPU smoke test of this script

Prints a table and writes it with the results JSON to --out (runs/bench/bench_kernels/);
--append-docs also appends it to docs/BENCHMARKS.md's "Expert kernels" section. On a CPU only xla and
auto run: the GPU kernels' rows say "not on CPU".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from eval import bench_files
from pallas_kernels.expert_ffn import hopper, portable
from pallas_kernels.expert_ffn.config import HopperTiles

# Ceilings measured on the H200 (docs/FACTS): dense bf16 matmul through cuBLAS, device-to-device copy.
BF16_TFLOPS = 790.0
HBM_TBS = 4.3  # bytes read + written per second
L2_BYTES = 50 * 2**20
SECTION = "## Expert kernels"
GPU_ONLY = ("jax_mgpu", "pallas", "mosaic")  # timed as compiled GPU kernels, so never on another backend


@dataclasses.dataclass(frozen=True)
class Shape:
  family: str  # "mixtral", "olmoe", "gpu_preset"
  tokens: int
  k: int  # d_model
  n: int  # d_ff
  experts: int
  top_k: int
  epilogue: str  # "relu" (up projection + ReLU) or "glu" (SwiGLU gate and up)

  @property
  def rows(self) -> int:
    return self.tokens * self.top_k

  @property
  def name(self) -> str:
    return f"{self.family} t={self.tokens} {self.epilogue}"


def _preset_shape() -> tuple[int, int, int, int]:
  """(d_model, d_ff, n_experts, top_k) of the project's `gpu` preset, or its values if absent."""
  try:
    from jaxmoe import config
    cfg = config.gpu()
    return cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k
  except Exception:  # the model package is optional for this benchmark
    return 1024, 2048, 32, 2


def shapes(quick: bool, family: str | None = None) -> list[Shape]:
  if family == "tiny":  # a CPU smoke test of this script
    return [Shape("tiny", 8, 64, 256, 4, 2, epi) for epi in ("relu", "glu")]
  d, f, e, k = _preset_shape()
  families = [("mixtral", (1, 16, 64, 512, 2048, 4096), (4096, 14336, 8, 2)),
              ("olmoe", (1, 64, 2048), (2048, 1024, 64, 8)),
              ("gpu_preset", (1, 64, 4096), (d, f, e, k))]
  out = []
  for name, tokens, dims in families[:2] if quick else families:
    for t in (tokens[0], tokens[-1]) if quick else tokens:
      out += [Shape(name, t, *dims, epi) for epi in ("relu", "glu")]
  return [s for s in out if family in (None, s.family)]


def group_sizes(shape: Shape, rng) -> np.ndarray:
  """Each token routed to top_k distinct experts chosen uniformly at random."""
  counts = np.zeros(shape.experts, np.int32)
  for _ in range(shape.tokens):
    counts[rng.choice(shape.experts, shape.top_k, replace=False)] += 1
  return counts


def work(shape: Shape, sizes: np.ndarray) -> tuple[float, float]:
  """(FLOPs, bytes) the layer must do: routed rows only, each non-empty expert's weights read once."""
  mats = 2 if shape.epilogue == "glu" else 1
  flops = 2.0 * shape.rows * shape.k * shape.n * mats
  weight_bytes = int((sizes > 0).sum()) * shape.k * shape.n * 2 * mats
  return flops, weight_bytes + shape.rows * (shape.k + shape.n) * 2


def _jax_mgpu_fn(shape: Shape):
  """JAX's own Mosaic GPU ragged_dot (FACTS config) with the activation done by XLA, or None."""
  try:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  except ImportError:
    return None
  dot = functools.partial(ragged_dot_mgpu.ragged_dot, block_m=128, block_n=128, block_k=64,
                          max_concurrent_steps=5, grid_block_n=1)

  def fn(x, ws, sizes):
    if shape.epilogue == "glu":
      g, u = (dot(x, w, group_sizes=sizes).astype(jnp.float32) for w in ws)
      return (jax.nn.silu(g) * u).astype(x.dtype)
    return jnp.maximum(dot(x, ws[0], group_sizes=sizes), 0)
  return fn


def _impl_fn(shape: Shape, impl: str, tiles: HopperTiles | None = None):
  if impl == "jax_mgpu":
    return _jax_mgpu_fn(shape)
  if impl == "mosaic":  # called directly: a declined shape is reported, not silently replaced
    return lambda x, ws, s: hopper.grouped_ffn(x, ws, s, epilogue=shape.epilogue, tiles=tiles)
  if impl == "pallas":
    return lambda x, ws, s: portable.grouped_ffn(x, ws, s, epilogue=shape.epilogue)
  if shape.epilogue == "glu":
    return lambda x, ws, s: pallas_kernels.grouped_glu(x, ws[0], ws[1], s, impl=impl)
  return lambda x, ws, s: pallas_kernels.grouped_matmul(x, ws[0], s, activation="relu", impl=impl)


def _device_times_ms(fn, args, iterations: int) -> list[float]:
  """Per-iteration device time of all kernels fn launches (CUPTI), or wall time as a fallback."""
  try:
    from jax.experimental.mosaic.gpu import profiler
    _, times = profiler.measure(fn, iterations=iterations)(*args)
    if times is not None:
      return list(times) if isinstance(times, list) else [times]
  except Exception as e:  # CUPTI unavailable: fall back to synchronised wall clock
    print(f"  (CUPTI timing unavailable: {type(e).__name__}; using wall clock)", file=sys.stderr)
  out = []
  for _ in range(iterations):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append((time.perf_counter() - t0) * 1e3)
  return out


def measure(shape: Shape, impl: str, sizes, inputs, iterations: int, tiles=None) -> dict:
  backend = jax.default_backend()
  if impl in GPU_ONLY and backend != "gpu":
    return {"skipped": f"not on {backend.upper()}"}
  fn = _impl_fn(shape, impl, tiles)
  if fn is None:
    return {"error": "unavailable"}
  copies = len(inputs)

  @jax.jit
  def run_all(copies_in, s):  # several input copies so repeated runs do not hit L2
    return [fn(x, ws, s) for x, ws in copies_in]

  try:
    s = jnp.asarray(sizes)
    jax.block_until_ready(run_all(inputs, s))  # compile, autotune, warm up
    times = _device_times_ms(run_all, (inputs, s), iterations)
  except Exception as e:
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
  ms = statistics.median(times) / copies
  flops, nbytes = work(shape, sizes)
  floor_ms = max(flops / (BF16_TFLOPS * 1e12), nbytes / (HBM_TBS * 1e12)) * 1e3
  tflops, tbs = flops / ms / 1e9, nbytes / ms / 1e9
  return {"ms": ms, "tflops": tflops, "tbs": tbs, "tflops_pct": 100 * tflops / BF16_TFLOPS,
          "tbs_pct": 100 * tbs / HBM_TBS, "roofline_pct": 100 * floor_ms / ms,
          "spread_ms": (max(times) - min(times)) / copies, "copies": copies}


def make_inputs(shape: Shape, rng, copies: int):
  mats = 2 if shape.epilogue == "glu" else 1
  key = jax.random.key(int(rng.integers(1 << 30)))
  out = []
  for c in range(copies):
    kx, kw = jax.random.split(jax.random.fold_in(key, c))
    x = jax.random.normal(kx, (shape.rows, shape.k), jnp.bfloat16)
    ws = tuple((jax.random.normal(k, (shape.experts, shape.k, shape.n), jnp.bfloat16)
                * (shape.k ** -0.5)).astype(jnp.bfloat16) for k in jax.random.split(kw, mats))
    out.append((x, ws))
  return out


def _copies_for(shape: Shape, sizes) -> int:
  _, nbytes = work(shape, sizes)
  return int(min(4, max(1, np.ceil(3 * L2_BYTES / nbytes))))


SWEEP_SHAPES = {("mixtral", 512), ("mixtral", 2048), ("mixtral", 4096), ("olmoe", 2048),
                ("gpu_preset", 4096)}


def sweep_variants(shape: Shape) -> list[tuple[str, HopperTiles]]:
  """Mosaic tile variants around the default for this shape (for tuning the defaults)."""
  base = hopper.default_tiles(shape.rows, shape.k, shape.n, shape.epilogue == "glu",
                              shape.experts)
  if base.tile_m == 64:
    return []
  return [(f"m:w{w}", dataclasses.replace(base, grid_tile_width=w)) for w in (2, 8)]


def _row(shape, impl, r, base):
  if "ms" not in r:
    return f"{shape.name:<26} {impl:<8} {r.get('skipped') or r['error']}"
  ratios = " ".join(f"{b['ms'] / r['ms']:5.2f}x" if b and "ms" in b else "   n/a"
                    for b in (base.get("xla"), base.get("jax_mgpu")))
  return (f"{shape.name:<26} {impl:<8} {r['ms']:9.4f} {r['tflops']:7.1f} {r['tbs']:6.2f} "
          f"{r['roofline_pct']:5.1f}% {ratios}")


TABLE_HEAD = ("shape", "impl", "ms", "TFLOP/s", "TB/s", "roofline %", "vs xla", "vs jax_mgpu")


def markdown(result: dict) -> str:
  """The records as a markdown table under a line saying where and how they were measured."""
  lines = [f"### {result['date']} on {result['device']} (jax {result['jax']})", "",
           f"`{result['command']}`; ceilings {BF16_TFLOPS:g} TFLOP/s bf16, {HBM_TBS:g} TB/s HBM. "
           "ms: median device time per layer call; roofline %: the larger of the FLOP and byte "
           "floors over the time.", "",
           "| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
  for r in result["records"]:
    if "ms" not in r:
      cells = [r.get("skipped") or r["error"]] + [""] * 5
    else:
      cells = [f"{r['ms']:.4f}", f"{r['tflops']:.1f}", f"{r['tbs']:.2f}", f"{r['roofline_pct']:.1f}"]
      cells += [f"{r[k]:.2f}x" if k in r else "n/a" for k in ("speedup_vs_xla", "speedup_vs_jax_mgpu")]
    lines.append("| " + " | ".join([r["name"], r["impl"]] + cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_files.add_arguments(p, "bench_kernels", SECTION)
  p.add_argument("--impls", default="xla,jax_mgpu,pallas,mosaic",
                 help="comma-separated: xla, jax_mgpu, pallas, mosaic, auto")
  p.add_argument("--iterations", type=int, default=20, help="timed repeats (median reported)")
  p.add_argument("--quick", action="store_true", help="a few shapes only")
  p.add_argument("--sweep", action="store_true", help="also time Mosaic tile variants")
  p.add_argument("--sweep-only", action="store_true", help="only the shapes that have a sweep")
  p.add_argument("--family", default=None,
                 help="only shapes of this family: mixtral, olmoe, gpu_preset (tiny: CPU smoke test)")
  p.add_argument("--time-budget", type=float, default=1e9, help="stop starting shapes after s")
  args = p.parse_args(argv)
  t_start = time.time()
  rng = np.random.default_rng(0)
  impls = args.impls.split(",")
  records = []
  command = shlex.join(sys.argv[1:] if argv is None else argv)
  result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": f"python3 -m eval.bench_kernels {command}",
            "ceilings": {"bf16_tflops": BF16_TFLOPS, "hbm_tbs": HBM_TBS},
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, "records": records}
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; ceilings: "
        f"{BF16_TFLOPS} TFLOP/s bf16, {HBM_TBS} TB/s HBM (read+write)")
  print(f"{'shape':<26} {'impl':<8} {'ms':>9} {'TFLOP/s':>7} {'TB/s':>6} {'roof':>6} "
        f"{'vs xla':>6} {'vs jax_mgpu':>6}")
  for shape in shapes(args.quick, args.family):
    if args.sweep_only and (shape.family, shape.tokens) not in SWEEP_SHAPES:
      continue
    if time.time() - t_start > args.time_budget:
      print("time budget reached; stopping")
      break
    sizes = group_sizes(shape, rng)
    inputs = make_inputs(shape, rng, _copies_for(shape, sizes))
    base = {}
    variants = [(impl, None) for impl in impls]
    if args.sweep and (shape.family, shape.tokens) in SWEEP_SHAPES:
      variants += sweep_variants(shape)
    for impl, tiles in variants:
      r = measure(shape, impl if tiles is None else "mosaic", sizes, inputs, args.iterations, tiles)
      if impl in ("xla", "jax_mgpu"):
        base[impl] = r
      rec = {**dataclasses.asdict(shape), "name": shape.name, "rows": shape.rows, "impl": impl,
             "tiles": None if tiles is None else dataclasses.asdict(tiles),
             "nonempty_groups": int((sizes > 0).sum()), **r}
      for b in ("xla", "jax_mgpu"):
        if "ms" in r and "ms" in base.get(b, {}):
          rec[f"speedup_vs_{b}"] = base[b]["ms"] / r["ms"]
      records.append(rec)
      print(_row(shape, impl, r, base), flush=True)
      bench_files.write(args.out, result, markdown(result))  # after each row: a cut run keeps its rows
    del inputs
  print("wrote", *bench_files.write(args.out, result, markdown(result)))
  if args.append_docs:
    bench_files.append_to_section(args.append_docs, SECTION, markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
