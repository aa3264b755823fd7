"""A run never deletes or overwrites what it did not create (issue: "One path for every run").

Each test is one of the data-loss findings: `--out .` wiped a working directory; checkpoints of
two stores in one folder collided and a resume finished with the other run's weights; the default
output folder ignored `--set`, so a second run replaced the first one's outputs.
"""

import json
import time
from pathlib import Path

import pytest
import torch

from selftune.cli import main
from selftune.outputs import MARKER, OUTPUT_FILES
from selftune.runner import RecordedRun, prepare, resume_recorded
from selftune.store import RunStore
from selftune.testing import DIGITS_CONFIG, SMALL, StopAt, digits_config, tear

RUN = ["run", str(DIGITS_CONFIG), *[a for s in SMALL for a in ("--set", s)], "--set", "epochs=2", "--quiet"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELFTUNE_STORE", f"sqlite:///{tmp_path / 'selftune.db'}")


def _user_files(folder):
    (folder / "config.toml").write_text("mine = true\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("keep me")
    (folder / "result.json").write_text('{"mine": true}')


def test_out_into_a_users_folder_is_refused_and_deletes_nothing(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    _user_files(work)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    assert main([*RUN, "--out", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "--overwrite" in err, err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    assert not (tmp_path / "selftune.db").exists() or RunStore().list_runs() == []  # no run recorded


def test_out_dot_with_overwrite_replaces_only_selftunes_files(tmp_path):
    _user_files(tmp_path)
    assert main([*RUN, "--out", ".", "--overwrite"]) == 0
    assert (tmp_path / "config.toml").read_text() == "mine = true\n"
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep me"
    assert (tmp_path / "selftune.db").exists()
    result = json.loads((tmp_path / "result.json").read_text())  # a file selftune writes: replaced, as asked
    assert result["run_id"] == 1 and result["method"] == "delta-stn"
    assert json.loads((tmp_path / MARKER).read_text())["run_uuid"] == result["run_uuid"]
    assert all((tmp_path / name).exists() for name in OUTPUT_FILES)
    assert not [p for p in tmp_path.iterdir() if ".selftune-" in p.name and p.is_dir()]  # no temp folder left


def test_default_output_folders_are_unique_and_show_points_at_each_runs_own(tmp_path, capsys):
    assert main([*RUN]) == 0
    assert main([*RUN, "--set", "seed=5"]) == 0
    store = RunStore()
    first, second = store.get_run(1), store.get_run(2)
    assert first.out_dir != second.out_dir
    for run in (first, second):
        result = json.loads((tmp_path / run.out_dir / "result.json").read_text())
        assert result["run_id"] == run.id and result["run_uuid"] == run.uuid
    capsys.readouterr()
    assert main(["show", "1"]) == 0
    assert first.out_dir in capsys.readouterr().out


def _interrupted(store, seed, at):
    config = digits_config(f"seed={seed}")
    prepared = prepare(config)
    run = RecordedRun.start(store, config, checkpoint_root="checkpoints")
    with pytest.raises(Exception, match="interrupted by a callback"):
        run.drive(prepared, every=7, callbacks=[StopAt(at)])
    return run


def _uninterrupted_test_loss(seed):
    from selftune.runner import execute

    return execute(prepare(digits_config(f"seed={seed}")))[1].test["loss"]


def test_two_stores_in_one_folder_keep_their_own_checkpoints(tmp_path):
    a, b = RunStore("sqlite:///a.db"), RunStore("sqlite:///b.db")
    run_a, run_b = _interrupted(a, seed=1, at=15), _interrupted(b, seed=2, at=15)
    assert run_a.run_id == run_b.run_id == 1  # the ids collide ...
    assert run_a.checkpoint_dir != run_b.checkpoint_dir  # ... the checkpoint folders do not
    saved = torch.load(a.checkpoints(1)[-1][2], weights_only=True)
    assert saved["run_uuid"] == run_a.uuid
    first_piece = saved["tuner"]["log"]["counters"]["seconds"]
    started = time.perf_counter()
    result = resume_recorded(a, 1, notes=[])
    second_piece_bound = time.perf_counter() - started
    assert result.seed == 1 and result.run_uuid == run_a.uuid
    assert result.test["loss"] == pytest.approx(_uninterrupted_test_loss(1), abs=1e-6)
    # compute.seconds is the sum of the pieces: the first piece's checkpointed time plus the resumed part.
    assert first_piece > 0 and first_piece < result.compute["seconds"] <= first_piece + second_piece_bound


def test_a_foreign_or_torn_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path):
    store, other = RunStore("sqlite:///a.db"), RunStore("sqlite:///b.db")
    run = _interrupted(store, seed=3, at=20)
    foreign = _interrupted(other, seed=4, at=20)
    checkpoints = store.checkpoints(run.run_id)
    assert len(checkpoints) >= 2
    newest, previous = checkpoints[-1][2], checkpoints[-2][2]
    # The newest file replaced by another run's checkpoint: it must never be loaded.
    newest_foreign = other.checkpoints(foreign.run_id)[-1][2]
    torch.save(torch.load(newest_foreign, weights_only=True), newest)
    notes = []
    result = resume_recorded(store, run.run_id, notes=notes)
    assert any("belongs to another run" in n for n in notes), notes
    assert result.test["loss"] == pytest.approx(_uninterrupted_test_loss(3), abs=1e-6)
    assert previous  # the fallback target existed

    run2 = _interrupted(store, seed=3, at=20)
    tear(store.checkpoints(run2.run_id)[-1][2])
    notes = []
    result2 = resume_recorded(store, run2.run_id, notes=notes)
    assert any("unreadable" in n for n in notes), notes
    assert result2.test["loss"] == pytest.approx(_uninterrupted_test_loss(3), abs=1e-6)


def test_a_resume_whose_checkpoint_files_are_all_gone_is_refused_and_keeps_the_records(tmp_path):
    """The checkpoint folder deleted (or the store copied without it): starting over silently rewound every
    recorded epoch away; the resume is refused, naming the folder, and the records stay."""
    import shutil

    from selftune.errors import ResumeError

    store = RunStore("sqlite:///a.db")
    run = _interrupted(store, seed=3, at=20)
    epochs, listed = store.epochs(run.run_id), store.checkpoints(run.run_id)
    assert epochs and listed
    shutil.rmtree(Path(listed[-1][2]).parent)
    with pytest.raises(ResumeError, match=r"none of their files is left .* restore them to continue"):
        resume_recorded(store, run.run_id)
    assert store.epochs(run.run_id) == epochs and store.get_run(run.run_id).status == "interrupted"


def test_a_run_whose_folder_another_run_took_while_it_trained_stays_resumable(tmp_path):
    """Another run's --overwrite took the folder while this one trained: at its end it was recorded failed,
    all its training unreachable. It is interrupted instead, and once those files are moved its resume
    writes the outputs of the whole run."""
    import shutil

    from selftune.callbacks import Callback
    from selftune.errors import OutputError
    from selftune.outputs import mark_folder

    class TakeFolder(Callback):
        def on_step(self, tuner, row):
            if tuner.counters.steps == 5:
                mark_folder(tmp_path / "out", "another-run", 2, "sqlite:///other.db")
                (tmp_path / "out" / "result.json").write_text('{"theirs": true}')

    store = RunStore("sqlite:///a.db")
    config = digits_config("seed=3")
    run = RecordedRun.start(store, config, out=tmp_path / "out", checkpoint_root="checkpoints")
    with pytest.raises(OutputError, match=r"another run took it .* then selftune resume 1"):
        run.drive(prepare(config), every=7, callbacks=[TakeFolder()])
    assert store.get_run(run.run_id).status == "interrupted"
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {"theirs": True}
    shutil.move(tmp_path / "out", tmp_path / "theirs")
    result = resume_recorded(store, run.run_id)
    assert store.get_run(run.run_id).status == "finished"
    assert result.test["loss"] == pytest.approx(_uninterrupted_test_loss(3), abs=1e-6)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["run_id"] == run.run_id


def test_overwrite_never_takes_the_folder_of_a_run_that_is_training(tmp_path, capsys):
    """--overwrite replaces selftune's files, but not those of a live run of the same store (it would find its
    folder taken at its end); once that run stopped, the folder may be taken."""
    store = RunStore()
    live = RecordedRun.start(store, digits_config(), out=tmp_path / "x", checkpoint_root="checkpoints")
    assert main([*RUN, "--out", "x", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"holds the outputs of run {live.run_id}, which pid" in err and "is training now" in err, err
    assert [r.id for r in store.list_runs()] == [live.run_id]  # nothing recorded for the refused run
    store.interrupt(live.run_id, "stopped")
    assert main([*RUN, "--out", "x", "--overwrite"]) == 0


def test_show_of_an_interrupted_run_prints_a_resume_command_for_its_own_store(tmp_path, capsys):
    """show printed a bare `selftune resume N`, which pasted elsewhere resumes (or refuses) run N of the
    default store; the stop's own message names the store, and so does show now."""
    (tmp_path / "sub").mkdir()
    store = RunStore("sqlite:///sub/other.db")
    run = RecordedRun.start(store, digits_config(), out=tmp_path / "x", checkpoint_root="checkpoints")
    store.interrupt(run.run_id, "stopped")
    assert main(["show", str(run.run_id), "--store", "sqlite:///sub/other.db"]) == 0
    out = capsys.readouterr().out
    assert f"resume with: selftune resume {run.run_id} --store sqlite:///{tmp_path / 'sub' / 'other.db'}" in out, out


def test_read_only_commands_create_no_store_and_memory_stores_are_refused(tmp_path, capsys):
    for args in (["runs"], ["show", "1"], ["report", "1"], ["resume", "1"]):
        assert main([*args, "--store", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "none.db").exists()
    for url in ("sqlite:///", "sqlite://", "sqlite:///:memory:"):
        assert main([*RUN, "--store", url]) == 2
        assert "memory" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bench_refuses_a_users_folder(tmp_path, capsys):
    _user_files(tmp_path)
    assert main(["bench", "digits-mlp", "--quick", "--methods", "fixed", "--seeds", "1", "--out", "."]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((tmp_path / "result.json").read_text()) == {"mine": True}


def test_a_resume_never_writes_into_a_folder_another_run_took(tmp_path, capsys):
    store = RunStore("sqlite:///a.db")
    config = digits_config("seed=1")
    first = RecordedRun.start(store, config, out="res")
    with pytest.raises(Exception, match="interrupted by a callback"):
        first.drive(prepare(config), every=7, callbacks=[StopAt(10)])
    # Another run may not take the folder silently ...
    assert main([*RUN, "--out", "res", "--store", "sqlite:///a.db"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # ... and when the user forces it, the first run's resume refuses instead of overwriting the second's files.
    assert main([*RUN, "--out", "res", "--overwrite", "--store", "sqlite:///a.db"]) == 0
    second = json.loads((tmp_path / "res" / "result.json").read_text())
    assert main(["resume", "1", "--quiet", "--store", "sqlite:///a.db"]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and len(err.strip().splitlines()) == 1, err
    assert "--overwrite" not in err and "elsewhere, then resume" in err, err  # resume takes no --overwrite
    assert json.loads((tmp_path / "res" / "result.json").read_text()) == second
    assert RunStore("sqlite:///a.db").get_run(1).status == "interrupted"


def test_events_after_a_checkpoint_are_dropped_with_it_on_resume(tmp_path):
    store = RunStore("sqlite:///e.db")
    run = store.create_run(method="delta-stn", seed=0, config={}, out_dir="o", checkpoint_root="ck")
    for step in (5, 15):
        store.add_event(run, step=step, kind="divergence", message=f"at {step}")
    store.commit_checkpoint(run, step=10, epoch=1, path="a.pt", trajectory=[], epochs=[])
    store.commit_checkpoint(run, step=10, epoch=2, path="b.pt", trajectory=[], epochs=[])  # epoch end, same step
    assert [c[2] for c in store.checkpoints(run)] == ["a.pt", "b.pt"]
    store.rewind(run, 10, 1)  # the (10, 2) file was torn: the resume starts from (10, 1)
    assert [e["step"] for e in store.events(run)] == [5]  # step 15 happens again when the run is replayed
    assert [c[2] for c in store.checkpoints(run)] == ["a.pt"]


def test_report_overwrite_replaces_a_link_and_never_writes_through_it(tmp_path):
    """A link named like one of selftune's files, in a folder the user lets it overwrite, is replaced: its
    target (the user's thesis) is not selftune's to write."""
    assert main([*RUN, "--out", "run"]) == 0
    safe, folder = tmp_path / "safe", tmp_path / "userdir"
    safe.mkdir()
    folder.mkdir()
    (safe / "thesis.txt").write_text("years of work")
    (folder / "epochs.csv").symlink_to(safe / "thesis.txt")
    assert main(["report", "1", "--out", str(folder), "--overwrite"]) == 0
    assert (safe / "thesis.txt").read_text() == "years of work"
    assert not (folder / "epochs.csv").is_symlink() and (folder / "epochs.csv").read_text().startswith("epoch")
    # the folder's marker too, which a run writes at its start
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).symlink_to(safe / "thesis.txt")
    assert main([*RUN, "--out", str(other), "--overwrite"]) == 0
    assert (safe / "thesis.txt").read_text() == "years of work" and not (other / MARKER).is_symlink()


def test_report_of_a_moved_project_asks_where_to_write(tmp_path, capsys):
    """The run's folder and the folder it was in are gone (the project moved): report does not recreate
    that path somewhere the user no longer works; it asks for --out."""
    (tmp_path / "proj").mkdir()
    assert main([*RUN, "--out", str(tmp_path / "proj" / "run"), "--quiet"]) == 0
    import shutil

    shutil.move(tmp_path / "proj", tmp_path / "moved")
    assert main(["report", "1"]) == 2
    err = capsys.readouterr().err
    assert "--out: run 1's output folder" in err and "no longer exists" in err, err
    assert not (tmp_path / "proj").exists()
    assert main(["report", "1", "--out", str(tmp_path / "moved" / "report")]) == 0
    assert (tmp_path / "moved" / "report" / "epochs.csv").is_file()


def test_a_run_shorter_than_log_every_still_has_a_trajectory_header_and_a_report(tmp_path, capsys):
    """A run with log_every above its step count records no trajectory row: its trajectory.csv still names
    its columns (pandas reads an empty file as an error) and report rebuilds its files. Where its values
    moved (hyper steps after the warm-up), its schedule is unknown: neither the run nor report writes a
    schedule.csv (the run wrote the start alone as "the schedule it followed", which report refused), and
    replay says why it cannot follow it rather than replaying the start as if it were the schedule. Where
    nothing moved (a warm-up covering the run), the start is its whole schedule, for all three alike."""
    import csv

    short = [*RUN, "--set", "epochs=2", "--set", "tuner.warmup_epochs=0", "--set", "tuner.log_every=100000"]
    assert main([*short, "--out", "run"]) == 0
    out, err = capsys.readouterr()
    assert "wrote run/result.json, model.pt, trajectory.csv" in out and "schedule.csv not written" in err, (out, err)
    assert not (tmp_path / "run" / "schedule.csv").exists()
    with (tmp_path / "run" / "trajectory.csv").open() as f:
        header = next(csv.reader(f))
    assert header[:2] == ["step", "epoch"] and header[-2:] == ["train_loss", "val_loss"]
    assert "dropout1" in header, header
    assert main(["report", "1", "--out", "rep"]) == 0
    assert (tmp_path / "rep" / "trajectory.csv").read_text().splitlines()[0] == ",".join(header)
    assert not (tmp_path / "rep" / "schedule.csv").exists()
    capsys.readouterr()
    assert main(["replay", "1"]) == 2
    err = capsys.readouterr().err
    assert "tuner.log_every = 100000" in err and "smaller tuner.log_every" in err and "moved" in err, err

    assert main([*RUN, "--set", "epochs=1", "--set", "tuner.log_every=100000", "--out", "still"]) == 0
    assert "schedule.csv" in capsys.readouterr().out
    assert main(["report", "2", "--out", "still-rep"]) == 0
    mine, its = (tmp_path / "still" / "schedule.csv").read_text(), (tmp_path / "still-rep" / "schedule.csv").read_text()
    assert mine == its and len(mine.splitlines()) == 2  # the header and the start
    assert main(["replay", "2", "--out", "still-replay"]) == 0

    # keep = "best" keeping the warm-up epoch: its values are the start's, the later epochs' are not
    kept = [*short, "--set", "epochs=3", "--set", "tuner.warmup_epochs=1", "--set", 'tuner.keep="best"',
            "--set", "tuner.lr=0.5"]
    assert main([*kept, "--out", "kept"]) == 0
    result = json.loads((tmp_path / "kept" / "result.json").read_text())
    assert result["kept_epoch"] == 1 and result["compute"]["hyper_steps"] > 0, result
    assert not (tmp_path / "kept" / "schedule.csv").exists()
    capsys.readouterr()
    assert main(["replay", "4"]) == 2 and "moved" in capsys.readouterr().err
    # a fixed run under a cosine schedule: its rate moved (no schedule.csv of its own, whose rows hold the
    # rates), but a replay keeps the run's own schedule of the rate, exact, and has its values
    cosine = [*RUN, "--method", "fixed", "--set", "tuner.log_every=100000", "--set", 'tuner.schedule.kind="cosine"']
    assert main([*cosine, "--out", "cosine"]) == 0
    assert not (tmp_path / "cosine" / "schedule.csv").exists()
    assert main(["replay", "5", "--out", "cosine-replay"]) == 0


def test_report_rebuilds_the_runs_own_files_with_their_rates_and_permissions(tmp_path):
    """report's schedule.csv is the run's own (the rates each row trained at, not the replay's copy
    without them), and its files honour the umask as the run's do (mkstemp's 0600 made them private)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert main([*RUN, "--out", "run"]) == 0
        assert main(["report", "1", "--out", "rep"]) == 0
    finally:
        os.umask(old)
    for name in ("schedule.csv", "trajectory.csv", "epochs.csv"):
        assert (tmp_path / "rep" / name).read_text() == (tmp_path / "run" / name).read_text(), name
    assert "weights_lr" in (tmp_path / "rep" / "schedule.csv").read_text().splitlines()[0]
    for folder in ("run", "rep"):
        for f in (tmp_path / folder).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))


def test_a_refused_run_writes_nothing(tmp_path, capsys):
    """A checkpoint folder that is a file or a name too long, a dangling link as --out, a seed the store
    cannot record: exit 2, and no store, no checkpoints folder, no run row, no target of the link."""
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    for extra, message in ((["--checkpoint-dir", "afile"], "--checkpoint-dir: 'afile' is a file, not a folder"),
                           (["--out", "dangling"], "--out: 'dangling' is a link to"),
                           (["--checkpoint-dir", "x" * 300], "--checkpoint-dir: cannot write to"),
                           (["--seed", str(2**40)], "seed: Input should be less than or equal to")):
        assert main([*RUN, *extra]) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling"]


def test_a_second_bench_into_a_folder_in_use_is_refused_at_its_start(tmp_path, capsys):
    import fcntl

    folder = tmp_path / "b"
    folder.mkdir()
    with (folder / ".selftune-bench.lock").open("a") as held:  # another bench holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["bench", "digits-mlp", "--quick", "--seeds", "1", "--methods", "fixed", "--out", "b"]) == 2
    assert "is in use by another selftune bench" in capsys.readouterr().err
    assert not (folder / "results.json").exists() and not (tmp_path / "selftune.db").exists()


def test_a_write_that_fails_is_an_os_error_not_a_torch_one(tmp_path):
    """PyTorch reports a full disk as a RuntimeError; the run's one-line handling of a full disk (status
    interrupted, resumable) needs the OSError it is. /dev/full fails every write with ENOSPC."""
    from pathlib import Path

    from selftune.store._recorder import torch_save

    with pytest.raises(OSError) as caught:
        torch_save({"w": torch.zeros(100_000)}, "/dev/full", Path("/dev/full"))
    assert caught.value.filename == "/dev/full"


def test_a_failed_run_gives_back_the_folder_it_claimed_and_wrote_nothing_into(tmp_path, capsys):
    """A run that failed (diverged) left its --out folder holding only its marker, which refused the same
    command with a lower rate ("not empty ... outputs of run 1"), though the run had written nothing (found
    by a fuzz round). The marker goes, and the folder with it where the run made it."""
    assert main([*RUN, "--out", "made/deep/er", "--set", "tuner.lr=1e12", "--set", "tuner.max_divergences=1"]) == 1
    assert "run failed" in capsys.readouterr().err
    assert not (tmp_path / "made").exists()  # the parents it made for the folder too
    assert main([*RUN, "--out", "made"]) == 0 and (tmp_path / "made" / "result.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()  # a folder of the user's, empty: kept, as empty as it was
    assert main([*RUN, "--out", "mine", "--set", "tuner.lr=1e12", "--set", "tuner.max_divergences=1"]) == 1
    assert mine.is_dir() and not list(mine.iterdir())


def test_a_benchmark_folder_is_another_benchmarks_when_its_config_is_another_file(tmp_path):
    """The marker named the config file's stem only: `bench other/t.toml` into the folder of `bench t.toml`
    replaced its results and deleted its runs' checkpoints without --overwrite (found by a fuzz round)."""
    from selftune.bench.harness import BENCH_MARKER, claim_bench_folder, config_place
    from selftune.errors import OutputError

    for folder in ("exp1", "exp2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.toml").write_text("epochs = 1\n")
    out = tmp_path / "X"
    out.mkdir()
    first = str(tmp_path / "exp1" / "t.toml")
    (out / BENCH_MARKER).write_text(json.dumps({"task": "t", "quick": False, "config": config_place(first, out)}))
    (out / "results.json").write_text("[]")
    assert claim_bench_folder(out, task="t", source=first) == out  # the same benchmark, run again
    with pytest.raises(OutputError, match=r"holds the benchmark of 't' \(config '../exp1/t.toml' from this folder\)"):
        claim_bench_folder(out, task="t", source=str(tmp_path / "exp2" / "t.toml"))
    assert claim_bench_folder(out, task="t", source=str(tmp_path / "exp2" / "t.toml"), overwrite=True) == out
    (out / BENCH_MARKER).write_text(json.dumps({"task": "t", "quick": False}))  # an older marker: by name
    assert claim_bench_folder(out, task="t", source=str(tmp_path / "exp2" / "t.toml")) == out


def test_an_output_folder_named_near_the_file_systems_limit_gets_its_outputs(tmp_path):
    """A folder name of 237-255 bytes passed every check, trained the whole run, then failed: the temporary
    folder beside it took the name plus 19 bytes ("File name too long"), at every resume too (found by a fuzz
    round)."""
    name = "y" * 250
    assert main([*RUN, "--out", name]) == 0
    assert (tmp_path / name / "result.json").exists()
