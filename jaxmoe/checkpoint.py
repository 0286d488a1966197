"""Orbax checkpoints of a jaxmoe model (parameters + config) and, for training, optimizer state, step
and data position; `load_model` is how the rest of the project loads a trained run directory.

Layout of a run directory (what `train.train_model` writes):

  run_dir/
    config.json                     the MoEConfig (also copied into every checkpoint)
    tokenizer.json, tokenizer_config.json, ...   loads with transformers.AutoTokenizer
    checkpoints/step_00000500/      one complete checkpoint (the newest `keep` are kept)
      meta.json                     format, step, data position, what the checkpoint holds
      config.json                   the MoEConfig this checkpoint was saved with
      params/                       Orbax StandardCheckpointer: nnx.state(model, nnx.Param)
      opt_state/                    Orbax StandardCheckpointer: optimizer state leaves (optional)
    metrics.jsonl, summary.json, data/   (training outputs)

A checkpoint is written under `step_XXXXXXXX.tmp` and renamed when complete, so a crash never leaves a
half-written directory under a valid name; directories without the final name are ignored. A checkpoint
damaged later (a truncated copy) raises CorruptCheckpointError naming it; loading a run directory then
falls back, with a warning, to its newest intact checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmoe import model as model_lib
from jaxmoe.config import MoEConfig

FORMAT = 1
CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
T = TypeVar("T")


class CorruptCheckpointError(ValueError):
  """A checkpoint whose files cannot be read (truncated, overwritten or not what Orbax wrote)."""


class TrainingState(NamedTuple):
  """What `restore_training` gives back."""
  params: Any  # nnx.State of nnx.Param, on the default device
  opt_state: Any | None  # same structure as the `opt_state_target` given, or None
  step: int  # optimizer steps already taken
  data_position: dict  # the data loader's position (whatever `save_run` was given)
  path: Path  # the checkpoint directory restored from


# ----------------------------------------------------------------------------------------- config

def save_config(cfg: MoEConfig, directory: str | os.PathLike) -> Path:
  """Write `cfg` as directory/config.json (atomically) and return its path."""
  path = Path(directory) / CONFIG
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_text_atomic(path, cfg.to_json() + "\n")
  return path


def load_config(path: str | os.PathLike) -> MoEConfig:
  """The MoEConfig of a config.json, a checkpoint directory or a run directory."""
  path = Path(path)
  candidates = [path] if path.suffix == ".json" else [path / CONFIG]
  if path.is_dir() and not (path / CONFIG).exists():
    latest = latest_checkpoint(path)
    if latest is not None:
      candidates.append(latest / CONFIG)
  for c in candidates:
    if c.is_file():
      try:
        return MoEConfig.from_dict(json.loads(c.read_text()))
      except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"corrupt model config {c}: {e}") from None
  raise FileNotFoundError(f"no model config found at {path} (looked for {[str(c) for c in candidates]})")


# ------------------------------------------------------------------------------------- discovery

def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
  return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
  """Complete checkpoints of a run directory as (step, path), oldest first."""
  root = Path(run_dir) / CHECKPOINTS
  if not root.is_dir():
    return []
  found = []
  for p in root.iterdir():
    m = _STEP_DIR.match(p.name)
    if m and p.is_dir():
      found.append((int(m.group(1)), p))
  return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
  """The newest complete checkpoint of a run directory, or None."""
  found = list_checkpoints(run_dir)
  return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
  """A checkpoint directory itself, or the newest checkpoint of a run directory."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such run or checkpoint directory: {path}")
  if _is_checkpoint(path):
    return path
  latest = latest_checkpoint(path)
  if latest is None:
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {META}, no params/) nor a run directory "
                            f"with checkpoints (nothing under {path / CHECKPOINTS})")
  return latest


def _is_checkpoint(path: Path) -> bool:
  return (path / META).exists() or (path / "params").exists()


def read_meta(ckpt: str | os.PathLike) -> dict:
  """meta.json of a checkpoint directory, checked."""
  path = Path(ckpt) / META
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {ckpt} is incomplete or corrupt: {META} is missing")
  try:
    meta = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {path} is not valid JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT or "step" not in meta:
    raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt or of an unknown format: {path} holds "
                                 f"{meta!r:.200}")
  return meta


# ------------------------------------------------------------------------------------------ save

def save_run(run_dir: str | os.PathLike, cfg: MoEConfig, params, *, opt_state=None, step: int = 0,
             data_position: dict | None = None, keep: int = 3, extra: dict | None = None) -> Path:
  """Save a checkpoint of step `step` under run_dir/checkpoints and keep the newest `keep`.

  `params` is an nnx.Module (its nnx.Param state is saved) or nnx.State of nnx.Param. `opt_state` is
  any pytree of arrays (saved by leaf; restore it with a target of the same structure). Writes
  run_dir/config.json too. Returns the checkpoint directory.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  run_dir = Path(run_dir).absolute()
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  save_config(cfg, run_dir)
  final = checkpoint_dir(run_dir, step)
  tmp = final.with_name(final.name + ".tmp")
  _remove_stale_partials(run_dir)
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(tmp / "params", params)
    if opt_state is not None:
      ckptr.save(tmp / "opt_state", _leaves_dict(opt_state))
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  save_config(cfg, tmp)
  meta = {"format": FORMAT, "step": int(step), "data_position": data_position or {},
          "has_opt_state": opt_state is not None,
          "n_opt_leaves": len(jax.tree.leaves(opt_state)) if opt_state is not None else 0,
          **(extra or {})}
  _write_text_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
  if final.exists():  # re-saving a step (e.g. after a resume that took no step): replace it
    shutil.rmtree(final)
  os.replace(tmp, final)
  for _, old in list_checkpoints(run_dir)[:-keep]:
    shutil.rmtree(old, ignore_errors=True)
  return final


def save_model(ckpt_dir: str | os.PathLike, cfg: MoEConfig, model) -> Path:
  """Save only parameters + config to `ckpt_dir` (a self-contained checkpoint `load_model` reads)."""
  ckpt_dir = Path(ckpt_dir).absolute()
  if ckpt_dir.exists():
    raise FileExistsError(f"refusing to overwrite {ckpt_dir}")
  tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
  if tmp.exists():
    shutil.rmtree(tmp)
  params = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
  tmp.mkdir(parents=True)
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(tmp / "params", params)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  save_config(cfg, tmp)
  meta = {"format": FORMAT, "step": 0, "data_position": {}, "has_opt_state": False, "n_opt_leaves": 0}
  _write_text_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, ckpt_dir)
  return ckpt_dir


# --------------------------------------------------------------------------------------- restore

def abstract_params(cfg: MoEConfig):
  """(graphdef, nnx.State of ShapeDtypeStructs on the default device) of a model of `cfg`."""
  abstract = nnx.eval_shape(lambda: model_lib.create(cfg))
  graphdef, state = nnx.split(abstract, nnx.Param)
  return graphdef, _on_default_device(state)


def restore_params(ckpt: str | os.PathLike, cfg: MoEConfig):
  """nnx.State of the parameters saved in checkpoint `ckpt` (or a run's newest intact one) for a model of
  `cfg` (exact values)."""
  return _newest_intact(ckpt, lambda c: _restore_params(c, cfg))


def load_model(path: str | os.PathLike, **config_overrides) -> tuple[MoEConfig, model_lib.MoELM]:
  """(cfg, model) from a run directory (its newest intact checkpoint) or a checkpoint directory.

  `config_overrides` replace config fields that do not change parameter shapes, e.g.
  `kernel_impl="xla"`, `dtype="bfloat16"`, or `param_dtype="bfloat16"` (parameters are cast).
  """
  return _newest_intact(path, lambda c: _load_model(c, config_overrides))


def restore_training(path: str | os.PathLike, cfg: MoEConfig, opt_state_target=None) -> TrainingState:
  """Parameters, optimizer state, step and data position of a checkpoint (or a run's newest intact one).

  `opt_state_target` is a pytree with the structure of the saved optimizer state (arrays or
  ShapeDtypeStructs, e.g. `jax.eval_shape(tx.init, params)`); None skips the optimizer state.
  """
  return _newest_intact(path, lambda c: _restore_training(c, cfg, opt_state_target))


def _newest_intact(path: str | os.PathLike, load: Callable[[Path], T]) -> T:
  """load(checkpoint) of a checkpoint directory, or of a run directory's newest checkpoint that loads;
  each corrupt or incomplete newer one is skipped with a warning. With none intact, the newest's error."""
  path = Path(path)
  if not path.exists() or _is_checkpoint(path) or not list_checkpoints(path):
    return load(resolve_checkpoint(path))  # resolve_checkpoint says why there is nothing to load
  newest_first = [c for _, c in reversed(list_checkpoints(path))]
  newest_error = None
  for ckpt, older in zip(newest_first, newest_first[1:]):
    try:
      return load(ckpt)
    except (CorruptCheckpointError, FileNotFoundError) as e:
      newest_error = newest_error or e
      warnings.warn(f"{e}; falling back to the older checkpoint {older.name}", stacklevel=3)
  try:
    return load(newest_first[-1])
  except (CorruptCheckpointError, FileNotFoundError) as e:
    raise (newest_error or e) from None


def _load_model(ckpt: Path, config_overrides: dict):
  read_meta(ckpt)
  saved_cfg = load_config(ckpt)
  cfg = dataclasses.replace(saved_cfg, **config_overrides) if config_overrides else saved_cfg
  params = _restore_params(ckpt, saved_cfg)
  if cfg.param_dtype != saved_cfg.param_dtype:
    params = jax.tree.map(lambda x: x.astype(cfg.weight_dtype), params)
  graphdef, _ = abstract_params(cfg)
  try:
    return cfg, nnx.merge(graphdef, params)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"config overrides {config_overrides} change the parameter structure of {ckpt}: "
                     f"{e}") from e


def _restore_params(ckpt: Path, cfg: MoEConfig):
  read_meta(ckpt)
  _, target = abstract_params(cfg)
  return _restore(ckpt / "params", target, f"parameters of a model of this config ({brief_config(cfg)})")


def _restore_training(ckpt: Path, cfg: MoEConfig, opt_state_target) -> TrainingState:
  meta = read_meta(ckpt)
  params = _restore_params(ckpt, cfg)
  opt_state = None
  if opt_state_target is not None:
    if not meta.get("has_opt_state"):
      raise ValueError(f"checkpoint {ckpt} holds no optimizer state; it cannot resume training")
    leaves, treedef = jax.tree.flatten(opt_state_target)
    if len(leaves) != meta.get("n_opt_leaves"):
      raise ValueError(f"checkpoint {ckpt} has {meta.get('n_opt_leaves')} optimizer-state arrays but the "
                       f"optimizer expects {len(leaves)}: was it saved with another optimizer?")
    target = _on_default_device(_leaves_dict(opt_state_target))
    restored = _restore(ckpt / "opt_state", target, "this optimizer's state")
    opt_state = jax.tree.unflatten(treedef, [restored[k] for k in sorted(restored)])
  return TrainingState(params, opt_state, int(meta["step"]), dict(meta.get("data_position") or {}), ckpt)


# --------------------------------------------------------------------------------------- helpers

def _restore(item: Path, target, what: str):
  item = Path(item).absolute()  # Orbax takes absolute paths only; users pass relative run directories
  if not item.is_dir():
    raise FileNotFoundError(f"checkpoint {item.parent} is incomplete or corrupt: {item.name}/ is missing")
  ckptr = ocp.StandardCheckpointer()
  try:
    try:
      saved = ckptr.metadata(item)
    except Exception as e:  # noqa: BLE001 (Orbax raises many types for unreadable metadata)
      raise CorruptCheckpointError(f"checkpoint {item.parent} is corrupt: cannot read the metadata of "
                                   f"{item.name}/ ({_first_line(e)})") from None
    _check_shapes(getattr(saved, "item_metadata", saved), target, item, what)
    _drop_reports_of_abandoned_reads()  # before the read: they can come while the error propagates
    try:
      return ckptr.restore(item, target)
    except Exception as e:  # noqa: BLE001 (TensorStore errors of truncated or damaged files)
      array = re.search(r"'path': '([^']+)/',\s*\},\s*'metadata'", str(e))  # in the spec Orbax dumps
      raise CorruptCheckpointError(
          f"checkpoint {item.parent} is corrupt: cannot read {item.name}/"
          f"{array.group(1) if array else ''} ({_first_line(e.__cause__ or e)})") from None
  finally:
    ckptr.close()


def _check_shapes(saved_tree, target, item: Path, what: str):
  """Refuse a checkpoint of other arrays before any read starts (a failed read leaves Orbax's other
  reads pending). Shapes only: Orbax and flax versions spell the same pytree paths differently."""
  saved = [tuple(x.shape) if hasattr(x, "shape") else None for x in jax.tree.leaves(saved_tree)]
  if None in saved:  # metadata without shapes: leave the check to Orbax
    return
  saved = collections.Counter(saved)
  wanted = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(target))
  differ = sorted((s for s in saved | wanted if saved[s] != wanted[s]), key=str)
  if differ:
    raise ValueError(f"cannot restore {item} as {what}: it was saved for another model ({saved[differ[0]]} "
                     f"arrays of shape {differ[0]} saved, {wanted[differ[0]]} expected)")


def _drop_reports_of_abandoned_reads():
  """After a failed read Orbax leaves its other reads of the restore running (it never cancels them);
  when they end or are collected, maybe much later, Python prints a long traceback for each ("Event loop
  is closed", a TensorStore spec). From the first restore on, drop those reports, only those."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_orbax_reads", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    error = unraisable.exc_value
    loop_closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    if not (loop_closed or "orbax" in getattr(code, "co_filename", "")):
      previous(unraisable)

  hook.drops_abandoned_orbax_reads = True
  sys.unraisablehook = hook


def _first_line(e: BaseException) -> str:
  """An exception's first line, without the TensorStore spec dump Orbax appends."""
  text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _leaves_dict(tree) -> dict[str, Any]:
  """A pytree as {"00000": leaf, ...}: a structure Orbax stores the same way on every version."""
  return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _on_default_device(tree):
  """ShapeDtypeStructs placed on the default device (a checkpoint saved on a GPU restores on a CPU)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(spec, tree)


def brief_config(cfg: MoEConfig) -> str:
  """The sizes that decide parameter shapes, for error messages."""
  return (f"vocab={cfg.vocab_size} d_model={cfg.d_model} n_layers={cfg.n_layers} "
          f"n_experts={cfg.n_experts} d_ff={cfg.d_ff} param_dtype={cfg.param_dtype}")


def _remove_stale_partials(run_dir: Path):
  root = run_dir / CHECKPOINTS
  if root.is_dir():
    for p in root.iterdir():
      if p.name.endswith(".tmp") and p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def _write_text_atomic(path: Path, text: str):
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
