"""Is speculating a guessed plan worth it? noisy_oracle at several recalls, speculate on/off, gpu preset
random weights, 25% cache, 16-token prompt, 24 new tokens; each config timed twice after a warm-up."""
import sys, time
import numpy as np
from jaxmoe import config, model as model_lib
from jaxmoe.offload import ExpertStore, OffloadEngine, strategies

cfg = config.preset(sys.argv[1] if len(sys.argv) > 1 else "gpu")
model = model_lib.create(cfg, seed=0)
store = ExpertStore.from_model(model)
budget = int(0.25 * store.nbytes)
prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16))
with OffloadEngine(model, cache_bytes=budget, strategy="on_demand", store=store) as eng:
  eng.generate(prompt, 24); eng.reset_cache()
  _, st = eng.generate(prompt, 24)
  routing = st.routing
  print(f"on_demand: tpot {st.tpot_s*1e3:.2f} ms", flush=True)
for recall in (0.7, 0.9, 0.97, 1.0):
  for spec in (True, False):
    strat = strategies.make("noisy_oracle", n_experts=cfg.n_experts, routing=routing, recall=recall)
    eng = OffloadEngine(model, cache_bytes=budget, strategy=strat, store=store, speculate=spec)
    eng.generate(prompt, 24); eng.reset_cache()
    out = []
    for _ in range(2):
      _, st = eng.generate(prompt, 24); eng.reset_cache()
      out.append(f"{st.tpot_s*1e3:.2f} (spec {st.speculated}, redone {st.redone})")
    eng.close()
    print(f"noisy_oracle recall={recall} speculate={spec}: tpot {' / '.join(out)}", flush=True)
