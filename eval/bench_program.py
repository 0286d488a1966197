"""Engine v2 (`ProgramEngine`, one compiled program per step) against the per-layer engine and bounds.

  python -m eval.bench_program                                  # gpu, olmoe_shaped, mixtral_shaped (GPU)
  python -m eval.bench_program --presets olmoe_shaped --layers 8 --cache-fractions 0.1,0.25,0.5
  python -m eval.bench_program --presets tiny --new-tokens 4 --prompt-lengths 8   # CPU smoke test
  python -m eval.bench_program --presets gpu --strategies lru,oracle,learned --predictor P --engines v2

Per preset (random weights, bf16 on a GPU): the plain jitted decode step of `jaxmoe.generate` beside
its HBM roofline, the H2D rate, the host's DRAM read rate and its expert FFN rate (weight bytes per
second, one row); then per strategy, engine and cache fraction TTFT (each prompt length) and per-token
time, with the host's time per decode step dispatching it (`disp`) and waiting for the device
(`wait`: near zero, the host is the bottleneck), each against its bound (`eval.analytic.StepCost` on
the bytes the request moved per decode token: compute of the v2 resident step, copies issued ahead
hidden behind it, bytes fetched after the router chose added at the measured H2D bandwidth;
`hybrid`'s experts computed on the host added at the host's expert rate), and exactness against the
v2 resident run. `hybrid` runs with host compute forced
on (v2 only), so it measures the host path whatever `auto` would choose.
Random-weight models may repeat one token, which flatters caches: the distinct-token share of each
continuation is reported beside it. `learned` needs --predictor, a predictor directory trained on traces
of the same preset's model (`train.collect_traces --preset P`; on v2 a lead-0 predictor plans inside the
step, in place, and `train_predictor --lead 2` plans on the host, which can copy ahead).
Writes OUT/results.json and OUT/table.md; prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eval import analytic, cli, pipeline
from jaxmoe import config, generate as gen, model as model_lib
from jaxmoe.offload import ExpertStore, OffloadEngine, host_experts, strategies
from jaxmoe.offload.program import MIN_COPY_BYTES, PLANNED, ProgramEngine
from jaxmoe.offload.store import measure_h2d_bandwidth

HBM_BYTES_PER_S = 4.3e12  # H200 device-to-device copy (read + write), measured


def plain_decode(model, prompt_len: int, repeats: int = 20) -> dict:
  """Best time of one jitted decode step of the all-resident model, and its HBM roofline (the bytes one
  token's step reads: routed experts only)."""
  from flax import nnx
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  cache = model_lib.init_cache(cfg, 1)
  _, cache = gen._forward(graphdef, state, jnp.zeros((1, prompt_len), jnp.int32), cache)
  one = jnp.zeros((1, 1), jnp.int32)
  gen._forward(graphdef, state, one, cache)[0].block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    gen._forward(graphdef, state, one, cache)[0].block_until_ready()
    best = min(best, time.perf_counter() - t0)
  weights = sum(x.nbytes for x in jax.tree.leaves(state))
  kv = sum(x.nbytes for x in jax.tree.leaves(cache))
  # a batch-1 step reads every non-expert weight, the top_k routed experts of each layer and the KV cache
  read = weights - cfg.n_layers * (cfg.n_experts - cfg.top_k) * cfg.expert_bytes + kv
  return {"plain_decode_s": best, "weight_bytes": weights, "kv_bytes": kv, "decode_read_bytes": read,
          "roofline_s": read / HBM_BYTES_PER_S}


def _request(engine, prompt, new_tokens: int, repeats: int):
  """The median-TPOT request of the main job's timed cold-cache requests, and the median TTFT."""
  runs = pipeline.timed_requests(engine, prompt, new_tokens, repeats)
  return runs[(len(runs) - 1) // 2], float(np.median([st.ttft_s for _, st in runs]))


def bench_preset(name: str, layers: int | None, cache_fractions, prompt_lengths, new_tokens: int,
                 repeats: int, engines: list[str], names: list[str], predictor=None,
                 plan_copies=("auto",), log=print, host_backend: str | None = None,
                 command_buffers=(False,)) -> dict:
  cfg = config.preset(name)
  cfg = dataclasses.replace(cfg, param_dtype=cfg.dtype, n_layers=layers or cfg.n_layers)
  model = model_lib.create(cfg, 0)
  out = {"preset": name, "config": cfg.to_dict(), "plan_copies": list(plan_copies),
         "command_buffers": list(command_buffers),
         **plain_decode(model, max(prompt_lengths))}
  store = ExpertStore.from_model(model)
  bandwidth = measure_h2d_bandwidth(store)
  host = host_experts.HostExperts.of(store, host_backend)  # the one `hybrid` computes on
  host_rate = host.bytes_per_s()
  out.update(h2d_bytes_per_s=bandwidth, host_read_bytes_per_s=host_experts.read_bytes_per_s(store),
             host_expert_bytes_per_s=host_rate, host_backend=host.backend,
             host_threads=host.threads, host_label=host.label, store_bytes=store.nbytes)
  rng = np.random.default_rng(0)
  prompts = {p: rng.integers(0, cfg.vocab_size, (1, p)).astype(np.int32) for p in prompt_lengths}
  p0 = min(prompt_lengths)
  reference = ProgramEngine(model, strategy="resident", store=store)
  ref = {p: reference.generate(prompts[p], new_tokens) for p in prompt_lengths}
  compute_s = _request(reference, prompts[p0], new_tokens, repeats)[0][1].tpot_s
  del reference
  # strategies with plans run once per copy mode on v2 (v1 always copies its plans), and every v2
  # strategy once per command-buffer mode
  modes = lambda e, s: plan_copies if e == "v2" and s in PLANNED else ("auto",)
  graphs = lambda e: command_buffers if e == "v2" else (False,)
  runs = [(e, s, f, c, g) for e in engines for s in names
          for f in ([None] if s == "resident" else cache_fractions) for c in modes(e, s) for g in graphs(e)
          if not (e == "v1" and s == "hybrid")]  # v1 runs every expert on the device
  rows = []
  for engine_name, strategy, fraction, copies, graphed in runs:
    cache_bytes = None if fraction is None else max(int(fraction * store.nbytes),
                                                    cfg.n_experts * cfg.expert_bytes)

    def make():
      s = strategy
      if strategy == "oracle":
        s = strategies.make("oracle", n_experts=cfg.n_experts, routing=ref[p][1].routing)
      if strategy == "learned":
        s = strategies.make("learned", n_experts=cfg.n_experts, predictor=predictor)
      if strategy == "hybrid":
        s = strategies.make("hybrid", n_experts=cfg.n_experts, host_compute="always")
      if engine_name == "v2":
        return ProgramEngine(model, cache_bytes=cache_bytes, strategy=s, store=store,
                             plan_copies=copies, host_backend=host_backend, command_buffers=graphed)
      return OffloadEngine(model, cache_bytes=cache_bytes, strategy=s, store=store)
    row = {"engine": engine_name, "strategy": strategy, "cache_fraction": fraction,
           "cache_bytes": cache_bytes, "plan_copies": None, "command_buffers": graphed}
    try:
      for p in prompt_lengths:
        eng = make()
        if strategy in PLANNED:  # as the engine resolved it ("auto": by the expert size)
          row["plan_copies"] = getattr(eng, "plan_copies", True)
        (tokens, stats), ttft = _request(eng, prompts[p], new_tokens, repeats)
        eng.close()
        row[f"ttft_s_{p}"] = ttft
        if p == p0:
          ahead, on_demand = _decode_bytes(stats)
          row.update(tpot_s=stats.tpot_s, bytes_per_token=(ahead + on_demand) / (new_tokens - 1),
                     prefetched_per_token=ahead / (new_tokens - 1),
                     on_demand_per_token=on_demand / (new_tokens - 1),
                     host_per_token=stats.host_experts * cfg.expert_bytes / (new_tokens - 1),
                     distinct_tokens=len(set(tokens[0, p:].tolist())) / new_tokens,
                     hits=sum(stats.hits), misses=sum(stats.misses), host_experts=stats.host_experts,
                     host_split_s=dict(stats.host_split_s))
        row.setdefault("tokens_equal", True)
        row["tokens_equal"] &= bool(np.array_equal(tokens, ref[p][0]))
        row["max_logit_diff"] = max(row.get("max_logit_diff", 0.0),
                                    float(np.max(np.abs(stats.logits - ref[p][1].logits))))
    except Exception as err:  # one failing configuration must not lose the others
      row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    # bound: the analytic model on the bytes this request moved per decode token: copies issued
    # ahead hide behind the compute, bytes fetched after the router chose do not; experts computed
    # on the host hold up their layer
    if "tpot_s" in row:
      row["bound_s"] = analytic.StepCost(compute_s + row["host_per_token"] / host_rate,
                                         row["prefetched_per_token"], row["on_demand_per_token"],
                                         bandwidth).predicted_s
      row["vs_bound"] = row["tpot_s"] / row["bound_s"]
    rows.append(row)
    log(_row_line(name, row))
  out.update(compute_s=compute_s, rows=rows)
  return out


def _decode_bytes(stats) -> tuple[int, int]:
  """Expert bytes that crossed the link during the decode steps (the prompt's left out): (copied
  ahead of the step, fetched after its router chose: demand copies and reads of host memory)."""
  decode = [c for c in stats.copies if c.step > 0]
  demand = sum(c.nbytes for c in decode if c.reason == "demand")
  return sum(c.nbytes for c in decode) - demand, demand + sum(stats.step_read_bytes[1:])


def _label(r: dict) -> str:
  """A row's strategy, marked `/inpl` where its plan only evicted (routed misses read in place) and
  `+cb` where its step ran in command buffers."""
  return (r["strategy"] + ("/inpl" if r.get("plan_copies") is False else "")
          + ("+cb" if r.get("command_buffers") else ""))


def _row_line(preset: str, r: dict) -> str:
  cache = "all" if r["cache_fraction"] is None else f"{r['cache_fraction']:g}"
  if "error" in r:
    return f"{preset:<15}{r['engine']:<4}{_label(r):<16}{cache:>6} {r['error']}"
  ttfts = " ".join(f"{k[7:]}:{v * 1e3:.1f}" for k, v in r.items() if k.startswith("ttft_s_"))
  return (f"{preset:<15}{r['engine']:<4}{_label(r):<16}{cache:>6}{r['tpot_s'] * 1e3:>8.2f}"
          f"{r['bound_s'] * 1e3:>8.2f}{r['vs_bound']:>6.2f}x {ttfts:<22}{'yes' if r['tokens_equal'] else 'NO':>4}"
          f"{r['max_logit_diff']:>9.3g}{r['distinct_tokens']:>6.2f}{r['bytes_per_token'] / 2**20:>9.1f}"
          f"{r['host_per_token'] / 2**20:>9.1f}{_host_ms(r, 'dispatch')}{_host_ms(r, 'wait')}")


def _host_ms(r: dict, part: str) -> str:
  """A decode step's host time in `part` (v2: `OffloadStats.host_split_s`), ms; '-' where not timed."""
  split = r.get("host_split_s") or {}
  return f"{split[part] * 1e3:>7.2f}" if part in split else f"{'-':>7}"


HEADER = (f"{'preset':<15}{'eng':<4}{'strategy':<16}{'cache':>6}{'tok ms':>8}{'bound':>8}{'ratio':>7} "
          f"{'TTFT ms by prompt':<22}{'eq':>4}{'max dlog':>9}{'dist':>6}{'MiB/tok':>9}{'host MiB':>9}{'disp':>7}{'wait':>7}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", default="gpu,olmoe_shaped,mixtral_shaped",
                 help="comma-separated model presets (random weights)")
  p.add_argument("--layers", type=cli.positive_int, default=None,
                 help="override every preset's layer count (default: gpu 12, olmoe_shaped 8, mixtral 8)")
  p.add_argument("--mixtral-layers", type=cli.positive_int, default=4, help="layers of mixtral_shaped (host memory)")
  p.add_argument("--cache-fractions", type=cli.fraction_list, default=(0.25,),
                 help="comma-separated device expert caches / all experts' bytes (each strategy but "
                      "resident runs at each)")
  p.add_argument("--prompt-lengths", type=cli.positive_int_list, default=(16, 256),
                 help="comma-separated prompt lengths (TTFT)")
  p.add_argument("--new-tokens", type=cli.int_at_least(2), default=16, help="tokens generated per request")
  p.add_argument("--repeats", type=cli.positive_int, default=3,
                 help="timed cold-cache requests (median reported)")
  p.add_argument("--engines", default="v2,v1", help="v2 (ProgramEngine) and/or v1 (OffloadEngine)")
  p.add_argument("--strategies", default="resident,on_demand,lru,oracle",
                 help="comma-separated (hybrid: host compute forced on, v2 only)")
  p.add_argument("--predictor", help="predictor directory for the learned strategy (train_predictor)")
  p.add_argument("--plan-copies", type=cli.word_list(cli.PLAN_COPIES), default=("auto",), metavar="MODES",
                 help="v2 strategies with plans (oracle, learned): 'on' copies planned experts ahead of "
                      "their step, 'off' only evicts by the plan and reads routed misses in place "
                      f"(rows marked /inpl), 'auto' copies experts of at least "
                      f"{MIN_COPY_BYTES / 2**20:g} MiB; a list (on,off) runs each (default: auto)")
  p.add_argument("--command-buffers", type=cli.word_list(cli.ON_OFF), default=(False,), metavar="MODES",
                 help="v2: 'on' compiles each step with XLA command buffers (CUDA graphs, the Pallas "
                      "kernels included: fewer launches by the host; rows marked +cb), 'off' without; "
                      "a list (on,off) runs each (default: off)")
  p.add_argument("--host-backend", choices=host_experts.BACKENDS, default=host_experts.DEFAULT_BACKEND,
                 help="hybrid's host expert FFN: torch (if importable: auto), or XLA:CPU")
  p.add_argument("--out", default="runs/bench/bench_program", help="directory for results.json, table.md")
  a = p.parse_args(argv)
  if "learned" in a.strategies.split(",") and not a.predictor:
    p.error("--strategies learned needs --predictor (a trained predictor directory)")
  if a.predictor and not Path(a.predictor).is_dir():
    p.error(f"--predictor {a.predictor}: no such directory")
  predictor = None
  if a.predictor:
    from jaxmoe.predictor import load_predictor
    predictor = load_predictor(a.predictor)
  lengths = list(a.prompt_lengths)
  results = {"date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind,
             "command": " ".join(["python -m eval.bench_program", *(argv or sys.argv[1:])]), "presets": []}
  print(HEADER)
  for name in a.presets.split(","):
    layers = a.layers or (a.mixtral_layers if name == "mixtral_shaped" else None)
    r = bench_preset(name, layers, a.cache_fractions, lengths, a.new_tokens, a.repeats,
                     a.engines.split(","), a.strategies.split(","), predictor, a.plan_copies,
                     host_backend=a.host_backend, command_buffers=a.command_buffers)
    print(f"{name}: plain decode {r['plain_decode_s'] * 1e3:.3f} ms, HBM roofline {r['roofline_s'] * 1e3:.3f} ms, "
          f"v2 resident {r['compute_s'] * 1e3:.3f} ms, H2D {r['h2d_bytes_per_s'] / 1e9:.1f} GB/s, host read "
          f"{r['host_read_bytes_per_s'] / 1e9:.1f} GB/s, host expert FFN {r['host_expert_bytes_per_s'] / 1e9:.1f} GB/s "
          f"({r['host_label']})")
    results["presets"].append(r)
    out = Path(a.out)  # written after every preset: a later failure loses nothing measured
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
  lines = [HEADER] + [_row_line(r["preset"], row) for r in results["presets"] for row in r["rows"]]
  (out / "table.md").write_text("```\n" + "\n".join(lines) + "\n```\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
