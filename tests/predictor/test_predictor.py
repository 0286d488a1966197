"""Routing traces, predictor training, checkpoints and the engine hook, on the `tiny` model (CPU)."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import config, model as model_lib
from jaxmoe.predictor import (PopularityPredictor, RoutingPredictor, TokenPredictor, baselines, data, metrics,
                              models, store, training)

ROWS, T = 96, 32


@pytest.fixture(scope="module")
def tiny_traces(tmp_path_factory):
  cfg = dataclasses.replace(config.tiny(), kernel_impl="xla")
  model = model_lib.create(cfg, seed=0)
  rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (ROWS, T))
  out = str(tmp_path_factory.mktemp("traces"))
  data.collect_traces(model, data.batches(rows, np.arange(ROWS) // 2, 16), out, shard_rows=40, progress=False)
  return model, rows, out


@pytest.fixture(scope="module")
def trained(tiny_traces, tmp_path_factory):
  _, _, traces_dir = tiny_traces
  out = str(tmp_path_factory.mktemp("pred"))
  info = training.train_predictor(traces_dir, "token_mlp", out, loss="bce", steps=300, batch_tokens=1024,
                                  eval_every=100, val_fraction=0.25, progress=False)
  return out, info


def test_traces_match_the_model(tiny_traces):
  model, rows, traces_dir = tiny_traces
  tr = data.load_traces(traces_dir, probs=True)
  cfg = model.cfg
  out = model(jnp.asarray(rows))
  routed = np.stack([np.asarray(e) for e in out.experts], axis=1)  # [B*T, L, k]
  np.testing.assert_array_equal(tr.experts.reshape(-1, cfg.n_layers, cfg.top_k), routed)
  assert len(tr.manifest["shards"]) == 2 and tr.manifest["n_tokens"] == ROWS * T
  assert tr.hidden.shape == (ROWS, T, cfg.n_layers, cfg.d_model)
  np.testing.assert_allclose(tr.hidden[:, :, 0].astype(np.float32),
                             np.asarray(model.embed_tokens(jnp.asarray(rows))), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(tr.probs.astype(np.float32).sum(-1), 1.0, atol=1e-2)
  np.testing.assert_array_equal(tr.doc_ids, np.arange(ROWS) // 2)


def test_split_by_document_keeps_documents_whole():
  docs = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  train, val = data.split_by_document(docs, 0.25)
  assert set(docs[train]).isdisjoint(docs[val]) and list(val) == [6, 7]
  with pytest.raises(ValueError, match="two documents"):
    data.split_by_document(np.zeros(4), 0.5)


def test_trained_predictor_beats_popularity_on_held_out_tokens(tiny_traces, trained):
  _, _, traces_dir = tiny_traces
  pred_dir, info = trained
  tr = data.load_traces(traces_dir, hidden=False)
  train_rows, val_rows = data.split_by_document(tr.doc_ids, 0.25)
  k = tr.top_k
  experts = tr.experts[val_rows].reshape(-1, tr.n_layers, k)
  freq = baselines.popularity(tr.experts[train_rows], tr.n_experts)
  pop = metrics.mean_recall(np.broadcast_to(freq, experts.shape[:2] + (tr.n_experts,)), experts, k)
  pred = store.load_predictor(pred_dir)
  scores = np.asarray(pred.probs(tr.tokens[val_rows])).reshape(-1, tr.n_layers, tr.n_experts)
  learned = metrics.mean_recall(scores, experts, k)
  assert learned >= pop + 0.3, (learned, pop)
  assert learned == pytest.approx(info["val"]["per_budget"][str(k)]["recall_avg"], abs=1e-6)


def test_checkpoint_round_trip_is_exact(tmp_path):
  model = models.build("context", {"vocab_size": 50, "n_layers": 2, "n_experts": 8},
                       {"embed_dim": 16, "hidden": 32, "window": 8, "n_heads": 2}, seed=3)
  store.save_predictor(str(tmp_path), model, {"family": "context", "hparams": {"embed_dim": 16, "hidden": 32,
                       "window": 8, "n_heads": 2}, "meta": {"vocab_size": 50, "n_layers": 2, "n_experts": 8},
                       "calibration": [1.5, -0.5]})
  back, info = store.load_model(str(tmp_path))
  import jax
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = np.random.default_rng(0).integers(0, 50, (2, 20))
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(tokens))), np.asarray(back(jnp.asarray(tokens))))
  assert info["calibration"] == [1.5, -0.5]


@pytest.mark.parametrize("family,hparams", [("token_mlp", {"embed_dim": 8, "hidden": 16, "n_prev": 2}),
                                            ("context", {"embed_dim": 16, "hidden": 32, "window": 6,
                                                         "conv_width": 3, "n_heads": 2})])
def test_scores_contract_and_windowing(family, hparams):
  meta = {"vocab_size": 40, "n_layers": 3, "n_experts": 6}
  pred = TokenPredictor(models.build(family, meta, hparams, seed=1), calibration=(1.0, 0.0))
  assert isinstance(pred, RoutingPredictor)
  history = np.random.default_rng(1).integers(0, 40, (3, 25))
  full = np.asarray(pred.probs(history))  # [3, 25, L, E]: each token scored inside the whole sequence
  for s, n_new in [(25, 1), (25, 4), (3, 3), (12, 2)]:
    p = pred.scores(history[:, :s], n_new)
    assert p.shape == (3, n_new, 3, 6) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p, full[:, s - n_new:s], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="n_new"):
    pred.scores(history, 26)
  with pytest.raises(ValueError, match="vocabulary"):
    pred.scores(history + 40, 1)


def test_popularity_predictor_and_cross_layer_refusal(trained, tmp_path):
  pop = PopularityPredictor(np.full((2, 4), 0.5))
  assert isinstance(pop, RoutingPredictor) and pop.scores(np.zeros((2, 5), int), 2).shape == (2, 2, 2, 4)
  model = models.build("cross_layer", {"d_model": 8, "n_layers": 3, "n_experts": 4, "hidden_layers": [0, 1, 2]},
                       {"depth": 1, "hidden": 8})
  store.save_predictor(str(tmp_path), model, {"family": "cross_layer", "hparams": {"depth": 1, "hidden": 8},
                       "meta": {"d_model": 8, "n_layers": 3, "n_experts": 4, "hidden_layers": [0, 1, 2]}})
  with pytest.raises(ValueError, match="hidden states"):
    store.load_predictor(str(tmp_path))
  scorer = store.load_cross_layer(str(tmp_path))
  s = scorer.scores_at(np.ones((5, 3, 8), np.float32), 1)
  assert s.shape == (5, 3, 4) and not np.isnan(s).any()  # layer 0 from its own entering state
  assert baselines.source_for(3, 2, [0, 1, 2]) == 1 and baselines.source_for(1, 2, [0, 2]) == 0


def test_resume_reaches_the_same_parameters(tiny_traces, tmp_path):
  _, _, traces_dir = tiny_traces
  kw = dict(loss="rank", batch_tokens=512, eval_every=10, patience=100, val_fraction=0.25, progress=False,
            hparams={"embed_dim": 8, "hidden": 16, "window": 4, "conv_width": 2, "n_heads": 2})
  whole = training.train_predictor(traces_dir, "context", str(tmp_path / "a"), steps=30, **kw)
  # an interrupted run: its first 20 steps (same 30-step schedule), then a restart that resumes
  training.train_predictor(traces_dir, "context", str(tmp_path / "b"), steps=30, stop_at=20, **kw)
  assert not os.path.exists(tmp_path / "b" / store.META_FILE)
  resumed = training.train_predictor(traces_dir, "context", str(tmp_path / "b"), steps=30, **kw)
  assert resumed["steps_trained"] == whole["steps_trained"] == 30
  a, _ = store.load_model(str(tmp_path / "a"))
  b, _ = store.load_model(str(tmp_path / "b"))
  import jax
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_train_tokens_limits_training_rows_only(tiny_traces, tmp_path):
  _, _, traces_dir = tiny_traces
  kw = dict(loss="bce", steps=2, batch_tokens=256, eval_every=1, val_fraction=0.25, progress=False)
  full = training.train_predictor(traces_dir, "token_mlp", str(tmp_path / "full"), **kw)
  part = training.train_predictor(traces_dir, "token_mlp", str(tmp_path / "part"), train_tokens=3 * T - 5, **kw)
  assert full["train"]["train_tokens"] == 72 * T  # 48 documents, the last 12 held out, 2 rows each
  assert part["train"]["train_tokens"] == 3 * T  # rounded up to whole rows
  with pytest.raises(ValueError, match="train_tokens"):
    training.train_predictor(traces_dir, "token_mlp", str(tmp_path / "bad"), train_tokens=0, **kw)


def test_learned_strategy_with_a_trained_predictor_is_exact(tiny_traces, trained):
  offload = pytest.importorskip("jaxmoe.offload")
  from jaxmoe import generate
  model, rows, _ = tiny_traces
  cfg = model.cfg
  prompt = rows[:2, :6]
  ref = generate.generate(model, prompt, 4)
  with offload.OffloadEngine(model, cache_bytes=3 * cfg.expert_bytes, strategy="learned",
                             predictor=store.load_predictor(trained[0])) as engine:
    tokens, stats = engine.generate(prompt, 4)
  np.testing.assert_array_equal(tokens, ref.tokens)
  np.testing.assert_array_equal(stats.logits, ref.logits)


def test_lead_shifts_training_targets():
  experts = np.arange(8).reshape(1, 4, 1, 2)  # token t routes to 2t, 2t+1 in its one layer
  tr = data.Traces({"n_layers": 1}, np.arange(4).reshape(1, 4), np.zeros(1), experts, None, None, {})
  task = training._Task("token_mlp", tr, np.array([0]), lead=2)
  tokens, targets, valid = task.batch(np.random.default_rng(0), 4)
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(targets[0, :2, 0], [[4, 5], [6, 7]])  # tokens 2 and 3's routing
  np.testing.assert_array_equal(valid, [[[1], [1], [0], [0]]])  # the last two have no token 2 ahead
  (_, chunk_targets, chunk_valid), = task.eval_chunks(4)
  np.testing.assert_array_equal(chunk_targets, targets)
  np.testing.assert_array_equal(chunk_valid, valid)
  with pytest.raises(ValueError, match="lead"):
    models.build("token_mlp", {"vocab_size": 4, "n_layers": 1, "n_experts": 8}, {"lead": -1})


def test_program_engine_learned_with_a_lead_2_predictor_is_exact(tiny_traces, tmp_path):
  from jaxmoe import generate
  from jaxmoe.offload.program import PLAN_LEAD, ProgramEngine
  model, rows, traces_dir = tiny_traces
  cfg = model.cfg
  info = training.train_predictor(traces_dir, "token_mlp", str(tmp_path), loss="bce", steps=30,
                                  batch_tokens=1024, eval_every=30, val_fraction=0.25, progress=False,
                                  hparams={"embed_dim": 16, "hidden": 32, "lead": PLAN_LEAD})
  pred = store.load_predictor(str(tmp_path))
  assert info["hparams"]["lead"] == pred.lead == PLAN_LEAD
  prompt = rows[:2, :6]
  ref = generate.generate(model, prompt, 5)
  engine = ProgramEngine(model, cache_bytes=cfg.n_experts * cfg.expert_bytes, strategy="learned",
                         predictor=pred, plan_copies=True)
  tokens, stats = engine.generate(prompt, 5)
  np.testing.assert_array_equal(tokens, ref.tokens)
  np.testing.assert_array_equal(stats.logits, ref.logits)
  assert stats.copies and all(c.step >= 1 for c in stats.copies)  # the prompt is read in place
