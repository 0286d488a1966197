"""Copy/compute overlap arithmetic of the profiler-trace reader."""

import pytest

from jaxmoe.offload import trace


def test_union_and_intersection():
  assert trace.union([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
  assert trace.intersection_length([(0, 3), (5, 8)], [(2, 6), (7, 20)]) == 1 + 1 + 1
  assert trace.intersection_length([], [(0, 1)]) == 0


def test_overlap_of_kernels_and_copies():
  ms = 1_000_000
  o = trace.overlap_of("gpu", kernels=[(0, 4 * ms), (3 * ms, 6 * ms)],
                       copies=[(5 * ms, 9 * ms), (8 * ms, 9 * ms)])
  assert (o.kernel_ms, o.copy_ms, o.overlap_ms) == (6.0, 4.0, 1.0)
  assert o.hidden_pct == 25.0
  assert trace.overlap_of("gpu", [(0, ms)], []).hidden_pct == 0.0


def test_missing_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no jax.profiler trace"):
    trace.copy_compute_overlap(str(tmp_path))
