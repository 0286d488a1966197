"""The MoE layer as pure functions: route -> dispatch -> experts -> combine.

`route` is the one routing truth: training, the resident model, the offload engine and the routing
traces the predictors learn from all call it.

Steps of one MoE FFN over T tokens:
  1. route:    router logits [T, E] -> top-k expert ids [T, k] and combine weights [T, k]
  2. dispatch: sort the T*k (token, expert) copies by expert -> gather order and group sizes [E]
  3. experts:  grouped matmuls over the sorted copies (pallas_kernels, the one kernel switch)
  4. combine:  scatter back and take the weighted sum over each token's k outputs
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels


class Routing(NamedTuple):
  experts: jax.Array  # [T, k] int32 expert ids, best first
  weights: jax.Array  # [T, k] f32 combine weights
  probs: jax.Array  # [T, E] f32 softmax over all experts
  logits: jax.Array  # [T, E] f32 router logits


class Dispatch(NamedTuple):
  order: jax.Array  # [T*k] flat (token*k + slot) indices sorted by expert
  token_of_row: jax.Array  # [T*k] source token of each sorted row
  group_sizes: jax.Array  # [E] int32 rows per expert


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> Routing:
  """Softmax router with top-k selection. [T, E] logits -> Routing.

  Mixtral and Qwen3-MoE renormalise the chosen probabilities (norm_topk_prob=True); OLMoE and
  Qwen2-MoE keep them as they are.
  """
  logits = router_logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts.astype(jnp.int32), weights, probs, logits)


def dispatch(experts: jax.Array, n_experts: int) -> Dispatch:
  """Sort the (token, slot) copies of `experts` [T, k] by expert id (stable)."""
  _, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
  return Dispatch(order, order // k, group_sizes)


def expert_ffn(x_rows: jax.Array, expert_weights: Mapping[str, jax.Array], group_sizes: jax.Array,
               activation: str, *, rhs_index: jax.Array | None = None, impl: str = "auto") -> jax.Array:
  """The routed experts on rows sorted by group. x_rows [R, D] -> [R, D].

  `expert_weights` holds w_up [E, D, F], w_down [E, F, D] and, for swiglu, w_gate [E, D, F].
  `rhs_index` [G] maps group g to its weight slot (the offload engine's device cache).
  """
  dtype = x_rows.dtype
  w = {name: m.astype(dtype) for name, m in expert_weights.items()}
  if activation == "swiglu":
    h = pallas_kernels.grouped_glu(x_rows, w["w_gate"], w["w_up"], group_sizes, rhs_index=rhs_index,
                                   impl=impl)
  elif activation == "relu":
    h = pallas_kernels.grouped_matmul(x_rows, w["w_up"], group_sizes, activation="relu",
                                      rhs_index=rhs_index, impl=impl)
  else:
    raise ValueError(f"unknown activation {activation!r}")
  return pallas_kernels.grouped_matmul(h, w["w_down"], group_sizes, rhs_index=rhs_index, impl=impl)


def combine(y_rows: jax.Array, d: Dispatch, weights: jax.Array,
            partial: jax.Array | None = None) -> jax.Array:
  """Undo the dispatch sort and sum each token's k outputs. y_rows [T*k, D] -> [T, D]. `partial`
  [T, D] f32: the weighted outputs of experts computed elsewhere, added before the sum is rounded."""
  t, k = weights.shape
  y = jnp.zeros_like(y_rows).at[d.order].set(y_rows).reshape(t, k, -1)
  out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights)
  return (out if partial is None else out + partial).astype(y_rows.dtype)


def moe_ffn(x: jax.Array, r: Routing, expert_weights: Mapping[str, jax.Array], activation: str, *,
            impl: str = "auto") -> jax.Array:
  """Dropless MoE FFN of tokens x [T, D] routed by `r` -> [T, D] (inference and exact reference)."""
  n_experts = r.probs.shape[-1]
  d = dispatch(r.experts, n_experts)
  y_rows = expert_ffn(x[d.token_of_row], expert_weights, d.group_sizes, activation, impl=impl)
  return combine(y_rows, d, r.weights)


def moe_ffn_capacity(x: jax.Array, r: Routing, expert_weights: Mapping[str, jax.Array],
                     activation: str, capacity_factor: float) -> jax.Array:
  """Training path: each expert takes at most C = ceil(T*k/E * capacity_factor) rows (the rest are
  dropped, contributing zero) and all experts run as one batched matmul [E, C, D].

  Batched dense matmuls have a fast backward pass on every backend; the dropless path is what
  inference and the offload engine use.
  """
  t, k = r.experts.shape
  n_experts = r.probs.shape[-1]
  capacity = max(1, int(-(-t * k * capacity_factor // n_experts)))
  d = dispatch(r.experts, n_experts)
  starts = jnp.cumsum(d.group_sizes) - d.group_sizes  # [E]
  sorted_expert = r.experts.reshape(-1)[d.order]  # [T*k]
  pos_in_group = jnp.arange(t * k) - starts[sorted_expert]
  keep = pos_in_group < capacity
  slot = jnp.where(keep, sorted_expert * capacity + pos_in_group, n_experts * capacity)  # overflow bin
  x_rows = x[d.token_of_row]
  buf = jnp.zeros((n_experts * capacity + 1, x.shape[-1]), x.dtype).at[slot].set(x_rows)
  xe = buf[:-1].reshape(n_experts, capacity, -1)  # [E, C, D]
  w = {name: m.astype(x.dtype) for name, m in expert_weights.items()}
  if activation == "swiglu":
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, w["w_gate"])) * jnp.einsum("ecd,edf->ecf", xe, w["w_up"])
  else:
    h = jnp.maximum(jnp.einsum("ecd,edf->ecf", xe, w["w_up"]), 0)
  ye = jnp.einsum("ecf,efd->ecd", h, w["w_down"]).reshape(n_experts * capacity, -1)
  ye = jnp.concatenate([ye, jnp.zeros((1, ye.shape[-1]), ye.dtype)], axis=0)
  y_rows = ye[slot] * keep[:, None].astype(ye.dtype)
  return combine(y_rows, d, r.weights)


def load_balancing_loss(r: Routing) -> jax.Array:
  """Switch-Transformer auxiliary loss E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
  n_experts = r.probs.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(r.experts, n_experts, dtype=jnp.float32), axis=(0, 1))
  frac_routed = counts / jnp.sum(counts)
  mean_prob = jnp.mean(r.probs, axis=0)
  return n_experts * jnp.sum(frac_routed * mean_prob)


def router_z_loss(r: Routing) -> jax.Array:
  """ST-MoE router z-loss: mean squared log-partition of the router logits."""
  return jnp.mean(jax.nn.logsumexp(r.logits, axis=-1) ** 2)
