"""``selftune bench``: run methods side by side, record them, and write a table and plots.

Compute is reported in units of one plain run: a method's training examples (forward + backward,
hyper steps included, every trial of a search counted) divided by those of the ``fixed`` run of the
same seed, and the same for wall-clock seconds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..algorithms import Fixed
from ..config import RunConfig, load_config
from ..data import CORPORA
from ..errors import ConfigError, DivergenceError, Interrupted, OutputError
from ..methods import METHODS, Context, Method, MethodResult, get_method
from ..outputs import write_atomic
from ..report.plots import loss_scale, plot_schedules
from ..store import RunStore
from .paired import describe, describe_change

TASK_DIR = Path(__file__).parent / "tasks"
TASKS: tuple[str, ...] = tuple(sorted(p.stem for p in TASK_DIR.glob("*.toml")))
#: Paper-scale tasks: their configs say ``device = "cuda"``; ``selftune bench --gpu`` runs them all.
GPU_TASKS: tuple[str, ...] = tuple(t for t in TASKS if 'device = "cuda"' in (TASK_DIR / f"{t}.toml").read_text())
#: The marker of a benchmark folder: re-running a benchmark replaces only what a benchmark wrote.
BENCH_MARKER = ".selftune-bench.json"
BENCH_FILES = ("results.json", "README.md", "loss_vs_compute.png", "schedules.png")
#: What --quick changes: a short budget that proves every method runs and is recorded.
QUICK = {"epochs": 4, "trials": 3, "population": 3, "train_subset": 2000}
#: Datasets small enough that --quick keeps all of them.
SMALL_DATASETS = frozenset({"digits"})


def load_task(name: str, *, quick: bool = False, gpu: bool = False, overrides: Sequence[str] = ()) -> RunConfig:
    """The task's config (quick: fewer epochs and, for large datasets, a smaller training subset;
    gpu: train on the CUDA device; overrides: ``key.path=value`` as ``selftune run --set``, applied to
    the file before it is validated, so every method and start of the benchmark shares them).

    Raises:
        LookupError: an unknown task name.
    """
    if name in TASKS:
        path = TASK_DIR / f"{name}.toml"
    elif name.endswith(".toml") and Path(name).is_file():
        path = Path(name)
    else:
        raise LookupError(f"unknown task {name!r}; choose one of {list(TASKS)} or give a config file (.toml)")
    config = load_config(path, [*overrides, *(['device="cuda"'] if gpu else [])])
    if quick:  # what --set names explicitly wins over the quick budget (the README lists it as applied)
        named = {o.partition("=")[0].strip() for o in overrides}
        if "epochs" not in named:
            config = config.derive(epochs=min(config.epochs, QUICK["epochs"]))
        if config.data is not None and "data.train_subset" not in named:  # a task sizes its own data
            subset = config.data.train_subset
            if config.data.name not in SMALL_DATASETS and not 0 < subset <= QUICK["train_subset"]:
                config = config.derive(train_subset=QUICK["train_subset"])
    return config


def config_place(source: str | None, out: str | Path) -> str | None:
    """Where a benchmark's config file is, as a path from its folder (``None`` for a built-in task): two
    files of one name (``exp1/config.toml``, ``exp2/config.toml``) are two benchmarks, and a project moved
    as a whole keeps the relation."""
    if source is None or source in TASKS:
        return None
    return os.path.relpath(Path(source).resolve(), Path(out).resolve())


def claim_bench_folder(out: str | Path, *, task: str | None = None, quick: bool = False,
                       overwrite: bool = False, source: str | None = None) -> Path:
    """A benchmark folder may be missing, empty, or a previous run of the same benchmark (task, config file
    and quick); anything else needs ``overwrite`` (and even then only the benchmark's own files and
    sub-folders are replaced).

    Args:
        source: the task as given (a built-in name, or a config file's path), whose file the marker records
            (:func:`config_place`): a config of the same name elsewhere is another benchmark.

    Raises:
        OutputError: the folder holds other files.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out: {str(path)!r} is a file, not a folder; choose a folder path")
    if not path.exists() or overwrite or not any(p.name != BENCH_LOCK for p in path.iterdir()):
        return path
    try:
        marker = json.loads((path / BENCH_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    place = config_place(source, path)
    other_file = marker is not None and place is not None and marker.get("config") not in (None, place)
    if marker is not None and task is not None and ((marker.get("task"), marker.get("quick")) != (task, quick)
                                                    or other_file):
        of = f" (config {marker.get('config')!r} from this folder)" if other_file else ""
        raise OutputError(f"--out: folder {str(path)!r} holds the benchmark of {marker.get('task')!r}{of}"
                          f"{' (quick)' if marker.get('quick') else ''}; choose another folder, or pass --overwrite "
                          "to replace its results")
    if marker is not None:
        return path
    names = sorted(p.name for p in path.iterdir() if p.name != BENCH_LOCK)
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise OutputError(f"--out: folder {str(path)!r} is not empty ({shown}) and is no benchmark folder; "
                      "choose a new folder, or pass --overwrite to replace only the benchmark's own files")


#: held by a running benchmark (:func:`_bench_lock`); left in place, empty, when it ends
BENCH_LOCK = ".selftune-bench.lock"


@contextmanager
def _bench_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for this benchmark while it runs: a second ``selftune bench`` into the same folder (which
    would mix its runs' outputs with this one's) is refused at its start, not found out at its end."""
    try:
        import fcntl
    except ImportError:  # not on this platform: no lock, as before
        yield
        return
    try:  # never through a link of that name: the lock file is ours
        fd = os.open(out / BENCH_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        raise OutputError(f"--out: cannot hold {str(out / BENCH_LOCK)!r} ({err.strerror or err}); choose another "
                          "folder") from None
    with os.fdopen(fd, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"--out: folder {str(out)!r} is in use by another selftune bench; wait for it to "
                              "finish, or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_bench_lock(out: Path) -> None:
    """Refuse now a folder another benchmark is running in, before anything (a store) is created; nothing
    is written (the lock is only tried where its file exists)."""
    if not (out / BENCH_LOCK).is_file():
        return
    with _bench_lock(out):
        pass


def run_bench(task: str, *, methods: Sequence[str] | None = None, trials: int = 20, population: int = 8,
              seeds: int = 3, quick: bool = False, gpu: bool = False, out: str | Path = "bench", store: RunStore,
              overwrite: bool = False, overrides: Sequence[str] = (), fresh: bool = False,
              progress: Callable[[str], None] = print) -> list[MethodResult]:
    """Run ``methods`` on ``task`` for ``seeds`` seeds; write ``results.json``, ``README.md`` and plots
    into ``out``; return every result.

    Single-run methods run from each of the task's ``[bench.starts]`` (see
    :class:`~selftune.config.BenchConfig`); searches and PBT sample the whole space and run once per
    seed. Every run of a seed uses the same data split.

    Args:
        task: a built-in task name (:data:`TASKS`) or the path of a config file.
        methods: names from :data:`~selftune.methods.METHODS`; ``None``: every method that can run the
            task (``hd`` only where the config binds its learning rate to a hyperparameter).
        trials: trials of each Optuna search.
        population: members of the PBT population.
        overwrite: allow a non-empty folder that is not a benchmark's (only the benchmark's files are replaced).
        overrides: ``key.path=value`` settings applied to the task's config (``selftune bench --set``);
            the table's README names them.
        fresh: train every single run anew. By default a benchmark run again in its folder keeps the runs an
            earlier one finished there (same config, data and versions) and resumes the one it was training
            when it stopped (:func:`~selftune.methods.single.continue_earlier`), as searches continue their
            studies.

    Raises:
        ConfigError: an unknown method, or a named method that cannot run this task.
        OutputError: ``out`` holds files that are not a benchmark's.
    """
    config = load_task(task, quick=quick, gpu=gpu, overrides=overrides)
    chosen = usable_methods(config, methods)
    for m in METHODS.values():
        if methods is None and m not in chosen:
            why = m.unusable(config) or "it runs when named (--methods)"
            progress(f"[{task_name(task)}] skipping {m.name}: {why}")
    name = task_name(task)
    starts = config.starts() if config.bench.starts else {"": config}
    if quick:
        trials = min(trials, QUICK["trials"])
        population = min(population, QUICK["population"])
    out = claim_bench_folder(out, task=name, quick=quick, overwrite=overwrite, source=task)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"task": name, "quick": quick, "config": config_place(task, out)}
    with _bench_lock(out):
        write_atomic(out / BENCH_MARKER, lambda p: p.write_text(json.dumps(marker) + "\n"))
        ctx = Context(store=store, folder=out, label=f"{name}{'-quick' if quick else ''}", trials=trials,
                      population=population, progress=progress, fresh=fresh)
        results: list[MethodResult] = []
        for seed in range(seeds):
            for method in chosen:
                runs = [(start, cfg, replace(ctx, start=start)) for start, cfg in starts.items()] if method.uses_start \
                    else [("", config, ctx)]
                for start, cfg, run_ctx in runs:
                    progress(f"[{name}] seed {seed}: {method.name}{f' from {start}' if start else ''}"
                             f"{method.budget(ctx)}")
                    try:
                        r = method.run(cfg, seed, run_ctx)
                    except Interrupted as err:  # the run's own advice, and the bench's: run it again
                        raise Interrupted(f"{err}; or run this bench again, which keeps the runs and trials it "
                                          "finished and resumes a run it stopped", err.signum) from None
                    except KeyboardInterrupt:  # outside a run's training: a search trial, a wait, a start-up
                        raise Interrupted(f"bench of {name} interrupted by SIGINT during {method.name}; run it "
                                          "again to go on: it keeps the single runs and search trials it "
                                          "finished (PBT trains again)", signal.SIGINT) from None
                    except DivergenceError as err:
                        # A tuner that diverges is a result (a loss against fixed training), not a reason to
                        # throw away the rest of the benchmark.
                        r = MethodResult(method=method.name, seed=seed, test_loss=math.nan, test_accuracy=math.nan,
                                         val_loss=math.nan, hparams={}, examples=0, seconds=0.0, start=start,
                                         start_values={n: h.init for n, h in cfg.space.items()}, failed=str(err))
                        progress(f"    FAILED: {err}")
                    else:
                        accuracy = "" if math.isnan(r.test_accuracy) else f", accuracy {r.test_accuracy:.4f}"
                        progress(f"    test loss {r.test_loss:.4f}{accuracy}, "
                                 f"{r.examples} examples, {r.seconds:.1f} s")
                    results.append(r)
        # through temporary files and renames: --overwrite replaces a link of the same name, never its target
        write_atomic(out / "results.json", lambda p: p.write_text(json.dumps([r.as_dict() for r in results], indent=2)
                                                                  + "\n"))
        scheduled, schedules = [], {}
        for m in [m.name for m in chosen if m.schedule]:
            for start in starts if any(mm.name == m and mm.uses_start for mm in chosen) else [""]:
                trajectory = replace(ctx, start=start).run_folder(m, 0) / "trajectory.csv"
                if any(r.method == m and r.seed == 0 and r.start == start and not r.failed for r in results) and \
                        trajectory.is_file():  # (a folder a user emptied since: no curve, not a traceback)
                    label = f"{m} from {start}" if start else m
                    schedules[label] = _read_csv(trajectory)
                    scheduled += [m] if m not in scheduled else []
        corpus = config.data is not None and config.data.name in CORPORA
        # the README links schedules.png only where it is plotted now (a bench before may have left one)
        readme = table(name, results, quick, perplexity=corpus, scheduled=scheduled, config=config, overrides=overrides)
        write_atomic(out / "README.md", lambda p: p.write_text(readme))
        write_atomic(out / "loss_vs_compute.png", lambda p: plot_compute(name, results, p))
        if schedules:
            write_atomic(out / "schedules.png", lambda p: plot_schedules(
                schedules, config.build_space().names, p, title=f"{name}, seed 0",
                log={n for n, h in config.space.items() if h.log}))
        return results


def usable_methods(config: RunConfig, methods: Sequence[str] | None) -> list[Method]:
    """The methods to run on ``config``, ``fixed`` first (the unit of compute): the named ones, or with
    ``None`` every registered method that can run it and runs by default (:attr:`Method.by_default`).

    Raises:
        ConfigError: an unknown name, or a named method that cannot run this config (says why).
    """
    if methods is None:
        return [m for m in METHODS.values() if m.by_default and m.unusable(config) is None]
    chosen = [get_method(m) for m in dict.fromkeys([Fixed.name, *methods])]
    for m in chosen:
        reason = m.unusable(config)
        if reason is not None:
            raise ConfigError("--methods", reason)
    return chosen


def task_name(task: str) -> str:
    """The name a task is reported under: itself, or a config file's stem."""
    return task if task in TASKS else Path(task).stem


def _read_csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def _units(results: list[MethodResult]) -> dict[int, tuple[float, float]]:
    """Compute in plain runs, by result index: against the fixed run of the same seed and start (the
    first start's for methods without one)."""
    fixed: dict[tuple[int, str], MethodResult] = {}
    for r in results:
        if r.method == Fixed.name:
            fixed.setdefault((r.seed, r.start), r)
            fixed.setdefault((r.seed, ""), r)
    units = {}
    for i, r in enumerate(results):
        if r.failed:
            continue
        unit = fixed[(r.seed, r.start)]
        if unit.failed:  # the plain run diverged: there is no unit to count in
            units[i] = (math.nan, math.nan)
            continue
        units[i] = (r.examples / unit.examples, r.seconds / max(unit.seconds, 1e-9))
    return units


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if all(math.isnan(v) for v in values):
        return "—"  # a metric the task does not have (accuracy of a regression)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _metric_cell(values: list[float]) -> str:
    """A task metric's mean ± sd over the seeds where it is a number, saying how many those are: a metric can
    be undefined on one split (an F1 without positives), and a search continued from an earlier selftune
    can pick a trial that did not record it."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    shown = _mean_sd(finite)
    return shown if len(finite) == len(values) else f"{shown} ({len(finite)} of {len(values)} seeds)"


def _rows(results: list[MethodResult], units: dict[int, tuple[float, float]], perplexity: bool,
          label: Callable[[str], str] = str, metrics: Sequence[str] = ()) -> list[str]:
    lines = []
    blank = "- | " * len(metrics)
    for m in dict.fromkeys(r.method for r in results):
        every = [i for i, r in enumerate(results) if r.method == m]
        idx = [i for i in every if not results[i].failed]
        failed = len(every) - len(idx)
        name = label(m) + (f" ({failed} of {len(every)} diverged)" if failed else "")
        if not idx:
            lines.append(f"| {name} | - | {'- | ' if perplexity else ''}- | {blank}- | - | - |")
            continue
        rs = [results[i] for i in idx]
        # runs whose plain run diverged have no unit to count in
        ex = [units[i][0] for i in idx if math.isfinite(units[i][0])]
        sec = [units[i][1] for i in idx if math.isfinite(units[i][1])]
        ex_s = f"{statistics.mean(ex):.2f}" if ex else "- (fixed diverged)"
        sec_s = f"{statistics.mean(sec):.2f}" if sec else "-"
        ppl = f"{_mean_sd([math.exp(r.test_loss) for r in rs], 1)} | " if perplexity else ""
        own = "".join(f"{_metric_cell([r.test_metrics.get(k, math.nan) for r in rs])} | " for k in metrics)
        lines.append(f"| {name} | {_mean_sd([r.test_loss for r in rs])} | {ppl}"
                     f"{_mean_sd([r.test_accuracy for r in rs])} | {own}{ex_s} | {sec_s} | {rs[0].trials} |")
    return lines


def table(task: str, results: list[MethodResult], quick: bool, perplexity: bool = False,
          scheduled: Sequence[str] = (), config: RunConfig | None = None, overrides: Sequence[str] = ()) -> str:
    """Markdown: mean ± sd over seeds of test loss and accuracy (and perplexity for language models) and
    of the task's own metrics, compute in units of one plain run; one table per start, and a verdict per
    start when the task declares starts."""
    units = {id(results[i]): u for i, u in _units(results).items()}
    metrics = list(dict.fromkeys(k for r in results for k in r.test_metrics))
    quality = "test loss | test perplexity | test token accuracy" if perplexity else "test loss | test accuracy"
    quality += "".join(f" | test {k}" for k in metrics)
    header = [f"| method | {quality} | examples (x plain) | seconds (x plain) | trials / members |",
              "|---|---|---|---|---|---|" + ("---|" if perplexity else "") + "---|" * len(metrics)]
    lines = [f"# {task}{' (quick)' if quick else ''}", "",
             f"Seeds: {len({r.seed for r in results})}. Compute in units of one plain (fixed) run of the same "
             "seed; searches count every trial, PBT every member-epoch."
             + (f" Settings over the task's file: {' '.join(f'--set {o}' for o in overrides)}." if overrides else ""),
             ""]
    starts = list(dict.fromkeys(r.start for r in results if r.start))

    def section(rs: list[MethodResult]) -> list[str]:
        return header + _rows(rs, {i: units[id(r)] for i, r in enumerate(rs) if id(r) in units}, perplexity,
                              metrics=metrics)

    if not starts:
        lines += section(results)
        if config is not None:
            verdict_lines = verdict(results, config)
            lines += ["", *verdict_lines] if verdict_lines else []
    else:
        for start in starts:
            rs = [r for r in results if r.start == start]
            shown = ", ".join(f"{k} {v:.4g}" for k, v in rs[0].start_values.items())
            lines += [f"## From {start} ({shown})", "", *section(rs), ""]
        free = [r for r in results if not r.start]
        if free:
            lines += ["## Searches and populations (they sample the whole space: no start)", "", *section(free), ""]
        if config is not None:
            lines += verdict(results, config)
    scheduled = [m for m in dict.fromkeys(r.method for r in results) if m in scheduled]
    if scheduled:
        lines += ["", f"Hyperparameter schedules of {', '.join(scheduled)} (seed 0): [schedules.png](schedules.png); "
                  "each run's own plots and CSV files are in `runs/<method>[-<start>]-seed<N>/`."]
    return "\n".join(lines) + "\n"


def unit_moves(result: MethodResult, config: RunConfig) -> dict[str, float]:
    """How far each hyperparameter moved over a run, as a share of its range in the unit space of its
    transform (+: up), from the values the run began at (:attr:`MethodResult.began`). For regularisers,
    up means more regularisation."""
    import torch

    space = config.build_space()
    # from where the run began: an init on a bound was pulled inside before the first step, which is no tuning
    began = {**result.start_values, **result.began}
    start = torch.sigmoid(space.from_dict({k: float(v) for k, v in began.items()}).double())
    end = torch.sigmoid(space.from_dict({k: float(v) for k, v in result.hparams.items()}).double())
    return dict(zip(space.names, (end - start).tolist(), strict=True))


def verdict(results: list[MethodResult], config: RunConfig) -> list[str]:
    """Per start and tuning method: cases that beat fixed training at that start, the mean test loss
    against the best search's, and which way the hyperparameters moved."""
    # A fixed run that diverged left no model: any tuned run that finished beats it.
    fixed = {(r.start, r.seed): math.inf if r.failed else r.test_loss for r in results if r.method == Fixed.name}
    # Without [bench.starts] every run of a method that starts somewhere starts at the space's init (the
    # one start, labelled "init"); searches and populations sample the whole space.
    single = {r.method for r in results if r.start or (r.method in METHODS and METHODS[r.method].uses_start)}
    searches = {}
    for r in results:
        if not r.start and r.method not in single and not r.failed:  # a failed study has no test loss
            searches.setdefault(r.method, []).append(r.test_loss)
    best_search = min(searches, key=lambda m: statistics.mean(searches[m])) if searches else None
    names = config.build_space().names
    metrics = list(dict.fromkeys(k for r in results for k in r.test_metrics))
    lines = ["## Verdict", "",
             f"Against fixed training from the same start and seed, and against the best search"
             f"{f' ({best_search}, mean {statistics.mean(searches[best_search]):.4f})' if best_search else ''}. "
             "Moves: mean change of each hyperparameter over the run, as a share of its range in the unit space "
             "of its transform (+ is up). Paired: the median change of the test loss against fixed training of the "
             "same seed, and whether the changes lean one way beyond the seeds' noise (Wilcoxon signed-rank test "
             "on the log ratios, or on the differences where a loss is 0 or below; 5% level; docs/cli.md, "
             "`selftune bench`)." + (
                 f" Only the test loss is judged here: the task's own metrics ({', '.join(metrics)}) are in the "
                 "tables above, and a method can win on the loss and lose on them."
                 if metrics else ""), "",
             "| start | method | beats fixed | paired (median, p) | mean test loss vs fixed | vs best search | moves |",
             "|---|---|---|---|---|---|---|"]
    tuners = [m for m in dict.fromkeys(r.method for r in results if r.method in single) if m != Fixed.name]
    if not tuners:
        return []
    for start in dict.fromkeys(r.start for r in results if r.method in single):
        for m in tuners:
            every = [r for r in results if r.method == m and r.start == start]
            rs = [r for r in every if not r.failed]
            failed = f" ({len(every) - len(rs)} diverged)" if len(rs) < len(every) else ""
            # a diverged tuned run is a pair too: it lost to its fixed run
            pairs = [(math.inf if r.failed else r.test_loss, fixed[(start, r.seed)])
                     for r in every if (start, r.seed) in fixed]
            paired = describe([t for t, _ in pairs], [f for _, f in pairs])
            if not rs:
                if every:
                    lines.append(f"| {start or 'init'} | {m} | 0/{len(every)}{failed} | {paired} | - | - | - |")
                continue
            wins = sum(r.test_loss < fixed[(start, r.seed)] for r in rs)  # a diverged run never wins
            mean = statistics.mean(r.test_loss for r in rs)
            bases = [fixed[(start, r.seed)] for r in rs if math.isfinite(fixed[(start, r.seed)])]
            base = statistics.mean(bases) if bases else math.nan
            vs = describe_change(mean, statistics.mean(searches[best_search])) if best_search else "-"
            moves = [unit_moves(r, config) for r in rs]
            shown = ", ".join(f"{n} {statistics.mean(mv[n] for mv in moves):+.2f}" for n in names)
            against = f"{base:.4f}" if math.isfinite(base) else "fixed diverged"
            if math.isfinite(base) and len(bases) < len(rs):  # the others' fixed runs diverged
                against += f" ({len(bases)} of {len(rs)} seeds)"
            lines.append(f"| {start or 'init'} | {m} | {wins}/{len(every)}{failed} | {paired} "
                         f"| {mean:.4f} vs {against} | {vs} | {shown} |")
    return lines


def plot_compute(task: str, results: list[MethodResult], path: Path) -> None:
    """Best test loss so far against compute (examples, in plain runs), one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = {r.seed: r.examples for r in results if r.method == Fixed.name and not r.failed}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[tuple[str, str], str] = {}  # one colour per method and start: the starts of a method told apart
    labelled: set[tuple[str, str]] = set()
    for r in results:
        if r.failed or r.seed not in fixed:
            continue
        key = (r.method, r.start)
        color = colors.setdefault(key, f"C{len(colors) % 10}")
        xs = [c[0] / fixed[r.seed] for c in r.curve]
        ys = [c[1] for c in r.curve]
        label = None if key in labelled else (f"{r.method} from {r.start}" if r.start else r.method)
        labelled.add(key)
        ax.plot(xs, ys, "o-" if len(xs) == 1 else "-", color=color, label=label, alpha=0.8, markersize=5)
    ax.set_xscale("log")
    loss_scale(ax, [c[1] for r in results if not r.failed and r.seed in fixed for c in r.curve])
    ax.set_xlabel("compute (training examples, in plain runs)")
    ax.set_ylabel("test loss of the returned model")
    ax.set_title(task)
    ax.grid(alpha=0.3, which="both")
    if labelled:  # (every run failed: an empty plot, without matplotlib's warning about an empty legend)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
