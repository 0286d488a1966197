"""An analytic time model of offloaded MoE inference, to set beside every measured latency.

A step (prefill or one decode token) must compute for C seconds (the all-resident step time) and
move P bytes of prefetched experts and M bytes of on-demand experts over a link of bandwidth W:

    predicted = max(C, P / W) + M / W

Prefetched copies are issued before the compute they hide behind, so they overlap it; on-demand copies
are issued after the router decided, so the layer waits for all of them. The model ignores per-copy
latency and the jit dispatch gaps, which is what the report points at when measurement and model
differ by more than 20%.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepCost:
  compute_s: float  # resident time of the step (measured, or FLOPs / FLOP rate)
  prefetched_bytes: float  # bytes copied ahead of the compute that hides them
  on_demand_bytes: float  # bytes copied after the router asked for them
  bandwidth_bytes_per_s: float  # measured host->device bandwidth

  @property
  def predicted_s(self) -> float:
    w = self.bandwidth_bytes_per_s
    return max(self.compute_s, self.prefetched_bytes / w) + self.on_demand_bytes / w

  @property
  def pcie_bound_s(self) -> float:
    """The lower bound: every byte that crossed the link, at full bandwidth, or the compute if longer."""
    return max(self.compute_s, (self.prefetched_bytes + self.on_demand_bytes) / self.bandwidth_bytes_per_s)


def decode_flops(cfg, n_tokens: int = 1) -> float:
  """Matmul FLOPs of `n_tokens` decode tokens (attention projections + routed and shared experts)."""
  d, hd = cfg.d_model, cfg.head_dim
  attn = 2 * d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  expert = 2 * cfg.top_k * len(cfg.expert_matrices) * d * cfg.d_ff
  shared = 2 * 3 * d * cfg.shared_expert_d_ff
  return n_tokens * (cfg.n_layers * (attn + expert + shared + 2 * d * cfg.n_experts) + 2 * d * cfg.vocab_size)


def explain_gap(measured_s: float, predicted_s: float, n_copies: float, n_layers: int) -> str:
  """A one-line reason when the measurement and the model differ by more than 20%, else ''."""
  if predicted_s <= 0 or abs(measured_s / predicted_s - 1) <= 0.2:
    return ""
  if measured_s > predicted_s:
    return (f"measured {measured_s / predicted_s:.2f}x the model: the model leaves out the host's time "
            f"per step: reading the routing (once per layer, {n_layers} here, or once per step where a "
            f"plan is speculated), the jitted calls (two per layer, one where speculated) and issuing "
            f"{n_copies:.0f} separate copies (small copies also run below peak bandwidth)")
  return (f"measured {measured_s / predicted_s:.2f}x the model: copies overlapped more than the model "
          f"credits (on-demand copies of one layer overlap the previous layer's tail)")


def prefetch_gain_bound(compute_s: float, transfer_s: float) -> float:
  """The most any prefetch can speed a step up over loading every expert on demand, when the bytes moved
  stay the same: (C + T) / max(C, T) for compute C and transfer time T (the step's bytes over the link
  bandwidth). On demand the step takes C + T; a prefetch only hides the copies behind the compute, it
  removes none (bytes that a cache spares are a different gain), so the step takes at least max(C, T).
  The bound is 2 when C = T and falls to 1 as either side dominates."""
  if compute_s < 0 or transfer_s < 0 or compute_s + transfer_s == 0:
    raise ValueError(f"need non-negative times, not both zero; got compute {compute_s}, transfer {transfer_s}")
  return (compute_s + transfer_s) / max(compute_s, transfer_s)
