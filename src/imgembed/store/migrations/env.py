"""Alembic environment: run programmatically by imgembed.store.migrate (no alembic.ini)."""

from alembic import context
from sqlalchemy import create_engine, pool, text

MIGRATION_LOCK = 0x696D6765  # pg_advisory_xact_lock key: one migrating process at a time

engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=False)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
