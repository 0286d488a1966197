"""The main job: train (or reuse) a model, learn its routing, run every offload strategy, write the report.

  python -m eval.run                         # the embedded default on this machine (CPU: small, GPU: gpu)
  python -m eval.run --preset tiny --out /tmp/r
  python -m eval.run --model runs/small/model --strategies on_demand,lru,learned --cache-fraction 0.5

Writes OUT/results.json, OUT/report.md and PNG plots, and prints the summary table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval import cli, pipeline, report


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, checked against the model's config before any work (argparse's one-line error
  and exit status 2 for a bad value); `settings` holds the run's pipeline.RunSettings."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None, choices=sorted(pipeline.RUN_PRESETS),
                 help="model and run sizes (default: gpu on a GPU, small otherwise)")
  p.add_argument("--model", default=None,
                 help="use this model instead of training one: a run directory of train.train_model (or "
                      "an earlier main job's output directory, its model/ inside), an Orbax checkpoint "
                      "directory, or a Hugging Face checkpoint directory")
  p.add_argument("--data", default=None,
                 help="training text for the model: a directory or file (.txt .md .rst .py .jsonl), a saved "
                      "datasets directory, or 'python' (the stdlib and every installed package's sources; "
                      "default: the preset's: python for gpu_fine, else this Python's standard library)")
  p.add_argument("--cache-fraction", type=cli.fraction, default=None,
                 help="device expert cache as a fraction of all experts' bytes (default 0.25)")
  p.add_argument("--strategies", default=None,
                 help=f"comma-separated offload strategies (default: all of {','.join(pipeline.STRATEGIES)})")
  p.add_argument("--prompt-lengths", type=cli.positive_int_list, default=None,
                 help="comma-separated prompt lengths in tokens for the time-to-first-token runs")
  p.add_argument("--new-tokens", type=cli.int_at_least(2), default=None, help="tokens generated per request")
  p.add_argument("--repeats", type=cli.positive_int, default=None,
                 help="timed requests per strategy and prompt, medians reported (default: 3; tiny preset 1)")
  p.add_argument("--noisy-recalls", type=lambda t: () if t.strip() == "none" else cli.fraction_list(t),
                 default=None,
                 help="recalls of the noisy-oracle sweep, comma-separated, or 'none' to skip it (default: "
                      "the preset's, e.g. 0.5,0.7,0.9,1.0 for gpu); it runs when oracle or learned does")
  p.add_argument("--plan-copies", type=cli.word(cli.PLAN_COPIES), default=None, metavar="{on,off,auto}",
                 help="engine v2, strategies with plans (oracle, noisy_oracle, learned): 'on' copies planned "
                      "experts ahead of their step, 'off' only evicts by the plan and reads routed misses "
                      "in place, 'auto' copies experts of at least "
                      f"{pipeline.program.MIN_COPY_BYTES / 2**20:g} MiB (below that a copy costs the host "
                      "more than PCIe needs for it; default)")
  p.add_argument("--command-buffers", choices=("on", "off"), default=None,
                 help="engine v2: 'on' compiles each step with XLA command buffers (CUDA graphs, the Pallas "
                      "kernels included), so the host launches a few graphs a step instead of every "
                      "kernel (default: off)")
  p.add_argument("--train-minutes", type=cli.positive_float, default=None,
                 help="wall-clock budget for training the model (default: the preset's)")
  p.add_argument("--out", default=None, help="output directory (default runs/<preset>)")
  p.add_argument("--no-trace", action="store_true", help="skip the profiler trace (copy/compute overlap)")
  a = p.parse_args(argv)
  try:
    a.settings = pipeline.settings_for(a.preset, cache_fraction=a.cache_fraction, strategies=a.strategies,
                                       prompt_lengths=a.prompt_lengths, new_tokens=a.new_tokens,
                                       train_minutes=a.train_minutes, repeats=a.repeats,
                                       noisy_recalls=a.noisy_recalls,
                                       plan_copies=a.plan_copies,
                                       command_buffers=None if a.command_buffers is None else
                                       a.command_buffers == "on",
                                       profile=not a.no_trace)
    from train import data as data_lib
    if a.data and a.data != data_lib.PYTHON and not a.model:  # a bad corpus is refused before training
      data_lib.load_documents(a.data)
    pipeline.check_fits(a.settings, pipeline.planned_config(a.settings.preset, a.model))
  except (OSError, ValueError, ImportError) as e:
    p.error(str(e))
  return a


def main(argv=None) -> int:
  a = parse_args(argv)
  out = Path(a.out or f"runs/{a.settings.preset}")
  try:
    results = pipeline.run(a.settings, out, model_path=a.model, data=a.data)
  except KeyboardInterrupt:  # training saved a resumable checkpoint and said so; no traceback
    print(f"\ninterrupted: run the same command again to go on from what {out} holds", file=sys.stderr)
    return 130
  print(report.summary_table(results))
  print(f"\nwrote {out / 'results.json'}, {out / 'report.md'} and plots")
  return 0


if __name__ == "__main__":
  sys.exit(main())
