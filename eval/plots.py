"""PNG plots of a main-job results dict: speedup vs recall, per-layer recall, copy/compute timeline,
latency per strategy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def speedup_vs_recall(results: dict, path: Path) -> Path | None:
  """The noisy-oracle sweep (TPOT speedup over on_demand vs recall) with each real strategy as a point."""
  sweep = results.get("noisy_oracle_sweep") or []
  strategies = {s["name"]: s for s in results.get("strategies", [])}
  base = strategies.get("on_demand")
  if not sweep or not base:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = [p["recall"] for p in sweep]
  ax.plot(xs, [base["tpot_s"] / p["tpot_s"] for p in sweep], "o-", label="noisy oracle")
  for name, s in strategies.items():
    if s.get("recall") is not None and name not in ("resident",):
      ax.scatter([s["recall"]], [base["tpot_s"] / s["tpot_s"]], marker="*", s=120, label=name, zorder=3)
  ax.axhline(1.0, color="grey", lw=0.8, ls="--")
  if "lru" in strategies:
    ax.axhline(base["tpot_s"] / strategies["lru"]["tpot_s"], color="tab:red", lw=0.8, ls=":", label="lru")
  ax.set_xlabel("recall of the prefetched experts (decode)")
  ax.set_ylabel("per-token speedup over on_demand")
  ax.set_title("Accuracy -> speedup")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def per_layer_recall(results: dict, path: Path) -> Path | None:
  """Recall@k per layer for each predictor family and baseline."""
  rows = [p for p in results.get("predictors", []) if p.get("recall_k")]
  if not rows:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for p in rows:
    layers = [(i, r) for i, r in enumerate(p["recall_k"]) if r is not None]  # None: no prediction there
    ax.plot([i for i, _ in layers], [r for _, r in layers], "o-", label=p["name"])
  ax.set_xlabel("layer")
  ax.set_ylabel("recall@k")
  ax.set_ylim(0, 1.02)
  ax.set_title("Per-layer recall of the routing predictors")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def timeline(results: dict, path: Path) -> Path | None:
  """Copies (issue -> ready) and layer compute intervals of one run, one row per layer."""
  tl = results.get("timeline")
  if not tl or not (tl.get("copies") or tl.get("compute")):
    return None
  fig, ax = plt.subplots(figsize=(9, 4))
  t0 = min([c["issue_s"] for c in tl.get("copies", [])] + [c["start_s"] for c in tl.get("compute", [])])
  for c in tl.get("compute", []):
    ax.plot([(c["start_s"] - t0) * 1e3, (c["end_s"] - t0) * 1e3], [c["layer"] - 0.15] * 2, color="tab:blue",
            lw=4, solid_capstyle="butt")
  for c in tl.get("copies", []):
    color = "tab:green" if c.get("prefetched") else "tab:red"
    ax.plot([(c["issue_s"] - t0) * 1e3, (c["ready_s"] - t0) * 1e3], [c["layer"] + 0.15] * 2, color=color,
            lw=2, solid_capstyle="butt")
  ax.set_xlabel("ms since the first event (host clock)")
  ax.set_ylabel("layer")
  ax.set_title(f"{tl.get('strategy', '')}: compute (blue), prefetch copies (green), on-demand copies (red)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def latency_per_strategy(results: dict, path: Path) -> Path | None:
  """TTFT and per-token latency bars per strategy."""
  rows = results.get("strategies", [])
  if not rows:
    return None
  names = [s["name"] for s in rows]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  a1.bar(names, [s["ttft_s"] * 1e3 for s in rows], color="tab:blue")
  a1.set_ylabel("time to first token (ms)")
  a2.bar(names, [s["tpot_s"] * 1e3 for s in rows], color="tab:orange")
  a2.set_ylabel("per-token latency (ms)")
  for ax in (a1, a2):
    ax.tick_params(axis="x", rotation=45, labelsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_all(results: dict, out_dir: Path) -> list[Path]:
  """Every plot the results support, as PNGs in out_dir."""
  makers = {"speedup_vs_recall.png": speedup_vs_recall, "per_layer_recall.png": per_layer_recall,
            "timeline.png": timeline, "latency.png": latency_per_strategy}
  return [p for name, make in makers.items() if (p := make(results, out_dir / name)) is not None]
