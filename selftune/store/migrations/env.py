"""Alembic environment: migrations run on the connection the store hands over."""

from alembic import context

from selftune.store._schema import Base

connection = context.config.attributes["connection"]
# Own version table: Optuna keeps its studies in the same database with its own `alembic_version`.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  version_table="selftune_alembic_version")
with context.begin_transaction():
    context.run_migrations()
