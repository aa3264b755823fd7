"""Crash-proof runs for real: `selftune run` in a subprocess, killed with SIGKILL at random moments,
resumed with `selftune resume`, and compared with an uninterrupted run of the same seed."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selftune.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--set", "epochs=12", "--set", "model.hidden=[32, 32]", "--set", "tuner.log_every=4",
            "--checkpoint-every", "7", "--quiet"]


def cli(args, cwd, store):
    return [sys.executable, "-m", "selftune.cli", *args, "--store", store], cwd


def run_to_end(args, cwd, store):
    cmd, cwd = cli(args, cwd, store)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def killed_and_resumed(tmp, method, seed, kills, rng, window, train_seconds):
    """Run; SIGKILL at a random moment up to `kills` times, resuming after each; then let it finish.

    Returns where each kill landed: "start-up" (no run recorded yet), "no checkpoint", or "mid-run".
    """
    store_url = f"sqlite:///{tmp / 'selftune.db'}"
    run_args = ["run", str(ROOT / "examples" / "digits_mlp.toml"), "--method", method, "--seed", str(seed),
                "--out", "out", *SETTINGS]
    landed = []
    while True:
        runs = RunStore(store_url).list_runs()
        if runs and runs[0].status == "finished":  # the kill came after the run had finished
            return landed, store_url
        args = ["resume", str(runs[0].id), "--quiet", "--checkpoint-every", "7"] if runs else run_args
        if len(landed) >= kills:
            run_to_end(args, tmp, store_url)
            return landed, store_url
        cmd, cwd = cli(args, tmp, store_url)
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if rng.random() < 0.25:  # anywhere in the process's life, start-up included
            time.sleep(rng.uniform(0.2, window))
        else:  # while it trains: wait until the run is recorded, then kill within the training time
            deadline = time.monotonic() + 60
            while proc.poll() is None and not RunStore(store_url).list_runs() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, train_seconds * 1.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            runs = RunStore(store_url).list_runs()
            landed.append("start-up" if not runs else "after finish" if runs[0].status == "finished" else
                          "mid-run" if RunStore(store_url).checkpoints(runs[0].id) else "no checkpoint")
        else:
            assert proc.wait() == 0, proc.stderr.read().decode()
            return landed, store_url


def without_seconds(rows):
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows])


def compare(tmp_a, store_a, tmp_b, store_b):
    ra = json.loads((tmp_a / "out" / "result.json").read_text())
    rb = json.loads((tmp_b / "out" / "result.json").read_text())
    assert ra["hparams"] == rb["hparams"]
    assert ra["test"] == rb["test"] and ra["val"] == rb["val"]
    assert ra["compute"]["examples"] == rb["compute"]["examples"]
    ma, mb = torch.load(tmp_a / "out" / "model.pt"), torch.load(tmp_b / "out" / "model.pt")
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    sa, sb = RunStore(store_a), RunStore(store_b)
    ta, tb = sa.trajectory(1), sb.trajectory(1)
    steps = [r["step"] for r in tb]
    assert len(steps) == len(set(steps)), "duplicated trajectory rows"
    assert json.dumps(ta) == json.dumps(tb), "trajectory rows differ (missing or changed)"
    assert without_seconds(sa.epochs(1)) == without_seconds(sb.epochs(1))
    assert sb.get_run(1).status == "finished"


def check_kills(tmp_path, method, seed, kills, rng):
    """Kill-and-resume until `kills` kills have happened; every finished run must equal the reference."""
    reference = tmp_path / "reference"
    reference.mkdir()
    ref_store = f"sqlite:///{reference / 'selftune.db'}"
    started = time.monotonic()
    run_to_end(["run", str(ROOT / "examples" / "digits_mlp.toml"), "--method", method, "--seed", str(seed),
                "--out", "out", *SETTINGS], reference, ref_store)
    window = time.monotonic() - started  # start-up + training: kills land anywhere in a run's life
    train_seconds = json.loads((reference / "out" / "result.json").read_text())["compute"]["seconds"]
    landed: list[str] = []
    attempt = 0
    while len(landed) < kills:
        attempt += 1
        work = tmp_path / f"killed-{attempt}"
        work.mkdir()
        these, store = killed_and_resumed(work, method, seed, kills - len(landed), rng, window, train_seconds)
        compare(reference, ref_store, work, store)
        landed += these
    print(f"{method} seed {seed}: {len(landed)} kills, all resumed equal: "
          + ", ".join(f"{k} {landed.count(k)}" for k in ("start-up", "no checkpoint", "mid-run", "after finish")))
    return landed


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    assert len(check_kills(tmp_path, "delta-stn", 0, kills=3, rng=random.Random(1))) == 3


@pytest.mark.slow
@pytest.mark.parametrize("method, seed", [("delta-stn", 1), ("stn", 2), ("fixed", 3), ("delta-stn", 4), ("stn", 5)])
def test_many_sigkills_and_resumes(tmp_path, method, seed):
    assert len(check_kills(tmp_path, method, seed, kills=6, rng=random.Random(seed))) == 6


def test_a_run_recorded_before_encodings_resumes_with_the_net_it_was_recorded_with():
    """Records are full dumps: one without ``tuner.encoding`` came from before the setting and used the
    MIP gates with the response at ``lr``; its resume rebuilds exactly that, whatever today's defaults."""
    from selftune.config import parse_config
    from selftune.runner import prepare, recorded_meaning
    from selftune.testing import digits_config

    raw = digits_config().model_dump(mode="json")
    today = prepare(parse_config(recorded_meaning(raw))).tuner
    del raw["tuner"]["encoding"]
    old = prepare(parse_config(recorded_meaning(raw))).tuner
    h = len(old.net.space)
    assert (today.net.encoding, old.net.encoding) == ("logit", "mip")
    gates = [m.gate.shape[1] for m in old.net.best_response_layers()]
    assert gates and all(w == 2 * h for w in gates)
    assert all(m.gate.shape[1] == h for m in today.net.best_response_layers())
    lr = raw["tuner"]["lr"]
    assert old.optimizers["response"].param_groups[0]["lr"] == lr
    assert today.optimizers["response"].param_groups[0]["lr"] == min(lr, 0.01)


def test_a_ctrl_c_inside_a_step_stops_fit_after_it_and_fit_again_goes_on_exactly():
    """A notebook's Ctrl-C lands inside a step (the model's forward): the batch had been drawn and the
    step not counted, so fit again skipped a batch and trained another run (fuzz round 46). The step now
    finishes, fit raises KeyboardInterrupt, and fit again equals an uninterrupted run."""
    import os

    from selftune.testing import digits_tuner

    whole = digits_tuner(method="delta-stn")
    whole.fit(3)
    tuner = digits_tuner(method="delta-stn")
    calls = [0]

    def ctrl_c(module, inputs, output):
        calls[0] += 1
        if calls[0] == 25:
            os.kill(os.getpid(), signal.SIGINT)

    hook = tuner.net.model.net[2].register_forward_hook(ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a notebook; a test may have left
    try:                                                                  # its own)
        with pytest.raises(KeyboardInterrupt, match=r"fit stopped after step \d+ \(Ctrl-C\)"):
            tuner.fit(3)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    hook.remove()
    assert 0 < tuner.counters.steps < whole.counters.steps
    tuner.fit(3)
    assert tuner.net.values() == whole.net.values()
    for a, b in zip(whole.net.state_dict().values(), tuner.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
