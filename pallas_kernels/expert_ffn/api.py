"""The one kernel switch: picks the implementation of the grouped expert matmuls.

"auto" takes the fastest implementation the current backend has (CPU: "xla"; Hopper GPU: "mosaic";
other GPUs: "pallas"). A kernel that cannot take a shape or dtype raises NotImplementedError while
tracing, and the next implementation in the chain mosaic -> pallas -> xla runs instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.expert_ffn import hopper, portable, reference

IMPLS = ("auto", "xla", "pallas", "mosaic")
_FALLBACK = {"mosaic": "pallas", "pallas": "xla"}
ACTIVATIONS = (None, "relu")


def _first_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "gpu":
    return "xla"  # interpret-mode kernels are for correctness only; keep CPU models fast
  return "mosaic" if hopper.is_supported_device() else "pallas"


def _validate(lhs, weights, group_sizes, rhs_index):
  if lhs.ndim != 2 or any(w.ndim != 3 for w in weights):
    raise ValueError(f"need lhs [M, K] and weights [E, K, N], got {lhs.shape}, "
                     f"{[w.shape for w in weights]}")
  if any(w.shape != weights[0].shape for w in weights):
    raise ValueError(f"gate and up must have one shape, got {[w.shape for w in weights]}")
  if weights[0].shape[1] != lhs.shape[1]:
    raise ValueError(f"K mismatch: lhs {lhs.shape} vs weights {weights[0].shape}")
  if group_sizes.ndim != 1:
    raise ValueError(f"group_sizes must be [G], got {group_sizes.shape}")
  num_groups = group_sizes.shape[0]
  if rhs_index is None:
    if num_groups != weights[0].shape[0]:
      raise ValueError(f"without rhs_index, G ({num_groups}) must equal E ({weights[0].shape[0]})")
  elif rhs_index.shape != (num_groups,):
    raise ValueError(f"rhs_index must be [G] = [{num_groups}], got {rhs_index.shape}")


def _run(lhs, weights, group_sizes, rhs_index, epilogue, impl, interpret):
  weights = tuple(w.astype(lhs.dtype) if w.dtype != lhs.dtype else w for w in weights)
  _validate(lhs, weights, group_sizes, rhs_index)
  group_sizes = group_sizes.astype(jnp.int32)
  rhs_index = None if rhs_index is None else rhs_index.astype(jnp.int32)
  choice = _first_impl(impl)
  while True:
    try:
      if choice == "mosaic":
        if interpret or not hopper.is_supported_device():
          raise NotImplementedError("Mosaic GPU kernels need a Hopper GPU (no interpret mode)")
        return hopper.grouped_ffn(lhs, weights, group_sizes, rhs_index, epilogue=epilogue)
      if choice == "pallas":
        return portable.grouped_ffn(lhs, weights, group_sizes, rhs_index, epilogue=epilogue,
                                    interpret=interpret or jax.default_backend() == "cpu")
      return reference.grouped_ffn(lhs, weights, group_sizes, rhs_index, epilogue=epilogue)
    except NotImplementedError:
      if choice not in _FALLBACK:
        raise
      choice = _FALLBACK[choice]


def grouped_matmul(lhs, rhs, group_sizes, *, activation=None, rhs_index=None, impl="auto",
                   interpret=False):
  """[M, K] x [E, K, N] grouped by `group_sizes` [G] -> [M, N], activation fused (None or "relu").

  Semantics of `jax.lax.ragged_dot`: rows are sorted by group and group g covers the next
  group_sizes[g] rows; rows past sum(group_sizes) are unspecified. Group g uses rhs[g], or
  rhs[rhs_index[g]] when `rhs_index` [G] is given (then G may differ from E). Accumulates in f32; the
  output and the weights (cast if needed) take lhs.dtype.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  return _run(lhs, (rhs,), group_sizes, rhs_index, activation or "none", impl, interpret)


def grouped_glu(lhs, gate, up, group_sizes, *, rhs_index=None, impl="auto", interpret=False):
  """silu(lhs @ gate) * (lhs @ up) per group -> [M, N]; same conventions as `grouped_matmul`."""
  return _run(lhs, (gate, up), group_sizes, rhs_index, "glu", impl, interpret)
