"""Both answers of one ``tuner.keep = "best"`` bench: the kept epoch's test loss and the last epoch's.

A run with ``keep = "best"`` trains exactly as one with ``"last"`` and records the last epoch's losses in
``result.json`` (``last``), so one bench gives the paired comparison: tuned against fixed at the last
epoch (what ``keep = "last"`` reports), both at their best validation epoch, and the tuned run's best
epoch against fixed training's last. Reads the runs of every bench folder given from their store::

    selftune bench TASK --methods fixed delta-ift --seeds 3 --set tuner.keep=best --out OUT --store URL
    .venv/bin/python scripts/keep_pairs.py URL OUT [OUT ...] > pairs.md

Prints a Markdown table (mean ± sd over seeds, cases that beat fixed) and the cases the tuned run lost.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path

from selftune.store import RunStore


def main(url: str, folders: list[str]) -> None:
    store = RunStore(url)
    cells: dict[tuple[str, str], dict[tuple[str, int], tuple[float, float]]] = collections.defaultdict(dict)
    methods: list[str] = []
    for folder in folders:
        task = Path(folder).name
        for r in json.loads((Path(folder) / "results.json").read_text()):
            info = store.get_run(r["run_id"])
            result = info.result or {}
            if r.get("failed") or "last" not in result:
                continue
            cells[(task, r["start"])][(r["method"], r["seed"])] = (result["test"]["loss"],
                                                                   result["last"]["test"]["loss"])
            if r["method"] not in methods:
                methods.append(r["method"])
    tuned = [m for m in methods if m != "fixed"]
    print("| task, start | method | fixed, last epoch | tuned, last epoch | beats | fixed, best epoch | "
          "tuned, best epoch | beats | tuned best vs fixed last |")
    print("|---|---|---|---|---|---|---|---|---|")
    lost = []
    totals = collections.Counter()

    def spread(v: list[float]) -> str:
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

    for (task, start), runs in sorted(cells.items()):
        for m in tuned:
            seeds = sorted(s for (mm, s) in runs if mm == m and ("fixed", s) in runs)
            if not seeds:
                continue
            f = [runs[("fixed", s)] for s in seeds]
            t = [runs[(m, s)] for s in seeds]
            last = sum(b[1] < a[1] for a, b in zip(f, t, strict=True))
            best = sum(b[0] < a[0] for a, b in zip(f, t, strict=True))
            cross = sum(b[0] < a[1] for a, b in zip(f, t, strict=True))
            totals.update(n=len(seeds), last=last, best=best, cross=cross)
            lost += [f"{task} {start} seed {s}: {b[1]:.4f} vs fixed {a[1]:.4f}"
                     for s, a, b in zip(seeds, f, t, strict=True) if not b[1] < a[1]]
            print(f"| {task}, {start} | {m} | {spread([a[1] for a in f])} | {spread([b[1] for b in t])} | "
                  f"{last}/{len(seeds)} | {spread([a[0] for a in f])} | {spread([b[0] for b in t])} | "
                  f"{best}/{len(seeds)} | {cross}/{len(seeds)} |")
    n = totals["n"]
    print(f"\nBeat fixed: last epochs {totals['last']}/{n}, best epochs {totals['best']}/{n}, tuned best vs fixed "
          f"last {totals['cross']}/{n}.\n\nLost at the last epoch:\n" + "\n".join(f"* {x}" for x in lost))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
