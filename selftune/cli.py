"""The ``selftune`` command line.

``selftune run CONFIG.toml [--method stn|delta-stn|fixed] [--seed N] [--set key=value ...] [--out DIR]``
``selftune resume RUN`` | ``selftune runs`` | ``selftune show RUN`` | ``selftune report RUN``

Every command takes ``--store URL`` (default ``$SELFTUNE_STORE`` or ``sqlite:///selftune.db``).

Bad input (config, arguments) prints one line naming the field to stderr and exits with status 2
before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .settings import METHODS

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"selftune: error: {message} (see `selftune {self.prog.split()[-1]} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selftune", description="Tune hyperparameters inside one training run (STN, Delta-STN).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train one model with self-tuned (or fixed) hyperparameters",
                         description="Train the model a config describes and write result.json, "
                                     "trajectory.csv, epochs.csv and plots to --out.")
    run.add_argument("config", help="run config (TOML, see docs/config.md)")
    run.add_argument("--method", choices=METHODS, help="override the config's method")
    run.add_argument("--seed", type=int, help="override the config's seed")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set tuner.lr=0.05 (repeatable)")
    run.add_argument("--out", help="output folder (default: runs/<config>-<method>-seed<seed>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--checkpoint-every", type=_positive, default=100, metavar="STEPS",
                     help="steps between checkpoints (also one at every epoch end; default 100)")
    run.add_argument("--checkpoint-dir", default="checkpoints",
                     help="folder under which each run's checkpoints go (default ./checkpoints)")
    _store_arg(run)

    resume = sub.add_parser("resume", help="continue a run that was interrupted, from its last checkpoint")
    resume.add_argument("run", type=_positive, help="run id (see `selftune runs`)")
    resume.add_argument("--force", action="store_true", help="resume even if the run looks alive")
    resume.add_argument("--quiet", action="store_true", help="no progress bar")
    resume.add_argument("--checkpoint-every", type=_positive, default=100, metavar="STEPS")
    _store_arg(resume)

    bench = sub.add_parser("bench", help="run several tuning methods on one task at equal accounting of compute",
                           description="Run every method on the same task (splits, model, epochs, space), record "
                                       "them in the store, and write results.json, README.md (table) and "
                                       "loss_vs_compute.png to --out.")
    bench.add_argument("task", nargs="?", help="benchmark task (see docs/cli.md: digits-mlp, adult-mlp, mnist-cnn, "
                                               "ptb-lstm, ...); with --gpu and no task: every paper-scale task")
    bench.add_argument("--methods", nargs="+", metavar="METHOD",
                       help="methods to run (default: all of fixed stn delta-stn random tpe tpe-asha pbt)")
    bench.add_argument("--trials", type=_positive, default=20, help="trials per search method (default 20)")
    bench.add_argument("--population", type=_at_least_two, default=8,
                       help="members of the PBT population (default 8)")
    bench.add_argument("--seeds", type=_positive, default=3, help="seeds 0..K-1 (default 3)")
    bench.add_argument("--quick", action="store_true",
                       help="4 epochs, at most 3 trials, small training subsets: proves every method runs")
    bench.add_argument("--gpu", action="store_true",
                       help="train on the CUDA device; without a task, run the paper-scale tasks "
                            "(mnist-alexnet, fashion-alexnet, ptb-lstm-650)")
    bench.add_argument("--out", help="output folder (default bench/<task>)")
    _store_arg(bench)

    runs = sub.add_parser("runs", help="list the runs in the store")
    _store_arg(runs)
    show = sub.add_parser("show", help="print one run: config, status, result, events")
    show.add_argument("run", type=_positive)
    _store_arg(show)
    report = sub.add_parser("report", help="rebuild a run's plots and CSV files from the store alone")
    report.add_argument("run", type=_positive)
    report.add_argument("--out", help="folder for the report (default: the run's output folder)")
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


def _open_store(url: str | None):
    from .store import RunStore

    return RunStore(url)


def _fail(message: object) -> int:
    print(f"selftune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _progress(args: argparse.Namespace) -> list:
    from .callbacks import ProgressBar

    return [] if args.quiet else [ProgressBar()]


def _summary(result: dict) -> None:
    print("hyperparameters: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in result["hparams"].items()))
    print(f"test loss {result['test']['loss']:.4f}  test accuracy {result['test']['accuracy']:.4f}  "
          f"({result['compute']['seconds']:.1f} s, {result['compute']['examples']} examples)")


def _run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .store import StoreError

    overrides = list(args.overrides)
    if args.method:
        overrides.append(f'method="{args.method}"')
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    try:
        config = load_config(args.config, overrides)
        from .runner import prepare

        prepared = prepare(config)
        store = _open_store(args.store)
    except (ConfigError, StoreError) as err:
        return _fail(err)

    from .runner import run_recorded

    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{config.method}-seed{config.seed}"
    sizes = prepared.splits.sizes()
    print(f"selftune {config.method}: {config.data.name} (train {sizes['train']}, val {sizes['val']}, "
          f"test {sizes['test']}), model {config.model.name}, {config.epochs} epochs, seed {config.seed}")
    from .tuner import DivergenceError

    try:
        result = run_recorded(prepared, store, out=out, checkpoint_root=args.checkpoint_dir,
                              every=args.checkpoint_every, callbacks=_progress(args))
    except DivergenceError as err:
        print(f"selftune: run failed: {err}", file=sys.stderr)
        return 1
    _summary(result)
    print(f"run {result['run_id']} in {store.display_url}; wrote {out}/result.json, model.pt, trajectory.csv, "
          "epochs.csv, trajectory.png, losses.png")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .runner import resume_recorded
    from .store import StoreError
    from .tuner import DivergenceError

    try:
        store = _open_store(args.store)
        info = store.get_run(args.run)
        print(f"resuming run {info.id} ({info.method}, seed {info.seed}, {info.status})")
        result = resume_recorded(store, args.run, every=args.checkpoint_every, callbacks=_progress(args),
                                 force=args.force)
    except (ConfigError, StoreError, LookupError) as err:
        return _fail(str(err).strip("'\""))
    except DivergenceError as err:
        print(f"selftune: run failed: {err}", file=sys.stderr)
        return 1
    _summary(result)
    print(f"run {args.run} finished; wrote {info.out_dir}")
    return 0


def _age(when) -> str:
    from .store._store import _now

    seconds = int((_now() - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _runs(args: argparse.Namespace) -> int:
    from .store import StoreError

    try:
        runs = _open_store(args.store).list_runs()
    except StoreError as err:
        return _fail(err)
    if not runs:
        print("no runs yet")
        return 0
    print(f"{'id':>4}  {'method':<10} {'seed':>4}  {'status':<11} {'test loss':>9}  {'age':>5}  config")
    for r in runs:
        loss = f"{r.test_loss:.4f}" if r.test_loss is not None else "-"
        data, model = r.config.get("data", {}).get("name", "?"), r.config.get("model", {}).get("name", "?")
        print(f"{r.id:>4}  {r.method:<10} {r.seed:>4}  {r.status:<11} {loss:>9}  {_age(r.created_at):>5}  "
              f"{data}/{model}, {r.config.get('epochs')} epochs")
    return 0


def _show(args: argparse.Namespace) -> int:
    import json

    from .store import StoreError

    try:
        store = _open_store(args.store)
        r = store.get_run(args.run)
    except (StoreError, LookupError) as err:
        return _fail(str(err).strip("'\""))
    print(f"run {r.id}: {r.method}, seed {r.seed}, {r.status}")
    print(f"created {r.created_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {_age(r.heartbeat_at)} ago, "
          f"process {r.pid} on {r.host}")
    print(f"output {r.out_dir}; checkpoints {r.checkpoint_dir}")
    checkpoints = store.checkpoints(r.id)
    trajectory = store.trajectory(r.id)
    print(f"{len(trajectory)} trajectory rows, {len(store.epochs(r.id))} epochs, {len(checkpoints)} checkpoints"
          + (f" (last at step {checkpoints[-1][0]})" if checkpoints else ""))
    if r.result:
        print("hyperparameters: " + json.dumps(r.result["hparams"]))
        print(f"test loss {r.result['test']['loss']:.4f}, accuracy {r.result['test']['accuracy']:.4f}")
    elif trajectory:
        last = trajectory[-1]
        print("latest hyperparameters: " + ", ".join(f"{k}={last[k]:.4g}" for k in last
                                                     if k not in {"step", "epoch", "train_loss", "val_loss"}
                                                     and not k.endswith("_scale")))
    if r.error:
        print(f"error: {r.error}")
    for e in store.events(r.id):
        print(f"event at step {e['step']}: {e['kind']}: {e['message']}")
    print("config: " + json.dumps(r.config, sort_keys=True))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report.plots import plot_losses, plot_trajectory
    from .runner import _write_csv
    from .store import StoreError

    try:
        store = _open_store(args.store)
        r = store.get_run(args.run)
    except (StoreError, LookupError) as err:
        return _fail(str(err).strip("'\""))
    trajectory, epochs = store.trajectory(r.id), store.epochs(r.id)
    if not trajectory:
        return _fail(f"RUN: run {r.id} has no recorded trajectory yet")
    out = Path(args.out) if args.out else Path(r.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [k for k in trajectory[0] if k not in {"step", "epoch", "train_loss", "val_loss"}
             and not k.endswith("_scale")]
    plot_trajectory(trajectory, names, out / "trajectory.png", title=f"run {r.id} ({r.method}) hyperparameters")
    plot_losses(trajectory, epochs, out / "losses.png", title=f"run {r.id} ({r.method}) losses")
    _write_csv(out / "trajectory.csv", trajectory)
    _write_csv(out / "epochs.csv", epochs)
    print(f"wrote {out}/trajectory.png, losses.png, trajectory.csv, epochs.csv from {store.display_url}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import GPU_TASKS, TASKS, load_task, run_bench
    from .methods import METHODS
    from .store import StoreError

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            return _fail("--gpu: no CUDA device is visible here; run on a machine with a GPU, or drop --gpu")
    if args.task is None:
        if not args.gpu:
            return _fail(f"TASK: name a task (one of {list(TASKS)}), or pass --gpu for the paper-scale tasks")
        tasks = list(GPU_TASKS)
        if args.out:
            return _fail("--out: with several tasks each goes to bench/<task>; drop --out or name one task")
    elif args.task not in TASKS:
        return _fail(f"TASK: unknown task {args.task!r}; choose one of {list(TASKS)}")
    else:
        tasks = [args.task]
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        return _fail(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    from .config import ConfigError
    from .runner import prepare

    runnable = []
    for task in tasks:
        try:  # a task whose data package (or GPU) is missing fails here, before any run starts
            prepare(load_task(task, quick=args.quick, gpu=args.gpu))
            runnable.append(task)
        except ConfigError as err:
            if args.task is not None:
                return _fail(f"TASK: {task}: {err}")
            print(f"selftune: skipping {task}: {err}", file=sys.stderr)
    if not runnable:
        return _fail("TASK: none of the paper-scale tasks can run here (see the reasons above)")
    try:  # opened only now: a refused command leaves no database behind
        store = _open_store(args.store)
    except StoreError as err:
        return _fail(err)
    for task in runnable:
        out = Path(args.out) if args.out else Path("bench") / (task + ("-quick" if args.quick else ""))
        run_bench(task, methods=methods, trials=args.trials, population=args.population, seeds=args.seeds,
                  quick=args.quick, gpu=args.gpu, out=out, store=store)
        print((out / "README.md").read_text())
        print(f"wrote {out}/README.md, results.json, loss_vs_compute.png, schedules.png; runs and Optuna studies "
              f"in {store.display_url}")
    return 0


COMMANDS = {"bench": _bench, "run": _run, "resume": _resume, "runs": _runs, "show": _show, "report": _report}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
