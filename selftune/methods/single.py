"""One training run: the fixed baseline, STN and Delta-STN."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, apply_overrides, parse_config
from ..runner import prepare, run_recorded
from ..store import RunStore
from ._result import MethodResult

SINGLE_METHODS: tuple[str, ...] = ("fixed", "stn", "delta-stn")


def run_single(config: RunConfig, method: str, seed: int, store: RunStore, out: str | Path,
               checkpoint_root: str | Path = "checkpoints") -> MethodResult:
    """Train ``config`` once with ``method`` and ``seed``, recorded in ``store``, outputs in ``out``."""
    if method not in SINGLE_METHODS:
        raise ValueError(f"{method!r} is not a single-run method {SINGLE_METHODS}")
    config = parse_config(apply_overrides(config.model_dump(mode="json"), [f'method="{method}"', f"seed={seed}"]))
    r = run_recorded(prepare(config), store, out=out, checkpoint_root=checkpoint_root, every=None)
    examples = int(r["compute"]["examples"])
    return MethodResult(method=method, seed=seed, test_loss=r["test"]["loss"], test_accuracy=r["test"]["accuracy"],
                        val_loss=r["val"]["loss"], hparams=r["hparams"], examples=examples,
                        seconds=r["compute"]["seconds"], run_id=r["run_id"], curve=[(examples, r["test"]["loss"])])
