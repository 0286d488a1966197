"""The main job end to end on the tiny preset: every strategy runs, is exact, and the files are written."""

import dataclasses
import json
import threading

import numpy as np
import pytest

from eval import run
from jaxmoe import checkpoint, config
from tests.cli_errors import refused


@pytest.mark.slow
def test_main_job_tiny_end_to_end(tmp_path, corpus):
  out = tmp_path / "run"
  watchers = lambda: sum(t.name == "expert-copy-watcher" for t in threading.enumerate())
  before = watchers()
  # half the experts: one layer of the 32-token prompt fits engine v2's cache (all 8 experts)
  assert run.main(["--preset", "tiny", "--data", str(corpus), "--out", str(out), "--no-trace",
                   "--cache-fraction", "0.5"]) == 0
  assert watchers() == before  # every engine the job made was closed
  results = json.loads((out / "results.json").read_text())
  names = [r["name"] for r in results["strategies"]]
  assert names == ["resident", "on_demand", "lru", "stream_all", "next_gate", "oracle", "learned"]
  for r in results["strategies"] + results["noisy_oracle_sweep"]:
    assert r["tokens_equal"], r["name"]
    assert r["max_abs_logit_diff"] == 0.0, r["name"]  # same kernels: bitwise
    assert r["ttft_s"] > 0 and r["tpot_s"] > 0
  rows = {r["name"]: r for r in results["strategies"]}
  # engine v2 runs the strategies it supports, exact against its own resident run
  assert {n: r["engine"] for n, r in rows.items()} == {
      "resident": "v2", "on_demand": "v2", "lru": "v2", "oracle": "v2",
      "stream_all": "v1", "next_gate": "v1", "learned": "v2"}
  # learned on v2 runs the best token family trained for v2's plan lead, compared with the others
  plan_rows = [r for r in results["predictors"] if r["predictor"] == results["plan_predictor"]]
  assert plan_rows and plan_rows[0]["lead"] == results["plan_lead"] == 2
  assert results["plan_predictor"].startswith(results["learned_family"])
  assert results["reference_logit_diff"] == 0.0  # f32 on the CPU: both engines' resident runs agree
  assert rows["resident"]["bytes_copied"] == 0
  # the sweep's eviction knows what learned's plan knows: here the step served only (planned in the step)
  assert rows["learned"]["plans_in_step"]
  assert {p["horizon"] for p in results["noisy_oracle_sweep"]} == {0}
  assert rows["learned"]["in_step_plan_s"] >= 0  # its predictor's device time, timed alone
  assert [t["met"] is not None for t in results["targets"] if "planning" in t["target"]] == [True]
  assert rows["on_demand"]["hit_rate"] == 0.0  # nothing is kept or prefetched
  assert rows["oracle"]["bytes_wasted"] == 0  # the oracle prefetches only what is routed
  assert [t["target"].split()[0] for t in results["targets"]] == ["learned", "learned", "learned's", "best",
                                                                   "best"]
  assert results["targets"][4]["target"].startswith("best deployable")
  assert "oracle" not in results["targets"][4]["target"]
  for r in results["strategies"]:
    assert r["ttft_bound_s"] >= rows["resident"]["ttft_s"]
    c, t = r["compute_tpot_s"], r["transfer_tpot_s"]  # the physics: (C + T) / max(C, T) in [1, 2]
    assert r["prefetch_gain_bound"] == pytest.approx((c + t) / max(c, t))
    assert 1.0 <= r["prefetch_gain_bound"] <= 2.0
  assert rows["resident"]["prefetch_gain_bound"] == 1.0  # nothing moved, nothing to hide
  families = {p["family"] for p in results["predictors"]}
  assert {"popularity", "next_gate", "token_mlp", "context", "cross_layer"} <= families
  report = (out / "report.md").read_text()
  for section in ("1. Which predictor", "2. Time per strategy", "prefetch gain bound", "3. Accuracy",
                  "4. Quality"):
    assert section in report
  assert (out / "latency.png").stat().st_size > 0 and (out / "speedup_vs_recall.png").exists()
  # a second run reuses the trained model, traces and predictors; timings are medians over repeats
  assert run.main(["--preset", "tiny", "--out", str(out), "--no-trace", "--strategies", "resident",
                   "--repeats", "3"]) == 0
  row = json.loads((out / "results.json").read_text())["strategies"][0]
  assert row["repeats"] == 3 and row["tpot_s"] == sorted(row["tpot_s_each"])[1]
  assert "medians over 3 timed requests" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, flag", [
    (["--prompt-lengths", "abc"], "--prompt-lengths"),
    (["--prompt-lengths", "8,0"], "--prompt-lengths"),
    (["--new-tokens", "-3"], "--new-tokens"),
    (["--cache-fraction", "1.5"], "--cache-fraction"),
    (["--strategies", "magic"], "--strategies"),
    (["--repeats", "0"], "--repeats"),
    (["--train-minutes", "0"], "--train-minutes"),
    (["--noisy-recalls", "0.5,2"], "--noisy-recalls"),
    (["--plan-copies", "maybe"], "--plan-copies"),
    (["--prompt-lengths", "250"], "--prompt-lengths 250 plus --new-tokens 8 exceed the model's max_seq_len"),
    # tiny: 2 layers x 8 experts, top-2: one token's experts of a layer are 2 / 16 of all experts
    (["--cache-fraction", "0.1"], "the smallest valid value is 0.125"),
])
def test_bad_arguments_are_refused_with_the_flag_named(args, flag, tmp_path, capsys):
  err = refused(run.parse_args, ["--preset", "tiny", "--out", str(tmp_path), *args], capsys)
  assert "error:" in err and flag in err
  assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_smallest_valid_cache_fraction_is_accepted(tmp_path):
  assert run.parse_args(["--preset", "tiny", "--cache-fraction", "0.125"]).settings.cache_fraction == 0.125


def test_the_noisy_oracle_sweep_can_be_chosen_or_skipped():
  assert run.parse_args(["--preset", "gpu"]).settings.noisy_recalls == (0.5, 0.7, 0.9, 1.0)
  assert run.parse_args(["--preset", "gpu", "--noisy-recalls", "0.6,1"]).settings.noisy_recalls == (0.6, 1.0)
  assert run.parse_args(["--preset", "gpu", "--noisy-recalls", "none"]).settings.noisy_recalls == ()


def test_plan_copies_default_to_the_engines_rule_and_can_be_forced():
  assert run.parse_args(["--preset", "gpu"]).settings.plan_copies == "auto"
  assert run.parse_args(["--preset", "gpu", "--plan-copies", "off"]).settings.plan_copies is False
  assert run.parse_args(["--preset", "gpu", "--plan-copies", "on"]).settings.plan_copies is True


def test_command_buffers_are_off_unless_asked_for():
  assert run.parse_args(["--preset", "gpu"]).settings.command_buffers is False
  assert run.parse_args(["--preset", "gpu", "--command-buffers", "on"]).settings.command_buffers is True


def test_a_prompt_longer_than_a_given_models_context_is_refused_before_loading(tmp_path, capsys):
  model = tmp_path / "model"
  checkpoint.save_config(dataclasses.replace(config.tiny(), max_seq_len=64), model)  # a config, no weights
  with pytest.raises(SystemExit):
    run.parse_args(["--model", str(model), "--prompt-lengths", "60", "--new-tokens", "8"])
  assert "exceed the model's max_seq_len 64" in capsys.readouterr().err
  assert run.parse_args(["--model", str(model), "--prompt-lengths", "56", "--new-tokens", "8"]).model


@pytest.mark.parametrize("name, content, message", [
    ("random.txt", np.random.default_rng(0).bytes(4096), "not text"),
    ("weights.bin", b"\0" * 16, "unsupported file type"),
    ("missing.txt", None, "no such file or directory"),
])
def test_data_that_is_not_text_is_refused_before_training(name, content, message, tmp_path, capsys):
  if content is not None:
    (tmp_path / name).write_bytes(content)
  with pytest.raises(SystemExit) as e:
    run.parse_args(["--preset", "tiny", "--data", str(tmp_path / name), "--out", str(tmp_path / "out")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--data" in err and message in err


def test_the_fine_grained_preset_trains_on_the_python_sources_unless_told():
  a = run.parse_args(["--preset", "gpu_fine"])  # the keyword is not read until training
  assert a.settings.preset == "gpu_fine" and a.data is None
  assert run.parse_args(["--preset", "gpu_fine", "--data", "python"]).data == "python"


def test_a_missing_model_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit):
    run.parse_args(["--preset", "tiny", "--model", str(tmp_path / "missing")])
  assert "--model" in capsys.readouterr().err
