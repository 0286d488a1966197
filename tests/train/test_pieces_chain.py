"""The README's pieces chain after the main job: its output directory (the model in model/) is
accepted where a model run directory is, so traces, a predictor and the comparison follow from it."""

import json

import numpy as np

from eval import cli, compare_predictors, pipeline
from jaxmoe import checkpoint, config, model as model_lib
from train import collect_traces, train_predictor


def test_traces_predictor_and_comparison_from_a_main_job_directory(tmp_path, capsys):
  out = tmp_path / "runs" / "tiny"  # laid out as eval.run leaves it: the trained model in out/model
  cfg = config.tiny()
  checkpoint.save_run(out / cli.MODEL_SUBDIR, cfg, model_lib.create(cfg, seed=0))
  (out / cli.MODEL_SUBDIR / "data").mkdir()
  np.save(out / cli.MODEL_SUBDIR / "data" / "train_tokens.npy",
          np.random.default_rng(0).integers(0, cfg.vocab_size, 512))
  assert cli.model_run_dir(out) == out / cli.MODEL_SUBDIR
  assert cli.model_run_dir(out / cli.MODEL_SUBDIR) == out / cli.MODEL_SUBDIR
  assert pipeline.planned_config("tiny", str(out)) == cfg  # eval.run and trace_volume's --model too

  traces = out / "traces_more"
  assert collect_traces.main(["--run-dir", str(out), "--out", str(traces), "--max-tokens", "256",
                              "--seq-len", "32"]) == 0
  source = json.loads((traces / "manifest.json").read_text())["source"]
  assert source["corpus"].startswith("run:") and source["corpus"].endswith("model:train")  # the run's tokens
  pred = out / "pred" / "token_mlp"
  assert train_predictor.main(["--traces", str(traces), "--family", "token_mlp", "--out", str(pred),
                               "--loss", "bce", "--steps", "3", "--eval-every", "3", "--batch-tokens", "64",
                               "--no-progress"]) == 0
  assert compare_predictors.main(["--traces", str(traces), "--predictors", str(pred), "--run-dir", str(out),
                                  "--out", str(out / "compare")]) == 0
  table = (out / "compare" / "predictors.md").read_text()
  assert "| token_mlp |" in table and "% of decode step" in table  # the run's model was timed too
