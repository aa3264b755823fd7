"""A run that blows up while its values stay finite rolls back to before the blow-up, not to the last
finite state (docs/store.md, "Divergence"), in memory, in the store and across a resume."""

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import selftune as st
from selftune.bookkeeping import RunLog
from selftune.errors import ConfigError, DivergenceError
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


def test_the_first_stretch_is_judged_against_the_start_and_only_it():
    """The run's start (its first loss, the weights' norm before the first step) judges the first stretch; a
    later one is judged against its own window (the start's norm in the window made a weight decay tuned up, a
    loss that rises while the norm shrinks below the start's 1.5x, a blow-up at points 2-4)."""
    log = RunLog()
    assert log.close_interval(2.0, 10.0) is None and log.start_norm == 10.0  # the fit's start: nothing to judge
    log.add_train_loss(1.0)  # step 0: the untrained network's loss
    log.counters.steps = 1
    log.add_train_loss(4.0)
    assert log.close_interval(2.0, 20.0) is False  # 2.5x the first loss, 2x the norm: blown up in epoch 1
    fresh = RunLog()
    fresh.close_interval(2.0, 10.0)
    fresh.add_train_loss(1.0)
    assert fresh.close_interval(2.0, 14.0) is True and fresh.point_norms == [14.0]
    for loss, norm in ((2.5, 14.5), (3.0, 13.0), (4.0, 12.0)):  # the loss rises, the norm falls: healthy
        fresh.add_train_loss(loss)
        assert fresh.close_interval(2.0, norm) is True


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
    # The rules are what save it: rolling back to the last finite state fails at every rate it tries. Either
    # rule alone is enough: the validation loss (57x the untrained network's at epoch 4) catches it as well.
    with pytest.raises(DivergenceError, match="diverged 4 times"):
        blowup(rollback_loss_ratio=1e12, rollback_val_ratio=0).fit(8)
    alone, heard = blowup(rollback_loss_ratio=1e12), Listen()
    alone.fit(8, callbacks=[heard])
    assert heard.events and all(e["what"].startswith("validation loss (") for e in heard.events)


def test_a_first_epoch_that_blew_up_is_judged_against_the_start_and_the_run_goes_back_there():
    """The first stretch had no earlier one to be judged against: a rate far too large that blew the weights up
    within the first epoch (training loss 2e11) made that epoch's end the roll-back point, every later roll-back
    landed on the broken weights, and the run failed calling it "the last good state"."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(240, 6, generator=g)
    y = x[:, 0] * 2 - x[:, 1] + 0.3 * torch.randn(240, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(st.Dropout("d"), nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
    tuner = st.SelfTuner(st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, 0.1)])), (x[:120], y[:120]),
                         (x[120:180], y[120:180]), method="fixed", loss=lambda o, t: ((o.squeeze(-1) - t) ** 2).mean(),
                         settings=st.TunerSettings(optimizer="sgd", lr=2.0, momentum=0.9, batch_size=16,
                                                   max_divergences=8), seed=0)
    listen = Listen()
    result = tuner.fit(4, callbacks=[listen])
    early = [e for e in listen.events if e["step"] < 2 * tuner.batches_per_epoch]
    assert early and all(e["rolled_back_to"] == 0 for e in early)  # not to the broken first epoch's end
    assert math.isfinite(result.history[-1]["val_loss"]) and result.history[-1]["val_loss"] < 1e3  # (1e34 there)


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


def contradicted(flip=True, loss=None, metrics=None, **settings):
    """A net fitted to labels its validation data contradict (``flip``): the better it trains, the more
    confidently wrong it is on validation, with every value finite (the over-confident blow-up of
    docs/store.md). 10 steps per epoch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), st.Dropout("d"), nn.Linear(64, 2))
    base = dict(batch_size=20, lr=0.1, warmup_epochs=0)
    base.update(settings)
    return st.SelfTuner(st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, 0.1)])), (x[:200], y[:200]),
                        (x[200:], 1 - y[200:] if flip else y[200:]), method="fixed",
                        settings=st.TunerSettings(**base), seed=0, loss=loss, metrics=metrics)


def test_a_validation_loss_far_above_the_untrained_networks_rolls_back_then_the_rule_gives_up_not_the_run():
    tuner, listen = contradicted(), Listen()
    result = tuner.fit(20, callbacks=[listen])
    assert len(result.history) == 20  # it finishes: the rule stops acting after 3 roll-backs in a row
    blew_up = r"^validation loss \(.*, over 8x 0\.69\d*, the loss of an untrained network\) blew up at step \d+"
    assert len(listen.events) == 3 and all(re.match(blew_up, e["message"]) for e in listen.events)
    changes = [e["message"].split("; ")[-1] for e in listen.events]
    assert changes == ["weights lr 0.1 -> 0.05", "weights lr 0.05 -> 0.025", "weights lr 0.025 -> 0.0125"]
    reference = tuner.log.val_reference
    assert reference == pytest.approx(math.log(2), abs=0.05)
    # each roll-back went to a state whose validation loss was at most 4x (half the ratio) the reference
    val_at = {int(r["step"]): r["val_loss"] for r in tuner.history}
    assert all(val_at.get(e["rolled_back_to"], 0.0) <= 4 * reference for e in listen.events)
    assert tuner.log.val_gave_up is not None
    said = [line for line in explain(tuner) if "no longer rolled back" in line]
    assert len(said) == 1 and "over-fitting a small validation set" in said[0]
    # without the rule the same run trains on at its rate, its validation loss ending over 20x the untrained one's
    plain = contradicted(rollback_val_ratio=0).fit(20)
    assert plain.history[-1]["val_loss"] > 20 * reference


def test_with_a_loss_of_your_own_the_rule_is_off_unless_set():
    import torch.nn.functional as F

    # with a metric the user calls "accuracy", as the held-out tasks have
    own = contradicted(loss=F.cross_entropy, metrics={"accuracy": lambda out, t: (out.argmax(-1) == t).float().mean()})
    own.fit(20)
    assert own.log.val_reference is None and own.divergences == 0  # a ratio cannot judge an NLL's zero point
    chosen = contradicted(loss=F.cross_entropy, rollback_val_ratio=4.0)
    chosen.fit(20)
    assert chosen.log.val_reference == pytest.approx(0.6945, abs=0.01) and chosen.divergences > 0


def test_the_untrained_reference_survives_a_resume_and_the_rule_is_checked(tmp_path):
    tuner = contradicted(lr=0.001)
    tuner.fit(2)
    state = tuner.state_dict()
    again = contradicted(lr=0.001)
    again.load_state_dict(state)
    assert again.log.val_reference == tuner.log.val_reference is not None
    assert tuner.counters.eval_examples == 3 * 100  # the untrained pass is counted with the two epochs'
    for bad in (1.5, -1.0, math.inf):
        with pytest.raises(ConfigError, match=r"tuner\.rollback_val_ratio"):
            st.TunerSettings(rollback_val_ratio=bad)


def test_a_blown_up_validation_loss_rolls_back_to_the_last_judged_epoch_end_also_after_a_resume():
    # a recorder's point inside epoch 3 (step 20; the training-loss rule off) becomes the roll-back point;
    # epoch 3's validation loss (5.2) is then too high for a point and epoch 4's (57) blows up: the run goes
    # back to epoch 2's end, the last state whose validation loss was judged, not to step 20 inside the blow-up
    whole = blowup(rollback_loss_ratio=1e12, rollback_val_ratio=4.0)
    whole.fit(8, max_steps=20)
    state = whole.snapshot()
    assert state["rollback"] is None and _position_of(state["rollback_checked"]) == (16, 2)
    listen = Listen()
    expected = whole.fit(8, callbacks=[listen])
    assert [(e["what"].split(" (")[0], e["rolled_back_to"]) for e in listen.events] == [("validation loss", 16)]
    resumed = blowup(rollback_loss_ratio=1e12, rollback_val_ratio=4.0)
    resumed.load_state_dict(copy.deepcopy(state))
    result = resumed.fit(8)
    assert resumed.divergences == whole.divergences == 1
    assert [r["val_loss"] for r in result.history] == [r["val_loss"] for r in expected.history]


def _position_of(state):
    return state["log"]["counters"]["steps"], state["order"]["epoch"]


class PointAtEpochsLastStep(st.Callback):
    """A recorder's point on each epoch's last step (before the tuner scores the epoch), and after each epoch
    end a record of whether that epoch end became the roll-back point, with its validation loss."""

    def __init__(self):
        self.points, self.events = [], []

    def on_step(self, tuner, row):
        if tuner.counters.steps % tuner.batches_per_epoch == 0:
            tuner.snapshot()

    def on_epoch_end(self, tuner, row):
        state = tuner.snapshot(point=False)
        if tuner.log.val_gave_up is None:  # while the rule acts
            self.points.append((state["rollback"] is None, row["val_loss"], "rollback_checked" in state))

    def on_divergence(self, tuner, info):
        self.events.append(info)


def test_an_epoch_end_whose_validation_loss_is_too_high_is_no_roll_back_point_after_a_recorders_point():
    # the recorder's point on the epoch's last step takes the training's verdict; the epoch end at the same
    # step must still be judged on its validation loss, and never roll back onto the weights that blew up
    tuner, spy = contradicted(), PointAtEpochsLastStep()
    tuner.fit(20, callbacks=[spy])
    reference = tuner.log.val_reference
    assert len(spy.events) == 3 and any(val > 4 * reference for _, val, _ in spy.points)
    assert all(val <= 4 * reference for is_point, val, _ in spy.points if is_point)
    assert all(e["rolled_back_to"] < e["step"] for e in spy.events)
    # a point at the roll-back point's own position adds no second copy of it to the checkpoint
    assert not any(checked for is_point, _, checked in spy.points if is_point)


def test_a_network_that_starts_trained_is_judged_against_log_c_not_its_own_low_loss():
    tuner = contradicted(rollback_val_ratio=0)
    tuner.net.model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g)
    y = (x[:, 0] > 0).long()
    trained = st.SelfTuner(tuner.net, (x[:200], y[:200]), (x[200:], y[200:]), method="fixed",
                           settings=st.TunerSettings(batch_size=20, lr=0.1, warmup_epochs=0), seed=0)
    trained.fit(15)
    assert trained.score()["loss"] < 0.2  # it fits these labels well
    again = st.SelfTuner(trained.net, (x[:200], y[:200]), (x[200:], y[200:]), method="fixed",
                         settings=st.TunerSettings(batch_size=20, lr=0.1, warmup_epochs=0), seed=0)
    again.fit(1)
    assert again.log.val_reference == pytest.approx(math.log(2))  # the floor, not its own loss


def test_a_run_that_follows_a_schedule_and_diverges_follows_it_at_the_lowered_rate():
    from selftune.schedules import HyperSchedule

    steps = list(range(0, 200, 8))
    schedule = HyperSchedule(steps=steps, values={"d": [0.1] * len(steps)}, lr=[0.1] * len(steps))
    tuner, listen = contradicted(follow=schedule), Listen()
    tuner.fit(20, callbacks=[listen])
    assert [e["message"].split("; ")[-1] for e in listen.events][:2] == ["weights lr 0.1 -> 0.05",
                                                                       "weights lr 0.05 -> 0.025"]
    # the rate the steps after the roll-backs applied is the recorded one times the halvings
    assert tuner.weights_lr == pytest.approx(0.1 * 0.5 ** len(listen.events))


def test_a_recorders_point_at_the_epoch_end_the_tuner_just_judged_keeps_one_copy():
    tuner = contradicted(lr=0.001)
    tuner.fit(2)
    state = tuner.snapshot()  # what a recorder's checkpoint right after the epoch end does
    assert state["rollback"] is None and "rollback_checked" not in state


class SpoilOnce(st.Callback):
    """Scramble the weights once at each of the given steps (an epoch's last): that epoch's validation loss
    blows up, finite, and the retrained epoch after the roll-back is fine."""

    def __init__(self, *steps):
        self.left, self.events = set(steps), []

    def on_step(self, tuner, row):
        if tuner.counters.steps in self.left:
            self.left.discard(tuner.counters.steps)
            with torch.no_grad():
                for p in tuner.net.general_parameters():
                    p.add_(30.0 * torch.randn_like(p))

    def on_divergence(self, tuner, info):
        self.events.append(info)


def test_an_epoch_end_that_blew_up_and_then_passed_ends_the_streak_there():
    # epoch 3 blows up (step 30), rolls back to epoch 2 and passes epoch 3's end at half the rate; epoch 4's
    # blow-up is then a new problem, not the same one again, even with max_divergences = 1
    tuner, spoil = contradicted(flip=False, lr=0.05, max_divergences=1), SpoilOnce(30, 40)
    tuner.fit(6, callbacks=[spoil])
    assert [(e["step"], e["rolled_back_to"]) for e in spoil.events] == [(30, 20), (40, 30)]


@pytest.mark.parametrize("every", [None, 100])
def test_a_resume_keeps_the_interval_its_checkpoints_and_so_its_roll_backs_had(tmp_path, monkeypatch, every):
    """A run that diverges rolls back to checkpoints, so where it checkpoints is part of its result: a
    resume without --checkpoint-every takes the interval the run's checkpoints were written at and ends as
    the uninterrupted run; another interval (100 here, the default before) can end elsewhere."""
    from selftune.config import load_config
    from selftune.errors import Interrupted
    from selftune.runner import RecordedRun, prepare, resume_recorded, run_recorded
    from selftune.testing import StopAt

    monkeypatch.chdir(tmp_path)
    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.toml",
                         ["method=\"fixed\"", "epochs=4", "tuner.lr=1.5", "tuner.max_divergences=6"])
    whole = run_recorded(prepare(config), RunStore(f"sqlite:///{tmp_path / 'a.db'}"), out=tmp_path / "a",
                         checkpoint_root=tmp_path / "ck", every=7)
    store = RunStore(f"sqlite:///{tmp_path / 'b.db'}")
    run = RecordedRun.start(store, config, out=tmp_path / "b", checkpoint_root=tmp_path / "ck")
    with pytest.raises(Interrupted):
        run.drive(prepare(config), every=7, callbacks=[StopAt(10)])
    resumed = resume_recorded(store, run.run_id, every=every)
    counts = [{k: v for k, v in r.compute.items() if k != "seconds"} for r in (resumed, whole)]
    same = resumed.test == whole.test and counts[0] == counts[1]
    assert same if every is None else not same


def _small():
    """A small classifier whose tuned rate and momentum blow its validation loss up at step 21 (found by
    fuzzing the API)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    space = st.Space([st.Float("d1", 0.0, 0.9, 0.2), st.Float("d2", 0.0, 0.9, 0.3),
                      st.Float("wd", 1e-6, 1e-1, 1e-4, log=True), st.Float("lr", 1e-3, 1.0, 0.2, log=True),
                      st.Float("mom", 0.0, 0.99, 0.5)])
    net = st.hypernetize(nn.Sequential(st.Dropout("d1"), nn.Linear(8, 32), nn.ReLU(), st.Dropout("d2"),
                                       nn.Linear(32, 3)), space)
    return st.SelfTuner(net, (x[:200], y[:200]), (x[200:], y[200:]), method="one-pass", seed=0,
                        objective=st.Objective(weight_decay="wd"),
                        settings=st.TunerSettings(lr="lr", momentum="mom", batch_size=32, warmup_epochs=0))


def test_a_state_dict_resumes_exactly_across_a_later_roll_back_and_never_shares_with_its_source():
    """state_dict() carries the roll-back point (a plain one made the resume point the roll-back point: the
    resumed run rolled back to step 10, the uninterrupted one to step 7), and a state loaded in memory is
    copied (a fork shared its source's optimizer buffers, so training one changed the other)."""
    import io

    whole = _small()
    whole.fit(3)
    assert whole.divergences >= 1
    part = _small()
    part.fit(3, max_steps=10)
    buffer = io.BytesIO()
    torch.save(part.state_dict(), buffer)
    buffer.seek(0)
    resumed = _small()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    fork = _small()
    fork.load_state_dict(part.state_dict())  # in memory
    fork.fit(3)
    for tuner in (resumed, part):  # the fork trained first: its source goes on as if it had not
        tuner.fit(3)
        assert all(torch.equal(a, b) for a, b in zip(tuner.net.state_dict().values(),
                                                     whole.net.state_dict().values(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fork.net.state_dict().values(), whole.net.state_dict().values(),
                                                 strict=True))


def test_a_non_finite_validation_loss_rolls_back_with_a_loss_of_your_own():
    """With a loss of the user's the ratio rule is off, and that switched off the NaN/inf check with it:
    stn's third epoch ended with an infinite validation loss and fit returned that network."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    torch.manual_seed(0)
    space = st.Space([st.Float("d1", 0.0, 0.9, 0.2), st.Float("d2", 0.0, 0.9, 0.3),
                      st.Float("wd", 1e-6, 1e-1, 1e-4, log=True)])
    net = st.hypernetize(nn.Sequential(st.Dropout("d1"), nn.Linear(8, 32), nn.ReLU(), st.Dropout("d2"),
                                       nn.Linear(32, 1)), space, form="stn")
    tuner = st.SelfTuner(net, (x[:200], torch.ones(200)), (x[200:], torch.ones(100)), method="stn", seed=0,
                         loss=lambda o, t: F.mse_loss(o.squeeze(-1), t), objective=st.Objective(weight_decay="wd"),
                         settings=st.TunerSettings(lr=0.05, batch_size=32, warmup_epochs=0))
    fit = tuner.fit(3)
    assert tuner.divergences >= 1 and all(math.isfinite(r["val_loss"]) for r in fit.history)
    assert math.isfinite(tuner.score()["loss"])
