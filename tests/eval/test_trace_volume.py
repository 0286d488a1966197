"""The trace-volume learning curve on the tiny preset: a model trained as the main job does, every size
and family trained, the files written, and bad input refused before any work."""

import json

import pytest

from eval import trace_volume
from tests.cli_errors import refused


@pytest.mark.slow
def test_learning_curve_tiny(tmp_path, corpus):
  out = tmp_path / "tv"
  args = ["--preset", "tiny", "--data", str(corpus), "--train-minutes", "0.05", "--out", str(out),
          "--train-tokens", "256,all", "--families", "token_mlp", "--steps", "12", "--no-progress"]
  assert trace_volume.main(args) == 0
  result = json.loads((out / "trace_volume" / "trace_volume.json").read_text())
  runs = result["runs"]
  assert [r["family"] for r in runs] == ["token_mlp", "token_mlp"]
  traced = result["meta"]["traced_tokens"]
  seq = result["meta"]["seq_len"]
  assert runs[0]["train_tokens"] == 256  # 4 whole rows of 64 tokens
  assert 256 < runs[1]["train_tokens"] < traced  # all training rows, the held-out ones excluded
  assert runs[1]["train_tokens"] % seq == 0
  for r in runs:
    assert 0.0 <= r["recall_k"] <= r["recall_2k"] <= 1.0
  assert (out / "trace_volume" / "trace_volume.png").stat().st_size > 0
  assert "| token_mlp | 256 |" in (out / "trace_volume" / "trace_volume.md").read_text()


@pytest.mark.parametrize("args, flag", [
    (["--train-tokens", "100,lots"], "--train-tokens"),
    (["--families", "cross_layer"], "cross_layer"),
    (["--steps", "0"], "--steps"),
    (["--model", "missing"], "--model"),
])
def test_bad_arguments_are_refused(args, flag, tmp_path, capsys):
  assert flag in refused(trace_volume.main, ["--preset", "tiny", "--out", str(tmp_path), *args], capsys)
  assert not any(tmp_path.iterdir())  # refused before anything was written
