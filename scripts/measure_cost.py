"""Wall-time cost of a self-tuning run relative to a fixed run of the same epochs and config.

Runs fixed, delta-stn and stn back to back in one process, ``reps`` times in alternation, and
reports the median of each ratio (wall time of a short run on a shared 2-core machine is noisy).

    .venv/bin/python scripts/measure_cost.py examples/digits_mlp.toml 5
    .venv/bin/python scripts/measure_cost.py examples/mnist_cnn.toml 3
"""

from __future__ import annotations

import statistics
import sys

import torch

from selftune.algorithms import ALGORITHMS
from selftune.config import load_config
from selftune.runner import prepare

METHODS = tuple(ALGORITHMS)  # the baseline (fixed) is registered first


def main(path: str, reps: int, *overrides: str) -> None:
    torch.set_num_threads(2)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(reps):
        for method in METHODS:
            prepared = prepare(load_config(path, list(overrides)).derive(method=method))
            fit = prepared.tuner.fit(prepared.config.epochs)
            seconds[method].append(fit.compute["seconds"])
    fixed = statistics.median(seconds["fixed"])
    print(f"{path} {' '.join(overrides)}: fixed {fixed:.1f} s (median of {reps})")
    for method in METHODS[1:]:
        ratios = [s / f for s, f in zip(seconds[method], seconds["fixed"], strict=True)]
        print(f"  {method}: {statistics.median(seconds[method]):.1f} s, ratio median {statistics.median(ratios):.2f} "
              f"(runs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
