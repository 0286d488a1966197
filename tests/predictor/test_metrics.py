"""Routing metrics equal hand-computed values on small cases."""

import numpy as np
import pytest

from jaxmoe.predictor import metrics


def _case():
  # 2 tokens, 2 layers, 4 experts, top-2. Layer 1 has no prediction for token 1 (NaN).
  scores = np.array([[[0.9, 0.1, 0.8, 0.3], [0.5, 0.5, 0.1, 0.0]],
                     [[0.2, 0.7, 0.6, 0.1], [np.nan] * 4]], np.float32)  # [N=2, L=2, E=4]
  experts = np.array([[[0, 3], [1, 2]],
                      [[1, 2], [0, 1]]])  # [N, L, k]
  return scores, experts


def test_layer0_by_hand():
  scores, experts = _case()
  m = metrics.routing_metrics(scores, experts, [2, 3])["per_budget"]
  # token 0: top-2 {0, 2} holds 1 of {0, 3}; top-3 {0, 2, 3} holds both. token 1: top-2 {1, 2} = routed.
  assert m["2"]["recall"][0] == pytest.approx(0.75)
  assert m["2"]["precision"][0] == pytest.approx(0.75)
  assert m["2"]["exact_set"][0] == pytest.approx(0.5)
  assert m["3"]["recall"][0] == pytest.approx(1.0)
  assert m["3"]["precision"][0] == pytest.approx(2 / 3)
  assert m["3"]["exact_set"][0] == pytest.approx(1.0)


def test_ties_go_to_lower_id_and_nan_rows_are_left_out():
  scores, experts = _case()
  m = metrics.routing_metrics(scores, experts, [1, 2])["per_budget"]
  # layer 1, token 0 only: scores tie between experts 0 and 1 -> top-1 is expert 0 (not routed).
  assert m["1"]["recall"][1] == pytest.approx(0.0)
  assert m["2"]["recall"][1] == pytest.approx(0.5)  # top-2 {0, 1} holds 1 of {1, 2}
  assert m["2"]["recall_avg"] == pytest.approx((0.75 + 0.5) / 2)
  np.testing.assert_array_equal(metrics.top_m(np.array([1.0, 3.0, 3.0, 0.0]), 2), [1, 2])


def test_layer_without_any_prediction_is_none_and_not_averaged():
  scores, experts = _case()
  scores[:, 1] = np.nan
  m = metrics.routing_metrics(scores, experts, [2])["per_budget"]["2"]
  assert m["recall"][1] is None and m["recall_avg"] == pytest.approx(0.75)


def test_perfect_and_bad_arguments():
  experts = np.array([[[3, 1]]])
  scores = np.zeros((1, 1, 5), np.float32)
  scores[0, 0, [1, 3]] = 1.0
  assert metrics.mean_recall(scores, experts, 2) == 1.0
  assert metrics.routing_metrics(scores, experts, [2])["per_budget"]["2"]["exact_set_avg"] == 1.0
  with pytest.raises(ValueError, match="budget"):
    metrics.top_m(scores, 6)
  with pytest.raises(ValueError, match="disagree"):
    metrics.hits_at(scores, np.zeros((2, 1, 2), int), 2)


def test_cost_helpers():
  import jax.numpy as jnp
  assert metrics.count_params({"a": np.zeros((3, 4)), "b": [np.zeros(5)]}) == 17
  flops = metrics.flops_per_call(lambda x, w: x @ w, jnp.ones((2, 8)), jnp.ones((8, 4)))
  assert np.isnan(flops) or flops == pytest.approx(2 * 2 * 8 * 4, rel=0.5)
  assert metrics.time_us(lambda: np.zeros(3), reps=3) > 0
