"""The paired test of `selftune bench`'s verdict, over bench folders already written.

A bench written before the verdict had its paired column (or several folders to read side by side)
gets the same cells from its ``results.json``::

    .venv/bin/python scripts/paired_cells.py OUT [OUT ...] > paired.md

Prints one Markdown row per folder, start and tuning method: the cases that beat fixed training from
that start and seed, and :func:`selftune.bench.paired.describe` of them; then the totals.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from selftune.bench.paired import describe
from selftune.methods import METHODS


def main(folders: list[str]) -> None:
    print("| task | start | method | beats fixed | paired (median, p) |")
    print("|---|---|---|---|---|")
    wins = cases = 0
    for folder in folders:
        results = json.loads((Path(folder) / "results.json").read_text())
        fixed = {(r["start"], r["seed"]): math.inf if r.get("failed") else r["test_loss"]
                 for r in results if r["method"] == "fixed"}
        cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
        # as the verdict: methods that start from a start (single runs), not searches or PBT, which sample the
        # whole space
        single = {r["method"] for r in results
                  if r["start"] or (r["method"] in METHODS and METHODS[r["method"]].uses_start)}
        for r in results:
            key = (r["start"], r["seed"])
            if r["method"] != "fixed" and r["method"] in single and key in fixed:
                loss = math.inf if r.get("failed") else r["test_loss"]
                cells.setdefault((r["start"], r["method"]), []).append((loss, fixed[key]))
        for (start, method), pairs in cells.items():
            won = sum(t < f for t, f in pairs)
            wins, cases = wins + won, cases + len(pairs)
            tuned, base = [t for t, _ in pairs], [f for _, f in pairs]
            cell = describe(tuned, base)
            print(f"| {Path(folder).name} | {start or 'init'} | {method} | {won}/{len(pairs)} | {cell} |")
    print(f"\n{wins} of {cases} cases beat fixed training.")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: paired_cells.py BENCH_FOLDER [BENCH_FOLDER ...]")
    main(sys.argv[1:])
