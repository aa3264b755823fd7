"""`selftune bench digits-mlp --quick`: every method runs on the same task and is recorded."""

import json

import optuna
import pytest
import torch

from selftune.bench import GPU_TASKS, load_task
from selftune.cli import main
from selftune.methods import METHODS
from selftune.store import RunStore


def test_quick_bench_runs_and_records_every_method(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    assert main(["bench", "digits-mlp", "--quick", "--seeds", "1", "--store", url, "--out", "b"]) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["method"] for r in results] == list(METHODS)
    for r in results:
        assert r["test_loss"] > 0 and 0 <= r["test_accuracy"] <= 1 and r["examples"] > 0 and r["seconds"] > 0
    store = RunStore(url)
    runs = store.list_runs()
    assert sorted(r.method for r in runs) == sorted(["fixed", "stn", "delta-stn", "pbt"])
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
    fixed = next(r for r in results if r["method"] == "fixed")
    random_search = next(r for r in results if r["method"] == "random")
    assert random_search["examples"] == 3 * fixed["examples"]
    table = (tmp_path / "b" / "README.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    assert (tmp_path / "b" / "loss_vs_compute.png").stat().st_size > 0
    assert (tmp_path / "b" / "schedules.png").stat().st_size > 0


def test_bench_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "cifar-resnet", "--quick"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["bench", "digits-mlp", "--methods", "grid"]) == 2
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
