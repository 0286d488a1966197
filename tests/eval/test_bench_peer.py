"""Peer benchmark: its --cpu-smoke mode writes results.json and table.md, and jaxmoe's engines decode
the same tokens as transformers on the same f32 checkpoint."""

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from eval import bench_peer  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("peer")
  argv = ["--cpu-smoke", "--workdir", str(tmp / "checkpoint"), "--out", str(tmp / "out")]
  return tmp, argv, bench_peer.main(argv)


@pytest.mark.slow
def test_cpu_smoke_writes_results_and_table(smoke):
  tmp, _, result = smoke
  with open(tmp / "out" / "results.json") as f:
    saved = json.load(f)
  assert saved["systems"].keys() == {"hf_device", "hf_accelerate", "jaxmoe_resident", "jaxmoe_lru"}
  assert "CUDA" in saved["systems"]["hf_accelerate"]["skipped"]
  assert saved["dtype"] == "float32" and saved["args"]["prompt_lengths"] == [4, 8]
  assert 0 < saved["expert_bytes"] and 0 < saved["non_expert_bytes"]
  for n, prompt in saved["prompts"].items():
    assert prompt["distinct"] >= bench_peer.MIN_DISTINCT and not prompt["degenerate"], n
  table = (tmp / "out" / "table.md").read_text()
  assert table == bench_peer.table(saved)
  for name in ("hf_device", "jaxmoe_resident", "jaxmoe_lru"):
    assert f"| {name} |" in table


@pytest.mark.slow
def test_jaxmoe_tokens_equal_transformers_in_f32(smoke):
  _, _, result = smoke
  reference = result["systems"]["hf_device"]["prompts"]
  for name in ("jaxmoe_resident", "jaxmoe_lru"):  # exact engines: offloading changes no token
    for n, cell in result["systems"][name]["prompts"].items():
      assert cell["tokens"] == reference[n]["tokens"], (name, n)
      assert cell["agreement"] == 1.0
      assert len(cell["tokens"]) == 4 and cell["ttft_s"] > 0 and cell["tpot_s"] > 0
      assert cell["distinct"] == reference[n]["distinct"]
  assert result["systems"]["jaxmoe_lru"]["cache_bytes"] < result["systems"]["jaxmoe_resident"]["cache_bytes"]


@pytest.mark.slow
def test_first_token_logits_are_compared_with_transformers_in_f32(smoke):
  _, _, result = smoke
  assert result["first_token"].keys() == {"4", "8"}
  for n, cells in result["first_token"].items():
    assert cells.keys() == {"hf_device", "hf_f32", "jaxmoe_resident"}, n
    assert cells["hf_f32"]["max_abs_vs_hf_f32"] == 0.0
    assert cells["hf_device"]["max_abs_vs_hf_f32"] == 0.0  # the smoke checkpoint is f32 already
    assert cells["jaxmoe_resident"]["max_abs_vs_hf_f32"] < 1e-4  # same math, another f32 summation order
    assert {c["argmax"] for c in cells.values()} == {cells["hf_f32"]["argmax"]}
    assert all(c["top2_gap"] >= 0 for c in cells.values())
    first = result["systems"]["hf_device"]["prompts"][n]["tokens"][0]
    assert cells["hf_f32"]["argmax"] == first


@pytest.mark.slow
def test_checkpoint_is_reused(smoke):
  tmp, argv, _ = smoke
  weights = tmp / "checkpoint" / "model.safetensors"
  before = os.stat(weights).st_mtime_ns
  args = bench_peer.parse_args(argv)
  assert bench_peer.build_checkpoint(args, "cpu", bench_peer.torch.float32) == args.workdir
  assert os.stat(weights).st_mtime_ns == before


def test_defaults_follow_the_shape():
  olmoe = bench_peer.parse_args([])
  assert (olmoe.shape, olmoe.layers, olmoe.cache_fraction) == ("olmoe", 8, 0.25)
  assert olmoe.prompt_lengths == [16, 256] and olmoe.new_tokens == 32 and olmoe.repeats == 3
  assert olmoe.strategies == ["resident", "on_demand", "lru", "oracle"]
  assert olmoe.out == "runs/bench/bench_peer"
  assert bench_peer.parse_args(["--shape", "mixtral"]).layers == 4
  assert bench_peer.parse_args(["--shape", "mixtral", "--layers", "2"]).layers == 2
  with pytest.raises(SystemExit):
    bench_peer.parse_args(["--new-tokens", "1"])


def test_accelerate_budget_is_non_expert_weights_plus_a_share_of_the_experts():
  assert bench_peer.accelerate_max_memory(100, 1000, 0.25) == {0: 350, "cpu": 1 << 40}
