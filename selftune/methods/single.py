"""Single-run methods: one recorded training run with an in-loop algorithm (fixed, STN, Delta-STN, ...)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..algorithms import ALGORITHMS
from ._base import Context, Method, MethodResult, began_from, own_metrics

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..runner import Prepared


class SingleRun(Method):
    """Train once with the in-loop algorithm ``algorithm`` (a key of :data:`selftune.algorithms.ALGORITHMS`)."""

    uses_start = True

    def __init__(self, algorithm: str) -> None:
        self.algorithm = ALGORITHMS[algorithm]
        super().__init__(self.algorithm.name, schedule=self.algorithm.tunes or self.algorithm.needs_lr)
        # one-pass runs when named: a default benchmark already tunes a bound rate (hd, delta-ift)
        self.by_default = not self.algorithm.differentiates_update

    def unusable(self, config: RunConfig) -> str | None:
        if self.algorithm.needs_lr and not isinstance(config.tuner.lr, str):
            return (f"{self.name} tunes the learning rate, and this config's tuner.lr is a number; "
                    "bind it to a hyperparameter ([tuner] lr = \"lr\" with a [space.lr] table)")
        from ..errors import ConfigError

        try:  # what the algorithm itself refuses (one-pass: an optimizer whose update it cannot differentiate)
            self.algorithm(config.tuner, lr=1.0)
        except ConfigError as err:
            return str(err)
        return None

    def run(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        from ..outputs import read_marker
        from ..runner import prepare, run_recorded

        config = config.derive(method=self.name, seed=seed)
        prepared = prepare(config)
        folder = ctx.run_folder(self.name, seed)
        marker = read_marker(folder) or {}
        here = marker.get("run_id") in ctx.trained  # this benchmark's own (a -replay method ran it first)
        try:
            result = None if ctx.fresh and not here else \
                continue_earlier(replace(ctx, progress=None) if here else ctx, folder, prepared)
        except TrainAnew:
            result, prepared = None, prepare(config)
        if result is None:
            replaced = superseded(ctx, folder)
            r = run_recorded(prepared, ctx.store, out=folder, checkpoint_root=ctx.folder / "checkpoints",
                             every=None, overwrite=True)
            result = result_of(r.to_json(), ctx, config)
            prune_checkpoints(replaced)
        assert result.run_id is not None
        ctx.trained.add(result.run_id)
        return result


class TrainAnew(Exception):  # noqa: N818 - a decision, not a fault
    """:func:`continue_earlier` tried to resume a run and could not: train anew, from a fresh ``prepare``."""


def result_of(done: dict[str, Any], ctx: Context, config: RunConfig) -> MethodResult:
    """A single run's ``result.json`` payload as a benchmark result."""
    examples = int(done["compute"]["examples"])
    return MethodResult(method=str(done["method"]), seed=int(done["seed"]), test_loss=done["test"]["loss"],
                        test_accuracy=done["test"].get("accuracy", math.nan), val_loss=done["val"]["loss"],
                        hparams=done["hparams"], examples=examples, seconds=done["compute"]["seconds"],
                        run_id=done["run_id"], curve=[(examples, done["test"]["loss"])], start=ctx.start,
                        start_values={n: h.init for n, h in config.space.items()}, began=began_from(done, config),
                        test_metrics=own_metrics(done["test"]))


def continue_earlier(ctx: Context, folder: Path, prepared: Prepared) -> MethodResult | None:
    """What an earlier benchmark in this folder left of this run, continued: a bench run again (after a
    Ctrl-C, a crash, a lost machine) keeps the runs it finished and resumes the one it was training,
    as a search continues its study. Only a run of this store, whose folder still holds its outputs
    (``result.json``, ``trajectory.csv``), recorded with the config, the data, the user's code (a task file
    and the modules beside it, an optimizer file: ``data["code"]``) and the selftune, PyTorch and Python
    versions of this run counts; anything else (``None``, a failed run too) is trained anew. A resumed run
    must have stopped with a checkpoint (a Ctrl-C writes one; a bench's runs write none before their end,
    so one killed or lost is trained anew) whose data, code and versions are this run's.

    Raises:
        TrainAnew: a resume that started failed; ``prepared`` may hold part of its checkpoint.
    """
    from ..config import comparable
    from ..errors import ConfigError, LeaseError, ResumeError
    from ..outputs import read_marker
    from ..runner import resume_recorded, versions

    marker = read_marker(folder)
    if not marker or marker.get("store") != ctx.store.display_url or not isinstance(marker.get("run_id"), int):
        return None
    try:
        info = ctx.store.get_run(marker["run_id"])
    except LookupError:
        return None
    config = prepared.config
    say = ctx.progress or (lambda line: None)
    if info.uuid != marker.get("run_uuid"):
        return None

    def anew(why: str) -> None:  # a re-run that trains everything again says why (fuzz round 45)
        say(f"    training anew: run {info.id}, which an earlier bench left in this folder, {why}")

    if comparable(info.config) != comparable(config.model_dump(mode="json")):
        return anew("had another config")
    if info.status == "finished":
        try:
            done = json.loads((folder / "result.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(done, dict) or done.get("run_uuid") != info.uuid:
            return None
        if done.get("data") != prepared.data:
            return anew(_what_changed(done.get("data"), prepared.data))
        if done.get("versions") != versions():
            return anew(f"ran on other versions ({_versions_changed(done.get('versions'), versions())})")
        if not (folder / "trajectory.csv").is_file():
            return None  # (the bench plots the schedule from the folder's trajectory.csv)
        say(f"    kept run {info.id}: an earlier bench in this folder finished it (same config, data and versions)")
        return result_of(done, ctx, config)
    checkpoints = ctx.store.checkpoints(info.id) if info.status == "interrupted" else []
    if not checkpoints or Path(info.out_dir).resolve() != folder.resolve():  # (a moved bench folder: anew)
        return None
    try:  # what the run trained on until its stop: the same data, code and versions as this one, or anew
        import torch

        saved = torch.load(max(checkpoints)[2], map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the resume would read the one before it; train anew instead
        return None
    if not isinstance(saved, dict) or saved.get("data") != {**prepared.data, "versions": versions()}:
        return None
    notes: list[str] = []
    try:
        r = resume_recorded(ctx.store, info.id, notes=notes, prepared=prepared)
    except (ConfigError, LeaseError, ResumeError):
        raise TrainAnew from None  # (``prepared`` may hold part of the checkpoint now: prepare again)
    say(f"    resumed run {info.id}, which an earlier bench in this folder was training")
    for note in notes:
        say(f"    note: {note}")
    return result_of(r.to_json(), ctx, config)


def _what_changed(before: Any, now: dict[str, Any]) -> str:
    """Why a run's recorded ``data`` is not this run's, in words."""
    if not isinstance(before, dict):
        return "recorded no data"
    if before.get("code") != now.get("code"):
        return ("trained on other code (the task's file, or a .py module or package beside it, was added, "
                "removed or edited)")
    return "trained on other data"


def _versions_changed(before: Any, now: dict[str, Any]) -> str:
    if not isinstance(before, dict):
        return "not recorded"
    return ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v) or "other"


def superseded(ctx: Context, folder: Path) -> str | None:
    """The checkpoint folder of the run of this store whose outputs ``folder`` holds, when a new run is about
    to replace them there and it lies under this benchmark's ``checkpoints/`` (a run this benchmark made);
    ``None`` otherwise, or while that run trains."""
    from ..outputs import read_marker

    marker = read_marker(folder)
    if not marker or marker.get("store") != ctx.store.display_url or not isinstance(marker.get("run_id"), int):
        return None
    try:
        info = ctx.store.get_run(marker["run_id"])
    except LookupError:
        return None
    root = (ctx.folder / "checkpoints").resolve()
    mine = Path(info.checkpoint_dir).resolve()
    if info.uuid != marker.get("run_uuid") or info.status == "running" or mine.parent != root:
        return None
    return str(mine)


def prune_checkpoints(folder: str | None) -> None:
    """Delete the checkpoints of a run a benchmark trained again in its place (:func:`superseded`): its outputs
    are gone from the benchmark's folder, so nothing resumes or keeps it, and each re-run with ``--fresh``
    or a changed setting left one more folder of them (GPU checkpoints are large). The store keeps its
    record; ``selftune resume`` of it says its checkpoint files are gone."""
    import shutil

    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)

