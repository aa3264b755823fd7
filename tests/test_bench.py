"""`selftune bench digits-mlp --quick`: every method runs on the same task and is recorded."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch

from selftune.bench import GPU_TASKS, load_task
from selftune.cli import main
from selftune.errors import ConfigError, DivergenceError
from selftune.methods import METHODS
from selftune.store import RunStore

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_runs_and_records_every_method(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    assert main(["bench", "digits-mlp", "--quick", "--seeds", "1", "--store", url, "--out", "b"]) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    # every default method that can run the task: hd tunes a learning rate, which digits-mlp does not bind;
    # the -replay variants, one-pass and grid run only when named
    usable = [m for m, method in METHODS.items() if m != "hd" and method.by_default]
    assert "one-pass" not in usable and "grid" not in usable  # these run when named
    assert list(dict.fromkeys(r["method"] for r in results)) == usable
    # Single runs start from each of the task's three starts; searches and PBT sample the space once.
    starts = ["overfit", "default", "overreg"]
    for m in usable:
        expected = starts if METHODS[m].uses_start else [""]
        assert [r["start"] for r in results if r["method"] == m] == expected
    overfit = next(r for r in results if r["method"] == "fixed" and r["start"] == "overfit")
    assert overfit["start_values"]["dropout1"] == 0.05 and overfit["hparams"]["dropout1"] == pytest.approx(0.05)
    tuned = next(r for r in results if r["method"] == "delta-stn" and r["start"] == "overfit")
    assert tuned["began"]["dropout1"] == pytest.approx(0.05)  # the values the run itself began from
    assert (tmp_path / "b" / "runs" / "delta-stn-overreg-seed0" / "result.json").exists()
    for r in results:
        assert r["test_loss"] > 0 and 0 <= r["test_accuracy"] <= 1 and r["examples"] > 0 and r["seconds"] > 0
    store = RunStore(url)
    runs = store.list_runs()
    assert sorted(r.method for r in runs) == sorted(["fixed", "stn", "delta-stn", "ift", "delta-ift"] * 3 + ["pbt"])
    assert all(r.status == "finished" for r in runs)
    # PBT: the best member's lineage is a recorded run with its schedule, and the population was trained.
    pbt_run = next(r for r in runs if r.method == "pbt")
    assert len(store.epochs(pbt_run.id)) == 4 and store.trajectory(pbt_run.id)
    pbt = next(r for r in results if r["method"] == "pbt")
    assert pbt["trials"] == 3 and pbt["examples"] >= 2 * next(r for r in results if r["method"] == "fixed")["examples"]
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage=url)}
    for method in ("random", "tpe", "tpe-asha"):
        study = next(s for name, s in summaries.items() if f"-{method}-seed0-" in name)
        assert study.n_trials == 3
    # Equal accounting: one search trial costs what one plain run costs.
    fixed = overfit
    random_search = next(r for r in results if r["method"] == "random")
    assert random_search["examples"] == 3 * fixed["examples"]
    table = (tmp_path / "b" / "README.md").read_text()
    assert all(f"| {m} |" in table for m in usable)
    assert "## From overfit (dropout_in 0, dropout1 0.05" in table and "## Verdict" in table
    assert "| overreg | delta-stn |" in table
    assert (tmp_path / "b" / "loss_vs_compute.png").stat().st_size > 0
    assert (tmp_path / "b" / "schedules.png").stat().st_size > 0


def test_bench_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "cifar-resnet", "--quick"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["bench", "digits-mlp", "--methods", "hyperband"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LookupError):
        load_task("nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_rows_refuse_clearly_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert set(GPU_TASKS) == {"mnist-alexnet", "fashion-alexnet", "ptb-lstm-650"}
    assert main(["bench", "--gpu"]) == 2
    assert "--gpu: no CUDA device" in capsys.readouterr().err
    assert main(["bench", "mnist-alexnet", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "mnist-alexnet" in err and "device" in err and "CUDA" in err
    assert main(["bench"]) == 2
    assert "name a task" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_pbt_perturbations_stay_inside_the_space():
    """Ray multiplies values by 1.2/0.8 without bounds; every value a member trains at is clipped back."""
    from selftune.methods.pbt import clip_to_space

    config = load_task("mnist-cnn")
    values = clip_to_space(config, {"dropout_in": 0.95 * 1.2, "dropout_conv1": -0.1, "dropout_conv2": 0.3,
                                    "dropout_fc": 0.5, "cutout_length": 24 * 1.2, "cutout_holes": 0.8 * 1})
    assert values["dropout_in"] == 0.95 and values["dropout_conv1"] == 0.0 and values["dropout_conv2"] == 0.3
    assert values["cutout_length"] == 24 and values["cutout_holes"] == 1 and isinstance(values["cutout_holes"], int)


def test_a_config_file_is_a_task_and_its_starts_are_checked(tmp_path, monkeypatch, capsys):
    """A user's own config runs through `selftune bench FILE`; a start outside the space is one line."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mine.toml"
    config.write_text("""epochs = 2
[data]
name = "digits"
[model]
name = "mlp"
hidden = [16]
dropout = ["p", "p"]
[space.p]
low = 0.0
high = 0.9
init = 0.3
[bench.starts.low]
p = 0.05
[bench.starts.high]
p = 0.8
""")
    url = f"sqlite:///{tmp_path / 'b.db'}"
    assert main(["bench", str(config), "--methods", "delta-stn", "random", "--trials", "2", "--seeds", "1",
                 "--store", url]) == 0
    results = json.loads((tmp_path / "bench" / "mine" / "results.json").read_text())
    assert [(r["method"], r["start"]) for r in results] == [
        ("fixed", "low"), ("fixed", "high"), ("delta-stn", "low"), ("delta-stn", "high"), ("random", "")]
    assert {r["start_values"]["p"] for r in results if r["start"]} == {0.05, 0.8}
    capsys.readouterr()
    config.write_text(config.read_text().replace("p = 0.8", "p = 0.95"))
    assert main(["bench", str(config), "--store", url, "--out", "other"]) == 2
    assert "bench.starts.high.p: 0.95 is outside the range [0.0, 0.9] of space.p" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_diverging_tuner_is_a_recorded_loss_not_the_end_of_the_benchmark(tmp_path, monkeypatch, capsys):
    """A response learning rate of 1e6 makes delta-stn diverge (fixed training never uses it): the
    benchmark goes on, and the table counts the diverged run as a loss against fixed training."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "wild.toml"
    config.write_text("""epochs = 2
[data]
name = "digits"
[model]
name = "mlp"
hidden = [16]
dropout = ["p", "p"]
[space.p]
low = 0.0
high = 0.9
init = 0.3
[tuner]
response_lr = 1e6
max_divergences = 0
[bench.starts.low]
p = 0.05
""")
    url = f"sqlite:///{tmp_path / 'b.db'}"
    assert main(["bench", str(config), "--methods", "delta-stn", "--seeds", "2", "--store", url, "--out", "b"]) == 0
    assert "FAILED: run diverged" in capsys.readouterr().out
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [(r["method"], r["seed"], bool(r["failed"])) for r in results] == [
        ("fixed", 0, False), ("delta-stn", 0, True), ("fixed", 1, False), ("delta-stn", 1, True)]
    table = (tmp_path / "b" / "README.md").read_text()
    assert "| delta-stn (2 of 2 diverged) |" in table
    assert "| low | delta-stn | 0/2 (2 diverged) |" in table


def test_hd_runs_where_the_learning_rate_is_a_hyperparameter_and_is_refused_elsewhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    assert main(["bench", "digits-mlp", "--methods", "hd", "--store", url, "--out", "refused"]) == 2
    assert "--methods: hd tunes the learning rate, and this config's tuner.lr is a number" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    example = Path(__file__).resolve().parents[1] / "examples" / "digits_lr.toml"
    assert main(["bench", str(example), "--quick", "--methods", "hd", "random", "--trials", "2", "--seeds", "1",
                 "--store", url, "--out", "lr"]) == 0
    rows = json.loads((tmp_path / "lr" / "results.json").read_text())
    assert {r["method"] for r in rows} == {"fixed", "hd", "random"}
    # the file's two starts: the rate 10x too small and 10x too large
    small = {r["method"]: r for r in rows if r["start"] in ("lr_small", None)}
    assert small["fixed"]["hparams"]["lr"] == pytest.approx(0.005)
    assert small["hd"]["hparams"]["lr"] != pytest.approx(0.005)
    large = {r["method"]: r for r in rows if r["start"] == "lr_large"}
    assert large["fixed"]["hparams"]["lr"] == pytest.approx(0.5)


def test_bench_set_overrides_the_tasks_file_for_every_method_and_a_bad_one_is_refused(tmp_path, monkeypatch, capsys):
    """``--set`` reaches every method and start (hd on the validation signal draws validation batches,
    fixed does not) and the table says which settings it ran at; a bad key is exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    example = Path(__file__).resolve().parents[1] / "examples" / "digits_lr.toml"
    assert main(["bench", str(example), "--quick", "--methods", "hd", "--seeds", "1", "--set", "tuner.nope=1",
                 "--store", url, "--out", "bad"]) == 2
    assert "tuner.nope" in capsys.readouterr().err
    for key, option in (("seed", "--seeds"), ("method", "--methods")):  # bench varies these itself
        assert main(["bench", str(example), "--quick", "--set", f"{key}=3", "--store", url, "--out", "bad"]) == 2
        assert f"--set: {key} is what bench varies; choose with {option}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["bench", str(example), "--quick", "--methods", "hd", "--seeds", "1", "--set", "tuner.lr_signal=val",
                 "--set", "epochs=2", "--store", url, "--out", "val"]) == 0
    rows = json.loads((tmp_path / "val" / "results.json").read_text())
    for start in ("lr_small", "lr_large"):
        by = {r["method"]: r for r in rows if r["start"] == start}
        assert by["hd"]["examples"] > by["fixed"]["examples"]  # the validation batches are counted
    assert "--set tuner.lr_signal=val --set epochs=2" in (tmp_path / "val" / "README.md").read_text()


def test_a_method_whose_extra_is_missing_is_skipped_or_refused_with_the_install_command(tmp_path, monkeypatch,
                                                                                        capsys):
    """Without Optuna (`selftune[search]`) a default bench runs the rest and says what it skipped; naming
    a search is exit 2 with the command that installs it, before anything runs."""
    import selftune.methods.search as search

    monkeypatch.setattr(search, "missing", lambda module: module == "optuna")
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    assert main(["bench", "digits-mlp", "--methods", "tpe", "--store", url, "--out", "no"]) == 2
    assert "--methods: tpe is an Optuna study, and Optuna is not installed: pip install 'selftune[search]'" in \
        capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not (tmp_path / "b.db").exists()
    from selftune.bench.harness import usable_methods

    names = [m.name for m in usable_methods(load_task("digits-mlp", quick=True), None)]
    assert "tpe" not in names and "random" not in names and "delta-stn" in names and "hd" not in names


def test_a_dataset_whose_package_is_missing_names_the_extra(monkeypatch):
    import sys

    from selftune.data._loaders import DatasetUnavailable, load_digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(DatasetUnavailable, match=r"digits ships with scikit-learn.*pip install 'selftune\[data\]'"):
        load_digits()


def test_a_fixed_run_that_diverged_leaves_a_readable_table(tmp_path):
    """Where the baseline itself diverged (a plain run at too much dropout and a high rate), the table
    says so, counts nothing in its units, and any tuned run that finished beats it."""
    from selftune.bench.harness import plot_compute, table
    from selftune.methods import MethodResult

    def result(method, start, loss, failed=""):
        return MethodResult(method=method, seed=0, test_loss=loss, test_accuracy=0.9, val_loss=loss,
                            hparams={} if failed else {"p": 0.5}, examples=0 if failed else 100, seconds=1.0,
                            start=start, start_values={"p": 0.8 if start == "high" else 0.1}, failed=failed,
                            curve=[] if failed else [(100, loss)])

    results = [result("fixed", "low", 0.5), result("fixed", "high", float("nan"), failed="run diverged"),
               result("delta-stn", "low", 0.4), result("delta-stn", "high", 0.7)]
    from selftune.config import parse_config

    config = parse_config({"epochs": 1, "data": {"name": "digits"}, "model": {"name": "mlp", "dropout": ["p"]},
                           "space": {"p": {"low": 0.0, "high": 0.9, "init": 0.3}}})
    text = table("t", results, quick=False, config=config)
    assert "| fixed (1 of 1 diverged) |" in text
    assert "| high | delta-stn | 1/1 |" in text and "| low | delta-stn | 1/1 |" in text
    assert "nan" not in text  # no unit to count in, and no loss to compare with: said in words
    assert "0.7000 vs fixed diverged" in text and "- (fixed diverged)" in text
    plot_compute("t", results, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_diverging_trial_ends_its_trial_not_the_study(tmp_path, monkeypatch, capsys):
    """A search samples the whole space: where part of it diverges (here learning rates up to 1e35 with
    no roll-back), those trials are pruned with their compute counted and the study finishes on the rest
    (a diverged trial used to abort the whole study, and the benchmark lost the search)."""
    import optuna

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "unstable.toml"
    config.write_text("""epochs = 2
[data]
name = "digits"
train_subset = 300
[model]
name = "mlp"
hidden = [16]
dropout = ["p", "p"]
[space.p]
low = 0.0
high = 0.9
init = 0.3
[space.lr]
low = 1e-3
high = 1e35
init = 0.01
log = true
[tuner]
lr = "lr"
max_divergences = 0
""")
    url = f"sqlite:///{tmp_path / 'b.db'}"
    assert main(["bench", str(config), "--methods", "fixed", "random", "--trials", "8", "--seeds", "1",
                 "--store", url, "--out", "b"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    search = next(r for r in results if r["method"] == "random")
    assert not search["failed"] and search["trials"] == 8
    study = optuna.load_study(study_name=search["study"], storage=url)
    diverged = [t for t in study.trials if t.user_attrs.get("diverged")]
    assert diverged and all(t.state == optuna.trial.TrialState.PRUNED for t in diverged)
    assert study.best_trial.params["lr"] < 1e35 and math.isfinite(search["test_loss"])
    plain = next(r for r in results if r["method"] == "fixed")["examples"]
    completed = sum(t.user_attrs["examples"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert search["examples"] > completed  # the diverged trials' steps are counted too
    assert search["examples"] <= 8 * plain


def _lr_config(low: float, high: float):
    from selftune.config import load_config

    example = Path(__file__).resolve().parents[1] / "examples" / "digits_lr.toml"
    return load_config(example, ["epochs=2", "model.hidden=[32, 32]", "tuner.max_divergences=0",
                                 f"space.lr={{low={low}, high={high}, init={low}, log=true}}",
                                 f"bench.starts.lr_large.lr={high}"])


def test_a_pbt_member_that_diverges_is_replaced_not_fatal_and_all_diverging_is_a_clear_error(tmp_path):
    """Members sampled at rates up to 1000 break (a NaN within a few steps): they report an infinite
    loss until PBT exploits them, and the study finishes on the members that trained; if every member
    breaks, a DivergenceError says so (before, one member's error failed the whole study, and Ray could
    not even copy the error)."""
    from selftune.errors import DivergenceError, SelftuneWarning
    from selftune.methods.pbt import run_pbt

    store = RunStore(f"sqlite:///{tmp_path / 'p.db'}")
    config = _lr_config(0.005, 20.0)
    # (how many of the 3 diverge at some point depends on when Ray's trials report, which a loaded machine
    # changes: all 3 may, each then replaced by a copy of a better one; what matters is that the study ends)
    with pytest.warns(SelftuneWarning, match=r"pbt: [123] of 3 members diverged"):
        result = run_pbt(config, 0, 3, store, tmp_path / "mixed", ray_dir=tmp_path / "ray",
                         checkpoint_root=tmp_path / "ck", interval=1, concurrency=2)
    assert math.isfinite(result.test_loss) and result.hparams["lr"] < 5
    with pytest.raises(DivergenceError, match="every one of the 3 PBT members diverged"):
        run_pbt(_lr_config(500.0, 1000.0), 0, 3, store, tmp_path / "hopeless", ray_dir=tmp_path / "ray",
                checkpoint_root=tmp_path / "ck", interval=1, concurrency=2, name="hopeless")


def test_a_grid_is_cell_centres_and_a_grid_over_the_rate_keeps_the_rest_at_init(tmp_path, monkeypatch):
    """`grid`: k values per hyperparameter at the centres of k equal cells (log cells for a log range),
    k**d within the trial budget; `[bench] grid` names what it varies, the rest stays at its init."""
    from selftune.config import load_config
    from selftune.methods.search import grid_points

    config = load_config(ROOT / "examples" / "digits_lr.toml")
    assert config.bench.grid == ["lr"]
    lr = grid_points(config, 4)["lr"]
    assert lr == pytest.approx([10 ** -3.5, 10 ** -2.5, 10 ** -1.5, 10 ** -0.5])  # log10 range -4..0, 4 cells
    every = config.model_copy(update={"bench": config.bench.model_copy(update={"grid": []})})
    points = grid_points(every, 40)  # 5 hyperparameters: 2 values each (2**5 = 32 <= 40 < 3**5)
    assert set(points) == set(config.space) and points["dropout1"] == pytest.approx([0.2375, 0.7125])

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    assert main(["bench", str(ROOT / "examples" / "digits_lr.toml"), "--methods", "grid", "--quick", "--trials", "3",
                 "--seeds", "1", "--store", url, "--out", "b"]) == 0
    grid = next(r for r in json.loads((tmp_path / "b" / "results.json").read_text()) if r["method"] == "grid")
    assert grid["trials"] == 3 and grid["hparams"]["dropout1"] == config.space["dropout1"].init
    study = next(s for s in optuna.get_all_study_summaries(storage=url) if "-grid-seed0-" in s.study_name)
    tried = sorted(t.params["lr"] for t in optuna.load_study(study_name=study.study_name, storage=url).trials)
    assert tried == pytest.approx(grid_points(config, 3)["lr"])
    assert set(optuna.load_study(study_name=study.study_name, storage=url).trials[0].params) == {"lr"}
    # the same bench again in the same store: the finished grid is read back, not re-run or under-counted
    assert main(["bench", str(ROOT / "examples" / "digits_lr.toml"), "--methods", "grid", "--quick", "--trials", "3",
                 "--seeds", "1", "--store", url, "--out", "c"]) == 0
    again = next(r for r in json.loads((tmp_path / "c" / "results.json").read_text()) if r["method"] == "grid")
    assert len(optuna.load_study(study_name=study.study_name, storage=url).trials) == 3
    assert (again["trials"], again["examples"], again["test_loss"]) == (3, grid["examples"], grid["test_loss"])


def test_a_grid_over_an_undeclared_name_is_refused_with_the_field():
    from selftune.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"epochs": 1, "data": {"name": "digits"}, "model": {"name": "mlp", "dropout": ["p"]},
                      "space": {"p": {"low": 0.0, "high": 0.9, "init": 0.3}}, "bench": {"grid": ["q"]}})
    assert err.value.field == "bench.grid" and "'q'" in str(err.value)
    with pytest.raises(ConfigError, match="twice"):
        parse_config({"epochs": 1, "data": {"name": "digits"}, "model": {"name": "mlp", "dropout": ["p"]},
                      "space": {"p": {"low": 0.0, "high": 0.9, "init": 0.3}}, "bench": {"grid": ["p", "p"]}})


def test_a_changed_config_starts_a_study_of_its_own_and_the_same_one_continues(tmp_path):
    """Study names carry a digest of the task's config: rerunning the same file continues its study, an
    edited file (or a --set) does not continue one whose trials trained something else."""
    from selftune.methods._base import Context

    ctx = Context(store=None, folder=tmp_path, label="digits-mlp", trials=5)  # type: ignore[arg-type]
    config = load_task("digits-mlp")
    tpe = METHODS["tpe"]
    name = tpe.study_name(config, 0, ctx)
    assert tpe.study_name(load_task("digits-mlp"), 0, ctx) == name
    assert tpe.study_name(config.derive(method="fixed"), 0, ctx) == name  # the method a trial runs is fixed anyway
    assert tpe.study_name(config, 1, ctx) != name
    assert tpe.study_name(load_task("digits-mlp", overrides=["epochs=3"]), 0, ctx) != name
    assert tpe.study_name(load_task("digits-mlp", overrides=["tuner.batch_size=32"]), 0, ctx) != name
    # what only tuning reads leaves the trials, and so the study, unchanged
    assert tpe.study_name(load_task("digits-mlp", overrides=["tuner.lr_signal=val", "tuner.hyper_lr=0.1"]), 0,
                          ctx) == name
    from selftune.settings import TUNING_ONLY, TunerSettings
    assert TUNING_ONLY <= set(TunerSettings.model_fields)
    # a [task] is named by its file's contents, not where the file lies
    own = Path(__file__).resolve().parents[1] / "examples" / "own_task.toml"
    (tmp_path / "moved").mkdir()
    for name_ in ("own_task.toml", "own_task.py"):
        (tmp_path / "moved" / name_).write_bytes((own.parent / name_).read_bytes())
    here = tpe.study_name(load_task(str(own)), 0, ctx)
    assert tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx) == here
    (tmp_path / "moved" / "helpers.py").write_text("SCALE = 1\n")  # a module the task could import
    with_helper = tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx)
    assert with_helper != here
    (tmp_path / "moved" / "helpers.py").write_text("SCALE = 2\n")
    assert tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx) != with_helper
    (tmp_path / "moved" / "lib").mkdir()  # a package beside the task: its modules count too
    (tmp_path / "moved" / "lib" / "__init__.py").write_text("")
    (tmp_path / "moved" / "lib" / "net.py").write_text("WIDTH = 8\n")
    in_package = tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx)
    (tmp_path / "moved" / "lib" / "net.py").write_text("WIDTH = 16\n")
    assert tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx) != in_package
    (tmp_path / "moved" / "data").mkdir()  # a folder that is no package is not read
    (tmp_path / "moved" / "data" / "prepare.py").write_text("X = 1\n")
    unread = tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx)
    (tmp_path / "moved" / "data" / "prepare.py").write_text("X = 2\n")
    assert tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx) == unread
    # what no import reads is not read either: an editor's dangling lock link, a folder named *.py
    (tmp_path / "moved" / ".#own_task.py").symlink_to("root@host.123:1733570000")
    (tmp_path / "moved" / "notes.py").mkdir()
    assert tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx) == unread
    (tmp_path / "moved" / "own_task.py").write_text((own.parent / "own_task.py").read_text() + "\n# edited\n")
    assert tpe.study_name(load_task(str(tmp_path / "moved" / "own_task.toml")), 0, ctx) not in (here, with_helper)


def test_a_task_without_starts_gets_a_verdict_from_its_init():
    from selftune.bench.harness import table
    from selftune.config import parse_config
    from selftune.methods import MethodResult

    def result(method, loss, trials=1):
        return MethodResult(method=method, seed=0, test_loss=loss, test_accuracy=0.9, val_loss=loss,
                            hparams={"p": 0.2}, examples=100 * trials, seconds=1.0, trials=trials,
                            start_values={"p": 0.3}, curve=[(100, loss)])

    config = parse_config({"epochs": 1, "data": {"name": "digits"}, "model": {"name": "mlp", "dropout": ["p"]},
                           "space": {"p": {"low": 0.0, "high": 0.9, "init": 0.3}}})
    text = table("t", [result("fixed", 0.5), result("delta-stn", 0.4), result("tpe", 0.45, trials=3),
                       result("delta-stn-replay", 0.3, trials=2), result("random", 0.46, trials=1)],
                 quick=False, config=config)
    assert "| init | delta-stn | 1/1 | -20.0%: one unequal pair, no test | 0.4000 vs 0.5000 | -11.1% |" in text, text
    assert "| init | delta-stn-replay | 1/1 | -40.0%: one unequal pair, no test | 0.3000 vs 0.5000 |" in text
    assert "best search (tpe" in text
    only_fixed = table("t", [result("fixed", 0.5)], quick=False, config=config)
    assert "## Verdict" not in only_fixed  # no tuner: no empty table


def test_a_pbt_member_plans_its_schedule_over_the_whole_run_not_its_first_interval(tmp_path):
    """A member trains between exploit steps; its cosine schedule must span the run's epochs. Before, its
    first `fit(interval)` planned the curve to end after the first interval: from then on it trained at the
    final rate (and at final = 0, a zero rate the recorded schedule refused)."""
    from selftune.config import load_config
    from selftune.methods.pbt import run_pbt

    config = load_config(ROOT / "examples" / "digits_lr.toml",
                         ["epochs=4", "model.hidden=[32, 32]", "tuner.schedule={kind=\"cosine\", final=0.0}",
                          "space.lr={low=0.01, high=0.05, init=0.02, log=true}", "bench.starts={}"])
    store = RunStore(f"sqlite:///{tmp_path / 'p.db'}")
    result = run_pbt(config, 0, 2, store, tmp_path / "out", ray_dir=tmp_path / "ray", checkpoint_root=tmp_path / "ck",
                     interval=1, concurrency=2)
    epochs = list(csv.DictReader((tmp_path / "out" / "epochs.csv").open()))
    rates = [float(r["weights_lr"]) for r in epochs]
    assert len(rates) == 4 and math.isfinite(result.test_loss)
    # cosine over 4 epochs: the rate at the end of epoch 2 is still about half of the start, not the end's 0
    assert rates[1] > 0.3 * max(rates) and rates[0] > rates[1] > rates[2] > rates[3]


def _left_running(trial: optuna.Trial) -> optuna.Trial:
    """``trial`` as a process killed mid-trial leaves it: RUNNING, owned by a process that has exited."""
    from selftune.methods._study import PID, owner

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    for key, value in {**owner(), PID: gone.pid}.items():
        trial.set_user_attr(key, value)
    return trial


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_an_interrupted_search_run_again_tries_what_an_uninterrupted_one_does(tmp_path, method):
    """A study stopped after 2 of 4 trials, with a third left RUNNING as a killed process leaves it, then run
    again: the trials it finishes are the uninterrupted study's, in order, and so is its answer (a fresh
    sampler used to replay its stream from the start: trials 0-1 again, never trials 2-3)."""
    from selftune.methods.search import run_search

    config = load_task("digits-mlp", quick=True, overrides=["epochs=1"])
    search = METHODS[method]
    whole_url, cut_url = (f"sqlite:///{tmp_path / name}" for name in ("whole.db", "cut.db"))
    whole = run_search(config, search, 0, 4, whole_url, "s")
    run_search(config, search, 0, 2, cut_url, "s")
    _left_running(optuna.load_study(study_name="s", storage=cut_url).ask())  # a trial that never reports back
    resumed = run_search(config, search, 0, 4, cut_url, "s")

    def finished(url: str) -> list[dict]:
        trials = optuna.load_study(study_name="s", storage=url).trials
        return [t.params for t in trials if t.state == optuna.trial.TrialState.COMPLETE]

    assert len(finished(whole_url)) == 4 and len({json.dumps(p) for p in finished(whole_url)}) == 4
    assert finished(cut_url) == finished(whole_url)
    assert (resumed.trials, resumed.hparams, resumed.test_loss) == (4, whole.hparams, whole.test_loss)


def test_two_processes_on_one_study_run_its_budget_once_and_agree(tmp_path):
    """Two benches of one task side by side on one store share the study (its name is the task's, seed's
    and budget's). Each counted the trials finished when it began and ran the rest itself: 8 trials for a
    budget of 4, drawn in pairs alike (their samplers seeded alike), and each reported another best."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    RunStore(url)  # the store exists; Optuna's tables are made by the two at once
    script = (
        "import json, sys\n"
        "from selftune.bench import load_task\n"
        "from selftune.methods import METHODS\n"
        "from selftune.methods.search import run_search\n"
        "config = load_task('digits-mlp', quick=True, overrides=['epochs=2'])\n"
        "r = run_search(config, METHODS['random'], 0, 4, sys.argv[1], 's')\n"
        "print(json.dumps([r.trials, r.examples, r.test_loss, r.hparams]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    trials = optuna.load_study(study_name="s", storage=url).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4 and len({json.dumps(t.params, sort_keys=True) for t in done}) == 4
    assert answers[0] == answers[1] and answers[0][0] == 4
    # and each ran some: the work was shared, not done twice
    owners = {t.user_attrs["selftune_pid"] for t in done}
    assert owners == {p.pid for p in procs}


def test_a_trial_whose_process_is_gone_is_failed_and_a_live_ones_is_kept(tmp_path, monkeypatch):
    """A killed search leaves its trial RUNNING for ever; it used to stay so in the study (and in
    optuna-dashboard), and now it would hold a place in the budget that nobody fills."""
    from selftune.methods import _study

    storage = _study.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    dead = _left_running(study.ask())
    live = study.ask()
    for key, value in _study.owner().items():
        live.set_user_attr(key, value)
    elsewhere = study.ask()  # a process of the same host name in another PID namespace (a container): its
    for key, value in {**_study.owner(), _study.PID: 4_000_000, _study.NAMESPACE: "other"}.items():  # heartbeat
        elsewhere.set_user_attr(key, value)  # decides, not its pid
    orphan = study.ask()  # no owner and no heartbeat: an older selftune's
    _study.fail_dead(study, storage)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {dead.number: "FAIL", live.number: "RUNNING", elsewhere.number: "RUNNING",
                      orphan.number: "RUNNING"}
    monkeypatch.setattr(_study, "ORPHAN_AFTER_S", 0.0)
    _study.fail_dead(study, storage)
    assert study.get_trials()[orphan.number].state.name == "FAIL"
    assert study.get_trials()[live.number].state.name == "RUNNING"
    # a budget of 2 with the live trial still running: a third trial is surplus and samples nothing
    study2 = optuna.create_study(study_name="t", storage=storage)
    study2.tell(study2.ask(), 1.0)
    study2.ask()
    with pytest.raises(_study.SurplusTrialError):
        _study.claim(study2, study2.ask(), 2)


def test_a_process_whose_trial_another_failed_meanwhile_drops_it_and_finishes_the_study(tmp_path):
    """A process paused past the heartbeat's grace (SIGSTOP, a swap storm) finds its trial failed by the
    process that took it for dead: Optuna's tell then raised, and the bench ended with a traceback."""
    from selftune.methods import _study

    storage = _study.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    said = []

    def objective(trial):
        _study.claim(study, trial, 3)
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 1:  # meanwhile another process fails it
            storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        return x

    done = _study.run_budget(study, storage, objective, 3, progress=said.append)
    assert [t.number for t in done] == [0, 2, 3] and any("trial 1 was failed by another process" in s for s in said)


def test_an_interrupted_grid_run_again_visits_every_point_once(tmp_path, monkeypatch):
    """A grid of 4 points: a Ctrl-C during its third trial (which Optuna records as failed), then a fourth
    trial left running as a killed process leaves it. Run again, the study tries every point once. A
    failed trial's point counted as visited, so the study ended short of it and repeated a finished
    point; re-seeding a grid's sampler per trial (as random and TPE are) visited duplicates."""
    import selftune.runner
    from selftune.methods.search import grid_points, run_search

    config = load_task(str(ROOT / "examples" / "digits_lr.toml"), quick=True, overrides=["epochs=1"])
    grid, url = METHODS["grid"], f"sqlite:///{tmp_path / 'g.db'}"
    real, calls = selftune.runner.execute, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(selftune.runner, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, grid, 0, 4, url, "g")
    monkeypatch.setattr(selftune.runner, "execute", real)
    study = optuna.load_study(study_name="g", storage=url, sampler=grid.make_sampler(0, config, 4))
    grid.suggest(_left_running(study.ask()), config)  # never told: RUNNING for ever
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "RUNNING"]
    result = run_search(config, grid, 0, 4, url, "g")
    done = [t.params["lr"] for t in optuna.load_study(study_name="g", storage=url).trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(done) == pytest.approx(grid_points(config, 4)["lr"]) and result.trials == 4


def test_moves_are_measured_from_where_a_run_began_not_from_the_start_it_was_pulled_off():
    """A start on a bound (dropout 0.0) is pulled 2% of the range inside before the first step; the verdict
    credited that pull as tuning (+0.02, "more regularisation") on runs that then moved down."""
    from selftune.bench.harness import unit_moves
    from selftune.config import parse_config
    from selftune.methods._base import MethodResult

    config = parse_config({"epochs": 1, "data": {"name": "digits"}, "model": {"name": "mlp", "dropout": ["p", None]},
                           "space": {"p": {"low": 0.0, "high": 0.9, "init": 0.3}}})
    run = MethodResult(method="delta-stn", seed=0, test_loss=1.0, test_accuracy=0.5, val_loss=1.0,
                       hparams={"p": 0.0138}, examples=1, seconds=1.0, start="overfit", start_values={"p": 0.0},
                       began={"p": 0.018})
    assert unit_moves(run, config)["p"] == pytest.approx((0.0138 - 0.018) / 0.9, abs=1e-6)
    older = MethodResult(**{**run.as_dict(), "began": {}})  # results.json from before: the named start
    assert unit_moves(older, config)["p"] > 0


def test_a_task_metric_missing_or_undefined_on_some_seeds_is_averaged_over_the_others():
    """A metric of the task's own that is NaN on one seed (an F1 without positives, a search trial from before
    metrics were recorded) made the cell "nan ± nan", and one missing everywhere read as a metric the task
    does not have."""
    from selftune.bench.harness import table
    from selftune.methods._base import MethodResult

    def run(method: str, seed: int, f1: float | None) -> MethodResult:
        return MethodResult(method=method, seed=seed, test_loss=1.0 + seed, test_accuracy=math.nan, val_loss=1.0,
                            hparams={}, examples=10, seconds=1.0,
                            test_metrics={} if f1 is None else {"f1": f1})

    text = table("t", [run("fixed", 0, 0.5), run("fixed", 1, math.nan), run("fixed", 2, 0.7),
                       run("random", 0, None), run("random", 1, None), run("random", 2, None)], quick=False)
    assert "| test f1 |" in text
    assert "| fixed | 2.0000 ± 1.0000 | — | 0.6000 ± 0.1414 (2 of 3 seeds) |" in text, text
    assert "| random | 2.0000 ± 1.0000 | — | - |" in text, text


def test_an_explicit_epochs_override_wins_over_quick():
    """`bench --quick --set epochs=9` trained 4 epochs while its README said --set epochs=9 was applied."""
    assert load_task("digits-mlp", quick=True).epochs == 4
    assert load_task("digits-mlp", quick=True, overrides=["epochs=9"]).epochs == 9



def test_a_bench_run_again_trains_again_what_changed_and_fresh_trains_everything(tmp_path):
    """Kept runs must be the runs this bench would train: --fresh kept a -replay method's tuning run; an
    edited module beside the task file kept stale runs while the searches started anew; a kept run
    without its trajectory.csv failed the bench's plot with a traceback."""
    from selftune.bench import run_bench

    (tmp_path / "helper.py").write_text("WIDTH = 16\n")
    (tmp_path / "task.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import selftune as st
        import helper

        def task():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(160, 6, generator=g)
            y = (x[:, 0] > 0).long()
            model = nn.Sequential(nn.Linear(6, helper.WIDTH), nn.ReLU(), st.Dropout("d"), nn.Linear(helper.WIDTH, 2))
            return st.Task(model=model, train=(x[:100], y[:100]), val=(x[100:130], y[100:130]),
                           test=(x[130:], y[130:]), space=st.Space([st.Float("d", 0.0, 0.8, 0.2)]))
    """))
    (tmp_path / "t.toml").write_text('epochs = 2\n[task]\nsource = "task.py:task"\n[tuner]\nbatch_size = 20\n')
    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    said: list[str] = []

    def bench(**kwargs):
        said.clear()
        run_bench(str(tmp_path / "t.toml"), methods=["fixed", "delta-stn", "delta-stn-replay"], seeds=1,
                  out=tmp_path / "b", store=store, progress=said.append, **kwargs)
        return len(store.list_runs())

    assert bench() == 3  # fixed, delta-stn, and the replay of that delta-stn run
    assert bench() == 3 and sum("kept run" in s for s in said) == 3
    assert bench(fresh=True) == 6  # all three again, the replay's tuning run included
    (tmp_path / "helper.py").write_text("WIDTH = 24\n")
    assert bench() == 9 and not any("kept run" in s for s in said)
    # and says why (a scratch script beside the task file retrained everything silently: fuzz round 45)
    assert sum("training anew: run" in s and "trained on other code" in s for s in said) == 2, said
    (tmp_path / "b" / "runs" / "delta-stn-seed0" / "trajectory.csv").unlink()
    assert bench() == 11  # that run, and its replay (which follows the new run: its config names it)
    assert (tmp_path / "b" / "README.md").is_file()
    # the checkpoints of the runs trained again in their place are gone: one folder per run the bench holds
    assert len(list((tmp_path / "b" / "checkpoints").iterdir())) == 3


def test_a_ctrl_c_during_a_search_says_to_run_the_bench_again(tmp_path, monkeypatch):
    """Outside a run's training (a search trial) a Ctrl-C printed only "stopped: interrupted by SIGINT"."""
    import selftune.runner
    from selftune.bench import run_bench
    from selftune.errors import Interrupted

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selftune.runner, "execute", interrupted)
    with pytest.raises(Interrupted, match="during random; run it again to go on: it keeps the single runs") as err:
        run_bench("digits-mlp", methods=["random"], trials=2, seeds=1, quick=True, out=tmp_path / "b",
                  store=RunStore(f"sqlite:///{tmp_path / 's.db'}"), overrides=["epochs=1"], progress=lambda s: None)
    assert err.value.exit_code == 130


def test_a_trial_that_raises_reaches_the_user_and_a_failed_trials_slot_goes_to_the_next_trial(tmp_path):
    """run_budget forgave every failed trial as one another process had failed, and drew again for ever (a
    CUDA out-of-memory error, a bug in the user's model); a slot freed by one process's failed trial was
    taken by the other process's next trial as well as kept by its last, so the two drew the same point."""
    from selftune.methods import _study
    from selftune.methods._sampling import SlotSeeded, free_slot

    storage = _study.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage,
                                sampler=SlotSeeded(lambda s: optuna.samplers.RandomSampler(seed=s), 0))

    def broken(trial):
        _study.claim(study, trial, 3)
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        _study.run_budget(study, storage, broken, 3)
    # slots: trial 1 runs (another process), trial 2 begins beside it, then trial 1 fails
    first = study.ask()
    x1 = first.suggest_float("x", 0, 1)
    second = study.ask()
    x2 = second.suggest_float("x", 0, 1)
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    third = study.ask()
    assert third.suggest_float("x", 0, 1) == x1 != x2  # the failed trial's point, not the running one's
    assert free_slot(study, third.number + 1) == 2


def test_a_search_trial_with_a_non_finite_validation_loss_counts_as_diverged(tmp_path):
    """Optuna fails a trial that returns NaN without raising, and a study that runs until its budget is
    finished would draw that point again for ever."""
    from selftune.config import load_config
    from selftune.methods.search import run_search

    (tmp_path / "nan_task.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        import selftune as st

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(4, 8), st.Dropout("d"), nn.Linear(8, 2))

            def forward(self, x):
                out = self.body(x)
                return out if self.training else out * float("nan")  # validation (eval mode) only

        def task():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(90, 4, generator=g)
            y = (x[:, 0] > 0).long()
            return st.Task(model=Net(), train=(x[:60], y[:60]), val=(x[60:75], y[60:75]), test=(x[75:], y[75:]),
                           space=st.Space([st.Float("d", 0.0, 0.5, 0.1)]))
    """))
    (tmp_path / "t.toml").write_text('epochs = 1\n[task]\nsource = "nan_task.py:task"\n[tuner]\nbatch_size = 20\n'
                                     'rollback_val_ratio = 0\n')
    config = load_config(tmp_path / "t.toml")
    with pytest.raises(DivergenceError, match="every trial of the random study diverged"):
        run_search(config, METHODS["random"], 0, 2, f"sqlite:///{tmp_path / 's.db'}", "s")


def test_a_bench_stopped_in_a_run_resumes_that_run_when_run_again(tmp_path, monkeypatch):
    """The in-process twin of test_signals' four-process test (make test-slow): a stop in the middle of a
    bench's run writes a checkpoint; the bench run again resumes it and ends where an uninterrupted one does."""
    import selftune.runner
    from selftune.bench import run_bench
    from selftune.errors import Interrupted
    from selftune.testing import StopAt

    def bench(out, store):
        said = []
        results = run_bench("digits-mlp", methods=["fixed", "delta-stn"], seeds=1, quick=True, out=out, store=store,
                            overrides=["epochs=2", "bench.starts={}"], progress=said.append)
        return [(r.method, r.test_loss, r.examples) for r in results], said

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    original = selftune.runner.run_recorded

    def stopped(prepared, *args, **kwargs):
        if prepared.config.method == "delta-stn":
            kwargs["callbacks"] = [StopAt(5)]
        return original(prepared, *args, **kwargs)

    monkeypatch.setattr(selftune.runner, "run_recorded", stopped)
    with pytest.raises(Interrupted, match="run this bench again"):
        bench(tmp_path / "cut", store)
    monkeypatch.setattr(selftune.runner, "run_recorded", original)
    cut, said = bench(tmp_path / "cut", store)
    assert any("kept run 1" in s for s in said) and any("resumed run 2" in s for s in said), said
    whole, _ = bench(tmp_path / "whole", RunStore(f"sqlite:///{tmp_path / 'w.db'}"))
    assert [(m, e) for m, _, e in cut] == [(m, e) for m, _, e in whole]
    assert [t for _, t, _ in cut] == pytest.approx([t for _, t, _ in whole], abs=1e-6)
