"""Seconds of one tuning run on a Dataset with per-example work, fetched by the main process or by workers.

A user's image dataset decodes and augments each example in ``__getitem__``; the tuner fetches each batch it
asks for with ``tuner.workers`` processes (the DataLoader's ``num_workers``), a share each
(``selftune.batches.Workers``). This times ``delta-ift`` runs of a small MLP on such a dataset, whose
examples each cost ``--cost`` milliseconds of busy CPU work, interleaved (0 workers, then each count of
``--workers``, repeated ``--repeats`` times), and prints each count's seconds and its ratio to the main
process's run of the same repeat (median and range)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/workers_speed.py --cost 2 --workers 1 2 --repeats 3

Every run with workers ends with the same weights whatever their number (asserted here too); with none the
transforms draw from the run's generator directly, so that run differs. ``--no-ahead`` adds, for each count,
runs whose workers do not fetch the next training batch while a step trains (``Source.prefetch`` switched
off), interleaved with the others: what fetching ahead saves.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import selftune as st


class Costly(Dataset):
    """Examples that take ``cost`` seconds of CPU each and draw a random jitter, as an augmentation does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cost: float) -> None:
        self.x, self.y, self.cost = x, y, cost

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def run(workers: int, cost: float, epochs: int, ahead: bool = True) -> tuple[float, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), st.Dropout("drop"), nn.Linear(128, 2))
    net = st.hypernetize(model, st.Space([st.Float("drop", 0.0, 0.9, 0.2)]))
    tuner = st.SelfTuner(net, DataLoader(Costly(x[:1000], y[:1000], cost), batch_size=64, num_workers=workers),
                         DataLoader(Costly(x[1000:], y[1000:], cost), batch_size=64, num_workers=workers), seed=0,
                         settings=st.TunerSettings(batch_size=64, lr=0.05))
    if not ahead:
        for source in tuner.sources.values():
            source.prefetch = lambda index, seed: None  # type: ignore[method-assign]
    start = time.perf_counter()
    fit = tuner.fit(epochs)
    tuner.close()
    return time.perf_counter() - start, [t.clone() for t in fit.net.state_dict().values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cost", type=float, default=2.0, help="milliseconds of work per example")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-ahead", action="store_true", help="also time workers that do not fetch ahead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = [(0, True)] + [(n, ahead) for n in args.workers for ahead in ([True, False] if args.no_ahead else [True])]
    seconds: dict[tuple[int, bool], list[float]] = {kind: [] for kind in kinds}
    reference: list[torch.Tensor] | None = None  # the first run with workers: every other one must equal it
    for _ in range(args.repeats):
        for n, ahead in seconds:
            took, weights = run(n, args.cost / 1000, args.epochs, ahead)
            seconds[n, ahead].append(took)
            if n > 0:
                reference = weights if reference is None else reference
                same = all(torch.equal(a, b) for a, b in zip(reference, weights, strict=True))
                assert same, "the number of workers changed the run"
    print(f"delta-ift, {args.epochs} epochs, 1,000 + 200 examples of {args.cost} ms each, interleaved x{args.repeats}")
    for (n, ahead), taken in seconds.items():
        ratios = [t / base for t, base in zip(taken, seconds[0, True], strict=True)]
        label = f"workers {n}" + ("" if ahead or n == 0 else ", not ahead")
        print(f"{label}: {statistics.median(taken):.2f} s (median; {min(taken):.2f}-{max(taken):.2f}), "
              f"x{statistics.median(ratios):.2f} of the main process ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
