"""Every strategy generates exactly the tokens and logits of `jaxmoe.generate` (f32, same kernels)."""

import threading

import numpy as np
import pytest

from jaxmoe.offload import OffloadEngine, strategies
from jaxmoe.offload.cache import CopyRecord
from jaxmoe.offload.stats import settle_stalls
from tests.offload.reference_runs import NEW_TOKENS, PROMPT_LEN, TablePredictor


def _strategy(name, ref):
  cfg = ref.cfg
  if name in ("oracle", "noisy_oracle"):
    return strategies.make(name, n_experts=cfg.n_experts, routing=ref.routing, recall=0.5, seed=1)
  if name in ("learned_right", "learned_wrong"):
    predictor = TablePredictor(ref.routing, PROMPT_LEN, cfg.n_layers, cfg.n_experts,
                               wrong=name == "learned_wrong")
    return strategies.make("learned", n_experts=cfg.n_experts, predictor=predictor)
  if name == "next_gate_2":
    return strategies.make("next_gate", n_experts=cfg.n_experts, depth=2)
  return name


ALL = ["on_demand", "lru", "lfu", "stream_all", "next_gate", "next_gate_2", "oracle", "noisy_oracle",
       "learned_right", "learned_wrong"]


@pytest.mark.parametrize("name", ALL)
def test_offloaded_generation_is_exact(reference, name):
  # 3 slots: below one layer's 8 experts, so prefill streams its experts through the cache in chunks
  cfg = reference.cfg
  assert max(len(experts) for experts in reference.routing[0]) > 3  # prefill really streams
  with OffloadEngine(reference.model, cache_bytes=3 * cfg.expert_bytes,
                     strategy=_strategy(name, reference)) as engine:
    tokens, stats = engine.generate(reference.prompt, NEW_TOKENS)
  np.testing.assert_array_equal(tokens, reference.out.tokens)
  np.testing.assert_array_equal(stats.logits, reference.out.logits)
  assert stats.routing == reference.routing
  routed = [sum(len(step[layer]) for step in reference.routing) for layer in range(cfg.n_layers)]
  assert [h + m for h, m in zip(stats.hits, stats.misses)] == routed
  assert stats.bytes_copied == len(stats.copies) * cfg.expert_bytes
  assert all(c.ready_s is not None and c.ready_s >= c.issue_s for c in stats.copies)


def test_resident_is_exact_and_copies_nothing(reference):
  """The whole-step program of `resident`, on every model variant (swiglu; relu + gated shared
  expert), gives the reference's tokens, logits and routing."""
  ref = reference
  with OffloadEngine(ref.model, strategy="resident") as engine:
    tokens, stats = engine.generate(ref.prompt, NEW_TOKENS)
  np.testing.assert_array_equal(tokens, ref.out.tokens)
  np.testing.assert_array_equal(stats.logits, ref.out.logits)
  assert stats.routing == ref.routing
  assert stats.bytes_copied == 0 and sum(stats.misses) == 0


def test_prediction_changes_copies_not_results(swiglu_reference):
  """With room for every expert, a right predictor (or the oracle) leaves no miss and wastes nothing;
  with a small cache, an always-wrong one copies bytes that no computation uses."""
  ref = swiglu_reference
  cfg = ref.cfg
  runs = {}
  for name, slots in (("lru", 16), ("learned_right", 16), ("oracle", 16), ("learned_wrong", 4)):
    with OffloadEngine(ref.model, cache_bytes=slots * cfg.expert_bytes,
                       strategy=_strategy(name, ref)) as engine:
      runs[name] = engine.generate(ref.prompt, NEW_TOKENS)[1]
  assert sum(runs["lru"].misses) == cfg.n_layers * cfg.n_experts  # cold misses only
  for name in ("learned_right", "oracle"):
    assert sum(runs[name].misses) == 0 and runs[name].bytes_wasted == 0
  assert runs["learned_wrong"].bytes_wasted > 0


def test_stats_and_prefill_decode_api(swiglu_reference):
  ref = swiglu_reference
  cfg = ref.cfg
  with OffloadEngine(ref.model, cache_bytes=4 * cfg.expert_bytes, strategy="lru") as engine:
    logits = engine.prefill(ref.prompt)
    np.testing.assert_array_equal(logits, ref.out.logits[:, 0])
    token = logits.argmax(-1)
    np.testing.assert_array_equal(engine.decode(token), ref.out.logits[:, 1])
    _, stats = engine.generate(ref.prompt, NEW_TOKENS)
  assert stats.ttft_s > 0 and len(stats.token_latencies_s) == NEW_TOKENS - 1
  assert stats.e2e_s >= stats.ttft_s and stats.tokens_per_s > 0
  assert stats.bytes_useful + stats.bytes_wasted == stats.bytes_copied
  summary = stats.summary()
  assert summary["misses"] == stats.misses and len(summary["stall_s"]) == cfg.n_layers
  assert all(s >= 0 for s in stats.stall_s)
  timeline = stats.timeline()
  assert timeline and all(row["ready_s"] >= row["issue_s"] >= 0 for row in timeline)


def test_stall_is_counted_from_copy_arrivals():
  """A layer whose FFN went out with copies in flight stalled from the dispatch until its last copy
  landed (nothing if they had landed already); copies not yet time-stamped wait for a later count."""
  record = lambda ready: CopyRecord(0, 0, 0, "demand", 1, 0.0, ready)
  stall_s = [0.0, 0.0]
  waiting = settle_stalls([(0, 1.0, [record(1.5), record(1.2)]), (1, 2.0, [record(1.9)]),
                           (0, 3.0, [record(3.25), record(None)])], stall_s)
  assert stall_s == [0.5, 0.0]
  assert [(layer, t) for layer, t, _ in waiting] == [(0, 3.0)]
  waiting[0][2][1].ready_s = 3.5
  assert settle_stalls(waiting, stall_s) == [] and stall_s == [1.0, 0.0]


@pytest.mark.parametrize("name", ["stream_all", "learned_right", "oracle"])
def test_prefetch_from_an_issue_thread_is_exact(swiglu_reference, name):
  ref = swiglu_reference
  threads = threading.active_count()
  with OffloadEngine(ref.model, cache_bytes=3 * ref.cfg.expert_bytes,
                     strategy=_strategy(name, ref), issue="thread") as engine:
    assert threading.active_count() == threads + 2  # copy watcher and issue thread
    tokens, stats = engine.generate(ref.prompt, NEW_TOKENS)
  assert threading.active_count() == threads
  np.testing.assert_array_equal(tokens, ref.out.tokens)
  np.testing.assert_array_equal(stats.logits, ref.out.logits)
  assert any(c.reason == "prefetch" for c in stats.copies)
  assert all(c.ready_s >= c.issue_s for c in stats.copies)


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("name,slots", [("oracle", 16), ("learned_right", 16), ("learned_wrong", 4),
                                        ("noisy_oracle", 3), ("oracle", 5)])
def test_speculative_dispatch_is_exact(swiglu_reference, name, slots, speculate):
  """FFNs dispatched before their routing is read: a complete plan is never redone, a wrong one is
  redone from the first layer that lacked an expert (and the rest of the step speculated again); the
  outputs are exact either way. Every guess is speculated here (hit-rate threshold 0), so the wrong
  ones take the redo path."""
  ref = swiglu_reference
  with OffloadEngine(ref.model, cache_bytes=slots * ref.cfg.expert_bytes,
                     strategy=_strategy(name, ref), speculate=speculate) as engine:
    engine.SPECULATE_HIT_RATE = 0.0
    tokens, stats = engine.generate(ref.prompt, NEW_TOKENS)
  np.testing.assert_array_equal(tokens, ref.out.tokens)
  np.testing.assert_array_equal(stats.logits, ref.out.logits)
  assert stats.routing == ref.routing
  if speculate and name in ("learned_wrong", "noisy_oracle"):
    assert stats.redone > 0
  else:  # a complete plan; or one the cache cannot hold through a step (oracle, 5 slots): not tried
    assert stats.redone == 0


@pytest.mark.parametrize("name,slots", [("learned_wrong", 4), ("noisy_oracle", 3)])
def test_weak_guesses_are_not_speculated(swiglu_reference, name, slots):
  """With the default threshold a plan whose layers often lack a routed expert stops being speculated
  (the prompt's layers already bring its running hit rate below it): nothing is redone."""
  ref = swiglu_reference
  with OffloadEngine(ref.model, cache_bytes=slots * ref.cfg.expert_bytes, strategy=_strategy(name, ref)) as engine:
    tokens, stats = engine.generate(ref.prompt, NEW_TOKENS)
  np.testing.assert_array_equal(tokens, ref.out.tokens)
  assert stats.redone == 0 and stats.speculated == 0


def test_speculated_layers_keep_their_experts_until_checked():
  """Later layers' prefetches must not evict the experts of a speculated layer before its routing is
  checked (its FFN already has them; the check marks them used). 4 layers, a cache of one decode
  step's experts, the whole plan beyond what fits."""
  import dataclasses
  from jaxmoe import config, generate as gen, model as model_lib
  cfg = dataclasses.replace(config.tiny(), n_layers=4, kernel_impl="xla")
  model = model_lib.create(cfg, seed=5)
  prompt = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 5))
  ref = gen.generate(model, prompt, 8)
  with OffloadEngine(model, strategy="resident") as engine:
    routing = engine.generate(prompt, 8)[1].routing
  oracle = strategies.make("oracle", n_experts=cfg.n_experts, routing=routing)
  with OffloadEngine(model, cache_bytes=cfg.n_layers * cfg.top_k * cfg.expert_bytes, strategy=oracle,
                     speculate=True) as engine:
    tokens, stats = engine.generate(prompt, 8)
  np.testing.assert_array_equal(tokens, ref.tokens)
  np.testing.assert_array_equal(stats.logits, ref.logits)
  assert stats.routing == routing


@pytest.mark.parametrize("name", ["stream_all", "oracle"])
def test_complete_plans_longer_than_the_cache_stream_through_it(swiglu_reference, monkeypatch, name):
  """A plan that always holds the routed experts is speculated on every step, the prompt included,
  even when it outnumbers the cache's slots: its copies then go out in batches that never exceed the
  slots (the ones a layer frees, after that layer's FFN), and nothing is redone."""
  from jaxmoe.offload import prefetch
  ref = swiglu_reference
  cfg = ref.cfg
  batches = []
  copy = prefetch.Prefetcher.copy
  monkeypatch.setattr(prefetch.Prefetcher, "copy",
                      lambda self, keys, *a, **k: (batches.append(len(keys)), copy(self, keys, *a, **k))[1])
  slots = 10  # above one layer's experts (8), below a prompt's or stream_all's whole step (16)
  with OffloadEngine(ref.model, cache_bytes=slots * cfg.expert_bytes,
                     strategy=_strategy(name, ref)) as engine:
    tokens, stats = engine.generate(ref.prompt, NEW_TOKENS)
  np.testing.assert_array_equal(tokens, ref.out.tokens)
  np.testing.assert_array_equal(stats.logits, ref.out.logits)
  assert stats.routing == ref.routing
  assert stats.redone == 0 and sum(stats.misses) == 0
  assert stats.speculated == NEW_TOKENS * cfg.n_layers  # every layer of every step
  assert sum(c.step == 0 for c in stats.copies) > slots  # the prompt's copies streamed
  assert batches and max(batches) <= slots


def test_guesses_are_speculated_on_decode_steps_only(swiglu_reference):
  """A predictor's plan is not known to hold the routing: even a right one is not speculated on the
  prompt (a failed speculated prompt wastes the most), only on the decode steps after it."""
  ref = swiglu_reference
  with OffloadEngine(ref.model, cache_bytes=16 * ref.cfg.expert_bytes,
                     strategy=_strategy("learned_right", ref)) as engine:
    tokens, stats = engine.generate(ref.prompt, NEW_TOKENS)
  np.testing.assert_array_equal(tokens, ref.out.tokens)
  assert stats.redone == 0
  assert stats.speculated == (NEW_TOKENS - 1) * ref.cfg.n_layers


class _FixedScores:
  """A predictor whose scores are given: [B, n_new, L, E]."""

  def __init__(self, p):
    self.p = np.asarray(p, np.float64)
    self.n_layers, self.n_experts = self.p.shape[2:]

  def scores(self, history, n_new):
    return self.p


def test_learned_plans_each_layers_likeliest_experts_within_its_share():
  # layer 0: P(needed) 0.9, 0.6, 0.2, 0.0 -> sum 1.7, m = 2; layer 1: two tokens, 1 - (1 - .5)(1 - .5) =
  # .75 for expert 3, and .1 / .1 -> .19 for experts 0 and 1 (a tie: the lower id first), sum 1.13, m = 2
  p = np.zeros((1, 2, 2, 4))
  p[0, 0, 0] = [0.9, 0.6, 0.2, 0.0]
  p[0, :, 1] = [[0.1, 0.1, 0.0, 0.5], [0.1, 0.1, 0.0, 0.5]]
  history = np.zeros((1, 3), np.int32)
  learned = strategies.Learned(_FixedScores(p))
  assert learned.plan_step(history, 2, 1, n_slots=8, n_layers=2) == [[0, 1], [3, 0]]
  assert learned.plan_step(history, 2, 1, n_slots=2, n_layers=2) == [[0], [3]]  # a share of 1 slot
  assert strategies.Learned(_FixedScores(p), hedge=2.0).plan_step(history, 2, 1, 8, 2) == [[0, 1, 2], [3, 0, 1]]
  assert strategies.Learned(_FixedScores(p), per_layer=4, min_prob=0.15).plan_step(
      history, 2, 1, 8, 2) == [[0, 1, 2], [3, 0, 1]]  # experts at or below min_prob left out
  with pytest.raises(ValueError, match="covers 2 layers"):
    learned.plan_step(history, 2, 1, 8, 3)
