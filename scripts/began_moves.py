"""Recompute the bench verdicts' moves from the over-fitting starts, measured from where each run began.

Until stop 29 a bench measured how far a hyperparameter moved from its named start. A tuning method
starts an init on a bound (dropout 0.0, weight decay at its lower bound) 2% of the range inside, so every
such hyperparameter read about +0.02 ("more regularisation") before its first step. This script reads
the committed ``results.json`` files, rebuilds each task's space, and prints per folder and method the mean
moves from the over-fitting start as committed and as measured from where the runs began.

    OMP_NUM_THREADS=1 python scripts/began_moves.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from selftune.bench import load_task
from selftune.bench.harness import unit_moves
from selftune.config import RunConfig, load_config
from selftune.methods._base import MethodResult
from selftune.tuner import BOUND_MARGIN

ROOT = Path(__file__).resolve().parents[1]
#: the methods whose runs start an init on a bound inside (hd moves only its rate; fixed nothing)
PULLED = {"stn", "delta-stn", "ift", "delta-ift", "one-pass", "stn-replay", "delta-stn-replay", "delta-ift-replay"}


def config_for(name: str) -> RunConfig | None:
    """The config a bench README's title names: an example file, else a built-in task."""
    for candidate in (ROOT / "examples" / "heldout" / f"{name}.toml", ROOT / "examples" / f"{name}.toml"):
        if candidate.exists():
            return load_config(candidate, [])
    try:
        return load_task(name)
    except Exception:  # a task of a family generated under another name: not rebuilt here
        return None


def main() -> None:
    for results in sorted((ROOT / "docs" / "benchmarks").rglob("results.json")):
        readme = results.parent / "README.md"
        config = config_for(readme.read_text().splitlines()[0].lstrip("# ").strip()) if readme.exists() else None
        if config is None:
            print(f"skipped {results.parent.relative_to(ROOT)}: its task is not rebuilt here", file=sys.stderr)
            continue
        space = config.build_space()
        moves: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {}
        for row in json.loads(results.read_text()):
            if row.get("start") != "overfit" or row["method"] not in PULLED or row.get("failed"):
                continue
            result = MethodResult(**{k: v for k, v in row.items() if k in MethodResult.__dataclass_fields__})
            named = unit_moves(MethodResult(**{**result.as_dict(), "began": {}}), config)
            unit = torch.sigmoid(space.from_dict({k: float(v) for k, v in result.start_values.items()}).double())
            pull = dict(zip(space.names, (unit.clamp(BOUND_MARGIN, 1 - BOUND_MARGIN) - unit).tolist(), strict=True))
            moves.setdefault(row["method"], []).append((named, {k: v - pull[k] for k, v in named.items()}))
        for method, pairs in moves.items():
            mean = [{k: statistics.mean(p[i][k] for p in pairs) for k in space.names} for i in (0, 1)]
            shown = [", ".join(f"{v:+.2f}" for v in m.values()) for m in mean]
            print(f"{results.parent.relative_to(ROOT / 'docs' / 'benchmarks')!s:34s} {method:16s} "
                  f"n={len(pairs)}  as committed [{shown[0]}] mean {statistics.mean(mean[0].values()):+.3f}  "
                  f"from where it began [{shown[1]}] mean {statistics.mean(mean[1].values()):+.3f}")


if __name__ == "__main__":
    main()
