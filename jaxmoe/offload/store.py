"""ExpertStore: every routed expert of every layer in pinned host memory, one flat buffer per expert.

One buffer packs all of an expert's matrices (in `MoEConfig.expert_matrices` order), so bringing an
expert to the device is one host-to-device copy; `ExpertLayout` says where each matrix lives in it.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Mapping, NamedTuple

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxmoe.config import MoEConfig
from jaxmoe.offload import hostview


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
  """Experts of a model in pinned host memory, one [E, P] allocation per layer: `buffer(layer, expert)`
  -> the flat [P] expert to copy, `host_view(layer)` -> the layer as device-addressable [E, P] memory
  that compiled code reads directly (`hostview`)."""

  def __init__(self, cfg: MoEConfig, buffers: list[list[jax.Array]],
               layers: list[jax.Array] | None = None):
    """buffers [n_layers][n_experts], each a [P] pinned_host array of cfg.weight_dtype; `layers`: the
    [E, P] pinned allocations they are views of, when they are (then `host_view` works)."""
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
    self._layers = layers
    self._views: dict[int, jax.Array] = {}

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

  def pinned(self, layer: int) -> jax.Array:
    """The layer's experts [E, P]: the one pinned allocation they live in."""
    if self._layers is None:
      raise ValueError("this store keeps its experts in separate buffers; build it with from_layers")
    return self._layers[layer]

  def host_view(self, layer: int) -> jax.Array:
    """The layer's experts [E, P] as device-addressable memory over the pinned allocation (no copy)."""
    if layer not in self._views:
      arr = self.pinned(layer)
      self._views[layer] = hostview.device_view(arr, arr.shape, arr.dtype)
    return self._views[layer]

  @classmethod
  def from_layers(cls, cfg: MoEConfig,
                  layer_weights: Iterable[Mapping[str, jax.Array | np.ndarray]],
                  device: jax.Device | None = None) -> "ExpertStore":
    """From per-layer {name: [E, ...]} stacks (device arrays or numpy), one expert at a time, so the
    device never holds more than one packed expert beyond what the caller already holds."""
    sharding = host_sharding(device)
    dtype = cfg.weight_dtype
    layers = []
    for weights in layer_weights:
      packed = np.stack([np.concatenate([np.asarray(weights[name][e]).astype(dtype).reshape(-1)
                                         for name in cfg.expert_matrices])
                         for e in range(cfg.n_experts)])  # [E, P] on the host, one layer at a time
      layers.append(jax.device_put(packed, sharding))
    jax.block_until_ready(layers)
    return cls(cfg, [_expert_buffers(arr) for arr in layers], layers)

  @classmethod
  def from_model(cls, model, device: jax.Device | None = None) -> "ExpertStore":
    """From a `MoELM` whose expert weights are concrete arrays (on any memory)."""
    return cls.from_layers(model.cfg, (layer.moe.expert_weights() for layer in model.layers), device)


def _expert_buffers(layer: jax.Array) -> list[jax.Array]:
  """The experts of a pinned [E, P] layer as [P] pinned arrays: views of it on a GPU (no second copy
  in host memory); elsewhere copies (the CPU backend has no partial views; tests only)."""
  n_experts, size = layer.shape
  row_bytes = size * layer.dtype.itemsize
  if next(iter(layer.devices())).platform == "gpu" and row_bytes % 64 == 0:
    try:
      return [hostview.device_view(layer, (size,), layer.dtype, e * row_bytes, memory_kind="pinned_host")
              for e in range(n_experts)]
    except (ValueError, RuntimeError, TypeError, NotImplementedError):
      pass  # this jax cannot alias pinned memory: fall back to copies
  host = np.asarray(layer)
  return [jax.device_put(host[e], layer.sharding) for e in range(n_experts)]


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
