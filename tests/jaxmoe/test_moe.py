"""The MoE block against a plain loop-over-experts oracle written here."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import config, model as model_lib, moe


def loop_oracle(h, block, cfg):
  """Per token, per chosen expert: the textbook MoE FFN, in f32 numpy."""
  h = np.asarray(h, np.float64)
  router = np.asarray(block.router[...], np.float64)
  logits = h @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(h)
  for t in range(h.shape[0]):
    chosen = np.argsort(-probs[t], kind="stable")[:cfg.top_k]
    w = probs[t, chosen]
    if cfg.norm_topk_prob:
      w = w / w.sum()
    for e, we in zip(chosen, w):
      up = h[t] @ np.asarray(block.w_up[...][e], np.float64)
      if cfg.activation == "swiglu":
        g = h[t] @ np.asarray(block.w_gate[...][e], np.float64)
        hid = g / (1 + np.exp(-g)) * up
      else:
        hid = np.maximum(up, 0)
      out[t] += we * (hid @ np.asarray(block.w_down[...][e], np.float64))
  return out


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_block_matches_loop_oracle(activation, top_k, norm_topk_prob):
  cfg = dataclasses.replace(config.tiny(), activation=activation, top_k=top_k,
                            norm_topk_prob=norm_topk_prob, kernel_impl="xla")
  block = model_lib.MoEBlock(cfg, __import__("flax").nnx.Rngs(params=top_k))
  h = jax.random.normal(jax.random.key(top_k), (24, cfg.d_model))
  y, r = block(h)
  np.testing.assert_allclose(np.asarray(y), loop_oracle(h, block, cfg), rtol=1e-5, atol=1e-5)
  assert r.experts.shape == (24, top_k)


def test_all_tokens_routed_to_one_expert():
  cfg = dataclasses.replace(config.tiny(), kernel_impl="xla")
  block = model_lib.MoEBlock(cfg, __import__("flax").nnx.Rngs(params=3))
  # A router that sends every token to expert 5 first and expert 2 second.
  bias = np.zeros((cfg.d_model, cfg.n_experts), np.float32)
  bias[:, 5], bias[:, 2] = 4.0 / cfg.d_model, 2.0 / cfg.d_model  # logits ~ 4*mean(h), 2*mean(h)
  block.router[...] = jnp.asarray(bias)
  h = jnp.abs(jax.random.normal(jax.random.key(0), (16, cfg.d_model)))
  y, r = block(h)
  assert np.all(np.asarray(r.experts) == [5, 2])
  np.testing.assert_allclose(np.asarray(y), loop_oracle(h, block, cfg), rtol=1e-5, atol=1e-5)


def test_dispatch_groups_and_combine_roundtrip():
  experts = jnp.array([[3, 0], [0, 1], [3, 3]], jnp.int32)
  d = moe.dispatch(experts, 4)
  np.testing.assert_array_equal(np.asarray(d.group_sizes), [2, 1, 0, 3])
  np.testing.assert_array_equal(np.asarray(experts.reshape(-1)[d.order]), [0, 0, 1, 3, 3, 3])
  rows = jnp.arange(6, dtype=jnp.float32)[:, None]  # sorted row i carries the value i
  out = moe.combine(rows, d, jnp.ones((3, 2)))
  # sorted rows 0..5 are the flat copies [1, 2, 3, 0, 4, 5]: token 0 gets rows 3 and 0, ...
  np.testing.assert_allclose(np.asarray(out[:, 0]), [3 + 0, 1 + 2, 4 + 5])


def test_route_weights_and_losses():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
  r = moe.route(logits, 2, norm_topk_prob=True)
  np.testing.assert_array_equal(np.asarray(r.experts), [[0, 1], [2, 0]])
  np.testing.assert_allclose(np.asarray(r.weights.sum(-1)), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(float(r.weights[0, 0]), 1 / (1 + np.exp(-1.0)), rtol=1e-6)
  # Perfectly uniform routing gives load-balancing loss 1.
  uniform = moe.route(jnp.zeros((8, 4)).at[jnp.arange(8), jnp.arange(8) % 4].set(1.0), 1, True)
  assert abs(float(moe.load_balancing_loss(uniform)) - 1.0) < 1e-6
  z = moe.router_z_loss(moe.route(jnp.zeros((3, 4)), 1, True))
  np.testing.assert_allclose(float(z), np.log(4.0) ** 2, rtol=1e-6)


def test_capacity_path_equals_dropless_when_nothing_is_dropped():
  cfg = dataclasses.replace(config.tiny(), kernel_impl="xla")
  block = model_lib.MoEBlock(cfg, __import__("flax").nnx.Rngs(params=1))
  h = jax.random.normal(jax.random.key(1), (32, cfg.d_model))
  dropless, _ = block(h)
  capacity, _ = block(h, capacity_factor=float(cfg.n_experts))  # room for every copy
  np.testing.assert_allclose(np.asarray(capacity), np.asarray(dropless), rtol=1e-5, atol=1e-6)
