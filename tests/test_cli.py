import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selftune.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_mlp.toml"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder with its own store, so nothing lands in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFTUNE_STORE", f"sqlite:///{tmp_path / 'selftune.db'}")


def test_run_writes_results_trajectory_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(DIGITS), "--set", "epochs=3", "--seed", "4", "--out", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "delta-stn" and result["seed"] == 4
    assert set(result["hparams"]) == {"dropout_in", "dropout1", "dropout2"}
    for key in ("loss", "accuracy"):
        assert 0 <= result["test"][key] and 0 <= result["val"][key]
    assert result["compute"]["examples"] > 3 * result["data"]["train"]  # hyper steps and responses counted
    assert result["compute"]["seconds"] > 0
    rows = list(csv.DictReader((out / "trajectory.csv").open()))
    assert rows and {"step", "dropout_in", "dropout1", "dropout2", "train_loss", "val_loss"} <= set(rows[0])
    for name in ("trajectory.png", "losses.png", "epochs.csv"):
        assert (out / name).stat().st_size > 0
    assert "test loss" in capsys.readouterr().out


def test_fixed_method_from_the_command_line(tmp_path):
    out = tmp_path / "fixed"
    assert main(["run", str(DIGITS), "--method", "fixed", "--set", "epochs=2", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "fixed" and result["hparams"]["dropout1"] == pytest.approx(0.6, rel=1e-4)


def test_compare_trains_the_baseline_and_prints_both(tmp_path, capsys):
    """`--compare fixed` answers the newcomer's question (did tuning help?) with a recorded baseline."""
    out = tmp_path / "tuned"
    assert main(["run", str(DIGITS), "--set", "epochs=2", "--out", str(out), "--compare", "fixed", "--quiet"]) == 0
    tuned = json.loads((out / "result.json").read_text())
    fixed = json.loads((tmp_path / "tuned-fixed" / "result.json").read_text())
    assert (tuned["method"], fixed["method"]) == ("delta-stn", "fixed")
    assert fixed["hparams"]["dropout1"] == pytest.approx(0.6, rel=1e-4) and fixed["seed"] == tuned["seed"]
    printed = capsys.readouterr().out
    assert f"test loss {tuned['test']['loss']:.4f}" in printed and f"test loss {fixed['test']['loss']:.4f}" in printed
    assert "against fixed on this seed" in printed
    assert main(["run", str(DIGITS), "--compare", "delta-stn", "--out", str(tmp_path / "same")]) == 2
    assert main(["run", str(DIGITS), "--compare", "grid", "--out", str(tmp_path / "bad")]) == 2
    assert "--compare: unknown method 'grid'" in capsys.readouterr().err
    assert not (tmp_path / "same").exists() and not (tmp_path / "bad").exists()


BAD = {
    "missing epochs": ("epochs = 1\n", "", "epochs"),
    "wrong type": ('epochs = "ten"\n', "", "epochs"),
    "init out of range": ("", "\n[space.dropout1]\nlow = 0.0\nhigh = 0.5\ninit = 0.6\n", "space.dropout1"),
    "unknown dataset": ("", "", "data.name"),
    "unknown model": ("", "", "model.name"),
    "unknown key": ("", "\n[tuner]\nlearning_rate = 0.1\n", "tuner.learning_rate"),
    "undeclared dropout": ("", "", "model.dropout"),
    "dropout list too short": ("", "", "model.dropout: dropout needs 2 entries"),
    "bad augment op": ("", '\n[[augment]]\nop = "rotate"\n', "augment[0]"),
    "undeclared augment": ("", '\n[[augment]]\nop = "noise"\nstd = "sigma"\n', "augment[0].std"),
    "negative lr": ("", "\n[tuner]\nlr = -1.0\n", "tuner.lr"),
    "decay pattern names no layer": ("", '\n[objective.weight_decay]\n"fc9" = 1e-4\n', 'weight_decay["fc9"]'),
    "undeclared layer decay": ("", '\n[objective.weight_decay]\n"*" = "wd"\n', 'weight_decay["*"]'),
    "int with float bound": ("", '\n[space.k]\ntype = "int"\nlow = 0.5\nhigh = 4\ninit = 1\n', "space.k"),
}


def _config(case: str) -> str:
    head, tail, _ = BAD[case]
    data = "mnist-9" if case == "unknown dataset" else "digits"
    model = "transformer" if case == "unknown model" else "mlp"
    drop = {"undeclared dropout": '["d0", "nope"]', "dropout list too short": '["d0"]'}.get(case, '["d0", "dropout1"]')
    epochs = "" if case == "missing epochs" else (head if head else "epochs = 1\n")
    space1 = "" if case == "init out of range" else "\n[space.dropout1]\nlow = 0.0\nhigh = 0.9\ninit = 0.5\n"
    return (f"{epochs}[data]\nname = \"{data}\"\n[model]\nname = \"{model}\"\nhidden = [16]\ndropout = {drop}\n"
            f"[space.d0]\nlow = 0.0\nhigh = 0.9\ninit = 0.5\n{space1}{tail}")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_one_line_error_exit_2_nothing_written(case, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(_config(case))
    out = tmp_path / "out"
    code = main(["run", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert BAD[case][2] in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.toml"]  # no store, no checkpoints, no output


def test_unreadable_and_malformed_files(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "broken.toml"
    bad.write_text("epochs = [\n")
    assert main(["run", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_bad_override_and_bad_arguments_exit_2(tmp_path):
    assert main(["run", str(DIGITS), "--set", "noequals"]) == 2
    assert main(["run", str(DIGITS), "--set", "epochs.x=1"]) == 2
    proc = subprocess.run([sys.executable, "-m", "selftune.cli", "run", str(DIGITS), "--method", "grid"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--method" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_byte_order_mark_and_numbers_a_shell_writes_are_read_as_meant(tmp_path):
    """A config saved with a byte-order mark (Windows Notepad) was "Invalid statement"; `--set tuner.lr=.5`
    was read as the name of a hyperparameter ".5"."""
    from selftune.config import apply_overrides, load_config

    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + DIGITS.read_bytes())
    assert load_config(bom, ["epochs=2"]).epochs == 2
    raw = apply_overrides({"tuner": {}}, ["tuner.lr=.5", "tuner.momentum=1.", "tuner.hyper_lr=-.5e-3", "data=1.2.3"])
    assert raw == {"tuner": {"lr": 0.5, "momentum": 1.0, "hyper_lr": -0.0005}, "data": "1.2.3"}
    # a quoted part keeps its dots, as in TOML: a per-layer decay pattern names a nested layer
    raw = apply_overrides({"objective": {"weight_decay": {"enc.0": "wa", "*": "wb"}}},
                          ['objective.weight_decay."enc.0"=0.01', 'objective.weight_decay."*"="wc"'])
    assert raw == {"objective": {"weight_decay": {"enc.0": 0.01, "*": "wc"}}}
    assert apply_overrides({}, ['a."b=c".d=1', 'x="a=b"']) == {"a": {"b=c": {"d": 1}}, "x": "a=b"}


def test_compare_with_out_dot_writes_beside_the_folder_and_a_folder_named_as_an_output_is_refused(tmp_path):
    """`--out . --compare fixed` put the comparison in a hidden `.-fixed` inside the run's own folder; an
    output name taken by a folder failed only after the whole run, leaving half the outputs."""
    here = tmp_path / "work"
    here.mkdir()
    os.chdir(here)
    assert main(["run", str(DIGITS), "--set", "epochs=1", "--out", ".", "--compare", "fixed", "--quiet"]) == 0
    assert (tmp_path / "work-fixed" / "result.json").is_file() and not (here / ".-fixed").exists()
    (tmp_path / "taken" / "model.pt").mkdir(parents=True)
    assert main(["run", str(DIGITS), "--set", "epochs=1", "--out", str(tmp_path / "taken"), "--overwrite",
                 "--quiet"]) == 2
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["model.pt"]


@pytest.mark.parametrize("scheduler, args, message", [
    ("StepLR", ["step_size=0"], "fails at step 1 of the run's 2: integer modulo by zero"),
    ("OneCycleLR", ["max_lr=0.1", "total_steps=3"], "fails at step 4 of the run's"),
    ("ExponentialLR", ["gamma=-1"], "gives the rate -0.05 at step 1 of the run's 2; a rate must be finite and >= 0"),
])
def test_a_scheduler_that_fails_within_the_run_is_refused_before_it_starts(tmp_path, capsys, scheduler, args,
                                                                          message):
    """Arguments its constructor takes but that fail when stepped: a traceback mid-run, or a whole run trained
    at negative rates (gradient ascent) and then refused as a bad tuner.follow."""
    interval = ["--set", "tuner.lr_scheduler_interval=step"] if scheduler == "OneCycleLR" else []
    code = main(["run", str(DIGITS), "--set", "epochs=2", "--set", f"tuner.lr_scheduler={scheduler}", *interval,
                 *[a for arg in args for a in ("--set", f"tuner.lr_scheduler_args.{arg}")], "--out", "o", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tuner.lr_scheduler_args" in err and message in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "selftune.db").exists()


@pytest.mark.parametrize("augment, message", [('[{op="noise", std=-1}]', "std = -1 is outside [0, inf)"),
                                              ('[{op="flip", p=1.5}]', "p = 1.5 is outside [0, 1]")])
def test_a_constant_augmentation_strength_outside_its_range_is_refused(tmp_path, capsys, augment, message):
    """A negative noise std trained as its size (a negative weight decay is refused); a flip p above 1."""
    assert main(["run", str(DIGITS), "--set", f"augment={augment}", "--out", "o", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"augment[0]: {message}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_store_commands_and_a_failing_run(tmp_path, capsys):
    assert main(["run", str(DIGITS), "--set", "epochs=2", "--out", "ok", "--quiet"]) == 0
    code = main(["run", str(DIGITS), "--set", "epochs=2", "--set", "tuner.lr=50", "--set", "tuner.max_divergences=1",
                 "--out", "bad", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1 and "diverged 2 times" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "bad" / "result.json").exists()  # only the folder marker of the failed run
    assert main(["runs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "finished" in listing[1] and "failed" in listing[2]
    assert main(["show", "2"]) == 0
    shown = capsys.readouterr().out
    assert "failed" in shown and "event at step" in shown and "divergence" in shown
    assert main(["report", "1", "--out", "report"]) == 0
    assert (tmp_path / "report" / "trajectory.png").exists() and (tmp_path / "report" / "trajectory.csv").exists()
    assert main(["show", "9"]) == 2 and "no run 9" in capsys.readouterr().err
    assert main(["resume", "1"]) == 2
    said = capsys.readouterr()
    assert "already finished" in said.err and "resuming" not in said.out


def test_bad_store_urls_are_one_line_errors_without_secrets(tmp_path, capsys):
    for url, expected in [("nonsense", "not a database URL"),
                          ("sqlite:////no/such/folder/x.db", "does not exist"),
                          ("postgresql+nodriver://alice:s3cret@127.0.0.1/db", "no database driver")]:
        code = main(["run", str(DIGITS), "--set", "epochs=1", "--store", url, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert "s3cret" not in err
    assert not (tmp_path / "runs").exists()


def test_help_starts_without_importing_torch():
    """`selftune --help` (and `import selftune`) must not pay for PyTorch, Optuna or Ray."""
    code = ("import sys\nfrom selftune.cli import main\n"
            "for args in (['--help'], ['run', '--help'], ['bench', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'optuna', 'ray', 'sklearn', 'numpy'})\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


@pytest.mark.parametrize("module", ["algorithms", "implicit", "handover", "onepass"])
def test_any_algorithm_module_imports_first_and_completes_the_registry(module):
    """Importing selftune.implicit on its own failed on an import cycle (implicit -> algorithms -> handover
    -> implicit, half-initialised); whichever module comes first, every built-in algorithm is registered."""
    code = f"import selftune.{module}\nfrom selftune.algorithms import ALGORITHMS\nprint(sorted(ALGORITHMS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(["fixed", "hd", "stn", "delta-stn", "ift", "delta-ift", "one-pass"]))


def test_a_reader_that_closes_the_pipe_gets_no_traceback(tmp_path):
    """`selftune show 1 | head -1`: the reader left; selftune exits 141 (a closed pipe) without a traceback."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", str(ROOT / "examples" / "digits_mlp.toml"), "--set", "epochs=1", "--quiet",
                 "--out", str(tmp_path / "o"), "--store", url, "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered by default
    for buffered in (env, {**env, "PYTHONUNBUFFERED": "1"}):
        proc = subprocess.Popen([sys.executable, "-m", "selftune.cli", "show", "1", "--store", url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=buffered)
        proc.stdout.close()  # gone before the first line
        err = proc.stderr.read()
        assert proc.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_broken_connection_that_is_not_stdout_is_an_error(monkeypatch, capsys):
    """Only a reader closing selftune's own output is a quiet 141; a connection a user's code broke is not."""
    import selftune.cli as cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe (a socket of the user's task)")

    monkeypatch.setitem(cli.COMMANDS, "runs", broken)
    assert main(["runs"]) == 1
    assert "selftune: error:" in capsys.readouterr().err
