"""Compare routing predictors on held-out traces: recall@k and @2k per layer and averaged, parameters,
FLOPs and microseconds per decode step, for every trained family and the training-free references
(per-layer popularity, next-gate speculation), and recall by distance (how many layers ahead of the
hidden state that predicts them); writes predictors.md, predictors.json and predictors_distance.png.

  python -m eval.compare_predictors --traces T --predictors P1 P2 .. --out DIR     # compare trained ones
  python -m eval.compare_predictors --preset small --out DIR                      # collect, train, compare
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval import cli
from jaxmoe import config as config_lib, model as model_lib
from jaxmoe.predictor import baselines, data, metrics, models, store
from jaxmoe.predictor.base import PopularityPredictor


def _row(name: str, family: str, lookahead, scores: np.ndarray, experts: np.ndarray, k: int, **cost) -> dict:
  m = metrics.routing_metrics(scores, experts, [k, min(2 * k, scores.shape[-1])])
  at_k, at_2k = m["per_budget"][str(k)], m["per_budget"][str(min(2 * k, scores.shape[-1]))]
  label = name if lookahead is None else f"{name} (lookahead {lookahead})"
  return {"name": label, "predictor": name, "family": family, "lookahead": lookahead,
          "recall_k": at_k["recall"], "recall_2k": at_2k["recall"], "recall_k_avg": at_k["recall_avg"],
          "recall_2k_avg": at_2k["recall_avg"], "precision_k_avg": at_k["precision_avg"],
          "exact_set_k_avg": at_k["exact_set_avg"], **cost}


def _per_layer_call_us(weights: Sequence[np.ndarray], fn, d_model: int, reps: int) -> float:
  """Microseconds of one jitted per-layer call on a [1, D] hidden state (a decode step makes L of them)."""
  h = jnp.ones((1, d_model), jnp.float32)
  args = [jnp.asarray(w) for w in weights]
  return metrics.time_us(jax.jit(fn), h, *args, reps=reps)


def decode_step_us(model: model_lib.MoELM, context: int = 128, reps: int = 20) -> float:
  """Microseconds of one jitted all-resident decode step (batch 1) after `context` tokens."""
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda st, tok, cache: nnx.merge(graphdef, st)(tok, cache)[:2])
  cache = model_lib.init_cache(cfg, 1)
  _, cache = step(state, jnp.zeros((1, min(context, cfg.max_seq_len - 1)), jnp.int32), cache)
  return metrics.time_us(step, state, jnp.zeros((1, 1), jnp.int32), cache, reps=reps)


def compare(traces_dir: str, predictor_dirs: Sequence[str], *, lookaheads: Sequence[int] = (1, 2, 3),
            val_fraction: float = 0.1, max_val_tokens: int = 65536, history: int = 256, reps: int = 50,
            model: model_lib.MoELM | None = None, with_baselines: bool = True) -> dict[str, Any]:
  """Score popularity, next-gate (per lookahead; `with_baselines=False`: neither) and every predictor
  directory on the validation documents of `traces_dir`; returns {"rows": [...], "meta": {...}} (see
  `markdown`). Token-family rows carry their predictor's `lead` (the token ahead they score)."""
  traces = data.load_traces(traces_dir, hidden=True)
  train_rows, val_rows = data.split_by_document(traces.doc_ids, val_fraction)
  t = traces.tokens.shape[1]
  if len(val_rows) * t > max_val_tokens:
    val_rows = val_rows[: max(1, max_val_tokens // t)]
  val = traces.rows(val_rows)
  n_layers, n_experts, k = traces.n_layers, traces.n_experts, traces.top_k
  experts = val.experts.reshape(-1, n_layers, k)  # [N, L, k]
  hist = np.random.default_rng(0).integers(0, traces.vocab_size, (1, history))
  rows = []

  if with_baselines:
    freq = baselines.popularity(traces.experts[train_rows], n_experts)
    pop = PopularityPredictor(freq)
    rows.append(_row("popularity", "popularity", None, np.broadcast_to(freq, experts.shape[:2] + (n_experts,)),
                     experts, k, params=int(freq.size), flops_per_token=0.0,
                     us_per_step=metrics.time_us(pop.scores, hist, 1, reps=reps)))

  if with_baselines and val.hidden is not None:
    hidden = np.asarray(val.hidden).reshape(len(experts), len(traces.hidden_layers), -1)  # [N, H, D]
    g = traces.gates
    gate_us = _per_layer_call_us([g["ffn_norm"][0], g["router"][0]],
                                 lambda h, n, r: baselines.gate_probs(h, n, r, float(g["norm_eps"])),
                                 hidden.shape[-1], reps)
    for a in lookaheads:
      rows.append(_row("next_gate", "next_gate", a,
                       baselines.next_gate(hidden, traces.hidden_layers, g, a), experts, k,
                       params=0, flops_per_token=float(n_layers * 2 * g["router"][0].size),
                       us_per_step=n_layers * gate_us))

  for pred_dir in predictor_dirs:
    info = store.read_info(pred_dir)
    trained_split = info.get("train", {}).get("val_fraction", val_fraction)
    if trained_split != val_fraction:
      raise ValueError(f"{pred_dir} was validated on val_fraction={trained_split}, not {val_fraction}")
    name = os.path.basename(os.path.normpath(pred_dir))
    if info["family"] in models.TOKEN_FAMILIES:
      pred = store.load_predictor(pred_dir)
      probs = np.concatenate([np.asarray(pred.probs(val.tokens[i:i + 8])) for i in range(0, len(val.tokens), 8)])
      targets, valid = data.lead_targets(val.experts, pred.lead)  # lead j: position t scores token t + j
      probs = np.where(valid[..., None, None] > 0, probs, np.nan).reshape(len(experts), n_layers, n_experts)
      window = jnp.zeros((1, store.bucket(1 + pred.context)), jnp.int32)
      rows.append(_row(name, info["family"], None, probs, targets.reshape(experts.shape), k,
                       params=info["params"],
                       flops_per_token=metrics.flops_per_call(lambda w: pred.probs(w, 1), window),
                       us_per_step=metrics.time_us(pred.scores, hist, 1, reps=reps), loss=info["loss"],
                       lead=pred.lead))
    elif info["family"] == "cross_layer":
      if val.hidden is None:
        raise ValueError(f"{pred_dir} needs hidden states; the traces have none")
      scorer = store.load_cross_layer(pred_dir)
      w = [np.asarray(getattr(scorer.model, n)[...][0]) for n in ("w1", "b1", "w2", "b2")]
      mlp = lambda h, w1, b1, w2, b2: jax.nn.gelu(h @ w1 + b1) @ w2 + b2
      call_us = _per_layer_call_us(w, mlp, hidden.shape[-1], reps)
      flops = metrics.flops_per_call(jax.jit(mlp), jnp.ones((1, hidden.shape[-1])), *w)
      n_src = len(scorer.model.source_layers)
      for a in lookaheads:
        if a > scorer.depth:
          continue
        rows.append(_row(name, "cross_layer", a, scorer.scores_at(hidden, a), experts,
                         k, params=info["params"], flops_per_token=n_src * flops, us_per_step=n_src * call_us,
                         loss=info["loss"]))
    else:
      raise ValueError(f"{pred_dir}: cannot compare a {info['family']} predictor")

  meta = {"traces": os.path.abspath(traces_dir), "source": traces.manifest.get("source", {}),
          "n_layers": n_layers, "n_experts": n_experts, "top_k": k, "val_tokens": int(len(experts)),
          "train_tokens": int(len(train_rows) * t), "history": history,
          "device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
          "date": datetime.date.today().isoformat()}
  if model is not None:
    meta["us_decode_step_model"] = decode_step_us(model)
  return {"rows": rows, "meta": meta, "by_distance": by_distance(rows, lookaheads)}


def _recall_from(per_layer: Sequence, first: int) -> float | None:
  """Mean of the per-layer recalls of layers >= first that have a prediction (None if none do)."""
  vals = [v for v in per_layer[first:] if v is not None]
  return float(np.mean(vals)) if vals else None


def by_distance(rows: Sequence[dict], distances: Sequence[int]) -> list[dict]:
  """Recall by distance, one entry per predictor, from the rows' per-layer recalls.

  Distance d: target layers l >= d, each predicted from the hidden state entering layer l - d (or the
  latest earlier one the traces kept): a hidden-state predictor's row of lookahead d, restricted to
  those layers. Token families predict every layer from the tokens alone ("input": all layers);
  popularity depends on nothing, so it fills every column. Per-layer values are None below layer d.
  Entries: {"predictor", "family", "distance": {str(d): {"recall_k", "recall_2k", "recall_k_avg",
  "recall_2k_avg"}}, "input": the same over all layers, or None}."""
  def column(r, first):
    mask = lambda vals: [None if l < first else v for l, v in enumerate(vals)]
    return {"recall_k": mask(r["recall_k"]), "recall_2k": mask(r["recall_2k"]),
            "recall_k_avg": _recall_from(r["recall_k"], first),
            "recall_2k_avg": _recall_from(r["recall_2k"], first)}

  out: dict[str, dict] = {}
  for r in rows:
    entry = out.setdefault(r["predictor"], {"predictor": r["predictor"], "family": r["family"],
                                            "distance": {}, "input": None})
    if r["lookahead"] is None:  # from the tokens: the input column (popularity: every column too)
      entry["input"] = column(r, 0)
      if r["family"] == "popularity":
        entry["distance"] = {str(d): column(r, d) for d in distances}
    elif r["lookahead"] in distances:
      entry["distance"][str(r["lookahead"])] = column(r, r["lookahead"])
  return list(out.values())


def markdown(result: dict[str, Any]) -> str:
  """The comparison table (recall per layer as l0/l1/..)."""
  meta = result["meta"]
  k = meta["top_k"]
  decode = meta.get("us_decode_step_model")
  lines = [f"| predictor | lookahead | recall@{k} avg | recall@{2 * k} avg | recall@{k} per layer | "
           f"recall@{2 * k} per layer | params | FLOPs/token | us/step |" +
           (" % of decode step |" if decode else ""),
           "|---|---|---|---|---|---|---|---|---|" + ("---|" if decode else "")]
  fmt = lambda vals: " / ".join("-" if v is None else f"{v:.2f}" for v in vals)
  for r in result["rows"]:
    look = "all layers" if r["lookahead"] is None else str(r["lookahead"])
    line = (f"| {r['name']} | {look} | {r['recall_k_avg']:.3f} | {r['recall_2k_avg']:.3f} | "
            f"{fmt(r['recall_k'])} | {fmt(r['recall_2k'])} | {r['params']:,} | "
            f"{r['flops_per_token']:,.0f} | {r['us_per_step']:.0f} |")
    lines.append(line + (f" {100 * r['us_per_step'] / decode:.1f}% |" if decode else ""))
  return "\n".join(lines) + "\n"


def distance_markdown(result: dict[str, Any]) -> str:
  """The recall@k-by-distance table (see `by_distance`)."""
  k = result["meta"]["top_k"]
  table = result["by_distance"]
  distances = sorted({int(d) for e in table for d in e["distance"]})
  fmt = lambda col: "-" if col is None or col["recall_k_avg"] is None else f"{col['recall_k_avg']:.3f}"
  lines = [f"Recall@{k} by distance: layers l >= d, each predicted from the hidden state entering layer "
           f"l - d; token families predict every layer from the tokens.\n",
           "| predictor | " + " | ".join(f"d = {d}" for d in distances) + " | all layers from the input |",
           "|---|" + "---|" * (len(distances) + 1)]
  for e in table:
    cells = [fmt(e["distance"].get(str(d))) for d in distances] + [fmt(e["input"])]
    lines.append(f"| {e['predictor']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """predictors.md and predictors.json under out_dir, and the plot of recall by distance beside them
  (predictors_distance.png; skipped where matplotlib is missing); returns the first two paths."""
  os.makedirs(out_dir, exist_ok=True)
  md, js = os.path.join(out_dir, "predictors.md"), os.path.join(out_dir, "predictors.json")
  meta = result["meta"]
  with open(md, "w") as f:
    f.write(f"Routing predictors on {meta['val_tokens']:,} held-out tokens ({meta['source']}), "
            f"{meta['device']}, {meta['date']}\n\n" + markdown(result) + "\n" + distance_markdown(result))
  with open(js, "w") as f:
    json.dump(result, f, indent=2)
  try:
    from eval import plots
  except ImportError:  # matplotlib is missing: the tables are the report
    return md, js
  plots.recall_by_distance(result, os.path.join(out_dir, "predictors_distance.png"))
  return md, js


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, checked before any work (argparse's one-line error, exit status 2)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (traces/ and predictors/ go here too)")
  p.add_argument("--traces", help="traces directory; without it traces are collected first")
  p.add_argument("--predictors", nargs="*", default=None, help="trained predictor directories")
  p.add_argument("--run-dir", help="trained model run directory, or a main job's output directory (its "
                                    "model/ inside); else --preset, randomly initialised")
  p.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS),
                 help="model preset without --run-dir")
  p.add_argument("--families", nargs="*", default=list(models.FAMILIES), choices=models.FAMILIES,
                 help="families to train")
  p.add_argument("--steps", type=cli.positive_int, default=1500, help="training steps per family and loss")
  p.add_argument("--max-tokens", type=cli.positive_int, default=131072, help="tokens to trace")
  p.add_argument("--seq-len", type=cli.positive_int, default=256)
  p.add_argument("--lookaheads", type=cli.positive_int_list, default=(1, 2, 3),
                 help="comma-separated lookaheads (distances in layers) for hidden-state methods")
  a = p.parse_args(argv)
  if a.run_dir:
    a.run_dir = str(cli.model_run_dir(a.run_dir))
  named = [("--traces", a.traces), ("--run-dir", a.run_dir)] + [("--predictors", d) for d in a.predictors or []]
  for flag, path in named:
    if path and not os.path.isdir(path):
      p.error(f"{flag} {path}: no such directory")
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  from train import collect_traces as ct
  from train.train_predictor import train_predictor
  cfg, model = ct.load(a.run_dir, a.preset, 0)
  traces = a.traces or os.path.join(a.out, "traces")
  if not a.traces:
    ct.main(["--out", traces, "--max-tokens", str(a.max_tokens), "--seq-len", str(a.seq_len)] +
            (["--run-dir", a.run_dir] if a.run_dir else ["--preset", a.preset]))
  preds = a.predictors
  if preds is None:
    preds = [os.path.join(a.out, "predictors", f) for f in a.families]
    for fam, d in zip(a.families, preds):
      train_predictor(traces, fam, d, steps=a.steps)
  result = compare(traces, preds, lookaheads=a.lookaheads, model=model)
  md, _ = write_report(result, a.out)
  print(open(md).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
