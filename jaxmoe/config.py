"""The one configuration object of a jaxmoe model, and its named presets.

Every module reads its sizes from a frozen `MoEConfig`; tests make variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

ACTIVATIONS = ("relu", "swiglu")
QK_NORMS = ("none", "head", "full")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """A decoder-only MoE transformer (Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE family)."""

  vocab_size: int = 512  # tokenizer vocabulary
  d_model: int = 64  # residual stream width
  n_layers: int = 2  # decoder blocks; every block has an MoE FFN
  n_heads: int = 4  # query heads
  n_kv_heads: int = 2  # key/value heads (grouped-query attention); divides n_heads
  head_dim: int = 16  # width of one attention head
  d_ff: int = 128  # hidden width of one expert
  n_experts: int = 8  # routed experts per layer
  top_k: int = 2  # experts each token is routed to
  activation: str = "swiglu"  # expert FFN: "relu" (up, relu, down) or "swiglu" (silu(gate)*up, down)
  norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (Mixtral: yes)
  shared_expert_d_ff: int = 0  # hidden width of an always-on shared SwiGLU expert; 0 = none
  shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x @ w) (Qwen2-MoE)
  qk_norm: str = "none"  # RMSNorm on queries/keys: "none", "head" (per head: Qwen3), "full" (OLMoE)
  attn_bias: bool = False  # bias on the q/k/v projections (Qwen2-MoE)
  tie_embeddings: bool = False  # the LM head reuses the embedding matrix
  rope_theta: float = 10000.0  # RoPE base
  norm_eps: float = 1e-5  # RMSNorm epsilon
  max_seq_len: int = 256  # KV-cache length; prompts plus generated tokens must fit
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of parameters
  aux_loss_coef: float = 0.01  # weight of the load-balancing loss during training
  z_loss_coef: float = 0.001  # weight of the router z-loss during training
  kernel_impl: str = "auto"  # expert-FFN kernel: "auto", "xla", "pallas", "mosaic" (pallas_kernels.api)

  def __post_init__(self):
    def need(ok: bool, msg: str):
      if not ok:
        raise ValueError(f"invalid MoEConfig: {msg}")

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                 "n_experts", "top_k", "max_seq_len"):
      value = getattr(self, name)
      need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
    need(self.n_heads % self.n_kv_heads == 0,
         f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
    need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
    need(self.top_k <= self.n_experts,
         f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
    need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    need(self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
    need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    need(self.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")
    need(self.shared_expert_d_ff >= 0, "shared_expert_d_ff must be >= 0")
    need(not self.shared_expert_gate or self.shared_expert_d_ff > 0,
         "shared_expert_gate needs a shared expert (shared_expert_d_ff > 0)")
    need(self.rope_theta > 0 and self.norm_eps > 0, "rope_theta and norm_eps must be positive")
    need(self.kernel_impl in ("auto", "xla", "pallas", "mosaic"),
         f"kernel_impl must be auto|xla|pallas|mosaic, got {self.kernel_impl!r}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def expert_matrices(self) -> tuple[str, ...]:
    """Names of one expert's weight matrices, in the order the store packs them."""
    return ("w_gate", "w_up", "w_down") if self.activation == "swiglu" else ("w_up", "w_down")

  @property
  def expert_params(self) -> int:
    """Parameters in one routed expert."""
    return len(self.expert_matrices) * self.d_model * self.d_ff

  @property
  def expert_bytes(self) -> int:
    """Bytes of one routed expert in its storage dtype."""
    return self.expert_params * self.weight_dtype.itemsize

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown MoEConfig fields: {unknown}")
    return cls(**d)


def tiny() -> MoEConfig:
  """Seconds on a CPU: unit tests."""
  return MoEConfig()


def small() -> MoEConfig:
  """A few minutes of training on a CPU: the CPU main job."""
  return MoEConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                   d_ff=256, n_experts=16, top_k=2, max_seq_len=256)


def gpu() -> MoEConfig:
  """Trains in ~3 minutes on one H200 (0.94 B parameters, 0.18 B active per token); offloaded, its
  12 x 32 experts (4.7 MB each in bf16) make PCIe the bottleneck."""
  return MoEConfig(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64,
                   d_ff=1024, n_experts=32, top_k=2, max_seq_len=1024, dtype="bfloat16",
                   param_dtype="float32")


def gpu_fine() -> MoEConfig:
  """The `gpu` preset's expert parameters cut 2x finer and routed 4x wider: 12 x 64 experts (2.4 MB
  each in bf16) of d_ff 512, top-8, as OLMoE routes; a token runs 2x the gpu preset's expert FFN."""
  return dataclasses.replace(gpu(), d_ff=512, n_experts=64, top_k=8)


def mixtral_shaped() -> MoEConfig:
  """Mixtral-8x7B's layer dimensions (8 layers instead of 32) for systems benchmarks, random weights."""
  return MoEConfig(vocab_size=32000, d_model=4096, n_layers=8, n_heads=32, n_kv_heads=8, head_dim=128,
                   d_ff=14336, n_experts=8, top_k=2, max_seq_len=4096, rope_theta=1e6,
                   dtype="bfloat16", param_dtype="bfloat16")


def olmoe_shaped() -> MoEConfig:
  """OLMoE-1B-7B's layer dimensions (8 of its 16 layers), random weights: 64 fine-grained experts of
  12.6 MB in bf16, top-8, for systems benchmarks."""
  return MoEConfig(vocab_size=50304, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=16, head_dim=128,
                   d_ff=1024, n_experts=64, top_k=8, norm_topk_prob=False, qk_norm="full",
                   max_seq_len=4096, dtype="bfloat16", param_dtype="bfloat16")


PRESETS = {"tiny": tiny, "small": small, "gpu": gpu, "gpu_fine": gpu_fine, "mixtral_shaped": mixtral_shaped,
           "olmoe_shaped": olmoe_shaped}


def preset(name: str) -> MoEConfig:
  """The named preset; a clear error lists the names that exist."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]()
