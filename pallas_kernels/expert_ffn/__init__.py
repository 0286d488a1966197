"""Grouped expert-FFN matmuls: reference, portable Pallas, Hopper Mosaic GPU, and the dispatching API."""
