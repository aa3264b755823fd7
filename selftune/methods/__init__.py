"""Ways to tune the same task, behind one interface so benchmarks compare them fairly.

Every method is a :class:`Method` in :data:`METHODS`, the one registry the harness and the CLI read:
single-run methods (one per in-loop algorithm of :data:`selftune.algorithms.ALGORITHMS`: ``fixed``,
``stn``, ``delta-stn``, ...) train once; ``delta-stn-replay`` and ``stn-replay`` tune, then re-train
from scratch on the tuned schedule (:mod:`.replay`); black-box searches (``random``, ``tpe``, ``tpe-asha``) run
Optuna studies whose trials are full ``fixed`` runs; ``pbt`` trains a population through Ray Tune.
Every method returns a :class:`MethodResult` with the same accounting of compute: training examples
forwarded and backwarded (hyper steps included) and wall-clock seconds.
"""

from __future__ import annotations

from ..algorithms import ALGORITHMS
from ..errors import ConfigError
from ._base import Context, Method, MethodResult
from .pbt import PBT, run_pbt
from .replay import Replayed
from .search import SEARCHES, Search, run_search
from .single import SingleRun

#: Every method by name: single runs first (``fixed``, the unit of compute, leads), then searches, then PBT.
METHODS: dict[str, Method] = {m.name: m for m in (*(SingleRun(a) for a in ALGORITHMS),
                                                  *(Replayed(a) for a in ("delta-stn", "stn")), *SEARCHES, PBT())}


def get_method(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if name not in METHODS and name in ALGORITHMS:  # an algorithm registered after this module was imported
        METHODS[name] = SingleRun(name)
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError("--methods", f"unknown method {name!r}; choose from {list(METHODS)}") from None


__all__ = ["METHODS", "PBT", "Context", "Method", "MethodResult", "Replayed", "Search", "SingleRun", "get_method",
           "run_pbt", "run_search"]
