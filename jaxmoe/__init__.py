"""jaxmoe: Mixture-of-Experts inference with experts offloaded to host memory and learned prefetch."""

from jaxmoe.config import MoEConfig, preset

__all__ = ["MoEConfig", "preset"]
