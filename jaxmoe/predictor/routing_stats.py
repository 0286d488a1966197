"""Routing statistics of traced expert choices (load balance, repetition across layers and tokens, next-gate
recall), to set the model's routing beside figures published for real MoE models.

All statistics take routed experts [N tokens, L layers, k] (distinct ids per token and layer, best first, as
`moe.route` gives them). Token order matters for the temporal ones: seq_ids [N] marks which tokens form one
sequence, and a token's "previous tokens" are only those of its own sequence. In a traces directory each
row is one forward pass, so a row is one sequence (a document cut into several rows gives several).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxmoe.predictor import baselines, metrics

Route = Callable[[int, np.ndarray], np.ndarray]


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[..., k] and [..., m] distinct ids -> [...] how many ids the two sets share."""
  return np.sum(a[..., :, None] == b[..., None, :], axis=(-1, -2))


def _check_experts(experts: np.ndarray) -> np.ndarray:
  experts = np.asarray(experts)
  if experts.ndim != 3 or experts.shape[0] == 0:
    raise ValueError(f"expected routed experts [N, L, k] with N > 0, got shape {experts.shape}")
  return experts


def _check_positive(name: str, values: Sequence[int]) -> list[int]:
  values = [int(v) for v in values]
  if not values or min(values) < 1:
    raise ValueError(f"{name} must be positive integers, got {values}")
  return values


def load_balance(experts: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer (entropy [L], max_share [L]) of the expert load.

  A layer's load is p_e = (routed slots of expert e) / (N * k), over all N tokens and their k slots.
  entropy = -sum_e p_e log p_e / log E: 1 when every expert gets the same load, 0 when one expert gets all.
  max_share = max_e p_e: the share of the most loaded expert (1/E when balanced, 1 when collapsed).
  """
  experts = _check_experts(experts)
  if n_experts < 2:
    raise ValueError(f"load entropy needs at least 2 experts, got {n_experts}")
  counts = np.stack([np.bincount(experts[:, l].reshape(-1), minlength=n_experts)
                     for l in range(experts.shape[1])]).astype(np.float64)  # [L, E]
  p = counts / counts.sum(-1, keepdims=True)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return -plogp.sum(-1) / np.log(n_experts), p.max(-1)


def cross_layer_repetition(experts: np.ndarray, distances: Sequence[int] = (1, 2, 3)) -> np.ndarray:
  """[L, len(distances)]: entry [l, i] is the mean over tokens of |S(l + d) & S(l)| / k with d = distances[i],
  S(l) the token's k experts at layer l; NaN where l + d >= L.

  Expert ids of different layers name different weights, so this only says how often the same id recurs
  (meaningful for models whose layers share an expert numbering by construction); it is reported as is.
  """
  experts = _check_experts(experts)
  distances = _check_positive("distances", distances)
  n_layers, k = experts.shape[1], experts.shape[2]
  out = np.full((n_layers, len(distances)), np.nan)
  for i, d in enumerate(distances):
    for l in range(n_layers - d):
      out[l, i] = _overlap(experts[:, l + d], experts[:, l]).mean() / k
  return out


def _sequence_ids(seq_ids: np.ndarray | None, n: int) -> np.ndarray:
  if seq_ids is None:
    return np.zeros(n, np.int64)
  seq_ids = np.asarray(seq_ids).reshape(-1)
  if len(seq_ids) != n:
    raise ValueError(f"seq_ids has {len(seq_ids)} entries for {n} tokens")
  if len(np.unique(seq_ids)) != 1 + np.count_nonzero(np.diff(seq_ids)):  # one run of ids per sequence
    raise ValueError("seq_ids must keep each sequence's tokens contiguous")
  return seq_ids


def reuse_gaps(experts: np.ndarray, seq_ids: np.ndarray | None = None) -> np.ndarray:
  """[N, L, k] int: for each routed slot (token n, layer l, expert e), n - n' where n' < n is the latest
  token of the same sequence that also routed to e at layer l; the largest int64 where there is none."""
  experts = _check_experts(experts)
  n, n_layers, k = experts.shape
  seq = _sequence_ids(seq_ids, n)
  token = np.broadcast_to(np.arange(n)[:, None, None], experts.shape).reshape(-1)
  key = (np.arange(n_layers)[None, :, None] * (int(experts.max()) + 1) + experts).reshape(-1)
  order = np.lexsort((token, key))  # by (layer, expert), then token: each slot follows its previous use
  tok, kk = token[order], key[order]
  same = (kk[1:] == kk[:-1]) & (seq[tok[1:]] == seq[tok[:-1]])
  gaps = np.full(n * n_layers * k, np.iinfo(np.int64).max, np.int64)
  gaps[order[1:][same]] = (tok[1:] - tok[:-1])[same]
  return gaps.reshape(experts.shape)


def temporal_repetition(experts: np.ndarray, seq_ids: np.ndarray | None = None,
                        windows: Sequence[int] = (1, 4, 16)) -> np.ndarray:
  """[L, len(windows)]: entry [l, i] is the mean, over tokens that have a previous token in their sequence,
  of the fraction of the token's k experts at layer l that some of its previous w = windows[i] tokens
  (fewer near the sequence start, never across sequences) also routed to at layer l.

  w = 1 is "the previous token also used it"; a window w is the hit rate of a per-layer cache that holds
  the experts of the last w tokens (an LRU cache of w tokens' worth of experts). seq_ids [N] (None: one
  sequence) must keep each sequence contiguous.
  """
  windows = _check_positive("windows", windows)
  gaps = reuse_gaps(experts, seq_ids)
  seq = _sequence_ids(seq_ids, len(gaps))
  has_previous = np.concatenate([[False], seq[1:] == seq[:-1]])
  if not has_previous.any():
    raise ValueError("no token has a previous token in its sequence")
  gaps = gaps[has_previous]  # [N', L, k]
  return np.stack([(gaps <= w).mean(axis=(0, 2)) for w in windows], axis=-1)


def chance_repetition(top_k: int, n_experts: int, window: int = 1) -> float:
  """The repetition a router choosing k of E experts uniformly at random, independently per token and
  layer, would show: 1 - (1 - k/E)^w (w = 1: k/E, which is also the cross-layer figure at any distance)."""
  if not 1 <= top_k <= n_experts or window < 1:
    raise ValueError(f"need 1 <= k <= E and window >= 1, got k={top_k}, E={n_experts}, window={window}")
  return 1.0 - (1.0 - top_k / n_experts) ** window


def next_gate_recall(hidden: np.ndarray, hidden_layers: Sequence[int], experts: np.ndarray, route: Route,
                     distances: Sequence[int] = (1, 2, 3)) -> np.ndarray:
  """[L, len(distances)]: entry [l, i] is recall@k of applying layer (l + d)'s router to the hidden state
  entering layer l, d = distances[i]: the mean over tokens of |route(l + d, hidden_l) & S(l + d)| / k,
  S(j) the token's k routed experts at layer j. NaN where layer l's hidden state was not kept or l + d >= L.

  hidden [N, H, D] holds the states entering the layers `hidden_layers` (H of them, in that order);
  route(layer, hidden [N, D]) -> [N, k] expert ids (`gate_route` builds it from a traces' gates).
  """
  experts = _check_experts(experts)
  distances = _check_positive("distances", distances)
  hidden_layers = [int(l) for l in hidden_layers]
  if hidden.shape[:2] != (experts.shape[0], len(hidden_layers)):
    raise ValueError(f"hidden {hidden.shape} does not match {experts.shape[0]} tokens x "
                     f"{len(hidden_layers)} hidden layers")
  n_layers, k = experts.shape[1], experts.shape[2]
  out = np.full((n_layers, len(distances)), np.nan)
  for h, l in enumerate(hidden_layers):
    targets = [(i, l + d) for i, d in enumerate(distances) if l + d < n_layers]
    if not targets:
      continue
    x = np.asarray(hidden[:, h], np.float32)
    for i, j in targets:
      out[l, i] = _overlap(np.asarray(route(j, x)), experts[:, j]).mean() / k
  return out


def gate_route(gates: dict[str, np.ndarray], top_k: int) -> Route:
  """route(layer, hidden [N, D]) -> [N, top_k]: the layer's ffn_norm and router (a traces' gates.npz) on
  `hidden`, its top_k experts best first (ties to the lower id), as next-gate speculation computes them."""
  router, norm, eps = gates["router"], gates["ffn_norm"], float(gates["norm_eps"])

  def route(layer: int, hidden: np.ndarray) -> np.ndarray:
    probs = baselines.gate_probs(jnp.asarray(hidden), jnp.asarray(norm[layer]), jnp.asarray(router[layer]), eps)
    return metrics.top_m(np.asarray(probs), top_k)

  return route


def _chance_in_rows(top_k: int, n_experts: int, window: int, seq_len: int) -> float:
  """`chance_repetition` averaged as `temporal_repetition` averages: over positions 1..T-1 of a row, the
  window cut to the tokens before the position."""
  return float(np.mean([chance_repetition(top_k, n_experts, min(window, p)) for p in range(1, seq_len)]))


def _per_layer(a: np.ndarray) -> list[float | None]:
  return [None if np.isnan(v) else float(v) for v in a]


def _by_column(table: np.ndarray, labels: Sequence[int]) -> dict[str, list[float | None]]:
  return {str(v): _per_layer(table[:, i]) for i, v in enumerate(labels)}


def trace_stats(traces, *, distances: Sequence[int] = (1, 2, 3), windows: Sequence[int] = (1, 4, 16),
                max_tokens: int | None = None) -> dict[str, Any]:
  """Every statistic of this module on a `Traces` (its first whole rows holding at most max_tokens tokens,
  at least one row; each row a sequence), as a JSON-ready dict of per-layer lists keyed by distance or
  window. next_gate is None when the traces kept no hidden states. chance holds what a uniformly random
  router would show, its temporal figures cut at the row starts as the measured ones are."""
  n_rows, seq_len = traces.tokens.shape
  if max_tokens is not None:
    n_rows = min(n_rows, max(1, max_tokens // seq_len))
  ex = traces.experts[:n_rows].reshape(-1, traces.n_layers, traces.top_k)
  seq = np.repeat(np.arange(n_rows), seq_len)
  entropy, max_share = load_balance(ex, traces.n_experts)
  next_gate = None
  if traces.hidden is not None:
    hidden = traces.hidden[:n_rows].reshape(len(ex), len(traces.hidden_layers), -1)
    recall = next_gate_recall(hidden, traces.hidden_layers, ex, gate_route(traces.gates, traces.top_k), distances)
    next_gate = _by_column(recall, distances)
  k, e = traces.top_k, traces.n_experts
  return {
      "n_tokens": int(len(ex)), "n_sequences": int(n_rows), "seq_len": int(seq_len),
      "n_layers": traces.n_layers, "n_experts": e, "top_k": k,
      "distances": [int(d) for d in distances], "windows": [int(w) for w in windows],
      "load_entropy": _per_layer(entropy), "max_share": _per_layer(max_share),
      "cross_layer": _by_column(cross_layer_repetition(ex, distances), distances),
      "temporal": _by_column(temporal_repetition(ex, seq, windows), windows),
      "next_gate": next_gate,
      "chance": {"max_share": 1.0 / e, "cross_layer": chance_repetition(k, e),
                 "temporal": {str(w): _chance_in_rows(k, e, int(w), seq_len) for w in windows}},
      "source": traces.manifest.get("source", {})}
