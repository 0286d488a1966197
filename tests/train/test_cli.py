"""The trace and predictor scripts refuse bad arguments before any work, in argparse's one line that
names the flag (exit status 2)."""

import pytest

from tests.cli_errors import refused as _refused
from train import collect_traces, train_predictor


@pytest.mark.parametrize("args, flag", [
    (["--seq-len", "0"], "--seq-len"),
    (["--max-tokens", "lots"], "--max-tokens"),
    (["--batch-rows", "-1"], "--batch-rows"),
    (["--hidden-layers", "0,x"], "--hidden-layers"),
    (["--preset", "huge"], "--preset"),
    (["--run-dir", "missing"], "--run-dir"),
    (["--tokens", "missing.npy"], "--tokens"),
    (["--max-tokens", "16", "--seq-len", "32"], "--max-tokens 16"),
])
def test_collect_traces_refuses_bad_arguments(args, flag, tmp_path, capsys):
  out = tmp_path / "traces"
  assert flag in _refused(collect_traces.main, ["--out", str(out), *args], capsys)
  assert not out.exists()


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "traces"
  assert collect_traces.main(["--out", str(out), "--max-tokens", "64", "--seq-len", "32"]) == 0
  return out


def test_train_predictor_refuses_missing_traces(tmp_path, capsys):
  err = _refused(train_predictor.main, ["--traces", str(tmp_path), "--family", "context",
                                        "--out", str(tmp_path / "p")], capsys)
  assert "--traces" in err and "manifest.json" in err


@pytest.mark.parametrize("args, flag", [
    (["--steps", "0"], "--steps"),
    (["--batch-tokens", "many"], "--batch-tokens"),
    (["--lr", "-1"], "--lr"),
    (["--warmup", "-1"], "--warmup"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--hparams", "{bad"], "--hparams"),
    (["--hparams", "[1]"], "--hparams"),
    (["--train-tokens", "0"], "--train-tokens"),
    (["--lead", "-1"], "--lead"),
    (["--family", "cross_layer", "--lead", "2"], "--lead"),
])
def test_train_predictor_refuses_bad_arguments(args, flag, traces, tmp_path, capsys):
  out = tmp_path / "pred"
  argv = ["--traces", str(traces), "--family", "context", "--out", str(out), *args]
  assert flag in _refused(train_predictor.main, argv, capsys)
  assert not out.exists()
