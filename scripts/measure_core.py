"""Measurements for the core issue: quality against fixed training and a 5-point dropout grid, and the
wall-time cost of a self-tuning run relative to a fixed run of the same epochs (back to back, one
process). Writes a markdown table to stdout.

    .venv/bin/python scripts/measure_core.py digits   # ~2 minutes on 2 cores
    .venv/bin/python scripts/measure_core.py mnist    # ~20 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import sys

import torch

from selftune.config import load_config
from selftune.runner import execute, prepare

CONFIGS = {"digits": "examples/digits_mlp.toml", "mnist": "examples/mnist_cnn.toml"}
GRID = [0.0, 0.15, 0.3, 0.45, 0.6]


def run(path: str, overrides: list[str]) -> dict:
    return execute(prepare(load_config(path, overrides)))[1].to_json()


def main(task: str, seeds: int = 3) -> None:
    torch.set_num_threads(2)
    path = CONFIGS[task]
    dropouts = [n for n in load_config(path).space if n.startswith("dropout")]
    lines = ["| seed | fixed (init) | stn | delta-stn | best of grid (value) | delta-stn / fixed time "
             "| stn / fixed time |",
             "|---|---|---|---|---|---|---|"]
    ratios_d, ratios_s = [], []
    for seed in range(seeds):
        fixed = run(path, ['method="fixed"', f"seed={seed}"])
        delta = run(path, ['method="delta-stn"', f"seed={seed}"])
        stn = run(path, ['method="stn"', f"seed={seed}"])
        grid = []
        for value in GRID:
            sets = [f"space.{n}.init={value}" for n in dropouts]
            grid.append((run(path, ['method="fixed"', f"seed={seed}", *sets])["test"]["loss"], value))
        best = min(grid)
        rd = delta["compute"]["seconds"] / fixed["compute"]["seconds"]
        rs = stn["compute"]["seconds"] / fixed["compute"]["seconds"]
        ratios_d.append(rd)
        ratios_s.append(rs)
        fmt = lambda r: f"{r['test']['loss']:.4f} ({100 * r['test']['accuracy']:.1f}%)"  # noqa: E731
        lines.append(f"| {seed} | {fmt(fixed)} | {fmt(stn)} | {fmt(delta)} | {best[0]:.4f} (p={best[1]}) | "
                     f"{rd:.2f} | {rs:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
        print(f"  seed {seed} delta-stn hparams {delta['hparams']}", file=sys.stderr, flush=True)
        print(f"  seed {seed} grid {grid}", file=sys.stderr, flush=True)
    lines.append(f"\nmedian time ratio: delta-stn/fixed {statistics.median(ratios_d):.2f}, "
                 f"stn/fixed {statistics.median(ratios_s):.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
