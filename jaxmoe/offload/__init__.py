"""Offloaded MoE inference: experts in pinned host memory, a device expert cache, asynchronous
prefetch driven by pluggable strategies, and an exact layer-by-layer engine."""

from jaxmoe.offload.cache import CopyRecord, ExpertCache
from jaxmoe.offload.engine import OffloadEngine
from jaxmoe.offload.stats import OffloadStats
from jaxmoe.offload.parallel import ExpertParallelEngine, ParallelStats
from jaxmoe.offload.prefetch import Prefetcher
from jaxmoe.offload.store import ExpertStore
from jaxmoe.offload.strategies import NAMES as STRATEGIES, Strategy, make as make_strategy

__all__ = ["CopyRecord", "ExpertCache", "ExpertParallelEngine", "ExpertStore", "OffloadEngine", "OffloadStats",
           "ParallelStats", "Prefetcher", "STRATEGIES", "Strategy", "make_strategy"]
