"""Pallas GPU kernels for grouped (per-expert) matmuls with fused activations, and their references."""

from pallas_kernels.expert_ffn.api import grouped_glu, grouped_matmul

__all__ = ["grouped_glu", "grouped_matmul"]
