"""Copy/compute overlap from a `jax.profiler` trace, read without TensorBoard.

On a GPU plane, kernels run on compute streams and host-to-device copies appear as `MemcpyH2D` events
on their own streams. Overlap = length of (union of kernel intervals) ∩ (union of copy intervals);
`hidden_pct` = the share of copy time during which some kernel ran.
"""

from __future__ import annotations

import glob
import os
from typing import Iterable, NamedTuple

import jax

Interval = tuple[int, int]  # [start_ns, end_ns)


class Overlap(NamedTuple):
  plane: str  # e.g. "/device:GPU:0"
  kernel_ms: float  # busy time of compute kernels
  copy_ms: float  # busy time of host-to-device copies
  overlap_ms: float  # time both were busy

  @property
  def hidden_pct(self) -> float:
    """Share of copy time hidden behind compute."""
    return 100.0 * self.overlap_ms / self.copy_ms if self.copy_ms else 0.0


def union(intervals: Iterable[Interval]) -> list[Interval]:
  """Sorted, disjoint intervals covering the same time."""
  merged: list[list[int]] = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return [(s, e) for s, e in merged]


def intersection_length(a: list[Interval], b: list[Interval]) -> int:
  """Total length of the intersection of two sorted disjoint interval lists."""
  i = j = total = 0
  while i < len(a) and j < len(b):
    total += max(0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return total


def overlap_of(plane: str, kernels: Iterable[Interval], copies: Iterable[Interval]) -> Overlap:
  k, c = union(kernels), union(copies)
  busy = lambda iv: sum(e - s for s, e in iv) / 1e6
  return Overlap(plane, busy(k), busy(c), intersection_length(k, c) / 1e6)


def latest_trace(trace_dir: str) -> str:
  """The newest `*.xplane.pb` written under `trace_dir` by `jax.profiler`."""
  paths = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
  if not paths:
    raise FileNotFoundError(f"no jax.profiler trace (*.xplane.pb) under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def copy_compute_overlap(trace_dir: str) -> list[Overlap]:
  """One `Overlap` per GPU plane of the newest trace in `trace_dir` (empty without a GPU)."""
  out = []
  for plane in jax.profiler.ProfileData.from_file(latest_trace(trace_dir)).planes:
    if "GPU" not in plane.name:
      continue
    kernels, copies = [], []
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for event in line.events:
        interval = (event.start_ns, event.end_ns)
        if "MemcpyH2D" in event.name:
          copies.append(interval)
        elif "Memcpy" not in event.name and "Memset" not in event.name:
          kernels.append(interval)
    out.append(overlap_of(plane.name, kernels, copies))
  return out
