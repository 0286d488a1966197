"""Engine v2 (`ProgramEngine`, one compiled program per step): exact, and its device cache behaves."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import config, generate as gen, model as model_lib
from jaxmoe.offload import OffloadEngine, device_cache, host_experts, strategies
from jaxmoe.offload.hostview import device_view
from jaxmoe.offload.program import MIN_COPY_BYTES, PLAN_LEAD, SUPPORTED, ProgramEngine
from jaxmoe.offload.store import expert_layout, host_sharding
from jaxmoe.predictor import models
from jaxmoe.predictor.store import TokenPredictor
from tests.offload.reference_runs import NEW_TOKENS, PROMPT_LEN, VARIANTS, TablePredictor, build_reference


def _strategy(name, ref):
  if name in ("oracle", "noisy_oracle"):
    return strategies.make(name, n_experts=ref.cfg.n_experts, routing=ref.routing, recall=0.5, seed=1)
  if name in ("learned_right", "learned_wrong"):
    predictor = TablePredictor(ref.routing, PROMPT_LEN, ref.cfg.n_layers, ref.cfg.n_experts,
                               wrong=name == "learned_wrong", lead=PLAN_LEAD)
    return strategies.make("learned", n_experts=ref.cfg.n_experts, predictor=predictor)
  if name == "hybrid":  # "auto" would measure the machine; the host's sums are not bitwise
    return strategies.make(name, n_experts=ref.cfg.n_experts, host_compute="never")
  return name


NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
NAMES = [n for n in SUPPORTED if n != "learned"] + ["learned_right", "learned_wrong"]


@pytest.mark.parametrize("variant, name", [("swiglu", n) for n in NAMES] + [("relu_shared", "lru")])
def test_every_strategy_is_exact(built_references, variant, name):
  reference = build_reference(built_references, variant)
  cfg = reference.cfg
  # the prompt (2 x 7 tokens) can route all 8 experts of a layer: the smallest budget that fits
  cache = None if name == "resident" else cfg.n_experts * cfg.expert_bytes
  # plans copied ahead (the busier path; "auto" would read a tiny model's misses in place)
  engine = ProgramEngine(reference.model, cache_bytes=cache, strategy=_strategy(name, reference),
                         plan_copies=True)
  for _ in range(2):  # the second request runs on the first one's cache
    tokens, stats = engine.generate(reference.prompt, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, reference.out.tokens)
    np.testing.assert_array_equal(stats.logits, reference.out.logits)
    assert stats.routing == reference.routing
    routed = [sum(len(step[layer]) for step in stats.routing) for layer in range(cfg.n_layers)]
    assert [h + m for h, m in zip(stats.hits, stats.misses)] == routed
    assert stats.host_read_bytes == sum(stats.misses) * cfg.expert_bytes
    engine.reset_cache()
  if name == "resident":
    assert sum(stats.misses) == 0
  if name == "on_demand":  # drops every expert after its layer
    assert sum(stats.hits) == 0
  if name.startswith("learned"):  # a lead-2 table of the true routing: the plans' lag must be right
    assert stats.copies and all(c.used == (name == "learned_right") for c in stats.copies)
  assert stats.bytes_useful <= stats.bytes_copied == (stats.host_read_bytes
                                                      + len(stats.copies) * cfg.expert_bytes)


def _hybrid_and_lru(reference, host_compute, host_backend=None):
  """One request of `hybrid` (host_compute forced) and of `lru` on the smallest budget the prompt fits:
  8 slots for 2 layers of 8 experts, so that decode steps miss."""
  cfg = reference.cfg
  hybrid = strategies.make("hybrid", n_experts=cfg.n_experts, host_compute=host_compute)
  engine = ProgramEngine(reference.model, cache_bytes=cfg.n_experts * cfg.expert_bytes, strategy=hybrid,
                         host_backend=host_backend)
  run = engine.generate(reference.prompt, NEW_TOKENS)
  lru = ProgramEngine(reference.model, cache_bytes=cfg.n_experts * cfg.expert_bytes,
                      strategy="lru").generate(reference.prompt, NEW_TOKENS)
  return run, lru[1], engine.host_choice


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=NEEDS_TORCH), "xla"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hybrid_computes_decode_misses_on_the_host(built_references, variant, backend):
  reference = build_reference(built_references, variant)
  (tokens, stats), lru, choice = _hybrid_and_lru(reference, "always", backend)
  assert choice == host_experts.HostChoice(True, backend=backend)
  np.testing.assert_array_equal(tokens, reference.out.tokens)
  # not bitwise: a token's expert outputs are summed in another order (the host's share is added last)
  np.testing.assert_allclose(stats.logits, reference.out.logits, rtol=1e-5, atol=1e-5)
  assert stats.routing == reference.routing
  prompt_misses = stats.step_read_bytes[0] // reference.cfg.expert_bytes
  assert stats.decode_misses == "host" and stats.host_experts == sum(stats.misses) - prompt_misses > 0
  assert sum(stats.step_read_bytes[1:]) == 0 and stats.host_read_bytes == stats.step_read_bytes[0]
  assert stats.step_read_bytes[0] == lru.step_read_bytes[0]  # the prompt is served as lru serves it
  assert sum(lru.step_read_bytes[1:]) > 0  # the test is not trivial: LRU reads in decode steps


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hybrid_without_host_compute_is_lru(built_references, variant):
  reference = build_reference(built_references, variant)
  (tokens, stats), lru, choice = _hybrid_and_lru(reference, "never")
  assert choice == host_experts.HostChoice(False)
  np.testing.assert_array_equal(tokens, reference.out.tokens)
  np.testing.assert_array_equal(stats.logits, lru.logits)
  assert (stats.hits, stats.misses, stats.step_read_bytes) == (lru.hits, lru.misses, lru.step_read_bytes)
  assert stats.decode_misses == "device" and stats.host_experts == 0


@pytest.fixture(scope="module")
def oracle_case():
  """A 3-layer model, a prompt, its resident run, the oracle replaying it and LRU's run, all with 10
  slots: a decode step routes 6 experts, so the copies for the next step must evict well."""
  cfg = dataclasses.replace(config.tiny(), n_layers=3, kernel_impl="xla")
  model = model_lib.create(cfg, seed=0)
  prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 7))
  want, ref = ProgramEngine(model, strategy="resident").generate(prompt, 8)
  oracle = strategies.make("oracle", n_experts=cfg.n_experts, routing=ref.routing)
  lru = ProgramEngine(model, cache_bytes=10 * cfg.expert_bytes, strategy="lru").generate(prompt, 8)[1]
  assert sum(lru.step_read_bytes[1:]) > 0  # the tests are not trivial: LRU misses there
  return model, prompt, want, ref, oracle, lru


def test_oracle_copies_each_decode_step_ahead_and_reads_nothing_then(oracle_case):
  model, prompt, want, _, oracle, _ = oracle_case
  engine = ProgramEngine(model, cache_bytes=10 * model.cfg.expert_bytes, strategy=oracle, plan_copies=True)
  tokens, stats = engine.generate(prompt, 8)
  np.testing.assert_array_equal(tokens, want)
  assert stats.step_read_bytes[0] > 0 and sum(stats.step_read_bytes[1:]) == 0
  assert stats.copies and all(c.reason == "prefetch" and c.step >= 1 for c in stats.copies)


def test_the_copies_ahead_skip_what_the_step_in_flight_brings(oracle_case):
  """The host plans step s+1 from the table it read two steps back; what step s plans is cached by
  s+1 when both plans fit the cache (12 slots, 6 experts a step): copying it again wastes bytes."""
  model, prompt, want, _, oracle, _ = oracle_case
  engine = ProgramEngine(model, cache_bytes=12 * model.cfg.expert_bytes, strategy=oracle, plan_copies=True)
  tokens, stats = engine.generate(prompt, 8)
  np.testing.assert_array_equal(tokens, want)
  assert sum(stats.step_read_bytes[1:]) == 0 and stats.copies
  later = [c for c in stats.copies if c.step >= 2]  # step 1 follows the prompt, which overflows the cache
  assert later and not any(c.expert in stats.routing[c.step - 1][c.layer] for c in later)
  # the host's time per decode step, by part: disjoint stretches of the loop, no more than a token's time
  split = stats.host_split_s
  assert set(split) == {"plan", "dispatch", "wait", "read"} and min(split.values()) >= 0
  assert split["plan"] > 0 and split["dispatch"] > 0  # an oracle plans every decode step
  assert sum(split.values()) <= stats.tpot_s * (1 + 1e-6)
  assert stats.summary()["host_split_s"] == split


def test_plan_copies_auto_follows_the_expert_size_and_bad_options_are_refused(oracle_case):
  model, _, _, _, oracle, _ = oracle_case
  small = ProgramEngine(model, cache_bytes=10 * model.cfg.expert_bytes, strategy=oracle)
  assert model.cfg.expert_bytes < MIN_COPY_BYTES and small.plan_copies is False
  with pytest.raises(ValueError, match="plan_copies"):
    ProgramEngine(model, cache_bytes=10 * model.cfg.expert_bytes, strategy=oracle, plan_copies="maybe")
  with pytest.raises(ValueError, match="command_buffers"):
    ProgramEngine(model, cache_bytes=10 * model.cfg.expert_bytes, strategy=oracle, command_buffers="on")


@pytest.mark.parametrize("command_buffers", [False, True])  # the options act on a GPU (test_gpu.py)
def test_oracle_without_plan_copies_evicts_by_its_plan_and_reads_in_place(oracle_case, command_buffers):
  model, prompt, want, ref, oracle, lru = oracle_case
  engine = ProgramEngine(model, cache_bytes=10 * model.cfg.expert_bytes, strategy=oracle,
                         plan_copies=False, command_buffers=command_buffers)
  tokens, stats = engine.generate(prompt, 8)
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_array_equal(stats.logits, ref.logits)
  assert not stats.copies
  assert sum(stats.step_read_bytes[1:]) < sum(lru.step_read_bytes[1:])  # Belady reads fewer


def test_the_oracles_horizon_bounds_what_its_eviction_knows(oracle_case):
  """horizon 0: the plan of the step served only (what a plan made in the step knows); it stays exact
  and reads no less than Belady's MIN (the full horizon); a negative horizon is refused."""
  model, prompt, want, ref, _, _ = oracle_case
  read = {}
  for horizon in (0, 16):
    oracle = strategies.make("oracle", n_experts=model.cfg.n_experts, routing=ref.routing, horizon=horizon)
    engine = ProgramEngine(model, cache_bytes=10 * model.cfg.expert_bytes, strategy=oracle, plan_copies=False)
    tokens, stats = engine.generate(prompt, 8)
    np.testing.assert_array_equal(tokens, want)
    read[horizon] = sum(stats.step_read_bytes[1:])
  assert read[16] <= read[0]
  with pytest.raises(ValueError, match="horizon"):
    strategies.make("noisy_oracle", n_experts=model.cfg.n_experts, routing=ref.routing, horizon=-1)


def test_a_perfect_learned_plan_reads_nothing_after_the_prompt(oracle_case):
  """A lead-2 table of the true routing plans each step from tokens two positions back, with the
  cache as the host last read it (two steps old): the step before it must keep what it planned."""
  model, prompt, want, ref, _, _ = oracle_case
  cfg = model.cfg
  table = TablePredictor(ref.routing, prompt.shape[1], cfg.n_layers, cfg.n_experts, lead=PLAN_LEAD)
  engine = ProgramEngine(model, cache_bytes=10 * cfg.expert_bytes, strategy="learned", predictor=table,
                         plan_copies=True)
  tokens, stats = engine.generate(prompt, 8)
  np.testing.assert_array_equal(tokens, want)
  # every decode step's routed experts were cached or copied ahead: none read in place
  assert sum(stats.step_read_bytes[1:]) == 0 and stats.copies
  assert all(c.used for c in stats.copies)


def test_learned_needs_a_predictor_of_the_engines_lead(swiglu_reference):
  ref = swiglu_reference
  for lead, engine in ((1, ProgramEngine), (PLAN_LEAD, OffloadEngine)):
    table = TablePredictor(ref.routing, PROMPT_LEN, ref.cfg.n_layers, ref.cfg.n_experts, lead=lead)
    with pytest.raises(ValueError, match=f"lead {lead}"):
      engine(ref.model, cache_bytes=10**9, strategy="learned", predictor=table)
  # lead 0 is planned inside the step: by a token model the step can run, and with nothing copied ahead
  table = TablePredictor(ref.routing, PROMPT_LEN, ref.cfg.n_layers, ref.cfg.n_experts, lead=0)
  with pytest.raises(ValueError, match="token predictor of lead 0"):
    ProgramEngine(ref.model, cache_bytes=10**9, strategy="learned", predictor=table)
  with pytest.raises(ValueError, match="only evicts"):
    ProgramEngine(ref.model, cache_bytes=10**9, strategy="learned", predictor=_token_model(ref.cfg),
                  plan_copies=True)


def _token_model(cfg, family="context", seed=0):
  """A lead-0 token predictor with random weights (its plans are wrong, but the engine stays exact)."""
  hparams = ({"embed_dim": 16, "hidden": 32, "window": 6, "conv_width": 3, "n_heads": 2}
             if family == "context" else {"embed_dim": 8, "hidden": 16, "n_prev": 2})
  meta = {"vocab_size": cfg.vocab_size, "n_layers": cfg.n_layers, "n_experts": cfg.n_experts}
  return TokenPredictor(models.build(family, meta, hparams, seed=seed))


@pytest.mark.parametrize("family", ["context", "token_mlp"])
def test_a_plan_made_in_the_step_is_the_hosts_plan_from_the_steps_own_token(swiglu_reference, family):
  """Each step plans the next one on the device from the token it chose: the experts equal what
  `Learned.plan_step` picks on the host from every token up to that next step's input (lead 0), the
  tokens and logits the reference's, nothing copied ahead."""
  ref = swiglu_reference
  cfg = ref.cfg
  learned = strategies.make("learned", n_experts=cfg.n_experts, predictor=_token_model(cfg, family))
  engine = ProgramEngine(ref.model, cache_bytes=cfg.n_experts * cfg.expert_bytes, strategy=learned)
  assert engine.plan_copies is False
  for _ in range(2):
    tokens, stats = engine.generate(ref.prompt, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, ref.out.tokens)
    np.testing.assert_array_equal(stats.logits, ref.out.logits)
    assert not stats.copies and stats.plans[0] == []
    for n in range(1, NEW_TOKENS):  # decode step n's input sits at PROMPT_LEN + n - 1
      host = learned.plan_step(tokens[:, :PROMPT_LEN + n], 1, n, engine.n_slots, cfg.n_layers)
      assert stats.plans[n] == [sorted(ids) for ids in host], n
    assert any(any(ids) for ids in stats.plans[1])
    engine.reset_cache()


def test_sampling_matches_the_reference(swiglu_reference):
  ref = swiglu_reference
  want = gen.generate(ref.model, ref.prompt, NEW_TOKENS, temperature=0.7, seed=5)
  engine = ProgramEngine(ref.model, cache_bytes=ref.cfg.n_experts * ref.cfg.expert_bytes, strategy="lru")
  tokens, stats = engine.generate(ref.prompt, NEW_TOKENS, temperature=0.7, seed=5)
  np.testing.assert_array_equal(tokens, want.tokens)
  np.testing.assert_array_equal(stats.logits, want.logits)


def test_prefill_and_decode_score_a_given_continuation(swiglu_reference):
  ref = swiglu_reference
  engine = ProgramEngine(ref.model, cache_bytes=ref.cfg.n_experts * ref.cfg.expert_bytes, strategy="lru")
  with pytest.raises(ValueError, match="prefill first"):
    engine.decode(np.zeros(2, np.int32))
  np.testing.assert_array_equal(engine.prefill(ref.prompt), ref.out.logits[:, 0])
  for n in range(1, NEW_TOKENS):  # the reference's own tokens fed back: its logits, step by step
    t = ref.prompt.shape[1] + n - 1
    np.testing.assert_array_equal(engine.decode(ref.out.tokens[:, t]), ref.out.logits[:, n])
  with pytest.raises(ValueError, match="one per sequence"):
    engine.decode(np.zeros(3, np.int32))


def test_pallas_kernel_path_is_exact():
  cfg = dataclasses.replace(config.tiny(), n_layers=1, kernel_impl="pallas")
  model = model_lib.create(cfg, seed=4)
  prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 3))
  want = gen.generate(model, prompt, 3)
  engine = ProgramEngine(model, cache_bytes=cfg.n_experts * cfg.expert_bytes, strategy="lru")
  tokens, stats = engine.generate(prompt, 3)
  np.testing.assert_array_equal(tokens, want.tokens)
  np.testing.assert_array_equal(stats.logits, want.logits)


def test_budgets_too_small_are_refused_with_the_size_needed(swiglu_reference):
  ref = swiglu_reference
  eb = ref.cfg.expert_bytes
  with pytest.raises(ValueError, match=f"at least {ref.cfg.top_k * eb}"):
    ProgramEngine(ref.model, cache_bytes=eb, strategy="lru")
  engine = ProgramEngine(ref.model, cache_bytes=3 * eb, strategy="lru")
  with pytest.raises(ValueError, match=f"cache_bytes >= {ref.cfg.n_experts * eb}"):
    engine.generate(ref.prompt, NEW_TOKENS)


def test_strategies_it_does_not_run_say_so(swiglu_reference):
  with pytest.raises(NotImplementedError, match="OffloadEngine"):
    ProgramEngine(swiglu_reference.model, cache_bytes=10**9, strategy="next_gate")
  with pytest.raises(NotImplementedError, match="ProgramEngine"):
    OffloadEngine(swiglu_reference.model, cache_bytes=10**9, strategy="hybrid")
  with pytest.raises(ValueError, match="host_compute must be one of"):
    strategies.make("hybrid", n_experts=8, host_compute="sometimes")


def _serve_sequence(policy, keep, routes, n_slots=2, n_experts=4):
  """Serve one-layer routings in turn on a cache of `n_slots`: -> [(hits, misses, cached experts)]."""
  cfg = dataclasses.replace(config.tiny(), n_layers=1, n_experts=n_experts, d_model=16, d_ff=16)
  layout = expert_layout(cfg)
  size = layout[-1].offset + int(np.prod(layout[-1].shape))
  host = np.arange(n_experts * size, dtype=np.float32).reshape(n_experts, size)
  view = device_view(jax.device_put(host, host_sharding()), host.shape, host.dtype)
  pools = {m.name: jnp.zeros((n_slots,) + m.shape, jnp.float32) for m in layout}
  state = device_cache.empty_state(1, n_experts, n_slots)
  serve = jax.jit(lambda st, pl, experts: device_cache.serve_layer(st, pl, view, 0, experts,
                                                                     layout=layout, policy=policy,
                                                                     keep=keep))
  out = []
  for experts in routes:
    state, pools, rhs_index, hits, misses, _ = serve(state, pools, jnp.asarray([experts], jnp.int32))
    for e in experts:  # the slot the FFN reads holds that expert's weights
      w = np.asarray(pools[layout[0].name][int(rhs_index[e])]).reshape(-1)
      np.testing.assert_array_equal(w, host[e, :w.size])
    out.append((int(hits), int(misses), device_cache.cached_experts(np.asarray(state.table))[0]))
  return out


def test_lru_evicts_the_least_recently_used_expert():
  # slots 2: [0] [1] -> full; [2] evicts 0; [1] hits; [0] evicts 2 (1 was used later)
  got = _serve_sequence("lru", True, [[0], [1], [2], [1], [0]])
  assert got == [(0, 1, [0]), (0, 1, [0, 1]), (0, 1, [1, 2]), (1, 0, [1, 2]), (0, 1, [0, 1])]


def test_lfu_keeps_the_most_used_expert():
  got = _serve_sequence("lfu", True, [[0], [0], [1], [2], [0]])
  assert got == [(0, 1, [0]), (1, 0, [0]), (0, 1, [0, 1]), (0, 1, [0, 2]), (1, 0, [0, 2])]


def test_a_layer_never_evicts_its_own_experts_and_on_demand_keeps_none():
  got = _serve_sequence("lru", True, [[0, 1], [2, 3]])
  assert got == [(0, 2, [0, 1]), (0, 2, [2, 3])]
  assert _serve_sequence("lru", False, [[0, 1], [0, 1]]) == [(0, 2, []), (0, 2, [])]


def test_planned_uses_are_the_first_tick_of_each_expert_in_the_step_and_after_it():
  # 2 layers x 3 experts; a step ticks once for its admissions, then once per layer: layer l of the
  # m-th step from now is tick m * 3 + 2 + l
  plan = [[[0], [1, 2]],  # this step: expert 0 of layer 0 at tick 2, experts 1, 2 of layer 1 at 3
          [[0, 2], []],  # next step: layer 0's 0 and 2 at tick 5
          [[2], [1]]]  # the step after: layer 0's 2 again (5 stays first), layer 1's 1 at tick 9
  never = device_cache.NEVER
  np.testing.assert_array_equal(device_cache.use_offsets(plan, 2, 3), [
      [2, never, never, never, 3, 3],
      [5, never, 5, never, 9, never]])
  assert (device_cache.use_offsets([], 2, 3) == never).all()


def test_predicted_eviction_gives_up_the_farthest_planned_use():
  # slots hold experts 0 (used last, next planned far ahead) and 1 (planned soon): 2 evicts 0
  cfg = dataclasses.replace(config.tiny(), n_layers=1, n_experts=4, d_model=16, d_ff=16)
  layout = expert_layout(cfg)
  size = layout[-1].offset + int(np.prod(layout[-1].shape))
  host = np.arange(4 * size, dtype=np.float32).reshape(4, size)
  view = device_view(jax.device_put(host, host_sharding()), host.shape, host.dtype)
  pools = {m.name: jnp.zeros((2,) + m.shape, jnp.float32) for m in layout}
  state = device_cache.empty_state(1, 4, 2)._replace(
      table=jnp.array([[0, 1, -1, -1]], jnp.int32), owner=jnp.array([0, 1], jnp.int32),
      last_use=jnp.array([5, 4], jnp.int32), clock=jnp.array(5, jnp.int32))
  offsets = device_cache.use_offsets([[[]], [[1]], [[]], [[0]]], 1, 4)  # 1 next step, 0 two later
  state = device_cache.plan_uses(state, jnp.asarray(offsets))
  state, _, _, hits, misses, _ = device_cache.serve_layer(state, pools, view, 0, jnp.array([[2]]),
                                                          layout=layout, policy="predicted", keep=True)
  assert (int(hits), int(misses)) == (0, 1)
  assert device_cache.cached_experts(np.asarray(state.table)) == [[1, 2]]
  lru = device_cache.serve_layer(device_cache.plan_uses(state._replace(
      table=jnp.array([[0, 1, -1, -1]], jnp.int32), owner=jnp.array([0, 1], jnp.int32),
      last_use=jnp.array([5, 4], jnp.int32)), jnp.asarray(offsets)), pools, view, 0, jnp.array([[2]]),
      layout=layout, policy="lru", keep=True)[0]
  assert device_cache.cached_experts(np.asarray(lru.table)) == [[0, 2]]  # LRU gives up 1 instead
