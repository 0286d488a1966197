"""Routing predictors: traces of the model's own routing, predictor families trained on them, the
training-free references, one metrics module, and the hook the offload engine's `learned` strategy uses."""

from jaxmoe.predictor.base import PopularityPredictor, RoutingPredictor
from jaxmoe.predictor.data import Traces, collect_traces, load_traces, split_by_document
from jaxmoe.predictor.store import TokenPredictor, load_cross_layer, load_predictor
from jaxmoe.predictor.training import train_predictor

__all__ = ["PopularityPredictor", "RoutingPredictor", "TokenPredictor", "Traces", "collect_traces",
           "load_cross_layer", "load_predictor", "load_traces", "split_by_document", "train_predictor"]
