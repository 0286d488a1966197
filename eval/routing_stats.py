"""Routing statistics of a traces directory: per-layer load balance, expert repetition across layers and
across tokens (the hit rate of a cache of the last w tokens' experts), and next-gate recall by distance.

  python -m eval.routing_stats --traces runs/small/traces                  # writes runs/small/traces/routing_stats
  python -m eval.routing_stats --traces /tmp/traces --out /tmp/rs --windows 1,2,4,8,16 --distances 1,2,4

Each row of a traces directory is one sequence: temporal repetition never looks across rows. Next-gate
recall needs the hidden states the traces kept (train/collect_traces.py --hidden-layers); without them
that column is left out. Writes OUT/stats.json, OUT/routing_stats.md and OUT/routing_stats.png (repetition
against distance and window, one line per layer); prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from eval import plots
from jaxmoe.predictor import data as traces_lib, routing_stats

plt = plots.plt  # the Agg backend is chosen where eval.plots imports matplotlib


def _ints(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    p.error(f"{flag}: expected comma-separated positive integers, got {text!r}")
  return sorted(set(values))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--traces", required=True, help="traces directory written by train/collect_traces.py")
  p.add_argument("--out", default=None, help="output directory (default: TRACES/routing_stats)")
  p.add_argument("--distances", default="1,2,3",
                 help="comma-separated layer distances d for cross-layer repetition and next-gate recall")
  p.add_argument("--windows", default="1,4,16",
                 help="comma-separated windows w: previous tokens whose experts a per-layer cache holds")
  p.add_argument("--max-tokens", type=int, default=None,
                 help="use only the first whole rows holding at most this many tokens (default: all)")
  a = p.parse_args(argv)
  if not os.path.isfile(os.path.join(a.traces, "manifest.json")):
    p.error(f"--traces {a.traces} is not a traces directory (no manifest.json); "
            "write one with python -m train.collect_traces")
  if a.max_tokens is not None and a.max_tokens < 1:
    p.error("--max-tokens must be positive")
  a.distances = _ints(p, "--distances", a.distances)
  a.windows = _ints(p, "--windows", a.windows)
  return a


def _cell(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def _columns(stats: dict) -> list[tuple[str, list]]:
  """(header, per-layer values) of every column of the table."""
  cols = [("load entropy", stats["load_entropy"]), ("max share", stats["max_share"])]
  cols += [(f"cross-layer d={d}", stats["cross_layer"][str(d)]) for d in stats["distances"]]
  cols += [(f"temporal w={w}", stats["temporal"][str(w)]) for w in stats["windows"]]
  if stats["next_gate"] is not None:
    cols += [(f"next-gate d={d}", stats["next_gate"][str(d)]) for d in stats["distances"]]
  return cols


def _chance(stats: dict, header: str):
  """What a uniformly random router would show in that column (None where it means nothing)."""
  c = stats["chance"]
  if header == "max share":
    return c["max_share"]
  if header.startswith(("cross-layer", "next-gate")):
    return c["cross_layer"]
  if header.startswith("temporal"):
    return c["temporal"][header.split("=")[1]]
  return 1.0  # load entropy of a uniform router


def _mean(values: list):
  kept = [v for v in values if v is not None]
  return sum(kept) / len(kept) if kept else None


def markdown(stats: dict) -> str:
  cols = _columns(stats)
  lines = [f"Routing statistics of {stats['n_tokens']:,} traced tokens ({stats['n_sequences']} sequences of "
           f"{stats['seq_len']}); E={stats['n_experts']} experts, k={stats['top_k']}. Repetition: mean share "
           f"of a token's k experts found at layer l+d (cross-layer), among the previous w tokens' experts "
           f"(temporal), or in layer l+d's router applied to the state entering l (next-gate recall@k).",
           "", "| layer | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for l in range(stats["n_layers"]):
    lines.append(f"| {l} | " + " | ".join(_cell(vals[l]) for _, vals in cols) + " |")
  lines.append("| mean | " + " | ".join(_cell(_mean(vals)) for _, vals in cols) + " |")
  lines.append("| chance | " + " | ".join(_cell(_chance(stats, h)) for h, _ in cols) + " |")
  return "\n".join(lines)


def plot(stats: dict, path: Path) -> Path:
  """Repetition against distance (cross-layer, next-gate) and window (temporal), one line per layer."""
  panels = [("cross_layer", "distances", "layer distance d", "cross-layer repetition"),
            ("temporal", "windows", "window w (previous tokens)", "temporal repetition (cache hit rate)")]
  if stats["next_gate"] is not None:
    panels.append(("next_gate", "distances", "layer distance d", "next-gate recall@k"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (key, axis, xlabel, title) in zip(axes[0], panels):
    xs = stats[axis]
    for l in range(stats["n_layers"]):
      pts = [(x, stats[key][str(x)][l]) for x in xs if stats[key][str(x)][l] is not None]
      if pts:
        ax.plot(*zip(*pts), "o-", ms=3, lw=1, label=f"layer {l}")
    chance = [stats["chance"]["temporal"][str(x)] if key == "temporal" else stats["chance"]["cross_layer"]
              for x in xs]
    ax.plot(xs, chance, "k--", lw=1, label="random router")
    if key == "temporal":
      ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    plots._recall_axes(ax, xlabel, "share of a token's k experts", title)
  return plots._save(fig, path)


def main(argv=None) -> int:
  a = parse_args(argv)
  out = Path(a.out or os.path.join(a.traces, "routing_stats"))
  traces = traces_lib.load_traces(a.traces)
  stats = routing_stats.trace_stats(traces, distances=a.distances, windows=a.windows, max_tokens=a.max_tokens)
  out.mkdir(parents=True, exist_ok=True)
  (out / "stats.json").write_text(json.dumps(stats, indent=2))
  table = markdown(stats)
  (out / "routing_stats.md").write_text(table + "\n")
  plot(stats, out / "routing_stats.png")
  print(table)
  print(f"\nwrote {out / 'stats.json'}, routing_stats.md and routing_stats.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
