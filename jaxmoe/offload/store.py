"""ExpertStore: every routed expert of every layer in pinned host memory, one flat buffer per expert.

One buffer packs all of an expert's matrices (in `MoEConfig.expert_matrices` order), so bringing an
expert to the device is one host-to-device copy; `ExpertLayout` says where each matrix lives in it.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxmoe.config import MoEConfig


class MatrixSlice(NamedTuple):
  name: str  # "w_gate" | "w_up" | "w_down"
  offset: int  # first element in the flat expert buffer
  shape: tuple[int, ...]  # [D, F] or [F, D]


def expert_layout(cfg: MoEConfig) -> tuple[MatrixSlice, ...]:
  """Where each matrix of one expert lives in its flat buffer (hashable: a static jit argument)."""
  shapes = {"w_gate": (cfg.d_model, cfg.d_ff), "w_up": (cfg.d_model, cfg.d_ff),
            "w_down": (cfg.d_ff, cfg.d_model)}
  out, offset = [], 0
  for name in cfg.expert_matrices:
    out.append(MatrixSlice(name, offset, shapes[name]))
    offset += math.prod(shapes[name])
  return tuple(out)


def unpack(layout: tuple[MatrixSlice, ...], buffer: jax.Array) -> dict[str, jax.Array]:
  """Flat expert buffer [P] -> {name: matrix} (traceable)."""
  return {m.name: buffer[m.offset:m.offset + math.prod(m.shape)].reshape(m.shape) for m in layout}


def host_sharding(device: jax.Device | None = None) -> SingleDeviceSharding:
  return SingleDeviceSharding(device or jax.devices()[0], memory_kind="pinned_host")


def device_sharding(device: jax.Device | None = None) -> SingleDeviceSharding:
  return SingleDeviceSharding(device or jax.devices()[0], memory_kind="device")


class ExpertStore:
  """Experts of a model in pinned host memory: `buffer(layer, expert)` -> flat [P] array."""

  def __init__(self, cfg: MoEConfig, buffers: list[list[jax.Array]]):
    """buffers [n_layers][n_experts], each a [P] array in pinned_host memory of cfg.param_dtype."""
    layout = expert_layout(cfg)
    size = layout[-1].offset + math.prod(layout[-1].shape)
    if len(buffers) != cfg.n_layers or any(len(row) != cfg.n_experts for row in buffers):
      raise ValueError(f"need {cfg.n_layers} x {cfg.n_experts} expert buffers")
    for row in buffers:
      for b in row:
        if b.shape != (size,) or b.dtype != cfg.weight_dtype:
          raise ValueError(f"expert buffer must be [{size}] {cfg.weight_dtype}, got {b.shape} {b.dtype}")
    self.cfg = cfg
    self.layout = layout
    self.device = next(iter(buffers[0][0].devices()))
    self._buffers = buffers

  @property
  def expert_bytes(self) -> int:
    """Bytes of one packed expert (one host-to-device copy)."""
    return self.cfg.expert_bytes

  @property
  def nbytes(self) -> int:
    """Bytes held in host memory by the whole store."""
    return self.cfg.n_layers * self.cfg.n_experts * self.expert_bytes

  def buffer(self, layer: int, expert: int) -> jax.Array:
    """The packed expert [P] in pinned_host memory."""
    return self._buffers[layer][expert]

  @classmethod
  def from_layers(cls, cfg: MoEConfig,
                  layer_weights: Iterable[Mapping[str, jax.Array | np.ndarray]],
                  device: jax.Device | None = None) -> "ExpertStore":
    """From per-layer {name: [E, ...]} stacks (device arrays or numpy), one expert at a time, so the
    device never holds more than one packed expert beyond what the caller already holds."""
    sharding = host_sharding(device)
    dtype = cfg.weight_dtype
    buffers = []
    for weights in layer_weights:
      row = []
      for e in range(cfg.n_experts):
        parts = [weights[name][e] for name in cfg.expert_matrices]
        if all(isinstance(p, np.ndarray) for p in parts):
          flat = np.concatenate([p.astype(dtype).reshape(-1) for p in parts])
        else:
          flat = jnp.concatenate([jnp.ravel(p).astype(dtype) for p in parts])
        row.append(jax.device_put(flat, sharding))
      buffers.append(row)
    jax.block_until_ready(buffers)
    return cls(cfg, buffers)

  @classmethod
  def from_model(cls, model, device: jax.Device | None = None) -> "ExpertStore":
    """From a `MoELM` whose expert weights are concrete arrays (on any memory)."""
    return cls.from_layers(model.cfg, (layer.moe.expert_weights() for layer in model.layers), device)


def measure_h2d_bandwidth(store: "ExpertStore", n: int = 8, repeats: int = 3) -> float:
  """Bytes/s of back-to-back pinned_host -> device copies of whole experts (best of `repeats`)."""
  cfg = store.cfg
  keys = [(i // cfg.n_experts % cfg.n_layers, i % cfg.n_experts) for i in range(n)]
  sharding = device_sharding(store.device)
  best = math.inf
  for _ in range(repeats + 1):  # the first round warms up
    start = time.perf_counter()
    jax.block_until_ready([jax.device_put(store.buffer(layer, e), sharding) for layer, e in keys])
    best = min(best, time.perf_counter() - start)
  return n * store.expert_bytes / best
