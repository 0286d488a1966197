"""Train the MoE language model from scratch on a local corpus and leave a self-contained run directory.

The run directory holds config.json, the tokenizer (AutoTokenizer loads it), Orbax checkpoints
(parameters, optimizer state, step, data position), metrics.jsonl and summary.json; `jaxmoe.checkpoint.
load_model(run_dir)` loads the trained model. Training resumes from the newest checkpoint; Ctrl-C or a
SIGTERM saves a resumable one and stops (KeyboardInterrupt / SystemExit), so the next run continues.

  python -m train.train_model --preset small --workdir runs/small
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxmoe import checkpoint, config as config_lib, model as model_lib
from jaxmoe.config import MoEConfig
from train import data as data_lib


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """How to train (the model itself is a MoEConfig)."""

  steps: int = 40  # optimizer steps the LR schedule spans
  batch_size: int = 8  # sequences per step
  seq_len: int = 64  # tokens per sequence
  lr: float = 3e-3  # peak learning rate (AdamW)
  warmup: int = 5  # linear warmup steps, then cosine decay to lr * min_lr_ratio
  min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
  weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not on norms)
  clip_norm: float = 1.0  # global gradient-norm clipping
  capacity_factor: float = 2.0  # expert capacity during training (tokens over it are dropped)
  max_minutes: float = 5.0  # wall-clock budget from the start (data + compile + steps); then stop
  eval_every: int = 20  # validation every N steps (0: only at the end)
  eval_batches: int = 4  # validation batches of batch_size x seq_len tokens
  ckpt_every: int = 20  # checkpoint every N steps (0: only at the end)
  keep: int = 2  # newest checkpoints kept
  save_optimizer: bool = True  # keep the optimizer state in the final checkpoint (the others always do)
  log_every: int = 10  # steps between metrics lines (each one syncs with the device)
  seed: int = 0  # parameter init and data order
  val_fraction: float = 0.05  # fraction of documents (files) held out for validation
  corpus_mb: float = 0.0  # use at most this many MB of text (0: all)
  tokenizer_mb: float = 4.0  # MB of training text the BPE tokenizer learns from
  corpus: str | None = None  # the text when `data` is not given: None, the stdlib; "python", the stdlib
  # and every installed package's sources (train.data.PYTHON)

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every", "ckpt_every", "warmup"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not (self.lr > 0 and self.max_minutes > 0 and self.capacity_factor > 0):
      raise ValueError("lr, max_minutes and capacity_factor must be positive")


# Per preset: tiny (seconds, tests), small (CPU, a few minutes), gpu (one H200, ~3 minutes in all).
TRAIN_PRESETS = {
    "tiny": TrainSettings(corpus_mb=1.0, tokenizer_mb=0.5),
    "small": TrainSettings(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup=20, eval_every=100,
                           eval_batches=8, ckpt_every=100, max_minutes=10.0, corpus_mb=8.0),
    "gpu": TrainSettings(steps=500, batch_size=64, seq_len=512, lr=1e-3, warmup=40, eval_every=250,
                         eval_batches=4, ckpt_every=0, max_minutes=2.5, capacity_factor=1.5,
                         log_every=25),
    # gpu_fine: the gpu preset's expert parameters as 64 experts, top-8 (OLMoE's granularity), on the
    # stdlib and the installed packages' sources (64 MB of them: ~1 epoch, against ~2 of the stdlib)
    "gpu_fine": TrainSettings(steps=500, batch_size=64, seq_len=512, lr=1e-3, warmup=40, eval_every=250,
                              eval_batches=4, ckpt_every=0, max_minutes=4.0, capacity_factor=1.5,
                              log_every=25, corpus="python", corpus_mb=64.0),
}


def train_settings(preset: str) -> TrainSettings:
  if preset not in TRAIN_PRESETS:
    raise ValueError(f"no training settings for preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
  return TRAIN_PRESETS[preset]


# ----------------------------------------------------------------------------------- the steps

def lr_schedule(s: TrainSettings) -> optax.Schedule:
  """Linear warmup to s.lr, then cosine decay to s.lr * s.min_lr_ratio at s.steps."""
  warmup = min(s.warmup, s.steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, max(s.steps, warmup + 1),
                                            end_value=s.lr * s.min_lr_ratio)


def train_flops_per_token(cfg: MoEConfig, seq_len: int, capacity_factor: float) -> float:
  """Matmul FLOPs of one training token (forward + backward = 3 x forward), counting the expert
  capacity actually computed (top_k * capacity_factor experts per token) and full T x T attention."""
  d, hd = cfg.d_model, cfg.head_dim
  attn = 2 * d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 4 * seq_len * cfg.n_heads * hd
  experts = cfg.top_k * capacity_factor * 2 * len(cfg.expert_matrices) * d * cfg.d_ff
  shared = 2 * 3 * d * cfg.shared_expert_d_ff
  forward = cfg.n_layers * (attn + 2 * d * cfg.n_experts + experts + shared) + 2 * d * cfg.vocab_size
  return 3.0 * forward


def make_optimizer(s: TrainSettings) -> optax.GradientTransformation:
  schedule = lr_schedule(s)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(s.clip_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=s.weight_decay, mask=decay_mask))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def train_step(graphdef, cfg: MoEConfig, s: TrainSettings, params, opt_state, tokens):
  """One AdamW step on tokens [B, T+1] -> (params, opt_state, metrics); params and state are donated.

  Loss = cross-entropy + aux_loss_coef * load-balancing loss + z_loss_coef * router z-loss, with the
  experts run through the capacity path (fast backward) at `s.capacity_factor`.
  """
  tx = make_optimizer(s)

  def loss_fn(params):
    out = nnx.merge(graphdef, params)(tokens[:, :-1], capacity_factor=s.capacity_factor)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:]).mean()
    loss = ce + cfg.aux_loss_coef * out.aux_loss + cfg.z_loss_coef * out.z_loss
    return loss, {"loss": loss, "ce": ce, "aux": out.aux_loss, "z": out.z_loss}

  grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  metrics["grad_norm"] = optax.global_norm(grads)
  return optax.apply_updates(params, updates), opt_state, metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def eval_step(graphdef, cfg: MoEConfig, params, tokens):
  """Summed NLL [] and routed counts [L, E] of the exact (dropless) model on tokens [B, T+1].

  On a GPU the dropless ragged path is a slow dense masked dot, so there the capacity path runs with
  capacity E/k: every expert can take every token, nothing is dropped, the result is the same model.
  """
  capacity = cfg.n_experts / cfg.top_k if jax.default_backend() == "gpu" else None
  out = nnx.merge(graphdef, params)(tokens[:, :-1], capacity_factor=capacity)
  nll = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:]).sum()
  counts = jnp.stack([jnp.bincount(e.reshape(-1), length=cfg.n_experts) for e in out.experts])
  return nll, counts


def evaluate(graphdef, cfg: MoEConfig, params, batches: list[np.ndarray]) -> dict:
  """Validation loss, perplexity and normalised expert-load entropy per layer."""
  nll, tokens, counts = 0.0, 0, 0
  for b in batches:
    n, c = eval_step(graphdef, cfg, params, jnp.asarray(b))
    nll, tokens, counts = nll + float(n), tokens + b[:, 1:].size, counts + np.asarray(c, np.float64)
  p = counts / counts.sum(axis=1, keepdims=True)  # [L, E]
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1) / np.log(p.shape[1])
  loss = nll / tokens
  return {"val_loss": loss, "val_ppl": math.exp(loss), "val_tokens": tokens,
          "load_entropy": [round(float(h), 4) for h in entropy]}


# ---------------------------------------------------------------------------------- the driver

def train_and_evaluate(cfg: MoEConfig, workdir: str | Path, settings: TrainSettings | None = None, *,
                       data: str | Path | None = None, resume: bool = True, stop_at: int | None = None,
                       progress: bool = True, log: Callable[[str], None] = print) -> dict:
  """Train `cfg` in `workdir` (resuming from its newest checkpoint), evaluate, and return the summary.

  Stops at `settings.steps`, at `stop_at` (a step limit that keeps the schedule of `settings.steps`),
  or when `settings.max_minutes` have passed. On SIGINT / SIGTERM (or an error) it saves a checkpoint
  that resumes training and raises KeyboardInterrupt / SystemExit (the error): a caller never goes on
  with a half-trained model. A run that finished without optimizer state (save_optimizer=False) is done:
  calling again returns its summary.
  """
  s = settings or TrainSettings()
  t0 = time.monotonic()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if s.seq_len > cfg.max_seq_len:
    raise ValueError(f"seq_len {s.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
  saved = checkpoint.latest_checkpoint(workdir)
  if saved is not None and resume:
    saved_cfg = checkpoint.load_config(saved)
    if saved_cfg != cfg:
      raise ValueError(f"{workdir} holds a run of another model config; use another --workdir or the "
                       f"same preset (saved: {checkpoint.brief_config(saved_cfg)}; "
                       f"now: {checkpoint.brief_config(cfg)})")
  elif saved is not None and not resume:
    raise ValueError(f"{workdir} already holds checkpoints ({saved.name}) and --no-resume was given; "
                     f"use an empty --workdir")
  if saved is not None:
    meta = checkpoint.read_meta(saved)
    pos = meta["data_position"]
    if (pos.get("batch_size"), pos.get("seq_len"), pos.get("seed")) != (s.batch_size, s.seq_len, s.seed):
      raise ValueError(f"{saved} was saved with batch_size/seq_len/seed {pos.get('batch_size')}/"
                       f"{pos.get('seq_len')}/{pos.get('seed')}; resume with the same settings or use "
                       f"another --workdir")
    if not meta.get("has_opt_state"):
      return _finished_summary(workdir, saved, log)

  corpus = data_lib.prepare_corpus(workdir, cfg.vocab_size, s.corpus if data is None else data,
                                   val_fraction=s.val_fraction,
                                   max_bytes=int(s.corpus_mb * 1e6) or None,
                                   tokenizer_bytes=int(s.tokenizer_mb * 1e6),
                                   model_max_length=cfg.max_seq_len, log=log)
  checkpoint.save_config(cfg, workdir)
  stream = data_lib.BatchStream(corpus.train, s.batch_size, s.seq_len, s.seed)
  val_batches = data_lib.eval_batches(corpus.val, s.batch_size, s.seq_len, s.eval_batches)
  val_targets = np.concatenate([b[:, 1:] for b in val_batches])
  unigram_ppl = math.exp(data_lib.unigram_nll(corpus.train, val_targets, cfg.vocab_size))

  tx, schedule = make_optimizer(s), lr_schedule(s)
  graphdef, abstract = checkpoint.abstract_params(cfg)
  data_position = {"position": 0, "batch_size": s.batch_size, "seq_len": s.seq_len, "seed": s.seed}
  if saved is not None:  # the run directory: a corrupt newest checkpoint falls back to an older one
    state = checkpoint.restore_training(workdir, cfg, jax.eval_shape(tx.init, abstract))
    params, opt_state, start = state.params, state.opt_state, state.step
    log(f"resuming from {state.path} (step {start})")
  else:
    _, params = nnx.split(model_lib.create(cfg, seed=s.seed), nnx.Param)
    opt_state, start = tx.init(params), 0
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(f"model: {n_params / 1e6:.1f} M parameters ({cfg.n_layers} layers x {cfg.n_experts} experts, "
      f"top-{cfg.top_k}); {s.batch_size} x {s.seq_len} tokens per step")

  metrics_file = (workdir / "metrics.jsonl").open("a")
  write = lambda rec: (metrics_file.write(json.dumps(rec) + "\n"), metrics_file.flush())

  def save(step: int, final: bool = False):
    data_position["position"] = step
    # Only the finished model may drop the optimizer state: every other checkpoint must resume training.
    keep_opt = s.save_optimizer or not final
    checkpoint.save_run(workdir, cfg, params, opt_state=opt_state if keep_opt else None, step=step,
                        data_position=dict(data_position), keep=s.keep,
                        extra={"settings": dataclasses.asdict(s)})

  end = min(s.steps, stop_at) if stop_at is not None else s.steps
  if start == 0 and s.eval_every:
    write({"step": 0, "split": "val", **evaluate(graphdef, cfg, params, val_batches)})
  step, stopped_by, compile_s = start, "steps", None
  t_steps, steps_timed, paused_s = None, 0, 0.0  # paused_s: in-loop evaluation and checkpoints
  signals: list[int] = []
  restore_handlers = _catch_signals(signals)
  bar = tqdm(total=end, initial=start, disable=not progress, dynamic_ncols=True, desc="train",
             mininterval=0.5 if sys.stderr.isatty() else 10.0)  # few lines when logged to a file
  try:
    while step < end:
      if signals:
        stopped_by = "signal"
        break
      if time.monotonic() - t0 > s.max_minutes * 60:
        stopped_by = "time"
        break
      t_step = time.monotonic()
      params, opt_state, metrics = train_step(graphdef, cfg, s, params, opt_state,
                                              jnp.asarray(stream.batch(step)))
      step += 1
      bar.update(1)
      if compile_s is None:  # the first step compiles: keep it out of the throughput
        jax.block_until_ready(params)
        compile_s = time.monotonic() - t_step
        t_steps = time.monotonic()
      else:
        steps_timed += 1
      if step % s.log_every == 0 or step == end:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tok_s = steps_timed * s.batch_size * s.seq_len / max(time.monotonic() - t_steps - paused_s, 1e-9)
        write({"step": step, "split": "train", **m, "lr": float(schedule(step - 1)), "tokens_per_s": tok_s,
               "elapsed_s": time.monotonic() - t0})
        bar.set_postfix(loss=f"{m['ce']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
      t_pause = time.monotonic()
      if s.eval_every and step % s.eval_every == 0 and step < end:
        write({"step": step, "split": "val", **evaluate(graphdef, cfg, params, val_batches)})
      if s.ckpt_every and step % s.ckpt_every == 0 and step < end:
        save(step)
      paused_s += time.monotonic() - t_pause
    jax.block_until_ready(params)
    train_s = time.monotonic() - t_steps - paused_s if t_steps is not None else 0.0
  except BaseException:  # an error or a second Ctrl-C mid-run: keep what was trained, if still valid
    stopped_by = "error"
    raise
  finally:
    bar.close()
    restore_handlers()
    if stopped_by in ("signal", "error"):
      try:
        jax.block_until_ready(params)
        save(step)
        log(f"stopped at step {step}: checkpoint saved in {workdir}; run again to resume")
      except Exception as e:  # noqa: BLE001 (buffers donated to a step that failed)
        log(f"could not save a checkpoint at step {step}: {e}")
      metrics_file.close()

  if stopped_by == "steps" and step < s.steps:  # a planned interruption: checkpoint, no evaluation
    save(step)
    metrics_file.close()
    stopped_by = "stop_at"
  if stopped_by == "signal":  # the checkpoint is saved: stop the caller too, as the signal asked
    if signals[0] == signal.SIGINT:
      raise KeyboardInterrupt
    raise SystemExit(128 + signals[0])
  if stopped_by == "stop_at":
    return {"interrupted": True, "step": step, "stopped_by": stopped_by}
  result = evaluate(graphdef, cfg, params, val_batches)
  write({"step": step, "split": "val", **result})
  save(step, final=True)
  metrics_file.close()
  tokens_timed = steps_timed * s.batch_size * s.seq_len
  tok_s = tokens_timed / train_s if train_s > 0 else None
  flops = train_flops_per_token(cfg, s.seq_len, s.capacity_factor)
  summary = {
      "step": step, "steps": s.steps, "stopped_by": stopped_by, "interrupted": False,
      **result, "unigram_ppl": unigram_ppl, "min_load_entropy": min(result["load_entropy"]),
      "tokens_per_s": tok_s, "train_flops_per_token": flops,
      "model_tflops_per_s": tok_s * flops / 1e12 if tok_s else None,
      "train_tokens_this_run": (step - start) * s.batch_size * s.seq_len,
      "compile_s": compile_s, "wall_s": time.monotonic() - t0, "n_params": int(n_params),
      "backend": jax.default_backend(), "corpus": {k: v for k, v in corpus.info.items() if k != "key"},
      "settings": dataclasses.asdict(s), "config": cfg.to_dict(),
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  log(f"step {step}: val loss {result['val_loss']:.3f}, ppl {result['val_ppl']:.1f} (unigram "
      f"{unigram_ppl:.1f}); load entropy per layer {result['load_entropy']}; "
      f"{summary['wall_s']:.0f} s")
  return summary


def _finished_summary(workdir: Path, saved: Path, log: Callable[[str], None]) -> dict:
  """The summary of a run whose newest checkpoint `saved` is its final model without optimizer state."""
  summary_path = workdir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
  if summary is None or summary.get("step") != checkpoint.read_meta(saved)["step"]:
    raise ValueError(f"checkpoint {saved} holds no optimizer state and {summary_path} does not record it "
                     f"as the finished model: training cannot resume; use another --workdir")
  log(f"{workdir} holds a finished model (step {summary['step']}, saved without optimizer state): "
      f"nothing to train")
  return summary


def _catch_signals(signals: list[int]) -> Callable[[], None]:
  """Record SIGINT/SIGTERM in `signals` (the loop stops cleanly); a second Ctrl-C interrupts at once."""
  if threading.current_thread() is not threading.main_thread():
    return lambda: None
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

  def handler(signum, frame):
    if signals and signum == signal.SIGINT:
      raise KeyboardInterrupt
    signals.append(signum)

  for sig in previous:
    signal.signal(sig, handler)
  return lambda: [signal.signal(sig, h) for sig, h in previous.items()]


# --------------------------------------------------------------------------------------- the CLI

def parse_args(argv=None) -> argparse.Namespace:
  defaults = "\n".join(f"  {name}: steps={t.steps} batch_size={t.batch_size} seq_len={t.seq_len} lr={t.lr} "
                       f"warmup={t.warmup} max_minutes={t.max_minutes} eval_every={t.eval_every} "
                       f"ckpt_every={t.ckpt_every}" for name, t in TRAIN_PRESETS.items())
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="options left out take the preset's defaults:\n" + defaults)
  p.add_argument("--preset", default="small", choices=sorted(TRAIN_PRESETS),
                 help="model size and training defaults: tiny (seconds), small (CPU, minutes), gpu (one H200, ~3 "
                      "min), gpu_fine (one H200, ~4 min: 64 experts, top-8)")
  p.add_argument("--workdir", required=True, help="run directory: config, tokenizer, checkpoints, metrics")
  p.add_argument("--data", default=None, help="directory or file of text (.txt .md .rst .py .jsonl with a "
                 "\"text\" field), a datasets.save_to_disk directory, or 'python' (the stdlib and every "
                 "installed package's sources); default: the preset's (gpu_fine: python; others: the stdlib)")
  p.add_argument("--steps", type=int, help="optimizer steps (the LR schedule's length)")
  p.add_argument("--batch-size", type=int, help="sequences per step")
  p.add_argument("--seq-len", type=int, help="tokens per sequence")
  p.add_argument("--lr", type=float, help="peak learning rate (warmup, then cosine decay to 10%%)")
  p.add_argument("--warmup", type=int, help="linear warmup steps")
  p.add_argument("--max-minutes", type=float, help="wall-clock budget from the start (data, compile, "
                 "training); when reached: stop, evaluate, checkpoint")
  p.add_argument("--eval-every", type=int, help="validate every N steps (0: only at the end)")
  p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (0: only at the end)")
  p.add_argument("--corpus-mb", type=float, help="use at most this many MB of text (0: all)")
  p.add_argument("--seed", type=int, help="parameter init and data order")
  p.add_argument("--stop-at", type=int, default=None, help="stop after this step, keeping the schedule "
                 "of --steps (a planned interruption; resume later)")
  p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                 help="continue from the newest checkpoint in --workdir (default); --no-resume refuses "
                 "a workdir that already holds checkpoints")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "warmup", "max_minutes",
                                             "eval_every", "ckpt_every", "corpus_mb", "seed")
               if getattr(args, k) is not None}
  settings = dataclasses.replace(train_settings(args.preset), **overrides)
  try:
    train_and_evaluate(config_lib.preset(args.preset), args.workdir, settings, data=args.data,
                       resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress)
  except KeyboardInterrupt:  # the checkpoint is saved and logged: exit as an interrupted command does
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
