"""Predictor families (Flax NNX): each outputs a logit for every (layer, expert) it predicts.

  token_mlp    tokens [B, T] -> [B, T, L, E]: the current token and the previous few, embedded, one MLP.
  context      tokens [B, T] -> [B, T, L, E]: causal depthwise conv + one windowed attention layer with
               relative-position bias over the recent token embeddings, then an MLP.
  cross_layer  hidden [N, H, D] (residual stream entering H source layers) -> [N, H, depth+1, E]:
               experts of layers l, l+1, .., l+depth from the hidden state entering layer l.

The token families see a token only through a window of recent tokens (`context` tokens before it),
never through absolute positions, so scoring the last tokens of any history equals scoring them inside
the full sequence: that is what lets the engine pad to bucketed shapes. Token id `vocab_size` is the
padding token: it embeds to zero and is never attended. A token family's `lead` j (default 0) is what
its logits at position t predict: the routing of token t + j (j > 0: of tokens not yet known, as the
engine that plans ahead of the tokens it has read needs; `training` shifts the targets).
Losses: `bce` (multi-label) and `rank` (every routed expert above the soft maximum of the others, plus a
light BCE anchor); `loss_fn(name)` returns either.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FAMILIES = ("token_mlp", "context", "cross_layer")
TOKEN_FAMILIES = ("token_mlp", "context")
LOSSES = ("bce", "rank")


def _normal(rng: np.random.Generator, shape, std: float) -> nnx.Param:
  """Initialised on the host: no per-shape compilation when a predictor is built."""
  return nnx.Param(jnp.asarray(rng.standard_normal(shape, np.float32) * std))


def _dense(rng: np.random.Generator, shape, fan_in: int) -> nnx.Param:
  return _normal(rng, shape, fan_in ** -0.5)


def _embed_tokens(table: nnx.Param, tokens: jax.Array, pad_id: int) -> jax.Array:
  """tokens [B, T] (pad_id allowed) -> [B, T, e], zero at padding."""
  x = table[...][tokens]
  return x * (tokens != pad_id)[..., None].astype(x.dtype)


def _check_lead(lead: int) -> int:
  if int(lead) != lead or lead < 0:
    raise ValueError(f"lead must be an integer >= 0 (tokens ahead of the scored one), got {lead}")
  return int(lead)


class TokenMLP(nnx.Module):
  """Embeddings of the current token and the `n_prev` before it -> MLP -> logits for all layers."""

  def __init__(self, vocab_size: int, n_layers: int, n_experts: int, *, embed_dim: int = 64,
               hidden: int = 256, n_prev: int = 2, lead: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.vocab_size, self.n_layers, self.n_experts, self.n_prev = vocab_size, n_layers, n_experts, n_prev
    self.lead = _check_lead(lead)
    self.embed = _normal(rng, (vocab_size + 1, embed_dim), 0.5)
    d_in = (n_prev + 1) * embed_dim
    self.w1, self.b1 = _dense(rng, (d_in, hidden), d_in), nnx.Param(jnp.asarray(np.zeros((hidden,), np.float32)))
    self.w2 = _dense(rng, (hidden, n_layers * n_experts), hidden)
    self.b2 = nnx.Param(jnp.asarray(np.zeros((n_layers * n_experts,), np.float32)))

  @property
  def context(self) -> int:
    """Tokens before the scored one that its logits depend on."""
    return self.n_prev

  def __call__(self, tokens: jax.Array, n_out: int | None = None) -> jax.Array:
    """tokens [B, T] -> logits [B, n_out, L, E] of the last n_out positions (default all T)."""
    b, t = tokens.shape
    n_out = t if n_out is None else n_out
    pad = self.vocab_size
    feats = []
    for lag in range(self.n_prev + 1):  # lag-shifted copies, padded at the sequence start
      shifted = jnp.pad(tokens, ((0, 0), (lag, 0)), constant_values=pad)[:, t - n_out:t]
      feats.append(_embed_tokens(self.embed, shifted, pad))
    x = jnp.concatenate(feats, axis=-1)  # [B, n_out, (p+1)e]
    h = jax.nn.gelu(x @ self.w1[...] + self.b1[...])
    return (h @ self.w2[...] + self.b2[...]).reshape(b, n_out, self.n_layers, self.n_experts)


class ContextModel(nnx.Module):
  """Recent-token context: causal depthwise conv, one windowed attention layer, MLP -> all layers."""

  def __init__(self, vocab_size: int, n_layers: int, n_experts: int, *, embed_dim: int = 64,
               hidden: int = 256, window: int = 32, conv_width: int = 4, n_heads: int = 4,
               lead: int = 0, seed: int = 0):
    if embed_dim % n_heads:
      raise ValueError(f"n_heads ({n_heads}) must divide embed_dim ({embed_dim})")
    if not 1 <= conv_width <= window:
      raise ValueError(f"need 1 <= conv_width ({conv_width}) <= window ({window})")
    rng = np.random.default_rng(seed)
    self.vocab_size, self.n_layers, self.n_experts = vocab_size, n_layers, n_experts
    self.window, self.conv_width, self.n_heads = window, conv_width, n_heads
    self.lead = _check_lead(lead)
    e = embed_dim
    self.embed = _normal(rng, (vocab_size + 1, e), 0.5)
    self.conv = _normal(rng, (conv_width, e), conv_width ** -0.5)
    self.wqkv = _dense(rng, (e, 3 * e), e)
    self.wo = _dense(rng, (e, e), e)
    self.rel_bias = nnx.Param(jnp.asarray(np.zeros((n_heads, window), np.float32)))  # bias of key at distance 0..W-1
    self.w1, self.b1 = _dense(rng, (3 * e, hidden), 3 * e), nnx.Param(jnp.asarray(np.zeros((hidden,), np.float32)))
    self.w2 = _dense(rng, (hidden, n_layers * n_experts), hidden)
    self.b2 = nnx.Param(jnp.asarray(np.zeros((n_layers * n_experts,), np.float32)))

  @property
  def context(self) -> int:
    """Tokens before the scored one that its logits depend on (attention window + the keys' conv)."""
    return self.window - 1 + self.conv_width - 1

  def __call__(self, tokens: jax.Array, n_out: int | None = None) -> jax.Array:
    """tokens [B, T] -> logits [B, n_out, L, E] of the last n_out positions (default all T)."""
    b, t = tokens.shape
    n_out = t if n_out is None else n_out
    pad, w, h = self.vocab_size, self.window, self.n_heads
    x = _embed_tokens(self.embed, tokens, pad)  # [B, T, e]
    e = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), (self.conv_width - 1, 0), (0, 0)))
    conv = sum(xp[:, i:i + t] * self.conv[...][self.conv_width - 1 - i] for i in range(self.conv_width))
    c = jax.nn.gelu(conv) + x  # [B, T, e]
    k, v = jnp.split(c @ self.wqkv[...][:, e:], 2, axis=-1)  # keys and values of every position
    q = (c[:, t - n_out:] @ self.wqkv[...][:, :e]).reshape(b, n_out, h, e // h)  # scored positions only
    # Banded attention: query t sees keys t-W+1 .. t, gathered as W shifted copies (slot i = distance
    # W-1-i), so the cost is T*W rather than T*T and the relative bias needs no gather.
    def windows(a, fill):  # [B, T, ...] -> [B, n_out, W, ...]
      ap = jnp.pad(a, ((0, 0), (w - 1, 0)) + ((0, 0),) * (a.ndim - 2), constant_values=fill)
      return jnp.stack([ap[:, t - n_out + i:t + i] for i in range(w)], axis=2)
    kw, vw = windows(k.reshape(b, t, h, e // h), 0.0), windows(v.reshape(b, t, h, e // h), 0.0)
    allowed = windows(tokens, pad) != pad  # [B, n_out, W]: no padding, nothing before the start
    scores = jnp.einsum("bqhd,bqwhd->bqhw", q, kw) * (e // h) ** -0.5
    scores = scores + self.rel_bias[...][:, ::-1]  # slot i holds the key at distance W-1-i
    scores = jnp.where(allowed[:, :, None, :], scores, -1e9)
    probs = jax.nn.softmax(scores, axis=-1) * jnp.any(allowed, axis=-1)[:, :, None, None]
    a = jnp.einsum("bqhw,bqwhd->bqhd", probs, vw).reshape(b, n_out, e) @ self.wo[...]
    feats = jnp.concatenate([x[:, t - n_out:], c[:, t - n_out:], a], axis=-1)  # [B, n_out, 3e]
    hid = jax.nn.gelu(feats @ self.w1[...] + self.b1[...])
    return (hid @ self.w2[...] + self.b2[...]).reshape(b, n_out, self.n_layers, self.n_experts)


class CrossLayer(nnx.Module):
  """Hidden state entering source layer l -> experts of layers l .. l+depth (one small MLP per source)."""

  def __init__(self, d_model: int, n_layers: int, n_experts: int, source_layers, *, depth: int = 2,
               hidden: int = 128, seed: int = 0):
    self.source_layers = tuple(int(s) for s in source_layers)
    if not self.source_layers:
      raise ValueError("cross_layer needs traces with hidden states (hidden_layers was empty)")
    rng = np.random.default_rng(seed)
    self.d_model, self.n_layers, self.n_experts, self.depth = d_model, n_layers, n_experts, depth
    n_src, out = len(self.source_layers), (depth + 1) * n_experts
    self.w1 = _dense(rng, (n_src, d_model, hidden), d_model)
    self.b1 = nnx.Param(jnp.asarray(np.zeros((n_src, hidden), np.float32)))
    self.w2 = _dense(rng, (n_src, hidden, out), hidden)
    self.b2 = nnx.Param(jnp.asarray(np.zeros((n_src, out), np.float32)))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """hidden [N, H, D] -> logits [N, H, depth+1, E]; [n, i, o] predicts layer source_layers[i] + o."""
    x = hidden.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)  # depth-independent scale
    h = jax.nn.gelu(jnp.einsum("nhd,hdf->nhf", x, self.w1[...]) + self.b1[...])
    y = jnp.einsum("nhf,hfo->nho", h, self.w2[...]) + self.b2[...]
    return y.reshape(x.shape[0], len(self.source_layers), self.depth + 1, self.n_experts)


def build(family: str, meta: dict[str, Any], hparams: dict[str, Any], seed: int = 0) -> nnx.Module:
  """A fresh predictor of `family` for traces described by meta (n_layers, n_experts, vocab_size,
  d_model, hidden_layers); hparams are the family's keyword arguments."""
  if family == "token_mlp":
    return TokenMLP(meta["vocab_size"], meta["n_layers"], meta["n_experts"], seed=seed, **hparams)
  if family == "context":
    return ContextModel(meta["vocab_size"], meta["n_layers"], meta["n_experts"], seed=seed, **hparams)
  if family == "cross_layer":
    return CrossLayer(meta["d_model"], meta["n_layers"], meta["n_experts"], meta["hidden_layers"],
                      seed=seed, **hparams)
  raise ValueError(f"unknown predictor family {family!r}; choose one of {FAMILIES}")


def bce_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Multi-label BCE. logits, targets [..., E]; valid [...] -> [] mean over valid positions."""
  per = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
  return jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1)


def rank_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  """Top-k-aware ranking: softplus(logsumexp(negatives) - positive) for each routed expert, i.e. every
  routed expert should beat a soft maximum of the non-routed ones (that is recall@k = 1), + 0.1 BCE so
  that the logits keep a usable scale for calibration."""
  neg = jnp.where(targets > 0, -1e9, logits)
  lse = jax.nn.logsumexp(neg, axis=-1, keepdims=True)  # [..., 1]
  per = jnp.sum(targets * jax.nn.softplus(lse - logits), -1) / jnp.maximum(jnp.sum(targets, -1), 1)
  rank = jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1)
  return rank + 0.1 * bce_loss(logits, targets, valid)


def loss_fn(name: str):
  if name == "bce":
    return bce_loss
  if name == "rank":
    return rank_loss
  raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
