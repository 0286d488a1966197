"""Routed experts computed on the host CPU next to their weights: the `hybrid` strategy's decode misses.

At batch 1 a decode step reads each routed expert once. Computing a missed expert where its weights
live, from host DRAM, moves only the token's hidden row to the host and one output row back (a few KB)
instead of the expert's weights over PCIe (llama.cpp's --n-cpu-moe, KTransformers, Fiddler). It pays
when the host computes an expert faster than the link brings it over: `choose` measures both.

The weights are read in place: every expert matrix is a CPU-backend array over the store's pinned
allocation (`hostview.cpu_view`, no copy), and one function jitted for the CPU computes a layer's
missed experts per call. bf16 weights are upcast to f32 inside that function: numpy has no bf16
matmul, and upcasting whole experts in numpy costs an extra pass over them in Python (measured on a
2-core CPU: 0.2 GB/s, against 3.8 GB/s jitted). A product of two bf16 values is exact in f32, so the
math is the device kernels' (operands in the compute dtype, f32 products and sums); only the order
of the final sum over a token's experts differs (the device's share and the host's are added last).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.offload import hostview
from jaxmoe.offload.strategies import HOST_COMPUTE
from jaxmoe.offload.store import ExpertStore, measure_h2d_bandwidth


def _matmul(x, w):
  """x @ w as the device kernels compute it: operands in x's dtype, products and sums in f32."""
  return jnp.dot(x.astype(jnp.float32), w.astype(x.dtype).astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="activation")
def _weighted_ffn(h, row_weights, mats, activation: str):
  """sum_i row_weights[i][:, None] * expert_i(h): h [N, D], row_weights [n, N] f32, mats [n] of
  {name: matrix} -> [N, D] f32 (each expert's output rounded to h's dtype first, as on the device)."""
  out = jnp.zeros(h.shape, jnp.float32)
  for w, m in zip(row_weights, mats):
    if activation == "swiglu":
      a = jax.nn.silu(_matmul(h, m["w_gate"])) * _matmul(h, m["w_up"])
    else:
      a = jnp.maximum(_matmul(h, m["w_up"]), 0)
    y = _matmul(a.astype(h.dtype), m["w_down"]).astype(h.dtype)
    out = out + w[:, None] * y.astype(jnp.float32)
  return out


_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # Handle.key -> HostExperts
_BY_STORE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ExpertStore -> HostExperts
_KEYS = itertools.count()


class Handle(NamedTuple):
  """A static jit argument naming a live `HostExperts`: a compiled step keeps only this key, never the
  views (and so the pinned memory) behind it."""

  key: int

  def __call__(self, layer: int, h: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """Traced: the host's [N, D] f32 share of layer `layer` for rows h [N, D]: the weighted outputs of
    the routed pairs experts [N, k] >= 0 (-1: computed on the device), weights [N, k]."""
    return jax.pure_callback(functools.partial(_compute, self.key, layer),
                             jax.ShapeDtypeStruct(h.shape, jnp.float32), h, experts, weights)


def _compute(key: int, layer: int, h, experts, weights) -> np.ndarray:
  host = _LIVE.get(key)
  if host is None:
    raise RuntimeError("the host experts of this compiled step were freed with their store")
  return host.compute(layer, h, experts, weights)


class HostExperts:
  """A store's experts as CPU arrays over its pinned memory (no copy), and their FFN on given rows.

  One per store (`of`), so that engines on one store share its compiled steps."""

  def __init__(self, store: ExpertStore):
    cfg = store.cfg
    self.activation, self.dtype, self.d_model = cfg.activation, cfg.compute_dtype, cfg.d_model
    self.expert_bytes = store.expert_bytes
    self.n_layers, self.n_experts = cfg.n_layers, cfg.n_experts
    itemsize = cfg.weight_dtype.itemsize
    row = store.layout[-1].offset + math.prod(store.layout[-1].shape)  # elements of one expert
    self._mats = [[{m.name: hostview.cpu_view(store.pinned(layer), m.shape, cfg.weight_dtype,
                                              (e * row + m.offset) * itemsize)
                    for m in store.layout} for e in range(cfg.n_experts)]
                  for layer in range(cfg.n_layers)]
    self._cpu = jax.devices("cpu")[0]
    self.handle = Handle(next(_KEYS))
    _LIVE[self.handle.key] = self

  @classmethod
  def of(cls, store: ExpertStore) -> "HostExperts":
    """The store's host experts, built on first use."""
    if store not in _BY_STORE:
      _BY_STORE[store] = cls(store)
    return _BY_STORE[store]

  def matrices(self, layer: int, expert: int) -> dict[str, jax.Array]:
    """{name: matrix} of one expert: CPU arrays over the store's pinned memory."""
    return self._mats[layer][expert]

  def compute(self, layer: int, h: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Host: rows h [N, D], experts [N, k] (-1: left out), weights [N, k] -> [N, D] f32, each row's
    weighted sum over its experts >= 0."""
    experts = np.asarray(experts)
    ids = np.unique(experts[experts >= 0])
    if not ids.size:
      return np.zeros(np.shape(h), np.float32)
    # a token routes to an expert at most once: its row weight is that pair's weight, no sum
    row_weights = np.stack([np.where(experts == e, weights, 0).sum(axis=1) for e in ids])
    h, row_weights = jax.device_put((h, row_weights.astype(np.float32)), self._cpu)
    mats = tuple(self._mats[layer][e] for e in ids)
    return np.asarray(_weighted_ffn(h, row_weights, mats, activation=self.activation))

  def bytes_per_s(self, budget_bytes: int = 256 << 20, repeats: int = 3) -> float:
    """Expert weights per second the host FFN gets through at one row per expert (best of `repeats`
    passes over distinct experts, up to `budget_bytes` of them: more than a cache holds)."""
    n = max(1, min(self.n_layers * self.n_experts, budget_bytes // self.expert_bytes))
    keys = [(i // self.n_experts % self.n_layers, i % self.n_experts) for i in range(n)]
    h = np.ones((1, self.d_model), self.dtype)
    weights = np.ones((1, 1), np.float32)
    best = math.inf
    for _ in range(repeats + 1):  # the first pass compiles and warms up
      start = time.perf_counter()
      for layer, e in keys:
        self.compute(layer, h, np.array([[e]]), weights)
      best = min(best, time.perf_counter() - start)
    return n * self.expert_bytes / best


class HostChoice(NamedTuple):
  """Where decode misses are computed, and the rates that decided it (0.0: not measured)."""

  on_host: bool
  host_bytes_per_s: float = 0.0  # expert weights the host FFN computes per second
  h2d_bytes_per_s: float = 0.0  # expert weights the link copies per second


def choose(store: ExpertStore, mode: str) -> HostChoice:
  """`mode` "always" / "never": forced; "auto": on the host when it computes an expert faster than
  pinned-host -> device copies bring it over (both measured now)."""
  if mode not in HOST_COMPUTE:
    raise ValueError(f"host_compute must be one of {HOST_COMPUTE}, got {mode!r}")
  if mode != "auto":
    return HostChoice(mode == "always")
  host, link = HostExperts.of(store).bytes_per_s(), measure_h2d_bandwidth(store)
  return HostChoice(host > link, host, link)


def read_bytes_per_s(store: ExpertStore, budget_bytes: int = 1 << 30, repeats: int = 3) -> float:
  """Host DRAM read rate over the store's pinned memory: a jitted CPU reduction of whole layers (up to
  `budget_bytes` of them), best of `repeats`."""
  n = max(1, min(store.cfg.n_layers, budget_bytes // (store.cfg.n_experts * store.expert_bytes)))
  layers = [hostview.cpu_view(store.pinned(layer), store.pinned(layer).shape, store.cfg.weight_dtype)
            for layer in range(n)]
  total = jax.jit(lambda xs: sum(jnp.sum(x, dtype=jnp.float32) for x in xs))
  best = math.inf
  for _ in range(repeats + 1):  # the first compiles
    start = time.perf_counter()
    total(layers).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return n * store.cfg.n_experts * store.expert_bytes / best
