"""The main job's stages on the tiny preset at the smallest sizes: any subset of strategies runs to a
report, and what was measured is on disk even when a later stage fails."""

import dataclasses
import json

import pytest

from eval import pipeline, report
from jaxmoe import config

FAST = dataclasses.replace(pipeline.RUN_PRESETS["tiny"], train_minutes=0.05, trace_tokens=512, trace_seq_len=32,
                           predictor_steps=4, prompt_lengths=(8,), new_tokens=3, noisy_recalls=(1.0,),
                           strategies=("on_demand", "lru", "learned"), profile=False)


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory, corpus):
  out = tmp_path_factory.mktemp("subset")
  results = pipeline.run(FAST, out, data=str(corpus), log=lambda msg: None)
  return out, results


def test_a_subset_without_resident_runs_to_a_report(subset_run):
  out, results = subset_run
  saved = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in saved["strategies"]] == ["on_demand", "lru", "learned"]
  assert saved["meta"]["complete"] is True
  # without `resident` the analytic model takes the per-layer reference's compute time
  assert saved["analytic_base"] == "reference"
  for r in saved["strategies"]:
    assert r["tokens_equal"], r["name"]
    assert r["ttft_bound_s"] > saved["reference_timing"]["ttft_s"] > 0
    assert r["predicted_tpot_s"] > 0
  assert [t["target"].split()[0] for t in saved["targets"]] == ["learned", "best"]
  assert all(t["met"] in (True, False) for t in saved["targets"])
  text = (out / "report.md").read_text()
  assert "per-layer all-resident reference (`resident` was not run)" in text
  assert "| 8 tok: " in text  # the TTFT column names its prompt
  assert "time to first token of the 8-token prompt" in report.summary_table(saved)
  for png in ("latency.png", "timeline.png", "speedup_vs_recall.png", "per_layer_recall.png"):
    assert (out / png).stat().st_size > 0, png


def test_the_copy_timeline_knows_when_each_step_began(subset_run):
  _, results = subset_run
  tl = results["timeline"]
  starts = tl["step_starts_s"]
  assert len(starts) == FAST.new_tokens and starts[0] == 0.0
  assert all(a < b for a, b in zip(starts, starts[1:]))
  assert tl["prompt_len"] == 8
  for c in tl["copies"]:
    assert 0 <= c["step"] < FAST.new_tokens
    assert c["issue_s"] >= starts[c["step"]]  # a step's copies are issued once it has begun


def test_targets_without_a_bound_say_dash():
  rows = {"lru": {"name": "lru", "ttft_s": 0.01, "tpot_s": 0.002}}
  assert pipeline.targets(rows) == [{"target": "best time-to-first-token (lru) within 1.10x of its PCIe bound",
                                     "value": "-", "met": None}]


def test_break_even_interpolates_the_recall_where_the_sweep_crosses_the_baseline():
  sweep = [{"recall": 0.9, "tpot_s": 2.0, "bytes_copied": 100}, {"recall": 0.5, "tpot_s": 4.0, "bytes_copied": 300}]
  assert pipeline.break_even(sweep, 3.0) == pytest.approx(0.7)  # halfway between 4.0 and 2.0 ms
  assert pipeline.break_even(sweep, 250, key="bytes_copied") == pytest.approx(0.6)
  assert pipeline.break_even(sweep, 5.0) == 0.5  # already below at the lowest recall
  assert pipeline.break_even(sweep, 1.0) is None  # never reached


def test_the_predictor_cost_target_is_learned_planning_time_over_its_step():
  rows = {"learned": {"name": "learned", "ttft_s": 0.01, "tpot_s": 0.004,
                      "host_split_s": {"plan": 0.0001, "dispatch": 0.003, "wait": 0.0, "read": 0.0005}}}
  cost = [t for t in pipeline.targets(rows) if "planning" in t["target"]]
  assert cost == [{"target": "learned's planning a decode step (predictor call included) < 2 % of the step",
                   "value": "2.5 % (0.10 ms)", "met": False}]
  rows["learned"]["host_split_s"]["plan"] = 0.00004
  assert [t["met"] for t in pipeline.targets(rows) if "planning" in t["target"]] == [True]
  rows["learned"]["plans_in_step"] = True  # its predictor runs in the step: no host time to divide
  assert [t["met"] for t in pipeline.targets(rows) if "planning" in t["target"]] == [None]
  rows["learned"]["in_step_plan_s"] = 0.00012  # its device time, timed alone: 3 % of the step
  assert [(t["value"], t["met"]) for t in pipeline.targets(rows) if "planning" in t["target"]] == [
      ("3.0 % (120 us of device time in the step)", False)]


def test_the_in_step_plan_is_timed_on_the_device(tmp_path):
  from jaxmoe import model as model_lib
  from jaxmoe.predictor import models
  from jaxmoe.predictor.store import TokenPredictor
  cfg = config.tiny()
  token_model = models.build("context", {"vocab_size": cfg.vocab_size, "n_layers": cfg.n_layers,
                                         "n_experts": cfg.n_experts}, {}, seed=0)
  strategy = pipeline.strategies_lib.make("learned", n_experts=cfg.n_experts, predictor=TokenPredictor(token_model))
  engine = pipeline.program.ProgramEngine(model_lib.create(cfg, seed=0), cache_bytes=8 * cfg.expert_bytes,
                                          strategy=strategy)
  assert engine.plans_in_step and engine.planner is not None
  assert 0.0 <= pipeline.in_step_plan_s(engine, reps=8) < 0.1


def test_a_failure_after_the_strategies_keeps_the_measured_rows(subset_run, tmp_path, monkeypatch):
  model_dir, _ = subset_run

  def fail(*args, **kwargs):
    raise RuntimeError("injected after the strategies stage")

  monkeypatch.setattr(pipeline, "stage_analytic", fail)
  s = dataclasses.replace(FAST, strategies=("on_demand", "lru"))
  with pytest.raises(RuntimeError, match="injected"):
    pipeline.run(s, tmp_path, model_path=str(model_dir / "model"), log=lambda msg: None)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["meta"]["complete"] is False
  assert [r["name"] for r in saved["strategies"]] == ["on_demand", "lru"]
  assert all(r["tpot_s"] > 0 and r["tokens_equal"] for r in saved["strategies"])
  assert len(saved["noisy_oracle_sweep"]) == 0  # no oracle or learned strategy: no sweep
