"""PNG plots of a main-job results dict (speedup vs recall, per-layer recall, copy timeline, latency per
strategy), of the predictors' learning curve over trace volume and of their recall by distance."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from eval import report  # noqa: E402

CURVE = "tab:blue"  # the noisy-oracle curve; the strategies' stars take the other colours
STARS = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _save(fig, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _recall_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.legend(fontsize=7)


def speedup_vs_recall(results: dict, path: Path) -> Path | None:
  """Per-token speedup over on_demand against the measured hit rate (share of routed experts already
  on the device): the noisy-oracle sweep as a curve (labelled with its recall), each strategy a star."""
  sweep = results.get("noisy_oracle_sweep") or []
  strategies = {s["name"]: s for s in results.get("strategies", [])}
  base = strategies.get("on_demand")
  if not sweep or not base:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([p["hit_rate"] for p in sweep], [base["tpot_s"] / p["tpot_s"] for p in sweep], "o-", color=CURVE,
          label="noisy oracle")
  for p in sweep:
    ax.annotate(f"r={p['recall']:.1f}", (p["hit_rate"], base["tpot_s"] / p["tpot_s"]), fontsize=7,
                textcoords="offset points", xytext=(4, -10))
  stars = [(name, s) for name, s in strategies.items() if name not in ("resident", "on_demand")]
  for (name, s), color in zip(stars, itertools.cycle(STARS)):
    ax.scatter([s["hit_rate"]], [base["tpot_s"] / s["tpot_s"]], marker="*", s=140, color=color,
               edgecolors="black", linewidths=0.5, label=name, zorder=3)
  ax.axhline(1.0, color="grey", lw=0.8, ls="--")
  ax.margins(x=0.08)  # room for the recall labels beside the points at hit rate 1
  ax.set_xlabel("hit rate: routed experts already on the device")
  ax.set_ylabel("per-token speedup over on_demand")
  ax.set_title("Accuracy -> speedup")
  ax.legend(fontsize=7)
  return _save(fig, path)


def per_layer_recall(results: dict, path: Path) -> Path | None:
  """Recall@k per layer for each predictor family and baseline."""
  rows = [p for p in results.get("predictors", []) if p.get("recall_k")]
  if not rows:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for p in rows:
    layers = [(i, r) for i, r in enumerate(p["recall_k"]) if r is not None]  # None: no prediction there
    ax.plot([i for i, _ in layers], [r for _, r in layers], "o-", label=p["name"])
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
  _recall_axes(ax, "layer", "recall@k", "Per-layer recall of the routing predictors")
  return _save(fig, path)


def timeline(results: dict, path: Path) -> Path | None:
  """Every expert copy of one request (issue -> ready, host clock since the request began), one row per
  layer, with a dotted line where each decode step began."""
  tl = results.get("timeline")
  if not tl or not tl.get("copies"):
    return None
  fig, ax = plt.subplots(figsize=(9, 4))
  for c in tl["copies"]:
    color = "tab:green" if c["prefetched"] else "tab:red"
    ax.plot([c["issue_s"] * 1e3, c["ready_s"] * 1e3], [c["layer"]] * 2, color=color, lw=3,
            solid_capstyle="butt")
  starts = tl.get("step_starts_s", [])[1:]  # the prefill starts at 0
  for step, t in enumerate(starts, start=1):
    ax.axvline(t * 1e3, color="grey", lw=0.7, ls=":")
    ax.annotate(str(step), (t * 1e3, 1.0), xycoords=("data", "axes fraction"), fontsize=6, color="grey",
                xytext=(2, -8), textcoords="offset points")
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("ms since the request began (host clock); dotted: decode step k begins")
  ax.set_ylabel("layer")
  prompt = f", {tl['prompt_len']}-token prompt" if tl.get("prompt_len") else ""
  ax.set_title(f"{tl.get('strategy', '')}{prompt}: prefetched copies (green), on-demand copies (red)")
  return _save(fig, path)


def latency_per_strategy(results: dict, path: Path) -> Path | None:
  """TTFT and per-token latency bars per strategy."""
  rows = results.get("strategies", [])
  if not rows:
    return None
  names = [s["name"] for s in rows]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  a1.bar(names, [s["ttft_s"] * 1e3 for s in rows], color="tab:blue")
  a1.set_ylabel("time to first token (ms)")
  a1.set_title(f"Time to first token: {report.ttft_prompt(results)}")
  a2.bar(names, [s["tpot_s"] * 1e3 for s in rows], color="tab:orange")
  a2.set_ylabel("per-token latency (ms)")
  a2.set_title("Per-token latency (decode steps)")
  for ax in (a1, a2):
    ax.set_xlabel("strategy (cold cache at the request's start)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
  return _save(fig, path)


def trace_volume(runs: list[dict], path: Path) -> Path:
  """Validation recall@k (solid) and @2k (dashed) of each family against its training tokens."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for family in dict.fromkeys(r["family"] for r in runs):
    rs = sorted((r for r in runs if r["family"] == family), key=lambda r: r["train_tokens"])
    x = [r["train_tokens"] for r in rs]
    line, = ax.plot(x, [r["recall_k"] for r in rs], "o-", label=f"{family} recall@k")
    ax.plot(x, [r["recall_2k"] for r in rs], "o--", color=line.get_color(), label=f"{family} recall@2k")
  ax.set_xscale("log")
  _recall_axes(ax, "training tokens (traced)", "validation recall",
               "Token-driven predictors: recall against trace volume")
  return _save(fig, path)


def recall_by_distance(comparison: dict, path: Path) -> Path | None:
  """Recall@k against the distance in layers (`eval.compare_predictors.by_distance`): a line per
  hidden-state predictor; token families and popularity, which read no hidden state, as dashed levels."""
  table = comparison.get("by_distance") or []
  if not table:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for e, color in zip(table, itertools.cycle(STARS)):
    if e["family"] in ("next_gate", "cross_layer"):
      points = sorted((int(d), c["recall_k_avg"]) for d, c in e["distance"].items()
                      if c["recall_k_avg"] is not None)
      ax.plot([d for d, _ in points], [r for _, r in points], "o-", color=color, label=e["predictor"])
    elif e["input"] is not None:
      ax.axhline(e["input"]["recall_k_avg"], color=color, ls="--", lw=1,
                 label=f"{e['predictor']} (all layers)")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  _recall_axes(ax, "distance d: layers ahead of the hidden state", f"recall@{comparison['meta']['top_k']}",
               "Routing predictors: recall by distance")
  return _save(fig, path)


def write_all(results: dict, out_dir: Path) -> list[Path]:
  """Every plot the results support, as PNGs in out_dir."""
  makers = {"speedup_vs_recall.png": speedup_vs_recall, "per_layer_recall.png": per_layer_recall,
            "timeline.png": timeline, "latency.png": latency_per_strategy}
  return [p for name, make in makers.items() if (p := make(results, out_dir / name)) is not None]
