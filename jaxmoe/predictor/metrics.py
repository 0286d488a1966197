"""Accuracy and cost of routing predictors: the one place every family and baseline is measured.

Accuracy compares scores [N, L, E] (any monotone score: logits or probabilities) with the routed
experts [N, L, k]. With m the prefetch budget (experts fetched per token and layer):
  recall@m     = |top-m(scores) & routed| / k     (fraction of the needed experts that were fetched)
  precision@m  = |top-m(scores) & routed| / m     (fraction of the fetched experts that were needed)
  exact_set@m  = 1 if every routed expert is in the top-m (at m = k: the predicted set is the routed set)
Ties are broken towards the lower expert id. Rows marked invalid (NaN scores) are left out.
Cost: parameter count, FLOPs per call from XLA's cost analysis, and device-synchronised wall time.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def top_m(scores: np.ndarray, m: int) -> np.ndarray:
  """[..., E] scores -> [..., m] expert ids, best first (stable: ties go to the lower id)."""
  scores = np.asarray(scores, np.float32)
  if not 1 <= m <= scores.shape[-1]:
    raise ValueError(f"budget m must be in [1, {scores.shape[-1]}], got {m}")
  return np.argsort(-scores, axis=-1, kind="stable")[..., :m]


def hits_at(scores: np.ndarray, experts: np.ndarray, m: int) -> np.ndarray:
  """How many of each token's routed experts are in its top-m. scores [N, L, E], experts [N, L, k] -> [N, L]."""
  scores, experts = np.asarray(scores), np.asarray(experts)
  if scores.shape[:-1] != experts.shape[:-1]:
    raise ValueError(f"scores {scores.shape} and experts {experts.shape} disagree on [N, L]")
  chosen = top_m(scores, m)  # [N, L, m]
  return np.sum(experts[..., :, None] == chosen[..., None, :], axis=(-1, -2))


def routing_metrics(scores: np.ndarray, experts: np.ndarray, budgets: Sequence[int]) -> dict[str, Any]:
  """Per-layer and layer-averaged recall, precision and exact-set rate at each budget m.

  scores [N, L, E], experts [N, L, k]. Returns {"n_tokens", "budgets", "per_budget": {str(m): {"recall":
  [L], "precision": [L], "exact_set": [L], "recall_avg", "precision_avg", "exact_set_avg"}}}. A layer
  whose scores are NaN for some token (no prediction there) leaves those tokens out of that layer; a
  layer with no prediction at all reports None and is left out of the averages.
  """
  scores = np.asarray(scores, np.float32)
  experts = np.asarray(experts)
  if scores.ndim != 3 or experts.ndim != 3:
    raise ValueError(f"expected scores [N, L, E] and experts [N, L, k], got {scores.shape}, {experts.shape}")
  k = experts.shape[-1]
  valid = ~np.any(np.isnan(scores), axis=-1)  # [N, L]
  has = valid.sum(0) > 0  # [L] layers with at least one prediction
  count = np.maximum(valid.sum(0), 1)  # [L]
  if not has.any():
    raise ValueError("no valid (non-NaN) scores to evaluate")
  out: dict[str, Any] = {"n_tokens": int(scores.shape[0]), "budgets": [int(m) for m in budgets],
                         "per_budget": {}}
  for m in budgets:
    h = hits_at(np.nan_to_num(scores, nan=0.0), experts, int(m)) * valid  # [N, L]
    recall = h.sum(0) / (k * count)
    precision = h.sum(0) / (int(m) * count)
    exact = ((h == k) & valid).sum(0) / count
    per_layer = lambda a: [float(v) if ok else None for v, ok in zip(a, has)]
    out["per_budget"][str(int(m))] = {
        "recall": per_layer(recall), "precision": per_layer(precision), "exact_set": per_layer(exact),
        "recall_avg": float(recall[has].mean()), "precision_avg": float(precision[has].mean()),
        "exact_set_avg": float(exact[has].mean())}
  return out


def mean_recall(scores: np.ndarray, experts: np.ndarray, m: int) -> float:
  """Layer-averaged recall@m (the number early stopping and model selection watch)."""
  return routing_metrics(scores, experts, [m])["per_budget"][str(int(m))]["recall_avg"]


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays (e.g. `nnx.state(model, nnx.Param)`)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def flops_per_call(fn: Callable, *args) -> float:
  """FLOPs of one call of `jax.jit(fn)(*args)` from XLA's cost analysis (NaN where unavailable)."""
  try:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  except Exception:  # some backends do not implement cost analysis
    return float("nan")
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def time_us(fn: Callable, *args, warmup: int = 3, reps: int = 30) -> float:
  """Median wall time of `fn(*args)` in microseconds, waiting for its device results each time.

  Works for jitted functions and for host code that returns numpy (then the wait is a no-op).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e6)
