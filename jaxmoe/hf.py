"""Import a local Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) into jaxmoe.

`from_pretrained(path)` reads `config.json` and the safetensors weights of a checkpoint directory and
returns `(MoEConfig, MoELM)` whose logits equal the transformers implementation's. The tokenizer of
the same directory loads with `transformers.AutoTokenizer.from_pretrained(path)`.

Weights are read without torch: the safetensors files are memory-mapped and parsed here (numpy's
own dtypes plus `ml_dtypes.bfloat16`), so bf16 checkpoints need no conversion step. Both expert
layouts are accepted: one tensor per expert (`experts.{e}.w1` / `experts.{e}.gate_proj` ..., what
`save_pretrained` writes) and the fused `experts.gate_up_proj` [E, 2F, D] / `experts.down_proj`
[E, D, F] layout transformers keeps in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxmoe.config import MoEConfig
from jaxmoe.model import MoELM

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DEFAULT_MAX_SEQ_LEN = 4096  # KV caches are allocated at max_seq_len; real models allow far more

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Family defaults of the transformers config classes, used when config.json omits a field.
_DEFAULT_ROPE_THETA = {"mixtral": 1e6, "qwen2_moe": 1e4, "qwen3_moe": 1e4, "olmoe": 1e4}
_DEFAULT_EPS = {"mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3_moe": 1e-6, "olmoe": 1e-5}


# --------------------------------------------------------------------------------------------------
# files


def _check_dir(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {path!r}")
  return path


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The parsed `config.json` of a checkpoint directory."""
  path = _check_dir(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no config.json in {path!r}: not a Hugging Face checkpoint directory")
  with open(config_file) as f:
    return json.load(f)


def safetensors_files(path: str | os.PathLike) -> list[str]:
  """The weight files of a checkpoint: those named by model.safetensors.index.json, else model.safetensors,
  else every *.safetensors file in the directory."""
  path = _check_dir(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no weight_map")
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise FileNotFoundError(f"weight shards named by {index} are missing: {missing}")
    return files
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    other = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {other}: only safetensors weights are supported)" if other else ""
    raise FileNotFoundError(f"no safetensors weights in {path!r}{hint}")
  return files


def read_safetensors(file: str) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file as a read-only, memory-mapped numpy array (bf16 included)."""
  with open(file, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{file} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{file} is not a safetensors file (bad header: {e})") from None
  data_size = os.path.getsize(file) - 8 - n
  data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n) if data_size > 0 else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}; "
                       f"supported: {sorted(_SAFETENSORS_DTYPES)}")
    dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
    start, end = info["data_offsets"]
    if end - start != math.prod(shape) * dtype.itemsize or end > data_size:
      raise ValueError(f"{file}: tensor {name!r} has inconsistent offsets (corrupt file?)")
    tensors[name] = data[start:end].view(dtype).reshape(shape)
  return tensors


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory, by their Hugging Face names (memory-mapped)."""
  tensors: dict[str, np.ndarray] = {}
  for file in safetensors_files(path):
    tensors.update(read_safetensors(file))
  return tensors


# --------------------------------------------------------------------------------------------------
# config.json -> MoEConfig


def _rope_theta(hf: Mapping[str, Any], model_type: str) -> float:
  """rope_theta from transformers 5 `rope_parameters` or the older top-level fields; only plain RoPE."""
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params and isinstance(params["full_attention"], dict):
    params = params["full_attention"]  # per-layer-type form
  scaling = hf.get("rope_scaling") or {}
  for source in (params, scaling):
    kind = source.get("rope_type", source.get("type", "default"))
    if kind not in ("default", None):
      raise ValueError(f"RoPE scaling {kind!r} is not supported (only plain RoPE, rope_type 'default')")
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial rotary embeddings are not supported")
  return float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA[model_type])))


def _sliding_window(hf: Mapping[str, Any], model_type: str) -> int | None:
  """The attention window the HF model would apply, or None when every layer attends to all keys."""
  if model_type == "mixtral":
    window = hf.get("sliding_window")
  elif model_type in ("qwen2_moe", "qwen3_moe"):
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types") or []
    if window is None and any(t != "full_attention" for t in layer_types):
      raise ValueError(f"layer_types {sorted(set(layer_types))} are not supported (only full attention)")
  else:
    window = None
  return int(window) if window else None


def _check_all_layers_sparse(hf: Mapping[str, Any], n_layers: int) -> None:
  """Qwen-MoE models can make some layers dense; jaxmoe has an MoE FFN in every layer."""
  mlp_only = list(hf.get("mlp_only_layers") or [])
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  dense = sorted({i for i in range(n_layers) if i in mlp_only or (i + 1) % step != 0})
  if dense:
    raise ValueError(f"dense (non-MoE) layers {dense} from mlp_only_layers={mlp_only} / "
                     f"decoder_sparse_step={step} are not supported: every layer must be an MoE layer")


def _dtype_name(dtype) -> str:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in _DTYPE_NAMES:
    raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype!r}")
  return name


def config_from_hf(hf: Mapping[str, Any], *, dtype=None, max_seq_len: int | None = None,
                   **overrides) -> MoEConfig:
  """MoEConfig of a Hugging Face `config.json` (as a dict).

  dtype: compute and parameter dtype; None takes the checkpoint's (`dtype` / `torch_dtype`, else f32).
  max_seq_len: KV-cache length; None takes min(max_position_embeddings, 4096, sliding window).
  overrides: other MoEConfig fields (e.g. kernel_impl), applied last.
  Raises ValueError for an unsupported model_type or feature, naming what is supported.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
                     f"jaxmoe.hf supports {list(SUPPORTED_MODEL_TYPES)}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"hidden_act {act!r} is not supported (only 'silu', i.e. SwiGLU experts)")
  if hf.get("clip_qkv") is not None:
    raise ValueError(f"clip_qkv={hf['clip_qkv']} is not supported")

  required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok",
              "moe_intermediate_size" if model_type.startswith("qwen") else "intermediate_size"]
  missing = [k for k in required if hf.get(k) is None]
  n_experts = hf.get("num_local_experts", hf.get("num_experts"))  # transformers writes either name
  if n_experts is None:
    missing.append("num_local_experts" if model_type == "mixtral" else "num_experts")
  if missing:
    raise ValueError(f"{model_type} config.json lacks {missing}")
  d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  n_layers = int(hf["num_hidden_layers"])
  fields: dict[str, Any] = dict(
      vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or d_model // n_heads),
      top_k=int(hf["num_experts_per_tok"]), activation="swiglu",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope_theta=_rope_theta(hf, model_type),
      norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_EPS[model_type])))
  if model_type == "mixtral":
    fields.update(n_experts=int(n_experts), d_ff=int(hf["intermediate_size"]), norm_topk_prob=True)
  elif model_type == "qwen2_moe":
    _check_all_layers_sparse(hf, n_layers)
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    fields.update(n_experts=int(n_experts), d_ff=int(hf["moe_intermediate_size"]),
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                  shared_expert_d_ff=shared, shared_expert_gate=shared > 0,
                  attn_bias=bool(hf.get("qkv_bias", True)))
  elif model_type == "qwen3_moe":
    _check_all_layers_sparse(hf, n_layers)
    fields.update(n_experts=int(n_experts), d_ff=int(hf["moe_intermediate_size"]),
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm="head")
  else:  # olmoe
    fields.update(n_experts=int(n_experts), d_ff=int(hf["intermediate_size"]),
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm="full")
  if model_type in ("qwen3_moe", "olmoe") and hf.get("attention_bias", False):
    raise ValueError(f"attention_bias=True is not supported for {model_type} (it adds an o_proj bias)")

  max_pos = int(hf.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN)
  window = _sliding_window(hf, model_type)
  limit = min(max_pos, window) if window else max_pos
  if max_seq_len is None:
    max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
  elif window and max_seq_len > window:
    raise ValueError(f"max_seq_len {max_seq_len} exceeds the sliding window ({window}); sliding-window "
                     f"attention is not supported, so sequences must fit in the window")
  elif max_seq_len > max_pos:
    raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings ({max_pos})")

  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  name = _dtype_name(dtype)
  fields.update(max_seq_len=int(max_seq_len), dtype=name, param_dtype=name)
  fields.update(overrides)
  return MoEConfig(**fields)


# --------------------------------------------------------------------------------------------------
# HF tensors -> jaxmoe parameters


class _Tensors:
  """HF tensors by name, remembering which were used so that leftovers can be reported."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self.tensors = tensors
    self.used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self.tensors

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      raise ValueError(f"checkpoint is missing tensor {name!r}")
    t = self.tensors[name]
    if tuple(t.shape) != tuple(shape):
      raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, but config.json implies {tuple(shape)}")
    self.used.add(name)
    return t

  def first(self, names: list[str]) -> str | None:
    return next((n for n in names if n in self.tensors), None)


def _experts(ts: _Tensors, p: str, names: tuple[str, str, str], e: int, d: int, f: int
             ) -> dict[str, np.ndarray]:
  """Routed experts of one layer under prefix `p` as w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D].

  names = the per-expert (gate, up, down) Linear names, e.g. ("w1", "w3", "w2") for Mixtral.
  """
  gate_n, up_n, down_n = names
  fused = ts.first([p + "experts.gate_up_proj", p + "experts.gate_up_proj.weight"])
  if fused is not None:  # [E, 2F, D]: the gate rows, then the up rows, each Linear-style [out, in]
    gate_up = ts.get(fused, (e, 2 * f, d))
    down_name = ts.first([p + "experts.down_proj", p + "experts.down_proj.weight"])
    if down_name is None:
      raise ValueError(f"checkpoint has {fused!r} but no {p}experts.down_proj")
    down = ts.get(down_name, (e, d, f))  # [E, D, F]
    return {"w_gate": gate_up[:, :f, :].transpose(0, 2, 1), "w_up": gate_up[:, f:, :].transpose(0, 2, 1),
            "w_down": down.transpose(0, 2, 1)}
  if ts.has(f"{p}experts.0.{gate_n}.weight"):
    stack = lambda n, shape: np.stack([ts.get(f"{p}experts.{i}.{n}.weight", shape).T for i in range(e)])
    return {"w_gate": stack(gate_n, (f, d)), "w_up": stack(up_n, (f, d)),  # [E, D, F]
            "w_down": stack(down_n, (d, f))}  # [E, F, D]
  raise ValueError(f"checkpoint has no experts under {p!r}: expected per-expert "
                   f"'experts.{{e}}.{gate_n}.weight' or fused 'experts.gate_up_proj' tensors")


def convert_params(cfg: MoEConfig, model_type: str, tensors: Mapping[str, np.ndarray]
                   ) -> dict[tuple[str | int, ...], np.ndarray]:
  """Hugging Face tensors -> jaxmoe parameters keyed by their NNX path, e.g. ('layers', 0, 'attn', 'wq').

  HF Linear weights are [out, in]; jaxmoe's are [in, out]. Values keep the checkpoint's dtype.
  Raises ValueError on a missing tensor, a shape that disagrees with config.json, or tensors left over.
  """
  ts = _Tensors(tensors)
  root = "model." if ts.has("model.embed_tokens.weight") else ""
  d, v, h, kv, hd = cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  lin = lambda name, out_dim, in_dim: ts.get(name, (out_dim, in_dim)).T  # [in, out]
  params: dict[tuple[str | int, ...], np.ndarray] = {
      ("embed",): ts.get(root + "embed_tokens.weight", (v, d)),
      ("final_norm", "weight"): ts.get(root + "norm.weight", (d,)),
  }
  if not cfg.tie_embeddings:
    params[("lm_head",)] = lin("lm_head.weight", v, d)
  elif ts.has("lm_head.weight"):
    ts.used.add("lm_head.weight")  # some tied checkpoints store the copy anyway

  expert_names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
  for i in range(cfg.n_layers):
    p = f"{root}layers.{i}."
    a = p + "self_attn."
    layer = {
        ("attn_norm", "weight"): ts.get(p + "input_layernorm.weight", (d,)),
        ("ffn_norm", "weight"): ts.get(p + "post_attention_layernorm.weight", (d,)),
        ("attn", "wq"): lin(a + "q_proj.weight", h * hd, d),
        ("attn", "wk"): lin(a + "k_proj.weight", kv * hd, d),
        ("attn", "wv"): lin(a + "v_proj.weight", kv * hd, d),
        ("attn", "wo"): lin(a + "o_proj.weight", d, h * hd),
    }
    if cfg.attn_bias:
      layer.update({("attn", "bq"): ts.get(a + "q_proj.bias", (h * hd,)),
                    ("attn", "bk"): ts.get(a + "k_proj.bias", (kv * hd,)),
                    ("attn", "bv"): ts.get(a + "v_proj.bias", (kv * hd,))})
    if cfg.qk_norm != "none":
      q_dim, k_dim = (hd, hd) if cfg.qk_norm == "head" else (h * hd, kv * hd)
      layer.update({("attn", "q_norm", "weight"): ts.get(a + "q_norm.weight", (q_dim,)),
                    ("attn", "k_norm", "weight"): ts.get(a + "k_norm.weight", (k_dim,))})

    # Mixtral's block_sparse_moe is renamed mlp in transformers 5's in-memory (fused) layout.
    moe_prefix = p + "mlp."
    if model_type == "mixtral" and not ts.has(moe_prefix + "gate.weight"):
      moe_prefix = p + "block_sparse_moe."
    layer[("moe", "router")] = lin(moe_prefix + "gate.weight", cfg.n_experts, d)  # [D, E]
    experts = _experts(ts, moe_prefix, expert_names, cfg.n_experts, d, cfg.d_ff)
    layer.update({("moe", name): w for name, w in experts.items()})
    if cfg.shared_expert_d_ff:
      s, sf = moe_prefix + "shared_expert.", cfg.shared_expert_d_ff
      layer.update({("moe", "shared_gate_proj"): lin(s + "gate_proj.weight", sf, d),
                    ("moe", "shared_up_proj"): lin(s + "up_proj.weight", sf, d),
                    ("moe", "shared_down_proj"): lin(s + "down_proj.weight", d, sf)})
      if cfg.shared_expert_gate:
        layer[("moe", "shared_expert_gate")] = lin(moe_prefix + "shared_expert_gate.weight", 1, d)
    params.update({("layers", i) + k: w for k, w in layer.items()})

  leftover = sorted(n for n in tensors if n not in ts.used and not n.endswith("rotary_emb.inv_freq"))
  if leftover:
    raise ValueError(f"{len(leftover)} checkpoint tensors have no place in the {model_type} model built "
                     f"from config.json (first: {leftover[:5]}); the config and weights disagree")
  return params


def load_params(model_abstract: MoELM, params: Mapping[tuple[str | int, ...], np.ndarray]) -> MoELM:
  """A model with the structure of `model_abstract` (e.g. from nnx.eval_shape) holding `params`,
  each cast to the model's parameter dtype. Every parameter must be given."""
  graphdef, state = nnx.split(model_abstract)
  flat = []
  for path, var in nnx.to_flat_state(state):
    if path not in params:
      raise ValueError(f"no checkpoint tensor for parameter {'.'.join(map(str, path))}")
    want = var.get_value()
    value = params[path]
    if tuple(value.shape) != tuple(want.shape):
      raise ValueError(f"parameter {'.'.join(map(str, path))}: checkpoint shape {tuple(value.shape)}, "
                       f"model shape {tuple(want.shape)}")
    flat.append((path, var.replace(jnp.asarray(np.asarray(value, dtype=want.dtype)))))
  unused = set(params) - {path for path, _ in flat}
  if unused:
    raise ValueError(f"converted tensors with no model parameter: {sorted(map(str, unused))[:5]}")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(path: str | os.PathLike, dtype=None, *, max_seq_len: int | None = None,
                    **overrides) -> tuple[MoEConfig, MoELM]:
  """Load a local Hugging Face checkpoint directory of Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE.

  path: directory with config.json and safetensors weights (model.safetensors, or shards listed in
    model.safetensors.index.json).
  dtype: compute and parameter dtype ("float32", "bfloat16", "float16"); None = the checkpoint's.
  max_seq_len: KV-cache length; None = min(max_position_embeddings, 4096, sliding window).
  overrides: further MoEConfig fields, e.g. kernel_impl="xla".
  Returns (config, model). The tokenizer: `transformers.AutoTokenizer.from_pretrained(path)`.
  Raises FileNotFoundError for a missing directory, config.json or weights, and ValueError for an
  unsupported architecture or feature (dense layers, RoPE scaling, sliding windows that would be used).
  """
  hf = read_hf_config(path)
  cfg = config_from_hf(hf, dtype=dtype, max_seq_len=max_seq_len, **overrides)
  params = convert_params(cfg, hf["model_type"], read_weights(path))
  model = load_params(nnx.eval_shape(lambda: MoELM(cfg, nnx.Rngs(0))), params)
  return cfg, model
