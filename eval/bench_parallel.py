"""Expert-parallel offload benchmark: TTFT and TPOT of `ExpertParallelEngine` on n GPUs of one host
against `OffloadEngine` on one GPU, at the same expert-cache budget per GPU, plus the pinned-host ->
device bandwidth of each GPU's link measured alone and of all links copying together.

  python -m eval.bench_parallel                          # mixtral_shaped on every local GPU
  python -m eval.bench_parallel --devices 2 --budget 25 --strategies on_demand lru oracle
  python -m eval.bench_parallel --batch 8                # more experts routed per layer
  python -m eval.bench_parallel --budget-mode total      # split one budget over the GPUs instead
  python -m eval.bench_parallel --cpu-smoke              # 2 fake CPU devices, tiny preset: seconds

Prints a table and writes it with the results JSON to --out (runs/bench/bench_parallel/);
--append-docs also appends it to docs/BENCHMARKS.md's "Expert-parallel engine" section.
CPU numbers (--cpu-smoke) check that every code path runs; they are not speed measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import shlex
import sys
import time

from eval import bench_files

DEFAULT_STRATEGIES = ("on_demand", "lru", "stream_all", "oracle")
SECTION = "## Expert-parallel engine"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="mixtral_shaped", help="a jaxmoe.config preset name")
  p.add_argument("--layers", type=int, default=None, help="override the preset's n_layers")
  p.add_argument("--devices", type=int, default=None, help="GPUs in the mesh (default: all local)")
  p.add_argument("--budget", type=float, default=25.0,
                 help="expert cache per GPU, in %% of all experts (see --budget-mode)")
  p.add_argument("--budget-mode", choices=("per_gpu", "total"), default="per_gpu",
                 help="per_gpu: every GPU gets --budget (n x the cache of one GPU); total: the n GPUs "
                      "share --budget")
  p.add_argument("--prompts", type=int, nargs="+", default=[16, 512], help="prompt lengths for TTFT")
  p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded for TPOT")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
  p.add_argument("--seed", type=int, default=0)
  bench_files.add_arguments(p, "bench_parallel", SECTION)
  p.add_argument("--cpu-smoke", action="store_true",
                 help="fake --fake-devices CPU devices, tiny preset, short prompts (correctness only)")
  p.add_argument("--fake-devices", type=int, default=2, help="CPU devices faked by --cpu-smoke")
  args = p.parse_args(argv)
  if args.cpu_smoke:
    args.preset, args.prompts, args.decode_tokens = "tiny", [8], 4
  return args


def setup_backend(args):
  """--cpu-smoke: fake CPU devices; must run before jax is first imported."""
  if args.cpu_smoke:
    if "jax" in sys.modules:
      raise RuntimeError("--cpu-smoke must be set up before jax is imported")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.fake_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"


def build(args, devices):
  """Model with random weights, its experts packed into a pinned-host store partitioned by owner;
  the model keeps only its non-expert weights."""
  import jax.numpy as jnp
  from jaxmoe import config, model as model_lib
  from jaxmoe.offload import ExpertStore
  from jaxmoe.offload.parallel import partition_store

  cfg = config.preset(args.preset)
  if args.cpu_smoke:
    cfg = dataclasses.replace(cfg, kernel_impl="xla")
  if args.layers:
    cfg = dataclasses.replace(cfg, n_layers=args.layers)
  longest = max(args.prompts) + args.decode_tokens + 1
  if longest > cfg.max_seq_len:
    cfg = dataclasses.replace(cfg, max_seq_len=longest)
  model = model_lib.create(cfg, seed=args.seed)
  store = ExpertStore.from_model(model, devices[0])
  for layer in model.layers:  # from here on only the store holds experts
    for name in cfg.expert_matrices:
      param = getattr(layer.moe, name)
      param.set_value(jnp.zeros((0,), param.get_value().dtype))
  gc.collect()
  # experts owned by device 0 stay where they are; the others move to their owner's host memory
  return cfg, model, store, partition_store(store, devices)


def h2d_bandwidth(store, devices, per_device: int = 8, repeats: int = 3) -> dict:
  """Bytes/s of whole-expert pinned_host -> device copies: each device alone (its own experts over
  its own link), then every device at once (copies issued interleaved, then all awaited)."""
  import jax
  from jaxmoe.offload.parallel import owners
  from jaxmoe.offload.store import device_sharding

  cfg, n = store.cfg, len(devices)
  owner = owners(cfg.n_experts, n)
  keys = [[(layer, e) for layer in range(cfg.n_layers) for e in range(cfg.n_experts) if owner[e] == d]
          [:per_device] for d in range(n)]

  def best(work):
    out = math.inf
    for _ in range(repeats + 1):  # the first round warms up
      start = time.perf_counter()
      jax.block_until_ready(work())
      out = min(out, time.perf_counter() - start)
    return out

  def copies(d):
    return [jax.device_put(store.buffer(l, e), device_sharding(devices[d])) for l, e in keys[d]]

  alone = [len(keys[d]) * store.expert_bytes / best(lambda d=d: copies(d)) for d in range(n)]

  def together():
    issued = []
    for i in range(max(len(k) for k in keys)):
      for d in range(n):
        if i < len(keys[d]):
          layer, e = keys[d][i]
          issued.append(jax.device_put(store.buffer(layer, e), device_sharding(devices[d])))
    return issued

  total = sum(len(k) for k in keys) * store.expert_bytes
  return {"per_device_alone": alone, "all_together": total / best(together)}


def run_engine(make, prompt, tokens: int):
  """Compile on a warm-up request of the same length (speculative steps compile one program per count
  of copies a layer writes), then time one request on a cold cache."""
  with make() as engine:
    engine.generate(prompt, tokens)
    engine.reset_cache()
    _, stats = engine.generate(prompt, tokens)
  return stats


def bench(args) -> dict:
  import jax
  import numpy as np
  from jaxmoe.offload import OffloadEngine, strategies
  from jaxmoe.offload.parallel import ExpertParallelEngine
  from jaxmoe.offload.program import PLANNED

  unsupported = set(args.strategies) - (set(strategies.NAMES) - {"learned", "resident", "hybrid"})
  if unsupported:
    raise ValueError(f"strategies {sorted(unsupported)} are not benchmarked here (learned needs a "
                     f"trained predictor; resident, a budget that holds every expert; hybrid, "
                     f"ProgramEngine)")
  start = time.perf_counter()
  devices = jax.local_devices()[:args.devices] if args.devices else jax.local_devices()
  n = len(devices)
  cfg, model, store, parted = build(args, devices)
  bandwidth = h2d_bandwidth(parted, devices)
  total_budget = args.budget / 100 * store.nbytes
  per_gpu_single = int(total_budget)
  per_gpu_parallel = int(total_budget / n) if args.budget_mode == "total" else int(total_budget)
  print(f"{cfg.n_layers} layers x {cfg.n_experts} experts of {store.expert_bytes / 1e6:.1f} MB on "
        f"{n} x {devices[0].device_kind}; H2D GB/s alone "
        f"{[round(b / 1e9, 1) for b in bandwidth['per_device_alone']]}, together "
        f"{bandwidth['all_together'] / 1e9:.1f}", flush=True)
  rng = np.random.default_rng(args.seed)
  tokens = args.decode_tokens + 1
  rows = []
  for length in args.prompts:
    prompt = rng.integers(0, cfg.vocab_size, (args.batch, length))
    routing = None
    for name in sorted(args.strategies, key=lambda s: s in PLANNED):
      if name in ("oracle", "noisy_oracle") and routing is None:
        raise ValueError(f"{name} replays a recorded routing: list a non-oracle strategy before it")
      strategy = lambda: strategies.make(name, n_experts=cfg.n_experts, routing=routing)
      single = run_engine(lambda: OffloadEngine(model, cache_bytes=per_gpu_single, strategy=strategy(),
                                                store=store, device=devices[0]), prompt, tokens)
      routing = routing or single.routing
      par = run_engine(lambda: ExpertParallelEngine(
          model, cache_bytes_per_device=per_gpu_parallel, strategy=strategy(), devices=devices,
          store=parted), prompt, tokens)
      decode_bytes = [sum(c.nbytes for c in copies if c.step > 0) for copies in par.device_copies]
      row = {"strategy": name, "prompt": length,
             "single": {"ttft_s": single.ttft_s, "tpot_s": single.tpot_s,
                        "bytes_copied": single.bytes_copied},
             "parallel": {"ttft_s": par.ttft_s, "tpot_s": par.tpot_s,
                          "bytes_copied_per_device": par.bytes_copied_per_device,
                          "decode_bytes_per_device": decode_bytes,
                          "misses_per_device": [sum(m) for m in par.device_misses]},
             "ttft_speedup": single.ttft_s / par.ttft_s, "tpot_speedup": single.tpot_s / par.tpot_s,
             # the busiest link's decode bytes per token over its own measured bandwidth
             "parallel_tpot_bound_s": max(b / bw for b, bw in zip(decode_bytes,
                                                                   bandwidth["per_device_alone"]))
                                      / max(1, tokens - 1)}
      rows.append(row)
      print(format_row(row), flush=True)
  return {"date": datetime.date.today().isoformat(),
          "command": "python -m eval.bench_parallel " + shlex.join(sys.argv[1:]),
          "preset": args.preset, "n_layers": cfg.n_layers, "devices": n,
          "device_kind": devices[0].device_kind, "budget_pct": args.budget,
          "budget_mode": args.budget_mode, "cache_bytes_single": per_gpu_single,
          "cache_bytes_per_device": per_gpu_parallel, "store_bytes": store.nbytes,
          "h2d_bytes_per_s": bandwidth, "rows": rows, "wall_s": time.perf_counter() - start}


HEADER = ("strategy", "prompt", "TTFT 1 GPU ms", "TTFT n GPU ms", "x", "TPOT 1 GPU ms",
          "TPOT n GPU ms", "x", "n-GPU TPOT bound ms", "MB copied per GPU")


def format_row(row) -> str:
  s, p = row["single"], row["parallel"]
  return " | ".join([row["strategy"], str(row["prompt"]), f"{s['ttft_s'] * 1e3:.1f}",
                     f"{p['ttft_s'] * 1e3:.1f}", f"{row['ttft_speedup']:.2f}",
                     f"{s['tpot_s'] * 1e3:.2f}", f"{p['tpot_s'] * 1e3:.2f}",
                     f"{row['tpot_speedup']:.2f}", f"{row['parallel_tpot_bound_s'] * 1e3:.2f}",
                     "/".join(f"{b / 1e6:.1f}" for b in p["bytes_copied_per_device"])])


def markdown(result) -> str:
  bw = result["h2d_bytes_per_s"]
  lines = [f"### {result['date']}: {result['devices']} x {result['device_kind']}, {result['preset']} "
           f"({result['n_layers']} layers), cache {result['budget_pct']:g}% of the experts "
           f"({result['budget_mode']})", "",
           f"`{result['command']}`; H2D GB/s per device alone "
           f"{', '.join(f'{b / 1e9:.1f}' for b in bw['per_device_alone'])}, all together "
           f"{bw['all_together'] / 1e9:.1f}.", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  lines += ["| " + format_row(row) + " |" for row in result["rows"]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  setup_backend(args)
  print(" | ".join(HEADER))
  result = bench(args)
  print(f"wall time {result['wall_s']:.0f} s")
  table = markdown(result)
  print("wrote", *bench_files.write(args.out, result, table))
  if args.append_docs:
    bench_files.append_to_section(args.append_docs, SECTION, table)
  return result


if __name__ == "__main__":
  main()
