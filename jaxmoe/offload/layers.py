"""The model without its expert weights as flat jit arguments, and the jitted pieces of one layer
(embed, attention + router, expert FFN on a slot pool, logits) that both offload engines compose."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe import moe
from jaxmoe.model import MoELM


class Structure:
  """A module's graph and its state's tree structure: one static jit argument, hashed once.

  The jitted functions below take a module's state as a flat tuple of arrays plus its `Structure`.
  JAX flattens a tuple of arrays without Python; an nnx `State` argument (and hashing a `GraphDef`)
  costs Python work on every call, ~4 ms per decode token of a 12-layer model on the CPU. The part of
  the state held elsewhere (a layer's expert weights; the head's layers) is no argument at all: it is
  rebuilt inside the jitted function as zero-size arrays. Every array argument costs dispatch time (on
  the H200 ~1 us each: the head with the layers' 120 placeholders as arguments took 150 us to
  dispatch, a one-argument function 46 us)."""

  def __init__(self, graphdef, left_out, treedef):
    self.graphdef, self.left_out, self.treedef = graphdef, left_out, treedef
    self._hash = hash((graphdef, left_out, treedef))

  @classmethod
  def of(cls, graphdef, left_out, kept) -> tuple["Structure", tuple]:
    """-> (structure, leaves of `kept`) of a module split into `graphdef`, `left_out` and `kept` (in
    `nnx.split`'s order). Equal structures are one object, so a jit cache lookup compares them by
    identity, not graph by graph."""
    empty, empty_def = jax.tree.flatten(left_out)
    leaves, treedef = jax.tree.flatten(kept)
    structure = cls(graphdef, (empty_def, tuple(np.dtype(a.dtype) for a in empty)), treedef)
    return _STRUCTURES.setdefault(structure, structure), tuple(leaves)

  def merge(self, leaves):
    empty_def, dtypes = self.left_out
    empty = jax.tree.unflatten(empty_def, [jnp.zeros((0,), dtype) for dtype in dtypes])
    return nnx.merge(self.graphdef, empty, jax.tree.unflatten(self.treedef, leaves))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, Structure) and self._hash == other._hash
                             and (self.graphdef, self.left_out, self.treedef)
                             == (other.graphdef, other.left_out, other.treedef))


_STRUCTURES: dict[Structure, Structure] = {}


def _is_expert_weight(path, _value) -> bool:
  return len(path) >= 2 and path[-2] == "moe" and path[-1] in ("w_gate", "w_up", "w_down")


def _is_layer(path, _value) -> bool:
  return path[0] == "layers"


def split_model(model: MoELM, put) -> tuple[Structure, tuple, Structure, list[tuple]]:
  """The model without its expert weights as flat leaves placed by `put`: (head structure, head
  leaves, layer structure, [per-layer leaves])."""
  head_graph, layers_state, head = nnx.split(model, _is_layer, ...)
  head_structure, head_leaves = Structure.of(head_graph, layers_state, head)
  layer_leaves = []
  for layer in model.layers:
    graph, experts, rest = nnx.split(layer, _is_expert_weight, ...)
    layer_structure, leaves = Structure.of(graph, experts, rest)
    layer_leaves.append(put(leaves))
  return head_structure, put(head_leaves), layer_structure, layer_leaves


@functools.partial(jax.jit, static_argnums=0)
def embed(head: Structure, leaves, tokens):
  return head.merge(leaves).embed_tokens(tokens)  # [B, T, D]


@functools.partial(jax.jit, static_argnums=0)
def last_logits(head: Structure, leaves, x):
  return head.merge(leaves).logits(x)[:, -1]  # [B, V] f32


@functools.partial(jax.jit, static_argnums=0, donate_argnames="layer_cache")
def attend_route(structure: Structure, leaves, speculative, x, positions, layer_cache, pos):
  """Attention and router of one layer; also the routers of later layers (`speculative`: their
  leaves) on this layer's hidden state. -> x [B, T, D], h [B*T, D], experts [B*T, k],
  weights [B*T, k], layer cache, speculated experts [depth, B*T, k]."""
  layer = structure.merge(leaves)
  x, layer_cache = layer.attend(x, positions, layer_cache, pos)
  b, t, d = x.shape
  h = layer.ffn_norm(x).reshape(b * t, d)
  r = layer.moe.route(h)
  guesses = []
  for later in speculative:
    ahead = structure.merge(later)
    guesses.append(ahead.moe.route(ahead.ffn_norm(x).reshape(b * t, d)).experts)
  speculated = jnp.stack(guesses) if guesses else jnp.zeros((0, b * t, r.experts.shape[1]), jnp.int32)
  return x, h, r.experts, r.weights, layer_cache, speculated


def expert_rows(cfg, pools, rhs_index, h, experts):
  if isinstance(rhs_index, tuple):  # device scalars (`ExpertCache.land` / `settle`)
    rhs_index = jnp.stack(rhs_index)
  d = moe.dispatch(experts, cfg.n_experts)
  return d, moe.expert_ffn(h[d.token_of_row], pools, d.group_sizes, cfg.activation,
                           rhs_index=rhs_index, impl=cfg.kernel_impl)


def finish(layer, y_rows, d, weights, h, x, partial=None):
  """combine (with `partial`, see `moe.combine`) + shared expert + residual, in the model's order of
  operations."""
  y = moe.combine(y_rows, d, weights, partial) + layer.moe.shared(h)
  return x + y.reshape(x.shape)


@functools.partial(jax.jit, static_argnums=0)
def layer_ffn(structure: Structure, leaves, pools, rhs_index, h, x, experts, weights, partial=None):
  """The MoE FFN of one layer on pools {name: [S, ...]} (group e reads slot rhs_index[e]); `partial`
  [B*T, D] f32: the weighted outputs of routed experts computed elsewhere (their `weights` zero)."""
  layer = structure.merge(leaves)
  d, y_rows = expert_rows(layer.moe.cfg, pools, rhs_index, h, experts)
  return finish(layer, y_rows, d, weights, h, x, partial)
