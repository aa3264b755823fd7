"""The one-pass method (Clarke et al. 2022, `one-pass`): the update it differentiates is the optimizer's
own step, the learning rate and the momentum get their hypergradients from it (not from hypergradient
descent), unsupported optimizers are refused, a run resumes exactly, and from a rate 10x too small it
raises the rate and beats fixed training."""

from pathlib import Path

import pytest
import torch

from selftune.config import load_config
from selftune.errors import ConfigError
from selftune.explain import explain
from selftune.runner import execute, prepare
from selftune.testing import digits_tuner

ROOT = Path(__file__).resolve().parents[1]

RATE = ("space.lr.low=1e-4", "space.lr.high=1.0", "space.lr.init=0.05", "space.lr.log=true", 'tuner.lr="lr"')
MOMENTUM = ("space.mu.low=0.1", "space.mu.high=0.99", "space.mu.init=0.8", 'tuner.momentum="mu"')
DECAY = ('objective.weight_decay="wd"', "space.wd.low=1e-6", "space.wd.high=0.1", "space.wd.init=1e-3",
         "space.wd.log=true")


@pytest.mark.parametrize("optimizer", [
    ('tuner.optimizer="sgd"', "tuner.weight_decay=1e-3"),
    ('tuner.optimizer="sgd"', "tuner.momentum=0.9", 'tuner.optimizer_args={nesterov = true, dampening = 0.0}'),
    ('tuner.optimizer="sgd"', "tuner.momentum=0.0"),
    ('tuner.optimizer="adam"', "tuner.lr=1e-3", "tuner.weight_decay=1e-3"),
    ('tuner.optimizer="adamw"', "tuner.lr=1e-3", "tuner.weight_decay=1e-2"),
    ('tuner.optimizer="adam"', "tuner.lr=1e-3", "tuner.optimizer_args={amsgrad = true}"),
    ('tuner.optimizer="sgd"', *RATE, *MOMENTUM),
    ('tuner.optimizer="adam"', *RATE, *MOMENTUM, "space.lr.init=1e-3"),
    ('tuner.optimizer="sgd"', "tuner.optimizer_args={dampening = 0.1}"),
    ('tuner.optimizer="adam"', "tuner.lr=1e-3", "tuner.weight_decay=1e-2",
     "tuner.optimizer_args={decoupled_weight_decay = true}"),
    ('tuner.optimizer="sgd"', "tuner.grad_clip=0.05"),
])
def test_the_update_it_differentiates_is_the_optimizers_own_step(optimizer):
    tuner = digits_tuner(*optimizer, method="one-pass")
    tuner.fit(1)  # the optimizer has state: momentum buffers, Adam's moments and step count
    net, algorithm = tuner.net, tuner.algorithm
    weights = [w for w in tuner.general_params if w.requires_grad]
    x, y = algorithm._last
    net.eval()  # no dropout masks: the same gradient for both
    net.zero_grad(set_to_none=True)
    tuner.objective.eval_loss(net(x, respond=False), y).backward()
    grads = [w.grad.detach().clone() for w in weights]
    clip = tuner.settings.grad_clip
    if clip is not None:  # as the weight step clips (the written-out update applies the recorded factor)
        norm = float(torch.nn.utils.clip_grad_norm_(weights, clip))
        tuner.clip_factor = min(1.0, clip / (norm + 1e-6))
        assert tuner.clip_factor < 1.0  # the clip is active
    algorithm._before = algorithm.stash(tuner)
    tuner._apply_schedule("weights")
    before = [w.detach().clone() for w in weights]
    tuner.optimizers["weights"].step()
    algorithm.record_rates(tuner)
    after = [w.detach().clone() for w in weights]
    with torch.no_grad(), algorithm.differentiated_at(tuner, weights):
        for w, b in zip(weights, before, strict=True):
            assert torch.equal(w, b)  # the weights before the step are in place
        written = [u.detach().clone() for u in algorithm.mapped(tuner, weights, grads)]
    for w, b, a, u in zip(weights, before, after, written, strict=True):
        assert torch.equal(w, a)  # ... and the weights after it are back
        torch.testing.assert_close(b - a, u, rtol=1e-4, atol=1e-7)


def test_the_rate_and_momentum_get_their_hypergradients_from_the_update():
    tuner = digits_tuner(*RATE, *MOMENTUM, *DECAY, method="one-pass")
    assert not tuner.lr_tuner.tune and not tuner.momentum_tuner.tune  # hypergradient descent stays out
    tuner.fit(2)
    space = tuner.net.space
    for name in ("lr", "mu", "wd"):
        assert tuner.log.hypergrad_seen[space.index(name)], name
    start, end = tuner.log.start, tuner.net.values()
    assert end["lr"] != pytest.approx(start["lr"], rel=1e-3)
    assert end["mu"] != pytest.approx(start["mu"], rel=1e-3)


@pytest.mark.parametrize("override, field", [
    ('tuner.optimizer="rmsprop"', "tuner.optimizer"),
    ("tuner.optimizer_args={maximize = true}", "tuner.optimizer_args"),
])
def test_an_update_it_cannot_write_out_is_refused_with_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        digits_tuner(override, method="one-pass")
    assert err.value.field == field
    assert "one-pass" in str(err.value)


def test_an_overflowing_series_skips_the_hyper_step_and_is_explained():
    """The series is not halved (Clarke et al.'s), so an update that expands violently can overflow it.
    Plain training goes on from finite weights, so the run must too: the hyper step is skipped (the
    hyperparameters and the hyper optimizer's moments stay as they were), counted and explained."""
    tuner = digits_tuner(*RATE, method="one-pass")
    tuner.fit(1)  # ordinary hyper steps first: the hyper optimizer has moments that could carry on moving
    assert "overflows" not in tuner.log.algorithm
    before = tuner.net.hparams.detach().clone()
    moments = {k: v.clone() for k, v in tuner.optimizers["hyper"].state[tuner.net.hparams].items()}
    tuner.log.algorithm["neumann_lr"] = 1e12  # every series from here on overflows
    steps = tuner.counters.hyper_steps
    tuner.fit(2)
    assert tuner.log.algorithm["overflows"] == tuner.counters.hyper_steps - steps > 0
    assert torch.equal(tuner.net.hparams, before)
    for k, v in tuner.optimizers["hyper"].state[tuner.net.hparams].items():
        assert torch.equal(v, moments[k]), k
    assert all(torch.isfinite(w).all() for w in tuner.net.parameters())
    assert any("overflowed" in line for line in explain(tuner))


def test_a_one_pass_run_resumes_exactly():
    whole = digits_tuner(*RATE, method="one-pass")
    whole.fit(3)
    first = digits_tuner(*RATE, method="one-pass")
    first.fit(3, max_steps=27)
    second = digits_tuner(*RATE, method="one-pass")
    second.load_state_dict(first.state_dict())
    second.fit(3)
    assert torch.equal(second.net.hparams, whole.net.hparams)
    for a, b in zip(second.net.parameters(), whole.net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert second.counters.examples == whole.counters.examples


def test_from_a_rate_10x_too_small_one_pass_raises_it_and_beats_fixed():
    """examples/digits_lr.toml (SGD at 0.005, the benchmark trains at 0.05), shortened to 20 epochs:
    the rate's implicit hypergradient raises it and the run beats fixed training at 0.005 (measured at
    40 epochs over 3 seeds in docs/benchmarks/README.md)."""
    config = load_config(ROOT / "examples" / "digits_lr.toml").derive(epochs=20)
    _, fixed = execute(prepare(config.derive(method="fixed")))
    _, tuned = execute(prepare(config.derive(method="one-pass")))
    assert tuned.hparams["lr"] > 0.02
    assert tuned.test["loss"] < fixed.test["loss"]


def test_a_short_runs_large_hyper_steps_move_the_rate_at_most_twofold_each():
    """The rate's Adam hyper step follows the run's length (tuner.hyper_travel): 4 planned steps made it 2
    units, and a rate moved 80x in one epoch (validation loss x5, test loss twice fixed training's)."""
    tuner = digits_tuner("tuner.lr=\"lr\"", "space.lr={low=1e-4, high=1.0, init=0.01, log=true}",
                         "tuner.optimizer=\"adamw\"", "epochs=3", method="one-pass")
    moves, apply = [], tuner._apply_hypergradient

    def recorded():
        before = tuner.lr_tuner.value
        apply()
        moves.append(tuner.lr_tuner.value / before)

    tuner._apply_hypergradient = recorded
    tuner.fit(3)
    assert tuner.log.hyper_lr["lr"] > 1.0 and moves  # the travel rule raised it: steps of more than 2x were possible
    assert all(0.5 * (1 - 1e-5) <= m <= 2.0 * (1 + 1e-5) for m in moves), moves  # float32 round trips
