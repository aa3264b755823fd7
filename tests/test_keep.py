"""`tuner.keep = "best"`: a run returns, scores and exports the weights of its lowest validation loss,
keeps training from the last step's, and resumes to the same kept epoch."""

import json
from pathlib import Path

import pytest
import torch
from test_tuner import make_tuner, rows

import selftune as st
from selftune.cli import main

ROOT = Path(__file__).resolve().parents[1]

# A rate large enough that the validation loss is noisy and its lowest is not the last epoch's.
LOUD = dict(lr=0.3)


@pytest.fixture
def sparse():
    return st.Space([st.Float("d0", 0.0, 0.95, init=0.05), st.Float("d1", 0.0, 0.95, init=0.05),
                     st.Float("wd", 1e-7, 1e-1, init=1e-6, log=True)])


class Spoil(st.Callback):
    """Scramble the weights after the run's last step (finite, no roll-back): its last epoch then scores
    far worse than every earlier one, whatever the thread count does to the trajectory before it."""

    def __init__(self, at):
        self.at = at

    def on_step(self, tuner, row):
        if tuner.counters.steps == self.at:
            with torch.no_grad():
                for p in tuner.net.general_parameters():
                    p.add_(3.0 * torch.randn_like(p))


@pytest.mark.parametrize("method", ["fixed", "delta-stn"])
def test_the_kept_net_is_the_lowest_validation_epoch_and_training_state_stays_the_last(digits, sparse, method):
    # the scrambled last epoch is the kind of blow-up tuner.rollback_val_ratio rolls back: off here
    tuner = make_tuner(digits, sparse, method, keep="best", rollback_val_ratio=0, **LOUD)
    fit = tuner.fit(10, callbacks=[Spoil(10 * tuner.batches_per_epoch)])
    val = [r["val_loss"] for r in fit.history]
    best = min(range(len(val)), key=val.__getitem__)
    assert best < len(val) - 1, "the setting must make the lowest validation loss an earlier epoch's"
    assert fit.kept_epoch == best + 1
    assert fit.net is not tuner.net
    assert tuner.score(net=fit.net)["loss"] == pytest.approx(val[best], rel=1e-6)
    assert tuner.score()["loss"] == pytest.approx(val[-1], rel=1e-6)  # the tuner trains on from the last step
    assert fit.hparams == fit.net.values()
    if method == "delta-stn":  # the epoch's hyperparameters come with its weights
        assert fit.hparams != tuner.net.values()


def test_keep_last_returns_the_net_itself(digits, sparse):
    tuner = make_tuner(digits, sparse, "fixed", **LOUD)
    fit = tuner.fit(3)
    assert fit.net is tuner.net and fit.kept_epoch is None


def test_a_resumed_run_keeps_the_same_epoch_and_weights(digits, sparse, tmp_path):
    full = make_tuner(digits, sparse, "delta-stn", keep="best", **LOUD).fit(8)

    first = make_tuner(digits, sparse, "delta-stn", keep="best", **LOUD)
    first.fit(8, max_steps=5 * first.batches_per_epoch + 7)  # after the best so far, mid-epoch
    path = tmp_path / "tuner.pt"
    torch.save(first.state_dict(), path)
    second = make_tuner(digits, sparse, "delta-stn", keep="best", seed=99, **LOUD)
    second.load_state_dict(torch.load(path, weights_only=True))
    resumed = second.fit(8)

    assert resumed.kept_epoch == full.kept_epoch
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert rows(resumed.history, drop={"seconds"}) == rows(full.history, drop={"seconds"})


def test_the_cli_scores_and_exports_the_kept_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFTUNE_STORE", f"sqlite:///{tmp_path / 'selftune.db'}")
    out = tmp_path / "run"
    code = main(["run", str(ROOT / "examples" / "digits_mlp.toml"), "--method", "fixed", "--set", "epochs=8",
                 "--set", "model.hidden=[32, 32]", "--set", "tuner.lr=0.3", "--set", "tuner.keep=best",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    epochs = [float(line.split(",")[3]) for line in (out / "epochs.csv").read_text().splitlines()[1:]]
    header = (out / "epochs.csv").read_text().splitlines()[0].split(",")
    assert header[3] == "val_loss"
    kept = result["kept_epoch"]
    assert epochs[kept - 1] == min(epochs)
    assert result["val"]["loss"] == pytest.approx(min(epochs), rel=1e-6)
    assert result["last"]["epoch"] == 8 and result["last"]["val"]["loss"] == pytest.approx(epochs[-1], rel=1e-6)
    assert any("returned the weights and hyperparameters of epoch" in line for line in result["explanation"])
    saved = torch.load(out / "model.pt", weights_only=True)
    assert set(saved) and all(torch.is_tensor(v) for v in saved.values())


def test_a_bad_keep_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFTUNE_STORE", f"sqlite:///{tmp_path / 'selftune.db'}")
    code = main(["run", str(ROOT / "examples" / "digits_mlp.toml"), "--set", "tuner.keep=lowest",
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tuner.keep" in err, err
    assert not (tmp_path / "out").exists()


def test_a_model_that_keeps_its_last_activation_is_copied_and_an_interrupted_fit_returns(digits):
    """copy.deepcopy refuses a tensor of the autograd graph, which a model keeping `self.features = h`
    holds after a training step: the kept copy takes it detached."""
    class Caching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.drop, self.b = torch.nn.Linear(64, 32), st.Dropout("d0"), torch.nn.Linear(32, 10)

        def forward(self, x):
            h = self.drop(torch.relu(self.a(x.flatten(1))))
            self.features = h
            self.cache = {"h": (h, h.mean()), "rows": [[h]]}  # nested containers, as users keep them
            return self.b(h)

    net = st.hypernetize(Caching(), st.Space([st.Float("d0", 0.0, 0.9, init=0.2)]))
    tuner = st.SelfTuner(net, digits.train, digits.val, method="fixed", settings={"batch_size": 64, "keep": "best"})
    fit = tuner.fit(3, max_steps=tuner.batches_per_epoch + 3)  # stopped mid-epoch, after a training step
    assert fit.kept_epoch == 1 and fit.net is not tuner.net


def test_after_a_roll_back_the_kept_epoch_is_the_lowest_of_the_history_the_run_kept(digits, sparse):
    from selftune.testing import PoisonAt

    tuner = make_tuner(digits, sparse, "delta-stn", keep="best", **LOUD)
    poison = PoisonAt(4 * tuner.batches_per_epoch + 2)
    fit = tuner.fit(7, callbacks=[poison])
    assert poison.events and tuner.divergences == 1
    val = [r["val_loss"] for r in fit.history]
    assert len(val) == 7 and fit.kept_epoch == min(range(7), key=val.__getitem__) + 1
    assert tuner.score(net=fit.net)["loss"] == pytest.approx(min(val), rel=1e-6)
