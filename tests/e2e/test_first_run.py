"""The first `codetune run` on a machine: an empty PREFECT_HOME, no server running. Prefect's temporary server would
migrate its database inside a 20 s startup wait, which a slow 2-core machine overran."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import TINY, TWIN

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_the_first_run_prepares_prefects_database_before_the_server_starts(tmp_path, stdlib_cache):
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    command = [sys.executable, "-m", "flows.cli", "run", "--config", TWIN, *TINY]
    command += [
        f"data.cache_dir={stdlib_cache}",
        f"training.output_dir={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]

    def run() -> subprocess.CompletedProcess:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return done

    first = run()
    assert "preparing Prefect's database" in first.stderr and "(first run only)" in first.stderr
    with sqlite3.connect(home / "prefect.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()
    assert json.loads(first.stdout)["registration"]["version"] == "1"

    second = run()  # the database is there: nothing to prepare
    assert "preparing Prefect's database" not in second.stderr
