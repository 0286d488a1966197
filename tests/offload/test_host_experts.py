"""Experts computed on the host CPU (`host_experts`): in place over the store's memory, and exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import moe
from jaxmoe.offload import ExpertStore
from jaxmoe.offload.host_experts import HostExperts, choose
from tests.offload.reference_runs import VARIANTS, build_reference


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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_host_share_is_the_moe_combine_of_its_experts(built_references, variant):
  reference = build_reference(built_references, variant)
  cfg, layer = reference.cfg, reference.model.layers[0]
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((5, cfg.d_model)), jnp.float32)
  r = moe.route(jnp.asarray(rng.standard_normal((5, cfg.n_experts))), cfg.top_k, cfg.norm_topk_prob)
  host = HostExperts.of(ExpertStore.from_model(reference.model))
  on_host = np.asarray(rng.random(r.experts.shape) < 0.5)  # the other pairs are left out
  got = host.compute(0, np.asarray(h), np.where(on_host, r.experts, -1), np.asarray(r.weights))
  want = moe.moe_ffn(h, r._replace(weights=jnp.where(on_host, r.weights, 0.0)), layer.moe.expert_weights(),
                     cfg.activation, impl="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.any(got != 0)
  np.testing.assert_array_equal(host.compute(0, np.asarray(h), np.full((5, cfg.top_k), -1),
                                             np.asarray(r.weights)), 0.0)


def test_auto_computes_on_the_host_only_when_it_is_faster(swiglu_reference):
  choice = choose(ExpertStore.from_model(swiglu_reference.model), "auto")
  assert choice.host_bytes_per_s > 0 and choice.h2d_bytes_per_s > 0
  assert choice.on_host == (choice.host_bytes_per_s > choice.h2d_bytes_per_s)
  with pytest.raises(ValueError, match="host_compute must be one of"):
    choose(ExpertStore.from_model(swiglu_reference.model), "fast")
