"""What to prefetch and what to evict: the offload strategies, by name.

A strategy only changes which copies are issued and when; the engine always computes with the experts
the router chose (misses are fetched on demand), so every strategy is exact.

| name           | prefetched                                                        | eviction   |
|----------------|-------------------------------------------------------------------|------------|
| `resident`     | nothing: every expert lives on the device                          | -          |
| `on_demand`    | nothing; experts are dropped after their layer (no reuse)          | -          |
| `lru` / `lfu`  | nothing; experts stay cached                                       | LRU / LFU  |
| `hybrid`       | nothing; decode misses computed on the host CPU, not admitted     | LRU        |
| `stream_all`   | every expert of every layer, in layer order                        | predicted  |
| `next_gate`    | layer l's hidden state through the gates of layers l+1..l+depth    | predicted  |
| `oracle`       | the experts a previous exact run routed to (`routing`)             | predicted  |
| `noisy_oracle` | the oracle's experts kept with probability `recall`, rest wrong    | predicted  |
| `learned`      | a `RoutingPredictor`'s scores -> per-layer ranked experts          | predicted  |

"predicted" evicts the expert whose next planned use is furthest away (unplanned first, then LRU); a
prefetch takes only the slot Belady's MIN would free for it when it is used, and waits until then if
that expert is still needed (`ExpertCache.reserve`).

`hybrid` (ProgramEngine only) serves a prompt's misses as `lru` does; in a decode step the cached
routed experts run on the device and the others on the host CPU from its copy of their weights
(`host_experts`), the two shares summed: `host_compute="auto"` does so when the host was measured to
compute an expert faster than the link copies it, "always" / "never" force either way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# routing[step][layer] = sorted experts that step routed to in that layer (step 0 = prefill)
RoutingTrace = Sequence[Sequence[Sequence[int]]]
StepPlan = list[list[int]]  # [n_layers] experts to prefetch for one step, best first


class Strategy:
  """Base: nothing prefetched, LRU eviction, experts kept between layers."""

  name = "lru"
  eviction = "lru"
  resident = False  # every expert on the device, no cache
  keeps_experts = True  # False: drop experts after their layer (naive on-demand loading)
  speculation_depth = 0  # gates of layers l+1..l+depth applied to layer l's hidden state
  speculative = False  # plans whole steps: the engine may compute a layer before reading its routing
  plan_covers_routing = False  # the step's plan always holds every expert the router will choose
  host_compute: str | None = None  # `hybrid`: where decode misses run (HOST_COMPUTE)
  # `predicted` eviction looks at most this many steps past the one it serves (None: at every plan the
  # engine holds: ProgramEngine's of the next step, and `future`)
  horizon: int | None = None

  def plan_step(self, history: np.ndarray, n_new: int, step: int, n_slots: int,
                n_layers: int) -> StepPlan | None:
    """Before any layer of a step runs: [n_layers] experts to copy, best first (None: nothing)."""
    del history, n_new, step, n_slots, n_layers
    return None

  def plan_layer(self, layer: int, speculated: np.ndarray) -> dict[int, list[int]]:
    """After layer `layer`'s router: speculated [depth, T, k] experts -> {later layer: experts}."""
    del layer, speculated
    return {}

  def future(self, step: int) -> RoutingTrace:
    """Experts expected in the steps after `step` (eviction hints only)."""
    del step
    return ()


class Resident(Strategy):
  name = "resident"
  resident = True


class OnDemand(Strategy):
  name = "on_demand"
  keeps_experts = False


class LRU(Strategy):
  name = "lru"


HOST_COMPUTE = ("auto", "always", "never")  # `hybrid`: measured, forced on, forced off


class Hybrid(Strategy):
  name = "hybrid"

  def __init__(self, host_compute: str = "auto"):
    if host_compute not in HOST_COMPUTE:
      raise ValueError(f"host_compute must be one of {HOST_COMPUTE}, got {host_compute!r}")
    self.host_compute = host_compute


class LFU(Strategy):
  name = "lfu"
  eviction = "lfu"


class StreamAll(Strategy):
  name = "stream_all"
  eviction = "predicted"
  speculative = True
  plan_covers_routing = True

  def __init__(self, n_experts: int):
    self.n_experts = n_experts

  def plan_step(self, history, n_new, step, n_slots, n_layers):
    del history, n_new, step, n_slots
    return [list(range(self.n_experts)) for _ in range(n_layers)]


class NextGate(Strategy):
  name = "next_gate"
  eviction = "predicted"

  def __init__(self, depth: int = 1):
    if depth < 1:
      raise ValueError(f"next_gate depth must be >= 1, got {depth}")
    self.speculation_depth = depth

  def plan_layer(self, layer, speculated):
    plan = {}
    for j, experts in enumerate(speculated):  # experts [T, k]
      ids, counts = np.unique(experts, return_counts=True)
      plan[layer + 1 + j] = [int(e) for e in ids[np.argsort(-counts, kind="stable")]]
    return plan


ORACLE_HORIZON = 16  # steps past the one served an oracle's eviction knows by default


class Oracle(Strategy):
  """Replays the routing of an earlier exact run of the same request: a plan that always holds the
  routed experts (the upper bound a predictor can reach). Its eviction knows the `horizon` steps after
  the one being served (0: that step's routing only; the default, 16, is Belady's MIN for requests
  of up to 17 tokens: `ORACLE_HORIZON`)."""

  name = "oracle"
  eviction = "predicted"
  speculative = True
  plan_covers_routing = True

  def __init__(self, routing: RoutingTrace, horizon: int = ORACLE_HORIZON):
    if int(horizon) != horizon or horizon < 0:
      raise ValueError(f"horizon must be an integer >= 0 (steps known past the one served), got {horizon}")
    self.routing = [[list(map(int, experts)) for experts in step] for step in routing]
    self.horizon = int(horizon)

  def plan_step(self, history, n_new, step, n_slots, n_layers):
    del history, n_new, n_slots
    return self.routing[step] if step < len(self.routing) else [[] for _ in range(n_layers)]

  def future(self, step):
    return self.routing[step + 1:step + 1 + self.horizon]


class NoisyOracle(Oracle):
  """The oracle with recall degraded to `recall`: each true expert of each step and layer is kept with
  probability `recall` and otherwise replaced by a wrong one, so the copy volume is unchanged and the
  expected recall is `recall` even when a layer routes to only a couple of experts (keeping
  round(recall * n) of n = 2 experts would make 0.7 and 0.9 the same as 0.5 and 1.0)."""

  name = "noisy_oracle"
  plan_covers_routing = False

  def __init__(self, routing: RoutingTrace, n_experts: int, recall: float, seed: int = 0,
               horizon: int = ORACLE_HORIZON):
    if not 0.0 <= recall <= 1.0:
      raise ValueError(f"recall must be in [0, 1], got {recall}")
    rng = np.random.default_rng(seed)
    noisy = []
    for step in routing:
      layers = []
      for experts in step:
        experts = list(map(int, experts))
        kept = [e for e in experts if rng.random() < recall]
        wrong = [e for e in range(n_experts) if e not in experts]
        fill = list(rng.permutation(wrong)[:len(experts) - len(kept)]) if wrong else []
        layers.append([int(e) for e in kept + fill])
      noisy.append(layers)
    super().__init__(noisy, horizon)
    self.recall = recall


class Learned(Strategy):
  """A routing predictor's scores [B, n_new, L, E] -> per layer, experts ranked by
  P(some new token needs it) = 1 - prod_tokens(1 - p), cut at `min_prob` and at a per-layer budget m.

  m is `per_layer` if given, else chosen from the predictor's confidence and the cache: `hedge` times
  the expected number of distinct experts the layer needs (sum over experts of P(needed)), at most an
  equal share of the cache (n_slots // n_layers), so no layer takes more than its share of the slots.
  hedge = 1 by default: on the H200 every copy costs host time, and hedging did not pay there. A flat
  equal-share budget (8 per layer at top-2) copied 2.6x the useful bytes (docs/results/gpu-2026-11-29);
  hedge = 2 (4 per layer at top-2) gave 35.4 ms per token at a 59 % hit rate, while the noisy oracle at
  recall 0.5 with exactly 2 per layer gave 24.5 ms, in the same run (docs/results/gpu-2026-11-29-c).

  `lead` is the predictor's (`RoutingPredictor`; absent: 0), and the engine passes a history that ends
  `lead` tokens before each of the step's tokens: OffloadEngine plans a step holding its tokens (lead
  0); ProgramEngine plans step n+1 before it has read step n's input token (lead 2)."""

  name = "learned"
  eviction = "predicted"
  speculative = True

  def __init__(self, predictor, per_layer: int | None = None, min_prob: float = 0.0, hedge: float = 1.0):
    for attr in ("scores", "n_layers", "n_experts"):
      if not hasattr(predictor, attr):
        raise TypeError(f"predictor needs `{attr}` (the RoutingPredictor protocol)")
    self.predictor = predictor
    self.lead = int(getattr(predictor, "lead", 0))
    self.per_layer = per_layer
    self.min_prob = min_prob
    if hedge <= 0:
      raise ValueError(f"hedge must be > 0 (copies per expected routed expert), got {hedge}")
    self.hedge = hedge

  def plan_step(self, history, n_new, step, n_slots, n_layers):
    del step
    if self.predictor.n_layers != n_layers:
      raise ValueError(f"predictor covers {self.predictor.n_layers} layers, the model has {n_layers}")
    p = np.asarray(self.predictor.scores(history, n_new), np.float64)  # [B, n_new, L, E]
    if p.shape[:3] != (history.shape[0], n_new, n_layers):
      raise ValueError(f"predictor scores have shape {p.shape}, expected [B, n_new, L, E]")
    p_any = 1.0 - np.prod(1.0 - np.clip(p, 0.0, 1.0), axis=(0, 1))  # [L, E]
    share = max(1, n_slots // n_layers)
    # per layer: the m most likely experts above min_prob (one argsort for all layers: the host plans
    # every decode step on its critical path)
    m = (np.full(n_layers, self.per_layer) if self.per_layer else
         np.clip(np.ceil(self.hedge * p_any.sum(axis=1) - 1e-9), 1, share).astype(int))
    ranked = np.argsort(-p_any, axis=1, kind="stable")
    keep = (np.take_along_axis(p_any, ranked, axis=1) > self.min_prob) & (np.arange(p_any.shape[1]) < m[:, None])
    return [row[k].tolist() for row, k in zip(ranked, keep)]


NAMES = ("resident", "on_demand", "lru", "lfu", "hybrid", "stream_all", "next_gate", "oracle", "noisy_oracle",
         "learned")


def make(name: str, *, n_experts: int, predictor=None, routing: RoutingTrace | None = None,
         recall: float = 1.0, seed: int = 0, depth: int = 1, host_compute: str = "auto",
         horizon: int = ORACLE_HORIZON) -> Strategy:
  """The strategy called `name`; `oracle`/`noisy_oracle` need `routing` (e.g. `stats.routing` of an
  earlier exact run of the same request) and take `horizon` (steps their eviction knows past the one
  served), `learned` needs `predictor`; `hybrid` takes `host_compute` ("auto" | "always" | "never")."""
  if name in ("oracle", "noisy_oracle") and routing is None:
    raise ValueError(f"{name} needs `routing` recorded from an earlier run (OffloadStats.routing)")
  if name == "learned" and predictor is None:
    raise ValueError("learned needs a predictor (the RoutingPredictor protocol)")
  builders = {
      "resident": Resident, "on_demand": OnDemand, "lru": LRU, "lfu": LFU,
      "hybrid": lambda: Hybrid(host_compute),
      "stream_all": lambda: StreamAll(n_experts),
      "next_gate": lambda: NextGate(depth),
      "oracle": lambda: Oracle(routing, horizon),
      "noisy_oracle": lambda: NoisyOracle(routing, n_experts, recall, seed, horizon),
      "learned": lambda: Learned(predictor),
  }
  if name not in builders:
    raise ValueError(f"unknown strategy {name!r}; choose one of {NAMES}")
  return builders[name]()


def device_only(strategy: Strategy, engine: str) -> Strategy:
  """`strategy`, unless it computes experts on the host (`hybrid`), which only ProgramEngine runs."""
  if strategy.host_compute is not None:
    raise NotImplementedError(f"strategy {strategy.name!r} computes experts on the host; {engine} runs "
                              f"every expert on its device (use ProgramEngine)")
  return strategy


def min_copies(routing: RoutingTrace, n_slots: int, resident: Sequence[tuple[int, int]] = ()) -> int:
  """Fewest expert copies any exact engine with `n_slots` slots needs for `routing` (Belady's MIN:
  evict the expert used furthest in the future), starting with `resident` cached."""
  requests = [(layer, step_layers[layer]) for step_layers in routing for layer in range(len(step_layers))]
  uses: dict[tuple[int, int], list[int]] = {}
  for t, (layer, experts) in enumerate(requests):
    for e in experts:
      uses.setdefault((layer, int(e)), []).append(t)
  cursor = {key: 0 for key in uses}

  def next_use(key, t):
    times = uses.get(key, ())
    i = cursor.get(key, 0)
    while i < len(times) and times[i] <= t:
      i += 1
    cursor[key] = i
    return times[i] if i < len(times) else float("inf")

  cached = set(list(resident)[:n_slots])
  copies = 0
  for t, (layer, experts) in enumerate(requests):
    need = {(layer, int(e)) for e in experts}
    copies += len(need - cached)
    # after serving request t, keep the experts needed soonest (what MIN's evictions amount to)
    cached = set(sorted(cached | need, key=lambda key: next_use(key, t))[:n_slots])
  return copies
