"""Loop options PyTorch users bring: gradient accumulation, torch.optim.lr_scheduler classes, and
regression targets that the default cross-entropy must not swallow."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selftune as st
from selftune.errors import ConfigError, DataError
from selftune.testing import StopAt, cli

ROOT = Path(__file__).resolve().parents[1]


def classification(n=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1]) > 0).long()
    return x, y


def decay_net(seed=0):
    """No dropout: a weight step is a deterministic function of the batch, so micro-batches can be
    compared with one large batch."""
    torch.manual_seed(seed)
    space = st.Space([st.Float("wd", 1e-6, 1e-1, 1e-3, log=True)])
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    return st.hypernetize(model, space, form="delta")


def dropout_net(seed=0):
    torch.manual_seed(seed)
    space = st.Space([st.Float("drop", 0.0, 0.9, 0.3)])
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), st.Dropout("drop"), nn.Linear(32, 2))
    return st.hypernetize(model, space)


def tuner(net, method="fixed", **settings):
    x, y = classification()
    defaults = {"lr": 0.1, "batch_size": 64, "warmup_epochs": 0, "log_every": 1}
    return st.SelfTuner(net, (x[:256], y[:256]), (x[256:], y[256:]), method=method,
                        objective=st.Objective(weight_decay="wd") if "wd" in net.space else None,
                        settings=st.TunerSettings(**{**defaults, **settings}))


# -- gradient accumulation ------------------------------------------------------------------------------

def test_accumulated_micro_batches_take_the_step_of_the_large_batch():
    big = tuner(decay_net(), batch_size=64)
    small = tuner(decay_net(), batch_size=16, accumulate=4)
    a, b = big.fit(3), small.fit(3)
    assert small.batches_per_epoch == big.batches_per_epoch == 4
    assert a.compute["steps"] == b.compute["steps"] and a.compute["examples"] == b.compute["examples"]
    for p, q in zip(big.net.parameters(), small.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # The logged training loss is the large batch's mean, not one micro-batch's.
    assert math.isclose(a.trajectory[-1]["train_loss"], b.trajectory[-1]["train_loss"], rel_tol=1e-4)


def test_accumulation_under_delta_stn_reaches_every_hyperparameter_and_resumes_exactly():
    whole = tuner(dropout_net(), method="delta-stn", batch_size=16, accumulate=3)
    whole.fit(3)
    assert all(whole.log.hypergrad_seen)
    first = tuner(dropout_net(), method="delta-stn", batch_size=16, accumulate=3)
    first.fit(3, callbacks=[StopAt(7)])
    state = first.state_dict()
    second = tuner(dropout_net(), method="delta-stn", batch_size=16, accumulate=3)
    second.load_state_dict(state)
    second.fit(3)
    for p, q in zip(whole.net.state_dict().values(), second.net.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_accumulation_larger_than_the_data_is_refused():
    with pytest.raises(DataError, match=r"tuner.batch_size x tuner.accumulate \(64 x 8\).*lower tuner.accumulate"):
        tuner(decay_net(), batch_size=64, accumulate=8)


# -- torch.optim.lr_scheduler ---------------------------------------------------------------------------

def reference_rates(cls, steps, lr, **kwargs):
    """The rate a plain PyTorch loop with the scheduler trains at in each of ``steps`` steps."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = cls(opt, **kwargs)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


def test_a_per_step_one_cycle_schedule_follows_pytorchs_own_curve():
    t = tuner(decay_net(), lr_scheduler="OneCycleLR", lr_scheduler_args={"max_lr": 0.5},
              lr_scheduler_interval="step")
    fit = t.fit(5)
    used = [row["weights_lr"] for row in fit.trajectory]  # the rate of each step, logged after it
    expected = reference_rates(torch.optim.lr_scheduler.OneCycleLR, 20, 0.1, max_lr=0.5, total_steps=20,
                               cycle_momentum=False)
    assert len(used) == 20
    assert used == pytest.approx(expected, rel=1e-9)
    assert max(used) == pytest.approx(0.5, rel=1e-3)  # max_lr is an absolute rate, as in PyTorch


def test_a_per_epoch_step_schedule_halves_the_rate_each_epoch_and_the_schedule_records_it():
    t = tuner(decay_net(), lr_scheduler="steplr", lr_scheduler_args={"step_size": 1, "gamma": 0.5})
    fit = t.fit(3)
    per_epoch = [row["weights_lr"] for row in fit.trajectory][::4]
    assert per_epoch == pytest.approx([0.1, 0.05, 0.025])
    schedule = fit.schedule
    assert schedule.lr_at(9) == pytest.approx(0.025)


def test_reduce_on_plateau_reads_the_validation_loss():
    """Each epoch trains at the rate PyTorch's ReduceLROnPlateau gives after seeing the validation losses
    of the epochs before; a rate of 2.0 makes the loss stall, so the rate does drop."""
    t = tuner(decay_net(), lr=2.0, lr_scheduler="ReduceLROnPlateau", lr_scheduler_args={"patience": 0, "factor": 0.1})
    fit = t.fit(6)
    per_epoch = [row["weights_lr"] for row in fit.trajectory][::4]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    expected = []
    for row in fit.history:
        expected.append(opt.param_groups[0]["lr"])
        reference.step(row["val_loss"])
    assert per_epoch == pytest.approx(expected)
    assert min(per_epoch) < 2.0


def test_a_tuned_rate_keeps_the_schedules_shape_and_resume_is_exact():
    def make():
        net = decay_net()
        space = st.Space([*net.space.params, st.Float("lr", 1e-3, 1.0, 0.1, log=True)])
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
        return tuner(st.hypernetize(model, space, form="delta"), method="hd", lr="lr",
                     lr_scheduler="CosineAnnealingLR", lr_scheduler_interval="step")
    whole = make()
    fit = whole.fit(4)
    assert fit.trajectory[-1]["weights_lr"] < 0.05 * fit.hparams["lr"]  # the cosine's tail, on the tuned base
    first = make()
    first.fit(4, callbacks=[StopAt(6)])
    second = make()
    second.load_state_dict(first.state_dict())
    again = second.fit(4)
    assert [r["weights_lr"] for r in again.trajectory] == [r["weights_lr"] for r in fit.trajectory]
    for p, q in zip(whole.net.state_dict().values(), second.net.state_dict().values(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("settings", "field", "words"), [
    ({"lr_scheduler": "Cosine"}, "tuner.lr_scheduler", "unknown learning-rate scheduler 'Cosine'"),
    ({"lr_scheduler": "StepLR", "lr_scheduler_args": {"step": 3}}, "tuner.lr_scheduler_args.step", "step_size"),
    ({"lr_scheduler": "StepLR"}, "tuner.lr_scheduler_args", "step_size"),
    ({"lr_scheduler": "StepLR", "lr_scheduler_args": {"step_size": 2}, "schedule": {"kind": "cosine"}},
     "tuner.lr_scheduler", "not both"),
    ({"lr_scheduler": "ReduceLROnPlateau", "lr_scheduler_interval": "step"}, "tuner.lr_scheduler_interval",
     "once per epoch"),
    ({"lr_scheduler": "OneCycleLR", "lr_scheduler_args": {"max_lr": 1.0, "cycle_momentum": True}},
     "tuner.lr_scheduler_args.cycle_momentum", "learning rate only"),
    ({"lr_scheduler_args": {"gamma": 0.5}}, "tuner.lr_scheduler_args", "without tuner.lr_scheduler"),
])
def test_bad_scheduler_settings_name_the_field(settings, field, words):
    # built in Python, the settings raise the same one-line ConfigError (a ValueError) a config file gives
    with pytest.raises(ConfigError) as err:
        st.TunerSettings(**settings)
    assert f"{field}: " in str(err.value) and words in str(err.value)


def test_the_scheduler_from_a_config_file_and_its_error_on_the_command_line(tmp_path):
    config = (ROOT / "examples" / "digits_mlp.toml").read_text()
    good = tmp_path / "good.toml"
    good.write_text(config.replace("[tuner]", '[tuner]\nlr_scheduler = "OneCycleLR"\nlr_scheduler_interval = "step"\n'
                                              'accumulate = 2\nlr_scheduler_args = {max_lr = 0.1}\n', 1))
    proc = cli(["run", str(good), "--method", "fixed", "--set", "epochs=2", "--set", "model.hidden=[16, 16]",
                "--out", "out", "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(config.replace("[tuner]", '[tuner]\nlr_scheduler = "OneCycle"\n', 1))
    proc = cli(["run", str(bad), "--out", "out2"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "tuner.lr_scheduler" in proc.stderr and "OneCycleLR" in proc.stderr
    assert not (tmp_path / "out2").exists()


# -- float targets under the default cross-entropy ------------------------------------------------------

def test_regression_targets_with_the_default_loss_are_refused_with_the_fix():
    x = torch.randn(64, 8)
    y = torch.randn(64, 1)
    torch.manual_seed(0)
    net = st.hypernetize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), st.Dropout("d"), nn.Linear(16, 1)),
                         st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    with pytest.raises(DataError, match=r"single output is 0 .*mse_loss\(out.squeeze\(-1\), y\)"):
        st.SelfTuner(net, (x[:48], y[:48]), (x[48:], y[48:]), settings=st.TunerSettings(batch_size=16))
    # The same data with the loss it needs trains.
    st.SelfTuner(net, (x[:48], y[:48]), (x[48:], y[48:]), loss=F.mse_loss, settings=st.TunerSettings(batch_size=16))


def test_float_targets_that_are_not_probabilities_are_refused():
    x = torch.randn(64, 8)
    y = torch.randn(64, 3)  # three regression outputs, not a distribution over three classes
    torch.manual_seed(0)
    net = st.hypernetize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), st.Dropout("d"), nn.Linear(16, 3)),
                         st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    with pytest.raises(DataError, match=r"are read as class probabilities by cross-entropy, but these are not"):
        st.SelfTuner(net, (x[:48], y[:48]), (x[48:], y[48:]), settings=st.TunerSettings(batch_size=16))
    soft = torch.softmax(y, dim=-1)  # real soft labels still train with cross-entropy
    st.SelfTuner(net, (x[:48], soft[:48]), (x[48:], soft[48:]), settings=st.TunerSettings(batch_size=16)).fit(1)
