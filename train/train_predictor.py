"""Train a routing predictor on collected traces (Optax AdamW, warmup + cosine, early stopping on
validation recall, Orbax checkpoints with resume) and save it where `load_predictor` finds it.

  python -m train.train_predictor --traces runs/small/traces --family context --out runs/small/pred/context
  python -m train.train_predictor --traces runs/small/traces --family token_mlp --lead 2 --out runs/small/pred/v2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from eval import cli
from jaxmoe.predictor.models import FAMILIES, LOSSES, TOKEN_FAMILIES
from jaxmoe.predictor.store import load_predictor
from jaxmoe.predictor.training import DEFAULT_HPARAMS, train_predictor

__all__ = ["train_predictor", "load_predictor", "main"]


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, checked before any work (argparse's one-line error, exit status 2)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--traces", required=True, help="traces directory (train/collect_traces.py)")
  p.add_argument("--family", required=True, choices=FAMILIES, help="predictor family")
  p.add_argument("--out", required=True, help="predictor directory to write (resumed if present)")
  p.add_argument("--loss", default="auto", choices=("auto",) + LOSSES,
                 help="auto: train with each loss, keep the best validation recall@k")
  p.add_argument("--hparams", default="{}",
                 help=f"JSON overrides of the family's sizes; defaults: {json.dumps(DEFAULT_HPARAMS)}")
  p.add_argument("--lead", type=cli.int_at_least(0), default=None,
                 help="token families: predict the routing of the token this many positions after the last "
                      "one read (default 0: the scored tokens' own; ProgramEngine plans with it inside the "
                      "step); 2: ProgramEngine's host plans, which can copy experts ahead")
  p.add_argument("--steps", type=cli.positive_int, default=2000, help="optimizer steps (the schedule's length)")
  p.add_argument("--batch-tokens", type=cli.positive_int, default=4096, help="tokens per step")
  p.add_argument("--lr", type=cli.positive_float, default=3e-3, help="peak learning rate")
  p.add_argument("--warmup", type=cli.int_at_least(0), default=100, help="linear warmup steps")
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--val-fraction", type=float, default=0.1, help="documents held out for validation")
  p.add_argument("--eval-every", type=cli.positive_int, default=100,
                 help="validate (and checkpoint) every N steps")
  p.add_argument("--patience", type=cli.positive_int, default=5,
                 help="stop after N validations without improvement")
  p.add_argument("--train-tokens", type=cli.positive_int, default=None,
                 help="train on only the first ~N tokens of the training split (validation unchanged): "
                      "one point of a learning curve over trace volume")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
  p.add_argument("--no-progress", action="store_true")
  a = p.parse_args(argv)
  if not os.path.isfile(os.path.join(a.traces, "manifest.json")):
    p.error(f"--traces {a.traces}: no traces there (no manifest.json; train/collect_traces.py writes them)")
  if not 0 < a.val_fraction < 1:
    p.error(f"--val-fraction must lie in (0, 1), got {a.val_fraction}")
  try:
    a.hparams = json.loads(a.hparams)
  except json.JSONDecodeError as e:
    p.error(f"--hparams is not JSON: {e}")
  if not isinstance(a.hparams, dict):
    p.error(f"--hparams must be a JSON object, got {a.hparams!r}")
  if a.lead is not None:
    if a.family not in TOKEN_FAMILIES:
      p.error(f"--lead is for the token families {TOKEN_FAMILIES}, not {a.family}")
    a.hparams["lead"] = a.lead
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  info = train_predictor(a.traces, a.family, a.out, loss=a.loss, hparams=a.hparams, steps=a.steps,
                         batch_tokens=a.batch_tokens, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
                         val_fraction=a.val_fraction, eval_every=a.eval_every, patience=a.patience,
                         seed=a.seed, resume=not a.no_resume, progress=not a.no_progress,
                         train_tokens=a.train_tokens)
  val = info["val"]["per_budget"]
  print(f"{a.family} ({info['loss']} loss, {info['params']:,} params, "
        f"{info['train']['train_tokens']:,} training tokens): validation " +
        ", ".join(f"recall@{m} {v['recall_avg']:.4f}" for m, v in val.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
