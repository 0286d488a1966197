"""Peer benchmark: jaxmoe against what Hugging Face users run today (transformers, all on the device;
transformers + accelerate offloading to the CPU), on one random-weight checkpoint written by transformers.

The checkpoint is built with transformers' own classes (OlmoeForCausalLM shaped like OLMoE-1B-7B:
hidden 2048, 64 experts of intermediate 1024, top-8; or MixtralForCausalLM shaped like Mixtral-8x7B),
every matrix drawn with std 1/sqrt(fan-in) (the attention output projections 4x smaller, so that
greedy decoding does not cycle: `randomize`), and saved as bf16
safetensors with `save_pretrained` into --workdir (reused when it already holds the same checkpoint).

Systems, each measured on the same prompts:
  hf_device      transformers, eager attention, every weight on the device
  hf_accelerate  transformers + accelerate device_map="auto", the device capped (max_memory) at the
                 non-expert weights + --cache-fraction of the expert bytes, the rest on "cpu"
  jaxmoe_NAME    jaxmoe.hf.from_pretrained, then one engine per --strategies NAME at the same expert
                 budget (resident: every expert; oracle replays the routing of a resident run)

Per system and prompt length: TTFT and TPOT (over --new-tokens) of a cold request, medians of
--repeats after one warm-up request; the share of generated tokens equal to hf_device's (bf16
rounding may flip a few: reported, not asserted); the share of distinct tokens in its continuation.

Prompts: a random-weight model often decodes one token forever, and then every cache looks perfect
(each step routes to the experts of the last). So each prompt is drawn from seeded random token
ids, trying up to 8 seeds until hf_device's greedy continuation has at least half distinct tokens
(the best seed is kept, and flagged, if none does); the distinct share of every system's continuation
is recorded. For the first generated token the table's notes give each of hf_device, transformers in
f32 (the same weights upcast: exact math up to f32 rounding) and jaxmoe_resident its argmax, the gap
between its two top logits and its largest logit difference from the f32 run: a disagreement at a
near tie is rounding, one far from it is a program computing something else.

  python -m eval.bench_peer                          # OLMoE-shaped, 8 layers (GPU)
  python -m eval.bench_peer --shape mixtral          # Mixtral-shaped, 4 layers (GPU)
  python -m eval.bench_peer --cache-fraction 0.5 --strategies resident,lru,oracle
  python -m eval.bench_peer --cpu-smoke --out /tmp/peer   # tiny f32 model on the CPU, under a minute

Writes results.json and table.md to --out (default runs/bench/bench_peer/) and prints the table last.
"""

from __future__ import annotations

import os

# torch and jax share one device: jax must not take 75 % of its memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import datetime
import gc
import json
import shlex
import statistics
import sys
import time

import jax
import numpy as np
import torch
import transformers

from eval.bench_offload import drop_expert_weights
from jaxmoe import hf
from jaxmoe.offload import ExpertStore, strategies

try:
  from jaxmoe.offload.program import ProgramEngine as Engine
except ImportError:  # older trees: the per-layer engine, same generate API
  from jaxmoe.offload import OffloadEngine as Engine

DEFAULT_STRATEGIES = "resident,on_demand,lru,oracle"
# Tiny OLMoE-shaped model for --cpu-smoke; f32 so that jaxmoe's tokens must equal transformers'.
SMOKE = dict(shape="olmoe", layers=2, prompt_lengths="4,8", new_tokens=4, repeats=1,
             strategies="resident,lru", cache_fraction=0.5)
SMOKE_CONFIG = dict(hidden_size=64, num_experts=8, intermediate_size=32, num_experts_per_tok=2,
                    num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
MIN_DISTINCT = 0.5
PROMPT_SEEDS = 8


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", choices=("olmoe", "mixtral"), default=None,
                 help="checkpoint shape: OLMoE-1B-7B (64 experts, top-8) or Mixtral-8x7B (8 experts, "
                      "top-2) (default olmoe)")
  p.add_argument("--layers", type=int, default=None,
                 help="decoder layers of the checkpoint (default 8 for olmoe, 4 for mixtral)")
  p.add_argument("--workdir", default="runs/bench/bench_peer/checkpoint",
                 help="where the checkpoint is saved; reused when it holds the same one "
                      "(default runs/bench/bench_peer/checkpoint)")
  p.add_argument("--cache-fraction", type=float, default=None,
                 help="device expert budget as a share of all expert bytes, for accelerate's "
                      "max_memory and every offloading jaxmoe engine (default 0.25)")
  p.add_argument("--strategies", default=None,
                 help=f"comma-separated jaxmoe strategies (default {DEFAULT_STRATEGIES}); "
                      f"choices: resident, on_demand, lru, lfu, oracle, noisy_oracle")
  p.add_argument("--prompt-lengths", default=None, help="comma-separated prompt lengths (default 16,256)")
  p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 32)")
  p.add_argument("--repeats", type=int, default=None,
                 help="measured requests per system and prompt, after one warm-up; medians (default 3)")
  p.add_argument("--cpu-smoke", action="store_true",
                 help="tiny f32 OLMoE-shaped model on the CPU (hidden 64, 8 experts, 2 layers), prompts "
                      "4,8, 4 new tokens, 1 repeat, jaxmoe resident,lru at half the experts; accelerate "
                      "skipped. Checks every code path, measures nothing meaningful")
  p.add_argument("--out", default="runs/bench/bench_peer", help="directory for results.json and table.md")
  args = p.parse_args(argv)
  defaults = dict(shape="olmoe", layers=None, prompt_lengths="16,256", new_tokens=32, repeats=3,
                  strategies=DEFAULT_STRATEGIES, cache_fraction=0.25)
  if args.cpu_smoke:
    defaults.update(SMOKE)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.layers is None:
    args.layers = 8 if args.shape == "olmoe" else 4
  args.prompt_lengths = [int(n) for n in str(args.prompt_lengths).split(",")]
  args.strategies = [s for s in str(args.strategies).split(",") if s]
  if args.new_tokens < 2:
    p.error("--new-tokens must be at least 2 (TPOT needs a decoded token)")
  return args


# --------------------------------------------------------------------------------------------------
# checkpoint


def hf_config(args) -> transformers.PretrainedConfig:
  """The transformers config of --shape; no bos/eos/pad, so that generation never stops early."""
  common = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, num_hidden_layers=args.layers,
                max_position_embeddings=4096)
  if args.shape == "olmoe":
    shape = SMOKE_CONFIG if args.cpu_smoke else dict(hidden_size=2048, num_experts=64, intermediate_size=1024,
                                                     num_experts_per_tok=8)
    return transformers.OlmoeConfig(norm_topk_prob=False, **shape, **common)
  if args.cpu_smoke:
    raise SystemExit("--cpu-smoke builds the olmoe shape only")
  return transformers.MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                    num_experts_per_tok=2, sliding_window=None, **common)


def model_class(shape: str):
  name = {"olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM"}[shape]
  if not hasattr(transformers, name):
    raise SystemExit(f"transformers {transformers.__version__} has no {name}")
  return getattr(transformers, name)


ATTENTION_OUT_SCALE = 0.25  # o_proj's std relative to 1/sqrt(fan-in) (see `randomize`)


def randomize(model, seed: int):
  """Norm weights near 1, every other tensor normal with std 1/sqrt(its last dim, the fan-in), the
  attention output projections ATTENTION_OUT_SCALE times that: at full scale the attention output, an
  average over the context, dominates a random model's residual stream, and greedy decoding falls into
  a short cycle whatever the prompt (a 4-layer OLMoE of hidden 512 on the CPU: 0.17 of 24 tokens
  distinct after a 256-token prompt; 1.0 with o_proj 4x smaller)."""
  gen = torch.Generator(device=model.device).manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
      if "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      else:
        scale = ATTENTION_OUT_SCALE if name.endswith("o_proj.weight") else 1.0
        p.copy_(noise * scale * p.shape[-1] ** -0.5)


def build_checkpoint(args, device: str, dtype: torch.dtype) -> str:
  """Save a random-weight checkpoint into --workdir unless it already holds this config."""
  cfg = hf_config(args)
  stamp = {"shape": args.shape, "layers": args.layers, "dtype": str(dtype), "config": cfg.to_diff_dict(),
           "attention_out_scale": ATTENTION_OUT_SCALE}
  stamp_file = os.path.join(args.workdir, "bench_peer_stamp.json")
  if os.path.isfile(stamp_file):
    with open(stamp_file) as f:
      if json.load(f) == json.loads(json.dumps(stamp)):
        return args.workdir
  start = time.perf_counter()
  with torch.device(device):  # initialised where it will run: fast, and no host copy of a large model
    model = model_class(args.shape)(cfg).eval()
  randomize(model, seed=0)
  remove_weights(args.workdir)
  model.to(dtype).save_pretrained(args.workdir)
  del model
  free_torch()
  with open(stamp_file, "w") as f:
    json.dump(stamp, f)
  print(f"checkpoint saved to {args.workdir} in {time.perf_counter() - start:.1f} s", flush=True)
  return args.workdir


def remove_weights(path: str):
  """Delete an older checkpoint's weight files: a stale shard index would outrank a new single file."""
  if os.path.isdir(path):
    for name in os.listdir(path):
      if name.endswith(".safetensors") or name == "model.safetensors.index.json":
        os.remove(os.path.join(path, name))


def weight_bytes(path: str) -> tuple[int, int]:
  """(non-expert bytes, routed-expert bytes) of a checkpoint's tensors (routers are non-expert)."""
  expert = other = 0
  for name, t in hf.read_weights(path).items():
    if ".experts." in name:
      expert += t.nbytes
    else:
      other += t.nbytes
  return other, expert


def free_torch():
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# measurement


def sync(device: str):
  if device == "cuda":
    torch.cuda.synchronize()


class _TokenClock(transformers.StoppingCriteria):
  """Stamps the time each new token is ready (after a device sync); never stops generation."""

  def __init__(self, device: str):
    self.device, self.stamps = device, []

  def __call__(self, input_ids, scores, **kwargs):
    sync(self.device)
    self.stamps.append(time.perf_counter())
    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def torch_request(model, prompt: np.ndarray, new_tokens: int, device: str):
  """One greedy transformers request -> (new tokens [N], ttft_s, tpot_s)."""
  ids = torch.tensor(prompt, dtype=torch.long, device=device)
  clock = _TokenClock(device)
  sync(device)
  start = time.perf_counter()
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         stopping_criteria=transformers.StoppingCriteriaList([clock]))
  stamps = clock.stamps
  return (out[0, prompt.shape[1]:].cpu().numpy(), stamps[0] - start,
          float(np.mean(np.diff(stamps))))


def distinct(tokens) -> float:
  tokens = list(np.asarray(tokens).ravel())
  return len(set(tokens)) / max(1, len(tokens))


def choose_prompts(model, args, vocab: int, device: str) -> dict[int, dict]:
  """Per prompt length, the first seeded random prompt whose greedy continuation by `model` has at
  least MIN_DISTINCT distinct tokens (else the most varied one, flagged)."""
  chosen = {}
  for length in args.prompt_lengths:
    best = None
    for seed in range(PROMPT_SEEDS):
      prompt = np.random.default_rng([seed, length]).integers(0, vocab, (1, length)).astype(np.int32)
      tokens, _, _ = torch_request(model, prompt, args.new_tokens, device)
      cand = {"seed": seed, "prompt": prompt, "distinct": distinct(tokens)}
      if best is None or cand["distinct"] > best["distinct"]:
        best = cand
      if cand["distinct"] >= MIN_DISTINCT:
        break
    best["degenerate"] = best["distinct"] < MIN_DISTINCT
    chosen[length] = best
  return chosen


def summarize(runs: list[tuple[np.ndarray, float, float]], reference) -> dict:
  """Medians over measured requests; tokens of the last one against the reference's."""
  tokens = runs[-1][0]
  cell = {"ttft_s": statistics.median(r[1] for r in runs), "tpot_s": statistics.median(r[2] for r in runs),
          "tokens": tokens.tolist(), "distinct": distinct(tokens)}
  if reference is not None:
    cell["agreement"] = float(np.mean(tokens == np.asarray(reference)))
  return cell


def bench_torch(model, prompts, args, device: str, reference) -> dict:
  cells = {}
  for length, p in prompts.items():
    torch_request(model, p["prompt"], args.new_tokens, device)  # warm-up
    runs = [torch_request(model, p["prompt"], args.new_tokens, device) for _ in range(args.repeats)]
    cells[length] = summarize(runs, None if reference is None else reference[length])
  return cells


def accelerate_max_memory(other: int, expert: int, fraction: float) -> dict:
  return {0: int(other + fraction * expert), "cpu": 1 << 40}


def bench_accelerate(path, prompts, args, dtype, reference, other: int, expert: int) -> dict:
  """transformers + accelerate device_map="auto" at the budget; {"skipped": reason} if it cannot run."""
  if args.cpu_smoke or not torch.cuda.is_available():
    return {"skipped": "needs a CUDA device (accelerate offloads from the GPU to the CPU)"}
  try:
    import accelerate  # noqa: F401  (device_map="auto" needs it)
  except ImportError as e:
    return {"skipped": f"accelerate is not installed ({e})"}
  max_memory = accelerate_max_memory(other, expert, args.cache_fraction)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=dtype, device_map="auto", max_memory=max_memory, attn_implementation="eager").eval()
  placed = {}
  for param in model.parameters():
    placed[str(param.device)] = placed.get(str(param.device), 0) + param.numel() * param.element_size()
  cells = bench_torch(model, prompts, args, "cuda", reference)
  del model
  free_torch()
  return {"max_memory": {str(k): v for k, v in max_memory.items()},
          "param_bytes_by_device": placed, "prompts": cells}


def jax_request(engine, prompt: np.ndarray, new_tokens: int):
  engine.reset_cache()  # every request starts cold (resident stays loaded)
  tokens, stats = engine.generate(prompt, new_tokens)
  return tokens[0, prompt.shape[1]:], stats.ttft_s, stats.tpot_s, stats


def bench_jaxmoe(path, prompts, args, reference, save=lambda rows: None) -> dict:
  """One row per strategy: an engine per prompt at the expert budget (oracle replays the routing of
  the resident engine's run of that prompt); `save(rows)` after each row."""
  longest = max(args.prompt_lengths) + args.new_tokens + 1
  dtype = "float32" if args.cpu_smoke else None  # None: the checkpoint's bf16
  cfg, model = hf.from_pretrained(path, dtype=dtype, max_seq_len=longest)
  store = ExpertStore.from_model(model)
  drop_expert_weights(model)  # from here on only the store holds the experts
  cache_bytes = int(args.cache_fraction * store.nbytes)
  routing, rows, first_logits = {}, {}, {}
  names = sorted(args.strategies, key=lambda n: n != "resident")  # resident first: oracle replays it
  for name in names:
    cells = {}
    for length, p in prompts.items():
      try:
        strategy = strategies.make(name, n_experts=cfg.n_experts, routing=routing.get(length))
        budget = None if strategy.resident else cache_bytes  # resident: every expert, loaded once
        engine = Engine(model, cache_bytes=budget, strategy=strategy, store=store)
      except (ValueError, NotImplementedError) as e:
        cells[length] = {"skipped": str(e)}
        continue
      try:
        first = jax_request(engine, p["prompt"], args.new_tokens)  # warm-up (compiles)
        if name == "resident":
          routing[length] = first[3].routing
          first_logits[length] = first[3].logits[0, 0]
        runs = [jax_request(engine, p["prompt"], args.new_tokens)[:3] for _ in range(args.repeats)]
        cells[length] = summarize(runs, reference[length])
      except ValueError as e:  # e.g. a prompt that routes more experts than the cache holds
        cells[length] = {"skipped": str(e)}
      finally:
        engine.close()
        del engine
        gc.collect()  # release this engine's device slot pool before the next one is made
    rows[f"jaxmoe_{name}"] = {"cache_bytes": store.nbytes if name == "resident" else cache_bytes,
                              "prompts": cells}
    save(rows)
  return {"config": cfg.to_dict(), "store_bytes": int(store.nbytes), "systems": rows,
          "first_logits": {"jaxmoe_resident": first_logits} if first_logits else {}}


def bench(args, save=lambda result: None) -> dict:
  """Every system on the same prompts; `save(result so far)` after each system (a run cut short
  keeps what it measured)."""
  t_start = time.perf_counter()
  device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
  dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
  path = build_checkpoint(args, device, dtype)
  other, expert = weight_bytes(path)
  print(f"{args.shape}, {args.layers} layers: {other / 1e9:.3g} GB non-expert + {expert / 1e9:.3g} GB "
        f"expert weights; budget {args.cache_fraction:g} of the experts", flush=True)

  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=dtype, attn_implementation="eager").to(device).eval()
  prompts = choose_prompts(model, args, model.config.vocab_size, device)
  systems = {"hf_device": {"prompts": bench_torch(model, prompts, args, device, None)}}
  first_logits = {"hf_device": {n: torch_first_logits(model, p["prompt"], device) for n, p in prompts.items()}}
  model.float()  # the same weights in f32: the reference both bf16 programs round away from
  first_logits["hf_f32"] = {n: torch_first_logits(model, p["prompt"], device) for n, p in prompts.items()}
  del model
  free_torch()
  reference = {n: np.asarray(c["tokens"]) for n, c in systems["hf_device"]["prompts"].items()}
  for cell in systems["hf_device"]["prompts"].values():
    cell["agreement"] = 1.0
  result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m eval.bench_peer " + shlex.join(sys.argv[1:]),
            "args": dict(vars(args)),
            "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "jax_device": jax.devices()[0].device_kind,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "jax": jax.__version__},
            "dtype": str(dtype).removeprefix("torch."), "checkpoint": os.path.abspath(path),
            "non_expert_bytes": int(other), "expert_bytes": int(expert),
            "prompts": {str(n): {"seed": p["seed"], "distinct": p["distinct"], "degenerate": p["degenerate"]}
                        for n, p in prompts.items()},
            "engine": f"{Engine.__module__}.{Engine.__name__}", "systems": {}}

  def update(new_systems: dict):
    result["systems"].update({k: _str_keys(v) for k, v in new_systems.items()})
    result["wall_s"] = time.perf_counter() - t_start
    save(result)

  update(systems)
  update({"hf_accelerate": bench_accelerate(path, prompts, args, dtype, reference, other, expert)})
  jax_result = bench_jaxmoe(path, prompts, args, reference, save=update)
  jax_rows = jax_result.pop("systems")
  first_logits.update(jax_result.pop("first_logits"))
  result.update(jax_result, first_token=first_token_report(first_logits))
  update(jax_rows)
  return result


def torch_first_logits(model, prompt: np.ndarray, device: str) -> np.ndarray:
  """The f32 logits [V] of the token after `prompt` (one forward pass)."""
  ids = torch.tensor(prompt, dtype=torch.long, device=device)
  with torch.no_grad():
    return model(ids).logits[0, -1].float().cpu().numpy()


def first_token_report(first_logits: dict[str, dict[int, np.ndarray]]) -> dict:
  """Per prompt length and system: the first generated token's argmax, the gap between its two top
  logits, and its largest logit difference from transformers in f32 (the same weights, exact math up
  to f32 rounding): whether a first token that differs between systems is a near tie rounded either
  way or one program computing something else."""
  report = {}
  for n, exact in first_logits.get("hf_f32", {}).items():
    cells = {}
    for system, by_length in first_logits.items():
      if n not in by_length:
        continue
      logits = np.asarray(by_length[n], np.float32)
      top2 = np.sort(logits)[-2:]
      cells[system] = {"argmax": int(np.argmax(logits)), "top2_gap": float(top2[1] - top2[0]),
                       "max_abs_vs_hf_f32": float(np.max(np.abs(logits - exact)))}
    report[str(n)] = cells
  return report


def _str_keys(system: dict) -> dict:
  """JSON object keys are strings: prompt lengths become "16", "256"."""
  if "prompts" in system:
    system = dict(system, prompts={str(n): c for n, c in system["prompts"].items()})
  return system


# --------------------------------------------------------------------------------------------------
# report


def _row(name: str, cells: dict, lengths: list[str]) -> str:
  """One table row: TTFT, TPOT, agreement and distinct share per prompt length ("-" where skipped)."""
  columns = (("ttft_s", lambda s: f"{s * 1e3:.1f}"), ("tpot_s", lambda s: f"{s * 1e3:.1f}"),
             ("agreement", lambda x: f"{x:.2f}"), ("distinct", lambda x: f"{x:.2f}"))
  values = [fmt(cells[n][key]) if key in cells[n] else "-" for key, fmt in columns for n in lengths]
  return "| " + " | ".join([name] + values) + " |"


def _notes(name: str, system: dict, lengths: list[str]) -> list[str]:
  """Why a system or prompt was skipped, and where accelerate placed the weights."""
  if "skipped" in system:
    return [f"- {name} skipped: {system['skipped']}"]
  cells = system["prompts"]
  notes = [f"- {name}, prompt {n}: skipped: {cells[n]['skipped']}" for n in lengths if "skipped" in cells[n]]
  if "param_bytes_by_device" in system:
    placed = ", ".join(f"{where} {size / 1e9:.3g} GB"
                       for where, size in system["param_bytes_by_device"].items())
    notes.append(f"- {name} placed its weights: {placed} (max_memory {system['max_memory']})")
  return notes


def table(result) -> str:
  lengths = [str(n) for n in result["args"]["prompt_lengths"]]
  head = (["system"] + [f"TTFT {n} ms" for n in lengths] + [f"TPOT {n} ms" for n in lengths]
          + [f"agree {n}" for n in lengths] + [f"distinct {n}" for n in lengths])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  notes = []
  for name, system in result["systems"].items():
    if "prompts" in system:
      lines.append(_row(name, system["prompts"], lengths))
    notes += _notes(name, system, lengths)
  args = result["args"]
  intro = (f"`{result['command']}`: {args['shape']}-shaped, {args['layers']} layers, random weights, "
           f"{result['dtype']}; {result['non_expert_bytes'] / 1e9:.3g} GB non-expert + "
           f"{result['expert_bytes'] / 1e9:.3g} GB expert weights; expert budget "
           f"{args['cache_fraction']:g} for hf_accelerate and the offloading jaxmoe engines "
           f"({result['engine']}; jaxmoe_resident holds every expert). torch on "
           f"{result['torch_device']}, jax on {result['jax_device']}. "
           f"Medians of {args['repeats']} cold requests after a warm-up; TPOT over {args['new_tokens']} "
           f"new tokens; agree = share of generated tokens equal to hf_device's; distinct = share of "
           f"distinct tokens in the continuation.")
  for n, p in result["prompts"].items():
    if p["degenerate"]:
      notes.append(f"- prompt {n}: no seed gave {MIN_DISTINCT:g} distinct tokens; best {p['distinct']:.2f}")
  for n, cells in result.get("first_token", {}).items():
    said = "; ".join(f"{system} token {c['argmax']}, top-2 gap {c['top2_gap']:.3g}, max |diff| from hf_f32 "
                     f"{c['max_abs_vs_hf_f32']:.3g}" for system, c in cells.items())
    notes.append(f"- first token after prompt {n}: {said}")
  return "\n".join([f"### {result['date']}", "", intro, ""] + lines + ([""] + notes if notes else []) + [""])


def write(result: dict, out: str) -> str:
  """results.json and table.md into `out`; -> the table."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  text = table(result)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  return text


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = bench(args, save=lambda partial: write(partial, args.out))
  print(write(result, args.out))
  return result


if __name__ == "__main__":
  main()
