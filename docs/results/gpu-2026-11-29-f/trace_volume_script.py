"""Learning curve of the token-driven predictors over trace volume, on a freshly trained model.

  PYTHONPATH=. python3 trace_volume.py PRESET WORKDIR STEPS [TRAIN_TOKENS ...]

Trains the preset's model as the main job does (eval.pipeline.stage_model), traces the routing of its
whole tokenized training split (no hidden states: token_mlp and context need only token ids), then
trains token_mlp and context (BCE) on the first N training tokens for each N, all validated on the same
held-out rows (the last 10 % of the traced rows, at most 65,536 tokens). Prints one line per run and a
table last; writes WORKDIR/trace_volume.json.
"""
import json, sys, time
from pathlib import Path
import numpy as np
from eval import pipeline
from jaxmoe.predictor import data as traces_lib
from jaxmoe.predictor.training import train_predictor

preset, work, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
sizes = [int(x) for x in sys.argv[4:]] or [None]
t0 = time.time()
s = pipeline.settings_for(preset)
cfg, model, corpus_dir, summary = pipeline.stage_model(s, work, None, log=lambda m: print(m, flush=True))
print(f"[{time.time() - t0:6.1f} s] model ready, ppl {summary and summary.get('val_ppl')}", flush=True)
seq = min(s.trace_seq_len, cfg.max_seq_len)
full = np.load(corpus_dir / "data" / "train_tokens.npy").reshape(-1)
rows, docs = traces_lib.token_rows(full, seq)
tdir = work / "traces_all"
if not (tdir / "manifest.json").exists():
  traces_lib.collect_traces(model, traces_lib.batches(rows, docs, 32), str(tdir), hidden_layers="none",
                            total=-(-len(rows) // 32), progress=False)
print(f"[{time.time() - t0:6.1f} s] traced {rows.size:,} tokens", flush=True)
results = []
for size in sizes:
  for family in ("context", "token_mlp"):
    t1 = time.time()
    info = train_predictor(str(tdir), family, str(work / f"pred_{family}_{size}"), loss="bce", steps=steps,
                           eval_every=max(25, steps // 12), warmup=min(100, steps // 10), progress=False,
                           train_tokens=size)
    pb = info["val"]["per_budget"]
    r = {"family": family, "train_tokens": info["train"]["train_tokens"], "steps": info["steps_trained"],
         **{f"recall@{m}": v["recall_avg"] for m, v in pb.items()}, "seconds": round(time.time() - t1, 1)}
    results.append(r)
    print(f"[{time.time() - t0:6.1f} s] {r}", flush=True)
    (work / "trace_volume.json").write_text(json.dumps({"preset": preset, "traced_tokens": int(rows.size),
                                                        "steps": steps, "runs": results}, indent=1))
print(f"\n{'family':10s} {'train tokens':>13s} {'steps':>6s} " + " ".join(f"{k:>9s}" for k in results[0] if k.startswith("recall")))
for r in results:
  print(f"{r['family']:10s} {r['train_tokens']:>13,d} {r['steps']:>6d} " + " ".join(f"{r[k]:9.4f}" for k in r if k.startswith("recall")))
