"""A throwaway PostgreSQL cluster for the tests: initdb and pg_ctl on a loopback port, in a temporary directory.

PostgreSQL refuses to run as root, so under root the cluster runs as `nobody`. Torn down on exit, data included.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.e2e.conftest import free_port


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """with PostgresCluster(["prefect", "mlflow"]) as pg: pg.url("mlflow") -> postgresql://postgres@127.0.0.1:P/mlflow"""

    def __init__(self, databases: list[str]):
        self.databases = databases
        self.bin = postgres_bin()
        self.port = free_port()

    def _run(self, *command: str) -> None:
        user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

        def drop_root():
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        subprocess.run(
            [str(self.bin / command[0]), *command[1:]],
            check=True,
            capture_output=True,
            preexec_fn=drop_root if user else None,
            cwd=self.root,
        )

    def __enter__(self) -> "PostgresCluster":
        self.root = Path(tempfile.mkdtemp(prefix="codetune-pg-"))
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        data = str(self.root / "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", "postgres")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", data, "-o", options, "-l", str(self.root / "postgres.log"), "-w", "start")
        for name in self.databases:
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self

    def url(self, database: str, driver: str | None = None) -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def __exit__(self, *exc) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
