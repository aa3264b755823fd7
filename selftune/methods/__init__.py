"""Ways to tune the same task, behind one interface so benchmarks compare them fairly.

Single-run methods (``fixed``, ``stn``, ``delta-stn``) train once; black-box methods (``random``,
``tpe``, ``tpe-asha``) run Optuna studies whose trials are full training runs of the same config at
fixed hyperparameters; ``pbt`` trains a population through Ray Tune's Population Based Training.
Every method returns a :class:`MethodResult` with the same accounting of
compute: training examples forwarded and backwarded (hyper steps included) and wall-clock seconds.
"""

from ._result import MethodResult
from .pbt import PBT_METHODS, run_pbt
from .search import SEARCH_METHODS, run_search
from .single import SINGLE_METHODS, run_single

METHODS: tuple[str, ...] = SINGLE_METHODS + SEARCH_METHODS + PBT_METHODS

__all__ = ["METHODS", "PBT_METHODS", "SEARCH_METHODS", "SINGLE_METHODS", "MethodResult", "run_pbt", "run_search",
           "run_single"]
