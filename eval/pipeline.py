"""The stages of the main job (`eval.run`): model -> traces -> predictors -> strategies -> report.

Each stage reuses what an earlier run left in the output directory (a trained model, traces, trained
predictors), so re-running after an interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxmoe import checkpoint, config as config_lib, generate as generate_lib
from jaxmoe.offload import ExpertStore, OffloadEngine, strategies as strategies_lib
from jaxmoe.offload import program, step_plan
from jaxmoe.offload.cache import slot_count
from jaxmoe.offload.store import measure_h2d_bandwidth
from jaxmoe.predictor import data as traces_lib
from jaxmoe.predictor import store as predictor_store
from jaxmoe.predictor.training import train_predictor
from eval import analytic, cli, plots, report

STRATEGIES = ("resident", "on_demand", "lru", "stream_all", "next_gate", "oracle", "learned")
NOISY_RECALLS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FAMILIES = ("token_mlp", "context", "cross_layer")


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Sizes of one main-job run (a preset gives the defaults; the command line overrides them)."""

  preset: str  # model preset name (jaxmoe.config)
  train_minutes: float  # wall-clock budget for training the model
  trace_tokens: int  # tokens of training text whose routing is traced
  trace_seq_len: int  # tokens per traced sequence
  predictor_steps: int  # optimizer steps per predictor family
  predictor_loss: str  # "bce", "rank", or "auto" (train both, keep the better on validation recall)
  prompt_lengths: tuple[int, ...]  # prompts for time-to-first-token
  new_tokens: int  # tokens generated per request
  cache_fraction: float = 0.25  # device expert cache / all experts' bytes
  strategies: tuple[str, ...] = STRATEGIES  # offload strategies to run
  noisy_recalls: tuple[float, ...] = NOISY_RECALLS  # noisy-oracle sweep
  profile: bool = True  # take a profiler trace of one run for the copy/compute overlap
  repeats: int = 3  # timed requests per strategy and prompt (medians reported: one request is noisy)
  # engine v2, strategies with plans: copy planned experts ahead of their step (True), or only evict
  # by the plan and read routed misses in place (False); "auto": `ProgramEngine`'s rule (expert size)
  plan_copies: bool | str = "auto"
  # engine v2: compile each step with XLA command buffers (`program.COMMAND_BUFFERS`)
  command_buffers: bool = False

  def __post_init__(self):
    if not 0 < self.cache_fraction <= 1:
      raise ValueError(f"--cache-fraction must lie in (0, 1], got {self.cache_fraction}")
    unknown = sorted(set(self.strategies) - set(strategies_lib.NAMES))
    if unknown or not self.strategies:
      raise ValueError(f"--strategies: unknown strategies {unknown or 'none given'}; choose from "
                       f"{', '.join(strategies_lib.NAMES)}")
    if self.new_tokens < 2 or not self.prompt_lengths or min(self.prompt_lengths) < 1:
      raise ValueError("need --new-tokens >= 2 and positive --prompt-lengths")
    if self.repeats < 1:
      raise ValueError(f"--repeats must be at least 1, got {self.repeats}")


RUN_PRESETS = {
    "tiny": RunSettings("tiny", train_minutes=1.0, trace_tokens=8192, trace_seq_len=64, predictor_steps=60,
                        predictor_loss="bce", prompt_lengths=(8, 32), new_tokens=8, noisy_recalls=(0.5, 1.0),
                        repeats=1),
    "small": RunSettings("small", train_minutes=3.0, trace_tokens=32768, trace_seq_len=128,
                         predictor_steps=400, predictor_loss="bce", prompt_lengths=(16, 128), new_tokens=24),
    # gpu: 4x the traces and 2.5x the steps of the first H200 runs (recall was limited by trace
    # volume, docs/RESULTS.md); BCE only, since the ranking loss never won there by more than 0.1 points
    "gpu": RunSettings("gpu", train_minutes=2.5, trace_tokens=131072, trace_seq_len=256,
                       predictor_steps=1000, predictor_loss="bce", prompt_lengths=(16, 256), new_tokens=16,
                       noisy_recalls=(0.5, 0.7, 0.9, 1.0)),
    "gpu_fine": RunSettings("gpu_fine", train_minutes=4.0, trace_tokens=131072, trace_seq_len=256,
                            predictor_steps=1000, predictor_loss="bce", prompt_lengths=(16, 256), new_tokens=16,
                            noisy_recalls=(0.5, 0.7, 0.9, 1.0)),
}


def settings_for(preset: str | None, *, cache_fraction=None, strategies=None, prompt_lengths=None,
                 new_tokens=None, train_minutes=None, repeats=None, profile=True,
                 noisy_recalls=None, plan_copies=None, command_buffers=None) -> RunSettings:
  """The preset's settings with the command line's overrides (None keeps the preset's value);
  strategies is comma-separated text, prompt_lengths a sequence of ints, noisy_recalls a sequence
  of recalls (empty: no sweep)."""
  name = preset or ("gpu" if jax.default_backend() == "gpu" else "small")
  s = RUN_PRESETS[name]
  over: dict[str, Any] = {"profile": profile}
  if cache_fraction is not None:
    over["cache_fraction"] = cache_fraction
  if strategies:
    over["strategies"] = tuple(x.strip() for x in strategies.split(",") if x.strip())
  if prompt_lengths:
    over["prompt_lengths"] = tuple(prompt_lengths)
  if new_tokens is not None:
    over["new_tokens"] = new_tokens
  if train_minutes is not None:
    over["train_minutes"] = train_minutes
  if repeats is not None:
    over["repeats"] = repeats
  if noisy_recalls is not None:
    over["noisy_recalls"] = tuple(noisy_recalls)
  if plan_copies is not None:
    over["plan_copies"] = plan_copies
  if command_buffers is not None:
    over["command_buffers"] = command_buffers
  return dataclasses.replace(s, **over)


def min_cache_fraction(cfg) -> float:
  """The smallest cache fraction that holds one token's experts of a layer (top_k of them): less and
  a layer's FFN could not find its routed experts on the device at once."""
  return cfg.top_k / (cfg.n_layers * cfg.n_experts)


def check_fits(s: RunSettings, cfg) -> None:
  """Raise ValueError, naming the flag, when the run's sizes do not fit the model `cfg`."""
  longest = max(s.prompt_lengths)
  if longest + s.new_tokens > cfg.max_seq_len:
    raise ValueError(f"--prompt-lengths {longest} plus --new-tokens {s.new_tokens} exceed the model's "
                     f"max_seq_len {cfg.max_seq_len}")
  low = min_cache_fraction(cfg)
  if s.cache_fraction < low:
    raise ValueError(f"--cache-fraction {s.cache_fraction:g} cannot hold one token's {cfg.top_k} experts of "
                     f"a layer ({cfg.n_layers} layers x {cfg.n_experts} experts); the smallest valid value "
                     f"is {math.ceil(low * 1e6) / 1e6:g}")


def planned_config(preset: str, model_path: str | None):
  """The config of the model a run will use, read without loading or training it."""
  if not model_path:
    return config_lib.preset(preset)
  path = cli.model_run_dir(model_path)
  if not path.exists():
    raise FileNotFoundError(f"--model {model_path}: no such directory")
  if _is_hf_dir(path):
    from jaxmoe import hf
    return hf.config_from_hf(hf.read_hf_config(path))
  return checkpoint.load_config(path)


def _is_hf_dir(path: Path) -> bool:
  return (path / "config.json").exists() and "model_type" in json.loads((path / "config.json").read_text())


# ------------------------------------------------------------------------------------------ stages

def stage_model(s: RunSettings, out: Path, model_path: str | None, data: str | None = None, log=print):
  """(cfg, model, corpus dir or None, training summary or None). model_path: a model run directory, a
  main job's output directory (its model/ inside), an Orbax checkpoint or a Hugging Face directory."""
  if model_path:
    path = cli.model_run_dir(model_path)
    if not path.exists():
      raise FileNotFoundError(f"--model {model_path}: no such directory")
    if _is_hf_dir(path):
      from jaxmoe import hf
      cfg, model = hf.from_pretrained(path)
      return cfg, model, None, None
    cfg, model = load_for_serving(path)
    summary = path / "summary.json"
    return cfg, model, path if (path / "data").exists() else None, (
        json.loads(summary.read_text()) if summary.exists() else None)
  from train import train_model
  run_dir = out / cli.MODEL_SUBDIR
  summary_path = run_dir / "summary.json"
  if summary_path.exists():
    log(f"[model] reusing the trained model in {run_dir}")
    summary = json.loads(summary_path.read_text())
  else:
    log(f"[model] training the {s.preset} preset for at most {s.train_minutes:g} minutes")
    # The main job never resumes a finished model, so its checkpoint skips the optimizer state (for the
    # gpu preset that is 2/3 of an 11 GB checkpoint).
    settings = dataclasses.replace(train_model.train_settings(s.preset), max_minutes=s.train_minutes,
                                   save_optimizer=False)
    summary = train_model.train_and_evaluate(config_lib.preset(s.preset), run_dir, settings, data=data, log=log)
  cfg, model = load_for_serving(run_dir)
  return cfg, model, run_dir, summary


def load_for_serving(path: Path):
  """Load a trained model in its compute dtype: experts cross PCIe at the width the kernels read them
  (bf16 on the GPU), not in the f32 the optimizer kept."""
  return checkpoint.load_model(path, param_dtype=checkpoint.load_config(path).dtype)


def corpus_tokens(cfg, corpus_dir: Path | None, split: str, n: int, seed: int) -> np.ndarray:
  """[N] token ids of the run's tokenized corpus split (random ids when the model came without one)."""
  path = corpus_dir / "data" / f"{split}_tokens.npy" if corpus_dir else None
  if path and path.exists():
    tokens = np.load(path).reshape(-1)
    return tokens[:n] if len(tokens) >= n else np.resize(tokens, n)
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, n)


def stage_traces(s: RunSettings, model, corpus_dir, out: Path, log=print) -> Path:
  traces_dir = out / "traces"
  if (traces_dir / "manifest.json").exists():
    log(f"[traces] reusing {traces_dir}")
    return traces_dir
  cfg = model.cfg
  seq_len = min(s.trace_seq_len, cfg.max_seq_len)
  tokens = corpus_tokens(cfg, corpus_dir, "train", s.trace_tokens, seed=1)
  rows, docs = traces_lib.token_rows(tokens, seq_len, max_rows=s.trace_tokens // seq_len)
  log(f"[traces] tracing the routing of {rows.size:,} tokens")
  traces_lib.collect_traces(model, traces_lib.batches(rows, docs, 8), str(traces_dir), hidden_layers="all",
                            source={"corpus": str(corpus_dir), "model": s.preset},
                            total=-(-len(rows) // 8))
  return traces_dir


def stage_predictors(s: RunSettings, traces_dir: Path, out: Path, log=print) -> list[str]:
  dirs = []
  for family in FAMILIES:
    pred_dir = out / "predictors" / family
    log(f"[predictors] {family}")
    train_predictor(str(traces_dir), family, str(pred_dir), steps=s.predictor_steps, loss=s.predictor_loss,
                    eval_every=max(25, s.predictor_steps // 6), warmup=min(100, s.predictor_steps // 10))
    dirs.append(str(pred_dir))
  return dirs


def stage_plan_predictor(s: RunSettings, traces_dir: Path, family: str, out: Path, log=print) -> str:
  """The `learned` predictor of engine v2: `family` trained to score the routing of the token
  `program.PLAN_LEAD` positions after the last one it reads (v2 plans a step while the two before it
  are queued). -> its directory."""
  name = f"{family}_lead{program.PLAN_LEAD}"
  pred_dir = out / "predictors" / name
  log(f"[predictors] {name}")
  train_predictor(str(traces_dir), family, str(pred_dir), steps=s.predictor_steps, loss=s.predictor_loss,
                  hparams={"lead": program.PLAN_LEAD}, eval_every=max(25, s.predictor_steps // 6),
                  warmup=min(100, s.predictor_steps // 10))
  return str(pred_dir)


def program_runs(cfg, cache_bytes: int, expert_bytes: int, prompt_len: int, predictor=None) -> set[str]:
  """The strategies engine v2 runs at this budget: those it supports, when one layer of the longest
  prompt fits its cache (else the per-layer engine streams the prompt through the cache); `learned`
  only with a `predictor` of a lead v2 plans with (0: in the step; `program.PLAN_LEAD`: on the host)."""
  fits = slot_count(cache_bytes, expert_bytes, cfg.top_k) >= min(prompt_len * cfg.top_k, cfg.n_experts)
  lead_ok = predictor is not None and getattr(predictor, "lead", 0) in (0, program.PLAN_LEAD)
  return {name for name in program.SUPPORTED
          if (fits or name == "resident") and (name != "learned" or lead_ok)}


def timed_requests(eng, prompt, new_tokens: int, repeats: int) -> list[tuple[np.ndarray, Any]]:
  """`repeats` requests, each from a cold cache, after one warm-up request (compiles this engine's
  shapes) -> [(tokens, stats)] ordered by per-token time."""
  eng.generate(prompt, new_tokens)
  runs = []
  for _ in range(repeats):
    eng.reset_cache()
    runs.append(eng.generate(prompt, new_tokens))
  return sorted(runs, key=lambda run: run[1].tpot_s)


def _step_starts(stats) -> list[float]:
  """When each step of a request began, seconds since its start (the clock of its copy timeline):
  the prefill at 0, decode step k after the prefill and the k - 1 decode steps before it."""
  decode = stats.ttft_s + np.cumsum([0.0, *stats.token_latencies_s])[:-1]
  return [0.0, *map(float, decode)]


def _median_stats(runs):
  """The stats of the request with the median per-token time (runs as `timed_requests` orders them)."""
  return runs[(len(runs) - 1) // 2][1]


def _request_row(name, runs, ref_tokens, ref_logits) -> dict[str, Any]:
  """One row for the timed requests of one prompt: counts and bytes of the request with the median
  per-token time, median TTFT and end-to-end time over all of them; exact only if every one was."""
  stats = _median_stats(runs)
  row = {"name": name, **stats.summary(), "repeats": len(runs)}
  row["ttft_s"] = float(np.median([st.ttft_s for _, st in runs]))
  row["e2e_s"] = float(np.median([st.e2e_s for _, st in runs]))
  row["tokens_per_s"] = stats.batch * stats.n_generated / row["e2e_s"] if row["e2e_s"] else 0.0
  row["tpot_s_each"] = [st.tpot_s for _, st in runs]
  routed = sum(stats.hits) + sum(stats.misses)
  row["hit_rate"] = sum(stats.hits) / routed if routed else 1.0
  row["tokens_equal"] = all(bool(np.array_equal(tokens, ref_tokens)) for tokens, _ in runs)
  row["max_abs_logit_diff"] = max(float(np.max(np.abs(st.logits - ref_logits))) for _, st in runs)
  return row


def teacher_forced_nll(engine: OffloadEngine, seq: np.ndarray) -> float:
  """Mean next-token NLL of seq [1, P + W] given its first P tokens, through the engine (prefill, then one
  decode step per true token)."""
  p = seq.shape[1] // 2
  logits = [engine.prefill(seq[:, :p])]
  for t in range(p, seq.shape[1] - 1):
    logits.append(engine.decode(seq[:, t]))
  lg = np.stack(logits, axis=1).astype(np.float64)  # [1, W, V]
  lg = lg - lg.max(-1, keepdims=True)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  targets = seq[:, p:]
  return float(-np.mean(np.take_along_axis(logp, targets[..., None], -1)))


def stage_strategies(s: RunSettings, model, corpus_dir, predictor, out: Path, log=print,
                     on_progress=lambda part: None, plan_predictor=None) -> dict[str, Any]:
  """Every strategy on held-out prompts: timings, bytes, hits, stalls, exactness, perplexity.
  `learned` runs on the per-layer engine with `predictor` (lead 0); on engine v2, where v2 runs it,
  with the same `predictor` planning inside the step when plans only evict (`plan_copies`), else with
  `plan_predictor` (lead `program.PLAN_LEAD`) planning on the host, which copies ahead.

  `on_progress` gets {"strategies": rows, "noisy_oracle_sweep": points} after each strategy and sweep
  point, so the caller can save what was measured before a later failure."""
  cfg = model.cfg
  check_fits(s, cfg)
  store = ExpertStore.from_model(model)
  # check_fits refused fractions below one token's experts: the max only absorbs float rounding
  cache_bytes = max(int(s.cache_fraction * store.nbytes), cfg.top_k * store.expert_bytes)
  bandwidth = measure_h2d_bandwidth(store)
  val = corpus_tokens(cfg, corpus_dir, "val", max(s.prompt_lengths) + s.new_tokens + 64, seed=2)
  # shortest first: a strategy's row reports the shortest prompt, the one the TTFT bound is for
  prompts = {p: val[None, :p].astype(np.int32) for p in sorted(set(s.prompt_lengths))}
  ppl_seq = val[None, :min(2 * s.new_tokens, cfg.max_seq_len)].astype(np.int32)
  engines: dict[str, Any] = {}
  v2_predictor = plan_predictor if program.copies_planned(s.plan_copies, store.expert_bytes) else predictor
  v2 = program_runs(cfg, cache_bytes, store.expert_bytes, max(prompts), v2_predictor)

  def engine(name, **kw):
    """Engine v2 (one program per step) for the strategies it runs, else the per-layer engine."""
    on_v2 = name in v2
    if name == "resident":
      return (program.ProgramEngine(model, strategy="resident", store=store,
                                    command_buffers=s.command_buffers) if on_v2 else
              OffloadEngine(model, strategy="resident", store=store, **kw))
    strategy = strategies_lib.make(name, n_experts=cfg.n_experts, predictor=v2_predictor if on_v2 else predictor,
                                   **kw)
    if on_v2:
      return program.ProgramEngine(model, cache_bytes=cache_bytes, strategy=strategy, store=store,
                                   plan_copies=s.plan_copies, command_buffers=s.command_buffers)
    return OffloadEngine(model, cache_bytes=cache_bytes, strategy=strategy, store=store)

  # The exact references: every expert resident, run by each engine with the same jitted pieces and
  # kernels as its offloaded strategies, so "exact" means bitwise for every row against its own engine's
  # reference (that both equal the whole-model `jaxmoe.generate` is asserted by the offload tests; in
  # bf16 on a GPU the two engines' programs may round differently: `reference_logit_diff` says by how
  # much). The per-layer reference also records each prompt's routing.
  reference_engine = OffloadEngine(model, strategy="resident", store=store, fuse_resident_step=False)
  reference, routing = {}, {}
  for p, prompt in prompts.items():
    reference_engine.generate(prompt, s.new_tokens)  # warm-up: compiles every step shape
    tokens, stats = reference_engine.generate(prompt, s.new_tokens)
    reference[p] = generate_lib.GenerateOutput(tokens, stats.logits)
    routing[p] = stats.routing
    if p == min(prompts):
      reference_timing = {"ttft_s": stats.ttft_s, "tpot_s": stats.tpot_s}
  reference_engine.close()
  del reference_engine  # its device copy of every expert
  resident = engine("resident")  # the v2 rows' reference when v2 runs resident
  reference_v2, routing_v2 = {}, {}
  if "resident" in v2:
    for p, prompt in prompts.items():
      tokens, stats = resident.generate(prompt, s.new_tokens)
      reference_v2[p] = generate_lib.GenerateOutput(tokens, stats.logits)
      routing_v2[p] = stats.routing

  def routing_of(name, p):
    """The routing an oracle replays: its own engine's reference run's (bf16 may route differently)."""
    return routing_v2[p] if name in v2 and p in routing_v2 else routing[p]
  reference_logit_diff = max((float(np.max(np.abs(reference_v2[p].logits - reference[p].logits)))
                              for p in reference_v2), default=None)
  rows = []
  names = [n for n in s.strategies if n != "noisy_oracle"]
  for name in tqdm(names, desc="strategies"):
    per_prompt = []
    for p, prompt in prompts.items():
      kw = {"routing": routing_of(name, p)} if name == "oracle" else {}
      eng = resident if name == "resident" else engine(name, **kw)
      runs = timed_requests(eng, prompt, s.new_tokens, s.repeats)
      want = reference_v2.get(p, reference[p]) if name in v2 else reference[p]
      per_prompt.append({"prompt_len": p, **_request_row(name, runs, want.tokens, want.logits)})
      if p == min(prompts):
        engines[name] = eng
        median = _median_stats(runs)
        timeline, step_starts = median.timeline(), _step_starts(median)
      elif eng is not resident:
        eng.close()
    first = per_prompt[0]
    row = {**first, "engine": "v2" if name in v2 else "v1", "ttft_s_by_prompt": {r["prompt_len"]: r["ttft_s"] for r in per_prompt},
           "tokens_equal": all(r["tokens_equal"] for r in per_prompt),
           "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in per_prompt),
           "by_prompt": per_prompt, "timeline": timeline, "step_starts_s": step_starts,
           "plans_in_step": bool(getattr(engines[name], "plans_in_step", False))}
    if row["plans_in_step"]:  # its predictor runs inside the step: timed on the device alone
      row["in_step_plan_s"] = in_step_plan_s(engines[name])
    nll = teacher_forced_nll(engines[name], ppl_seq) if name in ("resident", "on_demand", "learned") else None
    row["perplexity"] = None if nll is None else math.exp(nll)
    rows.append(row)
    on_progress({"strategies": rows, "noisy_oracle_sweep": []})

  p0 = min(prompts)
  sweep = []
  horizon = sweep_horizon(engines.get("learned"))
  if s.noisy_recalls and any(n in s.strategies for n in program.PLANNED):
    for r in tqdm(s.noisy_recalls, desc="noisy oracle"):
      want = reference_v2.get(p0, reference[p0]) if "noisy_oracle" in v2 else reference[p0]
      eng = engine("noisy_oracle", routing=routing_of("noisy_oracle", p0), recall=r, seed=0, horizon=horizon)
      runs = timed_requests(eng, prompts[p0], s.new_tokens, s.repeats)
      sweep.append({"recall": r, "horizon": horizon,
                    **_request_row("noisy_oracle", runs, want.tokens, want.logits)})
      eng.close()
      on_progress({"strategies": rows, "noisy_oracle_sweep": sweep})
  overlap = None
  best = "learned" if "learned" in engines else next((n for n in engines if n != "resident"), None)
  if s.profile and best and jax.default_backend() == "gpu":
    overlap = profile_overlap(engines[best], prompts[p0], s.new_tokens, out / "trace")
  for eng in {id(e): e for e in [resident, *engines.values()]}.values():
    eng.close()  # stops each engine's copy-watcher thread
  return {"strategies": rows, "noisy_oracle_sweep": sweep, "bandwidth_bytes_per_s": bandwidth,
          "cache_bytes": cache_bytes, "store_bytes": store.nbytes, "expert_bytes": store.expert_bytes,
          "overlap": overlap, "profiled_strategy": best,
          # one request of the per-layer all-resident reference (shortest prompt): the analytic model's
          # compute time when the `resident` strategy was not run
          "reference_timing": reference_timing, "reference_logit_diff": reference_logit_diff,
          "engines": {name: "v2" if name in v2 else "v1" for name in s.strategies},
          # distinct (layer, expert) pairs the shortest prompt's prefill routes: what a cold cache must copy
          "prefill_needed_experts": sum(len(experts) for experts in routing[p0][0])}


def in_step_plan_s(engine: program.ProgramEngine, reps: int = 32) -> float:
  """Device seconds a step spends planning the next one inside its program (`learned` with a lead-0
  predictor; the host's clock cannot see it): the engine's planner run `reps` times in one compiled
  program, each plan choosing the next pass's token (so that no pass is dead code) and unrolled (a
  device while loop would check its condition on the host every pass), less a one-pass program
  (dispatch and read), per pass."""
  planner, leaves = engine.planner, engine.planner_leaves
  recent, planned = planner.start(1)
  start = jax.device_put(step_plan.InStepPlan(recent, planned), jax.tree.leaves(leaves)[0].sharding)
  tokens = jnp.zeros((1, 1), jnp.int32)

  @functools.partial(jax.jit, static_argnums=0)
  def loop(n, leaves, plan):
    def body(i, plan):  # the next token depends on the plan, so that no pass is dead code
      token = (plan.recent[:, -1] + 1 + jnp.sum(plan.planned, dtype=jnp.int32)) % planner.predictor.pad_id
      return planner.next(leaves, plan, tokens, token)

    return jax.lax.fori_loop(0, n, body, plan, unroll=True)

  def timed(n):
    jax.block_until_ready(loop(n, leaves, start))  # compile
    best = math.inf
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(loop(n, leaves, start))
      best = min(best, time.perf_counter() - t0)
    return best

  return max(0.0, (timed(reps + 1) - timed(1)) / reps)


def sweep_horizon(learned) -> int:
  """Steps past the one served that the noisy-oracle sweep's eviction knows: what `learned`'s plans know,
  so that the sweep predicts what its recall is worth. A plan made in the step (engine v2, lead-0
  predictor) or per step on the per-layer engine knows the step served only (0); the host's lead-2 plan
  on engine v2 also knows its plan of the next step (1). Without a learned engine: the oracle's."""
  if learned is None:
    return strategies_lib.ORACLE_HORIZON
  return 1 if isinstance(learned, program.ProgramEngine) and not learned.plans_in_step else 0


def profile_overlap(eng: OffloadEngine, prompt, new_tokens: int, trace_dir: Path) -> dict[str, Any] | None:
  """Copy/compute overlap from a jax.profiler trace of one request."""
  from jaxmoe.offload import trace as trace_lib
  eng.reset_cache()
  jax.profiler.start_trace(str(trace_dir))
  try:
    eng.generate(prompt, new_tokens)
  finally:
    jax.profiler.stop_trace()
  planes = trace_lib.copy_compute_overlap(str(trace_dir))
  if not planes:
    return None
  o = planes[0]
  return {"plane": o.plane, "compute_ms": o.kernel_ms, "copy_ms": o.copy_ms, "overlap_ms": o.overlap_ms,
          "overlap_fraction_of_copy": o.hidden_pct / 100}


def stage_analytic(res: dict[str, Any], cfg, new_tokens: int) -> None:
  """Set an analytic prediction beside each strategy's measured TTFT and per-token latency.

  The compute time is that of the `resident` strategy, or of the per-layer resident reference when
  `resident` was not run; res["analytic_base"] says which (None: neither was measured, no predictions)."""
  rows = {r["name"]: r for r in res["strategies"]}
  base = rows.get("resident") or res.get("reference_timing")
  res["analytic_base"] = None if base is None else "resident" if "resident" in rows else "reference"
  if base is None:
    return
  bw, eb = res["bandwidth_bytes_per_s"], res["expert_bytes"]
  for r in res["strategies"] + res["noisy_oracle_sweep"]:
    copies = r.get("n_copies", 0)
    total_bytes = r.get("bytes_copied", 0)
    misses = sum(r.get("misses", []))
    on_demand = min(total_bytes, misses * eb)
    steps = max(1, new_tokens)
    cost = analytic.StepCost(base["tpot_s"], (total_bytes - on_demand) / steps, on_demand / steps, bw)
    r["predicted_tpot_s"] = cost.predicted_s
    r["pcie_bound_tpot_s"] = cost.pcie_bound_s
    # what prefetching could do with this row's bytes: hide them behind the compute, remove none
    r["compute_tpot_s"], r["transfer_tpot_s"] = base["tpot_s"], total_bytes / steps / bw
    r["prefetch_gain_bound"] = analytic.prefetch_gain_bound(base["tpot_s"], r["transfer_tpot_s"])
    r["model_gap"] = analytic.explain_gap(r["tpot_s"], cost.predicted_s, copies / steps, cfg.n_layers)
  # TTFT bound (shortest prompt, cold cache): the resident prefill plus the prefill's routed experts
  # crossing the link once at the measured bandwidth.
  needed = res["prefill_needed_experts"] * eb / bw
  for r in res["strategies"]:
    r["ttft_bound_s"] = base["ttft_s"] + (0.0 if r["name"] == "resident" else needed)


def targets(rows: dict[str, dict]) -> list[dict[str, Any]]:
  """The main job's speed targets (per-token latency of `learned` vs `on_demand` and `oracle`, the
  host's planning of its step against the step; the best time-to-first-token vs its PCIe bound, and
  the best of the strategies a deployment could run, the oracles left out), each with its measured
  value and verdict."""
  out = []
  if {"learned", "on_demand"} <= rows.keys():
    v = rows["on_demand"]["tpot_s"] / rows["learned"]["tpot_s"]
    out.append({"target": "learned per-token latency >= 2.5x faster than on_demand", "value": f"{v:.2f}x",
                "met": v >= 2.5})
  if {"learned", "oracle"} <= rows.keys():
    v = rows["learned"]["tpot_s"] / rows["oracle"]["tpot_s"]
    out.append({"target": "learned per-token latency within 1.3x of oracle", "value": f"{v:.2f}x",
                "met": v <= 1.3})
  plan = (rows.get("learned", {}).get("host_split_s") or {}).get("plan")
  cost = "learned's planning a decode step (predictor call included) < 2 % of the step"
  if rows.get("learned", {}).get("plans_in_step"):  # the predictor runs in the step's program
    in_step, tpot = rows["learned"].get("in_step_plan_s"), rows["learned"]["tpot_s"]
    v = in_step / tpot if in_step is not None and tpot else None
    out.append({"target": cost, "met": None if v is None else v < 0.02,
                "value": "-" if v is None else f"{100 * v:.1f} % ({in_step * 1e6:.0f} us of device time in the step)"})
  elif plan is not None and rows["learned"]["tpot_s"]:  # engine v2 times the host's planning of a step
    v = plan / rows["learned"]["tpot_s"]
    out.append({"target": cost, "value": f"{100 * v:.1f} % ({plan * 1e3:.2f} ms)", "met": v < 0.02})
  offloaded = [r for n, r in rows.items() if n != "resident"]
  if offloaded:
    out.append(_ttft_target("best", offloaded))
  deployable = [r for r in offloaded if r["name"] not in ("oracle", "noisy_oracle")]
  if deployable and len(deployable) < len(offloaded):  # the oracle replays a routing known in advance
    out.append(_ttft_target("best deployable", deployable))
  return out


def _ttft_target(label: str, rows: list[dict]) -> dict[str, Any]:
  """The target's verdict is None ("-") when the bound could not be computed."""
  best = min(rows, key=lambda r: r["ttft_s"])
  target = f"{label} time-to-first-token ({best['name']}) within 1.10x of its PCIe bound"
  if best.get("ttft_bound_s") is None:
    return {"target": target, "value": "-", "met": None}
  v = best["ttft_s"] / best["ttft_bound_s"]
  return {"target": target, "value": f"{v:.2f}x", "met": v <= 1.10}


def break_even(sweep: list[dict], target: float, key: str = "tpot_s") -> float | None:
  """The recall at which the noisy oracle's `key` (per-token latency; `bytes_copied`: the bytes its
  request moved) falls to `target` (interpolated between sweep points)."""
  pts = sorted((p["recall"], p[key]) for p in sweep)
  for (r0, t0), (r1, t1) in zip(pts, pts[1:]):
    if (t0 - target) * (t1 - target) <= 0 and t0 != t1:
      return r0 + (t0 - target) * (r1 - r0) / (t0 - t1)
  if pts and pts[0][1] <= target:
    return pts[0][0]  # already below at the lowest recall swept
  return None


def git_commit() -> str:
  try:
    # "-dirty": the tree differs from that commit (a copy of a working tree, say)
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                          text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def run(s: RunSettings, out: Path, model_path: str | None = None, data: str | None = None,
        log=print) -> dict[str, Any]:
  """The whole main job; writes results.json, report.md and plots into `out` and returns the results."""
  t0 = time.perf_counter()
  plain_log = log
  log = lambda msg: plain_log(f"[{time.perf_counter() - t0:6.1f} s] {msg}")
  out.mkdir(parents=True, exist_ok=True)
  cfg, model, corpus_dir, train_summary = stage_model(s, out, model_path, data, log)
  traces_dir = stage_traces(s, model, corpus_dir, out, log)
  pred_dirs = stage_predictors(s, traces_dir, out, log)
  from eval import compare_predictors
  log("[predictors] comparing families and baselines")
  comparison = compare_predictors.compare(str(traces_dir), pred_dirs)
  token_rows = [r for r in comparison["rows"] if r["family"] in ("token_mlp", "context")]
  best_family = max(token_rows, key=lambda r: r["recall_k_avg"])["family"]
  predictor = predictor_store.load_predictor(str(out / "predictors" / best_family))
  plan_dir = stage_plan_predictor(s, traces_dir, best_family, out, log)
  comparison["rows"] += compare_predictors.compare(str(traces_dir), [plan_dir], with_baselines=False)["rows"]
  plan_predictor = predictor_store.load_predictor(plan_dir)
  # results.json is rewritten after every strategy ("complete": false until the end), so what was
  # measured survives a failure in a later strategy or stage
  results = {
      "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_commit(), "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind, "platform": platform.platform(),
               "jax": jax.__version__, "settings": dataclasses.asdict(s), "wall_s": None, "complete": False},
      "model": {"config": cfg.to_dict(), "training": train_summary},
      "predictors": comparison["rows"], "predictor_meta": comparison["meta"], "learned_family": best_family,
      "plan_predictor": Path(plan_dir).name, "plan_lead": program.PLAN_LEAD,
  }

  def save(part: dict[str, Any]) -> None:
    results.update(part)
    results["meta"]["wall_s"] = time.perf_counter() - t0
    _write_results(out, results)

  log(f"[strategies] learned = {best_family}; running {', '.join(s.strategies)}")
  res = stage_strategies(s, model, corpus_dir, predictor, out, log, on_progress=save,
                         plan_predictor=plan_predictor)
  save(res)
  stage_analytic(res, cfg, s.new_tokens)
  rows = {r["name"]: r for r in res["strategies"]}
  if "resident" in rows:  # the decode step the predictors' cost is compared with
    comparison["meta"]["us_decode_step_model"] = rows["resident"]["tpot_s"] * 1e6
  results["meta"]["complete"] = True
  sweep = res["noisy_oracle_sweep"]
  save({**res, "break_even_recall": {b: break_even(sweep, rows[b]["tpot_s"])
                                     for b in ("on_demand", "lru") if b in rows},
        # bytes: the recall from which plans move no more than the baseline (caching's saving less
        # wrong copies' waste; unlike the time, the same on any machine)
        "break_even_recall_bytes": {b: break_even(sweep, rows[b]["bytes_copied"], key="bytes_copied")
                                    for b in ("on_demand", "lru") if b in rows},
        "targets": targets(rows), "timeline": _timeline_for_plot(rows)})
  pngs = plots.write_all(results, out)
  (out / "report.md").write_text(report.markdown(results, [p.name for p in pngs]))
  return results


def _write_results(out: Path, results: dict[str, Any]) -> None:
  """results.json, replaced whole (a reader never sees half a file)."""
  tmp = out / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=2, default=_json_default))
  tmp.replace(out / "results.json")


def _timeline_for_plot(rows: dict[str, dict]) -> dict[str, Any] | None:
  name = "learned" if "learned" in rows else next((n for n in rows if rows[n].get("timeline")), None)
  if name is None:
    return None
  copies = [{"layer": c["layer"], "step": c["step"], "issue_s": c["issue_s"], "ready_s": c["ready_s"],
             "prefetched": c["reason"] != "demand"} for c in rows[name]["timeline"] if c["ready_s"] is not None]
  return {"strategy": name, "copies": copies, "step_starts_s": rows[name].get("step_starts_s", []),
          "prompt_len": rows[name].get("prompt_len")}


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, Path):
    return str(x)
  raise TypeError(f"not JSON-serialisable: {type(x)}")
