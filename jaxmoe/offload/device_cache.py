"""The expert cache's bookkeeping as device arrays, so a compiled step serves its own misses.

Inside a compiled step the router's choice is looked up in `CacheState.table` [L, E] (expert -> slot
or -1). A routed expert that is not cached is read straight from the store's pinned host memory (a
device view, `hostview`) into a slot the eviction policy frees, and the table is updated: no host round
trip. The host only reads the state back once per step, for statistics and the next plan.
"""

from __future__ import annotations

import itertools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.offload.cache import POLICIES
from jaxmoe.offload.store import MatrixSlice
from pallas_kernels import expert_fetch

NEVER = np.int32(2**30)  # a next use that is not planned


class CacheState(NamedTuple):
  """Device-resident cache bookkeeping (all int32)."""

  table: jax.Array  # [L, E] slot holding (layer, expert), -1 if not cached
  owner: jax.Array  # [S] layer * E + expert held by each slot, -1 if free
  last_use: jax.Array  # [S] layer clock of the slot's last use (-1: never)
  uses: jax.Array  # [S] uses since the slot was filled
  # `predicted` eviction: per layer * E + expert, the planned uses on the layer clock: the first in the
  # step being run and the first after it (NEVER: none planned)
  next_use: jax.Array  # [L * E]
  then_use: jax.Array  # [L * E]
  clock: jax.Array  # [] layers served so far


def empty_state(n_layers: int, n_experts: int, n_slots: int) -> CacheState:
  return CacheState(table=jnp.full((n_layers, n_experts), -1, jnp.int32),
                    owner=jnp.full((n_slots,), -1, jnp.int32),
                    last_use=jnp.full((n_slots,), -1, jnp.int32),
                    uses=jnp.zeros((n_slots,), jnp.int32),
                    next_use=jnp.full((n_layers * n_experts,), NEVER, jnp.int32),
                    then_use=jnp.full((n_layers * n_experts,), NEVER, jnp.int32),
                    clock=jnp.zeros((), jnp.int32))


class Admission(NamedTuple):
  """What a step's plan hands its program (a value: nothing is edited in place): its small arrays
  packed into one int32 vector, so that the host sends them in one transfer (`pack_plan`), and the
  copies of the planned experts the host expects uncached."""

  ints: jax.Array  # [2 * L * E + 2 * n + 2 * len(buffers)] int32: uses, touch keys, fill keys
  buffers: tuple  # [P] device copies in flight


def pack_plan(offsets: np.ndarray, touch_keys: np.ndarray, fill_keys: np.ndarray) -> np.ndarray:
  """Host side: planned uses `offsets` [2, L * E] (`use_offsets`), the (layer, expert) rows planned
  for the step `touch_keys` [n, 2] and those copied `fill_keys` [P, 2] (-1 rows: padding) -> one
  int32 vector for `Admission.ints`."""
  return np.concatenate([np.asarray(a, np.int32).ravel() for a in (offsets, touch_keys, fill_keys)])


def unpack_plan(plan: Admission, n_layers: int, n_experts: int):
  """Traced: `Admission.ints` -> (uses [2, L * E], touch_keys [n, 2], fill_keys [P, 2])."""
  n_uses, n_fill = 2 * n_layers * n_experts, 2 * len(plan.buffers)
  ints = plan.ints
  return (ints[:n_uses].reshape(2, -1), ints[n_uses:ints.shape[0] - n_fill].reshape(-1, 2),
          ints[ints.shape[0] - n_fill:].reshape(-1, 2))


def admit_plan(state: CacheState, pools, plan: Admission, *, layout, policy: str, impl: str = "auto"):
  """Traced, before a step's first layer: the plan's uses set, then its experts admitted (`admit`)."""
  uses, touch_keys, fill_keys = unpack_plan(plan, *state.table.shape)
  state = plan_uses(state, uses)
  return admit(state, pools, touch_keys, fill_keys, plan.buffers, layout=layout, policy=policy, impl=impl)


def plan_uses(state: CacheState, offsets: jax.Array) -> CacheState:
  """Traced, at a step's start: planned uses `offsets` [2, L * E] (layer-clock ticks after the step's
  start, NEVER for none) become the state's `next_use` / `then_use`."""
  at = jnp.where(offsets < NEVER, state.clock + offsets, NEVER)
  return state._replace(next_use=at[0], then_use=at[1])


def use_offsets(plan_steps, n_layers: int, n_experts: int) -> np.ndarray:
  """Host side of `plan_uses`: plan_steps[m] = [L] experts planned for the m-th step from now (m = 0:
  the step about to run) -> [2, L * E]: for each expert its first planned use in that step and its
  first after it, as layer-clock ticks after the step's start (a step ticks once for its admissions,
  then once per layer)."""
  out = np.full((2, n_layers * n_experts), NEVER, np.int32)
  # flat (step, layer, expert) arrays, then one scatter-min: a Python loop per expert took 0.26 ms a
  # decode step (2-core dev CPU) for an oracle's 17-step horizon, and v2 steps are host-bound
  counts = np.asarray([len(experts) for step in plan_steps for experts in step], np.int64)
  n = int(counts.sum())
  if n:
    expert = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(plan_steps)), np.int64, n)
    m = np.repeat([m for m, step in enumerate(plan_steps) for _ in step], counts)
    layer = np.repeat([layer for step in plan_steps for layer in range(len(step))], counts)
    np.minimum.at(out, (np.minimum(m, 1), layer * n_experts + expert), m * (n_layers + 1) + 2 + layer)
  return out


def distinct(experts: jax.Array, n_experts: int) -> jax.Array:
  """The distinct expert ids of `experts` (any shape) ascending, padded with -1 to a static length
  min(experts.size, n_experts)."""
  size = min(experts.size, n_experts)
  present = jnp.zeros((n_experts,), bool).at[experts.reshape(-1)].set(True)
  ids = jnp.where(present, jnp.arange(n_experts, dtype=jnp.int32), n_experts)
  ids = jnp.sort(ids)[:size]
  return jnp.where(ids < n_experts, ids, -1)


def _eviction_order(state: CacheState, policy: str) -> jax.Array:
  """[S] slots in the order the policy gives them up: free ones first, then by the policy, least
  recently used among equals; slots the layer being served has used come last (never taken while
  it holds fewer experts than the cache has slots)."""
  big = jnp.int32(2**30)
  if policy == "lru":
    primary = jnp.zeros_like(state.last_use)
  elif policy == "lfu":
    primary = state.uses
  elif policy == "predicted":  # farthest planned next use first (Belady's MIN on the plan)
    key = jnp.maximum(state.owner, 0)
    this_step, later = state.next_use[key], state.then_use[key]
    primary = -jnp.where(this_step >= state.clock, jnp.minimum(this_step, later), later)
  else:
    raise ValueError(f"eviction policy must be one of {POLICIES}, got {policy!r}")
  primary = jnp.where(state.owner < 0, -big, jnp.where(state.last_use == state.clock, big, primary))
  return jnp.lexsort((state.last_use, primary)).astype(jnp.int32)


def _claim(state: CacheState, policy: str, layer, experts, valid):
  """Vectorised over the keys (layer[i], experts[i]) where `valid`: cached ones are used now; each
  of the others takes the next slot the policy gives up, as if chosen one after another.
  -> (state, slots [n], missed [n])."""
  n_layers, n_experts = state.table.shape
  n_slots = state.owner.shape[0]
  cached = state.table[layer, experts]
  hit, miss = valid & (cached >= 0), valid & (cached < 0)
  state = _touch(state, cached, hit)
  order = _eviction_order(state, policy)
  slots = jnp.where(miss, order[jnp.clip(jnp.cumsum(miss) - 1, 0, n_slots - 1)], cached)
  old = state.owner[slots]
  old_layer = jnp.where(miss & (old >= 0), old // n_experts, n_layers)  # out of range: dropped
  table = state.table.at[old_layer, old % n_experts].set(-1, mode="drop")
  table = table.at[jnp.where(miss, layer, n_layers), experts].set(slots, mode="drop")
  put = jnp.where(miss, slots, n_slots)
  state = state._replace(table=table,
                         owner=state.owner.at[put].set(layer * n_experts + experts, mode="drop"),
                         uses=state.uses.at[put].set(0, mode="drop"))
  return _touch(state, slots, miss), slots, miss


def _touch(state: CacheState, slot, do) -> CacheState:
  """Where `do`: slot `slot` is used now."""
  at = jnp.where(do, slot, state.owner.shape[0])  # out of range: dropped
  return state._replace(last_use=state.last_use.at[at].set(state.clock, mode="drop"),
                        uses=state.uses.at[at].add(1, mode="drop"))


def _write(pools, layout: tuple[MatrixSlice, ...], src, ids, slots, flags, impl: str):
  """pools[name][slots[j]] = matrix `name` of packed expert src[ids[j]] where flags[j] (src [R, P])."""
  out = {}
  for m in layout:
    pool = pools[m.name]
    flat = pool.reshape(pool.shape[0], -1)
    out[m.name] = expert_fetch.fetch_rows(src, flat, ids, slots, flags, src_offset=m.offset,
                                          impl=impl).reshape(pool.shape)
  return out


def serve_layer(state: CacheState, pools: Mapping[str, jax.Array], host_view: jax.Array,
                layer: int, experts: jax.Array, *, layout: tuple[MatrixSlice, ...], policy: str,
                keep: bool, impl: str = "auto"):
  """Traced: make the experts `experts` (any shape, ids of `layer`) resident for this layer.

  Each distinct routed expert that misses takes the policy's victim slot and is read into it from
  `host_view` [E, P] (pinned host memory seen by the device) by the fetch kernel (`impl`: the kernel
  switch). `keep=False` frees the layer's slots for reuse after it (naive on-demand loading).
  -> (state, pools, rhs_index [E] slot of each expert (0 where unrouted), hits [], misses [],
  routed [U] distinct experts padded with -1)."""
  n_experts = state.table.shape[1]
  state = state._replace(clock=state.clock + 1)
  routed = distinct(experts, n_experts)
  valid = routed >= 0
  state, slots, flags = _claim(state, policy, jnp.full_like(routed, layer), jnp.maximum(routed, 0),
                               valid)
  pools = _write(pools, layout, host_view, jnp.maximum(routed, 0), slots, flags, impl)
  rhs_index = jnp.maximum(state.table[layer], 0)
  if not keep:
    state = _release_layer(state, layer, n_experts)
  return state, pools, rhs_index, jnp.sum(~flags & (routed >= 0)).astype(jnp.int32), \
      jnp.sum(flags).astype(jnp.int32), routed


def lookup_layer(state: CacheState, layer: int, experts: jax.Array):
  """Traced: `serve_layer` that admits nothing: the cached experts among `experts` [N, k] (ids of
  `layer`) are used now, the others stay where they are (computed on the host, `host_experts`).
  -> (state, rhs_index [E] slot of each expert (0 where not cached), cached [N, k] per routed pair,
  hits [], misses [], routed [U] distinct experts padded with -1)."""
  n_experts = state.table.shape[1]
  state = state._replace(clock=state.clock + 1)
  routed = distinct(experts, n_experts)
  slots = jnp.where(routed >= 0, state.table[layer, jnp.maximum(routed, 0)], -1)
  state = _touch(state, jnp.maximum(slots, 0), slots >= 0)
  rhs_index = jnp.maximum(state.table[layer], 0)
  return state, rhs_index, state.table[layer, experts] >= 0, jnp.sum(slots >= 0).astype(jnp.int32), \
      jnp.sum((routed >= 0) & (slots < 0)).astype(jnp.int32), routed


def _release_layer(state: CacheState, layer: int, n_experts: int) -> CacheState:
  """Every slot of `layer` becomes free (its data stays until overwritten)."""
  mine = (state.owner >= 0) & (state.owner // n_experts == layer)
  return state._replace(table=state.table.at[layer].set(-1), owner=jnp.where(mine, -1, state.owner),
                        last_use=jnp.where(mine, -1, state.last_use))


def admit(state: CacheState, pools, touch_keys: jax.Array, fill_keys: jax.Array, buffers, *, layout,
          policy: str, impl: str = "auto"):
  """Traced, before a step's first layer: the planned experts `touch_keys` [n, 2] (layer, expert; -1
  rows are padding) that are cached are marked used now, so that no fill evicts them; then the copied
  experts `buffers` ([P] each, on the device) for `fill_keys` [len(buffers), 2] take victim slots
  unless cached already. -> (state, pools)."""
  state = state._replace(clock=state.clock + 1)
  safe = jnp.maximum(touch_keys, 0)
  cached = jnp.where(touch_keys[:, 0] >= 0, state.table[safe[:, 0], safe[:, 1]], -1)
  state = _touch(state, jnp.maximum(cached, 0), cached >= 0)
  if not buffers:
    return state, pools
  n = len(buffers)
  state, slots, flags = _claim(state, policy, jnp.maximum(fill_keys[:n, 0], 0),
                               jnp.maximum(fill_keys[:n, 1], 0), fill_keys[:n, 0] >= 0)
  src = jnp.stack(buffers)
  pools = _write(pools, layout, src, jnp.arange(n, dtype=jnp.int32), slots, flags, impl)
  return state, pools


def cached_experts(table: np.ndarray) -> list[list[int]]:
  """Host copy of `CacheState.table` [L, E] -> per layer the cached expert ids."""
  return [np.flatnonzero(row >= 0).tolist() for row in np.asarray(table)]
