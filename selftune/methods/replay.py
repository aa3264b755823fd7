"""Tune, then re-train from scratch on the tuned schedule: the STN paper's own protocol, costed honestly.

A single-run tuner's weights were trained while the hyperparameters moved, through best-response
layers and at perturbed values. MacKay et al. (2019) report the test loss of a *fresh* network
trained with plain training on the schedule the tuner found. ``<algorithm>-replay`` does both and
reports the re-trained network, with the examples and seconds of both runs (about 2.5x one plain run
for Delta-STN), so the benchmark table shows what the protocol costs as well as what it gains.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ._base import Context, Method, MethodResult
from .single import SingleRun, TrainAnew, continue_earlier, prune_checkpoints, result_of, superseded

if TYPE_CHECKING:
    from ..config import RunConfig


class Replayed(Method):
    """Run the single-run method ``algorithm``, then a ``fixed`` run from scratch that follows its schedule."""

    uses_start = True
    by_default = False

    def __init__(self, algorithm: str) -> None:
        self.inner = SingleRun(algorithm)
        super().__init__(f"{algorithm}-replay", schedule=False)

    def unusable(self, config: RunConfig) -> str | None:
        if config.tuner.adaptive_batch is not None:  # known before anything trains (replay_config refuses it)
            return ("a run whose batch grew ([tuner.adaptive_batch]) cannot be replayed: its schedule is recorded "
                    "by weight step, and a replay at a constant batch takes other steps")
        return self.inner.unusable(config)

    def budget(self, ctx: Context) -> str:
        return f" (one {self.inner.name} run, then one plain run on its schedule)"

    def trials(self, ctx: Context) -> int:
        return 2

    def _tuned(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        """The tuning run: the one this benchmark already trained (or kept), else, without ``--fresh``, one an
        earlier benchmark in this folder left (:func:`continue_earlier`), else a new one. Either way its cost
        is counted."""
        from ..outputs import read_marker
        from ..runner import prepare

        folder = ctx.run_folder(self.inner.name, seed)
        marker = read_marker(folder) or {}
        here = marker.get("run_id") in ctx.trained  # trained (or kept) by this benchmark: said so then
        if here or not ctx.fresh:
            prepared = prepare(config.derive(method=self.inner.name, seed=seed))
            try:
                done = continue_earlier(replace(ctx, progress=None) if here else ctx, folder, prepared)
            except TrainAnew:
                done = None
            del prepared  # one model and dataset on the device at a time: inner.run prepares its own
            if done is not None:
                assert done.run_id is not None
                ctx.trained.add(done.run_id)
                return done
        return self.inner.run(config, seed, ctx)

    def run(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        from ..runner import REPLAY, RecordedRun, prepare, recorded_schedule, replay_config

        tuned = self._tuned(config, seed, ctx)
        assert tuned.run_id is not None
        recorded, schedule = recorded_schedule(ctx.store, tuned.run_id)
        prepared = prepare(replay_config(recorded, schedule))
        folder = ctx.run_folder(self.name, seed)
        try:
            second = None if ctx.fresh else continue_earlier(ctx, folder, prepared)
        except TrainAnew:
            second, prepared = None, prepare(replay_config(recorded, schedule))
        if second is None:
            replaced = superseded(ctx, folder)
            run = RecordedRun.start(ctx.store, prepared.config, out=folder, checkpoint_root=ctx.folder / "checkpoints",
                                    overwrite=True, method=REPLAY)
            second = result_of(run.drive(prepared, every=None).to_json(), ctx, config)
            prune_checkpoints(replaced)
        examples = tuned.examples + second.examples
        return replace(second, method=self.name, seed=seed, examples=examples, seconds=tuned.seconds + second.seconds,
                       trials=2, curve=[(tuned.examples, tuned.test_loss), (examples, second.test_loss)])
