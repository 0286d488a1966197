"""Engine v2: every step (a prompt or one decode token) is one compiled program with no host round trip.

Inside the program each layer's routed experts are looked up in the device cache table; misses are
read straight from pinned host memory into slots the eviction policy frees (`device_cache`). The host
dispatches step s+1 before it reads step s's token, routing and counts, so the device never waits for
it. Plans for step s+1 (`oracle`, `noisy_oracle`: the next step's experts; `learned`: a predictor's
guess) are copied to the device before step s is dispatched, overlapping it, and admitted by step
s+1's program before its first layer (`plan_copies`; else they only set the eviction order). The
host has then read the tokens up to step s-1's input, two positions before step s+1's: a host plan of
`learned` needs a predictor of lead `PLAN_LEAD` (trained to predict the routing of the token two after
the last one it reads). With a lead-0 predictor, `learned` plans inside the program instead: step s
scores the token it chose and sets step s+1's eviction order (`step_plan`), nothing copied ahead.
`hybrid` decode steps admit nothing: each layer's cached routed experts run on the device and the
others on the host CPU through a callback inside the same program (`host_experts`), the shares summed.
The true router decides what is computed: tokens and logits equal the all-resident model's.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.generate import check_prompt, select_token
from jaxmoe.model import LayerCache, MoELM, init_cache
from jaxmoe.offload import device_cache, host_experts, step_plan, strategies
from jaxmoe.offload.cache import CopyRecord, empty_pools, slot_count, write_slots
from jaxmoe.offload.layers import attend_route, embed, last_logits, layer_ffn, split_model
from jaxmoe.offload.stats import OffloadStats
from jaxmoe.offload.store import ExpertStore, device_sharding

SUPPORTED = ("resident", "on_demand", "lru", "lfu", "hybrid", "oracle", "noisy_oracle", "learned")
PLANNED = ("oracle", "noisy_oracle", "learned")  # those that plan each step (eviction hints, copies ahead)
HOST_PARTS = ("plan", "dispatch", "wait", "read")  # a decode step's host time (`OffloadStats.host_split_s`)
PLAN_LEAD = 2  # a decode step's input token is this many positions past the last one read at its plan
# `plan_copies="auto"` copies planned experts ahead only from this size up. On the H200 host each copy
# costs the host ~0.12 ms (its `device_put` 0.07 ms, then 0.05 ms more to dispatch the step that
# waits for it), about what PCIe needs for 5.4 MB at 45 GB/s; the host also dispatches every kernel of
# the step, so below that size copies make a step host-bound. Measured 2026-12-04, gpu preset (4.7 MB
# experts, 25 % cache), oracle per-token ms: copied ahead 9.23, in place 5.39 (docs/BENCHMARKS.md).
MIN_COPY_BYTES = 6 * 2**20
# `command_buffers=True`: XLA records the step's kernels, the Pallas ones (custom calls) included, into
# CUDA graphs, so the host launches a few graphs a step instead of every kernel (a step is host-bound,
# docs/BENCHMARKS.md, "Where a v2 step's time goes"). Compile options of the step program only.
COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
                   "xla_gpu_graph_min_graph_size": 1}


def copies_planned(plan_copies: bool | str, expert_bytes: int) -> bool:
  """Whether a `plan_copies` setting copies planned experts ahead for experts of this size."""
  return expert_bytes >= MIN_COPY_BYTES if plan_copies == "auto" else bool(plan_copies)


class StepOut(NamedTuple):
  token: jax.Array  # [B, 1] int32 next token: the next step's input as it is (no slicing call)
  kv: tuple  # per-layer LayerCache
  pools: dict  # {name: [S, ...]}
  state: device_cache.CacheState
  summary: jax.Array  # int32, all the host reads of the step, in one transfer (`_StepRecord.of`)
  pos: jax.Array  # [] tokens in the KV cache after the step
  step: jax.Array  # [] steps run (sampling key)
  in_step: step_plan.InStepPlan | None  # `learned` planned in the step: the next step's plan


def _step(head, structure, layout, policy: str, keep: bool, temperature: float, head_leaves,
          layer_leaves, views, pools, state, kv, tokens, pos, step, key,
          plan: device_cache.Admission, host: host_experts.Handle | None = None,
          planner: step_plan.InStepPlanner | None = None, planner_leaves=(),
          in_step: step_plan.InStepPlan | None = None) -> StepOut:
  """One step over tokens [B, T] at position `pos`: the plan's uses set and its copies admitted (or
  `planner`'s plan made by the step before, `in_step`), then every layer with its experts served from
  the cache or host memory (`host`: uncached ones computed on the host, nothing admitted), then the
  next token (and `planner`'s plan of the next step)."""
  impl = structure.merge(layer_leaves[0]).moe.cfg.kernel_impl  # the one kernel switch
  state, pools = device_cache.admit_plan(state, pools, plan, layout=layout, policy=policy, impl=impl)
  if planner is not None:
    state = planner.uses(state, in_step)
  b, t = tokens.shape
  positions = jnp.broadcast_to(pos + jnp.arange(t, dtype=jnp.int32), (b, t))
  x = embed(head, head_leaves, tokens)
  hits, misses, routed, new_kv = [], [], [], []
  for layer, (leaves, view, layer_cache) in enumerate(zip(layer_leaves, views, kv)):
    x, h, experts, weights, layer_cache, _ = attend_route(structure, leaves, (), x, positions,
                                                          layer_cache, pos)
    on_host = None  # [B*T, D] f32 weighted outputs of the experts computed on the host
    if policy == "resident":  # every expert in slot layer * E + expert: nothing to decide
      n_experts = state.table.shape[1]
      rhs_index = layer * n_experts + jnp.arange(n_experts, dtype=jnp.int32)
      ids = device_cache.distinct(experts, n_experts)
      hit, miss = jnp.sum(ids >= 0).astype(jnp.int32), jnp.zeros((), jnp.int32)
    elif host is not None:  # the device's share (cached pairs) does not wait for the host's
      state, rhs_index, on_device, hit, miss, ids = device_cache.lookup_layer(state, layer, experts)
      on_host = host(layer, h, jnp.where(on_device, -1, experts), weights)
      weights = jnp.where(on_device, weights, 0.0)
    else:
      state, pools, rhs_index, hit, miss, ids = device_cache.serve_layer(
          state, pools, view, layer, experts, layout=layout, policy=policy, keep=keep, impl=impl)
    x = layer_ffn(structure, leaves, pools, rhs_index, h, x, experts, weights, on_host)
    hits.append(hit)
    misses.append(miss)
    routed.append(ids)
    new_kv.append(layer_cache)
  logits = last_logits(head, head_leaves, x)
  token = select_token(logits, temperature, None if temperature == 0.0 else jax.random.fold_in(key, step))
  in_step = None if planner is None else planner.next(planner_leaves, in_step, tokens, token)
  # logits [B, V] (their f32 bits), token [B], hits [L], misses [L] (routed experts found cached / not
  # cached: read from host memory, or computed there), routed [L, U] distinct routed experts (-1
  # padded), the cache table [L, E], (in-step plans) the next step's planned experts [L, E]: one
  # device-to-host transfer a step (each costs the host ~0.1 ms)
  bits = jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.int32).ravel()
  planned = [] if in_step is None else [in_step.planned.astype(jnp.int32).ravel()]
  summary = jnp.concatenate([bits, token.astype(jnp.int32), jnp.stack(hits), jnp.stack(misses),
                             jnp.stack(routed).ravel(), state.table.ravel(), *planned])
  return StepOut(token[:, None], tuple(new_kv), pools, state, summary, pos + t, step + 1, in_step)


_jit_step = functools.partial(jax.jit, _step, static_argnums=(0, 1, 2, 3, 4, 5),
                              static_argnames=("host", "planner"),
                              donate_argnames=("pools", "state", "kv"))
_STEPS = {False: _jit_step(), True: _jit_step(compiler_options=COMMAND_BUFFERS)}  # by command_buffers


def _padded(keys: list[tuple[int, int]], size: int | None = None) -> np.ndarray:
  """[size, 2] (layer, expert) rows, -1 past the keys; size: the next power of two by default."""
  if size is None:
    size = 0 if not keys else 1 << (len(keys) - 1).bit_length()
  out = np.full((size, 2), -1, np.int32)
  out[:len(keys)] = np.asarray(keys, np.int32).reshape(-1, 2)
  return out


class _StepRecord(NamedTuple):
  """What the host keeps of a step once it has read it (numpy)."""

  token: np.ndarray  # [B]
  logits: np.ndarray  # [B, V]
  hits: np.ndarray  # [L]
  misses: np.ndarray  # [L]
  routed: np.ndarray  # [L, U]
  table: np.ndarray  # [L, E]
  planned: np.ndarray | None  # [L, E] bool: the next step's in-step plan (None: not planned in steps)

  @classmethod
  def of(cls, summary: np.ndarray, batch: int, vocab: int, n_layers: int, n_experts: int,
         in_step: bool) -> "_StepRecord":
    """Split a step's `StepOut.summary` (layout in `_step`; `in_step`: it ends with a plan)."""
    le = n_layers * n_experts
    logits = summary[:batch * vocab].view(np.float32).reshape(batch, vocab)
    rest, planned = summary[batch * vocab:], None
    if in_step:
      rest, planned = rest[:-le], rest[-le:].reshape(n_layers, n_experts).astype(bool)
    token, rest = rest[:batch], rest[batch:]
    hits, misses = rest[:n_layers], rest[n_layers:2 * n_layers]
    routed, table = rest[2 * n_layers:-le], rest[-le:]
    return cls(token, logits, hits, misses, routed.reshape(n_layers, -1),
               table.reshape(n_layers, n_experts), planned)


class _Plan(NamedTuple):
  """A strategy's plan of one step, its copies issued (host side, until the step is dispatched)."""

  step: int
  experts: list  # [L] planned experts per layer
  touch: np.ndarray  # [n, 2] (layer, expert) planned, kept cached from the step's start; -1 padding
  fill: np.ndarray  # [P, 2] those copied, one per buffer; -1 padding
  buffers: tuple  # [P] device copies in flight


class ProgramEngine:
  """Exact MoE generation, one compiled program per step (see the module docstring).

  `strategy`: one of `SUPPORTED` (a name or a `strategies.Strategy`); `cache_bytes`: the device
  expert budget (`resident`: every expert, loaded once). The budget must hold every expert one layer
  of a step can route: top_k per token of a decode step; for a prompt, min(tokens x top_k, experts).
  `resident` holds every expert from the start; the other strategies start each request cold after
  `reset_cache`. `plan_copies` (strategies with plans): copy a step's planned experts ahead of it
  (True) or only evict by the plan and read the routed misses in place (False); "auto" copies when
  an expert is at least `MIN_COPY_BYTES`. A copy overlaps compute through the copy engine, but it
  holds the host that dispatches the steps (docs/BENCHMARKS.md, "Engine v2"). `learned` with a
  lead-0 predictor plans inside each step (never copies); with a lead-`PLAN_LEAD` one, on the host.
  `host_backend` (`hybrid`): the host expert FFN's backend, "torch" / "xla" / "auto" (None:
  `host_experts.DEFAULT_BACKEND`); `host_choice.backend` says which one runs.
  `command_buffers`: compile the step with `COMMAND_BUFFERS` (GPU; other backends ignore them)."""

  def __init__(self, model: MoELM, *, cache_bytes: int | None = None,
               strategy: str | strategies.Strategy = "lru", predictor=None,
               store: ExpertStore | None = None, device: jax.Device | None = None,
               plan_copies: bool | str = "auto", host_backend: str | None = None,
               command_buffers: bool = False):
    cfg = model.cfg
    if plan_copies not in (True, False, "auto"):
      raise ValueError(f"plan_copies must be True, False or 'auto', got {plan_copies!r}")
    if command_buffers not in (True, False):
      raise ValueError(f"command_buffers must be True or False, got {command_buffers!r}")
    self.command_buffers = command_buffers
    self._step = _STEPS[command_buffers]
    self.cfg = cfg
    if isinstance(strategy, str):
      strategy = strategies.make(strategy, n_experts=cfg.n_experts, predictor=predictor)
    if strategy.name not in SUPPORTED:
      raise NotImplementedError(f"strategy {strategy.name!r} runs on OffloadEngine; ProgramEngine "
                                f"runs {SUPPORTED}")
    in_step = strategy.name == "learned" and strategy.lead == 0
    if strategy.name == "learned" and strategy.lead not in (0, PLAN_LEAD):
      raise ValueError(f"ProgramEngine plans learned inside the step (a predictor of lead 0) or on the "
                       f"host, knowing the tokens up to step n-1's input when it plans step n+1 (lead "
                       f"{PLAN_LEAD}: train_predictor --lead {PLAN_LEAD}); got lead {strategy.lead}")
    if in_step and plan_copies is True:
      raise ValueError(f"a plan made inside the step (a lead-0 predictor) only evicts: copies ahead need "
                       f"the host's plan, a predictor of lead {PLAN_LEAD}")
    self.strategy = strategy
    self.store = store if store is not None else ExpertStore.from_model(model, device)
    if self.store.cfg != cfg:
      raise ValueError("the expert store was built for another config")
    self.plan_copies = not in_step and copies_planned(plan_copies, self.store.expert_bytes)
    self._sharding = device_sharding(device or self.store.device)
    put = lambda tree: jax.device_put(tree, self._sharding)
    self._head, self._head_leaves, self._layer, layer_leaves = split_model(model, put)
    self._layer_leaves = tuple(layer_leaves)
    self._views = tuple(self.store.host_view(layer) for layer in range(cfg.n_layers))
    if strategy.resident:
      cache_bytes = self.store.nbytes
    elif cache_bytes is None:
      raise ValueError(f"strategy {strategy.name!r} needs cache_bytes (the device expert budget)")
    self.n_slots = slot_count(cache_bytes, self.store.expert_bytes, cfg.top_k)
    # `learned` with a lead-0 predictor: each step plans the next one on the device (`step_plan`)
    self._planner = (step_plan.InStepPlanner.of(strategy, self.n_slots, cfg.n_layers, cfg.n_experts)
                     if in_step else None)
    self._planner_leaves = put(strategy.predictor.leaves) if in_step else ()
    self._policy = "resident" if strategy.resident else strategy.eviction
    # `hybrid`: whether decode steps compute the experts they find uncached on the host (else they
    # read them into the cache, as `lru`), and the rates measured to decide it
    self.host_choice = (host_experts.choose(self.store, strategy.host_compute, host_backend)
                        if strategy.host_compute else None)
    self._host = (host_experts.HostExperts.of(self.store, self.host_choice.backend)
                  if self.host_choice and self.host_choice.on_host else None)
    self._keep = strategy.keeps_experts
    self._pools = empty_pools(self.store, self.n_slots, device or self.store.device)
    self._state = put(device_cache.empty_state(cfg.n_layers, cfg.n_experts, self.n_slots))
    self._cached = np.full((cfg.n_layers, cfg.n_experts), -1)  # the host's last read of the table
    self._copies: list[CopyRecord] = []  # prefetch copies issued for the request being run
    self._plan_log: dict[int, list] = {}  # the host's plans of the request being run, by step
    # plans come from strategies that plan whole steps (oracles, learned); the others send no admission
    self._plans = strategy.name in PLANNED and self._planner is None
    self._no_plan = device_cache.Admission(put(device_cache.pack_plan(
        device_cache.use_offsets([], cfg.n_layers, cfg.n_experts), _padded([]), _padded([]))), ())
    self._pending: _Plan | None = None  # the plan of the next step to dispatch
    self._live, self._live_len = None, 0  # the request `prefill` started and its length
    self._host_times: dict[str, float] | None = None  # `generate`'s decode steps, by part of HOST_PARTS
    if strategy.resident:
      self._load_everything()

  # -------------------------------------------------------------- public API

  @property
  def plans_in_step(self) -> bool:
    """Whether `learned` plans inside each step (a lead-0 predictor) rather than on the host."""
    return self._planner is not None

  @property
  def planner(self) -> step_plan.InStepPlanner | None:
    """`learned`'s planner inside the step, with its device weights (None: no plan made in the step)."""
    return self._planner

  @property
  def planner_leaves(self) -> tuple:
    return self._planner_leaves

  def generate(self, tokens, max_new_tokens: int, *, temperature: float = 0.0,
               seed: int = 0) -> tuple[np.ndarray, OffloadStats]:
    """Like `jaxmoe.generate.generate`: -> (tokens [B, T + N], stats with logits [B, N, V])."""
    cfg = self.cfg
    prompt = check_prompt(tokens, max_new_tokens, cfg.max_seq_len, cfg.vocab_size)
    b, t = prompt.shape
    stats = OffloadStats(hits=[0] * cfg.n_layers, misses=[0] * cfg.n_layers,
                         stall_s=[0.0] * cfg.n_layers, batch=b, start_s=time.perf_counter())
    key = jax.random.key(seed)
    steps: list[_StepRecord] = []
    self._known = (prompt, steps, max_new_tokens)  # the tokens the host has read, for `learned` plans
    out = self._start(prompt, key, temperature, next_step=1)
    steps.append(self._read(out))
    self._host_times = {part: 0.0 for part in HOST_PARTS}  # the decode steps' (the prompt's left out)
    ready = [time.perf_counter()]
    stats.ttft_s = ready[0] - stats.start_s
    for n in range(1, max_new_tokens):
      last, out = out, self._run(out.kv, out.token, out.pos, out.step, key, temperature,
                                 next_step=n + 1, in_step=out.in_step)
      if n >= 2:  # step n-1 is read while step n is queued: the device never waits for the host
        steps.append(self._read(last))
        ready.append(time.perf_counter())
    if max_new_tokens >= 2:
      steps.append(self._read(out))
      ready.append(time.perf_counter())
    stats.e2e_s = ready[-1] - stats.start_s
    stats.token_latencies_s = np.diff(ready).tolist()
    stats.host_split_s = {part: t / max(1, max_new_tokens - 1) for part, t in self._host_times.items()}
    self._host_times = None
    stats.n_generated = max_new_tokens
    self._record(stats, steps)
    new = np.stack([s.token for s in steps], axis=1)
    return np.concatenate([prompt, new], axis=1), stats

  def prefill(self, tokens) -> np.ndarray:
    """Start a request with prompt tokens [B, T] (the cache as it is); -> the last position's logits
    [B, V] f32. With `decode`, scores given continuations (teacher forcing) through the engine."""
    cfg = self.cfg
    prompt = check_prompt(tokens, 1, cfg.max_seq_len, cfg.vocab_size)
    self._live = self._start(prompt, jax.random.key(0), 0.0, next_step=None)
    self._live_len = prompt.shape[1]
    return self._read(self._live).logits

  def decode(self, tokens) -> np.ndarray:
    """Feed one new token per sequence [B] after `prefill`; -> its logits [B, V] f32."""
    if self._live is None:
      raise ValueError("decode needs a request: call prefill first")
    live, cfg = self._live, self.cfg
    tokens = np.asarray(tokens, np.int32).reshape(-1, 1)
    if tokens.shape[0] != live.token.shape[0]:
      raise ValueError(f"decode needs {live.token.shape[0]} tokens (one per sequence), got {tokens.shape[0]}")
    if self._live_len >= cfg.max_seq_len:
      raise ValueError(f"the request holds {self._live_len} tokens, the model's max_seq_len")
    # teacher-forced tokens are not the strategy's steps: no plans, misses are read in place
    self._live = self._run(live.kv, jax.device_put(tokens, self._sharding), live.pos, live.step,
                           jax.random.key(0), 0.0, next_step=None, in_step=live.in_step)
    self._live_len += 1
    return self._read(self._live).logits

  def _start(self, prompt: np.ndarray, key, temperature: float, next_step: int | None) -> StepOut:
    """Dispatch a request's prompt step over a fresh KV cache (the budget checked first), after
    issuing the plan of `next_step` (None: none)."""
    b, t = prompt.shape
    self._check_budget(b, t)
    self._copies = []
    self._plan_log = {}  # the host's plans of this request by step (`OffloadStats.plans`)
    kv = tuple(jax.device_put(LayerCache(jnp.zeros_like(c.k), jnp.zeros_like(c.v)), self._sharding)
               for c in init_cache(self.cfg, b).layers)
    pos, step = jax.device_put((np.int32(0), np.int32(0)), self._sharding)
    self._pending = self._issue_plan(0, copy=False)  # a prompt's misses are read in place
    in_step = (None if self._planner is None else
               jax.device_put(step_plan.InStepPlan(*self._planner.start(b)), self._sharding))
    return self._run(kv, jax.device_put(prompt, self._sharding), pos, step, key, temperature, next_step,
                     in_step, decoding=False)

  def _read(self, out: StepOut) -> "_StepRecord":
    """One device-to-host read of a finished step's small outputs (its device arrays are then free)."""
    t0 = time.perf_counter()
    out.summary.block_until_ready()
    t1 = time.perf_counter()
    summary = jax.device_get(out.summary)  # a copy: views of the array would keep it alive
    self._clock("wait", t0, t1)
    self._clock("read", t1, time.perf_counter())
    record = _StepRecord.of(summary, out.token.shape[0], self.cfg.vocab_size, self.cfg.n_layers,
                            self.cfg.n_experts, out.in_step is not None)
    self._cached = record.table
    return record

  def reset_cache(self):
    """Forget every cached expert (the next request starts cold); `resident` stays loaded."""
    if not self.strategy.resident:
      self._cached = np.full_like(self._cached, -1)
      self._state = jax.device_put(device_cache.empty_state(self.cfg.n_layers, self.cfg.n_experts,
                                                            self.n_slots), self._sharding)

  def close(self):
    """Nothing runs in the background (kept for the engines' common interface)."""

  # -------------------------------------------------------------- internals

  def _run(self, kv, tokens, pos, step, key, temperature, next_step: int | None, in_step,
           decoding: bool = True) -> StepOut:
    """Dispatch one step with the copies issued for it; first issue those of `next_step` (the
    strategy's step numbering: 0 is the prompt; None: no plan), so that they overlap this step.
    `in_step`: the plan the step before made of this one (`StepOut.in_step`; None without a planner).
    `decoding`: one token after the prompt (`hybrid` computes its uncached experts on the host)."""
    t0 = time.perf_counter()
    plan = self._pending
    self._pending = None if next_step is None else self._issue_plan(next_step, copy=self.plan_copies,
                                                                    before=plan)
    admission = self._admission(plan, self._pending)
    host = self._host.handle if self._host is not None and decoding else None
    t1 = time.perf_counter()
    out = self._step(self._head, self._layer, self.store.layout, self._policy, self._keep,
                     float(temperature), self._head_leaves, self._layer_leaves, self._views, self._pools,
                     self._state, kv, tokens, pos, step, key, admission, host=host, planner=self._planner,
                     planner_leaves=self._planner_leaves, in_step=in_step)
    self._pools, self._state = out.pools, out.state
    self._clock("plan", t0, t1)
    self._clock("dispatch", t1, time.perf_counter())
    return out

  def _clock(self, part: str, start: float, end: float):
    """Adds host time to `part` of the request's decode steps (`OffloadStats.host_split_s`)."""
    if self._host_times is not None:
      self._host_times[part] += end - start

  def _issue_plan(self, step: int, copy: bool = True, before: "_Plan | None" = None) -> "_Plan | None":
    """The plan of the strategy's `step`, with copies of its planned experts issued now (H2D copies
    overlap only compute dispatched after them) unless the host expects them cached: cached when it
    last read the table (two steps ago) or planned for `before`, the step dispatched next, which
    serves them first, when both plans fit the cache (copying those again moved 46 % more bytes per
    token than reading misses in place on olmoe_shaped, 2026-12-04). Key counts are bucketed to
    powers of two, so few programs compile. None: the strategy plans nothing here."""
    cfg = self.cfg
    history = self._plan_history(step) if self.strategy.name == "learned" else None
    if not self._plans or (self.strategy.name == "learned" and history is None):
      return None
    experts = self.strategy.plan_step(history, 1, step, self.n_slots, cfg.n_layers) or []
    self._plan_log[step] = experts
    keys = [(layer, e) for layer, ids in enumerate(experts) for e in ids][:self.n_slots]
    fills = self._fills(keys, before) if copy else []
    now = time.perf_counter()
    self._copies += [CopyRecord(layer, e, step, "prefetch", self.store.expert_bytes, now)
                     for layer, e in fills]
    # Fill keys pair with the copies one to one, padded to a power of two with rows of -1 (their
    # copy: the first one again, never written)
    fill_keys = _padded(fills)
    buffers = jax.device_put([self.store.buffer(*k) for k in fills], self._sharding) if fills else []
    buffers += buffers[:1] * (len(fill_keys) - len(buffers))
    return _Plan(step, experts, _padded(keys if copy else []), fill_keys, tuple(buffers))

  def _fills(self, keys: list[tuple[int, int]], before: "_Plan | None") -> list[tuple[int, int]]:
    """The planned keys to copy: those the host last saw uncached, less `before`'s, which stay cached
    through it if both plans fit the cache (the `predicted` policy gives up unplanned experts first)."""
    expected = set() if before is None else {(layer, e) for layer, ids in enumerate(before.experts)
                                             for e in ids}
    if len(expected | set(keys)) > self.n_slots:
      expected = set()
    return [k for k in keys if self._cached[k] < 0 and k not in expected]

  def _admission(self, plan: "_Plan | None", then: "_Plan | None") -> device_cache.Admission:
    """What the step of `plan` admits: its copies, and the planned uses of its experts and of the
    steps after it (`predicted` eviction), `then`'s plan first: the host issues step n+1's copies
    from the cache as it last read it, two steps old, so step n must not evict what n+1 planned.
    The small arrays go as one numpy argument of the step (transferred at its dispatch: cheaper on
    the host than a device_put each)."""
    if plan is None:
      return self._no_plan
    later = [then.experts, *self.strategy.future(then.step)] if then is not None else \
        list(self.strategy.future(plan.step))
    if self.strategy.horizon is not None:
      later = later[:self.strategy.horizon]
    offsets = device_cache.use_offsets([plan.experts] + later, self.cfg.n_layers, self.cfg.n_experts)
    return device_cache.Admission(device_cache.pack_plan(offsets, plan.touch, plan.fill), plan.buffers)

  def _plan_history(self, step: int) -> np.ndarray | None:
    """What a lead-`PLAN_LEAD` predictor reads to plan decode step `step`: the prompt and read tokens up
    to the one PLAN_LEAD positions before the step's input token (which sits at prompt length + step -
    1). From step 3 on that is every token read (step n-1's is read only after step n, whose plan is
    for step n+1, is dispatched); steps 1 and 2 leave out the last one. None for the prompt, past the
    request, or when no token lies that far back."""
    if step < 1:
      return None
    prompt, steps, n_steps = self._known
    end = prompt.shape[1] + step - PLAN_LEAD  # tokens in the history
    if step >= n_steps or end < 1:
      return None
    read = [s.token[:, None] for s in steps[:max(0, end - prompt.shape[1])]]
    history = np.concatenate([prompt[:, :end]] + read, axis=1)
    assert history.shape[1] == end, "the plan of a step was issued before its history was read"
    return history

  def _check_budget(self, batch: int, length: int):
    """Every expert one layer of the prompt can route must fit the cache at once."""
    cfg = self.cfg
    needed = min(batch * length * cfg.top_k, cfg.n_experts)
    if needed > self.n_slots:
      raise ValueError(
          f"a prompt of {batch} x {length} tokens can route {needed} experts in one layer, but the cache "
          f"holds {self.n_slots}: give cache_bytes >= {needed * self.store.expert_bytes}, a shorter prompt, "
          f"or use OffloadEngine, which streams such prompts through the cache")

  def _record(self, stats: OffloadStats, steps: list["_StepRecord"]):
    stats.hits = np.sum([s.hits for s in steps], axis=0).astype(int).tolist()
    stats.misses = np.sum([s.misses for s in steps], axis=0).astype(int).tolist()
    stats.routing = [[sorted(int(e) for e in ids if e >= 0) for ids in s.routed] for s in steps]
    if self._planner is not None:  # step n's record holds its plan of step n + 1
      made = [None] + [s.planned for s in steps[:-1]]
      stats.plans = [[] if m is None else [np.flatnonzero(row).tolist() for row in m] for m in made]
    else:
      stats.plans = [list(self._plan_log.get(n, [])) for n in range(len(steps))]
    on_host = [self._host is not None and n > 0 for n in range(len(steps))]  # decode steps of `hybrid`
    stats.step_read_bytes = [0 if host else int(np.sum(s.misses)) * self.store.expert_bytes
                             for s, host in zip(steps, on_host)]
    stats.host_experts = sum(int(np.sum(s.misses)) for s, host in zip(steps, on_host) if host)
    stats.decode_misses = "host" if self._host is not None else "device"
    stats.host_read_bytes = sum(stats.step_read_bytes)
    stats.logits = np.stack([s.logits for s in steps], axis=1)
    for c in self._copies:  # a copy of an expert its step routed to was used (others: wasted bytes)
      c.used = c.step < len(steps) and c.expert in stats.routing[c.step][c.layer]
    stats.copies = [c for c in self._copies if c.step < len(steps)]

  def _load_everything(self):
    """`resident`: expert e of layer l into slot l * E + e, once."""
    cfg = self.cfg
    for layer in range(cfg.n_layers):
      buffers = jax.device_put([self.store.buffer(layer, e) for e in range(cfg.n_experts)], self._sharding)
      self._pools = write_slots(self.store.layout, self._pools, buffers,
                                range(layer * cfg.n_experts, (layer + 1) * cfg.n_experts))


