"""Best-response layers, hyperparameter-driven regularisers and ``hypernetize``."""

from .dropout import Dropout, EmbeddingDropout, dropout
from .hypernet import HyperNet, hypernetize
from .layers import (
    BestResponseConv2d,
    BestResponseEmbedding,
    BestResponseLinear,
    BestResponseLSTM,
    BestResponseModule,
)
from .state import HyperModule, HyperState

__all__ = ["BestResponseConv2d", "BestResponseEmbedding", "BestResponseLSTM", "BestResponseLinear",
           "BestResponseModule", "Dropout", "EmbeddingDropout", "HyperModule", "HyperNet", "HyperState", "dropout",
           "hypernetize"]
