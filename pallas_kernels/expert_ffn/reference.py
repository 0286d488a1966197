"""Pure-jnp reference for the grouped expert matmuls (ragged_dot semantics, f32 accumulation).

This is also the "xla" implementation: correct everywhere, but on GPU XLA lowers ragged_dot to a
dense group-masked dot that reads every expert's weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _select(rhs, rhs_index):
  return rhs if rhs_index is None else jnp.take(rhs, rhs_index, axis=0)


def _ragged(lhs, rhs, group_sizes, rhs_index):
  # f32 operands get full f32 products (no TF32), so "xla" matches an f32 reference on any backend.
  precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
  return lax.ragged_dot(lhs, _select(rhs, rhs_index), group_sizes.astype(jnp.int32),
                        precision=precision, preferred_element_type=jnp.float32)


def grouped_ffn(lhs, weights, group_sizes, rhs_index=None, *, epilogue="none"):
  """lhs [M, K], weights: (w,) or (gate, up), each [E, K, N] -> [M, N] in lhs.dtype."""
  accs = [_ragged(lhs, w, group_sizes, rhs_index) for w in weights]
  if epilogue == "glu":
    out = jax.nn.silu(accs[0]) * accs[1]
  elif epilogue == "relu":
    out = jnp.maximum(accs[0], 0)
  elif epilogue == "none":
    out = accs[0]
  else:
    raise ValueError(f"unknown epilogue {epilogue!r}")
  return out.astype(lhs.dtype)


def grouped_matmul(lhs, rhs, group_sizes, *, activation=None, rhs_index=None):
  """lhs [M, K], rhs [E, K, N], group_sizes [G] -> [M, N]; rows sorted by group."""
  return grouped_ffn(lhs, (rhs,), group_sizes, rhs_index, epilogue=activation or "none")


def grouped_glu(lhs, gate, up, group_sizes, *, rhs_index=None):
  """silu(lhs @ gate) * (lhs @ up) per group; lhs [M, K], gate/up [E, K, N] -> [M, N]."""
  return grouped_ffn(lhs, (gate, up), group_sizes, rhs_index, epilogue="glu")
