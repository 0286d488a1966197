"""Orbax checkpoints: exact round trips, newest-N retention, and clear errors for missing or corrupt ones."""

import dataclasses
import json
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmoe import checkpoint, config, model as model_lib


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def trained_like():
  """A model, an AdamW state with non-trivial moments, and the config."""
  cfg = config.tiny()
  _, params = nnx.split(model_lib.create(cfg, seed=7), nnx.Param)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 0.01), params)
  opt_state = jax.jit(lambda g, s, p: tx.update(g, s, p)[1])(grads, opt_state, params)
  return cfg, params, tx, opt_state


def test_round_trip_is_exact_for_params_optimizer_step_and_position(tmp_path, trained_like):
  cfg, params, tx, opt_state = trained_like
  path = checkpoint.save_run(tmp_path, cfg, params, opt_state=opt_state, step=12,
                             data_position={"position": 12, "seed": 3})
  assert path == checkpoint.checkpoint_dir(tmp_path, 12)
  state = checkpoint.restore_training(tmp_path, cfg, jax.eval_shape(tx.init, params))
  assert state.step == 12 and state.data_position == {"position": 12, "seed": 3}
  assert _leaves_equal(state.params, params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt_state)
  assert _leaves_equal(state.opt_state, opt_state)
  # load_model takes the run directory or the checkpoint directory itself.
  for where in (tmp_path, path):
    cfg2, model = checkpoint.load_model(where)
    assert cfg2 == cfg
    assert _leaves_equal(nnx.state(model, nnx.Param), params)
  assert checkpoint.load_config(tmp_path) == cfg


def test_relative_run_directories_work(tmp_path, trained_like, monkeypatch):
  cfg, params, _, _ = trained_like
  monkeypatch.chdir(tmp_path)
  checkpoint.save_run("runs/rel", cfg, params, step=1)
  cfg2, model = checkpoint.load_model("runs/rel")
  assert cfg2 == cfg and _leaves_equal(nnx.state(model, nnx.Param), params)


def test_save_model_writes_a_self_contained_checkpoint(tmp_path, trained_like):
  cfg, params, _, _ = trained_like
  m = nnx.merge(nnx.split(nnx.eval_shape(lambda: model_lib.create(cfg)), nnx.Param)[0], params)
  ckpt = checkpoint.save_model(tmp_path / "ckpt", cfg, m)
  cfg2, m2 = checkpoint.load_model(ckpt)
  assert cfg2 == cfg and _leaves_equal(nnx.state(m2, nnx.Param), params)
  with pytest.raises(FileExistsError):
    checkpoint.save_model(tmp_path / "ckpt", cfg, m)


def test_overrides_cast_parameters(tmp_path, trained_like):
  cfg, params, _, _ = trained_like
  checkpoint.save_run(tmp_path, cfg, params, step=1)
  cfg2, m = checkpoint.load_model(tmp_path, param_dtype="bfloat16", kernel_impl="xla")
  assert cfg2.param_dtype == "bfloat16" and cfg2.kernel_impl == "xla"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_keeps_newest_checkpoints_and_ignores_partial_ones(tmp_path, trained_like):
  cfg, params, _, opt_state = trained_like
  for step in (1, 2, 3, 4):
    checkpoint.save_run(tmp_path, cfg, params, opt_state=opt_state, step=step, keep=2)
  assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3, 4]
  (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir()  # a save that crashed half-way
  assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000004"
  checkpoint.save_run(tmp_path, cfg, params, step=5, keep=2)  # cleans the partial directory up
  assert not (tmp_path / "checkpoints" / "step_00000009.tmp").exists()


def test_missing_checkpoints_raise_file_not_found(tmp_path, trained_like):
  cfg = trained_like[0]
  with pytest.raises(FileNotFoundError, match="no such run or checkpoint"):
    checkpoint.load_model(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
    checkpoint.load_model(tmp_path)
  with pytest.raises(FileNotFoundError, match="no model config"):
    checkpoint.load_config(tmp_path)
  checkpoint.save_run(tmp_path, cfg, trained_like[1], step=1)
  ckpt = checkpoint.latest_checkpoint(tmp_path)
  (ckpt / "meta.json").unlink()
  with pytest.raises(FileNotFoundError, match="meta.json is missing"):
    checkpoint.load_model(tmp_path)


def _truncate_largest_file(ckpt):
  """Halve the largest data file of a checkpoint's parameters (a copy that stopped short)."""
  f = max((f for f in (ckpt / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


# Orbax's abandoned reads must not leak tracebacks (pytest reports them as unraisable exceptions).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(tmp_path, trained_like):
  cfg, params, tx, opt_state = trained_like
  older = checkpoint.save_run(tmp_path, cfg, params, opt_state=opt_state, step=1)
  newest = checkpoint.save_run(tmp_path, cfg, jax.tree.map(lambda x: x + 1, params), opt_state=opt_state,
                               step=2)
  _truncate_largest_file(newest)
  with pytest.warns(UserWarning, match=f"checkpoint {re.escape(str(newest))} is corrupt: cannot read params/"
                                       f".*falling back to the older checkpoint {older.name}"):
    _, model = checkpoint.load_model(tmp_path)
  assert _leaves_equal(nnx.state(model, nnx.Param), params)
  with pytest.warns(UserWarning, match="falling back"):
    state = checkpoint.restore_training(tmp_path, cfg, jax.eval_shape(tx.init, params))
  assert state.step == 1 and state.path == older and _leaves_equal(state.opt_state, opt_state)
  # a checkpoint asked for by name does not fall back
  with pytest.raises(checkpoint.CorruptCheckpointError, match=re.escape(str(newest))):
    checkpoint.load_model(newest)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_only_checkpoint_is_a_one_line_error_naming_it(tmp_path, trained_like):
  cfg, params, _, _ = trained_like
  ckpt = checkpoint.save_run(tmp_path, cfg, params, step=1)
  _truncate_largest_file(ckpt)
  with pytest.raises(checkpoint.CorruptCheckpointError) as info:
    checkpoint.load_model(tmp_path)
  message = str(info.value)
  assert message.startswith(f"checkpoint {ckpt} is corrupt: cannot read params/")
  assert "\n" not in message and "TensorStore" not in message and len(message) < 600
  assert info.value.__suppress_context__  # no chained Orbax traceback under it
  assert isinstance(info.value, ValueError)


def test_corrupt_checkpoints_raise_value_error_naming_the_path(tmp_path, trained_like):
  cfg, params, tx, _ = trained_like
  ckpt = checkpoint.save_run(tmp_path / "a", cfg, params, step=1)
  (ckpt / "meta.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    checkpoint.load_model(ckpt)

  ckpt = checkpoint.save_run(tmp_path / "b", cfg, params, step=1)
  (ckpt / "config.json").write_text(json.dumps({"vocab_size": -3}))
  with pytest.raises(ValueError, match="corrupt model config"):
    checkpoint.load_model(ckpt)

  ckpt = checkpoint.save_run(tmp_path / "c", cfg, params, step=1)
  for f in (ckpt / "params").rglob("*"):  # truncate every data file
    if f.is_file() and f.name not in ("_CHECKPOINT_METADATA",):
      f.write_bytes(b"")
  with pytest.raises((ValueError, FileNotFoundError), match=str(ckpt.name)):
    checkpoint.load_model(ckpt)

  ckpt = checkpoint.save_run(tmp_path / "d", cfg, params, step=1)  # no optimizer state saved
  with pytest.raises(ValueError, match="no optimizer state"):
    checkpoint.restore_training(ckpt, cfg, jax.eval_shape(tx.init, params))


def test_checkpoint_of_another_model_is_refused(tmp_path, trained_like):
  cfg, params, _, _ = trained_like
  ckpt = checkpoint.save_run(tmp_path, cfg, params, step=1)
  other = dataclasses.replace(cfg, d_ff=2 * cfg.d_ff)
  with pytest.raises(ValueError, match="cannot restore"):
    checkpoint.restore_params(ckpt, other)
