"""ExpertCache: a device slot pool with a byte budget, the expert -> slot map the expert kernels take
(`rhs_index`), and the eviction policies (least recently used, least frequently used, not predicted soon).

An expert is *resident* once its copied buffer has been written into its slot (a jitted, donated
dynamic update on the device); until then it is *in flight*. Only resident experts appear in
`rhs_index`, so compute never reads a slot that holds another expert.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import AbstractSet, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.offload.store import ExpertStore, MatrixSlice, device_sharding, unpack

POLICIES = ("lru", "lfu", "predicted")
Key = tuple[int, int]  # (layer, expert)
Staged = jax.Array | concurrent.futures.Future  # a copy in flight, or one an issue thread will make
# issues one batch of copies: ([(layer, expert)], reason) -> [(staged, record)] in the same order
Fetch = Callable[[list[Key], str], list[tuple[Staged, "CopyRecord | None"]]]


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


def unpack_into(layout: tuple[MatrixSlice, ...], pools: dict[str, jax.Array],
                buffers: Sequence[jax.Array], slots: jax.Array) -> dict[str, jax.Array]:
  """Traced: copied expert buffers ([P] each) unpacked into slots `slots` [>= n] of every pool
  {name: [S, ...]}."""
  for i, buffer in enumerate(buffers):
    mats = unpack(layout, buffer)
    pools = {name: jax.lax.dynamic_update_index_in_dim(pool, mats[name].astype(pool.dtype), slots[i], 0)
             for name, pool in pools.items()}
  return pools


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _write_slots(layout: tuple[MatrixSlice, ...], pools: dict[str, jax.Array],
                 buffers: tuple[jax.Array, ...], slots: jax.Array) -> dict[str, jax.Array]:
  """`unpack_into`, in place (the pools are donated)."""
  return unpack_into(layout, pools, buffers, slots)


def padded(items: Iterable) -> list:
  """`items` padded to the next power of two by repeating the last one. A batch of slot writes padded
  this way repeats its last write (the same bytes into the same slot), so a handful of programs serves
  every batch size."""
  items = list(items)
  if not items:
    return []
  return items + [items[-1]] * ((1 << (len(items) - 1).bit_length()) - len(items))


def write_slots(layout: tuple[MatrixSlice, ...], pools: dict[str, jax.Array],
                buffers: Sequence[jax.Array], slots: Sequence[int]) -> dict[str, jax.Array]:
  """One jitted, donated write of copied experts `buffers` into their `slots`."""
  if not buffers:
    return pools
  return _write_slots(layout, pools, tuple(padded(buffers)), np.asarray(padded(slots), np.int32))


def empty_pools(store: ExpertStore, n_slots: int, device) -> dict[str, jax.Array]:
  sharding = device_sharding(device)
  return {m.name: jax.device_put(jnp.zeros((n_slots,) + m.shape, store.cfg.weight_dtype), sharding)
          for m in store.layout}


def resident_pools(store: ExpertStore, device: jax.Device | None = None) -> list[dict[str, jax.Array]]:
  """Every layer's experts on the device as {name: [E, ...]} stacks (the `resident` strategy)."""
  sharding = device_sharding(device or store.device)
  n_experts = store.cfg.n_experts
  out = []
  for layer in range(store.cfg.n_layers):
    buffers = jax.device_put([store.buffer(layer, e) for e in range(n_experts)], sharding)
    out.append(write_slots(store.layout, empty_pools(store, n_experts, device or store.device),
                           buffers, range(n_experts)))
  return out


def slot_count(cache_bytes: int, expert_bytes: int, top_k: int) -> int:
  """Slots a budget holds; a clear error if one token's top_k experts of a layer do not fit."""
  n = int(cache_bytes) // expert_bytes
  if n < top_k:
    raise ValueError(f"cache_bytes={cache_bytes} holds {n} experts of {expert_bytes} bytes, but one "
                     f"token's top_k={top_k} experts must fit: give at least {top_k * expert_bytes} bytes")
  return n


class ExpertCache:
  """`n_slots = cache_bytes // expert_bytes` device slots shared by all layers."""

  def __init__(self, store: ExpertStore, cache_bytes: int, policy: str = "lru",
               device: jax.Device | None = None):
    cfg = store.cfg
    if policy not in POLICIES:
      raise ValueError(f"eviction policy must be one of {POLICIES}, got {policy!r}")
    n_slots = slot_count(cache_bytes, store.expert_bytes, cfg.top_k)
    self.store = store
    self.policy = policy
    self.n_slots = n_slots
    self.pools = empty_pools(store, n_slots, device or store.device)  # {name: [S, ...]}
    self._sharding = device_sharding(device or store.device)
    # int32 device scalars 0..n_slots-1: slot numbers reach jitted calls without a transfer
    self.scalars = tuple(jax.device_put([np.int32(i) for i in range(n_slots)], self._sharding))
    self._entries: dict[Key, _Entry] = {}
    self._in_flight: dict[Key, _Entry] = {}  # the entries whose copy is not yet written
    self._ranking: list[Key] | None = None  # entries, best victim first (None: to be sorted)
    self._free = list(range(n_slots - 1, -1, -1))
    self._tick = 0
    self._now = 0  # layer clock: step * n_layers + layer
    self._uses: Mapping[Key, Sequence[int]] = {}

  @property
  def nbytes(self) -> int:
    """Device bytes of the slot pool."""
    return self.n_slots * self.store.expert_bytes

  def is_cached(self, layer: int, expert: int) -> bool:
    """Resident or in flight."""
    return (layer, expert) in self._entries

  def set_plan(self, now: int, uses: Mapping[Key, Sequence[int]]):
    """The layer clock (step * n_layers + layer) and, per expert, the ascending clocks of its planned
    uses (for the `predicted` policy and for prefetch reservations)."""
    self._now, self._uses = now, uses
    self._ranking = None

  def _victim_key(self, key: Key, entry: _Entry):
    in_flight = entry.staged is not None
    if self.policy == "lru":
      return (in_flight, entry.last_use)
    if self.policy == "lfu":
      return (in_flight, entry.uses, entry.last_use)
    return (in_flight, -(self._next_use(key, self._now) - self._now), entry.last_use)

  def _next_use(self, key: Key, after: int) -> float:
    """Clock of the first planned use of `key` at or after `after` (inf: none planned)."""
    uses = self._uses.get(key, ())
    i = bisect.bisect_left(uses, after)
    return uses[i] if i < len(uses) else math.inf

  def reserve(self, layer: int, expert: int, protected: AbstractSet[Key],
              evict_in_flight: bool = False, prefetch: bool = False) -> int | None:
    """A slot for (layer, expert): a free one, or one freed by evicting the policy's victim among
    entries not in `protected` (in-flight copies only if `evict_in_flight`). None if there is none.

    `prefetch` (with the `predicted` policy): the expert is wanted ahead of its use at clock T, so it
    takes only the slot that Belady's MIN would free for it at T (the cached expert whose next use
    after T is furthest away), and only if that expert may go now (not protected, not needed before
    T); otherwise None, and the copy waits until that expert has been used (conservative
    prefetching: the same copies as MIN, each issued as early as possible)."""
    key = (layer, expert)
    if key in self._entries:
      raise ValueError(f"expert {key} is already cached")
    if self._free:
      return self._free.pop()
    if prefetch and self.policy == "predicted":
      return self._reserve_as_min(key, protected, evict_in_flight)
    if self._ranking is None:  # sorted once for a batch of reservations
      self._ranking = sorted(self._entries, key=lambda k: (self._victim_key(k, self._entries[k]), k))
    for i, victim in enumerate(self._ranking):
      entry = self._entries.get(victim)
      if entry is None or victim in protected or (entry.staged is not None and not evict_in_flight):
        continue
      del self._ranking[i]
      self._in_flight.pop(victim, None)
      return self._entries.pop(victim).slot
    return None

  def _reserve_as_min(self, key: Key, protected: AbstractSet[Key], evict_in_flight: bool) -> int | None:
    need = self._next_use(key, self._now)
    unplanned = [k for k in self._entries if k not in self._uses]
    if unplanned:  # never planned again: MIN's victim, found without a search over planned uses
      victim = max(unplanned)
    else:
      victim = max(self._entries, key=lambda k: (self._next_use(k, need), k), default=None)
    if victim is None or self._next_use(victim, need) <= need:
      return None  # every cached expert is needed no later than this one
    if (victim in protected or self._next_use(victim, self._now) < need
        or (self._entries[victim].staged is not None and not evict_in_flight)):
      return None  # MIN's victim must stay for now
    self._ranking = None
    self._in_flight.pop(victim, None)
    return self._entries.pop(victim).slot

  def attach(self, layer: int, expert: int, slot: int, staged: Staged, record: CopyRecord):
    """Record an issued copy into a reserved slot (in flight until written)."""
    self._entries[(layer, expert)] = self._in_flight[(layer, expert)] = _Entry(
        slot, staged, record, last_use=self._tick)
    self._ranking = None

  def ensure_resident(self, layer: int, experts: Iterable[int], fetch: Fetch) -> tuple[int, int]:
    """Issue on-demand copies (one batch) for the experts of `layer` that are neither resident nor in
    flight, evicting others as needed. Returns (hits, misses). Call `land` before computing."""
    experts = list(experts)
    if len(experts) > self.n_slots:
      raise ValueError(f"{len(experts)} experts cannot be resident at once in {self.n_slots} slots")
    pinned = {(layer, e) for e in experts}
    missing = [e for e in experts if (layer, e) not in self._entries]
    slots = [self.reserve(layer, e, pinned, evict_in_flight=True) for e in missing]
    for e, slot, (staged, record) in zip(missing, slots, fetch([(layer, e) for e in missing], "demand")):
      self.attach(layer, e, slot, staged, record)
    return len(experts) - len(missing), len(missing)

  def land(self, layer: int, experts: Sequence[int]) -> tuple[float, tuple[jax.Array, ...]]:
    """Make these experts of `layer` resident: wait for their copies in flight, then `arrive` and
    write the landed copies into their slots with one jitted write. Returns (seconds spent waiting:
    the stall, `rhs_index` as `arrive` gives it)."""
    start = time.perf_counter()
    jax.block_until_ready([resolve(self._in_flight[(layer, e)].staged) for e in experts
                           if (layer, e) in self._in_flight])
    stall = time.perf_counter() - start
    _, buffers, slots, index = self.arrive(layer, experts)
    if buffers:
      self.pools = _write_slots(self.store.layout, self.pools, tuple(buffers), slots)
    return stall, index

  def arrive(self, layer: int, experts: Sequence[int]
             ) -> tuple[list[CopyRecord], list[jax.Array], tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """These experts of `layer`, and every other copy that has already landed (so its staging buffer
    is freed early), count as resident from now on, without waiting for the copies still in flight:
    the caller's jitted write + compute waits for them on the device, while the host goes on. Returns
    (the records of this layer's copies still in flight, whose `ready_s` tells the stall once they
    land; the buffers to write, padded as `padded` does; their slots; `rhs_index` for computing with
    the experts), slots and index as device scalars (`jnp.stack` them in the jitted computation): the
    caller writes the buffers into their slots on the device (`unpack_into`) before computing with
    the index.

    Nothing small is transferred: on the H200 an explicit host-to-device transfer queued behind
    expert copies still in flight (prefetches for later layers) held the host 2.0-2.3 ms, a numpy
    argument of a jitted call ~0.9 ms (`eval/probe_host.py`)."""
    waiting = [(layer, e) for e in experts if (layer, e) in self._in_flight]
    records = [self._in_flight[key].record for key in waiting if self._in_flight[key].record]
    landed = set(waiting)
    landed.update(key for key, entry in self._in_flight.items() if _arrived(entry.staged))
    buffers, slots = self._settle(sorted(landed))
    return (records, padded(map(resolve, buffers)), self._on_device(padded(slots)),
            self._on_device(self.rhs_index(layer, experts)))

  def settle(self, layer: int, experts: Sequence[int]) -> tuple[list[Staged], tuple[jax.Array, ...],
                                                                tuple[jax.Array, ...]]:
    """`land`'s bookkeeping without the device work: these experts of `layer` count as resident from
    now on. Returns (the copies in flight among them, padded as `padded` does; their slots and
    `rhs_index` [E], both as device scalars): the caller writes the copies into their slots on the
    device before computing with the index."""
    staged, slots = self._settle([(layer, e) for e in experts if (layer, e) in self._in_flight])
    return padded(staged), self._on_device(padded(slots)), self._on_device(self.rhs_index(layer, experts))

  def _on_device(self, slot_numbers: Iterable[int]) -> tuple[jax.Array, ...]:
    return tuple(self.scalars[slot] for slot in slot_numbers)

  def _settle(self, keys: Sequence[Key]) -> tuple[list[Staged], list[int]]:
    entries = [self._in_flight.pop(key) for key in keys]
    staged = [entry.staged for entry in entries]
    for entry in entries:
      entry.staged = None
    self._ranking = None
    return staged, [entry.slot for entry in entries]

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

  def holders(self, layer: int, experts: Iterable[int]) -> dict[int, _Entry]:
    """The entries now holding these experts of `layer`, for a later `mark_used` (which then counts
    the use even if an entry has been evicted meanwhile)."""
    return {e: self._entries[(layer, e)] for e in experts}

  def mark_used(self, layer: int, experts: Iterable[int], holders: Mapping[int, _Entry] | None = None):
    self._tick += 1
    self._ranking = None
    for e in experts:
      entry = holders[e] if holders is not None else self._entries[(layer, e)]
      entry.last_use, entry.uses = self._tick, entry.uses + 1
      if entry.record is not None:
        entry.record.used = True

  def forget(self, layer: int, experts: Iterable[int]):
    """Drop these experts (their slots become free; compute already dispatched still reads them)."""
    for e in experts:
      self._in_flight.pop((layer, e), None)
      entry = self._entries.pop((layer, e), None)
      if entry is not None:
        self._free.append(entry.slot)

  def clear(self):
    """Forget every expert (a cold cache); the pool memory is kept."""
    self._entries.clear()
    self._in_flight.clear()
    self._ranking = None
    self._free = list(range(self.n_slots - 1, -1, -1))
