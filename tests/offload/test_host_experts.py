"""Experts computed on the host CPU (`host_experts`): in place over the store's memory, and exact."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import config, model as model_lib, moe
from jaxmoe.offload import ExpertStore, host_experts
from jaxmoe.offload.host_experts import HostExperts, choose
from tests.offload.reference_runs import VARIANTS, build_reference

NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
BACKENDS = [pytest.param("torch", marks=NEEDS_TORCH), "xla"]


def test_expert_matrices_are_views_of_the_store(swiglu_reference):
  store = ExpertStore.from_model(swiglu_reference.model)
  host = HostExperts.of(store)
  assert HostExperts.of(store) is host  # one per store: engines on it share compiled steps
  itemsize = store.cfg.weight_dtype.itemsize
  row = store.layout[-1].offset + int(np.prod(store.layout[-1].shape))
  base = store.pinned(1).unsafe_buffer_pointer()
  for m in store.layout:
    view = host.matrices(1, 3)[m.name]
    assert view.devices() == {jax.devices("cpu")[0]} and view.shape == m.shape
    assert view.unsafe_buffer_pointer() == base + (3 * row + m.offset) * itemsize  # no copy
    np.testing.assert_array_equal(view, swiglu_reference.model.layers[1].moe.expert_weights()[m.name][3])
  if host.backend == "torch":  # torch tensors over the same bytes
    for m in store.layout:
      tensor = host.tensors(1, 3)[m.name]
      assert tensor.data_ptr() == host.matrices(1, 3)[m.name].unsafe_buffer_pointer()
      assert tuple(tensor.shape) == m.shape


def test_the_backend_is_torch_where_it_imports_else_xla():
  want = "torch" if importlib.util.find_spec("torch") else "xla"
  assert host_experts.resolve_backend() == host_experts.resolve_backend("auto") == want
  assert host_experts.resolve_backend("xla") == "xla"
  with pytest.raises(ValueError, match="host backend must be one of"):
    host_experts.resolve_backend("numpy")
  # torch is optional: without it the module imports, "auto" is XLA and "torch" says what is missing
  code = ("import sys; sys.modules['torch'] = None\n"
          "from jaxmoe.offload import host_experts as h\n"
          "assert h.resolve_backend() == 'xla'\n"
          "try:\n  h.resolve_backend('torch')\nexcept ImportError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "needs torch" in out.stdout


@NEEDS_TORCH
def test_one_host_experts_per_store_and_backend(swiglu_reference):
  store = ExpertStore.from_model(swiglu_reference.model)
  torch_host, xla_host = HostExperts.of(store, "torch"), HostExperts.of(store, "xla")
  assert (torch_host.backend, xla_host.backend) == ("torch", "xla") and torch_host is not xla_host
  assert HostExperts.of(store, "auto") is torch_host and HostExperts.of(store, "xla") is xla_host
  assert torch_host.threads >= 1 and torch_host.label == f"torch, {torch_host.threads} threads"
  assert xla_host.threads is None and xla_host.label == "xla"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_host_share_is_the_moe_combine_of_its_experts(built_references, variant, backend):
  reference = build_reference(built_references, variant)
  cfg, layer = reference.cfg, reference.model.layers[0]
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((5, cfg.d_model)), jnp.float32)
  r = moe.route(jnp.asarray(rng.standard_normal((5, cfg.n_experts))), cfg.top_k, cfg.norm_topk_prob)
  host = HostExperts.of(ExpertStore.from_model(reference.model), backend)
  on_host = np.asarray(rng.random(r.experts.shape) < 0.5)  # the other pairs are left out
  got = host.compute(0, np.asarray(h), np.where(on_host, r.experts, -1), np.asarray(r.weights))
  want = moe.moe_ffn(h, r._replace(weights=jnp.where(on_host, r.weights, 0.0)), layer.moe.expert_weights(),
                     cfg.activation, impl="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.any(got != 0)
  np.testing.assert_array_equal(host.compute(0, np.asarray(h), np.full((5, cfg.top_k), -1),
                                             np.asarray(r.weights)), 0.0)


def _random_case(cfg, rows: int, seed: int):
  """Rows h [rows, D] in the compute dtype, a routing of them and a random half of its pairs (the
  others left out, -1)."""
  rng = np.random.default_rng(seed)
  h = np.asarray(jnp.asarray(rng.standard_normal((rows, cfg.d_model)), cfg.compute_dtype))
  r = moe.route(jnp.asarray(rng.standard_normal((rows, cfg.n_experts))), cfg.top_k, cfg.norm_topk_prob)
  on_host = rng.random(r.experts.shape) < 0.5
  return h, np.where(on_host, np.asarray(r.experts), -1), np.asarray(r.weights)


@NEEDS_TORCH
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_torch_and_xla_agree_in_f32(built_references, variant):
  reference = build_reference(built_references, variant)
  store = ExpertStore.from_model(reference.model)
  torch_host, xla_host = HostExperts.of(store, "torch"), HostExperts.of(store, "xla")
  for seed, rows in enumerate((1, 2, 5, 16)):
    for layer in range(reference.cfg.n_layers):
      case = _random_case(reference.cfg, rows, seed)
      got, want = torch_host.compute(layer, *case), xla_host.compute(layer, *case)
      assert got.dtype == want.dtype == np.float32 and np.any(got != 0)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@NEEDS_TORCH
def test_experts_computed_at_once_equal_one_after_another(built_references):
  """Worker threads, each with its share of torch's threads, compute the same outputs, summed in the
  same order; the number of workers is clamped to [1, threads]."""
  reference = build_reference(built_references, "swiglu")
  store = ExpertStore.from_model(reference.model)
  serial, parallel = HostExperts(store, "torch", expert_workers=1), HostExperts(store, "torch")
  assert serial.expert_workers == 1 and parallel.expert_workers == parallel.threads
  assert HostExperts(store, "torch", expert_workers=10**6).expert_workers == parallel.threads
  for seed, rows in enumerate((1, 3, 16)):
    case = _random_case(reference.cfg, rows, seed)
    got, want = parallel.compute(0, *case), serial.compute(0, *case)
    assert np.any(got != 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert parallel.bytes_per_s(budget_bytes=8 * store.expert_bytes, repeats=1) > 0


@pytest.mark.parametrize("backend, by_rows", [pytest.param("torch", False, marks=NEEDS_TORCH),
                                              pytest.param("torch", True, marks=NEEDS_TORCH),
                                              ("xla", None)])
@pytest.mark.parametrize("dtype, param_dtype", [("bfloat16", "bfloat16"), ("bfloat16", "float32"),
                                                ("float16", "float16")])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_reduced_precision_is_close_to_f32(activation, dtype, param_dtype, backend, by_rows):
  """bf16/f16 compute (weights stored so or in f32, cast as on the device) against the f32 MoE of
  the same weights and rows; `by_rows`: torch's matmul (oneDNN CPUs) or its matrix-vector path."""
  cfg = dataclasses.replace(config.tiny(), activation=activation, dtype=dtype, param_dtype=param_dtype,
                            kernel_impl="xla")
  model = model_lib.create(cfg, seed=1)
  host = HostExperts(ExpertStore.from_model(model), backend, by_rows=by_rows)
  eps = float(jnp.finfo(cfg.compute_dtype).eps)
  for seed, rows in enumerate((1, 3, 8)):
    h, experts, weights = _random_case(cfg, rows, seed)
    got = host.compute(1, h, experts, weights)
    f32 = {name: w.astype(jnp.float32) for name, w in model.layers[1].moe.expert_weights().items()}
    r = moe.Routing(jnp.maximum(jnp.asarray(experts), 0), jnp.where(experts >= 0, weights, 0.0),
                    jnp.zeros((rows, cfg.n_experts)), None)  # left-out pairs weigh 0
    want = np.asarray(moe.moe_ffn(jnp.asarray(h, jnp.float32), r, f32, activation, impl="xla"))
    scale = np.abs(want).max()
    # measured: at most 0.66 eps of the largest output (torch's swiglu rounds gate and up once more)
    assert scale > 0 and np.abs(got - want).max() <= 2 * eps * scale


def test_auto_computes_on_the_host_only_when_it_is_faster(swiglu_reference):
  choice = choose(ExpertStore.from_model(swiglu_reference.model), "auto")
  assert choice.host_bytes_per_s > 0 and choice.h2d_bytes_per_s > 0
  assert choice.on_host == (choice.host_bytes_per_s > choice.h2d_bytes_per_s)
  assert choice.backend == host_experts.resolve_backend()
  for backend in ("xla", *(["torch"] if importlib.util.find_spec("torch") else [])):
    store = ExpertStore.from_model(swiglu_reference.model)
    assert choose(store, "always", backend) == host_experts.HostChoice(True, backend=backend)
  assert choose(store, "never") == host_experts.HostChoice(False)
  with pytest.raises(ValueError, match="host_compute must be one of"):
    choose(ExpertStore.from_model(swiglu_reference.model), "fast")
