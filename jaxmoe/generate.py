"""Batched generation with every expert resident: the exact reference every offload strategy must equal.

Prefill runs the prompt in one jitted step that fills the KV cache; decode runs one jitted step per
new token. Greedy by default; `temperature > 0` samples with an explicit PRNG seed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.model import KVCache, MoELM, init_cache


class GenerateOutput(NamedTuple):
  tokens: np.ndarray  # [B, T + N] prompt followed by the generated tokens
  logits: np.ndarray  # [B, N, V] f32: the distribution each generated token was chosen from


@jax.jit
def _forward(graphdef, state, tokens, cache):
  model = nnx.merge(graphdef, state)
  out = model(tokens, cache)
  return out.logits[:, -1], out.cache


def select_token(logits: jax.Array, temperature: float, key: jax.Array | None) -> jax.Array:
  """Greedy (temperature 0) or sampled next token from f32 logits [B, V] -> [B] int32."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def check_prompt(prompt, max_new_tokens: int, max_seq_len: int, vocab_size: int) -> np.ndarray:
  """Validate a [B, T] prompt of token ids; returns it as int32 numpy."""
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be [batch, length>0] token ids, got shape {prompt.shape}")
  if not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt must hold integer token ids, got {prompt.dtype}")
  if prompt.min() < 0 or prompt.max() >= vocab_size:
    raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{prompt.min()}, {prompt.max()}]")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if prompt.shape[1] + max_new_tokens > max_seq_len:
    raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's max_seq_len ({max_seq_len})")
  return prompt.astype(np.int32)


def generate(model: MoELM, prompt, max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0) -> GenerateOutput:
  """Generate `max_new_tokens` after `prompt` [B, T] with every expert on the device."""
  cfg = model.cfg
  prompt = check_prompt(prompt, max_new_tokens, cfg.max_seq_len, cfg.vocab_size)
  graphdef, state = nnx.split(model)
  cache: KVCache = init_cache(cfg, prompt.shape[0])
  key = jax.random.key(seed)
  tokens = jnp.asarray(prompt)
  all_logits = []
  new = []
  for step in range(max_new_tokens):
    logits, cache = _forward(graphdef, state, tokens, cache)
    tokens = select_token(logits, temperature, jax.random.fold_in(key, step))[:, None]
    all_logits.append(logits)
    new.append(tokens)
  out_tokens = np.concatenate([prompt, np.asarray(jnp.concatenate(new, axis=1))], axis=1)
  return GenerateOutput(out_tokens, np.asarray(jnp.stack(all_logits, axis=1)))
