"""Replaying a tuned schedule: the schedule object and its files, `[tuner] follow` (a fixed run that
follows it), `selftune replay RUN`, and the `delta-stn-replay` benchmark method."""

import json
from pathlib import Path

import pytest
import torch

from selftune.config import load_config
from selftune.errors import ConfigError
from selftune.methods import METHODS, Context
from selftune.runner import prepare, replay_recorded, run_recorded
from selftune.schedules import HyperSchedule
from selftune.settings import TunerSettings
from selftune.store import RunStore
from selftune.testing import cli, digits_config, digits_tuner
from selftune.tuner import SelfTuner

ROOT = Path(__file__).resolve().parents[1]


def test_a_row_holds_from_its_step_until_the_next():
    s = HyperSchedule(steps=[0, 10, 20], values={"p": [0.1, 0.2, 0.3]}, lr=[0.5, 0.4, 0.3])
    assert [s.at(t)["p"] for t in (0, 9, 10, 19, 20, 10_000)] == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    assert s.lr_at(15) == 0.4
    assert HyperSchedule(steps=[0], values={"p": [0.1]}).lr_at(3) is None


@pytest.mark.parametrize("bad, message", [
    ({"steps": [5, 10], "values": {"p": [0.1, 0.2]}}, "start at 0"),
    ({"steps": [0, 10, 10], "values": {"p": [0.1, 0.2, 0.3]}}, "strictly increasing"),
    ({"steps": [0, 10], "values": {"p": [0.1]}}, "p has 1 values for 2 steps"),
    ({"steps": [0, 10], "values": {"p": [0.1, float("nan")]}}, "not finite"),
])
def test_an_inconsistent_schedule_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        HyperSchedule(**bad)


@pytest.mark.parametrize("text, message", [
    ("step,a\n5,0.1\n10,0.2\n", "steps must start at 0"),
    ("step,a\n0,0.1\n0.5,0.2\n", "step 0.5 is not a whole number"),
    ("step,a,weights_lr\n0,0.1,0.1\n1,0.2,-0.1\n", "weights_lr.1: Input should be greater than or equal to 0"),
    ("step,a\n0,0.1\n1,nan\n", "a has a value that is not finite"),
    ("step,a\n0,0.1\ninf,0.2\n", "step inf is not a whole number"),
    ("step,a,lr\n0,0.1,0.1\n1,0.2,-0.1\n", "lr.1: Input should be greater than or equal to 0"),
    ("step,a,b\n0,0.1,0.2\n1,0.3\n", "line 3 has no value for b"),
    ("step,a\n0,0.1\n1,\n", "line 3 has no value for a"),
])
def test_a_bad_schedule_file_is_one_plain_line(tmp_path, text, message):
    """What is wrong and where, without pydantic's echo of the whole input and its link (a fractional
    step was read as the step below it, silently)."""
    (tmp_path / "s.csv").write_text(text)
    with pytest.raises(ValueError) as err:
        HyperSchedule.load(tmp_path / "s.csv")
    line = str(err.value)
    assert message in line and "\n" not in line and "input_value" not in line and "pydantic" not in line
    if "-0.1" in text:  # the same in a JSON file, whose field is lr
        (tmp_path / "s.json").write_text('{"steps": [0, 1], "values": {"a": [0.1, 0.2]}, "lr": [0.1, -0.1]}')
        with pytest.raises(ValueError, match=r"is not valid: lr\.1: Input should be greater than or equal to 0"):
            HyperSchedule.load(tmp_path / "s.json")


def test_csv_and_json_round_trip(tmp_path):
    s = HyperSchedule(steps=[0, 10], values={"a": [0.1, 0.25], "b": [3.0, 4.5]}, lr=[0.05, 0.04], steps_per_epoch=20)
    s.to_csv(tmp_path / "s.csv")
    s.to_json(tmp_path / "s.json")
    header = (tmp_path / "s.csv").read_text().splitlines()[0]
    assert header == "step,epoch,a,b,weights_lr"
    for name in ("s.csv", "s.json"):
        back = HyperSchedule.load(tmp_path / name)
        assert (back.steps, back.values, back.lr, back.steps_per_epoch) == (s.steps, s.values, s.lr, 20)
        assert back.rows() == s.rows() and back.source  # where it came from is recorded
    # a hyperparameter named lr (the rate's usual binding) keeps its own column beside the weights' rate
    bound = HyperSchedule(steps=[0, 10], values={"lr": [0.02, 0.04]}, lr=[0.01, 0.03])
    bound.to_csv(tmp_path / "bound.csv")
    back = HyperSchedule.load(tmp_path / "bound.csv")
    assert (back.values, back.lr) == (bound.values, bound.lr)
    # a file with only an lr column (the earlier name of the rate's column, or hand-written) gives the rate
    (tmp_path / "old.csv").write_text("step,a,lr\n0,0.1,0.05\n10,0.2,0.04\n")
    old = HyperSchedule.load(tmp_path / "old.csv")
    assert (old.values, old.lr) == ({"a": [0.1, 0.2]}, [0.05, 0.04])
    (tmp_path / "bad.csv").write_text("epoch,a\n0,0.1\n")
    with pytest.raises(ValueError, match=r"bad.csv.*step column"):
        HyperSchedule.load(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="cannot read schedule"):
        HyperSchedule.load(tmp_path / "missing.csv")


def test_a_schedule_built_in_python_takes_its_documented_arguments_and_one_line_errors():
    """HyperSchedule(steps, values, ...) as docs/api.md writes it (pydantic alone takes keywords only), and an
    inconsistent one is a ConfigError naming tuner.follow, as in a config."""
    from selftune.errors import ConfigError

    s = HyperSchedule([0, 100], {"dropout": [0.5, 0.2]}, lr=[0.1, 0.05])
    assert s.at(150) == {"dropout": 0.2} and s.lr_at(99) == 0.1
    for kwargs, message in [({"steps": [1], "values": {}}, "tuner.follow: steps must start at 0"),
                            ({"steps": [0, 1], "values": {"a": [0.1]}}, "tuner.follow: a has 1 values for 2 steps"),
                            ({"steps": [0], "values": {}, "lr": [-1.0]}, "tuner.follow.lr[0]: Input should be")]:
        with pytest.raises(ConfigError) as err:
            HyperSchedule(**kwargs)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


def _follower(schedule, *overrides, seed=0):
    config = digits_config(*overrides).derive(method="fixed", seed=seed)
    raw = config.model_dump(mode="python")
    raw["tuner"]["follow"] = schedule.model_dump(mode="python")
    from selftune.config import parse_config

    return prepare(parse_config(raw)).tuner


def test_a_fixed_run_follows_a_tuned_schedule_and_a_replay_of_it_reproduces_it():
    """The replay's trajectory shows the tuned run's values at every logged step, and replaying the
    replay trains the same weights: the schedule is all a replay depends on."""
    tuned = digits_tuner(method="delta-stn")
    fit = tuned.fit(4)
    schedule = fit.schedule
    assert schedule is not None and schedule.steps[0] == 0 and len(schedule.steps) == len(fit.trajectory) + 1
    names = tuned.net.space.names
    moved = max(abs(schedule.values[n][-1] - schedule.values[n][0]) for n in names)
    assert moved > 0.01  # the tuned run moved something worth following
    replay = _follower(schedule)
    again = replay.fit(4)
    for row in again.trajectory:
        step = int(row["step"])
        for n in names:
            assert row[n] == pytest.approx(schedule.at(step)[n], abs=1e-5)
        assert row["weights_lr"] == pytest.approx(schedule.lr_at(step - 1))
    twice = _follower(again.schedule)
    twice.fit(4)
    for a, b in zip(twice.net.parameters(), replay.net.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_at_log_every_1_a_follower_trains_every_step_at_the_recorded_rate_and_values(tmp_path):
    """A tuned rate under a warm-up, recorded at every step: the follower's step t trains at the recorded
    run's rate of step t (not step t - 1's, which put a replay one step behind, low all through a
    warm-up), its schedule is the recorded one, and a replay of the replay is the same schedule again."""
    from selftune.runner import execute

    overrides = ["epochs=2", "tuner.log_every=1", "tuner.schedule.warmup_epochs=1"]
    config = load_config(ROOT / "examples" / "digits_lr.toml", overrides)
    fit, _ = execute(prepare(config.derive(method="hd", seed=0)))
    # the trajectory row after step t holds step t's rate: the rates the recorded run trained at
    assert [int(row["step"]) for row in fit.trajectory] == list(range(1, len(fit.trajectory) + 1))
    rates = [row["weights_lr"] for row in fit.trajectory]
    assert rates[5] > 1.5 * rates[1]  # the warm-up and the tuning move it step by step
    schedule = fit.schedule
    assert [schedule.lr_at(t) for t in range(len(rates))] == pytest.approx(rates, rel=1e-12)
    schedule.to_csv(tmp_path / "schedule.csv")
    followed, _ = execute(prepare(load_config(ROOT / "examples" / "digits_lr.toml", [
        *overrides, 'method="fixed"', f'tuner.follow="{tmp_path / "schedule.csv"}"'])))
    assert [row["weights_lr"] for row in followed.trajectory] == pytest.approx(
        [row["weights_lr"] for row in fit.trajectory], rel=1e-6)
    again = followed.schedule
    assert again.steps == schedule.steps and again.lr == pytest.approx(schedule.lr, rel=1e-6)
    for name, column in schedule.values.items():  # row 0 included: the run started at the followed values
        assert again.values[name] == pytest.approx(column, rel=1e-5, abs=1e-7)


def test_the_schedule_changes_the_training():
    """Following dropout 0.9 everywhere is not training at the config's init values."""
    names = digits_config().build_space().names
    heavy = HyperSchedule(steps=[0], values={n: [0.9] for n in names})
    plain = digits_tuner(method="fixed").fit(2)
    follow = _follower(heavy).fit(2)
    assert follow.trajectory[-1]["train_loss"] > plain.trajectory[-1]["train_loss"] + 0.2


def test_a_followed_run_resumes_exactly():
    schedule = HyperSchedule(steps=[0, 15, 40], values={"dropout1": [0.1, 0.6, 0.3]}, lr=[0.05, 0.02, 0.01])
    whole = _follower(schedule)
    whole.fit(3)
    first = _follower(schedule)
    first.fit(3, max_steps=23)
    second = _follower(schedule)
    second.load_state_dict(first.state_dict())
    second.fit(3)
    for a, b in zip(second.net.parameters(), whole.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_follow_is_refused_where_it_cannot_apply():
    space = digits_config().build_space()
    ok = HyperSchedule(steps=[0], values={"dropout1": [0.3]})
    t = digits_tuner(method="delta-stn")
    with pytest.raises(ConfigError, match=r"tuner.follow: method 'delta-stn' tunes"):
        SelfTuner(t.net, t.train_data, t.val_data, method="delta-stn", settings=TunerSettings(lr=0.05, follow=ok))
    with pytest.raises(ConfigError, match=r"tuner.follow: the schedule sets nope.*the space has"):
        _follower(HyperSchedule(steps=[0], values={"nope": [0.3]}))
    high = space["dropout1"].high
    with pytest.raises(ConfigError, match=r"tuner.follow: the schedule's dropout1=1.5 lies outside"):
        _follower(HyperSchedule(steps=[0], values={"dropout1": [1.5]}))
    assert high < 1.5


def test_a_run_whose_batch_grew_is_refused_by_replay():
    from selftune.runner import replay_config

    config = digits_config("tuner.adaptive_batch.eta=0.5")
    schedule = HyperSchedule(steps=[0], values={"dropout1": [0.3]})
    with pytest.raises(ConfigError, match=r"tuner\.adaptive_batch: a run whose batch grew cannot be replayed"):
        replay_config(config, schedule)
    # a bench names it before anything trains (it trained fixed and the tuned runs, then stopped)
    from selftune.methods import METHODS

    assert "cannot be replayed" in METHODS["delta-stn-replay"].unusable(config)
    assert METHODS["delta-stn-replay"].unusable(digits_config()) is None


def _epochs(folder):
    import csv

    return [(float(r["weights_lr"]), float(r["val_loss"])) for r in csv.DictReader((folder / "epochs.csv").open())]


def test_a_replay_keeps_the_torch_scheduler_of_a_rate_nothing_tuned_and_reproduces_the_run(tmp_path):
    """The recorded rate is sampled every log_every steps; a StepLR's change between two rows was lost (found
    by trying it as a user: steps 0-4 trained at 0.05, the schedule said 0.025), and replay refused the run."""
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    config = digits_config("tuner.lr_scheduler=StepLR", "tuner.lr_scheduler_args={step_size = 1, gamma = 0.5}",
                           "tuner.log_every=7").derive(method="fixed")
    run_recorded(prepare(config), store, out=tmp_path / "a", checkpoint_root=tmp_path / "ck", every=None)
    replay = replay_recorded(store, 1, out=tmp_path / "b", checkpoint_root=tmp_path / "ck", every=None)
    assert replay.config["tuner"]["lr_scheduler"] == "StepLR" and replay.config["tuner"]["follow"]["lr"] is None
    assert _epochs(tmp_path / "b") == _epochs(tmp_path / "a")


def test_a_replay_of_a_run_that_rolled_back_follows_its_lowered_rate(tmp_path):
    from selftune.testing import PoisonAt

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    prepared = prepare(digits_config("tuner.log_every=1"))
    run_recorded(prepared, store, out=tmp_path / "a", checkpoint_root=tmp_path / "ck", every=None,
                 callbacks=[PoisonAt(prepared.tuner.batches_per_epoch + 2)])
    rates = [lr for lr, _ in _epochs(tmp_path / "a")]
    assert rates[-1] == pytest.approx(rates[0] / 2)  # the roll-back halved it
    replay_recorded(store, 1, out=tmp_path / "b", checkpoint_root=tmp_path / "ck", every=None)
    assert [lr for lr, _ in _epochs(tmp_path / "b")] == pytest.approx(rates)


def test_a_tuned_rates_schedule_begins_at_its_first_step(tmp_path):
    tuner = digits_tuner("space.lr.low=1e-4", "space.lr.high=1.0", "space.lr.init=0.005", "space.lr.log=true",
                         'tuner.lr="lr"', method="hd")
    fit = tuner.fit(2)
    first = fit.schedule.lr_at(0)
    assert first == pytest.approx(0.005, rel=1e-3)  # the rate the first step trained at, not a later one
    assert fit.schedule.values["lr"][0] == pytest.approx(0.005, rel=1e-6)


def test_a_run_shorter_than_log_every_still_records_its_rate():
    """Three steps and log_every 10: no trajectory row, and the schedule's one row keeps the rate."""
    tuner = digits_tuner("tuner.batch_size=512", method="delta-stn")
    fit = tuner.fit(1)
    assert fit.trajectory == [] and fit.schedule.steps == [0]
    assert fit.schedule.lr == [pytest.approx(tuner.settings.lr)]


def test_a_config_follows_a_schedule_file_relative_to_itself(tmp_path):
    HyperSchedule(steps=[0, 10], values={"dropout1": [0.2, 0.7]}).to_csv(tmp_path / "plan.csv")
    text = (ROOT / "examples" / "digits_mlp.toml").read_text()
    config_file = tmp_path / "cfg.toml"
    config_file.write_text(text.replace("[tuner]", '[tuner]\nfollow = "plan.csv"', 1))
    config = load_config(config_file, ["method=\"fixed\""])
    assert config.tuner.follow is not None and config.tuner.follow.values == {"dropout1": [0.2, 0.7]}
    # the schedule lives in the config from here on: the file may go
    (tmp_path / "plan.csv").unlink()
    assert json.loads(config.model_dump_json())["tuner"]["follow"]["steps"] == [0, 10]
    config_file.write_text(text.replace("[tuner]", '[tuner]\nfollow = "gone.csv"', 1))
    with pytest.raises(ConfigError, match=r"tuner.follow: cannot read schedule .*gone.csv"):
        load_config(config_file)


def test_replay_recorded_trains_a_new_run_on_the_stored_schedule(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    tuned = run_recorded(prepare(digits_config()), store, out=tmp_path / "tuned",
                         checkpoint_root=tmp_path / "ck", every=None)
    assert (tmp_path / "tuned" / "schedule.csv").exists()
    replay = replay_recorded(store, tuned.run_id, out=tmp_path / "replay", checkpoint_root=tmp_path / "ck",
                             every=None)
    assert replay.method == "replay" and replay.config["method"] == "fixed"
    assert replay.config["tuner"]["follow"]["source"] == f"run {tuned.run_uuid}"
    assert store.get_run(replay.run_id).method == "replay"
    assert replay.hparams == pytest.approx(tuned.hparams, abs=2e-3)  # it ends where the tuned run ended
    assert any("followed a recorded schedule" in line for line in replay.explanation)


def test_cli_replay_and_its_errors(tmp_path):
    store = f"sqlite:///{tmp_path / 's.db'}"
    cli(["run", str(ROOT / "examples" / "digits_mlp.toml"), "--set", "epochs=2", "--set", "model.hidden=[16, 16]",
         "--out", "a", "--quiet"], cwd=tmp_path, store=store, check=True)
    done = cli(["replay", "1", "--out", "b", "--quiet"], cwd=tmp_path, store=store, check=True)
    assert "replay test loss" in done.stdout and (tmp_path / "b" / "schedule.csv").exists()
    listed = cli(["runs"], cwd=tmp_path, store=store, check=True).stdout
    assert "replay" in listed
    missing = cli(["replay", "7"], cwd=tmp_path, store=store)
    assert missing.returncode == 2 and "RUN: no run 7" in missing.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep")
    taken = cli(["replay", "1", "--out", "c"], cwd=tmp_path, store=store)
    assert taken.returncode == 2 and "--out" in taken.stderr
    assert (tmp_path / "c" / "mine.txt").read_text() == "keep" and len(list((tmp_path / "c").iterdir())) == 1


def test_the_replay_method_reuses_the_tuning_run_and_counts_both(tmp_path):
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    ctx = Context(store=store, folder=tmp_path, label="t")
    config = digits_config()
    tuned = METHODS["delta-stn"].run(config, 0, ctx)
    replayed = METHODS["delta-stn-replay"].run(config, 0, ctx)
    assert replayed.trials == 2 and replayed.examples > tuned.examples
    assert len(store.list_runs()) == 2  # the tuning run was reused, not trained again
    assert replayed.curve[0] == (tuned.examples, tuned.test_loss)


def test_a_rate_bound_to_a_hyperparameter_named_lr_replays_through_schedule_csv(tmp_path):
    """examples/digits_lr.toml binds the weights' rate to a hyperparameter named lr: its schedule.csv
    keeps that hyperparameter's column beside the weights' rate, and a fixed run following the file
    trains at the recorded rates with the hyperparameter following its own column (it used to stay
    at its init while the rate column overwrote it)."""
    from selftune.runner import execute

    config = load_config(ROOT / "examples" / "digits_lr.toml", ["epochs=2"])
    fit, _ = execute(prepare(config.derive(method="hd", seed=0)))
    fit.schedule.to_csv(tmp_path / "schedule.csv")
    assert (tmp_path / "schedule.csv").read_text().splitlines()[0].split(",")[-2:] == ["lr", "weights_lr"]
    schedule = HyperSchedule.load(tmp_path / "schedule.csv")
    assert schedule.values["lr"][0] == pytest.approx(0.005) and schedule.values["lr"][-1] > 0.01
    follow = load_config(ROOT / "examples" / "digits_lr.toml",
                         ["epochs=2", 'method="fixed"', f'tuner.follow="{tmp_path / "schedule.csv"}"'])
    followed, _ = execute(prepare(follow))
    for row in followed.trajectory:
        step = int(row["step"])
        assert row["lr"] == pytest.approx(schedule.at(step)["lr"], rel=1e-5)
        assert row["weights_lr"] == pytest.approx(schedule.lr_at(step - 1), rel=1e-5)


def test_a_schedule_rebuilt_from_the_store_starts_where_the_run_did(tmp_path, monkeypatch):
    """A tuned rate logged every 10 steps: the store's rows begin at step 10, so the rebuilt schedule's row
    0 took step 9's rate (60x the first one); the run's start, recorded with its result, is now row 0."""
    from selftune.runner import recorded_schedule

    monkeypatch.chdir(tmp_path)
    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "digits_lr.toml",
                         ["epochs=2", "method=\"hd\""])
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    result = run_recorded(prepare(config), store, out=tmp_path / "out", checkpoint_root=tmp_path / "ck")
    own = HyperSchedule.load(tmp_path / "out" / "schedule.csv")
    rebuilt = recorded_schedule(store, result.run_id)[1]
    assert rebuilt.lr is not None and own.lr is not None
    assert rebuilt.lr[0] == pytest.approx(own.lr[0]) and rebuilt.at(0) == pytest.approx(own.at(0))


def test_a_short_last_batch_under_lr_batch_scaling_does_not_set_the_rate_of_the_steps_its_row_stands_for():
    """A trajectory row holds the rate of its last step; under lr_batch_scaling an epoch's short last batch
    trains at a fraction of it, and a follower applied that fraction to the row's log_every full steps (a
    constant rate of 0.01 replayed at 0.00375 for whole stretches). Rows now hold a full batch's rate and the
    follower scales its own short steps."""
    from torch import nn

    import selftune as st

    torch.manual_seed(0)
    x, y = torch.randn(190, 6), torch.randint(0, 2, (190,))

    def tuner(**settings):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), st.Dropout("d"), nn.Linear(16, 2))
        space = st.Space([st.Float("d", 0.0, 0.9, 0.2), st.Float("lr", 1e-3, 1.0, 0.01, log=True)])
        base = dict(batch_size=16, lr="lr", optimizer="sgd", lr_batch_scaling="linear", lr_travel=1e-9, log_every=5)
        return SelfTuner(st.hypernetize(model, space), (x[:150], y[:150]), (x[150:], y[150:]),
                         method=settings.pop("method", "hd"), settings=TunerSettings(**{**base, **settings}), seed=0)

    first = tuner()
    fit = first.fit(3)
    assert {round(r["weights_lr"], 6) for r in fit.trajectory} == {0.01}  # a full batch's rate, every row
    restored = tuner()  # the last step (a short batch) is in the checkpoint: a restored run records the same
    restored.load_state_dict(first.state_dict())
    assert restored.last_lr == pytest.approx(0.01) and restored.schedule().lr[-1] == pytest.approx(0.01)
    followed = tuner(method="fixed", follow=fit.schedule).fit(3)
    assert followed.history[-1]["val_loss"] == pytest.approx(fit.history[-1]["val_loss"], rel=1e-5)


def test_the_last_row_of_a_schedule_holds_the_rate_of_the_runs_last_step(tmp_path):
    """20 steps logged every 7: the row at step 14 holds steps 14-19, and took step 13's rate (a replay
    trained a cosine's tail at 0.0137 where the run went to 0.0003). The store keeps the last rate too."""
    from torch import nn

    import selftune as st

    torch.manual_seed(0)
    x, y = torch.randn(200, 6), torch.randint(0, 2, (200,))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), st.Dropout("d"), nn.Linear(16, 2))
    tuner = SelfTuner(st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, 0.2)])), (x[:160], y[:160]),
                      (x[160:], y[160:]), method="fixed",
                      settings=TunerSettings(batch_size=16, lr=0.05, log_every=7, schedule={"kind": "cosine"}))
    fit = tuner.fit(2)
    assert fit.schedule.steps == [0, 7, 14]
    assert fit.schedule.lr[-1] == pytest.approx(tuner.weights_lr) and fit.schedule.lr[-1] < 0.2 * fit.schedule.lr[1]
    from selftune.cli import main
    from selftune.runner import recorded_schedule

    url = f"sqlite:///{tmp_path / 'selftune.db'}"
    assert main(["run", str(ROOT / "examples" / "digits_mlp.toml"), "--set", "epochs=2", "--set", "tuner.log_every=7",
                 "--set", 'tuner.schedule.kind="cosine"', "--set", "data.train_subset=600", "--out",
                 str(tmp_path / "out"), "--store", url, "--quiet"]) == 0
    store = RunStore(url)
    _, stored = recorded_schedule(store, 1, replay=False)
    written = HyperSchedule.load(tmp_path / "out" / "schedule.csv")
    assert stored.lr == pytest.approx(written.lr) and stored.lr[-1] < stored.lr[-2]
