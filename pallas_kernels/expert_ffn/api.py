"""The one kernel switch: picks the implementation of the grouped expert matmuls."""

from __future__ import annotations

from pallas_kernels.expert_ffn import reference

IMPLS = ("auto", "xla")


def _check_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def grouped_matmul(lhs, rhs, group_sizes, *, activation=None, rhs_index=None, impl="auto",
                   interpret=False):
  """[M, K] x [E, K, N] grouped by `group_sizes` [G] -> [M, N], activation fused (None or "relu")."""
  del interpret
  _check_impl(impl)
  return reference.grouped_matmul(lhs, rhs, group_sizes, activation=activation, rhs_index=rhs_index)


def grouped_glu(lhs, gate, up, group_sizes, *, rhs_index=None, impl="auto", interpret=False):
  """silu(lhs @ gate) * (lhs @ up) per group -> [M, N]."""
  del interpret
  _check_impl(impl)
  return reference.grouped_glu(lhs, gate, up, group_sizes, rhs_index=rhs_index)
