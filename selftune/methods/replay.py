"""Tune, then re-train from scratch on the tuned schedule: the STN paper's own protocol, costed honestly.

A single-run tuner's weights were trained while the hyperparameters moved, through best-response
layers and at perturbed values. MacKay et al. (2019) report the test loss of a *fresh* network
trained with plain training on the schedule the tuner found. ``<algorithm>-replay`` does both and
reports the re-trained network, with the examples and seconds of both runs (about 2.5x one plain run
for Delta-STN), so the benchmark table shows what the protocol costs as well as what it gains.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from ._base import Context, Method, MethodResult, began_from
from .single import SingleRun

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
        """The tuning run: the one a benchmark that also runs ``inner`` already trained (same folder,
        same config), else a new one. Either way its cost is counted."""
        folder = ctx.run_folder(self.inner.name, seed)
        try:
            done = json.loads((folder / "result.json").read_text())
        except (OSError, ValueError):
            done = None
        wanted = config.derive(method=self.inner.name, seed=seed).model_dump(mode="json")
        if done is not None and done.get("config") == wanted and done.get("run_id") is not None:
            try:
                info = ctx.store.get_run(int(done["run_id"]))
            except LookupError:
                info = None
            if info is not None and info.uuid == done.get("run_uuid") and info.status == "finished":
                return MethodResult(method=self.inner.name, seed=seed, test_loss=done["test"]["loss"],
                                    test_accuracy=done["test"].get("accuracy", math.nan),
                                    val_loss=done["val"]["loss"], hparams=done["hparams"],
                                    examples=int(done["compute"]["examples"]), seconds=done["compute"]["seconds"],
                                    run_id=info.id)
        return self.inner.run(config, seed, ctx)

    def run(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        from ..runner import REPLAY, RecordedRun, prepare, recorded_schedule, replay_config

        tuned = self._tuned(config, seed, ctx)
        assert tuned.run_id is not None
        recorded, schedule = recorded_schedule(ctx.store, tuned.run_id)
        prepared = prepare(replay_config(recorded, schedule))
        run = RecordedRun.start(ctx.store, prepared.config, out=ctx.run_folder(self.name, seed),
                                checkpoint_root=ctx.folder / "checkpoints", overwrite=True, method=REPLAY)
        r = run.drive(prepared, every=None)
        examples = tuned.examples + int(r.compute["examples"])
        return MethodResult(method=self.name, seed=seed, test_loss=r.test["loss"],
                            test_accuracy=r.test.get("accuracy", math.nan), val_loss=r.val["loss"],
                            hparams=r.hparams, examples=examples, seconds=tuned.seconds + r.compute["seconds"],
                            trials=2, run_id=r.run_id, curve=[(tuned.examples, tuned.test_loss),
                                                              (examples, r.test["loss"])],
                            start=ctx.start, start_values={n: h.init for n, h in config.space.items()},
                            began=began_from(r.extra, config))
