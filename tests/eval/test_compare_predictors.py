"""The predictor comparison refuses bad arguments before any work, naming the flag (exit status 2)."""

import pytest

from eval import compare_predictors


@pytest.mark.parametrize("args, flag", [
    (["--lookaheads", "1,x"], "--lookaheads"),
    (["--steps", "0"], "--steps"),
    (["--families", "magic"], "--families"),
    (["--traces", "missing"], "--traces"),
    (["--predictors", "missing"], "--predictors"),
])
def test_bad_arguments_are_refused(args, flag, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    compare_predictors.main(["--out", str(tmp_path / "out"), *args])
  assert e.value.code == 2
  assert flag in capsys.readouterr().err.strip().splitlines()[-1]
  assert not (tmp_path / "out").exists()
