"""The run store: runs, trajectories, metrics, checkpoints and events in any SQLAlchemy database.

A SQLite file by default (``selftune.db`` in the working directory), in WAL mode with a busy timeout
so several processes can write to it; any SQLAlchemy URL (PostgreSQL) for many workers. The schema
is created and upgraded by Alembic when a store is opened, so a newer selftune opens an older store.

Consistency rule: trajectory and epoch rows reach the store in the same transaction as the
checkpoint they belong to (see :meth:`RunStore.commit_checkpoint`), so after a crash the store holds
exactly the rows of its last checkpoint, and a resumed run neither repeats nor misses a row.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, delete, event, select, text, update
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker

from ._schema import CheckpointRow, EpochRow, EventRow, RunRow, TrajectoryRow

__all__ = ["STALE_AFTER", "RunInfo", "RunStore", "StoreError", "resolve_url"]

DEFAULT_URL = "sqlite:///selftune.db"
ENV_VAR = "SELFTUNE_STORE"
#: A running run whose heartbeat is older than this is shown as interrupted.
STALE_AFTER = timedelta(seconds=60)
T = TypeVar("T")


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message is one line and never shows a password."""


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _dead_here(host: str, pid: int) -> bool:
    """True when ``pid`` on this host has exited (a run killed before its heartbeat went stale)."""
    if host != socket.gethostname():
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


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``$SELFTUNE_STORE``, else ``sqlite:///selftune.db``."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise StoreError(f"store: {url.split('@')[-1]!r} is not a database URL "
                         "(e.g. sqlite:///runs.db or postgresql://user@host/db)") from None


@dataclass
class RunInfo:
    """One run as the store knows it. ``status`` reads ``interrupted`` for a stale running run."""

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

    @classmethod
    def from_row(cls, row: RunRow) -> RunInfo:
        status = row.status
        if status == "running" and (_now() - row.heartbeat_at > STALE_AFTER or _dead_here(row.host, row.pid)):
            status = "interrupted"
        return cls(row.id, row.method, row.seed, status, row.config, row.out_dir, row.checkpoint_dir,
                   row.created_at, row.heartbeat_at, row.finished_at, row.test_loss, row.result, row.error,
                   row.host, row.pid)


class RunStore:
    """Opens (and creates or upgrades) a store.

    Args:
        url: SQLAlchemy URL; ``None`` resolves through :func:`resolve_url`.

    Raises:
        StoreError: a malformed URL, a missing database driver, or a database that cannot be opened.
    """

    def __init__(self, url: str | None = None) -> None:
        raw = resolve_url(url)
        self.url = _parse(raw)
        self.display_url = self.url.render_as_string(hide_password=True)
        try:
            self.engine = self._engine()
            self._upgrade()
        except NoSuchModuleError:
            raise StoreError(f"store: no database driver for {self.url.drivername!r} "
                             f"({self.display_url}); install it or use sqlite:///FILE") from None
        except SQLAlchemyError as err:
            raise StoreError(f"store: cannot open {self.display_url}: {type(err.orig or err).__name__}") from None
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def _engine(self) -> Engine:
        if self.url.get_backend_name() == "sqlite":
            db = self.url.database
            if db and db != ":memory:" and not Path(db).parent.exists():
                raise StoreError(f"store: folder {str(Path(db).parent)!r} of {self.display_url} does not exist")
            engine = create_engine(self.url, connect_args={"timeout": 60})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(conn, _record):
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL survives any process crash (what the store promises); it skips the
                # per-commit fsync that made commits the bottleneck of short runs on slow disks.
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=60000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            return engine
        return create_engine(self.url, pool_pre_ping=True)

    def _upgrade(self) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        # Several processes may open a new store at once. PostgreSQL: an advisory lock serialises the
        # migrations (concurrent CREATE TABLEs otherwise collide on the catalog). SQLite: the database
        # lock does, and a loser that still collides retries, then finds the schema up to date.
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(73556081)"))
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                return
            except (OperationalError, IntegrityError, ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    # -- transactions ---------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._session.begin() as session:
            yield session

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction, retrying when another writer holds the database."""
        for attempt in range(8):
            try:
                with self._tx() as session:
                    return fn(session)
            except OperationalError as err:
                if ("locked" not in str(err).lower() and "busy" not in str(err).lower()) or attempt == 7:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    # -- writing --------------------------------------------------------------------------------
    def create_run(self, *, method: str, seed: int, config: dict[str, Any], out_dir: str,
                   checkpoint_root: str) -> int:
        """Record a new running run; its checkpoints go to ``checkpoint_root/run-<id>``."""
        def add(session: Session) -> int:
            now = _now()
            row = RunRow(method=method, seed=seed, status="running", config=config, out_dir=out_dir,
                         checkpoint_dir="", created_at=now, heartbeat_at=now, host=socket.gethostname(),
                         pid=os.getpid())
            session.add(row)
            session.flush()
            row.checkpoint_dir = str(Path(checkpoint_root).resolve() / f"run-{row.id}")
            return row.id
        return self._write(add)

    def heartbeat(self, run_id: int, status: str = "running") -> None:
        self._write(lambda s: s.execute(update(RunRow).where(RunRow.id == run_id)
                                        .values(heartbeat_at=_now(), status=status)))

    def commit_checkpoint(self, run_id: int, *, step: int, epoch: int, path: str,
                          trajectory: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> None:
        """Record a checkpoint file and the rows produced since the previous one, atomically."""
        def add(session: Session) -> None:
            session.add(CheckpointRow(run_id=run_id, step=step, epoch=epoch, path=path, created_at=_now()))
            session.add_all(TrajectoryRow(run_id=run_id, step=int(r["step"]), data=_clean(r)) for r in trajectory)
            session.add_all(EpochRow(run_id=run_id, epoch=int(r["epoch"]), data=_clean(r)) for r in epochs)
            session.execute(update(RunRow).where(RunRow.id == run_id).values(heartbeat_at=_now()))
        self._write(add)

    def rewind(self, run_id: int, step: int, epoch: int) -> None:
        """Drop what came after the checkpoint at ``step``/``epoch`` (the one a resume starts from) and
        mark the run running in this process."""
        def rewind(session: Session) -> None:
            session.execute(delete(TrajectoryRow).where(TrajectoryRow.run_id == run_id, TrajectoryRow.step > step))
            session.execute(delete(EpochRow).where(EpochRow.run_id == run_id, EpochRow.epoch > epoch))
            session.execute(delete(CheckpointRow).where(CheckpointRow.run_id == run_id, CheckpointRow.step > step))
            session.execute(update(RunRow).where(RunRow.id == run_id).values(
                status="running", heartbeat_at=_now(), error=None, finished_at=None,
                host=socket.gethostname(), pid=os.getpid()))
        self._write(rewind)

    def add_event(self, run_id: int, *, step: int, kind: str, message: str) -> None:
        self._write(lambda s: s.add(EventRow(run_id=run_id, step=step, kind=kind, message=message,
                                             created_at=_now())))

    def finish(self, run_id: int, result: dict[str, Any]) -> None:
        self._write(lambda s: s.execute(update(RunRow).where(RunRow.id == run_id).values(
            status="finished", finished_at=_now(), heartbeat_at=_now(), result=_clean(result),
            test_loss=result["test"]["loss"])))

    def fail(self, run_id: int, error: str) -> None:
        self._write(lambda s: s.execute(update(RunRow).where(RunRow.id == run_id).values(
            status="failed", finished_at=_now(), heartbeat_at=_now(), error=error)))

    # -- reading --------------------------------------------------------------------------------
    def list_runs(self) -> list[RunInfo]:
        with self._session() as s:
            return [RunInfo.from_row(r) for r in s.scalars(select(RunRow).order_by(RunRow.id))]

    def get_run(self, run_id: int) -> RunInfo:
        """Raises:
            LookupError: no run with this id.
        """
        with self._session() as s:
            row = s.get(RunRow, run_id)
            if row is None:
                raise LookupError(f"no run {run_id} in {self.display_url}; `selftune runs` lists them")
            return RunInfo.from_row(row)

    def trajectory(self, run_id: int) -> list[dict[str, Any]]:
        with self._session() as s:
            rows = s.scalars(select(TrajectoryRow).where(TrajectoryRow.run_id == run_id).order_by(TrajectoryRow.step))
            return [_restore(r.data) for r in rows]

    def epochs(self, run_id: int) -> list[dict[str, Any]]:
        with self._session() as s:
            rows = s.scalars(select(EpochRow).where(EpochRow.run_id == run_id).order_by(EpochRow.epoch))
            return [_restore(r.data) for r in rows]

    def checkpoints(self, run_id: int) -> list[tuple[int, int, str]]:
        """``(step, epoch, path)`` of every recorded checkpoint, oldest first."""
        with self._session() as s:
            rows = s.scalars(select(CheckpointRow).where(CheckpointRow.run_id == run_id).order_by(CheckpointRow.step))
            return [(r.step, r.epoch, r.path) for r in rows]

    def events(self, run_id: int) -> list[dict[str, Any]]:
        with self._session() as s:
            rows = s.scalars(select(EventRow).where(EventRow.run_id == run_id).order_by(EventRow.id))
            return [{"step": r.step, "kind": r.kind, "message": r.message, "at": r.created_at} for r in rows]

    def close(self) -> None:
        self.engine.dispose()


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
