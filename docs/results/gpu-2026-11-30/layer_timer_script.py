"""Per-operation host time of the offload engine's decode steps (gpu preset, random weights)."""
import collections, cProfile, functools, io, pstats, sys, time
import numpy as np, jax
from jaxmoe import config, model as model_lib
from jaxmoe.offload import engine as eng, cache as cache_mod, prefetch as pf
from jaxmoe.offload.store import ExpertStore

T = collections.defaultdict(float); N = collections.Counter()
def wrap(owner, name, label=None):
  f = getattr(owner, name); label = label or name
  @functools.wraps(f)
  def g(*a, **k):
    t = time.perf_counter()
    try:
      return f(*a, **k)
    finally:
      T[label] += time.perf_counter() - t; N[label] += 1
  setattr(owner, name, g)

for name in ["_attend_route", "_layer_ffn", "_scheduled_ffn", "_speculated_layer", "_embed", "_last_logits"]:
  wrap(eng, name)
wrap(cache_mod, "_write_slots")
wrap(jax, "device_get")
wrap(jax, "block_until_ready")
for name in ["land", "arrive", "ensure_resident", "settle", "mark_used", "set_plan", "reserve", "_on_device"]:
  wrap(cache_mod.ExpertCache, name, "cache." + name)
for name in ["copy", "prefetch", "issue_deferred"]:
  wrap(pf.Prefetcher, name, "prefetcher." + name)
for name in ["_offloaded_ffn", "_plan_step", "_planned", "_host_inputs", "_speculate_from", "_check_speculated"]:
  wrap(eng.OffloadEngine, name, "engine." + name)

import os
cfg = config.preset(os.environ.get("PRESET", "gpu"))
model = model_lib.create(cfg, seed=0)
store = ExpertStore.from_model(model)
rng = np.random.default_rng(0)
prompt = rng.integers(0, cfg.vocab_size, (1, 16)).astype(np.int32)
NEW = 24
slots = cfg.n_layers * cfg.n_experts // 4
mode = sys.argv[1] if len(sys.argv) > 1 else "timers"
from jaxmoe.offload import strategies
routing = None
for name in sys.argv[2:] or ["on_demand", "lru", "oracle"]:
  strategy = strategies.make(name, n_experts=cfg.n_experts, routing=routing) if routing else name
  with eng.OffloadEngine(model, cache_bytes=slots * cfg.expert_bytes, strategy=strategy, store=store,
                         predictor=None) as e:
    e.generate(prompt, NEW)
    for rep in range(2):
      e.reset_cache(); T.clear(); N.clear()
      if mode == "cprofile" and rep == 1:
        prof = cProfile.Profile(); prof.enable()
      _, stats = e.generate(prompt, NEW)
      if mode == "cprofile" and rep == 1:
        prof.disable()
    n = len(stats.token_latencies_s)
    routing = routing or stats.routing
    strategy = name
    print(f"\n== {strategy}: tpot {stats.tpot_s*1e3:.2f} ms, ttft {stats.ttft_s*1e3:.1f} ms, stall/token "
          f"{sum(stats.stall_s)/ (n+1)*1e3:.2f} ms, copies {len(stats.copies)}, redone {stats.redone}")
    if mode == "cprofile":
      s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue()[:6000])
    else:
      for label, t in sorted(T.items(), key=lambda kv: -kv[1]):
        print(f"  {label:32s} {t / (n + 1) * 1e3:8.3f} ms/step  {N[label] / (n + 1):6.1f} calls/step  {t / N[label] * 1e6:8.1f} us/call")

# dispatch cost of single jitted calls, outside any step
with eng.OffloadEngine(model, cache_bytes=slots * cfg.expert_bytes, strategy="on_demand", store=store) as e:
  tokens = jax.device_put(prompt[:, :1], e._sharding)
  x = eng._embed(e._head, e._head_leaves, tokens)
  jax.block_until_ready(eng._last_logits(e._head, e._head_leaves, x))
  f = jax.jit(lambda v: v + 1)
  jax.block_until_ready(f(x))
  for label, call in [("_embed", lambda: eng._embed.__wrapped__(e._head, e._head_leaves, tokens)),
                      ("_last_logits", lambda: eng._last_logits.__wrapped__(e._head, e._head_leaves, x)),
                      ("tiny jit", lambda: f(x))]:
    for _ in range(3):
      call()
    jax.block_until_ready(call())
    t = time.perf_counter()
    for _ in range(100):
      out = call()
    t_issue = (time.perf_counter() - t) / 100
    jax.block_until_ready(out)
    t_all = (time.perf_counter() - t) / 100
    print(f"  dispatch {label:14s} issue {t_issue*1e6:7.1f} us/call, issue+run {t_all*1e6:7.1f} us/call, args {len(jax.tree.leaves(e._head_leaves))}")
