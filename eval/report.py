"""The main job's report: markdown answering the research questions from a results dict."""

from __future__ import annotations

from typing import Any

from jaxmoe.offload import program


def _ms(x: float | None) -> str:
  return "-" if x is None else f"{x * 1e3:.2f}"


def _mb(x: float | None) -> str:
  return "-" if x is None else f"{x / 2**20:.1f}"


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def ttft_prompt(results: dict) -> str:
  """Which prompt a strategy row's TTFT is for: the shortest one the run timed."""
  lengths = [r["prompt_len"] for r in results.get("strategies", []) if "prompt_len" in r]
  return f"{min(lengths)}-token prompt" if lengths else "prompt length not recorded"


def _repeats(results: dict) -> int:
  return max((r.get("repeats", 1) for r in results.get("strategies", [])), default=1)


def _verdict(met: bool | None) -> str:
  return "-" if met is None else "met" if met else "MISSED"


def _analytic_base(results: dict) -> str:
  """Whose compute time the analytic model used (pipeline.stage_analytic)."""
  base = results.get("analytic_base", "resident")
  if base == "reference":
    return ("compute from one request of the per-layer all-resident reference (`resident` was not "
            "run)")
  return "compute from `resident`" if base else "not computed (no resident time was measured)"


def strategy_table(results: dict[str, Any]) -> str:
  rows = results["strategies"]
  by = {r["name"]: r for r in rows}
  lines = ["| strategy | engine | exact | TTFT ms (prompt tokens: ms) | per-token ms | predicted ms | e2e ms | tok/s | MiB copied "
           "(useful / wasted) | hit rate | stall ms | host ms a step (plan / dispatch / wait) | vs on_demand | vs lru | "
           "vs resident |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ttfts = " / ".join(f"{p} tok: {_ms(t)}" for p, t in r["ttft_s_by_prompt"].items())
    speed = lambda base: f"{by[base]['tpot_s'] / r['tpot_s']:.2f}x" if base in by and r["tpot_s"] else "-"
    lines.append(
        f"| {r['name']} | {r.get('engine', 'v1')} | {'yes' if r['tokens_equal'] else 'NO'} | {ttfts} | {_ms(r['tpot_s'])} | "
        f"{_ms(r.get('predicted_tpot_s'))} | {_ms(r['e2e_s'])} | {r['tokens_per_s']:.1f} | "
        f"{_mb(r['bytes_copied'])} ({_mb(r['bytes_useful'])} / {_mb(r['bytes_wasted'])}) | "
        f"{_pct(r['hit_rate'])} | {_ms(sum(r['stall_s']))} | {_host_split(r)} | {speed('on_demand')} | "
        f"{speed('lru')} | {speed('resident')} |")
  return "\n".join(lines)


def _host_split(row: dict[str, Any]) -> str:
  """Engine v2's host time per decode step planning it / dispatching it / waiting for the device (a
  wait near zero: the host sets the pace); '-' for the per-layer engine."""
  split = row.get("host_split_s") or {}
  return (f"{_ms(split['plan'])} / {_ms(split['dispatch'])} / {_ms(split['wait'])}" if "wait" in split
          else "-")


def predictor_table(results: dict[str, Any]) -> str:
  lines = ["| predictor | family | recall@k | recall@2k | params | us / step |", "|---|---|---|---|---|---|"]
  for p in results.get("predictors", []):
    lines.append(f"| {p['name']} | {p['family']} | {_pct(p.get('recall_k_avg'))} | {_pct(p.get('recall_2k_avg'))} "
                 f"| {p.get('params', 0):,} | {p.get('us_per_step', float('nan')):.1f} |")
  return "\n".join(lines)


def physics_section(results: dict[str, Any]) -> list[str]:
  """Each strategy against what prefetching can reach with the bytes it moved: a prefetch only hides
  copies behind compute (C + T on demand, max(C, T) at best), only a cache that moves fewer bytes
  removes them."""
  rows = [r for r in results["strategies"] if r.get("transfer_tpot_s") is not None]
  if not rows:
    return []
  out = ["Physics: per token the compute C is the all-resident step; T = the bytes the strategy moved "
         "per token / the measured bandwidth. Loading them on demand costs C + T; the best prefetch of "
         "the same bytes, max(C, T): a gain of at most (C + T) / max(C, T). Fewer bytes (better "
         "caching) is the only other gain.", "",
         "| strategy | MiB / token | T ms | C + T ms | max(C, T) ms | measured ms | prefetch gain bound |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    c, t = r["compute_tpot_s"], r["transfer_tpot_s"]
    out.append(f"| {r['name']} | {_mb(t * results['bandwidth_bytes_per_s'])} | {_ms(t)} | {_ms(c + t)} | "
               f"{_ms(max(c, t))} | {_ms(r['tpot_s'])} | {r['prefetch_gain_bound']:.2f}x |")
  return out + [""]


def summary_table(results: dict[str, Any]) -> str:
  """A short fixed-width table for the terminal."""
  lines = [f"TTFT: time to first token of the {ttft_prompt(results)}; tok ms: per decode step after it",
           f"{'strategy':<14}{'exact':>6}{'TTFT ms':>10}{'tok ms':>9}{'tok/s':>9}{'MiB':>9}{'hit':>7}"]
  for r in results["strategies"]:
    lines.append(f"{r['name']:<14}{'yes' if r['tokens_equal'] else 'NO':>6}{r['ttft_s'] * 1e3:>10.2f}"
                 f"{r['tpot_s'] * 1e3:>9.2f}{r['tokens_per_s']:>9.1f}{r['bytes_copied'] / 2**20:>9.1f}"
                 f"{100 * r['hit_rate']:>6.0f}%")
  return "\n".join(lines)


def markdown(results: dict[str, Any], pngs: list[str]) -> str:
  m, s = results["meta"], results["meta"]["settings"]
  cfg = results["model"]["config"]
  rows = {r["name"]: r for r in results["strategies"]}
  out = [f"# jaxmoe main-job report: preset `{s['preset']}`", "",
         f"Date {m['date']}, commit `{m['commit']}`, backend {m['backend']} ({m['device']}), jax {m['jax']}; "
         f"wall time {m['wall_s']:.0f} s.", "",
         f"Model: {cfg['n_layers']} layers x {cfg['n_experts']} experts (top-{cfg['top_k']}, {cfg['activation']}), "
         f"d_model {cfg['d_model']}, expert d_ff {cfg['d_ff']}. Expert cache: {_mb(results['cache_bytes'])} MiB of "
         f"{_mb(results['store_bytes'])} MiB ({100 * s['cache_fraction']:.0f}%); one expert "
         f"{_mb(results['expert_bytes'])} MiB; measured host->device bandwidth "
         f"{results['bandwidth_bytes_per_s'] / 2**30:.1f} GiB/s. Plans on engine v2: "
         + {True: "copied ahead of their step.", False: "eviction only (routed misses read in place).",
            "auto": f"copied ahead where an expert is at least {program.MIN_COPY_BYTES / 2**20:g} MiB, "
                    f"else eviction only (misses read in place)."}[s.get("plan_copies", True)]
         + (" Steps compiled with XLA command buffers." if s.get("command_buffers") else ""), ""]
  train = results["model"].get("training") or {}
  if train:
    out += [f"Training: validation perplexity {train.get('val_ppl', float('nan')):.2f} against the unigram "
            f"baseline {train.get('unigram_ppl', float('nan')):.2f}.", ""]
  if results["meta"]["backend"] != "gpu":
    out += ["**This run is on a CPU.** Its times show the engine's behaviour, not GPU speed: host and "
            "\"device\" share one memory, so copies are cheap and the ranking of strategies can differ from "
            "the GPU's. GPU figures are in `docs/BENCHMARKS.md` and `docs/results/`.", ""]

  step_us = results.get("predictor_meta", {}).get("us_decode_step_model")
  cost_note = (f"A resident decode step of the model takes {step_us:.0f} us (measured in this run); "
               f"predictor costs above are per decode step." if step_us else "")
  out += ["## 1. Which predictor is the most efficient?", "", predictor_table(results), "", cost_note, "",
          f"The engine's `learned` strategy uses the best token-driven family on validation recall@k: "
          f"`{results['learned_family']}`"
          + (f"; on engine v2 where plans only evict (misses read in place) it plans inside each step from "
             f"the token the step chose, and where plans are copied ahead the host plans with the same "
             f"family trained to score the token {results['plan_lead']} positions ahead "
             f"(`{results['plan_predictor']}`: the host plans a step while the two before it are still "
             f"queued, so its plan cannot read their tokens)" if results.get("plan_predictor") else "")
          + f". `cross_layer` and `next_gate` need the hidden state entering a "
          f"layer, so they can only look a few layers ahead; token-driven families predict every layer "
          f"before the step's compute is dispatched, which is what lets copies overlap compute.", ""]

  offloaded_diff = max((r["max_abs_logit_diff"] for r in results["strategies"] if r["name"] != "resident"),
                       default=0.0)
  between = results.get("reference_logit_diff")
  between = "" if between is None else (
      f"; the two engines' all-resident runs differ by {between:.2e} in logits (bf16 rounding of "
      "different programs)")
  out += ["## 2. Time per strategy", "", strategy_table(results), "",
          "`engine`: v2 runs each step as one compiled program (`ProgramEngine`), v1 layer by layer "
          "(`OffloadEngine`, for the strategies v2 does not run yet). `exact`: the generated tokens equal "
          "those of the all-resident model run by the same engine with the same kernels (largest logit "
          f"difference of the offloaded strategies {offloaded_diff:.2e}{between}). "
          "`predicted`: the analytic model of `eval/analytic.py`, "
          "max(compute, prefetched bytes / bandwidth) + on-demand bytes / bandwidth per token, "
          f"{_analytic_base(results)}. "
          "`stall`: the request's total time that layers' FFNs waited for their expert copies, from "
          "the dispatch until the last copy landed. "
          f"Times are medians over {_repeats(results)} timed requests per strategy and prompt, each from "
          "a cold cache after a warm-up; counts and bytes are those of the request with the median "
          "per-token time.", ""]
  if results.get("targets"):
    out += ["Targets (they are set for the GPU; on a CPU they only show the engine runs):", "",
            "| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {t['target']} | {t['value']} | {_verdict(t['met'])} |" for t in results["targets"]]
    out += ["", "A missed target's cause is in the gaps below: where the measurement departs from the "
            "analytic model, that is where the time went.", ""]
  gaps = [f"- `{r['name']}`: {r['model_gap']}" for r in results["strategies"] if r.get("model_gap")]
  if gaps:
    out += ["Where measurement and model differ by more than 20%:", "", *gaps, ""]
  ov = results.get("overlap")
  if ov:
    out += [f"Copy/compute overlap from a profiler trace of `{results['profiled_strategy']}`: "
            f"{_pct(ov.get('overlap_fraction_of_copy'))} of copy time ran under compute "
            f"(compute {ov.get('compute_ms', 0):.1f} ms, copies {ov.get('copy_ms', 0):.1f} ms, both "
            f"{ov.get('overlap_ms', 0):.1f} ms).", ""]
  else:
    out += ["Copy/compute overlap: no profiler trace on this backend (the GPU run reports it).", ""]

  out += physics_section(results)
  out += ["## 3. Accuracy -> speedup", ""]
  sweep = results.get("noisy_oracle_sweep") or []
  if sweep and "on_demand" in rows:
    horizon = sweep[0].get("horizon")
    if horizon is not None:
      out += [f"The noisy oracle's eviction knows the step it serves and {horizon} after it, as `learned`'s "
              "plan does (the `oracle` row knows every step); `python -m eval.caching_headroom` measures "
              "bytes by recall and horizon.", ""]
    out += ["| noisy-oracle recall | hit rate | MiB moved | per-token ms | speedup vs on_demand |",
            "|---|---|---|---|---|"]
    for p in sweep:
      out.append(f"| {p['recall']:.1f} | {_pct(p['hit_rate'])} | {_mb(p['bytes_copied'])} | {_ms(p['tpot_s'])} | "
                 f"{rows['on_demand']['tpot_s'] / p['tpot_s']:.2f}x |")
    out.append("")
    word = lambda r: "not reached in the sweep" if r is None else f"{r:.2f}"
    for base, r in results.get("break_even_recall", {}).items():
      out.append(f"- Break-even recall against `{base}`, per-token time (hiding and caching): {word(r)}")
    for base, r in results.get("break_even_recall_bytes", {}).items():
      out.append(f"- Break-even recall against `{base}`, bytes moved (what caching saves less what wrong "
                 f"copies waste; the same on any machine): {word(r)}")
    out.append("")

  out += ["## 4. Quality", ""]
  ppl = [(r["name"], r.get("engine", "v1"), r["perplexity"]) for r in results["strategies"]
         if r.get("perplexity")]
  if ppl:
    per_engine = {e: {p for _, e2, p in ppl if e2 == e} for _, e, _ in ppl}
    agree = ("Strategies on the same engine agree exactly" if all(len(v) == 1 for v in per_engine.values())
             else "Strategies on the same engine DIFFER: an exactness bug")
    out += ["Teacher-forced perplexity on a held-out sequence through the engine: "
            + ", ".join(f"`{n}` ({e}) {p:.3f}" for n, e, p in ppl)
            + f". {agree}; the two engines' programs may round differently in bf16 on a GPU. "
            "No lossy mode is enabled.", ""]
  if pngs:
    out += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
  return "\n".join(out)
