"""Run store: where runs, their trajectories, metrics and checkpoints live (SQLAlchemy)."""

from ._recorder import StoreRecorder, save_atomic
from ._store import STALE_AFTER, LeaseError, RunInfo, RunStore, StoreError, process_gone, resolve_url

__all__ = ["STALE_AFTER", "LeaseError", "RunInfo", "RunStore", "StoreError", "StoreRecorder", "process_gone",
           "resolve_url", "save_atomic"]
