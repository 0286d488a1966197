"""ExpertCache: a device slot pool with a byte budget, the expert -> slot map the expert kernels take
(`rhs_index`), and the eviction policies (least recently used, least frequently used, not predicted soon).

An expert is *resident* once its copied buffer has been written into its slot (a jitted, donated
dynamic update on the device); until then it is *in flight*. Only resident experts appear in
`rhs_index`, so compute never reads a slot that holds another expert.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import AbstractSet, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.offload.store import ExpertStore, MatrixSlice, device_sharding, unpack

POLICIES = ("lru", "lfu", "predicted")
Key = tuple[int, int]  # (layer, expert)
Staged = jax.Array | concurrent.futures.Future  # a copy in flight, or one an issue thread will make


def resolve(staged: Staged) -> jax.Array:
  """The device buffer of a copy in flight (waits for its issue, not for its arrival)."""
  return staged.result() if isinstance(staged, concurrent.futures.Future) else staged


def _arrived(staged: Staged) -> bool:
  if isinstance(staged, concurrent.futures.Future):
    return staged.done() and staged.result().is_ready()
  return staged.is_ready()


@dataclasses.dataclass
class CopyRecord:
  """One host-to-device expert copy (times are `time.perf_counter()` seconds)."""

  layer: int
  expert: int
  step: int  # generation step that issued it (0 = prefill)
  reason: str  # "prefetch" (from a plan) or "demand" (a miss after the router decided)
  nbytes: int
  issue_s: float
  ready_s: float | None = None  # when the copy had landed on the device
  used: bool = False  # computed with before being evicted


@dataclasses.dataclass
class _Entry:
  slot: int
  staged: Staged | None  # [P] copied buffer not yet written into the pool (in flight)
  record: CopyRecord | None
  last_use: int = 0
  uses: int = 0


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _write_slot(layout: tuple[MatrixSlice, ...], pools: dict[str, jax.Array], buffer: jax.Array,
                slot: jax.Array) -> dict[str, jax.Array]:
  """Unpack a copied expert buffer [P] into slot `slot` of every pool {name: [S, ...]} in place."""
  mats = unpack(layout, buffer)
  return {name: jax.lax.dynamic_update_index_in_dim(pool, mats[name].astype(pool.dtype), slot, 0)
          for name, pool in pools.items()}


def _empty_pools(store: ExpertStore, n_slots: int, device) -> dict[str, jax.Array]:
  sharding = device_sharding(device)
  return {m.name: jax.device_put(jnp.zeros((n_slots,) + m.shape, store.cfg.weight_dtype), sharding)
          for m in store.layout}


def resident_pools(store: ExpertStore, device: jax.Device | None = None) -> list[dict[str, jax.Array]]:
  """Every layer's experts on the device as {name: [E, ...]} stacks (the `resident` strategy)."""
  sharding = device_sharding(device or store.device)
  out = []
  for layer in range(store.cfg.n_layers):
    pools = _empty_pools(store, store.cfg.n_experts, device or store.device)
    for e in range(store.cfg.n_experts):
      pools = _write_slot(store.layout, pools, jax.device_put(store.buffer(layer, e), sharding),
                          np.int32(e))
    out.append(pools)
  return out


class ExpertCache:
  """`n_slots = cache_bytes // expert_bytes` device slots shared by all layers."""

  def __init__(self, store: ExpertStore, cache_bytes: int, policy: str = "lru",
               device: jax.Device | None = None):
    cfg = store.cfg
    if policy not in POLICIES:
      raise ValueError(f"eviction policy must be one of {POLICIES}, got {policy!r}")
    n_slots = int(cache_bytes) // store.expert_bytes
    if n_slots < cfg.top_k:
      raise ValueError(
          f"cache_bytes={cache_bytes} holds {n_slots} experts of {store.expert_bytes} bytes, but one "
          f"token's top_k={cfg.top_k} experts must fit: give at least {cfg.top_k * store.expert_bytes} "
          f"bytes")
    self.store = store
    self.policy = policy
    self.n_slots = n_slots
    self.pools = _empty_pools(store, n_slots, device or store.device)  # {name: [S, ...]}
    self._entries: dict[Key, _Entry] = {}
    self._free = list(range(n_slots - 1, -1, -1))
    self._tick = 0
    self._now = 0  # layer clock: step * n_layers + layer
    self._next_use: Mapping[Key, int] = {}

  @property
  def nbytes(self) -> int:
    """Device bytes of the slot pool."""
    return self.n_slots * self.store.expert_bytes

  def is_cached(self, layer: int, expert: int) -> bool:
    """Resident or in flight."""
    return (layer, expert) in self._entries

  def set_plan(self, now: int, next_use: Mapping[Key, int]):
    """The layer clock and, per expert, the clock of its next predicted use (for `predicted`)."""
    self._now, self._next_use = now, next_use

  def _victim_key(self, key: Key, entry: _Entry):
    in_flight = entry.staged is not None
    if self.policy == "lru":
      return (in_flight, entry.last_use)
    if self.policy == "lfu":
      return (in_flight, entry.uses, entry.last_use)
    when = self._next_use.get(key, -1)
    distance = when - self._now if when >= self._now else math.inf
    return (in_flight, -distance, entry.last_use)

  def reserve(self, layer: int, expert: int, protected: AbstractSet[Key],
              evict_in_flight: bool = False) -> int | None:
    """A slot for (layer, expert): a free one, or one freed by evicting the policy's victim among
    entries not in `protected` (in-flight copies only if `evict_in_flight`). None if there is none."""
    key = (layer, expert)
    if key in self._entries:
      raise ValueError(f"expert {key} is already cached")
    if self._free:
      return self._free.pop()
    candidates = [(self._victim_key(k, e), k) for k, e in self._entries.items()
                  if k not in protected and (evict_in_flight or e.staged is None)]
    if not candidates:
      return None
    _, victim = min(candidates)
    return self._entries.pop(victim).slot

  def attach(self, layer: int, expert: int, slot: int, staged: Staged, record: CopyRecord):
    """Record an issued copy into a reserved slot (in flight until written)."""
    self._entries[(layer, expert)] = _Entry(slot, staged, record, last_use=self._tick)

  def ensure_resident(self, layer: int, experts: Iterable[int],
                      fetch: Callable[[int, int, str], tuple[Staged, CopyRecord]]) -> tuple[int, int]:
    """Issue on-demand copies for the experts of `layer` that are neither resident nor in flight,
    evicting others as needed. Returns (hits, misses). Call `wait_resident` before computing."""
    experts = list(experts)
    if len(experts) > self.n_slots:
      raise ValueError(f"{len(experts)} experts cannot be resident at once in {self.n_slots} slots")
    pinned = {(layer, e) for e in experts}
    hits = misses = 0
    for e in experts:
      if (layer, e) in self._entries:
        hits += 1
        continue
      slot = self.reserve(layer, e, pinned, evict_in_flight=True)
      staged, record = fetch(layer, e, "demand")
      self.attach(layer, e, slot, staged, record)
      misses += 1
    return hits, misses

  def wait_resident(self, layer: int, experts: Iterable[int]) -> float:
    """Wait for the in-flight copies of these experts and write them into their slots; returns the
    seconds spent waiting (the stall)."""
    entries = [self._entries[(layer, e)] for e in experts]
    staged = [entry for entry in entries if entry.staged is not None]
    start = time.perf_counter()
    jax.block_until_ready([resolve(entry.staged) for entry in staged])
    stall = time.perf_counter() - start
    for entry in staged:
      self._write(entry)
    return stall

  def land_ready(self):
    """Write every in-flight copy that has already arrived (frees its staging buffer early)."""
    for entry in self._entries.values():
      if entry.staged is not None and _arrived(entry.staged):
        self._write(entry)

  def _write(self, entry: _Entry):
    self.pools = _write_slot(self.store.layout, self.pools, resolve(entry.staged), np.int32(entry.slot))
    entry.staged = None

  def rhs_index(self, layer: int, experts: Iterable[int]) -> np.ndarray:
    """[E] int32 slot of each expert of `layer` for the kernels; the listed `experts` must be
    resident (others map to slot 0 and must carry no rows)."""
    index = np.zeros((self.store.cfg.n_experts,), np.int32)
    for e in experts:
      entry = self._entries.get((layer, e))
      if entry is None or entry.staged is not None:
        raise RuntimeError(f"expert {e} of layer {layer} is not resident: refusing to compute")
      index[e] = entry.slot
    return index

  def mark_used(self, layer: int, experts: Iterable[int]):
    self._tick += 1
    for e in experts:
      entry = self._entries[(layer, e)]
      entry.last_use, entry.uses = self._tick, entry.uses + 1
      if entry.record is not None:
        entry.record.used = True

  def forget(self, layer: int, experts: Iterable[int]):
    """Drop these experts (their slots become free; compute already dispatched still reads them)."""
    for e in experts:
      entry = self._entries.pop((layer, e), None)
      if entry is not None:
        self._free.append(entry.slot)

  def clear(self):
    """Forget every expert (a cold cache); the pool memory is kept."""
    self._entries.clear()
    self._free = list(range(self.n_slots - 1, -1, -1))
