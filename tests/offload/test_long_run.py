"""2,000 decode steps through a cache of two layers' experts leave no live device buffer or thread
behind."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

from jaxmoe import config, model as model_lib
from jaxmoe.offload import OffloadEngine, strategies

STEPS = 2000


class CyclingPredictor:
  """Predicts a window of experts that moves by one every step: the cache churns (prefetches,
  evictions, wasted copies and misses) at every step, forever."""

  def __init__(self, n_layers, n_experts):
    self.n_layers, self.n_experts = n_layers, n_experts

  def scores(self, history, n_new):
    p = np.zeros((history.shape[0], n_new, self.n_layers, self.n_experts), np.float32)
    start = history.shape[1]
    for i in range(3):
      p[..., (start + i) % self.n_experts] = 1.0 - 0.1 * i
    return p


@pytest.mark.slow
def test_long_decode_does_not_grow_buffers_or_threads():
  # the tiny preset's layer shapes (compiled once by the other tests), one more layer than the cache
  cfg = dataclasses.replace(config.tiny(), n_layers=3, max_seq_len=STEPS + 16, kernel_impl="xla")
  model = model_lib.create(cfg, seed=0)
  strategy = strategies.make("learned", n_experts=cfg.n_experts,
                             predictor=CyclingPredictor(cfg.n_layers, cfg.n_experts))
  threads_before = threading.active_count()
  with OffloadEngine(model, cache_bytes=2 * cfg.n_experts * cfg.expert_bytes,
                     strategy=strategy) as engine:
    token = engine.prefill(np.arange(14, dtype=np.int32).reshape(2, 7)).argmax(-1)
    counts = []
    for step in range(STEPS):
      token = engine.decode(token).argmax(-1)
      if 100 <= step < 100 + cfg.n_experts:  # every function compiled, every slot in use: a period
        engine.prefetcher.drain()  # of the plan, each step with its copies landed (not in flight)
        counts.append(len(jax.live_arrays()))
        threads = threading.active_count()
    engine.prefetcher.drain()
    assert len(jax.live_arrays()) <= max(counts)
    assert threading.active_count() == threads == threads_before + 1  # the copy watcher
    copies = engine.stats.copies
    assert len(copies) > STEPS and any(not c.used for c in copies)  # it kept copying (and wasting)
    assert sum(engine.stats.misses) > 0
  assert threading.active_count() == threads_before


@pytest.mark.slow
def test_program_engine_long_decode_leaves_nothing_behind():
  # ProgramEngine keeps only numpy per step once read: a long request ends with the live device
  # arrays of a short one, and runs no thread
  from jaxmoe.offload.program import ProgramEngine
  cfg = dataclasses.replace(config.tiny(), n_layers=3, max_seq_len=STEPS + 16, kernel_impl="xla")
  model = model_lib.create(cfg, seed=0)
  threads = threading.active_count()
  engine = ProgramEngine(model, cache_bytes=cfg.n_experts * cfg.expert_bytes, strategy="lru")
  prompt = np.arange(7, dtype=np.int32)[None]
  engine.generate(prompt, 50)
  live = len(jax.live_arrays())
  _, stats = engine.generate(prompt, STEPS)
  assert len(jax.live_arrays()) <= live
  assert threading.active_count() == threads
  assert sum(stats.step_read_bytes[1:]) > 0  # the cache kept churning
