"""Training a predictor family on routing traces: Optax AdamW (warmup + cosine), a train/validation
split by document, early stopping on validation recall@k, Orbax checkpoints with resume, calibration.

`train_predictor` is what train/train_predictor.py and the main job call.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from jaxmoe.predictor import baselines, data, metrics, models, store

# cross_layer batches gather hidden states from the training split (75 MB for 4,096 tokens of the gpu
# preset's 12 layers x 768 in f16: ~23 ms on a 2-core host before the copy; on the H200 the family
# trained at ~19 steps/s against ~200 for `context`): on the device when the split takes at most this
# share of its memory (or this many bytes where the device reports no limit), else on the host
DEVICE_GATHER_SHARE, DEVICE_GATHER_BYTES = 0.25, 256 << 20

DEFAULT_HPARAMS = {
    "token_mlp": {"embed_dim": 64, "hidden": 256, "n_prev": 2, "lead": 0},
    "context": {"embed_dim": 64, "hidden": 256, "window": 32, "conv_width": 4, "n_heads": 4, "lead": 0},
    "cross_layer": {"depth": 2, "hidden": 128},
}


def _fits_device(nbytes: int) -> bool:
  """Whether `nbytes` may live on the default device for the length of a training run."""
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  return nbytes <= (DEVICE_GATHER_SHARE * limit if limit else DEVICE_GATHER_BYTES)


class _Task:
  """Batches of (inputs, routed experts [..., X, k], valid [..., X]) for one family, and eval data.

  Token families with `lead` j learn, at position t, the routing of token t + j (`data.lead_targets`);
  the last j positions of each row have no target and are masked."""

  def __init__(self, family: str, traces: data.Traces, rows: np.ndarray, depth: int = 0, lead: int = 0,
               gather_on_device: bool = False):
    self.family = family
    self.hidden_on_device = None  # cross_layer: the hidden states as one device array, when they fit
    self.tokens = traces.tokens[rows]  # [R, T]
    self.experts = traces.experts[rows]  # [R, T, L, k]
    if family in models.TOKEN_FAMILIES:
      self.targets, self.valid = data.lead_targets(self.experts, lead)  # [R, T, L, k], [R, T]
    if family == "cross_layer":
      if traces.hidden is None:
        raise ValueError("cross_layer needs traces collected with hidden states (hidden_layers)")
      src = np.asarray(traces.hidden_layers)
      tgt = src[:, None] + np.arange(depth + 1)[None, :]  # [H, depth+1] target layer of each output
      self.valid_xy = tgt < traces.n_layers
      self.target = np.minimum(tgt, traces.n_layers - 1)
      r, t = self.tokens.shape
      self.hidden = np.asarray(traces.hidden[rows]).reshape(r * t, len(src), -1)  # [N, H, D] f16
      self.flat_experts = self.experts.reshape(r * t, traces.n_layers, -1)
      if gather_on_device and _fits_device(self.hidden.nbytes):
        self.hidden_on_device = jax.device_put(self.hidden)

  @property
  def n_tokens(self) -> int:
    return self.tokens.size

  def batch(self, rng: np.random.Generator, batch_tokens: int):
    if self.family in models.TOKEN_FAMILIES:
      n = max(1, min(len(self.tokens), batch_tokens // self.tokens.shape[1]))
      idx = np.sort(rng.choice(len(self.tokens), n, replace=False))
      e = self.targets[idx]
      return self.tokens[idx], e, self._valid(idx, e)
    idx = np.sort(rng.integers(0, len(self.hidden), min(batch_tokens, len(self.hidden))))  # tokens
    e = self.flat_experts[idx][:, self.target]  # [B, H, depth+1, k]
    valid = np.broadcast_to(self.valid_xy, e.shape[:-1]).astype(np.float32)
    if self.hidden_on_device is not None:  # only the indices cross to the device
      return jnp.take(self.hidden_on_device, jnp.asarray(idx), axis=0), e, valid
    return self.hidden[idx], e, valid  # hidden stays f16 until the device

  def _valid(self, idx, targets: np.ndarray) -> np.ndarray:
    """[B, T, L] validity of token-family targets: the rows' positions that have one, every layer."""
    return np.broadcast_to(self.valid[idx][..., None], targets.shape[:-1]).astype(np.float32)

  def eval_chunks(self, chunk_tokens: int):
    """Whole-split (inputs, experts, valid) chunks, in order."""
    if self.family in models.TOKEN_FAMILIES:
      step = max(1, chunk_tokens // self.tokens.shape[1])
      for i in range(0, len(self.tokens), step):
        e = self.targets[i:i + step]
        yield self.tokens[i:i + step], e, self._valid(slice(i, i + step), e)
    else:
      for i in range(0, len(self.hidden), chunk_tokens):
        e = self.flat_experts[i:i + chunk_tokens][:, self.target]
        yield (self.hidden[i:i + chunk_tokens], e,
               np.broadcast_to(self.valid_xy, e.shape[:-1]).astype(np.float32))


def _collect_logits(apply, params, task: _Task, chunk_tokens: int = 8192):
  """Validation logits flattened to [N, X, E] (NaN where invalid) and experts [N, X, k]."""
  scores, experts = [], []
  for x, e, valid in task.eval_chunks(chunk_tokens):
    lg = np.asarray(apply(params, jnp.asarray(x)), np.float32)
    lg = np.where(valid[..., None] > 0, lg, np.nan)
    n_e, k = lg.shape[-1], e.shape[-1]
    lead = lg.shape[0] * (lg.shape[1] if task.family in models.TOKEN_FAMILIES else 1)
    scores.append(lg.reshape(lead, -1, n_e))
    experts.append(e.reshape(lead, -1, k))
  return np.concatenate(scores), np.concatenate(experts)


def fit_calibration(logits: np.ndarray, experts: np.ndarray, max_points: int = 200_000,
                    seed: int = 0) -> tuple[float, float]:
  """Platt scaling: (a, b) minimising the BCE of sigmoid(a * logit + b) against routed/not.

  Damped Newton steps (each must lower the loss), with a kept in [1e-2, 10] so that calibrated f32
  probabilities do not saturate to exact ties at 0 or 1 (which would scramble the ranking)."""
  labels = np.zeros(logits.shape, np.float32)
  np.put_along_axis(labels, experts, 1.0, axis=-1)
  ok = ~np.isnan(logits)
  s, y = logits[ok].astype(np.float64), labels[ok].astype(np.float64)
  if len(s) > max_points:
    pick = np.random.default_rng(seed).choice(len(s), max_points, replace=False)
    s, y = s[pick], y[pick]

  def nll(a, b):
    z = a * s + b
    return float(np.mean(np.logaddexp(0.0, z) - y * z))

  a, b = 1.0, 0.0
  feats = np.stack([s, np.ones_like(s)], 1)
  current = nll(a, b)
  for _ in range(50):
    p = 0.5 * (1.0 + np.tanh(0.5 * (a * s + b)))  # sigmoid without overflow
    grad = feats.T @ (p - y) / len(s)
    hess = (feats * (p * (1 - p))[:, None]).T @ feats / len(s) + 1e-9 * np.eye(2)
    da, db = np.linalg.solve(hess, grad)
    step = 1.0
    while step > 1e-4:
      na, nb = float(np.clip(a - step * da, 1e-2, 10.0)), float(b - step * db)
      trial = nll(na, nb)
      if trial <= current:
        break
      step /= 2
    else:
      break
    converged = current - trial < 1e-10
    a, b, current = na, nb, trial
    if converged:
      break
  return float(a), float(b)


def _init_output_bias(model: nnx.Module, family: str, freq: np.ndarray, meta: dict[str, Any]) -> None:
  """Start every (layer, expert) logit at the log-odds of its training frequency: the popularity
  baseline is where training begins."""
  logit = np.log(np.clip(freq, 1e-4, 1 - 1e-4)) - np.log1p(-np.clip(freq, 1e-4, 1 - 1e-4))  # [L, E]
  if family in models.TOKEN_FAMILIES:
    model.b2[...] = jnp.asarray(logit.reshape(-1), jnp.float32)
  else:
    src = np.asarray(meta["hidden_layers"])
    tgt = np.minimum(src[:, None] + np.arange(model.depth + 1)[None], meta["n_layers"] - 1)
    model.b2[...] = jnp.asarray(logit[tgt].reshape(len(src), -1), jnp.float32)


def _train_one(traces: data.Traces, train_rows, val_rows, family: str, loss: str, out_dir: str, *,
               hparams: dict[str, Any], steps: int, batch_tokens: int, lr: float, warmup: int,
               weight_decay: float, eval_every: int, patience: int, seed: int, resume: bool,
               progress: bool, max_val_tokens: int, val_fraction: float,
               stop_at: int | None) -> dict[str, Any]:
  """Train one (family, loss) into out_dir (a complete predictor directory); returns its info."""
  meta_path = os.path.join(out_dir, store.META_FILE)
  if resume and os.path.exists(meta_path):
    info = store.read_info(out_dir)
    if info.get("done"):
      return info
  if not resume:  # start over: no step of an older run may be mistaken for this one's
    for stale in ("train_state", "best", "params", store.META_FILE):
      path = os.path.join(out_dir, stale)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.isfile(path):
        os.remove(path)
  os.makedirs(out_dir, exist_ok=True)
  meta = {"n_layers": traces.n_layers, "n_experts": traces.n_experts, "top_k": traces.top_k,
          "vocab_size": traces.vocab_size, "d_model": int(traces.manifest["d_model"]),
          "hidden_layers": traces.hidden_layers}
  k, n_e = traces.top_k, traces.n_experts
  depth, lead = hparams.get("depth", 0), hparams.get("lead", 0)
  train = _Task(family, traces, train_rows, depth, lead, gather_on_device=True)
  if max_val_tokens and len(val_rows) * traces.tokens.shape[1] > max_val_tokens:
    val_rows = val_rows[: max(1, max_val_tokens // traces.tokens.shape[1])]
  val = _Task(family, traces, val_rows, depth, lead)
  freq = baselines.popularity(train.experts, n_e)

  model = models.build(family, meta, hparams, seed=seed)
  _init_output_bias(model, family, freq, meta)
  graphdef, params = nnx.split(model)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
  opt_state = tx.init(params)
  lf = models.loss_fn(loss)

  def apply(p, x):
    return nnx.merge(graphdef, p)(x)

  apply_jit = jax.jit(apply)

  @jax.jit
  def train_step(p, o, x, e, valid):
    def objective(q):
      return lf(apply(q, x), jax.nn.one_hot(e, n_e, dtype=jnp.float32).sum(-2), valid)
    value, grads = jax.value_and_grad(objective)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  # Resume: parameters, optimizer state and counters as flat leaf lists (robust to pytree classes).
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "train_state")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1))
  start, best, bad = 0, -1.0, 0
  best_dir = os.path.join(out_dir, "best")
  p_def, o_def = jax.tree.structure(params), jax.tree.structure(opt_state)
  if resume and mngr.latest_step() is not None:
    target = {"params": jax.tree.leaves(params), "opt": jax.tree.leaves(opt_state),
              "counters": np.zeros(3, np.float64)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), target)
    got = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
    params, opt_state = jax.tree.unflatten(p_def, got["params"]), jax.tree.unflatten(o_def, got["opt"])
    start, best, bad = int(got["counters"][0]), float(got["counters"][1]), int(got["counters"][2])

  def evaluate(p) -> float:
    lg, ex = _collect_logits(apply_jit, p, val)
    return metrics.mean_recall(lg, ex, k)

  bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{family}/{loss}",
             disable=not progress, unit="step")
  loss_value, recall, step = float("nan"), best, start
  for step in bar:
    rng = np.random.default_rng([seed, step])  # batch i depends only on (seed, i): resume is exact
    x, e, valid = train.batch(rng, batch_tokens)
    params, opt_state, lv = train_step(params, opt_state, jnp.asarray(x), jnp.asarray(e), jnp.asarray(valid))
    evaluating = (step + 1) % eval_every == 0 or step + 1 == steps
    if evaluating:
      loss_value, recall = float(lv), evaluate(params)
      if recall > best + 1e-4:
        best, bad = recall, 0
        store.save_params(best_dir, nnx.merge(graphdef, params))
      else:
        bad += 1
      bar.set_postfix(loss=f"{loss_value:.4f}", recall=f"{recall:.4f}", best=f"{best:.4f}")
    stopping = stop_at is not None and step + 1 >= stop_at
    if evaluating or stopping:
      mngr.save(step + 1, args=ocp.args.StandardSave(
          {"params": jax.tree.leaves(params), "opt": jax.tree.leaves(opt_state),
           "counters": np.asarray([step + 1, best, bad], np.float64)}), force=True)
      mngr.wait_until_finished()
    if stopping:
      bar.close()
      return {"family": family, "loss": loss, "done": False, "steps_trained": int(step + 1)}
    if evaluating and bad >= patience:
      break
  bar.close()

  model = store.restore_params(best_dir, nnx.merge(graphdef, params))
  lg, ex = _collect_logits(apply_jit, nnx.state(model), val)
  calibration = fit_calibration(lg, ex, seed=seed)
  val_metrics = metrics.routing_metrics(lg, ex, [k, min(2 * k, n_e)])
  info = {"family": family, "loss": loss, "meta": meta, "hparams": hparams,
          "calibration": list(calibration), "steps_trained": int(step + 1), "best_val_recall_at_k": best,
          "params": metrics.count_params(nnx.state(model, nnx.Param)),
          "val": val_metrics, "done": True,
          "train": {"lr": lr, "warmup": warmup, "steps": steps, "batch_tokens": batch_tokens,
                    "weight_decay": weight_decay, "seed": seed, "val_fraction": val_fraction,
                    "train_tokens": int(len(train_rows) * traces.tokens.shape[1]),
                    "traces": traces.manifest.get("source", {})}}
  store.save_predictor(out_dir, model, info)
  return info


def train_predictor(traces_dir: str, family: str, out_dir: str, *, loss: str = "auto",
                    hparams: dict[str, Any] | None = None, steps: int = 2000, batch_tokens: int = 4096,
                    lr: float = 3e-3, warmup: int = 100, weight_decay: float = 1e-4,
                    val_fraction: float = 0.1, eval_every: int = 100, patience: int = 5, seed: int = 0,
                    resume: bool = True, progress: bool = True, max_val_tokens: int = 65536,
                    stop_at: int | None = None, train_tokens: int | None = None,
                    traces: data.Traces | None = None) -> dict[str, Any]:
  """Train `family` on the traces in `traces_dir`; writes a predictor directory at `out_dir` and returns
  its info (validation metrics included). train_tokens: train on only the first rows of the training
  split, about this many tokens (the validation split stays the same: a learning curve over trace
  volume). loss "auto" trains with each loss and keeps the one with the
  best validation recall@k. Re-running with resume=True continues an interrupted run (or returns a
  finished one). stop_at: stop (checkpointed, unfinished) after that step, keeping the schedule of
  `steps` (an interruption on purpose)."""
  if family not in models.FAMILIES:
    raise ValueError(f"unknown predictor family {family!r}; choose one of {models.FAMILIES}")
  if loss != "auto" and loss not in models.LOSSES:
    raise ValueError(f"unknown loss {loss!r}; choose auto or one of {models.LOSSES}")
  if traces is None:
    traces = data.load_traces(traces_dir, hidden=family == "cross_layer")
  hp = {**DEFAULT_HPARAMS[family], **(hparams or {})}
  train_rows, val_rows = data.split_by_document(traces.doc_ids, val_fraction)
  if train_tokens is not None:
    if train_tokens < 1:
      raise ValueError(f"train_tokens must be positive, got {train_tokens}")
    train_rows = train_rows[: -(-train_tokens // traces.tokens.shape[1])]
  kw = dict(hparams=hp, steps=steps, batch_tokens=batch_tokens, lr=lr, warmup=warmup,
            weight_decay=weight_decay, eval_every=eval_every, patience=patience, seed=seed, resume=resume,
            progress=progress, max_val_tokens=max_val_tokens, val_fraction=val_fraction, stop_at=stop_at)
  if loss != "auto":
    return _train_one(traces, train_rows, val_rows, family, loss, out_dir, **kw)
  candidates = {name: _train_one(traces, train_rows, val_rows, family, name,
                                 os.path.join(out_dir, "candidates", name), **kw) for name in models.LOSSES}
  if not all(c["done"] for c in candidates.values()):
    return {"family": family, "loss": "auto", "done": False}
  best = max(candidates, key=lambda name: candidates[name]["best_val_recall_at_k"])
  params_dir = os.path.join(out_dir, "params")
  shutil.rmtree(params_dir, ignore_errors=True)
  shutil.copytree(os.path.join(out_dir, "candidates", best, "params"), params_dir)
  info = {**candidates[best], "candidates": {n: c["best_val_recall_at_k"] for n, c in candidates.items()}}
  with open(os.path.join(out_dir, store.META_FILE), "w") as f:
    json.dump(info, f, indent=2)
  return info
