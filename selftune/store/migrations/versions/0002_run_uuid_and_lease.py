"""Runs get a uuid (unique across stores; names the checkpoint folder) and a lease (the driving process).

Revision ID: 0002
Revises: 0001

Existing rows get a fresh uuid4 and no lease. The steps are idempotent because SQLite runs DDL
outside transactions: a migration cut off half-way is finished by the next open.

SQLite cannot make a column NOT NULL after the fact without rebuilding ``runs``, and dropping
``runs`` with foreign keys on would cascade away its trajectory, epochs, checkpoints and events: there
the column is added NOT NULL with an empty default that every existing row then overwrites (new
rows always carry a uuid). PostgreSQL adds it nullable, fills it, then sets NOT NULL.
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    inspector = sa.inspect(bind)
    columns = {c["name"] for c in inspector.get_columns("runs")}
    if "uuid" not in columns:
        op.add_column("runs", sa.Column("uuid", sa.String(32), nullable=not sqlite,
                                        server_default="" if sqlite else None))
    if "lease" not in columns:
        op.add_column("runs", sa.Column("lease", sa.String(32), nullable=True))
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("uuid", sa.String))
    missing = bind.execute(sa.select(runs.c.id).where(sa.or_(runs.c.uuid.is_(None), runs.c.uuid == ""))).scalars()
    for run_id in list(missing):
        bind.execute(runs.update().where(runs.c.id == run_id).values(uuid=uuid.uuid4().hex))
    if not sqlite:
        op.alter_column("runs", "uuid", existing_type=sa.String(32), nullable=False)
    if "ix_runs_uuid" not in {ix["name"] for ix in sa.inspect(bind).get_indexes("runs")}:
        op.create_index("ix_runs_uuid", "runs", ["uuid"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_runs_uuid", table_name="runs")
    op.drop_column("runs", "lease")
    op.drop_column("runs", "uuid")
