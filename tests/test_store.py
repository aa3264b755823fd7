"""The run store on SQLite and on PostgreSQL (a local server `make test` starts; SELFTUNE_TEST_PG_URL)."""

import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from selftune.store import STALE_AFTER, RunStore
from selftune.store._schema import Base, RunRow

PG_URL = os.environ.get("SELFTUNE_TEST_PG_URL")


def _reset_postgres(url):
    engine = create_engine(url)
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS selftune_alembic_version"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    if not PG_URL:
        pytest.skip("SELFTUNE_TEST_PG_URL not set (make test starts a local PostgreSQL and sets it)")
    _reset_postgres(PG_URL)
    return PG_URL


def rows(n, start=0):
    return [{"step": start + i + 1, "d": 0.1 * i, "val_loss": float("nan")} for i in range(n)]


def test_run_lifecycle(store_url, tmp_path):
    store = RunStore(store_url)
    run = store.create_run(method="delta-stn", seed=3, config={"epochs": 2}, out_dir="out",
                           checkpoint_root=str(tmp_path))
    store.commit_checkpoint(run, step=5, epoch=0, path="a.pt", trajectory=rows(5), epochs=[])
    store.commit_checkpoint(run, step=10, epoch=1, path="b.pt", trajectory=rows(5, 5), epochs=[{"epoch": 1, "v": 1.0}])
    assert [r["step"] for r in store.trajectory(run)] == list(range(1, 11))
    assert store.trajectory(run)[0]["val_loss"] != store.trajectory(run)[0]["val_loss"]  # NaN survives
    store.rewind(run, 5, 0)  # resume from the first checkpoint: later rows and checkpoints go
    assert [r["step"] for r in store.trajectory(run)] == list(range(1, 6))
    assert store.epochs(run) == [] and store.checkpoints(run) == [(5, 0, "a.pt")]
    store.add_event(run, step=12, kind="divergence", message="x")
    store.finish(run, {"test": {"loss": 0.5}, "hparams": {}})
    info = store.get_run(run)
    assert info.status == "finished" and info.test_loss == 0.5 and info.checkpoint_dir.endswith(f"run-{run}")
    assert store.events(run)[0]["kind"] == "divergence"
    with pytest.raises(LookupError, match="no run 999"):
        store.get_run(999)


def test_stale_heartbeat_reads_as_interrupted(store_url, tmp_path):
    store = RunStore(store_url)
    run = store.create_run(method="stn", seed=0, config={}, out_dir="o", checkpoint_root=str(tmp_path))
    assert store.get_run(run).status == "running"
    old = store.get_run(run).heartbeat_at - STALE_AFTER - timedelta(seconds=5)
    with store.engine.begin() as conn:  # a heartbeat older than STALE_AFTER (a process on another host)
        conn.execute(RunRow.__table__.update().values(heartbeat_at=old, host="elsewhere"))
    assert store.get_run(run).status == "interrupted"
    store.heartbeat(run)
    assert store.get_run(run).status == "running"  # fresh again; the host is not this one
    with store.engine.begin() as conn:  # fresh heartbeat, but the process on this host is gone
        conn.execute(RunRow.__table__.update().values(host=__import__("socket").gethostname(), pid=2**22 + 7))
    assert store.get_run(run).status == "interrupted"


def test_schema_is_versioned_and_reopening_is_a_no_op(store_url, tmp_path):
    store = RunStore(store_url)
    store.create_run(method="fixed", seed=0, config={}, out_dir="o", checkpoint_root=str(tmp_path))
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM selftune_alembic_version")).scalar() == "0001"
    again = RunStore(store_url)
    assert len(again.list_runs()) == 1


WRITER = textwrap.dedent("""
    import sys
    from selftune.store import RunStore
    url, worker, runs, ckpts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = RunStore(url)
    for r in range(runs):
        run = store.create_run(method="fixed", seed=worker, config={"worker": worker, "r": r}, out_dir="o",
                               checkpoint_root="ck")
        for c in range(ckpts):
            store.commit_checkpoint(run, step=c * 10, epoch=c, path=f"{c}.pt",
                                    trajectory=[{"step": c * 10 + i, "v": float(i)} for i in range(5)],
                                    epochs=[{"epoch": c + 1, "v": 1.0}])
            store.heartbeat(run)
        store.add_event(run, step=0, kind="note", message="done")
        store.finish(run, {"test": {"loss": float(worker)}, "hparams": {}})
""")


def test_four_concurrent_writers_lose_no_rows(store_url, tmp_path):
    runs, ckpts = 6, 8
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store_url, str(w), str(runs), str(ckpts)],
                              cwd=tmp_path, stderr=subprocess.PIPE) for w in range(4)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    store = RunStore(store_url)
    listed = store.list_runs()
    assert len(listed) == 4 * runs
    assert {(r.config["worker"], r.config["r"]) for r in listed} == {(w, r) for w in range(4) for r in range(runs)}
    assert all(r.status == "finished" for r in listed)
    for r in listed:
        assert [row["step"] for row in store.trajectory(r.id)] == [c * 10 + i for c in range(ckpts) for i in range(5)]
        assert len(store.epochs(r.id)) == ckpts and len(store.checkpoints(r.id)) == ckpts
        assert len(store.events(r.id)) == 1


def test_cli_run_records_into_the_store(store_url, tmp_path, monkeypatch):
    from pathlib import Path

    from selftune.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.toml"
    assert main(["run", str(config), "--set", "epochs=2", "--store", store_url, "--quiet", "--out", "o"]) == 0
    store = RunStore(store_url)
    (run,) = store.list_runs()
    assert run.status == "finished" and run.result["hparams"] and store.trajectory(run.id)
    assert len(store.epochs(run.id)) == 2
