"""Best-response layers, hyperparameter-driven regularisers and ``hypernetize``."""

from .dropout import Dropout, dropout
from .hypernet import HyperNet, hypernetize
from .layers import BestResponseConv2d, BestResponseLinear
from .state import HyperModule, HyperState

__all__ = ["BestResponseConv2d", "BestResponseLinear", "Dropout", "HyperModule", "HyperNet", "HyperState",
           "dropout", "hypernetize"]
