"""Training-free references, scored by the same metrics as the learned families.

popularity   each layer's expert frequencies in the training traces, the same for every token.
next_gate    speculative gating (Mixtral-offloading, HOBBIT, AdapMoE): the hidden state entering layer s,
             normed with layer j's ffn_norm, through layer j's router, predicts layer j = s + lookahead.
             Where j < lookahead the earliest state of the step (the embedding, entering layer 0) is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def popularity(experts: np.ndarray, n_experts: int) -> np.ndarray:
  """experts [..., L, k] routed ids -> [L, E] fraction of tokens routed to each expert."""
  experts = np.asarray(experts)
  flat = experts.reshape(-1, experts.shape[-2], experts.shape[-1])  # [N, L, k]
  counts = np.stack([np.bincount(flat[:, l].reshape(-1), minlength=n_experts) for l in range(flat.shape[1])])
  return (counts / max(len(flat), 1)).astype(np.float32)


def source_for(target: int, lookahead: int, sources) -> int | None:
  """The latest available source layer at least `lookahead` before `target` (or layer 0's state when
  the target is among the first layers); None if no available source precedes it."""
  want = max(target - lookahead, 0)
  earlier = [s for s in sources if s <= want]
  return max(earlier) if earlier else None


def gate_probs(hidden: jax.Array, ffn_norm: jax.Array, router: jax.Array, eps: float) -> jax.Array:
  """hidden [N, D], ffn_norm [D], router [D, E] -> softmax router probabilities [N, E]."""
  x = hidden.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * ffn_norm
  return jax.nn.softmax(x @ router, axis=-1)


_gate_probs = jax.jit(gate_probs)


def next_gate(hidden: np.ndarray, hidden_layers, gates: dict[str, np.ndarray], lookahead: int) -> np.ndarray:
  """hidden [N, H, D] entering the layers `hidden_layers` -> scores [N, L, E] (NaN where no source)."""
  router, norm, eps = gates["router"], gates["ffn_norm"], float(gates["norm_eps"])
  n_layers, _, n_experts = router.shape
  out = np.full((hidden.shape[0], n_layers, n_experts), np.nan, np.float32)
  for j in range(n_layers):
    s = source_for(j, lookahead, hidden_layers)
    if s is None:
      continue
    h = np.asarray(hidden[:, list(hidden_layers).index(s)], np.float32)
    out[:, j] = np.asarray(_gate_probs(h, norm[j], router[j], eps))
  return out
