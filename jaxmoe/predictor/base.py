"""The hook between routing predictors and the offload engine, and the simplest predictor behind it.

The engine's `learned` strategy calls `RoutingPredictor.scores` once per step, before any layer of the
step runs, and turns the probabilities into a prefetch plan (1 - prod(1 - p) per layer and budget m).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class RoutingPredictor(Protocol):
  """Anything that guesses, from the tokens alone, which experts each new token will be routed to.

  An optional `lead` attribute (absent: 0) says which token a position's scores are for: with lead j
  the scores of the last n_new tokens of the history are the routing of the tokens j positions after
  them (an engine that plans steps whose tokens it has not read yet needs j > 0)."""

  n_layers: int
  n_experts: int

  def scores(self, history: np.ndarray, n_new: int) -> np.ndarray:
    """history [B, S] int token ids up to and including the step's new tokens (the last n_new of S);
    returns [B, n_new, n_layers, n_experts] probabilities in [0, 1] that each new token routes to each
    expert in each layer (before any layer of the step has run)."""
    ...


def check_history(history, n_new: int) -> np.ndarray:
  """Validate the arguments of `scores`; returns history as a [B, S] int32 array."""
  history = np.asarray(history)
  if history.ndim != 2 or history.shape[1] == 0:
    raise ValueError(f"history must be [batch, length>0] token ids, got shape {history.shape}")
  if not np.issubdtype(history.dtype, np.integer):
    raise ValueError(f"history must hold integer token ids, got {history.dtype}")
  if not 1 <= n_new <= history.shape[1]:
    raise ValueError(f"n_new must be in [1, {history.shape[1]}] (the history's length), got {n_new}")
  return history.astype(np.int32)


class PopularityPredictor:
  """Training-free reference: every token gets each layer's expert frequencies from the traces.

  freq [L, E] is the fraction of tokens routed to each expert (each row sums to top_k).
  """

  def __init__(self, freq: np.ndarray):
    freq = np.asarray(freq, np.float32)
    if freq.ndim != 2:
      raise ValueError(f"freq must be [n_layers, n_experts], got shape {freq.shape}")
    self.freq = np.clip(freq, 0.0, 1.0)
    self.n_layers, self.n_experts = freq.shape

  def scores(self, history: np.ndarray, n_new: int) -> np.ndarray:
    history = check_history(history, n_new)
    return np.broadcast_to(self.freq, (history.shape[0], n_new) + self.freq.shape).copy()
