"""The expert-parallel engine generates exactly the tokens and logits of `jaxmoe.generate` and of the
single-device `OffloadEngine`, on meshes of 2 and 4 (fake CPU) devices, for every strategy.

JAX fixes the number of CPU devices when it starts (`--xla_force_host_platform_device_count`), so the
multi-device checks run in one child process, this file run as a script with 4 CPU devices; the
2-device mesh takes the first two of them (one child instead of two halves the compile time).
`XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/offload/test_parallel.py` prints
the child's report directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxmoe import config, generate as gen, model as model_lib
from jaxmoe.offload import OffloadEngine, strategies
from jaxmoe.offload.parallel import ExpertParallelEngine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT_LEN, NEW_TOKENS, SEED = 7, 6, 3
MESH_SIZES = (2, 4)


class _TablePredictor:
  """Scores 1 on the recorded routing of each step (or on every other expert if `wrong`)."""

  def __init__(self, routing, n_layers, n_experts, wrong):
    self.routing, self.wrong = routing, wrong
    self.n_layers, self.n_experts = n_layers, n_experts

  def scores(self, history, n_new):
    step = history.shape[1] - PROMPT_LEN
    p = np.zeros((history.shape[0], n_new, self.n_layers, self.n_experts), np.float32)
    for layer, experts in enumerate(self.routing[step]):
      p[:, :, layer, experts] = 1.0
    return 1.0 - p if self.wrong else p


def _tiny():
  return dataclasses.replace(config.tiny(), kernel_impl="xla")


def check_on_fake_devices(mesh_sizes=MESH_SIZES) -> dict:
  """In a process with >= max(mesh_sizes) devices: every strategy on every mesh size equals the
  references exactly. Raises AssertionError otherwise; returns a small report."""
  cfg = _tiny()
  assert len(jax.devices()) >= max(mesh_sizes), jax.devices()
  model = model_lib.create(cfg, seed=SEED)
  prompt = np.random.default_rng(SEED).integers(0, cfg.vocab_size, (2, PROMPT_LEN))
  ref = gen.generate(model, prompt, NEW_TOKENS)
  with OffloadEngine(model, cache_bytes=2 * cfg.expert_bytes, strategy="lru") as engine:
    single_tokens, single = engine.generate(prompt, NEW_TOKENS)
  np.testing.assert_array_equal(single_tokens, ref.tokens)
  np.testing.assert_array_equal(single.logits, ref.logits)
  routing = single.routing  # [step][layer] experts: what the oracles replay

  def strategy(name):
    if name in ("oracle", "noisy_oracle"):
      return strategies.make(name, n_experts=cfg.n_experts, routing=routing, recall=0.5, seed=1)
    if name.startswith("learned"):
      predictor = _TablePredictor(routing, cfg.n_layers, cfg.n_experts, wrong=name == "learned_wrong")
      return strategies.make("learned", n_experts=cfg.n_experts, predictor=predictor)
    return name

  # hybrid computes on the host: ProgramEngine only
  names = [s for s in strategies.NAMES if s not in ("learned", "hybrid")] + ["learned_right", "learned_wrong"]
  report = {}
  for n in mesh_sizes:
    devices = jax.devices()[:n]
    owner = np.arange(cfg.n_experts) % n
    for name in names:
      # 2 slots per device (one token's top_k): with 2 devices each owns 4 experts, so a prefill
      # that routes to all of them streams them through the cache in chunks
      budget = None if name == "resident" else 2 * cfg.expert_bytes
      with ExpertParallelEngine(model, cache_bytes_per_device=budget, strategy=strategy(name),
                                devices=devices) as engine:
        tokens, stats = engine.generate(prompt, NEW_TOKENS)
        store_owners = [[next(iter(engine.store.buffer(layer, e).devices()))
                         for e in range(cfg.n_experts)] for layer in range(cfg.n_layers)]
      where = f"{name} on {n} devices"
      np.testing.assert_array_equal(tokens, ref.tokens, err_msg=where)
      np.testing.assert_array_equal(stats.logits, ref.logits, err_msg=where)
      np.testing.assert_array_equal(stats.logits, single.logits, err_msg=where)
      assert stats.routing == routing, where
      assert all(store_owners[layer][e] == devices[owner[e]]
                 for layer in range(cfg.n_layers) for e in range(cfg.n_experts)), where
      for d in range(n):
        owned_routed = [sum(sum(owner[e] == d for e in step[layer]) for step in routing)
                        for layer in range(cfg.n_layers)]
        got = [h + m for h, m in zip(stats.device_hits[d], stats.device_misses[d])]
        assert got == owned_routed, (where, d, got, owned_routed)
        assert all(owner[c.expert] == d for c in stats.device_copies[d]), (where, d)
      assert [sum(col) for col in zip(*stats.device_misses)] == stats.misses, where
      assert sum(stats.bytes_copied_per_device) == stats.bytes_copied, where
      assert stats.bytes_copied == len(stats.copies) * cfg.expert_bytes, where
      report[f"{n}/{name}"] = {"misses": sum(stats.misses),
                               "bytes_copied_per_device": stats.bytes_copied_per_device}
    summary = stats.summary()
    assert summary["n_devices"] == n and summary["misses_per_device"] == stats.device_misses

  # prefill / decode one step at a time, then a second request on the same (warm) engine
  with ExpertParallelEngine(model, cache_bytes_per_device=2 * cfg.expert_bytes, strategy="lru",
                            devices=jax.devices()[:2]) as engine:
    logits = engine.prefill(prompt)
    np.testing.assert_array_equal(logits, ref.logits[:, 0])
    np.testing.assert_array_equal(engine.decode(logits.argmax(-1)), ref.logits[:, 1])
    tokens, stats = engine.generate(prompt, NEW_TOKENS)
  np.testing.assert_array_equal(tokens, ref.tokens)
  np.testing.assert_array_equal(stats.logits, ref.logits)
  assert stats.ttft_s > 0 and len(stats.token_latencies_s) == NEW_TOKENS - 1
  return report


@pytest.mark.slow
def test_expert_parallel_generation_is_exact_on_2_and_4_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       f"--xla_force_host_platform_device_count={max(MESH_SIZES)}".strip(),
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  expected = {f"{n}/{s}" for n in MESH_SIZES for s in ("resident", "lru", "oracle", "learned_wrong")}
  assert expected <= set(report)
  for key, row in report.items():
    if key.endswith("/resident"):
      assert row["misses"] == 0 and not any(row["bytes_copied_per_device"])
    else:  # every device moved bytes over its own link
      assert len(row["bytes_copied_per_device"]) == int(key.split("/")[0])
      assert all(row["bytes_copied_per_device"]), (key, row)


def test_budget_per_device_too_small_is_refused():
  cfg = _tiny()
  model = model_lib.create(cfg, seed=SEED)
  with pytest.raises(ValueError, match=r"cache_bytes_per_device=.*top_k=2.*per device"):
    ExpertParallelEngine(model, cache_bytes_per_device=cfg.expert_bytes + 1, strategy="lru")
  with pytest.raises(ValueError, match="needs cache_bytes_per_device"):
    ExpertParallelEngine(model, strategy="lru")
  with pytest.raises(ValueError, match="resident strategy needs every owned expert"):
    ExpertParallelEngine(model, cache_bytes_per_device=cfg.expert_bytes, strategy="resident")
  with pytest.raises(ValueError, match="between 1 and n_experts=8 devices"):
    ExpertParallelEngine(model, cache_bytes_per_device=4 * cfg.expert_bytes, devices=[])


if __name__ == "__main__":
  print(json.dumps(check_on_fake_devices()))
