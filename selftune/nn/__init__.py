"""Best-response layers, hyperparameter-driven regularisers and ``hypernetize``."""

from .dropout import Dropout, EmbeddingDropout, dropout
from .hypernet import HyperNet, hypernetize
from .layers import (
    BestResponseConv1d,
    BestResponseConv2d,
    BestResponseEmbedding,
    BestResponseGRU,
    BestResponseLinear,
    BestResponseLSTM,
    BestResponseModule,
    BestResponseMultiheadAttention,
    BestResponseRecurrent,
)
from .state import HyperModule, HyperState

__all__ = ["BestResponseConv1d", "BestResponseConv2d", "BestResponseEmbedding", "BestResponseGRU", "BestResponseLSTM",
           "BestResponseLinear", "BestResponseModule", "BestResponseMultiheadAttention", "BestResponseRecurrent",
           "Dropout", "EmbeddingDropout", "HyperModule", "HyperNet", "HyperState", "dropout", "hypernetize"]
