"""The main job end to end on the tiny preset: every strategy runs, is exact, and the files are written."""

import json
import threading

import pytest

from eval import run


@pytest.mark.slow
def test_main_job_tiny_end_to_end(tmp_path, corpus):
  out = tmp_path / "run"
  watchers = lambda: sum(t.name == "expert-copy-watcher" for t in threading.enumerate())
  before = watchers()
  assert run.main(["--preset", "tiny", "--data", str(corpus), "--out", str(out), "--no-trace"]) == 0
  assert watchers() == before  # every engine the job made was closed
  results = json.loads((out / "results.json").read_text())
  names = [r["name"] for r in results["strategies"]]
  assert names == ["resident", "on_demand", "lru", "stream_all", "next_gate", "oracle", "learned"]
  for r in results["strategies"] + results["noisy_oracle_sweep"]:
    assert r["tokens_equal"], r["name"]
    assert r["max_abs_logit_diff"] == 0.0, r["name"]  # same kernels: bitwise
    assert r["ttft_s"] > 0 and r["tpot_s"] > 0
  rows = {r["name"]: r for r in results["strategies"]}
  assert rows["resident"]["bytes_copied"] == 0
  assert rows["on_demand"]["hit_rate"] == 0.0  # nothing is kept or prefetched
  assert rows["oracle"]["bytes_wasted"] == 0  # the oracle prefetches only what is routed
  assert [t["target"].split()[0] for t in results["targets"]] == ["learned", "learned", "best", "best"]
  assert results["targets"][3]["target"].startswith("best deployable")
  assert "oracle" not in results["targets"][3]["target"]
  for r in results["strategies"]:
    assert r["ttft_bound_s"] >= rows["resident"]["ttft_s"]
  families = {p["family"] for p in results["predictors"]}
  assert {"popularity", "next_gate", "token_mlp", "context", "cross_layer"} <= families
  report = (out / "report.md").read_text()
  for section in ("1. Which predictor", "2. Time per strategy", "3. Accuracy", "4. Quality"):
    assert section in report
  assert (out / "latency.png").stat().st_size > 0 and (out / "speedup_vs_recall.png").exists()
  # a second run reuses the trained model, traces and predictors; timings are medians over repeats
  assert run.main(["--preset", "tiny", "--out", str(out), "--no-trace", "--strategies", "resident",
                   "--repeats", "3"]) == 0
  row = json.loads((out / "results.json").read_text())["strategies"][0]
  assert row["repeats"] == 3 and row["tpot_s"] == sorted(row["tpot_s_each"])[1]
  assert "medians over 3 timed requests" in (out / "report.md").read_text()


def test_bad_arguments_are_refused(tmp_path):
  with pytest.raises(ValueError, match="cache-fraction"):
    run.main(["--preset", "tiny", "--cache-fraction", "1.5", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="unknown strategies"):
    run.main(["--preset", "tiny", "--strategies", "magic", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="repeats"):
    run.main(["--preset", "tiny", "--repeats", "0", "--out", str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="no such directory"):
    run.main(["--preset", "tiny", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
