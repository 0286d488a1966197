"""Learning curve of the token-driven routing predictors over trace volume: does more traced data help?

Takes the main job's model (trained into OUT/model as `eval.run` does, or reused from there or from
--model), traces the routing of its tokenized training split (token ids, experts and router
probabilities; no hidden states, which only `cross_layer` needs), then trains each family on the first
N training tokens for every N asked for. Every run is validated on the same held-out rows (the last
10 % of the traced rows), so the recalls are comparable.

  python -m eval.trace_volume --preset gpu --out runs/gpu            # reuses the main job's model there
  python -m eval.trace_volume --model runs/small/model --train-tokens 32768,131072,all --out /tmp/tv

Writes OUT/trace_volume/trace_volume.json, trace_volume.md and trace_volume.png (validation recall@k
and @2k against training tokens); prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from eval import cli, pipeline, plots
from jaxmoe.predictor import data as traces_lib
from jaxmoe.predictor.training import train_predictor

TOKEN_FAMILIES = ("context", "token_mlp")


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, checked before any work (argparse's one-line error, exit status 2)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None, choices=sorted(pipeline.RUN_PRESETS),
                 help="model size when one is trained, and the traced sequence length "
                      "(default: gpu on a GPU, small otherwise)")
  p.add_argument("--model", default=None,
                 help="a run directory of train.train_model or a main job's output directory (its tokenized "
                      "corpus is traced); default: the model in OUT/model, trained there first as the main "
                      "job does if missing")
  p.add_argument("--data", default=None, help="training text when a model is trained (as in eval.run)")
  p.add_argument("--train-minutes", type=cli.positive_float, default=None,
                 help="wall-clock budget when a model is trained (default: the preset's)")
  p.add_argument("--train-tokens", type=_sizes, default="131072,524288,all",
                 help="comma-separated training-set sizes in tokens; 'all' is the whole training split")
  p.add_argument("--families", default=",".join(TOKEN_FAMILIES),
                 help=f"comma-separated token-driven families, of {','.join(TOKEN_FAMILIES)}")
  p.add_argument("--steps", type=cli.positive_int, default=3000,
                 help="optimizer steps per run (BCE, early stopping)")
  p.add_argument("--max-tokens", type=cli.positive_int, default=None,
                 help="trace at most this many tokens of the training split (default: all of it)")
  p.add_argument("--out", default=None, help="output directory (default runs/<preset>)")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bars for tracing and predictor training")
  a = p.parse_args(argv)
  a.families = [f.strip() for f in a.families.split(",") if f.strip()]
  bad = [f for f in a.families if f not in TOKEN_FAMILIES]
  if bad or not a.families:
    p.error(f"--families: {bad or 'none given'}; this curve covers the token-driven families "
            f"{', '.join(TOKEN_FAMILIES)} (cross_layer needs hidden states of every traced token)")
  if a.model and not Path(a.model).is_dir():
    p.error(f"--model {a.model}: no such directory")
  return a


def _sizes(text: str) -> list[int | None]:
  """An argparse type: comma-separated positive token counts or 'all' (None)."""
  sizes = []
  for part in text.split(","):
    part = part.strip()
    if part == "all":
      sizes.append(None)
    elif part.isdigit() and int(part) > 0:
      sizes.append(int(part))
    else:
      raise argparse.ArgumentTypeError(f"{part!r} is neither a positive token count nor 'all'")
  return sizes


def main(argv=None) -> int:
  a = parse_args(argv)
  sizes, families = a.train_tokens, a.families
  settings = pipeline.settings_for(a.preset, train_minutes=a.train_minutes)
  out = Path(a.out or f"runs/{settings.preset}")
  work = out / "trace_volume"
  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)
  cfg, model, corpus_dir, _ = pipeline.stage_model(settings, out, a.model, data=a.data, log=log)
  split = corpus_dir and corpus_dir / "data" / "train_tokens.npy"
  if not split or not split.exists():
    raise FileNotFoundError("the learning curve needs the model's tokenized training corpus "
                            "(data/train_tokens.npy of a train.train_model run directory); "
                            f"{a.model or out / cli.MODEL_SUBDIR} has none")
  tokens = np.load(split).reshape(-1)[: a.max_tokens]
  seq = min(settings.trace_seq_len, cfg.max_seq_len)
  rows, docs = traces_lib.token_rows(tokens, seq)
  traces_dir = work / "traces"
  if (traces_dir / "manifest.json").exists():
    log(f"reusing the traces in {traces_dir}")
  else:
    log(f"tracing the routing of {rows.size:,} tokens")
    traces_lib.collect_traces(model, traces_lib.batches(rows, docs, 32), str(traces_dir), hidden_layers="none",
                              source={"corpus": str(corpus_dir), "model": settings.preset},
                              total=-(-len(rows) // 32), progress=not a.no_progress)
  runs = []
  for size in sizes:
    for family in families:
      name = f"{family}_{size or 'all'}"
      log(f"training {family} on {'all' if size is None else f'{size:,}'} tokens")
      info = train_predictor(str(traces_dir), family, str(work / "predictors" / name), loss="bce",
                             steps=a.steps, eval_every=max(25, a.steps // 12), warmup=min(100, a.steps // 10),
                             train_tokens=size, progress=not a.no_progress)
      budgets = info["val"]["per_budget"]
      ks = sorted(budgets, key=int)  # k and 2k (one key when 2k is clipped to E = k)
      k, k2 = ks[0], ks[-1]
      runs.append({"family": family, "train_tokens": info["train"]["train_tokens"],
                   "steps_trained": info["steps_trained"], "k": int(k), "recall_k": budgets[k]["recall_avg"],
                   "recall_2k": budgets[k2]["recall_avg"]})
  result = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "commit": pipeline.git_commit(), "backend": jax.default_backend(),
                     "preset": settings.preset, "traced_tokens": int(rows.size), "seq_len": seq,
                     "steps": a.steps, "wall_s": round(time.perf_counter() - t0, 1)},
            "runs": runs}
  (work / "trace_volume.json").write_text(json.dumps(result, indent=2))
  table = markdown(result)
  (work / "trace_volume.md").write_text(table + "\n")
  plots.trace_volume(runs, work / "trace_volume.png")
  print("\n" + table)
  print(f"\nwrote {work / 'trace_volume.json'}, trace_volume.md and trace_volume.png")
  return 0


def markdown(result: dict) -> str:
  m = result["meta"]
  lines = [f"Learning curve over trace volume: preset `{m['preset']}`, {m['traced_tokens']:,} traced tokens "
           f"({m['seq_len']}-token rows), up to {m['steps']} BCE steps per run; {m['date']}, commit "
           f"`{m['commit']}`, backend {m['backend']}. Validation: the same held-out rows for every run.",
           "", "| family | training tokens | steps | recall@k | recall@2k |", "|---|---|---|---|---|"]
  for r in result["runs"]:
    lines.append(f"| {r['family']} | {r['train_tokens']:,} | {r['steps_trained']} | {r['recall_k']:.1%} | "
                 f"{r['recall_2k']:.1%} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
