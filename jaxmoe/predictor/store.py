"""Saving and loading trained predictors, and the adapter that serves a token family to the engine.

A predictor directory holds predictor.json (family, sizes, hyper-parameters, loss, calibration,
validation metrics) and params/ (Orbax, the model's parameters as a plain dict). `load_predictor`
turns it into a `RoutingPredictor`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmoe.predictor import models
from jaxmoe.predictor.base import PopularityPredictor, check_history

META_FILE = "predictor.json"


def save_params(path: str, model: nnx.Module) -> None:
  """Write the model's parameters to `path` (an Orbax directory, replaced if present)."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), pure, force=True)
  ckptr.wait_until_finished()


def restore_params(path: str, model: nnx.Module) -> nnx.Module:
  """Load parameters saved by `save_params` into `model` (same family and sizes); returns it."""
  state = nnx.state(model, nnx.Param)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
  pure = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def save_predictor(out_dir: str, model: nnx.Module, info: dict[str, Any]) -> None:
  """info must hold family, meta and hparams (see `models.build`); anything else is kept as is."""
  for key in ("family", "meta", "hparams"):
    if key not in info:
      raise ValueError(f"predictor info lacks {key!r}")
  os.makedirs(out_dir, exist_ok=True)
  save_params(os.path.join(out_dir, "params"), model)
  with open(os.path.join(out_dir, META_FILE), "w") as f:
    json.dump(info, f, indent=2)


def read_info(pred_dir: str) -> dict[str, Any]:
  path = os.path.join(pred_dir, META_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{pred_dir} holds no trained predictor ({META_FILE} missing)")
  with open(path) as f:
    return json.load(f)


def load_model(pred_dir: str) -> tuple[nnx.Module, dict[str, Any]]:
  """The trained NNX model of a predictor directory and its info."""
  info = read_info(pred_dir)
  if info["family"] == "popularity":
    raise ValueError(f"{pred_dir} is a popularity table, not a trained model")
  model = models.build(info["family"], info["meta"], info["hparams"])
  return restore_params(os.path.join(pred_dir, "params"), model), info


def bucket(n: int, minimum: int = 8) -> int:
  """Next power of two >= max(n, minimum): a handful of shapes, so a handful of compilations."""
  return max(minimum, 1 << max(0, int(n - 1).bit_length()))


class TokenPredictor:
  """`RoutingPredictor` over a token family (token_mlp, context): jitted, padded to bucketed shapes.

  Probabilities are sigmoid(a * logit + b) with (a, b) fitted on validation traces (Platt scaling), so
  that the engine's 1 - prod(1 - p) is meaningful whatever loss trained the model. `lead` (the
  model's): the scores of a position are the routing of the token `lead` positions after it.

  `scores` (the engine's per-step call: a few tokens, ~1 MFLOP) runs on the host's CPU backend, so
  no device round trip sits at the start of every step (on the H200 host one small device call and
  read cost ~0.9 ms, 13 % of a decode step); `probs` (many tokens, for evaluation) runs on the default
  device.
  """

  def __init__(self, model: nnx.Module, calibration=(1.0, 0.0)):
    self.n_layers, self.n_experts = model.n_layers, model.n_experts
    self.context, self.lead = model.context, model.lead
    self.pad_id = model.vocab_size
    graphdef, state = nnx.split(model)
    treedef = jax.tree.structure(state)
    self._leaves = tuple(jax.tree.leaves(state))  # flat leaves: cheap to pass on every call
    self._host_leaves = jax.device_put(self._leaves, jax.local_devices(backend="cpu")[0])
    a, b = (float(c) for c in calibration)

    def probs(leaves, tokens, n_out):  # tokens [B, S] -> [B, n_out, L, E]
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      return jax.nn.sigmoid(a * model(tokens, n_out) + b)

    self._probs = jax.jit(probs, static_argnums=2)

  @property
  def leaves(self) -> tuple:
    """The model's flat weights on the default device (`traced_probs`' first argument)."""
    return self._leaves

  def traced_probs(self, leaves, tokens: jax.Array, n_out: int) -> jax.Array:
    """Inside a traced function (a compiled step): `probs` with the weights `leaves` passed in."""
    return self._probs(leaves, tokens, n_out)

  def probs(self, tokens, n_out: int | None = None) -> jax.Array:
    """Calibrated probabilities of whole padded sequences: tokens [B, S] -> [B, n_out or S, L, E]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return self._probs(self._leaves, tokens, tokens.shape[1] if n_out is None else n_out)

  def scores(self, history: np.ndarray, n_new: int) -> np.ndarray:
    history = check_history(history, n_new)
    b, s = history.shape
    if history.max() >= self.pad_id:
      raise ValueError(f"token ids must be < {self.pad_id} (the predictor's vocabulary)")
    need = min(s, n_new + self.context)  # tokens the new tokens' scores depend on
    length, rows = bucket(n_new + self.context), bucket(b, 1)
    window = np.full((rows, length), self.pad_id, np.int32)  # left padding is never attended
    window[:b, length - need:] = history[:, s - need:]
    n_out = min(bucket(n_new, 1), length)
    out = self._probs(self._host_leaves, window, n_out)  # [rows, n_out, L, E], on the host CPU
    return np.asarray(out, np.float32)[:b, n_out - n_new:]  # slice on the host: no eager device ops


class CrossLayerScorer:
  """Offline scorer of the cross_layer family (it needs hidden states, which the token hook lacks)."""

  def __init__(self, model: models.CrossLayer, calibration=(1.0, 0.0)):
    self.model, self.calibration = model, tuple(float(c) for c in calibration)
    self.n_layers, self.n_experts, self.depth = model.n_layers, model.n_experts, model.depth
    graphdef, self._state = nnx.split(model)
    self._logits = jax.jit(lambda state, h: nnx.merge(graphdef, state)(h))

  def logits(self, hidden: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """hidden [N, H, D] -> [N, H, depth+1, E] logits."""
    parts = [np.asarray(self._logits(self._state, jnp.asarray(hidden[i:i + chunk], jnp.float32)))
             for i in range(0, len(hidden), chunk)]
    return np.concatenate(parts)

  def scores_at(self, hidden: np.ndarray, lookahead: int) -> np.ndarray:
    """[N, H, D] -> probabilities [N, L, E] of each layer j predicted from the source state at least
    `lookahead` layers before it (NaN where none, or beyond the model's depth)."""
    from jaxmoe.predictor.baselines import source_for
    logits = self.logits(hidden)
    a, b = self.calibration
    out = np.full((len(hidden), self.n_layers, self.n_experts), np.nan, np.float32)
    sources = self.model.source_layers
    for j in range(self.n_layers):
      s = source_for(j, lookahead, sources)
      if s is not None and j - s <= self.depth:
        out[:, j] = 1.0 / (1.0 + np.exp(-(a * logits[:, sources.index(s), j - s] + b)))
    return out


def load_predictor(pred_dir: str):
  """A trained predictor directory -> `RoutingPredictor` for the engine's `learned` strategy."""
  info = read_info(pred_dir)
  if info["family"] == "popularity":
    return PopularityPredictor(np.asarray(info["freq"], np.float32))
  if info["family"] == "cross_layer":
    raise ValueError(f"{pred_dir}: the cross_layer family predicts from hidden states, which the "
                     "token-only RoutingPredictor hook does not provide; the engine's next_gate strategy "
                     "covers hidden-state speculation (evaluate cross_layer offline with load_cross_layer)")
  model, info = load_model(pred_dir)
  return TokenPredictor(model, info.get("calibration", (1.0, 0.0)))


def load_cross_layer(pred_dir: str) -> CrossLayerScorer:
  model, info = load_model(pred_dir)
  if info["family"] != "cross_layer":
    raise ValueError(f"{pred_dir} holds a {info['family']} predictor, not cross_layer")
  return CrossLayerScorer(model, info.get("calibration", (1.0, 0.0)))
