"""No frozen hyperparameters, idle ones reported, and the end-of-run explanation (issue: "Tuning that
finds the right direction", items 3 and 7)."""

import warnings

import pytest
import torch

import selftune as st
from selftune.errors import SelftuneWarning
from selftune.explain import explain
from selftune.models import build


def _tuner(digits, space, method="delta-stn", **settings):
    torch.manual_seed(0)
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[32, 32], dropout=["d0", "d1", None])
    net = st.hypernetize(model, space, form="stn" if method == "stn" else "delta")
    base = dict(batch_size=64, lr=0.05, warmup_epochs=1, log_every=5)
    base.update(settings)
    return st.SelfTuner(net, digits.train, digits.val, method=method, settings=st.TunerSettings(**base), seed=0)


def test_an_init_on_a_bound_is_pulled_inside_with_a_warning_and_then_moves(digits):
    space = st.Space([st.Float("d0", 0.0, 0.95, init=0.0), st.Float("d1", 0.0, 0.95, init=0.5)])
    with pytest.warns(SelftuneWarning, match=r"d0 0 -> 0\.019.*on a bound"):
        tuner = _tuner(digits, space)
    start = tuner.net.values()["d0"]
    assert start == pytest.approx(0.019, abs=1e-3) and tuner.net.values()["d1"] == pytest.approx(0.5, abs=1e-4)
    tuner.fit(6)
    # From the bound itself it moved by less than 1e-4 in a whole run (the sigmoid is flat there).
    assert abs(tuner.net.values()["d0"] - start) > 3e-3


def test_fixed_training_keeps_an_init_on_its_bound(digits):
    space = st.Space([st.Float("d0", 0.0, 0.95, init=0.0), st.Float("d1", 0.0, 0.95, init=0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelftuneWarning)
        tuner = _tuner(digits, space, method="fixed")
    assert tuner.net.values()["d0"] < 1e-3


def test_a_hyperparameter_that_drives_nothing_is_reported(digits):
    space = st.Space([st.Float("d0", 0.0, 0.95, init=0.5), st.Float("d1", 0.0, 0.95, init=0.5),
                      st.Float("unused", 0.0, 1.0, init=0.5)])
    tuner = _tuner(digits, space)
    with pytest.warns(SelftuneWarning, match="unused drive"):
        tuner.fit(3)
    lines = explain(tuner)
    assert any(line.startswith("unused:") and "drives nothing" in line for line in lines), lines
    assert not any(line.startswith("d0:") and "drives nothing" in line for line in lines)
    # it feeds the response layers, so it had a hypergradient and drifted (0.5 -> 0.5089) under that line
    assert abs(tuner.net.values()["unused"] - 0.5) < 1e-6 and abs(tuner.net.values()["d0"] - 0.5) > 1e-3


def test_the_explanation_says_what_moved_and_how_the_validation_loss_went(digits):
    space = st.Space([st.Float("d0", 0.0, 0.95, init=0.8), st.Float("d1", 0.0, 0.95, init=0.8)])
    tuner = _tuner(digits, space, warmup_epochs=0)
    tuner.fit(8)
    lines = explain(tuner)
    assert len(lines) == 3
    for line, name in zip(lines, ("d0", "d1"), strict=False):
        assert line.startswith(f"{name}: 0.8 -> ")
        assert "moved down" in line  # from an over-regularised start, the rates come down
    assert lines[-1].startswith("validation loss: ") and "after epoch 8" in lines[-1]
    fixed = _tuner(digits, space, method="fixed")
    fixed.fit(2)
    assert explain(fixed)[0].startswith("fixed: every hyperparameter held at its init value")


def test_the_cli_prints_warnings_as_one_line(tmp_path, capsys, monkeypatch):
    from selftune.cli import main
    from selftune.testing import DIGITS_CONFIG

    monkeypatch.chdir(tmp_path)
    code = main(["run", str(DIGITS_CONFIG), "--set", "epochs=2", "--set", "space.dropout1.init=0.0", "--quiet",
                 "--store", f"sqlite:///{tmp_path / 's.db'}"])
    captured = capsys.readouterr()
    assert code == 0
    warning_lines = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("selftune: warning: space: dropout1 0 -> ")
    assert "dropout1: 0 -> " in captured.out or "dropout1: 0.019" in captured.out


def test_hd_says_how_its_rate_moved_and_that_the_rest_was_held(digits):
    """hd tunes only a bound rate: the explanation reports that rate's move (it used to call the whole
    run a baseline) and names what stayed at its init."""
    space = st.Space([st.Float("d0", 0.0, 0.95, init=0.2), st.Float("d1", 0.0, 0.95, init=0.2),
                      st.Float("lr", 1e-4, 1.0, init=0.005, log=True)])
    tuner = _tuner(digits, space, method="hd", lr="lr", warmup_epochs=0)
    tuner.fit(2)
    lines = explain(tuner)
    assert lines[0].startswith("lr: 0.005 -> ") and "moved up" in lines[0]
    assert lines[1] == "hd: d0, d1 held at their init values"
    assert lines[-1].startswith("validation loss: ")


def test_a_validation_loss_that_ended_far_above_its_lowest_is_pointed_out(digits):
    space = st.Space([st.Float("d0", 0.0, 0.95, init=0.5), st.Float("d1", 0.0, 0.95, init=0.5)])
    tuner = _tuner(digits, space, method="fixed")
    tuner.fit(3)
    assert not any("ended" in line for line in explain(tuner))
    for epoch, loss in ((1, 0.9), (2, 0.3), (3, 0.6)):  # what an over-fitting or blowing-up run records
        tuner.log.history[epoch - 1]["val_loss"] = loss
    line = explain(tuner)[-1]
    assert line.startswith("the validation loss ended 2x its lowest") and "epoch 2" in line, line
    assert not any("ended" in x for x in explain(tuner, kept_epoch=2))
    assert explain(tuner, kept_epoch=2)[-1].startswith("returned the weights and hyperparameters of epoch 2")


def test_explain_of_a_keep_best_tuner_describes_what_it_returns():
    """explain(tuner), as documented, said the returned model was the last epoch's and keep = "best" *would*
    return the best one, on a run that kept it: only the runner passed the kept epoch."""
    from torch import nn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    space = st.Space([st.Float("d1", 0.0, 0.9, 0.2), st.Float("d2", 0.0, 0.9, 0.3),
                      st.Float("wd", 1e-6, 1e-1, 1e-4, log=True)])
    net = st.hypernetize(nn.Sequential(st.Dropout("d1"), nn.Linear(8, 32), nn.ReLU(), st.Dropout("d2"),
                                       nn.Linear(32, 3)), space)
    tuner = st.SelfTuner(net, (x[:200], y[:200]), (x[200:], y[200:]), method="delta-stn", seed=0,
                         objective=st.Objective(weight_decay="wd"),
                         settings=st.TunerSettings(lr=0.5, batch_size=32, warmup_epochs=0, keep="best"))
    fit = tuner.fit(5)
    assert fit.kept_epoch is not None and fit.kept_epoch < 5
    lines = explain(tuner)
    assert any(line.startswith(f"returned the weights and hyperparameters of epoch {fit.kept_epoch},")
               for line in lines), lines
    assert not any("would return" in line for line in lines), lines


def test_a_run_without_hyper_steps_says_why_warm_up_or_too_few_steps():
    """It blamed the warm-up also where the epochs after it had fewer weight steps than train_steps."""
    import torch
    from torch import nn

    import selftune as st
    from selftune.explain import explain

    x, y = torch.randn(50, 5), torch.randint(0, 2, (50,))
    net = st.hypernetize(nn.Sequential(nn.Linear(5, 8), st.Dropout("d"), nn.Linear(8, 2)),
                         st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    short = st.SelfTuner(net, (x[:32], y[:32]), (x[32:], y[32:]), method="delta-stn",
                         settings=st.TunerSettings(batch_size=16))
    short.fit(2)
    assert "no hyper step was taken (the 1 epochs after warm-up took fewer than the 5 weight steps between hyper " \
           "steps; train longer or lower tuner.train_steps)" in explain(short)
    warm = st.SelfTuner(net, (x[:32], y[:32]), (x[32:], y[32:]), method="delta-stn",
                        settings=st.TunerSettings(batch_size=16))
    warm.fit(1)
    assert "no hyper step was taken (1 warm-up epochs cover the run)" in explain(warm)


def test_a_network_that_learned_nothing_is_said_to():
    """A dead network (stop 34's digits_bn from 0.8 dropouts, noise and a heavy decay) read only as "validation
    loss 2.3158 -> 2.3137": nothing said that it never beat a uniform guess, nor that it gives no signal."""
    from selftune.testing import digits_tuner

    dead = digits_tuner("tuner.lr=1e-9", method="delta-stn")
    dead.fit(2)
    said = " ".join(explain(dead))
    assert "the validation loss never went below 0.95x a uniform guess's (log 10 = 2.3026)" in said, said
    alive = digits_tuner(method="delta-stn")
    alive.fit(2)
    assert "uniform guess" not in " ".join(explain(alive))
