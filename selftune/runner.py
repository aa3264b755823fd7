"""From a validated config to a finished run, its store record and its output folder.

``prepare`` builds everything (data, model, space, tuner) and is where every remaining error is
raised, before anything is written. ``execute`` trains and evaluates without recording (search
trials). :class:`RecordedRun` is the one path of a recorded run, new or resumed: it claims the
output folder, holds the run's lease in the store, checkpoints under the run's UUID, turns
SIGINT/SIGTERM into a checkpoint and an ``interrupted`` status, and writes the outputs through
:func:`selftune.outputs.write_outputs`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import re
import shlex
import signal
import tempfile
import threading
import uuid as uuidlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
from torch.utils.data import TensorDataset

from . import __version__
from .algorithms import get_algorithm
from .config import RunConfig, parse_config
from .data import DatasetUnavailable, Splits, load_dataset
from .errors import ConfigError, Interrupted, LeaseError, OutputError, ResumeError, SelftuneError
from .models import MODELS, build, model_arguments
from .nn import Dropout, EmbeddingDropout, HyperNet, hypernetize
from .outputs import RunResult, claim_folder, mark_folder, write_outputs
from .schedules import HyperSchedule, stayed
from .tuner import Callback, FitResult, SelfTuner
from .validation import as_dataset

__all__ = ["Prepared", "RecordedRun", "default_out", "evaluate_run", "execute", "prepare", "recorded_schedule",
           "replay_config", "replay_recorded", "resume_recorded", "run_recorded"]


@dataclass
class Prepared:
    """A run ready to train: its config, its tuner, the test data it is scored on at the end, and how
    results name the data (``data``: name, sizes and, for a task, its source and the file's digest)."""

    config: RunConfig
    tuner: SelfTuner
    test: Any
    data: dict[str, Any]
    kind: str = "classification"

    def score(self, split: str, net: HyperNet | None = None) -> dict[str, float]:
        """The loss and metrics of ``net`` (default: the tuner's) on ``"test"`` or ``"val"`` (perplexity added
        for language models)."""
        result = self.tuner.score(self.test if split == "test" else None, net=net)
        if self.kind == "language-model":
            result["perplexity"] = math.exp(min(result["loss"], 700.0))
        return result


def _check_dropouts(model: torch.nn.Module, space: Any, where: str, replaced: Any = None) -> None:
    """``replaced``: the task's own space, which the config's ``[space.*]`` tables replaced (the message
    says so: one table added for a decay left the task's dropouts undeclared)."""
    for module in model.modules():
        if isinstance(module, Dropout | EmbeddingDropout) and module.name not in space:
            why = ""
            if replaced is not None and module.name in replaced:
                why = (f" (the task's space declares it, but this config's [space.*] tables replace the task's "
                       f"whole space: declare each of {list(replaced.names)} you keep)")
            raise ConfigError(where, f"{module.name!r} is not declared{why}; add a [space.{module.name}] table")


def _build_net(config: RunConfig, splits: Splits) -> HyperNet:
    assert config.model is not None
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
        # a built-in model's message starts with the argument it refuses ("dropout needs 3 entries ...")
        first = str(err).split(" ", 1)[0]
        raise ConfigError(f"model.{first}" if first in config.model.kwargs() else "model", str(err)) from None
    _check_dropouts(model, space, "model.dropout")
    return _hypernetize(config, model, space)


def _hypernetize(config: RunConfig, model: torch.nn.Module, space: Any, batch_dim: int = 0) -> HyperNet:
    form = get_algorithm(config.method).form or "delta"
    try:
        return hypernetize(model, space, form=form, init_scale=config.tuner.init_scale,
                           encoding=config.tuner.encoding, batch_dim=batch_dim)
    except (TypeError, LookupError) as err:
        raise ConfigError("model", str(err).strip("'\"")) from None


def prepare(config: RunConfig) -> Prepared:
    """Load data and build the model and tuner the config describes.

    Raises:
        ConfigError: anything the schema alone could not check (dataset and model names, model
            arguments, references to undeclared hyperparameters, missing data packages).
    """
    if config.task is not None:
        return _prepare_task(config)
    d = config.data
    assert d is not None
    try:
        splits = load_dataset(d.name, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                              train_subset=d.train_subset, test_subset=d.test_subset, val_subset=d.val_subset,
                              split_seed=d.split_seed, seq_len=d.seq_len)
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
    tuner.check_data(splits.test, "test")  # scored at the end: a bad label fails now, not after training
    tuner.check_schedule(config.epochs)  # a scheduler that fails within the run: before it is recorded
    return Prepared(config, tuner, splits.test, {"name": splits.name, **splits.sizes(), **_code(config)},
                    kind=splits.kind)


def _code(config: RunConfig) -> dict[str, str]:
    """``{"code": digest}`` of the user's code a run trains with, a task file and the modules beside it and
    a ``tuner.optimizer`` of the user's (:func:`~selftune.task.module_digest`; ``{}`` for none): a benchmark
    keeps an earlier run only where it is unchanged."""
    from .task import module_digest

    sources = ([config.task.source] if config.task is not None else []) + \
        ([config.tuner.optimizer] if ":" in config.tuner.optimizer else [])
    return {"code": hashlib.sha1("\0".join(module_digest(s) for s in sources).encode()).hexdigest()} if sources else {}


def _prepare_task(config: RunConfig) -> Prepared:
    """Build a user's task: call its function after seeding PyTorch's, NumPy's and Python's generators from
    the run's seed (its model's init and any split it draws follow the seed), convert its model and hand its
    data, loss and metrics to the tuner."""
    from .task import call_task, data_digest, seed_task_generators, source_digest

    assert config.task is not None
    device = config.resolve_device()
    # NumPy's and Python's too: a task that splits its data with np.random.permutation or random.shuffle
    # drew another split in every process (a resume went on with test rows among its training rows)
    seed_task_generators(config.seed)
    task = call_task(config.task.source, config.task.args)
    if task.test is None:
        raise ConfigError("task.source", "the task returns no test data (Task.test); every method is scored on "
                                         "the same held-out test split, so return one")
    space = config.build_space()
    _check_dropouts(task.model, space, "space", task.space if config.space and task.space is not None else None)
    net = _hypernetize(config, task.model, space, task.batch_dim)
    objective = config.build_objective()  # its own errors name their fields (an empty weight_decay table)
    try:
        objective = replace(objective, loss=task.loss)
    except ConfigError as err:
        if err.field == "objective.label_smoothing":
            raise ConfigError(err.field, "applies to the default cross-entropy only, and the task has its own "
                                         "loss; remove it or smooth inside the loss") from None
        if err.field == "loss":  # the task's loss (Task.loss), not a setting of the config
            raise ConfigError("task.source", f"Task.loss {err.message}") from None
        raise
    try:
        tuner = SelfTuner(net, task.train, task.val, method=config.method, settings=config.tuner,
                          objective=objective,
                          augment=config.build_augment(), seed=config.seed, device=device, metrics=task.metrics,
                          input_key=task.input_key, target_key=task.target_key)
    except ValueError as err:
        if isinstance(err, SelftuneError):
            raise
        raise ConfigError("task", str(err)) from None
    tuner.check_data(task.test, "test")  # scored at the end: a bad label fails now, not after training
    tuner.check_schedule(config.epochs)  # a scheduler that fails within the run: before it is recorded
    sizes = {"train": tuner.n_train, "val": tuner.n_val, "test": len(as_dataset(task.test, "test"))}
    info = {"name": task.name, **sizes, "source": config.task.source, "sha256": source_digest(config.task.source),
            **_code(config), "values": data_digest({"train": task.train, "val": task.val, "test": task.test})}
    if tuner.settings.drop_last != config.tuner.drop_last:  # the task's DataLoader drops: record what ran
        config = config.model_copy(update={"tuner": tuner.settings})
    return Prepared(config, tuner, task.test, info)


def _to_device(splits: Splits, device: str) -> Splits:
    moved = {k: TensorDataset(*(t.to(device) for t in getattr(splits, k).tensors)) for k in ("train", "val", "test")}
    return replace(splits, **moved)


def versions() -> dict[str, str]:
    """The selftune, PyTorch and Python versions a result records (a benchmark keeps an earlier run only
    when they match: another PyTorch rounds differently), and a digest of selftune's own source: a checkout
    trains differently after a pull that leaves the version number as it was."""
    return {"selftune": __version__, "selftune_source": _source_digest(), "torch": str(torch.__version__),
            "python": platform.python_version()}


@functools.cache
def _source_digest() -> str:
    package = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def evaluate_run(prepared: Prepared, fit: FitResult, *, method: str | None = None) -> RunResult:
    """Test and validation quality of ``fit``'s model and everything ``result.json`` records."""
    config = prepared.config
    test, val = prepared.score("test", fit.net), prepared.score("val", fit.net)
    extra: dict[str, Any] = {}
    if fit.kept_epoch is not None:  # what keeping the best epoch changed, for the record (never for a choice)
        same = fit.net is prepared.tuner.net or (fit.kept_epoch == prepared.tuner.epoch
                                                  and prepared.tuner.order.batch == 0)
        last = {"test": test, "val": val} if same else {"test": prepared.score("test"), "val": prepared.score("val")}
        extra = {"kept_epoch": fit.kept_epoch, "last": {"epoch": prepared.tuner.epoch, **last}}
    if prepared.tuner.log.start:  # the values and rate of step 0: a schedule rebuilt from the store starts there
        extra["start"] = {k: float(v) for k, v in prepared.tuner.log.start.items()}
    if prepared.tuner.last_lr is not None:  # the last step's rate: the schedule's last row holds to it
        extra["end"] = {"weights_lr": prepared.tuner.last_lr}
    from .explain import explain

    return RunResult(method=method or config.method, seed=config.seed, hparams=fit.hparams, test=test, val=val,
                     explanation=explain(prepared.tuner, kept_epoch=fit.kept_epoch, kept_values=fit.hparams),
                     extra=extra,
                     compute=dict(fit.compute), epochs=config.epochs,
                     data=dict(prepared.data),
                     config=config.model_dump(mode="json"),
                     versions=versions())


def execute(prepared: Prepared, callbacks: list[Callback] | None = None) -> tuple[FitResult, RunResult]:
    """Train and evaluate without recording (a search trial); returns the fit and its result."""
    fit = prepared.tuner.fit(prepared.config.epochs, callbacks=callbacks or [])
    return fit, evaluate_run(prepared, fit)


def default_out(config_name: str, method: str, run_uuid: str) -> Path:
    """``runs/<config>-<method>-<uuid prefix>``: unique per run, so no run replaces another's outputs."""
    return Path("runs") / f"{config_name}-{method}-{run_uuid[:8]}"


# ----------------------------------------------------------------------------------------------
# Runs recorded in the store, checkpointed as they go, resumable after a crash or a signal
# ----------------------------------------------------------------------------------------------
class _Signals:
    """SIGINT/SIGTERM ask the tuner to stop after the current step; a second one acts as usual."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.tuner: SelfTuner | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self.tuner is not None:
            self.tuner.request_stop()
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)


@contextmanager
def _stop_on_signals() -> Iterator[_Signals]:
    caught = _Signals()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield caught
        return
    old = {s: signal.signal(s, caught) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def recorded_meaning(raw: dict[str, Any]) -> dict[str, Any]:
    """A recorded config, with the defaults it was recorded under made explicit.

    Records are full dumps, so a key missing from one marks a run recorded before that setting
    existed. Runs recorded before ``tuner.encoding`` fed their gates the ``"mip"`` encoding and trained
    their response at ``lr`` (``response_lr = None`` meant ``lr`` then): a resume must rebuild that net,
    not today's default, or its checkpoint would not load and its rates would change mid-run.
    """
    tuner = raw.get("tuner")
    if not isinstance(tuner, dict):
        return raw
    original = tuner
    if "encoding" not in tuner:
        tuner = {**tuner, "encoding": "mip"}
        if tuner.get("response_lr") is None and "lr" in tuner:
            tuner["response_lr"] = tuner["lr"]
    # A number in tuner.momentum has only ever reached SGD; runs recorded before another optimizer refused
    # it trained without it, so it becomes the default that refusal lets pass (training is the same).
    momentum, optimizer = tuner.get("momentum"), tuner.get("optimizer", "sgd")
    if isinstance(momentum, int | float) and not isinstance(momentum, bool) and isinstance(optimizer, str):
        from .settings import DEFAULT_MOMENTUM, optimizer_class

        try:
            ignored = optimizer_class(optimizer) is not torch.optim.SGD
        except ValueError:  # an unknown optimizer: validation says so
            ignored = False
        if ignored:
            tuner = {**tuner, "momentum": DEFAULT_MOMENTUM}
    # optimizer_args.weight_decay, and SGD's optimizer_args.momentum, replaced tuner.weight_decay and
    # tuner.momentum before they were refused: the run trained on them, so they move there.
    args = tuner.get("optimizer_args")
    if isinstance(args, dict):
        sgd = str(optimizer).lower() == "sgd"
        moved = {k: args[k] for k in ("weight_decay", "momentum") if k in args and (k == "weight_decay" or sgd)}
        if moved:
            tuner = {**tuner, **moved, "optimizer_args": {k: v for k, v in args.items() if k not in moved}}
    return raw if tuner is original else {**raw, "tuner": tuner}


class RecordedRun:
    """One run of a store, driven by this process: its row (held under a lease), its checkpoint
    folder (named by the run's UUID, unique across stores) and its output folder.

    Build it with :meth:`start` (a new run) or :meth:`reopen` (resume), then :meth:`drive`.
    """

    def __init__(self, store: Any, run_id: int, run_uuid: str, out: Path, checkpoint_dir: Path) -> None:
        self.store, self.run_id, self.uuid = store, run_id, run_uuid
        self.out, self.checkpoint_dir = out, checkpoint_dir
        self.notes: list[str] = []  # what a resume had to work around (shown to the user)
        #: the checkpoint interval the newest usable checkpoint was written at (``None``: unknown)
        self.checkpointing: dict[str, Any] | None = None
        #: the folders this process made for the output folder, itself first, then the parents it needed (a
        #: failed run may then remove them, empty)
        self.created_dirs: list[Path] = []

    @classmethod
    def start(cls, store: Any, config: RunConfig, *, out: str | Path | None = None,
              checkpoint_root: str | Path = "checkpoints", overwrite: bool = False, method: str | None = None,
              name: str = "run") -> RecordedRun:
        """Claim ``out`` (default :func:`default_out`) and create the run's row, holding its lease.

        Raises:
            OutputError: ``out`` holds files that are not this run's (and ``overwrite`` is false).
            StoreError: the store refused the row.
        """
        run_uuid = uuidlib.uuid4().hex
        out = Path(out) if out is not None else default_out(name, method or config.method, run_uuid)
        claim_folder(out, run_uuid, overwrite=overwrite)
        if overwrite:
            _refuse_a_live_owner(store, out)
        checkpoint_root = Path(checkpoint_root)
        for folder, option in ((checkpoint_root, "--checkpoint-dir"), (out, "--out")):
            check_writable(folder, option)
        run_id = store.create_run(method=method or config.method, seed=config.seed,
                                  config=config.model_dump(mode="json"), out_dir=str(out.resolve()),
                                  checkpoint_root=str(checkpoint_root.resolve()), uuid=run_uuid)
        run = cls(store, run_id, run_uuid, out, Path(store.get_run(run_id).checkpoint_dir))
        # Reserve the folder now: its marker names this run, so a later run cannot take it silently,
        # and this run (or its resume) may write there at the end without --overwrite.
        try:
            missing, probe = [], out.absolute()
            while not probe.exists() and probe.parent != probe:
                missing.append(probe)
                probe = probe.parent
            for folder in reversed(missing):  # one level at a time: only those this process made are its own
                try:
                    folder.mkdir()
                    run.created_dirs.insert(0, folder)
                except FileExistsError:  # (another process made it meanwhile: not ours to remove)
                    pass
            out.mkdir(parents=True, exist_ok=True)
            mark_folder(out, run_uuid, run_id, store.display_url)
        except OSError as err:
            run._record(store.fail, f"cannot write to {out}: {err.strerror}")
            for folder in run.created_dirs:  # (made before the marker failed: removed again, while empty)
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise OutputError(f"--out: cannot write to {str(out)!r} ({err.strerror}); choose a writable "
                              "folder") from None
        return run

    @classmethod
    def reopen(cls, store: Any, run_id: int, *, force: bool = False) -> tuple[RecordedRun, RunConfig]:
        """Take the lease of run ``run_id`` to resume it; returns the run and its config.

        Raises:
            LookupError: no such run.
            LeaseError: it finished, or another process drives it.
        """
        info = store.acquire(run_id, force=force)
        run = cls(store, run_id, info.uuid, Path(info.out_dir), Path(info.checkpoint_dir))
        try:
            # The folder must still be this run's (or gone/empty): a resume never takes another's.
            claim_folder(run.out, run.uuid, option=f"run {run_id}'s output folder",
                         fix="move those files (or the folder) elsewhere, then resume: the run writes its "
                             "outputs there when it finishes")
            config = parse_config(recorded_meaning(info.config))
        except ConfigError as err:
            run._record(store.interrupt, f"resume refused: {err}")
            raise ResumeError(f"run {run_id}: its recorded config no longer validates here ({err})") from None
        except OutputError:
            run._record(store.interrupt, "resume refused: its output folder holds another run's files")
            raise
        return run, config

    def restore(self, tuner: SelfTuner, data: dict[str, Any] | None = None) -> int:
        """Load the newest intact checkpoint of this run into ``tuner`` and rewind the store to it;
        returns its step (-1: none usable, the run starts over). A truncated or foreign newest
        file is skipped with a note, and the previous one is used. ``data`` (what the run is built on
        now, ``Prepared.data``) against the checkpoint's: an edited task file or another split gets a
        note, because the resumed run no longer ends where the uninterrupted one would have."""
        listed = self.store.checkpoints(self.run_id)
        missing = 0
        for step, epoch, path in reversed(listed):
            try:
                saved = torch.load(path, weights_only=True)
            except FileNotFoundError:
                missing += 1
                continue  # pruned long ago: only the newest files are kept
            except Exception as err:  # a torn or corrupt file: any unpickling error
                self.notes.append(f"checkpoint {path} is unreadable ({type(err).__name__}); trying an older one")
                continue
            if isinstance(saved, dict) and "run_uuid" not in saved and "net" in saved:
                self.notes.append(f"checkpoint {path} was written by an older selftune, which did not record "
                                  "which run a checkpoint belongs to; it cannot be verified and is not used")
                continue
            if not isinstance(saved, dict) or saved.get("run_uuid") != self.uuid:
                self.notes.append(f"checkpoint {path} belongs to another run; trying an older one")
                continue
            try:
                tuner.load_state_dict(saved["tuner"])
            except (RuntimeError, KeyError, ValueError) as err:  # another model, space or optimizer than saved it
                raise ResumeError(f"run {self.run_id}: its checkpoint does not fit the model and tuner built now "
                                  f"({_first_line(err)}); the task's code or data changed since the run started? "
                                  "Restore it, or start a new run") from None
            self.store.rewind(self.run_id, step, epoch, divergences=tuner.divergences)
            self.checkpointing = saved.get("checkpointing")  # absent in checkpoints before stop 27
            self._compare_data(saved.get("data"), data)  # absent before stop 28
            return step
        if listed and missing == len(listed):  # starting over would rewind every recorded epoch away
            last_step, _, last = listed[-1]
            raise ResumeError(f"run {self.run_id}: the store lists {len(listed)} checkpoints (the last at step "
                              f"{last_step}), but none of their files is left ({Path(last).parent} moved or "
                              "deleted?); restore them to continue, or start a new run")
        self.store.rewind(self.run_id, -1, 0, divergences=0)
        if self.notes:
            self.notes.append("no usable checkpoint of this run is left: it starts over from step 0")
        return -1

    def _compare_data(self, saved: dict[str, Any] | None, now: dict[str, Any] | None) -> None:
        if not saved or not now:
            return
        file = str(now.get("source", "")).rpartition(":")[0] or now.get("source")
        if saved.get("sha256") and now.get("sha256") and saved["sha256"] != now["sha256"]:
            self.notes.append(f"the task file {file} changed since this run's checkpoint was written "
                              "(its sha256 differs): the run goes on with the file as it is now, so it no longer "
                              "ends where the uninterrupted run would have; restore the file to continue the "
                              "same run")
        elif saved.get("code") and now.get("code") and saved["code"] != now["code"]:
            # a helper module beside the task file (from helpers import make_model), or an optimizer of the
            # user's: the same model shapes load, so only this says the code is not the code that trained
            self.notes.append("the code beside the task changed since this run's checkpoint was written (a module "
                              f"next to {file or 'the task'}, or a tuner.optimizer of yours): the run goes on with "
                              "the code as it is now, so it no longer ends where the uninterrupted run would have; "
                              "restore it to continue the same run")
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in ("train", "val", "test")
                   if k in saved and k in now and saved[k] != now[k]]
        code_changed = any(saved.get(k) and now.get(k) and saved[k] != now[k] for k in ("sha256", "code"))
        if changed:
            self.notes.append(f"the data changed since this run's checkpoint was written ({', '.join(changed)} "
                              "examples): the run goes on with the data as it is now")
        elif not code_changed and saved.get("values") and now.get("values") and saved["values"] != now["values"]:
            self.notes.append("the data's values changed since this run's checkpoint was written (the splits are "
                              "the same sizes: a data file the task reads was edited?): the run goes on with the "
                              "data as it is now, so it no longer ends where the uninterrupted run would have")

    def drive(self, prepared: Prepared, *, every: int | None = 100,
              callbacks: list[Callback] | None = None) -> RunResult:
        """Train to the end (checkpointing every ``every`` steps and at epoch ends; ``None``: only at
        the end), write the outputs and mark the run finished.

        Raises:
            Interrupted: SIGINT/SIGTERM arrived; a checkpoint was written and the run is ``interrupted``.
            DivergenceError: the run diverged too often; it is marked ``failed``.
        """
        from .store import StoreRecorder

        config, tuner = prepared.config, prepared.tuner
        recorder = StoreRecorder(self.store, self.run_id, self.checkpoint_dir, run_uuid=self.uuid,
                                 every=every or 2**62, at_epoch_end=every is not None, epoch_gap_s=EPOCH_GAP_S,
                                 data={**prepared.data, "versions": versions()})
        if tuner.counters.steps == 0 and self.checkpointing is None:
            # the interval decides the roll-back points, so a resume must keep it; a run killed before its first
            # checkpoint has none to read it from (it resumed at the default 100, and ended elsewhere)
            self.store.add_event(self.run_id, step=0, kind=CHECKPOINTING_EVENT,
                                 message="only at the end" if every is None else "at epoch ends" if not every
                                 else f"every {every} steps and at epoch ends")
        try:
            with _stop_on_signals() as caught, _heartbeat(self.store, self.run_id):
                caught.tuner = tuner
                fit = tuner.fit(config.epochs, callbacks=[*(callbacks or []), recorder])
                if tuner.epoch < config.epochs:  # stopped early: by a signal, or by a callback's request_stop
                    cause = signal.Signals(caught.signum).name if caught.signum is not None else "a callback"
                    message = (f"run {self.run_id} interrupted by {cause} at step {tuner.counters.steps} "
                               "(checkpoint saved)")
                    self.store.interrupt(self.run_id, message)
                    raise Interrupted(f"{message}; resume with: selftune resume {self.run_id}"
                                      f"{_store_hint(self.store)}", caught.signum)
                result = evaluate_run(prepared, fit, method=self.store.get_run(self.run_id).method)
                done = self.complete(fit, result)
                if caught.signum is not None:  # after the last step (scoring, writing): the run is whole, the
                    name = signal.Signals(caught.signum).name  # command stops (a bench went on through the rest)
                    raise Interrupted(f"run {self.run_id} finished before {name} could stop it (its results are "
                                      f"recorded: selftune show {self.run_id}{_store_hint(self.store)}); stopped",
                                      caught.signum)
                return done
        except (Interrupted, LeaseError):
            raise  # recorded as interrupted already / the run is someone else's now
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, from the last checkpoint
            message = f"run {self.run_id} stopped by a second SIGINT; it continues from its last checkpoint"
            self._record(self.store.interrupt, message)
            raise Interrupted(f"{message}: selftune resume {self.run_id}{_store_hint(self.store)}",
                              signal.SIGINT) from None
        except OSError as err:  # a full disk or an unwritable folder while checkpointing or writing outputs
            where = f" ({err.filename})" if err.filename else ""
            message = f"run {self.run_id} could not write a file{where}: {err.strerror or err}"
            self._record(self.store.interrupt, message)
            raise OutputError(f"{message}; free space or fix permissions, then selftune resume {self.run_id}"
                              f"{_store_hint(self.store)}") from None
        except OutputError as err:  # its folder was taken while it trained: the training is in its last checkpoint
            self._record(self.store.interrupt, f"outputs not written: {err}")
            raise OutputError(f"{err}, then selftune resume {self.run_id}{_store_hint(self.store)} (it writes its "
                              "outputs from its last checkpoint)") from None
        except BaseException as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            self._record(self.store.fail, f"{type(err).__name__}: {message}")
            self._release_folder()
            raise

    def _release_folder(self) -> None:
        """Give back the output folder a failed run claimed and wrote nothing into: its marker alone blocked
        the obvious next step (the same command with a lower rate and the same ``--out``), calling the
        folder another run's outputs. Only the marker goes, and the folder with it (and the parents made for
        it) when this process made it and nothing else is there; a resume of the run writes its outputs
        there as it would have."""
        from .outputs import MARKER, read_marker

        try:
            marker = read_marker(self.out)
            if marker is None or marker.get("run_uuid") != self.uuid or \
                    [p.name for p in self.out.iterdir()] != [MARKER]:
                return
            (self.out / MARKER).unlink()
            for folder in self.created_dirs:  # the output folder, then the parents made for it, while empty
                folder.rmdir()
        except OSError:  # (a folder that cannot be read or changed, or is not empty, stays: nothing is lost)
            pass

    def _record(self, action: Any, message: str) -> None:
        """Record how the run ended, unless the store itself is what failed (the original error wins)."""
        try:
            action(self.run_id, message)
        except SelftuneError:
            pass

    def save(self, tuner: SelfTuner) -> None:
        """One checkpoint of ``tuner`` committed with its rows (a run recorded after the fact: PBT)."""
        from .store import StoreRecorder

        StoreRecorder(self.store, self.run_id, self.checkpoint_dir, run_uuid=self.uuid).checkpoint(tuner)

    def complete(self, fit: FitResult, result: RunResult) -> RunResult:
        """Write the outputs of a finished run and mark it finished in the store."""
        result.run_id, result.run_uuid = self.run_id, self.uuid
        self.store.heartbeat(self.run_id)  # raises LeaseError if another process took the run over
        write_outputs(self.out, fit, result, store=self.store.display_url)
        self.store.finish(self.run_id, result.to_json())
        return result


def check_writable(folder: Path, option: str) -> None:
    """Refuse a folder that cannot be written (or created) before the run starts, not hours in; nothing is
    created: the folder, if missing, is made when something is written there."""
    try:
        probe = folder
        while not probe.exists():
            if probe.is_symlink():
                raise OutputError(f"{option}: {str(probe)!r} is a link to {str(probe.readlink())!r}, which does "
                                  "not exist; choose another folder, or create its target")
            if probe.parent == probe:
                break
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise OutputError(f"{option}: {str(probe)!r} is a file, not a folder; choose a folder path")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:  # no permission to look, a name too long, a read-only file system
        shown = repr(str(folder)) if len(str(folder)) <= 80 else f"{str(folder)[:80]!r}..."
        raise OutputError(f"{option}: cannot write to {shown} ({err.strerror or err}); choose a writable "
                          "folder") from None


@contextmanager
def _heartbeat(store: Any, run_id: int, every_s: float = 10.0) -> Iterator[None]:
    """Beat the run's heartbeat from a thread while this process drives it, so evaluation, output
    writing or a slow epoch never make a live run look stale (and never let --force take it)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            try:
                store.heartbeat(run_id)
            except SelftuneError:
                return  # lost the lease or the store: the driving thread finds out at its next write

    thread = threading.Thread(target=beat, name=f"selftune-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split())
    return f"{type(err).__name__}: {text[:200]}"


def _store_hint(store: Any) -> str:
    """`` --store URL`` for a printed command, ready to paste from any folder: quoted for the shell, a
    relative SQLite path made absolute (also the default store's, which is relative to the working folder);
    empty only where the URL is the default and absolute already."""
    from .store import resolve_url

    url = store.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not url.database.startswith("file:") and not Path(url.database).is_absolute():
        url = url.set(database=str(Path(url.database).expanduser().absolute()))
    shown = unquote(url.render_as_string(hide_password=True))  # as the store shows it (display_url)
    if shown == resolve_url(None) and Path(url.database or "").is_absolute():
        return ""
    return f" --store {shlex.quote(shown)}"


def run_recorded(prepared: Prepared, store: Any, *, out: str | Path | None = None,
                 checkpoint_root: str | Path = "checkpoints", every: int | None = 100,
                 callbacks: list[Callback] | None = None, overwrite: bool = False, name: str = "run") -> RunResult:
    """Run a prepared config as a new run of ``store``. ``every``: steps between checkpoints (plus one
    per epoch end); ``None``: only a final checkpoint (benchmarks, where checkpoint I/O would skew times)."""
    run = RecordedRun.start(store, prepared.config, out=out, checkpoint_root=checkpoint_root, overwrite=overwrite,
                            name=name)
    return run.drive(prepared, every=every, callbacks=callbacks)


#: Seconds an epoch end's checkpoint waits after the last one (StoreRecorder.epoch_gap_s): the diabetes MLP's 150
#: epochs of 5 steps trained in 2.3 s and checkpointed for 1.6 s more at every epoch end.
EPOCH_GAP_S = 2.0

#: the event a run records when it starts: its checkpoint interval, for a resume before its first checkpoint
CHECKPOINTING_EVENT = "checkpointing"


def _recorded_interval(store: Any, run_id: int) -> dict[str, Any] | None:
    """The checkpoint interval a run recorded when it started (:data:`CHECKPOINTING_EVENT`), or ``None``."""
    events = [e for e in store.events(run_id) if e["kind"] == CHECKPOINTING_EVENT]
    if not events:
        return None
    message = events[-1]["message"]
    found = re.fullmatch(r"every (\d+) steps and at epoch ends", message)
    if found:
        return {"every": int(found[1]), "at_epoch_end": True}
    return {"every": 2**62, "at_epoch_end": message == "at epoch ends"}


def resume_recorded(store: Any, run_id: int, *, every: int | None = None, callbacks: list[Callback] | None = None,
                    force: bool = False, notes: list[str] | None = None,
                    prepared: Prepared | None = None) -> RunResult:
    """Continue run ``run_id`` from its newest intact checkpoint (from the start if it has none).
    What the resume had to work around (a torn newest checkpoint, ...) goes to ``notes``, or is
    issued as warnings when ``notes`` is None. ``every``: steps between checkpoints; ``None`` keeps the
    interval the run checkpointed at (roll-backs return to checkpoints, so another interval can change
    the result), 100 for a run without a checkpoint to read it from.

    Raises:
        LookupError: no such run.
        LeaseError: the run finished, or another process drives it (``force`` takes over a stale one).
        ConfigError: the run's config no longer builds here (a missing data package, ...).

    ``prepared``: the run's config already prepared by the caller (a benchmark that compared it with the
    run's record), used instead of a second model and dataset on the device when its config is the run's.
    """
    run, config = RecordedRun.reopen(store, run_id, force=force)
    if prepared is not None and prepared.config.model_dump(mode="json") != config.model_dump(mode="json"):
        prepared = None
    try:
        prepared = prepared or prepare(config)
        run.restore(prepared.tuner, prepared.data)
    except SelftuneError as err:
        store.interrupt(run_id, f"resume failed: {err}")
        raise
    finally:
        for note in run.notes:
            notes.append(note) if notes is not None else warnings.warn(note, stacklevel=2)
    if every is None:
        recorded = run.checkpointing or _recorded_interval(store, run_id) or {"every": 100, "at_epoch_end": True}
        every = int(recorded["every"]) if recorded.get("at_epoch_end", True) else None
    return run.drive(prepared, every=every, callbacks=callbacks)


#: What the store calls a run that re-trains on another run's schedule (its config's method is ``fixed``).
REPLAY = "replay"


def _refuse_a_live_owner(store: Any, out: Path) -> None:
    """``--overwrite`` replaces selftune's files, but never those of a run of this store that is training:
    it would write there at its end, find the folder taken and stop (resumable, but with a folder to clear)."""
    from .outputs import read_marker

    marker = read_marker(out)
    if not marker or marker.get("store") != store.display_url or not isinstance(marker.get("run_id"), int):
        return
    holder = store.driver(marker["run_id"])
    if holder is not None and store.get_run(marker["run_id"]).uuid == marker.get("run_uuid"):
        raise OutputError(f"--out: folder {str(out)!r} holds the outputs of run {marker['run_id']}, which {holder} "
                          "is training now; choose another folder, or wait for it to end")


def recorded_schedule(store: Any, run_id: int, *, replay: bool = True) -> tuple[RunConfig, HyperSchedule]:
    """A finished run's config and the schedule its hyperparameters followed, from the store alone.

    ``replay``: for a replay, which keeps the run's own learning-rate schedule where nothing tuned or
    lowered the rate (exact at every step), the schedule holds no rates then; ``False`` keeps the recorded
    rates, as the run's own ``schedule.csv`` (``selftune report``).

    Raises:
        LookupError: no such run.
        ConfigError: the run has not finished (its schedule would end early), or recorded no steps.
    """
    info = store.get_run(run_id)
    if info.status != "finished":
        raise ConfigError("RUN", f"run {run_id} is {info.status}; only a finished run's schedule can be replayed"
                                 + (f" (selftune resume {run_id}{_store_hint(store)} first)"
                                    if info.status == "interrupted" else ""))
    config = parse_config(recorded_meaning(info.config))
    trajectory = store.trajectory(run_id)
    steps = int((info.result or {}).get("compute", {}).get("steps", 0))
    # the run's own start (a value pulled off its bound, a tuned rate's first step), recorded with its result
    # since stop 27; before, each init, which differs there
    recorded = (info.result or {}).get("start")
    start = recorded or {n: h.init for n, h in config.space.items()}
    end = ((info.result or {}).get("end") or {}).get("weights_lr")  # recorded since stop 31
    t = config.tuner
    diverged = any(e["kind"] == "divergence" for e in store.events(run_id))
    # A rate nothing tuned, lowered or fitted to the run's own validation losses is its schedule's
    # (tuner.lr_scheduler, [tuner.schedule]) at every step: a replay keeps that schedule, exact, rather than the
    # recorded rates, which are sampled every log_every steps and miss a change between rows.
    own_rate = replay and not isinstance(t.lr, str) and not diverged and \
        (t.lr_scheduler or "").lower() != "reducelronplateau"
    if not trajectory:
        # its values (or rate) moved between unrecorded rows: the start alone would replay another run. One where
        # nothing moved at any epoch's end nor at its last step (a run of fixed values, one a warm-up covered) has
        # the start for its whole schedule, as the run's own schedule.csv says (the kept epoch of keep = "best"
        # is one of those rows, not the last step).
        rows = store.epochs(run_id)  # a finished run's last row is its last step
        if not recorded or not rows or not all(
                stayed(recorded, row, None if own_rate else row.get("weights_lr")) for row in rows):
            raise ConfigError("RUN", f"run {run_id} recorded no trajectory rows ({steps} steps, fewer than "
                                     f"tuner.log_every = {config.tuner.log_every}) and its values or rate moved, "
                                     "so its schedule is unknown; run it again with a smaller tuner.log_every to "
                                     "replay it")
    schedule = HyperSchedule.from_trajectory(start, trajectory,
                                             list(config.space), steps_per_epoch=max(steps // config.epochs, 1),
                                             source=f"run {info.uuid}", end_lr=end)
    if own_rate:
        schedule = schedule.model_copy(update={"lr": None})
    return config, schedule


def replay_config(config: RunConfig, schedule: HyperSchedule, *, seed: int | None = None) -> RunConfig:
    """The config of a ``fixed`` run that re-trains ``config``'s model from scratch on ``schedule``
    (the STN paper's protocol: the tuned schedule, without the best-response layers or hyper steps).
    Same data, model, epochs and optimizer; ``seed`` replaces the training seed (a new seed tells how
    much of the result is the schedule's and how much the initialisation's).

    Raises:
        ConfigError: naming ``tuner.adaptive_batch`` for a run whose batch grew: its schedule is recorded
            by step, and a replay at the starting batch would take other steps.
    """
    if config.tuner.adaptive_batch is not None:
        raise ConfigError("tuner.adaptive_batch", "a run whose batch grew cannot be replayed: its schedule is "
                                                  "recorded by weight step, and a replay at a constant batch takes "
                                                  "other steps; replay runs trained at a constant batch")
    raw = config.model_dump(mode="python")
    raw["method"] = "fixed"
    if schedule.lr is not None:  # the recorded rate already holds what the run's scheduler made of it
        raw["tuner"].update(lr_scheduler=None, lr_scheduler_args={})
    raw["tuner"]["follow"] = schedule.model_dump(mode="python")
    if seed is not None:
        raw["seed"] = seed
    return parse_config(raw)


def replay_recorded(store: Any, run_id: int, *, seed: int | None = None, out: str | Path | None = None,
                    checkpoint_root: str | Path = "checkpoints", every: int | None = 100,
                    callbacks: list[Callback] | None = None, overwrite: bool = False) -> RunResult:
    """Re-train run ``run_id``'s model from scratch on its recorded schedule, as a new run of ``store``
    (listed as ``replay``; its ``tuner.follow.source`` names the run it follows).

    Raises:
        LookupError: no such run.
        ConfigError: the run has not finished, or its config no longer builds here.
    """
    config, schedule = recorded_schedule(store, run_id)
    prepared = prepare(replay_config(config, schedule, seed=seed))
    run = RecordedRun.start(store, prepared.config, out=out, checkpoint_root=checkpoint_root, overwrite=overwrite,
                            method=REPLAY, name=f"run{run_id}")
    return run.drive(prepared, every=every, callbacks=callbacks)
