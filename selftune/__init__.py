"""selftune: tune a network's hyperparameters inside the one run that trains it (STN, Delta-STN).

The public names below are imported on first use (PEP 562), so ``import selftune`` and the command
line's ``selftune --help`` start without importing PyTorch; ``selftune.hypernetize`` and the rest load
it when first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS = {
    "Augment": "augment", "Cutout": "augment", "Flip": "augment", "Noise": "augment", "Shift": "augment",
    "Dropout": "nn", "EmbeddingDropout": "nn", "HyperNet": "nn", "hypernetize": "nn",
    "Objective": "objective",
    "export": "plain_model",
    "TunerSettings": "settings",
    "Float": "space", "Int": "space", "Space": "space",
    "Callback": "tuner", "FitResult": "tuner", "SelfTuner": "tuner", "evaluate": "tuner", "score": "tuner",
    "Task": "task",
    "HyperSchedule": "schedules",
    "AdaptiveBatchSettings": "batch_size", "lr_scale": "batch_size",
}

#: submodules reachable as attributes (``st.nn.Dropout``), imported on first use
_SUBMODULES = frozenset({"augment", "batch_size", "callbacks", "config", "errors", "explain", "nn", "objective",
                         "plain_model", "schedules", "settings", "space", "task", "testing", "tuner"})

__all__ = ["AdaptiveBatchSettings", "Augment", "Callback", "Cutout", "Dropout", "EmbeddingDropout", "FitResult", "Flip",
           "Float", "HyperNet",
           "HyperSchedule", "Int", "Noise", "Objective", "SelfTuner", "Shift", "Space", "Task", "TunerSettings",
           "evaluate", "export", "hypernetize", "lr_scale", "score"]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .augment import Augment, Cutout, Flip, Noise, Shift
    from .batch_size import AdaptiveBatchSettings, lr_scale
    from .nn import Dropout, EmbeddingDropout, HyperNet, hypernetize
    from .objective import Objective
    from .plain_model import export
    from .schedules import HyperSchedule
    from .settings import TunerSettings
    from .space import Float, Int, Space
    from .task import Task
    from .tuner import Callback, FitResult, SelfTuner, evaluate, score


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBMODULES:
            return importlib.import_module(f".{name}", __name__)  # st.nn, st.errors, ...: imported on first use
        raise AttributeError(f"module 'selftune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
