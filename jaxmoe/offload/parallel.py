"""ExpertParallelEngine: exact offloaded MoE inference over several devices of one host.

Experts are partitioned across a `jax.sharding.Mesh` with one axis, "expert": expert e of every layer
is owned by device e % n_devices (round-robin: balanced for any n_devices <= n_experts, and the same
owner in every layer, so one device's share of a layer never depends on the layer). Each device has
its own `ExpertCache` (a slot pool of `cache_bytes_per_device` on that device) and its own
`Prefetcher`; the host `ExpertStore` keeps every expert once, each in the pinned host memory of its
owner, so a copy only ever crosses the owner's own host-to-device link. The strategy's plan is split
per device by ownership.

Per step, per layer:
  1. attention + router run replicated on every device (the same program on the same inputs, so the
     same bits everywhere); the router's expert ids are read on the host (one small sync per layer)
  2. per device: misses among the experts it owns are fetched on demand, later layers' plans are
     prefetched, then the expert FFN is dispatched under `shard_map`: each device computes the rows of
     the experts it owns from its own slot pool and zeros for every other row
  3. a `psum` over the mesh gathers the rows, then combine + shared expert + residual run replicated,
     exactly as on one device

Token dispatch is by replication + masking: every device sees every token and computes only the rows
routed to its experts. For decode batches (a few rows per layer) this is the simplest correct choice:
the extra traffic is one all-reduce of [T*k, D] rows per layer, and attention is recomputed on every
device (its weights and KV cache replicated). For large prefills an all-to-all dispatch
(`jax.lax.all_to_all`, each device receiving only its own experts' rows) with data-parallel attention
would move T*k*D / n_devices instead and split the attention work; it is not implemented here.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmoe import moe
from jaxmoe.model import LayerCache, MoELM, init_cache
from jaxmoe.offload import strategies
from jaxmoe.offload.cache import CopyRecord, ExpertCache
from jaxmoe.offload.engine import OffloadEngine
from jaxmoe.offload.layers import Structure, split_model
from jaxmoe.offload.stats import OffloadStats
from jaxmoe.offload.prefetch import Prefetcher
from jaxmoe.offload.store import ExpertStore, device_sharding, host_sharding, unpack

AXIS = "expert"
# What a device holds in the rows it does not compute: x + (-0.0) == x bitwise for every x, +0.0
# included (x + 0.0 would turn -0.0 into +0.0).
_FILL = -0.0


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
  """`jax.shard_map` (newer JAX) or `jax.experimental.shard_map.shard_map` (older), unchecked."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def owners(n_experts: int, n_devices: int) -> np.ndarray:
  """[E] int: the mesh position of the device that owns each expert (round-robin)."""
  return np.arange(n_experts) % n_devices


def partition_store(store: ExpertStore, devices: Sequence[jax.Device]) -> ExpertStore:
  """The same experts, each in the pinned host memory of its owner among `devices`. A buffer already
  there is shared, not copied; one registered with another device is re-registered through a host
  copy (never through a device), so this store plus the old one hold each moved expert twice until
  the old one is dropped."""
  cfg = store.cfg
  owner = owners(cfg.n_experts, len(devices))
  buffers = []
  for layer in range(cfg.n_layers):
    row = []
    for e in range(cfg.n_experts):
      buf, dev = store.buffer(layer, e), devices[owner[e]]
      row.append(buf if buf.devices() == {dev} else jax.device_put(np.asarray(buf), host_sharding(dev)))
    buffers.append(row)
  jax.block_until_ready(buffers)
  return ExpertStore(cfg, buffers)


# ---------------------------------------------------------------- jitted per-layer functions
# Every input is either replicated over the mesh or sharded on its leading axis by device, so each
# function compiles once per (shape, mesh); the mesh is a static argument.

def _local_rows(cfg, pools, rhs_index, compute, h, experts):
  """On one device: the expert rows of the experts in `compute`, zeros elsewhere.

  pools {name: [S, ...]} (this device's slot pool), rhs_index [1, E] (expert -> local slot),
  compute [1, E] bool (experts this device computes now), h [T, D], experts [T, k]
  -> [1, T*k, D] rows in flat (token * k + slot) order, -0.0 where another device computes.

  This device's rows are moved to the front, grouped by expert in the order of the global stable sort
  (`moe.dispatch`), and every other group gets size 0, so the kernel reads no weights for them.
  """
  rhs_index, compute = rhs_index[0], compute[0]
  n_experts, k = compute.shape[0], experts.shape[1]
  flat = experts.reshape(-1)  # [T*k]
  mine = compute[flat]  # [T*k]
  order = jnp.argsort(jnp.where(mine, flat, n_experts), stable=True).astype(jnp.int32)  # mine first
  group_sizes = jnp.where(compute, jnp.bincount(flat, length=n_experts), 0).astype(jnp.int32)  # [E]
  y = moe.expert_ffn(h[order // k], pools, group_sizes, cfg.activation, rhs_index=rhs_index,
                     impl=cfg.kernel_impl)  # [T*k, D]; rows past sum(group_sizes) unspecified
  y = jnp.where((jnp.arange(flat.shape[0]) < jnp.sum(group_sizes))[:, None], y, _FILL)
  return jnp.full_like(y, _FILL).at[order].set(y)[None]


def _rows(mesh, cfg, pools, rhs_index, compute, h, experts):
  """Every device's `_local_rows`: -> [n_devices, T*k, D] sharded over the mesh."""
  spec = P(AXIS)
  return _shard_map(functools.partial(_local_rows, cfg), mesh, (spec, spec, spec, P(), P()),
                    spec)(pools, rhs_index, compute, h, experts)


def _gather_and_finish(mesh, layer, rows, h, x, experts, weights):
  """psum the per-device rows, then combine + shared expert + residual as `moe`/the model do.

  EXACTNESS: every row of `rows` is computed by exactly one device and is exactly zero (-0.0) on all
  others, so the psum adds only zeros to it (x + 0 = x, whatever the reduction order): the summed
  rows are bitwise the rows one device would have computed. The weighted combine runs after the
  psum, on those rows, in the single-device path's order of operations; summing weighted outputs
  across devices instead would change the rounding."""
  y_flat = _shard_map(lambda r: jax.lax.psum(r[0], AXIS), mesh, (P(AXIS),), P())(rows)  # [T*k, D]
  d = moe.dispatch(experts, layer.moe.cfg.n_experts)
  y = moe.combine(y_flat[d.order], d, weights) + layer.moe.shared(h)
  return x + y.reshape(x.shape)


@functools.partial(jax.jit, static_argnums=0, static_argnames="mesh")
def _layer_ffn(structure: Structure, leaves, pools, rhs_index, compute, h, x, experts, weights, *,
               mesh):
  """The MoE FFN of one layer when each device's routed experts are all resident at once."""
  layer = structure.merge(leaves)
  rows = _rows(mesh, layer.moe.cfg, pools, rhs_index, compute, h, experts)
  return _gather_and_finish(mesh, layer, rows, h, x, experts, weights)


@functools.partial(jax.jit, static_argnums=0, static_argnames="mesh")
def _chunk_rows(structure: Structure, leaves, pools, rhs_index, compute, h, experts, rows, *, mesh):
  """One round of a layer streamed through the caches in chunks: rows [n, T*k, D] of the experts in
  `compute` are replaced (the others keep `rows`)."""
  cfg = structure.merge(leaves).moe.cfg
  new = _rows(mesh, cfg, pools, rhs_index, compute, h, experts)

  def keep_new(compute, experts, new, rows):
    mine = compute[0][experts.reshape(-1)]  # [T*k]
    return jnp.where(mine[None, :, None], new, rows)

  spec = P(AXIS)
  return _shard_map(keep_new, mesh, (spec, P(), spec, spec), spec)(compute, experts, new, rows)


@functools.partial(jax.jit, static_argnums=0, static_argnames="mesh")
def _layer_finish(structure: Structure, leaves, rows, h, x, experts, weights, *, mesh):
  layer = structure.merge(leaves)
  return _gather_and_finish(mesh, layer, rows, h, x, experts, weights)


# ---------------------------------------------------------------- statistics

@dataclasses.dataclass
class ParallelStats(OffloadStats):
  """`OffloadStats` (totals over devices; `copies` of every device) plus per-device numbers."""

  n_devices: int = 0
  device_hits: list[list[int]] = dataclasses.field(default_factory=list)  # [n][L]
  device_misses: list[list[int]] = dataclasses.field(default_factory=list)  # [n][L]
  device_stall_s: list[list[float]] = dataclasses.field(default_factory=list)  # [n][L]
  device_copies: list[list[CopyRecord]] = dataclasses.field(default_factory=list)  # [n][copies]

  @property
  def bytes_copied_per_device(self) -> list[int]:
    return [sum(c.nbytes for c in copies) for copies in self.device_copies]

  @property
  def bytes_useful_per_device(self) -> list[int]:
    return [sum(c.nbytes for c in copies if c.used) for copies in self.device_copies]

  def summary(self) -> dict[str, Any]:
    out = super().summary()
    out.update({"n_devices": self.n_devices, "bytes_copied_per_device": self.bytes_copied_per_device,
                "bytes_useful_per_device": self.bytes_useful_per_device,
                "hits_per_device": [list(h) for h in self.device_hits],
                "misses_per_device": [list(m) for m in self.device_misses],
                "stall_s_per_device": [list(s) for s in self.device_stall_s]})
    return out


# ---------------------------------------------------------------- the engine

class ExpertParallelEngine(OffloadEngine):
  """Exact MoE generation with experts partitioned over `devices` (default: every local device),
  each device caching its own experts in `cache_bytes_per_device`. `strategy` is a name from
  `strategies.NAMES` or a `strategies.Strategy`; the request API (prefill, decode, generate) is
  inherited from `OffloadEngine`; what differs is the expert FFN, the caches and the copies.

  `store`: an `ExpertStore` to take the experts from (e.g. `ExpertStore.random` for benchmarks);
  its buffers are moved to their owners' pinned host memory (`partition_store`). Default: built from
  `model`. Strategies plan with the slots of all devices together (`learned` cuts its per-layer
  ranking at total slots // n_layers); each device then issues the planned copies it owns.
  `stats` totals over devices, with per-device hits, misses, stalls and copies (`ParallelStats`).
  """

  def __init__(self, model: MoELM, *, cache_bytes_per_device: int | None = None,
               strategy: str | strategies.Strategy = "lru", predictor=None,
               devices: Sequence[jax.Device] | None = None, store: ExpertStore | None = None):
    # Not OffloadEngine.__init__: that builds one cache and one prefetcher; this engine builds one of
    # each per device and a mesh, and shares only the request-level methods.
    cfg = model.cfg
    self.cfg = cfg
    self.devices = list(devices) if devices is not None else list(jax.local_devices())
    n = len(self.devices)
    if not 1 <= n <= cfg.n_experts:
      raise ValueError(f"need between 1 and n_experts={cfg.n_experts} devices, got {n}")
    if len(set(self.devices)) != n:
      raise ValueError(f"devices must be distinct, got {self.devices}")
    self.n_devices = n
    self.speculate = False  # every layer's routing is read before its FFN (no speculative dispatch)
    self.fuse_resident_step = False  # its resident FFN is the sharded per-layer `_resident_ffn`
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    self.owner = owners(cfg.n_experts, n)  # [E]
    self.owned = [[int(e) for e in np.flatnonzero(self.owner == d)] for d in range(n)]
    if isinstance(strategy, str):
      strategy = strategies.make(strategy, n_experts=cfg.n_experts, predictor=predictor)
    self.strategy = strategies.device_only(strategy, type(self).__name__)
    self._check_budget(cache_bytes_per_device)
    if store is None:
      store = ExpertStore.from_model(model, self.devices[0])
    if store.cfg != cfg:
      raise ValueError("the expert store was built for another config")
    self.store = partition_store(store, self.devices)

    self._replicated = NamedSharding(self.mesh, P())
    self._by_device = NamedSharding(self.mesh, P(AXIS))
    # Non-expert parameters only, replicated on every device.
    self._head, self._head_leaves, self._layer, self._layer_leaves = split_model(model, self._put)

    self.caches: list[ExpertCache] = []
    self.prefetchers: list[Prefetcher] = []
    self._resident: list[dict[str, jax.Array]] | None = None
    if strategy.resident:
      self._resident = self._resident_pools()
      self._resident_index = self._shard(self._slot_index([{e: e // n for e in owned}
                                                           for owned in self.owned]))
      self._resident_compute = self._shard(self._compute_mask(self.owned))
    else:
      for device in self.devices:
        cache = ExpertCache(self.store, cache_bytes_per_device, strategy.eviction, device)
        self.caches.append(cache)
        self.prefetchers.append(Prefetcher(self.store, cache, device))

    self._init_request_state(ParallelStats())

  def _check_budget(self, cache_bytes_per_device: int | None):
    """Refuse, before anything is built, a per-device budget the strategy cannot run with."""
    cfg, expert_bytes = self.cfg, self.cfg.expert_bytes
    if self.strategy.resident:
      need = max(len(owned) for owned in self.owned) * expert_bytes
      if cache_bytes_per_device is not None and cache_bytes_per_device < need:
        raise ValueError(f"the resident strategy needs every owned expert on its device "
                         f"({need} bytes per device), got cache_bytes_per_device="
                         f"{cache_bytes_per_device}")
      return
    if cache_bytes_per_device is None:
      raise ValueError(f"strategy {self.strategy.name!r} needs cache_bytes_per_device (the expert "
                       f"budget of each device)")
    slots = int(cache_bytes_per_device) // expert_bytes
    if slots < cfg.top_k:
      raise ValueError(
          f"cache_bytes_per_device={cache_bytes_per_device} holds {slots} experts of {expert_bytes} "
          f"bytes per device, but one token's top_k={cfg.top_k} experts may all be owned by one "
          f"device: give at least {cfg.top_k * expert_bytes} bytes per device")

  # -------------------------------------------------------------- placement helpers

  def _put(self, tree):
    """Replicated on every device of the mesh."""
    return jax.device_put(tree, self._replicated)

  def _shard(self, array: np.ndarray) -> jax.Array:
    """[n_devices, ...] host array -> row d on device d."""
    return jax.device_put(array, self._by_device)

  def _slot_index(self, slot_maps: Sequence[dict[int, int]]) -> np.ndarray:
    """Per device {expert: local slot} -> rhs_index [n, E] (unlisted experts: slot 0, no rows)."""
    index = np.zeros((self.n_devices, self.cfg.n_experts), np.int32)
    for d, slots in enumerate(slot_maps):
      for e, slot in slots.items():
        index[d, e] = slot
    return index

  def _compute_mask(self, per_device: Sequence[Sequence[int]]) -> np.ndarray:
    """Per device, the experts it computes now -> [n, E] bool."""
    mask = np.zeros((self.n_devices, self.cfg.n_experts), bool)
    for d, experts in enumerate(per_device):
      mask[d, list(experts)] = True
    return mask

  def _global_pools(self, pools: Sequence[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Per-device slot pools {name: [S, ...]} -> {name: [n*S, ...]} sharded over the mesh (no copy)."""
    out = {}
    for name in pools[0]:
      local = [p[name] for p in pools]
      shape = (local[0].shape[0] * self.n_devices,) + local[0].shape[1:]
      out[name] = jax.make_array_from_single_device_arrays(shape, self._by_device, local)
    return out

  def _resident_pools(self) -> list[dict[str, jax.Array]]:
    """Every layer's owned experts on their owner, expert e in slot e // n_devices."""
    store = self.store
    slots = max(len(owned) for owned in self.owned)
    out = []
    for layer in range(self.cfg.n_layers):
      per_device = []
      for d, device in enumerate(self.devices):
        sharding = device_sharding(device)
        mats = [unpack(store.layout, jax.device_put(store.buffer(layer, e), sharding))
                for e in self.owned[d]]
        pool = {}
        for m in store.layout:
          stack = [mat[m.name] for mat in mats]
          stack += [jnp.zeros(m.shape, store.cfg.weight_dtype)] * (slots - len(stack))
          pool[m.name] = jax.device_put(jnp.stack(stack), sharding)
        per_device.append(pool)
      out.append(self._global_pools(per_device))
    return out

  # -------------------------------------------------------------- public API

  def reset_cache(self):
    """Forget every cached expert on every device (the next request starts cold)."""
    for prefetcher, cache in zip(self.prefetchers, self.caches):
      prefetcher.drain()
      cache.clear()

  def close(self):
    """Stop the copy watcher threads."""
    for prefetcher in self.prefetchers:
      prefetcher.close()

  def _prefill(self, prompt: np.ndarray, start: float | None = None) -> jax.Array:
    cfg, n = self.cfg, self.n_devices
    b = prompt.shape[0]
    self._kv = [self._put(LayerCache(jnp.zeros_like(c.k), jnp.zeros_like(c.v)))
                for c in init_cache(cfg, b).layers]
    self._pos, self._step, self._history = 0, 0, prompt
    zeros_i, zeros_f = [0] * cfg.n_layers, [0.0] * cfg.n_layers
    self.stats = ParallelStats(
        hits=list(zeros_i), misses=list(zeros_i), stall_s=list(zeros_f), batch=b,
        start_s=time.perf_counter() if start is None else start, n_devices=n,
        device_hits=[list(zeros_i) for _ in range(n)], device_misses=[list(zeros_i) for _ in range(n)],
        device_stall_s=[list(zeros_f) for _ in range(n)], device_copies=[[] for _ in range(n)])
    for prefetcher in self.prefetchers:
      prefetcher.drain()
      prefetcher.records = []  # copy records are kept per request
    return self._run_step(prompt)

  # ---------------------------------------------------- hooks of OffloadEngine._run_step

  def _host_inputs(self, *arrays: np.ndarray) -> list[jax.Array]:
    return self._put(list(arrays))  # replicated over the mesh

  def _plan_step(self, n_new: int):
    if self.caches:
      for prefetcher in self.prefetchers:
        prefetcher.step = self._step
      self._issue_step_plan(n_new, sum(cache.n_slots for cache in self.caches))

  def _resident_ffn(self, layer: int, h, x, experts, weights):
    return _layer_ffn(self._layer, self._layer_leaves[layer], self._resident[layer],
                      self._resident_index, self._resident_compute, h, x,
                      experts, weights, mesh=self.mesh)

  def _record_resident_routing(self, routed):
    """Read after the step's compute, with per-device hit counts."""
    step_routing = [sorted(set(np.asarray(e).reshape(-1).tolist())) for e in jax.device_get(routed)]
    self.stats.routing.append(step_routing)
    for layer, experts in enumerate(step_routing):
      self.stats.hits[layer] += len(experts)
      for e in experts:
        self.stats.device_hits[self.owner[e]][layer] += 1

  def _offloaded_ffn(self, layer: int, x, h, experts, weights, speculated) -> jax.Array:
    """Make each device's routed experts of `layer` resident in its cache (misses fetched now),
    prefetch for later layers, then dispatch the expert FFN over the mesh."""
    stats, n = self.stats, self.n_devices
    routed, speculated = jax.device_get((experts, speculated))  # the per-layer host sync
    needed = sorted(set(routed.reshape(-1).tolist()))
    if layer == 0:
      stats.routing.append([])
    stats.routing[-1].append(needed)
    # per device: its routed experts, cached first, in chunks of at most its cache's slots
    chunks = []
    for d, cache in enumerate(self.caches):
      mine = [e for e in needed if self.owner[e] == d]
      mine.sort(key=lambda e, cache=cache: not cache.is_cached(layer, e))
      chunks.append([mine[i:i + cache.n_slots] for i in range(0, len(mine), cache.n_slots)] or [[]])
    # copies first on every device (its queue is empty now), then the writes of landed copies
    hits, misses, stall = [0] * n, [0] * n, [0.0] * n
    for d in range(n):
      hits[d], misses[d] = self.caches[d].ensure_resident(layer, chunks[d][0], self.prefetchers[d].copy)
    for later, guess in self.strategy.plan_layer(layer, speculated).items():
      if later < self.cfg.n_layers:
        self._plan[later] = list(dict.fromkeys(guess + self._plan[later]))
    for d, cache in enumerate(self.caches):
      stall[d] += cache.land(layer, chunks[d][0])[0]
    args = (self._layer, self._layer_leaves[layer])
    rounds = max(len(c) for c in chunks)
    if rounds == 1:
      x = _layer_ffn(*args, self._global_pools([c.pools for c in self.caches]),
                     *self._round_inputs(layer, [c[0] for c in chunks]), h, x, experts, weights,
                     mesh=self.mesh)
    else:
      rows = self._shard(np.full((n, routed.size, h.shape[-1]), _FILL, h.dtype))
      for i in range(rounds):
        chunk = [c[i] if i < len(c) else [] for c in chunks]
        if i:
          for d, cache in enumerate(self.caches):
            if chunk[d]:
              hd, md = cache.ensure_resident(layer, chunk[d], self.prefetchers[d].copy)
              hits[d], misses[d] = hits[d] + hd, misses[d] + md
          for d, cache in enumerate(self.caches):
            stall[d] += cache.land(layer, chunk[d])[0]
        rows = _chunk_rows(*args, self._global_pools([c.pools for c in self.caches]),
                           *self._round_inputs(layer, chunk), h, experts, rows, mesh=self.mesh)
      x = _layer_finish(*args, rows, h, x, experts, weights, mesh=self.mesh)
    for d, cache in enumerate(self.caches):
      if not self.strategy.keeps_experts:
        cache.forget(layer, [e for c in chunks[d] for e in c])
      stats.device_hits[d][layer] += hits[d]
      stats.device_misses[d][layer] += misses[d]
      stats.device_stall_s[d][layer] += stall[d]
    self._prefetch(first_layer=layer + 1)  # after the FFN, as on one device
    stats.hits[layer] += sum(hits)
    stats.misses[layer] += sum(misses)
    stats.stall_s[layer] += sum(stall)
    return x

  def _round_inputs(self, layer: int, chunk: Sequence[Sequence[int]]) -> tuple[jax.Array, jax.Array]:
    """rhs_index [n, E] and compute mask [n, E] for one round (device d computes chunk[d]); marks the
    chunk's experts used."""
    index = np.stack([cache.rhs_index(layer, c) for cache, c in zip(self.caches, chunk)])
    for cache, c in zip(self.caches, chunk):
      if c:
        cache.mark_used(layer, c)
    return self._shard(index), self._shard(self._compute_mask(chunk))

  def _caches(self) -> list[ExpertCache]:
    return self.caches

  def _prefetchers(self) -> list[Prefetcher]:
    return self.prefetchers

  def _prefetch(self, first_layer: int):
    """Issue the plan's copies for layers >= first_layer, each on its owner's link."""
    items = self._planned(first_layer)
    for d, prefetcher in enumerate(self.prefetchers):
      prefetcher.prefetch([(l, e) for l, e in items if self.owner[e] == d])

  def _read_resident_routing(self):
    """Nothing to do: this engine reads the resident routing at the end of each step."""

  def _finish_request(self):
    if not self.prefetchers:
      return
    for prefetcher in self.prefetchers:
      prefetcher.drain()
    self.stats.device_copies = [list(p.records) for p in self.prefetchers]
    self.stats.copies = sorted((c for p in self.prefetchers for c in p.records),
                               key=lambda c: c.issue_s)
