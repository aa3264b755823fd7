"""The ``selftune`` command line.

``selftune run CONFIG.toml [--method M] [--seed N] [--set key=value ...] [--out DIR] [--overwrite]``
``selftune resume RUN`` | ``selftune replay RUN`` | ``selftune runs`` | ``selftune show RUN`` | ``selftune report RUN``
| ``selftune bench TASK``

Every command takes ``--store URL`` (default ``$SELFTUNE_STORE`` or ``sqlite:///selftune.db``).

:func:`main` is the one place that turns a :class:`~selftune.errors.SelftuneError` into one line on
stderr and its exit status: 2 for anything refused before a run starts (nothing is written), 1 for a
run that failed after starting, 130/143 for a run stopped by SIGINT/SIGTERM (checkpointed, resumable).
Method names come from the registries (:mod:`selftune.algorithms`, :mod:`selftune.methods`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        command = " ".join(dict.fromkeys(self.prog.split()))  # "selftune" or "selftune run", never doubled
        self.exit(EXIT_USAGE, f"selftune: error: {message} (see `{command} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selftune", description="Tune hyperparameters inside one training run (STN, Delta-STN).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train one model with self-tuned (or fixed) hyperparameters",
                         description="Train the model a config describes and write result.json, model.pt, "
                                     "schedule.csv, trajectory.csv, epochs.csv and plots to --out.")
    run.add_argument("config", help="run config (TOML, see docs/config.md)")
    run.add_argument("--method", help="override the config's method (fixed, stn, delta-stn, ...: see docs/cli.md)")
    run.add_argument("--seed", type=int, help="override the config's seed")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set tuner.lr=0.05 (repeatable)")
    run.add_argument("--out", help="output folder (default: runs/<config>-<method>-<run uuid prefix>, new for "
                                   "every run); an existing non-empty folder is refused unless it holds this "
                                   "run's outputs")
    run.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty --out folder, replacing only selftune's own files there")
    run.add_argument("--compare", metavar="METHOD",
                     help="also train METHOD (e.g. fixed) from the same config and seed, recorded as its own run in "
                          "<out>-METHOD, and print both results side by side: did tuning help?")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--checkpoint-every", type=_positive, default=100, metavar="STEPS",
                     help="steps between checkpoints (also one at an epoch end, unless the last is under 2 s old; "
                          "default 100)")
    run.add_argument("--checkpoint-dir", default="checkpoints",
                     help="folder under which each run's checkpoints go, as DIR/<run uuid>/ (default ./checkpoints)")
    _store_arg(run)

    resume = sub.add_parser("resume", help="continue a run that was interrupted, from its last checkpoint")
    resume.add_argument("run", type=_positive, help="run id (see `selftune runs`)")
    resume.add_argument("--force", action="store_true",
                        help="take over a run whose driver stopped beating its heartbeat but cannot be shown dead "
                             "(another host); a live driver is never taken over")
    resume.add_argument("--quiet", action="store_true", help="no progress bar")
    resume.add_argument("--checkpoint-every", type=_positive, default=None, metavar="STEPS",
                        help="steps between checkpoints (also one at an epoch end, unless the last is under 2 s "
                             "old; default: the run's own "
                             "interval, so the resumed run rolls back where the uninterrupted one would)")
    _store_arg(resume)

    bench = sub.add_parser("bench", help="run several tuning methods on one task at equal accounting of compute",
                           description="Run every method on the same task (splits, model, epochs, space), record "
                                       "them in the store, and write results.json, README.md (table) and "
                                       "loss_vs_compute.png to --out.")
    bench.add_argument("task", nargs="?", help="benchmark task (see docs/cli.md: digits-mlp, adult-mlp, mnist-cnn, "
                                               "ptb-lstm, ...) or a config file (.toml); with --gpu and no task: every "
                                               "paper-scale task")
    bench.add_argument("--methods", nargs="+", metavar="METHOD",
                       help="methods to run (default: every method that can run the task: fixed hd stn delta-stn "
                            "ift delta-ift random tpe tpe-asha pbt; hd only where tuner.lr names a hyperparameter; "
                            "one-pass, grid and the -replay methods when named)")
    bench.add_argument("--trials", type=_positive, default=20, help="trials per search method (default 20)")
    bench.add_argument("--population", type=_at_least_two, default=8,
                       help="members of the PBT population (default 8)")
    bench.add_argument("--seeds", type=_positive, default=3, help="seeds 0..K-1 (default 3)")
    bench.add_argument("--quick", action="store_true",
                       help="4 epochs, at most 3 trials, small training subsets: proves every method runs")
    bench.add_argument("--gpu", action="store_true",
                       help="train on the CUDA device; without a task, run the paper-scale tasks "
                            "(mnist-alexnet, fashion-alexnet, ptb-lstm-650)")
    bench.add_argument("--out", help="output folder (default bench/<task>, bench/<task>-quick with --quick); a "
                       "non-empty folder that is not a "
                                     "benchmark's is refused unless --overwrite")
    bench.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --out folder, replacing only the benchmark's own files")
    bench.add_argument("--fresh", action="store_true",
                       help="train every single run anew; by default a bench run again in its folder keeps the runs "
                            "an earlier one finished there (same config, data and versions) and resumes the one it "
                            "was training (searches continue their studies either way)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the task's config for every method and start, e.g. --set "
                            "tuner.lr_signal=val (repeatable; the table's README names them)")
    _store_arg(bench)

    replay = sub.add_parser(
        "replay", help="re-train a finished run's model from scratch on the schedule it tuned (plain training)",
        description="Re-train a finished run's model from scratch with method fixed, following the hyperparameter "
                    "schedule (and weights' learning rate) the run recorded, as in the STN paper's protocol. The "
                    "replay is a new run of the store, listed as `replay`; its cost adds to the tuning run's.")
    replay.add_argument("run", type=_positive, help="id of the finished run whose schedule is replayed")
    replay.add_argument("--seed", type=int, help="training seed of the replay (default: the run's own)")
    replay.add_argument("--out", help="output folder (default: runs/run<RUN>-replay-<uuid>)")
    replay.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing only selftune's own files")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.add_argument("--checkpoint-every", type=_positive, default=100, metavar="STEPS",
                        help="steps between checkpoints (also one at an epoch end, unless the last is under 2 s old; "
                          "default 100)")
    replay.add_argument("--checkpoint-dir", default="checkpoints",
                        help="where the replay's checkpoints go, as DIR/<run uuid>/ (default ./checkpoints)")
    _store_arg(replay)
    runs = sub.add_parser("runs", help="list the runs in the store")
    _store_arg(runs)
    show = sub.add_parser("show", help="print one run: config, status, result, events")
    show.add_argument("run", type=_positive, help="run id (see `selftune runs`)")
    _store_arg(show)
    report = sub.add_parser("report", help="rebuild a run's plots and CSV files from the store alone")
    report.add_argument("run", type=_positive, help="run id (see `selftune runs`)")
    report.add_argument("--out", help="folder for the report (default: the run's output folder)")
    report.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder that is not this run's, replacing only these files")
    _store_arg(report)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _at_least_two(text: str) -> int:
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 2 (a population needs someone to copy)")
    return value


def _store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="SQLAlchemy URL of the run store (default: $SELFTUNE_STORE or "
                                        "sqlite:///selftune.db)")


def _open_store(url: str | None, *, create: bool = True):
    """The run store; read-only commands pass ``create=False`` so they never create a file or a table."""
    from .store import RunStore

    return RunStore(url, create=create)


def _get_run(store, run_id: int):
    from .errors import ConfigError

    try:
        return store.get_run(run_id)
    except LookupError as err:
        raise ConfigError("RUN", str(err).strip("'\"")) from None


def _progress(args: argparse.Namespace) -> list:
    from .callbacks import ProgressBar

    return [] if args.quiet else [ProgressBar()]


def _quality(scores: dict) -> str:
    """``loss 0.1234  accuracy 0.9700`` (and the task's own metrics; no accuracy where it means nothing)."""
    return "  ".join(f"{k} {v:.4f}" for k, v in scores.items())


def _wrote(run_id: int, out: Path, tuner: Any) -> None:
    """Say which files the run wrote: a run shorter than ``log_every`` steps whose values moved has no schedule."""
    files = ["result.json", "model.pt", *(["schedule.csv"] if tuner.schedule() is not None else []),
             "trajectory.csv", "epochs.csv", "trajectory.png", "losses.png"]
    print(f"run {run_id}: wrote {out}/{', '.join(files)}")
    if "schedule.csv" not in files:
        print(f"selftune: note: schedule.csv not written: the run took fewer steps ({tuner.counters.steps}) than "
              f"tuner.log_every ({tuner.settings.log_every}), so the schedule it followed was never recorded; lower "
              "tuner.log_every to record it", file=sys.stderr)


def _summary(result) -> None:
    print("hyperparameters: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in result.hparams.items()))
    print(f"test {_quality(result.test)}  ({result.compute['seconds']:.1f} s, {result.compute['examples']} examples)")
    for line in result.explanation:
        print(f"  {line}")


def _run(args: argparse.Namespace) -> int:
    from .algorithms import ALGORITHMS
    from .config import load_config
    from .errors import ConfigError, Interrupted
    from .outputs import claim_folder
    from .runner import prepare

    for option, method in (("--method", args.method), ("--compare", args.compare)):
        if method is not None and method not in ALGORITHMS:
            raise ConfigError(option, f"unknown method {method!r}; choose one of {list(ALGORITHMS)}")
    config = load_config(args.config, args.overrides)
    if args.method is not None or args.seed is not None:
        config = config.derive(method=args.method, seed=args.seed)
    if args.compare == config.method:
        raise ConfigError("--compare", f"the run already uses {config.method!r}; compare with another method "
                                       "(e.g. --compare fixed)")
    prepared = prepare(config)
    baseline = config.derive(method=args.compare) if args.compare else None
    # the comparison is built now too: a method that cannot run this config is refused before the main run
    prepared_baseline = prepare(baseline) if baseline is not None else None
    # refused before the store is opened (or created): nothing written
    from .runner import check_writable

    if args.out is not None:
        claim_folder(args.out, "", overwrite=args.overwrite)
        check_writable(Path(args.out), "--out")
        if baseline is not None:
            claim_folder(_beside(args.out, args.compare), "", overwrite=args.overwrite)
    else:
        check_writable(Path("runs"), "--out")
    check_writable(Path(args.checkpoint_dir), "--checkpoint-dir")
    store = _open_store(args.store)
    try:
        result, out = _recorded_run(args, prepared, store)
    except Interrupted as err:
        if baseline is None:
            raise
        raise Interrupted(f"{err}; the --compare {args.compare} run has not started: once this one is finished, "
                          f"train it with selftune run {args.config} --method {args.compare} (and the same --set), "
                          "and compare the two with selftune show", err.signum) from None
    if baseline is None:
        return 0
    assert prepared_baseline is not None
    try:
        other, _ = _recorded_run(args, prepared_baseline, store, out=_beside(out, args.compare))
    except Interrupted as err:
        raise Interrupted(f"{err}; then compare it with run {result.run_id} by selftune show", err.signum) from None
    _comparison(result, other)
    return 0


def _recorded_run(args: argparse.Namespace, prepared, store, out: str | None = None):
    from .runner import RecordedRun

    config = prepared.config
    run = RecordedRun.start(store, config, out=out or args.out, checkpoint_root=args.checkpoint_dir,
                            overwrite=args.overwrite, name=Path(args.config).stem)
    sizes = prepared.data
    print(f"selftune {config.method}: {sizes['name']} (train {sizes['train']}, val {sizes['val']}, "
          f"test {sizes['test']}), model {config.model_name}, {config.epochs} epochs, seed {config.seed}; "
          f"run {run.run_id} in {store.display_url}")
    print(f"layers: {prepared.tuner.net.summary()}")
    result = run.drive(prepared, every=args.checkpoint_every, callbacks=_progress(args))
    _summary(result)
    _wrote(result.run_id, run.out, prepared.tuner)
    return result, run.out


def _comparison(tuned, baseline) -> None:
    """Both runs side by side, and what the difference means (one seed is one draw)."""
    print(f"\ncompared on the same data, model, epochs and seed (runs {tuned.run_id} and {baseline.run_id}):")
    unit = baseline.compute["examples"] or 1
    for r in (tuned, baseline):
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.hparams.items())
        print(f"  {r.method:<10} test {_quality(r.test)}  "
              f"{r.compute['examples'] / unit:.2f}x examples  {r.compute['seconds']:.1f} s  ({shown})")
    from .bench.paired import loss_change

    change, relative = loss_change(tuned.test["loss"], baseline.test["loss"])
    verb = "lowers" if change < 0 else "raises" if change > 0 else "leaves"
    by = "" if change == 0 else f" by {abs(change):.1f}%" if relative else f" by {abs(change):.4g}"
    print(f"  {tuned.method} {verb} the test loss{by} against {baseline.method} on this seed; "
          "a single seed is one draw: docs/benchmarks/ gives the spread over seeds")


def _resume(args: argparse.Namespace) -> int:
    from .runner import resume_recorded

    store = _open_store(args.store, create=False)
    info = _get_run(store, args.run)
    if info.status == "finished":  # the store refuses it too, but only after this would say it is resuming
        from .errors import LeaseError

        raise LeaseError(f"run {info.id} already finished; its results are in {info.out_dir}")
    print(f"resuming run {info.id} ({info.method}, seed {info.seed}, {info.status})")
    notes: list[str] = []
    try:
        result = resume_recorded(store, args.run, every=args.checkpoint_every, callbacks=_progress(args),
                                 force=args.force, notes=notes)
    finally:
        for note in notes:
            print(f"selftune: note: {note}", file=sys.stderr)
    _summary(result)
    print(f"run {args.run} finished; wrote {info.out_dir}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .outputs import claim_folder
    from .runner import REPLAY, RecordedRun, prepare, recorded_schedule, replay_config

    store = _open_store(args.store, create=False)
    source = _get_run(store, args.run)
    config, schedule = recorded_schedule(store, args.run)
    prepared = prepare(replay_config(config, schedule, seed=args.seed))
    if args.out is not None:
        claim_folder(args.out, "", overwrite=args.overwrite)
    then = (source.result or {}).get("data") or {}
    if then.get("sha256") and prepared.data.get("sha256") and then["sha256"] != prepared.data["sha256"]:
        # as a resume says it: the comparison below is then between runs on different code or data
        print(f"selftune: note: the task file {str(prepared.data.get('source', '')).rpartition(':')[0]} changed "
              f"since run {source.id} (its sha256 differs): the replay trains on what it builds now",
              file=sys.stderr)
    run = RecordedRun.start(store, prepared.config, out=args.out, checkpoint_root=args.checkpoint_dir,
                            overwrite=args.overwrite, method=REPLAY, name=f"run{args.run}")
    print(f"selftune replay of run {source.id} ({source.method}, seed {source.seed}): {len(schedule.steps)} schedule "
          f"rows over {prepared.config.epochs} epochs, fixed training from scratch, seed {prepared.config.seed}; "
          f"run {run.run_id} in {store.display_url}")
    result = run.drive(prepared, every=args.checkpoint_every, callbacks=_progress(args))
    _summary(result)
    tuned = source.result or {}
    spent = result.compute["examples"] + int(tuned.get("compute", {}).get("examples", 0))
    if "test" in tuned:
        from .bench.paired import describe_change

        print(f"replay test loss {result.test['loss']:.4f} against the tuning run's {tuned['test']['loss']:.4f} "
              f"({describe_change(result.test['loss'], tuned['test']['loss'])}); tuning + replay cost {spent} "
              "examples")
    _wrote(result.run_id, run.out, prepared.tuner)
    return 0


def _age(when) -> str:
    from .store._store import _now

    seconds = int((_now() - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _runs(args: argparse.Namespace) -> int:
    runs = _open_store(args.store, create=False).list_runs()
    if not runs:
        print("no runs yet")
        return 0
    print(f"{'id':>4}  {'method':<10} {'seed':>4}  {'status':<11} {'test loss':>9}  {'age':>5}  config")
    for r in runs:
        loss = f"{r.test_loss:.4f}" if r.test_loss is not None else "-"
        if r.config.get("task"):
            data, model = r.config["task"].get("source", "?").rsplit(":", 1)[-1], "own model"
        else:
            data = (r.config.get("data") or {}).get("name", "?")
            model = (r.config.get("model") or {}).get("name", "?")
        print(f"{r.id:>4}  {r.method:<10} {r.seed:>4}  {r.status:<11} {loss:>9}  {_age(r.created_at):>5}  "
              f"{data}/{model}, {r.config.get('epochs')} epochs")
    return 0


def _beside(out: str | Path, method: str) -> Path:
    """``<out>-<method>``, the comparison's folder beside the run's: for ``--out .`` (or ``..``) named after
    the folder itself, not a hidden ``.-fixed`` inside it."""
    path = Path(out)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    return path.with_name(f"{path.name}-{method}") if path.name else Path(f"{out}-{method}")


def _show(args: argparse.Namespace) -> int:
    import json

    store = _open_store(args.store, create=False)
    r = _get_run(store, args.run)
    print(f"run {r.id}: {r.method}, seed {r.seed}, {r.status}  (uuid {r.uuid})")
    print(f"created {r.created_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {_age(r.heartbeat_at)} ago, "
          f"process {r.pid} on {r.host}")
    print(f"output {r.out_dir}; checkpoints {r.checkpoint_dir}")
    checkpoints = store.checkpoints(r.id)
    trajectory = store.trajectory(r.id)
    print(f"{len(trajectory)} trajectory rows, {len(store.epochs(r.id))} epochs, {len(checkpoints)} checkpoints"
          + (f" (last at step {checkpoints[-1][0]})" if checkpoints else ""))
    if r.result:
        print("hyperparameters: " + json.dumps(r.result["hparams"]))
        print(f"test {_quality(r.result['test'])}")
    elif trajectory:
        last = trajectory[-1]
        print("latest hyperparameters: " + ", ".join(f"{k}={last[k]:.4g}" for k in last
                                                     if k not in {"step", "epoch", "train_loss", "val_loss"}
                                                     and not k.endswith("_scale")))
    if r.error:
        print(f"error: {r.error}")
    if r.status == "interrupted":
        from .runner import _store_hint

        print(f"resume with: selftune resume {r.id}{_store_hint(store)}")  # pasteable anywhere, as a stop prints
    for e in store.events(r.id):
        print(f"event at step {e['step']}: {e['kind']}: {e['message']}")
    print("config: " + json.dumps(r.config))  # in its own order: the first of lr_scales' patterns decides
    return 0


def _report(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .outputs import _trajectory_columns, claim_folder, mark_folder, write_atomic, write_csv
    from .report.plots import plot_losses, plot_trajectory

    store = _open_store(args.store, create=False)
    r = _get_run(store, args.run)
    trajectory, epochs = store.trajectory(r.id), store.epochs(r.id)
    if not trajectory and not epochs:  # a run shorter than log_every still has its epoch rows
        raise ConfigError("RUN", f"run {r.id} has no recorded trajectory yet")
    schedule = None
    if r.status == "finished":  # read before anything is written: its config is parsed here
        from .runner import recorded_schedule

        try:
            schedule = recorded_schedule(store, r.id, replay=False)[1]  # the rates too, as the run's own file
        except ConfigError as err:  # e.g. its optimizer file moved: the other files come from the store alone
            print(f"selftune: note: schedule.csv not written ({err})", file=sys.stderr)
    if args.out is None and not Path(r.out_dir).parent.is_dir():
        # the project moved or was deleted: recreating the recorded path would scatter folders elsewhere
        raise ConfigError("--out", f"run {r.id}'s output folder {r.out_dir} no longer exists, nor the folder it was "
                                   "in (moved?); name where to write with --out")
    # The run's own folder (or one the user names) may receive these files only under the folder rule.
    out = claim_folder(args.out or r.out_dir, r.uuid, overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not any(p for p in out.iterdir()):  # a new folder is this run's: its outputs may land here later
        mark_folder(out, r.uuid, r.id, store.display_url)
    columns = list(trajectory[0]) if trajectory else _trajectory_columns(epochs)
    names = [k for k in columns or () if k not in {"step", "epoch", "train_loss", "val_loss"}
             and not k.endswith("_scale")]
    # each file through a temporary one and a rename: --overwrite replaces a link of the same name, never
    # what it points to
    label = f"run {r.id} ({r.method})"
    write_atomic(out / "trajectory.png",
                 lambda p: plot_trajectory(trajectory, names, p, title=f"{label} hyperparameters"))
    write_atomic(out / "losses.png", lambda p: plot_losses(trajectory, epochs, p, title=f"{label} losses"))
    write_atomic(out / "trajectory.csv", lambda p: write_csv(p, trajectory, columns))
    write_atomic(out / "epochs.csv", lambda p: write_csv(p, epochs))
    written = "trajectory.png, losses.png, trajectory.csv, epochs.csv"
    if schedule is not None:
        write_atomic(out / "schedule.csv", schedule.to_csv)
        written += ", schedule.csv"
    print(f"wrote {out}/{written} from {store.display_url}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import GPU_TASKS, TASKS, load_task, run_bench
    from .bench.harness import check_bench_lock, claim_bench_folder, task_name, usable_methods
    from .errors import ConfigError
    from .methods import get_method
    from .runner import prepare

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--gpu", "no CUDA device is visible here; run on a machine with a GPU, or drop --gpu")
    if args.task is None:
        if not args.gpu:
            raise ConfigError("TASK", f"name a task (one of {list(TASKS)}), or pass --gpu for the paper-scale tasks")
        tasks = list(GPU_TASKS)
        if args.out:
            raise ConfigError("--out", "with several tasks each goes to bench/<task>; drop --out or name one task")
    elif args.task not in TASKS and not (args.task.endswith(".toml") and Path(args.task).is_file()):
        raise ConfigError("TASK", f"unknown task {args.task!r}; choose one of {list(TASKS)} or give a config file "
                                  "(.toml)")
    else:
        tasks = [args.task]
    for m in args.methods or []:
        get_method(m)
    for item in args.overrides:  # what bench itself varies cannot be fixed by an override
        key = item.partition("=")[0].strip()
        if key in ("method", "seed"):
            raise ConfigError("--set", f"{key} is what bench varies; choose with --{key}s instead")
    outs = {t: Path(args.out) if args.out else Path("bench") / (task_name(t) + ("-quick" if args.quick else ""))
            for t in tasks}
    from .runner import check_writable

    for task, out in outs.items():  # refused before the store is opened (or created)
        claim_bench_folder(out, task=task_name(task), quick=args.quick, overwrite=args.overwrite, source=task)
        check_writable(out, "--out")
        check_bench_lock(out)
    runnable = []
    for task in tasks:
        try:  # a task whose data package (or GPU) is missing fails here, before any run starts
            config = load_task(task, quick=args.quick, gpu=args.gpu, overrides=args.overrides)
            usable_methods(config, args.methods)  # a named method that cannot run this task: refused now
            prepare(config)
            runnable.append(task)
        except ConfigError as err:
            if args.task is not None:
                raise ConfigError("TASK", f"{task}: {err}") from None
            print(f"selftune: skipping {task}: {err}", file=sys.stderr)
    if not runnable:
        raise ConfigError("TASK", "none of the paper-scale tasks can run here (see the reasons above)")
    store = _open_store(args.store)  # opened only now: a refused command leaves no database behind
    for task in runnable:
        out = outs[task]
        run_bench(task, methods=args.methods, trials=args.trials, population=args.population, seeds=args.seeds,
                  quick=args.quick, gpu=args.gpu, out=out, store=store, overwrite=args.overwrite,
                  overrides=args.overrides, fresh=args.fresh)
        readme = (out / "README.md").read_text()
        print(readme)
        plotted = "(schedules.png)" in readme  # linked only where a tuned method's schedule was plotted now
        print(f"wrote {out}/README.md, results.json, loss_vs_compute.png{', schedules.png' if plotted else ''}; runs "
              f"and Optuna studies in {store.display_url}")
    return 0


COMMANDS = {"bench": _bench, "run": _run, "resume": _resume, "replay": _replay, "runs": _runs, "show": _show,
            "report": _report}


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor (io.StringIO), or no poll (Windows)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every selftune error becomes one line on stderr and an exit status."""
    args = _parser().parse_args(argv)
    import warnings

    from .errors import SelftuneError, SelftuneWarning

    def show(message, category, filename, lineno, file=None, line=None):  # one line, no source excerpt
        if issubclass(category, SelftuneWarning):
            print(f"selftune: warning: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a pipe is block-buffered: a closed one must fail here, inside the handlers below
        return code
    except SelftuneError as err:
        kind = "run failed" if err.exit_code == 1 else "stopped" if err.exit_code > 2 else "error"
        if err.exit_code > 2 and argv is None:  # stopped by a signal, and recorded: one more Ctrl-C while
            _exit_on_sigint()  # Python shuts down ends it there, without a traceback from an exit handler
        print(f"selftune: {kind}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a run's training (start-up, data loading, a search)
        if argv is None:  # the command line's process (not a caller's, which keeps its own handler)
            _exit_on_sigint()
        print("selftune: stopped: interrupted by SIGINT", file=sys.stderr)
        return 130
    except BrokenPipeError as err:
        if not _stdout_closed():  # another connection broke (a user's task, a socket): an error like any other
            print(f"selftune: error: {err}", file=sys.stderr)
            return 1
        # `selftune show 1 | head`: the reader has what it wanted. Python flushes stdout again at exit and
        # would print a second error: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe ended
    finally:
        warnings.showwarning = previous


def _exit_on_sigint() -> None:
    """A further Ctrl-C ends the process at once, with status 130: the command has stopped (its run is
    recorded) and only exits now. Ignoring it left a hanging exit handler (a Ray or database shutdown)
    holding the terminal; Python's own handling prints a traceback from inside an exit handler."""
    import signal

    try:
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    except ValueError:  # main() called from a thread other than the main one (a test): nothing to do
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
