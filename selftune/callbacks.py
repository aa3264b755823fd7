"""Ready-made :class:`~selftune.tuner.Callback` hooks."""

from __future__ import annotations

from typing import TextIO

from tqdm import tqdm

from .tuner import Callback, SelfTuner


class ProgressBar(Callback):
    """A tqdm bar over training steps showing the latest losses and hyperparameters."""

    def __init__(self, file: TextIO | None = None, max_shown: int = 4) -> None:
        self.file = file
        self.max_shown = max_shown
        self.bar: tqdm | None = None
        self.every = 1

    def on_fit_start(self, tuner: SelfTuner, total_steps: int) -> None:
        epochs = max(1, total_steps // max(1, tuner.batches_per_epoch))
        self.every = max(1, epochs // 10)  # at most ~10 epoch lines
        self.bar = tqdm(total=total_steps, initial=tuner.counters.steps, unit="step", file=self.file,
                        desc=tuner.method, dynamic_ncols=True)

    def on_step(self, tuner: SelfTuner, row: dict[str, float] | None) -> None:
        assert self.bar is not None
        self.bar.update(1)
        if row is not None:
            shown = {n: f"{row[n]:.3g}" for n in tuner.net.space.names[: self.max_shown]}
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", **shown, refresh=False)

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        assert self.bar is not None
        if int(row["epoch"]) % self.every:
            return
        shown = "  ".join(f"val {k.removeprefix('val_').replace('accuracy', 'acc')} {v:.4f}" for k, v in row.items()
                          if k.startswith("val_"))
        self.bar.write(f"epoch {int(row['epoch'])}: {shown}", file=self.file)

    def on_fit_end(self, tuner: SelfTuner) -> None:
        if self.bar is not None:
            self.bar.close()


class StopAtEpoch(Callback):
    """Stop :meth:`SelfTuner.fit` once ``epoch`` epochs are done, leaving a resumable state.

    Why not ``fit(epoch)``: a fresh run plans its schedules, tuned rate and hyper learning rate over the epochs
    ``fit`` is given, so training a run in pieces (a PBT member between two exploit steps) must give the
    whole run's length to ``fit`` and stop early with this; ``fit(3)`` would plan a 30-epoch cosine schedule
    to end after epoch 3."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        if tuner.epoch >= self.epoch:
            tuner.request_stop()
