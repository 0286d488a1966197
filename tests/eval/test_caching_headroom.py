"""The caching-headroom tool: bytes by plan recall and horizon, checked against hand-computed cases."""

import dataclasses
import types

import numpy as np
import pytest

from eval import caching_headroom
from jaxmoe import checkpoint, config, model as model_lib
from jaxmoe.offload.program import ProgramEngine
from jaxmoe.predictor import models
from jaxmoe.predictor.store import TokenPredictor
from tests.cli_errors import refused

NEW = 6


@pytest.fixture(scope="module")
def tiny():
  cfg = dataclasses.replace(config.tiny(), n_layers=3, kernel_impl="xla")
  model = model_lib.create(cfg, seed=0)
  prompts = [np.random.default_rng(i).integers(0, cfg.vocab_size, (1, 5)).astype(np.int32) for i in range(2)]
  token_model = models.build("context", {"vocab_size": cfg.vocab_size, "n_layers": cfg.n_layers,
                                         "n_experts": cfg.n_experts}, {}, seed=0)
  res = caching_headroom.measure(model, TokenPredictor(token_model), cache_fraction=0.5, recalls=(0.5, 1.0),
                                 horizons=(0, 16), prompts=prompts, new_tokens=NEW, progress=False)
  return model, prompts, res


def test_on_demand_reads_every_routed_expert_of_every_decode_step(tiny):
  model, prompts, res = tiny
  mib = []
  for prompt in prompts:  # nothing is kept between layers: each step reads its distinct routed experts
    _, stats = ProgramEngine(model, strategy="resident").generate(prompt, NEW)
    n = sum(len(experts) for step in stats.routing[1:] for experts in step)
    mib.append(n * model.cfg.expert_bytes / (NEW - 1) / caching_headroom.MIB)
  row = next(r for r in res["rows"] if r["name"] == "on_demand")
  assert row["mib_per_token"] == pytest.approx(np.mean(mib)) and row["hit_rate"] == 0.0


def test_the_full_horizon_oracle_is_beladys_minimum_and_the_rows_are_complete(tiny):
  _, _, res = tiny
  rows = {(r["name"], r["recall"], r["horizon"]): r for r in res["rows"]}
  assert set(rows) == {("on_demand", None, None), ("lru", None, None), ("learned", None, 0),
                       *{("noisy_oracle", r, h) for r in (0.5, 1.0) for h in (0, 16)}}
  belady = rows["noisy_oracle", 1.0, 16]["mib_per_token"]
  # MIN reads no more than any other policy on the same routing (recall 1: the plan is the routing)
  assert all(belady <= r["mib_per_token"] + 1e-12 for r in res["rows"])
  assert rows["lru", None, None]["vs_lru"] == 1.0
  assert 0.0 <= rows["learned", None, 0]["plan_recall"] <= 1.0


def test_plan_recall_counts_the_routed_experts_a_plan_named():
  stats = types.SimpleNamespace(routing=[[[0, 1]], [[0, 1]], [[2, 3]]],  # step 0 (the prompt) left out
                                plans=[[], [[1, 5]], [[2, 3, 4]]])
  assert caching_headroom.plan_recall(stats) == 3 / 4
  assert caching_headroom.plan_recall(types.SimpleNamespace(routing=[[[0]], [[1]]], plans=[[], []])) is None


@pytest.mark.slow
def test_the_command_line_writes_its_table_plot_and_results(tmp_path, capsys):
  cfg = dataclasses.replace(config.tiny(), n_layers=2, kernel_impl="xla")
  checkpoint.save_model(tmp_path / "model", cfg, model_lib.create(cfg, seed=1))
  out = tmp_path / "headroom"
  assert caching_headroom.main([str(tmp_path), "--recalls", "1.0", "--horizons", "0", "--prompts", "1",
                                "--prompt-length", "2", "--cache-fraction", "0.5", "--new-tokens", "3", "--out",
                                str(out)]) == 0
  assert "| noisy_oracle | 1.00 | 0 |" in capsys.readouterr().out
  assert (out / "bytes_by_recall.png").stat().st_size > 0 and (out / "results.json").exists()


@pytest.mark.parametrize("args, flag", [(["--horizons", "-1"], "--horizons"), (["--recalls", "0"], "--recalls"),
                                        (["--new-tokens", "1"], "--new-tokens")])
def test_bad_arguments_are_refused_with_the_flag_named(args, flag, tmp_path, capsys):
  assert flag in refused(caching_headroom.main, [str(tmp_path)] + args, capsys)


def test_a_missing_run_and_a_cache_too_small_for_the_prompt_are_refused(tmp_path):
  with pytest.raises(SystemExit, match="no such directory"):
    caching_headroom.main([str(tmp_path / "nowhere")])
  cfg = dataclasses.replace(config.tiny(), n_layers=2)  # 16 experts: 0.25 holds 4, a 4-token prompt routes 8
  checkpoint.save_model(tmp_path / "model", cfg, model_lib.create(cfg, seed=1))
  with pytest.raises(SystemExit, match="holds 4 experts, but a layer of a 4-token prompt can route 8"):
    caching_headroom.main([str(tmp_path), "--prompt-length", "4", "--predictor", "none"])
