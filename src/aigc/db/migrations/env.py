"""Alembic's environment for the store: run by `aigc.db.migrate` (there is no alembic.ini) with the connection to
migrate in `config.attributes["connection"]`, already inside the transaction that the whole upgrade runs in.

Offline mode (`alembic.command.upgrade(config, "head", sql=True)` with `sqlalchemy.url` set) prints the SQL
instead, for a database administrator to read or run.
"""

from __future__ import annotations

from alembic import context

from aigc.db.schema import VERSION_TABLE, metadata

OPTIONS = {
    "target_metadata": metadata,
    "version_table": VERSION_TABLE,  # Optuna's storage, sharing the database, owns Alembic's default table
    "render_as_batch": True,  # SQLite alters a table by rebuilding it: batch mode does that
    "compare_type": True,
}


def run_offline() -> None:
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
