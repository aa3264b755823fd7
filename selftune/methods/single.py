"""Single-run methods: one recorded training run with an in-loop algorithm (fixed, STN, Delta-STN, ...)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..algorithms import ALGORITHMS
from ._base import Context, Method, MethodResult, began_from

if TYPE_CHECKING:
    from ..config import RunConfig


class SingleRun(Method):
    """Train once with the in-loop algorithm ``algorithm`` (a key of :data:`selftune.algorithms.ALGORITHMS`)."""

    uses_start = True

    def __init__(self, algorithm: str) -> None:
        self.algorithm = ALGORITHMS[algorithm]
        super().__init__(self.algorithm.name, schedule=self.algorithm.tunes or self.algorithm.needs_lr)
        # one-pass runs when named: a default benchmark already tunes a bound rate (hd, delta-ift)
        self.by_default = not self.algorithm.differentiates_update

    def unusable(self, config: RunConfig) -> str | None:
        if self.algorithm.needs_lr and not isinstance(config.tuner.lr, str):
            return (f"{self.name} tunes the learning rate, and this config's tuner.lr is a number; "
                    "bind it to a hyperparameter ([tuner] lr = \"lr\" with a [space.lr] table)")
        from ..errors import ConfigError

        try:  # what the algorithm itself refuses (one-pass: an optimizer whose update it cannot differentiate)
            self.algorithm(config.tuner, lr=1.0)
        except ConfigError as err:
            return str(err)
        return None

    def run(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        from ..runner import prepare, run_recorded

        config = config.derive(method=self.name, seed=seed)
        r = run_recorded(prepare(config), ctx.store, out=ctx.run_folder(self.name, seed),
                         checkpoint_root=ctx.folder / "checkpoints", every=None, overwrite=True)
        examples = int(r.compute["examples"])
        return MethodResult(method=self.name, seed=seed, test_loss=r.test["loss"],
                            test_accuracy=r.test.get("accuracy", math.nan),
                            val_loss=r.val["loss"], hparams=r.hparams, examples=examples,
                            seconds=r.compute["seconds"], run_id=r.run_id, curve=[(examples, r.test["loss"])],
                            start=ctx.start, start_values={n: h.init for n, h in config.space.items()},
                            began=began_from(r.extra, config))
