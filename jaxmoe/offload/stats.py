"""What one offloaded request cost: times, hits and misses, bytes, stalls, copies, routing, logits."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxmoe.offload.cache import CopyRecord


@dataclasses.dataclass
class OffloadStats:
  """What one request cost. Times in seconds; copy times relative to the request's start."""

  ttft_s: float = 0.0  # prompt in -> first token on the host
  token_latencies_s: list[float] = dataclasses.field(default_factory=list)  # per decoded token
  e2e_s: float = 0.0  # whole request
  n_generated: int = 0  # tokens generated per sequence
  batch: int = 0
  hits: list[int] = dataclasses.field(default_factory=list)  # [L] routed experts found cached
  misses: list[int] = dataclasses.field(default_factory=list)  # [L] routed experts fetched on demand
  # (ProgramEngine: routed experts found uncached, read into the cache or computed on the host)
  # [L] waits for copies: the host's, or (FFN dispatched with its copies in flight) from the dispatch
  # until the last of them landed, by the copy watcher's time stamps
  stall_s: list[float] = dataclasses.field(default_factory=list)
  copies: list[CopyRecord] = dataclasses.field(default_factory=list)  # issue/ready, this request
  host_read_bytes: int = 0  # experts read straight from host memory by compiled steps (ProgramEngine)
  step_read_bytes: list[int] = dataclasses.field(default_factory=list)  # the same, per step
  decode_misses: str = "device"  # where decode steps' misses ran: "device" (brought over) or "host"
  host_experts: int = 0  # routed experts computed on the host CPU (`hybrid`), all steps and layers
  routing: list[list[list[int]]] = dataclasses.field(default_factory=list)  # [step][layer] experts
  # ProgramEngine: [step][layer] experts its plan named for that step (empty: no plan)
  plans: list[list[list[int]]] = dataclasses.field(default_factory=list)
  redone: int = 0  # steps redone from a speculated layer that lacked a routed expert
  speculated: int = 0  # layers computed on the plan before their routing was read (and found right)
  logits: np.ndarray | None = None  # [B, N, V] f32 of the generated tokens
  start_s: float = 0.0  # perf_counter at the request's start
  # ProgramEngine, per decode step (mean): the host's time planning it (strategy plan, copies issued,
  # admission packed), dispatching its program, waiting for it to finish and reading it back; a wait
  # near zero means the device waited for the host (the step is host-bound)
  host_split_s: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def tpot_s(self) -> float:
    """Mean time per output token after the first."""
    return float(np.mean(self.token_latencies_s)) if self.token_latencies_s else 0.0

  @property
  def tokens_per_s(self) -> float:
    return self.batch * self.n_generated / self.e2e_s if self.e2e_s else 0.0

  @property
  def bytes_copied(self) -> int:
    """Expert bytes that crossed to the device: copies, and reads of host memory (always used)."""
    return sum(c.nbytes for c in self.copies) + self.host_read_bytes

  @property
  def bytes_useful(self) -> int:
    return sum(c.nbytes for c in self.copies if c.used) + self.host_read_bytes

  @property
  def bytes_wasted(self) -> int:
    return self.bytes_copied - self.bytes_useful

  def timeline(self) -> list[dict[str, Any]]:
    """Per copy: layer, expert, step, reason, issue and ready time since the request started."""
    return [{"layer": c.layer, "expert": c.expert, "step": c.step, "reason": c.reason,
             "issue_s": c.issue_s - self.start_s,
             "ready_s": None if c.ready_s is None else c.ready_s - self.start_s, "used": c.used}
            for c in self.copies]

  def summary(self) -> dict[str, Any]:
    """JSON-ready numbers (no logits, no per-copy timeline)."""
    return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
            "tokens_per_s": self.tokens_per_s, "bytes_copied": self.bytes_copied,
            "bytes_useful": self.bytes_useful, "bytes_wasted": self.bytes_wasted,
            "hits": list(self.hits), "misses": list(self.misses), "stall_s": list(self.stall_s),
            "n_copies": len(self.copies), "redone": self.redone,
            "speculated": self.speculated, "decode_misses": self.decode_misses,
            "host_experts": self.host_experts, "host_split_s": dict(self.host_split_s)}


def settle_stalls(awaited, stall_s: list[float]) -> list:
  """Adds to stall_s [L] the stalls of the layers whose FFN went out with copies in flight:
  awaited = [(layer, dispatch time, [CopyRecord])], each stalled from its dispatch until its last copy
  landed (nothing if all had landed before). -> the entries whose copies are not all time-stamped yet,
  to settle on a later call (after the copy watcher drains, every one is)."""
  later = []
  for layer, dispatched, records in awaited:
    if all(r.ready_s is not None for r in records):
      stall_s[layer] += max(0.0, max(r.ready_s for r in records) - dispatched)
    else:
      later.append((layer, dispatched, records))
  return later
