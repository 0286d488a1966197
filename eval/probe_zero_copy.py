"""Can compiled code read experts straight from pinned host memory, and how fast? (GPU)

  python -m eval.probe_zero_copy --out runs/probe_zero_copy    # every section, ~2 minutes on an H200
  python -m eval.probe_zero_copy --sections copy --sizes-mb 4,12.6

Sections:
  copy     per expert size: copy-engine H2D (`device_put`) vs a compiled gather from a device view of
           pinned host memory (`jaxmoe.offload.hostview`), a reduction reading the view, and both at
           once (do they share the link or add up?)
  kernels  the grouped expert FFN (each kernel implementation) reading its weights from host views vs
           from device memory: equal results, time per call
  decode   the all-resident decode step of a preset, one jitted call, against its HBM roofline
Writes OUT/probe.json and prints a table per section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.offload.hostview import device_view
from jaxmoe.offload.store import device_sharding, host_sharding

def _time(fn, repeats: int = 5) -> float:
  """Best wall seconds of fn() (which must block), after one warm-up call."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def probe_copy(sizes_mb: list[float], n_experts: int = 4) -> list[dict]:
  rows = []
  gather = jax.jit(lambda view, i: jax.lax.dynamic_index_in_dim(view, i, keepdims=False))
  reduce = jax.jit(lambda view, i: jnp.sum(jax.lax.dynamic_index_in_dim(view, i, keepdims=False)
                                           .astype(jnp.float32)))
  for mb in sizes_mb:
    n = int(mb * 2**20 / 2) // 64 * 64  # bf16 elements, rows 128-byte aligned
    rng = np.random.default_rng(0)
    layer = jax.device_put(rng.standard_normal((n_experts, n), np.float32).astype(jnp.bfloat16),
                           host_sharding())
    single = jax.device_put(np.asarray(layer[1]), host_sharding())
    view = device_view(layer, (n_experts, n), jnp.bfloat16)
    nbytes = n * 2
    dma = _time(lambda: jax.device_put(single, device_sharding()).block_until_ready())
    via_view = _time(lambda: gather(view, 2).block_until_ready())
    red = _time(lambda: reduce(view, 3).block_until_ready())
    both = _time(lambda: jax.block_until_ready((jax.device_put(single, device_sharding()),
                                                gather(view, 2))))
    exact = bool(np.array_equal(np.asarray(gather(view, 2)), np.asarray(layer[2])))
    rows.append({"mb": nbytes / 2**20, "dma_gbs": nbytes / dma / 1e9, "view_gather_gbs": nbytes / via_view / 1e9,
                 "view_reduce_gbs": nbytes / red / 1e9, "both_at_once_gbs": 2 * nbytes / both / 1e9,
                 "dma_ms": dma * 1e3, "view_gather_ms": via_view * 1e3, "exact": exact})
  return rows


def probe_kernels(shapes: dict[str, tuple[int, int, int, int]]) -> list[dict]:
  """shapes: name -> (d_model, d_ff, n_experts, top_k); one decode token routed to top_k experts."""
  from pallas_kernels.expert_ffn import api
  rows = []
  for name, (d, f, e, k) in shapes.items():
    rng = np.random.default_rng(1)
    host = {w: jax.device_put((rng.standard_normal((e,) + s, np.float32) * s[0] ** -0.5).astype(jnp.bfloat16),
                              host_sharding())
            for w, s in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d)))}
    views = {w: device_view(a, a.shape, a.dtype) for w, a in host.items()}
    dev = {w: jax.device_put(a, device_sharding()) for w, a in host.items()}
    x = jax.device_put(rng.standard_normal((k, d), np.float32).astype(jnp.bfloat16), device_sharding())
    experts = jnp.asarray(rng.choice(e, k, replace=False).astype(np.int32))
    sizes = jnp.ones((k,), jnp.int32)
    expert_bytes = 3 * d * f * 2

    for impl in ("xla", "pallas", "mosaic"):
      @jax.jit
      def ffn(w, x, experts):
        hmid = api.grouped_glu(x, w["gate"], w["up"], sizes, rhs_index=experts, impl=impl)
        return api.grouped_matmul(hmid, w["down"], sizes, rhs_index=experts, impl=impl)
      try:
        ref = np.asarray(ffn(dev, x, experts), np.float32)
        got = np.asarray(ffn(views, x, experts), np.float32)
        t_dev = _time(lambda: ffn(dev, x, experts).block_until_ready())
        t_view = _time(lambda: ffn(views, x, experts).block_until_ready())
        rows.append({"shape": name, "impl": impl, "equal": bool(np.array_equal(ref, got)),
                     "device_ms": t_dev * 1e3, "view_ms": t_view * 1e3,
                     "view_gbs": k * expert_bytes / t_view / 1e9})
      except Exception as err:  # a kernel that cannot take this shape, or host memory
        rows.append({"shape": name, "impl": impl, "error": f"{type(err).__name__}: {str(err)[:300]}"})
  return rows


def probe_decode(preset: str) -> dict:
  """`eval.bench_program.plain_decode` of a random-weight preset, with the roofline of the bytes one
  token reads (attention, the routed experts, KV) beside the one of every weight."""
  import dataclasses
  from eval.bench_program import HBM_BYTES_PER_S, plain_decode
  from jaxmoe import config, model as model_lib
  cfg = config.preset(preset)
  r = plain_decode(model_lib.create(dataclasses.replace(cfg, param_dtype=cfg.dtype), 0), 16)
  return {"preset": preset, "decode_ms": r["plain_decode_s"] * 1e3, "weight_bytes": r["weight_bytes"],
          "kv_bytes": r["kv_bytes"], "active_bytes": r["decode_read_bytes"] - r["kv_bytes"],
          "roofline_all_ms": (r["weight_bytes"] + r["kv_bytes"]) / HBM_BYTES_PER_S * 1e3,
          "roofline_active_ms": r["roofline_s"] * 1e3}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default="copy,kernels,decode", help="comma-separated: copy, kernels, decode")
  p.add_argument("--sizes-mb", default="4,12.6,50,352", help="expert sizes for the copy section")
  p.add_argument("--decode-presets", default="gpu", help="presets timed by the decode section")
  p.add_argument("--out", default="runs/probe_zero_copy", help="directory for probe.json")
  a = p.parse_args(argv)
  sections = set(a.sections.split(","))
  out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if "copy" in sections:
    out["copy"] = probe_copy([float(s) for s in a.sizes_mb.split(",")])
    print("copy: MB | dma GB/s | view gather GB/s | view reduce GB/s | both at once GB/s | exact")
    for r in out["copy"]:
      print(f"  {r['mb']:7.1f} | {r['dma_gbs']:6.1f} | {r['view_gather_gbs']:6.1f} | "
            f"{r['view_reduce_gbs']:6.1f} | {r['both_at_once_gbs']:6.1f} | {r['exact']}")
  if "kernels" in sections:
    out["kernels"] = probe_kernels({"olmoe": (2048, 1024, 64, 8), "gpu": (768, 1024, 32, 2),
                                    "mixtral": (4096, 14336, 8, 2)})
    print("kernels: shape impl | equal | device ms | view ms | view GB/s")
    for r in out["kernels"]:
      if "error" in r:
        print(f"  {r['shape']} {r['impl']}: {r['error'][:160]}")
      else:
        print(f"  {r['shape']} {r['impl']} | {r['equal']} | {r['device_ms']:.3f} | {r['view_ms']:.3f} | "
              f"{r['view_gbs']:.1f}")
  if "decode" in sections:
    out["decode"] = [probe_decode(name) for name in a.decode_presets.split(",")]
    for r in out["decode"]:
      print(f"decode {r['preset']}: {r['decode_ms']:.3f} ms/step; roofline all weights "
            f"{r['roofline_all_ms']:.3f} ms, active {r['roofline_active_ms']:.3f} ms")
  path = Path(a.out)
  path.mkdir(parents=True, exist_ok=True)
  (path / "probe.json").write_text(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
