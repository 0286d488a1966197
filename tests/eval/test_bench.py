"""The benchmarks' CPU smoke modes write results.json and table.md under --out and leave the tracked
docs alone unless --append-docs names a file; GPU-only kernels are marked, not run, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import bench_files, bench_kernels, bench_offload, bench_parallel
from jaxmoe.offload import host_experts
from tests.cli_errors import refused

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / bench_files.DOCS


@pytest.fixture
def docs_untouched():
  """Fails the test if docs/BENCHMARKS.md changed while it ran."""
  before = (DOCS.stat().st_mtime_ns, DOCS.read_bytes())
  yield
  assert (DOCS.stat().st_mtime_ns, DOCS.read_bytes()) == before


def read_outputs(out: Path) -> tuple[dict, str]:
  assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.md"]
  return json.loads((out / "results.json").read_text()), (out / "table.md").read_text()


@pytest.mark.parametrize("module, name", [(bench_offload, "bench_offload"),
                                          (bench_parallel, "bench_parallel")])
def test_defaults_write_under_runs_bench_and_not_into_docs(module, name):
  args = module.parse_args([])
  assert args.out == os.path.join("runs", "bench", name) and args.append_docs is None
  assert module.parse_args(["--append-docs"]).append_docs == bench_files.DOCS


def test_bench_offload_quick_default_has_its_own_folder():
  assert bench_offload.parse_args(["--quick"]).out == os.path.join("runs", "bench", "bench_offload_quick")


def test_append_to_section_keeps_the_other_sections(tmp_path):
  md = tmp_path / "BENCHMARKS.md"
  md.write_text("# Benchmarks\n\n## Expert kernels\n\nkernels\n\n## Offload engine\n\nold run\n\n"
                "## Main job\n\nmain\n")
  bench_files.append_to_section(str(md), "## Offload engine", "new run\n")
  assert md.read_text() == ("# Benchmarks\n\n## Expert kernels\n\nkernels\n\n## Offload engine\n\n"
                            "old run\n\nnew run\n\n## Main job\n\nmain\n")
  bench_files.append_to_section(str(md), "## Expert-parallel engine", "two GPUs\n")
  assert md.read_text().endswith("main\n\n## Expert-parallel engine\n\ntwo GPUs\n")


@pytest.mark.slow
def test_bench_offload_cpu_smoke(tmp_path, docs_untouched):
  out, md = tmp_path / "out", tmp_path / "BENCHMARKS.md"
  md.write_text("# Benchmarks\n\n## Expert kernels\n\nkept as it was\n")
  result = bench_offload.main(["--preset", "tiny", "--quick", "--prompts", "4", "--budgets", "18.75",
                               "--strategies", "resident", "lru", "--decode-tokens", "2", "--no-profile",
                               "--no-compare-issue", "--out", str(out), "--append-docs", str(md)])
  written, table = read_outputs(out)
  assert written["rows"] == json.loads(json.dumps(result["rows"]))
  assert [row["strategy"] for row in written["rows"]] == ["lru"]  # resident needs every expert
  for key in ("ttft_4", "tpot"):
    assert written["rows"][0][key]["measured_s"] > 0 and written["rows"][0][key]["bound_s"] > 0
  assert written["h2d_bytes_per_s"] > 0 and written["targets"]
  assert "| lru | 18.75% (3) |" in table
  text = md.read_text()
  assert "kept as it was" in text and "## Offload engine" in text and table in text


def test_bench_kernels_cpu_smoke_marks_gpu_kernels(tmp_path, docs_untouched):
  out = tmp_path / "out"
  assert bench_kernels.main(["--family", "tiny", "--iterations", "1", "--out", str(out)]) == 0
  written, table = read_outputs(out)
  records = {(r["epilogue"], r["impl"]): r for r in written["records"]}
  assert set(records) == {(e, i) for e in ("relu", "glu") for i in ("xla", "jax_mgpu", "pallas", "mosaic")}
  for (epilogue, impl), r in records.items():
    if impl in bench_kernels.GPU_ONLY:
      assert r["skipped"] == "not on CPU" and "error" not in r and "ms" not in r
      assert f"| tiny t=8 {epilogue} | {impl} | not on CPU |" in table
    else:
      assert r["ms"] > 0 and "skipped" not in r
  assert "Error" not in table


@pytest.mark.slow
def test_bench_parallel_cpu_smoke(tmp_path, docs_untouched):
  # --cpu-smoke fakes its CPU devices before jax is imported: a process of its own
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                    if p))
  proc = subprocess.run([sys.executable, "-m", "eval.bench_parallel", "--cpu-smoke", "--strategies", "lru",
                         "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  written, table = read_outputs(out)
  assert written["devices"] == 2 and [row["strategy"] for row in written["rows"]] == ["lru"]
  assert written["rows"][0]["parallel"]["tpot_s"] > 0
  assert "| lru | 8 |" in table


def test_bench_program_cpu_smoke_is_exact(tmp_path):
  from eval import bench_program
  assert bench_program.main(["--presets", "tiny", "--new-tokens", "3", "--prompt-lengths", "8",
                             "--repeats", "1", "--strategies", "lru,hybrid", "--cache-fractions", "0.5,1",
                             "--out", str(tmp_path)]) == 0
  preset = json.loads((tmp_path / "results.json").read_text())["presets"][0]
  rows = preset["rows"]
  # each strategy at each fraction; hybrid on v2 only, its decode misses computed on the host
  assert {(r["engine"], r["strategy"], r["cache_fraction"]) for r in rows} == (
      {(e, "lru", f) for e in ("v2", "v1") for f in (0.5, 1)} | {("v2", "hybrid", f) for f in (0.5, 1)})
  assert all(r["tokens_equal"] and "error" not in r for r in rows)
  hybrid = {r["cache_fraction"]: r for r in rows if r["strategy"] == "hybrid"}
  assert hybrid[0.5]["host_experts"] > 0 and hybrid[0.5]["on_demand_per_token"] == 0
  # the cache holds what the prompt routed and decode steps admit nothing: a larger one leaves less
  assert hybrid[1]["host_experts"] <= hybrid[0.5]["host_experts"]
  assert preset["host_read_bytes_per_s"] > 0 and preset["host_expert_bytes_per_s"] > 0
  assert preset["host_backend"] == host_experts.resolve_backend()  # --host-backend auto
  assert (tmp_path / "table.md").read_text().count("tiny") == 6


def test_bench_program_runs_a_plan_with_and_without_its_copies_and_command_buffers(tmp_path, capsys):
  from eval import bench_program
  assert bench_program.main(["--presets", "tiny", "--new-tokens", "4", "--prompt-lengths", "8",
                             "--repeats", "1", "--engines", "v2", "--strategies", "oracle",
                             "--cache-fractions", "0.5", "--plan-copies", "on,off",
                             "--command-buffers", "off,on", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "results.json").read_text())["presets"][0]["rows"]
  by = {(r["strategy"], r["plan_copies"], r["command_buffers"]): r for r in rows}
  assert set(by) == {("oracle", c, g) for c in (True, False) for g in (True, False)}
  assert all(r["host_split_s"]["dispatch"] > 0 for r in rows)  # the host's time per decode step
  assert all(r["tokens_equal"] and "error" not in r for r in rows)
  # in place: nothing copied ahead, every miss read after its router chose
  assert by["oracle", False, False]["prefetched_per_token"] == 0
  table = (tmp_path / "table.md").read_text()
  assert "oracle/inpl " in table and "oracle/inpl+cb" in table and "oracle+cb" in table
  assert "--command-buffers" in refused(bench_program.main, ["--command-buffers", "maybe"], capsys)
  assert "--plan-copies" in refused(bench_program.main, ["--plan-copies", "maybe"], capsys)


def test_bench_program_learned_needs_a_predictor(capsys):
  from eval import bench_program
  assert "--predictor" in refused(bench_program.main, ["--strategies", "lru,learned"], capsys)
  assert "--predictor" in refused(bench_program.main, ["--predictor", "missing"], capsys)
