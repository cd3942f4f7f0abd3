"""Alembic environment. imgembed runs it programmatically (imgembed.store.postgres.migrate,
also behind `imgembed db upgrade`) with the URL set; `alembic upgrade head` from the
repository (alembic.ini) takes IMGEMBED_DATABASE_URL, else starts or joins the embedded
server of IMGEMBED_DATA_DIR."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text

MIGRATION_LOCK = 0x696D6765  # pg_advisory_xact_lock key: one migrating process at a time


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        from imgembed.config import Settings
        from imgembed.store import embedded

        settings = Settings()
        url = settings.database_url or embedded.start(settings.data_dir)
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


if context.config.config_file_name:  # alembic.ini: its logging shows each migration
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)
engine = create_engine(_url(), poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=False)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
