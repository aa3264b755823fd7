"""The run store: runs, trajectories, metrics, checkpoints and events in any SQLAlchemy database.

A SQLite file by default (``selftune.db`` in the working directory), in WAL mode with a busy timeout
so several processes can write to it; any SQLAlchemy URL (PostgreSQL, through psycopg 3) for many
workers. A store opened with ``create=True`` is created and upgraded by Alembic, so a newer selftune
opens an older store; ``create=False`` (read-only commands) never creates a file or a table, but does
upgrade an older selftune store it finds (reading it needs the current schema).

Time is bounded: SQLite waits at most ``timeout_s`` for a lock; PostgreSQL gets a connect timeout, a
statement timeout and TCP keepalives from ``timeout_s``, so a silent server fails instead of hanging.
Every error from the database reaches the caller as a one-line :class:`StoreError` naming the store.

Consistency rule: trajectory and epoch rows reach the store in the same transaction as the
checkpoint they belong to (see :meth:`RunStore.commit_checkpoint`), so after a crash the store holds
exactly the rows of its last checkpoint, and a resumed run neither repeats nor misses a row.

Leases: one process at a time drives a run. The row's ``lease`` holds the token of the
:class:`RunStore` that created or acquired it, and every write for the run is conditioned on that
token, so a process whose run was taken over gets a :class:`LeaseError` instead of overwriting the
new driver's rows (a loser can never flip a finished run to failed).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import sqlite3
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

from alembic.util import CommandError
from sqlalchemy import create_engine, delete, event, inspect, select, text, update
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigError, LeaseError, StoreError
from ._schema import CheckpointRow, EpochRow, EventRow, RunRow, TrajectoryRow

__all__ = ["STALE_AFTER", "LeaseError", "RunInfo", "RunStore", "StoreError", "process_gone", "resolve_url"]

DEFAULT_URL = "sqlite:///selftune.db"
ENV_VAR = "SELFTUNE_STORE"
VERSION_TABLE = "selftune_alembic_version"
#: Optuna's own tables (RDBStorage, schema v3-v5): searches keep their studies in the store's database, so a
#: database that holds only these is one selftune may add its store to.
OPTUNA_TABLES = frozenset({
    "studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
    "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
    "trial_intermediate_values", "trial_heartbeats", "version_info", "alembic_version"})
MIGRATIONS = Path(__file__).parent / "migrations"
#: A running run whose heartbeat is older than this is shown as interrupted (and ``--force`` may take it).
STALE_AFTER = timedelta(seconds=60)
T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def process_gone(host: str, pid: int) -> bool:
    """True when ``pid`` on this host has exited (a run, or a search trial, killed before its heartbeat went
    stale); ``False`` for another host's process, which only its heartbeat can tell about."""
    if host != socket.gethostname() or os.name == "nt":
        # (Windows: os.kill(pid, 0) sends CTRL_C_EVENT there, it does not test; the heartbeat tells)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (killed child not yet reaped) has exited too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _age(delta: timedelta) -> str:
    seconds = max(0.0, delta.total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``$SELFTUNE_STORE``, else ``sqlite:///selftune.db``."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise StoreError(f"store: {url.split('@')[-1]!r} is not a database URL "
                         "(e.g. sqlite:///runs.db or postgresql://user@host/db)") from None


def _sqlite_file(url: URL) -> str | None:
    """The file of a SQLite URL (``uri=true`` URLs included); ``None`` for an in-memory database."""
    db = url.database or ""
    if str(url.query.get("uri", "")).lower() in ("true", "1", "yes", "on") and db.startswith("file:"):
        if str(url.query.get("mode", "")).lower() == "memory":
            return None
        db = db[len("file:"):]
        if db.startswith("//"):  # file://host/path: the authority (empty or localhost) goes
            db = db[2:]
            db = db[db.find("/"):] if "/" in db else ""
        db = unquote(db)
    return None if db in ("", ":memory:") else db


@dataclass
class RunInfo:
    """One run as the store knows it. ``status`` (``running | finished | failed | interrupted``) reads
    ``interrupted`` for a running run whose heartbeat is stale or whose process on this host is gone."""

    id: int
    method: str
    seed: int
    status: str
    config: dict[str, Any]
    out_dir: str
    checkpoint_dir: str
    created_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    test_loss: float | None
    result: dict[str, Any] | None
    error: str | None
    host: str
    pid: int
    uuid: str

    @classmethod
    def from_row(cls, row: RunRow) -> RunInfo:
        status = row.status
        if status == "running" and (_now() - row.heartbeat_at > STALE_AFTER or process_gone(row.host, row.pid)):
            status = "interrupted"
        return cls(row.id, row.method, row.seed, status, row.config, row.out_dir, row.checkpoint_dir,
                   row.created_at, row.heartbeat_at, row.finished_at, row.test_loss, row.result, row.error,
                   row.host, row.pid, row.uuid)


class RunStore:
    """Opens a store (and creates or upgrades it).

    Args:
        url: SQLAlchemy URL; ``None`` resolves through :func:`resolve_url`.
        create: create the SQLite file and the tables when missing (write commands). ``False`` (read-only
            commands) refuses a missing file or a database without a selftune store, creating nothing; a
            selftune store with an older schema is upgraded either way.
        timeout_s: longest wait for a lock (SQLite), a connection or a statement (PostgreSQL).
        allow_memory: accept an in-memory SQLite URL (tests); it vanishes when the store is closed.

    Raises:
        StoreError: a malformed URL, a missing database driver, or a database that cannot be opened;
            one line naming the store and the cause.
    """

    def __init__(self, url: str | None = None, *, create: bool = True, timeout_s: float = 30.0,
                 allow_memory: bool = False) -> None:
        if not timeout_s > 0:
            raise ConfigError("timeout_s", f"must be a positive number of seconds, got {timeout_s!r}")
        self.url = _parse(resolve_url(url))
        self.display_url = self.url.render_as_string(hide_password=True)
        if self.url.get_backend_name() == "sqlite":  # no password; `file:` URIs read better unescaped
            self.display_url = unquote(self.display_url)
        self.timeout_s = float(timeout_s)
        self._leases: dict[int, str] = {}
        self._wal = create  # a read-only open never switches another program's database to WAL
        self.engine: Engine | None = None
        try:
            with self._guard("open"):
                if self.url.get_backend_name() == "sqlite":
                    self._check_sqlite(create, allow_memory)
                self.engine = self._engine()
                self._prepare(create)
        except BaseException:
            if self.engine is not None:
                self.engine.dispose()
            raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    # -- opening --------------------------------------------------------------------------------
    def _check_sqlite(self, create: bool, allow_memory: bool) -> None:
        path = _sqlite_file(self.url)
        if path is None:
            if not allow_memory:
                raise StoreError(f"store: {self.display_url} is an in-memory SQLite database, which vanishes when "
                                 "the command ends; give a file (e.g. sqlite:///selftune.db)")
            return
        if not create and not Path(path).exists():
            raise StoreError(f"store: no selftune store at {self.display_url}; `selftune run` creates one")
        if Path(path).is_file() and Path(path).stat().st_size > 0:
            # read before the engine opens it: its first connection switches a file to WAL mode for good
            try:
                with contextlib.closing(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                                                        timeout=self.timeout_s)) as db:
                    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.Error:
                return  # not a database, or locked: the engine's open says which, in one line
            self._refuse_foreign(tables)
        if not Path(path).parent.exists():
            raise StoreError(f"store: folder {str(Path(path).parent)!r} of {self.display_url} does not exist")

    def _engine(self) -> Engine:
        ms = int(self.timeout_s * 1000)
        backend, driver = self.url.get_backend_name(), self.url.get_driver_name()
        if backend == "sqlite":
            engine = create_engine(self.url, connect_args={"timeout": self.timeout_s})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(conn, _record):
                cur = conn.cursor()
                if self._wal:
                    cur.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL survives any process crash (what the store promises); it skips the
                # per-commit fsync that made commits the bottleneck of short runs on slow disks.
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute(f"PRAGMA busy_timeout={ms}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            return engine
        if backend != "postgresql":
            return create_engine(self.url, pool_pre_ping=True, pool_timeout=self.timeout_s)
        args: dict[str, Any] = {}
        if driver in ("psycopg", "psycopg2"):  # libpq: bounded connect; dead peers are noticed
            seconds = max(2, math.ceil(self.timeout_s))
            args = {"connect_timeout": seconds, "keepalives": 1, "keepalives_idle": seconds,
                    "keepalives_interval": max(1, seconds // 3), "keepalives_count": 3, "tcp_user_timeout": ms}
            args = {k: v for k, v in args.items() if k not in self.url.query}
        engine = create_engine(self.url, pool_pre_ping=True, pool_timeout=self.timeout_s, connect_args=args)

        @event.listens_for(engine, "connect")
        def _pg_timeouts(conn, _record):
            # A SET, not the `options` startup parameter: connection poolers (pgbouncer) refuse the latter.
            cur = conn.cursor()
            cur.execute(f"SET statement_timeout = {ms}")
            cur.close()
            conn.commit()

        return engine

    def _prepare(self, create: bool) -> None:
        """Check that the database holds a selftune store (or may get one) and bring it to the newest schema."""
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        script = ScriptDirectory.from_config(cfg)
        head, known = script.get_current_head(), {r.revision for r in script.walk_revisions()}
        # Several processes may open a new store at once. PostgreSQL: an advisory lock serialises the
        # migrations (concurrent CREATE TABLEs otherwise collide on the catalog). SQLite: the database
        # lock does, and a loser that still collides retries, then finds the schema up to date.
        deadline = time.monotonic() + self.timeout_s
        for attempt in itertools.count():
            try:
                with self.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(73556081)"))
                    version = self._version(conn, create)
                    if version == head:
                        return
                    if version is not None and version not in known:
                        raise StoreError(f"store: {self.display_url} was written by a newer selftune (schema "
                                         f"{version}, this one knows up to {head}); upgrade selftune")
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                return
            except (OperationalError, IntegrityError, DBAPIError, CommandError) as err:
                racy = ("locked", "busy", "already exists", "duplicate", "expected to match one row")
                if not any(word in str(err).lower() for word in racy) or attempt >= 5 \
                        or time.monotonic() > deadline:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _refuse_foreign(self, tables: set[str]) -> None:
        """A database that holds tables neither selftune nor Optuna made is another application's: a run
        never adds its tables to a file or database it did not create."""
        if VERSION_TABLE in tables:
            return
        # Optuna's by its names and its two defining tables, so an application's own `trials` table is not taken
        # for Optuna's
        optuna = OPTUNA_TABLES if {"studies", "version_info"} <= tables else frozenset()
        foreign = sorted(t for t in tables if t not in optuna and not t.startswith("sqlite_"))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise StoreError(f"store: {self.display_url} holds tables selftune did not create ({shown}), so it is "
                             "not a selftune store; give selftune its own database or SQLite file")

    def _version(self, conn: Connection, create: bool) -> str | None:
        """The store's schema revision; ``None`` for a database without a selftune store (create allowed)."""
        tables = set(inspect(conn).get_table_names())
        self._refuse_foreign(tables)
        version = None
        if VERSION_TABLE in tables:
            version = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        if (version is None or "runs" not in tables) and not create:
            raise StoreError(f"store: no selftune store at {self.display_url}; `selftune run` creates one")
        if VERSION_TABLE not in tables and "runs" in tables:
            raise StoreError(f"store: {self.display_url} has a `runs` table that selftune did not create; "
                             "give selftune its own database or SQLite file")
        return version

    # -- errors ---------------------------------------------------------------------------------
    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turn database errors into one-line StoreErrors naming the store; LookupError and StoreError pass."""
        try:
            yield
        except (StoreError, LookupError, ConfigError):
            raise
        except (NoSuchModuleError, ImportError) as err:
            missing = f" (no module {err.name!r})" if isinstance(err, ImportError) and err.name else ""
            raise StoreError(f"store: no database driver for {self.url.drivername!r}{missing} "
                             f"({self.display_url}); install it or use sqlite:///FILE") from None
        except Exception as err:
            dbapi = getattr(self.engine.dialect, "loaded_dbapi", None) if self.engine is not None else None
            kinds: tuple[type[BaseException], ...] = (DBAPIError, ArgumentError, sqlite3.Error, CommandError, OSError)
            if dbapi is not None and isinstance(getattr(dbapi, "Error", None), type):
                kinds += (dbapi.Error,)
            if not isinstance(err, kinds) and type(err).__module__.split(".")[0] != "sqlalchemy":
                raise
            raise StoreError(f"store: cannot {doing} {self.display_url}: {self._explain(err)}") from None

    def _explain(self, err: BaseException) -> str:
        """The cause of ``err`` in words, then what to do: one line, never the password."""
        orig = err.orig if isinstance(err, DBAPIError) and err.orig is not None else err
        lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
        msg = lines[0] if lines else type(orig).__name__
        low, name = msg.lower(), getattr(orig, "sqlite_errorname", "") or ""
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
        t = f"{self.timeout_s:g} s"
        if name == "SQLITE_NOTADB" or "not a database" in low:
            why = ("it is not a SQLite database (a damaged file, or another program's); move it aside or give "
                   "another store")
        elif name.startswith("SQLITE_CORRUPT") or "malformed" in low:
            why = f"the SQLite file is corrupt ({msg}); restore it from a backup or move it aside"
        elif name.startswith("SQLITE_READONLY") or "readonly" in low or "read-only" in low or code == "25006":
            why = (f"the store is read-only ({msg}); make the file and its folder writable, "
                   "or give another store")
        elif name == "SQLITE_FULL" or "disk is full" in low or "no space left" in low or code == "53100":
            why = f"no space left on device ({msg}); free disk space, then retry"
        elif name.startswith("SQLITE_IOERR") or "disk i/o error" in low:
            why = (f"a write to the disk failed ({msg}): the disk is full, a file-size limit was reached, or "
                   "the disk failed; free space or check the disk, then retry")
        elif (name.startswith("SQLITE_CANTOPEN") or "unable to open database file" in low) and self._read_only():
            why = (f"the store's file or folder is read-only ({msg}; SQLite writes -wal and -shm files beside "
                   "the store even to read it); make them writable, or give another store")
        elif name.startswith("SQLITE_CANTOPEN") or "unable to open database file" in low:
            why = f"cannot open the file ({msg}); check that it and its folder exist and may be read and written"
        elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in low:
            why = f"another process kept it locked for more than {t} ({msg}); retry when that process is done"
        elif code in ("57014", "55P03") or "statement timeout" in low or "lock timeout" in low:
            why = (f"a statement got no result within {t} ({msg}): a lock held by another process or an "
                   "overloaded server; retry later")
        elif "timeout expired" in low or "timed out" in low:
            why = f"the server did not answer within {t}; check that the database server at that address is up"
        elif code in ("28P01", "28000") or "authentication failed" in low:
            why = f"authentication failed ({msg}); check the user and password"
        elif code == "3D000":
            why = f"{msg}; create the database first"
        elif code == "42501" or "permission denied" in low:
            why = f"permission denied ({msg}); grant the user access or give another store"
        elif any(w in low for w in ("connection refused", "could not translate host", "no route to host",
                                    "connection failed", "server closed the connection", "connection reset",
                                    "name or service not known", "network is unreachable")):
            why = f"cannot reach the server ({msg}); check that it runs and the URL's host and port"
        else:
            why = f"{type(orig).__name__}: {msg}"
        if self.url.password:
            why = why.replace(str(self.url.password), "***")
        return why if len(why) <= 400 else why[:397] + "..."

    def _read_only(self) -> bool:
        """True when the SQLite file or its folder cannot be written (permissions, or a read-only file system)."""
        path = _sqlite_file(self.url) if self.url.get_backend_name() == "sqlite" else None
        if path is None:
            return False
        file, folder = Path(path), Path(path).parent
        return (file.exists() and not os.access(file, os.W_OK)) or (folder.exists() and not os.access(folder, os.W_OK))

    # -- transactions ---------------------------------------------------------------------------
    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction, retrying (for at most ``timeout_s``) while another writer holds the
        database."""
        deadline = time.monotonic() + self.timeout_s
        for attempt in itertools.count():
            try:
                with self._session.begin() as session:
                    return fn(session)
            except OperationalError as err:
                left = deadline - time.monotonic()
                if ("locked" not in str(err).lower() and "busy" not in str(err).lower()) or left <= 0:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0, left))
        raise AssertionError("unreachable")

    def _token(self, run_id: int) -> str:
        token = self._leases.get(run_id)
        if token is None:
            raise LeaseError(f"run {run_id} is not driven by this process; acquire it (resume it) before "
                             "writing to it")
        return token

    def _owned(self, session: Session, run_id: int, **values: Any) -> None:
        """``UPDATE runs SET values WHERE id = run_id AND lease = our token``; LeaseError when another
        process took the run over (the row no longer carries our token)."""
        token = self._token(run_id)
        done = session.execute(update(RunRow).where(RunRow.id == run_id, RunRow.lease == token).values(**values)
                               .execution_options(synchronize_session=False))
        if done.rowcount == 1:
            return
        self._leases.pop(run_id, None)
        row = session.get(RunRow, run_id)
        if row is None:
            raise LookupError(f"no run {run_id} in {self.display_url}; `selftune runs` lists them")
        now = "" if row.status == "running" else f" (now {row.status})"
        raise LeaseError(f"run {run_id} was taken over by pid {row.pid} on {row.host}{now}; "
                         "this process stopped driving it")

    def _owned_write(self, run_id: int, fn: Callable[[Session], None], **values: Any) -> None:
        """Claim the run's row (``values`` plus a heartbeat) under our lease, then run ``fn``, in one
        transaction. The row update comes first: it takes the write lock and checks the lease before any
        other row is written."""
        def write(session: Session) -> None:
            self._owned(session, run_id, heartbeat_at=_now(), **values)
            fn(session)
        with self._guard("write to"):
            self._write(write)

    # -- leases ---------------------------------------------------------------------------------
    def create_run(self, *, method: str, seed: int, config: dict[str, Any], out_dir: str,
                   checkpoint_root: str, uuid: str | None = None) -> int:
        """Record a new running run driven by this store (it holds the lease); its checkpoints go to
        ``checkpoint_root/<uuid>``. ``uuid``: the run's uuid (a fresh uuid4 when ``None``)."""
        if uuid is None:
            run_uuid = uuidlib.uuid4().hex
        else:
            try:
                run_uuid = uuidlib.UUID(str(uuid)).hex
            except ValueError:
                raise ConfigError("uuid", f"{uuid!r} is not a uuid (32 hex digits)") from None
        token = uuidlib.uuid4().hex
        with self._guard("write to"):
            checkpoint_dir = str(Path(checkpoint_root).resolve() / run_uuid)

            def add(session: Session) -> int:
                now = _now()
                row = RunRow(uuid=run_uuid, lease=token, method=method, seed=seed, status="running",
                             config=config, out_dir=out_dir, checkpoint_dir=checkpoint_dir, created_at=now,
                             heartbeat_at=now, host=socket.gethostname(), pid=os.getpid())
                session.add(row)
                session.flush()
                return row.id

            try:
                run_id = self._write(add)
            except IntegrityError:
                with self._session() as s:
                    if s.scalar(select(RunRow.id).where(RunRow.uuid == run_uuid)) is not None:
                        raise StoreError(f"store: {self.display_url} already has a run with uuid {run_uuid}; "
                                         "resume that run or leave the uuid out") from None
                raise
        self._leases[run_id] = token
        return run_id

    def acquire(self, run_id: int, *, force: bool = False) -> RunInfo:
        """Take the lease of run ``run_id`` so that this store drives it (to resume it): the run becomes
        ``running`` in this process. Exactly one of several processes acquiring at once wins.

        Raises:
            LookupError: no run with this id.
            LeaseError: the run finished; another live process drives it (heartbeat fresh, or stale with
                ``force`` False and that process not provably gone); another process won the race.
        """
        held = self._leases.get(run_id)
        token = uuidlib.uuid4().hex

        def take(session: Session) -> tuple[RunInfo, str]:
            row = session.get(RunRow, run_id)
            if row is None:
                raise LookupError(f"no run {run_id} in {self.display_url}; `selftune runs` lists them")
            if held is not None and row.lease == held and row.status == "running":  # ours already
                row.heartbeat_at = _now()
                return RunInfo.from_row(row), held
            where = [RunRow.id == run_id, RunRow.lease.is_not_distinct_from(row.lease), RunRow.status != "finished"]
            if row.status == "finished":
                raise LeaseError(f"run {run_id} already finished; its results are in {row.out_dir}")
            if row.status == "running" and not process_gone(row.host, row.pid):
                age = _now() - row.heartbeat_at
                holder = f"pid {row.pid} on {row.host} (last heartbeat {_age(age)} ago)"
                if row.host == socket.gethostname() and age > STALE_AFTER:  # alive here: never taken over
                    raise LeaseError(f"run {run_id} is driven by {holder}, a process that is still alive on this "
                                     "host; wait for it to end or stop it")
                if age <= STALE_AFTER:
                    raise LeaseError(f"run {run_id} is driven by {holder}; wait for it to end or stop it "
                                     f"(--force only takes a run whose heartbeat is older than "
                                     f"{_age(STALE_AFTER)})")
                if not force:
                    raise LeaseError(f"run {run_id} is still marked running by {holder}; pass --force if that "
                                     "process is gone")
                where.append(RunRow.heartbeat_at < _now() - STALE_AFTER)  # it must not have beaten since
            done = session.execute(update(RunRow).where(*where).values(
                lease=token, status="running", pid=os.getpid(), host=socket.gethostname(), heartbeat_at=_now(),
                error=None, finished_at=None).execution_options(synchronize_session=False))
            row = session.get(RunRow, run_id, populate_existing=True)
            if done.rowcount != 1:
                if row is None:
                    raise LookupError(f"no run {run_id} in {self.display_url}; `selftune runs` lists them")
                raise LeaseError(f"run {run_id} was just taken by pid {row.pid} on {row.host} (status "
                                 f"{row.status}, last heartbeat {_age(_now() - row.heartbeat_at)} ago); "
                                 "only one process may drive a run")
            return RunInfo.from_row(row), token

        with self._guard("write to"):
            info, self._leases[run_id] = self._write(take)
        return info

    # -- writing (each conditioned on this store holding the run's lease) -----------------------
    def heartbeat(self, run_id: int) -> None:
        """Mark run ``run_id`` alive. Raises LeaseError when another process took it over."""
        self._owned_write(run_id, lambda s: None)

    def commit_checkpoint(self, run_id: int, *, step: int, epoch: int, path: str,
                          trajectory: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> None:
        """Record a checkpoint file and the rows produced since the previous one, atomically."""
        def add(session: Session) -> None:
            session.add(CheckpointRow(run_id=run_id, step=step, epoch=epoch, path=path, created_at=_now()))
            session.add_all(TrajectoryRow(run_id=run_id, step=int(r["step"]), data=_clean(r)) for r in trajectory)
            session.add_all(EpochRow(run_id=run_id, epoch=int(r["epoch"]), data=_clean(r)) for r in epochs)
        self._owned_write(run_id, add)

    def rewind(self, run_id: int, step: int, epoch: int, *, divergences: int | None = None) -> None:
        """Drop what came after the checkpoint at ``step``/``epoch`` (the one a resume starts from).
        Call it after :meth:`acquire`, which makes the run running in this process.

        Events the replay from that checkpoint will record again are dropped: with ``divergences`` (the
        count the checkpoint's state holds), every divergence event after the first ``divergences``
        ones; without it, every event after ``step``. The count is the exact rule: a checkpoint written
        after a roll-back (an interrupt, or the roll-back's own) can sit at a step before the divergence
        it already holds, which the replay will not record again."""
        def rewind(session: Session) -> None:
            _drop_after(session, run_id, step, epoch)
            if divergences is None:
                session.execute(delete(EventRow).where(EventRow.run_id == run_id, EventRow.step > step))
                return
            ids = session.scalars(select(EventRow.id).where(EventRow.run_id == run_id, EventRow.kind == "divergence")
                                  .order_by(EventRow.id)).all()
            replayed = ids[max(divergences, 0):]
            if replayed:
                session.execute(delete(EventRow).where(EventRow.id.in_(replayed)))
        self._owned_write(run_id, rewind)

    def roll_back(self, run_id: int, *, step: int, epoch: int, path: str, event_step: int, message: str) -> None:
        """A running run rolled back to ``step``/``epoch``, behind its last checkpoint: in one transaction,
        drop the rows and checkpoints after that point (not the events: what happened is not replayed),
        record the divergence event (at ``event_step``, where it happened) and the checkpoint ``path`` of
        the rolled-back state."""
        def roll_back(session: Session) -> None:
            _drop_after(session, run_id, step, epoch)
            session.add(EventRow(run_id=run_id, step=event_step, kind="divergence", message=message,
                                 created_at=_now()))
            session.add(CheckpointRow(run_id=run_id, step=step, epoch=epoch, path=path, created_at=_now()))
        self._owned_write(run_id, roll_back)

    def add_event(self, run_id: int, *, step: int, kind: str, message: str) -> None:
        self._owned_write(run_id, lambda s: s.add(EventRow(run_id=run_id, step=step, kind=kind, message=message,
                                                           created_at=_now())))

    def finish(self, run_id: int, result: dict[str, Any]) -> None:
        """Mark the run finished with ``result`` and release its lease."""
        self._owned_write(run_id, lambda s: None, status="finished", finished_at=_now(), result=_clean(result),
                          test_loss=_clean(result["test"]["loss"]), lease=None)
        self._leases.pop(run_id, None)

    def fail(self, run_id: int, error: str) -> None:
        """Mark the run failed with the one-line ``error`` and release its lease."""
        self._owned_write(run_id, lambda s: None, status="failed", finished_at=_now(), error=error, lease=None)
        self._leases.pop(run_id, None)

    def interrupt(self, run_id: int, message: str) -> None:
        """Mark the run interrupted (stopped by a signal; resumable) and release its lease."""
        self._owned_write(run_id, lambda s: None, status="interrupted", error=message, lease=None)
        self._leases.pop(run_id, None)

    # -- reading --------------------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._guard("read from"), self._session() as session:
            yield session

    def list_runs(self) -> list[RunInfo]:
        with self._read() as s:
            return [RunInfo.from_row(r) for r in s.scalars(select(RunRow).order_by(RunRow.id))]

    def driver(self, run_id: int) -> str | None:
        """Who drives run ``run_id`` now (``"pid P on H (last heartbeat ... ago)"``), or ``None`` when no live
        process does (:class:`RunInfo`'s status: a run whose process is gone from this host or whose heartbeat
        went stale reads ``interrupted``), for a command that must not take what a live run owns."""
        try:
            row = self.get_run(run_id)
        except LookupError:
            return None
        if row.status != "running":
            return None
        return f"pid {row.pid} on {row.host} (last heartbeat {_age(_now() - row.heartbeat_at)} ago)"

    def get_run(self, run_id: int) -> RunInfo:
        """Raises:
            LookupError: no run with this id.
        """
        with self._read() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise LookupError(f"no run {run_id} in {self.display_url}; `selftune runs` lists them")
            return RunInfo.from_row(row)

    def trajectory(self, run_id: int) -> list[dict[str, Any]]:
        with self._read() as s:
            rows = s.scalars(select(TrajectoryRow).where(TrajectoryRow.run_id == run_id).order_by(TrajectoryRow.step))
            return [_restore(r.data) for r in rows]

    def epochs(self, run_id: int) -> list[dict[str, Any]]:
        with self._read() as s:
            rows = s.scalars(select(EpochRow).where(EpochRow.run_id == run_id).order_by(EpochRow.epoch))
            return [_restore(r.data) for r in rows]

    def checkpoints(self, run_id: int) -> list[tuple[int, int, str]]:
        """``(step, epoch, path)`` of every recorded checkpoint, oldest first."""
        with self._read() as s:
            rows = s.scalars(select(CheckpointRow).where(CheckpointRow.run_id == run_id)
                             .order_by(CheckpointRow.step, CheckpointRow.epoch, CheckpointRow.id))
            return [(r.step, r.epoch, r.path) for r in rows]

    def events(self, run_id: int) -> list[dict[str, Any]]:
        with self._read() as s:
            rows = s.scalars(select(EventRow).where(EventRow.run_id == run_id).order_by(EventRow.id))
            return [{"step": r.step, "kind": r.kind, "message": r.message, "at": r.created_at} for r in rows]

    def close(self) -> None:
        """Close the store's connections (leases stay: a run this store drives stays running)."""
        with self._guard("close"):
            self.engine.dispose()


def _drop_after(session: Session, run_id: int, step: int, epoch: int) -> None:
    """Delete a run's trajectory, epoch and checkpoint rows after ``step``/``epoch``."""
    session.execute(delete(TrajectoryRow).where(TrajectoryRow.run_id == run_id, TrajectoryRow.step > step))
    session.execute(delete(EpochRow).where(EpochRow.run_id == run_id, EpochRow.epoch > epoch))
    later = (CheckpointRow.step > step) | ((CheckpointRow.step == step) & (CheckpointRow.epoch > epoch))
    session.execute(delete(CheckpointRow).where(CheckpointRow.run_id == run_id, later))


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _restore(row: dict[str, Any]) -> dict[str, Any]:
    return {k: float("nan") if v is None else v for k, v in row.items()}
