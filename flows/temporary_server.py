"""Prefect's temporary server, made ready before a flow asks for it.

Without PREFECT_API_URL, the first flow of a process starts a temporary server that creates and
migrates its SQLite database on its first start, and Prefect waits 20 s for it. On a fresh 2-core
machine the migration alone takes about that long, so the very first `codetune run` used to die
with "Timed out while attempting to connect to ephemeral Prefect API server". The database is
migrated here first, with a line saying so, and the server gets a longer wait for what is left.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from codetune.core.errors import CodetuneError

# A migrated database starts in ~8 s on a 2-core machine and in up to ~60 s with both cores busy.
STARTUP_TIMEOUT_S = 180


def prepare_temporary_server() -> None:
    """Migrate the temporary server's database if it never was, and raise the server's startup wait.

    Call before anything imports prefect: its settings are read once, at import. A user's own
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is kept, and nothing happens with a real server.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_S))
    # Its telemetry writes race the flow's on the SQLite database ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return
    database = sqlite_database(settings.server.database.connection_url.get_secret_value())
    if database is None or is_migrated(database):
        return
    print(f"codetune: preparing Prefect's database in {database.parent} (first run only) ...", file=sys.stderr)
    started = time.perf_counter()
    upgrade = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "--yes"],
        capture_output=True,
        text=True,
    )
    if upgrade.returncode != 0:
        raise CodetuneError(
            f"could not prepare Prefect's database {database}: {upgrade.stderr.strip()[-2000:]}\n"
            "Check that its directory (PREFECT_HOME) is writable and has free space, or point PREFECT_API_URL at a "
            "running `prefect server start`"
        )
    print(f"codetune: Prefect's database is ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def sqlite_database(url: str) -> Path | None:
    """The file of a sqlite+aiosqlite:///… URL; None for another database (a server of its own migrates it)."""
    scheme, _, path = url.partition(":///")
    return Path(path) if scheme.startswith("sqlite") and path else None


def is_migrated(database: Path) -> bool:
    """Whether alembic has recorded a revision: a database a server has started on before."""
    if not database.exists():
        return False
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            return connection.execute("SELECT version_num FROM alembic_version").fetchone() is not None
    except sqlite3.Error:
        return False
