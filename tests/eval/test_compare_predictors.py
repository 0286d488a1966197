"""The predictor comparison refuses bad arguments before any work, naming the flag (exit status 2)."""

import pytest

from eval import compare_predictors
from tests.cli_errors import refused


@pytest.mark.parametrize("args, flag", [
    (["--lookaheads", "1,x"], "--lookaheads"),
    (["--steps", "0"], "--steps"),
    (["--families", "magic"], "--families"),
    (["--traces", "missing"], "--traces"),
    (["--predictors", "missing"], "--predictors"),
])
def test_bad_arguments_are_refused(args, flag, tmp_path, capsys):
  assert flag in refused(compare_predictors.main, ["--out", str(tmp_path / "out"), *args], capsys)
  assert not (tmp_path / "out").exists()
