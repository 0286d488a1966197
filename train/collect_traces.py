"""Collect routing traces: run an MoE model over a token corpus and save, per token and layer, the routed
experts, router probabilities and hidden states (the data the routing predictors learn from).

  python -m train.collect_traces --run-dir runs/small --out runs/small/traces_val --split val
  python -m train.collect_traces --preset tiny --out /tmp/traces          # random model and tokens
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from eval import cli
from jaxmoe import config as config_lib, model as model_lib
from jaxmoe.predictor.data import batches, collect_traces, token_rows

__all__ = ["collect_traces", "corpus", "main"]


def corpus(run_dir: str | None, tokens_file: str | None, split: str, vocab_size: int, n_tokens: int,
           seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(tokens [N], doc ids [N] or None, description): a .npy token file, the run directory's tokenized
  corpus (documents end with EOS), or uniform random tokens."""
  if tokens_file:
    return np.load(tokens_file).reshape(-1), None, f"file:{os.path.abspath(tokens_file)}"
  path = run_dir and os.path.join(run_dir, "data", f"{split}_tokens.npy")
  if path and os.path.exists(path):
    tokens = np.load(path).reshape(-1)
    try:  # documents are separated by the tokenizer's EOS token
      from train.data import EOS, load_tokenizer
      eos = load_tokenizer(run_dir).token_to_id(EOS)
    except (ImportError, FileNotFoundError):
      eos = None
    docs = None if eos is None else np.concatenate([[0], np.cumsum(tokens[:-1] == eos)])
    return tokens, docs, f"run:{os.path.abspath(run_dir)}:{split}"
  return (np.random.default_rng(seed).integers(0, vocab_size, n_tokens), None, f"random:seed={seed}")


def load(run_dir: str | None, preset: str, seed: int):
  """(cfg, model): the trained model of a run directory, else a randomly initialised preset."""
  if run_dir:
    from jaxmoe import checkpoint  # the trained model's loader
    return checkpoint.load_model(run_dir)
  cfg = config_lib.preset(preset)
  return cfg, model_lib.create(cfg, seed)


def _hidden_layers(text: str) -> str | list[int]:
  """An argparse type: 'all', 'none' or comma-separated layer ids."""
  if text in ("all", "none"):
    return text
  layer = cli.int_at_least(0)
  return [layer(i) for i in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, checked before the model is loaded (argparse's one-line error, exit status 2)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="traces directory to write")
  p.add_argument("--run-dir", help="trained model run directory (its checkpoint and tokenized corpus), or "
                                    "a main job's output directory (its model/ inside)")
  p.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS),
                 help="without --run-dir: a randomly initialised preset")
  p.add_argument("--tokens", help="a .npy file of [N] token ids (default: the run's corpus, else random)")
  p.add_argument("--split", default="train", choices=["train", "val"], help="which corpus stream")
  p.add_argument("--seq-len", type=cli.positive_int, default=256, help="tokens per traced sequence")
  p.add_argument("--max-tokens", type=cli.positive_int, default=131072, help="trace at most this many tokens")
  p.add_argument("--batch-rows", type=cli.positive_int, default=8, help="sequences per forward pass")
  p.add_argument("--hidden-layers", type=_hidden_layers, default="all",
                 help="'all', 'none' or comma-separated layer ids")
  p.add_argument("--seed", type=int, default=0, help="random model / random tokens")
  a = p.parse_args(argv)
  if a.run_dir:
    a.run_dir = str(cli.model_run_dir(a.run_dir))
  if a.run_dir and not os.path.isdir(a.run_dir):
    p.error(f"--run-dir {a.run_dir}: no such directory")
  if a.tokens and not os.path.isfile(a.tokens):
    p.error(f"--tokens {a.tokens}: no such file")
  if a.max_tokens < a.seq_len:
    p.error(f"--max-tokens {a.max_tokens} is less than one sequence of --seq-len {a.seq_len}")
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  cfg, model = load(a.run_dir, a.preset, a.seed)
  tokens, docs, source = corpus(a.run_dir, a.tokens, a.split, cfg.vocab_size, a.max_tokens, a.seed)
  seq_len = min(a.seq_len, cfg.max_seq_len)
  rows, row_docs = token_rows(tokens, seq_len, max_rows=a.max_tokens // seq_len, doc_ids=docs)
  hidden = a.hidden_layers
  manifest = collect_traces(model, batches(rows, row_docs, a.batch_rows), a.out, hidden_layers=hidden,
                            source={"corpus": source, "model": a.run_dir or f"preset:{a.preset}"},
                            total=-(-len(rows) // a.batch_rows))
  print(f"wrote {manifest['n_tokens']:,} tokens x {manifest['n_layers']} layers to {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
