"""Learning-rate schedules: formulas against values computed by hand, and a run that follows them."""

import math

import pytest
import torch

import selftune as st
from selftune.models import build
from selftune.schedules import ScheduleSettings, factor

CPA = ScheduleSettings(kind="cosine_power", power=10.0)


@pytest.mark.parametrize("schedule, step, total, per_epoch, expected", [
    # cosine power annealing, p = 10: c = (1 + cos(pi t)) / 2, shape = (10^(c+1) - 10) / (100 - 10)
    (CPA, 0, 100, 10, 1.0),                                        # t = 0: c = 1, (100 - 10) / 90
    (CPA, 50, 100, 10, (10 ** 1.5 - 10) / 90),                     # t = 1/2: c = 1/2 -> 0.2402530733520421
    (CPA, 25, 100, 10, (10 ** (1 + (1 + math.sqrt(0.5)) / 2) - 10) / 90),  # t = 1/4: c = 0.853553
    (CPA, 100, 100, 10, 0.0),                                      # t = 1: c = 0
    (ScheduleSettings(kind="cosine_power", power=1.0), 50, 100, 10, 0.5),  # p = 1 is cosine
    (ScheduleSettings(kind="cosine", final=0.1), 50, 100, 10, 0.1 + 0.9 * 0.5),
    (ScheduleSettings(kind="cosine", final=0.1), 100, 100, 10, 0.1),
    # warm-up over 2 epochs of 10 steps: (step + 1) / 20, then the curve over the 80 steps left
    (ScheduleSettings(kind="cosine", warmup_epochs=2), 4, 100, 10, 5 / 20),
    (ScheduleSettings(kind="cosine", warmup_epochs=2), 20, 100, 10, 1.0),
    (ScheduleSettings(kind="cosine", warmup_epochs=2), 60, 100, 10, 0.5),
    # a fractional warm-up (3.5 steps) reaches the base rate within its last step, never past it (it was 4/3.5)
    (ScheduleSettings(kind="constant", warmup_epochs=0.5), 2, 70, 7, 3 / 3.5),
    (ScheduleSettings(kind="constant", warmup_epochs=0.5), 3, 70, 7, 1.0),
    (ScheduleSettings(kind="step", step_epochs=3, gamma=0.5), 29, 100, 10, 1.0),
    (ScheduleSettings(kind="step", step_epochs=3, gamma=0.5), 30, 100, 10, 0.5),
    (ScheduleSettings(kind="step", step_epochs=3, gamma=0.5), 65, 100, 10, 0.25),
    (ScheduleSettings(), 77, 100, 10, 1.0),
])
def test_schedule_factors_match_the_formulas(schedule, step, total, per_epoch, expected):
    assert factor(schedule, step, total, per_epoch) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_power_decays_faster_early_than_cosine():
    cos = ScheduleSettings(kind="cosine")
    early = [factor(CPA, s, 100, 10) < factor(cos, s, 100, 10) for s in range(1, 50)]
    assert all(early)
    assert factor(CPA, 50, 100, 10) == pytest.approx(0.2402530733520421)


def _tuner(digits, method="fixed", **settings):
    torch.manual_seed(0)
    params = [st.Float("d0", 0.0, 0.95, init=0.2)]
    if settings.get("lr") == "lr":
        params.append(st.Float("lr", 1e-4, 1.0, init=0.02, log=True))
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[32], dropout=["d0", None])
    base = dict(batch_size=64, lr=0.05, warmup_epochs=0, log_every=1,
                schedule=ScheduleSettings(kind="cosine_power", warmup_epochs=1))
    base.update(settings)
    return st.SelfTuner(st.hypernetize(model, st.Space(params)), digits.train, digits.val, method=method,
                        settings=st.TunerSettings(**base), seed=0)


def test_a_run_follows_and_records_its_schedule(digits):
    tuner = _tuner(digits)
    result = tuner.fit(3)
    per_epoch, total = tuner.batches_per_epoch, 3 * tuner.batches_per_epoch
    applied = [row["weights_lr"] for row in result.trajectory]
    expected = [0.05 * factor(tuner.settings.schedule, row["step"] - 1, total, per_epoch)
                for row in result.trajectory]
    assert applied == pytest.approx(expected, rel=1e-9)
    assert applied[0] < applied[per_epoch] and applied[-1] < 1e-3  # warmed up, then annealed


def test_a_schedule_shapes_a_tuned_rate_and_resumes_exactly(digits):
    """With lr bound to a hyperparameter, hypergradient descent sets the level and the schedule the shape;
    a run stopped mid-way and restored follows the same curve to the same weights."""
    whole = _tuner(digits, method="hd", lr="lr")
    whole.fit(3)
    rows = whole.trajectory
    assert len({round(r["lr"], 9) for r in rows}) > 10  # the level moved
    # hypergradient descent updates the level before each step, so a row's rate is the one its step used
    assert [r["weights_lr"] for r in rows] == pytest.approx(
        [r["lr"] * factor(whole.settings.schedule, r["step"] - 1, 3 * whole.batches_per_epoch,
                          whole.batches_per_epoch) for r in rows], rel=1e-5)
    first = _tuner(digits, method="hd", lr="lr")
    first.fit(3, max_steps=30)
    second = _tuner(digits, method="hd", lr="lr")
    second.load_state_dict(first.state_dict())
    second.fit(3)
    for a, b in zip(second.net.parameters(), whole.net.parameters(), strict=True):
        assert torch.equal(a, b)
