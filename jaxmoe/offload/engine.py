"""OffloadEngine: exact layer-by-layer prefill and decode with experts offloaded to host memory.

Per step (prefill or one decode token):
  1. the strategy plans the step; the prefetcher issues those copies before any compute is dispatched
  2. per layer: attention + router (jitted); the router's expert ids are read on the host (the one
     small device->host sync per layer); copies for misses are issued, then one jitted call writes
     the layer's copies into their slots and runs the expert FFN (reading the slot pool through
     `rhs_index`) and combine: the device waits for copies in flight, the host goes on to issue
     copies for later layers
  3. logits of the last position -> next token
The `resident` strategy keeps every expert on the device and needs no per-layer sync. Strategies that
plan whole steps (stream_all, oracle, noisy_oracle, learned) speculate: the host sends the step's
small inputs in one transfer, works out the step's cache decisions from the plan, issues its copies
in one batch (a plan longer than the cache streams through it, layer by layer), dispatches every layer
on its planned experts and reads all layers' routing once at the end; a layer that routed to an
expert it did not have is redone with step 2 from there on. So a good plan costs no per-layer sync
and a bad one a redo.
The true router always decides what is computed: tokens and logits equal `jaxmoe.generate.generate`
(bitwise in f32; in bf16 up to the excess precision XLA may keep inside the reference's single jit,
which `--xla_allow_excess_precision=false` removes).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import moe
from jaxmoe.generate import check_prompt, select_token
from jaxmoe.model import LayerCache, MoELM, init_cache
from jaxmoe.offload import strategies
from jaxmoe.offload.cache import CopyRecord, ExpertCache, resident_pools, resolve, unpack_into
from jaxmoe.offload.layers import (Structure, attend_route, embed, expert_rows, finish, last_logits,
                                   layer_ffn, split_model)
from jaxmoe.offload.prefetch import Prefetcher
from jaxmoe.offload.stats import OffloadStats, settle_stalls
from jaxmoe.offload.store import ExpertStore, device_sharding


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _scheduled_ffn(structure: Structure, layout, leaves, pools, buffers, slots, rhs_index, h, x, experts,
                   weights):
  """Landed copies `buffers` written into their `slots`, then the layer's MoE FFN on the pools, in one
  dispatch; slots and rhs_index are tuples of device scalars (`ExpertCache.scalars`), so nothing
  small crosses to the device. -> (x, pools)."""
  pools = unpack_into(layout, pools, buffers, slots)
  layer = structure.merge(leaves)
  d, y_rows = expert_rows(layer.moe.cfg, pools, rhs_index, h, experts)
  return finish(layer, y_rows, d, weights, h, x), pools


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 7))
def _speculated_layer(structure: Structure, layout, leaves, pools, buffers, slots, rhs_index,
                      layer_cache, x, positions, pos):
  """A speculated layer in one dispatch: attention and router, its planned copies written into their
  slots, its MoE FFN on the pools (half the calls of `_attend_route` + `_scheduled_ffn`; on the H200
  each call held the host 0.2-0.35 ms while a layer's decode compute takes ~0.3 ms).
  -> (x out, pools, layer cache, and for a redo: x after attention, h, experts, weights)."""
  x, h, experts, weights, layer_cache, _ = attend_route(structure, leaves, (), x, positions,
                                                        layer_cache, pos)
  out, pools = _scheduled_ffn(structure, layout, leaves, pools, buffers, slots, rhs_index, h, x,
                              experts, weights)
  return out, pools, layer_cache, x, h, experts, weights


@functools.partial(jax.jit, static_argnums=0)
def _chunk_rows(structure: Structure, leaves, pools, rhs_index, in_chunk, h, experts, y_rows):
  """Expert rows of the experts in `in_chunk` [E] (the others keep y_rows [B*T*k, D]): a layer whose
  routed experts do not fit in the cache at once runs in chunks."""
  cfg = structure.merge(leaves).moe.cfg
  d, new_rows = expert_rows(cfg, pools, rhs_index, h, experts)
  keep = in_chunk[experts.reshape(-1)[d.order]]
  return jnp.where(keep[:, None], new_rows, y_rows)


@functools.partial(jax.jit, static_argnums=0)
def _layer_finish(structure: Structure, leaves, y_rows, h, x, experts, weights):
  layer = structure.merge(leaves)
  return finish(layer, y_rows, moe.dispatch(experts, layer.moe.cfg.n_experts), weights, h, x)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames="kv")
def _resident_step(head: Structure, structure: Structure, head_leaves, layer_leaves, pools, kv,
                   tokens, positions, pos):
  """A whole step of the `resident` strategy in one program (every expert on the device, nothing to
  decide on the host between layers): -> (last logits [B, V], KV caches, per-layer experts)."""
  x = embed(head, head_leaves, tokens)
  routed, new_kv = [], []
  for leaves, layer_pools, layer_cache in zip(layer_leaves, pools, kv):
    x, h, experts, weights, layer_cache, _ = attend_route(structure, leaves, (), x, positions,
                                                          layer_cache, pos)
    x = layer_ffn(structure, leaves, layer_pools, None, h, x, experts, weights)
    routed.append(experts)
    new_kv.append(layer_cache)
  return last_logits(head, head_leaves, x), new_kv, routed


# ---------------------------------------------------------------- the engine

@dataclasses.dataclass
class _Speculated:
  """A layer whose expert FFN was dispatched on its planned experts before its routing was read."""

  layer: int
  holders: dict  # expert -> the cache entry whose slot the FFN read (the layer's cached experts)
  x: jax.Array  # the layer's input to the FFN (after attention), kept for a redo
  h: jax.Array
  experts: jax.Array
  weights: jax.Array


class OffloadEngine:
  """Exact MoE generation with experts in an `ExpertStore` and a device `ExpertCache` of
  `cache_bytes`. `strategy` is a name from `strategies.NAMES` or a `strategies.Strategy`;
  `predictor` serves the `learned` strategy; `issue` ("main" or "thread") is how prefetch copies
  are issued (`jaxmoe.offload.prefetch`).

  `speculate`: strategies that plan whole steps (`Strategy.speculative`: stream_all, oracle,
  noisy_oracle, learned) dispatch a step's layers on the planned experts before the host reads their
  routing, which it checks once at the step's end. If every routed expert was in the pool, each FFN
  computed exactly what the router chose; if not, the step is redone from the first such layer with
  the routing read first (misses fetched on demand), and the later layers' attention rewrites its
  KV-cache entries.
  Either way the outputs are exact; a correct plan saves every per-layer host round trip. After a
  redone layer the rest of the step is speculated again. A plan that always holds the routed experts
  (`Strategy.plan_covers_routing`: stream_all, oracle) is speculated on every step, prompts included,
  its copies streamed through the cache when they outnumber its slots. A guess is speculated only on
  decode steps, while its running per-layer hit rate is at least `SPECULATE_HIT_RATE` and the step's
  plan fits in the cache: a weak plan would pay a redo at nearly every layer. (H200, gpu preset, random
  weights, 2026-11-29, noisy-oracle plans, per-token ms speculated / not: recall 0.7 26.0 / 25.6,
  0.9 25.8 / 24.4, 0.97 18.1 / 21.8, 1.0 15.7 / 22.1: a guess pays only when nearly every layer is
  right, hence a threshold of 0.9 on the share of layers whose plan held all routed experts.)

  `fuse_resident_step` (`resident` only): run a step as one program rather than two calls per layer.
  Same results (bitwise on the CPU); on a GPU in bf16 XLA may round differently across the fused
  program than across the per-layer calls that every offloaded strategy shares."""

  SPECULATE_HIT_RATE = 0.9

  def __init__(self, model: MoELM, *, cache_bytes: int | None = None,
               strategy: str | strategies.Strategy = "lru", predictor=None,
               store: ExpertStore | None = None, device: jax.Device | None = None,
               issue: str = "main", speculate: bool = True, fuse_resident_step: bool = True):
    cfg = model.cfg
    self.cfg = cfg
    self.speculate = bool(speculate)
    self.fuse_resident_step = bool(fuse_resident_step)
    if isinstance(strategy, str):
      strategy = strategies.make(strategy, n_experts=cfg.n_experts, predictor=predictor)
    strategy = strategies.device_only(strategy, "OffloadEngine")
    if getattr(strategy, "lead", 0):
      raise ValueError(f"OffloadEngine plans each step with its tokens in hand: learned needs a predictor "
                       f"of lead 0, got lead {strategy.lead} (ProgramEngine plans with lead 2)")
    self.strategy = strategy
    self.store = store if store is not None else ExpertStore.from_model(model, device)
    if self.store.cfg != cfg:
      raise ValueError("the expert store was built for another config")

    # Device arguments are all committed to one sharding (host ones are numpy), so each function
    # compiles once per shape.
    self._sharding = device_sharding(device or self.store.device)
    self._head, self._head_leaves, self._layer, self._layer_leaves = split_model(model, self._put)

    self.cache: ExpertCache | None = None
    self.prefetcher: Prefetcher | None = None
    self._resident: list[dict[str, jax.Array]] | None = None
    if strategy.resident:
      if cache_bytes is not None and cache_bytes < self.store.nbytes:
        raise ValueError(f"the resident strategy needs every expert on the device "
                         f"({self.store.nbytes} bytes), got cache_bytes={cache_bytes}")
      self._resident = resident_pools(self.store, device)
    else:
      if cache_bytes is None:
        raise ValueError(f"strategy {strategy.name!r} needs cache_bytes (the device expert budget)")
      self.cache = ExpertCache(self.store, cache_bytes, strategy.eviction, device)
      self.prefetcher = Prefetcher(self.store, self.cache, device, issue)

    # running share of layers whose routed experts were all cached when the layer ran (the plan's
    # per-layer hit rate): speculation pays only while it stays high
    self._layer_hit_rate = 1.0
    self._init_request_state(OffloadStats())

  def _init_request_state(self, stats: OffloadStats):
    """The state a request builds up, empty (shared with the expert-parallel engine)."""
    self._kv: list[LayerCache] = []
    self._pos = 0
    self._step = 0
    self._history = np.zeros((0, 0), np.int32)
    self._plan: list[list[int]] = []
    self._future_uses: dict[tuple[int, int], list[int]] = {}  # (layer, expert) -> later-step clocks
    self._unread_routing: list[list[jax.Array]] = []  # resident: [step][layer] experts [B*T, k]
    # layers whose FFN went out with copies in flight: (layer, dispatch time, their copy records)
    self._awaited: list[tuple[int, float, list[CopyRecord]]] = []
    self.stats = stats

  def _put(self, tree):
    return jax.device_put(tree, self._sharding)

  # -------------------------------------------------------------- public API

  def prefill(self, tokens) -> np.ndarray:
    """Start a request with prompt tokens [B, T]; returns the last position's logits [B, V] f32."""
    logits = np.asarray(self._prefill(self._check(tokens, 1)))
    self._read_resident_routing()
    return logits

  def decode(self, tokens) -> np.ndarray:
    """Feed one new token per sequence [B]; returns its logits [B, V] f32."""
    tokens = np.asarray(tokens, np.int32).reshape(-1, 1)
    if tokens.shape[0] != self._history.shape[0]:
      raise ValueError(f"decode needs {self._history.shape[0]} tokens (one per sequence), got "
                       f"{tokens.shape[0]}; call prefill first")
    logits = np.asarray(self._decode(tokens))
    self._read_resident_routing()
    return logits

  def generate(self, tokens, max_new_tokens: int, *, temperature: float = 0.0,
               seed: int = 0) -> tuple[np.ndarray, OffloadStats]:
    """Generate like `jaxmoe.generate.generate`: -> (tokens [B, T + N], stats with logits [B, N, V])."""
    prompt = self._check(tokens, max_new_tokens)
    key = jax.random.key(seed)
    start = time.perf_counter()
    step_key = lambda step: None if temperature == 0.0 else jax.random.fold_in(key, step)
    logits = self._prefill(prompt, start)
    token = np.asarray(select_token(logits, temperature, step_key(0)))
    self.stats.ttft_s = time.perf_counter() - start
    all_logits, new = [np.asarray(logits)], [token]
    for step in range(1, max_new_tokens):
      t0 = time.perf_counter()
      logits = self._decode(token[:, None])
      token = np.asarray(select_token(logits, temperature, step_key(step)))
      self.stats.token_latencies_s.append(time.perf_counter() - t0)
      all_logits.append(np.asarray(logits))
      new.append(token)
    self.stats.e2e_s = time.perf_counter() - start
    self.stats.n_generated = max_new_tokens
    self.stats.logits = np.stack(all_logits, axis=1)
    self._finish_request()
    return np.concatenate([prompt, np.stack(new, axis=1)], axis=1), self.stats

  def reset_cache(self):
    """Forget every cached expert (the next request starts cold)."""
    if self.cache is not None:
      self.prefetcher.drain()
      self.cache.clear()

  def close(self):
    """Stop the copy watcher thread."""
    if self.prefetcher is not None:
      self.prefetcher.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -------------------------------------------------------------- steps

  def _check(self, tokens, max_new_tokens: int) -> np.ndarray:
    return check_prompt(tokens, max_new_tokens, self.cfg.max_seq_len, self.cfg.vocab_size)

  def _prefill(self, prompt: np.ndarray, start: float | None = None) -> jax.Array:
    cfg = self.cfg
    b = prompt.shape[0]
    # distinct buffers per layer and for k and v: each is donated to its layer's attention
    self._kv = [self._put(LayerCache(jnp.zeros_like(c.k), jnp.zeros_like(c.v)))
                for c in init_cache(cfg, b).layers]
    self._pos, self._step, self._history = 0, 0, prompt
    self._unread_routing, self._awaited = [], []
    self.stats = OffloadStats(hits=[0] * cfg.n_layers, misses=[0] * cfg.n_layers,
                              stall_s=[0.0] * cfg.n_layers, batch=b,
                              start_s=time.perf_counter() if start is None else start)
    if self.prefetcher is not None:
      self.prefetcher.drain()
      self.prefetcher.records = self.stats.copies  # copy records are kept per request
    return self._run_step(prompt)

  def _decode(self, tokens: np.ndarray) -> jax.Array:
    if self._pos + 1 > self.cfg.max_seq_len:
      raise ValueError(f"the KV cache is full (max_seq_len={self.cfg.max_seq_len})")
    self._step += 1
    self._history = np.concatenate([self._history, tokens], axis=1)
    return self._run_step(tokens)

  def _run_step(self, tokens: np.ndarray) -> jax.Array:
    """One forward step over new tokens [B, T] at the current position -> last logits [B, V]."""
    cfg = self.cfg
    b, t = tokens.shape
    host = (np.int32(self._pos), np.broadcast_to(self._pos + np.arange(t, dtype=np.int32), (b, t)),
            tokens)
    if self._resident is not None and self.fuse_resident_step:
      pos, positions, tokens = self._host_inputs(*host)
      logits, self._kv, routed = _resident_step(self._head, self._layer, self._head_leaves,
                                                tuple(self._layer_leaves), tuple(self._resident),
                                                self._kv, tokens, positions, pos)
      self._record_resident_routing(routed)
      self._pos += t
      return logits
    speculative = self.speculate and self._resident is None and self.strategy.speculative
    for prefetcher in self._prefetchers():  # the plan's copies go after the step's small inputs
      prefetcher.defer()
    self._plan_step(t)
    # one host-to-device call per step for the small inputs every layer shares, before the step's
    # prefetch copies (which it would otherwise queue behind)
    pos, positions, tokens = self._host_inputs(*host)
    x = embed(self._head, self._head_leaves, tokens)
    routed = []
    layer = 0
    while layer < cfg.n_layers:
      if speculative and self._worth_speculating(layer, t):
        x, layer = self._speculate_from(layer, x, positions, pos)
        continue
      for prefetcher in self._prefetchers():
        prefetcher.issue_deferred()
      depth = self.strategy.speculation_depth
      ahead = tuple(self._layer_leaves[layer + 1:layer + 1 + depth])
      x, h, experts, weights, self._kv[layer], speculated = attend_route(
          self._layer, self._layer_leaves[layer], ahead, x, positions, self._kv[layer], pos)
      if self._resident is not None:
        x = self._resident_ffn(layer, h, x, experts, weights)
        routed.append(experts)
      else:
        x = self._offloaded_ffn(layer, x, h, experts, weights, speculated)
      layer += 1
    logits = last_logits(self._head, self._head_leaves, x)
    if self._resident is not None:
      self._record_resident_routing(routed)
    self._count_stalls()
    self._pos += t
    return logits

  def _worth_speculating(self, layer: int, n_new: int) -> bool:
    """A plan that always holds the routed experts is speculated whenever each layer's part fits the
    cache (a longer plan is streamed through it). A guess is speculated only on one-token steps, while
    its running per-layer hit rate is high, and if it fits the cache: a prompt's routing spreads over
    most experts of a layer, and a failed speculation wastes the layers after the miss."""
    if max(len(experts) for experts in self._plan[layer:]) > self.cache.n_slots:
      return False
    if self.strategy.plan_covers_routing:
      return True
    planned = sum(len(experts) for experts in self._plan[layer:])
    return (n_new == 1 and self._layer_hit_rate >= self.SPECULATE_HIT_RATE
            and planned <= self.cache.n_slots)

  def _count_layer(self, all_cached: bool):
    self._layer_hit_rate += 0.1 * (float(all_cached) - self._layer_hit_rate)

  def _speculate_from(self, first: int, x, positions, pos) -> tuple[jax.Array, int]:
    """Layers first.. dispatched on their planned experts, their routing read once at the end.

    Per layer the host settles the layer's cache decisions (its copies written and its `rhs_index`,
    all as device-resident arguments), dispatches the layer as one call (`_speculated_layer`), and
    plans the copies into the slots the layer releases. When the rest of the plan fits in the cache,
    all of that is played through first and the copies go out in one batch ahead of every layer: no layer
    waits for the host. A longer plan (a prompt's, or `stream_all`'s) streams through the cache
    instead: the held copies go out first, then each layer's right after its FFN (they wait for that
    FFN only, so copies in flight never outgrow the cache), and the host plans the next layers while
    the device computes. (H200, gpu preset, 2026-11-29: the oracle's decode took 9.1-9.8 ms per token
    played through first and 13.9 ms interleaved; its prompt 55.5 ms interleaved and 59.9 ms played
    through first with the copies streamed.) A layer that routed to an expert it lacked is redone
    with its routing read first.
    -> (x after the last good or redone layer, the layer to go on from)."""
    cfg, cache, prefetcher = self.cfg, self.cache, self.prefetcher
    pending = []

    def settle(layer):
      cached = [e for e in range(cfg.n_experts) if cache.is_cached(layer, e)]
      return (*cache.settle(layer, cached), cache.holders(layer, cached))

    def dispatch(x, layer, staged, slots, index, holders):
      out, cache.pools, self._kv[layer], x, h, experts, weights = _speculated_layer(
          self._layer, self.store.layout, self._layer_leaves[layer], cache.pools,
          tuple(map(resolve, staged)), slots, index, self._kv[layer], x, positions, pos)
      pending.append(_Speculated(layer, holders, x, h, experts, weights))
      return out

    layers = range(first, cfg.n_layers)
    if sum(len(self._plan[layer]) for layer in layers) <= cache.n_slots:
      prefetcher.defer()  # (copies of the step's plan may already be held)
      schedule = []
      for layer in layers:
        schedule.append(settle(layer))
        self._prefetch(first_layer=layer + 1)
      prefetcher.issue_deferred()
      for layer, settled in zip(layers, schedule):
        x = dispatch(x, layer, *settled)
    else:
      prefetcher.issue_deferred()
      for layer in layers:
        x = dispatch(x, layer, *settle(layer))
        self._prefetch(first_layer=layer + 1)
    failed = self._check_speculated(pending)
    if failed is None:
      return x, cfg.n_layers
    no_guess = np.zeros((0,) + failed.experts.shape, np.int32)
    x = self._offloaded_ffn(failed.layer, failed.x, failed.h, failed.experts, failed.weights, no_guess)
    return x, failed.layer + 1

  def _check_speculated(self, pending: list[_Speculated]) -> _Speculated | None:
    """Read the routing of the speculated layers (one device-to-host call). Returns the first layer
    that routed to an expert its FFN did not have (the later ones are redone), or None."""
    stats = self.stats
    for spec, routed in zip(pending, jax.device_get([spec.experts for spec in pending])):
      needed = sorted(set(routed.reshape(-1).tolist()))
      if not spec.holders.keys() >= set(needed):
        stats.redone += 1
        return spec
      self._count_layer(True)
      stats.speculated += 1
      if spec.layer == 0:
        stats.routing.append([])
      stats.routing[-1].append(needed)
      stats.hits[spec.layer] += len(needed)
      self.cache.mark_used(spec.layer, needed, spec.holders)
    return None

  # The steps above are shared with the expert-parallel engine, which overrides these hooks.

  def _host_inputs(self, *arrays: np.ndarray) -> list[jax.Array]:
    """Small host arrays to the device in one call at step start (the device is idle then). Passing
    them as numpy to every layer's jitted call instead costs a transfer per call and argument (on the
    H200 host a numpy argument added 0.07-0.3 ms to a call; the resident gpu-preset decode went from
    10.7 to 7.0 ms per token between the main-job runs before and after this and `ExpertCache.land`)."""
    return jax.device_put(list(arrays), self._sharding)

  def _plan_step(self, n_new: int):
    """Before any layer of a step: ask the strategy for the step's plan and issue its copies."""
    if self.cache is not None:
      self.prefetcher.step = self._step
      self._issue_step_plan(n_new, self.cache.n_slots)

  def _issue_step_plan(self, n_new: int, n_slots: int):
    n_layers = self.cfg.n_layers
    plan = self.strategy.plan_step(self._history, n_new, self._step, n_slots, n_layers)
    self._plan = [list(experts) for experts in plan] if plan else [[] for _ in range(n_layers)]
    self._future_uses = {}
    for offset, step_plan in enumerate(self.strategy.future(self._step), start=1):
      for layer, experts in enumerate(step_plan):
        for e in experts:
          self._future_uses.setdefault((layer, e), []).append((self._step + offset) * n_layers + layer)
    self._prefetch(first_layer=0)

  def _resident_ffn(self, layer: int, h, x, experts, weights):
    return layer_ffn(self._layer, self._layer_leaves[layer], self._resident[layer], None, h, x,
                      experts, weights)

  def _record_resident_routing(self, routed):
    self._unread_routing.append(routed)  # read when the call is over, so decoding never waits

  def _finish_request(self):
    """After the last token: the resident routing is read and every copy is time-stamped."""
    self._read_resident_routing()
    if self.prefetcher is not None:
      self.prefetcher.drain()
    self._count_stalls()

  def _count_stalls(self):
    """Stalls of the layers whose FFN went out with copies in flight (`stats.settle_stalls`)."""
    self._awaited = settle_stalls(self._awaited, self.stats.stall_s)

  def _read_resident_routing(self):
    """Routing of the resident model's steps, read once the request (or call) is over, so decoding
    never waits for it."""
    for routed in jax.device_get(self._unread_routing):
      step_routing = [sorted(set(e.reshape(-1).tolist())) for e in routed]
      self.stats.routing.append(step_routing)
      for layer, experts in enumerate(step_routing):
        self.stats.hits[layer] += len(experts)
    self._unread_routing = []

  def _offloaded_ffn(self, layer: int, x, h, experts, weights, speculated) -> jax.Array:
    """Make the routed experts of `layer` resident (exact: misses fetched now), dispatch the expert
    FFN on the slot pool, then prefetch for later layers."""
    cache, stats = self.cache, self.stats
    # the per-layer host sync (speculated experts only where the strategy speculates)
    if speculated.size:
      routed, speculated = jax.device_get((experts, speculated))
    else:
      routed, speculated = jax.device_get(experts), np.zeros(speculated.shape, np.int32)
    needed = sorted(set(routed.reshape(-1).tolist()))
    if layer == 0:
      stats.routing.append([])
    stats.routing[-1].append(needed)
    # cached experts first; more than the cache holds at once -> chunks streamed through it
    needed_order = sorted(needed, key=lambda e: not cache.is_cached(layer, e))
    chunks = [needed_order[i:i + cache.n_slots] for i in range(0, len(needed_order), cache.n_slots)]
    # copies first (the device queue is empty now), then the writes of copies that already landed
    hits, misses = cache.ensure_resident(layer, chunks[0], self.prefetcher.copy)
    for later, guess in self.strategy.plan_layer(layer, speculated).items():
      if later < self.cfg.n_layers:
        self._plan[later] = list(dict.fromkeys(guess + self._plan[later]))
    args = (self._layer, self._layer_leaves[layer])
    if len(chunks) == 1:
      # the slot writes and the FFN in one call, dispatched at once: the device waits for the copies
      # in flight, the host does not (on the H200 a host wait for a layer's two copies took ~0.6 ms,
      # after which the device idled through the FFN's dispatch)
      awaited, buffers, slots, index = cache.arrive(layer, chunks[0])
      x, cache.pools = _scheduled_ffn(self._layer, self.store.layout, self._layer_leaves[layer],
                                      cache.pools, tuple(buffers), slots, index, h, x, experts,
                                      weights)
      stall = 0.0
      if awaited:
        self._awaited.append((layer, time.perf_counter(), awaited))
      cache.mark_used(layer, needed)
    else:
      stall, index = cache.land(layer, chunks[0])
      y_rows = self._put(np.zeros((experts.size, h.shape[-1]), h.dtype))
      for i, chunk in enumerate(chunks):
        if i:
          chunk_hits, chunk_misses = cache.ensure_resident(layer, chunk, self.prefetcher.copy)
          hits, misses = hits + chunk_hits, misses + chunk_misses
          chunk_stall, index = cache.land(layer, chunk)
          stall += chunk_stall
        in_chunk = np.zeros((self.cfg.n_experts,), bool)
        in_chunk[chunk] = True
        y_rows = _chunk_rows(*args, cache.pools, index, in_chunk, h, experts, y_rows)
        cache.mark_used(layer, chunk)
      x = _layer_finish(*args, y_rows, h, x, experts, weights)
    if not self.strategy.keeps_experts:
      cache.forget(layer, needed)
    # Copies for later layers go after this layer's FFN: they may then take this layer's slots (the
    # device runs the FFN before any later write into them), as Belady's MIN would.
    self._prefetch(first_layer=layer + 1)
    stats.hits[layer] += hits
    stats.misses[layer] += misses
    stats.stall_s[layer] += stall
    self._count_layer(misses == 0)
    return x

  def _caches(self) -> list[ExpertCache]:
    return [self.cache]

  def _prefetchers(self) -> list[Prefetcher]:
    return [] if self.prefetcher is None else [self.prefetcher]

  def _prefetch(self, first_layer: int):
    """Issue the plan's copies for layers >= first_layer."""
    self.prefetcher.prefetch(self._planned(first_layer))

  def _planned(self, first_layer: int) -> list[tuple[int, int]]:
    """The plan's (layer, expert) for layers >= first_layer, in order; gives the cache the layer
    clock and each expert's planned uses (this step's plan, then the strategy's later steps)."""
    n_layers = self.cfg.n_layers
    items = [(layer, e) for layer in range(first_layer, n_layers) for e in self._plan[layer]]
    now = self._step * n_layers + first_layer
    uses = dict(self._future_uses)
    for layer, e in items:
      uses[(layer, e)] = [self._step * n_layers + layer] + self._future_uses.get((layer, e), [])
    for cache in self._caches():
      cache.set_plan(now, uses)
    return items
