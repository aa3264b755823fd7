"""A run that blows up while its values stay finite rolls back to before the blow-up, not to the last
finite state (docs/store.md, "Divergence"), in memory, in the store and across a resume."""

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import selftune as st
from selftune.bookkeeping import RunLog
from selftune.errors import DivergenceError
from selftune.explain import explain
from selftune.store import RunStore, StoreRecorder


def log_with(points, ratio=2.0):
    """Feed one stretch per (losses, weight norm); return each stretch's verdict."""
    log, verdicts = RunLog(), []
    for losses, norm in points:
        for value in losses:
            log.add_train_loss(value)
        verdicts.append(log.close_interval(ratio, norm))
    return log, verdicts


def test_a_stretch_is_a_blow_up_when_its_loss_and_the_weights_grew_far_past_their_recent_lows():
    # the held-out case: loss 7 -> 10 -> 17 -> 42, weight norm 18 -> 22 -> 33 -> 49
    _, verdicts = log_with([([7.3], 18.4), ([9.7], 22.4), ([17.4], 33.3), ([41.9], 49.4)])
    assert verdicts == [True, True, False, False]
    # a loss that rises while the norm stays or shrinks (a weight decay tuned up, a noisy loss near zero)
    assert log_with([([0.02], 30.0), ([0.5], 25.0), ([4.6], 12.0)])[1] == [True, True, True]
    assert log_with([([3e-4], 40.0), ([0.013], 41.0), ([2e-4], 41.5)])[1] == [True, True, True]
    # the lowest of the last four only: a new level becomes normal once the old lows leave the window
    log, verdicts = log_with([([1.0], 10.0)] + [([10.0], 20.0)] * 5)
    assert verdicts == [True, False, False, False, False, True]
    assert log.point_losses == [10.0] * 4 and log.point_norms == [20.0] * 4
    assert log_with([([1.0], 1.0), ([], 5.0)])[1] == [True, None]  # no step since the last point
    assert log_with([([1.0], 1.0), ([math.inf], 1.0)])[1] == [True, False]
    assert log_with([([1.0], 1.0), ([1.0], math.nan)])[1] == [True, False]
    assert log_with([([-1.0], 1.0), ([50.0], 9.0)])[1] == [True, True]  # a loss below 0: no ratio to judge by


def blowup(lr=0.05, **settings):
    """A wide MLP with 0.7/0.8/0.8 dropout under SGD with momentum at 0.05: the training loss grows about
    2-4x per epoch for four epochs, all finite, then overflows (the held-out case the rule came from)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 40, generator=g)
    y = (x @ torch.randn(40, 4, generator=g) + 2.0 * torch.randn(400, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(st.Dropout("d_in"), nn.Linear(40, 512), nn.ReLU(), st.Dropout("d1"), nn.Linear(512, 512),
                          nn.ReLU(), st.Dropout("d2"), nn.Linear(512, 4))
    space = st.Space([st.Float("d_in", 0.0, 0.9, 0.7), st.Float("d1", 0.0, 0.9, 0.8), st.Float("d2", 0.0, 0.9, 0.8)])
    base = dict(batch_size=32, lr=lr, momentum=0.9, warmup_epochs=0, log_every=2)
    base.update(settings)
    return st.SelfTuner(st.hypernetize(model, space), (x[:250], y[:250]), (x[250:], y[250:]), method="fixed",
                        settings=st.TunerSettings(**base), seed=0)


class Listen(st.Callback):
    def __init__(self):
        self.events, self.losses = [], []

    def on_epoch_end(self, tuner, row):
        self.losses.append(row["train_loss"])

    def on_divergence(self, tuner, info):
        self.events.append(info)


def test_a_finite_blow_up_rolls_back_to_before_it_and_the_run_finishes():
    tuner, listen = blowup(), Listen()
    result = tuner.fit(8, callbacks=[listen])
    assert len(listen.events) == 1
    event = listen.events[0]
    assert event["rolled_back_to"] == 2 * tuner.batches_per_epoch and event["rolled_back_to_epoch"] == 2
    assert "already blowing up" in event["message"] and "0.05 -> 0.025" in event["message"]
    assert all(math.isfinite(r["train_loss"]) for r in result.history) and len(result.history) == 8
    said = [line for line in explain(tuner) if line.startswith("diverged once")]
    assert len(said) == 1 and "rate is now 0.025" in said[0]
    assert [r["epoch"] for r in result.history] == list(range(1, 9))
    # the discarded steps were computed: they count, on top of a whole run's examples
    assert result.compute["examples"] > 8 * 250
    # The rule is what saves it: rolling back to the last finite state fails at every rate it tries.
    with pytest.raises(DivergenceError, match="diverged 4 times"):
        blowup(rollback_loss_ratio=1e12).fit(8)


def recorded(tmp_path, name, every):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run = store.create_run(method="fixed", seed=0, config={}, out_dir=str(tmp_path / name),
                           checkpoint_root=str(tmp_path / "ck"))
    info = store.get_run(run)
    return store, run, StoreRecorder(store, run, info.checkpoint_dir, run_uuid=info.uuid, every=every)


@pytest.mark.parametrize("every", [3, 8])  # 8: a checkpoint on each epoch's last step, then the epoch end's
def test_the_store_drops_what_a_deep_roll_back_undid_and_checkpoints_the_state_it_goes_on_from(tmp_path, every):
    tuner = blowup()
    assert tuner.batches_per_epoch == 8
    store, run, recorder = recorded(tmp_path, "a", every)
    doomed, left = [], []

    infos = []

    class Before(st.Callback):  # the checkpoints after the roll-back point when the run diverged
        def on_divergence(self, tuner, info):
            infos.append(info)
            doomed.extend(p for s, e, p in store.checkpoints(run) if s > info["rolled_back_to"])

    newest = []

    class After(st.Callback):  # which of them the recorder left on disk, and what a resume would start from
        def on_divergence(self, tuner, info):
            left.extend(p for p in doomed if Path(p).exists())
            step, _, path = store.checkpoints(run)[-1]
            saved = torch.load(path, weights_only=True)["tuner"]
            newest.append((step, Path(path).name, saved["optimizers"]["weights"]["param_groups"][0]["lr"]))

    result = tuner.fit(8, callbacks=[Before(), recorder, After()])
    assert tuner.divergences == 1 and len(doomed) >= 2 and left == []
    assert store.epochs(run) == result.history  # every row as the run that went on has it
    steps = [r["step"] for r in store.trajectory(run)]
    assert steps == [r["step"] for r in result.trajectory] == sorted(set(steps))
    losses = [r["train_loss"] for r in result.trajectory]
    assert [r["train_loss"] for r in store.trajectory(run)] == pytest.approx(losses)
    back, epoch = infos[0]["rolled_back_to"], infos[0]["rolled_back_to_epoch"]
    assert back <= 2 * tuner.batches_per_epoch + every  # before the loss took off (epoch 3), not step 40-odd
    events = store.events(run)
    assert [(e["kind"], e["step"]) for e in events] == [("divergence", infos[0]["step"])]  # where it happened
    # a resume right after the roll-back starts from the rolled-back state at its lowered rate
    assert newest == [(back, f"step-{back:09d}-epoch-{epoch:05d}-rollback-1.pt", pytest.approx(0.025))]
    assert all(Path(p).exists() for _, _, p in store.checkpoints(run)[-2:])  # the newest two are kept
    # A resume from the rolled-back checkpoint (a SIGKILL right after the roll-back) rewinds the store to it
    # and keeps the divergence its state holds, though it happened after that checkpoint's step.
    store.rewind(run, back, epoch, divergences=1)
    assert [e["step"] for e in store.events(run)] == [infos[0]["step"]] and infos[0]["step"] > back
    store.rewind(run, back, epoch, divergences=0)  # from a checkpoint before it: the replay records it again
    assert store.events(run) == []


@pytest.mark.parametrize("epochs_done", [3, 3.5])
def test_a_run_resumed_inside_a_blow_up_rolls_back_where_the_uninterrupted_one_does(epochs_done):
    whole = blowup()
    expected = whole.fit(8)
    interrupted = blowup()
    # stopped inside the blow-up, at an epoch end or in the middle of an epoch, as an interrupt does
    interrupted.fit(8, max_steps=int(epochs_done * interrupted.batches_per_epoch))
    state = interrupted.snapshot(point=False)
    assert state["rollback"] is not None
    assert state["rollback"]["log"]["counters"]["steps"] == whole.batches_per_epoch * 2
    resumed = blowup()
    resumed.load_state_dict(copy.deepcopy(state))
    result = resumed.fit(8)
    assert resumed.divergences == whole.divergences == 1
    for a, b in zip(result.net.state_dict().values(), expected.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in expected.history]
    assert result.compute["examples"] == expected.compute["examples"]
