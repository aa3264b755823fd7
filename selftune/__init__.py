"""selftune: tune a network's hyperparameters inside the one run that trains it (STN, Delta-STN)."""

from .augment import Augment, Cutout, Flip, Noise, Shift
from .nn import Dropout, EmbeddingDropout, HyperNet, hypernetize
from .objective import Objective
from .settings import TunerSettings
from .space import Float, Int, Space
from .tuner import Callback, FitResult, SelfTuner, evaluate

__version__ = "0.1.0"

__all__ = ["Augment", "Callback", "Cutout", "Dropout", "EmbeddingDropout", "FitResult", "Flip", "Float", "HyperNet",
           "Int", "Noise", "Objective", "SelfTuner", "Shift", "Space", "TunerSettings", "evaluate", "hypernetize"]
