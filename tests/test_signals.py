"""SIGINT/SIGTERM end a run cleanly (checkpoint, `interrupted`, how to resume, 130/143), and only
one process drives a run at a time (a second `selftune resume` is refused, naming the holder)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from selftune.errors import StoreError
from selftune.runner import execute, prepare
from selftune.store import RunStore
from selftune.testing import DIGITS_CONFIG, SMALL, cli, digits_config

LONG = [*[a for s in SMALL for a in ("--set", s)], "--set", "epochs=40", "--quiet", "--checkpoint-every", "7"]


def _start(args, cwd, store):
    cmd = [sys.executable, "-m", "selftune.cli", *args, "--store", store]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (StoreError, LookupError):
            pass  # the store is not created yet
        assert proc.poll() is None, f"process ended before {what}: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpointed(url, run_id=1, after=0):
    return lambda: len(RunStore(url, create=False).checkpoints(run_id)) > after


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_marks_interrupted_and_says_how_to_resume(tmp_path, signum, code):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = _start(["run", str(DIGITS_CONFIG), *LONG, "--seed", "3", "--out", "out"], tmp_path, url)
    _wait_for(_checkpointed(url), proc, "the first checkpoint")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "resume with: selftune resume 1" in err
    run = RunStore(url, create=False).get_run(1)
    assert run.status == "interrupted" and signal.Signals(signum).name in run.error
    assert not (tmp_path / "out" / "result.json").exists()  # outputs appear only when the run finishes

    resumed = cli(["resume", "1", "--quiet"], cwd=tmp_path, store=url)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    uninterrupted = execute(prepare(digits_config("epochs=40", "seed=3")))[1]
    assert result["test"]["loss"] == pytest.approx(uninterrupted.test["loss"], abs=1e-6)
    assert result["hparams"] == pytest.approx(uninterrupted.hparams, abs=1e-6)
    trajectory = RunStore(url, create=False).trajectory(1)
    assert [r["step"] for r in trajectory] == [r["step"] for r in uninterrupted_trajectory(uninterrupted)]


def uninterrupted_trajectory(result):
    steps = result.compute["steps"]
    log_every = 4
    return [{"step": s} for s in range(log_every, steps + 1, log_every)]


def test_only_one_process_drives_a_run(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    first = _start(["run", str(DIGITS_CONFIG), *LONG, "--out", "out"], tmp_path, url)
    _wait_for(_checkpointed(url), first, "the first checkpoint")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130

    # a checkpoint at every step slows the driver down: it must still be training when the refused resumes
    # (two process starts) are done and SIGTERM comes
    driver = _start(["resume", "1", "--quiet", "--checkpoint-every", "1"], tmp_path, url)
    before = len(RunStore(url, create=False).checkpoints(1))
    _wait_for(lambda: RunStore(url, create=False).get_run(1).pid == driver.pid and
              _checkpointed(url, after=before)(), driver, "the resume to take the lease")
    for extra in ([], ["--force"]):  # a live driver is never taken over, not even with --force
        second = cli(["resume", "1", "--quiet", *extra], cwd=tmp_path, store=url)
        assert second.returncode == 2, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and str(driver.pid) in second.stderr, second.stderr
    assert driver.poll() is None  # the refused resumes did not disturb the driver
    driver.send_signal(signal.SIGTERM)
    rc = driver.wait(timeout=120)
    assert rc == 143, (rc, driver.stderr.read(), driver.stdout.read())
    assert RunStore(url, create=False).get_run(1).status == "interrupted"
    assert cli(["resume", "1", "--quiet", "--checkpoint-every", "100"], cwd=tmp_path, store=url).returncode == 0
    assert RunStore(url, create=False).get_run(1).status == "finished"
    late = cli(["resume", "1", "--quiet"], cwd=tmp_path, store=url)
    assert late.returncode == 2 and "finished" in late.stderr
    assert RunStore(url, create=False).get_run(1).status == "finished"


def test_a_second_ctrl_c_ends_a_hanging_shutdown(tmp_path):
    """After a stop the command only exits; an exit handler that hangs there (a Ray or database shutdown)
    must not hold the terminal: one more Ctrl-C ends the process at once, with 130 and no traceback."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    hang = ("import atexit, sys, time; from pathlib import Path\n"
            "atexit.register(lambda: (Path('hanging').touch(), time.sleep(600)))\n"
            "from selftune.cli import main; sys.exit(main())")
    cmd = [sys.executable, "-c", hang, "run", str(DIGITS_CONFIG), *LONG, "--out", "out", "--store", url]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(_checkpointed(url), proc, "the first checkpoint")
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: (tmp_path / "hanging").exists(), proc, "the exit handler")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with: selftune resume 1" in err, err
    assert RunStore(url, create=False).get_run(1).status == "interrupted"


@pytest.mark.slow  # four bench processes, about a minute: test_bench.py's in-process test covers the keeping
def test_a_bench_run_again_keeps_what_it_finished_and_resumes_what_it_was_training(tmp_path):
    """A Ctrl-C during a benchmark's second run, then the same command again: the first run is kept, the
    second resumed from the checkpoint its stop wrote, and the results equal an uninterrupted bench's (a
    bench used to train every single run again, and to tell the user to resume a run it would not use)."""
    args = ["bench", str(DIGITS_CONFIG), "--methods", "fixed", "delta-stn", "--seeds", "1",
            *[a for s in ("model.hidden=[32, 32]", "tuner.log_every=4", "epochs=20") for a in ("--set", s)]]
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = _start([*args, "--out", "cut"], tmp_path, url)
    _wait_for(lambda: len(RunStore(url, create=False).list_runs()) >= 2, proc, "the second run")
    time.sleep(0.5)  # into its training (about 3 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run this bench again" in err and "Traceback" not in err, err
    runs = RunStore(url, create=False).list_runs()
    assert [r.status for r in runs] == ["finished", "interrupted"]

    again = cli([*args, "--out", "cut"], cwd=tmp_path, store=url)
    assert again.returncode == 0, again.stderr
    assert "kept run 1" in again.stdout and "resumed run 2" in again.stdout, again.stdout
    assert len(RunStore(url, create=False).list_runs()) == 2  # nothing trained twice
    whole = cli([*args, "--out", "whole"], cwd=tmp_path, store=f"sqlite:///{tmp_path / 'whole.db'}")
    assert whole.returncode == 0, whole.stderr

    def losses(folder):
        return [(r["method"], r["test_loss"], r["hparams"], r["examples"])
                for r in json.loads((tmp_path / folder / "results.json").read_text())]

    cut, uncut = losses("cut"), losses("whole")
    assert [c[0] for c in cut] == ["fixed", "delta-stn"] and [c[3] for c in cut] == [c[3] for c in uncut]
    for (_, loss, hparams, _), (_, loss2, hparams2, _) in zip(cut, uncut, strict=True):
        assert loss == pytest.approx(loss2, abs=1e-6) and hparams == pytest.approx(hparams2, abs=1e-6)
    fresh = cli([*args, "--out", "cut", "--fresh"], cwd=tmp_path, store=url)
    assert fresh.returncode == 0 and "kept run" not in fresh.stdout, fresh.stderr
    assert len(RunStore(url, create=False).list_runs()) == 4


SIGNALLING_TASK = '''
import os
import signal

import torch
import torch.nn.functional as F
from torch import nn

import selftune as st


def signal_on_test(out, y):
    """A metric that sends this process a SIGINT while the test split (37 rows) is scored after training (the
    first time is the check before training)."""
    if len(y) == 37:
        os.environ["SIGNALLED"] = os.environ.get("SIGNALLED", "") + "x"
        if os.environ["SIGNALLED"] == "xx":
            os.kill(os.getpid(), signal.SIGINT)
    return F.mse_loss(out.squeeze(-1), y)


def task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(157, 4, generator=g)
    y = x.sum(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), st.Dropout("d"), nn.Linear(16, 1))
    return st.Task(model=model, train=(x[:80], y[:80]), val=(x[80:120], y[80:120]), test=(x[120:], y[120:]),
                   space=st.Space([st.Float("d", 0.0, 0.9, 0.2)]),
                   loss=lambda out, t: F.mse_loss(out.squeeze(-1), t), metrics={"late": signal_on_test})
'''


def test_a_signal_after_the_last_step_stops_the_command_and_keeps_the_finished_run(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the test split was scored (or the outputs written) was recorded and then ignored: the
    command exited 0, and a bench went on through every other method and seed."""
    from selftune.cli import main

    (tmp_path / "t.py").write_text(SIGNALLING_TASK)
    (tmp_path / "t.toml").write_text('method = "fixed"\nepochs = 2\n[task]\nsource = "t.py:task"\n'
                                     '[tuner]\nbatch_size = 16\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIGNALLED", raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", "t.toml", "--store", url, "--out", "o", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "run 1 finished before SIGINT could stop it (its results are recorded: selftune show 1" in err
    assert [r.status for r in RunStore(url, create=False).list_runs()] == ["finished"]
    assert (tmp_path / "o" / "result.json").is_file()


def test_a_signal_while_a_search_commits_a_trial_waits_for_the_commit_then_stops_the_study(tmp_path, monkeypatch):
    """A Ctrl-C inside Optuna's commit of a trial broke its bookkeeping (a raw UnboundLocalError traceback),
    and one inside a garbage collector's callback was swallowed (the bench ran on); the study now finishes
    the commit and stops with the one-line message."""
    import os

    import optuna

    from selftune.errors import Interrupted
    from selftune.methods import _study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    commit = storage.set_trial_state_values

    def signalled_commit(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # (the handler runs here, in the middle of Optuna's tell)
        return commit(*args, **kwargs)

    monkeypatch.setattr(storage, "set_trial_state_values", signalled_commit)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # (a bench turns it into its one line: test_bench)
        _study.run_budget(study, storage, lambda trial: trial.suggest_float("x", 0, 1) ** 2, 3)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]  # committed whole, and nothing after
    assert signal.getsignal(signal.SIGINT) is before

    def terminated_commit(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return commit(*args, **kwargs)

    monkeypatch.setattr(storage, "set_trial_state_values", terminated_commit)
    with pytest.raises(Interrupted, match=r"^study s stopped by SIGTERM \(the trials it finished are kept\)"):
        _study.run_budget(study, storage, lambda trial: trial.suggest_float("x", 0, 1) ** 2, 3)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
