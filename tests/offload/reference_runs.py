"""Shared by the offload tests: tiny models with their exact reference runs, a fake predictor."""

import dataclasses

import numpy as np

from jaxmoe import config, generate as gen, model as model_lib
from jaxmoe.offload import OffloadEngine

PROMPT_LEN, NEW_TOKENS = 7, 6
VARIANTS = {
    "swiglu": {},
    "relu_shared": {"activation": "relu", "shared_expert_d_ff": 32, "shared_expert_gate": True,
                    "norm_topk_prob": False},
}


class Reference:
  """A model, its exact all-resident generation and the routing that run took."""

  def __init__(self, cfg, seed):
    self.cfg = cfg
    self.model = model_lib.create(cfg, seed=seed)
    self.prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, PROMPT_LEN))
    self.out = gen.generate(self.model, self.prompt, NEW_TOKENS)
    with OffloadEngine(self.model, strategy="resident") as engine:
      _, stats = engine.generate(self.prompt, NEW_TOKENS)
    self.routing = stats.routing  # [step][layer] experts


class TablePredictor:
  """Scores from a recorded routing: p = 1 on `routing[step][layer]` (or on every other expert if
  `wrong`). The step is read off the history's length, as a real predictor would see it: the history
  ends `lead` tokens before the step's input token."""

  def __init__(self, routing, prompt_len, n_layers, n_experts, wrong=False, lead=0):
    self.routing, self.prompt_len, self.wrong, self.lead = routing, prompt_len, wrong, lead
    self.n_layers, self.n_experts = n_layers, n_experts

  def scores(self, history, n_new):
    step = history.shape[1] - self.prompt_len + self.lead
    p = np.zeros((history.shape[0], n_new, self.n_layers, self.n_experts), np.float32)
    for layer, experts in enumerate(self.routing[step]):
      p[:, :, layer, experts] = 1.0
    return 1.0 - p if self.wrong else p


def build_reference(built: dict, variant: str) -> Reference:
  """The reference run of a `VARIANTS` config, made once per test session (`built` caches it)."""
  if variant not in built:
    cfg = dataclasses.replace(config.tiny(), kernel_impl="xla", **VARIANTS[variant])
    built[variant] = Reference(cfg, seed=3)
  return built[variant]
