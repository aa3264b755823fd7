"""The run store on SQLite and on PostgreSQL (a local server `make test` starts; SELFTUNE_TEST_PG_URL)."""

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
import pytest
from sqlalchemy import create_engine, event, inspect, text

from selftune.store import STALE_AFTER, LeaseError, RunStore, StoreError
from selftune.store._schema import RunRow
from selftune.store._store import MIGRATIONS

PG_URL = os.environ.get("SELFTUNE_TEST_PG_URL")
HEX32 = r"[0-9a-f]{32}"


def _reset_postgres(url):
    """An empty database for each test: the throwaway server's data folder outlives a run of the suite, so
    whatever else used it (Optuna studies of a bench pointed at it) is dropped too."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
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


def _new_run(store, tmp_path, **kw):
    return store.create_run(method="stn", seed=0, config={}, out_dir=str(tmp_path / "out"),
                            checkpoint_root=str(tmp_path / "ck"), **kw)


def _set(store, run, **values):
    """Change a run's row behind the store's back (another process, a clock gone by)."""
    table = RunRow.__table__
    with store.engine.begin() as conn:
        conn.execute(table.update().where(table.c.id == run).values(**values))


def _stale():
    """A heartbeat older than STALE_AFTER (the store keeps naive UTC times)."""
    return datetime.now(UTC).replace(tzinfo=None) - STALE_AFTER - timedelta(seconds=5)


def _outcome(fn, limit_s=60):
    """``fn()``'s result or exception, asserting only that it came back within ``limit_s`` (no hang)."""
    box = []

    def target():
        try:
            box.append(fn())
        except BaseException as err:
            box.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert box, f"no answer within {limit_s} s: the store hung"
    return box[0]


def _one_line_store_error(outcome, *words):
    assert isinstance(outcome, StoreError), f"{type(outcome).__name__}: {outcome}"
    message = str(outcome)
    assert "\n" not in message and message.startswith("store: "), message
    for word in words:
        assert word in message, message
    return message


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process
    return proc.pid


# -- the store's contract -------------------------------------------------------------------------
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
    assert info.status == "finished" and info.test_loss == 0.5
    assert len(info.uuid) == 32 and info.checkpoint_dir == str(tmp_path.resolve() / info.uuid)
    assert store.events(run)[0]["kind"] == "divergence"
    with pytest.raises(LookupError, match="no run 999"):
        store.get_run(999)
    other = store.create_run(method="stn", seed=0, config={}, out_dir="o", checkpoint_root=str(tmp_path),
                             uuid="0123456789abcdef0123456789abcdef")
    assert store.get_run(other).uuid == "0123456789abcdef0123456789abcdef" != info.uuid
    with pytest.raises(StoreError, match="already has a run with uuid 0123456789abcdef0123456789abcdef"):
        store.create_run(method="stn", seed=0, config={}, out_dir="o", checkpoint_root=str(tmp_path),
                         uuid="0123456789abcdef0123456789abcdef")


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
        conn.execute(RunRow.__table__.update().values(host=socket.gethostname(), pid=_dead_pid()))
    assert store.get_run(run).status == "interrupted"
    _set(store, run, pid=os.getpid())
    store.interrupt(run, "SIGTERM")  # a stored interruption, lease released
    info = store.get_run(run)
    assert info.status == "interrupted" and info.error == "SIGTERM"


def test_schema_is_versioned_and_reopening_is_a_no_op(store_url, tmp_path):
    store = RunStore(store_url)
    store.create_run(method="fixed", seed=0, config={}, out_dir="o", checkpoint_root=str(tmp_path))
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM selftune_alembic_version")).scalar() == "0002"
    again = RunStore(store_url)
    assert len(again.list_runs()) == 1
    with store.engine.begin() as conn:  # a store written by a newer selftune is refused, not damaged
        conn.execute(text("UPDATE selftune_alembic_version SET version_num = '9999'"))
    for create in (True, False):
        _one_line_store_error(_outcome(lambda c=create: RunStore(store_url, create=c)), "newer selftune", "9999")


def _store_at_0001(url):
    """A store as selftune 0001 left it: two runs (one failed, one finished) and a trajectory row."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with engine.begin() as conn:
        for status in ("failed", "finished"):
            conn.execute(text("INSERT INTO runs (method, seed, status, config, out_dir, checkpoint_dir, created_at, "
                              "heartbeat_at, host, pid) VALUES ('stn', 1, :s, '{}', 'o', 'ck/run-1', :t, :t, 'h', 1)"),
                         {"s": status, "t": datetime(2024, 1, 1)})
        conn.execute(text("INSERT INTO trajectory (run_id, step, data) VALUES (1, 1, '{\"step\": 1}')"))
        assert conn.execute(text("SELECT version_num FROM selftune_alembic_version")).scalar() == "0001"
    engine.dispose()


@pytest.mark.parametrize("create", [True, False])
def test_a_0001_store_is_upgraded_and_its_rows_get_uuids(store_url, tmp_path, create):
    _store_at_0001(store_url)
    store = RunStore(store_url, create=create)  # read-only opens upgrade a selftune store too
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM selftune_alembic_version")).scalar() == "0002"
        assert {c["name"] for c in inspect(conn).get_columns("runs")} >= {"uuid", "lease"}
    first, second = store.list_runs()
    assert first.uuid != second.uuid and all(len(r.uuid) == 32 for r in (first, second))
    assert first.checkpoint_dir == "ck/run-1" and store.trajectory(1) == [{"step": 1}]  # nothing cascaded away
    assert store.acquire(1).status == "running"  # a failed old run can be resumed
    store.commit_checkpoint(1, step=2, epoch=0, path="p", trajectory=[{"step": 2}], epochs=[])
    with pytest.raises(LeaseError, match="already finished"):
        store.acquire(2)
    new = _new_run(store, tmp_path)
    assert store.get_run(new).uuid not in (first.uuid, second.uuid)
    assert len(RunStore(store_url).list_runs()) == 3  # reopening: a no-op


# -- opening: what a read-only open creates, what is refused ----------------------------------------
def test_read_only_open_of_a_missing_file_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    _one_line_store_error(_outcome(lambda: RunStore(url, create=False)), "no selftune store at", "missing.db")
    assert list(tmp_path.iterdir()) == []
    RunStore(url)  # a write command creates it
    assert (tmp_path / "missing.db").exists()


def test_another_applications_database_is_refused_and_left_as_it_was(store_url, tmp_path):
    """A database with tables selftune did not make is not a store: read-only and write opens alike are
    refused (a run added its six tables to a user's SQLite file, and `selftune runs` suggested it)."""
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE things (id INTEGER PRIMARY KEY)"))
    for create in (False, True):
        _one_line_store_error(_outcome(lambda c=create: RunStore(store_url, create=c)),
                              "holds tables selftune did not create (things)", "its own database")
    assert set(inspect(engine).get_table_names()) == {"things"}
    if store_url.startswith("sqlite"):
        with engine.connect() as conn:  # not even switched to WAL
            assert conn.execute(text("PRAGMA journal_mode")).scalar() != "wal"
    with engine.begin() as conn:  # nor is a `runs` table selftune did not create taken for its own
        conn.execute(text("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)"))
    _one_line_store_error(_outcome(lambda: RunStore(store_url)), "did not create (runs, things)")
    assert set(inspect(engine).get_table_names()) == {"things", "runs"}
    engine.dispose()


def test_a_database_of_optuna_studies_takes_a_store_beside_them(tmp_path):
    """Searches keep their studies in the store's database, so one that holds only Optuna's tables (an
    optuna-dashboard user's file) is one selftune may add its store to."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="mine", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    store = RunStore(url)
    assert store.list_runs() == []
    assert optuna.load_study(study_name="mine", storage=url).best_trial.number == 0
    # a table that only shares a name with one of Optuna's is an application's own
    clinic = tmp_path / "clinic.db"
    with sqlite3.connect(clinic) as db:
        db.execute("CREATE TABLE trials (id INTEGER PRIMARY KEY, drug TEXT)")
    _one_line_store_error(_outcome(lambda: RunStore(f"sqlite:///{clinic}")), "did not create (trials)")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true"])
def test_an_in_memory_store_is_refused_unless_allowed(url, tmp_path):
    _one_line_store_error(_outcome(lambda: RunStore(url)), "in-memory", "vanishes")
    store = RunStore(url, allow_memory=True)
    run = _new_run(store, tmp_path)
    assert store.get_run(run).status == "running"


def test_a_corrupt_file_is_one_line_on_open_and_on_read(tmp_path):
    path = tmp_path / "store.db"
    junk = bytes(range(256)) * 32
    path.write_bytes(junk)
    for create in (True, False):
        _one_line_store_error(_outcome(lambda c=create: RunStore(f"sqlite:///{path}", create=c, timeout_s=2)),
                              "is not a SQLite database")
    assert path.read_bytes() == junk  # left as it was
    good = tmp_path / "good.db"
    store = RunStore(f"sqlite:///{good}")
    run = _new_run(store, tmp_path)
    store.engine.dispose()
    for leftover in tmp_path.glob("good.db-*"):
        leftover.unlink()
    good.write_bytes(junk)  # the file breaks while the store is open
    _one_line_store_error(_outcome(store.list_runs), "cannot read from", "is not a SQLite database")
    _one_line_store_error(_outcome(lambda: store.heartbeat(run)), "cannot write to", "is not a SQLite database")


def test_a_read_only_store_reads_but_refuses_writes_in_one_line(tmp_path):
    path = tmp_path / "store.db"
    store = RunStore(f"sqlite:///{path}")
    run = _new_run(store, tmp_path)
    store.fail(run, "boom")
    # SQLite's own read-only mode: the read-only path even for root, whom chmod does not stop.
    ro = RunStore(f"sqlite:///file:{path}?mode=ro&uri=true", create=False, timeout_s=2)
    assert [r.id for r in ro.list_runs()] == [run]
    _one_line_store_error(_outcome(lambda: _new_run(ro, tmp_path)), "cannot write to", "read-only")
    _one_line_store_error(_outcome(lambda: ro.acquire(run)), "cannot write to", "read-only")
    assert store.get_run(run).status == "failed"


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a small tmpfs (root with CAP_SYS_ADMIN only): a real file system to fill or make read-only."""
    mount = tmp_path / "fs"
    mount.mkdir()

    def do(size, *options):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                               str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return mount

    yield do
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_store_on_a_read_only_file_system_is_one_line(tmpfs, tmp_path):
    fs = tmpfs("1m")
    url = f"sqlite:///{fs / 'store.db'}"
    store = RunStore(url)
    run = _new_run(store, tmp_path)
    store.interrupt(run, "stopped")
    store.close()
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    for create in (True, False):
        _one_line_store_error(_outcome(lambda c=create: RunStore(url, create=c, timeout_s=2)), "read-only")


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmpfs, tmp_path):
    fs = tmpfs("512k")
    store = RunStore(f"sqlite:///{fs / 'store.db'}", timeout_s=5)
    run = _new_run(store, tmp_path)
    committed = 0
    blob = "x" * 1000

    def fill():
        nonlocal committed
        for c in range(10_000):
            store.commit_checkpoint(run, step=c * 50 + 50, epoch=0, path="p", epochs=[],
                                    trajectory=[{"step": c * 50 + i + 1, "blob": blob} for i in range(50)])
            committed = c * 50 + 50

    _one_line_store_error(_outcome(fill), "cannot write to", "no space left on device")
    assert committed > 0 and [r["step"] for r in store.trajectory(run)] == list(range(1, committed + 1))


FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from selftune.store import RunStore, StoreError
    store = RunStore(sys.argv[1], timeout_s=5)
    run = store.create_run(method="fixed", seed=0, config={}, out_dir="o", checkpoint_root="ck")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        for c in range(10_000):
            store.commit_checkpoint(run, step=c, epoch=0, path="p", epochs=[],
                                    trajectory=[{"step": c * 50 + i, "blob": "x" * 1000} for i in range(50)])
    except StoreError as err:
        print(err)
""")


def test_a_file_size_limit_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, f"sqlite:///{tmp_path / 'store.db'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("store: cannot write to "), done.stdout
    assert "file-size limit" in lines[0] or "no space left" in lines[0], lines[0]


def test_a_silent_server_fails_in_bounded_time_without_the_password():
    pytest.importorskip("psycopg")
    server = socket.create_server(("127.0.0.1", 0))  # accepts, never says a word
    port = server.getsockname()[1]
    accepted = []

    def serve():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    try:
        for scheme in ("postgresql", "postgresql+psycopg"):
            outcome = _outcome(lambda s=scheme: RunStore(f"{s}://selftune:s3cret@127.0.0.1:{port}/db", timeout_s=2), 30)
            message = _one_line_store_error(outcome, "did not answer")
            assert "s3cret" not in message
        assert accepted  # it did reach the silent server
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def test_a_missing_driver_or_a_bad_url_is_one_line_without_the_password():
    _one_line_store_error(_outcome(lambda: RunStore("nosuch://user:s3cret@host/db")), "no database driver")
    _one_line_store_error(_outcome(lambda: RunStore("not a url")), "is not a database URL")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        message = _one_line_store_error(_outcome(lambda: RunStore("postgresql+psycopg2://user:s3cret@host/db")),
                                        "no database driver", "psycopg2")
        assert "s3cret" not in message


def test_a_store_locked_past_the_timeout_is_one_line(store_url, tmp_path):
    store = RunStore(store_url, timeout_s=1)
    run = _new_run(store, tmp_path)
    if store_url.startswith("sqlite"):
        holder = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write transaction that never ends
    else:
        holder = create_engine(store_url).connect()
        holder.execute(text("SELECT id FROM runs FOR UPDATE"))  # a row lock, held
    try:
        _one_line_store_error(_outcome(lambda: store.heartbeat(run)), "cannot write to")
    finally:
        holder.rollback()
        holder.close()
    store.heartbeat(run)  # released: writes go through again


# -- leases: one driver per run -------------------------------------------------------------------
def test_a_fresh_lease_is_refused_even_with_force(store_url, tmp_path):
    a, b = RunStore(store_url), RunStore(store_url)
    run = _new_run(a, tmp_path)
    for force in (False, True):
        with pytest.raises(LeaseError, match=rf"run {run} is driven by pid {os.getpid()} on .*last heartbeat"):
            b.acquire(run, force=force)
    with pytest.raises(LeaseError, match="not driven by this process"):
        b.heartbeat(run)
    a.heartbeat(run)  # a still drives it
    with pytest.raises(LookupError, match="no run 999"):
        b.acquire(999)


def test_a_stale_lease_needs_force_and_a_dead_holder_does_not(store_url, tmp_path):
    a, b = RunStore(store_url), RunStore(store_url)
    run = _new_run(a, tmp_path)
    _set(a, run, heartbeat_at=_stale())  # a holder alive on this host is never taken over, not even with --force
    with pytest.raises(LeaseError, match=rf"run {run} is driven by pid {os.getpid()} .*still alive on this host"):
        b.acquire(run, force=True)
    _set(a, run, host="another-host")  # a holder on another host may just be stuck: only --force takes it
    with pytest.raises(LeaseError, match=rf"run {run} is still marked running by pid {os.getpid()} .*--force"):
        b.acquire(run)
    info = b.acquire(run, force=True)
    assert info.status == "running" and info.pid == os.getpid()
    b.heartbeat(run)
    _set(b, run, host=socket.gethostname(), pid=_dead_pid())  # fresh heartbeat, but its process is gone
    c = RunStore(store_url)
    assert c.acquire(run).status == "running"
    with pytest.raises(LeaseError, match=f"run {run} was taken over by pid {os.getpid()}"):
        b.heartbeat(run)
    c.finish(run, {"test": {"loss": 1.0}})
    with pytest.raises(LeaseError, match=f"run {run} already finished; its results are in .*out"):
        c.acquire(run, force=True)


def test_a_taken_over_process_can_neither_write_nor_fail_the_run(store_url, tmp_path):
    a, b = RunStore(store_url), RunStore(store_url)
    run = _new_run(a, tmp_path)
    a.commit_checkpoint(run, step=5, epoch=0, path="a.pt", trajectory=rows(5), epochs=[])
    _set(a, run, heartbeat_at=_stale(), host="another-host")  # a stuck driver on another machine
    b.acquire(run, force=True)
    b.rewind(run, 5, 0)
    b.commit_checkpoint(run, step=10, epoch=0, path="b.pt", trajectory=rows(5, 5), epochs=[])
    with pytest.raises(LeaseError, match=rf"run {run} was taken over by pid {os.getpid()} on .*stopped driving it"):
        a.commit_checkpoint(run, step=8, epoch=0, path="x.pt", trajectory=rows(3, 100), epochs=[])
    for write in (lambda: a.fail(run, "lost"), lambda: a.finish(run, {"test": {"loss": 9.0}}),
                  lambda: a.interrupt(run, "sig"), lambda: a.heartbeat(run), lambda: a.rewind(run, 0, 0),
                  lambda: a.add_event(run, step=1, kind="x", message="y")):
        with pytest.raises(LeaseError):
            write()
    info = a.get_run(run)  # as the winner left it
    assert info.status == "running" and info.error is None
    assert [r["step"] for r in a.trajectory(run)] == list(range(1, 11)) and len(a.checkpoints(run)) == 2
    assert a.events(run) == []
    b.finish(run, {"test": {"loss": 0.25}})
    with pytest.raises(LeaseError):
        a.fail(run, "late")
    with pytest.raises(LeaseError, match="not driven by this process"):
        b.fail(run, "twice")  # the winner released it when it finished
    info = a.get_run(run)
    assert info.status == "finished" and info.test_loss == 0.25 and info.error is None


def _race(stores, run):
    """Every store calls ``acquire(run)`` at the same moment, each in its own thread (own connections)."""
    barrier = threading.Barrier(len(stores))
    results = [None] * len(stores)

    def race(i):
        barrier.wait()
        try:
            results[i] = stores[i].acquire(run)
        except LeaseError as err:
            results[i] = err

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_racing_acquires_have_exactly_one_winner(store_url, tmp_path):
    creator = RunStore(store_url)
    run = _new_run(creator, tmp_path)
    creator.interrupt(run, "stopped")
    for _round in range(4):
        stores = [RunStore(store_url) for _ in range(3)]
        results = _race(stores, run)
        winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
        assert len(winners) == 1, results
        assert all(isinstance(r, LeaseError) for i, r in enumerate(results) if i not in winners), results
        stores[winners[0]].interrupt(run, "next round")
        for i, s in enumerate(stores):
            if i not in winners:
                with pytest.raises(LeaseError):
                    s.heartbeat(run)
            s.close()


def test_an_acquire_that_loses_between_its_read_and_its_update_is_refused(store_url, tmp_path):
    a = RunStore(store_url)
    run = _new_run(a, tmp_path)
    a.interrupt(run, "stopped")
    b, c = RunStore(store_url), RunStore(store_url)
    meanwhile = []

    @event.listens_for(b.engine, "before_cursor_execute")
    def _take_it_first(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE RUNS") and not meanwhile:
            meanwhile.append(c.acquire(run))  # another process wins after b read the row, before b's update

    with pytest.raises(LeaseError, match=rf"run {run} (was just taken by|is driven by) pid {os.getpid()}"):
        b.acquire(run)
    assert meanwhile and meanwhile[0].status == "running"
    c.heartbeat(run)  # the winner drives it
    with pytest.raises(LeaseError):
        b.heartbeat(run)


# -- many writers, and the command line -----------------------------------------------------------
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
    from selftune.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.toml"
    assert main(["run", str(config), "--set", "epochs=2", "--store", store_url, "--quiet", "--out", "o"]) == 0
    store = RunStore(store_url)
    (run,) = store.list_runs()
    assert run.status == "finished" and run.result["hparams"] and store.trajectory(run.id)
    assert len(store.epochs(run.id)) == 2


def test_a_shared_study_finds_its_dead_trials_and_runs_its_budget_on_either_database(store_url, tmp_path,
                                                                                      monkeypatch):
    """Searches keep their studies in the store's database: the trial ownership of `methods._study` (its
    heartbeat query included) on SQLite and on PostgreSQL."""

    from selftune.methods import _study

    RunStore(store_url)
    storage = _study.open_storage(store_url)
    study = optuna.create_study(study_name="shared", storage=storage)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    dead, live, orphan = study.ask(), study.ask(), study.ask()
    for trial, pid in ((dead, gone.pid), (live, os.getpid())):
        for key, value in {**_study.owner(), _study.PID: pid}.items():
            trial.set_user_attr(key, value)
    monkeypatch.setattr(_study, "ORPHAN_AFTER_S", 0.0)
    _study.fail_dead(study, storage)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {dead.number: "FAIL", live.number: "RUNNING", orphan.number: "FAIL"}
    study.tell(live, 0.5)

    def objective(trial):
        _study.claim(study, trial, 3)
        return trial.suggest_float("x", 0.0, 1.0)

    done = _study.run_budget(study, storage, objective, 3)
    assert [t.number for t in done] == [live.number, 3, 4]
    storage.engine.dispose()


def test_a_run_records_its_checkpoint_interval_when_it_starts(tmp_path):
    """The interval decides the roll-back points, so a resume keeps it; a run killed before its first
    checkpoint had none to read it from and resumed at the default 100, ending elsewhere (fuzz round 45)."""
    from selftune.runner import _recorded_interval, prepare, run_recorded
    from selftune.testing import digits_config

    store = RunStore(f"sqlite:///{tmp_path / 's.db'}")
    for every, expected in ((5, {"every": 5, "at_epoch_end": True}), (None, {"every": 2**62, "at_epoch_end": False}),
                            (0, {"every": 2**62, "at_epoch_end": True})):
        result = run_recorded(prepare(digits_config("epochs=1")), store, out=tmp_path / f"out{every}",
                              checkpoint_root=tmp_path / "ck", every=every)
        run_id = result.run_id
        assert [e["step"] for e in store.events(run_id) if e["kind"] == "checkpointing"] == [0]
        assert _recorded_interval(store, run_id) == expected
