"""Routing traces: what the model routed, per token and layer, saved as sharded .npy files + manifest.json.

Layout of a traces directory (R rows of T tokens per shard; L layers, k routed, E experts, D width):
  manifest.json              sizes, shard list, model config, which layers have hidden states
  shard_00000.tokens.npy     [R, T] int32   token ids
  shard_00000.doc_ids.npy    [R] int32      document (or segment) id of each row: splits go by document
  shard_00000.experts.npy    [R, T, L, k]   int16 routed expert ids, best first (`moe.route`)
  shard_00000.probs.npy      [R, T, L, E]   f16 router probabilities
  shard_00000.hidden.npy     [R, T, H, D]   f16 residual stream entering each of the H selected layers
  gates.npz                  router [L, D, E], ffn_norm [L, D], norm_eps: what next-gate speculation needs
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

FORMAT = "jaxmoe-routing-traces"
VERSION = 1


def _trace_fn(graphdef, hidden_layers: tuple[int, ...], state, tokens):
  """tokens [B, T] -> experts [L, B*T, k], probs [L, B*T, E], f16 hidden state entering each of
  hidden_layers [H, B, T, D] (only those leave the device)."""
  model = nnx.merge(graphdef, state)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = model.embed_tokens(tokens)
  experts, probs, hidden = [], [], []
  for layer in model.layers:
    hidden.append(x)
    x, _, r = layer(x, positions)  # the model's own layer call: routing is `moe.route`
    experts.append(r.experts)
    probs.append(r.probs)
  kept = [hidden[i].astype(jnp.float16) for i in hidden_layers]
  return jnp.stack(experts), jnp.stack(probs), jnp.stack(kept) if kept else jnp.zeros((0,), jnp.float16)


_trace_jit = jax.jit(_trace_fn, static_argnums=(0, 1))


def _resolve_layers(hidden_layers, n_layers: int) -> list[int]:
  if hidden_layers is None or hidden_layers == "none":
    return []
  if hidden_layers == "all":
    return list(range(n_layers))
  layers = sorted({int(i) for i in hidden_layers})
  bad = [i for i in layers if not 0 <= i < n_layers]
  if bad:
    raise ValueError(f"hidden_layers {bad} outside [0, {n_layers})")
  return layers


def collect_traces(model, token_batches: Iterable, out_dir: str, *, hidden_layers: Sequence[int] | str = "all",
                   shard_rows: int = 256, source: dict[str, Any] | None = None,
                   progress: bool = True, total: int | None = None) -> dict[str, Any]:
  """Run `model` (an `MoELM`) over `token_batches` and write a traces directory; returns the manifest.

  token_batches yields [B, T] int token arrays (one T for all) or (tokens [B, T], doc_ids [B]) pairs;
  without doc ids each row is its own document. hidden_layers: "all", "none" or layer indices whose
  entering hidden state is saved (f16; D values per token and layer, the bulk of the bytes).
  """
  cfg = model.cfg
  os.makedirs(out_dir, exist_ok=True)
  layers = _resolve_layers(hidden_layers, cfg.n_layers)
  graphdef, state = nnx.split(model)
  expert_dtype = np.int16 if cfg.n_experts <= np.iinfo(np.int16).max else np.int32
  shards: list[dict[str, Any]] = []
  pending: dict[str, list[np.ndarray]] = {"tokens": [], "doc_ids": [], "experts": [], "probs": [], "hidden": []}
  seq_len, next_doc, n_rows = None, 0, 0

  def flush():
    if not pending["tokens"]:
      return
    name = f"shard_{len(shards):05d}"
    for key, parts in pending.items():
      if key == "hidden" and not layers:
        continue
      np.save(os.path.join(out_dir, f"{name}.{key}.npy"), np.concatenate(parts))
    shards.append({"name": name, "n_rows": int(sum(len(p) for p in pending["tokens"]))})
    for parts in pending.values():
      parts.clear()

  bar = tqdm(token_batches, total=total, desc="collect traces", unit="batch", disable=not progress)
  for batch in bar:
    tokens, doc_ids = batch if isinstance(batch, tuple) else (batch, None)
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
      raise ValueError(f"token batches must be [B, T], got shape {tokens.shape}")
    b, t = tokens.shape
    if seq_len is None:
      seq_len = t
    elif t != seq_len:
      raise ValueError(f"all token batches must share one length T; got {t} after {seq_len}")
    if t > cfg.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
      raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
    if doc_ids is None:
      doc_ids = np.arange(next_doc, next_doc + b)
    doc_ids = np.asarray(doc_ids, np.int32).reshape(b)
    next_doc = max(next_doc, int(doc_ids.max()) + 1)
    experts, probs, hidden = jax.device_get(_trace_jit(graphdef, tuple(layers), state, jnp.asarray(tokens)))
    l_all = cfg.n_layers
    pending["tokens"].append(tokens)
    pending["doc_ids"].append(doc_ids)
    pending["experts"].append(np.moveaxis(experts.reshape(l_all, b, t, -1), 0, 2).astype(expert_dtype))
    pending["probs"].append(np.moveaxis(probs.reshape(l_all, b, t, -1), 0, 2).astype(np.float16))
    if layers:
      pending["hidden"].append(np.moveaxis(hidden, 0, 2))  # [B, T, H, D]
    n_rows += b
    if sum(len(p) for p in pending["tokens"]) >= shard_rows:
      flush()
  flush()
  if not shards:
    raise ValueError("token_batches was empty: nothing to trace")

  np.savez(os.path.join(out_dir, "gates.npz"),
           router=np.stack([np.asarray(l.moe.router[...], np.float32) for l in model.layers]),
           ffn_norm=np.stack([np.asarray(l.ffn_norm.weight[...], np.float32) for l in model.layers]),
           norm_eps=np.float32(cfg.norm_eps))
  manifest = {
      "format": FORMAT, "version": VERSION, "n_layers": cfg.n_layers, "n_experts": cfg.n_experts,
      "top_k": cfg.top_k, "d_model": cfg.d_model, "vocab_size": cfg.vocab_size, "seq_len": seq_len,
      "n_rows": n_rows, "n_tokens": n_rows * seq_len, "hidden_layers": layers, "shards": shards,
      "model_config": cfg.to_dict(), "source": source or {}}
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


@dataclasses.dataclass
class Traces:
  """A traces directory in memory (hidden states memory-mapped per shard, concatenated on demand)."""

  manifest: dict[str, Any]
  tokens: np.ndarray  # [R, T] int32
  doc_ids: np.ndarray  # [R] int32
  experts: np.ndarray  # [R, T, L, k] int32
  probs: np.ndarray | None  # [R, T, L, E] f16
  hidden: np.ndarray | None  # [R, T, H, D] f16
  gates: dict[str, np.ndarray]  # router [L, D, E], ffn_norm [L, D], norm_eps []

  @property
  def n_layers(self) -> int:
    return int(self.manifest["n_layers"])

  @property
  def n_experts(self) -> int:
    return int(self.manifest["n_experts"])

  @property
  def top_k(self) -> int:
    return int(self.manifest["top_k"])

  @property
  def vocab_size(self) -> int:
    return int(self.manifest["vocab_size"])

  @property
  def hidden_layers(self) -> list[int]:
    return list(self.manifest["hidden_layers"])

  def rows(self, idx: np.ndarray) -> "Traces":
    """The traces of the given rows only."""
    take = lambda a: None if a is None else a[idx]
    return dataclasses.replace(self, tokens=self.tokens[idx], doc_ids=self.doc_ids[idx],
                               experts=self.experts[idx], probs=take(self.probs), hidden=take(self.hidden))


def load_traces(traces_dir: str, *, probs: bool = False, hidden: bool = True) -> Traces:
  """Read a traces directory written by `collect_traces`."""
  path = os.path.join(traces_dir, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{traces_dir} is not a traces directory (no manifest.json); "
                            "write one with train/collect_traces.py")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: not a {FORMAT} manifest")

  def read(key, mmap=False):
    parts = [np.load(os.path.join(traces_dir, f"{s['name']}.{key}.npy"), mmap_mode="r" if mmap else None)
             for s in manifest["shards"]]
    return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

  with np.load(os.path.join(traces_dir, "gates.npz")) as g:
    gates = {key: np.asarray(g[key]) for key in g.files}
  has_hidden = hidden and bool(manifest["hidden_layers"])
  return Traces(manifest, read("tokens"), read("doc_ids"), read("experts").astype(np.int32),
                read("probs") if probs else None, read("hidden", mmap=True) if has_hidden else None, gates)


def split_by_document(doc_ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Row indices (train, val): the last `val_fraction` of documents (in id order) are held out, so no
  document, and as few neighbouring segments as possible, straddle the split."""
  doc_ids = np.asarray(doc_ids)
  docs = np.unique(doc_ids)
  if len(docs) < 2:
    raise ValueError("need at least two documents (or rows) to split train/validation by document")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  n_val = min(len(docs) - 1, max(1, int(round(len(docs) * val_fraction))))
  val_docs = docs[len(docs) - n_val:]
  is_val = np.isin(doc_ids, val_docs)
  return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def lead_targets(experts: np.ndarray, lead: int) -> tuple[np.ndarray, np.ndarray]:
  """The routing `lead` tokens ahead: experts [R, T, ...] -> (targets [R, T, ...], valid [R, T] f32),
  targets[:, t] = experts[:, t + lead]; the last `lead` positions of a row have none (valid 0, targets
  there are copies of the row's last token's, to be masked)."""
  if lead < 0:
    raise ValueError(f"lead must be >= 0, got {lead}")
  t = experts.shape[1]
  idx = np.minimum(np.arange(t) + lead, t - 1)
  valid = np.broadcast_to((np.arange(t) + lead < t).astype(np.float32), experts.shape[:2])
  return experts[:, idx], valid


def token_rows(tokens: np.ndarray, seq_len: int, *, max_rows: int | None = None,
               doc_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Cut a [N] token stream into rows [R, seq_len] (the tail shorter than a row is dropped).

  doc_ids [N] (optional) gives each row the document of its first token; otherwise each row is its own
  segment. Returns (rows [R, seq_len], row_doc_ids [R]).
  """
  tokens = np.asarray(tokens).reshape(-1)
  n_rows = len(tokens) // seq_len
  if max_rows is not None:
    n_rows = min(n_rows, max_rows)
  if n_rows < 1:
    raise ValueError(f"corpus of {len(tokens)} tokens is shorter than one row of {seq_len}")
  rows = tokens[: n_rows * seq_len].reshape(n_rows, seq_len).astype(np.int32)
  if doc_ids is None:
    return rows, np.arange(n_rows, dtype=np.int32)
  return rows, np.asarray(doc_ids).reshape(-1)[: n_rows * seq_len : seq_len].astype(np.int32)


def batches(rows: np.ndarray, doc_ids: np.ndarray, batch_rows: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
  """(tokens [B, T], doc_ids [B]) batches over rows, in order."""
  for i in range(0, len(rows), batch_rows):
    yield rows[i:i + batch_rows], doc_ids[i:i + batch_rows]
