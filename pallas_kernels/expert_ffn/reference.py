"""Pure-jnp reference for the grouped expert matmuls (ragged_dot semantics, f32 accumulation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _select(rhs, rhs_index):
  return rhs if rhs_index is None else jnp.take(rhs, rhs_index, axis=0)


def grouped_matmul(lhs, rhs, group_sizes, *, activation=None, rhs_index=None):
  """lhs [M, K], rhs [E, K, N], group_sizes [G] -> [M, N]; rows sorted by group."""
  out = jax.lax.ragged_dot(lhs, _select(rhs, rhs_index), group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32)
  if activation == "relu":
    out = jnp.maximum(out, 0)
  return out.astype(lhs.dtype)


def grouped_glu(lhs, gate, up, group_sizes, *, rhs_index=None):
  """silu(lhs @ gate) * (lhs @ up) per group; lhs [M, K], gate/up [E, K, N] -> [M, N]."""
  gs = group_sizes.astype(jnp.int32)
  g = jax.lax.ragged_dot(lhs, _select(gate, rhs_index), gs, preferred_element_type=jnp.float32)
  u = jax.lax.ragged_dot(lhs, _select(up, rhs_index), gs, preferred_element_type=jnp.float32)
  return (jax.nn.silu(g) * u).astype(lhs.dtype)
