"""`learned` planned inside the compiled step: the plan of step n+1 made at the end of step n.

A plan the host makes must be issued before step n is dispatched, when the host has read the tokens
up to step n-1's input only, so its predictor works two positions ahead (`program.PLAN_LEAD`). Made
inside step n, after its token is chosen, the plan sees that token, the next step's input: a lead-0
token predictor (`TokenPredictor` of `lead` 0) scores it there. The step carries the last tokens of
the sequence on the device (`InStepPlan.recent`) and hands the next step the experts it plans per
layer (`InStepPlan.planned`), which that step sets as its planned uses (`predicted` eviction) before
its first layer. Nothing is copied ahead (the host is not involved); a plan only decides eviction,
and misses are read in place. The selection is `strategies.Learned.plan_step`'s, on the device.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.offload import device_cache
from jaxmoe.predictor.store import TokenPredictor, bucket


class InStepPlan(NamedTuple):
  """What a step hands the next one (device arrays)."""

  recent: jax.Array  # [B, W] int32 the last W tokens up to the step's input (predictor padding before)
  planned: jax.Array  # [L, E] bool experts planned for the next step


@dataclasses.dataclass(frozen=True, eq=False)  # a static argument of the step: hashed by identity
class InStepPlanner:
  predictor: TokenPredictor
  n_layers: int
  n_experts: int
  share: int  # at most this many planned experts a layer (an equal share of the cache's slots)
  per_layer: int | None
  hedge: float
  min_prob: float

  @classmethod
  def of(cls, strategy, n_slots: int, n_layers: int, n_experts: int) -> "InStepPlanner":
    """For a `learned` strategy whose predictor is a lead-0 `TokenPredictor`."""
    predictor = strategy.predictor
    if not isinstance(predictor, TokenPredictor) or predictor.lead != 0:
      raise ValueError("a plan made inside the step needs a token predictor of lead 0 (train_predictor "
                       "--family context or token_mlp)")
    if predictor.n_layers != n_layers or predictor.n_experts != n_experts:
      raise ValueError(f"predictor covers {predictor.n_layers} layers x {predictor.n_experts} experts, "
                       f"the model has {n_layers} x {n_experts}")
    return cls(predictor, n_layers, n_experts, max(1, n_slots // n_layers), strategy.per_layer,
               strategy.hedge, strategy.min_prob)

  @property
  def width(self) -> int:
    """Tokens the window holds: the scored one and its context, as `TokenPredictor.scores` pads it."""
    return bucket(1 + self.predictor.context)

  def start(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A request's first carry (host arrays): an empty window and no plan for the prompt."""
    return (np.full((batch, self.width), self.predictor.pad_id, np.int32),
            np.zeros((self.n_layers, self.n_experts), bool))

  def uses(self, state: device_cache.CacheState, plan: InStepPlan) -> device_cache.CacheState:
    """Traced, at a step's start: its planned experts' first uses are their layers' ticks (as
    `device_cache.use_offsets` gives a plan of the step about to run), none planned after it."""
    layer = jnp.repeat(jnp.arange(self.n_layers, dtype=jnp.int32), self.n_experts)
    first = jnp.where(plan.planned.reshape(-1), 2 + layer, device_cache.NEVER)
    return device_cache.plan_uses(state, jnp.stack([first, jnp.full_like(first, device_cache.NEVER)]))

  def next(self, leaves, plan: InStepPlan, tokens: jax.Array, token: jax.Array) -> InStepPlan:
    """Traced, at a step's end: the window moved past the step's input `tokens` [B, T], and the plan
    of the next step, whose input is `token` [B]."""
    recent = jnp.concatenate([plan.recent, tokens.astype(jnp.int32)], axis=1)[:, -self.width:]
    window = jnp.concatenate([recent[:, 1:], token.astype(jnp.int32)[:, None]], axis=1)
    p = self.predictor.traced_probs(leaves, window, 1)  # [B, 1, L, E]
    p_any = 1.0 - jnp.prod(1.0 - jnp.clip(p, 0.0, 1.0), axis=(0, 1))  # [L, E]
    if self.per_layer:
      m = jnp.full((self.n_layers,), self.per_layer, jnp.int32)
    else:
      m = jnp.clip(jnp.ceil(self.hedge * p_any.sum(axis=1) - 1e-9), 1, self.share).astype(jnp.int32)
    ranked = jnp.argsort(-p_any, axis=1, stable=True)
    keep = (jnp.take_along_axis(p_any, ranked, axis=1) > self.min_prob) & (
        jnp.arange(self.n_experts)[None, :] < m[:, None])
    rows = jnp.arange(self.n_layers)[:, None]
    planned = jnp.zeros((self.n_layers, self.n_experts), bool).at[rows, ranked].set(keep)
    return InStepPlan(recent, planned)
