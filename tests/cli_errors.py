"""Shared by the command-line tests: a call that argparse must refuse."""

import pytest


def refused(main, argv, capsys) -> str:
  """Run main(argv), which must exit with argparse's status 2; -> the last line it wrote to stderr."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err.strip().splitlines()[-1]
