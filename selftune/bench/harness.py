"""``selftune bench``: run methods side by side, record them, and write a table and plots.

Compute is reported in units of one plain run: a method's training examples (forward + backward,
hyper steps included, every trial of a search counted) divided by those of the ``fixed`` run of the
same seed, and the same for wall-clock seconds.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from ..algorithms import Fixed
from ..config import RunConfig, load_config
from ..data import CORPORA
from ..errors import OutputError
from ..methods import METHODS, Context, MethodResult, get_method
from ..report.plots import plot_schedules
from ..store import RunStore

TASK_DIR = Path(__file__).parent / "tasks"
TASKS: tuple[str, ...] = tuple(sorted(p.stem for p in TASK_DIR.glob("*.toml")))
#: Paper-scale tasks: their configs say ``device = "cuda"``; ``selftune bench --gpu`` runs them all.
GPU_TASKS: tuple[str, ...] = tuple(t for t in TASKS if 'device = "cuda"' in (TASK_DIR / f"{t}.toml").read_text())
#: The marker of a benchmark folder: re-running a benchmark replaces only what a benchmark wrote.
BENCH_MARKER = ".selftune-bench.json"
BENCH_FILES = ("results.json", "README.md", "loss_vs_compute.png", "schedules.png")
#: What --quick changes: a short budget that proves every method runs and is recorded.
QUICK = {"epochs": 4, "trials": 3, "population": 3, "train_subset": 2000}


def load_task(name: str, *, quick: bool = False, gpu: bool = False) -> RunConfig:
    """The task's config (quick: fewer epochs and, for large datasets, a smaller training subset;
    gpu: train on the CUDA device).

    Raises:
        LookupError: an unknown task name.
    """
    if name not in TASKS:
        raise LookupError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    overrides = ['device="cuda"'] if gpu else []
    if quick:
        overrides.append(f"epochs={QUICK['epochs']}")
        if name != "digits-mlp":
            overrides.append(f"data.train_subset={QUICK['train_subset']}")
    return load_config(TASK_DIR / f"{name}.toml", overrides)


def claim_bench_folder(out: str | Path, *, task: str | None = None, quick: bool = False,
                       overwrite: bool = False) -> Path:
    """A benchmark folder may be missing, empty, or a previous run of the same benchmark (task and
    quick); anything else needs ``overwrite`` (and even then only the benchmark's own files and
    sub-folders are replaced).

    Raises:
        OutputError: the folder holds other files.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out: {str(path)!r} is a file, not a folder; choose a folder path")
    if not path.exists() or overwrite or not any(path.iterdir()):
        return path
    try:
        marker = json.loads((path / BENCH_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if marker is not None and task is not None and (marker.get("task"), marker.get("quick")) != (task, quick):
        raise OutputError(f"--out: folder {str(path)!r} holds the benchmark of {marker.get('task')!r}"
                          f"{' (quick)' if marker.get('quick') else ''}; choose another folder, or pass --overwrite "
                          "to replace its results")
    if marker is not None:
        return path
    shown = ", ".join(sorted(p.name for p in path.iterdir())[:4])
    raise OutputError(f"--out: folder {str(path)!r} is not empty ({shown}, ...) and is no benchmark folder; "
                      "choose a new folder, or pass --overwrite to replace only the benchmark's own files")


def run_bench(task: str, *, methods: Sequence[str] = tuple(METHODS), trials: int = 20, population: int = 8,
              seeds: int = 3, quick: bool = False, gpu: bool = False, out: str | Path = "bench", store: RunStore,
              overwrite: bool = False, progress: Callable[[str], None] = print) -> list[MethodResult]:
    """Run ``methods`` on ``task`` for ``seeds`` seeds; write ``results.json``, ``README.md`` and plots
    into ``out``; return every result.

    Args:
        trials: trials of each Optuna search.
        population: members of the PBT population.
        overwrite: allow a non-empty folder that is not a benchmark's (only the benchmark's files are replaced).

    Raises:
        ConfigError: an unknown method.
        OutputError: ``out`` holds files that are not a benchmark's.
    """
    chosen = [get_method(m) for m in dict.fromkeys([Fixed.name, *methods])]  # fixed is the unit of compute
    config = load_task(task, quick=quick, gpu=gpu)
    if quick:
        trials = min(trials, QUICK["trials"])
        population = min(population, QUICK["population"])
    out = claim_bench_folder(out, task=task, quick=quick, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / BENCH_MARKER).write_text(json.dumps({"task": task, "quick": quick}) + "\n")
    ctx = Context(store=store, folder=out, label=f"{task}{'-quick' if quick else ''}", trials=trials,
                  population=population)
    results: list[MethodResult] = []
    for seed in range(seeds):
        for method in chosen:
            progress(f"[{task}] seed {seed}: {method.name}{method.budget(ctx)}")
            r = method.run(config, seed, ctx)
            progress(f"    test loss {r.test_loss:.4f}, accuracy {r.test_accuracy:.4f}, "
                     f"{r.examples} examples, {r.seconds:.1f} s")
            results.append(r)
    (out / "results.json").write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    scheduled = [m.name for m in chosen if m.schedule]
    (out / "README.md").write_text(table(task, results, quick, perplexity=config.data.name in CORPORA,
                                         scheduled=scheduled))
    plot_compute(task, results, out / "loss_vs_compute.png")
    schedules = {m: _read_csv(ctx.run_folder(m, 0) / "trajectory.csv") for m in scheduled
                 if any(r.method == m and r.seed == 0 for r in results)}
    if schedules:
        plot_schedules(schedules, config.build_space().names, out / "schedules.png", title=f"{task}, seed 0",
                       log={name for name, h in config.space.items() if h.log})
    return results


def _read_csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def _units(results: list[MethodResult]) -> dict[tuple[str, int], tuple[float, float]]:
    fixed = {r.seed: r for r in results if r.method == Fixed.name}
    return {(r.method, r.seed): (r.examples / fixed[r.seed].examples, r.seconds / fixed[r.seed].seconds)
            for r in results}


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(task: str, results: list[MethodResult], quick: bool, perplexity: bool = False,
          scheduled: Sequence[str] = ()) -> str:
    """Markdown: mean ± sd over seeds of test loss and accuracy (and perplexity for language models),
    compute in units of one plain run."""
    units = _units(results)
    methods = list(dict.fromkeys(r.method for r in results))
    quality = "test loss | test perplexity | test token accuracy" if perplexity else "test loss | test accuracy"
    lines = [f"# {task}{' (quick)' if quick else ''}", "",
             f"Seeds: {len({r.seed for r in results})}. Compute in units of one plain (fixed) run of the same "
             "seed; searches count every trial, PBT every member-epoch.", "",
             f"| method | {quality} | examples (x plain) | seconds (x plain) | trials / members |",
             "|---|---|---|---|---|---|" + ("---|" if perplexity else "")]
    for m in methods:
        rs = [r for r in results if r.method == m]
        ex = statistics.mean(units[(m, r.seed)][0] for r in rs)
        sec = statistics.mean(units[(m, r.seed)][1] for r in rs)
        ppl = f"{_mean_sd([math.exp(r.test_loss) for r in rs], 1)} | " if perplexity else ""
        lines.append(f"| {m} | {_mean_sd([r.test_loss for r in rs])} | {ppl}{_mean_sd([r.test_accuracy for r in rs])} "
                     f"| {ex:.2f} | {sec:.2f} | {rs[0].trials} |")
    scheduled = [m for m in methods if m in scheduled]
    if scheduled:
        lines += ["", f"Hyperparameter schedules of {', '.join(scheduled)} (seed 0): [schedules.png](schedules.png); "
                  "each run's own plots and CSV files are in `runs/<method>-seed<N>/`."]
    return "\n".join(lines) + "\n"


def plot_compute(task: str, results: list[MethodResult], path: Path) -> None:
    """Best test loss so far against compute (examples, in plain runs), one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = {r.seed: r.examples for r in results if r.method == Fixed.name}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for r in results:
        color = colors.setdefault(r.method, f"C{len(colors)}")
        xs = [c[0] / fixed[r.seed] for c in r.curve]
        ys = [c[1] for c in r.curve]
        label = r.method if r.seed == min(x.seed for x in results if x.method == r.method) else None
        ax.plot(xs, ys, "o-" if len(xs) == 1 else "-", color=color, label=label, alpha=0.8, markersize=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute (training examples, in plain runs)")
    ax.set_ylabel("test loss of the returned model")
    ax.set_title(task)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
