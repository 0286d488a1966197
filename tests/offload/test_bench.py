"""The offload benchmark runs end to end on the CPU with the tiny preset (a smoke test)."""

import json

import pytest

from eval import bench_offload


@pytest.mark.slow
def test_bench_offload_tiny(tmp_path):
  out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
  md.write_text("# Benchmarks\n\n## Expert kernels\n\nkept as it was\n")
  # batch 2, prompt 7 and 3 slots: the shapes of the engine tests, so little is compiled again
  bench_offload.main(["--preset", "tiny", "--quick", "--batch", "2", "--prompts", "7",
                      "--budgets", "18.75", "--strategies", "resident", "lru", "oracle",
                      "--decode-tokens", "5", "--no-profile", "--out", str(out), "--markdown", str(md)])
  result = json.loads(out.read_text())
  assert [row["strategy"] for row in result["rows"]] == ["lru", "oracle"]
  for row in result["rows"]:
    for key in ("ttft_7", "tpot"):
      assert row[key]["measured_s"] > 0 and row[key]["bound_s"] > 0
  assert result["h2d_bytes_per_s"] > 0 and result["targets"]
  text = md.read_text()
  assert "kept as it was" in text and "## Offload engine" in text and "| oracle | 18.75% (3) |" in text
