import io
import math
from pathlib import Path

import pytest
import torch

import selftune as st
from selftune.errors import ConfigError, DataError
from selftune.models import build

ROOT = Path(__file__).resolve().parents[1]


def rows(records, drop=()):
    """Records with NaN made comparable (a step without hyper step logs val_loss = NaN)."""
    return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k not in drop}
            for r in records]


def make_net(digits, space, form):
    torch.manual_seed(0)
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[32, 32], dropout=["d0", "d1", None])
    return st.hypernetize(model, space, form=form)


def make_tuner(digits, space, method="delta-stn", seed=0, **settings):
    net = make_net(digits, space, "stn" if method == "stn" else "delta")
    defaults = dict(batch_size=64, lr=0.05, warmup_epochs=1, log_every=5)
    defaults.update(settings)
    return st.SelfTuner(net, digits.train, digits.val, method=method, settings=st.TunerSettings(**defaults),
                        objective=st.Objective(weight_decay="wd"), seed=seed)


@pytest.mark.parametrize("form", ["stn", "delta"])
def test_hypergradient_reaches_every_hyperparameter_through_the_gates(digits, space3, form):
    net = make_net(digits, space3, form)
    with torch.no_grad():
        for layer in net.best_response_layers():
            layer.gate.normal_(std=0.1)
            layer.response_weight.normal_(std=0.1)
    net.eval()
    x, y = digits.val.tensors[0][:64], digits.val.tensors[1][:64]
    u = net.perturb(64, torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(net(x, u), y) - 1e-3 * net.entropy()
    loss.backward()
    assert net.hparams.grad is not None and torch.all(net.hparams.grad.abs() > 0), net.hparams.grad
    assert torch.all(net.scale_raw.grad.abs() > 0)


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
def test_every_hyperparameter_moves_during_a_run(digits, space3, method):
    tuner = make_tuner(digits, space3, method, warmup_epochs=0)
    before = tuner.net.hparams.detach().clone()
    tuner.fit(3)
    after = tuner.net.hparams.detach()
    assert torch.all((after - before).abs() > 1e-4), (before, after)
    assert tuner.counters.hyper_steps > 0


def test_fixed_method_keeps_hyperparameters(digits, space3):
    tuner = make_tuner(digits, space3, "fixed")
    before = tuner.net.hparams.detach().clone()
    result = tuner.fit(2)
    assert torch.equal(before, tuner.net.hparams.detach())
    assert result.compute["hyper_steps"] == 0
    assert result.compute["examples"] == 2 * len(digits.train)


@pytest.mark.parametrize("method", ["fixed", "stn", "delta-stn"])
def test_restored_tuner_continues_exactly(digits, space3, method, tmp_path):
    epochs = 3
    full = make_tuner(digits, space3, method).fit(epochs)

    first = make_tuner(digits, space3, method)
    first.fit(epochs, max_steps=23)  # stop mid-epoch, between hyper steps
    path = tmp_path / "tuner.pt"
    torch.save(first.state_dict(), path)

    second = make_tuner(digits, space3, method, seed=123)  # a different seed: the state must win
    second.load_state_dict(torch.load(path, weights_only=True))
    resumed = second.fit(epochs)

    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.hparams == full.hparams
    assert rows(resumed.trajectory) == rows(full.trajectory)
    assert rows(resumed.history, drop={"seconds"}) == rows(full.history, drop={"seconds"})
    assert resumed.compute["examples"] == full.compute["examples"]


def test_same_seed_same_run_different_seed_different_run(digits, space3):
    a = make_tuner(digits, space3, seed=1).fit(2)
    b = make_tuner(digits, space3, seed=1).fit(2)
    c = make_tuner(digits, space3, seed=2).fit(2)
    assert rows(a.trajectory) == rows(b.trajectory)
    assert rows(a.trajectory) != rows(c.trajectory)


def test_state_from_another_method_is_refused(digits, space3):
    state = make_tuner(digits, space3, "stn").state_dict()
    with pytest.raises(ValueError, match="stn"):
        make_tuner(digits, space3, "delta-stn").load_state_dict(state)


def test_method_and_form_must_agree(digits, space3):
    net = make_net(digits, space3, "stn")
    with pytest.raises(ValueError, match="form='delta'"):
        st.SelfTuner(net, digits.train, digits.val, method="delta-stn")


def test_objective_names_must_exist(digits, space3):
    net = make_net(digits, space3, "delta")
    with pytest.raises(st.errors.ConfigError, match=r"objective\.label_smoothing: 'smooth' is not a hyperparameter"):
        st.SelfTuner(net, digits.train, digits.val, objective=st.Objective(label_smoothing="smooth"))


def test_progress_bar_callback_writes_progress(digits, space3):
    from selftune.callbacks import ProgressBar

    stream = io.StringIO()
    make_tuner(digits, space3).fit(2, callbacks=[ProgressBar(file=stream)])
    text = stream.getvalue()
    assert "epoch 2: val loss" in text and "step" in text


def test_tuned_run_beats_fixed_run_on_digits_for_three_seeds(tmp_path):
    """The issue's quality bar: dropouts start at 0.6 (fixed training underfits), one delta-stn run
    reaches a lower test loss than the fixed baseline, seed by seed."""
    from selftune.config import load_config
    from selftune.runner import execute, prepare

    for seed in range(3):
        losses = {}
        for method in ("fixed", "delta-stn"):
            config = load_config(ROOT / "examples" / "digits_mlp.toml", [f'method="{method}"', f"seed={seed}"])
            losses[method] = execute(prepare(config))[1].test["loss"]
        assert losses["delta-stn"] < losses["fixed"], (seed, losses)


def test_linearized_delta_stn_tunes_and_resumes(digits, space3):
    tuner = make_tuner(digits, space3, warmup_epochs=0, linearize=True)
    before = tuner.net.hparams.detach().clone()
    tuner.fit(2)
    assert torch.all((tuner.net.hparams.detach() - before).abs() > 1e-4)


def test_hyper_learning_rate_follows_the_run_length(digits, space3):
    """A short run on a small set gets few hyper steps: an Adam rate (STN's) is raised so a hyperparameter
    can still travel `hyper_travel` units; a long run keeps the official default; a given rate is kept;
    RMSprop (Delta-STN's, whose first steps are larger than its rate) keeps its default."""
    short = make_tuner(digits, space3, "stn", warmup_epochs=1)
    short.fit(3)
    planned = 2 * short.batches_per_epoch // 5
    assert short.counters.hyper_steps == planned
    assert short.log.hyper_lr == {"lr": pytest.approx(8.0 / planned), "planned_steps": planned, "travel": 8.0,
                                  "rule": "travel"}
    assert [g["lr"] for g in short.optimizers["hyper"].param_groups] == [pytest.approx(8.0 / planned)] * 2
    from selftune.explain import explain

    assert any("hyper learning rate" in line for line in explain(short))
    many = make_tuner(digits, space3, "stn", train_steps=1, val_steps=200)
    many.fit(2, max_steps=1)
    assert many.log.hyper_lr["rule"] == "default" and many.optimizers["hyper"].param_groups[0]["lr"] == 3e-3
    rmsprop = make_tuner(digits, space3, "delta-stn")
    rmsprop.fit(2, max_steps=1)
    assert rmsprop.log.hyper_lr["rule"] == "default" and rmsprop.optimizers["hyper"].param_groups[0]["lr"] == 1e-2
    given = make_tuner(digits, space3, "stn", hyper_lr=1e-3)
    given.fit(2, max_steps=1)
    assert given.log.hyper_lr["rule"] == "given" and given.optimizers["hyper"].param_groups[0]["lr"] == 1e-3
    fixed = make_tuner(digits, space3, "fixed")
    fixed.fit(1, max_steps=1)
    assert fixed.log.hyper_lr == {}


@pytest.mark.parametrize("n, epochs", [(120, 3), (120, 5), (150, 4), (100, 6)])
def test_the_hyper_rate_is_planned_on_the_hyper_steps_the_run_takes(n, epochs):
    """Steps are counted from the run's start, warm-up included: where warm-up ends between two multiples of
    train_steps, counting the tuning epochs' steps alone planned one step fewer than the run took (1 against
    2 on 120 rows, 3 epochs: a planned travel of 8 units became 16)."""
    from torch import nn

    torch.manual_seed(0)
    x, y = torch.randn(n + 40, 6), torch.randint(0, 3, (n + 40,))
    net = st.hypernetize(nn.Sequential(nn.Linear(6, 16), st.Dropout("d"), nn.Linear(16, 3)),
                         st.Space([st.Float("d", 0.0, 0.9, 0.3)]), form="stn")
    tuner = st.SelfTuner(net, (x[:n], y[:n]), (x[n:], y[n:]), method="stn",
                         settings=st.TunerSettings(batch_size=32, warmup_epochs=1))
    tuner.fit(epochs)
    assert tuner.log.hyper_lr["planned_steps"] == tuner.counters.hyper_steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("device, match", [("cuda", "CUDA is not available here"),
                                           ("cuda:0", "CUDA is not available here"),
                                           ("gpu7", "is not a device"),
                                           ("meta", "'meta' tensors hold shapes, not values"),
                                           ("xla", "'xla' cannot run the tuner here")])
def test_a_device_the_machine_lacks_is_a_one_line_error(digits, device, match):
    """PyTorch itself fails only at the first .to(), with a message about how it was compiled."""
    space = st.Space([st.Float("d0", 0.0, 0.9, init=0.3)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), space)
    with pytest.raises(ConfigError, match=rf"^device: .*{match}"):
        st.SelfTuner(net, digits.train, digits.val, device=device)


def test_a_state_the_tuner_would_misread_is_refused_before_anything_loads(digits, space3):
    """The hyperparameters are one vector restored by position and the data order indexes the sets it was
    drawn over: another order of names swapped values silently, other bounds reinterpreted them, a larger
    training set hung the epoch and a smaller one indexed past it. Each is a one-line error naming the
    checkpoint, and the tuner is left as it was."""
    saved = make_tuner(digits, space3)
    saved.fit(1, max_steps=3)
    state = saved.state_dict()
    d0, d1, wd = space3.params
    others = {
        "the hyperparameters ['d0', 'd1', 'wd'], this tuner has ['d1', 'd0', 'wd']": st.Space([d1, d0, wd]),
        "other bounds for d1 ([0, 0.95] -> [0, 0.5])": st.Space([d0, st.Float("d1", 0.0, 0.5, init=0.3), wd])}
    for message, space in others.items():
        tuner = make_tuner(digits, space)
        before = tuner.net.hparams.detach().clone()
        with pytest.raises(ConfigError) as err:
            tuner.load_state_dict(state)
        assert str(err.value).startswith(f"checkpoint: it was saved with {message}"), err.value
        assert torch.equal(tuner.net.hparams, before)
    x, y = digits.train.tensors
    for n in (len(x) // 2, len(x) - 1):
        net = make_net(digits, space3, "delta")
        smaller = st.SelfTuner(net, (x[:n], y[:n]), digits.val, settings=st.TunerSettings(batch_size=64, lr=0.05),
                               objective=st.Objective(weight_decay="wd"), method="delta-stn")
        with pytest.raises(ConfigError, match=f"saved by a run on {len(x)} training examples, this tuner has {n}"):
            smaller.load_state_dict(state)
    older = {**state, "order": {k: v for k, v in state["order"].items() if k not in ("n_train", "n_val")}}
    older.pop("space")  # a checkpoint from before these were kept: the permutation's length and the names tell
    with pytest.raises(ConfigError, match="this tuner has 100"):
        st.SelfTuner(make_net(digits, space3, "delta"), (x[:100], y[:100]), digits.val, method="delta-stn",
                     settings=st.TunerSettings(batch_size=64),
                     objective=st.Objective(weight_decay="wd")).load_state_dict(older)
    same = make_tuner(digits, space3)
    same.load_state_dict(older)
    assert torch.equal(same.net.hparams, saved.net.hparams)


def test_arguments_that_cannot_mean_anything_are_one_line_errors(digits, space3):
    """Found by fuzzing the API: max_steps=0 trained a step, a metric named "loss" was added into the
    validation loss the run is judged by, a lone callback failed as "not iterable", score(batch_size=0)
    failed inside range()."""
    tuner = make_tuner(digits, space3)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="max_steps: must be a whole number >= 1"):
            tuner.fit(1, max_steps=bad)
    with pytest.raises(TypeError, match=r"a single one: \[callback\]"):
        tuner.fit(1, callbacks=st.Callback())
    with pytest.raises(ConfigError, match=r"metrics\['loss'\]: 'loss' is the validation loss"):
        st.SelfTuner(tuner.net, digits.train, digits.val, metrics={"loss": lambda out, t: out.sum()})
    with pytest.raises(ConfigError, match="batch_size: must be a whole number >= 1"):
        st.score(tuner.net, digits.val, batch_size=0)
    x, y = digits.val.tensors
    with pytest.raises(DataError, match=r"data: the model failed on the first.* its inputs are \(2, 1, 4, 8\)"):
        tuner.score((x[:, :, :4], y))  # was torch's own shape error from deep inside
    with pytest.raises(DataError, match="data: label 12 is outside the model's 10 outputs"):
        tuner.score((x, torch.full_like(y, 12)))
    assert tuner.counters.steps == 0


def test_fit_with_fewer_epochs_than_trained_says_epochs_is_the_total():
    from torch import nn

    from selftune.errors import SelftuneWarning

    x, y = torch.randn(100, 5), torch.randint(0, 2, (100,))
    net = st.hypernetize(nn.Sequential(nn.Linear(5, 8), st.Dropout("d"), nn.Linear(8, 2)),
                         st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    tuner = st.SelfTuner(net, (x[:80], y[:80]), (x[80:], y[80:]), settings=st.TunerSettings(batch_size=16))
    tuner.fit(3)
    with pytest.warns(SelftuneWarning, match=r"fit\(2\): this tuner has already trained 3 epochs.*fit\(5\) trains 2"):
        tuner.fit(2)
    assert tuner.epoch == 3


def test_a_later_fit_past_the_planned_schedule_is_refused_or_warned_in_one_line():
    """fit(2) then fit(4): OneCycleLR was PyTorch's raw ValueError at step 21; a cosine trained epochs 3-4 at
    a rate of 0 without a word (the first fit plans the schedule, as documented)."""
    from torch import nn

    from selftune.errors import SelftuneWarning

    x, y = torch.randn(100, 5), torch.randint(0, 2, (100,))

    def tuner(**settings):
        net = st.hypernetize(nn.Sequential(nn.Linear(5, 8), st.Dropout("d"), nn.Linear(8, 2)),
                             st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
        return st.SelfTuner(net, (x[:80], y[:80]), (x[80:], y[80:]), method="fixed",
                            settings=st.TunerSettings(batch_size=16, lr=0.1, **settings))

    one_cycle = tuner(lr_scheduler="OneCycleLR", lr_scheduler_args={"max_lr": 0.2}, lr_scheduler_interval="step")
    one_cycle.fit(2)
    with pytest.raises(ConfigError, match=r"epochs: fit\(4\) trains past the 2 epochs .*OneCycleLR.*fit\(4\) on a "
                                          r"fresh tuner"):
        one_cycle.fit(4)
    cosine = tuner(schedule={"kind": "cosine"})
    cosine.fit(2)
    with pytest.warns(SelftuneWarning, match=r"fit\(4\): this tuner's first fit planned its learning-rate schedule "
                                             r"for 2 epochs"):
        cosine.fit(4)
    import warnings

    # nothing there depends on the run's length: a longer fit goes on as one fit would
    for settings in ({}, {"schedule": {"kind": "step", "step_epochs": 1}}, {"lr_scheduler": "StepLR",
                                                                            "lr_scheduler_args": {"step_size": 1}}):
        plain = tuner(**settings)
        plain.fit(2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SelftuneWarning)
            plain.fit(4)


def test_fit_leaves_the_net_in_the_mode_it_found_it_in(digits, space3):
    """fit left the net in training mode, so predictions right after it dropped units at random even for a
    caller who had put it in eval mode (found by a fuzz round)."""
    tuner = make_tuner(digits, space3)
    tuner.net.eval()
    tuner.fit(1)
    assert not tuner.net.training
    x = digits.val.tensors[0][:50]
    assert torch.equal(tuner.net(x), tuner.net(x))  # no dropout: the same predictions twice
    tuner.net.train()
    tuner.fit(2)
    assert tuner.net.training
