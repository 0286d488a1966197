"""The MoE decoder as Flax NNX modules: embeddings, RMSNorm, RoPE, GQA attention with a KV cache, MoE block.

The KV cache is an explicit value (`KVCache`) passed in and returned, so every step is a pure
function of (params, cache) that jits cleanly and that the offload engine can run layer by layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import moe
from jaxmoe.config import MoEConfig


class LayerCache(NamedTuple):
  k: jax.Array  # [B, S, n_kv_heads, head_dim]
  v: jax.Array  # [B, S, n_kv_heads, head_dim]


class KVCache(NamedTuple):
  layers: tuple[LayerCache, ...]
  pos: jax.Array  # [] int32: tokens already written


def init_cache(cfg: MoEConfig, batch: int, max_len: int | None = None) -> KVCache:
  s = max_len or cfg.max_seq_len
  shape = (batch, s, cfg.n_kv_heads, cfg.head_dim)
  z = jnp.zeros(shape, cfg.compute_dtype)
  return KVCache(tuple(LayerCache(z, z) for _ in range(cfg.n_layers)), jnp.zeros((), jnp.int32))


class ForwardOutput(NamedTuple):
  logits: jax.Array  # [B, T, V] f32
  cache: KVCache | None
  aux_loss: jax.Array  # [] mean load-balancing loss over layers
  z_loss: jax.Array  # [] mean router z-loss over layers
  experts: tuple[jax.Array, ...]  # per layer [B*T, k] routed expert ids


def _normal(rngs: nnx.Rngs, shape, std, dtype) -> nnx.Param:
  return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * y).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split layout (as in the HF Llama family). x [B, T, H, hd], positions [B, T]."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))  # [hd/2]
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE and an optional KV cache."""

  def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
    d, h, kv, hd, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.weight_dtype
    self.cfg = cfg
    self.wq = _normal(rngs, (d, h * hd), d ** -0.5, pd)
    self.wk = _normal(rngs, (d, kv * hd), d ** -0.5, pd)
    self.wv = _normal(rngs, (d, kv * hd), d ** -0.5, pd)
    self.wo = _normal(rngs, (h * hd, d), (h * hd) ** -0.5 / (2 * cfg.n_layers) ** 0.5, pd)
    if cfg.attn_bias:
      self.bq = nnx.Param(jnp.zeros((h * hd,), pd))
      self.bk = nnx.Param(jnp.zeros((kv * hd,), pd))
      self.bv = nnx.Param(jnp.zeros((kv * hd,), pd))
    if cfg.qk_norm == "head":
      self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps, pd), RMSNorm(hd, cfg.norm_eps, pd)
    elif cfg.qk_norm == "full":
      self.q_norm, self.k_norm = RMSNorm(h * hd, cfg.norm_eps, pd), RMSNorm(kv * hd, cfg.norm_eps, pd)

  def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None,
               pos: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x [B, T, D], positions [B, T]; with a cache, the T new keys are written at `pos`."""
    cfg = self.cfg
    b, t, _ = x.shape
    h, kv, hd, dt = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, x.dtype
    q, k, v = x @ self.wq[...].astype(dt), x @ self.wk[...].astype(dt), x @ self.wv[...].astype(dt)
    if cfg.attn_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm == "full":
      q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
    if cfg.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)

    if cache is None:
      keys, values, key_pos = k, v, positions  # [B, S=T, ...]
      new_cache = None
    else:
      keys = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), pos, axis=1)
      values = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), pos, axis=1)
      new_cache = LayerCache(keys, values)
      key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
      keys, values = keys.astype(dt), values.astype(dt)

    qg = q.reshape(b, t, kv, h // kv, hd)  # group query heads by their kv head
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32) * hd ** -0.5
    mask = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S] causal (and hides unwritten slots)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h * hd)
    return out @ self.wo[...].astype(dt), new_cache


class MoEBlock(nnx.Module):
  """Router + routed experts (+ optional shared expert). The math lives in `jaxmoe.moe`."""

  def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
    d, f, e, pd = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.weight_dtype
    self.cfg = cfg
    self.router = _normal(rngs, (d, e), d ** -0.5, pd)
    if cfg.activation == "swiglu":
      self.w_gate = _normal(rngs, (e, d, f), d ** -0.5, pd)
    self.w_up = _normal(rngs, (e, d, f), d ** -0.5, pd)
    self.w_down = _normal(rngs, (e, f, d), f ** -0.5 / (2 * cfg.n_layers) ** 0.5, pd)
    if cfg.shared_expert_d_ff:
      sf = cfg.shared_expert_d_ff
      self.shared_gate_proj = _normal(rngs, (d, sf), d ** -0.5, pd)
      self.shared_up_proj = _normal(rngs, (d, sf), d ** -0.5, pd)
      self.shared_down_proj = _normal(rngs, (sf, d), sf ** -0.5, pd)
      if cfg.shared_expert_gate:
        self.shared_expert_gate = _normal(rngs, (d, 1), d ** -0.5, pd)

  def expert_weights(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in self.cfg.expert_matrices}

  def route(self, h: jax.Array) -> moe.Routing:
    """h [T, D] -> Routing (the one routing truth, `moe.route`)."""
    logits = jnp.dot(h, self.router[...].astype(h.dtype), preferred_element_type=jnp.float32)
    return moe.route(logits, self.cfg.top_k, self.cfg.norm_topk_prob)

  def shared(self, h: jax.Array) -> jax.Array:
    """The always-on shared expert's output [T, D] (zeros when the model has none)."""
    if not self.cfg.shared_expert_d_ff:
      return jnp.zeros_like(h)
    dt = h.dtype
    y = jax.nn.silu(h @ self.shared_gate_proj[...].astype(dt)) * (h @ self.shared_up_proj[...].astype(dt))
    y = y @ self.shared_down_proj[...].astype(dt)
    if self.cfg.shared_expert_gate:
      y = jax.nn.sigmoid(h @ self.shared_expert_gate[...].astype(dt)) * y
    return y

  def __call__(self, h: jax.Array, capacity_factor: float | None = None) -> tuple[jax.Array, moe.Routing]:
    """h [T, D] (already normed) -> (FFN output [T, D], routing)."""
    r = self.route(h)
    if capacity_factor is None:
      y = moe.moe_ffn(h, r, self.expert_weights(), self.cfg.activation, impl=self.cfg.kernel_impl)
    else:
      y = moe.moe_ffn_capacity(h, r, self.expert_weights(), self.cfg.activation, capacity_factor)
    return y + self.shared(h), r


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype)
    self.attn = Attention(cfg, rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype)
    self.moe = MoEBlock(cfg, rngs)

  def attend(self, x, positions, cache=None, pos=None):
    """Residual attention sub-block: x + attn(norm(x)). x [B, T, D]."""
    a, new_cache = self.attn(self.attn_norm(x), positions, cache, pos)
    return x + a, new_cache

  def __call__(self, x, positions, cache=None, pos=None, capacity_factor=None):
    x, new_cache = self.attend(x, positions, cache, pos)
    b, t, d = x.shape
    y, r = self.moe(self.ffn_norm(x).reshape(b * t, d), capacity_factor)
    return x + y.reshape(b, t, d), new_cache, r


class MoELM(nnx.Module):
  """Decoder-only MoE language model."""

  def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _normal(rngs, (cfg.vocab_size, cfg.d_model), 1.0, cfg.weight_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.weight_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = _normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model ** -0.5, cfg.weight_dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    return self.embed[...][tokens].astype(self.cfg.compute_dtype)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and LM head: x [B, T, D] -> f32 logits [B, T, V]."""
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return jnp.dot(self.final_norm(x), head.astype(x.dtype), preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array, cache: KVCache | None = None,
               capacity_factor: float | None = None) -> ForwardOutput:
    """tokens [B, T] -> ForwardOutput. With a cache, tokens continue at cache.pos."""
    b, t = tokens.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache.pos
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(tokens)
    new_layers, experts, aux, z = [], [], [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache.layers[i]
      x, lc, r = layer(x, positions, layer_cache, start, capacity_factor)
      new_layers.append(lc)
      experts.append(r.experts)
      aux.append(moe.load_balancing_loss(r))
      z.append(moe.router_z_loss(r))
    new_cache = None if cache is None else KVCache(tuple(new_layers), cache.pos + t)
    return ForwardOutput(self.logits(x), new_cache, jnp.mean(jnp.stack(aux)), jnp.mean(jnp.stack(z)),
                         tuple(experts))


def create(cfg: MoEConfig, seed: int = 0) -> MoELM:
  """A freshly initialised model."""
  return MoELM(cfg, nnx.Rngs(params=seed))
