"""``delta-ift``: Delta-STN that hands over to implicit hypergradients once the validation loss stalls
for as long as it improved. The rule reads the run's own time scale, the handover is checkpointed (a
resumed run hands over where an uninterrupted one does), and from an over-fitting start the run adds
regularisation and beats fixed training, where Delta-STN alone does not."""

import math
from pathlib import Path

import pytest
import torch

from selftune.config import load_config
from selftune.errors import ConfigError
from selftune.explain import explain
from selftune.handover import handover_epoch, patience
from selftune.implicit import POWER_STEPS, spacing
from selftune.runner import execute, prepare
from selftune.settings import TunerSettings

ROOT = Path(__file__).resolve().parents[1]
OVERFIT = {"dropout_in": 0.0, "dropout1": 0.0, "dropout2": 0.0, "weight_decay": 1e-6}


def diabetes(method: str = "delta-ift", epochs: int = 150, overrides: list[str] | None = None):
    """examples/own_task.toml (a wide MLP on 150 diabetes patients) from no regularisation: its
    validation loss is lowest within the first ten epochs and rises after."""
    return load_config(ROOT / "examples" / "own_task.toml", overrides).derive(method=method, values=OVERFIT,
                                                                              epochs=epochs)


def test_the_patience_is_as_long_as_the_loss_improved_and_a_share_of_the_run():
    s = TunerSettings()
    assert patience(s, 150, 1) == 15  # an early best: 10% of the run
    assert patience(s, 40, 21) == 21  # a best that took 21 epochs waits 21 more
    assert patience(s, 10, 0) == 2  # never under two epochs
    assert patience(TunerSettings(handover_patience=0.5), 40, 3) == 20


def test_a_loss_that_stalls_without_rising_does_not_hand_over():
    tuner = prepare(diabetes(epochs=40)).tuner
    tuner.planned_epochs = 40
    flat = [1.0, 0.8, 0.7] + [0.72, 0.74] * 18  # 3-6% above its best for 36 epochs: stalled, not over-fitting
    assert _feed(tuner, flat) is None


def test_a_negative_validation_loss_that_stalls_does_not_hand_over_and_one_that_rises_does():
    """A loss of the user's may be negative (a Gaussian NLL): 1.1 x a negative best lies below it, so a stall
    read as a 10% rise and the run handed over (found by a fuzz round)."""
    tuner = prepare(diabetes(epochs=40)).tuner
    tuner.planned_epochs = 40
    assert _feed(tuner, [x - 5.0 for x in [1.0, 0.8, 0.7] + [0.72, 0.74] * 18]) is None  # -4.3 then -4.27
    tuner = prepare(diabetes(epochs=40)).tuner
    tuner.planned_epochs = 40
    assert _feed(tuner, [-1.0, -1.2, -1.3] + [-1.3 + 0.06 * k for k in range(1, 37)]) is not None


def _feed(tuner, losses):
    for epoch, loss in enumerate(losses, start=1):
        tuner.algorithm.on_epoch_end(tuner, {"epoch": epoch, "val_loss": loss})
    return handover_epoch(tuner.log.algorithm)


def test_a_rising_validation_loss_hands_over_and_a_noisy_improving_one_does_not():
    tuner = prepare(diabetes(epochs=40)).tuner
    tuner.planned_epochs = 40
    rising = [1.0, 0.8, 0.7] + [0.7 + 0.03 * k for k in range(1, 37)]  # best at epoch 3, then up
    # waited from epoch 7 (patience max(2, 4, 3 - 1 warm-up epoch) = 4), 10.7% above the best on average by then
    assert _feed(tuner, rising) == 7
    tuner = prepare(diabetes(epochs=40)).tuner
    tuner.planned_epochs = 40
    slower = [1.0, 0.8, 0.7] + [0.7 + 0.015 * k for k in range(1, 37)]
    assert _feed(tuner, slower) == 12  # waited at 7, but 10% above on average only after 9 epochs
    assert tuner.optimizers["hyper"].param_groups[0]["momentum"] == pytest.approx(0.9)
    tuner = prepare(diabetes(epochs=40)).tuner
    tuner.planned_epochs = 40
    g = torch.Generator().manual_seed(0)
    # a slow improvement under noise: each new best comes before the wait since the last one has passed
    noisy = [float(0.5 - 0.004 * e + 0.01 * torch.randn(1, generator=g)) for e in range(1, 41)]
    assert _feed(tuner, noisy) is None


def test_from_an_over_fitting_start_it_hands_over_adds_regularisation_and_beats_fixed_and_delta_stn():
    prepared = prepare(diabetes())
    _, tuned = execute(prepared)
    _, fixed = execute(prepare(diabetes("fixed")))
    _, delta = execute(prepare(diabetes("delta-stn")))
    at = handover_epoch(prepared.tuner.log.algorithm)
    assert at is not None
    assert any(f"took over from Delta-STN after epoch {at}" in line for line in explain(prepared.tuner))
    # some regulariser rose to a fifth of its range (this run: the decay from 1e-6 to the 0.1 bound)
    dropouts = [tuned.hparams[k] for k in ("dropout_in", "dropout1", "dropout2")]
    assert tuned.hparams["weight_decay"] > 1e-4 or max(dropouts) > 0.2
    assert tuned.test["loss"] < fixed.test["loss"]
    assert tuned.test["loss"] < delta.test["loss"]
    # the implicit steps took fewer Neumann terms so the run costs at most two plain runs (tuner.compute_budget)
    assert prepared.tuner.log.algorithm["neumann_terms"] < prepared.tuner.settings.neumann_terms
    assert tuned.compute["examples"] <= 2 * fixed.compute["examples"]


@pytest.mark.parametrize("budget", [1.5, 2.5])
def test_ift_fits_its_hyper_steps_into_the_compute_budget(budget):
    config = diabetes("ift", epochs=20, overrides=[f"tuner.compute_budget={budget}"])
    prepared = prepare(config)
    _, tuned = execute(prepared)
    plain, state = 20 * prepared.tuner.order.n_train, prepared.tuner.log.algorithm
    assert tuned.compute["examples"] <= budget * plain
    # 2.5 plain runs leave room for fewer terms every 5 steps; 1.5 for one term, spaced further apart
    assert state["neumann_terms"] < 5 and (state["hyper_interval"] > 5) == (budget < 2)
    assert any("tuner.compute_budget" in line for line in explain(prepared.tuner))


def test_the_budget_takes_neumann_terms_first_then_spaces_the_hyper_steps():
    tuner = prepare(diabetes("ift", epochs=10)).tuner
    tuner.planned_epochs = 10
    n, b, v = tuner.order.n_train, tuner.order.batch_size, tuner.order.val_batch_size
    # a fresh run: the budget less the plain run and the power iteration pays for rounds of a validation
    # batch and K + 2 training batches, one every 5 weight steps after the warm-up epoch if K can shrink
    # to fit; an epoch is ceil(n / b) steps (its last batch is short)
    per_epoch = math.ceil(n / b)
    first, steps = per_epoch, 9 * per_epoch

    def rounds(interval):  # the loop's hyper steps: multiples of the interval among steps first+1..first+steps
        return (first + steps) // interval - first // interval

    def left(budget):
        return budget * 10 * n - 10 * n - POWER_STEPS * b

    terms = math.floor((left(2.0) / rounds(5) - v) / b) - 2
    assert 1 <= terms < 5
    assert spacing(tuner, 2.0) == (5, terms)
    # where one term does not fit either, one term every so many steps, no more rounds than are paid for
    assert left(1.3) / rounds(5) < v + 3 * b
    for budget in (1.3, 1.6):
        interval, one = spacing(tuner, budget)
        paid = left(budget) // (v + 3 * b)
        assert one == 1 and interval > 5 and 1 <= rounds(interval) <= paid <= rounds(interval) + 1
    assert spacing(tuner, 1.01)[1] == 1 and rounds(spacing(tuner, 1.01)[0]) <= 1  # a spent budget: one round
    assert spacing(tuner, 50.0) == (5, 5)  # never closer than tuner.train_steps nor more terms than asked


@pytest.mark.parametrize("overrides", [["tuner.val_batch_size=64"], ["tuner.warmup_epochs=2"], ["tuner.batch_size=20"]])
def test_a_short_ift_run_stays_within_its_budget_whatever_the_batches(overrides):
    """The plan counts each epoch's short last batch and never pays for a fraction of a round (a review
    found 2.07-2.11 plain runs at a budget of 2 before)."""
    prepared = prepare(diabetes("ift", epochs=5, overrides=["tuner.compute_budget=2", *overrides]))
    _, tuned = execute(prepared)
    assert tuned.compute["examples"] <= 2 * 5 * prepared.tuner.order.n_train


def test_a_run_resumed_after_its_handover_equals_an_uninterrupted_one():
    whole = prepare(diabetes(epochs=30)).tuner
    whole.fit(30)
    at = handover_epoch(whole.log.algorithm)
    assert at is not None and at < 25
    first = prepare(diabetes(epochs=30)).tuner
    first.fit(30, max_steps=(at + 2) * first.batches_per_epoch + 1)  # past the handover, mid-epoch
    second = prepare(diabetes(epochs=30)).tuner
    second.load_state_dict(first.state_dict())
    second.fit(30)
    assert handover_epoch(second.log.algorithm) == at
    assert torch.equal(second.net.hparams, whole.net.hparams)
    for a, b in zip(second.net.parameters(), whole.net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert second.counters.examples == whole.counters.examples


def test_after_the_handover_the_response_paths_stop_training():
    tuner = prepare(diabetes(epochs=30)).tuner
    tuner.fit(30)
    at = handover_epoch(tuner.log.algorithm)
    assert at is not None
    response = [p.detach().clone() for p in tuner.net.response_parameters()]
    tuner.fit(32)  # two more epochs, all after the handover
    assert all(torch.equal(a, b) for a, b in zip(response, tuner.net.response_parameters(), strict=True))


@pytest.mark.parametrize("override", ["tuner.handover_patience=0", "tuner.handover_rise=-0.1",
                                      "tuner.compute_budget=1"])
def test_bad_handover_settings_name_their_field(override):
    with pytest.raises(ConfigError, match=r"tuner\.(handover_patience|handover_rise|compute_budget)"):
        load_config(ROOT / "examples" / "own_task.toml", [override])


def test_after_the_handover_an_augmentation_strength_stays_put_and_the_explanation_says_why():
    """Implicit hypergradients do not reach an augmentation's strength (no gradient through its draws): after
    the handover it keeps Delta-STN's value, and the explanation names it (it said only how far it moved)."""
    from sklearn.datasets import load_digits
    from torch import nn

    import selftune as st
    from selftune.augment import Augment, Noise

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
    wrong = torch.arange(0, 100, 4)
    y[wrong] = (y[wrong] + 3) % 10  # a quarter of the training labels wrong: the model over-fits early
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), st.Dropout("drop"), nn.Linear(256, 10))
    space = st.Space([st.Float("drop", 0.0, 0.9, 0.05), st.Float("noise", 0.0, 1.0, 0.05),
                      st.Float("weight_decay", 1e-6, 1e-1, 1e-5, log=True)])
    settings = TunerSettings(lr=0.1, batch_size=32, handover_rise=0.0, handover_patience=0.01)
    tuner = st.SelfTuner(st.hypernetize(model, space), (x[:100], y[:100]), (x[150:300], y[150:300]),
                         augment=Augment([Noise("noise")]), objective=st.Objective(weight_decay="weight_decay"),
                         settings=settings, seed=0)
    tuner.fit(25)
    at = handover_epoch(tuner.log.algorithm)
    assert at is not None and at < 24
    noise = tuner.net.values()["noise"]
    tuner.fit(28)  # three epochs of implicit steps: the decay moves, the strength does not
    assert tuner.net.values()["noise"] == noise
    assert tuner.log.algorithm["implicit_seen"] == [True, False, True]
    lines = explain(tuner)
    line = next(line for line in lines if line.startswith("noise:"))
    assert f"stayed where Delta-STN left it after the handover (epoch {at})" in line and "augmentation" in line
    assert not any("stayed where" in line for line in lines if line.startswith(("drop:", "weight_decay:")))
