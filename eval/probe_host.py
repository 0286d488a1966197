"""Host-side costs the offload engine is built around: how long the host is held by each way of getting
a small array to the device, when the device is idle, busy with queued compute, or busy with queued
expert copies; and what a small device-to-host read costs.

  python -m eval.probe_host                   # on the machine's default device
  python -m eval.probe_host --out probe.json  # also write the numbers

Per situation and way, two times from the start of the call (median of --repeats):
`returns` = when the Python call gave the host back, `ready` = when its result was on the device. A
way that `returns` late holds the host while the device works, so the engine cannot run ahead of the
device through it. The ways: a numpy argument of a jitted call, `jax.device_put` of numpy, a
`device_put` from a small pinned-host array, and a device array (nothing to move, the baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.offload.store import device_sharding, host_sharding

SITUATIONS = ("idle", "behind compute", "behind copies")
WAYS = ("numpy jit argument", "device_put(numpy)", "device_put(pinned host)", "device array")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--compute-size", type=int, default=8192,
                 help="side of the square matmuls queued as 'compute' (default 8192: ~3 ms each on "
                      "an H200)")
  p.add_argument("--compute-steps", type=int, default=3, help="matmuls queued before the probe")
  p.add_argument("--copies", type=int, default=64, help="expert-sized copies queued before the probe")
  p.add_argument("--copy-mib", type=float, default=4.5, help="size of one queued copy (MiB)")
  p.add_argument("--repeats", type=int, default=5, help="measurements per cell (the median is kept)")
  p.add_argument("--out", default=None, help="write the numbers as JSON here")
  return p.parse_args(argv)


def probe(args) -> dict:
  dev, host = device_sharding(), host_sharding()
  tiny = jax.jit(lambda v: v + 1)
  small_np = np.zeros((1, 8), np.int32)
  small_dev = jax.device_put(small_np, dev)
  small_pinned = jax.device_put(small_np, host)
  big = jax.device_put(jnp.ones((args.compute_size,) * 2, jnp.bfloat16), dev)
  matmul = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
  n = int(args.copy_mib * 2**20 // 4)
  experts = jax.block_until_ready([jax.device_put(jnp.full((n,), i, jnp.float32), host)
                                   for i in range(args.copies)])
  ways = {"numpy jit argument": lambda: tiny(small_np),
          "device_put(numpy)": lambda: tiny(jax.device_put(small_np, dev)),
          "device_put(pinned host)": lambda: tiny(jax.device_put(small_pinned, dev)),
          "device array": lambda: tiny(small_dev)}

  def queue(situation):
    if situation == "behind compute":
      return [matmul(big) for _ in range(args.compute_steps)]
    if situation == "behind copies":
      return jax.device_put(experts, dev)
    return []

  for way in ways.values():  # compile and warm every path
    jax.block_until_ready(way())
  jax.block_until_ready(queue("behind compute"))
  cells = {}
  for situation in SITUATIONS:
    for name, way in ways.items():
      returns, ready = [], []
      for _ in range(args.repeats):
        queued = queue(situation)
        start = time.perf_counter()
        out = way()
        returns.append(time.perf_counter() - start)
        out.block_until_ready()
        ready.append(time.perf_counter() - start)
        jax.block_until_ready(queued)
        del queued
      cells[f"{situation} | {name}"] = {"returns_ms": 1e3 * statistics.median(returns),
                                        "ready_ms": 1e3 * statistics.median(ready)}
  # what the queued work itself takes, for scale
  scale = {}
  for situation in SITUATIONS[1:]:
    start = time.perf_counter()
    jax.block_until_ready(queue(situation))
    scale[situation] = 1e3 * (time.perf_counter() - start)
  reads = []
  for _ in range(max(20, args.repeats)):
    out = tiny(small_dev).block_until_ready()
    start = time.perf_counter()
    np.asarray(out)
    reads.append(time.perf_counter() - start)
  return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "cells": cells, "queued_ms": scale, "small_read_ms": 1e3 * statistics.median(reads)}


def table(result) -> str:
  lines = [f"device: {result['device']}; queued compute takes {result['queued_ms']['behind compute']:.2f}"
           f" ms, queued copies {result['queued_ms']['behind copies']:.2f} ms; a small "
           f"device-to-host read {result['small_read_ms']:.3f} ms",
           "| situation | way | host back after ms | on device after ms |", "|---|---|---|---|"]
  for key, cell in result["cells"].items():
    situation, way = key.split(" | ")
    lines.append(f"| {situation} | {way} | {cell['returns_ms']:.3f} | {cell['ready_ms']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = probe(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  print(table(result))
  return result


if __name__ == "__main__":
  main()
