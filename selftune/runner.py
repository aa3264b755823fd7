"""From a validated config to a finished run and its output folder.

``prepare`` builds everything (data, model, space, tuner) and is where every remaining error is
raised, before anything is written; ``execute`` trains; ``write_outputs`` writes the folder
atomically (a temporary sibling renamed into place), so an interrupted or failed run never leaves a
half-written result behind.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from . import __version__
from .config import ConfigError, RunConfig
from .data import DatasetUnavailable, Splits, load_dataset
from .models import MODELS, build, model_arguments
from .nn import Dropout, EmbeddingDropout, HyperNet, hypernetize
from .tuner import Callback, FitResult, SelfTuner, evaluate

__all__ = ["Prepared", "execute", "prepare", "resume_recorded", "run_recorded", "write_outputs"]


@dataclass
class Prepared:
    config: RunConfig
    splits: Splits
    tuner: SelfTuner


def _build_net(config: RunConfig, splits: Splits) -> HyperNet:
    if splits.kind == "language-model" and config.model.name != "lstm_lm":
        raise ConfigError("model.name", f"data {splits.name!r} is a text corpus: use the language model \"lstm_lm\"")
    space = config.build_space()
    accepted = model_arguments(config.model.name) if config.model.name in MODELS else set()
    for key in config.model.kwargs():
        if accepted and key not in accepted:
            raise ConfigError(f"model.{key}", f"not an argument of {config.model.name!r}; "
                                              f"it takes {', '.join(sorted(accepted))}")
    torch.manual_seed(config.seed)
    try:
        model = build(config.model.name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                      **config.model.kwargs())
    except LookupError as err:
        raise ConfigError("model.name", str(err).strip("'\"")) from None
    except (TypeError, ValueError) as err:
        raise ConfigError("model", str(err)) from None
    for module in model.modules():
        if isinstance(module, Dropout | EmbeddingDropout) and module.name not in space:
            raise ConfigError("model.dropout", f"{module.name!r} is not declared; add a [space.{module.name}] table")
    form = "stn" if config.method == "stn" else "delta"
    return hypernetize(model, space, form=form, init_scale=config.tuner.init_scale)


def prepare(config: RunConfig) -> Prepared:
    """Load data and build the model and tuner the config describes.

    Raises:
        ConfigError: anything the schema alone could not check (dataset and model names, model
            arguments, references to undeclared hyperparameters, missing data packages).
    """
    d = config.data
    try:
        splits = load_dataset(d.name, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                              train_subset=d.train_subset, test_subset=d.test_subset, split_seed=d.split_seed,
                              seq_len=d.seq_len)
    except LookupError as err:
        raise ConfigError("data.name", str(err).strip("'\"")) from None
    except DatasetUnavailable as err:
        raise ConfigError("data.name", str(err)) from None
    device = config.resolve_device()
    net = _build_net(config, splits)
    if device != "cpu":  # the whole (small) dataset moves once, not batch by batch
        splits = _to_device(splits, device)
    tuner = SelfTuner(net, splits.train, splits.val, method=config.method, settings=config.tuner,
                      objective=config.build_objective(), augment=config.build_augment(), seed=config.seed,
                      device=device)
    return Prepared(config, splits, tuner)


def _to_device(splits: Splits, device: str) -> Splits:
    moved = {k: TensorDataset(*(t.to(device) for t in getattr(splits, k).tensors)) for k in ("train", "val", "test")}
    return replace(splits, **moved)


def execute(prepared: Prepared, callbacks: list[Callback] | None = None) -> tuple[FitResult, dict[str, Any]]:
    """Train and evaluate; returns the fit result and the ``result.json`` payload."""
    config, tuner = prepared.config, prepared.tuner
    fit = tuner.fit(config.epochs, callbacks=callbacks or [])
    test_loss, test_acc = evaluate(fit.net, prepared.splits.test)
    val_loss, val_acc = evaluate(fit.net, prepared.splits.val)
    result = {
        "method": config.method,
        "seed": config.seed,
        "hparams": fit.hparams,
        "test": {"loss": test_loss, "accuracy": test_acc},
        "val": {"loss": val_loss, "accuracy": val_acc},
        "compute": fit.compute,
        "epochs": config.epochs,
        "data": {"name": prepared.splits.name, **prepared.splits.sizes()},
        "config": config.model_dump(mode="json"),
        "versions": {"selftune": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if prepared.splits.kind == "language-model":
        for key in ("test", "val"):
            result[key]["perplexity"] = math.exp(min(result[key]["loss"], 700.0))
    return fit, result


def _write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def write_outputs(out: str | Path, fit: FitResult, result: dict[str, Any]) -> Path:
    """Write ``result.json``, ``trajectory.csv``, ``epochs.csv`` and the plots into ``out`` atomically."""
    from .report.plots import plot_losses, plot_trajectory

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "result.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        torch.save(fit.net.state_dict(), tmp / "model.pt")
        _write_csv(tmp / "trajectory.csv", fit.trajectory)
        _write_csv(tmp / "epochs.csv", fit.history)
        names = fit.net.space.names
        plot_trajectory(fit.trajectory, names, tmp / "trajectory.png", title=f"{result['method']} hyperparameters")
        plot_losses(fit.trajectory, fit.history, tmp / "losses.png", title=f"{result['method']} losses")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------
# Runs recorded in the store, checkpointed as they go, resumable after a crash
# ----------------------------------------------------------------------------------------------
def _drive(prepared: Prepared, store: Any, run_id: int, out: Path, checkpoint_dir: str, every: int | None,
           callbacks: list[Callback]) -> dict[str, Any]:
    from .store import StoreRecorder

    # every=None: a single checkpoint at the end (benchmarks, where checkpoint I/O would skew wall times).
    recorder = StoreRecorder(store, run_id, checkpoint_dir, every=every or 2**62, at_epoch_end=every is not None)
    try:
        fit, result = execute(prepared, [*callbacks, recorder])
        result["run_id"] = run_id
        write_outputs(out, fit, result)
    except Exception as err:
        store.fail(run_id, f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    store.finish(run_id, result)
    return result


def run_recorded(prepared: Prepared, store: Any, *, out: str | Path, checkpoint_root: str | Path = "checkpoints",
                 every: int | None = 100, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run a prepared config as a new run of ``store``; returns ``result.json``'s payload (with ``run_id``).
    ``every``: steps between checkpoints (plus one per epoch end); ``None``: only a final checkpoint."""
    config = prepared.config
    run_id = store.create_run(method=config.method, seed=config.seed, config=config.model_dump(mode="json"),
                              out_dir=str(Path(out).resolve()), checkpoint_root=str(checkpoint_root))
    return _drive(prepared, store, run_id, Path(out), store.get_run(run_id).checkpoint_dir, every, callbacks or [])


def resume_recorded(store: Any, run_id: int, *, every: int = 100, callbacks: list[Callback] | None = None,
                    force: bool = False) -> dict[str, Any]:
    """Continue run ``run_id`` from its last checkpoint (from the start if it has none).

    Raises:
        LookupError: no such run.
        ConfigError: the run already finished, or it still runs (``force`` overrides the latter).
    """
    from .config import parse_config

    info = store.get_run(run_id)
    if info.status == "finished":
        raise ConfigError("RUN", f"run {run_id} already finished; its results are in {info.out_dir}")
    if info.status == "running" and not force:
        raise ConfigError("RUN", f"run {run_id} is still running (pid {info.pid} on {info.host}); "
                                 "pass --force if that process is gone")
    prepared = prepare(parse_config(info.config))
    checkpoints = store.checkpoints(run_id)
    step, epoch = -1, 0
    if checkpoints:
        step, epoch, path = checkpoints[-1]
        prepared.tuner.load_state_dict(torch.load(path, weights_only=True))
    store.rewind(run_id, step, epoch)
    return _drive(prepared, store, run_id, Path(info.out_dir), info.checkpoint_dir, every, callbacks or [])
