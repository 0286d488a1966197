"""Command-line helpers shared by the project's scripts: argparse types whose errors name the flag and
the bad value (argparse prints them as one line, exit status 2), and where a main job keeps its model."""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL_SUBDIR = "model"  # where `eval.run` trains (or finds) its model inside its output directory


def int_at_least(low: int):
  """An argparse type: an integer >= low (argparse names the flag in its error)."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value

  return parse


positive_int = int_at_least(1)


def positive_int_list(text: str) -> tuple[int, ...]:
  """An argparse type: comma-separated positive integers ("16,128")."""
  parts = [p.strip() for p in text.split(",") if p.strip()]
  if not parts:
    raise argparse.ArgumentTypeError("give at least one positive integer")
  return tuple(positive_int(p) for p in parts)


def _number(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  return value


def positive_float(text: str) -> float:
  """An argparse type: a number > 0."""
  value = _number(text)
  if not value > 0:  # written so that NaN fails too
    raise argparse.ArgumentTypeError(f"must be positive, got {value}")
  return value


def fraction(text: str) -> float:
  """An argparse type: a number in (0, 1]."""
  value = _number(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
  return value


def fraction_list(text: str) -> tuple[float, ...]:
  """An argparse type: comma-separated numbers in (0, 1] ("0.1,0.25")."""
  parts = [p.strip() for p in text.split(",") if p.strip()]
  if not parts:
    raise argparse.ArgumentTypeError("give at least one number in (0, 1]")
  return tuple(fraction(p) for p in parts)


PLAN_COPIES = {"on": True, "off": False, "auto": "auto"}  # words -> ProgramEngine's plan_copies
ON_OFF = {"on": True, "off": False}


def word(values: dict):
  """An argparse type: one of `values`' words -> its value."""
  def parse(text: str):
    if text.strip() not in values:
      raise argparse.ArgumentTypeError(f"give one of {', '.join(values)}; got {text!r}")
    return values[text.strip()]
  return parse


def word_list(values: dict):
  """An argparse type: comma-separated words of `values` ("on,off") -> their distinct values, in order."""
  one = word(values)

  def parse(text: str) -> tuple:
    words = [w for w in text.split(",") if w.strip()]
    if not words:
      raise argparse.ArgumentTypeError(f"give one of {', '.join(values)}, or a comma-separated list of them")
    return tuple(dict.fromkeys(one(w) for w in words))
  return parse


def model_run_dir(path: str | Path) -> Path:
  """The model run directory named by `path`: a main job's output directory (its model/ inside) or a
  model run directory itself, so the pieces chain after `eval.run` as they do after `train.train_model`."""
  path = Path(path)
  inner = path / MODEL_SUBDIR
  return inner if inner.is_dir() and not (path / "config.json").exists() else path
