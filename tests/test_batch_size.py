"""The batch size as a run setting: the rate that goes with it (lr_batch_scaling) and AdAdaGrad's
adaptive batch (tuner.adaptive_batch), with its test statistics against a direct computation."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from selftune import (
    AdaptiveBatchSettings,
    Callback,
    Dropout,
    Float,
    SelfTuner,
    Space,
    TunerSettings,
    hypernetize,
    lr_scale,
)
from selftune.batch_size import adaptive_batch_size, gradient_noise, per_example_gradients, scaling_rule
from selftune.cli import main


def _data(n: int = 400, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 3, generator=g)
    x = torch.randn(n + 100, 10, generator=g)
    y = (x @ w + 0.8 * torch.randn(n + 100, 3, generator=g)).argmax(1)
    return (x[:n], y[:n]), (x[n:], y[n:])


def _net(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), Dropout("p"), torch.nn.Linear(32, 3))
    return hypernetize(model, Space([Float("p", 0.0, 0.9, 0.3)]))


def _tuner(method: str = "fixed", seed: int = 0, **settings) -> SelfTuner:
    train, val = _data()
    base = {"batch_size": 8, "lr": 0.05, "log_every": 1}
    return SelfTuner(_net(seed), train, val, method=method, settings=TunerSettings(**{**base, **settings}), seed=seed)


# -- the rate versus the batch ------------------------------------------------------------------------
def test_lr_scale_rules() -> None:
    assert lr_scale(512, 128, "linear") == 4.0
    assert lr_scale(512, 128, "sqrt") == 2.0
    assert lr_scale(64, 128, "sqrt") == pytest.approx(math.sqrt(0.5))
    assert scaling_rule("SGD") == "linear" and scaling_rule("adamw") == "sqrt" and scaling_rule("rmsprop") == "sqrt"
    with pytest.raises(ValueError, match="positive"):
        lr_scale(0, 128, "linear")


@pytest.mark.parametrize(("optimizer", "rule", "factor"), [("sgd", "linear", 4.0), ("adam", "auto", 2.0),
                                                           ("sgd", "sqrt", 2.0)])
def test_rate_follows_the_batch(optimizer: str, rule: str, factor: float) -> None:
    """A rate chosen at reference_batch_size trains at lr x the rule's factor of batch / reference."""
    tuner = _tuner(optimizer=optimizer, batch_size=40, lr=0.01, lr_batch_scaling=rule, reference_batch_size=10)
    result = tuner.fit(1)  # 400 examples: ten full batches
    assert result.history[-1]["weights_lr"] == pytest.approx(0.01 * factor)
    assert result.history[-1]["batch_size"] == 40


def test_a_short_last_batch_takes_the_rate_of_its_own_size() -> None:
    """The factor follows the examples the step averages: 400 = 12 x 32 + 16, so the epoch's last step
    trains at 16 / 8 of the rate (linear), not at the full batch's 32 / 8."""
    tuner = _tuner(batch_size=32, lr=0.01, lr_batch_scaling="linear", reference_batch_size=8)

    class Rates(Callback):
        def __init__(self):
            self.seen = []

        def on_step(self, tuner, row):
            self.seen.append(tuner.weights_lr)

    rates = Rates()
    fit = tuner.fit(1, callbacks=[rates])
    assert rates.seen[:12] == pytest.approx([0.04] * 12) and rates.seen[12] == pytest.approx(0.02)
    # the trajectory's rows hold a full batch's rate: a run that follows them scales its own short steps
    assert [row["weights_lr"] for row in fit.trajectory] == pytest.approx([0.04] * len(fit.trajectory))


# -- the test statistics ------------------------------------------------------------------------------
def _direct(tuner: SelfTuner, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of the network's own weights, one backward pass per example, by hand."""
    net = tuner.net
    net.eval()
    params = [p for g in tuner.optimizers[tuner.algorithm.lr_group].param_groups for p in g["params"]]
    rows = []
    for i in range(len(x)):
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    net.train()
    return torch.stack(rows).double()


def _weights(net):
    return [(n, p) for n, p in net.named_parameters() if n.startswith("model.") and n.endswith(("weight", "bias"))
            and "response" not in n]


def test_norm_and_inner_product_statistics_match_a_direct_computation() -> None:
    tuner = _tuner()
    x, y = _data()[0]
    x, y = x[:24], y[:24]
    g = _direct(tuner, x, y)
    mean = g.mean(0)
    norm_sq = float(mean.pow(2).sum())
    # the norm test: sum over weights of the per-example variance (Bessel), over eta^2 ||mean||^2
    variance = float(g.var(0, correction=1).sum())
    noise = tuner.gradient_noise(x, y, test="norm", ratio=0.2)
    assert noise["examples"] == 24
    assert noise["grad_norm_sq"] == pytest.approx(norm_sq, rel=1e-5)
    assert noise["variance"] == pytest.approx(variance, rel=1e-5)
    assert noise["batch"] == pytest.approx(variance / (0.2 ** 2 * norm_sq), rel=1e-5)
    # the inner-product test: variance of <g_i, mean> over eta^2 ||mean||^4
    ip_var = float((g @ mean).var(correction=1))
    ip = tuner.gradient_noise(x, y, test="inner_product", ratio=0.3)
    assert ip["variance"] == pytest.approx(ip_var, rel=1e-5)
    assert ip["batch"] == pytest.approx(ip_var / (0.3 ** 2 * norm_sq ** 2), rel=1e-5)
    # the vectorised per-example gradients equal the loop, and chunking does not change the sums
    looped = tuner.gradient_noise(x, y, test="norm", ratio=0.2, vectorize=False)
    assert looped["variance"] == pytest.approx(noise["variance"], rel=1e-6)


def test_per_example_gradients_vmap_equals_loop_and_chunks_add_up() -> None:
    net = _net()
    (x, y), _ = _data()
    x, y = x[:10], y[:10]
    params = dict(_weights(net))

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(net, p, (xi,)), yi)

    net.eval()
    fast = per_example_gradients(loss, params, x, y)
    slow = per_example_gradients(loss, params, x, y, vectorize=False)
    assert fast.shape == (10, sum(p.numel() for p in params.values()))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
    whole = gradient_noise(lambda: iter([fast]), "inner_product", 0.1)
    parts = gradient_noise(lambda: iter([fast[:3], fast[3:7], fast[7:]]), "inner_product", 0.1)
    assert parts["variance"] == pytest.approx(whole["variance"], rel=1e-9)


def test_batch_only_grows_and_stops_at_its_limit() -> None:
    assert adaptive_batch_size(64, {"batch": 10.2}, 1000) == 64  # never shrinks
    assert adaptive_batch_size(64, {"batch": 100.2}, 1000) == 101  # rounded up
    assert adaptive_batch_size(64, {"batch": 5000.0}, 1000) == 1000
    assert adaptive_batch_size(64, {"batch": math.inf}, 1000) == 1000  # a zero mean gradient
    with pytest.warns(RuntimeWarning, match="NaN"):  # one bad reading must not fix the batch at its limit
        assert adaptive_batch_size(64, {"batch": math.nan}, 1000) == 64


# -- runs with a growing batch ------------------------------------------------------------------------
def test_adaptive_batch_grows_is_recorded_and_counted_exactly() -> None:
    tuner = _tuner(adaptive_batch=AdaptiveBatchSettings(eta=0.5, max_batch_size=200))
    result = tuner.fit(4)
    sizes = [row["batch_size"] for row in result.trajectory]
    assert max(sizes) > 8, sizes  # rows are logged after each step: the first already shows a grown batch
    assert all(b >= a for a, b in itertools.pairwise(sizes)), "the batch only grows"
    assert max(sizes) <= 200
    c = tuner.counters
    # a fixed run forwards each epoch's examples once, plus what the tests forwarded
    assert c.examples == 4 * tuner.n_train + c.test_examples
    assert c.test_examples > 0
    assert c.steps < 4 * tuner.batches_per_epoch  # bigger batches: fewer steps for the same epochs
    assert [row["batch_size"] for row in result.history][-1] == sizes[-1]


def test_inner_product_test_grows_less_than_the_norm_test() -> None:
    norm = _tuner(adaptive_batch=AdaptiveBatchSettings(test="norm", eta=0.5)).fit(2)
    ip = _tuner(adaptive_batch=AdaptiveBatchSettings(test="inner_product", theta=0.5)).fit(2)
    assert ip.history[-1]["batch_size"] <= norm.history[-1]["batch_size"]


def test_adaptive_batch_under_delta_stn_resumes_exactly() -> None:
    settings = {"adaptive_batch": AdaptiveBatchSettings(eta=0.5, max_batch_size=160), "lr_batch_scaling": "sqrt",
                "warmup_epochs": 0, "train_steps": 2}
    whole = _tuner("delta-stn", **settings)
    whole.fit(3)
    first = _tuner("delta-stn", **settings)
    first.fit(3, max_steps=9)
    state = first.state_dict()
    second = _tuner("delta-stn", **settings)
    second.load_state_dict(state)
    second.fit(3)
    assert second.order.batch_size == whole.order.batch_size > 8
    for a, b in zip(whole.net.state_dict().values(), second.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["batch_size"] for r in second.history] == [r["batch_size"] for r in whole.history]


def test_schedule_follows_the_examples_when_the_batch_grows() -> None:
    """A cosine schedule reaches its end with the run even though a grown batch takes fewer steps."""
    tuner = _tuner(adaptive_batch=AdaptiveBatchSettings(eta=0.5), schedule={"kind": "cosine", "final": 0.0})
    result = tuner.fit(3)
    assert result.history[-1]["batch_size"] > 8
    assert result.trajectory[-1]["weights_lr"] < 0.05 * 0.05  # the last step is at the curve's end


@pytest.mark.parametrize(("settings", "field"), [
    ({"adaptive_batch": {"max_batch_size": 4}}, "tuner.adaptive_batch.max_batch_size: "),
    ({"adaptive_batch": {}, "lr_scheduler": "OneCycleLR", "lr_scheduler_args": {"max_lr": 0.1},
      "lr_scheduler_interval": "step"}, "tuner.adaptive_batch: "),
    ({"reference_batch_size": 64}, "tuner.reference_batch_size: "),
    ({"lr_batch_scaling": "cubic"}, "lr_batch_scaling"),
    ({"adaptive_batch": {"test": "variance"}}, "adaptive_batch.test"),
])
def test_bad_settings_name_their_field(settings: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        TunerSettings.model_validate({"batch_size": 8, **settings})


def test_cli_run_with_an_adaptive_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.toml"
    config.write_text("""
method = "fixed"
epochs = 2
[data]
name = "digits"
train_subset = 300
[model]
name = "mlp"
hidden = [32]
dropout = ["p", "p"]
[space.p]
low = 0.0
high = 0.9
init = 0.2
[tuner]
batch_size = 16
lr_batch_scaling = "linear"
[tuner.adaptive_batch]
eta = 0.5
max_batch_size = 128
""")
    out = tmp_path / "out"
    store = f"sqlite:///{tmp_path / 'st.db'}"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--store", store]) == 0
    history = (out / "epochs.csv").read_text().splitlines()
    assert "batch_size" in history[0].split(",")
    column = history[0].split(",").index("batch_size")
    sizes = [float(line.split(",")[column]) for line in history[1:]]
    assert sizes[-1] > 16 and sizes[-1] <= 128
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("max_batch_size = 128", "max_batch_size = 8"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["run", str(bad), "--out", str(tmp_path / "o2"), "--store", store]) == 2
    assert "tuner.adaptive_batch.max_batch_size: " in err.getvalue() and not (tmp_path / "o2").exists()
