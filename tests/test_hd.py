"""The learning rate as a hyperparameter: hypergradient descent (selftune.hd) with its safeguards."""

import math
from pathlib import Path

import pytest
import torch

import selftune as st
from selftune.config import load_config
from selftune.errors import ConfigError, SelftuneWarning
from selftune.hd import HypergradientLR, HypergradientMomentum
from selftune.models import build
from selftune.runner import execute, prepare
from selftune.tuner import BOUND_MARGIN

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_lr.toml"


def lr_space(init=0.005, low=1e-4, high=1.0):
    return st.Space([st.Float("d0", 0.0, 0.95, init=0.2), st.Float("lr", low, high, init=init, log=True)])


def make_tuner(digits, method="hd", space=None, **settings):
    torch.manual_seed(0)
    space = space or lr_space()
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[32], dropout=["d0", None])
    net = st.hypernetize(model, space, form="stn" if method == "stn" else "delta")
    base = dict(batch_size=64, lr="lr", warmup_epochs=0, log_every=5)
    base.update(settings)
    return st.SelfTuner(net, digits.train, digits.val, method=method, settings=st.TunerSettings(**base), seed=0)


def test_the_rate_stays_inside_its_bounds_under_adversarial_gradients():
    """Gradients that grow 10x per step (finite, no NaN) and flip direction at random: the rate moves
    at most one step size per step, never leaves [low, high] and never sits on a bound."""
    space = st.Space([st.Float("lr", 1e-4, 1.0, init=0.01, log=True)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(4, 3)), space)
    opt = torch.optim.SGD(net.general_parameters(), lr=1.0)
    hd = HypergradientLR(net, "lr", opt, tune=True, margin=BOUND_MARGIN)
    hd.plan(steps=20, travel=8.0)  # 0.4 units per step: a few steps cross the range
    gen = torch.Generator().manual_seed(0)
    u_before = float(net.hparams.detach()[0])
    values = []
    for step in range(300):
        scale = 10.0 ** min(step, 30)
        for p in hd.params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        hd.before_step()
        opt.step()
        hd.after_step()
        u = float(net.hparams.detach()[0])
        assert abs(u - u_before) <= hd.step_size + 1e-6
        u_before = u
        values.append(hd.value)
        assert opt.param_groups[0]["lr"] == hd.value
    unit = [(math.log(v) - math.log(1e-4)) / (math.log(1.0) - math.log(1e-4)) for v in values]
    assert all(math.isfinite(v) and 1e-4 <= v <= 1.0 for v in values)
    assert min(unit) >= BOUND_MARGIN - 1e-6 and max(unit) <= 1 - BOUND_MARGIN + 1e-6
    assert len({round(v, 12) for v in values}) > 10  # it did move


def test_hd_raises_a_rate_that_is_too_small_and_trains_better_than_fixed_at_it():
    """examples/digits_lr.toml starts at lr 0.005, 10x below the benchmark's 0.05: hd must raise it and
    beat fixed training at 0.005 (fixed keeps the value it was given)."""
    config = load_config(EXAMPLE, ["epochs=20"])
    fit_fixed, fixed = execute(prepare(config.derive(method="fixed", seed=0)))
    fit_hd, tuned = execute(prepare(config.derive(method="hd", seed=0)))
    assert fixed.hparams["lr"] == pytest.approx(0.005)
    assert tuned.hparams["lr"] > 2 * 0.005
    assert {k: v for k, v in tuned.hparams.items() if k != "lr"} == pytest.approx(
        {k: v for k, v in fixed.hparams.items() if k != "lr"})
    assert tuned.test["loss"] < fixed.test["loss"]
    assert fit_hd.compute["examples"] == fit_fixed.compute["examples"]  # hd costs no extra examples
    lrs = [row["lr"] for row in fit_hd.trajectory]
    assert lrs[-1] > lrs[0]  # the schedule is recorded in the trajectory


def test_delta_stn_tunes_the_rate_beside_the_dropouts(digits):
    tuner = make_tuner(digits, method="delta-stn")
    start = tuner.net.values()
    result = tuner.fit(3)
    assert result.hparams["lr"] != pytest.approx(start["lr"])
    assert result.hparams["d0"] != pytest.approx(start["d0"])
    assert tuner.optimizers["general"].param_groups[0]["lr"] == pytest.approx(result.hparams["lr"])
    assert tuner.log.hypergrad_seen == [True, True] and not tuner.log.idle
    # the response weights keep their own rate (min(initial lr, 0.01)), the rate's scale is not inflated
    assert tuner.optimizers["response"].param_groups[0]["lr"] == pytest.approx(0.005)
    assert float(tuner.net.scale.detach()[1]) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(
        st.nn.hypernet._inverse_softplus(0.5)))), rel=1e-5)


@pytest.mark.parametrize("method, signal, stop", [("hd", "train", 25), ("hd", "val", 23), ("delta-stn", "val", 23)])
def test_a_resumed_hd_run_equals_an_uninterrupted_one(digits, method, signal, stop):
    """Also on the validation signal, stopped between two hyper steps: the weights' travel since the
    last one is part of the checkpoint."""
    whole = make_tuner(digits, method=method, lr_signal=signal)
    whole.fit(3)
    first = make_tuner(digits, method=method, lr_signal=signal)
    first.fit(3, max_steps=stop)
    state = first.state_dict()
    second = make_tuner(digits, method=method, lr_signal=signal)
    second.load_state_dict(state)
    second.fit(3)
    assert whole.lr_tuner.value != pytest.approx(0.005)  # the rate moved
    assert torch.equal(second.net.hparams, whole.net.hparams)
    for a, b in zip(second.net.parameters(), whole.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_validation_signal_lowers_a_rate_that_raises_the_validation_loss_and_stays_in_bounds():
    """``lr_signal = "val"``: a validation gradient along the weights' travel since the last hyper step
    (the travel raised the validation loss) lowers the rate, one against it raises it, each by at most
    one step; exploding, direction-flipping gradients keep it inside the space, off its bounds."""
    space = st.Space([st.Float("lr", 1e-4, 1.0, init=0.01, log=True)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(4, 3)), space)
    opt = torch.optim.SGD(net.general_parameters(), lr=1.0)
    hd = HypergradientLR(net, "lr", opt, tune=True, margin=BOUND_MARGIN, signal="val")
    hd.plan(steps=20, travel=8.0)
    for p in hd.params:  # a training step's gradient does nothing on this signal
        p.grad = torch.ones_like(p)
    assert not hd.before_step() and hd.value == pytest.approx(0.01)

    def travel_then_observe(sign, scale=1.0):
        with torch.no_grad():
            for p in hd.params:
                p.add_(0.1)
        return hd.observe_validation([sign * scale * torch.ones_like(p) for p in hd.params])

    start = hd.value  # plan() marked where the first travel starts
    assert travel_then_observe(1.0) and hd.value < start  # the travel raised the validation loss
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # applied by the next weight step, not here
    for _ in range(5):
        travel_then_observe(-1.0)
    assert hd.value > start
    gen = torch.Generator().manual_seed(0)
    before = float(net.hparams.detach()[0])
    for step in range(200):
        sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
        travel_then_observe(sign, scale=10.0 ** min(step, 30))
        u = float(net.hparams.detach()[0])
        assert abs(u - before) <= hd.step_size + 1e-6
        before = u
        unit = (math.log(hd.value) - math.log(1e-4)) / (math.log(1.0) - math.log(1e-4))
        assert BOUND_MARGIN - 1e-6 <= unit <= 1 - BOUND_MARGIN + 1e-6
        hd.apply()
        assert opt.param_groups[0]["lr"] == hd.value


def test_the_validation_signal_draws_validation_batches_and_the_training_signal_none(digits):
    """hd on Baydin's training signal costs a plain run's examples; on ``lr_signal = "val"`` it draws one
    validation batch every ``train_steps`` weight steps, counted, and the rate moves on those alone."""
    plain, train = make_tuner(digits, method="fixed"), make_tuner(digits)
    val = make_tuner(digits, lr_signal="val")
    assert train.lr_tuner.signal == "train" and val.lr_tuner.signal == "val"
    for tuner in (plain, train, val):
        tuner.fit(3)
    assert train.counters.examples == plain.counters.examples and train.counters.hyper_steps == 0
    assert val.counters.hyper_steps == 3 * val.batches_per_epoch // 5
    assert val.counters.examples == plain.counters.examples + val.counters.hyper_steps * val.val_batch_size
    assert val.lr_tuner.value != pytest.approx(0.005) and val.log.hypergrad_seen[1]


@pytest.mark.parametrize("signal", ["train", "val"])
def test_one_step_changes_the_rate_at_most_twofold(signal):
    """A run of a few steps plans a large step (lr_travel / steps); one step still moves the rate by at
    most 2x either way (a short run on the validation signal once moved it 20x in one step and blew up)."""
    space = st.Space([st.Float("lr", 1e-5, 1.0, init=0.01, log=True)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(4, 3)), space)
    opt = torch.optim.SGD(net.general_parameters(), lr=1.0)
    hd = HypergradientLR(net, "lr", opt, tune=True, margin=BOUND_MARGIN, signal=signal)
    hd.plan(steps=3, travel=8.0)
    for sign in (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0):  # against the travel: up; along it: down
        before = hd.value
        with torch.no_grad():
            for p in hd.params:
                p.add_(0.1)
        grads = [sign * torch.ones_like(p) for p in hd.params]
        if signal == "train":
            hd._previous = [torch.full_like(p, 0.1) for p in hd.params]
            for p, g in zip(hd.params, grads, strict=True):
                p.grad = g
            assert hd.before_step()
        else:
            assert hd.observe_validation(grads)
        assert before / 2.0 * (1 - 1e-6) <= hd.value <= 2.0 * before * (1 + 1e-6)  # float32 hyperparameters
        assert hd.value != pytest.approx(before)


def test_the_validation_signal_takes_one_pass_per_round_of_hyper_steps(digits):
    """With val_steps = 2 the weights do not move between a round's two batches: the rate is planned and
    stepped once per round, and the second batch is not spent on it."""
    one, two = make_tuner(digits, lr_signal="val"), make_tuner(digits, lr_signal="val", val_steps=2)
    plain = make_tuner(digits, method="fixed")
    for tuner in (one, two, plain):
        tuner.fit(2)
    assert two.lr_tuner.step_size == pytest.approx(one.lr_tuner.step_size)
    assert two.counters.hyper_steps == 2 * one.counters.hyper_steps
    assert two.counters.examples - plain.counters.examples == one.counters.hyper_steps * one.val_batch_size
    assert two.lr_tuner.value != pytest.approx(0.005)


def test_a_divergence_in_a_validation_pass_rolls_back_to_training_mode(digits, monkeypatch):
    """A non-finite validation loss inside a hyper step rolls the run back; the weight steps after it
    train in training mode again (dropout on), not in the eval mode the hyper step had set."""
    tuner = make_tuner(digits, lr_signal="val")
    calls, modes = [0], []
    cls = type(tuner.objective)
    original = cls.eval_loss

    def poisoned(self, out, y):
        calls[0] += 1
        loss = original(self, out, y)
        return loss * math.nan if calls[0] == 3 else loss

    monkeypatch.setattr(cls, "eval_loss", poisoned)  # the objective is frozen: patch its class, for this test

    class Mode(st.Callback):
        def on_step(self, tuner, row):
            modes.append(tuner.net.training)

    tuner.fit(2, callbacks=[Mode()])
    assert tuner.divergences == 1 and all(modes)


def test_stn_judges_the_rate_on_the_network_it_scores():
    """STN's response path is part of its network at the current hyperparameters: the validation
    signal differentiates that network (the response on), as score() evaluates it."""
    from selftune.data import load_dataset

    digits = load_dataset("digits")
    tuner = make_tuner(digits, method="stn", lr_signal="val")
    tuner.fit(1)
    x, y = tuner._batch("val", torch.arange(64))
    seen = []
    monkeypatch_target = tuner.lr_tuner.observe_validation
    tuner.lr_tuner.observe_validation = lambda grads: seen.append(grads) or monkeypatch_target(grads)
    with torch.no_grad():
        for p in tuner.lr_tuner.params:
            p.add_(1e-3)  # some travel since the last hyper step
        tuner.net.eval()
        expected = float(tuner.objective.eval_loss(tuner.net(x), y))
        off = float(tuner.objective.eval_loss(tuner.net(x, respond=False), y))
    assert tuner._validate_lr(x, y) == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(off, rel=1e-6) and seen


def test_rate_settings_without_a_tuned_rate_are_a_warning(digits):
    with pytest.warns(SelftuneWarning, match=r"tuner\.lr_signal: set for a tuned learning rate, but tuner\.lr is "
                                                r"a number, so it has no effect"):
        make_tuner(digits, method="delta-stn", lr=0.05, lr_signal="val")


def test_an_implicit_method_reuses_its_validation_gradient_for_the_rate(digits, monkeypatch):
    """ift takes the validation gradient of the weights for its own hypergradient; the rate's validation
    signal reuses it (no second pass) and moves the rate exactly as a second pass would."""
    # a few hyper steps: later, float rounding in the two ways of summing the gradient grows with the run
    reused = make_tuner(digits, method="ift", lr_signal="val", compute_budget=100.0)  # spacing ignores the extra pass
    reused.fit(2, max_steps=20)
    separate = make_tuner(digits, method="ift", lr_signal="val", compute_budget=100.0)
    original = separate._validate_lr
    monkeypatch.setattr(separate, "_validate_lr", lambda x, y, known=None: original(x, y))
    separate.fit(2, max_steps=20)
    assert reused.counters.hyper_steps >= 2
    assert reused.lr_tuner.value != pytest.approx(0.005)
    assert reused.lr_tuner.value == pytest.approx(separate.lr_tuner.value, rel=1e-6)
    assert separate.counters.examples - reused.counters.examples == \
        reused.counters.hyper_steps * reused.val_batch_size


def test_a_diverging_rate_is_lowered_in_its_hyperparameter(digits):
    """A roll-back lowers the rate where it lives (the hyperparameter), so hypergradient descent goes
    on from the lowered value instead of writing the old one back at the next step."""
    tuner = make_tuner(digits)
    seen, epoch_ends = [], []

    class Poison(st.Callback):
        def on_epoch_end(self, tuner, row):
            epoch_ends.append(tuner.lr_tuner.value)

        def on_step(self, tuner, row):
            if tuner.counters.steps == 30 and not seen:
                seen.append(tuner.lr_tuner.value)
                with torch.no_grad():
                    tuner.net.general_parameters()[0].fill_(math.nan)

        def on_divergence(self, tuner, info):
            seen.append((tuner.lr_tuner.value, tuner.optimizers["weights"].param_groups[0]["lr"], len(epoch_ends)))

    tuner.fit(3, callbacks=[Poison()])
    assert len(seen) == 2 and tuner.divergences == 1
    value, applied, epochs_done = seen[1]
    assert epochs_done == 1  # rolled back to the end of epoch 1 (step 18)
    assert value == pytest.approx(applied) == pytest.approx(0.5 * epoch_ends[0], rel=1e-5)
    assert all(torch.isfinite(p).all() for p in tuner.net.parameters())
    # the advice names where the bound rate starts, not tuner.lr (which names the hyperparameter)
    assert tuner._divergence_fix("weights").startswith("lower space.lr.init")


@pytest.mark.parametrize("space, settings, method, match", [
    (lr_space(), dict(lr="nope"), "hd", r"tuner\.lr: 'nope' is not declared"),
    (None, dict(lr=0.01), "hd", r"tuner\.lr: method 'hd' tunes the learning rate"),
    (st.Space([st.Float("d0", 0.0, 0.95, init=0.2), st.Int("lr", 1, 5, init=2)]), dict(lr="lr"), "delta-stn",
     r"tuner\.lr: hyperparameter 'lr' must be a float with low > 0"),
])
def test_bad_learning_rate_bindings_are_one_line_errors(digits, space, settings, method, match):
    space = space or lr_space()
    with pytest.raises(ConfigError, match=match):
        make_tuner(digits, method=method, space=space, **settings)


def test_a_config_that_binds_an_undeclared_rate_is_refused_before_anything_runs(tmp_path):
    from selftune.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('lr = "lr"', 'lr = "rate"'))
    assert main(["run", str(bad), "--store", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# -- SGD's momentum as a hyperparameter (tuner.momentum = "name") -------------------------------------
def momentum_space(init=0.5):
    return st.Space([st.Float("d0", 0.0, 0.95, init=0.2), st.Float("lr", 1e-4, 1.0, init=0.01, log=True),
                     st.Float("mom", 0.0, 0.99, init=init)])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_momentum_stays_inside_its_bounds_under_adversarial_gradients(optimizer):
    space = st.Space([st.Float("mom", 0.0, 0.99, init=0.5)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(4, 3)), space)
    opt = torch.optim.SGD(net.general_parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd" else \
        torch.optim.Adam(net.general_parameters(), lr=0.1)
    hm = HypergradientMomentum(net, "mom", opt, tune=True, margin=BOUND_MARGIN)
    hm.plan(steps=20, travel=8.0)
    gen = torch.Generator().manual_seed(0)
    before, values = float(net.hparams.detach()[0]), []
    for step in range(300):
        for p in hm.params:
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** min(step, 30)
        hm.before_step()
        opt.step()
        hm.after_step()
        u = float(net.hparams.detach()[0])
        assert abs(u - before) <= hm.step_size + 1e-6
        before = u
        values.append(hm.value)
        group = opt.param_groups[0]
        assert (group["momentum"] if optimizer == "sgd" else group["betas"][0]) == hm.value
    assert all(math.isfinite(v) and 0.0 < v < 0.99 for v in values)
    assert len({round(v, 12) for v in values}) > 10


@pytest.mark.parametrize("cls, decay", [(torch.optim.Adam, 0.0), (torch.optim.Adam, 0.1), (torch.optim.AdamW, 0.1)])
def test_adams_beta1_hypergradient_is_the_derivative_of_the_next_loss(cls, decay):
    """-g_{t+1} . d_t (HypergradientMomentum's direction for Adam) against autograd through Adam's step
    written out with beta1 as a variable: dL(theta_{t+1})/d beta1 = -lr / (1 - beta1^t) g_{t+1} . d_t."""
    torch.manual_seed(0)
    space = st.Space([st.Float("mom", 0.0, 0.99, init=0.8)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(5, 1, bias=False)), space)
    w = net.general_parameters()[0]
    lr, beta2, eps = 0.05, 0.99, 1e-8
    opt = cls([w], lr=lr, betas=(0.8, beta2), eps=eps, weight_decay=decay)
    hm = HypergradientMomentum(net, "mom", opt, tune=False, margin=BOUND_MARGIN)
    x, target = torch.randn(32, 5), torch.randn(32, 1)

    def loss(weight):
        return ((x.to(weight.dtype) @ weight.t() - target.to(weight.dtype)) ** 2).mean()

    for _ in range(3):  # some history in Adam's moments
        opt.zero_grad()
        loss(w).backward()
        opt.step()
    opt.zero_grad()
    loss(w).backward()
    (direction,) = hm._buffers()  # d_t for the coming step t
    state, g = opt.state[w], w.grad.detach().clone()
    t = float(state["step"]) + 1
    beta1 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    theta, m0, v0 = w.detach().double(), state["exp_avg"].double(), state["exp_avg_sq"].double()
    coupled = g.double() + (decay * theta if cls is torch.optim.Adam else 0.0)
    m = beta1 * m0 + (1 - beta1) * coupled
    v = beta2 * v0 + (1 - beta2) * coupled * coupled
    shrink = (1 - lr * decay) if cls is torch.optim.AdamW else 1.0
    after = theta * shrink - lr * (m / (1 - beta1.detach() ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
    (exact,) = torch.autograd.grad(loss(after), beta1)
    with torch.no_grad():
        w.copy_(after.float())
    w.grad = None
    loss(w).backward()
    ours = -lr / (1 - 0.8 ** t) * float((w.grad.double() * direction.double()).sum())
    assert ours == pytest.approx(float(exact), rel=1e-3)


def _quadratic_run(lr: float, init: float, smallest: float, steps: int = 300) -> float:
    """SGD with a tuned momentum on f(w) = 0.5 sum(c_i w_i^2), curvatures from 10^smallest to 1, plus
    gradient noise: returns the final momentum."""
    space = st.Space([st.Float("mom", 0.0, 0.99, init=init)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(20, 1, bias=False)), space)
    w = net.general_parameters()[0]
    with torch.no_grad():
        w.fill_(1.0)
    curvature = torch.logspace(smallest, 0, 20).unsqueeze(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9)
    hm = HypergradientMomentum(net, "mom", opt, tune=True, margin=BOUND_MARGIN)
    hm.plan(steps=steps, travel=8.0)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (curvature * w * w).sum()).backward()
        w.grad += 0.1 * torch.randn(w.shape, generator=gen)
        hm.before_step()
        opt.step()
        hm.after_step()
    return hm.value


def test_the_momentum_rises_where_steps_are_too_timid_and_falls_where_they_overshoot():
    """On an ill-conditioned quadratic a small rate crawls along the flat directions (consecutive
    gradients agree with the buffer: more momentum); on a well-conditioned one a rate near 1 / curvature
    with high momentum oscillates (gradients turn against the buffer: less)."""
    assert _quadratic_run(lr=0.05, init=0.3, smallest=-2) > 0.5
    assert _quadratic_run(lr=0.8, init=0.9, smallest=0) < 0.5


def test_a_tuned_momentum_resumes_exactly_and_fixed_keeps_it(digits):
    whole = make_tuner(digits, method="delta-stn", space=momentum_space(), momentum="mom")
    whole.fit(2)
    first = make_tuner(digits, method="delta-stn", space=momentum_space(), momentum="mom")
    first.fit(2, max_steps=20)
    second = make_tuner(digits, method="delta-stn", space=momentum_space(), momentum="mom")
    second.load_state_dict(first.state_dict())
    second.fit(2)
    assert second.net.values()["mom"] == whole.net.values()["mom"] != pytest.approx(0.5, abs=1e-6)
    for a, b in zip(whole.net.state_dict().values(), second.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    fixed = make_tuner(digits, method="fixed", space=momentum_space(0.7), momentum="mom")
    fixed.fit(1)
    assert fixed.optimizers["weights"].param_groups[0]["momentum"] == pytest.approx(0.7)
    assert fixed.net.values()["mom"] == pytest.approx(0.7)


@pytest.mark.parametrize("space, settings, match", [
    (momentum_space(), dict(momentum="nope"), r"tuner\.momentum: 'nope' is not declared"),
    (st.Space([st.Float("d0", 0.0, 0.95, init=0.2), st.Float("lr", 1e-4, 1.0, init=0.01, log=True),
               st.Float("mom", 0.0, 1.0, init=0.5)]),
     dict(momentum="mom"), r"tuner\.momentum: hyperparameter 'mom' must be a float in \[0, 1\)"),
    (momentum_space(), dict(momentum="mom", optimizer="rmsprop"), r"tuner\.momentum: a tuned momentum drives SGD"),
    (momentum_space(), dict(momentum="mom", optimizer_args={"momentum": 0.5}), r"tuner\.optimizer_args\.momentum"),
    (momentum_space(), dict(momentum="mom", optimizer_args={"nesterov": True}), r"tuner\.optimizer_args\.nesterov"),
    (momentum_space(), dict(momentum="mom", optimizer="adam", optimizer_args={"maximize": True}),
     r"tuner\.optimizer_args\.maximize"),
])
def test_bad_momentum_bindings_are_one_line_errors(digits, space, settings, match):
    with pytest.raises(ConfigError, match=match):
        make_tuner(digits, method="hd", space=space, **settings)


@pytest.mark.parametrize("settings, match", [
    (dict(momentum=0.5, optimizer="adam"), r"tuner\.momentum: 0\.5 is SGD's momentum, which torch\.optim\.Adam would "
                                           r"ignore; Adam takes its momentum as optimizer_args\.betas"),
    (dict(momentum=0.5, optimizer="rmsprop"), r"RMSprop takes its momentum as optimizer_args\.momentum"),
    (dict(momentum=0.3, optimizer="adagrad"), r"Adagrad takes no momentum: remove tuner\.momentum"),
    (dict(momentum=0.5, optimizer="nadam"), r"NAdam takes its momentum as optimizer_args\.betas"),
])
def test_a_numeric_momentum_another_optimizer_would_ignore_is_refused(settings, match):
    """A number in tuner.momentum reaches SGD only; with another optimizer it used to be ignored silently.
    The default (0.9) and the optimizer's own default (RMSprop's 0, Adam's beta1 0.9) pass."""
    with pytest.raises(ValueError, match=match):
        st.TunerSettings(**settings)
    st.TunerSettings(optimizer="rmsprop", momentum=0.0)
    st.TunerSettings(optimizer="adam")


def test_a_run_recorded_with_an_ignored_momentum_still_replays():
    """Runs recorded before the refusal (Adam with momentum 0.5, which trained as plain Adam) keep
    loading for replay, report and resume: the recorded value becomes the default that trained alike."""
    from selftune.config import parse_config
    from selftune.runner import recorded_meaning

    raw = load_config(EXAMPLE).model_dump(mode="json")
    raw["tuner"].update(optimizer="adam", momentum=0.5, lr=0.001)
    raw["space"].pop("lr")
    raw["bench"].update(starts={}, grid=[])
    with pytest.raises(ConfigError, match=r"tuner\.momentum"):
        parse_config(raw)
    assert parse_config(recorded_meaning(raw)).tuner.momentum == 0.9
    raw["tuner"]["optimizer"] = "sgd"  # where it did reach the optimizer it stays
    assert parse_config(recorded_meaning(raw)).tuner.momentum == 0.5
    # optimizer_args that replaced tuner fields, recorded before they were refused, move to those fields
    raw["tuner"]["optimizer_args"] = {"momentum": 0.0, "weight_decay": 1e-3, "nesterov": False}
    with pytest.raises(ConfigError, match=r"tuner\.optimizer_args"):
        parse_config(raw)
    tuner = parse_config(recorded_meaning(raw)).tuner
    assert (tuner.momentum, tuner.weight_decay, tuner.optimizer_args) == (0.0, 1e-3, {"nesterov": False})


def test_a_tuned_momentum_drives_every_group_that_trains_with_momentum(digits):
    """Delta-STN's response optimizer and STN's response group take the hyperparameter's value, not
    SGD's default, so a momentum trains alike as a number and as a hyperparameter."""
    for method in ("delta-stn", "stn"):
        tuner = make_tuner(digits, method=method, space=momentum_space(0.3), momentum="mom")
        tuner.fit(1)
        value = tuner.net.values()["mom"]
        groups = [g for k, o in tuner.optimizers.items() if k != "hyper" for g in o.param_groups]
        assert len(groups) >= 2 and all(g["momentum"] == pytest.approx(value) for g in groups)


def test_adams_beta1_is_tuned_as_the_momentum_and_beta2_kept(digits):
    tuner = make_tuner(digits, method="delta-stn", space=momentum_space(0.5), momentum="mom", optimizer="adam",
                       lr=1e-3, optimizer_args={"betas": [0.9, 0.95]})
    betas = tuner.optimizers[tuner.algorithm.lr_group].param_groups[0]["betas"]
    assert betas == (pytest.approx(0.5), 0.95)  # beta1 from the hyperparameter's init, beta2 as given
    tuner.fit(2)
    value = tuner.net.values()["mom"]
    assert value != pytest.approx(0.5, abs=1e-3)
    assert tuner.log.hypergrad_seen[tuner.net.space.index("mom")]
    for opt in (o for k, o in tuner.optimizers.items() if k != "hyper" and isinstance(o, torch.optim.Adam)):
        assert all(g["betas"] == (pytest.approx(value), 0.95) for g in opt.param_groups)


def test_a_config_that_binds_an_undeclared_momentum_is_refused_before_anything_runs(tmp_path):
    from selftune.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('lr = "lr"', 'lr = "lr"\nmomentum = "mom"'))
    assert main(["run", str(bad), "--store", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_a_momentum_out_of_range_is_refused_by_the_settings():
    with pytest.raises(ValueError, match=r"tuner\.momentum: must be in \[0, 1\)"):
        st.TunerSettings(momentum=1.0)


def test_lr_fall_lets_the_rate_fall_faster_than_it_rises_and_no_further():
    """settings.lr_fall = 3: a step down may be 3x a step up, and never more, under adversarial gradients."""
    space = st.Space([st.Float("lr", 1e-4, 1.0, init=0.01, log=True)])
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(4, 3)), space)
    opt = torch.optim.SGD(net.general_parameters(), lr=1.0)
    hd = HypergradientLR(net, "lr", opt, tune=True, margin=BOUND_MARGIN, fall=3.0)
    hd.plan(steps=200, travel=8.0)
    gen = torch.Generator().manual_seed(1)
    before, ups, downs = float(net.hparams.detach()[0]), [], []
    for step in range(300):
        for p in hd.params:
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** min(step, 30)
        hd.before_step()
        opt.step()
        hd.after_step()
        u = float(net.hparams.detach()[0])
        (ups if u > before else downs).append(abs(u - before))
        before = u
        assert 1e-4 <= hd.value <= 1.0
    assert max(ups) <= hd.step_size + 1e-6
    assert max(downs) <= 3 * hd.step_size + 1e-6 and max(downs) > 1.5 * hd.step_size


def test_lr_fall_below_one_is_refused():
    with pytest.raises(ValueError, match="lr_fall"):
        st.TunerSettings(lr_fall=0.5)
