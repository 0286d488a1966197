"""The prefetch gain bound of the analytic model on hand-computed cases."""

import pytest

from eval.analytic import StepCost, prefetch_gain_bound


@pytest.mark.parametrize("compute_s, transfer_s, bound", [
    (1.0, 1.0, 2.0),  # balanced: all of the copy time hides behind as much compute
    (3.0, 1.0, 4.0 / 3.0),  # compute-bound: at most the 1 s of copies can go
    (0.5, 2.0, 1.25),  # copy-bound: at most the 0.5 s of compute overlaps
    (0.0, 2.0, 1.0),  # nothing to hide the copies behind
    (2.0, 0.0, 1.0),  # nothing to hide
])
def test_prefetch_gain_bound(compute_s, transfer_s, bound):
  assert prefetch_gain_bound(compute_s, transfer_s) == pytest.approx(bound)


def test_bound_is_the_step_model_with_all_bytes_prefetched():
  on_demand = StepCost(compute_s=0.5, prefetched_bytes=0.0, on_demand_bytes=2e9, bandwidth_bytes_per_s=1e9)
  prefetched = StepCost(compute_s=0.5, prefetched_bytes=2e9, on_demand_bytes=0.0, bandwidth_bytes_per_s=1e9)
  assert on_demand.predicted_s / prefetched.predicted_s == pytest.approx(prefetch_gain_bound(0.5, 2.0))


@pytest.mark.parametrize("compute_s, transfer_s", [(0.0, 0.0), (-1.0, 1.0), (1.0, -0.5)])
def test_bad_times_are_refused(compute_s, transfer_s):
  with pytest.raises(ValueError, match="non-negative"):
    prefetch_gain_bound(compute_s, transfer_s)
