"""Routing statistics on hand-computed arrays, and the routing-statistics report on tiny traces (CPU)."""

import dataclasses
import json

import numpy as np
import pytest

from eval import routing_stats as cli
from jaxmoe import config, model as model_lib
from jaxmoe.predictor import data, routing_stats as rs


def test_load_balance_entropy_and_max_share():
  # layer 0: experts 0 and 1 once each (half the load each); layer 1: expert 2 twice (collapsed)
  experts = np.array([[[0], [2]], [[1], [2]]])
  entropy, share = rs.load_balance(experts, n_experts=4)
  np.testing.assert_allclose(entropy, [np.log(2) / np.log(4), 0.0])
  np.testing.assert_allclose(share, [0.5, 1.0])
  entropy, share = rs.load_balance(np.array([[[0, 1]], [[2, 3]]]), n_experts=4)  # every expert once
  np.testing.assert_allclose(entropy, [1.0])
  np.testing.assert_allclose(share, [0.25])


def test_cross_layer_repetition():
  experts = np.array([[[0, 1], [1, 2], [0, 1]],
                      [[2, 3], [3, 2], [0, 1]]])  # [N=2, L=3, k=2]
  got = rs.cross_layer_repetition(experts, distances=(1, 2))
  # d=1: l0->l1 (1/2 + 2/2) / 2, l1->l2 (1/2 + 0) / 2; d=2: l0->l2 (2/2 + 0) / 2
  np.testing.assert_allclose(got, [[0.75, 0.5], [0.25, np.nan], [np.nan, np.nan]])


# layer 0: sequence 0 is tokens 0-3, sequence 1 tokens 4-5; layer 1 routes every token to {5, 0}
TEMPORAL = np.array([[[0, 1], [5, 0]], [[1, 2], [0, 5]], [[3, 4], [5, 0]],
                     [[0, 4], [5, 0]], [[1, 2], [5, 0]], [[2, 4], [0, 5]]])


def test_temporal_repetition_stops_at_sequence_boundaries():
  got = rs.temporal_repetition(TEMPORAL, seq_ids=np.array([0, 0, 0, 0, 1, 1]), windows=(1, 2, 4))
  # tokens with a predecessor: 1, 2, 3, 5. w=1: 1/2, 0, 1/2, 1/2; w=2: 1/2, 0, 1/2, 1/2;
  # w=4: 1/2, 0, 1 (0 from token 0, 4 from token 2), 1/2 (token 3's 4 lies in the other sequence)
  np.testing.assert_allclose(got, [[0.375, 0.375, 0.5], [1.0, 1.0, 1.0]])


def test_temporal_repetition_of_one_sequence():
  got = rs.temporal_repetition(TEMPORAL, windows=(1, 2, 4))
  # tokens 1-5. w=1: 1/2, 0, 1/2, 0, 1/2; w=2: 1/2, 0, 1/2, 0, 1; w=4: 1/2, 0, 1, 1, 1
  np.testing.assert_allclose(got, [[0.3, 0.4, 0.7], [1.0, 1.0, 1.0]])


def test_reuse_gaps_and_refusals():
  gaps = rs.reuse_gaps(TEMPORAL[:, :1], seq_ids=np.array([0, 0, 0, 0, 1, 1]))[:, 0]
  never = np.iinfo(np.int64).max
  np.testing.assert_array_equal(gaps, [[never, never], [1, never], [never, never], [3, 1], [never, never],
                                       [1, never]])
  with pytest.raises(ValueError, match="contiguous"):
    rs.temporal_repetition(TEMPORAL, seq_ids=np.array([0, 1, 0, 1, 0, 1]))
  with pytest.raises(ValueError, match="previous token"):
    rs.temporal_repetition(TEMPORAL, seq_ids=np.arange(6))


def test_chance_repetition():
  assert rs.chance_repetition(2, 8) == pytest.approx(0.25)
  assert rs.chance_repetition(2, 8, window=2) == pytest.approx(1 - 0.75 ** 2)
  assert rs.chance_repetition(8, 8, window=3) == pytest.approx(1.0)


def test_chance_matches_a_random_router_in_short_rows():
  rows, t, e, k = 2000, 8, 8, 2
  rng = np.random.default_rng(0)
  experts = np.argsort(rng.random((rows, t, 1, e)), axis=-1)[..., :k]  # k distinct uniform experts a token
  manifest = {"n_layers": 1, "n_experts": e, "top_k": k}
  traces = data.Traces(manifest, np.zeros((rows, t), np.int32), np.arange(rows), experts, None, None, {})
  stats = rs.trace_stats(traces, distances=(1,), windows=(1, 4, 16))
  for w in ("1", "4", "16"):  # w=16 exceeds the 8-token rows: the chance figure must cut it as the data does
    assert stats["temporal"][w][0] == pytest.approx(stats["chance"]["temporal"][w], abs=0.01)
  assert stats["chance"]["temporal"]["16"] < rs.chance_repetition(k, e, 16) - 0.05
  assert stats["max_share"][0] == pytest.approx(1 / e, abs=0.01)


def test_next_gate_recall_with_a_known_router():
  route = lambda layer, h: ((h[:, :1] + layer) % 4).astype(np.int64)  # expert (h + layer) mod 4, k = 1
  hidden = np.array([[[0.0], [1.0]], [[2.0], [0.0]]])  # [N=2, H=2, D=1], entering layers 0 and 1
  experts = np.array([[[0], [1], [3]], [[0], [0], [2]]])  # [N=2, L=3, k=1]
  got = rs.next_gate_recall(hidden, [0, 1], experts, route, distances=(1, 2))
  # l0 -> l1 guesses 1, 3 (routed 1, 0); l1 -> l2 guesses 3, 2 (routed 3, 2); l0 -> l2 guesses 2, 0 (3, 2)
  np.testing.assert_allclose(got, [[0.5, 0.0], [1.0, np.nan], [np.nan, np.nan]])
  only_1 = rs.next_gate_recall(hidden[:, 1:], [1], experts, route, distances=(1,))
  np.testing.assert_allclose(only_1, [[np.nan], [1.0], [np.nan]])


def test_gate_route_uses_the_layers_router():
  router = np.array([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]],
                     [[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]]])  # [L=2, D=2, E=3]: layer 1 swaps experts 0, 1
  gates = {"router": router, "ffn_norm": np.ones((2, 2)), "norm_eps": np.float32(1e-5)}
  route = rs.gate_route(gates, top_k=2)
  hidden = np.array([[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_array_equal(route(0, hidden), [[0, 2], [1, 2]])
  np.testing.assert_array_equal(route(1, hidden), [[1, 2], [0, 2]])


@pytest.fixture(scope="module")
def tiny_traces(tmp_path_factory):
  cfg = dataclasses.replace(config.tiny(), kernel_impl="xla")
  model = model_lib.create(cfg, seed=0)
  rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 32))  # 256 tokens
  out = str(tmp_path_factory.mktemp("traces"))
  data.collect_traces(model, data.batches(rows, np.arange(8) // 2, 4), out, progress=False)
  return out


def test_report_on_tiny_traces(tiny_traces, tmp_path, capsys):
  out = tmp_path / "stats"
  assert cli.main(["--traces", tiny_traces, "--out", str(out), "--distances", "1,2", "--windows", "1,4,16"]) == 0
  stats = json.loads((out / "stats.json").read_text())
  tr = data.load_traces(tiny_traces, hidden=False)
  n_layers = tr.n_layers
  assert stats["n_tokens"] == 256 and stats["n_sequences"] == 8 and stats["n_layers"] == n_layers
  assert all(0.0 <= v <= 1.0 for v in stats["load_entropy"])
  assert all(1.0 / tr.n_experts <= v <= 1.0 for v in stats["max_share"])
  temporal = np.array([stats["temporal"][w] for w in ("1", "4", "16")])  # [W, L]
  assert np.all(np.diff(temporal, axis=0) >= 0)  # a longer window holds every expert a shorter one holds
  assert stats["cross_layer"]["1"][-1] is None and stats["cross_layer"]["1"][0] is not None
  assert stats["next_gate"]["2"][n_layers - 2] is None and 0.0 <= stats["next_gate"]["1"][0] <= 1.0
  assert (out / "routing_stats.png").stat().st_size > 0
  table = (out / "routing_stats.md").read_text()
  assert table.count("\n| ") == n_layers + 3  # header, one row per layer, mean and chance rows
  assert "| mean |" in capsys.readouterr().out


def test_missing_traces_directory_is_a_usage_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(["--traces", str(tmp_path / "missing")])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "is not a traces directory" in err[-1]
