"""Where the benchmarks write: a JSON and a markdown table in one folder per benchmark (under the
git-ignored runs/bench/ by default); the tracked docs/BENCHMARKS.md changes only when asked to.
"""

from __future__ import annotations

# nothing from jax here: bench_parallel uses this module before it sets up its backend
import argparse
import json
import os

DOCS = "docs/BENCHMARKS.md"


def add_arguments(p: argparse.ArgumentParser, name: str, section: str):
  """--out DIR (default runs/bench/<name>/) and --append-docs [PATH] (default off)."""
  p.add_argument("--out", default=os.path.join("runs", "bench", name),
                 help="folder for results.json and table.md (default %(default)s)")
  p.add_argument("--append-docs", nargs="?", const=DOCS, default=None, metavar="PATH",
                 help=f"also append the table to the '{section}' section of PATH (default {DOCS}); "
                      "off unless given")


def write(out_dir: str, result: dict, table: str) -> tuple[str, str]:
  """results.json and table.md in out_dir -> their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, md_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "table.md")
  with open(json_path, "w") as f:
    json.dump(result, f, indent=1)
  with open(md_path, "w") as f:
    f.write(table.rstrip("\n") + "\n")
  return json_path, md_path


def append_to_section(path: str, section: str, text: str):
  """Add `text` at the end of `section` (a "## " heading, created at the end if missing); the file's
  other sections are kept as they are."""
  existing = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  start = existing.find(section)
  if start < 0:
    existing, start = existing.rstrip("\n") + "\n\n" + section + "\n", len(existing.rstrip("\n")) + 2
  end = existing.find("\n## ", start + len(section))
  end = len(existing) if end < 0 else end + 1
  head = existing[:end].rstrip("\n") + "\n\n"
  with open(path, "w") as f:
    f.write(head + text.rstrip("\n") + "\n" + ("\n" + existing[end:] if end < len(existing) else ""))
