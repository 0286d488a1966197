"""What a better plan could save in bytes: decode MiB per token by plan recall and plan horizon.

Prefetching only hides the bytes of routed experts that are not cached; eviction decides how many
there are. This measures the caching part alone: engine v2 with plans that only evict (misses read in
place, nothing copied ahead), on held-out prompts of a trained model, for

  on_demand, lru         the references (no plan)
  learned                the trained lead-0 token predictor planning inside each step (--predictor),
                         with the recall its plans reached on the generated tokens
  noisy_oracle r, h      the true routing with recall r (each routed expert kept with probability r,
                         else replaced by a wrong one), whose eviction knows the step being served and
                         the h steps after it (h = 0: that step only, what an in-step plan knows;
                         h = 16: Belady's MIN at recall 1 for these requests)

Bytes depend only on the routing and the policy, not on the machine: the CPU gives the GPU's figures
for the same model and prompts. Every row's tokens are checked against the all-resident run.

  python -m eval.caching_headroom runs/small                    # a main job's output directory
  python -m eval.caching_headroom runs/gpu --cache-fraction 0.1 --horizons 0,1,2,4,16

Writes results.json, table.md and bytes_by_recall.png to --out (default RUN/caching_headroom) and
prints the table last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from eval import cli, pipeline
from jaxmoe.offload import strategies
from jaxmoe.offload.program import ProgramEngine
from jaxmoe.offload.store import ExpertStore
from jaxmoe.predictor import load_predictor

MIB = 2**20


def held_out_prompts(cfg, model_dir: Path, n: int, length: int, spacing: int = 2000) -> list[np.ndarray]:
  """n prompts [1, length] from the run's validation text, `spacing` tokens apart (random ids when the
  model came without a corpus)."""
  tokens = pipeline.corpus_tokens(cfg, model_dir, "val", n * spacing, seed=5)
  return [tokens[None, i * spacing:i * spacing + length].astype(np.int32) for i in range(n)]


def plan_recall(stats) -> float | None:
  """Share of the decode steps' routed experts that the step's plan named (None: no plans)."""
  found = total = 0
  for routed, planned in zip(stats.routing[1:], stats.plans[1:]):
    for r, p in zip(routed, planned or []):
      found += len(set(r) & set(p))
      total += len(r)
  return found / total if total and any(stats.plans[1:]) else None


def measure(model, predictor, *, cache_fraction: float, recalls, horizons, prompts, new_tokens: int,
            progress: bool = True) -> dict:
  """Every row's decode MiB per token and decode hit rate (means over `prompts`) and, for `learned`,
  its plans' recall."""
  cfg = model.cfg
  store = ExpertStore.from_model(model)
  cache_bytes = int(cache_fraction * store.nbytes)
  resident = ProgramEngine(model, strategy="resident", store=store)
  refs = [resident.generate(p, new_tokens) for p in prompts]
  del resident
  specs = [("on_demand", None, None), ("lru", None, None)]
  if predictor is not None:
    specs.append(("learned", None, 0))
  specs += [("noisy_oracle", r, h) for h in horizons for r in recalls]
  rows = []
  for name, recall, horizon in tqdm(specs, desc="plans", disable=not progress):
    engine, mib, hits, found = None, [], [], []
    for i, (prompt, (want, ref)) in enumerate(zip(prompts, refs)):
      if engine is None or name == "noisy_oracle":  # an oracle replays one request's routing
        strategy = (strategies.make(name, n_experts=cfg.n_experts, routing=refs[i][1].routing, recall=recall,
                                    seed=i, horizon=horizon) if name == "noisy_oracle" else
                    strategies.make(name, n_experts=cfg.n_experts, predictor=predictor))
        engine = ProgramEngine(model, cache_bytes=cache_bytes, strategy=strategy, store=store, plan_copies=False)
      tokens, stats = engine.generate(prompt, new_tokens)
      if not (np.array_equal(tokens, want) and np.array_equal(stats.logits, ref.logits)):
        raise AssertionError(f"{name} (recall {recall}, horizon {horizon}) generated other tokens or logits "
                             "than the all-resident run: the engine is not exact")
      engine.reset_cache()
      read = sum(stats.step_read_bytes[1:])  # every decode miss is read in place, nothing copied
      routed = sum(len(experts) for step in stats.routing[1:] for experts in step)
      mib.append(read / (new_tokens - 1) / MIB)
      hits.append(1.0 - read / store.expert_bytes / routed)
      if name == "learned":
        found.append(plan_recall(stats))
    rows.append({"name": name, "recall": recall, "horizon": horizon, "mib_per_token": float(np.mean(mib)),
                 "mib_per_token_each": mib, "hit_rate": float(np.mean(hits)),
                 "plan_recall": float(np.mean(found)) if found and None not in found else None})
  lru = next(r["mib_per_token"] for r in rows if r["name"] == "lru")
  for r in rows:
    r["vs_lru"] = r["mib_per_token"] / lru if lru else None
  return {"rows": rows, "cache_bytes": cache_bytes, "expert_bytes": store.expert_bytes,
          "n_slots": engine.n_slots if engine else None}


def table(res: dict) -> str:
  lines = ["| plan | recall | horizon (steps known past the served one) | decode MiB / token | x lru | decode hit rate |",
           "|---|---|---|---|---|---|"]
  for r in res["rows"]:
    recall = r["plan_recall"] if r["name"] == "learned" else r["recall"]
    name = "learned (in-step plan)" if r["name"] == "learned" else r["name"]
    lines.append(f"| {name} | {'-' if recall is None else f'{recall:.2f}'} | "
                 f"{'-' if r['horizon'] is None else r['horizon']} | {r['mib_per_token']:.3f} | "
                 f"{r['vs_lru']:.2f} | {r['hit_rate']:.3f} |")
  return "\n".join(lines)


def plot(res: dict, path: Path) -> Path:
  from eval import plots
  import matplotlib.pyplot as plt
  rows = res["rows"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for h, color in zip(sorted({r["horizon"] for r in rows if r["name"] == "noisy_oracle"}), plots.STARS):
    pts = sorted((r["recall"], r["mib_per_token"]) for r in rows if r["name"] == "noisy_oracle" and r["horizon"] == h)
    ax.plot(*zip(*pts), "o-", color=color, label=f"noisy oracle, knows {h} step(s) ahead")
  for r, style in zip([r for r in rows if r["name"] in ("lru", "on_demand")], ("--", ":")):
    ax.axhline(r["mib_per_token"], color="grey", ls=style, lw=1, label=r["name"])
  for r in rows:
    if r["name"] == "learned" and r["plan_recall"] is not None:
      ax.scatter([r["plan_recall"]], [r["mib_per_token"]], marker="*", s=160, color="black", zorder=3,
                 label="learned (in-step plan)")
  ax.set_xlabel("plan recall (share of routed experts the plan named)")
  ax.set_ylabel("decode MiB per token read from host")
  ax.set_ylim(bottom=0)
  ax.set_title("What eviction from a plan saves")
  ax.legend(fontsize=7)
  return plots._save(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run", help="a main job's output directory (its model/ and predictors/ inside) or a model "
                             "run directory of train.train_model")
  p.add_argument("--predictor", default=None,
                 help="a lead-0 token predictor directory for the learned row (default: RUN/predictors/context "
                      "if present; 'none' leaves the row out)")
  p.add_argument("--cache-fraction", type=cli.fraction, default=0.25,
                 help="device expert cache as a fraction of all experts' bytes (default 0.25)")
  p.add_argument("--recalls", type=cli.fraction_list, default=(0.25, 0.5, 0.75, 1.0),
                 help="noisy-oracle recalls, comma-separated (default 0.25,0.5,0.75,1.0)")
  p.add_argument("--horizons", type=lambda t: tuple(cli.int_at_least(0)(x) for x in t.split(",") if x.strip()),
                 default=(0, 1, 16),
                 help="steps past the one served that the noisy oracle's eviction knows, comma-separated "
                      "(default 0,1,16)")
  p.add_argument("--prompts", type=cli.positive_int, default=8, help="held-out prompts (default 8)")
  p.add_argument("--prompt-length", type=cli.positive_int, default=16, help="tokens per prompt (default 16)")
  p.add_argument("--new-tokens", type=cli.int_at_least(2), default=24,
                 help="tokens generated per prompt; the first (the prompt's step) is left out (default 24)")
  p.add_argument("--out", default=None, help="output directory (default RUN/caching_headroom)")
  args = p.parse_args(argv)
  if not args.horizons:
    p.error("--horizons: give at least one integer >= 0")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  run = Path(args.run)
  model_dir = cli.model_run_dir(run)
  if not model_dir.is_dir():
    raise SystemExit(f"{run}: no such directory (a main job's output or a model run directory)")
  cfg, model = pipeline.load_for_serving(model_dir)
  pred_dir = args.predictor or (str(run / "predictors" / "context") if (run / "predictors" / "context").is_dir()
                                else "none")
  predictor = None if pred_dir == "none" else load_predictor(pred_dir)
  if predictor is not None and getattr(predictor, "lead", 0) != 0:
    raise SystemExit(f"{pred_dir}: the in-step plan needs a lead-0 token predictor, this one has lead "
                     f"{predictor.lead}")
  slots = int(args.cache_fraction * cfg.n_layers * cfg.n_experts)
  needed = min(args.prompt_length * cfg.top_k, cfg.n_experts)  # one layer of the prompt, at once
  if slots < needed:
    raise SystemExit(f"error: --cache-fraction {args.cache_fraction:g} holds {slots} experts, but a layer of a "
                     f"{args.prompt_length}-token prompt can route {needed}: give a larger fraction or a "
                     "shorter --prompt-length")
  prompts = held_out_prompts(cfg, model_dir, args.prompts, args.prompt_length)
  res = measure(model, predictor, cache_fraction=args.cache_fraction, recalls=args.recalls,
                horizons=args.horizons, prompts=prompts, new_tokens=args.new_tokens)
  res["settings"] = {"run": str(run), "predictor": pred_dir, "cache_fraction": args.cache_fraction,
                     "prompts": args.prompts, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
                     "commit": pipeline.git_commit()}
  out = Path(args.out) if args.out else run / "caching_headroom"
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(res, indent=1))
  text = table(res)
  (out / "table.md").write_text(text + "\n")
  plot(res, out / "bytes_by_recall.png")
  print(f"{cfg.n_layers} layers x {cfg.n_experts} experts top-{cfg.top_k}, cache {args.cache_fraction:.0%} "
        f"({res['n_slots']} slots), {args.prompts} prompts of {args.prompt_length}, {args.new_tokens} new tokens; "
        f"written to {out}")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
