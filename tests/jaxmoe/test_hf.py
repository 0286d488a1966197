"""HF import: tiny random transformers models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) saved with
`save_pretrained` load through `jaxmoe.hf.from_pretrained` and give the same logits and greedy tokens."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxmoe import generate as gen, hf  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)


def _hf_model(family: str):
  """A tiny transformers model of `family` with every parameter random (no ones/zeros left from init)."""
  if family == "mixtral":
    cfg = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4, **COMMON)
    cls = transformers.MixtralForCausalLM
  elif family == "qwen2_moe":  # shared expert with its sigmoid gate, qkv bias, no top-k renormalisation
    cfg = transformers.Qwen2MoeConfig(moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                      intermediate_size=96, num_experts=4, norm_topk_prob=False, **COMMON)
    cls = transformers.Qwen2MoeForCausalLM
  elif family == "qwen3_moe":  # per-head q/k norm, renormalised top-k, tied embeddings
    cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=48, intermediate_size=96, num_experts=4,
                                      head_dim=24, norm_topk_prob=True, tie_word_embeddings=True, **COMMON)
    cls = transformers.Qwen3MoeForCausalLM
  elif family == "olmoe":  # full-width q/k norm
    cfg = transformers.OlmoeConfig(intermediate_size=48, num_experts=4, norm_topk_prob=False, **COMMON)
    cls = transformers.OlmoeForCausalLM
  else:
    raise ValueError(family)
  torch.manual_seed(0)
  model = cls(cfg).to(torch.float32).eval()
  gen_ = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen_))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen_))
      else:  # [..., out, in] matrices and the embedding
        p.copy_(torch.randn(p.shape, generator=gen_) * p.shape[-1] ** -0.5)
  return model


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_logits_match_transformers(family, tmp_path):
  ref_model = _hf_model(family)
  ref_model.save_pretrained(tmp_path)
  cfg, model = hf.from_pretrained(tmp_path)
  assert cfg.dtype == "float32" and cfg.n_experts == 4 and cfg.top_k == 2
  if family == "qwen2_moe":
    assert cfg.shared_expert_d_ff == 80 and cfg.shared_expert_gate and cfg.attn_bias
    assert not cfg.norm_topk_prob
  if family == "qwen3_moe":
    assert cfg.norm_topk_prob and cfg.qk_norm == "head" and cfg.head_dim == 24 and cfg.tie_embeddings
  out = model(jnp.asarray(TOKENS))
  assert len({int(e) for e in np.asarray(out.experts[0]).ravel()}) > 1  # routing is not degenerate
  assert _rel_err(np.asarray(out.logits), _torch_logits(ref_model, TOKENS)) < 1e-4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_expert_layout_in_sharded_checkpoint(family, tmp_path):
  """transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj [E, 2F, D], down_proj
  [E, D, F]); such a state dict, split over two shards with an index file, loads to the same logits."""
  from safetensors.numpy import save_file
  ref_model = _hf_model(family)
  ref_model.config.save_pretrained(tmp_path)
  state = {k: v.detach().numpy().copy() for k, v in ref_model.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  names = sorted(state)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: state[k] for k in keys}, str(tmp_path / file))
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  _, model = hf.from_pretrained(tmp_path)
  logits = np.asarray(model(jnp.asarray(TOKENS)).logits)
  assert _rel_err(logits, _torch_logits(ref_model, TOKENS)) < 1e-4


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
  ref_model = _hf_model("olmoe").to(torch.bfloat16)
  ref_model.save_pretrained(tmp_path)
  cfg, model = hf.from_pretrained(tmp_path)
  assert cfg.dtype == "bfloat16" and cfg.param_dtype == "bfloat16"
  sd = {k: v.float().numpy() for k, v in ref_model.state_dict().items()}
  np.testing.assert_array_equal(np.asarray(model.embed[...], np.float32), sd["model.embed_tokens.weight"])
  w_up = np.asarray(model.layers[1].moe.w_up[...], np.float32)  # [E, D, F]
  hf_up = sd["model.layers.1.mlp.experts.gate_up_proj"][:, 48:, :]  # [E, F, D]
  np.testing.assert_array_equal(w_up, hf_up.transpose(0, 2, 1))
  cfg32, model32 = hf.from_pretrained(tmp_path, dtype="float32", max_seq_len=64)
  assert cfg32.dtype == "float32" and cfg32.max_seq_len == 64
  np.testing.assert_array_equal(np.asarray(model32.layers[0].attn.wq[...]),
                                sd["model.layers.0.self_attn.q_proj.weight"].T)


def test_greedy_generation_matches_transformers(tmp_path):
  ref_model = _hf_model("qwen3_moe")
  ref_model.save_pretrained(tmp_path)
  _, model = hf.from_pretrained(tmp_path, max_seq_len=32)
  prompt = TOKENS[:, :5]
  mask = torch.ones(prompt.shape, dtype=torch.long)
  with torch.no_grad():
    expected = ref_model.generate(torch.tensor(prompt), attention_mask=mask, max_new_tokens=8,
                                  do_sample=False).numpy()
  got = gen.generate(model, prompt, 8)
  assert len(set(got.tokens[:, 5:].ravel().tolist())) > 2  # not a degenerate repeat of one token
  np.testing.assert_array_equal(got.tokens, expected)


def _write_config(path, **fields):
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps(fields))
  return path


def test_unsupported_model_type_is_a_clear_error(tmp_path):
  _write_config(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64)
  supported = r"unsupported model_type 'llama'.*mixtral.*qwen2_moe.*qwen3_moe.*olmoe"
  with pytest.raises(ValueError, match=supported):
    hf.from_pretrained(tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
    hf.from_pretrained(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.from_pretrained(tmp_path)
  _hf_model("olmoe").config.save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="no safetensors weights"):
    hf.from_pretrained(tmp_path)


def _config_dict(family: str, **changes) -> dict:
  base = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig}[family]
  d = base(**COMMON).to_dict()
  d.update(changes)
  return d


@pytest.mark.parametrize("changes, message", [
    ({"mlp_only_layers": [1]}, "dense .*layers \\[1\\]"),
    ({"decoder_sparse_step": 2}, "dense .*layers \\[0\\]"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_features_are_clear_errors(changes, message):
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf(_config_dict("qwen2_moe", **changes))


def test_sliding_window_bounds_the_sequence_length():
  cfg = hf.config_from_hf(_config_dict("mixtral", sliding_window=64))
  assert cfg.max_seq_len == 64  # the window is then never applied, so attention stays exact
  with pytest.raises(ValueError, match="sliding window"):
    hf.config_from_hf(_config_dict("mixtral", sliding_window=64), max_seq_len=128)
  assert hf.config_from_hf(_config_dict("mixtral", max_position_embeddings=1 << 17)).max_seq_len == 4096


def test_incomplete_config_is_a_clear_error():
  d = _config_dict("mixtral")
  del d["num_local_experts"], d["hidden_size"]
  with pytest.raises(ValueError, match=r"mixtral config.json lacks \['hidden_size', 'num_local_experts'\]"):
    hf.config_from_hf(d)
