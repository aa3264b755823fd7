"""Divergence recovery: injected NaNs roll the run back to its last good state with a lower rate."""

import math

import pytest
import torch

import selftune as st
from selftune.errors import ConfigError, Interrupted
from selftune.models import build
from selftune.store import RunStore, StoreRecorder
from selftune.tuner import DivergenceError, NonFiniteError


def make_tuner(digits, **settings):
    torch.manual_seed(0)
    space = st.Space([st.Float("d0", 0.0, 0.95, init=0.5), st.Float("d1", 0.0, 0.95, init=0.5)])
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[32, 32], dropout=["d0", "d1", None])
    net = st.hypernetize(model, space)
    base = dict(batch_size=64, lr=0.05, warmup_epochs=0, log_every=5)
    base.update(settings)
    return st.SelfTuner(net, digits.train, digits.val, settings=st.TunerSettings(**base), seed=0)


class Inject(st.Callback):
    """Poison the weights (or the hyperparameters) once, after step `at`."""

    def __init__(self, at, target="weights", times=1):
        self.at, self.target, self.left = at, target, times
        self.events = []

    def on_step(self, tuner, row):
        if tuner.counters.steps == self.at and self.left:
            self.left -= 1
            with torch.no_grad():
                if self.target == "weights":
                    tuner.net.general_parameters()[0].fill_(math.nan)
                else:
                    tuner.net.hparams.fill_(math.nan)

    def on_divergence(self, tuner, info):
        self.events.append(info)


@pytest.mark.parametrize("target, group, optimizers", [("weights", "general", ("general", "response")),
                                                       ("hparams", "hyper", ("hyper",))])
def test_injected_nan_rolls_back_lowers_the_rate_and_finishes(digits, target, group, optimizers):
    tuner = make_tuner(digits)
    before = {k: [g["lr"] for g in o.param_groups] for k, o in tuner.optimizers.items()}
    inject = Inject(at=30, target=target)
    result = tuner.fit(3, callbacks=[inject])
    assert len(inject.events) == 1 and inject.events[0]["group"] == group
    assert inject.events[0]["rolled_back_to"] == 18  # the epoch end before the poison
    assert tuner.divergences == 1
    for key, opt in tuner.optimizers.items():
        expected = [lr * 0.5 if key in optimizers else lr for lr in before[key]]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)
    assert all(math.isfinite(v) for v in result.hparams.values())
    assert all(torch.isfinite(p).all() for p in tuner.net.parameters())
    steps = [r["step"] for r in result.trajectory]
    assert steps == list(range(5, tuner.counters.steps + 1, 5))  # no row lost or repeated by the roll-back


class BlowUpResponse(st.Callback):
    """Grow Delta-STN's response paths to the edge of float32 at step `at`, an epoch end, so the roll-back
    target itself holds them (as a response that grows over many steps would): the net at its own
    hyperparameters is untouched, a perturbed forward overflows."""

    def __init__(self, at):
        self.at, self.events = at, []

    def on_step(self, tuner, row):
        if tuner.counters.steps == self.at:
            with torch.no_grad():
                for p in tuner.net.response_parameters():
                    p.mul_(1e20).add_(1e-3)

    def on_divergence(self, tuner, info):
        self.events.append(info)


def test_a_roll_back_restarts_a_blown_up_response_and_the_run_finishes(digits):
    tuner = make_tuner(digits)
    blow = BlowUpResponse(at=18)  # the end of epoch 1: the snapshot taken next holds the blown-up response
    result = tuner.fit(3, callbacks=[blow])
    assert blow.events and "response paths reset" in blow.events[0]["message"]
    assert all(torch.isfinite(p).all() for p in tuner.net.parameters())
    assert math.isfinite(result.history[-1]["val_loss"])


def test_reset_response_keeps_the_net_at_its_hyperparameters(digits):
    tuner = make_tuner(digits)
    tuner.fit(1)
    net, x = tuner.net, digits.val.tensors[0][:32]
    with torch.no_grad():
        for p in net.response_parameters():
            p.mul_(50.0)
    net.eval()
    before = net(x).detach()
    net.reset_response()
    assert torch.allclose(net(x), before, atol=1e-5)  # the delta form's response is zero at the net's values
    for layer in net.best_response_layers():
        assert float(layer.gate.detach().abs().max()) == 0.0
        assert float(layer.response_weight.detach().norm()) <= float(layer.weight.detach().norm()) * (1 + 1e-6)


def test_repeated_divergence_fails_clearly_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run = store.create_run(method="delta-stn", seed=0, config={}, out_dir=str(tmp_path / "out"),
                           checkpoint_root=str(tmp_path / "ck"))
    tuner = make_tuner(digits, max_divergences=2)
    info = store.get_run(run)
    recorder = StoreRecorder(store, run, info.checkpoint_dir, run_uuid=info.uuid, every=10)
    with pytest.raises(DivergenceError, match="diverged 3 times") as err:
        tuner.fit(4, callbacks=[Inject(at=25, times=99), recorder])
    assert "lower tuner.lr" in str(err.value)
    events = store.events(run)
    assert [e["kind"] for e in events] == ["divergence", "divergence"]
    step, _, path = store.checkpoints(run)[-1]
    assert step == 20
    saved = torch.load(path, weights_only=True)
    assert saved["run_uuid"] == info.uuid
    state = saved["tuner"]
    assert all(torch.isfinite(t).all() for t in state["net"].values())
    fresh = make_tuner(digits)
    fresh.load_state_dict(state)
    fresh.fit(2)  # the last good checkpoint is usable


def test_the_limit_counts_roll_backs_in_a_row_so_a_run_that_recovers_each_time_finishes(digits):
    """Divergences far apart, each recovered from, used to add up to the limit and fail a run near its
    end (measured: breast-cancer from a rate 10x too large, the fourth at step 790 of 800)."""
    per_epoch = make_tuner(digits).batches_per_epoch
    spread = [Inject(at=per_epoch + 3), Inject(at=3 * per_epoch + 3), Inject(at=5 * per_epoch + 3)]
    tuner = make_tuner(digits, max_divergences=1)
    result = tuner.fit(6, callbacks=spread)
    assert tuner.divergences == 3 and tuner.log.streak == 0
    assert math.isfinite(result.history[-1]["val_loss"]) and len(result.history) == 6

    again = make_tuner(digits, max_divergences=1)  # twice at the same step: no progress between them
    with pytest.raises(DivergenceError, match=r"diverged 2 times in a row, 3 in all"):
        again.fit(6, callbacks=[Inject(at=per_epoch + 3), Inject(at=3 * per_epoch + 3, times=2)])


def test_a_loss_driven_non_finite_by_runaway_hyperparameters_blames_the_hyper_rate(digits):
    """hyper_lr far too large throws the hyperparameters (which the gates read) to 1e8; the weights' loss
    then turns non-finite, and the advice was to lower the weights' rate."""
    tuner = make_tuner(digits, hyper_lr=1e8, max_divergences=1)
    with pytest.raises(DivergenceError, match=r"ran away.*lower tuner\.hyper_lr$"):
        tuner.fit(4)


def test_a_hyperparameter_parked_far_out_leaves_a_weights_divergence_on_the_weights(digits):
    """The runaway rule looks at a jump since the roll-back point, not a level: a value a long run parked at
    its bound (unconstrained 60) is no runaway, and the weights' rate is the one lowered."""
    tuner = make_tuner(digits)
    with torch.no_grad():
        tuner.net.hparams[0] = 60.0
    poison = Inject(at=3)
    tuner.fit(1, callbacks=[poison])
    assert [e["group"] for e in poison.events] == ["general"]


def test_the_advice_names_only_settings_the_run_has(digits):
    tuner = make_tuner(digits, lr=50.0, max_divergences=0, grad_clip=1e6)
    with pytest.raises(DivergenceError) as err:
        tuner.fit(1)
    assert "lower tuner.grad_clip" in str(err.value) and "set tuner.grad_clip" not in str(err.value)
    fixed = st.SelfTuner(make_tuner(digits).net, digits.train, digits.val, method="fixed",
                         settings=st.TunerSettings(batch_size=64, lr=50.0, max_divergences=0))
    with pytest.raises(DivergenceError) as err:
        fixed.fit(1)
    assert "response_lr" not in str(err.value)


def test_a_hopeless_learning_rate_fails_with_a_clear_message(digits):
    """lr=50 wrecks the weights within a few steps of the first roll-back target, and lowering it by 10%
    a time cannot save the run: it must stop with a message that says what to change, not loop or crash."""
    tuner = make_tuner(digits, lr=50.0, max_divergences=3, divergence_lr_factor=0.9)
    events = []

    class Listen(st.Callback):
        def on_divergence(self, tuner, info):
            events.append(info)

    with pytest.raises(DivergenceError, match=r"diverged 4 times.*lower tuner\.lr"):
        tuner.fit(2, callbacks=[Listen()])
    assert len(events) == 3
    assert all(e["group"] in ("general", "response", "weights") for e in events)
    assert tuner.optimizers["general"].param_groups[0]["lr"] == pytest.approx(50.0 * 0.9**3)


def test_a_roll_back_in_benchmark_mode_keeps_every_trajectory_row(digits, tmp_path):
    """Benchmarks checkpoint only at the end: a roll-back to the last epoch end must not drop the
    rows logged before it (the store once kept 5 of 20 rows: two owners of the roll-back point)."""
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    run = store.create_run(method="delta-stn", seed=0, config={}, out_dir=str(tmp_path / "out"),
                           checkpoint_root=str(tmp_path / "ck"))
    info = store.get_run(run)
    tuner = make_tuner(digits)
    recorder = StoreRecorder(store, run, info.checkpoint_dir, run_uuid=info.uuid, every=2**62, at_epoch_end=False)
    steps_per_epoch = tuner.batches_per_epoch
    result = tuner.fit(4, callbacks=[Inject(at=2 * steps_per_epoch + 3), recorder])
    assert tuner.divergences == 1
    stored = [r["step"] for r in store.trajectory(run)]
    assert stored == [r["step"] for r in result.trajectory] == list(range(5, tuner.counters.steps + 1, 5))
    assert [r["epoch"] for r in store.epochs(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize("make", [
    lambda: NonFiniteError("weight gradient", "weights", 75),
    lambda: ConfigError("tuner.lr", "must be > 0"),
    lambda: Interrupted("stopped by SIGTERM", 15),
])
def test_errors_survive_copy_and_pickle_as_ray_needs(make):
    """Ray copies the exception a PBT member raised, its cause included; an exception whose constructor
    takes more than its message must rebuild from its own arguments (a member that diverged at a rate 10x
    too large crashed the whole benchmark before this)."""
    import copy
    import pickle

    err = make()
    for again in (copy.copy(err), pickle.loads(pickle.dumps(err))):
        assert type(again) is type(err) and str(again) == str(err)
        assert again.__dict__ == err.__dict__
