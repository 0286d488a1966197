"""Routed experts computed on the host CPU next to their weights: the `hybrid` strategy's decode misses.

At batch 1 a decode step reads each routed expert once. Computing a missed expert where its weights
live, from host DRAM, moves only the token's hidden row to the host and one output row back (a few KB)
instead of the expert's weights over PCIe (llama.cpp's --n-cpu-moe, KTransformers, Fiddler). It pays
when the host computes an expert faster than the link brings it over: `choose` measures both.

The weights are read in place, over the store's pinned allocation (no copy), by one of two backends:

- "torch": torch tensors over the same bytes, each expert on its own rows (torch.matmul on torch's
  own threads, `torch.get_num_threads()`: all cores by default). A layer's experts run at once on
  `expert_workers` worker threads, each with its share of torch's threads (1: one after another, each
  on all of them, which forks and joins every thread per matrix). On the H200 machine's
  16-core AVX512 host, torch's matmuls read bf16 weights at 63 GB/s (f32: 148 GB/s), against 4-7 GB/s
  for the XLA backend and 37-48 GB/s for PCIe. torch's CPU bf16/f16 matmuls accumulate in f32 but
  round their output to the operands' dtype, so an expert's gate and up projections are rounded to
  the compute dtype before the activation (the device kernels apply it to the f32 sums): one rounding
  more, in reduced precision only; f32 is the same math. Where oneDNN has no bf16/f16 kernel (CPUs
  without AVX512), a matmul of rows by a [K, N] row-major matrix takes a slow path (a 2-core AVX2 CPU:
  0.8 GB/s through `bytes_per_s`), and each row is a matrix-vector product instead (4 GB/s there).
- "xla": every expert matrix is a CPU-backend array (`hostview.cpu_view`) and one function jitted for
  the CPU computes a layer's missed experts per call: 4-7 GB/s on that host. bf16 weights are upcast
  to f32 inside that function (numpy has no bf16 matmul). A product of two bf16 values is exact in
  f32, so the math is the device kernels' (operands in the compute dtype, f32 products and sums).

`backend="auto"` (the default, `DEFAULT_BACKEND`) is torch where it can be imported, else XLA; torch is
an optional dependency, imported only when a torch backend is built. Either way only the order of the
final sum over a token's experts differs from the device (the device's share and the host's are added
last). The torch backend runs inside the step's callback without calling back into JAX; the XLA
backend runs a CPU computation from inside it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
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

BACKENDS = ("auto", "torch", "xla")
DEFAULT_BACKEND = "auto"  # the backend of `HostExperts` / `choose` when none is given


@functools.cache
def _torch():
  """The torch module, or None where it cannot be imported (an optional dependency)."""
  try:
    import torch
  except ImportError:
    return None
  return torch


def resolve_backend(backend: str | None = None) -> str:
  """"torch" or "xla": `backend` (None: `DEFAULT_BACKEND`), "auto" resolved to torch if importable."""
  backend = DEFAULT_BACKEND if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"host backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    return "torch" if _torch() is not None else "xla"
  if backend == "torch" and _torch() is None:
    raise ImportError("the torch host backend needs torch (pip install torch)")
  return backend


def _torch_dtype(dtype):
  torch = _torch()
  return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[np.dtype(dtype).name]


def _torch_view(view: jax.Array):
  """A torch tensor over the bytes of a CPU array (no copy); the caller keeps `view` alive."""
  torch = _torch()
  nbytes = view.size * view.dtype.itemsize
  buffer = (ctypes.c_char * nbytes).from_address(view.unsafe_buffer_pointer())
  return torch.frombuffer(buffer, dtype=_torch_dtype(view.dtype)).view(view.shape)


def _to_torch(a: np.ndarray):
  """A torch copy of a numpy array (bf16 through its bits: torch.from_numpy has no bf16)."""
  torch = _torch()
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16).copy()).view(torch.bfloat16)
  return torch.from_numpy(np.array(a))


def _has_fast_reduced_matmul(dtype) -> bool:
  """Whether torch's CPU matmul of a row by a [K, N] row-major bf16/f16 matrix has a fast kernel
  (oneDNN's, on AVX512 CPUs); f32 always does (MKL)."""
  torch = _torch()
  if dtype == torch.float32:
    return True
  check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
  try:
    return bool(getattr(torch.ops.mkldnn, check)())
  except (AttributeError, RuntimeError):
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


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
_BY_STORE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ExpertStore -> {backend: HostExperts}
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

  One per store and backend (`of`), so that engines on one store share its compiled steps.
  `backend`: "torch", "xla" or "auto" (None: `DEFAULT_BACKEND`); `self.backend` is the one in use.
  `expert_workers` (torch): experts computed at once, at most torch's threads (None: that many).
  `by_rows` (torch): each row a matrix-vector product (None: where torch's CPU has no fast bf16/f16
  matmul of a row by a [K, N] matrix)."""

  def __init__(self, store: ExpertStore, backend: str | None = None, expert_workers: int | None = None,
               by_rows: bool | None = None):
    self.backend = resolve_backend(backend)
    cfg = store.cfg
    self.activation, self.dtype, self.d_model = cfg.activation, cfg.compute_dtype, cfg.d_model
    self.expert_bytes = store.expert_bytes
    self.n_layers, self.n_experts, self.top_k = cfg.n_layers, cfg.n_experts, cfg.top_k
    self.expert_workers = 1  # the torch backend's experts computed at once (`_init_torch`)
    itemsize = cfg.weight_dtype.itemsize
    row = store.layout[-1].offset + math.prod(store.layout[-1].shape)  # elements of one expert
    self._mats = [[{m.name: hostview.cpu_view(store.pinned(layer), m.shape, cfg.weight_dtype,
                                              (e * row + m.offset) * itemsize)
                    for m in store.layout} for e in range(cfg.n_experts)]
                  for layer in range(cfg.n_layers)]
    self._cpu = jax.devices("cpu")[0]
    self.threads: int | None = None  # torch's intra-op threads (None: XLA's own pool)
    if self.backend == "torch":
      self._init_torch(expert_workers, by_rows)
    self.handle = Handle(next(_KEYS))
    _LIVE[self.handle.key] = self

  def _init_torch(self, expert_workers: int | None, by_rows: bool | None):
    torch = _torch()
    self._tdtype = _torch_dtype(self.dtype)
    # tensors over the same bytes as the CPU arrays, which keep the pinned memory alive
    self._tensors = [[{name: _torch_view(view) for name, view in mats.items()} for mats in layer]
                     for layer in self._mats]
    self._convert = self._tensors[0][0]["w_down"].dtype != self._tdtype  # cast per call, as on the device
    self._by_rows = not _has_fast_reduced_matmul(self._tdtype) if by_rows is None else by_rows
    self.threads = torch.get_num_threads()
    # experts computed at once, each on its share of the threads (1: one after another on all of them)
    self.expert_workers = self.threads if expert_workers is None else max(1, min(expert_workers, self.threads))
    self._workers = None  # their thread pool, made on first use

  @classmethod
  def of(cls, store: ExpertStore, backend: str | None = None) -> "HostExperts":
    """The store's host experts on `backend` (None: `DEFAULT_BACKEND`), built on first use."""
    backend = resolve_backend(backend)
    built = _BY_STORE.setdefault(store, {})
    if backend not in built:
      built[backend] = cls(store, backend)
    return built[backend]

  @property
  def label(self) -> str:
    """The backend in words, for reports: "torch, 16 threads" or "xla"."""
    return self.backend if self.threads is None else f"{self.backend}, {self.threads} threads"

  def matrices(self, layer: int, expert: int) -> dict[str, jax.Array]:
    """{name: matrix} of one expert: CPU arrays over the store's pinned memory."""
    return self._mats[layer][expert]

  def tensors(self, layer: int, expert: int) -> dict:
    """{name: matrix} of one expert: torch tensors over the store's pinned memory (torch backend)."""
    return self._tensors[layer][expert]

  def compute(self, layer: int, h: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Host: rows h [N, D], experts [N, k] (-1: left out), weights [N, k] -> [N, D] f32, each row's
    weighted sum over its experts >= 0."""
    if self.backend == "torch":
      return self._compute_torch(layer, h, experts, weights)
    experts = np.asarray(experts)
    ids = np.unique(experts[experts >= 0])
    if not ids.size:
      return np.zeros(np.shape(h), np.float32)
    # a token routes to an expert at most once: its row weight is that pair's weight, no sum
    row_weights = np.stack([np.where(experts == e, weights, 0).sum(axis=1) for e in ids])
    h, row_weights = jax.device_put((h, row_weights.astype(np.float32)), self._cpu)
    mats = tuple(self._mats[layer][e] for e in ids)
    return np.asarray(_weighted_ffn(h, row_weights, mats, activation=self.activation))

  def _matmul(self, x, w):
    """x [n, K] @ w [K, N] in the compute dtype (f32 sums; the output rounded to that dtype)."""
    torch = _torch()
    if self._convert:
      w = w.to(self._tdtype)
    if self._by_rows:  # w.T @ row: the matrix-vector kernel, not the slow [K, N] matmul path
      return torch.stack([torch.mv(w.T, row) for row in x])
    return torch.matmul(x, w)

  def _compute_torch(self, layer: int, h, experts, weights) -> np.ndarray:
    """`compute` on torch: each routed expert on its own rows. Several experts run at once, each on a
    worker thread with its share of torch's threads (`expert_workers`): one expert's matrix-vector
    products split over every thread fork and join per matrix on under 1 MB a thread. The outputs are
    summed in the order of the expert ids whichever way they ran."""
    torch = _torch()
    experts, weights = np.asarray(experts), np.asarray(weights, np.float32)
    out = np.zeros(np.shape(h), np.float32)
    ids = np.unique(experts[experts >= 0])
    if not ids.size:
      return out
    x_all = _to_torch(np.asarray(h)).to(self._tdtype)
    rows = [np.nonzero(experts == e) for e in ids]  # (rows, slots): a token routes to an expert once
    workers = min(len(ids), self.expert_workers)
    if workers > 1:
      share = max(1, self.threads // workers)
      groups = [list(range(i, len(ids), workers)) for i in range(workers)]
      ys = {}
      for group, done in zip(groups, self._pool().map(
          lambda group: self._experts_torch(layer, x_all, ids, rows, group, share), groups)):
        ys.update(zip(group, done))
      ys = [ys[i] for i in range(len(ids))]
    else:
      ys = self._experts_torch(layer, x_all, ids, rows, range(len(ids)), None)
    for (r, slots), y in zip(rows, ys):
      # in numpy: torch's CPU index_add_ costs ~25 ms a call, whatever its size
      out[r] += weights[r, slots][:, None] * y
    return out

  def _experts_torch(self, layer, x_all, ids, rows, which, threads: int | None) -> list[np.ndarray]:
    """The outputs [n_rows, D] f32 of experts ids[i] on their rows, i in `which`; `threads`: torch's
    intra-op threads for this (worker) thread (None: as they are)."""
    torch = _torch()
    if threads is not None:
      torch.set_num_threads(threads)  # per thread: the caller's setting is not touched
    out = []
    with torch.inference_mode():
      for i in which:
        m = self._tensors[layer][ids[i]]
        x = x_all[torch.from_numpy(rows[i][0])]
        if self.activation == "swiglu":
          gate, up = self._matmul(x, m["w_gate"]), self._matmul(x, m["w_up"])
          a = (torch.nn.functional.silu(gate.float()) * up.float()).to(self._tdtype)
        else:
          a = torch.relu(self._matmul(x, m["w_up"]))
        out.append(self._matmul(a, m["w_down"]).float().numpy())
    return out

  def _pool(self):
    if self._workers is None:
      self._workers = concurrent.futures.ThreadPoolExecutor(self.expert_workers, "host-expert")
    return self._workers

  def bytes_per_s(self, budget_bytes: int = 256 << 20, repeats: int = 3, per_call: int | None = None) -> float:
    """Expert weights per second the host FFN gets through for one token whose `per_call` experts of a
    layer (None: top_k, a decode layer whose routed experts all missed) are computed in one call (best
    of `repeats` passes over distinct experts, up to `budget_bytes` of them: more than a cache holds)."""
    per_call = max(1, min(self.top_k if per_call is None else per_call, self.n_experts))
    n = max(per_call, min(self.n_layers * self.n_experts, budget_bytes // self.expert_bytes))
    calls = [(i // self.n_experts % self.n_layers, [(i + j) % self.n_experts for j in range(per_call)])
             for i in range(0, n - per_call + 1, per_call)]
    h = np.ones((1, self.d_model), self.dtype)
    weights = np.ones((1, per_call), np.float32)
    best = math.inf
    for _ in range(repeats + 1):  # the first pass compiles and warms up
      start = time.perf_counter()
      for layer, ids in calls:
        self.compute(layer, h, np.array([ids]), weights)
      best = min(best, time.perf_counter() - start)
    return len(calls) * per_call * self.expert_bytes / best


class HostChoice(NamedTuple):
  """Where decode misses are computed, and the rates that decided it (0.0: not measured)."""

  on_host: bool
  host_bytes_per_s: float = 0.0  # expert weights the host FFN computes per second
  h2d_bytes_per_s: float = 0.0  # expert weights the link copies per second
  backend: str = ""  # the host FFN's backend, "torch" or "xla" ("": the host computes nothing)


def choose(store: ExpertStore, mode: str, backend: str | None = None) -> HostChoice:
  """`mode` "always" / "never": forced; "auto": on the host when it computes an expert faster than
  pinned-host -> device copies bring it over (both measured now). `backend`: as `HostExperts.of`."""
  if mode not in HOST_COMPUTE:
    raise ValueError(f"host_compute must be one of {HOST_COMPUTE}, got {mode!r}")
  if mode == "never":
    return HostChoice(False)
  host = HostExperts.of(store, backend)
  if mode == "always":
    return HostChoice(True, backend=host.backend)
  host_rate, link = host.bytes_per_s(), measure_h2d_bandwidth(store)
  return HostChoice(host_rate > link, host_rate, link, host.backend)


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
