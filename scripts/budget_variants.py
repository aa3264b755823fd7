"""How ``delta-ift`` spends its compute budget after the handover: three ways, many seeds, one task.

* ``budget``: the default (``tuner.compute_budget`` 2): fewer Neumann terms first, every
  ``train_steps`` weight steps (``selftune.implicit.spacing``);
* ``spaced``: the same budget, all ``neumann_terms``, hyper steps spaced further apart;
* ``unbounded``: no budget (``compute_budget`` 10), all terms every ``train_steps`` steps (stop 19).

Prints, per start and variant, the mean test loss and each seed's (test loss, examples in plain runs,
handover epoch, Neumann terms used)::

    .venv/bin/python scripts/budget_variants.py diabetes overfit,default 10
    .venv/bin/python scripts/budget_variants.py adult-mlp-small overfit 5

``diabetes`` is examples/own_task.toml; any other name is a bench task (selftune/bench/tasks).
One thread per process, so two can run side by side on a 2-core machine.
"""

from __future__ import annotations

import functools
import statistics
import sys
import warnings
from pathlib import Path

import torch

import selftune.handover as handover
from selftune.bench.harness import TASK_DIR
from selftune.config import load_config
from selftune.implicit import spacing
from selftune.runner import execute, prepare

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"budget": ([], spacing), "spaced": ([], functools.partial(spacing, terms_first=False)),
            "unbounded": (["tuner.compute_budget=10"], spacing)}


def main(task: str, starts: str, seeds: int, variants: str = ",".join(VARIANTS)) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    path = ROOT / "examples" / "own_task.toml" if task == "diabetes" else TASK_DIR / f"{task}.toml"
    for start in starts.split(","):
        for variant in variants.split(","):
            overrides, rule = VARIANTS[variant]
            handover.spacing = rule  # what DeltaIFT._hand_over calls
            rows = []
            for seed in range(seeds):
                config = load_config(path, overrides).starts()[start].derive(method="delta-ift", seed=seed)
                prepared = prepare(config)
                _, fit = execute(prepared)
                tuner = prepared.tuner
                state = tuner.log.algorithm
                plain = config.epochs * tuner.order.n_train
                rows.append((round(fit.test["loss"], 4), round(fit.compute["examples"] / plain, 2),
                             state.get("handover_epoch"), state.get("neumann_terms")))
            mean = statistics.mean(r[0] for r in rows)
            print(f"{task} {start} {variant}: {mean:.4f} {rows}", flush=True)
    handover.spacing = spacing


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
