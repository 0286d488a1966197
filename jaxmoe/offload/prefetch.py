"""Prefetcher: issues host-to-device expert copies in plan order and records when each was issued and
when it landed.

Issue model: a `device_put` only overlaps device work dispatched *after* it (it is ordered behind
everything already queued). The engine holds a step's planned copies (`defer`) until the step's small
inputs are on the device (an explicit small host-to-device transfer queued behind expert copies holds
the host until they land), then issues them as one batch (`issue_deferred`) before any compute of the
step; copies for later layers follow each layer's FFN (they wait for that FFN only, then overlap the
later layers; issued there, they may take the slots of the layer just computed), in a speculated
step too, so copies in flight never take more memory than the cache. Each copy takes only the slot
Belady's MIN would free for it (`ExpertCache.reserve(prefetch=True)`). With
`issue="main"` (the default) prefetch copies are issued from the calling thread; with `issue="thread"`
one issue thread, started with the prefetcher, runs the `device_put`s while the caller goes on
dispatching compute (the ordering rule's other way out; the bench compares both). Demand copies are
always issued at once by the caller. A watcher thread only waits on copies to time-stamp their arrival.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Iterable, Sequence

import jax

from jaxmoe.offload.cache import CopyRecord, ExpertCache, Key, Staged, resolve
from jaxmoe.offload.store import ExpertStore, device_sharding


ISSUE_MODES = ("main", "thread")


class Prefetcher:
  """Copies experts from an `ExpertStore` into an `ExpertCache`; `records` lists every copy."""

  def __init__(self, store: ExpertStore, cache: ExpertCache, device: jax.Device | None = None,
               issue: str = "main"):
    if issue not in ISSUE_MODES:
      raise ValueError(f"issue must be one of {ISSUE_MODES}, got {issue!r}")
    self.store = store
    self.cache = cache
    self.step = 0  # stamped on records; the engine advances it
    self.records: list[CopyRecord] = []
    self._sharding = device_sharding(device or store.device)
    self._arrivals: queue.Queue = queue.Queue()
    self._watcher = threading.Thread(target=self._watch, name="expert-copy-watcher", daemon=True)
    self._watcher.start()
    self._deferred: list | None = None  # copies held back by `defer` until `issue_deferred`
    self._issuer = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expert-copy-issue")
                    if issue == "thread" else None)
    if self._issuer is not None:
      self._issuer.submit(lambda: None).result()  # start the issue thread now, not mid-step

  def _watch(self):
    while True:
      item = self._arrivals.get()
      if item is None:
        self._arrivals.task_done()
        return
      record, staged = item
      resolve(staged).block_until_ready()
      record.ready_s = time.perf_counter()
      del staged, item
      self._arrivals.task_done()

  def copy(self, keys: Sequence[Key], reason: str, now: bool = True) -> list[tuple[Staged, CopyRecord]]:
    """Issue the copies of experts `keys` [(layer, expert)] as one batched `device_put` (now, or on
    the issue thread if `now` is False and there is one); returns per key the device buffer [P] in
    flight (or its future) and its record."""
    if not keys:
      return []
    issued = time.perf_counter()
    records = [CopyRecord(layer, expert, self.step, reason, self.store.expert_bytes, issued)
               for layer, expert in keys]
    buffers = [self.store.buffer(layer, expert) for layer, expert in keys]
    if not now and self._deferred is not None:
      staged = [concurrent.futures.Future() for _ in keys]
      self._deferred.append((records, buffers, staged))
    elif now or self._issuer is None:
      staged = jax.device_put(buffers, self._sharding)
    else:
      staged = [concurrent.futures.Future() for _ in keys]
      self._issuer.submit(self._issue, records, buffers, staged)
    self.records.extend(records)
    for item in zip(records, staged):
      self._arrivals.put(item)
    return list(zip(staged, records))

  def _issue(self, records: list[CopyRecord], buffers: list[jax.Array],
             futures: list[concurrent.futures.Future]):
    issued = time.perf_counter()
    for record in records:
      record.issue_s = issued
    for future, buffer in zip(futures, jax.device_put(buffers, self._sharding)):
      future.set_result(buffer)

  def prefetch(self, items: Iterable[Key]) -> int:
    """Issue copies for `items` [(layer, expert)] in priority order, skipping cached ones, as one
    batch. An item never evicts an expert planned at or before it, and takes only the slot Belady's
    MIN would free for it (`ExpertCache.reserve`); issuing stops at the first item that finds none.
    Returns the number issued."""
    protected: set[Key] = set()
    batch, slots = [], []
    for key in items:
      if key in protected:
        continue  # listed twice
      protected.add(key)
      if self.cache.is_cached(*key):
        continue
      slot = self.cache.reserve(*key, protected, evict_in_flight=True, prefetch=True)
      if slot is None:
        break
      batch.append(key)
      slots.append(slot)
    for key, slot, (staged, record) in zip(batch, slots, self.copy(batch, "prefetch", now=False)):
      self.cache.attach(*key, slot, staged, record)
    return len(batch)

  def defer(self):
    """Hold back prefetch copies until `issue_deferred` (copies already held stay held): a step's
    copies are then planned first and issued as one batch, after the step's small inputs (an explicit
    host-to-device transfer queued behind expert copies holds the host until they are done)."""
    if self._deferred is None:
      self._deferred = []

  def issue_deferred(self):
    """Issue every copy held back since `defer`, as one batch (on the issue thread if there is one)."""
    held, self._deferred = self._deferred or [], None
    if held:
      records, buffers, futures = [], [], []
      for batch_records, batch_buffers, batch_futures in held:
        records += batch_records
        buffers += batch_buffers
        futures += batch_futures
      if self._issuer is None:
        self._issue(records, buffers, futures)
      else:
        self._issuer.submit(self._issue, records, buffers, futures)

  def drain(self):
    """Wait until every issued copy has landed and been time-stamped."""
    self._arrivals.join()

  def close(self):
    """Stop the watcher and issue threads (after every issued copy has landed)."""
    if self._issuer is not None:
      self._issuer.shutdown(wait=True)
    if self._watcher.is_alive():
      self._arrivals.put(None)
      self._watcher.join()
