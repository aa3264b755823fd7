"""Run store: where runs, their trajectories, metrics and checkpoints live (SQLAlchemy)."""

from ._recorder import StoreRecorder, save_atomic
from ._store import STALE_AFTER, LeaseError, RunInfo, RunStore, StoreError, resolve_url

__all__ = ["STALE_AFTER", "LeaseError", "RunInfo", "RunStore", "StoreError", "StoreRecorder", "resolve_url",
           "save_atomic"]
