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

from ..config import RunConfig, load_config
from ..data import CORPORA
from ..methods import METHODS, PBT_METHODS, SEARCH_METHODS, MethodResult, run_pbt, run_search, run_single
from ..report.plots import plot_schedules
from ..store import RunStore

TASK_DIR = Path(__file__).parent / "tasks"
TASKS: tuple[str, ...] = tuple(sorted(p.stem for p in TASK_DIR.glob("*.toml")))
#: Paper-scale tasks: their configs say ``device = "cuda"``; ``selftune bench --gpu`` runs them all.
GPU_TASKS: tuple[str, ...] = tuple(t for t in TASKS if 'device = "cuda"' in (TASK_DIR / f"{t}.toml").read_text())
#: Methods whose result is a schedule of hyperparameters, plotted side by side.
SCHEDULED: tuple[str, ...] = ("stn", "delta-stn", "pbt")
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


def run_bench(task: str, *, methods: Sequence[str] = METHODS, trials: int = 20, population: int = 8,
              seeds: int = 3, quick: bool = False, gpu: bool = False, out: str | Path = "bench", store: RunStore,
              progress: Callable[[str], None] = print) -> list[MethodResult]:
    """Run ``methods`` on ``task`` for ``seeds`` seeds; write ``results.json``, ``README.md`` and plots
    into ``out``; return every result.

    Args:
        trials: trials of each Optuna search.
        population: members of the PBT population.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    config = load_task(task, quick=quick, gpu=gpu)
    if quick:
        trials = min(trials, QUICK["trials"])
        population = min(population, QUICK["population"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ordered = ["fixed", *[m for m in methods if m != "fixed"]]  # fixed is the unit of compute
    results: list[MethodResult] = []
    for seed in range(seeds):
        for method in ordered:
            size = f" ({trials} trials)" if method in SEARCH_METHODS else \
                f" (population {population})" if method in PBT_METHODS else ""
            progress(f"[{task}] seed {seed}: {method}{size}")
            if method in SEARCH_METHODS:
                study = f"{task}{'-quick' if quick else ''}-{method}-seed{seed}-{trials}trials"
                r = run_search(config, method, seed, trials, store.url.render_as_string(hide_password=False), study)
            elif method in PBT_METHODS:
                r = run_pbt(config, seed, population, store, out / "runs" / f"{method}-seed{seed}",
                            ray_dir=out / "ray", checkpoint_root=out / "checkpoints",
                            name=f"{task}{'-quick' if quick else ''}-seed{seed}")
            else:
                r = run_single(config, method, seed, store, out / "runs" / f"{method}-seed{seed}",
                               checkpoint_root=out / "checkpoints")
            progress(f"    test loss {r.test_loss:.4f}, accuracy {r.test_accuracy:.4f}, "
                     f"{r.examples} examples, {r.seconds:.1f} s")
            results.append(r)
    (out / "results.json").write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    (out / "README.md").write_text(table(task, results, quick, perplexity=config.data.name in CORPORA))
    plot_compute(task, results, out / "loss_vs_compute.png")
    schedules = {m: _read_csv(out / "runs" / f"{m}-seed0" / "trajectory.csv") for m in SCHEDULED
                 if any(r.method == m and r.seed == 0 for r in results)}
    if schedules:
        plot_schedules(schedules, config.build_space().names, out / "schedules.png", title=f"{task}, seed 0",
                       log={name for name, h in config.space.items() if h.log})
    return results


def _read_csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def _units(results: list[MethodResult]) -> dict[tuple[str, int], tuple[float, float]]:
    fixed = {r.seed: r for r in results if r.method == "fixed"}
    return {(r.method, r.seed): (r.examples / fixed[r.seed].examples, r.seconds / fixed[r.seed].seconds)
            for r in results}


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(task: str, results: list[MethodResult], quick: bool, perplexity: bool = False) -> str:
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
    scheduled = [m for m in methods if m in SCHEDULED]
    if scheduled:
        lines += ["", f"Hyperparameter schedules of {', '.join(scheduled)} (seed 0): [schedules.png](schedules.png); "
                  "each run's own plots and CSV files are in `runs/<method>-seed<N>/`."]
    return "\n".join(lines) + "\n"


def plot_compute(task: str, results: list[MethodResult], path: Path) -> None:
    """Best test loss so far against compute (examples, in plain runs), one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = {r.seed: r.examples for r in results if r.method == "fixed"}
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
